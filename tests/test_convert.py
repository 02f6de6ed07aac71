"""SD-VAE import and export, checked against diffusers' own AutoencoderKL (and its LDM converter) on tiny random
models: equal posterior means and decodes to 1e-5, in both directions and from the LDM layout."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

import diffusers  # the reference implementation, a test extra
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dgaetok.cli import app
from dgaetok.convert import DIFFUSERS_WEIGHTS, convert, export_diffusers, export_state_dict, import_checkpoint
from dgaetok.errors import InputError
from dgaetok.models import DGAE, DGAE_T, SDVAE, SDVAE_T, load_model, save_model

from conftest import conv_output_dtypes
from dgaetok.stats import LatentStats

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5


def tiny_autoencoder(seed: int = 0, **kw) -> "diffusers.AutoencoderKL":
    """A diffusers AutoencoderKL of three levels (f4) at 32 px, every weight random (norms included)."""
    torch.manual_seed(seed)
    config = dict(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4, sample_size=32,
                  scaling_factor=0.5, shift_factor=0.1)
    model = diffusers.AutoencoderKL(**{**config, **kw}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name and name.endswith("weight")
                    else 0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(diffusers model, its saved folder)."""
    model = tiny_autoencoder()
    folder = tmp_path_factory.mktemp("diffusers") / "tiny-vae"
    model.save_pretrained(folder)
    return model, folder


def images(size: int = 32, n: int = 2) -> torch.Tensor:
    return torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(1)) * 2 - 1


@torch.no_grad()
def assert_same_as_diffusers(ours, theirs, size: int = 32) -> None:
    """Posterior means, and decodes of them, within 1e-5 of diffusers' (in float32: the mapping is what is checked
    here; bf16 has its own test)."""
    ours.set_precision("fp32")
    x = images(size)
    mean = theirs.encode(x).latent_dist.mean
    torch.testing.assert_close(ours.encode(x).latent_dist.mean, mean, atol=TOL, rtol=0)
    torch.testing.assert_close(ours.decoder(mean), theirs.decode(mean).sample, atol=TOL, rtol=0)
    torch.testing.assert_close(ours.decode(mean), theirs.decode(mean).sample.clamp(-1, 1), atol=TOL, rtol=0)


def test_import_of_a_diffusers_folder_matches_autoencoderkl(reference, tmp_path):
    theirs, folder = reference
    out = tmp_path / "vae.safetensors"
    _, layout = convert(folder, out)
    ours = load_model(out)
    assert layout == "diffusers" and ours.config.arch == "sdvae"
    c = ours.config
    assert (c.downsample, c.latent_channels, c.enc_channels, c.enc_ch_mult, c.enc_res_blocks, c.resolution) == \
        (4, 4, 32, (1, 2, 2), 1, 32)
    assert_same_as_diffusers(ours, theirs)
    # diffusers' (z - shift_factor) * scaling_factor becomes the model file's latent statistics
    assert ours.scaling_factor == pytest.approx(0.5) and ours.latent_stats.shift_factor == pytest.approx(0.1)
    z = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(ours.normalize(z), (z - 0.1) * 0.5)


