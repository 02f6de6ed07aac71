#!/usr/bin/env bash
# Few-step decoding: PSNR / SSIM / LPIPS against step count for Euler and Heun on uniform and shifted time grids,
# on the first $LIMIT evaluation images, same latents and seeded noise for every setting (bench rfid).
# Heun costs 2 * steps - 1 network passes. Prints one table at the end; results in $OUT/<sampler>-shift<s>/.
#   LIMIT=16 MODEL=default bash benchmarks/few_step.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/few-step}
data=../shared/data/eval/imagenet-val500
run() {  # sampler shift steps...
  local sampler=$1 shift=$2; shift 2
  dgaetok bench rfid "$data" --model "${MODEL:-default}" --limit "${LIMIT:-16}" --sampler "$sampler" \
    --shift "$shift" $(printf -- '--steps %s ' "$@") -o "$out/$sampler-shift$shift" > /dev/null
}
run euler 1.0 2 4 8 50
run heun 1.0 2 4
run euler 0.5 2 4 8
run euler 2.0 2 4 8
run heun 0.5 2 4
python - "$out" <<'PY'
import json, sys
from pathlib import Path
print("| sampler | shift | steps | network passes | PSNR | SSIM | LPIPS |")
print("|---|---|---|---|---|---|---|")
for f in sorted(Path(sys.argv[1]).glob("*/rfid.json")):
    r = json.loads(f.read_text())
    for s in r["results"]:
        passes = 2 * s["steps"] - 1 if r["sampler"] == "heun" else s["steps"]
        print(f"| {r['sampler']} | {r['shift']} | {s['steps']} | {passes} | {s['psnr']:.2f} | {s['ssim']:.3f} | {s['lpips']:.3f} |")
print(f"({r['images']} images, {r['device']}, model {Path(r['model']).name})")
PY
