#!/usr/bin/env bash
# Distils the bundled default (weights/default.safetensors) into a one-step decoder on a CPU, a little at a time,
# and exports it as weights/default-1step.safetensors (bfloat16).
#
#   MINUTES=120 bash scripts/distill_default_cpu.sh [DATA]
#
# Each invocation distils for MINUTES of wall time (ending with a checkpoint); the next one resumes the same run
# exactly. The run folder, with its optimizer state, lives outside the repository in $RUN (default
# ~/.cache/dgaetok/runs/default-1step-<first 8 hex digits of the teacher's sha256>: a new default is a new run).
# The student's targets: the teacher's 4 Euler steps on the uniform grid (its best few-step decode), plus 4x the
# same loss against the photo itself, at a gentle learning rate (3e-5): of the recipes compared, the one that ends
# better than the teacher's own one step, which this default is already good at (benchmarks/RESULTS.md, "One-step
# distillation"). Whole 256 px images rather than crops, so that the student's GroupNorm sees in training the
# statistics it decodes with (crops shifted the default's colours). The learning rate is constant after its
# warm-up, so a run cut into invocations of any length trains the same way; the EMA weights are what is exported.
# A new run (a new default, or a new machine) starts as the teacher itself, whose one step the student must beat (a
# student warm-started from the previous one fell behind it once the default's one step had moved on:
# benchmarks/RESULTS.md); WARM_START=FILE starts its decoder from FILE instead (an earlier student). The encoder is
# always the default's.
# PROCS and THREADS set processes and threads (scripts/cpu_processes.sh), for a machine that also trains, say.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cpu_processes.sh
data=${1:-${DATA:-../shared/data/train}}
hash=$(sha256sum weights/default.safetensors | cut -c1-8)
run=${RUN:-$HOME/.cache/dgaetok/runs/default-1step-$hash}
if [ -f "$run/checkpoint.safetensors" ]; then
  start=(--resume)
elif [ -n "${WARM_START:-}" ]; then
  echo "note: $run starts its decoder from $WARM_START (warm start), its encoder from the default" >&2
  start=(--warm-start "$WARM_START")
else
  echo "note: $run starts as its teacher, weights/default.safetensors" >&2
  start=()
fi
batch=4
mkdir -p "$(dirname "$run")"
accum=$(accum_for "$run")  # an assignment, so that set -e stops here when PROCS does not fit the run
run_dgaetok distill default "$data" -o "$run" --teacher-steps 4 --teacher-shift 1.0 \
  --real-weight 4 --lpips-net alex --resolution 256 --batch-size "$batch" --accum "$accum" --lr 3e-5 \
  --min-lr 3e-5 --warmup 25 --ema-decay 0.995 --precision auto --minutes "${MINUTES:-60}" --workers 1 \
  --sample-every 250 --ckpt-every 50 --log-every 10 "${start[@]}"
python - "$run/model.safetensors" weights/default-1step.safetensors "$batch" <<'PY'
import sys, torch
from safetensors import safe_open
from dgaetok.models import load_model, save_model
with safe_open(sys.argv[1], "pt") as fh:
    step = int(fh.metadata()["step"])
save_model(load_model(sys.argv[1]), sys.argv[2], dtype=torch.bfloat16, source="scripts/distill_default_cpu.sh",
           step=str(step), images_seen=str(int(sys.argv[3]) * step), data="1765 photos, 256 px", weights="EMA 0.995")
print(f"wrote {sys.argv[2]} (step {step}); score it: python benchmarks/distill.py --student {sys.argv[2]}")
PY
