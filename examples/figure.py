"""The README's picture: each sample photo as the model sees it (shorter side 256, centre crop) above its
reconstructions, one row per folder that `dgaetok decode` wrote (for example at different step counts).

    python examples/figure.py examples/photos recon -o compare.jpg
    python examples/figure.py examples/photos recon-1 recon-4 recon-50 -o docs/sample-reconstructions.jpg
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from dgaetok.files import DEFAULT_MAX_PIXELS, center_crop, open_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path, help="the photos that were encoded")
    parser.add_argument("recon", type=Path, nargs="+", help="the folders decode wrote, one row each")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the picture to write (JPEG or PNG)")
    parser.add_argument("--size", type=int, default=192, help="side of each cell in the picture")
    args = parser.parse_args()
    # a photo is drawn when every folder holds its reconstruction, so that the columns line up
    photos = [photo for photo in sorted(args.photos.glob("*.jpg"))
              if all((folder / f"{photo.stem}.png").is_file() for folder in args.recon)]
    if not photos:
        raise SystemExit(f"{', '.join(map(str, args.recon))}: no photo of {args.photos} reconstructed in every folder")
    s, gap = args.size, 4
    sheet = Image.new("RGB", (len(photos) * (s + gap) - gap, (1 + len(args.recon)) * (s + gap) - gap), "white")
    for i, photo in enumerate(photos):
        for row, folder in enumerate(args.recon, start=1):
            with Image.open(folder / f"{photo.stem}.png") as rec:
                if row == 1:
                    original, _ = center_crop(open_image(photo, DEFAULT_MAX_PIXELS, rec.width), rec.width, 1)
                    sheet.paste(original.resize((s, s), Image.LANCZOS), (i * (s + gap), 0))
                sheet.paste(rec.convert("RGB").resize((s, s), Image.LANCZOS), (i * (s + gap), row * (s + gap)))
    sheet.save(args.output, quality=88)
    print(f"wrote {args.output} ({sheet.width}x{sheet.height}, {len(photos)} photos, {len(args.recon)} rows)")


if __name__ == "__main__":
    main()
