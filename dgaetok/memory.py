"""Training memory: activations counted on the meta device, and the largest batch that fits a GPU.

Counting runs the real training forward on meta tensors (shapes only: no memory, no weights, no arithmetic), so
dgae-l at batch 2 is counted in seconds on a laptop. What is counted is what backward needs: every tensor made
during the forward that is still alive when the loss is returned (saved activations, and the inputs that
checkpointed blocks keep). Counts are in float32, the training dtype on CPU; bf16 autocast on a GPU stores most
of them in half the bytes.
"""
from __future__ import annotations

import gc
from typing import Callable, TypeVar

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .models import DGAEConfig, build_model

T = TypeVar("T")


class _Storages(TorchDispatchMode):
    """Records every storage an operator allocates (not views or in-place results of its inputs), weakly:
    `alive_bytes` sums those still alive."""

    def __init__(self):
        super().__init__()
        self.seen: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                storage = t.untyped_storage()
                known = self.seen.get(storage._cdata)
                if known is None or known[0].expired():  # a freed storage's address may be reused
                    self.seen[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def alive_bytes(self) -> int:
        return sum(nbytes for ref, nbytes in self.seen.values() if not ref.expired())


def bytes_kept(fn: Callable[[], T]) -> int:
    """Bytes of the tensors ``fn`` creates that are still alive when it returns, its result included.

    For a training forward that returns the loss, that is the activation memory backward will read.
    """
    with _Storages() as storages:
        result = fn()
        gc.collect()
        kept = storages.alive_bytes()
    del result
    return kept


def training_loss(config: DGAEConfig, lpips_net: str | None = "vgg", device: torch.device | str = "meta"):
    """(model, loss_of) for one training forward of ``config`` on ``device``: ``loss_of(x)`` returns the loss of
    `DGAELoss` (or `SDVAELoss` with its GAN term on) for images ``x``, as `train.train` computes it. The LPIPS
    network (None: no perceptual term) has a random trunk: its memory does not depend on the weights."""
    from .losses import DGAELoss, NLayerDiscriminator, SDVAELoss, perceptual_net  # lpips: only when counting

    with torch.device(device):
        model = build_model(config).train()
        # .to: lpips makes its scaling buffers with the legacy torch.Tensor constructor, which ignores the context
        perceptual = perceptual_net(lpips_net, pretrained=False).to(device) if lpips_net else None
        weight = 1.0 if lpips_net else 0.0
        if config.arch == "sdvae":
            loss_fn = SDVAELoss(perceptual, NLayerDiscriminator(), lpips_weight=weight, disc_start=0)
        else:
            loss_fn = DGAELoss(perceptual, lpips_weight=weight)
    return model, lambda x: loss_fn(model, x)[0]


def training_activations(config: DGAEConfig, lpips_net: str | None = "vgg", grad_checkpoint: bool = False
                         ) -> float:
    """Bytes of activations one training image keeps for backward (float32), counted on the meta device.

    Measured at batch 1 and 2 and differenced, so what does not grow with the batch is left out.
    """
    model, loss_of = training_loss(config, lpips_net)
    model.set_grad_checkpointing(grad_checkpoint)
    res = config.resolution
    kept = [bytes_kept(lambda: loss_of(torch.zeros(b, 3, res, res, device="meta"))) for b in (1, 2)]
    return float(kept[1] - kept[0])


def largest_batch(try_batch: Callable[[int], T], start: int, refine: int = 0) -> tuple[int, T]:
    """Call ``try_batch(b)`` for b = ``start``, ``start // 2``, ... until it does not run out of GPU memory, then
    ``refine`` bisection steps between that batch and the smallest one that failed. Returns (the largest batch
    that ran, its result). The cache is emptied after each failure; a batch of 1 that fails raises."""
    fits, fails, result = None, None, None
    batch = start
    while True:
        failed = False
        try:
            result, fits = try_batch(batch), batch
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
            fails, failed = batch, True
        if failed:  # outside the except block, whose traceback holds the failed attempt's tensors
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if fits is None:
            batch = max(1, batch // 2)
        elif fails is None or refine == 0 or fails - fits <= 1:
            return fits, result
        else:
            refine -= 1
            batch = (fits + fails) // 2
