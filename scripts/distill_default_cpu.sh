#!/usr/bin/env bash
# Distils the bundled default (weights/default.safetensors) into a one-step decoder on the training photos and
# exports it as weights/default-1step.safetensors (bfloat16). The teacher's targets: 8 Euler steps on the
# shift-0.5 grid, its best few-step grid (benchmarks/RESULTS.md, "Few-step decoding"). One thread per process:
# on a small machine that is busy with other work, OpenMP threads spin-waiting for a core make two threads slower
# than one.
# MINUTES is the wall-time budget (the run ends with a checkpoint); re-run with the same settings to resume.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/default-1step}
resume=$([ -f "$out/checkpoint.safetensors" ] && echo --resume || true)
OMP_NUM_THREADS=1 nice -n 10 dgaetok distill default ../shared/data/train -o "$out" --teacher-steps 8 \
  --teacher-shift 0.5 --lpips-net alex --crop 64 --batch-size 16 --lr 2e-4 --warmup 25 --ema-decay 0.995 \
  --minutes "${MINUTES:-45}" --workers 1 --sample-every 100 --ckpt-every 50 --log-every 10 --device cpu $resume
python - "$out/model.safetensors" weights/default-1step.safetensors <<'PY'
import sys, torch
from safetensors import safe_open
from dgaetok.models import load_model, save_model
with safe_open(sys.argv[1], "pt") as fh:
    step = fh.metadata()["step"]
save_model(load_model(sys.argv[1]), sys.argv[2], dtype=torch.bfloat16, source="scripts/distill_default_cpu.sh",
           step=step, data="../shared/data/train (1765 photos)", weights="EMA 0.995")
PY
