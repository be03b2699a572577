"""Draw reconstructions.png for a checkpoint: whole held-out images beside their reconstructions.

    python scripts/reconstructions.py model/weights/default model/weights/default/reconstructions.png
    python scripts/reconstructions.py runs/mine/checkpoint out.png --data /path/to/images

The same figure ``vqtok train`` writes at the end of a run (``model.train.write_reconstructions``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vqtok.model.checkpoint import load_checkpoint
from vqtok.model.train import write_reconstructions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint directory")
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--data", default="photos", help="data spec whose held-out split is drawn (default photos)")
    parser.add_argument("--count", type=int, default=4, help="images at most")
    args = parser.parse_args()
    write_reconstructions(load_checkpoint(args.checkpoint, "cpu").model, args.data, args.out, args.count)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
