"""`dgaetok bench gen`: how well a DiT learns on each tokenizer's latents (the paper's Table 3 and Fig. 7).

Per tokenizer: encode DATA once (posterior mean, center crop at the tokenizer's resolution), or read the latents
`dgaetok encode` wrote for it (``latents``), normalise them by per-channel mean and std computed once over them,
train a DiT with the flow-matching objective of `flow` (the decoder's), and at every ``eval_every`` steps sample
``num_samples`` latents from the EMA DiT with fixed seeds, decode them with the tokenizer and score them against
DATA's images: gFID, sFID, precision, recall (`metrics.gen_metrics`). Labels are DATA's first-level folder names (ImageFolder layout); with fewer than two
such folders, or images directly in DATA, the DiT is unconditional.

Files in ``out``: ``reference-<res>.npz`` (the reference images' features), per tokenizer ``<name>/latents.safetensors``
(latents, labels, and the normalisation ``mean`` / ``std``), ``<name>/dit.safetensors`` + ``<name>/dit-optimizer.pt``
(the checkpoint) and ``<name>/samples/step-*.png``; ``curve.csv`` (one row per evaluation), ``gen.json`` and
``curve.png`` (FID against training step, one line per tokenizer). Running the same command again continues
training from the checkpoints and skips evaluations already in ``curve.csv``; a larger ``steps`` extends a run.
``eval.json`` holds the evaluation settings of ``curve.csv``'s rows; a rerun with other ones is refused.

Training and scoring may run on different machines (a lent GPU carries no Inception weights): with ``defer_to`` an
evaluation writes its sampled latents to that folder instead (`write_samples`: bf16, with the settings they were
drawn with), and `score_deferred` decodes and scores such files later, appending to ``curve.csv``. Samples are
rounded to bf16 in both paths, so a deferred score equals the immediate one.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__, flow
from .data import LatentDataset
from .dit import DiT, DiT_models
from .errors import InputError
from .bench import batch_ranges, eval_images
from .files import atomic_path, find_files, save_grid, to_uint8
from .metrics import PR_NEIGHBOURS, dataset_key, gen_features, gen_metrics
from .models import Tokenizer, load_model, resolve_model
from .precision import autocast, resolve as resolve_precision
from .pipeline import load_latent
from .plots import plot_curve
from .shards import is_dataset
from .stats import LatentStats
from .train import ema_decay_at, load_prefixed, update_ema

CURVE_FIELDS = ("tokenizer", "step", "train_s", "samples", "fid", "sfid", "precision", "recall")
# Settings a checkpoint depends on: changing them between runs would silently mix two experiments.
RESUME_KEYS = ("dit", "batch_size", "lr", "ema_decay", "seed", "conditional", "limit")
# Settings every row of curve.csv is measured with: rows made with others are not comparable.
EVAL_KEYS = ("num_samples", "sample_steps", "cfg", "decode_steps", "decode_shift", "seed")
# ... of which these are fixed when the samples are drawn (a deferred sample file records them)
SAMPLE_KEYS = ("num_samples", "sample_steps", "cfg", "seed")
SAMPLE_DTYPE = torch.bfloat16  # what sampled latents are stored and scored in


@dataclass
class GenConfig:
    data: str
    tokenizers: list[str]
    out: str = "bench-gen"
    dit: str = "DiT-B/2"
    steps: int = 10_000
    minutes: float | None = None  # training-time budget per tokenizer (counted over resumed runs too)
    eval_every: int = 2_000
    num_samples: int = 1_000
    batch_size: int = 32
    lr: float = 1e-4  # DiT's: AdamW, constant, no weight decay
    ema_decay: float = 0.9999
    sample_steps: int = 50  # Euler steps of the DiT's flow
    cfg: float = 1.0  # 1: no classifier-free guidance (what the paper reports)
    decode_steps: int | None = None  # None: each tokenizer's own (`Tokenizer.default_steps`: 50, a distilled K)
    conditional: bool = True  # False: ignore folder labels
    limit: int | None = None  # only the first N images of DATA
    seed: int = 0
    device: str = "cpu"
    latents: list[str | None] = field(default_factory=list)  # per tokenizer: a `dgaetok encode` folder, or None
    decode_shift: float | None = None  # time-grid shift of the decoding (`flow.time_grid`; None: the tokenizer's)
    defer_to: str | None = None  # a folder: write each evaluation's samples there, unscored (`score_deferred`)
    precision: str = "auto"  # what the DiT and the tokenizer compute in (`dgaetok.precision`)


@dataclass
class TokenizerRun:
    name: str
    model: str
    model_hash: str
    latent_shape: list[int]
    dit: str
    dit_params: int
    classes: list[str]
    steps: int = 0
    train_s: float = 0.0
    curve: list[dict] = field(default_factory=list)


@dataclass
class GenResult:
    data: str
    images: int
    config: dict
    skipped: list[str] = field(default_factory=list)
    runs: list[TokenizerRun] = field(default_factory=list)
    dgaetok_version: str = __version__


# --- data --------------------------------------------------------------------------------------------------------


def image_labels(data: str | Path, paths: list[Path], conditional: bool) -> tuple[list[int], list[str]]:
    """Class indices of ``paths`` and the class names: DATA's first-level folders (ImageFolder layout). None (all 0)
    when not ``conditional``, when some image lies directly in DATA, or when there are fewer than two folders."""
    root = Path(data)
    tops = [p.relative_to(root).parts[0] if root.is_dir() and len(p.relative_to(root).parts) > 1 else None
            for p in paths]
    classes = sorted(set(tops)) if conditional and None not in tops else []
    if len(classes) < 2:
        return [0] * len(paths), []
    return [classes.index(t) for t in tops], classes


def _load_npz(path: Path, key: str) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files} if str(data["key"]) == key else None


def reference_features(inception, images: list[torch.Tensor], path: Path, key: str, batch_size: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Pool3 and sFID features of the reference images, from ``path`` when it was made for the same ``key``."""
    if (cached := _load_npz(path, key)) is not None:
        return cached["pool"], cached["spatial"]
    feats = [gen_features(inception, to_uint8(torch.stack(images[a:b])))
             for a, b in batch_ranges(len(images), batch_size)]
    pool, spatial = (torch.cat(f).numpy() for f in zip(*feats))
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, pool=pool, spatial=spatial, key=np.array(key))
    return pool, spatial


