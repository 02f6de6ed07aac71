"""Folder-to-folder encode and decode jobs: batched, resumable, and going on past bad files.

Each job yields one `Item` per input so the caller can show progress; failures are reported in the item, never
raised, so one bad file cannot stop a batch. That holds for whatever a file can cause: dgaetok's own
`InputError`, but also running out of memory, a kernel refusing an odd shape, or a bug (the message then names the
exception type). KeyboardInterrupt and SystemExit still stop the job.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from . import __version__
from .errors import InputError, TooLarge
from .files import (DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, LATENT_FORMAT, center_crop, check_pixels, crop_meta,
                    describe_failure, display_name, first_line, is_out_of_memory, mega, open_image, padding_of,
                    read_latent, safetensors_header, save_png, to_tensor, unpad, walk_files, write_latent)
from .models import FORMAT, DGAEConfig, Tokenizer
from .stats import LatentStats
from .tiling import TILED_BUDGET_FACTOR

# Latent values beyond this are no encoder's output (dgaetok's stay within a few units, SD's within ~50): a file
# scaled by mistake would decode to NaN, which the PNG writer turns into a black image.
LATENT_LIMIT = 1e3


@dataclass
class Item:
    src: Path
    dst: Path
    status: str  # "done", "skipped" (output already there) or "failed"
    error: str = ""
    note: str = ""  # what the user should know about a file that was done (it was decoded in tiles, say)


@dataclass
class Job:
    """Inputs paired with the outputs they map to, mirroring the source tree under the output folder.

    ``pairs`` are (input, output) paths as strings: planning a million-file job builds no `Path` per file (that
    alone took longer than listing the tree); items get theirs as they are yielded. ``conflicts`` are inputs that
    fail before any work: two inputs with one output, folders that cannot be read.
    """

    pairs: list[tuple[str, str]]
    conflicts: list[Item]

    @classmethod
    def plan(cls, src: str | Path, dst: str | Path, suffixes: set[str], out_suffix: str,
             limit: int | None = None) -> "Job":
        src, dst = Path(src), Path(dst)
        unreadable: list[str] = []
        files = walk_files(src, suffixes, unreadable)[:limit]
        if not files and not unreadable:
            raise InputError(f"{display_name(src)}: no {' / '.join(sorted(suffixes))} files found")
        is_dir = src.is_dir()
        prefix = os.path.join(os.fspath(src), "")  # walk_files joins below the root exactly so
        dst_root = os.path.join(os.fspath(dst), "")
        pairs, conflicts, seen = [], [], {}
        for path in files:
            rel = path[len(prefix):] if is_dir else os.path.basename(path)
            out = dst_root + os.path.splitext(rel)[0] + out_suffix
            if out in seen:
                conflicts.append(Item(Path(path), Path(out), "failed",
                                      f"{display_name(path)}: output {display_name(out)} is also the output of "
                                      f"{display_name(seen[out])}"))
                continue
            seen[out] = path
            pairs.append((path, out))
        for message in unreadable:
            conflicts.append(Item(src, dst, "failed", message))
        return cls(pairs, conflicts)

    def __len__(self) -> int:
        return len(self.pairs) + len(self.conflicts)


Entry = tuple[Path, Path, tuple]  # (source, output, loaded value: its first element is the tensor)


def _batches(
    pairs: list[tuple[str, str]], load: Callable[[Path], tuple], batch_size: int, overwrite: bool, workers: int,
    pixels: Callable[[tuple], int], max_pixels: int | None,
) -> Iterator[tuple[list[Item], list[Entry]]]:
    """Group loaded inputs into batches of equal tensor shape; loading runs ahead in a thread pool.

    A batch also stays within ``max_pixels`` in all (``pixels(value)`` per input), so that the budget that lets
    one large image through does not let ``batch_size`` of them through at once.
    """
    todo, finished = [], []
    for src, dst in pairs:
        if not overwrite and os.path.isfile(dst):  # not exists(): a folder in the way must fail, not count as done
            finished.append(Item(Path(src), Path(dst), "skipped"))
        else:
            todo.append((src, dst))

    def safe_load(pair):
        src, dst = Path(pair[0]), Path(pair[1])
        try:
            return (src, dst), load(src), None
        except Exception as exc:  # whatever a file causes fails that file (not KeyboardInterrupt / SystemExit)
            return (src, dst), None, describe_failure(src, exc)

    batch: list[Entry] = []
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
                fits = max(1, max_pixels // pixels(value)) if max_pixels else batch_size
                if batch and (len(batch) >= min(batch_size, fits) or _shape(batch[0][2]) != _shape(value)):
                    yield finished, batch
                    finished, batch = [], []
                batch.append((src, dst, value))
        finally:  # an abandoned job (Ctrl-C, an error downstream) does not wait for loads nobody will use
            for future in pending:
                future.cancel()
    yield finished, batch


def _shape(value) -> tuple:
    return tuple(value[0].shape)


def _run(batch: list[Entry], compute: Callable[[list[Entry]], Sequence]) -> list[tuple[Entry, object, str]]:
    """``compute`` the batch's outputs as (entry, output, ""); if it fails, each input alone, so that the input
    that runs out of memory or breaks a kernel fails as (entry, None, message) and the others are still made."""
    try:
        return [(entry, out, "") for entry, out in zip(batch, compute(batch))]
    except Exception as exc:
        if len(batch) == 1:
            return [(batch[0], None, describe_failure(batch[0][0], exc))]
    return [result for entry in batch for result in _run([entry], compute)]


def _write_each(results: list[tuple[Entry, object, str]], write: Callable[[Entry, object], str | None]
                ) -> Iterator[Item]:
    """Write each result; ``write`` may return a note for the file's item."""
    for entry, out, error in results:
        src, dst, _ = entry
        if error:
            yield Item(src, dst, "failed", error)
            continue
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            note = write(entry, out)
            yield Item(src, dst, "done", note=f"{display_name(src)}: {note}" if note else "")
        except OSError as exc:
            yield Item(src, dst, "failed", f"{display_name(dst)}: cannot write ({exc.strerror or exc})")
        except Exception as exc:
            yield Item(src, dst, "failed", describe_failure(dst, exc))


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
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    normalize: bool = False,
    tile: int | None = None,
    overlap: int = 32,
) -> Iterator[Item]:
    """Encode images to one latent file each; existing outputs are skipped unless ``overwrite``. An image whose
    model input would exceed ``max_pixels`` (the whole image with ``keep_size``) fails before it is decoded.
    ``normalize`` writes ``model.normalize(z)`` and records the statistics in the metadata (``normalized``,
    ``latent_stats``), so that `decode_folder` and `load_latent` undo it.

    ``keep_size`` encodes whole images, padded by mirroring to the model's `size_multiple`
    (`files.pad_to_multiple`); the padding is recorded and `decode_folder` crops it off. ``tile`` encodes in
    overlapping tiles (`Tokenizer.encode`)."""
    cfg = model.config
    device = next(model.parameters()).device
    model_meta = {"model_hash": model.file_hash, "model_config": cfg.to_json(), "dgaetok_version": __version__}
    if normalize:
        model_meta |= {"normalized": "true", "latent_stats": model.require_stats().to_json()}
    root_is_dir = src_root.is_dir()

    def source(src: Path) -> str:  # the path below SRC, printable (metadata is UTF-8 JSON)
        return display_name(os.path.relpath(src, src_root) if root_is_dir else src.name)

    def load(path: Path):
        img = open_image(path, max_pixels, None if keep_size else cfg.resolution)
        try:
            img, crop = center_crop(img, cfg.resolution, model.size_multiple, keep_size)
        except ValueError as exc:
            raise InputError(f"{display_name(path)}: {exc}") from None
        return to_tensor(img), crop

    def compute(batch: list[Entry]) -> torch.Tensor:
        x = torch.stack([value[0] for _, _, value in batch]).to(device)
        with torch.no_grad():
            dist = model.encode(x, tile=tile, overlap=overlap).latent_dist
            z = dist.mode()
            if sample:  # noise per image, so a file's latent does not depend on batching or on a resumed run
                noise = torch.stack([_posterior_noise(seed, source(src), z.shape[1:]) for src, _, _ in batch])
                z = dist.mean + dist.std * noise.to(z.device)
        return model.normalize(z) if normalize else z

    def write(entry: Entry, z: torch.Tensor) -> None:
        src, dst, (_, crop) = entry
        meta = {**model_meta, **crop_meta(crop), "sampled": json.dumps(sample), "source": source(src)}
        write_latent(dst, z, meta)

    yield from job.conflicts
    for finished, batch in _batches(job.pairs, load, batch_size, overwrite, workers,
                                    lambda value: value[0].shape[-1] * value[0].shape[-2], max_pixels):
        yield from finished
        if batch:
            yield from _write_each(_run(batch, compute), write)


