#!/usr/bin/env bash
# Trains the bundled CPU stand-in default (dgae-s, f8 c4) on ../shared/data/train and exports it to weights/.
# Resumable: re-run the same command after an interruption. ~1 h on 2 CPU cores for 4000 steps at batch 8.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/default-s-f8c4}
resume=$([ -f "$out/checkpoint.safetensors" ] && echo --resume || true)
dgaetok train ../shared/data/train --out "$out" --preset dgae-s -f 8 -c 4 --crop 64 --batch-size 8 \
  --steps 4000 --lr 2e-4 --warmup 200 --lpips-weight 0 --ckpt-every 250 --sample-every 1000 --sample-steps 10 \
  --workers 2 --log-every 25 $resume
python - "$out/model.safetensors" weights/default.safetensors <<'PY'
import sys, torch
from safetensors import safe_open
from dgaetok.models import load_model, save_model
with safe_open(sys.argv[1], "pt") as fh:
    step = fh.metadata()["step"]
save_model(load_model(sys.argv[1]), sys.argv[2], dtype=torch.float16, source="scripts/train_default_cpu.sh",
           step=step, data="train (the 1765 photos of the training set)", weights="EMA 0.999")
PY
