"""The precision policy: what auto picks and why, bf16 really used where asked, and every promise kept in bf16."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import conv_output_dtypes
from dgaetok import precision
from dgaetok.cli import app
from dgaetok.files import read_latent
from dgaetok.models import DGAE, load_model
from dgaetok.precision import resolve
from dgaetok.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def test_auto_follows_the_hardware_and_says_why(monkeypatch):
    monkeypatch.delenv(precision.ENV, raising=False)
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: "AMX")
    chosen = resolve("auto", "cpu")
    assert (chosen.name, chosen.reason) == ("bf16", "auto: this CPU has native bf16 matrix units (AMX)")
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: None)
    assert resolve("auto", "cpu").name == "fp32" and "no native bf16" in resolve("auto", "cpu").reason
    forced = resolve("bf16", "cpu")  # asked for without the hardware: runs, and says it is slower
    assert forced.name == "bf16" and "slower" in forced.reason
    assert resolve("fp32", "cpu").name == "fp32"
    with pytest.raises(ValueError, match="fp16"):
        resolve("fp16", "cpu")


def test_the_environment_decides_what_auto_means_here_and_in_child_processes(monkeypatch, tiny_model_file):
    """$DGAETOK_PRECISION overrides auto (and only auto), says so, reaches a CLI process, and a bad value is refused
    in one line."""
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: "AMX")
    monkeypatch.setenv(precision.ENV, "fp32")
    assert resolve("auto", "cpu") == precision.Precision("fp32", "auto: DGAETOK_PRECISION=fp32")
    assert resolve("bf16", "cpu").name == "bf16"  # an explicit choice wins
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: None)
    monkeypatch.setenv(precision.ENV, "bf16")
    assert resolve("auto", "cpu").name == "bf16" and "DGAETOK_PRECISION=bf16" in resolve("auto", "cpu").reason
    monkeypatch.setenv(precision.ENV, "fp32")
    code = ("from dgaetok.models import load_model; import sys; m = load_model(sys.argv[1]); "
            "from dgaetok.precision import resolve; print(resolve(m.precision, 'cpu').note())")
    child = subprocess.run([sys.executable, "-c", code, str(tiny_model_file)], capture_output=True, text=True)
    assert child.stdout.strip() == "precision fp32 (auto: DGAETOK_PRECISION=fp32)", child.stderr[-2000:]
    monkeypatch.setenv(precision.ENV, "fp16")
    bad = runner.invoke(app, ["encode", str(tiny_model_file), "-o", "x", "-m", str(tiny_model_file)])
    assert bad.exit_code == 2 and "DGAETOK_PRECISION='fp16'" in bad.output and "Traceback" not in bad.output
    assert len(bad.output.strip().splitlines()) == 1


def images(n: int = 3, size: int = 64) -> torch.Tensor:
    return torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_networks_compute_in_the_precision_asked_and_latents_stay_float32(tiny_model_file, name, dtype):
    model = load_model(tiny_model_file, precision=name)
    encoder, unet = conv_output_dtypes(model.encoder), conv_output_dtypes(model.decoder)
    posterior = model.encode(images()).latent_dist
    out = model.decode(posterior.mean, steps=2, generator=torch.Generator().manual_seed(0))
    assert encoder == {dtype} and unet == {dtype}
    assert posterior.mean.dtype == posterior.std.dtype == out.dtype == torch.float32


@torch.no_grad()
def unzeroed(model):
    """ADM zero-initialises the U-Net's output layers, so an untrained decoder returns its noise whatever the
    precision: random values there make its output depend on every layer."""
    torch.manual_seed(3)
    for p in model.parameters():
        if not p.any():
            p.normal_(std=0.1)
    return model


def test_bf16_decode_is_seeded_independent_of_the_batch_and_close_to_fp32(tiny_model_file):
    bf16, fp32 = (unzeroed(load_model(tiny_model_file, precision=p)) for p in ("bf16", "fp32"))
    z = bf16.encode(images()).latent_dist.mean
    noise = torch.randn((3, 3, 64, 64), generator=torch.Generator().manual_seed(1))
    together = bf16.decode(z, steps=3, noise=noise)
    alone = torch.cat([bf16.decode(z[i:i + 1], steps=3, noise=noise[i:i + 1]) for i in range(3)])
    assert torch.equal(together, alone)  # one image per network call on the CPU, in bf16 too
    assert torch.equal(together, bf16.decode(z, steps=3, noise=noise))
    reference = fp32.decode(z, steps=3, noise=noise)
    mse = (together - reference).square().mean()
    assert mse > 0  # bf16 did change the arithmetic...
    assert 10 * torch.log10(4 / mse) > 35  # ...by far less than anything a reconstruction metric sees


def test_tiled_decode_in_bf16_matches_whole(tiny_model_file):
    model = load_model(tiny_model_file, precision="bf16")
    z = model.encode(images(1, 128)).latent_dist.mean
    noise = torch.randn((1, 3, 128, 128), generator=torch.Generator().manual_seed(2))
    unet = conv_output_dtypes(model.decoder)
    whole = model.decode(z, steps=2, noise=noise)
    tiled = model.decode(z, steps=2, noise=noise, tile=64, overlap=32)
    assert unet == {torch.bfloat16}
    assert 10 * torch.log10(4 / (whole - tiled).square().mean()) > 30


def test_cli_says_which_precision_and_refuses_an_unknown_one(tiny_model_file, tmp_path):
    lat = tmp_path / "lat"
    src = tmp_path / "img.png"
    from PIL import Image
    Image.new("RGB", (64, 64), (120, 30, 200)).save(src)
    result = runner.invoke(app, ["encode", str(src), "-o", str(lat), "-m", str(tiny_model_file),
                                 "--precision", "bf16"])
    assert result.exit_code == 0, result.output
    assert "note: precision bf16 (asked for" in result.output
    latent, _ = read_latent(next(lat.glob("*.safetensors")))
    assert latent.dtype == torch.float32
    bad = runner.invoke(app, ["decode", str(lat), "-o", str(tmp_path / "out"), "-m", str(tiny_model_file),
                              "--precision", "fp16"])
    assert bad.exit_code == 2 and "--precision fp16" in bad.output and "Traceback" not in bad.output
    assert len(bad.output.strip().splitlines()) == 1


def layout(x: torch.Tensor) -> str:
    return "nchw" if x.is_contiguous() else \
        "channels_last" if x.is_contiguous(memory_format=torch.channels_last) else "other"


@pytest.mark.parametrize("name, computed", [("bf16", (torch.bfloat16, "nchw")),
                                            ("fp32", (torch.float32, "channels_last"))])
def test_training_keeps_float32_weights_optimizer_and_ema_in_its_precision_and_layout(train_photos, tmp_path,
                                                                                     name, computed):
    """bf16 on the CPU trains in NCHW (`precision.training_layout`: there its GroupNorm backward is the fast one),
    float32 in channels_last; either way the weights, Adam states and EMA stay float32."""
    seen: set[tuple[torch.dtype, str]] = set()
    cfg = TrainConfig(data=str(train_photos), out=str(tmp_path / "run"), preset="dgae-t", resolution=64,
                      downsample=8, latent_channels=4, batch_size=2, steps=2, warmup=1, lpips_weight=0.0,
                      workers=0, log_every=1, ckpt_every=2, sample_every=100, stats_images=0, precision=name,
                      device="cpu")  # the CPU's layout rule; a GPU trains channels_last in both
    original = DGAE.forward

    def spying_forward(self, *args, **kwargs):  # the training forward pass: its 3x3 convolutions' outputs (the
        # 1x1s after attention see its own layout)
        handles = [m.register_forward_hook(lambda m, a, out: seen.add((out.dtype, layout(out))))
                   for m in self.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
        try:
            return original(self, *args, **kwargs)
        finally:
            for h in handles:
                h.remove()

    DGAE.forward = spying_forward
    try:
        ema = train(cfg)
    finally:
        DGAE.forward = original
    assert seen == {computed}
    assert all(p.dtype == torch.float32 for p in ema.parameters())
    state = torch.load(tmp_path / "run" / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    assert all(v["exp_avg"].dtype == torch.float32 for v in state.values())
