"""`dgaetok bench rfid`: reconstruction quality (rFID, PSNR, SSIM, LPIPS) and speed of a tokenizer.

Protocol (the paper's): RGB, shorter side to 256, center crop; encode with the posterior mean, decode from the
same seeded noise at each step count, compare with the originals as uint8.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import __version__
from .errors import InputError
from .files import IMAGE_SUFFIXES, atomic_path, eval_crop, find_files, save_grid, to_uint8
from .metrics import ReconMetrics, dataset_key, inception_features, reference_stats
from .models import Tokenizer, synchronize


@dataclass
class StepResult:
    steps: int
    rfid: float
    psnr: float
    ssim: float
    lpips: float
    images_per_s: float  # encode + decode, excluding image loading and metrics
    colour: float = float("nan")  # mean colour offset, /255 (`metrics.colour_offset`)
    border: float = float("nan")  # worst border strip's error over the interior's (`metrics.border_errors`)


@dataclass
class RfidResult:
    model: str
    model_hash: str
    data: str
    images: int
    resolution: int
    latent_shape: list[int]
    device: str
    sampler: str
    shift: float
    seed: int
    lpips_net: str
    skipped: list[str] = field(default_factory=list)
    results: list[StepResult] = field(default_factory=list)
    dgaetok_version: str = __version__


def eval_images(data: str | Path, resolution: int, limit: int | None) -> tuple[list[Path], list[torch.Tensor], list[str]]:
    """The first ``limit`` readable images, preprocessed; unreadable ones are reported, not fatal."""
    images, paths, skipped = [], [], []
    for path in find_files(data, IMAGE_SUFFIXES):
        if limit is not None and len(images) == limit:
            break
        try:
            images.append(eval_crop(path, resolution))
            paths.append(path)
        except InputError as exc:
            skipped.append(str(exc))
    if len(images) < 2:
        raise InputError(f"{data}: rFID needs at least 2 readable images, found {len(images)}")
    return paths, images, skipped


def batch_ranges(n: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of consecutive batches of ``size`` over ``n`` items."""
    return ((i, min(n, i + size)) for i in range(0, n, size))


def rfid(
    model: Tokenizer,
    model_name: str,
    data: str | Path,
    steps: list[int] | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    sampler: str = "euler",
    shift: float | None = None,
    lpips_net: str = "alex",
    grid: Path | None = None,
    grid_count: int = 8,
    resolution: int = 256,
    on_batch: Callable[[int], None] | None = None,
) -> RfidResult:
    """Evaluate ``model`` on the images in ``data`` at each decode step count (None: the model's own,
    `Tokenizer.default_steps`, on its grid unless ``shift`` is given); ``on_batch(n)`` reports progress."""
    device = next(model.parameters()).device
    if model.single_step:  # one result, reported as the one pass it is, whatever step counts were asked
        steps = [1]
    steps = steps or [model.default_steps]
    shift = model.default_shift if shift is None else shift
    paths, images, skipped = eval_images(data, resolution, limit)
    f = model.config.downsample
    result = RfidResult(model_name, model.file_hash, str(data), len(images), resolution,
                        [model.config.latent_channels, resolution // f, resolution // f], str(device), sampler, shift,
                        seed, lpips_net, skipped)

    metrics = ReconMetrics(device, lpips_net=lpips_net, rfid=True)
    key = dataset_key(data, paths, f"rgb-shorter{resolution}-center{resolution}-bicubic")

    batches = [images[a:b] for a, b in batch_ranges(len(images), batch_size)]

    def original_features():
        return torch.cat([inception_features(metrics.inception, to_uint8(torch.stack(b))) for b in batches])

    metrics.reference = reference_stats(key, original_features)

    latents, encode_s = [], 0.0
    for batch in batches:
        x = torch.stack(batch).to(device)
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            latents.append(model.encode(x).latent_dist.mode())
        synchronize(device)
        encode_s += time.perf_counter() - start

    noise = torch.randn((1, 3, resolution, resolution), generator=torch.Generator().manual_seed(seed))
    grid_columns = [torch.stack(images[:grid_count])]
    for n_steps in steps:
        metrics.reset()
        decode_s, recon_for_grid = 0.0, []
        for z, batch in zip(latents, batches):
            synchronize(device)
            start = time.perf_counter()
            recon = model.decode(z, steps=n_steps, sampler=sampler, shift=shift,
                                 noise=noise.expand(len(z), -1, -1, -1))
            synchronize(device)
            decode_s += time.perf_counter() - start
            metrics.update(to_uint8(torch.stack(batch)), to_uint8(recon))
            if len(recon_for_grid) * batch_size < grid_count:
                recon_for_grid.append(recon.cpu())
            if on_batch is not None:
                on_batch(len(z))
        grid_columns.append(torch.cat(recon_for_grid)[:grid_count])
        m = metrics.compute()
        result.results.append(StepResult(n_steps, m["rfid"], m["psnr"], m["ssim"], m["lpips"],
                                         len(images) / (encode_s + decode_s), m["colour"], m["border"]))
    if grid is not None:
        # One row per image: the original, then its reconstruction at each step count.
        cells = torch.stack(grid_columns, dim=1).flatten(0, 1)
        labels = ["original"] + ["decoded" if model.single_step else f"{n} steps" for n in steps]
        save_grid(cells, len(grid_columns), grid, labels)
    return result


RFID_MIN_IMAGES = 2048  # the dimension of the Inception features whose covariance rFID compares


def rfid_caveat(images: int) -> str:
    """What an rFID over ``images`` images is worth, or "" when there are enough for a full-rank covariance."""
    if images >= RFID_MIN_IMAGES:
        return ""
    return (f"rFID over {images} images is biased upwards and noisy (its 2048-d feature covariance needs at least "
            f"{RFID_MIN_IMAGES} images): compare it only between runs on the same images; PSNR, SSIM and LPIPS "
            "are per-image means and hold at any count")


def write_json(result: RfidResult, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(asdict(result), indent=2) + "\n")
