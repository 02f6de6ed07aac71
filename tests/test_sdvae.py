"""The SD-VAE baseline: shared encoder, LDM decoder size, the GAN loss and its schedule, training and the CLI."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from typer.testing import CliRunner

from dgaetok.cli import app
from dgaetok.errors import InputError
from dgaetok.losses import NLayerDiscriminator, SDVAELoss, adaptive_weight
from dgaetok.models import DGAE, DGAE_T, MODELS, SDVAE, SDVAE_T, build_model, load_model, save_model
from dgaetok.train import CollapseWatch, Diverged, TrainConfig, train
from dgaetok.vae import Encoder

from test_train import read_log, read_tensors, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def sdvae_config(data: Path, out: Path, **kw) -> TrainConfig:
    """sdvae-t at 32 px with a narrow discriminator (ndf 8), the GAN on from step 2."""
    return tiny_config(data, out, **{"preset": "sdvae-t", "disc_start": 2, "disc_channels": 8, **kw})


def initial_discriminator(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The discriminator `train` starts from: built right after the seeded model."""
    torch.manual_seed(cfg.seed)
    build_model(cfg.model_config())
    return NLayerDiscriminator(ndf=cfg.disc_channels, n_layers=cfg.disc_layers).state_dict()


# --- model ----------------------------------------------------------------------------------------------------


def test_dgae_and_sdvae_share_one_encoder():
    dgae, sdvae = DGAE(DGAE_T()), SDVAE(SDVAE_T())
    assert type(dgae.encoder) is type(sdvae.encoder) is Encoder
    sdvae.encoder.load_state_dict(dgae.encoder.state_dict())
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    a, b = dgae.encode(x).latent_dist, sdvae.encode(x).latent_dist
    assert torch.equal(a.mean, b.mean) and torch.equal(a.logvar, b.logvar)


def test_sdvae_f8c4_decoder_has_ldm_size():
    with torch.device("meta"):
        counts = build_model(MODELS["sdvae-f8c4"]()).num_params()
    # LDM's AutoencoderKL f8 c4 (SD's VAE): decoder incl. post_quant_conv 49.49M, 83.65M in all
    assert counts["decoder"] == pytest.approx(49.49e6, rel=0.02)
    assert counts["total"] == pytest.approx(83.65e6, rel=0.02)


def test_presets_fix_their_latent_and_family():
    assert MODELS["sdvae-f16c8"]().latent_shape == (8, 16, 16)
    assert MODELS["sdvae-f32c64"]().arch == "sdvae" and MODELS["sdvae-f32c64"]().downsample == 32
    with pytest.raises(InputError, match="downsample"):
        TrainConfig(preset="sdvae-f8c4", downsample=16).model_config()
    with pytest.raises(InputError, match="not dgae"):
        TrainConfig(arch="dgae", preset="sdvae-t").model_config()
    assert TrainConfig(arch="sdvae").model_config().preset == "sdvae-s"
    assert TrainConfig().model_config().preset == "dgae-s"


def test_decode_is_one_step_and_ignores_diffusion_arguments():
    model = SDVAE(SDVAE_T()).eval()
    z = model.encode(torch.rand(2, 3, 64, 64) * 2 - 1).latent_dist.mode()
    a = model.decode(z)
    b = model.decode(z, steps=7, sampler="heun", shift=3.0, noise=torch.randn(2, 3, 64, 64),
                     generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 3, 64, 64) and torch.equal(a, b) and a.abs().max() <= 1


# --- loss -----------------------------------------------------------------------------------------------------


