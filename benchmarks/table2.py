"""The paper's Table 2 in miniature: DGAE vs SD-VAE at f16 with c = 16, 8, 4 (latents of 4096, 2048, 1024 values).

    python benchmarks/table2.py --scale cpu                     # RESULTS.md's CPU run (2 cores)
    python benchmarks/table2.py --scale cpu --stop-minutes 30      # stop with a checkpoint (exit 3); rerun to go on

On rented or preemptible GPUs, in jobs with a time limit where nothing survives but what the job leaves in its
output folder ($OUT), the same functions run split in two: `benchmarks/paper_gpu.py` trains in the GPU job and
scores on the machine that collects its output.

Within a latent size the two families share everything but the decoder and its loss: the encoder (same code,
config and seed), data, crops, batch, optimizer, LPIPS and KL weights, and compute. Compute is matched in wall
time on the device that calibrates: each family first times a few training steps (SD-VAE over both of its phases,
without and with the GAN) at the first latent size, and its step count is set to fill ``--minutes``; the same step
count serves the other latent sizes, whose training FLOPs differ by less than 0.5 % (only the encoder's last and
the decoder's first convolution change with c). So the faster SD-VAE step gets more steps, as "same GPU-minutes"
means, and a later job on a faster card trains the same steps rather than more. Step counts are fixed before
training, so the cosine schedule ends where it should and a resumed run is exact.

Every stage leaves its result in OUT and is skipped when the driver is rerun: plan.json (the calibration),
c{C}-{family}/ (a `dgaetok train` folder, resumed from its checkpoint), c{C}-{family}/rfid.json (`bench rfid` on
the evaluation set) and strip.png (its reconstructions of the grid's images), then table2.md, table2.json,
table2.png (PSNR and LPIPS against latent size) and table2-grid.png (one row per evaluation image:
original | SD-VAE c16 | DGAE c16 | SD-VAE c8 | ...).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dgaetok.bench import eval_images, rfid  # noqa: E402
from dgaetok.errors import InputError  # noqa: E402
from dgaetok.files import atomic_path, save_grid  # noqa: E402
from dgaetok.models import MODELS, build_model, load_model  # noqa: E402
from dgaetok.plots import plot_latent_sweep  # noqa: E402
from dgaetok.train import Diverged, TrainConfig, train  # noqa: E402

PAUSED = 3  # exit status: training stopped at --stop-minutes; rerun to continue


@dataclass(frozen=True)
class Scale:
    """One size of the experiment: presets, training recipe, compute per model and evaluation."""

    dgae: str
    sdvae: str
    resolution: int
    crop: int | None  # random crops of the resized image; None: the full resolution
    batch_size: int
    lr: float
    minutes: float  # training wall time per model on the calibrating device
    eval_limit: int | None  # first N evaluation images (None: all)
    eval_steps: tuple[int, ...]  # DGAE decode steps scored (SD-VAE: its one pass)
    lpips_net: str = "alex"  # the LPIPS term in both losses
    warmup_fraction: float = 0.1
    warmup_steps: int | None = None  # overrides warmup_fraction
    min_lr: float = 1e-5
    ema_decay: float = 0.999
    disc_fraction: float = 0.5  # SD-VAE's GAN starts this far into its steps (LDM starts it late, too)
    workers: int = 1
    calibration_steps: int = 12
    data_on_device: bool = False  # `train --data-on-device`: the images decoded once, batches cut on the device
    grid_size: int | None = None  # side of the grid's cells (None: the resolution)


SCALES = {
    # ~5M-parameter models on 64 px crops: a 2-core CPU trains all six in an hour and a half.
    "cpu": Scale("dgae-s", "sdvae-s", 256, 64, 8, 2e-4, 15.0, 50, (8,)),
    # The GPU table, in jobs of at most 10 minutes (benchmarks/paper_gpu.py; plan in RESULTS.md): dgae-s2 (the GPU
    # default's architecture) against sdvae-s, the same encoder, 146 vs 143 training GFLOP per 256 px image (SD-VAE's
    # with its GAN on), trained with the default's recipe and data path; scored on all 500 evaluation images at 8
    # decode steps.
    "gpu": Scale("dgae-s2", "sdvae-s", 256, None, 64, 2e-4, 3.25, None, (8,), warmup_steps=100, min_lr=2e-5,
                 workers=8, calibration_steps=30, data_on_device=True, grid_size=128),
    # seconds in all: the test suite's end-to-end check of this driver, not an experiment.
    "tiny": Scale("dgae-t", "sdvae-t", 64, 32, 2, 2e-4, 0.05, 3, (2,), calibration_steps=4, workers=0,
                  data_on_device=True),
}
FAMILIES = ("sdvae", "dgae")
CHANNELS = (16, 8, 4)
NAMES = {"sdvae": "SD-VAE", "dgae": "DGAE"}


class SessionOver(Exception):
    """Raised from the training hook at the deadline (``--stop-minutes``, or the end of a GPU job's time); `train`
    checkpoints before passing it on."""


def run_name(channels: int, family: str) -> str:
    return f"c{channels}-{family}"


def parse_name(name: str) -> tuple[int, str]:
    channels, family = name.split("-", 1)
    return int(channels[1:]), family


def train_config(scale: Scale, family: str, channels: int, steps: int, data: str, out: Path, seed: int) -> TrainConfig:
    preset = getattr(scale, family)
    warmup = scale.warmup_steps if scale.warmup_steps is not None else int(steps * scale.warmup_fraction)
    return TrainConfig(
        data=data, out=str(out), preset=preset, resolution=scale.resolution, downsample=16, latent_channels=channels,
        crop=scale.crop, batch_size=scale.batch_size, steps=steps, lr=scale.lr, min_lr=scale.min_lr,
        warmup=max(1, min(warmup, steps - 1)), ema_decay=scale.ema_decay,
        lpips_weight=1.0, lpips_net=scale.lpips_net, disc_start=int(steps * scale.disc_fraction),
        log_every=max(1, min(25, steps // 20)), ckpt_every=max(1, steps // 10), sample_every=max(1, steps // 4),
        sample_steps=max(scale.eval_steps), sample_count=4, workers=scale.workers, seed=seed, resume=True, device=None,
        data_on_device=scale.data_on_device,
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


def calibrate(scale: Scale, family: str, channels: int, data: str, seed: int) -> dict:
    """Seconds per training step on this device, and the step count that fills the scale's minutes."""
    sps = seconds_per_step(scale, family, channels, data, seed)
    steps = max(1, int(scale.minutes * 60 / sps))
    print(f"calibrate: {family} at c{channels}: {sps:.3f} s/step -> {steps} steps in {scale.minutes:g} min",
          flush=True)
    return {"seconds_per_step": sps, "steps": steps, "device": device_name(), "calibrated_at": f"c{channels}"}


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
    """Train (or resume) one model to its planned steps: 'done', 'diverged' or 'paused' (at ``deadline``, a
    `time.monotonic` value). Wall time is added up in run/time.json over reruns."""
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


def grid_noise(scale: Scale) -> torch.Tensor:
    return torch.randn((1, 3, scale.resolution, scale.resolution), generator=torch.Generator().manual_seed(0))


def grid_cells(images: torch.Tensor, scale: Scale) -> torch.Tensor:
    size = scale.grid_size or scale.resolution
    if size == images.shape[-1]:
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="area")


