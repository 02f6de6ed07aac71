"""What only a GPU can show: bf16 against float32, compiled against eager, training and torchrun with NCCL on CUDA,
exact repeats of a seeded decode, and the device data path against the CPU one.

Every test here carries the ``cuda`` marker and skips without CUDA. On the device machine,
`scripts/gpu_default.sh` runs ``pytest -m "cuda and not slow" tests/test_cuda.py`` before it spends the GPU on
training (90 s at most), and the slow ones (compilation) after it, as time allows.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from dgaetok.cli import app
from dgaetok.data import DeviceImages, DrawSampler, ImageFolder
from dgaetok.files import center_crop, open_image, to_tensor, to_uint8
from dgaetok.models import build_model, load_model

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
REPO = Path(__file__).resolve().parents[1]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (to_uint8(a).float() - to_uint8(b).float()).pow(2).mean().item()
    return 10 * np.log10(255**2 / max(mse, 1e-10))


@pytest.fixture(scope="module")
def photos_256(shared_data) -> torch.Tensor:
    paths = sorted((shared_data / "eval" / "imagenet-val500").glob("*.JPEG"))[:4]
    return torch.stack([to_tensor(center_crop(open_image(p), 256, 1)[0]) for p in paths])


def test_bf16_encode_and_decode_stay_close_to_float32(photos_256):
    """The bundled model on real photos: CUDA runs it in bf16 autocast, the CPU in float32. Stated tolerance: the
    latents within 0.05 of the latent's std (relative RMS) and the 8-step decodes (same noise) above 30 dB PSNR
    of each other."""
    cpu, gpu = load_model(), load_model(device="cuda")
    z_cpu = cpu.encode(photos_256).latent_dist.mode()
    z_gpu = gpu.encode(photos_256.cuda()).latent_dist.mode().cpu()
    assert (z_gpu - z_cpu).pow(2).mean().sqrt() < 0.05 * z_cpu.std()
    noise = torch.randn(photos_256.shape, generator=torch.Generator().manual_seed(0))
    x_cpu = cpu.decode(z_cpu, steps=8, noise=noise)
    x_gpu = gpu.decode(z_cpu.cuda(), steps=8, noise=noise).cpu()
    assert psnr(x_gpu, x_cpu) > 30.0


def test_a_seeded_decode_repeats_exactly(photos_256):
    model = load_model(device="cuda")
    z = model.encode(photos_256.cuda()).latent_dist.mode()
    runs = [model.decode(z, steps=4, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_device_images_on_the_gpu_make_the_folders_batches(train_photos):
    data = ImageFolder(train_photos, 48, crop=32, seed=3)
    draws = DrawSampler(4, start_step=3, accum=2).draws(3)
    got = DeviceImages(data, "cuda", workers=2).batch(draws)
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), torch.stack([data[d] for d in draws]))


def test_train_on_cuda_for_three_steps(tmp_path, train_photos):
    """Plain, and with the data on the device in two micro-batches: a finite loss logged at each of the 3 steps,
    saved EMA weights that are finite and have moved from the initial ones, a checkpoint at step 3, and a sample
    grid that is a picture rather than a flat fill."""
    out = tmp_path / "run"
    args = ["train", str(train_photos), "--out", str(out), "--preset", "dgae-t", "--resolution", "32", "-f", "8",
            "-c", "4", "--batch-size", "4", "--steps", "3", "--lpips-weight", "0", "--log-every", "1",
            "--sample-every", "3", "--sample-steps", "2", "--workers", "0", "--device", "cuda", "--seed", "0"]
    for extra in ([], ["--data-on-device", "--accum", "2"]):
        shutil.rmtree(out, ignore_errors=True)
        result = CliRunner().invoke(app, args + extra)
        assert result.exit_code == 0, result.output
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in log), log
        saved = load_model(out / "model.safetensors")
        torch.manual_seed(0)  # train's initial weights: --seed 0, built on the CPU before moving to the GPU
        init = build_model(saved.config)
        assert all(torch.isfinite(p).all() for p in saved.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(saved.state_dict().values(), init.state_dict().values()))
        with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as fh:
            assert fh.metadata()["step"] == "3"
        assert np.asarray(Image.open(out / "samples" / "step-0000003.png")).std() > 1


def test_torchrun_with_nccl_at_world_size_one(tmp_path, train_photos):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m",
           "dgaetok.cli", "train", str(train_photos), "--out", str(out), "--preset", "dgae-t", "--resolution",
           "32", "-f", "8", "-c", "4", "--batch-size", "4", "--steps", "2", "--lpips-weight", "0", "--log-every",
           "1", "--sample-every", "100", "--workers", "0", "--device", "cuda"]
    probe = ("import torch.distributed as d, dgaetok.train as t; r, w, dev = t.distributed_setup('cuda'); "
             "print(d.get_backend(), w, dev)")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    backend = subprocess.run([*launch, "--no-python", sys.executable, "-c", probe], env=env, capture_output=True,
                             text=True, timeout=120)
    assert backend.returncode == 0 and "nccl 1 cuda:0" in backend.stdout, backend.stderr[-2000:]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "checkpoint.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_decode_matches_eager_on_cuda(photos_256, mode):
    """The bundled (trained) model, so that the decoder's output is not the noise it started from."""
    x = photos_256[:2, :, :64, :64].cuda()
    noise = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    eager, compiled = load_model(device="cuda"), load_model(device="cuda", compile=mode)
    z = eager.encode(x).latent_dist.mode()
    torch.testing.assert_close(compiled.encode(x).latent_dist.mode(), z, atol=2e-2, rtol=2e-2)
    for sampler in ("euler", "heun"):
        out = [m.decode(z, steps=3, sampler=sampler, noise=noise) for m in (eager, compiled)]
        torch.testing.assert_close(out[1], out[0], atol=2e-2, rtol=2e-2)
