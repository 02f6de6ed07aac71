"""DGAE models: preset sizes, encoder/decoder shapes, the posterior, the precomputed-condition trick, model files."""
from __future__ import annotations

import copy
import math
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dgaetok.errors import InputError
from dgaetok.models import (
    DGAE, DGAE_T, DGAEConfig, DGAE_models, file_sha256, join_model_files, load_model, read_model_file,
    resolve_model, save_model, split_model_file,
)
from dgaetok.unet import timestep_embedding
from dgaetok.vae import DiagonalGaussian, ch_mult_for


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize_zero_init(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give ADM's zero-initialised layers random weights, so an untrained decoder's output depends on its
    inputs (at init the velocity is exactly zero and decoding returns the noise)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def tiny(seed: int = 0, **kw) -> DGAE:
    torch.manual_seed(seed)
    return randomize_zero_init(DGAE(DGAE_T(**kw)), seed).eval()


def images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- presets --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, decoder_m, total_m", [("dgae-b", 122, 157), ("dgae-m", 276, 310), ("dgae-l", 491, 525)])
def test_preset_parameter_counts_match_the_paper(name, decoder_m, total_m):
    """Table 1 of the paper at its f8 c4 latent; built on the meta device, so no memory is allocated."""
    with torch.device("meta"):
        model = DGAE(DGAE_models[name](downsample=8, latent_channels=4))
    counts = model.num_params()
    assert counts["decoder"] == pytest.approx(decoder_m * 1e6, rel=0.02)
    assert counts["total"] == pytest.approx(total_m * 1e6, rel=0.02)
    assert counts["encoder"] + counts["decoder"] == counts["total"]
    assert model.config.preset == name


def test_presets_share_the_encoder_and_differ_in_decoder_width():
    with torch.device("meta"):
        b, l = (DGAE(DGAE_models[n](downsample=16, latent_channels=8)) for n in ("dgae-b", "dgae-l"))
    assert b.num_params()["encoder"] == l.num_params()["encoder"]
    assert b.num_params()["decoder"] < l.num_params()["decoder"]


def test_config_json_round_trip_and_validation():
    cfg = DGAE_T(downsample=16, resolution=64)
    again = DGAEConfig.from_json(cfg.to_json())
    assert again == cfg and hash(again) == hash(cfg)
    assert again.enc_ch_mult == ch_mult_for(16) == (1, 2, 4, 4, 4)
    assert again.latent_shape == (4, 4, 4)
    with pytest.raises(ValueError, match="does not downsample"):
        DGAEConfig(downsample=8, enc_ch_mult=(1, 2, 4))
    with pytest.raises(ValueError, match="power of two"):
        ch_mult_for(12)


# --- encoder / decoder shapes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("f", [8, 16, 32])
def test_encode_decode_shapes(f):
    model = tiny(downsample=f, resolution=64)
    x = images(2, 3, 64, 64)
    with torch.no_grad():
        posterior = model.encode(x).latent_dist
    z = posterior.mode()
    assert z.shape == (2, 4, 64 // f, 64 // f) and z.dtype == torch.float32
    assert posterior.std.shape == z.shape and torch.isfinite(z).all()
    out = model.decode(z, steps=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 64, 64)
    assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1


@pytest.mark.parametrize("f", [8, 16, 32])
def test_non_square_images(f):
    model = tiny(downsample=f, resolution=64)
    x = images(1, 3, 64, 96)
    with torch.no_grad():
        z = model.encode(x).latent_dist.mode()
    assert z.shape == (1, 4, 64 // f, 96 // f)
    assert model.decode(z, steps=1).shape == (1, 3, 64, 96)


def test_encoding_is_deterministic_and_batch_independent():
    model = tiny()
    x = images(3, 3, 64, 64)
    with torch.no_grad():
        both = model.encode(x).latent_dist.mode()
        single = model.encode(x[1:2]).latent_dist.mode()
    torch.testing.assert_close(both[1:2], single, rtol=1e-5, atol=1e-5)


def test_posterior_sample_versus_mode():
    model = tiny()
    with torch.no_grad():
        posterior = model.encode(images(2, 3, 64, 64)).latent_dist
    a = posterior.sample(torch.Generator().manual_seed(1))
    b = posterior.sample(torch.Generator().manual_seed(1))
    c = posterior.sample(torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, posterior.mode())
    eps = torch.randn(a.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, posterior.mean + posterior.std * eps)


def test_diagonal_gaussian_statistics_and_kl():
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 3, 4, 4, generator=gen)
    logvar = torch.randn(2, 3, 4, 4, generator=gen)
    q = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    assert torch.equal(q.mode(), mean)
    torch.testing.assert_close(q.std, torch.exp(0.5 * logvar))
    # the closed-form KL against N(0, I), summed per image
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, q.std), torch.distributions.Normal(0.0, 1.0)
    ).sum(dim=(1, 2, 3))
    assert q.kl().shape == (2,)
    torch.testing.assert_close(q.kl(), ref)
    # by hand: mean 2 and variance 4 cost 0.5 * (4 + 4 - 1 - ln 4) per dimension, summed over 1 x 2 x 2 of them
    known = DiagonalGaussian(torch.cat([torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), math.log(4))], 1))
    assert known.kl().item() == pytest.approx(4 * 0.5 * (4 + 4 - 1 - math.log(4)), rel=1e-6)
    # a standard normal posterior costs nothing
    assert torch.equal(DiagonalGaussian(torch.zeros(2, 6, 4, 4)).kl(), torch.zeros(2))
    # samples follow the posterior
    wide = DiagonalGaussian(torch.cat([torch.full((1, 1, 200, 200), 0.5), torch.full((1, 1, 200, 200), 2 * 0.6931)], 1))
    s = wide.sample(torch.Generator().manual_seed(0))
    assert s.mean().item() == pytest.approx(0.5, abs=0.03) and s.std().item() == pytest.approx(2.0, rel=0.03)


