"""Write the token explorer's bundled sample photos: small JPEGs of the held-out bundled photos.

    python scripts/make_web_samples.py            # writes service/web/static/samples/*.jpg

The photos are ``vqtok.model.data.photos``' held-out trio (never trained on), so what the page shows is
the model on images it has not seen. Each is resized with Lanczos so its longer side is 256 pixels and
saved as a baseline JPEG at quality 85: together well under 100 KB, shipped inside the wheel (the page
must work with no network and without the ``train`` extra that the photos come from). The same inputs
give the same bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from vqtok.model.data.photos import PHOTO_HELDOUT, load_photo

OUT = Path(__file__).resolve().parent.parent / "service" / "web" / "static" / "samples"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--side", type=int, default=256, help="longer side in pixels")
    parser.add_argument("--quality", type=int, default=85)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in PHOTO_HELDOUT:
        image = Image.fromarray(load_photo(name))
        scale = args.side / max(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        path = args.out / f"{name}.jpg"
        image.resize(size, Image.Resampling.LANCZOS).save(path, format="JPEG", quality=args.quality, optimize=True)
        print(f"{path}: {size[0]}x{size[1]}, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
