"""float32 against bf16 autocast on one device, in one process: speed of every network a user runs, and what bf16
does to reconstructions.

    python benchmarks/precision.py --device cpu                       # the bundled default and dgae-s2
    python benchmarks/precision.py --model default --quality 100 --data ../shared/data/eval/imagenet-val500

First the ceiling: a matmul and a 3x3 convolution in both precisions, which is as much as bf16 can give on the
device (AVX512-BF16 doubles the fp32 rate, AMX and tensor cores do much more). Speed rows (`throughput.Bench`, one image per call as the CPU decodes): encode, decode at ``--steps``, the SD-VAE
decoder of the same latent (the speed peer), and a training step (DGAE loss with LPIPS-alex at ``--train-crop``
px, batch ``--train-batch``), for the bundled default's architecture and ``--preset``s, each measured in fp32 and
then bf16 back to back so that both see the same machine. ``--compile`` adds bf16 rows with the networks
compiled (their first call, which compiles, is reported as ``compile_s``).

Quality (``--quality N``): the first N images of ``--data`` at the evaluation crop, encoded and decoded at
``--quality-steps`` from the same noise in both precisions: PSNR, SSIM and LPIPS-alex against the photos, and the
PSNR between the two precisions' decodes.

Every line goes to ``--out`` (JSON lines, appended, flushed) the moment it is measured; the table is printed last.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import Bench, cpu_name  # noqa: E402

from dgaetok.bench import eval_images  # noqa: E402
from dgaetok.files import to_uint8  # noqa: E402
from dgaetok.flops import seconds_per_call  # noqa: E402
from dgaetok.metrics import ReconMetrics  # noqa: E402
from dgaetok.models import MODELS, load_model  # noqa: E402
from dgaetok.precision import resolve  # noqa: E402


def pair(config, args, device, emit) -> dict[str, Bench]:
    """The same rows in fp32 and in bf16, with the same inputs and weights (`Bench` seeds both the same way)."""
    benches = {}
    for name in ("fp32", "bf16"):
        args.precision = name
        benches[name] = Bench(config, args, device, 1.0, emit)  # MFU is not the point here: peak 1
    return benches


@torch.no_grad()
def ceiling(args, device, emit) -> None:
    """What the hardware itself gains from bf16: a square matmul and one 3x3 convolution (128 channels, 128x128,
    channels_last as the networks run), on float32 tensors and then on bf16 ones (cast beforehand: the arithmetic
    alone). A network that is all convolutions cannot gain more than the convolution row; elementwise work and
    GroupNorm gain less."""
    conv = torch.nn.Conv2d(128, 128, 3, padding=1).to(device, memory_format=torch.channels_last)
    x = torch.randn(1, 128, 128, 128, device=device).contiguous(memory_format=torch.channels_last)
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    for name in ("fp32", "bf16"):
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        conv_, x_, a_, b_ = copy.deepcopy(conv).to(dtype), x.to(dtype), a.to(dtype), b.to(dtype)
        for what, fn, flops in (("matmul 2048x2048", lambda: a_ @ b_, 2 * 2048**3),
                                ("conv 3x3, 128 ch, 128x128", lambda: conv_(x_), 2 * 128 * 128 * 9 * 128 * 128)):
            seconds = seconds_per_call(fn, device, args.min_time)
            emit({"kind": "row", "preset": "(hardware)", "what": what, "precision": name, "compile": None,
                  "steps": None, "batch": 1, "seconds_per_call": seconds, "tflops": flops / seconds / 1e12})


def speed(config, args, device, emit) -> None:
    """Each row in fp32, then at once in bf16, so that both see the machine in the same state."""
    benches = pair(config, args, device, emit)
    if any(spec.startswith("train") for spec in args.rows):  # training runs on crops, as `dgaetok train --crop`
        cropped = pair(dataclasses.replace(config, resolution=args.train_crop), args, device, emit)
    for spec in args.rows:
        for name in ("fp32", "bf16"):
            (cropped if spec.startswith("train") else benches)[name].run(spec)
    if args.compile:
        bench = benches["bf16"]
        for spec in ("encode", "decode"):
            start = time.perf_counter()
            model = bench.inference_model("default")
            with torch.no_grad():
                if spec == "encode":
                    model.encode(bench.x[:1])
                else:
                    model.decode(bench.z[:1], 2, noise=bench.noise[:1])
            emit({"kind": "compile", "preset": config.preset, "what": spec, "precision": "bf16",
                  "compile_s": time.perf_counter() - start})
            bench.run(f"{spec}@default")


@torch.no_grad()
def quality(args, device, emit) -> None:
    paths, images, _ = eval_images(args.data, 256, args.quality)
    models = {p: load_model(args.model, device, precision=p) for p in ("fp32", "bf16")}
    metrics = {p: ReconMetrics(device, lpips_net="alex", rfid=False) for p in models}
    between = []
    noise = torch.randn((1, 3, 256, 256), generator=torch.Generator().manual_seed(0))
    seconds = {p: 0.0 for p in models}
    for image in images:
        x = image.unsqueeze(0).to(device)
        out = {}
        for p, model in models.items():
            start = time.perf_counter()
            z = model.encode(x).latent_dist.mode()
            out[p] = model.decode(z, steps=args.quality_steps, shift=args.shift, noise=noise)
            seconds[p] += time.perf_counter() - start
            metrics[p].update(to_uint8(x), to_uint8(out[p]))
        mse = (to_uint8(out["fp32"]).float() - to_uint8(out["bf16"]).float()).square().mean()
        between.append(float(10 * torch.log10(255**2 / mse.clamp_min(1e-10))))
    for p in models:
        m = metrics[p].compute()
        emit({"kind": "quality", "model": args.model, "precision": p, "images": len(images),
              "steps": args.quality_steps, "shift": args.shift, "psnr": m["psnr"], "ssim": m["ssim"],
              "lpips_alex": m["lpips"], "seconds_per_image": seconds[p] / len(images)})
    emit({"kind": "quality", "model": args.model, "what": "bf16 decode against fp32 decode", "images": len(images),
          "psnr_mean": sum(between) / len(between), "psnr_min": min(between)})


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("preset", "what", "steps", "fp32 s/call", "bf16 s/call", "bf16 speed-up")
    timed: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.get("kind") == "row" and "error" not in r:
            key = (r["preset"], r["what"] + (f" @{r['compile']}" if r["compile"] else ""), r["steps"])
            timed.setdefault(key, {})[r["precision"]] = r["seconds_per_call"] / r["batch"]
    for (preset, what, steps), t in timed.items():
        ratio = f"{t['fp32'] / t['bf16']:.2f}x" if len(t) == 2 else ""
        table.add_row(preset, what, str(steps or ""), f"{t.get('fp32', float('nan')):.3f}",
                      f"{t.get('bf16', float('nan')):.3f}", ratio)
    Console(width=140).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model file (or a name in weights/): its architecture "
                        "is timed, and its weights are what the quality rows decode with")
    parser.add_argument("--preset", nargs="*", default=["dgae-s2"], help="more presets to time (random weights)")
    parser.add_argument("-f", "--downsample", type=int, default=16, help="latent of the --preset rows")
    parser.add_argument("-c", "--latent-channels", type=int, default=8)
    parser.add_argument("--rows", nargs="+", default=["encode", "decode", "peer", "train"])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 8, 50])
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-crop", type=int, default=128, help="training rows run at this size")
    parser.add_argument("--min-time", type=float, default=2.0)
    parser.add_argument("--compile", action="store_true", help="also bf16 rows compiled (torch.compile default)")
    parser.add_argument("--quality", type=int, default=0, help="quality over the first N images of --data")
    parser.add_argument("--quality-steps", type=int, default=8)
    parser.add_argument("--shift", type=float, default=1.0)
    parser.add_argument("--data", help="evaluation images for --quality")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="runs/precision/precision.jsonl")
    args = parser.parse_args()
    device = torch.device(args.device)
    # what Bench expects of throughput.py's arguments: one image per call, no batch search, no deadline
    args.batch = args.unet_batch = 1
    args.fit_refine, args.memory_format, args.lpips_net = 0, "channels_last", "alex"
    args.compile_guard, args.deadline, args.profile, args.started = 900.0, None, None, time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with open(out, "a") as fh:
        def emit(record: dict) -> None:
            record.pop("mfu", None)  # Bench's, against a peak this benchmark does not measure
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            rows.append(record)
            print(json.dumps(record), flush=True)

        emit({"kind": "header", "device": f"CPU ({cpu_name()}, {torch.get_num_threads()} threads)"
              if device.type == "cpu" else torch.cuda.get_device_name(device),
              "torch": torch.__version__, "auto": resolve("auto", device).note(), "argv": sys.argv[1:]})
        configs = [load_model(args.model).config] + [
            MODELS[p](resolution=256, downsample=args.downsample, latent_channels=args.latent_channels)
            for p in args.preset]
        ceiling(args, device, emit)
        for config in configs:
            speed(config, args, device, emit)
        if args.quality:
            quality(args, device, emit)
    print_table(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
