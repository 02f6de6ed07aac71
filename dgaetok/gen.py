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
from .dit import DiT, DiT_models
from .errors import InputError
from .bench import batch_ranges, eval_images
from .files import atomic_path, find_files, save_grid, to_uint8
from .metrics import PR_NEIGHBOURS, dataset_key, gen_features, gen_metrics
from .models import Tokenizer, autocast, load_model, resolve_model
from .pipeline import load_latent
from .stats import LatentStats
from .train import ema_decay_at, load_prefixed, update_ema

CURVE_FIELDS = ("tokenizer", "step", "train_s", "samples", "fid", "sfid", "precision", "recall")
# Settings a checkpoint depends on: changing them between runs would silently mix two experiments.
RESUME_KEYS = ("dit", "batch_size", "lr", "ema_decay", "seed", "conditional", "limit")
# Settings every row of curve.csv is measured with: rows made with others are not comparable.
EVAL_KEYS = ("num_samples", "sample_steps", "cfg", "decode_steps", "seed")


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
    decode_steps: int = 50
    conditional: bool = True  # False: ignore folder labels
    limit: int | None = None  # only the first N images of DATA
    seed: int = 0
    device: str = "cpu"
    latents: list[str | None] = field(default_factory=list)  # per tokenizer: a `dgaetok encode` folder, or None


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


COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def plot_curve(rows: list[dict], path: Path, metric: str = "fid", size: tuple[int, int] = (640, 420)) -> None:
    """A line plot of ``metric`` against step, one line per tokenizer, drawn with PIL (no plotting dependency)."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 64, 16, 28, 48
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    names = list(dict.fromkeys(r["tokenizer"] for r in rows))
    points = [(r["step"], r[metric]) for r in rows if np.isfinite(r[metric])]
    draw.text((left, 8), f"{metric.upper()} vs training step", fill="black")
    if points:
        xs, ys = zip(*points)
        x0, x1 = 0, max(xs) or 1
        y0, y1 = min(0.0, min(ys)), max(ys) * 1.05 or 1.0

        def at(x: float, y: float) -> tuple[float, float]:
            return (left + (x - x0) / (x1 - x0) * (w - left - right),
                    h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

        draw.line([at(x0, y0), at(x1, y0)], fill="black")
        draw.line([at(x0, y0), at(x0, y1)], fill="black")
        for i in range(5):
            xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
            px, py = at(xv, y0)
            draw.line([(px, py), (px, py + 4)], fill="black")
            draw.text((px - 12, py + 6), f"{xv:.4g}", fill="black")
            qx, qy = at(x0, yv)
            draw.line([(qx - 4, qy), (qx, qy)], fill="black")
            draw.text((4, qy - 6), f"{yv:.1f}", fill="black")
        draw.text((w // 2 - 16, h - 18), "step", fill="black")
        for k, name in enumerate(names):
            colour = COLOURS[k % len(COLOURS)]
            line = sorted((r["step"], r[metric]) for r in rows if r["tokenizer"] == name and np.isfinite(r[metric]))
            pts = [at(x, y) for x, y in line]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            for px, py in pts:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
            lx, ly = w - right - 200, h - bottom - 16 * (len(names) - k)  # legend, bottom right
            draw.line([(lx, ly + 6), (lx + 16, ly + 6)], fill=colour, width=2)
            draw.text((lx + 22, ly), name, fill=colour)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


# --- the benchmark -------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_batches(ema: DiT, tokenizer: Tokenizer, cfg: GenConfig, n_classes: int, mean: torch.Tensor,
                   std: torch.Tensor) -> Iterator[torch.Tensor]:
    """``num_samples`` images in [-1, 1] (CPU), batch by batch, from the same seeded noise and labels at every
    evaluation; labels cycle through the classes, so every class gets its share."""
    device = next(ema.parameters()).device
    c = ema.config
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    noise = torch.randn((cfg.num_samples, c.in_channels, c.input_size, c.input_size), generator=gen)
    labels = torch.arange(cfg.num_samples) % n_classes if n_classes else None
    shape = (-1, 1, 1)
    for a, b in batch_ranges(cfg.num_samples, cfg.batch_size):
        y = labels[a:b].to(device) if labels is not None else None
        with autocast(device):
            z = ema.sample(noise[a:b].to(device), y, cfg.sample_steps, cfg.cfg).float()
        z = z * std.to(device).view(shape) + mean.to(device).view(shape)
        decode_gen = torch.Generator().manual_seed(cfg.seed + 2 + a)
        yield tokenizer.decode(z, steps=cfg.decode_steps, generator=decode_gen).cpu()


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
    inception = pretrained.fid_inception(device)
    curve_path = out / "curve.csv"
    rows = read_curve(curve_path)
    check_eval_settings(out / "eval.json", cfg, bool(rows))

    loaded = {}  # resolution -> eval_images(...): tokenizers of one resolution share the decoded crops
    latent_dirs = list(cfg.latents) + [None] * (len(cfg.tokenizers) - len(cfg.latents))
    for name, model_name, latent_dir in zip(names, cfg.tokenizers, latent_dirs):
        tokenizer = load_model(model_name, device)
        res = tokenizer.config.resolution
        if res not in loaded:
            loaded[res] = eval_images(cfg.data, res, cfg.limit)
        files, images, skipped = loaded[res]
        result.skipped += [m for m in skipped if m not in result.skipped]  # unreadable files: reported
        if len(images) <= PR_NEIGHBOURS:
            raise InputError(f"{cfg.data}: need more than {PR_NEIGHBOURS} readable images, found {len(images)}")
        result.images = len(images)
        key = dataset_key(cfg.data, files, f"rgb-shorter{res}-center{res}-bicubic")
        log(f"{name}: reference features ({len(images)} images at {res} px)")
        ref_pool, ref_spatial = reference_features(inception, images, out / f"reference-{res}.npz", key,
                                                   cfg.batch_size)
        folder = out / name
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        if latent_dir:  # `dgaetok encode` wrote them: labels from the latent tree, which mirrors the image tree
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

        def evaluate(at_step: int) -> None:
            log(f"{name}: evaluating step {at_step} ({cfg.num_samples} samples)")
            feats, grid = [], []
            for batch in sample_batches(ema, tokenizer, cfg, len(classes), mean, std):
                feats.append(gen_features(inception, to_uint8(batch)))  # features only: 10k images would not fit
                grid.append(batch[: 16 - sum(map(len, grid))])
            save_grid(torch.cat(grid), 8, folder / "samples" / f"step-{at_step:07d}.png")
            pool, spatial = (torch.cat(f).numpy() for f in zip(*feats))
            m = gen_metrics(ref_pool, ref_spatial, pool, spatial)
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
            with autocast(device):
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

    plot_curve([r for r in rows if r["tokenizer"] in names], out / "curve.png")
    with atomic_path(out / "gen.json") as tmp:
        tmp.write_text(json.dumps(dataclasses.asdict(result), indent=2) + "\n")
    return result
