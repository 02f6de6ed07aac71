"""Folder-to-folder encode and decode jobs: batched, resumable, and going on past bad files.

Each job yields one `Item` per input so the caller can show progress; failures are reported in the item, never
raised, so one bad file cannot stop a batch.
"""
from __future__ import annotations

import hashlib
import json
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError

from . import __version__
from .errors import InputError
from .files import (IMAGE_SUFFIXES, center_crop, crop_meta, find_files, open_image, padding_of, read_latent,
                    save_png, to_tensor, unpad, write_latent)
from .models import Tokenizer
from .tiling import PIXEL_BUDGET


@dataclass
class Item:
    src: Path
    dst: Path
    status: str  # "done", "skipped" (output already there) or "failed"
    error: str = ""
    note: str = ""  # something the user should know about a file that was done (e.g. it was decoded tiled)


@dataclass
class Job:
    """Inputs paired with the outputs they map to, mirroring the source tree under the output folder."""

    pairs: list[tuple[Path, Path]]
    conflicts: list[Item]

    @classmethod
    def plan(cls, src: str | Path, dst: str | Path, suffixes: set[str], out_suffix: str,
             limit: int | None = None) -> "Job":
        src, dst = Path(src), Path(dst)
        files = find_files(src, suffixes)[:limit]
        if not files:
            raise InputError(f"{src}: no {' / '.join(sorted(suffixes))} files found")
        pairs, conflicts, seen = [], [], {}
        for path in files:
            rel = path.relative_to(src) if src.is_dir() else Path(path.name)
            out = dst / rel.with_suffix(out_suffix)
            if out in seen:
                conflicts.append(Item(path, out, "failed", f"{path}: output {out} is also the output of {seen[out]}"))
                continue
            seen[out] = path
            pairs.append((path, out))
        return cls(pairs, conflicts)

    def __len__(self) -> int:
        return len(self.pairs) + len(self.conflicts)


def _batches(
    pairs: list[tuple[Path, Path]], load: Callable[[Path], object], batch_size: int, overwrite: bool, workers: int
) -> Iterator[tuple[list[Item], list[tuple[Path, Path, object]]]]:
    """Group loaded inputs into batches of equal tensor shape; loading runs ahead in a thread pool."""
    todo, finished = [], []
    for src, dst in pairs:
        if dst.is_file() and not overwrite:  # not exists(): a folder in the way must fail, not count as done
            finished.append(Item(src, dst, "skipped"))
        else:
            todo.append((src, dst))

    def safe_load(pair):
        try:
            return pair, load(pair[0]), None
        except InputError as exc:
            return pair, None, str(exc)

    batch: list[tuple[Path, Path, object]] = []
    # Read ahead by a bounded window (pool.map would load every input of the job into memory at once).
    todo_iter, pending = iter(todo), deque()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for pair in todo_iter:
            pending.append(pool.submit(safe_load, pair))
            if len(pending) >= batch_size + 2 * max(1, workers):
                break
        try:
            while pending:
                (src, dst), value, error = pending.popleft().result()
                for pair in todo_iter:
                    pending.append(pool.submit(safe_load, pair))
                    break
                if error:
                    finished.append(Item(src, dst, "failed", error))
                    continue
                if batch and (len(batch) == batch_size or _shape(batch[0][2]) != _shape(value)):
                    yield finished, batch
                    finished, batch = [], []
                batch.append((src, dst, value))
        finally:  # an abandoned job (Ctrl-C, an error downstream) does not wait for loads nobody will use
            for future in pending:
                future.cancel()
    yield finished, batch


def _shape(value) -> tuple:
    return tuple(value[0].shape)


def _write_each(batch, write: Callable[[Path, Path, int], None], note: str = "") -> Iterator[Item]:
    for i, (src, dst, _) in enumerate(batch):
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            write(src, dst, i)
            yield Item(src, dst, "done", note=f"{src}: {note}" if note else "")
        except OSError as exc:
            yield Item(src, dst, "failed", f"{dst}: cannot write ({exc.strerror or exc})")
        except SafetensorError as exc:  # safetensors reports I/O errors (disk full, no permission) as its own type
            yield Item(src, dst, "failed", f"{dst}: cannot write ({str(exc).splitlines()[0]})")


