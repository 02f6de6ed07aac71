"""Train the bundled default in one GPU job with a time limit, leaving what it made in OUT as it goes.

    bash scripts/gpu_default.sh                      # the job: CUDA tests, then this, until 60 s before the limit
    python scripts/gpu_default.py --rehearse --out /tmp/out --pack /tmp/pack   # the CPU rehearsal (tests run it)

What it does:
1. Measures, in this process, the card's matmul peak and counts the training FLOPs per image (meta device).
2. Warm-starts from the default in weights/ when that is the same model (same config): every GPU job adds
   its minutes to the last one's. A fresh optimizer and a short warm-up; the cosine schedule ends at the deadline
   (`train --minutes`).
3. Trains `dgaetok train --data-on-device` on the pack the job takes along (scripts/make_gpu_pack.py), bf16
   autocast, channels_last, fused AdamW.
4. Every ``--export-every`` seconds, and at the end, writes to OUT (the job's output folder): the EMA weights in
   bf16 as shards of at most 16 MiB (``model.shard-i-of-n.safetensors``), ``log.jsonl``, the latest reconstruction
   grid (``samples.png``) and ``run.json`` (card, command, peak, FLOPs, img/s, MFU, steps, seconds). A job
   stopped at its limit still leaves the last export there.

Copy the job's output folder back; then `scripts/gpu_default_collect.py`, on any machine (a CPU will do), joins
the shards, scores the model and replaces the default only if it is better.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dgaetok.files import atomic_path  # noqa: E402
from dgaetok.flops import matmul_peak, training_flops_per_image  # noqa: E402
from dgaetok.models import DEFAULT_MODEL, DGAEConfig, read_model_file, resolve_model, split_model_file  # noqa: E402
from dgaetok.train import TrainConfig, train  # noqa: E402

# The default's recipe: dgae-s2 at f16 c8, trained at the resolution it is used at.
RECIPE = dict(preset="dgae-s2", downsample=16, latent_channels=8, resolution=256, batch_size=64, lr=2e-4,
              min_lr=2e-5, warmup=100, lpips_net="alex", ema_decay=0.999, log_every=25, ckpt_every=250,
              sample_every=1000, sample_steps=8, sample_count=8)
# The CPU rehearsal: the same code path at a size that runs in seconds.
REHEARSAL = dict(preset="dgae-t", downsample=8, latent_channels=4, resolution=32, batch_size=4, lr=1e-3,
                 min_lr=1e-4, warmup=2, lpips_net="alex", ema_decay=0.99, log_every=5, ckpt_every=5,
                 sample_every=10, sample_steps=2, sample_count=2)
SHARD_BYTES = 16 * 2**20


def warm_start_file(config: DGAEConfig, choice: str) -> tuple[str | None, float]:
    """(the model file to start from, the GPU-minutes already in it): the default when it is the same model."""
    if choice == "none":
        return None, 0.0
    path = resolve_model(DEFAULT_MODEL if choice == "auto" else choice)
    meta, _ = read_model_file(path)
    if DGAEConfig.from_json(meta["config"]) != config:
        if choice != "auto":
            raise SystemExit(f"{path}: not a {config.preset} model of this config")
        return None, 0.0
    return str(path), float(meta.get("gpu_minutes", 0.0))


class Session:
    """run.json: what this job measured, rewritten at every export."""

    def __init__(self, out: Path, **facts):
        self.out, self.facts = out, facts

    def write(self, **more) -> None:
        self.facts.update(more)
        with atomic_path(self.out / "run.json") as tmp:
            tmp.write_text(json.dumps(self.facts, indent=2) + "\n")


def export(work: Path, out: Path, session: Session, flops: float, peak: float, t_start: float) -> None:
    """The EMA weights as bf16 shards, the log, the latest grid and the job's numbers, into OUT."""
    if (work / "model.safetensors").is_file():
        for old in out.glob("model.shard-*.safetensors"):
            old.unlink()
        split_model_file(work / "model.safetensors", out, SHARD_BYTES)
    if (work / "log.jsonl").is_file():
        shutil.copyfile(work / "log.jsonl", out / "log.jsonl")
    grids = sorted((work / "samples").glob("step-*.png"))
    if grids:
        shutil.copyfile(grids[-1], out / "samples.png")
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()] \
        if (work / "log.jsonl").is_file() else []
    steps = [r for r in records if "img_per_s" in r]
    speed = statistics.median(r["img_per_s"] for r in steps[2:]) if len(steps) > 2 else None
    session.write(step=steps[-1]["step"] if steps else 0, img_per_s=speed,
                  mfu=speed * flops / peak if speed else None, train_seconds=time.time() - t_start,
                  last_loss={k: v for k, v in steps[-1].items() if k not in ("step", "lr")} if steps else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=Path, default=ROOT / ".gpu", help="from scripts/make_gpu_pack.py")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "runs/gpu-default/out")),
                        help="the job's output folder (default: $OUT, else runs/gpu-default/out)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dgaetok-gpu-default"), help="the training folder")
    parser.add_argument("--deadline", type=float, default=None, help="unix time by which training ends")
    parser.add_argument("--minutes", type=float, default=8.0, help="training time when no --deadline is given")
    parser.add_argument("--reserve", type=float, default=20.0, help="seconds kept for the final export")
    parser.add_argument("--export-every", type=float, default=120.0, help="seconds between exports to OUT")
    parser.add_argument("--warm-start", default="auto", help="auto (the default when it is this model), none, "
                                                             "or a model file")
    parser.add_argument("--steps", type=int, default=1_000_000, help="a cap on the steps (the budget decides)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rehearse", action="store_true", help="the tiny CPU-sized recipe (and --device cpu)")
    args = parser.parse_args()

    t_start = time.time()
    recipe = REHEARSAL if args.rehearse else RECIPE
    device = torch.device("cpu" if args.rehearse else args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)  # each job starts over from the default
    cfg = TrainConfig(data=str(args.pack / "train"), out=str(args.work), steps=args.steps, device=str(device),
                      data_on_device=True, workers=8, seed=int(t_start), **recipe)
    config = cfg.model_config()
    start_file, gpu_minutes_before = warm_start_file(config, "none" if args.rehearse else args.warm_start)
    cfg.warm_start = start_file
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    session = Session(args.out, card=name, device=str(device), torch=torch.__version__, command=sys.argv,
                      recipe=recipe, seed=cfg.seed, warm_start=start_file, gpu_minutes_before=gpu_minutes_before,
                      started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t_start)), status="measuring")
    session.write()

    peak, dtype = matmul_peak(device, min_time=0.5)
    flops = training_flops_per_image(config, recipe["lpips_net"])
    session.write(matmul_peak_tflops=peak / 1e12, matmul_dtype=dtype, train_gflop_per_img=flops / 1e9)
    deadline = args.deadline or (time.time() + 60 * args.minutes + args.reserve)
    cfg.minutes = max(0.0, (deadline - args.reserve - time.time()) / 60)
    session.write(status="training", train_minutes_budget=cfg.minutes)
    print(f"{name}: peak {peak / 1e12:.1f} TFLOP/s ({dtype}), {flops / 1e9:.1f} GFLOP per training image, "
          f"{cfg.minutes:.1f} min of training from {start_file or 'scratch'}", flush=True)

    last = time.time()

    def on_step(step: int, logs: dict) -> None:
        nonlocal last
        if time.time() - last >= args.export_every:
            export(args.work, args.out, session, flops, peak, t_start)
            last = time.time()

    status = "stopped"
    try:
        train(cfg, on_step=on_step)
        status = "done"
    except BaseException as exc:  # a kill at the limit or a crash: export what there is, then re-raise
        status = f"stopped: {type(exc).__name__}: {exc}"
        raise
    finally:
        export(args.work, args.out, session, flops, peak, t_start)
        session.write(status=status, wall_seconds=time.time() - t_start)
        print(json.dumps(session.facts, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