@torch.no_grad()
def save_strip(model_file: Path, scale: Scale, eval_data: str, rows: int, path: Path) -> None:
    """The model's reconstructions of the grid's evaluation images (DGAE at its most steps, from fixed noise), one
    column of the comparison grid; small enough to commit when ``grid_size`` is."""
    _, images, _ = eval_images(eval_data, scale.resolution, max(2, rows))
    x = torch.stack(images[:rows])
    model = load_model(model_file)
    z = model.encode(x).latent_dist.mode()
    recon = model.decode(z, steps=max(scale.eval_steps), noise=grid_noise(scale).expand(len(x), -1, -1, -1))
    save_grid(grid_cells(recon.float(), scale), 1, path)


def comparison_grid(strips: list[Path], scale: Scale, eval_data: str, rows: int, path: Path) -> Path:
    """One row per evaluation image: the original, then each strip's reconstruction (SD-VAE and DGAE per latent
    size)."""
    from dgaetok.files import to_tensor
    from PIL import Image

    _, images, _ = eval_images(eval_data, scale.resolution, max(2, rows))
    columns = [grid_cells(torch.stack(images[:rows]), scale)]
    size = columns[0].shape[-1]
    for strip in strips:
        img = to_tensor(Image.open(strip).convert("RGB"))  # (3, rows * (size + 2) + 2, size + 4)
        columns.append(torch.stack([img[:, 2 + i * (size + 2):2 + i * (size + 2) + size, 2:2 + size]
                                    for i in range(rows)]))
    save_grid(torch.stack(columns, dim=1).flatten(0, 1), len(columns), path)
    return path


