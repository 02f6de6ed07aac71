"""ADM's U-Net (Dhariwal & Nichol, 2021), used as DGAE's latent-conditioned diffusion decoder."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vae import Checkpointed, group_norm


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of continuous times t in [0, 1], scaled by 1000 so frequencies match ADM's."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so residual branches start as the identity (ADM's `zero_module`)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(Checkpointed):
    """ADM residual block: time-embedding scale-shift norm and optional 2x resampling inside the block."""

    def __init__(self, in_ch: int, emb_ch: int, out_ch: int, dropout: float = 0.0, updown: str | None = None):
        super().__init__()
        self.in_norm = group_norm(in_ch)
        self.in_conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.updown = updown
        self.emb = nn.Linear(emb_ch, 2 * out_ch)
        self.out_norm = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.updown == "down":
            return F.avg_pool2d(x, 2)
        if self.updown == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_conv(self.resample(F.silu(self.in_norm(x))))
        x = self.resample(x)
        scale, shift = self.emb(F.silu(emb))[..., None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(Checkpointed):
    """Multi-head spatial self-attention over all H*W positions, heads of `head_channels` each."""

    def __init__(self, channels: int, head_channels: int = 64):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv2d(channels, channels, 1))

    def _forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        # contiguous (b, heads, hw, d): only then does the CPU take the fused kernel, which never holds the
        # (hw x hw) score matrix (at 2048 px the math path's would be 34 GB in dgae-s) and runs 3-4x faster
        q, k, v = qkv.transpose(-1, -2).contiguous().unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class TimestepSequential(nn.ModuleList):
    """A stack of layers where residual blocks also receive the time embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, AttentionBlock)) else layer(x)
        return x


class UNet(nn.Module):
    """ADM U-Net predicting the flow velocity of a noisy image, conditioned on extra input channels.

    Args:
        in_channels: channels of the noisy image (3 for RGB).
        cond_channels: channels concatenated to the input (the nearest-upsampled latent, c for DGAE).
        out_channels: channels of the prediction (3: a velocity in pixel space).
        model_channels: base width; the time embedding is ``4 * model_channels`` wide.
        channel_mult: width multiplier per resolution level; ``len - 1`` downsamples.
        num_res_blocks: residual blocks per level on the way down (one more on the way up, for the skips).
        attention_resolutions: downsample rates (1, 2, 4, ...) whose levels get self-attention after each
            residual block; the middle block always has attention.
        head_channels: channels per attention head.
        dropout: dropout inside residual blocks.
        patch_size: p; the image is folded into ``in_channels * p**2`` channels at ``H/p x W/p`` before the first
            convolution (pixel-unshuffle) and the prediction unfolded after the last (pixel-shuffle), so every
            level runs at 1/p of the image's side: p = 2 makes a pass about 4x cheaper at the same widths. The
            condition is given at that working resolution.

    Resampling uses residual blocks (ADM's ``resblock_updown``) and every residual block uses scale-shift norm
    (``use_scale_shift_norm``); those ADM knobs are fixed because DGAE's presets use them.
    """

    def __init__(
        self,
        in_channels: int = 3,
        cond_channels: int = 0,
        out_channels: int = 3,
        model_channels: int = 128,
        channel_mult: tuple[int, ...] = (1, 2, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (),
        head_channels: int = 64,
        dropout: float = 0.0,
        patch_size: int = 1,
    ):
        super().__init__()
        self.in_channels, self.cond_channels, self.model_channels = in_channels, cond_channels, model_channels
        self.patch_size = patch_size
        self.image_channels = in_channels * patch_size**2  # channels of the folded image the first conv sees
        emb_ch = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        ch = model_channels * channel_mult[0]
        self.input_conv = nn.Conv2d(self.image_channels + cond_channels, ch, 3, padding=1)
        self.input_blocks = nn.ModuleList()
        skip_chs, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb_ch, model_channels * mult, dropout)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, head_channels))
                self.input_blocks.append(TimestepSequential(layers))
                skip_chs.append(ch)
            if level < len(channel_mult) - 1:
                self.input_blocks.append(TimestepSequential([ResBlock(ch, emb_ch, ch, dropout, updown="down")]))
                skip_chs.append(ch)
                ds *= 2

        self.middle_block = TimestepSequential(
            [ResBlock(ch, emb_ch, ch, dropout), AttentionBlock(ch, head_channels), ResBlock(ch, emb_ch, ch, dropout)]
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chs.pop(), emb_ch, model_channels * mult, dropout)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, head_channels))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, emb_ch, ch, dropout, updown="up"))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(layers))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_init(nn.Conv2d(ch, out_channels * patch_size**2, 3, padding=1)))

    def condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The condition's share of the first convolution, bias included.

        Concatenation followed by a convolution is a sum of two convolutions, so a sampler computes this once
        per image and reuses it at every step instead of re-concatenating and re-convolving the condition.
        """
        return F.conv2d(cond, self.input_conv.weight[:, self.image_channels :], self.input_conv.bias, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond_features: torch.Tensor) -> torch.Tensor:
        """Velocity for noisy images x (B, C, H, W) at times t (B,), given ``condition(cond)`` features (at the
        working resolution H/p x W/p)."""
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))
        if self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)
        h = F.conv2d(x, self.input_conv.weight[:, : self.image_channels], padding=1) + cond_features
        skips = [h]
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        h = self.out(h)
        return F.pixel_shuffle(h, self.patch_size) if self.patch_size > 1 else h