def test_export_to_diffusers_matches_autoencoderkl_and_round_trips(tmp_path):
    """SD's own multipliers (1, 2, 4, 4) at f8: sdvae-t exported, loaded by diffusers, then imported again."""
    torch.manual_seed(0)
    model = SDVAE(SDVAE_T())
    assert model.config.enc_ch_mult == (1, 2, 4, 4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(model, tmp_path / "bare.safetensors")
    bare = CliRunner().invoke(app, ["convert", str(tmp_path / "bare.safetensors"), "--to", "diffusers", "-o",
                                    str(tmp_path / "bare")])
    assert bare.exit_code == 0 and "no latent statistics" in bare.stderr
    assert json.loads((tmp_path / "bare" / "config.json").read_text())["scaling_factor"] == 1.0

    model.latent_stats = LatentStats((0.1, -0.2, 0.3, 0.0), (1.0, 2.0, 0.5, 1.5), 10, "test")
    src = tmp_path / "sdvae-t.safetensors"
    save_model(model, src)

    result = CliRunner().invoke(app, ["convert", str(src), "--to", "diffusers", "-o", str(tmp_path / "export")])
    assert result.exit_code == 0, result.output
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "export").eval()
    assert theirs.config.scaling_factor == pytest.approx(model.scaling_factor)
    assert theirs.config.shift_factor == pytest.approx(0.05)
    assert_same_as_diffusers(load_model(src), theirs, size=64)

    back, layout = import_checkpoint(tmp_path / "export")
    assert layout == "diffusers" and back.config == model.config
    assert back.latent_stats.mean == pytest.approx(model.latent_stats.mean, rel=1e-12)
    assert back.latent_stats.std == pytest.approx(model.latent_stats.std, rel=1e-12)
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.slow
@pytest.mark.parametrize("latent_channels, quant_convs", [(4, True), (16, False)], ids=["sd-vae", "c16-no-quant"])
def test_full_size_sd_vae_structure(tmp_path, latent_channels, quant_convs):
    """SD's VAE as released (128 channels x (1, 2, 4, 4), two blocks per level, mid attention, quant convs; and a
    16-channel one without quant convs, as Flux's): imported from diffusers, then exported back unchanged."""
    torch.manual_seed(0)
    theirs = diffusers.AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=latent_channels,
        sample_size=32, use_quant_conv=quant_convs, use_post_quant_conv=quant_convs).eval()
    with torch.no_grad():  # diffusers initialises norms to the identity, which would hide a swapped norm
        for name, p in theirs.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "vae")
    ours, layout = import_checkpoint(tmp_path / "vae")
    c = ours.config
    assert (layout, c.downsample, c.latent_channels, c.enc_channels, c.enc_ch_mult, c.enc_res_blocks) == \
        ("diffusers", 8, latent_channels, 128, (1, 2, 4, 4), 2)
    c2 = latent_channels ** 2  # without quant convs, ours hold identity ones: 2c -> 2c and c -> c, with biases
    assert ours.num_params()["total"] == sum(p.numel() for p in theirs.parameters()) + \
        (0 if quant_convs else 5 * c2 + 3 * latent_channels)
    back = diffusers.AutoencoderKL.from_pretrained(export_diffusers(ours, tmp_path / "export")).eval()
    # The networks themselves in float64, where float32's rounding through 30-odd layers (up to 1.4e-5 here) is gone
    ours.double()
    x = images(32).double()
    with torch.no_grad():
        for reference in (theirs.double(), back.double()):
            moments = reference.encode(x).latent_dist.parameters
            torch.testing.assert_close(ours.encoder(x), moments, atol=1e-10, rtol=0)
            z = moments[:, :latent_channels]
            torch.testing.assert_close(ours.decoder(z), reference.decode(z).sample, atol=1e-10, rtol=0)

