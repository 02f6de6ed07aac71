#!/usr/bin/env bash
# Issue 12, item 1: the default's architecture, chosen by cheap CPU comparisons at equal steps (resumable).
# Three runs on the same data, crops, batch, steps, optimizer and loss (velocity + KL + LPIPS-alex):
#   s-f16c8   dgae-s  (U-Net on pixels, 32 channels; 43 GFLOP per decoder pass at 256 px)
#   s2-f16c8  dgae-s2 (U-Net on 2x2 patches, 64 channels; 39 GFLOP per pass)
#   s2-f8c4   dgae-s2 with the f8 c4 latent (4096 values instead of 2048)
# each scored by `bench rfid` on the first $LIMIT evaluation images at 8 Euler steps (uniform and shift-0.5 grids).
# At 400 steps no run reconstructs yet (about 10 dB), so MORE=N then trains both dgae-s2 latents N steps further,
# warm-started from their 400-step weights (fresh optimizer, lr 1e-4, N/20 warm-up steps), into NAME-more/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/default-arch}
steps=${STEPS:-400}
limit=${LIMIT:-50}
shifts=${SHIFTS:-1.0 0.5}
common=(../shared/data/train --resolution 256 --crop 128 --batch-size 4 --lpips-net alex --ckpt-every 50
        --sample-steps 8 --workers 1 --log-every 10 --seed 0)
resume() { [ -f "$1/checkpoint.safetensors" ] && echo --resume || true; }
run() {  # name preset f c
  local dir="$out/$1"
  if [ ! -f "$dir/model.safetensors" ] || [ "$(python -c "import json,sys; print(json.loads(open('$dir/log.jsonl').readlines()[-1]).get('step'))" 2>/dev/null)" != "$steps" ]; then
    dgaetok train "${common[@]}" --steps "$steps" --lr 2e-4 --warmup $((steps / 10)) --sample-every "$steps" \
      --preset "$2" -f "$3" -c "$4" --out "$dir" $(resume "$dir")
  fi
  for shift in $shifts; do
    [ -f "$dir/bench-$shift/rfid.json" ] || dgaetok bench rfid ../shared/data/eval/imagenet-val500 \
      --model "$dir/model.safetensors" --steps 8 --shift "$shift" --limit "$limit" -o "$dir/bench-$shift"
  done
}
mkdir -p "$out"
run s2-f16c8 dgae-s2 16 8
run s-f16c8 dgae-s 16 8
run s2-f8c4 dgae-s2 8 4
more=${MORE:-0}
if [ "$more" -gt 0 ]; then
  for spec in "s2-f16c8 16 8" "s2-f8c4 8 4"; do
    set -- $spec
    dir="$out/$1-more"
    if [ ! -f "$dir/model.safetensors" ] || [ "$(python -c "import json,sys; print(json.loads(open('$dir/log.jsonl').readlines()[-1]).get('step'))" 2>/dev/null)" != "$more" ]; then
      start=(--warm-start "$out/$1/model.safetensors")
      [ -f "$dir/checkpoint.safetensors" ] && start=(--resume)
      dgaetok train "${common[@]}" --steps "$more" --lr 1e-4 --warmup $((more / 20)) --sample-every "$more" \
        --preset dgae-s2 -f "$2" -c "$3" --out "$dir" "${start[@]}"
    fi
    for shift in $shifts; do
      [ -f "$dir/bench-$shift/rfid.json" ] || dgaetok bench rfid ../shared/data/eval/imagenet-val500 \
        --model "$dir/model.safetensors" --steps 8 --shift "$shift" --limit "$limit" -o "$dir/bench-$shift"
    done
  done
fi
