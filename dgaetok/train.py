"""Train a DGAE or SD-VAE tokenizer: image folder in, self-describing checkpoints out. Runs alone or under torchrun.

    dgaetok train data/ --out runs/dgae-b --preset dgae-b --downsample 16 --latent-channels 8
    dgaetok train data/ --out runs/sdvae --arch sdvae --preset sdvae-f16c8 --disc-start 50000
    torchrun --nproc_per_node 8 -m dgaetok.cli train data/ --out runs/dgae-b ...

Both families run the same loop with the same autoencoder optimizer; SD-VAE adds a PatchGAN discriminator with its
own optimizer, stepped after the autoencoder from ``disc_start`` on. A distillation run (``teacher`` set,
`dgaetok.distill`) is the same loop too: the model is the teacher's, its encoder frozen, and the loss pulls its
few-step decode towards the teacher's many-step one.

The global batch is split into ``world * accum`` shards of equal size: each process holds ``accum`` of them and
runs them one after the other as the micro-batches of gradient accumulation (`accumulate`). A shard's images and
noise depend only on (seed, step, shard), so 1 process with ``accum`` 8 and 8 processes compute the same update,
up to float rounding.

Files in ``out``: ``model.safetensors`` (the EMA weights, usable by encode/decode), ``checkpoint.safetensors``
(raw and EMA weights, and the discriminator's) with ``optimizer.pt`` (optimizer states) for ``--resume``,
``log.jsonl``, and ``samples/step-*.png`` reconstruction grids (top: originals, bottom: EMA reconstructions).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
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

from .data import DeviceImages, DrawSampler, ImageFolder
from .errors import InputError
from .files import atomic_path, save_grid
from .losses import DGAELoss, NLayerDiscriminator, SDVAELoss, perceptual_net
from . import distill
from .models import (ARCHS, MODELS, Tokenizer, build_model, config_of, file_sha256, load_encoder,
                     read_model_file, resolve_model, save_model, synchronize)
from .precision import Precision, autocast, resolve, training_layout
from .stats import measure_folder


@dataclass
class TrainConfig:
    data: str = ""
    out: str = "runs/dgae"
    # model
    arch: str | None = None  # "dgae" or "sdvae"; None: the preset's family
    preset: str | None = None  # None: "<arch>-s"
    resolution: int = 256
    downsample: int | None = None  # None: the preset's (16 for the DGAE presets and sdvae-s)
    latent_channels: int | None = None  # None: the preset's (8 for the DGAE presets and sdvae-s)
    crop: int | None = None  # train on random crops of this size (None: the full resolution)
    # optimisation (the paper's recipe)
    batch_size: int = 96  # global: split over processes, then into accum micro-batches
    accum: int = 1  # micro-batches per process and step (gradient accumulation; see the module docstring)
    grad_checkpoint: bool = False  # recompute blocks in backward to save memory (`Tokenizer.set_grad_checkpointing`)
    steps: int = 100_000
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup: int = 10_000
    # the cosine begins at this step rather than at the warm-up's end: the cooldown of a flat-rate run (min_lr = lr)
    # on a copy of its folder, resumed with a lower min_lr, so that the flat run goes on (warmup-stable-decay)
    decay_from: int | None = None
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # loss
    velocity_weight: float = 1.0
    kl_weight: float = 1e-6
    lpips_weight: float = 1.0
    lowpass_weight: float = 0.0  # DGAE: MSE of x0' and the image over 8x8 blocks (`losses.lowpass_mse`); 0: off
    lpips_net: str = "vgg"
    lpips_pretrained: bool = True  # False: random LPIPS trunk, for tests only
    # SD-VAE only: reconstruction term and the PatchGAN (LDM's LPIPSWithDiscriminator)
    rec_loss: str = "l1"  # or "l2"
    disc_start: int = 50_001  # steps without the GAN term (and without training the discriminator)
    disc_weight: float = 0.5
    disc_channels: int = 64
    disc_layers: int = 3
    disc_betas: tuple[float, float] = (0.5, 0.9)  # Adam, as taming; its lr follows the autoencoder's schedule
    collapse_windows: int = 10  # stop after this many log windows in a row with a collapsed GAN (0: never)
    collapse_gap: float = 10.0  # ... a window is collapsed when mean logits_real - logits_fake exceeds this,
    collapse_eps: float = 0.05  # ... or d_loss is within this of 2
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
    compile: str | None = None  # a models.COMPILE_MODES mode: torch.compile the encoder and decoder (None: eager)
    precision: str = "auto"  # what the networks compute in (`dgaetok.precision`); weights, optimizer and EMA: fp32
    data_on_device: bool = False  # decode the images once and keep them on the device (`data.DeviceImages`)
    minutes: float | None = None  # wall-time budget: stop then, and end the cosine schedule there (`Budget`)
    # a model file of the same config to start from (fresh optimizer and schedule); a distillation takes only its
    # decoder (an earlier student's, of this teacher or of an earlier one), the encoder staying the teacher's
    warm_start: str | None = None
    # the encoder from another model file (same f, c and encoder shape), optionally frozen for the first N steps
    init_encoder: str | None = None
    freeze_encoder: int = 0
    # latent statistics in the final model.safetensors, over this many images (0: none); a distilled student takes
    # its teacher's instead
    stats_images: int = 256
    # distillation (`dgaetok.distill`): a DGAE model file whose decoder the run distils into a few-step student.
    # The model is then the teacher's (its config and weights; preset, downsample and latent_channels are
    # ignored), its encoder frozen; the loss is distill's, weighted by mse_weight, lpips_weight and real_weight.
    teacher: str | None = None
    teacher_steps: int = 8  # Euler steps of the teacher's targets ...
    teacher_shift: float = 1.0  # ... on this time grid (`flow.time_grid`; 1 is uniform)
    student_steps: int = 1  # K: the student's steps ...
    student_shift: float = 1.0  # ... and their grid (any shift is the same one step for K = 1)
    mse_weight: float = 1.0
    real_weight: float = 0.0  # the student against the real image too (MSE and LPIPS, weighted as above)

    def model_config(self):
        if self.teacher:
            path = resolve_model(self.teacher)
            return config_of(read_model_file(path)[0], path)
        if self.arch is not None and self.arch not in ARCHS:
            raise InputError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        preset = self.preset or f"{self.arch or 'dgae'}-s"
        if preset not in MODELS:
            raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(MODELS)}")
        latent = {k: v for k, v in (("downsample", self.downsample), ("latent_channels", self.latent_channels))
                  if v is not None}
        try:
            config = MODELS[preset](resolution=self.resolution, **latent)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        if self.arch is not None and config.arch != self.arch:
            raise InputError(f"preset {preset} is an {config.arch} model, not {self.arch}")
        return config


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, flat until ``decay_from`` if set, then cosine decay to ``min_lr`` at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    start = max(cfg.warmup, cfg.decay_from or 0)
    progress = min(1.0, max(0, step - start) / max(1, cfg.steps - start))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on conv and linear weights only: decaying norms and biases only hurts. Frozen
    parameters (a distilled student's encoder) are left out."""
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.dim() >= 2]
    no_decay = [p for p in trained if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type == "cuda"  # one kernel for all parameters, no host sync
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay warmed up as (1 + step) / (10 + step), so short runs are not dominated by the initial weights."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()  # the lerp must not record autograd history: the EMA would grow a graph step by step
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_p, model_p = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_p, model_p, 1.0 - decay)


