"""The paper's Table 2 in miniature: DGAE vs SD-VAE at f16 with c = 16, 8, 4 (latents of 4096, 2048, 1024 values).

    python benchmarks/table2.py --scale cpu                           # the 2-core CPU run in RESULTS.md
    python benchmarks/table2.py --scale gpu --session-minutes 8       # one device call; rerun until it prints the table

Within a latent size the two families share everything but the decoder and its loss: the encoder (same code,
config and seed), data, crops, batch, optimizer, LPIPS weight, and compute. Compute is matched in wall time on
the device at hand: each model first times a few training steps (``calibration`` in plan.json), then trains for
as many steps as fill ``--minutes``, so the faster SD-VAE step gets more steps, as "same GPU-minutes" means.
Step counts are fixed before training, so the cosine schedule ends where it should and a resumed run is exact.

Every stage leaves its result in OUT and is skipped when the driver is rerun: plan.json (the calibrated step
counts), c{C}-{family}/ (a `dgaetok train` folder, resumed from its checkpoint), c{C}-{family}/rfid.json (from
`bench rfid` on the evaluation set), then table2.md, table2.json and table2-grid.png (one row per evaluation image:
original | SD-VAE c16 | DGAE c16 | SD-VAE c8 | ... ). With --session-minutes the driver stops training after that
much wall time, leaves a checkpoint and exits with status 3; rerun the same command to go on.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from dgaetok.bench import eval_images, rfid
from dgaetok.files import atomic_path, save_grid
from dgaetok.models import MODELS, build_model, load_model
from dgaetok.train import Diverged, TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
PAUSED = 3  # exit status: training stopped at --session-minutes; rerun to continue


@dataclass(frozen=True)
class Scale:
    """One size of the experiment: presets, training recipe, compute per model and evaluation."""

    dgae: str
    sdvae: str
    resolution: int
    crop: int | None  # random crops of the resized image; None: the full resolution
    batch_size: int
    lr: float
    minutes: float  # training wall time per model on the device at hand
    eval_limit: int | None  # first N evaluation images (None: all)
    eval_steps: tuple[int, ...]  # DGAE decode steps scored (SD-VAE: its one pass)
    lpips_net: str = "alex"  # the LPIPS term in both losses
    warmup_fraction: float = 0.1
    disc_fraction: float = 0.5  # SD-VAE's GAN starts this far into its steps (LDM starts it late, too)
    workers: int = 1
    calibration_steps: int = 12


SCALES = {
    # ~5M-parameter models on 64 px crops: the 2-core CPU trains all six in an hour and a half.
    "cpu": Scale("dgae-s", "sdvae-s", 256, 64, 8, 2e-4, 15.0, 50, (8,)),
    # the same models at full 256 px, batch 32, on one GPU: half an hour of GPU time for all six, so 3-4 device
    # sessions with --session-minutes; scored on all 500 evaluation images.
    "gpu": Scale("dgae-s", "sdvae-s", 256, None, 32, 2e-4, 5.0, None, (8, 50), workers=8, calibration_steps=30),
    # seconds in all: the test suite's end-to-end check of this driver, not an experiment.
    "tiny": Scale("dgae-t", "sdvae-t", 64, 32, 2, 2e-4, 0.05, 3, (2,), calibration_steps=4, workers=0),
}
FAMILIES = ("sdvae", "dgae")
CHANNELS = (16, 8, 4)


class SessionOver(Exception):
    """Raised from the training hook at --session-minutes; `train` checkpoints before passing it on."""


def run_name(channels: int, family: str) -> str:
    return f"c{channels}-{family}"


def train_config(scale: Scale, family: str, channels: int, steps: int, data: str, out: Path, seed: int) -> TrainConfig:
    preset = getattr(scale, family)
    return TrainConfig(
        data=data, out=str(out), preset=preset, resolution=scale.resolution, downsample=16, latent_channels=channels,
        crop=scale.crop, batch_size=scale.batch_size, steps=steps, lr=scale.lr,
        warmup=max(1, int(steps * scale.warmup_fraction)),
        lpips_weight=1.0, lpips_net=scale.lpips_net, disc_start=int(steps * scale.disc_fraction),
        log_every=max(1, min(50, steps // 20)), ckpt_every=max(1, steps // 10), sample_every=max(1, steps // 4),
        sample_steps=max(scale.eval_steps), sample_count=4, workers=scale.workers, seed=seed, resume=True, device=None,
    )


def seconds_per_step(scale: Scale, family: str, channels: int, data: str, seed: int) -> float:
    """Mean wall time of one training step, over both phases for SD-VAE (without and with the GAN)."""
    n = scale.calibration_steps
    warm = max(2, n // 4)
    phase = warm + n  # steps per phase: `warm` untimed ones (allocator, cuDNN autotuning, first GAN step), n timed
    phases = 2 if family == "sdvae" else 1
    stamps: list[float] = []

    def on_step(step: int, logs: dict) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        # one step more than timed: the last step also writes the final checkpoint
        cfg = train_config(scale, family, channels, phase * phases + 1, data, Path(tmp), seed)
        cfg = dataclasses.replace(cfg, disc_start=phase, log_every=10**9, ckpt_every=10**9, sample_count=0)
        train(cfg, on_step)
    timed = [stamps[p * phase + warm + i] - stamps[p * phase + warm + i - 1] for p in range(phases)
             for i in range(1, n)]
    return sum(timed) / len(timed)


def make_plan(args, scale: Scale, out: Path) -> dict:
    """Calibrated step counts, made once: a rerun (or a resumed session) trains to the same schedule."""
    path = out / "plan.json"
    settings = {"scale": args.scale, **dataclasses.asdict(scale), "data": args.data, "seed": args.seed,
                "channels": list(args.channels)}
    if path.exists():
        plan = json.loads(path.read_text())
        if plan["settings"] != json.loads(json.dumps(settings)):
            sys.exit(f"{path}: made with other settings; use another --out or delete it")
        return plan
    plan = {"settings": settings, "device": device_name(), "runs": {}}
    for channels in args.channels:
        for family in FAMILIES:
            sps = seconds_per_step(scale, family, channels, args.data, args.seed)
            steps = max(1, int(scale.minutes * 60 / sps))
            plan["runs"][run_name(channels, family)] = {"seconds_per_step": sps, "steps": steps}
            print(f"plan: {run_name(channels, family)}: {sps:.3f} s/step -> {steps} steps in {scale.minutes:g} min",
                  flush=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(plan, indent=2) + "\n")
    return plan


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"


def trained_step(run: Path) -> int:
    try:
        with safe_open(str(run / "checkpoint.safetensors"), framework="pt") as fh:
            return int(fh.metadata()["step"])
    except FileNotFoundError:
        return 0


def train_run(run: Path, cfg: TrainConfig, deadline: float) -> str:
    """Train (or resume) one model to its planned steps: 'done', 'diverged' or 'paused'. Wall time is added up
    in run/time.json over sessions."""
    if (run / "diverged.json").exists():
        return "diverged"
    if trained_step(run) >= cfg.steps:
        return "done"

    def on_step(step: int, logs: dict) -> None:
        if time.monotonic() > deadline:
            raise SessionOver

    clock = run / "time.json"
    spent = json.loads(clock.read_text())["train_seconds"] if clock.exists() else 0.0
    start = time.perf_counter()
    status = "done"
    try:
        train(cfg, on_step)
    except SessionOver:
        status = "paused"
    except Diverged as exc:  # the checkpoint on disk is the last good state: it is scored, and marked
        with atomic_path(run / "diverged.json") as tmp:
            tmp.write_text(json.dumps({"step": trained_step(run), "message": str(exc)}) + "\n")
        status = "diverged"
    finally:
        run.mkdir(parents=True, exist_ok=True)
        with atomic_path(clock) as tmp:
            tmp.write_text(json.dumps({"train_seconds": spent + time.perf_counter() - start}) + "\n")
    return status


def evaluate(run: Path, scale: Scale, eval_data: str, device: torch.device) -> dict:
    """`bench rfid` of the run's EMA model on the evaluation set, cached in run/rfid.json."""
    path = run / "rfid.json"
    step = trained_step(run)
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("trained_step") == step:
            return cached
    model = load_model(run / "model.safetensors", device)
    result = rfid(model, str(run / "model.safetensors"), eval_data, list(scale.eval_steps), scale.eval_limit,
                  resolution=scale.resolution, grid=run / "rfid-grid.png")
    cached = {**dataclasses.asdict(result), "trained_step": step}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(cached, indent=2) + "\n")
    return cached