def encode_folder(
    model: Tokenizer,
    job: Job,
    src_root: Path,
    batch_size: int = 16,
    sample: bool = False,
    keep_size: bool = False,
    overwrite: bool = False,
    seed: int = 0,
    workers: int = 4,
    tile: int | None = None,
    overlap: int = 32,
) -> Iterator[Item]:
    """Encode images to one latent file each; existing outputs are skipped unless ``overwrite``.

    ``keep_size`` encodes whole images, padded to the model's size multiple (`files.pad_to_multiple`; the
    padding is recorded and `decode_folder` crops it off). ``tile`` encodes in overlapping tiles
    (`Tokenizer.encode`).
    """
    cfg = model.config
    device = next(model.parameters()).device
    model_meta = {"model_hash": model.file_hash, "model_config": cfg.to_json(), "dgaetok_version": __version__}

    def source(src: Path) -> str:
        return str(src.relative_to(src_root) if src_root.is_dir() else src.name)

    def load(path: Path):
        img, crop = center_crop(open_image(path), cfg.resolution, model.size_multiple, keep_size)
        return to_tensor(img), crop

    yield from job.conflicts
    for finished, batch in _batches(job.pairs, load, batch_size, overwrite, workers):
        yield from finished
        if not batch:
            continue
        x = torch.stack([value[0] for _, _, value in batch]).to(device)
        with torch.no_grad():
            dist = model.encode(x, tile=tile, overlap=overlap).latent_dist
            z = dist.mode()
            if sample:  # noise per image, so a file's latent does not depend on batching or on a resumed run
                noise = torch.stack([_posterior_noise(seed, source(src), z.shape[1:]) for src, _, _ in batch])
                z = dist.mean + dist.std * noise.to(z.device)

        def write(src: Path, dst: Path, i: int) -> None:
            meta = {**model_meta, **crop_meta(batch[i][2][1]), "sampled": json.dumps(sample),
                    "source": source(src)}
            write_latent(dst, z[i], meta)

        yield from _write_each(batch, write)


def _posterior_noise(seed: int, source: str, shape: torch.Size) -> torch.Tensor:
    """N(0, I) noise for one image's --sample draw, seeded by --seed and its source path, drawn on the CPU."""
    digest = hashlib.sha256(f"{seed}:{source}".encode()).digest()
    return torch.randn(shape, generator=torch.Generator().manual_seed(int.from_bytes(digest[:8], "little")))


def check_latent(model: Tokenizer, path: Path, latent: torch.Tensor, meta: dict[str, str]) -> None:
    """Refuse latents another model made, or of a shape this model cannot decode."""
    made_by = meta.get("model_hash", "")
    if model.file_hash and made_by and made_by != model.file_hash:
        raise InputError(f"{path}: latent was made by model {made_by}, not by the loaded model {model.file_hash}")
    c = model.config.latent_channels
    if latent.shape[0] != c:
        raise InputError(f"{path}: latent has {latent.shape[0]} channels, the model expects {c}")
    f, multiple = model.config.downsample, model.size_multiple
    if (latent.shape[1] * f) % multiple or (latent.shape[2] * f) % multiple:
        raise InputError(f"{path}: latent decodes to {latent.shape[2] * f}x{latent.shape[1] * f}, not a multiple "
                         f"of {multiple} as this model needs")


def decode_folder(
    model: Tokenizer,
    job: Job,
    steps: int = 50,
    sampler: str = "euler",
    shift: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    overwrite: bool = False,
    workers: int = 2,
    tile: int | None = None,
    overlap: int = 32,
    pixel_budget: int | None = PIXEL_BUDGET,
) -> Iterator[Item]:
    """Decode latent files to PNGs, cropped to the size recorded in each latent (``encode --keep-size``).

    Every image starts from the same seeded noise, so an output does not depend on batch size or on which
    other files are decoded alongside it. ``tile``, ``overlap`` and ``pixel_budget``: see `decode_batch`.
    """
    device = next(model.parameters()).device
    f = model.config.downsample

    def load(path: Path):
        latent, meta = read_latent(path)
        check_latent(model, path, latent, meta)
        return latent, padding_of(meta, (latent.shape[1] * f, latent.shape[2] * f), path)

    yield from job.conflicts
    for finished, batch in _batches(job.pairs, load, batch_size, overwrite, workers):
        yield from finished
        if not batch:
            continue
        z = torch.stack([value[0] for _, _, value in batch]).to(device)
        noise = seeded_noise(seed, z.shape[2] * f, z.shape[3] * f, len(batch))
        images, note = decode_batch(model, z, noise, steps, sampler, shift, tile, overlap, pixel_budget)
        yield from _write_each(batch, lambda src, dst, i: save_png(unpad(images[i], batch[i][2][1]), dst), note)


