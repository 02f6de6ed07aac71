"""DGAE's training objective: alpha * MSE(v, eps - x) + beta * KL + eta * LPIPS(x0', x), with x0' = x_t - t v."""
from __future__ import annotations

import warnings

import lpips
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import flow


def perceptual_net(net: str = "vgg", pretrained: bool = True) -> nn.Module:
    """LPIPS as a frozen loss network.

    ``pretrained=False`` keeps lpips' own linear heads but a random trunk: a stand-in for tests that must not
    depend on downloaded weights; its values are not LPIPS distances.
    """
    if pretrained:
        from .pretrained import lpips_model

        model = lpips_model(net)
    else:
        with warnings.catch_warnings():  # torchvision's deprecation notes about lpips' `pretrained=` argument
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    return model.eval().requires_grad_(False)


class DGAELoss(nn.Module):
    """The weighted DGAE loss (paper eq. 8).

    Defaults: alpha = 1 and beta = 1e-6 as SD-VAE's KL weight; eta = 1.0, SD-VAE's perceptual weight, so that
    DGAE and the GAN-guided baseline put the same pressure on perceptual quality. The KL is summed over latent
    dimensions and averaged over images, as in SD-VAE, which is what makes 1e-6 a sensible scale.
    """

    def __init__(self, perceptual: nn.Module | None, velocity_weight: float = 1.0, kl_weight: float = 1e-6,
                 lpips_weight: float = 1.0):
        super().__init__()
        if lpips_weight > 0 and perceptual is None:
            raise ValueError("lpips_weight > 0 needs a perceptual network")
        self.perceptual = perceptual
        self.velocity_weight, self.kl_weight, self.lpips_weight = velocity_weight, kl_weight, lpips_weight

    def forward(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``model`` is a DGAE or a DDP wrapper of one; randomness comes from ``generator`` for exact resumes.

        The logged terms stay detached tensors: turning them into floats every step would stall the GPU.
        """
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        t = flow.sample_t(x.shape[0], x.device, generator)
        v, x_t, posterior = model(x, t, noise, generator)
        v = v.float()
        mse = F.mse_loss(v, flow.velocity_target(x, noise))
        kl = posterior.kl().mean()
        loss = self.velocity_weight * mse + self.kl_weight * kl
        logs = {"mse": mse.detach(), "kl": kl.detach()}
        if self.lpips_weight > 0:
            perceptual = self.perceptual(flow.predict_x0(x_t, t, v), x).mean()
            loss = loss + self.lpips_weight * perceptual
            logs["lpips"] = perceptual.detach()
        logs["loss"] = loss.detach()
        return loss, logs
