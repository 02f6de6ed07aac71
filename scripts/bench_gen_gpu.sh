#!/usr/bin/env bash
# Issue 7's GPU run: a DiT on ../shared/data/train latents of the default model and of an SD-VAE of the same
# latent size (f8c4), side by side, with the convergence curve. Resumable: re-run after an interruption, or with a
# larger STEPS to extend it. Record card, minutes and numbers from $OUT/gen.json and $OUT/curve.png in
# benchmarks/RESULTS.md.
#   SDVAE=runs/compare/sdvae/model.safetensors STEPS=20000 scripts/bench_gen_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/bench-gen}
dgae=${DGAE:-default}
sdvae=${SDVAE:-runs/compare/sdvae/model.safetensors}
dgaetok bench gen ../shared/data/train --tokenizer "$dgae" --tokenizer "$sdvae" \
  --dit "${DIT:-DiT-B/2}" --steps "${STEPS:-20000}" --eval-every "${EVAL_EVERY:-2500}" \
  ${MINUTES:+--minutes "$MINUTES"} --num-samples "${SAMPLES:-1000}" --batch-size "${BATCH:-128}" \
  --sample-steps 50 --decode-steps "${DECODE_STEPS:-25}" --seed 0 -o "$out"
