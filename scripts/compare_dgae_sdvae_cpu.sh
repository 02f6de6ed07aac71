#!/usr/bin/env bash
# Side-by-side DGAE vs SD-VAE at one equal small size and budget, on CPU (the paper's Table 2 in miniature):
# the same encoder (dgae-s / sdvae-s share it), latent f8 c4, data, crops, batch, steps, optimizer, LPIPS weight
# and seed; only the decoder family and its loss differ. Both runs go side by side, one core each, then
# `bench rfid` scores both on the first $LIMIT evaluation images. Resumable: re-run after an interruption.
# Results go to runs/compare/*/ (rfid.json, grids); record them in benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/compare}
steps=${STEPS:-1500}
limit=${LIMIT:-50}
common=(../shared/data/train -f 8 -c 4 --crop 64 --batch-size 8 --steps "$steps" --lr 2e-4 --warmup 150
        --lpips-weight 1.0 --lpips-net alex --ckpt-every 250 --sample-every 500 --sample-steps 10 --workers 1
        --log-every 25 --seed 0)
resume() { [ -f "$1/checkpoint.safetensors" ] && echo --resume || true; }

mkdir -p "$out"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
( time dgaetok train "${common[@]}" --preset dgae-s --out "$out/dgae" $(resume "$out/dgae") ) \
  > "$out/dgae.log" 2>&1 &
( time dgaetok train "${common[@]}" --preset sdvae-s --disc-start $((steps / 2)) --out "$out/sdvae" \
  $(resume "$out/sdvae") ) > "$out/sdvae.log" 2>&1 &
wait
unset OMP_NUM_THREADS MKL_NUM_THREADS

data=../shared/data/eval/imagenet-val500
dgaetok bench rfid "$data" --model "$out/dgae/model.safetensors" --steps 8 --limit "$limit" \
  -o "$out/dgae/bench"
dgaetok bench rfid "$data" --model "$out/sdvae/model.safetensors" --limit "$limit" -o "$out/sdvae/bench"
