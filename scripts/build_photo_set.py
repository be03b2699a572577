"""Build the training photo set: a folder of real photographs with a fixed train / held-out split by image.

    python scripts/build_photo_set.py --out data/photos-v1

Sources (all installable here, nothing downloaded at run time):

- the natural photos bundled in scikit-image, scikit-learn and matplotlib (``vqtok.model.data.photos``),
  with their fixed held-out trio (``PHOTO_HELDOUT``);
- the photographs of Debian's ``lomiri-wallpapers-16.04`` (``apt-get install lomiri-wallpapers-16.04``,
  version 20.04.0-2), in ``/usr/share/backgrounds``. Photographs only: ``umang_by_Abhishek_Mudgal`` is a
  rendered colour gradient and is left out. No other desktop-background package is used: independent
  evaluation relies on photographs we never trained on.

Every image is decoded (EXIF orientation applied), converted to RGB and, when its longer side exceeds
``--max-side`` (1024), resized with Lanczos so that side is ``--max-side``: the wallpapers are 3-16
megapixels, at which a 64x64 training crop is a featureless patch, and tokenizers are fed images of a few
hundred pixels a side. Images are written as PNG (lossless: no re-encoding artifacts to
learn) under ``train/`` or ``heldout/``, the layout ``FolderSource`` reads as a fixed split, with
``.manifest.json`` (hidden, so the folder source skips it) listing each file's source, original size and
sha256. The split is fixed by name (``HELDOUT``), never by chance, so rebuilding gives the same split; the
same inputs give the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from vqtok.model.data.photos import PHOTO_HELDOUT, load_photo, photo_sources
from vqtok.model.data.pixels import load_image

WALLPAPER_DIR = Path("/usr/share/backgrounds")
WALLPAPER_PACKAGE = "lomiri-wallpapers-16.04"

#: The package's photographs (every file of it but the rendered gradient ``umang_by_Abhishek_Mudgal``).
WALLPAPER_PHOTOS: tuple[str, ...] = (
    "Bridge_by_Sander_Klootwijk",
    "Dragonfly_by_Bolly",
    "Picture_0B_by_freespace",
    "Picture_1A_by_freespace",
    "Wine_by_Jakkub_Mede",
    "aitzgorri_by_Aitzol_Berasategi",
    "analogpattern_by_Peter_Nerlich",
    "free_by_Peter_Nerlich",
    "friends_by_Aitzol_Berasategi",
    "greentock_by_Peter_Nerlich",
    "life_by_Aitzol_Berasategi",
    "picosdeeuropa_by_Aitzol_Berasategi",
    "seeding_by_Clements_Engelhardt",
    "sunset_by_Aitzol_Berasategi",
)

#: Held out, never trained on: foliage against sky, two dogs on weathered wood, mountains under clouds, and
#: smooth out-of-focus gradients (where banding and grid artifacts show), plus the bundled photos' trio.
HELDOUT: frozenset[str] = frozenset({
    "Dragonfly_by_Bolly",
    "friends_by_Aitzol_Berasategi",
    "picosdeeuropa_by_Aitzol_Berasategi",
    "greentock_by_Peter_Nerlich",
    *PHOTO_HELDOUT,
})


def fit_longer_side(array: np.ndarray, max_side: int) -> np.ndarray:
    """(H, W, 3) uint8 -> the same, Lanczos-resized so the longer side is at most ``max_side``."""
    height, width = array.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return array
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # reducing_gap=None: an exact Lanczos filter over the full image (no JPEG draft shortcut), reproducible.
    return np.asarray(Image.fromarray(array).resize(size, Image.Resampling.LANCZOS, reducing_gap=None))


def collect() -> list[tuple[str, str, np.ndarray]]:
    """(name, source, (H, W, 3) uint8) for every photo, bundled ones first, in a fixed order."""
    missing = [name for name in WALLPAPER_PHOTOS if not (WALLPAPER_DIR / f"{name}.jpg").is_file()]
    if missing:
        raise SystemExit(
            f"missing {len(missing)} photograph(s) of {WALLPAPER_PACKAGE} in {WALLPAPER_DIR} (e.g. {missing[0]}.jpg): "
            f"apt-get install {WALLPAPER_PACKAGE}"
        )
    photos = [(name, "bundled", np.asarray(load_photo(name))) for name in photo_sources()]
    photos += [(name, WALLPAPER_PACKAGE, load_image(WALLPAPER_DIR / f"{name}.jpg")) for name in WALLPAPER_PHOTOS]
    return photos


def build(out: Path, max_side: int) -> dict[str, object]:
    """Write the folder and its manifest; returns the manifest."""
    entries = []
    for name, source, array in collect():
        split = "heldout" if name in HELDOUT else "train"
        fitted = fit_longer_side(array, max_side)
        path = out / split / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".png.tmp")
        Image.fromarray(fitted).save(temporary, format="PNG", optimize=False, compress_level=6)
        temporary.replace(path)
        entries.append({
            "file": path.relative_to(out).as_posix(), "split": split, "source": source,
            "original_size": [int(array.shape[1]), int(array.shape[0])],
            "size": [int(fitted.shape[1]), int(fitted.shape[0])],
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        })
        print(f"{split:8s} {fitted.shape[1]:5d}x{fitted.shape[0]:<5d} {name}", flush=True)
    pixels = {split: sum(e["size"][0] * e["size"][1] for e in entries if e["split"] == split)
              for split in ("train", "heldout")}
    manifest = {"max_side": max_side, "images": entries,
                "counts": {split: sum(e["split"] == split for e in entries) for split in ("train", "heldout")},
                "pixels": pixels}
    (out / ".manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/photos-v1"), help="output folder")
    parser.add_argument("--max-side", type=int, default=1024, help="longer side of the written images")
    args = parser.parse_args(argv)
    manifest = build(args.out, args.max_side)
    counts, pixels = manifest["counts"], manifest["pixels"]
    print(f"{args.out}: {counts['train']} train images ({pixels['train'] / 1e6:.1f} MP), "  # type: ignore[index]
          f"{counts['heldout']} held out ({pixels['heldout'] / 1e6:.1f} MP)")  # type: ignore[index]
    return 0


if __name__ == "__main__":
    sys.exit(main())
