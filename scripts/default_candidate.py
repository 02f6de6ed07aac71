"""Scores the newest model of `scripts/train_default_cpu.sh` against the bundled default and keeps the card's curve.

    python scripts/default_candidate.py [RUNS] [--limit N] [--replace]

1. The candidate is the run's newest model (``RUNS/full256`` once that phase has begun, else ``RUNS/crop128``;
   RUNS defaults to ~/.cache/dgaetok/runs/default) as the default would ship: exported to ``RUNS/scored/`` in
   bfloat16, with its training record and latent statistics (measured as the run would have at its end, if it was
   stopped before: on the run's training photos, or on ``--stats-data`` where a copied run folder names a folder
   this machine lacks), since bf16 rounding moves the scores too. Its training up to that model's step: steps,
   images seen and hours of 2-core CPU wall time, summed from the phases' ``log.jsonl`` (each record's images
   over its images/s) on top of those of the model the run warm-started from, as its file recorded them when the
   run began (the first line of the log; the stand-in, which records none: ``--base-hours``, its 75 minutes).
   A cooldown (a copy of the flat run's folder, resumed with ``train --decay-from``) is scored as its own RUNS: its
   row and file also record the step of the flat run it branched from (``cooldown_from``).
2. `bench rfid` scores it and the bundled default on the evaluation set (all 500 images unless ``--limit``, 8
   Euler steps, uniform grid, seed 0, LPIPS-alex; the default's scores come from ``weights/scores.json`` when it
   holds them for the same settings): PSNR, SSIM, LPIPS, rFID, the mean colour offset and the border ratio.
3. One JSON line per scored model in ``weights/default-curve.jsonl`` and the curve drawn from all of them,
   ``weights/default-curve.png`` (PSNR, SSIM and LPIPS against CPU-hours, with the goals).
4. With ``--replace``, and only if PSNR, SSIM and LPIPS all improve, the scored file becomes
   ``weights/default.safetensors``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dgaetok.cli import training_data_name  # noqa: E402
from dgaetok.files import atomic_path  # noqa: E402
from dgaetok.models import file_sha256, load_model, read_model_file, save_model, weights_dir  # noqa: E402
from dgaetok.plots import figure, save  # noqa: E402
from dgaetok.stats import measure_folder  # noqa: E402
from gpu_default_collect import better_than, score  # noqa: E402

PHASES = ("crop128", "full256")  # in the order train_default_cpu.sh runs them
GOALS = {"psnr": 22.0, "ssim": 0.55, "lpips": 0.35}  # at 8 steps on the 500 evaluation images


def snapshot(phase: Path, tmp: Path) -> Path:
    """A copy of the phase's model, taken first: a run still training rewrites model.safetensors at every
    checkpoint, and the row must describe the model that was scored."""
    shutil.copyfile(phase / "model.safetensors", tmp / "model.safetensors")
    return tmp / "model.safetensors"


def metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as fh:
        return fh.metadata()


def model_step(path: Path) -> int:
    return int(metadata(path)["step"])


def checkpoint_record(phase: Path) -> tuple[dict, int]:
    """The phase's training settings and step, as its checkpoint records them."""
    meta = metadata(phase / "checkpoint.safetensors")
    return json.loads(meta["train_config"]), int(meta["step"])


def export(model_file: Path, phase: Path, run: dict, dst: Path, stats_data: Path | None = None, **record: str) -> Path:
    """The model as the default would ship: bfloat16, its training recorded, its latent statistics (a run stopped
    before its end has none: measured as the run would have, over its --stats-images of its training data, or of
    ``stats_data``) under the training folder's name rather than its path on the machine that trained. Scored as it
    is, and, if it replaces the default, that very file: bf16 rounding moves the 8-step scores by about 0.001 in
    SSIM."""
    model = load_model(model_file)
    if model.latent_stats is None:
        data = stats_data or Path(run["data"])
        if not data.is_dir():  # a run folder copied from another machine names that machine's folder
            raise SystemExit(f"{data}: no such folder, needed for the latent statistics of {phase}'s model (stopped "
                             "before its run's end); name the run's training photos with --stats-data FOLDER")
        model.latent_stats = measure_folder(model, data, run["stats_images"] or 256)
    model.latent_stats = dataclasses.replace(model.latent_stats, source=training_data_name(model.latent_stats.source))
    dst.parent.mkdir(exist_ok=True)
    save_model(model, dst, dtype=torch.bfloat16, source="scripts/train_default_cpu.sh", phase=phase.name,
               data="train (1765 photos)", weights=f"EMA {run['ema_decay']}", **record)
    return dst


