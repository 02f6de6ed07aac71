"""A 2048x1536 photo round trip at its own size on the CPU: encode --keep-size, tiled decode, seams measured.

    python benchmarks/large_photo.py --out runs/large-photo            # then see runs/large-photo/result.json
    python benchmarks/large_photo.py --picture docs/large-photo.jpg     # also (re)writes the README's picture

No photo in the project's data is that large (the training photos are capped at 384 px, the evaluation images
are about 500x375), so the test image is an evaluation photo, n04310018_steam_locomotive.JPEG (500x375, 4:3),
upscaled 4.096x with Lanczos to 2048x1536. Upscaling makes it smoother at fine scale than a camera's 2048 px
photo, which is kind to the reconstruction; it is said wherever the picture is shown.

The round trip runs the real commands (printed) in subprocesses, each timed, with its peak RSS from
``/usr/bin/time``. On the result it reports PSNR against the upscaled photo and `tiling.seam_ratio` along the
decode's tile borders (1: borders leave no trace), next to the same measure on the photo itself. The picture
is original | reconstruction downscaled to 512x384, over 1:1 crops around a point where four tiles meet.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT.parent / "shared" / "data" / "eval" / "imagenet-val500" / "n04310018_steam_locomotive.JPEG"


def run(cmd: list[str]) -> dict:
    """Run a command under /usr/bin/time -v; its wall time and peak RSS."""
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"failed ({done.returncode}):\n{done.stderr}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1])
    notes = [line for line in done.stderr.splitlines() if line.startswith("note:")]
    return {"command": " ".join(cmd), "seconds": seconds, "peak_rss_mib": rss_kib / 1024, "notes": notes}


def picture(source: np.ndarray, recon: np.ndarray, top: int, left: int, path: Path) -> None:
    """Original | reconstruction downscaled to 512 px wide, over 1:1 crops of 512x384 centred on (top, left)."""
    w, h, gap = 512, 384, 8
    small = [Image.fromarray(a).resize((w, w * a.shape[0] // a.shape[1]), Image.LANCZOS) for a in (source, recon)]
    y = min(max(top - h // 2, 0), source.shape[0] - h)
    x = min(max(left - w // 2, 0), source.shape[1] - w)
    crops = [Image.fromarray(a[y:y + h, x:x + w]) for a in (source, recon)]
    out = Image.new("RGB", (2 * w + gap, small[0].height + gap + h), "white")
    for i, (top_panel, crop) in enumerate(zip(small, crops)):
        out.paste(top_panel, (i * (w + gap), 0))
        out.paste(crop, (i * (w + gap), small[0].height + gap))
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path, quality=92) if path.suffix.lower() in (".jpg", ".jpeg") else out.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/large-photo"))
    p.add_argument("--photo", type=Path, default=PHOTO)
    p.add_argument("--size", default="2048x1536", help="WxH the photo is upscaled to.")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--shift", type=float, default=0.5)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--picture", type=Path, help="Also write the side-by-side picture here (.jpg or .png).")
    args = p.parse_args()

    from dgaetok.files import open_image, to_tensor, to_uint8
    from dgaetok.models import load_model
    from dgaetok.tiling import TileGrid, seam_ratio

    size = tuple(int(v) for v in args.size.split("x"))
    src = args.out / "src" / f"{args.photo.stem}-{args.size}.png"
    src.parent.mkdir(parents=True, exist_ok=True)
    Image.open(args.photo).convert("RGB").resize(size, Image.LANCZOS).save(src)
    dgaetok = [sys.executable, "-m", "dgaetok.cli"]
    encode = run([*dgaetok, "encode", str(src.parent), "-o", str(args.out / "latents"), "--keep-size", "--overwrite",
                  "--device", "cpu"])
    decode = run([*dgaetok, "decode", str(args.out / "latents"), "-o", str(args.out / "recon"), "--steps",
                  str(args.steps), "--shift", str(args.shift), "--tile", str(args.tile), "--overlap",
                  str(args.overlap), "--overwrite", "--device", "cpu"])

    source = np.asarray(open_image(src))
    recon = np.asarray(open_image(args.out / "recon" / src.with_suffix(".png").name))
    assert recon.shape == source.shape, (recon.shape, source.shape)
    model = load_model()
    grid = TileGrid(size[1], size[0], args.tile, args.overlap, model.size_multiple)
    x, y = to_tensor(Image.fromarray(source)), to_tensor(Image.fromarray(recon))
    result = {
        "photo": f"{args.photo.name}, upscaled to {args.size} (Lanczos)",
        "encode": encode, "decode": decode, "tiles": len(grid),
        "psnr_db": 10 * np.log10(4 / (x - y).pow(2).mean().item()),
        "seam_ratio_recon": seam_ratio(to_uint8(y), grid),
        "seam_ratio_photo": seam_ratio(torch.from_numpy(source.copy()), grid),
        "torch_threads": torch.get_num_threads(),
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if args.picture:  # centred where four tiles meet, near the middle of the image
        picture(source, recon, grid.tops[len(grid.tops) // 2], grid.lefts[len(grid.lefts) // 2], args.picture)
        print(f"wrote {args.picture} ({args.picture.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