def _posterior_noise(seed: int, source: str, shape: torch.Size) -> torch.Tensor:
    """N(0, I) noise for one image's --sample draw, seeded by --seed and its source path, drawn on the CPU."""
    digest = hashlib.sha256(f"{seed}:{source}".encode()).digest()
    return torch.randn(shape, generator=torch.Generator().manual_seed(int.from_bytes(digest[:8], "little")))


def check_latent(model: Tokenizer, path: Path, latent: torch.Tensor | Sequence[int], meta: dict[str, str],
                 max_pixels: int | None = None) -> None:
    """Refuse latents another model made (a distilled decoder takes its teacher's), or of a shape this model cannot decode, or that would decode to more
    than ``max_pixels`` (`TooLarge`). ``latent`` may be the tensor or just its shape (from the file's header)."""
    name = display_name(path)
    shape = tuple(getattr(latent, "shape", latent))
    made_by = meta.get("model_hash", "")
    if model.file_hash and made_by and not model.made(made_by):
        raise InputError(f"{name}: latent was made by model {made_by}, not by the loaded model {model.file_hash}")
    c = model.config.latent_channels
    if shape[0] != c:
        raise InputError(f"{name}: latent has {shape[0]} channels, the model expects {c}")
    h, w = shape[1:]
    if h < 1 or w < 1:
        raise InputError(f"{name}: latent has shape {shape}, an empty image")
    k = model.latent_multiple
    if h % k or w % k:
        raise InputError(f"{name}: latent has shape {shape}; this model decodes sides that are multiples of {k}")
    f = model.config.downsample
    check_pixels(path, (w * f, h * f), max_pixels, f"latent {shape} decodes to")


