"""What MFU is measured against: FLOPs counted on the model itself, and the card's measured matmul peak.

FLOPs come from `torch.utils.flop_counter` (2 per multiply-add; matmuls, convolutions and attention), so MFU is
over the work the network really does. The peak is the best FLOP/s of square matmuls in the dtype the library
computes in on that device (bf16 on CUDA, float32 on the CPU), measured in the same process as the numbers it
divides.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from .memory import training_loss
from .models import DGAEConfig, synchronize


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls, convolutions and attention ``fn()`` runs (meta tensors work: nothing is computed)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def training_flops_per_image(config: DGAEConfig, lpips_net: str | None = "vgg") -> float:
    """FLOPs of one training image: the loss's forward (encoder, decoder, LPIPS) and backward, counted on the
    meta device in seconds whatever the model's size."""
    _, loss_of = training_loss(config, lpips_net)
    x = torch.zeros(2, 3, config.resolution, config.resolution, device="meta")
    return count_flops(lambda: loss_of(x).backward()) / 2


def seconds_per_call(fn: Callable[[], object], device: torch.device, min_time: float, warmup: int = 2,
                     min_calls: int = 3) -> float:
    """Mean wall time of ``fn()`` over at least ``min_time`` seconds and ``min_calls`` calls, after ``warmup``."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_time:
        fn()
        calls += 1
        synchronize(device)
    return (time.perf_counter() - start) / calls


def matmul_peak(device: torch.device, min_time: float = 1.0, bf16: bool = True) -> tuple[float, str]:
    """(best measured FLOP/s of a square matmul, its dtype) in the compute dtype: bf16, or float32 (``bf16`` False)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    best = 0.0
    for n in ((4096, 8192, 16384) if device.type == "cuda" else (1024, 2048)):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        best = max(best, 2 * n**3 / seconds_per_call(lambda: a @ b, device, min_time))
    return best, str(dtype).removeprefix("torch.")
