"""Training data: an image folder with random crops and flips whose randomness is a pure function of the draw, and
`LatentDataset`, the latents of a `dgaetok encode --shards` folder for training a diffusion model on them.

Every draw k (the k-th image a shard of the run takes, counting across epochs) decides its own file and
augmentation, so a run resumed at step s sees exactly the images and crops the uninterrupted run would have seen.
The decisions live in small pure methods (`ImageFolder.candidates`, `ImageFolder.augmentation`,
`DrawSampler.draws`) so that another image source (decoded images kept on the GPU, say) can make the same ones.
"""
from __future__ import annotations

import os
import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from .errors import InputError
from .files import (DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, center_crop, describe_failure, open_image,
                    resize_shorter_side, safetensors_header, to_tensor, walk_files)
from .shards import read_dataset
from .stats import LatentStats


class PathTable(Sequence[Path]):
    """File paths packed into one bytes buffer with an offset array.

    ImageNet's 1.28M paths as `Path` objects take about 400 MB in every process, and each DataLoader worker
    that reads them dirties the pages holding their reference counts, so forked workers end up with private
    copies. Packed, they take about 70 MB that forked workers share. Names round-trip through `os.fsencode`, so
    names that are not valid UTF-8 survive.
    """

    def __init__(self, paths: Sequence[str | os.PathLike]):
        encoded = [os.fsencode(p) for p in paths]
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> Path:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        return Path(os.fsdecode(self._blob[self._offsets[index]:self._offsets[index + 1]].tobytes()))


@dataclass(frozen=True)
class Augmentation:
    """Where a draw's crop sits in the resized image (pixels), and whether it is mirrored."""

    left: int
    top: int
    flip: bool


