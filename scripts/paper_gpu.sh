#!/usr/bin/env bash
# Issue 17's prepared device call: the next call group of benchmarks/paper_gpu.py's plan (Table 2 models, DiTs).
#   python scripts/make_gpu_pack.py          # once per session: .gpu/ (photos, wheels, LPIPS-alex); checks 64 MiB
#   run(command="bash scripts/paper_gpu.sh", carry=[".gpu"], timeout_s=600)
# then, back here, in the same session (the trained models exist only in the call's files):
#   python benchmarks/paper_gpu.py collect <files_at> --gpu-minutes <the session's device minutes>
# The state it works from is the committed benchmarks/results/paper-gpu/state.json: commit what collect wrote
# before the next session. Everything goes to $OUT as it is made; LIMIT_S (600) is the call's limit.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
out=${OUT:-runs/paper-gpu/out}
mkdir -p "$out"
source scripts/gpu_env.sh || { echo "gpu_env.sh failed"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv 2>&1 | head -3
python3 benchmarks/paper_gpu.py device --out "$out" --deadline $((start + ${LIMIT_S:-600} - 20)) "$@"
