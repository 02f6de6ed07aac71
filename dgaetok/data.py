"""Training data: an image folder with random crops and flips whose randomness is a pure function of the draw.

Every draw k (the k-th image this process takes, counting across epochs) seeds its own augmentation, so a run
resumed at step s sees exactly the images and crops the uninterrupted run would have seen.
"""
from __future__ import annotations

import random
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

from .errors import InputError
from .files import (DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, center_crop, describe_failure, open_image,
                    resize_shorter_side, to_tensor, walk_files)


class ImageFolder(Dataset):
    """Images under ``root``, shorter side resized to ``resolution`` (photos smaller than that are upscaled),
    then a random ``crop``-sized square and a horizontal flip with probability 1/2.

    Indexing takes a draw number (see `DrawSampler`); an unreadable image (or one over the pixel budget once
    resized, see `open_image`) is reported and replaced by the next one, so a single bad file cannot stop training.
    """

    def __init__(self, root: str | Path, resolution: int, crop: int | None = None, seed: int = 0):
        self.root, self.files = root, walk_files(root, IMAGE_SUFFIXES)  # strings: ImageNet has 1.28M files
        if not self.files:
            raise InputError(f"{root}: no images found")
        self.resolution, self.crop, self.seed = resolution, crop or resolution, seed
        if self.crop > resolution:
            raise ValueError(f"crop {self.crop} is larger than the resolution {resolution}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, draw: int) -> torch.Tensor:
        epoch, pos = divmod(draw, len(self.files))
        order = list(range(len(self.files)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        rng = random.Random(f"{self.seed}:{draw}")
        for offset in range(len(self.files)):
            path = self.files[order[(pos + offset) % len(self.files)]]
            try:
                img = open_image(path, DEFAULT_MAX_PIXELS, self.resolution)
                img = resize_shorter_side(img, self.resolution)
                break
            except Exception as exc:  # whatever one file causes (not KeyboardInterrupt)
                warnings.warn(f"skipping {describe_failure(path, exc)}", stacklevel=1)
        else:
            raise InputError("no readable image in the training folder")
        w, h = img.size
        left, top = rng.randint(0, w - self.crop), rng.randint(0, h - self.crop)
        x = to_tensor(img.crop((left, top, left + self.crop, top + self.crop)))
        return x.flip(-1) if rng.random() < 0.5 else x

    def fixed_batch(self, n: int) -> torch.Tensor:
        """The first n readable images, center-cropped as at evaluation: the batch that reconstruction grids show.
        InputError when no image is readable at all."""
        images = []
        for path in self.files:
            try:
                img = open_image(path, DEFAULT_MAX_PIXELS, self.resolution)
                images.append(to_tensor(center_crop(img, self.resolution, 1)[0]))
            except Exception:  # unreadable files are reported when training draws them
                continue
            if len(images) == n:
                break
        if not images:
            raise InputError(f"{self.root}: no readable image among its {len(self.files)} image files")
        return torch.stack(images)


class DrawSampler(Sampler[int]):
    """Endless draw numbers for one process of a (possibly distributed) run, starting at ``start_step``.

    Process ``rank`` of ``world`` takes draws rank, rank + world, ... in batches of ``batch_size``.
    """

    def __init__(self, batch_size: int, start_step: int = 0, rank: int = 0, world: int = 1):
        self.batch_size, self.start, self.rank, self.world = batch_size, start_step * batch_size, rank, world

    def __iter__(self):
        k = self.start
        while True:
            yield k * self.world + self.rank
            k += 1
