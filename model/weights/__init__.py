"""The bundled checkpoints, by name: each folder here holding a ``config.json`` is one.

- ``default``: the seed's architecture, f=4, 512 codes (a 256x256 image is 4,096 tokens of 9 bits), trained on
  the 19 photographs of ``data/photos-v1`` (``vqtok-default-f4-photos-v1``; bundled as ``f4-photos-v1`` before
  it became the default, a name that still works).
- ``default-v1``: the previous default, the same network trained on the 9 ``photos`` images
  (``vqtok-default-f4``): token sets made with it decode only with it (their ``model_id`` differs).
- ``f8``: the seed's architecture, f=8, 8,192 codes (a 256x256 image is 1,024 tokens of 13 bits), trained
  4,000 steps with the sampled codebook-usage term and the gradient-matching term
  (``vqtok-seed-f8-k8192-entropy-sampled-gradient-4k``): its grid measure is within 0.03 of the originals'.
- ``f8-k4096``: the same network with 4,096 codes (1,024 tokens of 12 bits), trained 4,000 steps with the
  codebook-usage term on the whole batch, the gradient-matching term and restarts after 20 unused steps
  (``vqtok-seed-f8-k4096-entropy-gradient-window20-4k``): 96% of its codes are used on held-out photographs,
  and its grid measure is within 0.03 of the originals'.
- ``f8-k4096-v1``: the ``f8-k4096`` before it (``vqtok-seed-f8-k4096-entropy-4k``, without the gradient term
  and with restarts after 100 steps): token sets made with it decode only with it.
- ``f8-v2``: the ``f8`` before it (``vqtok-seed-f8-k8192-entropy-sampled-4k``, without the gradient term):
  token sets made with it decode only with it.
- ``f8-v1``: the ``f8`` before that (``vqtok-seed-f8-k8192-entropy``, 2,000 steps with the whole-batch term):
  token sets made with it decode only with it.

A folder added here (a trained checkpoint directory) is bundled under its folder name.

Every command that takes a checkpoint (``vqtok serve --checkpoint``, ``evaluate``, ``tokenize``,
``Tokenizer.from_checkpoint``) takes one of these names too; an existing directory of the same name wins.
"""

from __future__ import annotations

import os
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent
# Former names of bundled checkpoints -> their folder now.
RENAMED = {"f4-photos-v1": "default"}


def bundled_checkpoints() -> dict[str, Path]:
    """Name -> folder of every bundled checkpoint, sorted by name."""
    return {path.name: path for path in sorted(WEIGHTS_DIR.iterdir()) if (path / "config.json").is_file()}


def resolve_checkpoint(spec: str | os.PathLike[str]) -> Path:
    """A checkpoint directory, or the name of a bundled checkpoint -> its directory.

    A path that exists is used as it is; otherwise a bundled name (``default``) gives the
    bundled folder, and so does a former bundled name (``RENAMED``); anything else is returned unchanged,
    for the loader to report as missing.
    """
    path = Path(spec)
    if path.exists():
        return path
    bundled = bundled_checkpoints()
    return bundled.get(str(spec)) or bundled.get(RENAMED.get(str(spec), ""), path)
