"""benchmarks/throughput.py on a tiny preset: it runs on CPU, and its FLOP counts are the model's real ones."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dgaetok.models import MODELS, build_model

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_runs_on_cpu_and_counts_decode_flops(tmp_path):
    out = tmp_path / "throughput.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--device", "cpu", "--preset", "dgae-t",
           "--resolution", "32", "-f", "8", "-c", "4", "--batch", "2", "--train-batch", "2", "--steps", "1", "3",
           "--min-time", "0", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": ""}, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["device"].startswith("CPU") and result["matmul_peak_tflop_per_s"] > 0
    rows = {(r["what"], r["steps"]): r for r in result["rows"]}
    assert set(rows) == {("encode", None), ("decode", 1), ("decode", 3), ("train step", None),
                         ("sdvae decode (peer)", 1)}
    assert all(r["img_per_s"] > 0 and 0 < r["mfu"] for r in result["rows"])

    # the 3-step figure is extrapolated from 1 and 2 steps: it must equal a direct count
    model = build_model(MODELS["dgae-t"](resolution=32)).eval()
    with FlopCounterMode(display=False) as counter:
        model.decode(torch.randn(1, 4, 4, 4), steps=3, noise=torch.randn(1, 3, 32, 32))
    assert rows[("decode", 3)]["gflop_per_img"] * 1e9 == counter.get_total_flops()
    assert rows[("train step", None)]["gflop_per_img"] > 2 * rows[("decode", 1)]["gflop_per_img"]