def test_posterior_clamps_extreme_log_variances():
    moments = torch.cat([torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2, 2), 1e4)], dim=1)
    q = DiagonalGaussian(moments)
    assert torch.isfinite(q.std).all() and torch.isfinite(q.kl()).all()
    assert q.logvar.max().item() == 20.0
    q = DiagonalGaussian(-moments)  # logvar -1e4 -> -30: a (numerically) deterministic posterior
    assert q.logvar.min().item() == -30.0 and torch.isfinite(q.kl()).all()
    torch.testing.assert_close(q.sample(torch.Generator().manual_seed(0)), q.mean, rtol=0, atol=1e-6)


# --- the precomputed condition --------------------------------------------------------------------------------


def reference_unet(unet, x, t, cond):
    """ADM's forward written the plain way: concatenate the condition and run the full first convolution."""
    emb = unet.time_embed(timestep_embedding(t, unet.model_channels).to(x.dtype))
    x = F.pixel_unshuffle(x, unet.patch_size)
    h = F.conv2d(torch.cat([x, cond], dim=1), unet.input_conv.weight, unet.input_conv.bias, padding=1)
    skips = [h]
    for block in unet.input_blocks:
        h = block(h, emb)
        skips.append(h)
    h = unet.middle_block(h, emb)
    for block in unet.output_blocks:
        h = block(torch.cat([h, skips.pop()], dim=1), emb)
    return F.pixel_shuffle(unet.out(h), unet.patch_size)


