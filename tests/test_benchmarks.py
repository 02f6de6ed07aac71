"""The benchmarks on tiny sizes: throughput.py (its FLOP counts are the model's real ones) and the GPU script's
CPU rehearsal, the data-overhead benchmark, the Table 2 driver."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dgaetok.models import MODELS, build_model

ROOT = Path(__file__).resolve().parents[1]


def read_jsonl(path: Path) -> tuple[dict, list[dict], list[dict]]:
    """(header, rows, profiles) of a throughput.py output."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["kind"] == "header"
    return (lines[0], [r for r in lines if r["kind"] == "row"], [r for r in lines if r["kind"] == "profile"])


def test_the_gpu_script_rehearses_on_cpu_with_real_flop_counts(tmp_path):
    """scripts/throughput_gpu.sh with REHEARSE=1: the device call's sequence of rows on dgae-t at 32 px, with the
    profiles; the compiled rows are skipped by their guard (compiling takes minutes on a CPU), and say so."""
    out = tmp_path / "out"
    env = {**os.environ, "REHEARSE": "1", "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "throughput_gpu.sh")], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    header, rows, profiles = read_jsonl(out / "throughput.jsonl")
    assert header["device"].startswith("CPU") and header["matmul_peak_tflop_per_s"] > 0
    assert [(r["what"], r["compile"], r.get("steps")) for r in rows] == [
        ("unet", None, None), ("train step", None, None), ("train step (checkpointed)", None, None),
        ("encode", None, None), ("decode", None, 1), ("decode", None, 4), ("sdvae decode (peer)", None, 1),
        ("unet", "default", None), ("unet", "reduce-overhead", None), ("train", "default", None)]
    measured = rows[:7]
    assert all(r["img_per_s"] > 0 and r["mfu"] > 0 and r["peak_mem_gib"] is None for r in measured)
    assert [r["batch"] for r in measured] == [2, 4, 4, 2, 2, 2, 2]
    assert all(r["error"] == "OutOfTime: skipped: --compile-guard" for r in rows[7:])
    assert [p["what"] for p in profiles] == ["unet", "train step", "train step (checkpointed)"]
    assert all(0 < p["top"][0]["share"] <= 1 and p["top"][0]["name"] for p in profiles)
    assert {"profile-unet.txt", "profile-train.txt", "profile-train-ckpt.txt", "throughput.log"} <= {
        p.name for p in out.iterdir()}
    # last, the sample photos as a latent dataset under torchrun (one process), timed
    (shards,) = [json.loads(line) for line in (out / "throughput.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "shards"]
    assert shards["status"] == "ok" and shards["images"] == 7 and shards["img_per_s"] > 0
    assert len(list((out / "shards").glob("shard-*.safetensors"))) == 4

    unet, train, train_ckpt, _, decode1, decode4, _ = measured
    # the 4-step figure is extrapolated from 1 and 2 steps: it must equal a direct count
    model = build_model(MODELS["dgae-t"](resolution=32)).eval()
    with FlopCounterMode(display=False) as counter:
        model.decode(torch.randn(1, 4, 4, 4), steps=4, noise=torch.randn(1, 3, 32, 32))
    assert decode4["gflop_per_img"] * 1e9 == counter.get_total_flops()
    # a U-Net step is a decode step without the latent's conditioning
    assert 0 < decode4["gflop_per_img"] - 4 * unet["gflop_per_img"] < 0.01 * decode4["gflop_per_img"]
    # checkpointing is credited with the model's FLOPs, not the recomputation
    assert train["gflop_per_img"] == train_ckpt["gflop_per_img"] > 2 * decode1["gflop_per_img"]
    assert train_ckpt["grad_checkpoint"] and not train["grad_checkpoint"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_throughput_on_cuda_fits_batches_and_reports_peak_memory(tmp_path):
    out = tmp_path / "throughput.jsonl"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--device", "cuda", "--preset", "dgae-t",
           "--resolution", "64", "--batch", "4", "--unet-batch", "4", "--train-batch", "4", "--steps", "2",
           "--min-time", "0", "--rows", "unet", "train", "decode", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    header, rows, _ = read_jsonl(out)
    assert header["matmul_dtype"] == "bfloat16" and header["compute"].startswith("precision bf16")
    assert [r["what"] for r in rows] == ["unet", "train step", "decode"]
    assert all(r["batch"] == 4 and 0 < r["peak_mem_gib"] < 80 and 0 < r["mfu"] < 1 for r in rows)


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


def test_the_precision_benchmark_times_both_precisions_back_to_back(tmp_path, tiny_model_file):
    """benchmarks/precision.py on a tiny model: the hardware ceiling rows first, then every row in fp32 and bf16,
    the training rows in `training_layout` (a broken row is an error line, which this test refuses)."""
    out = tmp_path / "precision.jsonl"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "precision.py"), "--model", str(tiny_model_file), "--preset",
           "--rows", "decode", "train", "--steps", "1", "--min-time", "0", "--train-batch", "2", "--train-crop",
           "32", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    header, rows, _ = read_jsonl(out)
    assert header["device"].startswith("CPU") and header["auto"].startswith("precision ")
    assert not [r for r in rows if "error" in r]
    assert [(r["preset"], r["what"], r["precision"]) for r in rows] == [
        ("(hardware)", "matmul 2048x2048", "fp32"), ("(hardware)", "conv 3x3, 128 ch, 128x128", "fp32"),
        ("(hardware)", "matmul 2048x2048", "bf16"), ("(hardware)", "conv 3x3, 128 ch, 128x128", "bf16"),
        ("dgae-t", "decode", "fp32"), ("dgae-t", "decode", "bf16"),
        ("dgae-t", "train step", "fp32"), ("dgae-t", "train step", "bf16")]
    assert all(r["seconds_per_call"] > 0 for r in rows)
    assert "bf16 speed-up" in done.stdout
