"""Few-step distillation of a DGAE decoder: a student that decodes in K steps what its teacher decodes in N.

    dgaetok distill weights/default.safetensors data/ -o runs/default-1step --teacher-steps 8

As SSDD (Vallaeys et al. 2025) does, without a GAN: the student is the teacher's model, initialised from it, whose
encoder stays the teacher's (frozen, so that it decodes the latents the teacher's encoder made, and that latent
diffusion models were trained on); a student of a retrained teacher may start from an earlier student's decoder
instead (``TrainConfig.warm_start``), which already decodes in K steps. Each training image is encoded once
(posterior mean); from one noise draw the teacher integrates the flow ODE in ``teacher_steps`` Euler steps on its
time grid (``teacher_shift``) and the student in K steps on its own; the loss pulls the student's image towards
the teacher's:

    mse_weight * MSE(student, teacher) + lpips_weight * LPIPS(student, teacher)
        + real_weight * (mse_weight * MSE(student, x) + lpips_weight * LPIPS(student, x))

The last term (off by default) lets the real image correct the teacher. Gradients flow through all K student
steps. The teacher's targets are computed on the fly, in the same step, rather than cached: each batch has
new crops and new noise, so a cache would have to hold one teacher decode per (image, crop, noise) seen, and
it would cost the same teacher passes to fill (benchmarks/RESULTS.md, "One-step distillation", measures the
share of a step the teacher takes).

A distillation run is a training run (`dgaetok.train.train` with ``TrainConfig.teacher`` set): data, crops, AdamW,
EMA, checkpoints, exact resume, the time budget and DDP are the training loop's. The student's model file
records what it is (`models.Distilled`), and decodes in K steps by default.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import flow
from .errors import InputError
from .models import DGAE, Distilled, Tokenizer, load_model


def decode_on(model: DGAE, z: torch.Tensor, noise: torch.Tensor, grid: list[float]) -> torch.Tensor:
    """Euler steps of ``model``'s decoder through ``grid`` from ``noise``, the whole batch in each U-Net call (a
    training batch of small crops is a few images' worth of pixels), unclamped, autograd as the caller has it."""
    cond = model.condition(z.to(noise.dtype))
    return flow.integrate(lambda x, t: model.decoder(x, t, cond).float(), noise, grid)


class Student(nn.Module):
    """The student's K-step decode as one module: what DDP wraps, so that all K U-Net passes are one forward
    (the same parameters used K times in one graph, which DDP allows; K separate forwards it does not)."""

    def __init__(self, model: DGAE, grid: list[float]):
        super().__init__()
        self.model, self.grid = model, list(grid)

    def forward(self, z: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Latents and starting noise -> the decoded images, unclamped (a clamped pixel would get no gradient)."""
        return decode_on(self.model, z, noise, self.grid)


def load_teacher(path: str | os.PathLike, device: torch.device) -> Tokenizer:
    """The teacher: a DGAE model file, frozen, in eval mode. SD-VAE has nothing to distil (one pass already)."""
    teacher = load_model(path, device)
    if teacher.single_step:
        raise InputError(f"{path}: an {teacher.config.arch} model decodes in one pass already; the teacher must be "
                         "a DGAE")
    return teacher


def record(teacher: Tokenizer, teacher_steps: int, teacher_shift: float, steps: int, shift: float) -> Distilled:
    """The `Distilled` record of a student of ``teacher``, with a one-line error for settings that make none."""
    if teacher_steps < 2:
        raise InputError(f"teacher_steps {teacher_steps}: the teacher needs 2 or more steps to be worth distilling")
    if not 1 <= steps < teacher_steps:
        raise InputError(f"student_steps {steps}: choose 1 to {teacher_steps - 1}, fewer than the teacher's "
                         f"{teacher_steps}")
    if teacher_shift <= 0 or shift <= 0:
        raise InputError(f"time-grid shifts must be positive (teacher {teacher_shift}, student {shift})")
    return Distilled(teacher.file_hash, teacher_steps, teacher_shift, steps, shift,
                     tuple(flow.time_grid(steps, shift).tolist()))  # the very times `decode` steps through


class DistillLoss(nn.Module):
    """The distillation objective (see the module docstring), called as the training loop calls its losses:
    ``loss_fn(net, x, generator, step)`` with ``net`` a `Student` (or a DDP wrapper of one)."""

    def __init__(self, teacher: Tokenizer, distilled: Distilled, perceptual: nn.Module | None,
                 mse_weight: float = 1.0, lpips_weight: float = 1.0, real_weight: float = 0.0):
        super().__init__()
        if lpips_weight > 0 and perceptual is None:
            raise ValueError("lpips_weight > 0 needs a perceptual network")
        self.teacher, self.distilled, self.perceptual = teacher, distilled, perceptual
        self.mse_weight, self.lpips_weight, self.real_weight = mse_weight, lpips_weight, real_weight

    @torch.no_grad()
    def targets(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the latents of ``x``, the teacher's decode of them from ``noise``)."""
        z = self.teacher.encode(x).latent_dist.mode()
        grid = flow.time_grid(self.distilled.teacher_steps, self.distilled.teacher_shift).tolist()
        return z, decode_on(self.teacher, z, noise, grid).clamp(-1, 1)  # clamped, as the teacher's decode is

    def distance(self, a: torch.Tensor, b: torch.Tensor, name: str, logs: dict) -> torch.Tensor:
        mse = F.mse_loss(a, b)
        logs[f"mse_{name}"] = mse.detach()
        if self.lpips_weight <= 0:
            return self.mse_weight * mse
        perceptual = self.perceptual(a, b).mean()
        logs[f"lpips_{name}"] = perceptual.detach()
        return self.mse_weight * mse + self.lpips_weight * perceptual

    def forward(self, net: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None, step: int = 0
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        z, target = self.targets(x, noise)
        student = net(z, noise).float()
        logs: dict[str, torch.Tensor] = {}
        loss = self.distance(student, target, "teacher", logs)
        if self.real_weight > 0:
            loss = loss + self.real_weight * self.distance(student, x.float(), "real", logs)
        logs["loss"] = loss.detach()
        return loss, logs
