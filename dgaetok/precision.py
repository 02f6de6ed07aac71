"""The precision networks run in: bf16 autocast where the hardware multiplies bf16 natively, float32 elsewhere.

One code path for every device: weights, optimizer states, EMA, latents and images stay float32; only the
network's matrix work (convolutions, linear layers, attention) runs in bf16 under `torch.autocast`, which keeps
reductions and normalisations in float32. On a GPU that is the usual mixed precision; on a recent CPU oneDNN runs
bf16 convolutions up to 2x faster than float32 with AVX512-BF16 or Arm BF16, and more with Intel AMX
(benchmarks/RESULTS.md).

    auto  bf16 on CUDA with bf16 support and on CPUs with native bf16 matrix instructions, float32 elsewhere
    bf16  bf16 autocast wherever asked (correct everywhere; without native support it is slower, and says so)
    fp32  float32 throughout

``$DGAETOK_PRECISION`` (bf16 or fp32) decides what ``auto`` means for every command and process that inherits it,
as accelerate's ``ACCELERATE_MIXED_PRECISION`` does: one switch for a machine, a job, or a test run.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "bf16", "fp32")
ENV = "DGAETOK_PRECISION"


@functools.cache
def cpu_bf16_units() -> str | None:
    """The CPU's native bf16 matrix instructions as torch reports them (None: none it knows of)."""
    checks = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"),
              ("Arm BF16", "_is_arm_bf16_supported"))  # private helpers: absent ones count as unsupported
    for name, fn in checks:
        check = getattr(torch.cpu, fn, None)
        try:
            if check is not None and check():
                return name
        except RuntimeError:
            pass
    return None


@dataclass(frozen=True)
class Precision:
    """What a run computes in (``name``: "bf16" or "fp32") and why, for the one `note:` line a command prints."""

    name: str
    reason: str

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    def note(self) -> str:
        return f"precision {self.name} ({self.reason})"


def resolve(precision: str | Precision, device: torch.device | str) -> Precision:
    """``auto`` / ``bf16`` / ``fp32`` for ``device`` -> the `Precision` used, with its reason."""
    if isinstance(precision, Precision):
        return precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    forced = (os.environ.get(ENV) or "auto").strip().lower() if precision == "auto" else "auto"
    if forced not in PRECISIONS:
        raise ValueError(f"{ENV}={forced!r}: choose one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        units = "the GPU supports bf16" if native else "this GPU has no bf16 support"
    elif device.type == "cpu":
        found = cpu_bf16_units()
        native = found is not None
        units = f"this CPU has native bf16 matrix units ({found})" if native else \
            "this CPU has no native bf16 matrix units"
    else:
        native, units = False, f"no bf16 autocast on {device.type}"
    asked = "asked for" if forced == "auto" else f"auto: {ENV}={forced}"
    precision = precision if forced == "auto" else forced
    if precision == "fp32":
        return Precision("fp32", asked)
    if precision == "bf16":
        if native or device.type not in ("cpu", "cuda"):
            return Precision("bf16", f"{asked}; {units}")
        return Precision("bf16", f"{asked}; {units}, so it is correct but slower than fp32")
    return Precision("bf16", f"auto: {units}") if native else Precision("fp32", f"auto: {units}")


def autocast(device: torch.device | str, precision: str | Precision = "fp32"):
    """The autocast context for ``device`` at ``precision`` ("fp32": a disabled one, so call sites stay one path)."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):  # torch.autocast refuses device types like "meta" outright
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve(precision, device).bf16)


def training_layout(device: torch.device | str, precision: str | Precision = "fp32") -> torch.memory_format:
    """The memory layout a network trains in on ``device`` at ``precision``.

    channels_last (NHWC), which cuDNN's and oneDNN's convolutions prefer, except in bf16 on the CPU: there torch's
    backward of a channels_last GroupNorm is 3-4x slower than NCHW's, which makes the whole step faster in NCHW; in
    float32 channels_last stays the faster. Inference keeps channels_last in both precisions (`models.load_model`):
    there it is the faster layout. The measurements: benchmarks/RESULTS.md, "float32 against bf16 autocast".
    """
    device = torch.device(device)
    if device.type == "cpu" and resolve(precision, device).bf16:
        return torch.contiguous_format
    return torch.channels_last