def test_condition_split_equals_convolving_the_concatenation():
    model = tiny(unet_attention=(2,)).double()  # attention too, so every block type is on the path
    gen = torch.Generator().manual_seed(3)
    x_t = torch.randn(2, 3, 32, 48, generator=gen, dtype=torch.float64)
    z = torch.randn(2, 4, 4, 6, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.2, 0.9], dtype=torch.float64)
    z_up = F.interpolate(z, scale_factor=8.0, mode="nearest")
    unet = model.decoder
    with torch.no_grad():
        first = F.conv2d(x_t, unet.input_conv.weight[:, :3], padding=1) + unet.condition(z_up)
        plain = F.conv2d(torch.cat([x_t, z_up], 1), unet.input_conv.weight, unet.input_conv.bias, padding=1)
        torch.testing.assert_close(first, plain, rtol=0, atol=1e-12)
        ref = reference_unet(unet, x_t, t, z_up)
        torch.testing.assert_close(unet(x_t, t, unet.condition(z_up)), ref, rtol=0, atol=1e-10)
        torch.testing.assert_close(model.velocity(x_t, t, z), ref, rtol=0, atol=1e-10)
        assert ref.abs().max() > 1e-3  # the check is not vacuous: the decoder's output is not zero
        # the condition matters: another latent changes the velocity
        assert not torch.allclose(model.velocity(x_t, t, z + 1), ref)


def test_patched_unet_runs_at_half_size_on_folded_pixels():
    """unet_patch 2: pixels folded 2x2 into channels, the latent upsampled to the working size, unfolded after."""
    model = tiny(unet_patch=2).double()
    assert model.decoder.input_conv.in_channels == 3 * 4 + 4
    gen = torch.Generator().manual_seed(3)
    x_t = torch.randn(2, 3, 32, 48, generator=gen, dtype=torch.float64)
    z = torch.randn(2, 4, 4, 6, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.2, 0.9], dtype=torch.float64)
    z_up = F.interpolate(z, scale_factor=4.0, mode="nearest")  # f 8 / patch 2
    # upsampling to pixels and folding gives each latent value 4 times: the same information
    folded = F.pixel_unshuffle(F.interpolate(z, scale_factor=8.0, mode="nearest"), 2)
    torch.testing.assert_close(folded[:, ::4], z_up, rtol=0, atol=0)
    with torch.no_grad():
        ref = reference_unet(model.decoder, x_t, t, z_up)
        assert ref.shape == x_t.shape and ref.abs().max() > 1e-3
        torch.testing.assert_close(model.velocity(x_t, t, z), ref, rtol=0, atol=1e-10)
        assert model.float().decode(z[:1].float(), steps=2).shape == (1, 3, 32, 48)
    with pytest.raises(ValueError, match="unet_patch"):
        DGAE_T(unet_patch=16)


# --- model files ----------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    model = tiny(1)
    path = tmp_path / "m.safetensors"
    save_model(model, path, note="hello")
    assert load_model(path).precision == "auto"  # what a loaded model computes in unless told
    loaded = load_model(path, precision="fp32")  # as the built model: outputs then match bit for bit
    assert loaded.config == model.config and not loaded.training
    assert loaded.file_hash == file_sha256(path) and len(loaded.file_hash) == 16
    assert not any(p.requires_grad for p in loaded.parameters())
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert loaded.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last)  # as load_model lays it out, so outputs match bit for bit
    x = images(1, 3, 64, 64)
    with torch.no_grad():
        za, zb = model.encode(x).latent_dist.mode(), loaded.encode(x).latent_dist.mode()
    assert torch.equal(za, zb) and za.is_contiguous()
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(model.decode(za, steps=2, generator=gen()), loaded.decode(zb, steps=2, generator=gen()))


def test_bfloat16_storage_loads_as_float32_at_half_size(tmp_path):
    model = tiny(2)
    full, half = tmp_path / "f32.safetensors", tmp_path / "bf16.safetensors"
    save_model(model, full)
    save_model(model, half, dtype=torch.bfloat16)
    ratio = half.stat().st_size / full.stat().st_size
    assert 0.45 < ratio < 0.55
    loaded = load_model(half)
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.float32
        assert torch.equal(v, model.state_dict()[k].bfloat16().float())