def load_latent(model: Tokenizer, path: Path, max_pixels: int | None = None) -> torch.Tensor:
    """A latent file as ``model`` decodes it: checked to be ``model``'s (`check_latent`, before its data is read),
    within any encoder's range, and denormalised with the statistics it records when `encode --normalize` wrote
    it."""
    return load_latent_and_meta(model, path, max_pixels)[0]


def load_latent_and_meta(model: Tokenizer, path: Path, max_pixels: int | None = None
                         ) -> tuple[torch.Tensor, dict[str, str]]:
    """`load_latent`, and the file's metadata."""
    latent, meta = read_latent(path, lambda shape, meta: check_latent(model, path, shape, meta, max_pixels))
    return as_encoded(latent, meta, path), meta


def as_encoded(latent: torch.Tensor, meta: dict[str, str], path: Path) -> torch.Tensor:
    """A latent as its encoder made it: checked to be within any encoder's range, and denormalised with the
    statistics it records when `encode --normalize` wrote it."""
    peak = latent.abs().max().item()
    if peak > LATENT_LIMIT:
        raise InputError(f"{display_name(path)}: latent values reach {peak:.3g}, far outside any encoder's "
                         f"range (within +-{LATENT_LIMIT:g}); was it scaled?")
    if meta.get("normalized") == "true":
        try:
            latent = LatentStats.from_json(meta["latent_stats"]).denormalize(latent)
        except (KeyError, ValueError, TypeError) as exc:
            raise InputError(f"{display_name(path)}: marked normalized, but its latent statistics are unreadable "
                             f"({exc})") from None
    return latent


