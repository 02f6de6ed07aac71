"""A distilled decoder against its teacher: quality and seconds per image in one run, the SD-VAE decoder as the
speed peer, and a picture.

    python benchmarks/distill.py --student weights/default-1step.safetensors --limit 500 --limit-50 100 \
        --picture docs/default-1step.jpg --out runs/distill-bench

On the first ``--limit`` evaluation images (the paper's protocol, `dgaetok bench rfid`: shorter side 256, centre
crop, posterior mean, one seeded noise for every image and every row), the teacher decodes at 1, 4 and 8 Euler
steps (and at the N of the student's targets) on the grid it was distilled from (the student's record names it),
and at 50 uniform steps on the first ``--limit-50``; the student decodes at its own K. Every row is PSNR, SSIM,
LPIPS-alex and rFID (`bench.rfid`; rFID over fewer than a few hundred images is dominated by its small-sample bias
and comparable only between rows of one run). The teacher's and student's latents are the same: the student's
encoder is the teacher's.

Speed is timed separately, interleaved so that a shared machine's load falls on every row alike: for each of
``--timing-images`` latents, one decode by each row in turn (and one pass of the peer, LDM's SD-VAE decoder at
the same latent shape, channels 128, untrained weights: only its speed is used), the median seconds per image
reported. Every row computes in ``--precision`` (auto: bf16 where the CPU multiplies it natively, as `decode`
does). The picture: original | teacher 1 step | teacher N steps (the student's targets; 8 steps too when N is
not 8) | student, for the first 6 images. A JSON summary goes to ``--out``/distill.json and the Markdown table
to stdout. Quality rows are deterministic and kept in ``--out``: ``--teacher-only`` computes the teacher's ahead
(while the student trains, say), and the full run reuses them and times every row together.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import cpu_name  # noqa: E402

from dgaetok.bench import eval_images, rfid  # noqa: E402
from dgaetok.files import atomic_path, to_uint8  # noqa: E402
from dgaetok.models import MODELS, build_model, load_model, resolve_model  # noqa: E402
from dgaetok.precision import resolve  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "eval" / "imagenet-val500"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def picture(columns: list[torch.Tensor], path: Path, cell: int) -> None:
    """Rows of images (one row per image, one column per tensor), ``cell`` pixels each, 4 px white gaps, JPEG."""
    gap, rows, n = 4, len(columns[0]), len(columns)
    out = Image.new("RGB", (n * cell + (n - 1) * gap, rows * cell + (rows - 1) * gap), "white")
    for j, column in enumerate(columns):
        for i, image in enumerate(column):
            tile = Image.fromarray(to_uint8(image).numpy()).resize((cell, cell), Image.LANCZOS)
            out.paste(tile, (j * (cell + gap), i * (cell + gap)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        out.save(tmp, format="JPEG", quality=88)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, help="the distilled model file")
    parser.add_argument("--teacher", default=None, help="the teacher (default: the bundled default model)")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--limit-50", type=int, default=8, help="images for the teacher's 50 steps (0: none)")
    parser.add_argument("--timing-images", type=int, default=6)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--precision", default="auto", help="auto, bf16 or fp32: what every row (the peer "
                        "included) computes in")
    parser.add_argument("--picture", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/distill-bench"))
    parser.add_argument("--teacher-only", action="store_true", help="only the teacher's quality rows (kept in "
                        "--out for the full run, which times every row together)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    teacher = load_model(args.teacher, precision=args.precision)
    student = load_model(args.student, precision=args.precision)
    d = student.distilled
    if d is None or d.teacher != teacher.file_hash:
        raise SystemExit(f"{args.student} is not a distilled student of {resolve_model(args.teacher)}")
    precision = resolve(args.precision, "cpu").name
    device = f"CPU ({cpu_name()}, {args.threads} thread(s), {precision})"

    rows = []

    def add(name: str, model, steps: list[int], shift: float, limit: int) -> None:
        """The quality rows, kept in ``--out`` per model file, steps, grid and images: deterministic, so a later
        run (the one that times every row together) reuses them."""
        cache = args.out / f"rows-{model.file_hash}-{'-'.join(map(str, steps))}-shift{shift:g}-{limit}-{precision}.json"
        if cache.is_file():
            rows.extend(json.loads(cache.read_text()))
            return
        result = rfid(model, name, args.data, steps, limit, shift=shift, grid=args.out / f"{name}-grid.png")
        new = [{"decoder": name, "steps": r.steps, "shift": shift, "images": result.images, "psnr": r.psnr,
                "ssim": r.ssim, "lpips": r.lpips, "rfid": r.rfid} for r in result.results]
        with atomic_path(cache) as tmp:
            tmp.write_text(json.dumps(new) + "\n")
        rows.extend(new)

    teacher_steps = sorted({1, 4, 8, d.teacher_steps})
    add("teacher", teacher, teacher_steps, d.teacher_shift, args.limit)
    if args.limit_50:
        add("teacher", teacher, [50], 1.0, args.limit_50)
    if args.teacher_only:
        return
    add("student", student, [d.steps], d.shift, args.limit)

    # speed: interleaved, one image per decode, the same latents and noise as above
    _, images, _ = eval_images(args.data, 256, args.timing_images)
    x = torch.stack(images)
    with torch.no_grad():
        z = teacher.encode(x).latent_dist.mode()
    noise = torch.randn((1, 3, 256, 256), generator=torch.Generator().manual_seed(0))
    peer = build_model(MODELS["sdvae-f8c4"]()).eval().requires_grad_(False).to(memory_format=torch.channels_last)
    peer.set_precision(args.precision)
    runs = {("teacher", n): (lambda zi, n=n: teacher.decode(zi, steps=n, shift=d.teacher_shift, noise=noise))
            for n in teacher_steps}
    runs[("student", d.steps)] = lambda zi: student.decode(zi, noise=noise)
    runs[("SD-VAE decoder (peer)", 1)] = lambda zi: peer.decode(zi)
    for fn in runs.values():  # warm-up: first calls pick kernels
        fn(z[:1])
    seconds = {key: [] for key in runs}
    for i in range(len(z)):
        for key, fn in runs.items():
            seconds[key].append(timed(lambda: fn(z[i:i + 1])))
    speed = {key: statistics.median(v) for key, v in seconds.items()}
    student_s = speed[("student", d.steps)]
    for row in rows:
        s = speed.get((row["decoder"], row["steps"]))
        row["s_per_image"] = s
        row["speedup_vs_this"] = s / student_s if s else None
    peer_row = {"decoder": "SD-VAE decoder (peer)", "steps": 1, "s_per_image": speed[("SD-VAE decoder (peer)", 1)]}

    if args.picture is not None:
        six = x[:6]
        zs = z[:6]
        same = noise.expand(len(zs), -1, -1, -1)
        with torch.no_grad():
            cols = [six, *(teacher.decode(zs, steps=n, shift=d.teacher_shift, noise=same)
                           for n in sorted({1, d.teacher_steps, 8})), student.decode(zs, noise=same)]
        picture(cols, args.picture, 128)

    summary = {"teacher": teacher.file_hash, "student": student.file_hash, "distilled": json.loads(d.to_json()),
               "data": "imagenet-val500 (the project's evaluation data)", "device": device,
               "timing_images": len(z), "rows": rows, "peer": peer_row}
    with atomic_path(args.out / "distill.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n| decoder | steps | grid shift | images | PSNR | SSIM | LPIPS-alex | rFID | s / image | vs student |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = f"{r['s_per_image']:.3f}" if r["s_per_image"] else "-"
        ratio = f"{r['speedup_vs_this']:.1f}x" if r["speedup_vs_this"] else "-"
        print(f"| {r['decoder']} | {r['steps']} | {r['shift']:g} | {r['images']} | {r['psnr']:.2f} | {r['ssim']:.3f} "
              f"| {r['lpips']:.3f} | {r['rfid']:.1f} | {s} | {ratio} |")
    print(f"| {peer_row['decoder']} | 1 | - | - | - | - | - | - | {peer_row['s_per_image']:.3f} | "
          f"{peer_row['s_per_image'] / student_s:.1f}x |")
    print(f"({device}; seconds per image: median of {len(z)} interleaved single-image decodes)")


if __name__ == "__main__":
    main()
