#!/usr/bin/env bash
# Train the default on a rented or preemptible GPU, as one job with a time limit (LIMIT_S, 600 s by default):
#   python scripts/make_gpu_pack.py   # once, beforehand: .gpu/ (photos, wheels, LPIPS weights), the pack the job
#                                     # takes along; it checks the size limit of what the job takes (--budget-mib)
#   OUT=<the job's output folder> bash scripts/gpu_default.sh     # the job, on the GPU, with .gpu/ in the checkout
# then copy the job's output folder back, and: python scripts/gpu_default_collect.py <that folder> --gpu-minutes M
# (joins, scores, replaces the default if better).
# 1. CUDA tests (90 s at most): GPU time is never spent training with a broken build.
# 2. scripts/gpu_default.py trains until 60 s before the job's limit (LIMIT_S), exporting to $OUT as it goes, so a
#    job stopped at its limit keeps the last export.
# 3. The slow CUDA tests (compilation), with what time is left.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
out=${OUT:-runs/gpu-default/out}
mkdir -p "$out"
source scripts/gpu_env.sh || { echo "gpu_env.sh failed" | tee "$out/failed.txt"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv; python3 -c \
  "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

timeout 90 python3 -m pytest -q -p no:cacheprovider -m "cuda and not slow" tests/test_cuda.py > "$out/cuda-tests.txt" 2>&1
rc=$?
tail -5 "$out/cuda-tests.txt"
if [ "$rc" -ne 0 ]; then
  echo "CUDA tests failed (exit $rc): not training; see cuda-tests.txt"
  exit 1
fi

python3 scripts/gpu_default.py --out "$out" --deadline $((start + ${LIMIT_S:-600} - 60)) "$@"
rc=$?

left=$((start + ${LIMIT_S:-600} - 15 - $(date +%s)))
if [ "$left" -gt 20 ]; then
  timeout "$left" python3 -m pytest -q -p no:cacheprovider -m "cuda and slow" tests/test_cuda.py \
    >> "$out/cuda-tests.txt" 2>&1
  tail -3 "$out/cuda-tests.txt"
fi
exit $rc
