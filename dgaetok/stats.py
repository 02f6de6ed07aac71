"""Latent statistics: the per-channel mean and std of a tokenizer's posterior means, and the scale derived from them.

Every latent diffusion model trains on normalised latents; the statistics belong to the tokenizer, so they travel
in its model file (metadata ``latent_stats``, JSON). diffusers keeps one global ``scaling_factor`` (1 / std) and
``shift_factor`` (mean); LightningDiT and SSDD keep per-channel mean and std. Both are derived from these.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from .errors import InputError
from .files import IMAGE_SUFFIXES, eval_crop, find_files


@dataclass(frozen=True)
class LatentStats:
    """Per-channel ``mean`` and ``std`` (population std, so the global figures below are exact) of posterior means,
    measured over ``images`` images described by ``source`` (``images`` 0: taken from elsewhere, e.g. a diffusers
    config's ``scaling_factor``)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    images: int = 0
    source: str = ""

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"latent statistics need one mean and one std per channel, got {len(self.mean)} means "
                             f"and {len(self.std)} stds")
        if not all(math.isfinite(v) for v in self.mean + self.std) or min(self.std) <= 0:
            raise ValueError("latent statistics must be finite, with every std > 0")

    @property
    def shift_factor(self) -> float:
        """The mean over all channels and positions (diffusers' ``shift_factor``)."""
        return sum(self.mean) / len(self.mean)

    @property
    def scaling_factor(self) -> float:
        """1 / the std over all channels and positions (diffusers' ``scaling_factor``): every channel holds the
        same number of values, so the pooled variance is the mean of the channel variances plus the variance of
        the channel means."""
        n = len(self.mean)
        var = sum(s * s for s in self.std) / n + sum(m * m for m in self.mean) / n - self.shift_factor ** 2
        return 1.0 / math.sqrt(var)

    @classmethod
    def uniform(cls, channels: int, scaling_factor: float, shift_factor: float = 0.0, source: str = "") -> LatentStats:
        """Statistics that normalise every channel alike, as diffusers' ``(z - shift_factor) * scaling_factor``."""
        return cls((shift_factor,) * channels, (1.0 / scaling_factor,) * channels, 0, source)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LatentStats:
        data = json.loads(text)
        return cls(data["mean"], data["std"], int(data.get("images", 0)), str(data.get("source", "")))

    def _view(self, values: tuple[float, ...], z: torch.Tensor) -> torch.Tensor:
        if z.shape[-3] != len(values):
            raise ValueError(f"latent has {z.shape[-3]} channels, the statistics {len(values)}")
        return torch.tensor(values, dtype=z.dtype, device=z.device).view(-1, 1, 1)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """(z - mean) / std per channel; z is (c, h, w) or (B, c, h, w)."""
        return (z - self._view(self.mean, z)) / self._view(self.std, z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self._view(self.std, z) + self._view(self.mean, z)


class Moments:
    """Running per-channel sums of latents, in float64 so that thousands of images do not lose precision.

    `state` and `from_state` carry the sums through JSON exactly (Python writes floats that read back to the same
    bits), and `merge` adds another's: a sharded encode keeps each shard's sums in the shard and adds them in shard
    order, so its statistics do not depend on how many processes encoded the shards."""

    def __init__(self):
        self.n_images, self.count, self.sum, self.sq = 0, 0, None, None

    def add(self, z: torch.Tensor) -> None:
        self.n_images += z.shape[0]
        z = z.double().transpose(0, 1).flatten(1)  # (c, B*h*w)
        self.merge_sums(z.shape[1], z.sum(1), z.square().sum(1))

    def merge_sums(self, count: int, total: torch.Tensor, sq: torch.Tensor) -> None:
        self.sum = total if self.sum is None else self.sum + total
        self.sq = sq if self.sq is None else self.sq + sq
        self.count += count

    def merge(self, other: "Moments") -> None:
        if other.sum is not None:
            self.n_images += other.n_images
            self.merge_sums(other.count, other.sum, other.sq)

    def state(self) -> dict:
        return {"images": self.n_images, "count": self.count,
                "sum": None if self.sum is None else self.sum.tolist(),
                "sum_sq": None if self.sq is None else self.sq.tolist()}

    @classmethod
    def from_state(cls, state: dict) -> "Moments":
        m = cls()
        if state.get("sum") is not None:
            m.n_images = int(state["images"])
            m.merge_sums(int(state["count"]), torch.tensor(state["sum"], dtype=torch.float64),
                         torch.tensor(state["sum_sq"], dtype=torch.float64))
        return m

    def stats(self, source: str) -> LatentStats:
        mean = self.sum / self.count
        std = (self.sq / self.count - mean.square()).clamp_min(1e-12).sqrt()
        return LatentStats(mean.tolist(), std.tolist(), self.n_images, source)


@torch.no_grad()
def measure(model, paths: Iterable[Path], batch_size: int = 16, source: str = "",
            on_skip: Callable[[str], None] = lambda message: None,
            on_batch: Callable[[int], None] | None = None) -> LatentStats:
    """Per-channel statistics of ``model``'s posterior means over the images ``paths``, each preprocessed as
    `bench rfid` and `encode` do (shorter side to the model's resolution, center crop). Unreadable images are
    passed to ``on_skip`` and left out."""
    device = next(model.parameters()).device
    resolution = model.config.resolution
    moments, batch = Moments(), []

    def flush():
        moments.add(model.encode(torch.stack(batch).to(device)).latent_dist.mode().float())
        if on_batch is not None:
            on_batch(len(batch))
        batch.clear()

    for path in paths:
        try:
            batch.append(eval_crop(path, resolution))
        except InputError as exc:
            on_skip(str(exc))
            continue
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if moments.n_images < 1:
        raise InputError(f"{source or 'data'}: no readable images to measure latent statistics on")
    return moments.stats(source)


def spread(paths: list[Path], limit: int | None) -> list[Path]:
    """At most ``limit`` of ``paths``, evenly spaced, so that a bounded sample still covers every folder."""
    if limit is None or len(paths) <= limit:
        return paths
    return [paths[i * len(paths) // limit] for i in range(limit)]


def measure_folder(model, data: str | Path, limit: int | None = None, batch_size: int = 16,
                   on_skip: Callable[[str], None] = lambda message: None,
                   on_batch: Callable[[int], None] | None = None) -> LatentStats:
    """`measure` over the images under ``data``: all of them, or ``limit`` spread evenly over the sorted list."""
    paths = spread(find_files(data, IMAGE_SUFFIXES), limit)
    if not paths:
        raise InputError(f"{data}: no images found")
    return measure(model, paths, batch_size, f"{data} ({len(paths)} images, center crop {model.config.resolution})",
                   on_skip, on_batch)
