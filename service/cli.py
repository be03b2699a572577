"""The ``vqtok`` console command: one entry point, one subcommand per job.

Each subcommand's module is imported only when it runs, so ``vqtok train`` never imports the web
stack and ``vqtok encode`` never imports torch's training code.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function taking argv, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("vqtok.service.__main__", "main", "run the HTTP tokenizer service"),
    "train": ("vqtok.model.train", "main", "train a VQ-VAE tokenizer offline"),
    "evaluate": ("vqtok.model.evaluate", "main", "measure a checkpoint's MSE, PSNR, perplexity, codes used"),
    "tokenize": ("vqtok.tokenize", "main", "tokenize a dataset into shards (resumable)"),
    "encode": ("vqtok.service.client", "encode_main", "POST images to a running service, print token grids"),
    "decode": ("vqtok.service.client", "decode_main", "POST token grids to a running service, write images"),
    "import": ("vqtok.model.importers.command", "main", "convert a LlamaGen, taming or Chameleon checkpoint"),
}


def usage() -> str:
    lines = ["usage: vqtok <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, _, help_text) in SUBCOMMANDS.items()]
    lines += ["", "Run 'vqtok <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in SUBCOMMANDS:
        print(f"vqtok: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = SUBCOMMANDS[command]
    function = getattr(importlib.import_module(module_name), function_name)
    result = function(rest)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
