"""Folder-to-folder encode and decode jobs: batched, resumable, and going on past bad files.

Each job yields one `Item` per input so the caller can show progress; failures are reported in the item, never
raised, so one bad file cannot stop a batch. That holds for whatever a file can cause: dgaetok's own
`InputError`, but also running out of memory, a kernel refusing an odd shape, or a bug (the message then names the
exception type). KeyboardInterrupt and SystemExit still stop the job.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch

from . import __version__
from .errors import InputError, TooLarge
from .files import (DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, LATENT_FORMAT, Crop, center_crop, check_pixels, crop_meta,
                    describe_failure, display_name, first_line, is_out_of_memory, mega, open_image, padding_of,
                    read_latent, safetensors_header, save_png, to_tensor, unpad, walk_files, write_latent)
from .models import FORMAT, DGAEConfig, Tokenizer, images_per_call
from .shards import DTYPES, ShardInfo, ShardPlan, read_shard_info, shard_name, write_dataset, write_shard
from .sources import ImageSource
from .stats import LatentStats, Moments
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
    out_dir: Path = Path(".")  # the folder the outputs go into (`dst`, or a single output file's folder)

    @classmethod
    def plan(cls, src: str | Path, dst: str | Path, suffixes: set[str], out_suffix: str,
             limit: int | None = None) -> "Job":
        src, dst = Path(src), Path(dst)
        unreadable: list[str] = []
        files = walk_files(src, suffixes, unreadable)[:limit]
        if not files and not unreadable:
            raise InputError(f"{display_name(src)}: no {' / '.join(sorted(suffixes))} files found")
        is_dir = src.is_dir()
        if not is_dir and len(files) == 1 and dst.suffix.lower() == out_suffix and not dst.is_dir():
            return cls([(files[0], os.fspath(dst))], [], dst.parent)  # one file to one named output file
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
        return cls(pairs, conflicts, dst)

    def __len__(self) -> int:
        return len(self.pairs) + len(self.conflicts)


Entry = tuple[Path, Path, tuple]  # (source, output, loaded value: its first element is the tensor)
T = TypeVar("T")


def _batches(
    pairs: list[tuple[str, str]], load: Callable[[Path], tuple], batch_size: int, overwrite: bool, workers: int,
    pixels: Callable[[tuple], int], max_pixels: int | None,
) -> Iterator[tuple[list[Item], list[Entry]]]:
    """`load_batches` over the pairs whose output is not there yet (all with ``overwrite``); the others are
    reported as skipped."""
    todo, finished = [], []
    for src, dst in pairs:
        if not overwrite and os.path.isfile(dst):  # not exists(): a folder in the way must fail, not count as done
            finished.append(Item(Path(src), Path(dst), "skipped"))
        else:
            todo.append((Path(src), Path(dst)))
    for failed, batch in load_batches(todo, lambda pair: load(pair[0]), batch_size, workers, pixels, max_pixels,
                                      lambda pair: pair[0]):
        finished += [Item(src, dst, "failed", error) for (src, dst), error in failed]
        if batch:
            yield finished, [(src, dst, value) for (src, dst), value in batch]
            finished = []
    yield finished, []


def load_batches(
    keys: Sequence, load: Callable[[object], tuple], batch_size: int, workers: int, pixels: Callable[[tuple], int],
    max_pixels: int | None, name: Callable[[object], str | os.PathLike],
) -> Iterator[tuple[list[tuple[object, str]], list[tuple[object, tuple]]]]:
    """Load ``keys`` (``load(key)`` in a thread pool, reading ahead by a bounded window) and group them, in order,
    into batches of equal tensor shape: yields (failures, batch), failures as (key, message naming ``name(key)``).

    A batch also stays within ``max_pixels`` in all (``pixels(value)`` per input), so that the budget that lets
    one large image through does not let ``batch_size`` of them through at once.
    """
    def safe_load(key):
        try:
            return key, load(key), None
        except Exception as exc:  # whatever an input causes fails that input (not KeyboardInterrupt / SystemExit)
            return key, None, describe_failure(name(key), exc)

    batch, failed = [], []
    # Read ahead by a bounded window (pool.map would load every input of the job into memory at once).
    todo_iter, pending = iter(keys), deque()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for key in todo_iter:
            pending.append(pool.submit(safe_load, key))
            if len(pending) >= batch_size + 2 * max(1, workers):
                break
        try:
            while pending:
                key, value, error = pending.popleft().result()
                for more in todo_iter:
                    pending.append(pool.submit(safe_load, more))
                    break
                if error:
                    failed.append((key, error))
                    continue
                fits = max(1, max_pixels // pixels(value)) if max_pixels else batch_size
                if batch and (len(batch) >= min(batch_size, fits) or _shape(batch[0][1]) != _shape(value)):
                    yield failed, batch
                    failed, batch = [], []
                batch.append((key, value))
        finally:  # an abandoned job (Ctrl-C, an error downstream) does not wait for loads nobody will use
            for future in pending:
                future.cancel()
    yield failed, batch


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
    overlapping tiles (`Tokenizer.encode`, `tiles_per_call` at a time), and then takes images up to
    `TILED_BUDGET_FACTOR` times ``max_pixels``, as `decode_folder` does. Without it nothing is tiled for the user:
    a tiled latent differs from the whole image's (GroupNorm statistics per tile), which a dataset of latents
    should not do behind its maker's back."""
    cfg = model.config
    device = next(model.parameters()).device
    model_meta = {"model_hash": model.file_hash, "model_config": cfg.to_json(), "dgaetok_version": __version__}
    if normalize:
        model_meta |= {"normalized": "true", "latent_stats": model.require_stats().to_json()}
    root_is_dir = src_root.is_dir()

    def source(src: Path) -> str:  # the path below SRC, printable (metadata is UTF-8 JSON)
        return display_name(os.path.relpath(src, src_root) if root_is_dir else src.name)

    def load(path: Path):
        try:
            img = open_image(path, max_pixels and max_pixels * (TILED_BUDGET_FACTOR if tile else 1),
                             None if keep_size else cfg.resolution)
        except TooLarge as exc:
            message = over_tiled_budget(path, "encodes", exc, max_pixels) if tile else \
                f"{exc} (or encode it in tiles with --tile, up to {TILED_BUDGET_FACTOR} x the budget)"
            raise TooLarge(message, exc.pixels, exc.budget) from None
        return model_input(model, img, keep_size, path)

    def compute(batch: list[Entry]) -> torch.Tensor:
        x = torch.stack([value[0] for _, _, value in batch]).to(device)
        with torch.no_grad():
            tile_pixels = tile and min(tile, x.shape[2]) * min(tile, x.shape[3])
            chunk = tile and tiles_per_call(device, len(x), tile_pixels, max_pixels)
            dist = model.encode(x, tile=tile, overlap=overlap, chunk=chunk).latent_dist
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