def read_latent_folder(tokenizer: Tokenizer, root: str | Path, limit: int | None
                       ) -> tuple[list[Path], list[torch.Tensor], list[str]]:
    """(files, latents, skipped): the first ``limit`` usable latents that `dgaetok encode` wrote under ``root``.
    Files that are unreadable, made by another model, or of another shape than the first (``--keep-size``
    latents) are reported in ``skipped``, not fatal."""
    files, latents, skipped = [], [], []
    for path in find_files(root, {".safetensors"}):
        if limit is not None and len(latents) == limit:
            break
        try:
            latent = load_latent(tokenizer, path)
            if latents and latent.shape != latents[0].shape:
                raise InputError(f"{path}: latent shape {tuple(latent.shape)} differs from "
                                 f"{tuple(latents[0].shape)} (encode without --keep-size)")
        except InputError as exc:
            skipped.append(str(exc))
            continue
        files.append(path)
        latents.append(latent)
    if not latents:
        raise InputError(f"{root}: no usable dgaetok latents found" + (f" ({skipped[0]})" if skipped else ""))
    return files, latents, skipped


def shard_latents(tokenizer: Tokenizer, root: str | Path, limit: int | None, conditional: bool
                  ) -> tuple[torch.Tensor, list[int], list[str], str]:
    """(latents, labels, classes, key) of the first ``limit`` latents of a `dgaetok encode --shards` folder, as
    encoded (not normalised). Labels are the shards' (an archive's bare class numbers are named by number); the
    DiT is unconditional when not ``conditional``, with fewer than two classes, or when some image has none."""
    data = LatentDataset(root, normalize=False)
    made_by = data.info["model"]["hash"]
    if tokenizer.file_hash and made_by != tokenizer.file_hash:
        raise InputError(f"{root}: latents were made by model {made_by}, not by the loaded model "
                         f"{tokenizer.file_hash}")
    n = len(data) if limit is None else min(limit, len(data))
    if not n:
        raise InputError(f"{root}: the dataset holds no latents")
    z, y = data.batch(range(n))
    classes = data.classes or [str(k) for k in range(int(y.max()) + 1)]
    if not conditional or len(classes) < 2 or bool((y < 0).any()):
        return z, [0] * n, [], dataset_key(root, data.files, "dgaetok encode --shards")
    return z, y.tolist(), classes, dataset_key(root, data.files, "dgaetok encode --shards")