def warm_start_record(phase: Path, current: Path) -> dict:
    """What the run's first phase started from, by that model file's own training record (step, phase, CPU-hours,
    images seen): the first line of the phase's log (`dgaetok train --warm-start` writes it). A run older than that
    record started from the stand-in (crop128) or from the bundled default, if it has not been replaced since."""
    try:
        record = json.loads((phase / "log.jsonl").read_text().partition("\n")[0])
    except json.JSONDecodeError:  # a line cut short by a kill
        record = {}
    if record.get("event") == "warm_start":
        return {k[len("from_"):]: v for k, v in record.items() if k.startswith("from_")}
    return read_model_file(current)[0] if current.is_file() and phase.name != PHASES[0] else {}


def run_progress(phase: Path, batch: int, step: int) -> dict:
    """Steps, images seen and training hours of one phase up to ``step``, from its log (the last record for each
    step: a run killed between checkpoints logs some steps twice)."""
    records = {}
    for line in (phase / "log.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line a run in progress is writing
            continue
        if "img_per_s" in record and record["step"] <= step:
            records[record["step"]] = record
    seconds, last = 0.0, 0
    for s in sorted(records):
        seconds += (s - last) * batch / records[s]["img_per_s"]
        last = s
    return {"steps": step, "images": step * batch, "hours": seconds / 3600}


def plot(rows: list[dict], path: Path) -> None:
    fig = figure(12.6, 3.6)
    for ax, (metric, label) in zip(fig.subplots(1, 3), (("psnr", "PSNR, dB"), ("ssim", "SSIM"),
                                                        ("lpips", "LPIPS-alex (lower is better)"))):
        # the flat-rate run as a line; each cooldown branches off it, so its point stands alone
        for cooled, style in ((False, dict(marker="o", label="dgae-s f8c4")),
                              (True, dict(marker="*", markersize=9, linestyle="none", label="cooled down"))):
            points = sorted((r["cpu_hours"], r[metric], r["phase"]) for r in rows if ("cooldown_from" in r) == cooled)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], **style)
            for x, y, phase in points:  # which phase made each point: the warm start, crop128 or full256
                ax.annotate(phase, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
        ax.axhline(GOALS[metric], color="grey", linestyle="--", label="goal")
        ax.set_xlabel("training, hours of a 2-core CPU")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize="small")
    fig.suptitle(f"The default at 8 steps on {rows[-1]['images']} ImageNet validation images", fontsize="medium")
    save(fig, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="?", default=Path.home() / ".cache" / "dgaetok" / "runs" / "default")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "eval" / "imagenet-val500")
    parser.add_argument("--limit", type=int, default=None, help="first N evaluation images (default: all)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--base-hours", type=float, default=1.25,
                        help="training hours of a warm start whose file records none")
    parser.add_argument("--phase", choices=PHASES, help="score this phase's model (default: the newest phase's)")
    parser.add_argument("--replace", action="store_true", help="make the candidate the default if it is better")
    parser.add_argument("--stats-data", type=Path, help="training photos for the latent statistics of a model "
                        "stopped before its run's end (default: the folder the run trained on)")
    args = parser.parse_args()

    # a phase counts once it has a model (a checkpoint is written first, its model after)
    phases = [args.runs / p for p in PHASES if (args.runs / p / "model.safetensors").is_file()]
    if args.phase:
        phases = phases[:[p.name for p in phases].index(args.phase) + 1] if args.runs / args.phase in phases else []
    if not phases:
        raise SystemExit(f"{args.runs}: no run of scripts/train_default_cpu.sh there ({args.phase or 'any phase'})")
    with tempfile.TemporaryDirectory() as tmp:
        raw = snapshot(phases[-1], Path(tmp))
        # each phase up to its checkpoint, the last up to the model scored (a run in progress may have gone on)
        records = [checkpoint_record(p) for p in phases]
        steps = [step for _, step in records[:-1]] + [model_step(raw)]
        progress = [run_progress(p, config["batch_size"], s) for p, (config, _), s in zip(phases, records, steps)]
        run = records[-1][0]
        weights = weights_dir()
        current = weights / "default.safetensors"
        start = warm_start_record(phases[0], current)
        base_hours = float(start.get("cpu_hours", args.base_hours))
        images_seen = int(start.get("images_seen", 0)) + sum(r["images"] for r in progress)
        hours = base_hours + sum(p["hours"] for p in progress)
        if start.get("phase") == phases[0].name:  # the run went on with the phase its warm start was in
            progress[0]["steps"] += int(start["step"])
        # a cooldown (train --decay-from on a copy of the flat run) records the step it branched from
        decay_from = run.get("decay_from")
        cooldown = {} if decay_from is None else {"cooldown_from": progress[-1]["steps"] - steps[-1] + decay_from}
        candidate = export(raw, phases[-1], run, args.runs / "scored" / f"{phases[-1].name}.safetensors",
                           stats_data=args.stats_data, step=str(progress[-1]["steps"]), cpu_hours=str(hours),
                           images_seen=str(images_seen), **{k: str(v) for k, v in cooldown.items()})
    scores_file = weights / "scores.json"
    cache = json.loads(scores_file.read_text()) if scores_file.is_file() else {}
    old = score(current, args.data, args.limit, args.steps, cache) if current.is_file() else None
    new = score(candidate, args.data, args.limit, args.steps, cache)
    with atomic_path(scores_file) as tmp:
        tmp.write_text(json.dumps(cache, indent=2, sort_keys=True) + "\n")

    better = better_than(new, old)
    curve_file = weights / "default-curve.jsonl"
    rows = [json.loads(line) for line in curve_file.read_text().splitlines()] if curve_file.is_file() else []
    row = {"date": datetime.date.today().isoformat(), "sha256": file_sha256(candidate)[:16], "phase": phases[-1].name,
           "steps": {p.name: r["steps"] for p, r in zip(phases, progress)},
           "images_seen": images_seen, "cpu_hours": hours, "dtype": "bfloat16", **cooldown,  # no dtype: fp32 EMA
           **{k: new[k] for k in ("images", "psnr", "ssim", "lpips", "rfid", "colour", "border")},
           "better_than_default": better}
    if not rows and old is not None:  # the curve starts at the model the run warm-started from
        rows.append({"date": row["date"], "sha256": file_sha256(current)[:16], "phase": "start",
                     "cpu_hours": base_hours, "images_seen": int(start.get("images_seen", 0)),
                     **{k: old[k] for k in ("images", "psnr", "ssim", "lpips", "rfid", "colour", "border")}})
    rows = [r for r in rows if r["sha256"] != row["sha256"]] + [row]
    with atomic_path(curve_file) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot([r for r in rows if r["images"] == new["images"]], weights / "default-curve.png")

    def line(name: str, s: dict) -> str:
        return (f"{name}: PSNR {s['psnr']:.2f} SSIM {s['ssim']:.4f} LPIPS {s['lpips']:.4f} rFID {s['rfid']:.1f} "
                f"colour {s['colour']:.2f}/255 border {s['border']:.2f}")

    if old is not None:
        print(line("default  ", old))
    print(line("candidate", new) + f"  ({row['images_seen']} images, {hours:.2f} CPU-hours)")
    if better and args.replace:
        with atomic_path(current) as tmp:
            shutil.copyfile(candidate, tmp)
        print(f"replaced {current}")
        student = weights / "default-1step.safetensors"
        if student.is_file():  # it refuses the new default's latents until distilled from it
            print(f"note: {student} was distilled from the previous default; distil it again: "
                  "bash scripts/distill_default_cpu.sh")
    else:
        print("better than the default" if better else "not better on all of PSNR, SSIM and LPIPS: default kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
