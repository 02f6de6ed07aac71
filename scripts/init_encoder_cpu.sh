#!/usr/bin/env bash
# `train --init-encoder` against training from scratch, on CPU at small scale: does starting DGAE from a trained
# SD-VAE encoder reconstruct better after equal steps?
# 1. sdvae-s f8c4 trains first (its encoder is the one DGAE starts from; no GAN term within these steps).
# 2. Three dgae-s f8c4 runs side by side, one thread each, equal steps and data: from scratch, from the SD-VAE
#    encoder, and from it frozen for the first half. 3. `bench rfid` scores each on the first $LIMIT evaluation
#    images at 8 decode steps (and the SD-VAE in its one pass). Resumable: re-run after an interruption.
# Results go to runs/init/*/ (rfid.json, grids); record them in benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/init}
steps=${STEPS:-300}
sdvae_steps=${SDVAE_STEPS:-500}
limit=${LIMIT:-50}
common=(../shared/data/train -f 8 -c 4 --crop 64 --batch-size 8 --lr 2e-4 --warmup 50 --lpips-weight 1.0
        --lpips-net alex --ckpt-every 100 --sample-steps 4 --workers 1 --log-every 25 --seed 0 --stats-images 0)
resume() { [ -f "$1/checkpoint.safetensors" ] && echo --resume || true; }

mkdir -p "$out"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
( time nice dgaetok train "${common[@]}" --preset sdvae-s --steps "$sdvae_steps" --disc-start 1000000 \
  --out "$out/sdvae" $(resume "$out/sdvae") ) > "$out/sdvae.log" 2>&1
sd="$out/sdvae/model.safetensors"
( time nice dgaetok train "${common[@]}" --preset dgae-s --steps "$steps" --out "$out/scratch" \
  $(resume "$out/scratch") ) > "$out/scratch.log" 2>&1 &
( time nice dgaetok train "${common[@]}" --preset dgae-s --steps "$steps" --init-encoder "$sd" --out "$out/init" \
  $(resume "$out/init") ) > "$out/init.log" 2>&1 &
( time nice dgaetok train "${common[@]}" --preset dgae-s --steps "$steps" --init-encoder "$sd" \
  --freeze-encoder $((steps / 2)) --out "$out/frozen" $(resume "$out/frozen") ) > "$out/frozen.log" 2>&1 &
wait

data=../shared/data/eval/imagenet-val500
for run in scratch init frozen; do
  ( time nice dgaetok bench rfid "$data" --model "$out/$run/model.safetensors" --steps 8 --limit "$limit" \
    -o "$out/$run/bench" ) > "$out/$run-bench.log" 2>&1 &
done
( time nice dgaetok bench rfid "$data" --model "$sd" --limit "$limit" -o "$out/sdvae/bench" ) \
  > "$out/sdvae-bench.log" 2>&1 &
wait