def decode_folder(
    model: Tokenizer,
    job: Job,
    steps: int | None = None,
    sampler: str = "euler",
    shift: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    overwrite: bool = False,
    workers: int = 2,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    on_step: Callable[[int], None] | None = None,
    tile: int | None = None,
    overlap: int = 32,
) -> Iterator[Item]:
    """Decode latent files to PNGs, cropped to the size each latent records (``encode --keep-size``). Every image
    starts from the same seeded noise, so an output does not depend on which other files are decoded alongside
    it (nor, on the CPU, on the batch size: see `models.images_per_call`). ``on_step(n)``: n images advanced one
    ODE step (for progress bars). ``steps`` and ``shift`` None: the model's own (`Tokenizer.default_steps`).

    ``tile`` decodes every file in tiles of that many pixels (`Tokenizer.decode`). Without it, a latent that
    decodes to more than ``max_pixels`` is decoded in tiles (`fallback_tiling`) (up to
    `TILED_BUDGET_FACTOR` times the budget; beyond that it fails as `TooLarge`), and so is one that runs out of
    memory whole (`decode_batch`); its item's note says so.
    """
    device = next(model.parameters()).device
    f = model.config.downsample

    def load(path: Path):
        try:
            latent, meta = load_latent_and_meta(model, path, max_pixels and max_pixels * TILED_BUDGET_FACTOR)
        except TooLarge as exc:
            raise TooLarge(f"{display_name(path)}: its latent decodes to {mega(exc.pixels)} pixels, over "
                           f"{TILED_BUDGET_FACTOR} x the pixel budget of {mega(max_pixels)} per image, the most it "
                           f"decodes even in tiles; raise it with --max-pixels", exc.pixels, exc.budget) from None
        return latent, padding_of(meta, (latent.shape[1] * f, latent.shape[2] * f), path)

    def compute(batch: list[Entry]) -> list[tuple[torch.Tensor, str]]:
        z = torch.stack([value[0] for _, _, value in batch]).to(device)
        noise = seeded_noise(seed, z.shape[2] * f, z.shape[3] * f, len(batch))
        images, note = decode_batch(model, z, noise, steps, sampler, shift, tile, overlap, on_step, max_pixels)
        return [(image, note) for image in images]

    def write(entry: Entry, out: tuple[torch.Tensor, str]) -> str:
        src, dst, (_, padding) = entry
        image, note = out
        if not torch.isfinite(image).all():  # the PNG would be black: say so instead
            raise InputError(f"{display_name(src)}: the decoder produced NaN or infinite values")
        save_png(unpad(image, padding), dst)
        return note

    yield from job.conflicts
    for finished, batch in _batches(job.pairs, load, batch_size, overwrite, workers,
                                    lambda value: value[0].shape[-1] * value[0].shape[-2] * f * f, max_pixels):
        yield from finished
        if batch:
            yield from _write_each(_run(batch, compute), write)


def seeded_noise(seed: int, height: int, width: int, n: int) -> torch.Tensor:
    """The starting noise of a decode: one CPU draw from ``seed``, shared by the ``n`` images of a batch."""
    return torch.randn((1, 3, height, width), generator=torch.Generator().manual_seed(seed)).expand(n, -1, -1, -1)


