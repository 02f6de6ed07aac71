"""Build the pack a GPU job takes along (.gpu/): training photos, the wheels the GPU machine lacks, LPIPS weights.

    python scripts/make_gpu_pack.py                      # -> .gpu/ (ignored by git; send it with the checkout)
    python scripts/make_gpu_pack.py --limit 8 --out /tmp/pack --no-wheels   # a tiny pack, for the CPU rehearsal

A GPU job takes along the working tree and this pack, and what it takes is kept under a size limit
(``--budget-mib``), the repository's tracked files (the default weights among them) included. What the pack holds:

- ``train/<folder>/<name>.jpg``: every training photo (``--data``) as `dgaetok train` sees it at 256 px: the
  shorter side resized to 256 (PIL bicubic, `files.resize_shorter_side`), the longer side center-cropped to at
  most 320 (random 256 crops still move by up to 64 px), re-encoded as JPEG quality 80. About 35 MiB.
- ``whl/``: lpips and pytorch-fid, which a GPU machine without a package index lacks (the job expects torch,
  torchvision, numpy, scipy, tqdm, pillow, typer, rich, safetensors there). Fetched with pip once, by this script.
- ``lpips-alex.safetensors``: LPIPS' AlexNet trunk in float16 (4.9 MiB; loaded as float32). The training loss uses
  LPIPS-alex, not the paper's VGG: VGG's trunk is 29 MiB even in float16, and with the photos and the default's
  weights it does not fit the size limit of what the job takes along (``--budget-mib``, 64 by default).

`scripts/gpu_env.sh`, sourced at the start of the GPU job, installs the wheels and points dgaetok at the weights.
The script prints what the job will take along and exits 1 when that is over ``--budget-mib``.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dgaetok.errors import InputError  # noqa: E402
from dgaetok.files import IMAGE_SUFFIXES, atomic_path, find_files, open_image, resize_shorter_side  # noqa: E402
from dgaetok.pretrained import read_state_dict, resolve  # noqa: E402

WHEELS = ("lpips==0.1.4", "pytorch-fid==0.3.0")


def pack_photo(src: Path, dst: Path, size: int, max_aspect: float, quality: int) -> str | None:
    """Resize, cap the longer side, save as JPEG; the reason when ``src`` is unreadable."""
    try:
        img = resize_shorter_side(open_image(src), size)
    except InputError as exc:
        return str(exc)
    w, h = img.size
    cap = int(size * max_aspect)
    left, top = max(0, (w - cap) // 2), max(0, (h - cap) // 2)
    img = img.crop((left, top, left + min(w, cap), top + min(h, cap)))
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        img.save(tmp, format="JPEG", quality=quality)
    return None


def tracked_bytes() -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "train",
                        help="the training photos (default: the project's training photos)")
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu")
    parser.add_argument("--size", type=int, default=256, help="shorter side (the training resolution)")
    parser.add_argument("--max-aspect", type=float, default=1.25, help="longer side at most this times --size")
    parser.add_argument("--quality", type=int, default=80)
    parser.add_argument("--limit", type=int, default=None, help="only the first N photos")
    parser.add_argument("--no-wheels", action="store_true", help="skip the wheels (a pack for this machine)")
    parser.add_argument("--budget-mib", type=float, default=64.0,
                        help="the size limit of what the job takes along: the repository's tracked files and the "
                             "pack together, in MiB")
    args = parser.parse_args()

    photos = find_files(args.data, IMAGE_SUFFIXES)[:args.limit]
    train = args.out / "train"
    jobs = [(p, train / p.relative_to(args.data).with_suffix(".jpg")) for p in photos]
    with ThreadPoolExecutor(4) as pool:
        failed = [r for r in pool.map(lambda j: pack_photo(*j, args.size, args.max_aspect, args.quality), jobs) if r]
    for reason in failed:
        print(f"skipped: {reason}")

    weights = resolve("lpips-alex")[0]
    with atomic_path(args.out / "lpips-alex.safetensors") as tmp:
        save_file({k: v.half().contiguous() for k, v in read_state_dict(weights).items()}, str(tmp))

    if not args.no_wheels:
        whl = args.out / "whl"
        shutil.rmtree(whl, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "py", "--abi", "none",
                        "--platform", "any", "-d", str(whl), *WHEELS], check=True)

    sizes = {"tracked files": tracked_bytes(), "pack": folder_bytes(args.out)}
    total = sum(sizes.values())
    print(f"{len(jobs) - len(failed)} photos in {train}; "
          + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items())
          + f"; the job takes along {total / 2**20:.1f} of {args.budget_mib:.0f} MiB")
    return 0 if total <= args.budget_mib * 2**20 else 1


if __name__ == "__main__":
    sys.exit(main())
