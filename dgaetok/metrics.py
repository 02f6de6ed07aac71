"""Metrics as papers report them, on uint8 RGB images: PSNR, SSIM, LPIPS and rFID for reconstructions; gFID,
sFID, precision and recall for generated images (ADM's evaluator's definitions).

Images are uint8 tensors (N, H, W, 3), the layout ``files.to_uint8`` produces. Per-image values are averaged
over images; rFID is the Fréchet distance between Inception pool3 features of originals and reconstructions.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

from .files import atomic_path

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
DATA_RANGE = 255.0


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    for x in (a, b):
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (float64, inf for identical images) with data range 255."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    return 10 * torch.log10(DATA_RANGE ** 2 / mse)


def colour_offset(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image colour shift in /255 levels: the mean over R, G, B of |mean of ``b`` - mean of ``a``|. Blur and
    noise leave it near 0; a decoder whose GroupNorm statistics drift tints whole images, which PSNR underweights."""
    _check_pair(a, b)
    return (b.double().mean(dim=(1, 2)) - a.double().mean(dim=(1, 2))).abs().mean(1)


BORDER_WIDTH, BORDER_MARGIN = 3, 8


def border_errors(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image (N, 5): mean absolute error of the top, bottom, left and right ``BORDER_WIDTH`` rows/columns and of
    the interior ``BORDER_MARGIN`` pixels in from every edge. A decoder that learnt its borders on other image sizes
    draws bands there (see `ReconMetrics`'s border ratio)."""
    _check_pair(a, b)
    err = (a.float() - b.float()).abs()
    w, m = BORDER_WIDTH, BORDER_MARGIN
    inner = err[:, m:-m, m:-m] if min(err.shape[1:3]) > 2 * m else err  # images under 17 px: all of it
    parts = (err[:, :w], err[:, -w:], err[:, :, :w], err[:, :, -w:], inner)
    return torch.stack([p.flatten(1).mean(1) for p in parts], dim=1)


def _gaussian_band(n: int, device: torch.device) -> torch.Tensor:
    """(n - 10, n) matrix whose rows are the 11-tap Gaussian at each 'valid' offset.

    ``G_h @ x @ G_w.T`` is the separable filter as two float64 matmuls, several times faster on a CPU than
    float64 conv2d or shifted sums.
    """
    taps = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - SSIM_WINDOW // 2
    weights = torch.exp(-0.5 * (taps / SSIM_SIGMA) ** 2)
    band = torch.zeros(n - SSIM_WINDOW + 1, n, dtype=torch.float64, device=device)
    for k, wk in enumerate(weights / weights.sum()):
        band.diagonal(k).fill_(wk)
    return band


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM, the same number as skimage's ``structural_similarity(a, b, channel_axis=-1,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)``.

    skimage filters with an 11-tap Gaussian and then drops a 5-pixel border, i.e. it averages only the
    positions where the window fits; a 'valid' filter gives exactly that, and as all channels have the same
    number of positions, the mean of per-channel means is the mean over all of them. Float64 throughout,
    because variances of 0..255 data as E[x^2] - E[x]^2 lose digits in float32.
    """
    _check_pair(a, b)
    h, w = a.shape[1:3]
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {h}x{w}")
    x, y = a.permute(0, 3, 1, 2).double(), b.permute(0, 3, 1, 2).double()
    gh, gw = _gaussian_band(h, x.device), _gaussian_band(w, x.device)
    mx, my, mxx, myy, mxy = gh @ torch.stack([x, y, x * x, y * y, x * y]) @ gw.T
    vx, vy, vxy = mxx - mx * mx, myy - my * my, mxy - mx * my
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def _to_unit_nchw(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1], as torchvision's ToTensor does for pytorch-fid."""
    return images.permute(0, 3, 1, 2).float().div(255)


@torch.no_grad()
def lpips_distance(model: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image LPIPS of two uint8 batches, scaled to [-1, 1] as ``lpips.im2tensor`` does."""
    _check_pair(a, b)
    device = next(model.parameters()).device
    x, y = (_to_unit_nchw(t.to(device)) * 2 - 1 for t in (a, b))
    return model(x, y).flatten().double().cpu()


@torch.no_grad()
def inception_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pool3 features (N, 2048), float64 on the CPU, of uint8 (N, H, W, 3) or float (N, 3, H, W) in [0, 1].

    The model (``pretrained.fid_inception``) resizes to 299 bilinearly and scales to [-1, 1] itself, so this
    is pytorch-fid's preprocessing exactly.
    """
    device = next(model.parameters()).device
    if images.dtype == torch.uint8:
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {tuple(images.shape)}")
        images = _to_unit_nchw(images.to(device))
    elif images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected float images (N, 3, H, W) in [0, 1], got {tuple(images.shape)}")
    return model(images.to(device, torch.float32))[-1].flatten(1).double().cpu()


def feature_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, N - 1 normalised, as pytorch-fid) of features (N, D)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D), got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _drop_roundoff(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those within round-off of zero set to zero (numpy's matrix_rank cut).

    Square roots amplify round-off: 2000 null-space eigenvalues of 1e-14 would add 2000 * 1e-7 to a trace
    that should be exact, e.g. for FID(x, x) with fewer images than dimensions.
    """
    return np.where(w > w.max(initial=0) * len(w) * np.finfo(np.float64).eps, w, 0.0)


def _trace_sqrt_psd(m: np.ndarray) -> float:
    """tr(m^1/2) of a symmetric PSD matrix."""
    return float(np.sqrt(_drop_roundoff(np.linalg.eigvalsh((m + m.T) / 2))).sum())


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^1/2): the eigenvalues of S1 S2 are those of the symmetric PSD matrix S1^1/2 S2 S1^1/2."""
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(_drop_roundoff(w))) @ v.T
    return _trace_sqrt_psd(root1 @ sigma2 @ root1)


def _as_stats(mu: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.atleast_1d(np.asarray(mu, np.float64)), np.atleast_2d(np.asarray(sigma, np.float64))


def _frechet(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, tr_covmean: float) -> float:
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: {mu1.shape} {sigma1.shape} vs {mu2.shape} {sigma2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), the FID formula, in float64.

    pytorch-fid takes ``scipy.linalg.sqrtm(S1 @ S2)`` and then strips complex round-off or retries with eps
    on the diagonal; a symmetric eigendecomposition gives the same trace without either.
    """
    (mu1, sigma1), (mu2, sigma2) = _as_stats(mu1, sigma1), _as_stats(mu2, sigma2)
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"covariances differ in shape: {sigma1.shape} vs {sigma2.shape}")
    return _frechet(mu1, sigma1, mu2, sigma2, _trace_sqrt_product(sigma1, sigma2))


def fid(real: np.ndarray | tuple[np.ndarray, np.ndarray], fake: np.ndarray) -> float:
    """Fréchet distance of ``fake`` features (N, D) to ``real`` features or to their (mu, sigma).

    With N <= D (a few hundred images against 2048 dimensions) the trace is taken in sample space: for
    centred features C, S2 = C^T C / (N - 1) and S1 S2 has the nonzero eigenvalues of C S1 C^T / (N - 1),
    an N x N matrix. Same number as ``frechet_distance``, without a 2048-d eigendecomposition.
    """
    fake = np.asarray(fake, np.float64)
    mu1, sigma1 = _as_stats(*(real if isinstance(real, tuple) else feature_stats(real)))
    mu2, sigma2 = feature_stats(fake)
    if len(fake) > fake.shape[1] or sigma1.shape != sigma2.shape:
        return frechet_distance(mu1, sigma1, mu2, sigma2)
    centred = fake - mu2
    return _frechet(mu1, sigma1, mu2, sigma2, _trace_sqrt_psd(centred @ sigma1 @ centred.T / (len(fake) - 1)))


# --- generation metrics: sFID, precision and recall (ADM's evaluator) -----------------------------------------

# sFID's features. ADM's evaluator (guided-diffusion evaluations/evaluator.py) reads ``mixed_6/conv:0`` of the TF
# 2015-12-05 Inception graph, keeps channels ``[..., :7]`` and flattens. In that graph the mixed blocks are named
# mixed, mixed_1, ... mixed_10 for torchvision's Mixed_5b ... Mixed_7c, and ``<block>/conv`` is a block's first
# tower, its 1x1 conv (+ batch norm + ReLU); ``pretrained._TF_LAYERS`` is the same map, used to convert the FID
# weights, and sends ``mixed_6.conv`` to ``Mixed_6d.branch1x1``: (N, 192, 17, 17) at 299 px. 7 channels x 17 x 17 =
# 2023 dims, flattened in TF's (h, w, c) order. (Not Mixed_6e's output, nor 768 channels: "mixed_6" is 6d.)
SFID_TF_LAYER = "mixed_6.conv"
SFID_CHANNELS = 7
PR_NEIGHBOURS = 3  # k of the k-NN manifolds, as Kynkäänniemi et al. and ADM


def sfid_layer() -> str:
    from .pretrained import _TF_LAYERS

    return _TF_LAYERS[SFID_TF_LAYER]


@torch.no_grad()
def gen_features(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool3 features (N, 2048) and sFID spatial features (N, 2023) of uint8 (N, H, W, 3) images, from one pass.

    ``model`` is ``pretrained.fid_inception`` (pool3 block); preprocessing is pytorch-fid's, as for FID.
    """
    block, branch = sfid_layer().split(".")
    captured = []
    hook = getattr(model.named_layers[block], branch).register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        pool = inception_features(model, images)
    finally:
        hook.remove()
    spatial = captured[-1][:, :SFID_CHANNELS].permute(0, 2, 3, 1).flatten(1)
    return pool, spatial.double().cpu()


def _pairwise_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b)  # float64: the matmul form's round-off is far below any k-NN radius


def manifold_radii(features: torch.Tensor | np.ndarray, k: int = PR_NEIGHBOURS, batch: int = 1024) -> torch.Tensor:
    """Distance from each feature vector to its k-th nearest neighbour in the same set (itself excluded)."""
    f = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    if len(f) <= k:
        raise ValueError(f"k-NN radii with k = {k} need more than {k} feature vectors, got {len(f)}")
    return torch.cat([_pairwise_dist(f[i:i + batch], f).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(f), batch)])


def manifold_coverage(manifold: torch.Tensor | np.ndarray, radii: torch.Tensor, queries: torch.Tensor | np.ndarray,
                      batch: int = 1024) -> float:
    """Fraction of ``queries`` inside at least one ball (manifold point, its radius)."""
    m = torch.as_tensor(np.asarray(manifold), dtype=torch.float64)
    q = torch.as_tensor(np.asarray(queries), dtype=torch.float64)
    inside = [(_pairwise_dist(q[i:i + batch], m) <= radii[None]).any(dim=1) for i in range(0, len(q), batch)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray,
                     k: int = PR_NEIGHBOURS) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of feature sets (N, D).

    Each set's manifold is the union of balls around its points reaching their k-th nearest neighbour; precision
    is the fraction of fake points inside the real manifold, recall the fraction of real points inside the fake.
    """
    precision = manifold_coverage(real, manifold_radii(real, k), fake)
    recall = manifold_coverage(fake, manifold_radii(fake, k), real)
    return precision, recall


def gen_metrics(real_pool: np.ndarray, real_spatial: np.ndarray, fake_pool: np.ndarray, fake_spatial: np.ndarray,
                k: int = PR_NEIGHBOURS) -> dict[str, float]:
    """gFID (pool3), sFID (spatial), precision and recall (pool3, k-NN) of generated against reference features."""
    precision, recall = precision_recall(real_pool, fake_pool, k)
    return {"fid": fid(real_pool, fake_pool), "sfid": fid(real_spatial, fake_spatial),
            "precision": precision, "recall": recall}


# --- cached reference statistics ----------------------------------------------------------------------------


def dataset_key(root: str | os.PathLike, files: Iterable[str | os.PathLike], preprocessing: str) -> str:
    """What reference statistics depend on: the folder, its file list (names and sizes) and the preprocessing.

    ``files`` are paths as found under ``root`` (absolute, or relative to the working directory like ``root``)."""
    root = Path(root).resolve()
    listing = hashlib.sha256()
    for path in sorted(Path(f).resolve() for f in files):
        listing.update(f"{path.relative_to(root).as_posix()}\t{path.stat().st_size}\n".encode())
    return json.dumps({"root": str(root), "preprocessing": preprocessing, "files": listing.hexdigest()},
                      sort_keys=True)


def reference_stats(key: str, compute_features: Callable[[], torch.Tensor | np.ndarray],
                    cache_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) for ``key``, from ``<cache>/fid-stats/<hash>.npz`` or computed once and stored there."""
    from .pretrained import cache_root

    path = cache_root(cache_dir) / "fid-stats" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) == key:
                return data["mu"], data["sigma"]
    features = np.asarray(compute_features(), dtype=np.float64)
    mu, sigma = feature_stats(features)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, mu=mu, sigma=sigma, n=len(features), key=np.array(key))
    return mu, sigma