@torch.no_grad()
def comparison_grid(out: Path, channels: list[int], scale: Scale, eval_data: str, device: torch.device,
                    rows: int) -> Path:
    """One row per evaluation image: the original, then SD-VAE and DGAE (at its most steps) per latent size."""
    _, images, _ = eval_images(eval_data, scale.resolution, max(2, rows))
    x = torch.stack(images[:rows]).to(device)
    noise = torch.randn((1, *x.shape[1:]), generator=torch.Generator().manual_seed(0)).expand(len(x), -1, -1, -1)
    columns = [x.cpu()]
    for c in channels:
        for family in FAMILIES:
            model = load_model(out / run_name(c, family) / "model.safetensors", device)
            z = model.encode(x).latent_dist.mode()
            columns.append(model.decode(z, steps=max(scale.eval_steps), noise=noise).float().cpu())
    path = out / "table2-grid.png"
    save_grid(torch.stack(columns, dim=1).flatten(0, 1), len(columns), path)
    return path


def table(out: Path, plan: dict, channels: list[int], scale: Scale) -> tuple[str, list[dict]]:
    rows = []
    for c in channels:
        for family in FAMILIES:
            run = out / run_name(c, family)
            result = json.loads((run / "rfid.json").read_text())
            config = MODELS[getattr(scale, family)](resolution=scale.resolution, downsample=16, latent_channels=c)
            with torch.device("meta"):
                params = build_model(config).num_params()
            minutes = json.loads((run / "time.json").read_text())["train_seconds"] / 60
            planned = plan["runs"][run_name(c, family)]
            for r in result["results"]:
                rows.append({"latent": c * (scale.resolution // 16) ** 2, "channels": c, "family": family,
                             "preset": config.preset, "encoder_params": params["encoder"],
                             "decoder_params": params["decoder"], "train_steps": result["trained_step"],
                             "budget_minutes": planned["steps"] * planned["seconds_per_step"] / 60,
                             "train_minutes": minutes, "diverged": (run / "diverged.json").exists(),
                             "images": result["images"], **r})
    lines = [f"DGAE vs SD-VAE at f16, {plan['device']}, {scale.minutes:g} min of training each "
             f"({rows[0]['images']} evaluation images). Budget: steps x the calibrated time per step; wall: the "
             f"time the training took, which includes checkpoints, grids and anything else the device ran.", "",
             "| latent | model | decoder params | train steps | budget min | wall min | decode steps | rFID | PSNR | "
             "SSIM | LPIPS |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    side = scale.resolution // 16
    for r in rows:
        name = f"{'SD-VAE' if r['family'] == 'sdvae' else 'DGAE'} ({r['preset']})"
        name += " diverged" if r["diverged"] else ""
        lines.append(f"| {r['latent']} ({side}x{side}x{r['channels']}) | {name} | {r['decoder_params'] / 1e6:.2f}M | "
                     f"{r['train_steps']} | {r['budget_minutes']:.1f} | {r['train_minutes']:.1f} | {r['steps']} | "
                     f"{r['rfid']:.1f} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['lpips']:.3f} |")
    return "\n".join(lines) + "\n", rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=SCALES, default="gpu")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/table2-SCALE")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "train"))
    parser.add_argument("--eval-data", default=str(ROOT.parent / "shared" / "data" / "eval" / "imagenet-val500"))
    parser.add_argument("--channels", type=int, nargs="+", default=list(CHANNELS), help="latent channels at f16")
    parser.add_argument("--minutes", type=float, help="training minutes per model (default: the scale's)")
    parser.add_argument("--limit", type=int, help="evaluation images (default: the scale's)")
    parser.add_argument("--session-minutes", type=float, default=None,
                        help="stop training after this much wall time (exit status 3); rerun to continue")
    parser.add_argument("--grid-rows", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    scale = SCALES[args.scale]
    scale = dataclasses.replace(scale, minutes=args.minutes or scale.minutes,
                                eval_limit=args.limit if args.limit is not None else scale.eval_limit)
    out = args.out or ROOT / "runs" / f"table2-{args.scale}"
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 60 * args.session_minutes if args.session_minutes is not None else float("inf")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    plan = make_plan(args, scale, out)
    for c in args.channels:
        for family in FAMILIES:
            name = run_name(c, family)
            cfg = train_config(scale, family, c, plan["runs"][name]["steps"], args.data, out / name, args.seed)
            status = train_run(out / name, cfg, deadline)
            print(f"train: {name}: {status} at step {trained_step(out / name)} of {cfg.steps}", flush=True)
            if status == "paused":
                return PAUSED
    for c in args.channels:
        for family in FAMILIES:
            result = evaluate(out / run_name(c, family), scale, args.eval_data, device)
            print(f"eval: {run_name(c, family)}: " + ", ".join(
                f"{r['steps']} steps rFID {r['rfid']:.1f} PSNR {r['psnr']:.2f} SSIM {r['ssim']:.3f} "
                f"LPIPS {r['lpips']:.3f}" for r in result["results"]), flush=True)
    grid = comparison_grid(out, args.channels, scale, args.eval_data, device, args.grid_rows)
    text, rows = table(out, plan, args.channels, scale)
    with atomic_path(out / "table2.md") as tmp:
        tmp.write_text(text)
    with atomic_path(out / "table2.json") as tmp:
        tmp.write_text(json.dumps({"plan": plan, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out / 'table2.md'}, {out / 'table2.json'} and {grid}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
