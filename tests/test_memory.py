"""Activation memory counted on the meta device, and the largest-batch search (with simulated OOMs)."""
from __future__ import annotations

import pytest
import torch

from dgaetok.memory import bytes_kept, largest_batch, training_activations
from dgaetok.models import MODELS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bytes_kept_counts_what_backward_needs():
    x = torch.randn(1000, requires_grad=True)
    assert bytes_kept(lambda: (2 * x).sum()) == 4  # mul by a constant saves nothing: only the loss is kept
    assert bytes_kept(lambda: x.exp().sum()) == 4000 + 4  # exp saves its result for backward
    assert bytes_kept(lambda: x.exp().exp().sum()) == 2 * 4000 + 4
    with torch.no_grad():
        assert bytes_kept(lambda: x.exp().exp().sum()) == 4
    y = torch.randn(10, 100, device="meta", requires_grad=True)
    assert bytes_kept(lambda: (y @ y.T).sum()) == 4  # the inputs of a matmul exist already: not counted


@pytest.mark.parametrize("preset", ["dgae-t", "sdvae-t"])
def test_checkpointing_keeps_fewer_activations_per_image(preset):
    config = MODELS[preset](resolution=32)
    plain = training_activations(config, "alex")
    checkpointed = training_activations(config, "alex", grad_checkpoint=True)
    without_lpips = training_activations(config, None)
    assert 0 < checkpointed < 0.6 * plain
    assert 0 < without_lpips < plain
    # a larger image keeps proportionally more: 4x the pixels, about 4x the bytes
    assert 3.5 < training_activations(MODELS[preset](resolution=64), "alex") / plain < 4.5


def test_dgae_b_keeps_about_4_gib_per_image_and_checkpointing_cuts_it_by_4():
    """The issue's count (f16 c8, 256 px, LPIPS-VGG, float32), on the meta device: no memory, seconds."""
    plain = training_activations(MODELS["dgae-b"]()) / 2**30
    checkpointed = training_activations(MODELS["dgae-b"](), grad_checkpoint=True) / 2**30
    assert 3.9 < plain < 4.3 and checkpointed < plain / 3


def test_largest_batch_halves_on_oom_then_bisects():
    tried = []

    def run(batch: int) -> str:
        tried.append(batch)
        if batch > 37:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return f"ran {batch}"

    assert largest_batch(run, 96) == (24, "ran 24") and tried == [96, 48, 24]
    tried.clear()
    assert largest_batch(run, 96, refine=3) == (36, "ran 36") and tried == [96, 48, 24, 36, 42, 39]
    tried.clear()
    assert largest_batch(run, 16, refine=3) == (16, "ran 16") and tried == [16]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        largest_batch(lambda b: run(100), 4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_largest_batch_recovers_from_real_cuda_ooms():
    """Batches of 1 GiB blocks: far more than the card holds fails, and after emptying the cache a batch that
    fits runs."""
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30

    def run(batch: int) -> float:
        block = torch.empty(batch, 2**28, device="cuda")  # batch GiB
        return float(block.numel())

    batch, numel = largest_batch(run, 1 << (int(total_gib) * 4).bit_length(), refine=2)
    assert 0.25 * total_gib < batch < total_gib and numel == batch * 2**28
    assert torch.cuda.memory_allocated() < 2**30
