#!/usr/bin/env bash
# The default's architecture, chosen by cheap CPU comparisons at equal steps (resumable).
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
finished() {  # dir steps: its model is exported and its log ends at that step
  [ -f "$1/model.safetensors" ] && [ "$(python -c "import json; print(json.loads(open('$1/log.jsonl').readlines()[-1]).get('step'))" 2>/dev/null)" = "$2" ]
}
run() {  # name preset f c steps lr warmup [model to warm-start from]
  local dir="$out/$1" start=()
  if ! finished "$dir" "$5"; then
    if [ -f "$dir/checkpoint.safetensors" ]; then start=(--resume); elif [ -n "${8:-}" ]; then start=(--warm-start "$8"); fi
    dgaetok train "${common[@]}" --steps "$5" --lr "$6" --warmup "$7" --sample-every "$5" \
      --preset "$2" -f "$3" -c "$4" --out "$dir" "${start[@]}"
  fi
  for shift in $shifts; do
    [ -f "$dir/bench-$shift/rfid.json" ] || dgaetok bench rfid ../shared/data/eval/imagenet-val500 \
      --model "$dir/model.safetensors" --steps 8 --shift "$shift" --limit "$limit" -o "$dir/bench-$shift"
  done
}
mkdir -p "$out"
run s2-f16c8 dgae-s2 16 8 "$steps" 2e-4 $((steps / 10))
run s-f16c8 dgae-s 16 8 "$steps" 2e-4 $((steps / 10))
run s2-f8c4 dgae-s2 8 4 "$steps" 2e-4 $((steps / 10))
more=${MORE:-0}
if [ "$more" -gt 0 ]; then
  run s2-f16c8-more dgae-s2 16 8 "$more" 1e-4 $((more / 20)) "$out/s2-f16c8/model.safetensors"
  run s2-f8c4-more dgae-s2 8 4 "$more" 1e-4 $((more / 20)) "$out/s2-f8c4/model.safetensors"
fi
