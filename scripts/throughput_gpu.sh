#!/usr/bin/env bash
# Throughput of DGAE on one GPU, in at most 9 minutes (a preemptible or rented GPU's short job):
#   bash scripts/throughput_gpu.sh        (with the pack of scripts/make_gpu_pack.py in .gpu/)
# dgae-b f16c8 at 256 px, bf16, against the bf16 matmul peak measured in the same process. Rows, most important
# first, each appended to $OUT/throughput.jsonl the moment it is measured (so a killed job keeps them):
#   1. the U-Net step (one sampling step), eager, batch 32, with torch.profiler's top kernels
#   2. a training step at the largest batch up to 96 that fits, without and with --grad-checkpoint (profiled)
#   3. encode; decode at 1, 4, 8 and 50 steps (batch 16); the SD-VAE decoder of the same latent (the peer). A
#      one-step student (`dgaetok distill`) is the same U-Net run once: its speed is the 1-step decode row, to set
#      against the 8-step row (its teacher) and the peer.
#   4. the U-Net step compiled (default, then reduce-overhead), then the training step compiled: each under a
#      compile guard, all under a deadline, so the job ends in time whatever compiling costs.
#   5. a latent dataset of the pack's photos encoded under torchrun (one process on this GPU), with the bundled
#      default in bf16, 256 images per shard: one "shards" line with its images/s, start-up included.
# Everything goes to ${OUT:-runs/throughput}: throughput.jsonl, throughput.log, profile-*.txt, gpu.txt, shards/.
# REHEARSE=1 runs the same sequence on the CPU with dgae-t at 32 px and the sample photos (seconds; compiled rows
# skipped unless COMPILE_GUARD is set): tests/test_benchmarks.py does, so this script cannot rot unseen.
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
  photos=examples/photos per_shard=2
else
  # the GPU machine's python may have torch but not lpips: gpu_env.sh installs the wheels taken along in .gpu/
  if [[ -f scripts/gpu_env.sh ]]; then
    source scripts/gpu_env.sh || echo "warning: scripts/gpu_env.sh failed; the training rows will report why"
  fi
  size=(--preset dgae-b -f 16 -c 8 --resolution 256 --batch 16 --unet-batch 32 --train-batch 96
        --steps 1 4 8 50 --min-time 2)
  guard=${COMPILE_GUARD:-150}
  deadline=${DEADLINE:-420}
  photos=.gpu/train per_shard=256
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee "$out/gpu.txt" || true
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
# the deadline ends rows from inside; timeout is the backstop (imports and the final table come on top)
timeout --kill-after=10 $((${deadline%.*} + 40)) "$py" benchmarks/throughput.py "${size[@]}" \
  --rows unet train train-ckpt encode decode peer unet@default unet@reduce-overhead train@default \
  --fit-refine 1 --compile-guard "$guard" --deadline "$deadline" --profile "$out" \
  --out "$out/throughput.jsonl" 2>&1 | tee "$out/throughput.log" || rc=$?
rm -rf "$out/shards"  # a dataset left by an earlier job would resume, and its images would inflate the rate
start=$(date +%s.%N)
status=ok
timeout --kill-after=10 60 "$py" -m torch.distributed.run --standalone --nproc_per_node 1 -m dgaetok.cli encode \
  "$photos" -o "$out/shards" --shards "$per_shard" >> "$out/throughput.log" 2>&1 || status="failed (exit $?)"
"$py" - "$out" "$start" "$status" <<'PY' || echo "warning: the shards line was not written" >&2
import json, sys, time
from pathlib import Path
out, start, status = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
seconds = time.time() - start
index = out / "shards" / "dataset.json"
images = json.loads(index.read_text())["images"] if index.is_file() and status == "ok" else 0
line = {"kind": "shards", "what": "encode --shards under torchrun, 1 process", "status": status, "images": images,
        "seconds": seconds, "img_per_s": images / seconds}
with open(out / "throughput.jsonl", "a") as fh:
    fh.write(json.dumps(line) + "\n")
print(json.dumps(line))
PY
exit ${rc:-0}
