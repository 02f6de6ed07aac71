"""Train a DGAE tokenizer: image folder in, self-describing checkpoints out. Runs alone or under torchrun (DDP).

    dgaetok train data/ --out runs/dgae-b --preset dgae-b --downsample 16 --latent-channels 8
    torchrun --nproc_per_node 8 -m dgaetok.cli train data/ --out runs/dgae-b ...

Files in ``out``: ``model.safetensors`` (the EMA weights, usable by encode/decode), ``checkpoint.safetensors``
(raw and EMA weights) with ``optimizer.pt`` (optimizer state) for ``--resume``, ``log.jsonl``, and
``samples/step-*.png`` reconstruction grids (top: originals, bottom: EMA reconstructions).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from .data import DrawSampler, ImageFolder
from .errors import InputError
from .files import atomic_path, save_grid
from .losses import DGAELoss, perceptual_net
from .models import DGAE, DGAE_models, autocast, build_model, save_model


@dataclass
class TrainConfig:
    data: str = ""
    out: str = "runs/dgae"
    # model
    preset: str = "dgae-s"
    resolution: int = 256
    downsample: int = 16
    latent_channels: int = 8
    crop: int | None = None  # train on random crops of this size (None: the full resolution)
    # optimisation (the paper's recipe)
    batch_size: int = 96  # global: split over processes
    steps: int = 100_000
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup: int = 10_000
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # loss
    velocity_weight: float = 1.0
    kl_weight: float = 1e-6
    lpips_weight: float = 1.0
    lpips_net: str = "vgg"
    lpips_pretrained: bool = True  # False: random LPIPS trunk, for tests only
    # bookkeeping
    log_every: int = 10
    ckpt_every: int = 1000
    sample_every: int = 1000
    sample_steps: int = 25
    sample_count: int = 8
    workers: int = 4
    seed: int = 0
    resume: bool = False
    device: str | None = None  # None: cuda:LOCAL_RANK when available, else cpu

    def model_config(self):
        if self.preset not in DGAE_models:
            raise InputError(f"unknown preset {self.preset!r}; choose one of {', '.join(DGAE_models)}")
        return DGAE_models[self.preset](
            resolution=self.resolution, downsample=self.downsample, latent_channels=self.latent_channels
        )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on conv and linear weights only: decaying norms and biases only hurts."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=torch.cuda.is_available())


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_p, model_p = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_p, model_p, 1.0 - decay)


def distributed_setup(requested: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when launched by torchrun.

    The backend follows the device: NCCL for CUDA, gloo for a CPU run (also on a machine that has GPUs).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(requested or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        # Without this every rank's current device stays cuda:0: the DataLoader's pin-memory thread and NCCL
        # then open a CUDA context on GPU 0 per rank.
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


# Settings that decide which images and noise each step sees: changing them breaks an exact resume.
RESUME_KEYS = ("batch_size", "seed", "world", "resolution", "crop")


def save_checkpoint(out: Path, model: DGAE, ema: DGAE, opt: torch.optim.Optimizer, step: int, cfg: TrainConfig,
                    world: int):
    """Optimizer state first, weights last: a checkpoint whose two halves disagree on the step is refused."""
    meta = {"step": str(step), "train_config": json.dumps({**dataclasses.asdict(cfg), "world": world})}
    with atomic_path(out / "optimizer.pt") as tmp:
        torch.save({"step": step, "optimizer": opt.state_dict()}, tmp)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    with atomic_path(out / "checkpoint.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"config": model.config.to_json(), **meta})
    save_model(ema, out / "model.safetensors", step=str(step))


def load_checkpoint(out: Path, model: DGAE, ema: DGAE, opt: torch.optim.Optimizer, cfg: TrainConfig,
                    world: int) -> int:
    path = out / "checkpoint.safetensors"
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
            step, saved = int(meta["step"]), json.loads(meta["train_config"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        state = torch.load(out / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: unreadable checkpoint ({str(exc).splitlines()[0]})") from None
    if meta["config"] != model.config.to_json():
        raise InputError(f"{path}: checkpoint is for another model config; use a fresh --out or the same options")
    now = {**dataclasses.asdict(cfg), "world": world}
    changed = [f"{k} {saved.get(k)} -> {now[k]}" for k in RESUME_KEYS if saved.get(k) != now[k]]
    if changed:
        raise InputError(f"{path}: cannot resume exactly with changed settings ({', '.join(changed)})")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    if state["step"] != step:
        raise InputError(f"{out}: optimizer.pt is at step {state['step']}, checkpoint at {step}; cannot resume")
    opt.load_state_dict(state["optimizer"])
    return step


@torch.no_grad()
def save_samples(ema: DGAE, batch: torch.Tensor, steps: int, path: Path, seed: int) -> None:
    ema.eval()
    z = ema.encode(batch).latent_dist.mode()
    recon = ema.decode(z, steps=steps, generator=torch.Generator().manual_seed(seed))
    save_grid(torch.cat([batch.cpu(), recon.cpu()]), len(batch), path)


def train(cfg: TrainConfig, on_step: Callable[[int, dict], None] | None = None) -> DGAE:
    """Run (or resume) training to ``cfg.steps`` and return the EMA model. ``on_step(step, logs)`` is called
    after each optimizer step; an exception it raises stops the run after a checkpoint, like Ctrl-C does."""
    rank, world, device = distributed_setup(cfg.device)
    if cfg.batch_size % world:
        raise InputError(f"batch size {cfg.batch_size} does not split over {world} processes")
    out = Path(cfg.out)
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)  # identical initial weights on every process
    model = build_model(cfg.model_config()).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = make_optimizer(model, cfg)
    step = 0
    if cfg.resume and (out / "checkpoint.safetensors").exists():
        step = load_checkpoint(out, model, ema, opt, cfg, world)
    elif (out / "checkpoint.safetensors").exists():
        raise InputError(f"{out}: holds a checkpoint already; pass --resume to continue it or choose another --out")

    loss_fn = DGAELoss(
        perceptual_net(cfg.lpips_net, cfg.lpips_pretrained) if cfg.lpips_weight > 0 else None,
        cfg.velocity_weight, cfg.kl_weight, cfg.lpips_weight,
    ).to(device)
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model

    dataset = ImageFolder(cfg.data, cfg.resolution, cfg.crop, cfg.seed)
    per_rank = cfg.batch_size // world
    loader = iter(DataLoader(dataset, per_rank, sampler=DrawSampler(per_rank, step, rank, world),
                             num_workers=cfg.workers, pin_memory=device.type == "cuda",
                             persistent_workers=cfg.workers > 0))
    fixed = dataset.fixed_batch(cfg.sample_count).to(device) if is_main and cfg.sample_count else None
    generator = torch.Generator(device)
    progress = _Progress(cfg.steps, step) if is_main else None
    log_file = open(out / "log.jsonl", "a") if is_main else None

    in_update = False  # an interrupt between opt.step() and step += 1 must not save a half-made step
    sums: dict[str, torch.Tensor] = {}
    try:
        t0, seen, count = time.perf_counter(), 0, 0
        while step < cfg.steps:
            x = next(loader).to(device, non_blocking=True)
            model.train()
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            generator.manual_seed(cfg.seed * 1_000_003 + step * world + rank)
            with autocast(device):
                loss, logs = loss_fn(net, x, generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            try:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, error_if_nonfinite=True)
            except RuntimeError:
                raise Diverged(f"training diverged at step {step + 1} (non-finite gradients); the checkpoint "
                               f"in {out} is the last good state") from None
            in_update = True
            opt.step()
            update_ema(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
            step += 1
            in_update = False
            seen, count = seen + x.shape[0] * world, count + 1
            for k, v in logs.items():
                sums[k] = sums[k] + v if k in sums else v

            if is_main and (step % cfg.log_every == 0 or step == cfg.steps):
                elapsed = time.perf_counter() - t0
                record = {"step": step, "lr": lr, "grad_norm": grad_norm.item(), "img_per_s": seen / elapsed,
                          **{k: v.item() / count for k, v in sums.items()}}
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                progress.update(step, record)
                t0, seen, count, sums = time.perf_counter(), 0, 0, {}
            if is_main and fixed is not None and (step % cfg.sample_every == 0 or step == cfg.steps):
                save_samples(ema, fixed, cfg.sample_steps, out / "samples" / f"step-{step:07d}.png", cfg.seed)
            if is_main and (step % cfg.ckpt_every == 0 or step == cfg.steps):
                save_checkpoint(out, model, ema, opt, step, cfg, world)
            if on_step is not None:
                on_step(step, logs)
    except Diverged:
        raise
    except BaseException:
        if is_main and step > 0 and not in_update:
            save_checkpoint(out, model, ema, opt, step, cfg, world)
        raise
    finally:
        if progress is not None:
            progress.close()
        if log_file is not None:
            log_file.close()
    return ema


class Diverged(InputError):
    """Training produced non-finite values; the checkpoint on disk is left as the last good state."""


class _Progress:
    """A rich progress bar showing loss, lr and images per second."""

    def __init__(self, total: int, start: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[stats]}"))
        self.task = self.bar.add_task("train", total=total, completed=start, stats="")
        self.bar.start()

    def update(self, step: int, record: dict) -> None:
        stats = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['img_per_s']:.1f} img/s"
        self.bar.update(self.task, completed=step, stats=stats)

    def close(self) -> None:
        self.bar.stop()