def seeded_noise(seed: int, height: int, width: int, n: int) -> torch.Tensor:
    """The starting noise of a decode: one CPU draw from ``seed``, shared by the ``n`` images of a batch."""
    return torch.randn((1, 3, height, width), generator=torch.Generator().manual_seed(seed)).expand(n, -1, -1, -1)


def decode_batch(model: Tokenizer, z: torch.Tensor, noise: torch.Tensor, steps: int, sampler: str, shift: float,
                 tile: int | None = None, overlap: int = 32,
                 pixel_budget: int | None = PIXEL_BUDGET) -> tuple[torch.Tensor, str]:
    """Decode a batch whole, or in ``tile``-pixel tiles when asked; returns the images and a note for the user.

    ``pixel_budget`` (None: no limit) bounds the pixels one decoder call takes, images times image or tile
    size: a batch over it is decoded a few images at a time (which changes nothing but float rounding), and
    without ``tile`` an image over it is tiled, decided before anything is allocated. A batch that runs out
    of memory whole (CUDA, or the CPU allocator refusing) is retried in tiles. Such a fallback decodes exactly
    as ``tile=fallback_tile(model)`` would, from the same noise, and the note says so in one line.
    """
    h, w = noise.shape[-2:]
    if tile:
        return _decode_within(model, z, noise, steps, sampler, shift, tile, overlap, pixel_budget), ""
    if pixel_budget is not None and h * w > pixel_budget:
        reason = f"{w}x{h} is over the pixel budget of {pixel_budget}"
    else:
        try:
            return _decode_within(model, z, noise, steps, sampler, shift, None, overlap, pixel_budget), ""
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
                raise
            reason = f"out of memory decoding {w}x{h} whole"
        if z.device.type == "cuda":  # outside the except block: the traceback no longer pins the failed tensors
            torch.cuda.empty_cache()
    tile = fallback_tile(model)
    note = f"{reason}; decoded in {tile}-pixel tiles (as --tile {tile} --overlap {overlap})"
    return _decode_within(model, z, noise, steps, sampler, shift, tile, overlap, pixel_budget), note


def fallback_tile(model: Tokenizer) -> int:
    """The tile of an automatic fallback: the model's training resolution (tiles then see images of the size
    the GroupNorm statistics were learnt on), rounded down to its size multiple."""
    return max(model.size_multiple, model.config.resolution // model.size_multiple * model.size_multiple)


def _decode_within(model: Tokenizer, z: torch.Tensor, noise: torch.Tensor, steps: int, sampler: str, shift: float,
                   tile: int | None, overlap: int, pixel_budget: int | None) -> torch.Tensor:
    """``model.decode`` in as few calls as keep each under ``pixel_budget`` pixels (at least one image or tile)."""
    kwargs = dict(steps=steps, sampler=sampler, shift=shift, tile=tile, overlap=overlap)
    if pixel_budget is None:
        return model.decode(z, noise=noise, **kwargs)
    h, w = noise.shape[-2:]
    unit = h * w if tile is None else min(tile, h) * min(tile, w)  # pixels per image in one network call
    per_call = max(1, pixel_budget // unit)
    images = min(len(z), per_call)
    chunk = max(1, per_call // images)  # tiles per call, when tiled
    return torch.cat([model.decode(z[i:i + images], noise=noise[i:i + images], chunk=chunk, **kwargs)
                      for i in range(0, len(z), images)])


def summarize(items: Iterable[Item]) -> dict[str, list[Item]]:
    out: dict[str, list[Item]] = {"done": [], "skipped": [], "failed": []}
    for item in items:
        out[item.status].append(item)
    return out


def encode_job(src: str | Path, dst: str | Path, limit: int | None = None) -> Job:
    return Job.plan(src, dst, IMAGE_SUFFIXES, ".safetensors", limit)


def decode_job(src: str | Path, dst: str | Path, limit: int | None = None) -> Job:
    return Job.plan(src, dst, {".safetensors"}, ".png", limit)
