#!/usr/bin/env bash
# One GPU job of benchmarks/paper_gpu.py's plan (Table 2 models, DiTs): the next call groups with work left, on a
# rented or preemptible GPU, within the job's time limit (LIMIT_S, 600 s by default).
#   python scripts/make_gpu_pack.py   # beforehand: .gpu/ (photos, wheels, LPIPS-alex), the pack the job takes
#                                     # along; it checks the size limit of what the job takes (--budget-mib)
#   OUT=<the job's output folder> bash scripts/paper_gpu.sh       # the job, on the GPU, with .gpu/ in the checkout
# then copy the job's output folder back and collect it before it is lost (the trained models exist only there):
#   python benchmarks/paper_gpu.py collect <that folder> --gpu-minutes <the GPU minutes the job took>
# The state it works from is the committed benchmarks/results/paper-gpu/state.json: commit what collect wrote
# before the next job. Everything goes to $OUT as it is made.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
out=${OUT:-runs/paper-gpu/out}
mkdir -p "$out"
source scripts/gpu_env.sh || { echo "gpu_env.sh failed"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv 2>&1 | head -3
python3 benchmarks/paper_gpu.py device --out "$out" --deadline $((start + ${LIMIT_S:-600} - 20)) "$@"