def distributed_setup(requested: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when launched by torchrun.

    The backend follows the device: NCCL for CUDA, gloo for a CPU run (also on a machine that has GPUs).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:  # "--device cuda": this process's GPU under torchrun
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        # Without this every rank's current device stays cuda:0: the DataLoader's pin-memory thread and NCCL
        # then open a CUDA context on GPU 0 per rank.
        torch.cuda.set_device(device)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ  # torchrun: any size
    if launched and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


# Settings that decide which images and noise each step sees: changing them breaks an exact resume. "shards" is
# world * accum: a run may continue with another split of its shards (8 processes -> 1 with accum 8), which
# changes only the float rounding of the summed gradients. A distillation's targets also depend on its teacher.
RESUME_KEYS = ("batch_size", "seed", "shards", "resolution", "crop", "teacher_hash")


def run_settings(cfg: TrainConfig, world: int) -> dict:
    """The config as a checkpoint records it, with the run's process count and shard count (and a distillation
    run's teacher by its hash: the file may move, but another teacher is another run)."""
    teacher = file_sha256(resolve_model(cfg.teacher)) if cfg.teacher else None
    return {**dataclasses.asdict(cfg), "world": world, "shards": world * cfg.accum, "teacher_hash": teacher}


def save_checkpoint(out: Path, model: Tokenizer, ema: Tokenizer, opts: dict[str, torch.optim.Optimizer], step: int,
                    cfg: TrainConfig, world: int, disc: torch.nn.Module | None = None):
    """Optimizer states first, weights last: a checkpoint whose two halves disagree on the step is refused.

    ``opts`` maps names to optimizers ("optimizer", and "disc_optimizer" for SD-VAE); ``disc`` is SD-VAE's
    discriminator, stored as ``disc.*`` tensors beside ``model.*`` and ``ema.*``.
    """
    meta = {"step": str(step), "train_config": json.dumps(run_settings(cfg, world))}
    with atomic_path(out / "optimizer.pt") as tmp:
        torch.save({"step": step, **{name: o.state_dict() for name, o in opts.items()}}, tmp)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    if disc is not None:
        tensors |= {f"disc.{k}": v for k, v in disc.state_dict().items()}
    with atomic_path(out / "checkpoint.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"config": model.config.to_json(), **meta})
    save_model(ema, out / "model.safetensors", step=str(step))


def load_checkpoint(out: Path, model: Tokenizer, ema: Tokenizer, opts: dict[str, torch.optim.Optimizer],
                    cfg: TrainConfig, world: int, disc: torch.nn.Module | None = None) -> int:
    path = out / "checkpoint.safetensors"
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
            step, saved = int(meta["step"]), json.loads(meta["train_config"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        state = torch.load(out / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: unreadable checkpoint ({str(exc).splitlines()[0]})") from None
    if type(model.config).from_json(meta["config"]) != model.config:
        raise InputError(f"{path}: checkpoint is for another model config; use a fresh --out or the same options")
    now = run_settings(cfg, world)
    saved.setdefault("shards", saved["world"] * saved.get("accum", 1))  # checkpoints from before accumulation
    changed = [f"{k} {saved.get(k)} -> {now[k]}" for k in RESUME_KEYS if saved.get(k) != now[k]]
    if changed:
        raise InputError(f"{path}: cannot resume exactly with changed settings ({', '.join(changed)})")
    load_prefixed(tensors, {"model.": model, "ema.": ema, "disc.": disc})
    if state["step"] != step:
        raise InputError(f"{out}: optimizer.pt is at step {state['step']}, checkpoint at {step}; cannot resume")
    for name, o in opts.items():
        o.load_state_dict(state[name])
    return step


WARM_START_RECORD = ("step", "phase", "cpu_hours", "images_seen")  # what a model file says of its own training


def warm_start(model: Tokenizer, path: str | os.PathLike, part: str | None = None) -> dict:
    """Load a model file's weights into ``model`` (a new run that starts where another model is), or only those of
    one of its parts (``part``, "decoder" say: a student that starts where an earlier student's decoder is).

    Returns the run's first log record: the file, its sha256 and its own training record, so that a run's
    progress adds up even after the file it started from has been replaced (the bundled default, say)."""
    file = resolve_model(path)
    meta, tensors = read_model_file(file)
    if type(model.config).from_json(meta["config"]) != model.config:
        raise InputError(f"{path}: --warm-start needs a model of the same config; it holds "
                         f"{meta['config']}, this run builds {model.config.to_json()}")
    tensors = {k: v.float() for k, v in tensors.items()}
    if part is None:
        model.load_state_dict(tensors)
    else:
        load_prefixed(tensors, {f"{part}.": getattr(model, part)})
    return {"step": 0, "event": "warm_start", "part": part or "all", "from": str(path), "sha256": file_sha256(file),
            **{f"from_{k}": meta[k] for k in WARM_START_RECORD if k in meta}}


def load_prefixed(tensors: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module | None]) -> None:
    """Load each module from the checkpoint tensors under its prefix ("model.", "ema.", ...); None: skipped."""
    for prefix, module in modules.items():
        if module is not None:
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


def resume_log(path: Path, step: int) -> None:
    """Cut ``log.jsonl`` back to the checkpoint's ``step`` and mark the resume: a killed run logged steps past
    its last checkpoint, which the resumed run logs again, and a reader must never see a step twice."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # the line a kill cut short
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    kept.append(json.dumps({"event": "resumed", "step": step}))
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(kept) + "\n")


@torch.no_grad()
def save_samples(ema: Tokenizer, batch: torch.Tensor, steps: int | None, path: Path, seed: int) -> None:
    ema.eval()
    z = ema.encode(batch).latent_dist.mode()
    recon = ema.decode(z, steps=steps, generator=torch.Generator().manual_seed(seed))
    save_grid(torch.cat([batch.cpu(), recon.cpu()]), len(batch), path)


def accumulate(net: torch.nn.Module, micro_batches: tuple[torch.Tensor, ...],
               loss_of: Callable[[int, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]],
               device: torch.device, precision: str | Precision = "fp32") -> dict[str, torch.Tensor]:
    """Forward and backward ``loss_of(j, micro_batches[j])`` for each micro-batch, the loss divided by their
    number: the losses are means over images and the micro-batches are equal in size, so the gradients add up to
    those of the mean over the process's batch. Under DDP the gradients are all-reduced once, with the last
    micro-batch's backward (`no_sync` before). Returns the logs averaged over the micro-batches."""
    n, logs = len(micro_batches), {}
    for j, x in enumerate(micro_batches):
        sync = net.no_sync() if j < n - 1 and isinstance(net, DistributedDataParallel) else contextlib.nullcontext()
        with sync:
            with autocast(device, precision):
                loss, micro_logs = loss_of(j, x)
            (loss / n).backward()
        for k, v in micro_logs.items():
            logs[k] = logs[k] + v / n if k in logs else v / n
    return logs


class FiniteWatch:
    """Clips gradients and remembers, on the device, the first step whose gradients were not finite.

    Asking every step (``error_if_nonfinite``) would make the host wait for the GPU every step; instead `check`
    is called where the host waits anyway (logging) and before anything is saved, so a checkpoint on disk always
    holds finite weights from before the first bad step.
    """

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.what = ""

    def clip(self, params, max_norm: float, what: str, step: int) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        bad = ~torch.isfinite(norm) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, step + 1, self.first_bad)
        self.what = self.what or what  # which optimizer is only known for sure if it is always the same
        return norm

    def check(self, out: Path) -> None:
        """Raise `Diverged` if some step so far had non-finite gradients."""
        first = int(self.first_bad.item())
        if first >= 0:
            raise Diverged(f"training diverged at step {first} (non-finite gradients); the checkpoint in {out} is "
                           "the last good state")


def agree(value: int, world: int, device: torch.device) -> int:
    """Rank 0's ``value`` on every process (itself when alone)."""
    if world == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=device)
    dist.broadcast(tensor, 0)
    return int(tensor.item())


class Budget:
    """``--minutes``: a wall-time budget for the run (a lent GPU session, a CPU slot).

    The loop stops with a checkpoint at the first log step after the budget is spent. So that the cosine schedule ends there rather than
    being cut off, the step count is fixed once, from the measured speed of steps ``start + 5`` to ``start + 25``
    (the first ones include compilation and warm-up), to what fits the rest of the budget, less 3% for the
    sample grids and checkpoints. Warm-up steps do not depend on the step count, so a ``--warmup`` of 25 steps or
    more makes the schedule exactly a cosine ending at the new count.
    """

    FROM, TO, MARGIN = 5, 25, 0.97

    def __init__(self, minutes: float, start_step: int):
        self.seconds, self.start = 60.0 * minutes, start_step
        self.t0, self.t_from = time.perf_counter(), None
        self.planned: int | None = None

    def spent(self) -> bool:
        return time.perf_counter() - self.t0 >= self.seconds

    def plan(self, step: int, device: torch.device) -> int | None:
        """After step ``step``: the step count that fills the budget, once, when the speed is known."""
        if self.planned is not None or step not in (self.start + self.FROM, self.start + self.TO):
            return None
        synchronize(device)
        now = time.perf_counter()
        if step == self.start + self.FROM:
            self.t_from = now
            return None
        rate = (self.TO - self.FROM) / (now - self.t_from)
        self.planned = step + int(self.MARGIN * rate * (self.seconds - (now - self.t0)))
        return self.planned


class CollapseWatch:
    """Counts log windows in a row where the GAN looks collapsed: the discriminator separates real from fake by
    more than ``gap`` logits, or its hinge loss sits within ``eps`` of 2 (it is fooled outright, so it has stopped
    learning). A hinge loss near 0 alone is not a collapse: the discriminator wins, the adaptive weight shrinks
    the GAN term, and the generator still gets its gradient (seen on CPU: d_loss 0.01-0.05 for 500 steps while
    L1 and LPIPS kept falling)."""

    def __init__(self, windows: int, gap: float, eps: float):
        self.windows, self.gap, self.eps, self.streak = windows, gap, eps, 0

    def update(self, record: dict) -> str | None:
        """Feed one log record; returns a message once the collapse has lasted ``windows`` windows."""
        if "d_loss" not in record:
            return None
        gap, d_loss = record["logits_real"] - record["logits_fake"], record["d_loss"]
        collapsed = gap > self.gap or abs(d_loss - 2.0) < self.eps
        self.streak = self.streak + 1 if collapsed else 0
        if self.windows and self.streak >= self.windows:
            return (f"discriminator collapsed at step {record['step']} (d_loss {d_loss:.3f}, logits_real - "
                    f"logits_fake {gap:.2f} for {self.streak} log windows)")
        return None


def train(cfg: TrainConfig, on_step: Callable[[int, dict], None] | None = None) -> Tokenizer:
    """Run (or resume) training to ``cfg.steps`` and return the EMA model. ``on_step(step, logs)`` is called
    after each optimizer step; an exception it raises stops the run after a checkpoint, like Ctrl-C does."""
    if cfg.rec_loss not in ("l1", "l2"):
        raise InputError(f"rec_loss {cfg.rec_loss!r}: choose l1 or l2")
    if cfg.freeze_encoder and not cfg.init_encoder:
        raise InputError("freezing the encoder needs an encoder to start from (--init-encoder)")
    if cfg.teacher and cfg.init_encoder:
        raise InputError("a distilled student keeps its teacher's encoder; --init-encoder does not apply")
    if cfg.lowpass_weight and (cfg.teacher or cfg.model_config().arch != "dgae"):
        raise InputError("--lowpass-weight is a term of the DGAE loss; SD-VAE and distillation runs have none")
    rank, world, device = distributed_setup(cfg.device)
    try:
        precision = resolve(cfg.precision, device)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    shards = world * cfg.accum
    if cfg.accum < 1 or cfg.batch_size % shards:
        raise InputError(f"batch size {cfg.batch_size} does not split into {world} process(es) x {cfg.accum} "
                         "micro-batch(es) of equal size")
    out = Path(cfg.out)  # created only once everything below has been checked: a failed start leaves nothing
    is_main = rank == 0

    torch.manual_seed(cfg.seed)  # identical initial weights on every process
    model = build_model(cfg.model_config())
    teacher = distill.load_teacher(cfg.teacher, device) if cfg.teacher else None
    if teacher is not None:
        model.distilled = distill.record(teacher, cfg.teacher_steps, cfg.teacher_shift, cfg.student_steps,
                                         cfg.student_shift)
        model.encoder.requires_grad_(False)  # the teacher's latents stay the student's
    started = []  # where a new run's weights come from, its log's first records
    if not (cfg.resume and (out / "checkpoint.safetensors").exists()):  # a resumed run has its weights
        if cfg.warm_start and not cfg.teacher:
            started.append(warm_start(model, cfg.warm_start))
        if cfg.teacher:  # a student starts as its teacher; with a warm start, with an earlier student's decoder
            warm_start(model, cfg.teacher)
            if cfg.warm_start:
                started.append(warm_start(model, cfg.warm_start, "decoder"))
        if cfg.init_encoder:
            load_encoder(model, cfg.init_encoder)
    layout = training_layout(device, precision)  # channels_last but for bf16 on the CPU; inputs follow as they come
    model = model.to(device, memory_format=layout).set_grad_checkpointing(cfg.grad_checkpoint)
    model.set_precision(precision)  # the EMA copy below inherits it: the sample grids decode as the model trains
    ema = copy.deepcopy(model).eval().requires_grad_(False)  # deepcopy keeps ``distilled``: the EMA is the student
    if cfg.compile:  # after the EMA copy, which stays eager: it only samples the reconstruction grids
        model.compile_networks(cfg.compile)
    opts = {"optimizer": make_optimizer(model, cfg)}
    opt = opts["optimizer"]
    gan = model.config.arch == "sdvae"
    disc = NLayerDiscriminator(ndf=cfg.disc_channels, n_layers=cfg.disc_layers).to(device) if gan else None
    if gan:
        opts["disc_optimizer"] = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=cfg.disc_betas)
    step = 0
    if cfg.resume and (out / "checkpoint.safetensors").exists():
        step = load_checkpoint(out, model, ema, opts, cfg, world, disc)
    elif (out / "checkpoint.safetensors").exists():
        raise InputError(f"{out}: holds a checkpoint already; pass --resume to continue it or choose another --out")

    perceptual = perceptual_net(cfg.lpips_net, cfg.lpips_pretrained) if cfg.lpips_weight > 0 else None
    if teacher is not None:
        loss_fn = distill.DistillLoss(teacher, model.distilled, perceptual, cfg.mse_weight, cfg.lpips_weight,
                                      cfg.real_weight).to(device)
    elif gan:
        loss_fn = SDVAELoss(perceptual, disc, cfg.rec_loss, cfg.kl_weight, cfg.lpips_weight, cfg.disc_weight,
                            cfg.disc_start).to(device)
    else:
        loss_fn = DGAELoss(perceptual, cfg.velocity_weight, cfg.kl_weight, cfg.lpips_weight,
                           cfg.lowpass_weight).to(device)
    wrap = lambda m: DistributedDataParallel(m, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist.is_initialized() else m  # noqa: E731
    net = wrap(distill.Student(model, list(model.distilled.grid)) if teacher is not None else model)
    disc_net = wrap(disc) if gan else None
    watch = CollapseWatch(cfg.collapse_windows, cfg.collapse_gap, cfg.collapse_eps) if gan else None

    dataset = ImageFolder(cfg.data, cfg.resolution, cfg.crop, cfg.seed)
    fixed = dataset.fixed_batch(max(1, cfg.sample_count))  # InputError here if no image at all is readable
    fixed = fixed.to(device) if is_main and cfg.sample_count else None
    micro = cfg.batch_size // shards
    sampler = DrawSampler(micro, step, rank, world, cfg.accum)
    if cfg.data_on_device:  # the same draws as the loader's, cut from images already on the device
        resident = DeviceImages(dataset, device, workers=max(1, cfg.workers))
        next_batch = lambda step: resident.batch(sampler.draws(step))  # noqa: E731
    else:
        loader = iter(DataLoader(dataset, micro * cfg.accum, sampler=sampler, num_workers=cfg.workers,
                                 pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0))
        next_batch = lambda step: next(loader).to(device, non_blocking=True)  # noqa: E731
    finite = FiniteWatch(device)
    budget = Budget(cfg.minutes, step) if cfg.minutes is not None else None
    generator = torch.Generator(device)
    if is_main:
        print(f"note: {precision.note()}", file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        if step:
            resume_log(out / "log.jsonl", step)
    progress = _Progress(cfg.steps, step) if is_main else None
    log_file = open(out / "log.jsonl", "a" if step else "w") if is_main else None  # "w": an attempt killed early
    if is_main and not step:
        log_file.writelines(json.dumps(record) + "\n" for record in started)

    in_update = False  # an interrupt between opt.step() and step += 1 must not save a half-made step
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}  # per term: SD-VAE's GAN terms appear only from disc_start on
    try:
        t0, c0, seen = time.perf_counter(), time.process_time(), 0
        while step < cfg.steps:
            x = next_batch(step).contiguous(memory_format=layout)
            model.train()
            lr = lr_at(step, cfg)
            for o in opts.values():
                for group in o.param_groups:
                    group["lr"] = lr
            micro_x, recons = x.split(micro), []

            def shard_loss(j: int, x: torch.Tensor):
                # shard rank * accum + j draws its noise as if it were a process of its own
                generator.manual_seed(cfg.seed * 1_000_003 + step * shards + sampler.shards()[j])
                loss, logs = loss_fn(net, x, generator, step)
                recons.append(getattr(loss_fn, "recon", None))  # SD-VAE: the discriminator's fakes
                return loss, logs

            opt.zero_grad(set_to_none=True)
            logs = accumulate(net, micro_x, shard_loss, device, precision)
            if step < cfg.freeze_encoder:  # no gradient: AdamW then leaves those weights alone, decay included
                for p in model.encoder.parameters():
                    p.grad = None
            grad_norm = finite.clip(model.parameters(), cfg.grad_clip, "autoencoder", step)
            in_update = True
            opt.step()
            update_ema(ema, model, ema_decay_at(step, cfg.ema_decay))
            if gan and loss_fn.gan_active(step):  # SD-VAE: then the discriminator, on the same micro-batches

                def disc_loss(j: int, x: torch.Tensor):
                    loss_fn.recon = recons[j]  # discriminator_loss scores the last reconstruction: micro-batch j's
                    return loss_fn.discriminator_loss(disc_net, x)

                opts["disc_optimizer"].zero_grad(set_to_none=True)
                logs |= accumulate(disc_net, micro_x, disc_loss, device, precision)
                finite.clip(disc.parameters(), math.inf, "discriminator", step)
                opts["disc_optimizer"].step()
            step += 1
            in_update = False
            seen += x.shape[0] * world
            for k, v in logs.items():
                sums[k], counts[k] = (sums[k] + v, counts[k] + 1) if k in sums else (v, 1)

            if budget is not None:  # rank 0 decides, so that every process stops at the same step
                # a flat schedule (min_lr == lr) does not depend on the step count: nothing to plan, and a speed
                # measured while the machine was busy cannot cut the run short
                planned = budget.plan(step, device) if cfg.min_lr < cfg.lr else None
                if planned is not None:
                    planned = agree(planned, world, device)
                    if planned < cfg.steps:
                        cfg = dataclasses.replace(cfg, steps=max(step + 1, planned))
                        if progress is not None:
                            progress.bar.update(progress.task, total=cfg.steps)
                        if is_main:
                            log_file.write(json.dumps({"step": step, "event": "budget", "steps": cfg.steps}) + "\n")
                if step % cfg.log_every == 0 and agree(int(budget.spent()), world, device):
                    cfg = dataclasses.replace(cfg, steps=step)  # the last step: log, grid and checkpoint now

            collapsed = None
            if step % cfg.log_every == 0 or step == cfg.steps:
                finite.check(out)
            if is_main and (step % cfg.log_every == 0 or step == cfg.steps):
                elapsed = time.perf_counter() - t0
                # cpu_s: the process's CPU seconds over the window, all threads: against the wall time it shows a
                # paused process or a shared machine, which img_per_s alone cannot tell from a slow one
                record = {"step": step, "lr": lr, "grad_norm": grad_norm.item(), "img_per_s": seen / elapsed,
                          "cpu_s": time.process_time() - c0, **{k: v.item() / counts[k] for k, v in sums.items()}}
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                progress.update(step, record)
                t0, c0, seen, sums, counts = time.perf_counter(), time.process_time(), 0, {}, {}
                collapsed = watch.update(record) if watch is not None else None
            if gan and world > 1 and (step % cfg.log_every == 0 or step == cfg.steps):
                flag = torch.tensor([collapsed is not None], device=device)
                dist.broadcast(flag, 0)  # every rank stops together
                collapsed = collapsed or ("discriminator collapsed (see rank 0)" if flag.item() else None)
            if collapsed:
                raise Diverged(f"{collapsed}; the checkpoint in {out} is the last good state")
            if is_main and fixed is not None and (step % cfg.sample_every == 0 or step == cfg.steps):
                save_samples(ema, fixed, None if teacher is not None else cfg.sample_steps, out / "samples" / f"step-{step:07d}.png", cfg.seed)
            # while the GAN looks collapsed, periodic checkpoints wait, so the one on disk stays a good one
            suspect = watch is not None and watch.streak > 0 and step != cfg.steps
            if is_main and (step % cfg.ckpt_every == 0 or step == cfg.steps) and not suspect:
                finite.check(out)
                save_checkpoint(out, model, ema, opts, step, cfg, world, disc)
            if on_step is not None:
                on_step(step, logs)
    except Diverged as exc:
        if is_main:
            log_file.write(json.dumps({"step": step, "event": "diverged", "message": str(exc)}) + "\n")
            print(f"warning: {exc}", file=sys.stderr)
        raise
    except BaseException:
        if is_main and step > 0 and not in_update and int(finite.first_bad.item()) < 0:
            save_checkpoint(out, model, ema, opts, step, cfg, world, disc)
        raise
    finally:
        if progress is not None:
            progress.close()
        if log_file is not None:
            log_file.close()
    # the exported model carries its latents' statistics; a student's latents are its teacher's (the same frozen
    # encoder), so it takes the teacher's, and latents normalised for a diffusion model mean the same with either
    stats = teacher.latent_stats if teacher is not None else None
    if is_main and (stats is not None or cfg.stats_images):
        ema.latent_stats = stats if stats is not None else measure_folder(ema, cfg.data, cfg.stats_images)
        save_model(ema, out / "model.safetensors", step=str(step))
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