def model_input(model: Tokenizer, img, keep_size: bool, path: str | os.PathLike) -> tuple[torch.Tensor, Crop]:
    """The model's input from a decoded image (`files.center_crop` at the model's resolution, or the whole image
    padded with ``keep_size``), and where it came from."""
    try:
        img, crop = center_crop(img, model.config.resolution, model.size_multiple, keep_size)
    except ValueError as exc:
        raise InputError(f"{display_name(path)}: {exc}") from None
    return to_tensor(img), crop


def shard_settings(model: Tokenizer, shard_size: int, flip: bool, dtype: str, max_pixels: int | None,
                   tile: int | None, overlap: int) -> dict:
    """What a shard's bytes depend on besides its images: a shard made with other settings is not reused."""
    res = model.config.resolution
    return {"model_hash": model.file_hash, "shard_size": shard_size, "flip": flip, "dtype": dtype,
            "preprocessing": {"resize": f"shorter side to {res} px, bicubic", "crop": f"center {res}x{res}",
                              "range": "[-1, 1]", "flip": "horizontal, as latents_flip" if flip else "none",
                              "max_pixels": max_pixels, "tile": tile, "overlap": overlap if tile else None},
            "latent": "posterior mean"}


def encode_shards(
    model: Tokenizer,
    source: ImageSource,
    dst: str | Path,
    shard_size: int,
    flip: bool = False,
    dtype: str = "float32",
    batch_size: int = 16,
    workers: int = 4,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    overwrite: bool = False,
    tile: int | None = None,
    overlap: int = 32,
    rank: int = 0,
    world: int = 1,
    on_step: Callable[[int], None] | None = None,
) -> Iterator[Item]:
    """Encode ``source`` into the shards of `shards.ShardPlan` that fall to process ``rank`` of ``world``, then
    (process 0, once every process is done) write ``dataset.json``; yields an `Item` per image, and per input
    that could not even be listed (process 0). ``on_step(n)``: n images encoded, for progress bars.

    A shard already there, made with the same settings from the same images, is kept (all are redone with
    ``overwrite``); one made with other settings is refused before any work. The images are center crops at the
    model's resolution (as `stats.measure`), their posterior means written as ``dtype`` ("float32" or "bf16",
    rounded from float32). The bytes of every file depend on neither ``world`` nor ``rank``, only on the inputs
    and settings (and, on a CPU, on the number of threads: oneDNN's results do). Under torch.distributed every
    process calls this with its own rank; the barriers are inside.
    """
    dst = Path(dst)
    device = next(model.parameters()).device
    plan = ShardPlan(len(source), shard_size)
    settings = shard_settings(model, shard_size, flip, dtype, max_pixels, tile, overlap)
    if not overwrite:
        _check_existing_shards(dst, plan, settings)
    c, h, w = model.config.latent_channels, *(model.config.resolution // model.config.downsample,) * 2

    def load(i: int):
        return model_input(model, source.open(i, max_pixels, model.config.resolution), False, source.name(i))[:1]

    def compute(batch: list[tuple]) -> list[tuple[torch.Tensor, ...]]:
        x = torch.stack([value[0] for _, _, value in batch]).to(device)
        with torch.no_grad():
            z = model.encode(torch.cat([x, x.flip(-1)]) if flip else x, tile=tile, overlap=overlap).latent_dist
            z = z.mode().float().cpu()
        if on_step is not None:
            on_step(len(batch))
        return list(zip(*z.chunk(2))) if flip else [(one,) for one in z]

    for k in plan.assigned(rank, world):
        path, inputs = dst / shard_name(k), plan.inputs(k)
        digest = source.digest(inputs)
        if not overwrite and _finished(path, settings, inputs, digest):
            yield from (Item(Path(source.name(i)), path, "skipped") for i in inputs)
            continue
        kept: dict[str, list] = {"latents": [], "latents_flip": [], "index": []}
        failed, items, moments = [], [], Moments()
        for failures, batch in load_batches(inputs, load, batch_size, workers, lambda value: 1, None,
                                            source.name):
            for i, error in failures:
                failed.append({"file": source.name(i), "error": error})
                yield Item(Path(source.name(i)), path, "failed", error)
            done = []
            for (name, i, _), out, error in _run([(source.name(i), i, v) for i, v in batch], compute):
                if error:
                    failed.append({"file": name, "error": error})
                    yield Item(Path(name), path, "failed", error)
                    continue
                kept["latents"].append(out[0])
                kept["latents_flip"] += out[1:]
                kept["index"].append(i)
                done.append(out[0])
                items.append(Item(Path(name), path, "done"))
            if done:
                moments.add(torch.stack(done))
        tensors = {"index": torch.tensor(kept["index"], dtype=torch.int64),
                   "labels": torch.tensor([source.label(i) for i in kept["index"]], dtype=torch.int64)}
        for key in ("latents", "latents_flip") if flip else ("latents",):
            z = torch.stack(kept[key]) if kept[key] else torch.empty(0, c, h, w)
            tensors[key] = z.to(DTYPES[dtype])
        try:
            dst.mkdir(parents=True, exist_ok=True)
            write_shard(path, tensors, ShardInfo(settings, [inputs.start, inputs.stop], digest, moments.state(),
                                                 failed))
        except OSError as exc:  # a full disk fails the run: the shards written so far are kept for a rerun
            raise InputError(f"{display_name(path)}: cannot write ({exc.strerror or exc})") from None
        yield from items

    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every shard is written
    if rank == 0:
        yield from (Item(Path(name), dst, "failed", message) for name, message in source.errors)
        write_dataset(dst, dataset_info(model, source, plan, dst, settings))
        _remove_shards_after(dst, len(plan))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # dataset.json is there for every process to read


def _check_existing_shards(dst: Path, plan: ShardPlan, settings: dict) -> None:
    """Refuse to mix shards of other settings into a dataset. Every process checks every shard, so that all of
    them stop on the same error instead of some waiting at a barrier for the others."""
    for k in range(len(plan)):
        path = dst / shard_name(k)
        if not path.is_file():
            continue
        try:
            made = read_shard_info(path).settings
        except InputError:
            continue  # unreadable: redone
        if made != settings:
            changed = ", ".join(f"{key} {made.get(key)!r} -> {settings[key]!r}" for key in settings
                                if made.get(key) != settings[key])
            raise InputError(f"{display_name(path)}: made with other settings ({changed}); use another output "
                             f"folder, or --overwrite to encode everything again")


def _remove_shards_after(dst: Path, n: int) -> None:
    """Remove the shards numbered n and up that an earlier run over more images left: the dataset is now n."""
    for path in dst.glob("shard-*.safetensors"):
        k = path.name[len("shard-"):-len(".safetensors")]
        if k.isdigit() and int(k) >= n and path.name == shard_name(int(k)):
            try:
                read_shard_info(path)
            except InputError:
                continue  # not ours
            path.unlink(missing_ok=True)


def _finished(path: Path, settings: dict, inputs: range, digest: str) -> bool:
    """Whether the shard file is there, made with ``settings`` from the same images."""
    if not path.is_file():
        return False
    try:
        info = read_shard_info(path)
    except InputError:
        return False
    return info.settings == settings and info.inputs == [inputs.start, inputs.stop] and info.digest == digest


def dataset_info(model: Tokenizer, source: ImageSource, plan: ShardPlan, dst: Path, settings: dict) -> dict:
    """What ``dataset.json`` holds, from the shards' headers: their counts, failures and latent sums, added in
    shard order."""
    shards, failed, moments = [], [{"file": name, "error": m} for name, m in source.errors], Moments()
    for k in range(len(plan)):
        path = dst / shard_name(k)
        info = read_shard_info(path)
        count = safetensors_header(path)["latents"]["shape"][0]
        shards.append({"file": path.name, "images": count})
        failed += info.failed
        moments.merge(Moments.from_state(info.moments))
    res = model.config.resolution
    stats = moments.stats(f"{display_name(source.root)} ({moments.n_images} images, center crop {res})") \
        if moments.n_images else None
    return {"model": {"hash": model.file_hash, "config": json.loads(model.config.to_json())},
            "dgaetok_version": __version__, "source": display_name(source.root), "classes": source.classes,
            "settings": settings, "dtype": settings["dtype"], "flip": settings["flip"],
            "latent_shape": [model.config.latent_channels, *(res // model.config.downsample,) * 2],
            "images": moments.n_images, "shard_size": plan.shard_size, "shards": shards,
            "latent_stats": None if stats is None else dataclasses.asdict(stats), "failed": failed}


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
    progress = _Progress(on_step)  # `_run` redoes a failed batch image by image

    def load(path: Path):
        try:
            latent, meta = load_latent_and_meta(model, path, max_pixels and max_pixels * TILED_BUDGET_FACTOR)
        except TooLarge as exc:
            raise TooLarge(over_tiled_budget(path, "decodes", exc, max_pixels), exc.pixels, exc.budget) from None
        return latent, padding_of(meta, (latent.shape[1] * f, latent.shape[2] * f), path)

    def compute(batch: list[Entry]) -> list[tuple[torch.Tensor, str]]:
        z = torch.stack([value[0] for _, _, value in batch]).to(device)
        noise = seeded_noise(seed, z.shape[2] * f, z.shape[3] * f, len(batch))
        images, note = progress.attempt(lambda: decode_batch(model, z, noise, steps, sampler, shift, tile, overlap,
                                                             progress, max_pixels))
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


def over_tiled_budget(path: Path, verb: str, exc: TooLarge, max_pixels: int) -> str:
    what = "its latent decodes to" if verb == "decodes" else "the image to encode is"
    return (f"{display_name(path)}: {what} {mega(exc.pixels)} pixels, over {TILED_BUDGET_FACTOR} x the pixel "
            f"budget of {mega(max_pixels)} per image, the most it {verb} even in tiles; raise it with --max-pixels")


def tiles_per_call(device: torch.device | str, images: int, tile_pixels: int, max_pixels: int | None) -> int:
    """Tiles per network call in a tiled encode or decode of ``images`` images at a time: one on the CPU (as
    `models.images_per_call`); on a GPU as many as keep one call, images x tiles x ``tile_pixels``, within
    ``max_pixels``. At least one: `_batches` keeps images x their whole size within it, and a tile is no larger."""
    return images_per_call(device, max(1, max_pixels // (images * tile_pixels)) if max_pixels else 8)


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
    h, w = noise.shape[-2:]
    progress = _Progress(on_step)

    def run(tile: int | None, overlap: int) -> torch.Tensor:
        chunk = tile and tiles_per_call(z.device, len(z), min(tile, h) * min(tile, w), max_pixels)
        return progress.attempt(lambda: model.decode(z, steps=steps, sampler=sampler, shift=shift, noise=noise,
                                                     tile=tile, overlap=overlap, chunk=chunk, on_step=progress))

    if tile:
        return run(tile, overlap), ""
    why_tiled = f"{w}x{h} is over the pixel budget of {mega(max_pixels)} per image decoded whole" \
        if max_pixels and h * w > max_pixels else ""
    if not why_tiled:
        try:
            return run(None, overlap), ""
        except (MemoryError, RuntimeError) as exc:
            if len(z) > 1 or not is_out_of_memory(exc):
                raise
            why_tiled = f"out of memory decoding {w}x{h} whole"
        if z.device.type == "cuda":  # outside the except block: the traceback no longer pins the failed tensors
            torch.cuda.empty_cache()
    tile, overlap = fallback_tiling(model, overlap)
    note = f"{why_tiled}; decoded in {tile}-pixel tiles (as --tile {tile} --overlap {overlap})"
    return run(tile, overlap), note


class _Progress:
    """``on_step`` across retries: the steps of an `attempt` that failed are done again by whatever retries it,
    and are not counted twice, so a progress count ends at its total instead of overshooting it."""

    def __init__(self, on_step: Callable[[int], None] | None):
        self.on_step, self.made, self.redo = on_step, 0, 0

    def attempt(self, fn: Callable[[], T]) -> T:
        start = self.made
        try:
            return fn()
        except BaseException:
            self.redo += self.made - start
            raise

    def __call__(self, n: int) -> None:
        self.made += n
        repeated = min(n, self.redo)
        self.redo -= repeated
        if n > repeated and self.on_step is not None:
            self.on_step(n - repeated)


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