def test_adaptive_weight_matches_a_hand_computation():
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    disc = nn.Linear(3, 1)
    x, target = torch.randn(4, 5), torch.randn(4, 3)

    def losses():
        out = decoder(x)
        return (out - target).abs().mean(), -disc(out).mean()

    nll, g_loss = losses()
    got = adaptive_weight(nll, g_loss, decoder[2].weight, disc_weight=0.5)

    nll, g_loss = losses()
    nll.backward(retain_graph=True)  # both losses share the decoder's graph
    nll_grad = decoder[2].weight.grad.clone()
    decoder.zero_grad()
    g_loss.backward()
    g_grad = decoder[2].weight.grad.clone()
    expected = 0.5 * min(max(nll_grad.norm().item() / (g_grad.norm().item() + 1e-4), 0.0), 1e4)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert not got.requires_grad

    # a generator loss with (almost) no gradient at the last layer gives the clamped maximum
    nll, _ = losses()
    assert adaptive_weight(1e3 * nll, 0.0 * nll, decoder[2].weight).item() == pytest.approx(0.5 * 1e4)


def test_gan_term_only_from_disc_start():
    torch.manual_seed(0)
    model = SDVAE(SDVAE_T(resolution=32))
    disc = NLayerDiscriminator(ndf=8)
    loss_fn = SDVAELoss(None, disc, lpips_weight=0.0, kl_weight=1e-6, disc_start=5)
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    calls = []
    handle = disc.register_forward_hook(lambda *args: calls.append(1))
    loss, logs = loss_fn(model, x, torch.Generator().manual_seed(0), step=4)
    assert calls == [] and "g_loss" not in logs  # before disc_start the discriminator is not even run
    pixels = 3 * 32 * 32  # the KL per image is weighed against per-pixel means as LDM weighs it against sums
    assert loss.item() == pytest.approx((logs["rec"] + 1e-6 * logs["kl"] / pixels).item())

    loss, logs = loss_fn(model, x, torch.Generator().manual_seed(0), step=5)
    handle.remove()
    assert calls == [1]
    expected = logs["rec"] + 1e-6 * logs["kl"] / pixels + logs["d_weight"] * logs["g_loss"]
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert all(p.grad is None for p in disc.parameters())  # the generator step leaves D's gradients alone
    assert model.decoder.conv_out.weight.grad is not None


def test_kl_weighed_as_ldm():
    """beta means what it means in LDM's LPIPSWithDiscriminator: there the L1 is summed over each image's pixels and
    the KL over its latent dims; ours is LDM's loss divided by the pixel count, the same balance at any beta."""
    torch.manual_seed(0)
    model = SDVAE(SDVAE_T(resolution=32))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    beta = 1e-3  # large, so that a wrong balance would show
    loss_fn = SDVAELoss(None, NLayerDiscriminator(ndf=8), lpips_weight=0.0, kl_weight=beta, disc_start=10)
    loss, _ = loss_fn(model, x, torch.Generator().manual_seed(0), step=0)
    recon, posterior = model(x, torch.Generator().manual_seed(0))
    # LDM: nll_loss = sum(|x - rec|) / B; kl_loss = sum(kl) / B; loss = nll_loss + kl_weight * kl_loss
    ldm = (x - recon).abs().sum() / len(x) + beta * posterior.kl().sum() / len(x)
    assert loss.item() * x[0].numel() == pytest.approx(ldm.item(), rel=1e-5)


def test_collapse_watch():
    watch = CollapseWatch(windows=2, gap=10.0, eps=0.05)
    healthy = {"step": 1, "d_loss": 0.9, "logits_real": 0.3, "logits_fake": -0.2}
    assert watch.update({"step": 1, "loss": 1.0}) is None  # GAN not on yet
    assert watch.update(healthy) is None and watch.streak == 0
    assert watch.update({**healthy, "d_loss": 0.0}) is None and watch.streak == 0  # D wins: not a collapse
    assert watch.update({**healthy, "d_loss": 1.97}) is None and watch.streak == 1  # D fooled outright
    assert watch.update(healthy) is None and watch.streak == 0
    assert watch.update({**healthy, "logits_real": 12.0}) is None
    assert "collapsed" in watch.update({**healthy, "step": 9, "d_loss": 2.0})


# --- training -------------------------------------------------------------------------------------------------


