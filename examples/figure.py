"""The README's picture: each sample photo as the model sees it (shorter side 256, centre crop) above its
reconstruction, after the README's two commands have written recon/.

    python examples/figure.py examples/photos recon -o docs/sample-reconstructions.jpg
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from dgaetok.files import DEFAULT_MAX_PIXELS, center_crop, open_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path, help="the photos that were encoded")
    parser.add_argument("recon", type=Path, help="the folder decode wrote")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the picture to write (JPEG or PNG)")
    parser.add_argument("--size", type=int, default=192, help="side of each cell in the picture")
    args = parser.parse_args()
    pairs = [(photo, args.recon / f"{photo.stem}.png") for photo in sorted(args.photos.glob("*.jpg"))]
    pairs = [(photo, recon) for photo, recon in pairs if recon.is_file()]
    if not pairs:
        raise SystemExit(f"{args.recon}: no reconstruction of a photo in {args.photos}")
    s, gap = args.size, 4
    sheet = Image.new("RGB", (len(pairs) * (s + gap) - gap, 2 * s + gap), "white")
    for i, (photo, recon) in enumerate(pairs):
        with Image.open(recon) as rec:
            original, _ = center_crop(open_image(photo, DEFAULT_MAX_PIXELS, rec.width), rec.width, 1)
            sheet.paste(original.resize((s, s), Image.LANCZOS), (i * (s + gap), 0))
            sheet.paste(rec.convert("RGB").resize((s, s), Image.LANCZOS), (i * (s + gap), s + gap))
    sheet.save(args.output, quality=88)
    print(f"wrote {args.output} ({sheet.width}x{sheet.height}, {len(pairs)} photos)")


if __name__ == "__main__":
    main()