# --- latent statistics as diffusers' pipelines use them ------------------------------------------------------------
# The pipelines import transformers, which is no dependency here; the lines that scale latents are run from their
# source as they stand, on the AutoencoderKL a pipeline would hold.
PIPELINES = Path(diffusers.__file__).parent / "pipelines"
UNSCALE = {  # a pipeline's latents -> the VAE's, before vae.decode
    "sd": ("stable_diffusion/pipeline_stable_diffusion.py",
           [("latents = 1 / self.vae.config.scaling_factor * latents", None)]),
    "sdxl": ("stable_diffusion_xl/pipeline_stable_diffusion_xl.py",
             [("has_latents_mean = hasattr(self.vae.config", "latents = latents / self.vae.config.scaling_factor")]),
    "sd3": ("stable_diffusion_3/pipeline_stable_diffusion_3.py",
            [("latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor", None)]),
}
SCALE = {  # img2img: the VAE's latents (init_latents) -> the pipeline's
    "sd": ("stable_diffusion/pipeline_stable_diffusion_img2img.py",
           [("init_latents = self.vae.config.scaling_factor * init_latents", None)]),
    "sdxl": ("stable_diffusion_xl/pipeline_stable_diffusion_xl_img2img.py",
             [("latents_mean = latents_std = None", "latents_std = torch.tensor(self.vae.config.latents_std)"),
              ("if latents_mean is not None and latents_std is not None:",
               "init_latents = self.vae.config.scaling_factor * init_latents")]),
    "sd3": ("stable_diffusion_3/pipeline_stable_diffusion_3_img2img.py",
            [("init_latents = (init_latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor", None)]),
}


def pipeline_code(file: str, spans: list[tuple[str, str | None]]) -> str:
    """The source lines of each span, from the line holding its first text to the one holding its last (None: the
    first line alone), dedented."""
    lines = (PIPELINES / file).read_text().splitlines()
    code = []
    for first, last in spans:
        start = next(i for i, line in enumerate(lines) if first in line)
        end = next(i for i in range(start, len(lines)) if (last or first) in lines[i])
        code.append(textwrap.dedent("\n".join(lines[start:end + 1])))
    return "\n".join(code)


def run_pipeline(table: dict, pipeline: str, vae, name: str, value: torch.Tensor) -> torch.Tensor:
    file, spans = table[pipeline]
    scope = {"torch": torch, "self": SimpleNamespace(vae=vae), name: value.clone(), "device": value.device,
             "dtype": value.dtype}
    exec(pipeline_code(file, spans), scope)
    return scope[name]


def pipeline_to_vae(pipeline: str, vae, n: torch.Tensor) -> torch.Tensor:
    return run_pipeline(UNSCALE, pipeline, vae, "latents", n)


def vae_to_pipeline(pipeline: str, vae, z: torch.Tensor) -> torch.Tensor:
    return run_pipeline(SCALE, pipeline, vae, "init_latents", z)


PLAYGROUND = dict(scaling_factor=0.5, latents_mean=[-1.6574, 1.886, -1.383, 2.5155],
                  latents_std=[8.4927, 5.9022, 6.5498, 5.2299])  # Playground v2.5's VAE config: an SDXL pipeline


@pytest.mark.parametrize("config, pipelines", [
    (dict(scaling_factor=0.13025, shift_factor=None), ["sd", "sdxl"]),  # SDXL's VAE: scaling_factor alone
    (dict(scaling_factor=1.5305, shift_factor=0.0609), ["sd3"]),  # SD3's: with shift_factor
    (PLAYGROUND, ["sdxl"]),  # per-channel mean and std
], ids=["scaling_factor", "shift_factor", "latents_mean_std"])
def test_imported_statistics_normalise_as_diffusers_pipelines_do(reference, tmp_path, config, pipelines):
    _, folder = reference
    vae_folder = tmp_path / "vae"
    vae_folder.mkdir()
    (vae_folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()),
                                                        **config}))
    (vae_folder / DIFFUSERS_WEIGHTS).symlink_to(folder / DIFFUSERS_WEIGHTS)
    vae = diffusers.AutoencoderKL.from_pretrained(vae_folder)
    ours, _ = import_checkpoint(vae_folder)
    n = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for pipeline in pipelines:
        z = pipeline_to_vae(pipeline, vae, n)
        torch.testing.assert_close(ours.denormalize(n), z, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours.normalize(z), vae_to_pipeline(pipeline, vae, z), rtol=1e-5, atol=1e-5)


def sdvae_with_stats(stats: LatentStats) -> SDVAE:
    torch.manual_seed(0)
    model = SDVAE(SDVAE_T())
    model.latent_stats = stats
    return model


