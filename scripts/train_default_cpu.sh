#!/usr/bin/env bash
# Trains the bundled default (dgae-s, f8 c4) on a CPU, a little at a time, in bf16 where the CPU has bf16 units.
#
#   MINUTES=120 bash scripts/train_default_cpu.sh [DATA]
#
# Each invocation trains for MINUTES of wall time (ending with a checkpoint), then stops; the next one resumes the
# same run exactly. The run folders, with their optimizer state, live outside the repository in $RUNS (default
# ~/.cache/dgaetok/runs/default). Without them (a new machine) the run warm-starts from weights/default.safetensors
# and says so. Two phases, so that GroupNorm sees at the end the image size it decodes at:
#   crop128  STEPS128 (2500) steps on random 128 px crops of the 256 px images (4x cheaper per image than 256 px)
#   full256  then whole 256 px images, warm-started from crop128's EMA weights (on a new machine, from a bundled
#            default that this recipe made)
# The learning rate is constant after its warm-up (min_lr = lr), so a run that is cut into many invocations of any
# length trains the same way. The loss has `--lowpass-weight 10` (10 x the MSE of x0' and the photo over 8x8
# blocks), which the bundled default's run took on at full256 step 2750 against its colour cast. Then
# `python scripts/default_candidate.py` scores the newest weights against the bundled ones. The recipe and why:
# weights/README.md. PROCS=2 trains in two processes (scripts/cpu_processes.sh: faster than threads on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cpu_processes.sh
data=${1:-${DATA:-../shared/data/train}}
runs=${RUNS:-$HOME/.cache/dgaetok/runs/default}
minutes=${MINUTES:-60}
steps128=${STEPS128:-2500}
steps256=${STEPS256:-1000000}
common=(--preset dgae-s -f 8 -c 4 --resolution 256 --batch-size 8 --lr 1e-4 --min-lr 1e-4 --warmup 100
        --lpips-net alex --lpips-weight 1.0 --lowpass-weight 10 --kl-weight 1e-6 --ema-decay 0.999 --precision auto
        --ckpt-every 100 --sample-every 1000 --sample-steps 8 --log-every 25 --workers 1 --stats-images 64)
last_step() { python -c "import json,sys; print(json.loads(open(sys.argv[1]).readlines()[-1]).get('step', 0))" "$1/log.jsonl" 2>/dev/null || echo 0; }

train() {  # dir crop steps init
  local dir=$1 start=()
  if [ -f "$dir/checkpoint.safetensors" ]; then
    start=(--resume)
  else
    echo "note: $dir starts from $4 (warm start: its weights, a fresh optimizer)" >&2
    start=(--warm-start "$4")
  fi
  mkdir -p "$(dirname "$dir")"
  local accum
  accum=$(accum_for "$dir")
  run_dgaetok train "$data" --out "$dir" --crop "$2" --steps "$3" --minutes "$minutes" \
    --accum "$accum" "${common[@]}" "${start[@]}"
}

# A bundled default that this recipe made past crop128 (its file names the phase and step) lets a new machine go on
# at full size from it. The python that runs dgaetok reads the file; if it cannot, say so rather than start over.
past_crop128=$(python -c "import sys; from safetensors import safe_open; m = safe_open(sys.argv[1], 'pt').metadata()
print(int(m.get('phase') == 'full256' or (m.get('phase') == 'crop128' and int(m['step']) >= int(sys.argv[2]))))" \
  weights/default.safetensors "$steps128") || { echo "note: could not read weights/default.safetensors's phase" >&2
                                                 past_crop128=0; }
if [ ! -f "$runs/crop128/checkpoint.safetensors" ] && [ "$past_crop128" = 1 ]; then
  train "$runs/full256" 256 "$steps256" weights/default.safetensors
elif [ "$(last_step "$runs/crop128")" -lt "$steps128" ]; then
  train "$runs/crop128" 128 "$steps128" weights/default.safetensors
else
  train "$runs/full256" 256 "$steps256" "$runs/crop128/model.safetensors"
fi