def fallback_tiling(model: Tokenizer, overlap: int) -> tuple[int, int]:
    """The tile and overlap of an automatic fallback: the model's training resolution (tiles then see images of
    the size their GroupNorm statistics were learnt on), rounded down to its size multiple, and ``overlap``
    lowered to the most that tile allows (`tiling.check_tiling`)."""
    align = model.size_multiple
    tile = max(align, model.config.resolution // align * align)
    return tile, min(overlap, tile // 2, tile - align)


def decode_batch(model: Tokenizer, z: torch.Tensor, noise: torch.Tensor, steps: int | None, sampler: str,
                 shift: float | None, tile: int | None = None, overlap: int = 32,
                 on_step: Callable[[int], None] | None = None, max_pixels: int | None = None) -> tuple[torch.Tensor, str]:
    """Decode a batch, whole or in ``tile``-pixel tiles; returns the images and a note for the user ("" if none).

    Images over ``max_pixels`` each are decoded in `fallback_tiling`'s tiles instead of whole, and a single
    image that runs out of memory whole (CUDA, or the CPU allocator refusing) is retried the same way; a batch
    of several re-raises, so that `_run` retries its images one by one, whole. A fallback decodes exactly as
    its ``tile`` and ``overlap`` would, from the same noise, and the note says so in one line.
    """
    kwargs = dict(steps=steps, sampler=sampler, shift=shift, noise=noise, overlap=overlap, on_step=on_step)
    if tile:
        return model.decode(z, tile=tile, **kwargs), ""
    h, w = noise.shape[-2:]
    why_tiled = f"{w}x{h} is over the pixel budget of {mega(max_pixels)} per image decoded whole" \
        if max_pixels and h * w > max_pixels else ""
    if not why_tiled:
        try:
            return model.decode(z, **kwargs), ""
        except (MemoryError, RuntimeError) as exc:
            if len(z) > 1 or not is_out_of_memory(exc):
                raise
            why_tiled = f"out of memory decoding {w}x{h} whole"
        if z.device.type == "cuda":  # outside the except block: the traceback no longer pins the failed tensors
            torch.cuda.empty_cache()
    tile, kwargs["overlap"] = fallback_tiling(model, overlap)
    note = f"{why_tiled}; decoded in {tile}-pixel tiles (as --tile {tile} --overlap {kwargs['overlap']})"
    return model.decode(z, tile=tile, **kwargs), note


def summarize(items: Iterable[Item]) -> dict[str, list[Item]]:
    out: dict[str, list[Item]] = {"done": [], "skipped": [], "failed": []}
    for item in items:
        out[item.status].append(item)
    return out


def encode_job(src: str | Path, dst: str | Path, limit: int | None = None) -> Job:
    return Job.plan(src, dst, IMAGE_SUFFIXES, ".safetensors", limit)


def decode_job(src: str | Path, dst: str | Path, limit: int | None = None) -> Job:
    return Job.plan(src, dst, {".safetensors"}, ".png", limit)


@dataclass
class FolderSummary:
    """What a folder of .safetensors files holds (`summarize_folder`)."""

    root: Path
    latents: dict[str, Counter] = field(default_factory=dict)  # made-by model -> Counter of latent shapes
    made_by: dict[str, str] = field(default_factory=dict)  # model hash -> "preset f.. c.." from the latents' config
    models: list[Path] = field(default_factory=list)  # model files
    other: list[str] = field(default_factory=list)  # one line per file that is neither, or unreadable

    @property
    def n_latents(self) -> int:
        return sum(sum(shapes.values()) for shapes in self.latents.values())


def summarize_folder(root: str | Path) -> FolderSummary:
    """Count the latents under ``root`` per model that made them and per shape, list model files, and name every
    other or unreadable .safetensors file; only headers are read, so a large folder takes seconds."""
    unreadable: list[str] = []
    summary = FolderSummary(Path(root))
    for path in walk_files(root, {".safetensors"}, unreadable):
        try:
            header = safetensors_header(path)
            meta = header.get("__metadata__") or {}
            if meta.get("format") == FORMAT:
                summary.models.append(Path(path))
                continue
            if meta.get("format") != LATENT_FORMAT or not isinstance(header.get("latent"), dict):
                raise InputError(f"{display_name(path)}: neither a dgaetok latent nor a model file")
            shape = tuple(int(n) for n in header["latent"]["shape"])
            if len(shape) != 3:
                raise InputError(f"{display_name(path)}: latent has shape {shape}, expected (channels, height, width)")
            _check_size(path, header)
        except InputError as exc:
            summary.other.append(str(exc))
            continue
        except (KeyError, TypeError, ValueError) as exc:
            summary.other.append(f"{display_name(path)}: unreadable latent file ({first_line(exc)})")
            continue
        made_by = meta.get("model_hash") or "unknown"
        summary.latents.setdefault(made_by, Counter())[shape] += 1
        if made_by not in summary.made_by:
            summary.made_by[made_by] = _describe_config(meta.get("model_config", ""))
    summary.other += unreadable
    return summary


def _check_size(path: str, header: dict) -> None:
    """A file cut short (a copy that stopped, a full disk) is shorter than its header says: checked without
    reading the data."""
    with open(path, "rb") as fh:
        n_header = int.from_bytes(fh.read(8), "little")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    size = os.stat(path).st_size
    if size < 8 + n_header + end:
        raise InputError(f"{display_name(path)}: unreadable latent file (cut short: {size} of {8 + n_header + end} "
                         f"bytes)")


def _describe_config(text: str) -> str:
    try:
        c = DGAEConfig.from_json(text)
    except (ValueError, TypeError):
        return "config unknown"
    return f"{c.preset or c.arch} f{c.downsample} c{c.latent_channels}"
