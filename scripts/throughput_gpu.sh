#!/usr/bin/env bash
# Issue 5's GPU run, one device call (about 8 minutes on an H100; give it timeout_s 600): dgae-b f16c8 at 256 px,
# eager and then compiled in the same process (before/after on the same card), against the measured bf16 matmul
# peak and the SD-VAE peer decoder; then CUDA graphs (reduce-overhead) for decode alone. JSON and logs go to $OUT.
# The GPU machine lacks lpips and pytorch-fid: carry them as wheels in .whl (see /work/.library/device/README.md):
#   run(command="bash scripts/throughput_gpu.sh", carry=[".whl"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
out=${OUT:-runs/throughput}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee "$out/gpu.txt"
python benchmarks/throughput.py --preset dgae-b --batch "${BATCH:-64}" --train-batch 96 --steps 1 2 4 8 25 50 \
  --compile default --out "$out/dgae-b-default.json" 2>&1 | tee "$out/dgae-b-default.log"
python benchmarks/throughput.py --preset dgae-b --batch "${BATCH:-64}" --train-batch 0 --steps 1 8 \
  --compile reduce-overhead --out "$out/dgae-b-cudagraphs.json" 2>&1 | tee "$out/dgae-b-cudagraphs.log"
