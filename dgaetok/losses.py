"""Training objectives.

DGAE: alpha * MSE(v, eps - x) + beta * KL + eta * LPIPS(x0', x), with x0' = x_t - t v, and optionally
gamma * MSE of x0' and x averaged over 8x8 blocks (`lowpass_mse`; not in the paper, off by default).
SD-VAE: L1 (or L2) + beta * KL + eta * LPIPS + an adaptively weighted PatchGAN hinge term (LDM's
``LPIPSWithDiscriminator``), with the discriminator's own hinge loss for its optimizer.

Both weigh the KL as SD-VAE does (`kl_term`): beta = 1e-6 means what it means in LDM's configs.
"""
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


def kl_term(posterior, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the KL as the loss weighs it, the KL per image for the logs).

    LDM's ``LPIPSWithDiscriminator`` sums the reconstruction terms over an image's 3 * H * W values and the KL over
    its latent dims, so its beta = 1e-6 weighs the KL against a per-pixel *sum*. Here the reconstruction terms are
    per-pixel *means* (the loss stays O(1), which gradient clipping at 1.0 and AdamW's epsilon assume), so the KL
    per image is divided by 3 * H * W: the same beta then gives the same balance as in SD-VAE. (Summing the KL
    against per-pixel means, as dgaetok did before, made it 3 * 256 * 256 = 196,608 times heavier at 256 px.)
    """
    kl = posterior.kl().mean()
    return kl / x[0].numel(), kl


LOWPASS_BLOCK = 8  # pixels: the detail a latent of f8 or coarser leaves to the decoder sits below this scale


def lowpass_mse(a: torch.Tensor, b: torch.Tensor, block: int = LOWPASS_BLOCK) -> torch.Tensor:
    """MSE between the ``block`` x ``block`` means of two image batches (B, C, H, W): a colour cast or a shading
    error counts in full, texture that averages out within a block not at all."""
    return F.mse_loss(F.avg_pool2d(a, block, ceil_mode=True), F.avg_pool2d(b, block, ceil_mode=True))


class DGAELoss(nn.Module):
    """The weighted DGAE loss (paper eq. 8).

    Defaults: alpha = 1 and beta = 1e-6 as SD-VAE's KL weight; eta = 1.0, SD-VAE's perceptual weight, so that
    DGAE and the GAN-guided baseline put the same pressure on perceptual quality. The velocity MSE is a per-pixel
    mean and the KL is weighed against it as SD-VAE weighs it against its per-pixel sum (`kl_term`).

    ``lowpass_weight`` (gamma, default 0: the paper's loss) adds `lowpass_mse` of x0' and x. The velocity MSE
    spends almost all of its gradient on texture that the latent cannot fix, so colour and shading, which the
    latent does fix, get a small share of the pull, and a small model can keep a colour cast; this term pulls on
    them alone.
    """

    def __init__(self, perceptual: nn.Module | None, velocity_weight: float = 1.0, kl_weight: float = 1e-6,
                 lpips_weight: float = 1.0, lowpass_weight: float = 0.0):
        super().__init__()
        if lpips_weight > 0 and perceptual is None:
            raise ValueError("lpips_weight > 0 needs a perceptual network")
        self.perceptual = perceptual
        self.velocity_weight, self.kl_weight, self.lpips_weight = velocity_weight, kl_weight, lpips_weight
        self.lowpass_weight = lowpass_weight

    def forward(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None, step: int = 0
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``model`` is a DGAE or a DDP wrapper of one; randomness comes from ``generator`` for exact resumes.
        ``step`` is unused: DGAE's objective does not change during training (SD-VAE's does).

        The logged terms stay detached tensors: turning them into floats every step would stall the GPU.
        """
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        t = flow.sample_t(x.shape[0], x.device, generator)
        v, x_t, posterior = model(x, t, noise, generator)
        v = v.float()
        mse = F.mse_loss(v, flow.velocity_target(x, noise))
        kl, kl_per_image = kl_term(posterior, x)
        loss = self.velocity_weight * mse + self.kl_weight * kl
        logs = {"mse": mse.detach(), "kl": kl_per_image.detach()}
        x0 = flow.predict_x0(x_t, t, v)
        if self.lpips_weight > 0:
            perceptual = self.perceptual(x0, x).mean()
            loss = loss + self.lpips_weight * perceptual
            logs["lpips"] = perceptual.detach()
        if self.lowpass_weight > 0:
            lowpass = lowpass_mse(x0, x)
            loss = loss + self.lowpass_weight * lowpass
            logs["lowpass"] = lowpass.detach()
        logs["loss"] = loss.detach()
        return loss, logs


class NLayerDiscriminator(nn.Module):
    """taming-transformers' PatchGAN: (B, 3, H, W) -> a map of real/fake logits, one per overlapping patch.

    BatchNorm as in taming (LDM's SD-VAE was trained with it). Weights start from N(0, 0.02), norm scales from
    N(1, 0.02), as taming's ``weights_init``.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):  # the last of these keeps stride 1, as in pix2pix
            prev, mult = mult, min(2**n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2 if n < n_layers else 1, 1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, *more: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Logits for ``x``; given more batches, a tuple with each batch's logits, every batch run on its own
        (so BatchNorm sees real and fake apart, as in taming) but in one call, which is what DDP allows."""
        if more:
            return tuple(self.main(batch) for batch in (x, *more))
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float = 0.5) -> torch.Tensor:
    """LDM's balance of the GAN term: ||d nll / d w|| / (||d g_loss / d w|| + 1e-4) at the decoder's last
    weight w, clamped to [0, 1e4], detached, times ``disc_weight``."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.norm(nll_grad) / (torch.norm(g_grad) + 1e-4)
    return torch.clamp(d_weight, 0.0, 1e4).detach() * disc_weight


class SDVAELoss(nn.Module):
    """SD-VAE's loss for the autoencoder: rec + eta * LPIPS + beta * KL + d_weight * (-D(x_rec)).

    Scaled as `DGAELoss` (per-pixel means, the KL weighed as SD-VAE weighs it, `kl_term`) so that both families
    see the same weights. The GAN term is on from step ``disc_start``; before it the discriminator is not
    even run. ``forward`` keeps the detached reconstruction in ``self.recon`` for `discriminator_loss`.
    """

    def __init__(self, perceptual: nn.Module | None, discriminator: nn.Module, rec_loss: str = "l1",
                 kl_weight: float = 1e-6, lpips_weight: float = 1.0, disc_weight: float = 0.5, disc_start: int = 0):
        super().__init__()
        if lpips_weight > 0 and perceptual is None:
            raise ValueError("lpips_weight > 0 needs a perceptual network")
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss must be l1 or l2, not {rec_loss!r}")
        self.perceptual, self.discriminator = perceptual, discriminator
        self.rec_loss, self.kl_weight, self.lpips_weight = rec_loss, kl_weight, lpips_weight
        self.disc_weight, self.disc_start = disc_weight, disc_start
        self.recon: torch.Tensor | None = None

    def gan_active(self, step: int) -> bool:
        return step >= self.disc_start

    def forward(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None, step: int = 0
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``model`` is an SDVAE or a DDP wrapper of one; ``step`` (0-based) decides whether the GAN term is on."""
        recon, posterior = model(x, generator)
        recon = recon.float()
        rec = (recon - x).abs().mean() if self.rec_loss == "l1" else F.mse_loss(recon, x)
        nll = rec
        logs = {"rec": rec.detach()}
        if self.lpips_weight > 0:
            perceptual = self.perceptual(recon, x).mean()
            nll = nll + self.lpips_weight * perceptual
            logs["lpips"] = perceptual.detach()
        kl, kl_per_image = kl_term(posterior, x)
        loss = nll + self.kl_weight * kl
        logs["kl"] = kl_per_image.detach()
        if self.gan_active(step):
            self.discriminator.requires_grad_(False)  # gradients flow through D to the decoder, not into D
            g_loss = -self.discriminator(recon).float().mean()
            self.discriminator.requires_grad_(True)
            last_layer = getattr(model, "module", model).decoder.conv_out.weight
            d_weight = adaptive_weight(nll, g_loss, last_layer, self.disc_weight)
            loss = loss + d_weight * g_loss
            logs |= {"g_loss": g_loss.detach(), "d_weight": d_weight}
        logs["loss"] = loss.detach()
        self.recon = recon.detach()
        return loss, logs

    def discriminator_loss(self, discriminator: nn.Module, x: torch.Tensor
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge loss of ``discriminator`` (this loss's, or a DDP wrapper of it) on ``x`` against the last
        reconstruction; real and fake go through it separately, as in taming (BatchNorm sees each alone)."""
        logits_real, logits_fake = (logits.float() for logits in discriminator(x, self.recon))
        d_loss = hinge_d_loss(logits_real, logits_fake)
        return d_loss, {"d_loss": d_loss.detach(), "logits_real": logits_real.detach().mean(),
                        "logits_fake": logits_fake.detach().mean()}
