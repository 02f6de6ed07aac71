"""benchmarks/throughput.py on a tiny preset: it runs on CPU, and its FLOP counts are the model's real ones."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
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


def test_table2_driver_trains_pauses_resumes_and_tabulates(tmp_path, shared_data):
    """The Table 2 driver end to end at its test scale: one latent size, both families. A session budget of zero
    stops it after one step with a checkpoint (status 3); the rerun finishes, scores and tabulates; a third run
    retrains and rescores nothing."""
    out = tmp_path / "table2"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "table2.py"), "--scale", "tiny", "--out", str(out),
           "--channels", "8", "--limit", "3", "--grid-rows", "2", "--data", str(shared_data / "train" / "bsds500"),
           "--eval-data", str(shared_data / "eval" / "imagenet-val500")]
    env = {"OMP_NUM_THREADS": "1", "PATH": ""}
    paused = subprocess.run(cmd + ["--session-minutes", "0"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert paused.returncode == 3, paused.stderr
    assert "train: c8-sdvae: paused at step 1 of" in paused.stdout

    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    plan = json.loads((out / "plan.json").read_text())
    result = json.loads((out / "table2.json").read_text())
    rows = {r["family"]: r for r in result["rows"]}
    assert set(rows) == {"sdvae", "dgae"}
    for family, row in rows.items():
        assert row["train_steps"] == plan["calibration"][family]["steps"] > 1
        assert row["latent"] == 8 * 4 * 4 and row["images"] == 3
        assert row["encoder_params"] == rows["dgae"]["encoder_params"]  # one encoder for both families
        assert 0 < row["psnr"] < 60 and 0 <= row["lpips"]
    assert (rows["sdvae"]["steps"], rows["dgae"]["steps"]) == (1, 2)
    assert "| 128 (4x4x8) | SD-VAE (sdvae-t)" in (out / "table2.md").read_text()
    from PIL import Image
    assert Image.open(out / "table2-grid.png").size == (3 * 66 + 2, 2 * 66 + 2)  # original | SD-VAE | DGAE, 2 rows
    assert Image.open(out / "table2.png").size == (840, 360)  # PSNR and LPIPS against latent size

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} | {p: p.stat().st_mtime_ns
                                                                              for p in out.rglob("rfid.json")}
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert again.returncode == 0, again.stderr
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}


def test_data_overhead_benchmark_runs_small(tmp_path):
    out = tmp_path / "data.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "data_overhead.py"), "--files", "5000", "--draws", "2000",
           "--resolution", "64", "--tree", "3", "4", "--out", str(out)]
    env = {"OMP_NUM_THREADS": "1", "PATH": "", "TMPDIR": str(tmp_path)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["sampling"]["files"] == 5000 and result["sampling"]["sampling_us_per_image"] > 0
    assert result["listing"]["files"] == 12 and result["listing"]["find_files_s"] > 0
    assert not list(tmp_path.glob("dgaetok-tree-*"))  # the tree is deleted


def test_the_time_guard_interrupts_work_in_python():
    """What stops a compile that runs past --compile-guard: compiling spends its time in Python."""
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks" / "throughput.py")
    throughput = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(throughput)
    with pytest.raises(throughput.OutOfTime, match="stopped after 0 s: a test"):
        with throughput.time_limit(0.2, "a test"):
            while True:
                pass
    with pytest.raises(throughput.OutOfTime, match="skipped: none left"):
        with throughput.time_limit(0, "none left"):
            pass
    with throughput.time_limit(None, "no limit"):
        pass
