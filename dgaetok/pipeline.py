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
from .files import (IMAGE_SUFFIXES, center_crop, crop_meta, find_files, open_image, read_latent, save_png,
                    to_tensor, write_latent)
from .models import Tokenizer
from .stats import LatentStats


@dataclass
class Item:
    src: Path
    dst: Path
    status: str  # "done", "skipped" (output already there) or "failed"
    error: str = ""


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


def _write_each(batch, write: Callable[[Path, Path, int], None]) -> Iterator[Item]:
    for i, (src, dst, _) in enumerate(batch):
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            write(src, dst, i)
            yield Item(src, dst, "done")
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
    normalize: bool = False,
) -> Iterator[Item]:
    """Encode images to one latent file each; existing outputs are skipped unless ``overwrite``. ``normalize``
    writes ``model.normalize(z)`` and records the statistics in the metadata (``normalized``, ``latent_stats``), so
    that `decode_folder` and `load_latent` undo it."""
    cfg = model.config
    device = next(model.parameters()).device
    model_meta = {"model_hash": model.file_hash, "model_config": cfg.to_json(), "dgaetok_version": __version__}
    if normalize:
        model_meta |= {"normalized": "true", "latent_stats": model.require_stats().to_json()}

    def source(src: Path) -> str:
        return str(src.relative_to(src_root) if src_root.is_dir() else src.name)

    def load(path: Path):
        try:
            img, crop = center_crop(open_image(path), cfg.resolution, cfg.downsample, keep_size)
        except ValueError as exc:
            raise InputError(f"{path}: {exc}") from None
        return to_tensor(img), crop

    yield from job.conflicts
    for finished, batch in _batches(job.pairs, load, batch_size, overwrite, workers):
        yield from finished
        if not batch:
            continue
        x = torch.stack([value[0] for _, _, value in batch]).to(device)
        with torch.no_grad():
            dist = model.encode(x).latent_dist
            z = dist.mode()
            if sample:  # noise per image, so a file's latent does not depend on batching or on a resumed run
                noise = torch.stack([_posterior_noise(seed, source(src), z.shape[1:]) for src, _, _ in batch])
                z = dist.mean + dist.std * noise.to(z.device)
            if normalize:
                z = model.normalize(z)

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


def load_latent(model: Tokenizer, path: Path) -> torch.Tensor:
    """A latent file as ``model`` decodes it: checked to be ``model``'s (`check_latent`), and denormalised with
    the statistics it records when `encode --normalize` wrote it."""
    latent, meta = read_latent(path)
    check_latent(model, path, latent, meta)
    if meta.get("normalized") == "true":
        try:
            latent = LatentStats.from_json(meta["latent_stats"]).denormalize(latent)
        except (KeyError, ValueError, TypeError) as exc:
            raise InputError(f"{path}: marked normalized, but its latent statistics are unreadable ({exc})") from None
    return latent


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
) -> Iterator[Item]:
    """Decode latent files to PNGs. Every image starts from the same seeded noise, so an output does not
    depend on batch size or on which other files are decoded alongside it."""
    device = next(model.parameters()).device

    def load(path: Path):
        return (load_latent(model, path),)

    yield from job.conflicts
    for finished, batch in _batches(job.pairs, load, batch_size, overwrite, workers):
        yield from finished
        if not batch:
            continue
        z = torch.stack([value[0] for _, _, value in batch]).to(device)
        f = model.config.downsample
        noise_shape = (1, 3, z.shape[2] * f, z.shape[3] * f)
        noise = torch.randn(noise_shape, generator=torch.Generator().manual_seed(seed)).expand(len(batch), -1, -1, -1)
        images = model.decode(z, steps=steps, sampler=sampler, shift=shift, noise=noise)
        yield from _write_each(batch, lambda src, dst, i: save_png(images[i], dst))


def summarize(items: Iterable[Item]) -> dict[str, list[Item]]:
    out: dict[str, list[Item]] = {"done": [], "skipped": [], "failed": []}
    for item in items:
        out[item.status].append(item)
    return out


def encode_job(src: str | Path, dst: str | Path, limit: int | None = None) -> Job:
    return Job.plan(src, dst, IMAGE_SUFFIXES, ".safetensors", limit)


def decode_job(src: str | Path, dst: str | Path, limit: int | None = None) -> Job:
    return Job.plan(src, dst, {".safetensors"}, ".png", limit)