def score(model_file: Path, scale: Scale, eval_data: str, grid_rows: int, strip: Path) -> dict:
    """`bench rfid` of a model file on the evaluation set (LPIPS-alex, seed 0), and its grid strip."""
    model = load_model(model_file)
    result = rfid(model, str(model_file), eval_data, list(scale.eval_steps), scale.eval_limit,
                  resolution=scale.resolution, batch_size=8)
    save_strip(model_file, scale, eval_data, grid_rows, strip)
    return dataclasses.asdict(result)


def table_rows(entries: dict[str, dict], scale: Scale) -> list[dict]:
    """One row per model and decode step count, ordered c16 SD-VAE, c16 DGAE, c8 ...; ``entries`` maps run
    names to {"rfid": bench rfid's result, "train_steps", "budget_minutes", "train_minutes", "diverged",
    "device"}."""
    rows = []
    for name in sorted(entries, key=lambda n: (-parse_name(n)[0], FAMILIES.index(parse_name(n)[1]))):
        c, family = parse_name(name)
        e = entries[name]
        config = MODELS[getattr(scale, family)](resolution=scale.resolution, downsample=16, latent_channels=c)
        with torch.device("meta"):
            params = build_model(config).num_params()
        for r in e["rfid"]["results"]:
            rows.append({"latent": c * (scale.resolution // 16) ** 2, "channels": c, "family": family,
                         "preset": config.preset, "encoder_params": params["encoder"],
                         "decoder_params": params["decoder"], "train_steps": e["train_steps"],
                         "budget_minutes": e["budget_minutes"], "train_minutes": e["train_minutes"],
                         "diverged": e["diverged"], "device": e["device"], "images": e["rfid"]["images"], **r})
    return rows


def markdown(rows: list[dict], scale: Scale, intro: str) -> str:
    side = scale.resolution // 16
    lines = [intro, "", "| latent | model | decoder params | train steps | budget min | wall min | decode steps | "
             "rFID | PSNR | SSIM | LPIPS |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"{NAMES[r['family']]} ({r['preset']})" + (" diverged" if r["diverged"] else "")
        lines.append(f"| {r['latent']} ({side}x{side}x{r['channels']}) | {name} | {r['decoder_params'] / 1e6:.2f}M | "
                     f"{r['train_steps']} | {r['budget_minutes']:.1f} | {r['train_minutes']:.1f} | {r['steps']} | "
                     f"{r['rfid']:.1f} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['lpips']:.3f} |")
    return "\n".join(lines) + "\n"


def write_table(out: Path, rows: list[dict], scale: Scale, intro: str, extra: dict) -> str:
    """table2.md, table2.json and table2.png (PSNR / LPIPS against latent size, DGAE at its most decode steps;
    without matplotlib a note instead of the figure)."""
    text = markdown(rows, scale, intro)
    with atomic_path(out / "table2.md") as tmp:
        tmp.write_text(text)
    with atomic_path(out / "table2.json") as tmp:
        tmp.write_text(json.dumps({**extra, "rows": rows}, indent=2) + "\n")
    steps = max(scale.eval_steps)
    try:
        plot_latent_sweep([r for r in rows if r["family"] == "sdvae" or r["steps"] == steps], out / "table2.png",
                          title=f"DGAE ({steps} decode steps) vs SD-VAE at f16, {rows[0]['images']} images")
    except InputError as exc:
        print(f"table2.png not drawn: {exc}")
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=SCALES, default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/table2-SCALE")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "train"))
    parser.add_argument("--eval-data", default=str(ROOT.parent / "shared" / "data" / "eval" / "imagenet-val500"))
    parser.add_argument("--channels", type=int, nargs="+", default=list(CHANNELS), help="latent channels at f16")
    parser.add_argument("--minutes", type=float, help="training minutes per model (default: the scale's)")
    parser.add_argument("--limit", type=int, help="evaluation images (default: the scale's)")
    parser.add_argument("--stop-minutes", "--session-minutes", dest="session_minutes", type=float, default=None,
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
    names = [run_name(c, family) for c in args.channels for family in FAMILIES]

    path = out / "plan.json"
    settings = json.loads(json.dumps({"scale": args.scale, **dataclasses.asdict(scale), "data": args.data,
                                      "seed": args.seed, "channels": list(args.channels)}))
    plan = json.loads(path.read_text()) if path.exists() else {"settings": settings, "calibration": {}}
    if plan["settings"] != settings:
        sys.exit(f"{path}: made with other settings; use another --out or delete it")
    for family in FAMILIES:  # once per family, at the first latent size (see the module docstring)
        if family not in plan["calibration"]:
            plan["calibration"][family] = calibrate(scale, family, args.channels[0], args.data, args.seed)
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(plan, indent=2) + "\n")

    for name in names:
        c, family = parse_name(name)
        cfg = train_config(scale, family, c, plan["calibration"][family]["steps"], args.data, out / name, args.seed)
        status = train_run(out / name, cfg, deadline)
        print(f"train: {name}: {status} at step {trained_step(out / name)} of {cfg.steps}", flush=True)
        if status == "paused":
            return PAUSED
    entries = {}
    for name in names:
        run = out / name
        cached = json.loads((run / "rfid.json").read_text()) if (run / "rfid.json").exists() else {}
        if cached.get("trained_step") != trained_step(run):
            cached = {**score(run / "model.safetensors", scale, args.eval_data, args.grid_rows, run / "strip.png"),
                      "trained_step": trained_step(run)}
            with atomic_path(run / "rfid.json") as tmp:
                tmp.write_text(json.dumps(cached, indent=2) + "\n")
        print(f"eval: {name}: " + ", ".join(
            f"{r['steps']} steps rFID {r['rfid']:.1f} PSNR {r['psnr']:.2f} SSIM {r['ssim']:.3f} LPIPS {r['lpips']:.3f}"
            for r in cached["results"]), flush=True)
        calibration = plan["calibration"][parse_name(name)[1]]
        entries[name] = {"rfid": cached, "train_steps": cached["trained_step"],
                         "budget_minutes": calibration["steps"] * calibration["seconds_per_step"] / 60,
                         "train_minutes": json.loads((run / "time.json").read_text())["train_seconds"] / 60,
                         "diverged": (run / "diverged.json").exists(), "device": calibration["device"]}
    grid = comparison_grid([out / n / "strip.png" for n in names], scale, args.eval_data, args.grid_rows,
                           out / "table2-grid.png")
    rows = table_rows(entries, scale)
    intro = (f"DGAE vs SD-VAE at f16, {plan['calibration']['dgae']['device']}, {scale.minutes:g} min of training "
             f"each ({rows[0]['images']} evaluation images). Budget: steps x the calibrated time per step; wall: the "
             f"time the training took, which includes checkpoints, grids and anything else the device ran.")
    text = write_table(out, rows, scale, intro, {"plan": plan})
    print(f"\nwrote {out / 'table2.md'}, {out / 'table2.json'}, {out / 'table2.png'} and {grid}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
