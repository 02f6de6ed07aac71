#!/usr/bin/env bash
# Issue 12's prepared device call: train the default for one lent GPU session. From this machine:
#   python scripts/make_gpu_pack.py          # once: .gpu/ (photos, wheels, LPIPS weights), checks the 64 MiB budget
#   run(command="bash scripts/gpu_default.sh", carry=[".gpu"], timeout_s=600)
# then, back here: python scripts/gpu_default_collect.py /work/.device/...  (joins, scores, replaces if better).
# 1. CUDA tests (90 s at most): a lent GPU is never spent training with a broken build.
# 2. scripts/gpu_default.py trains until 60 s before the call's limit (LIMIT_S, 600), exporting to $OUT as it goes.
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
