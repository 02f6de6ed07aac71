"""SD-VAE's convolutional encoder and its diagonal Gaussian posterior.

The layout follows the LDM/SD `AutoencoderKL` encoder (Rombach et al., 2022) so that DGAE and the GAN-guided
baseline share one encoder implementation: the paper's comparisons only hold if the encoders are identical.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class Checkpointed(nn.Module):
    """A block that can trade compute for memory: with ``grad_checkpointing`` on, training forwards keep only the
    block's inputs and recompute its inside during backward (`torch.utils.checkpoint`, non-reentrant, as
    guided-diffusion's ``use_checkpoint``). Subclasses define ``_forward``; results and gradients are unchanged.
    """

    grad_checkpointing = False

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)


class ResnetBlock(Checkpointed):
    """Pre-activation residual block without time conditioning (SD-VAE's `ResnetBlock`)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(Checkpointed):
    """Single-head spatial self-attention with 1x1 projections (SD-VAE's mid-block attention)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # contiguous, so that the CPU too takes the fused kernel (see unet.AttentionBlock)
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, 1, c, h * w).transpose(-1, -2).contiguous().unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, 1, hw, c)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv with SD-VAE's asymmetric (0, 1, 0, 1) padding, so checkpoints stay layout-compatible."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest 2x upsample followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def ch_mult_for(downsample: int) -> tuple[int, ...]:
    """SD-VAE's f8 multipliers (1, 2, 4, 4); each further factor of 2 adds one level at the top width."""
    levels = int(math.log2(downsample))
    if 2**levels != downsample or levels < 3:
        raise ValueError(f"spatial factor must be a power of two >= 8, got {downsample}")
    return (1, 2, 4) + (4,) * (levels - 2)


class Encoder(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> posterior moments (B, 2c, H/f, W/f).

    Args:
        latent_channels: c, the channels of the latent z.
        ch: base width; level i has ``ch * ch_mult[i]`` channels.
        ch_mult: width multipliers; ``len(ch_mult) - 1`` stride-2 downsamples give f = 2**(len - 1).
        num_res_blocks: residual blocks per level.
        dropout: dropout inside residual blocks.
    """

    def __init__(
        self,
        latent_channels: int,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        in_channels: int = 3,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, ch * mult, dropout))
                block_in = ch * mult
            level.downsample = Downsample(block_in) if i < len(ch_mult) - 1 else nn.Identity()
            self.down.append(level)
        self.mid = nn.Sequential(
            ResnetBlock(block_in, block_in, dropout), AttnBlock(block_in), ResnetBlock(block_in, block_in, dropout)
        )
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * latent_channels, 3, padding=1)
        # SD's AutoencoderKL keeps a 1x1 "quant_conv" on the moments; kept for parameter parity with SD-VAE.
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            h = level.downsample(h)
        h = self.mid(h)
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(h))))


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), built from the encoder's moments split on channels."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.float().chunk(2, dim=1)
        # SD-VAE's clamp: keeps exp() finite early in training when the encoder's outputs are still wild.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over latent dims, one value per image (as SD-VAE's loss uses it)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class Decoder(nn.Module):
    """SD-VAE's deterministic decoder (LDM's `Decoder`): latent (B, c, h, w) -> image (B, 3, h*f, w*f).

    It mirrors `Encoder`: the 1x1 ``post_quant_conv`` on z, ``conv_in`` to the top width, the mid block
    (ResnetBlock, AttnBlock, ResnetBlock), then the levels of ``ch_mult`` in reverse with ``num_res_blocks + 1``
    residual blocks each and an `Upsample` between levels, ``norm_out`` and ``conv_out`` to RGB.
    """

    def __init__(
        self,
        latent_channels: int,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        out_channels: int = 3,
    ):
        super().__init__()
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(latent_channels, block_in, 3, padding=1)
        self.mid = nn.Sequential(
            ResnetBlock(block_in, block_in, dropout), AttnBlock(block_in), ResnetBlock(block_in, block_in, dropout)
        )
        self.up = nn.ModuleList()  # in the order applied: deepest level first
        for i in reversed(range(len(ch_mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, ch * ch_mult[i], dropout))
                block_in = ch * ch_mult[i]
            level.upsample = Upsample(block_in) if i > 0 else nn.Identity()
            self.up.append(level)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in self.up:
            for block in level.block:
                h = block(h)
            h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
