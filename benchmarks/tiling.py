"""Peak memory and time of tiled against whole decoding, at growing image sizes, one process per case.

    python benchmarks/tiling.py                                       # CPU, default weights, 512/1024/2048 px
    python benchmarks/tiling.py --sizes 512 1024 --tile 256:32 --steps 4 --device cuda

The latent is a real photo's: an ImageNet evaluation photo, centre-cropped square and resized (Lanczos) to each
size, encoded whole once. Each case (size, whole or tile:overlap) then runs in a fresh subprocess that loads the
model and the latent, decodes with the same seeded noise, and reports its wall time and its peak memory: on the
CPU the peak RSS during the decode (`VmHWM`, reset just before it: `ru_maxrss` would include the parent's RSS
at fork time) and how much that is above the RSS before it started; on CUDA `torch.cuda.max_memory_allocated`.
PSNR between each tiled decode and the whole one of the same size says how far tiling moves the picture, and
PSNR against the resized photo how far each is from the truth. A case that fails (out of memory) is reported
as such. The table is printed last; --out holds the JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT.parent / "shared" / "data" / "eval" / "imagenet-val500" / "n01440764_tench.JPEG"


def run_case(args: argparse.Namespace) -> None:
    """One decode in this process; prints a JSON line and writes the image for the PSNR comparison."""
    from dgaetok.bench import synchronize
    from dgaetok.files import read_latent, to_uint8
    from dgaetok.models import load_model
    from dgaetok.pipeline import seeded_noise

    device = torch.device(args.device)
    model = load_model(args.model, device)
    z = read_latent(args.latent)[0][None].to(device)
    f = model.config.downsample
    noise = seeded_noise(0, z.shape[2] * f, z.shape[3] * f, 1)
    tile, overlap = (None, 0) if args.case == "whole" else map(int, args.case.split(":"))
    synchronize(device)
    before = memory_mib()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    x = model.decode(z, steps=args.steps, noise=noise, tile=tile, overlap=overlap, chunk=args.chunk)
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = memory_mib()["VmHWM"]
    np.save(args.image, to_uint8(x[0]).numpy())
    print(json.dumps({"seconds": seconds, "rss_before_mib": before, "rss_peak_mib": peak,
                      "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None}))


def memory_mib() -> dict[str, float]:
    """This process's resident set now (VmRSS) and its peak since exec or the last reset (VmHWM), in MiB."""
    status = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+) kB", status)[1]) / 1024 for key in ("VmRSS", "VmHWM")}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Model file or name (default: the bundled weights).")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--tile", nargs="+", default=["256:32", "512:64"], help="tile:overlap pairs, in pixels.")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--chunk", type=int, default=4, help="Tiles per network call.")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--photo", type=Path, default=PHOTO)
    p.add_argument("--out", type=Path, default=Path("bench/tiling.json"))
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--latent", help=argparse.SUPPRESS)
    p.add_argument("--image", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:
        return run_case(args)

    from dgaetok.files import to_tensor, write_latent
    from dgaetok.models import load_model

    model = load_model(args.model)
    photo = Image.open(args.photo).convert("RGB")
    side = min(photo.size)
    square = photo.crop(((photo.width - side) // 2, (photo.height - side) // 2,
                         (photo.width + side) // 2, (photo.height + side) // 2))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            latent = Path(tmp) / f"{size}.safetensors"
            resized = square.resize((size, size), Image.LANCZOS)
            with torch.no_grad():
                write_latent(latent, model.encode(to_tensor(resized)[None]).latent_dist.mode()[0], {})
            truth = np.asarray(resized)
            images = {}
            for case in ["whole", *args.tile]:
                image = Path(tmp) / f"{size}-{case.replace(':', '-')}.npy"
                cmd = [sys.executable, __file__, "--case", case, "--latent", str(latent), "--image", str(image),
                       "--steps", str(args.steps), "--chunk", str(args.chunk), "--threads", str(args.threads),
                       "--device", args.device] + (["--model", args.model] if args.model else [])
                done = subprocess.run(cmd, capture_output=True, text=True)
                row = {"size": size, "case": case}
                if done.returncode:
                    row["error"] = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
                else:
                    row.update(json.loads(done.stdout.strip().splitlines()[-1]))
                    images[case] = np.load(image)
                    row["psnr_vs_photo"] = psnr(images[case], truth)
                    if case != "whole" and "whole" in images:
                        row["psnr_vs_whole"] = psnr(images[case], images["whole"])
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU {cpu_name()}"
    result = {"device": device, "torch": torch.__version__, "threads": args.threads, "steps": args.steps,
              "chunk": args.chunk, "model": args.model or "default", "photo": args.photo.name, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    memory = "peak CUDA memory" if args.device.startswith("cuda") else "peak RSS (added by the decode)"
    print(f"| size | decode | seconds | {memory} | PSNR vs whole | PSNR vs photo |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        how = "whole" if r["case"] == "whole" else "tiles {} / overlap {}".format(*r["case"].split(":"))
        if "error" in r:
            print(f"| {r['size']}² | {how} | failed: {r['error']} | | | |")
            continue
        mem = (f"{r['cuda_peak_mib']:.0f} MiB" if r["cuda_peak_mib"] is not None else
               f"{r['rss_peak_mib']:.0f} MiB (+{r['rss_peak_mib'] - r['rss_before_mib']:.0f})")
        db = f"{r['psnr_vs_whole']:.2f} dB" if "psnr_vs_whole" in r else "-"
        print(f"| {r['size']}² | {how} | {r['seconds']:.1f} | {mem} | {db} | {r['psnr_vs_photo']:.2f} dB |")
    print(f"({device}, {args.threads} threads, {args.steps} Euler steps, {args.chunk} tiles per call, "
          f"torch {torch.__version__})")


if __name__ == "__main__":
    main()