class ImageFolder(Dataset):
    """Images under ``root``, shorter side resized to ``resolution`` (photos smaller than that are upscaled),
    then a random ``crop``-sized square and a horizontal flip with probability 1/2.

    Indexing takes a draw number (see `DrawSampler`): epoch ``draw // len(self)`` visits the files in a seeded
    permutation, computed once per epoch and cached. An unreadable image (or one over the pixel budget once
    resized, see `open_image`) is reported and replaced by the next one in that order, so a single bad file cannot
    stop training. ``files`` (a list of paths) skips listing ``root``, which then only names the data in messages.
    """

    def __init__(self, root: str | Path, resolution: int, crop: int | None = None, seed: int = 0,
                 files: Sequence[str | os.PathLike] | None = None):
        self.root = root
        self.files = PathTable(walk_files(root, IMAGE_SUFFIXES) if files is None else files)  # 1.28M: strings
        if not len(self.files):
            raise InputError(f"{root}: no images found")
        self.resolution, self.crop, self.seed = resolution, crop or resolution, seed
        if self.crop > resolution:
            raise ValueError(f"crop {self.crop} is larger than the resolution {resolution}")
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.files)

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of file indices. The last two epochs are cached: a batch may straddle two.

        The shuffle is the one this class has always used (Python's, seeded by seed and epoch), so runs started
        before the permutation was cached resume with the same images; it takes about a second at 1.28M files,
        once per epoch."""
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                del self._orders[min(self._orders)]
            order = list(range(len(self.files)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders[epoch] = np.array(order, dtype=np.int64)
        return self._orders[epoch]

    def candidates(self, draw: int) -> Iterator[int]:
        """File indices for ``draw``: its own first, then the ones after it in the epoch's order (used in turn
        while a file is unreadable)."""
        epoch, pos = divmod(draw, len(self.files))
        order = self.order(epoch)
        for offset in range(len(self.files)):
            yield int(order[(pos + offset) % len(self.files)])

    def augmentation(self, draw: int, size: tuple[int, int]) -> Augmentation:
        """The crop offsets and flip of ``draw`` for a resized image of ``size`` (width, height)."""
        rng = random.Random(f"{self.seed}:{draw}")
        w, h = size
        left, top = rng.randint(0, w - self.crop), rng.randint(0, h - self.crop)
        return Augmentation(left, top, rng.random() < 0.5)

    def load(self, index: int) -> Image.Image:
        """File ``index`` decoded and resized (shorter side to the resolution); InputError if unreadable."""
        img = open_image(self.files[index], DEFAULT_MAX_PIXELS, self.resolution)
        return resize_shorter_side(img, self.resolution)

    def __getitem__(self, draw: int) -> torch.Tensor:
        for index in self.candidates(draw):
            try:
                img = self.load(index)
                break
            except Exception as exc:  # whatever one file causes (not KeyboardInterrupt)
                warnings.warn(f"skipping {describe_failure(self.files[index], exc)}", stacklevel=1)
        else:
            raise InputError("no readable image in the training folder")
        aug = self.augmentation(draw, img.size)
        x = to_tensor(img.crop((aug.left, aug.top, aug.left + self.crop, aug.top + self.crop)))
        return x.flip(-1) if aug.flip else x

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


class DeviceImages:
    """An `ImageFolder`'s images decoded once and kept on ``device`` as uint8, with its draws made on the host.

    For small datasets and small models on a GPU, where decoding JPEGs and copying batches from the host would
    otherwise bound the step time: `batch` cuts each draw's crop out of the resident image and flips it on the
    device, taking file, crop and flip from the folder's pure per-draw methods (`ImageFolder.candidates`,
    `ImageFolder.augmentation`). So ``batch(draws)`` equals ``torch.stack([folder[d] for d in draws])`` exactly,
    unreadable files included (they are skipped the same way), and a run may switch between the two paths.
    Nothing in `batch` waits for the device. ``workers`` threads decode the files at start.
    """

    def __init__(self, folder: ImageFolder, device: torch.device | str, workers: int = 8):
        self.folder, self.device = folder, torch.device(device)

        def load(index: int) -> torch.Tensor | None:
            try:
                return torch.from_numpy(np.asarray(folder.load(index), dtype=np.uint8).copy()).permute(2, 0, 1)
            except Exception as exc:  # as ImageFolder: whatever one file causes
                warnings.warn(f"skipping {describe_failure(folder.files[index], exc)}", stacklevel=1)
                return None

        with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes with the GIL released
            host = list(pool.map(load, range(len(folder))))
        if all(img is None for img in host):
            raise InputError("no readable image in the training folder")
        self.nbytes = sum(img.numel() for img in host if img is not None)
        if self.device.type == "cuda" and self.nbytes > 0.5 * torch.cuda.mem_get_info(self.device)[0]:
            raise InputError(f"{self.nbytes / 2**30:.1f} GiB of decoded training images would take over half of "
                             f"the free memory of {self.device}; drop --data-on-device")
        self.images = [None if img is None else img.to(self.device) for img in host]

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, draws: list[int]) -> torch.Tensor:
        """Images (B, 3, crop, crop) in [-1, 1] on the device, for ``draws`` as `ImageFolder` makes them."""
        crop, crops = self.folder.crop, []
        for draw in draws:
            img = next(self.images[i] for i in self.folder.candidates(draw) if self.images[i] is not None)
            aug = self.folder.augmentation(draw, (img.shape[2], img.shape[1]))
            x = img[:, aug.top:aug.top + crop, aug.left:aug.left + crop]
            crops.append(x.flip(-1) if aug.flip else x)
        return torch.stack(crops).float().div(127.5).sub(1.0)  # as files.to_tensor


class DrawSampler(Sampler[int]):
    """Endless draw numbers for one process of a (possibly distributed) run, starting at ``start_step``.

    The run's data is split into ``world * accum`` shards: shard v takes draws v, v + V, v + 2V, ... (V the
    number of shards), ``micro_batch`` of them per step. Process ``rank`` holds shards ``rank * accum`` to
    ``rank * accum + accum - 1``, one per micro-batch of gradient accumulation, and each step yields their
    micro-batches one after the other. So one process with ``accum`` 8 sees, shard by shard, the images that 8
    processes see, and with ``accum`` 1 process ``rank`` takes draws rank, rank + world, ...
    """

    def __init__(self, micro_batch: int, start_step: int = 0, rank: int = 0, world: int = 1, accum: int = 1):
        self.micro_batch, self.start_step = micro_batch, start_step
        self.rank, self.world, self.accum = rank, world, accum

    def shards(self) -> range:
        """This process's shards; shard ``rank * accum + j`` is micro-batch j of every step."""
        return range(self.rank * self.accum, (self.rank + 1) * self.accum)

    def draws(self, step: int) -> list[int]:
        """The draws of this process's batch at ``step``: micro-batch 0's, then micro-batch 1's, ..."""
        shards = self.world * self.accum
        return [(step * self.micro_batch + i) * shards + v for v in self.shards() for i in range(self.micro_batch)]

    def __iter__(self):
        step = self.start_step
        while True:
            yield from self.draws(step)
            step += 1


