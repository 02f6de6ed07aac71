"""Metrics against their references: LPIPS' published triple, skimage's PSNR/SSIM, scipy's Fréchet distance."""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dgaetok.files import center_crop, open_image
from dgaetok.metrics import (ReconMetrics, dataset_key, feature_stats, fid, frechet_distance, inception_features,
                             lpips_distance, psnr, reference_stats, ssim)
from dgaetok.pretrained import fid_inception, lpips_model

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


def test_inception_features_are_deterministic_pool3(pairs, inception):
    original, _ = pairs
    first = inception_features(inception, original)
    assert first.shape == (4, 2048) and first.dtype == torch.float64 and first.device.type == "cpu"
    assert torch.equal(first, inception_features(inception, original))
    unit = original[:2].permute(0, 3, 1, 2).float() / 255  # pytorch-fid's own input convention
    assert torch.equal(first[:2], inception_features(inception, unit))
    assert torch.all(first >= 0) and first.mean() > 0.05  # post-ReLU averages of a trained net, not zeros


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