# --- streaming ----------------------------------------------------------------------------------------------


class ReconMetrics:
    """Accumulates (original, reconstruction) uint8 batches; ``compute()`` gives psnr, ssim, lpips and rfid, and two
    diagnostics: ``colour`` (mean `colour_offset`, /255) and ``border`` (the worst of the four border strips'
    mean error over the interior's, `border_errors`: 1 where borders are reconstructed like the rest).

    Features for rFID are kept whole (CPU, float64), since the covariance needs all of them. With
    ``reference`` = (mu, sigma) of the originals (see ``reference_stats``) the originals' features are not
    computed at all.
    """

    def __init__(self, device: torch.device | str = "cpu", lpips_net: str | None = "alex", rfid: bool = True,
                 reference: tuple[np.ndarray, np.ndarray] | None = None, cache_dir: str | os.PathLike | None = None):
        from . import pretrained

        self.device = torch.device(device)
        self.lpips = pretrained.lpips_model(lpips_net, self.device, cache_dir=cache_dir) if lpips_net else None
        self.inception = pretrained.fid_inception(self.device, cache_dir=cache_dir) if rfid else None
        self.reference = reference
        self.values: dict[str, list[torch.Tensor]] = {}
        self.features: dict[str, list[torch.Tensor]] = {}
        self.reset()

    @torch.no_grad()
    def update(self, original: torch.Tensor, reconstruction: torch.Tensor) -> None:
        _check_pair(original, reconstruction)
        a, b = original.to(self.device), reconstruction.to(self.device)
        self.values["psnr"].append(psnr(a, b).cpu())
        self.values["ssim"].append(ssim(a, b).cpu())
        self.values["colour"].append(colour_offset(a, b).cpu())
        self.values["border"].append(border_errors(a, b).cpu())
        if self.lpips is not None:
            self.values["lpips"].append(lpips_distance(self.lpips, a, b))
        if self.inception is not None:
            if self.reference is None:
                self.features["original"].append(inception_features(self.inception, a))
            self.features["reconstruction"].append(inception_features(self.inception, b))

    def reset(self) -> None:
        """Forget the images seen so far; the networks and ``reference`` stay loaded."""
        self.values = {"psnr": [], "ssim": [], "lpips": [], "colour": [], "border": []}
        self.features = {"original": [], "reconstruction": []}

    def __len__(self) -> int:
        return sum(len(v) for v in self.values["psnr"])

    def compute(self) -> dict[str, float]:
        """Means over all images so far; a metric that was switched off (or rfid for < 2 images) is NaN."""
        out = {k: float(torch.cat(v).mean()) if v else float("nan") for k, v in self.values.items() if k != "border"}
        borders = torch.cat(self.values["border"]).mean(0) if self.values["border"] else torch.full((5,), float("nan"))
        worst, inner = float(borders[:4].max()), float(borders[4])
        out["border"] = 1.0 if worst == inner == 0 else worst / max(inner, 1e-6)  # perfect: 1; finite in JSON
        out["rfid"] = float("nan")
        if self.inception is not None and len(self) >= 2:
            real = self.reference or torch.cat(self.features["original"]).numpy()
            out["rfid"] = fid(real, torch.cat(self.features["reconstruction"]).numpy())
        out["n"] = len(self)
        return out