def test_load_model_rejects_foreign_and_truncated_files(tmp_path, tiny_model_file):
    text = tmp_path / "notes.safetensors"
    text.write_text("not a model\n")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "something-else"})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny_model_file.read_bytes()[: tiny_model_file.stat().st_size // 2])
    stub = tmp_path / "stub.safetensors"
    stub.write_bytes(tiny_model_file.read_bytes()[:6])
    for path in (text, foreign, truncated, stub):
        with pytest.raises(InputError) as info:
            load_model(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_load_model_rejects_a_config_that_does_not_match_the_tensors(tmp_path):
    model = tiny()
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    meta["config"] = DGAE_T(latent_channels=8).to_json()
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(InputError, match="does not match its config"):
        load_model(path)


def test_resolve_model_looks_names_up_in_the_weights_dir(tmp_path, monkeypatch, tiny_model_file):
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(tiny_model_file, weights / "mytiny.safetensors")
    monkeypatch.setenv("DGAETOK_WEIGHTS", str(weights))
    monkeypatch.chdir(tmp_path)
    assert resolve_model("mytiny") == weights / "mytiny.safetensors"
    assert resolve_model("mytiny.safetensors") == weights / "mytiny.safetensors"
    assert resolve_model(tiny_model_file) == tiny_model_file  # a path is used as given
    assert load_model("mytiny").config == DGAE_T()
    with pytest.raises(InputError, match="nope"):
        resolve_model("nope")


def test_compile_mode_is_checked(tiny_model_file):
    with pytest.raises(InputError, match="unknown compile mode 'fast'"):
        load_model(tiny_model_file, compile="fast")


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="inductor on CPU needs a C++ compiler")
def test_compiled_networks_match_eager(tiny_model_file):
    """`load_model(compile=...)` runs inductor-compiled encoder and decoder with the same results and the same
    parameter names (the file format does not change). About a minute of compiling on 2 cores."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    noise = torch.randn(2, 3, 64, 64)
    eager, compiled = (load_model(tiny_model_file, compile=mode, precision="fp32") for mode in (None, "default"))
    assert list(compiled.state_dict()) == list(eager.state_dict())
    z_eager, z_compiled = (m.encode(x).latent_dist.mode() for m in (eager, compiled))
    torch.testing.assert_close(z_compiled, z_eager, atol=1e-4, rtol=1e-4)
    for sampler in ("euler", "heun"):  # Heun holds one velocity while computing the next
        out = [m.decode(z_eager, steps=2, sampler=sampler, noise=noise) for m in (eager, compiled)]
        torch.testing.assert_close(out[1], out[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["dgae", "sdvae"])
def test_grad_checkpointing_gives_the_same_outputs_and_gradients(arch):
    """Every residual and attention block (encoder, U-Net, SD-VAE decoder) recomputed in backward: the same
    loss and gradients; inference and no-grad forwards are untouched."""
    from dgaetok.models import MODELS, build_model
    from dgaetok.vae import Checkpointed

    config = MODELS[f"{arch}-t"](resolution=32)
    x, noise, t = images(2, 3, 32, 32), images(2, 3, 32, 32, seed=1), torch.tensor([0.3, 0.8])

    def loss_and_grads(checkpointing: bool):
        torch.manual_seed(0)
        model = randomize_zero_init(build_model(config)).train().set_grad_checkpointing(checkpointing)
        gen = torch.Generator().manual_seed(0)
        out = model(x, t, noise, gen)[0] if arch == "dgae" else model(x, gen)[0]
        loss = out.pow(2).mean()
        loss.backward()
        return model, loss, {k: p.grad for k, p in model.named_parameters()}

    plain, loss, grads = loss_and_grads(False)
    model, loss_ckpt, grads_ckpt = loss_and_grads(True)
    blocks = [m for m in model.modules() if isinstance(m, Checkpointed)]
    assert blocks and all(m.grad_checkpointing for m in blocks)
    assert not any(m.grad_checkpointing for m in plain.modules() if isinstance(m, Checkpointed))
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and all(g is not None for g in grads.values())
    for k in grads:
        assert torch.equal(grads_ckpt[k], grads[k]), k
    with torch.no_grad():
        z = model.encode(x).latent_dist.mode()
        assert torch.equal(z, plain.encode(x).latent_dist.mode())


def test_split_and_join_model_files(tmp_path):
    model = tiny(2)
    src = tmp_path / "m.safetensors"
    save_model(model, src, note="x")
    shards = split_model_file(src, tmp_path / "out", max_bytes=700_000)
    assert len(shards) > 1 and all(p.stat().st_size <= 700_000 for p in shards)
    assert shards[0].name == f"m.shard-1-of-{len(shards)}.safetensors"
    with pytest.raises(InputError, match=f"shard 1/{len(shards)} of a model file"):
        load_model(shards[0])
    with pytest.raises(InputError, match="not one complete set"):
        join_model_files(shards[1:], tmp_path / "j.safetensors")
    joined = load_model(join_model_files(list(reversed(shards)), tmp_path / "j.safetensors"))
    for (name, p), q in zip(model.state_dict().items(), joined.state_dict().values()):
        torch.testing.assert_close(q, p.to(torch.bfloat16).float(), rtol=0, atol=0, msg=name)  # stored in bf16
    assert read_model_file(tmp_path / "j.safetensors")[0]["note"] == "x"
    # joined on another machine (here: another process, another hash seed), the file is the same, byte for byte:
    # a GPU call and the CPU that scores its model name that model by the joined file's hash
    code = ("import sys; from pathlib import Path; from dgaetok.models import join_model_files; "
            "join_model_files(sorted(Path(sys.argv[1]).glob('*.safetensors')), sys.argv[2])")
    for dst in ("k1.safetensors", "k2.safetensors"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "out"), str(tmp_path / dst)], check=True)
    assert file_sha256(tmp_path / "k1.safetensors") == file_sha256(tmp_path / "k2.safetensors") \
        == file_sha256(tmp_path / "j.safetensors")


def test_a_model_saved_by_two_processes_is_the_same_file(tmp_path):
    """save_model's bytes depend on the model and its metadata only (safetensors' own writer orders metadata by a
    per-process hash seed): the same training run exported twice has one hash, which names it in cards and logs."""
    code = ("import sys, torch; from dgaetok.models import MODELS, build_model, save_model; torch.manual_seed(0); "
            "m = build_model(MODELS['dgae-t'](resolution=32)); "
            "save_model(m, sys.argv[1], dtype=torch.bfloat16, step='7', source='a test', data='photos', weights='EMA')")
    for name in ("a.safetensors", "b.safetensors", "c.safetensors"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], check=True)
    hashes = {file_sha256(tmp_path / name) for name in ("a.safetensors", "b.safetensors", "c.safetensors")}
    assert len(hashes) == 1

# --- borders: the bottom-row band of issue 14 -----------------------------------------------------------------


def test_the_decoder_treats_all_four_borders_alike():
    """The decoding path has no built-in asymmetry (SD-VAE's asymmetric (0, 1, 0, 1) padding is in the encoder
    only): flipping the image, the latent and every kernel vertically or horizontally flips the velocity. So a
    band along one border of a reconstruction comes from trained weights, not from padding or resampling."""
    model = tiny()
    flipped = copy.deepcopy(model)
    x, z = images(1, 3, 64, 48), torch.randn(1, 4, 8, 6, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.4])
    for dim in (-2, -1):
        with torch.no_grad():
            for (name, p), q in zip(model.decoder.named_parameters(), flipped.decoder.parameters()):
                q.copy_(p.flip(dim) if p.dim() == 4 else p)
            v = model.velocity(x, t, z)
            v_flipped = flipped.velocity(x.flip(dim), t, z.flip(dim)).flip(dim)
        torch.testing.assert_close(v_flipped, v, rtol=1e-4, atol=1e-5)
