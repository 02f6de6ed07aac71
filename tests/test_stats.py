"""Latent statistics: what they measure, how they travel in model and latent files, and who uses them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from dgaetok.cli import app
from dgaetok.errors import InputError
from dgaetok.files import IMAGE_SUFFIXES, center_crop, find_files, open_image, read_latent, to_tensor
from dgaetok.models import SDVAE, SDVAE_T, load_model, save_model, save_with_stats
from dgaetok.pipeline import load_latent
from dgaetok.stats import LatentStats, Moments, measure_folder, spread

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def run(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


@pytest.fixture(scope="module")
def sdvae_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("stats") / "sdvae-t.safetensors"
    save_model(SDVAE(SDVAE_T()), path)
    return path


def test_global_figures_are_those_of_the_pooled_latents():
    g = torch.Generator().manual_seed(0)
    z = torch.randn((6, 4, 5, 5), generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0]).view(1, -1, 1, 1) \
        + torch.tensor([0.0, -1.0, 2.0, 0.5]).view(1, -1, 1, 1)
    moments = Moments()
    moments.add(z[:2])
    moments.add(z[2:])
    stats = moments.stats("test")
    assert stats.images == 6
    zd = z.double()
    torch.testing.assert_close(torch.tensor(stats.mean, dtype=torch.float64), zd.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(torch.tensor(stats.std, dtype=torch.float64), zd.std(dim=(0, 2, 3), correction=0))
    assert stats.scaling_factor == pytest.approx(1 / zd.std(correction=0).item(), rel=1e-9)
    assert stats.shift_factor == pytest.approx(zd.mean().item(), rel=1e-9)
    torch.testing.assert_close(stats.denormalize(stats.normalize(z)), z)
    normalized = stats.normalize(z)
    torch.testing.assert_close(normalized.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    assert LatentStats.from_json(stats.to_json()) == stats
    with pytest.raises(ValueError, match="std > 0"):
        LatentStats((0.0,), (0.0,))
    assert spread(list(range(10)), 3) == [0, 3, 6] and spread([1, 2], 5) == [1, 2]


def test_measure_folder_is_the_statistics_of_center_crop_posterior_means(sdvae_file, photos):
    model = load_model(sdvae_file)
    skipped = []
    (photos / "broken.jpg").write_bytes(b"no image")
    stats = measure_folder(model, photos, batch_size=2, on_skip=skipped.append)
    assert len(skipped) == 1 and "broken.jpg" in skipped[0] and stats.images == 5
    x = torch.stack([to_tensor(center_crop(open_image(p), 64, 1)[0]) for p in find_files(photos, IMAGE_SUFFIXES)
                     if p.name != "broken.jpg"])
    with torch.no_grad():
        z = model.encode(x).latent_dist.mode()
    torch.testing.assert_close(torch.tensor(stats.mean).float(), z.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(stats.std).float(), z.std(dim=(0, 2, 3), correction=0), atol=1e-5,
                               rtol=1e-5)


def test_model_files_carry_statistics_and_old_files_still_load(sdvae_file, tiny_model_file, tmp_path):
    old = load_model(tiny_model_file)  # written without statistics
    assert old.latent_stats is None
    with pytest.raises(InputError, match="dgaetok stats"):
        old.normalize(torch.zeros(1, 4, 8, 8))
    with pytest.raises(InputError, match="no latent statistics"):
        old.scaling_factor

    stats = LatentStats((0.5, -0.5, 0.0, 1.0), (2.0, 1.0, 0.5, 1.0), 7, "unit test")
    bf16 = tmp_path / "bf16.safetensors"
    save_model(load_model(sdvae_file), bf16, dtype=torch.bfloat16)
    save_with_stats(bf16, stats, tmp_path / "with.safetensors")
    model = load_model(tmp_path / "with.safetensors")
    assert model.latent_stats == stats
    with safe_open(str(tmp_path / "with.safetensors"), framework="pt") as fh:
        assert fh.get_tensor("decoder.conv_out.weight").dtype == torch.bfloat16  # copied as stored
    z = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(model.normalize(z)[:, 0], (z[:, 0] - 0.5) / 2.0)
    torch.testing.assert_close(model.denormalize(model.normalize(z)), z)
    assert model.scaling_factor == pytest.approx(stats.scaling_factor)
    save_model(model, tmp_path / "resaved.safetensors")  # save_model keeps them
    assert load_model(tmp_path / "resaved.safetensors").latent_stats == stats
    with pytest.raises(InputError, match="3 channels, the model 4"):
        save_with_stats(bf16, LatentStats((0.0,) * 3, (1.0,) * 3), tmp_path / "bad.safetensors")


def test_cli_stats_encode_normalize_and_decode(sdvae_file, photos, tmp_path):
    refused = run("encode", photos, "-o", tmp_path / "n", "--model", sdvae_file, "--normalize", code=2)
    assert "no latent statistics" in refused.stderr and "dgaetok stats" in refused.stderr
    assert not (tmp_path / "n").exists()

    with_stats = tmp_path / "sdvae-stats.safetensors"
    result = run("stats", photos, "--model", sdvae_file, "-o", with_stats, "--device", "cpu")
    assert "scaling_factor" in result.stderr and "channel" in result.stdout
    model = load_model(with_stats)
    assert model.latent_stats.images == 5 and "center crop 64" in model.latent_stats.source

    common = ["--model", with_stats, "--device", "cpu"]
    run("encode", photos, "-o", tmp_path / "raw", *common)
    run("encode", photos, "-o", tmp_path / "norm", "--normalize", *common)
    for path in sorted((tmp_path / "raw").rglob("*.safetensors")):
        raw, _ = read_latent(path)
        normed, meta = read_latent(tmp_path / "norm" / path.relative_to(tmp_path / "raw"))
        assert meta["normalized"] == "true" and LatentStats.from_json(meta["latent_stats"]) == model.latent_stats
        torch.testing.assert_close(normed, model.normalize(raw))
        torch.testing.assert_close(load_latent(model, tmp_path / "norm" / path.relative_to(tmp_path / "raw")), raw,
                                   atol=1e-5, rtol=1e-5)
    run("decode", tmp_path / "raw", "-o", tmp_path / "x-raw", *common)
    run("decode", tmp_path / "norm", "-o", tmp_path / "x-norm", *common)
    pngs = sorted((tmp_path / "x-raw").rglob("*.png"))
    assert len(pngs) == 5
    for a in pngs:
        b = np.asarray(Image.open(tmp_path / "x-norm" / a.relative_to(tmp_path / "x-raw")), dtype=int)
        assert np.abs(np.asarray(Image.open(a), dtype=int) - b).max() <= 1

    assert "not a file path" in run("stats", photos, "--model", sdvae_file, "-o", tmp_path / "nowhere" / "m",
                                    code=2).stderr


def test_train_exports_its_model_with_statistics(tmp_path, train_photos):
    from test_train import tiny_config
    from dgaetok.train import train

    ema = train(tiny_config(train_photos, tmp_path / "run", steps=1, stats_images=3))
    model = load_model(tmp_path / "run" / "model.safetensors")
    assert model.latent_stats is not None and model.latent_stats.images == 3
    assert model.latent_stats == ema.latent_stats