def test_exported_statistics_unscale_as_in_diffusers_pipelines(tmp_path):
    """Per-channel statistics reach SDXL's pipelines exactly; pipelines with one scale (SD, SD3) get the global
    scaling_factor and shift_factor."""
    stats = LatentStats((0.1, -0.2, 0.3, 0.0), (1.0, 2.0, 0.5, 1.5), 10, "test")
    model = sdvae_with_stats(stats)
    vae = diffusers.AutoencoderKL.from_pretrained(export_diffusers(model, tmp_path / "export"))
    n = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    z = pipeline_to_vae("sdxl", vae, n)
    torch.testing.assert_close(z, model.denormalize(n), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vae_to_pipeline("sdxl", vae, z), n, rtol=1e-5, atol=1e-5)
    one_scale = LatentStats.uniform(4, stats.scaling_factor, stats.shift_factor)
    torch.testing.assert_close(pipeline_to_vae("sd3", vae, n), one_scale.denormalize(n), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pipeline_to_vae("sd", vae, n), n / stats.scaling_factor, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("config", [dict(scaling_factor=0.13025), dict(scaling_factor=1.5305, shift_factor=0.0609),
                                    PLAYGROUND], ids=["scaling_factor", "shift_factor", "latents_mean_std"])
def test_a_diffusers_vae_goes_back_to_diffusers_with_the_same_scaling(reference, tmp_path, config):
    """Imported and exported again, a VAE turns every pipeline's latents into the same VAE latents as before (an
    SDXL-like VAE's 1.0 is 1 / 0.13025 = 7.68, not 58.9)."""
    _, folder = reference
    vae_folder = tmp_path / "vae"
    vae_folder.mkdir()
    (vae_folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()),
                                                        "shift_factor": None, **config}))
    (vae_folder / DIFFUSERS_WEIGHTS).symlink_to(folder / DIFFUSERS_WEIGHTS)
    before = diffusers.AutoencoderKL.from_pretrained(vae_folder)
    after = diffusers.AutoencoderKL.from_pretrained(export_diffusers(import_checkpoint(vae_folder)[0],
                                                                     tmp_path / "again"))
    n = torch.ones(1, 4, 2, 2)
    pipelines = ["sdxl"] if "latents_mean" in config else ["sd3"] if "shift_factor" in config else ["sd", "sdxl"]
    for pipeline in pipelines:
        torch.testing.assert_close(pipeline_to_vae(pipeline, after, n), pipeline_to_vae(pipeline, before, n),
                                   rtol=1e-6, atol=1e-6)
    if config == dict(scaling_factor=0.13025):
        assert pipeline_to_vae("sdxl", after, n).flatten()[0].item() == pytest.approx(7.6775, abs=1e-4)