def encode_images(model: Tokenizer, images: list[torch.Tensor], batch_size: int) -> torch.Tensor:
    """Posterior means of ``images``, on the CPU."""
    device = next(model.parameters()).device
    zs = []
    with torch.no_grad():
        for a, b in batch_ranges(len(images), batch_size):
            zs.append(model.encode(torch.stack(images[a:b]).to(device)).latent_dist.mode().float().cpu())
    return torch.cat(zs)


def cached_latents(path: Path, key: str, labels: list[int], make: Callable[[], torch.Tensor],
                   stats: LatentStats | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents, mean, std): ``make()``'s latents, computed once and stored in ``path``, and reused while ``key``
    (the latents' source and the model file) is unchanged; ``labels`` are stored for reference only. The
    per-channel statistics are the model file's ``stats`` when it has them, else computed over the latents once
    and stored beside them."""
    if path.is_file():
        with safe_open(str(path), framework="pt") as fh:
            if (fh.metadata() or {}).get("key") == key and (stats is not None or "mean" in fh.keys()):
                z = fh.get_tensor("latents")
                if stats is not None:
                    return z, torch.tensor(stats.mean), torch.tensor(stats.std)
                return z, fh.get_tensor("mean"), fh.get_tensor("std")
    z = make()
    tensors = {"latents": z, "labels": torch.tensor(labels, dtype=torch.long)}
    if stats is not None:
        mean, std = torch.tensor(stats.mean), torch.tensor(stats.std)
    else:
        mean, std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3)).clamp_min(1e-6)
        tensors |= {"mean": mean, "std": std}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"key": key})
    return z, mean, std


# --- DiT checkpoints ---------------------------------------------------------------------------------------------


def _resume_settings(cfg: GenConfig, source: str) -> str:
    """The settings a checkpoint depends on, with ``source``: where its latents and their statistics came from."""
    return json.dumps({**{k: getattr(cfg, k) for k in RESUME_KEYS}, "latents": source}, sort_keys=True)


def save_dit(folder: Path, dit: DiT, ema: DiT, opt: torch.optim.Optimizer, step: int, train_s: float,
             cfg: GenConfig, source: str, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Optimizer state first, weights last (as `train.save_checkpoint`); the latent statistics travel along so that
    the file alone turns DiT samples back into tokenizer latents."""
    with atomic_path(folder / "dit-optimizer.pt") as tmp:
        torch.save({"step": step, "optimizer": opt.state_dict()}, tmp)
    tensors = {f"model.{k}": v for k, v in dit.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    tensors |= {"latent_mean": mean, "latent_std": std}
    meta = {"config": dit.config.to_json(), "step": str(step), "train_s": f"{train_s:.3f}",
            "settings": _resume_settings(cfg, source)}
    with atomic_path(folder / "dit.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


def load_dit(folder: Path, dit: DiT, ema: DiT, opt: torch.optim.Optimizer, cfg: GenConfig, source: str
             ) -> tuple[int, float]:
    path = folder / "dit.safetensors"
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        state = torch.load(folder / "dit-optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: unreadable checkpoint ({str(exc).splitlines()[0]})") from None
    if meta["config"] != dit.config.to_json() or meta["settings"] != _resume_settings(cfg, source):
        saved, now = json.loads(meta["settings"]), json.loads(_resume_settings(cfg, source))
        changed = ", ".join(f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in now if saved.get(k) != now[k])
        raise InputError(f"{path}: checkpoint was made with other settings ({changed or meta['settings']}); "
                         f"use the same options or another --output")
    step = int(meta["step"])
    if state["step"] != step:
        raise InputError(f"{path}: optimizer state is at step {state['step']}, weights at {step}; cannot resume")
    load_prefixed(tensors, {"model.": dit, "ema.": ema})
    opt.load_state_dict(state["optimizer"])
    return step, float(meta["train_s"])


# --- curve file and plot -------------------------------------------------------------------------------------------


def read_curve(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [{k: (r[k] if k == "tokenizer" else int(r[k]) if k in ("step", "samples") else float(r[k]))
                 for k in CURVE_FIELDS} for r in csv.DictReader(fh)]


def write_curve(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CURVE_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: (r["tokenizer"], r["step"])))
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


# --- the benchmark -------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_latents(ema: DiT, cfg: GenConfig, n_classes: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``num_samples`` tokenizer latents (CPU, float32 values rounded to `SAMPLE_DTYPE`) from the same seeded noise
    and labels at every evaluation; labels cycle through the classes, so every class gets its share."""
    device = next(ema.parameters()).device
    c = ema.config
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    noise = torch.randn((cfg.num_samples, c.in_channels, c.input_size, c.input_size), generator=gen)
    labels = torch.arange(cfg.num_samples) % n_classes if n_classes else None
    shape = (-1, 1, 1)
    zs = []
    for a, b in batch_ranges(cfg.num_samples, cfg.batch_size):
        y = labels[a:b].to(device) if labels is not None else None
        with autocast(device, cfg.precision):
            z = ema.sample(noise[a:b].to(device), y, cfg.sample_steps, cfg.cfg).float()
        z = z * std.to(device).view(shape) + mean.to(device).view(shape)
        zs.append(z.to(SAMPLE_DTYPE).cpu())
    return torch.cat(zs).float()


@torch.no_grad()
def decode_batches(tokenizer: Tokenizer, z: torch.Tensor, cfg: GenConfig) -> Iterator[torch.Tensor]:
    """Images in [-1, 1] (CPU) of sampled latents ``z``, batch by batch. Sample i's decoding noise is seeded by i,
    so the images do not depend on the batch size (a GPU samples in large batches, a CPU decodes in small ones)."""
    device = next(tokenizer.parameters()).device
    f = tokenizer.config.downsample
    shape = (3, z.shape[-2] * f, z.shape[-1] * f)
    for a, b in batch_ranges(len(z), cfg.batch_size):
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed + 2 + i))
                             for i in range(a, b)])
        yield tokenizer.decode(z[a:b].to(device), steps=cfg.decode_steps, shift=cfg.decode_shift,
                               noise=noise).cpu()


def score_samples(tokenizer: Tokenizer, z: torch.Tensor, inception, ref_pool: np.ndarray, ref_spatial: np.ndarray,
                  cfg: GenConfig, grid: Path) -> dict[str, float]:
    """gFID, sFID, precision and recall of sampled latents ``z`` decoded by ``tokenizer``; the first 16 images
    are saved as ``grid``. Only features are kept: 10k decoded images would not fit in memory."""
    feats, cells = [], []
    for batch in decode_batches(tokenizer, z, cfg):
        feats.append(gen_features(inception, to_uint8(batch)))
        cells.append(batch[: 16 - sum(map(len, cells))])
    grid.parent.mkdir(parents=True, exist_ok=True)
    save_grid(torch.cat(cells), 8, grid)
    pool, spatial = (torch.cat(f).numpy() for f in zip(*feats))
    return gen_metrics(ref_pool, ref_spatial, pool, spatial)


def sample_file(folder: Path, name: str, step: int) -> Path:
    return Path(folder) / f"{name}.step-{step:07d}.safetensors"


def write_samples(path: Path, z: torch.Tensor, name: str, model_hash: str, step: int, train_s: float,
                  cfg: GenConfig) -> None:
    """Sampled latents as `SAMPLE_DTYPE` with what scoring them needs to know: the tokenizer (name and file hash),
    the DiT's step and training time, and the sampling settings."""
    meta = {"tokenizer": name, "model_hash": model_hash, "step": str(step), "train_s": f"{train_s:.3f}",
            "dit": cfg.dit, "sampling": json.dumps({k: getattr(cfg, k) for k in SAMPLE_KEYS})}
    with atomic_path(path) as tmp:
        save_file({"latents": z.to(SAMPLE_DTYPE).contiguous()}, str(tmp), metadata=meta)


def read_samples(path: Path) -> tuple[torch.Tensor, dict]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            z = fh.get_tensor("latents").float()
        meta["step"], meta["train_s"], meta["sampling"] = int(meta["step"]), float(meta["train_s"]), \
            json.loads(meta["sampling"])
    except Exception as exc:
        raise InputError(f"{path}: not a sample file of bench gen ({str(exc).splitlines()[0]})") from None
    return z, meta


def check_eval_settings(path: Path, cfg: GenConfig, have_rows: bool) -> None:
    """Every row of curve.csv is measured the same way: once rows exist, other evaluation settings are refused."""
    now = {k: getattr(cfg, k) for k in EVAL_KEYS}
    if path.is_file() and have_rows:
        saved = json.loads(path.read_text())
        changed = [f"{k} {saved.get(k)} -> {now[k]}" for k in EVAL_KEYS if saved.get(k) != now[k]]
        if changed:
            raise InputError(f"{path.parent}: curve.csv was measured with other evaluation settings "
                             f"({', '.join(changed)}); use the same options or another --output")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(now) + "\n")


def run_name(model: str) -> str:
    return Path(str(resolve_model(model))).stem


def reference_images(cfg: GenConfig, resolution: int, loaded: dict) -> tuple[list[Path], list[torch.Tensor],
                                                                             list[str], str]:
    """(files, images, skipped, key): DATA's center crops at ``resolution``, read once per resolution into
    ``loaded``, and the key of their features' cache."""
    if resolution not in loaded:
        loaded[resolution] = eval_images(cfg.data, resolution, cfg.limit)
    files, images, skipped = loaded[resolution]
    if len(images) <= PR_NEIGHBOURS:
        raise InputError(f"{cfg.data}: need more than {PR_NEIGHBOURS} readable images, found {len(images)}")
    key = dataset_key(cfg.data, files, f"rgb-shorter{resolution}-center{resolution}-bicubic")
    return files, images, skipped, key


def draw_curve(rows: list[dict], path: Path, log: Callable[[str], None]) -> None:
    """curve.png; without matplotlib a note instead: the numbers in curve.csv are the result, the plot a view."""
    try:
        plot_curve(rows, path)
    except InputError as exc:
        log(f"{path.name} not drawn: {exc}")


def bench_gen(cfg: GenConfig, log: Callable[[str], None] = lambda s: None) -> GenResult:
    """Train, evaluate and plot for every tokenizer in ``cfg.tokenizers``; resumes whatever ``cfg.out`` holds."""
    from . import pretrained

    if cfg.dit not in DiT_models:
        raise InputError(f"unknown DiT {cfg.dit!r}; choose one of {', '.join(DiT_models)}")
    if not cfg.tokenizers:
        raise InputError("give at least one --tokenizer")
    names = [run_name(t) for t in cfg.tokenizers]
    if len(set(names)) != len(names):
        raise InputError(f"tokenizer files must have different names, got {', '.join(names)}")
    if cfg.num_samples <= PR_NEIGHBOURS:
        raise InputError(f"--num-samples must be more than {PR_NEIGHBOURS} (k-NN precision and recall)")
    if cfg.steps < 1 or cfg.eval_every < 1:
        raise InputError("--steps and --eval-every must be at least 1")
    if len(cfg.latents) > len(cfg.tokenizers):
        raise InputError(f"{len(cfg.latents)} latent folders for {len(cfg.tokenizers)} tokenizers: give at most one "
                         f"per --tokenizer, in the same order")
    device = torch.device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    result = GenResult(str(cfg.data), 0, dataclasses.asdict(cfg))
    deferred = Path(cfg.defer_to) if cfg.defer_to else None
    inception = pretrained.fid_inception(device) if deferred is None else None
    curve_path = out / "curve.csv"
    rows = read_curve(curve_path)
    if deferred is None:
        check_eval_settings(out / "eval.json", cfg, bool(rows))
    else:
        deferred.mkdir(parents=True, exist_ok=True)

    loaded = {}  # resolution -> eval_images(...): tokenizers of one resolution share the decoded crops
    latent_dirs = list(cfg.latents) + [None] * (len(cfg.tokenizers) - len(cfg.latents))
    for name, model_name, latent_dir in zip(names, cfg.tokenizers, latent_dirs):
        tokenizer = load_model(model_name, device, precision=cfg.precision)
        if note := tokenizer.steps_note(cfg.decode_steps):
            log(f"note: {name}: {note}")
        res = tokenizer.config.resolution
        files, images, skipped, key = reference_images(cfg, res, loaded)
        if not result.images:  # once the data is known to be there: the precision the run computes in
            log(f"note: {resolve_precision(cfg.precision, device).note()}")
        result.skipped += [m for m in skipped if m not in result.skipped]  # unreadable files: reported
        result.images = len(images)
        if deferred is None:
            log(f"{name}: reference features ({len(images)} images at {res} px)")
            ref_pool, ref_spatial = reference_features(inception, images, out / f"reference-{res}.npz", key,
                                                       cfg.batch_size)
        folder = out / name
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        if latent_dir and is_dataset(latent_dir):  # `dgaetok encode --shards` wrote them, labels included
            log(f"{name}: latents from the shards in {latent_dir}")
            shard_z, labels, classes, source = shard_latents(tokenizer, latent_dir, cfg.limit, cfg.conditional)
            make = lambda: shard_z  # noqa: E731
        elif latent_dir:  # `dgaetok encode` wrote them: labels from the latent tree, which mirrors the image tree
            log(f"{name}: latents from {latent_dir}")
            latent_files, latents, bad = read_latent_folder(tokenizer, latent_dir, cfg.limit)
            result.skipped += bad
            labels, classes = image_labels(latent_dir, latent_files, cfg.conditional)
            source = dataset_key(latent_dir, latent_files, "dgaetok encode")
            make = lambda: torch.stack(latents)  # noqa: E731
        else:
            log(f"{name}: encoding {len(images)} images")
            labels, classes = image_labels(cfg.data, files, cfg.conditional)
            source = key
            make = lambda: encode_images(tokenizer, images, cfg.batch_size)  # noqa: E731
        y = torch.tensor(labels, dtype=torch.long)  # from the file names, whatever the cache holds
        z, mean, std = cached_latents(folder / "latents.safetensors",
                                      json.dumps({"data": source, "model": tokenizer.file_hash}), labels, make,
                                      tokenizer.latent_stats)
        if tokenizer.latent_stats is not None:  # a DiT trained on statistics computed here cannot go on with these
            source = f"{source}; latent statistics from the model file"
        zn = (z - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        try:
            dit_config = DiT_models[cfg.dit](input_size=z.shape[-1], in_channels=z.shape[1],
                                             num_classes=len(classes))
        except ValueError as exc:
            raise InputError(f"{cfg.dit} on {name}'s latents: {exc}") from None
        torch.manual_seed(cfg.seed)
        dit = DiT(dit_config).to(device)
        ema = copy.deepcopy(dit).eval().requires_grad_(False)
        opt = torch.optim.AdamW(dit.parameters(), lr=cfg.lr, weight_decay=0.0, fused=device.type == "cuda")
        step, train_s = 0, 0.0
        if (folder / "dit.safetensors").is_file():
            step, train_s = load_dit(folder, dit, ema, opt, cfg, source)
            log(f"{name}: resumed DiT at step {step}")
        run = TokenizerRun(name, str(resolve_model(model_name)), tokenizer.file_hash, list(z.shape[1:]), cfg.dit,
                           dit.num_params(), classes)
        done = {r["step"] for r in rows if r["tokenizer"] == name}
        if deferred is not None:
            done |= {int(p.name.rsplit("step-", 1)[1].split(".")[0]) for p in deferred.glob(f"{name}.step-*")}

        def evaluate(at_step: int) -> None:
            log(f"{name}: sampling step {at_step} ({cfg.num_samples} samples)")
            drawn = sample_latents(ema, cfg, len(classes), mean, std)
            if deferred is not None:
                write_samples(sample_file(deferred, name, at_step), drawn, name, tokenizer.file_hash, at_step,
                              train_s, cfg)
                done.add(at_step)
                return
            m = score_samples(tokenizer, drawn, inception, ref_pool, ref_spatial, cfg,
                              folder / "samples" / f"step-{at_step:07d}.png")
            rows.append({"tokenizer": name, "step": at_step, "train_s": round(train_s, 3),
                         "samples": cfg.num_samples, **m})
            done.add(at_step)
            write_curve(curve_path, rows)
            log(f"{name}: step {at_step}: FID {m['fid']:.2f} sFID {m['sfid']:.2f} "
                f"precision {m['precision']:.3f} recall {m['recall']:.3f}")

        budget_s = cfg.minutes * 60 if cfg.minutes is not None else float("inf")
        if step > 0 and step not in done and (step % cfg.eval_every == 0 or step >= cfg.steps or train_s >= budget_s):
            evaluate(step)  # a run stopped between saving and evaluating
        n = len(zn)
        while step < cfg.steps and train_s < budget_s:
            start = time.perf_counter()
            dit.train()
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # the same batch whenever resumed
            idx = torch.randint(n, (cfg.batch_size,), generator=gen)
            x = zn[idx].to(device)
            noise = torch.randn(x.shape, generator=gen).to(device)
            t = flow.sample_t(len(x), "cpu", gen).to(device)
            target = flow.velocity_target(x, noise)
            labels = drop = None
            if classes:  # label dropout for classifier-free guidance, from the step's generator too
                labels = y[idx].to(device)
                drop = (torch.rand(len(x), generator=gen) < dit.config.class_dropout).to(device)
            with autocast(device, cfg.precision):
                v = dit(flow.interpolate(x, noise, t), t, labels, drop)
            loss = (v.float() - target).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            update_ema(ema, dit, ema_decay_at(step, cfg.ema_decay))
            step += 1
            train_s += time.perf_counter() - start
            final = step >= cfg.steps or train_s >= budget_s
            if step % cfg.eval_every == 0 or final:
                save_dit(folder, dit, ema, opt, step, train_s, cfg, source, mean, std)
                log(f"{name}: step {step} loss {loss.item():.4f} ({train_s:.0f} s)")
                if step not in done:
                    evaluate(step)
        run.steps, run.train_s = step, train_s
        run.curve = [r for r in sorted(rows, key=lambda r: r["step"]) if r["tokenizer"] == name]
        result.runs.append(run)

    if deferred is None:
        draw_curve([r for r in rows if r["tokenizer"] in names], out / "curve.png", log)
    with atomic_path(out / "gen.json") as tmp:
        tmp.write_text(json.dumps(dataclasses.asdict(result), indent=2) + "\n")
    return result


def score_deferred(cfg: GenConfig, files: list[str | Path], log: Callable[[str], None] = lambda s: None
                   ) -> list[dict]:
    """Decode and score sample files that `bench_gen` wrote with ``defer_to`` (on another machine, say).

    Each file names its tokenizer, which must be the one of ``cfg.tokenizers`` with that name, the same model file
    (its hash is checked). The sampling settings come from the files (all alike), the decoding ones
    (``decode_steps``, ``decode_shift``) and DATA's reference images from ``cfg``. Rows go into ``cfg.out``'s
    curve.csv as bench gen's do, one file at a time (a file whose row is there is skipped, so a stopped run
    resumes); then curve.png is drawn. Returns the rows added.
    """
    from . import pretrained

    paths = [Path(p) for p in files]
    metas = {}
    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as fh:
                metas[path] = dict(fh.metadata() or {})
        except Exception as exc:
            raise InputError(f"{path}: not a sample file of bench gen ({str(exc).splitlines()[0]})") from None
        if "sampling" not in metas[path]:
            raise InputError(f"{path}: not a sample file of bench gen (no sampling settings)")
    sampling = {m["sampling"] for m in metas.values()}
    if len(sampling) > 1:
        raise InputError(f"{', '.join(map(str, paths))}: drawn with different sampling settings")
    if sampling:
        cfg = dataclasses.replace(cfg, **json.loads(sampling.pop()))
    models = {run_name(t): t for t in cfg.tokenizers}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    curve_path = out / "curve.csv"
    rows = read_curve(curve_path)
    check_eval_settings(out / "eval.json", cfg, bool(rows))
    device = torch.device(cfg.device)
    inception, tokenizers, loaded, refs, added = None, {}, {}, {}, []
    for path in paths:
        name, step = metas[path]["tokenizer"], int(metas[path]["step"])
        if name not in models:
            raise InputError(f"{path}: samples of tokenizer {name!r}, which is not among the tokenizers given")
        if any(r["tokenizer"] == name and r["step"] == step for r in rows):
            log(f"{name}: step {step} already scored")
            continue
        if name not in tokenizers:
            tokenizers[name] = load_model(models[name], device, precision=cfg.precision)
        tokenizer = tokenizers[name]
        if tokenizer.file_hash != metas[path]["model_hash"]:
            raise InputError(f"{path}: drawn on the latents of model {metas[path]['model_hash']}, but "
                             f"{models[name]} is {tokenizer.file_hash}")
        inception = inception or pretrained.fid_inception(device)
        res = tokenizer.config.resolution
        if res not in refs:
            _, images, _, key = reference_images(cfg, res, loaded)
            log(f"reference features ({len(images)} images at {res} px)")
            refs[res] = reference_features(inception, images, out / f"reference-{res}.npz", key, cfg.batch_size)
        z, meta = read_samples(path)
        decode_steps = cfg.decode_steps or tokenizer.default_steps
        log(f"{name}: scoring step {step} ({len(z)} samples, {decode_steps} decode steps)")
        m = score_samples(tokenizer, z, inception, *refs[res], cfg, out / name / "samples" / f"step-{step:07d}.png")
        row = {"tokenizer": name, "step": step, "train_s": round(meta["train_s"], 3), "samples": len(z), **m}
        rows.append(row)
        added.append(row)
        write_curve(curve_path, rows)
        log(f"{name}: step {step}: FID {m['fid']:.2f} sFID {m['sfid']:.2f} precision {m['precision']:.3f} "
            f"recall {m['recall']:.3f}")
    draw_curve(rows, out / "curve.png", log)
    return added
