"""After `scripts/gpu_default.sh`, on the job's output folder copied back: join the shards, score, and replace the
default if better. Any machine will do (a CPU is enough).

    python scripts/gpu_default_collect.py path/to/the/job-output --gpu-minutes 14.2

1. Joins ``model.shard-*.safetensors`` into ``runs/gpu-default/<date>/model.safetensors`` and records in its
   metadata the GPU-minutes it holds in all (``gpu_minutes``: the warm start's plus this job's;
   ``--gpu-minutes`` is the GPU time the job took, as the GPU provider bills it, else run.json's wall time).
2. Scores it with `bench rfid` on the evaluation set (all 500 images, 8 Euler steps, seed 0, LPIPS-alex), and the
   current default too unless ``weights/scores.json`` already holds its scores under the same settings.
3. Replaces ``weights/default.safetensors`` (bfloat16) only if the new model is better: higher PSNR and SSIM and
   lower LPIPS. Either way it adds the job's row to the table in ``weights/README.md`` and keeps every score in
   ``weights/scores.json``.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dgaetok.bench import rfid  # noqa: E402
from dgaetok.files import atomic_path  # noqa: E402
from dgaetok.models import (file_sha256, join_model_files, load_model, read_model_file, save_model,  # noqa: E402
                            weights_dir)
from dgaetok.precision import resolve  # noqa: E402

TABLE_START, TABLE_END = "<!-- gpu-runs -->", "<!-- /gpu-runs -->"
HEADER = ("| run started | card | GPU-min (run) | GPU-min (default, in all) | steps | img/s | MFU | PSNR | SSIM | "
          "LPIPS-alex | rFID | became the default |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def score(path: Path, data: Path, limit: int | None, steps: int, cache: dict) -> dict:
    """bench rfid's numbers for a model file, from ``cache`` when it holds them for the same settings (the
    precision included: auto picks it by the machine)."""
    precision = resolve("auto", "cpu").name  # load_model's device and precision
    key = f"{file_sha256(path)}:{data.name}:{limit}:{steps}:{precision}"
    if key not in cache:
        result = rfid(load_model(path), str(path), data, [steps], limit, batch_size=8, lpips_net="alex")
        cache[key] = {**asdict(result.results[0]), "images": result.images, "device": result.device,
                      "precision": precision}
    return cache[key]


def better_than(new: dict, old: dict | None) -> bool:
    """A candidate replaces the default only when PSNR, SSIM and LPIPS all improve."""
    return old is None or (new["psnr"] > old["psnr"] and new["ssim"] > old["ssim"] and new["lpips"] < old["lpips"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", type=Path, help="the GPU job's output folder (OUT), copied back")
    parser.add_argument("--gpu-minutes", type=float, default=None, help="the GPU time the job took (default: its run.json wall time)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "eval" / "imagenet-val500",
                        help="the evaluation images (default: the project's evaluation data)")
    parser.add_argument("--limit", type=int, default=None, help="first N evaluation images (default: all)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "gpu-default")
    args = parser.parse_args()

    session = json.loads((args.files / "run.json").read_text())
    shards = sorted(args.files.glob("model.shard-*.safetensors"))
    if not shards:
        raise SystemExit(f"{args.files}: no model shards (the job's status: {session.get('status')})")
    stamp = session["started"].replace(" UTC", "").replace(" ", "T").replace(":", "")
    run = args.runs / stamp
    run.mkdir(parents=True, exist_ok=True)
    joined = join_model_files(shards, run / "joined.safetensors")
    minutes = args.gpu_minutes if args.gpu_minutes is not None else session["wall_seconds"] / 60
    total = session.get("gpu_minutes_before", 0.0) + minutes
    meta, _ = read_model_file(joined)
    candidate = run / "model.safetensors"
    save_model(load_model(joined), candidate, dtype=torch.bfloat16, **{k: v for k, v in meta.items()
               if k not in ("format", "config")}, gpu_minutes=f"{total:.2f}", trained_on=session["card"],
               source="scripts/gpu_default.sh")

    weights = weights_dir()
    scores_file = weights / "scores.json"
    cache = json.loads(scores_file.read_text()) if scores_file.is_file() else {}
    new = score(candidate, args.data, args.limit, args.steps, cache)
    current = weights / "default.safetensors"
    old = score(current, args.data, args.limit, args.steps, cache) if current.is_file() else None
    better = better_than(new, old)
    if better:
        with atomic_path(current) as tmp:
            tmp.write_bytes(candidate.read_bytes())
    with atomic_path(scores_file) as tmp:
        tmp.write_text(json.dumps(cache, indent=2, sort_keys=True) + "\n")

    mfu = session.get("mfu")
    row = (f"| {session['started']} | {session['card']} | {minutes:.1f} | {f'{total:.1f}' if better else '-'} | "
           f"{session.get('step')} | {session.get('img_per_s') or 0:.0f} | {(mfu or 0) * 100:.1f}% | "
           f"{new['psnr']:.2f} | {new['ssim']:.3f} | {new['lpips']:.3f} | {new['rfid']:.1f} | "
           f"{'yes' if better else 'no'} |\n")
    card = weights / "README.md"
    text = card.read_text()
    if TABLE_START not in text:
        text += f"\n## GPU training runs\n\n{TABLE_START}\n{HEADER}{TABLE_END}\n"
    text = text.replace(TABLE_END, row + TABLE_END)
    if better:
        text = re.sub(r"GPU-minutes so far: [0-9.]+\.", f"GPU-minutes so far: {total:.1f}.", text)
    card.write_text(text)
    print(f"new: PSNR {new['psnr']:.2f} SSIM {new['ssim']:.3f} LPIPS {new['lpips']:.3f} rFID {new['rfid']:.1f}; "
          + (f"current: PSNR {old['psnr']:.2f} SSIM {old['ssim']:.3f} LPIPS {old['lpips']:.3f}; " if old else "")
          + ("replaced weights/default.safetensors" if better else "kept the current default"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