def test_ldm_layout_agrees_with_diffusers_own_ldm_converter(reference, tmp_path):
    """The LDM names convert writes are the ones diffusers' single-file loader reads; a whole SD checkpoint
    (.ckpt, under first_stage_model.) and a bare VAE (.safetensors, with LDM's loss keys) both import exactly."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    theirs, folder = reference
    ldm = export_state_dict(import_checkpoint(folder)[0], "ldm")
    assert "encoder.mid.attn_1.q.weight" in ldm and ldm["encoder.mid.attn_1.q.weight"].dim() == 4
    assert "quant_conv.weight" in ldm and "decoder.up.2.upsample.conv.weight" in ldm
    back = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in ldm.items()}, dict(theirs.config))
    expected = theirs.state_dict()
    assert back.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(back[key].reshape(value.shape), value), key

    whole = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    whole |= {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2), "scale_factor": torch.tensor(0.25)}
    torch.save({"state_dict": whole, "global_step": 10}, tmp_path / "sd.ckpt")
    bare = {**ldm, "loss.logvar": torch.zeros(())}
    save_file(bare, tmp_path / "vae.safetensors")
    for src in (tmp_path / "sd.ckpt", tmp_path / "vae.safetensors"):
        ours, layout = import_checkpoint(src, resolution=32)
        assert layout == "ldm"
        assert_same_as_diffusers(ours, theirs)
    assert import_checkpoint(tmp_path / "sd.ckpt")[0].scaling_factor == pytest.approx(0.25)
    assert import_checkpoint(tmp_path / "vae.safetensors")[0].latent_stats is None
    sd = import_checkpoint(tmp_path / "vae.safetensors", scaling_factor=0.18215)[0]
    assert sd.scaling_factor == pytest.approx(0.18215)


def test_ldm_checkpoints_with_an_ema_import_its_weights(reference, tmp_path):
    """LitEma's bookkeeping (model_ema.decay, model_ema.num_updates) is dropped; its copies of the weights (named
    without dots) replace the weights they follow, and its copies of the loss's weights are dropped with them."""
    theirs, folder = reference
    ldm = export_state_dict(import_checkpoint(folder)[0], "ldm")
    bookkeeping = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000)}
    loss = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(8, 3, 4, 4)}
    torch.save({"state_dict": {**ldm, **loss, **bookkeeping}}, tmp_path / "counters.ckpt")
    ours, layout = import_checkpoint(tmp_path / "counters.ckpt", resolution=32)
    assert layout == "ldm"
    assert_same_as_diffusers(ours, theirs)

    other = tiny_autoencoder(seed=5)
    other.save_pretrained(tmp_path / "other")
    ema = export_state_dict(import_checkpoint(tmp_path / "other")[0], "ldm")
    shadow = {f"model_ema.{k.replace('.', '')}": v for k, v in {**ema, **loss}.items()}
    torch.save({"state_dict": {**ldm, **loss, **bookkeeping, **shadow}}, tmp_path / "ema.ckpt")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "ema.ckpt"), "-o", str(tmp_path / "ema.safetensors"),
                                      "--resolution", "32"])
    assert result.exit_code == 0, result.output
    assert "ldm (EMA weights)" in " ".join(result.stderr.split())
    assert_same_as_diffusers(load_model(tmp_path / "ema.safetensors"), other)


def test_old_diffusers_attention_names_and_missing_quant_convs(reference, tmp_path):
    theirs, folder = reference
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((folder / "config.json").read_text())
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    tensors = {}
    for key, value in load_file(folder / "diffusion_pytorch_model.safetensors").items():
        for new, old in renames.items():
            key = key.replace(new, old)
        tensors[key] = value
    assert "encoder.mid_block.attentions.0.query.weight" in tensors
    save_file(tensors, legacy / "diffusion_pytorch_model.safetensors")
    assert_same_as_diffusers(import_checkpoint(legacy)[0], theirs)

    # Flux-style: no quant_conv / post_quant_conv at all
    flux = tiny_autoencoder(seed=3, use_quant_conv=False, use_post_quant_conv=False)
    flux.save_pretrained(tmp_path / "flux")
    assert_same_as_diffusers(import_checkpoint(tmp_path / "flux")[0], flux)


