#!/usr/bin/env bash
# Issue 13's GPU measurement, one device call of at most 9 minutes (give it timeout_s 600):
#   run(command="bash scripts/throughput_gpu.sh", carry=[".gpu"], timeout_s=600)
# dgae-b f16c8 at 256 px, bf16, against the bf16 matmul peak measured in the same process. Rows, most important
# first, each appended to $OUT/throughput.jsonl the moment it is measured (so a killed call keeps them):
#   1. the U-Net step (one sampling step), eager, batch 32, with torch.profiler's top kernels
#   2. a training step at the largest batch up to 96 that fits, without and with --grad-checkpoint (profiled)
#   3. encode; decode at 1, 4, 8 and 50 steps (batch 16); the SD-VAE decoder of the same latent (the peer)
#   4. the U-Net step compiled (default, then reduce-overhead), then the training step compiled: each under a
#      compile guard, all under a deadline, so the call ends in time whatever compiling costs.
# Everything goes to ${OUT:-runs/throughput}: throughput.jsonl, throughput.log, profile-*.txt, gpu.txt.
# REHEARSE=1 runs the same sequence on the CPU with dgae-t at 32 px (seconds; compiled rows skipped unless
# COMPILE_GUARD is set): tests/test_benchmarks.py does, so this script cannot rot between lent sessions.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/throughput}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
if [[ "${REHEARSE:-0}" == 1 ]]; then
  size=(--device cpu --preset dgae-t --resolution 32 -f 8 -c 4 --batch 2 --unet-batch 2 --train-batch 4
        --steps 1 4 --min-time 0 --lpips-net alex --profile-calls 1)
  guard=${COMPILE_GUARD:-0}
  deadline=${DEADLINE:-600}
else
  # the device's python has torch but not lpips: gpu_env.sh installs the wheels carried in .gpu/
  if [[ -f scripts/gpu_env.sh ]]; then
    source scripts/gpu_env.sh || echo "warning: scripts/gpu_env.sh failed; the training rows will report why"
  fi
  size=(--preset dgae-b -f 16 -c 8 --resolution 256 --batch 16 --unet-batch 32 --train-batch 96
        --steps 1 4 8 50 --min-time 2)
  guard=${COMPILE_GUARD:-150}
  deadline=${DEADLINE:-450}
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee "$out/gpu.txt" || true
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
# the deadline ends rows from inside; timeout is the backstop (imports and the final table come on top)
timeout --kill-after=10 $((${deadline%.*} + 40)) "$py" benchmarks/throughput.py "${size[@]}" \
  --rows unet train train-ckpt encode decode peer unet@default unet@reduce-overhead train@default \
  --fit-refine 1 --compile-guard "$guard" --deadline "$deadline" --profile "$out" \
  --out "$out/throughput.jsonl" 2>&1 | tee "$out/throughput.log"