def test_discriminator_trains_only_from_disc_start(tmp_path, train_photos):
    cfg = sdvae_config(train_photos, tmp_path / "run", steps=2, disc_start=2)
    train(cfg)
    log = read_log(tmp_path / "run")
    assert all("g_loss" not in r and "d_loss" not in r for r in log)
    _, tensors = read_tensors(tmp_path / "run" / "checkpoint.safetensors")
    init = initial_discriminator(cfg)
    assert all(torch.equal(tensors[f"disc.{k}"], v) for k, v in init.items())

    train(dataclasses.replace(cfg, steps=3, resume=True))
    log = read_log(tmp_path / "run")
    assert log.pop(2) == {"event": "resumed", "step": 2}
    assert [r["step"] for r in log] == [1, 2, 3] and all(k in log[-1] for k in ("g_loss", "d_loss", "d_weight"))
    _, tensors = read_tensors(tmp_path / "run" / "checkpoint.safetensors")
    assert not torch.equal(tensors["disc.main.0.weight"], init["main.0.weight"])


@pytest.mark.slow
def test_overfitting_a_few_photos_lowers_the_loss(tmp_path, train_photos):
    out = tmp_path / "run"
    # float32: in bf16 the same 40 steps reach 0.72x, not 0.7x (the precision benchmark compares the two)
    cfg = dataclasses.replace(sdvae_config(train_photos, out, steps=40, lr=2e-3, warmup=5, disc_start=30),
                              precision="fp32")
    train(cfg)
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 41))
    assert all(np.isfinite(r["loss"]) for r in log)
    first = sum(r["rec"] for r in log[:5]) / 5
    last = sum(r["rec"] for r in log[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert "d_loss" in log[-1]


def test_collapse_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, train_photos):
    # a negative gap threshold calls every window collapsed: 2 in a row after the GAN starts at step 2
    cfg = sdvae_config(train_photos, tmp_path / "run", steps=6, ckpt_every=1, collapse_windows=2,
                       collapse_gap=-1e9)
    with pytest.raises(Diverged, match="collapsed"):
        train(cfg)
    log = read_log(tmp_path / "run")
    assert log[-1]["event"] == "diverged" and "collapsed" in log[-1]["message"] and log[-1]["step"] == 4
    meta, _ = read_tensors(tmp_path / "run" / "checkpoint.safetensors")
    assert meta["step"] == "2"  # the checkpoints of the collapsed windows were held back


# --- CLI ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdvae_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sdvae") / "sdvae-t.safetensors"
    save_model(SDVAE(SDVAE_T()), path)
    return path


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_cli_encode_decode_info_on_an_sdvae_file(sdvae_file, photos, tmp_path):
    assert load_model(sdvae_file).config.arch == "sdvae"
    model = ["--model", sdvae_file, "--device", "cpu"]
    invoke("encode", photos, "-o", tmp_path / "z", *model)
    latents = sorted((tmp_path / "z").rglob("*.safetensors"))
    assert len(latents) == 5
    one = invoke("decode", tmp_path / "z", "-o", tmp_path / "x1", "--steps", 1, *model)
    assert "ignored" in one.stderr
    invoke("decode", tmp_path / "z", "-o", tmp_path / "x9", "--steps", 9, "--sampler", "heun", *model)
    for a in sorted((tmp_path / "x1").rglob("*.png")):
        b = tmp_path / "x9" / a.relative_to(tmp_path / "x1")
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
        assert Image.open(a).size == (64, 64)

    info = invoke("info", sdvae_file).stdout
    assert "sdvae" in info and "family" in info and "decoder" in info
    assert "model_hash" in invoke("info", latents[0]).stdout


def test_cli_bench_rfid_on_an_sdvae_file(sdvae_file, shared_data, tmp_path):
    out = tmp_path / "bench"
    result = invoke("bench", "rfid", shared_data / "eval" / "imagenet-val500", "--model", sdvae_file,
                    "--steps", 1, "--steps", 2, "--limit", 3, "--resolution", 64, "--device", "cpu", "-o", out)
    assert "ignored" in result.stderr
    report = json.loads((out / "rfid.json").read_text())
    assert report["images"] == 3 and report["latent_shape"] == [4, 8, 8]
    (only,) = report["results"]  # one pass, whatever --steps asked
    assert only["steps"] == 1 and only["psnr"] > 0