def test_what_cannot_be_mapped_is_refused_in_one_line(reference, tmp_path):
    _, folder = reference
    runner = CliRunner()

    def refused(*args) -> str:
        result = runner.invoke(app, ["convert", *map(str, args)])
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) <= 2
        return " ".join(result.stderr.split())

    ldm = export_state_dict(import_checkpoint(folder)[0], "ldm")
    save_file({**ldm, "encoder.mid.attn_2.q.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    assert "cannot place key encoder.mid.attn_2.q.weight" in refused(tmp_path / "extra.safetensors", "-o",
                                                                     tmp_path / "x.safetensors")
    del ldm["decoder.conv_out.bias"]
    save_file(ldm, tmp_path / "short.safetensors")
    assert "missing key decoder.conv_out.bias" in refused(tmp_path / "short.safetensors", "-o", tmp_path / "x")

    # a pickle that would run code is never unpickled
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "callback": Path("/")},
               tmp_path / "code.ckpt")
    assert "weights_only" in refused(tmp_path / "code.ckpt", "-o", tmp_path / "x.safetensors")

    # a config.json that contradicts the weights, or asks for what dgaetok's SD-VAE cannot be
    for key, value in (("layers_per_block", 2), ("norm_num_groups", 16), ("_class_name", "AutoencoderTiny")):
        bad = tmp_path / f"bad-{key}"
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()),
                                                     key: value}))
        (bad / "diffusion_pytorch_model.safetensors").symlink_to(folder / "diffusion_pytorch_model.safetensors")
        assert f"config.json has {key}" in refused(bad, "-o", tmp_path / "x.safetensors")

    torch.manual_seed(0)
    save_model(DGAE(DGAE_T()), tmp_path / "dgae.safetensors")
    assert "only sdvae models" in refused(tmp_path / "dgae.safetensors", "--to", "diffusers", "-o", tmp_path / "d")
    assert "already a dgaetok model file" in refused(tmp_path / "dgae.safetensors", "-o", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(InputError, match="not a checkpoint"):
        import_checkpoint(folder / "config.json")


def test_a_converted_file_works_with_every_command(reference, tmp_path, shared_data):
    """convert, info, stats, encode --normalize, decode, bench rfid, and export again."""
    theirs, folder = reference
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result

    vae = tmp_path / "vae.safetensors"
    assert "from the diffusers layout" in " ".join(run("convert", folder, "-o", vae).stderr.split())
    assert "sdvae" in run("info", vae).stdout
    data = shared_data / "eval" / "imagenet-val500"
    run("stats", data, "--model", vae, "-o", tmp_path / "vae-stats.safetensors", "--limit", 6, "--device", "cpu")
    model = ["--model", tmp_path / "vae-stats.safetensors", "--device", "cpu"]
    run("encode", data, "-o", tmp_path / "z", "--limit", 2, "--normalize", *model)
    run("decode", tmp_path / "z", "-o", tmp_path / "x", *model)
    assert len(list((tmp_path / "x").glob("*.png"))) == 2
    run("bench", "rfid", data, "--limit", 2, "--resolution", 32, "-o", tmp_path / "bench", *model)
    assert json.loads((tmp_path / "bench" / "rfid.json").read_text())["latent_shape"] == [4, 8, 8]
    run("convert", tmp_path / "vae-stats.safetensors", "--to", "diffusers", "-o", tmp_path / "again")
    again = diffusers.AutoencoderKL.from_pretrained(tmp_path / "again").eval()
    assert_same_as_diffusers(load_model(vae), again)
    assert again.config.scaling_factor == pytest.approx(load_model(tmp_path / "vae-stats.safetensors").scaling_factor)


@torch.no_grad()
def test_a_converted_vae_runs_in_bf16_close_to_diffusers(reference, tmp_path):
    theirs, folder = reference
    convert(folder, tmp_path / "vae.safetensors")
    ours = load_model(tmp_path / "vae.safetensors", precision="bf16")
    dtypes = conv_output_dtypes(ours)
    x = images()
    mean = theirs.encode(x).latent_dist.mean
    ours_mean = ours.encode(x).latent_dist.mean
    assert ours_mean.dtype == torch.float32  # latents stay float32 whatever the networks compute in
    decoded = ours.decode(mean)
    assert dtypes == {torch.bfloat16}  # the convolutions did run in bf16: not a silent float32 pass
    # bf16 keeps 8 bits of mantissa: within a few percent of the float32 reference, and nowhere near it exactly
    assert 0 < (ours_mean - mean).abs().max() < 0.1
    assert 0 < (decoded - theirs.decode(mean).sample.clamp(-1, 1)).abs().max() < 0.1