class LatentDataset(Dataset):
    """The latents of a `dgaetok encode --shards` folder, as ``(latent, label)`` pairs for a diffusion model.

    Shards are memory-mapped (numpy memmaps at the tensor offsets their safetensors header gives), never loaded
    whole: a batch reads only its own latents' pages, and forked DataLoader workers share the page cache. Latents
    come as float32 (c, h, w), normalised per channel with the statistics measured at encoding, ``(z - mean) /
    std`` (``normalize=False``: as encoded); ``flip=True`` returns, for each draw with probability 1/2 (torch's
    random generator, which DataLoader seeds per worker), the latent of the mirrored image, which needs a
    dataset encoded with ``--flip``. Labels are int64, -1 for an image without a class; ``classes`` names them.

    `batch` reads many indices at once, and DataLoader uses it through ``__getitems__``: per-item indexing costs
    more in Python than a whole batch does in numpy.
    """

    def __init__(self, root: str | os.PathLike, normalize: bool = True, flip: bool = False):
        self.root, self.normalize, self.flip = Path(root), normalize, flip
        self.info = read_dataset(root)
        self.classes: list[str] = list(self.info.get("classes") or [])
        stats = self.info.get("latent_stats")
        self.stats = LatentStats(**stats) if stats else None
        if normalize and self.stats is None:
            raise InputError(f"{root}: no latent statistics in dataset.json (no image was encoded)")
        if flip and not self.info.get("flip"):
            raise InputError(f"{root}: encoded without --flip, so there are no mirrored latents to draw")
        self.latent_shape = tuple(self.info["latent_shape"])
        self.files = [self.root / shard["file"] for shard in self.info["shards"]]
        counts = [int(shard["images"]) for shard in self.info["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.layout = [self._layout(path, n) for path, n in zip(self.files, counts)]
        self.labels = np.concatenate([np.asarray(self._map(k, "labels")) for k in range(len(self.files))]
                                     or [np.zeros(0, np.int64)])
        self._maps: dict = {}
        if self.stats is not None:
            self._mean = np.array(self.stats.mean, dtype=np.float32).reshape(1, -1, 1, 1)
            self._std = np.array(self.stats.std, dtype=np.float32).reshape(1, -1, 1, 1)

    def _layout(self, path: Path, count: int) -> dict[str, tuple[int, str, tuple[int, ...]]]:
        """name -> (byte offset, safetensors dtype, shape) of a shard's tensors, checked against dataset.json."""
        header = safetensors_header(path)
        with open(path, "rb") as fh:
            begin = 8 + int.from_bytes(fh.read(8), "little")
        out = {}
        for key in ("latents", "labels", *(("latents_flip",) if self.flip else ())):
            entry = header.get(key)
            if not isinstance(entry, dict):
                raise InputError(f"{path}: no {key} tensor in the shard")
            shape, dtype = tuple(entry["shape"]), entry["dtype"]
            want = (count, *self.latent_shape) if key != "labels" else (count,)
            if shape != want or dtype not in _NUMPY_DTYPES:
                raise InputError(f"{path}: {key} is {dtype} {list(shape)}, dataset.json says {list(want)}; was the "
                                 f"shard replaced?")
            size = int(np.prod(shape)) * np.dtype(_NUMPY_DTYPES[dtype]).itemsize
            if entry["data_offsets"][1] - entry["data_offsets"][0] != size or \
                    os.path.getsize(path) < begin + entry["data_offsets"][1]:
                raise InputError(f"{path}: cut short or corrupt ({key} does not fit the file)")
            out[key] = (begin + entry["data_offsets"][0], dtype, shape)
        return out

    def _map(self, k: int, key: str) -> np.ndarray:
        offset, dtype, shape = self.layout[k][key]
        if not shape[0]:
            return np.zeros(shape, _NUMPY_DTYPES[dtype])
        return np.memmap(self.files[k], _NUMPY_DTYPES[dtype], "r", offset, shape)

    def __getstate__(self) -> dict:  # a spawned worker maps the files itself instead of receiving a copy
        return {**self.__dict__, "_maps": {}}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (B, c, h, w) float32 and labels (B,) of ``indices``."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} latents")
        idx %= max(1, len(self))
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        local = idx - self.starts[shard]
        mirrored = (torch.rand(len(idx)) < 0.5).numpy() if self.flip else np.zeros(len(idx), bool)
        dtype = _NUMPY_DTYPES[self.layout[0]["latents"][1]] if self.layout else np.float32
        out = np.empty((len(idx), *self.latent_shape), dtype)
        for k in np.unique(shard):
            for key, pick in (("latents", ~mirrored), ("latents_flip", mirrored)):
                rows = (shard == k) & pick
                if rows.any():
                    if (k, key) not in self._maps:
                        self._maps[k, key] = self._map(k, key)
                    out[rows] = self._maps[k, key][local[rows]]
        # numpy, not torch: one thread, whereas torch's elementwise kernels on a busy machine wait on their
        # thread pool (30 ms instead of 1 ms a batch on 2 shared cores)
        z = (out.astype(np.uint32) << 16).view(np.float32) if dtype == np.int16 else out  # bf16 bits -> float32
        if self.normalize:
            z = (z - self._mean) / self._std
        return torch.from_numpy(z), torch.from_numpy(self.labels[idx])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        z, y = self.batch([index])
        return z[0], int(y[0])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        z, y = self.batch(indices)
        return list(zip(z.unbind(0), y.tolist()))


_NUMPY_DTYPES = {"F32": np.float32, "BF16": np.int16, "I64": np.int64}  # bf16 is read as its bits
