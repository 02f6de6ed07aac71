"""DiT (Peebles & Xie 2023) on tokenizer latents: adaLN-Zero blocks as in facebookresearch/DiT, predicting the
flow velocity of `flow` (no learned sigma), class-conditional or unconditional (``num_classes = 0``).

The layers and their initialisation follow the reference ``models.py``: patch embedding (a strided conv), fixed
2-D sin-cos position embedding, sinusoidal timestep MLP, label table with a null class for classifier-free
guidance, blocks modulated by shift/scale/gate from the conditioning, zero-initialised modulations and output.
Times are flow times t in [0, 1] (t = 1 noise), embedded as 1000 t like the ADM decoder's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import flow
from .models import JsonConfig
from .unet import timestep_embedding

FREQ_DIM = 256  # width of the sinusoidal timestep features, as DiT


@dataclass(frozen=True)
class DiTConfig(JsonConfig):
    input_size: int = 32  # latent side
    in_channels: int = 4  # latent channels
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 0  # 0: unconditional
    class_dropout: float = 0.1  # label drop rate while training, for classifier-free guidance
    preset: str = dataclasses.field(default="", compare=False)

    def __post_init__(self):
        if self.input_size % self.patch_size:
            raise ValueError(f"latent side {self.input_size} is not a multiple of patch size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} does not split into {self.num_heads} heads")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """(grid * grid, dim) fixed 2-D sin-cos embedding, DiT's ``get_2d_sincos_pos_embed`` (half the channels per
    axis, the first half for the column coordinate)."""

    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    coords = np.arange(grid, dtype=np.float32)
    w, h = np.meshgrid(coords, coords)  # w varies fastest, as DiT's meshgrid(grid_w, grid_h)
    emb = np.concatenate([one_axis(dim // 2, w), one_axis(dim // 2, h)], axis=1)
    return torch.from_numpy(emb).float()


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) tokens by a conv with kernel = stride = patch size (timm's PatchEmbed)."""

    def __init__(self, patch: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, FREQ_DIM).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; row ``num_classes`` is the null label used for dropped and unconditional calls."""

    def __init__(self, num_classes: int, dim: int, dropout: float):
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.embedding_table = nn.Embedding(num_classes + int(dropout > 0), dim)

    def forward(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """``drop`` (N,) bool: which labels to replace by the null label; None: drawn at the dropout rate while
        training (a caller that wants reproducible runs draws it with its own generator)."""
        if drop is None and self.training and self.dropout > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout
        if drop is not None:
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """``forward(x, t, y)``: latents (N, C, H, W), flow times (N,), labels (N,) or None -> velocity (N, C, H, W)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        c = self.config = config
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size, c.class_dropout) if c.num_classes else None
        grid = c.input_size // c.patch_size
        self.register_buffer("pos_embed", sincos_pos_embed(c.hidden_size, grid)[None], persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's: xavier-uniform linears with zero bias, N(0, 0.02) label table and timestep MLP, and zeros for
        every adaLN modulation and the output layer, so each block starts as the identity and the output as 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for module in [*(b.adaLN_modulation[-1] for b in self.blocks), self.final_layer.adaLN_modulation[-1],
                       self.final_layer.linear]:
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p * p * C) -> (N, C, H, W)."""
        p, ch = self.config.patch_size, self.config.in_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, ch)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], ch, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """``force_drop`` (N,) bool replaces those labels by the null label (classifier-free guidance, or the
        training-time label dropout drawn by the caller); None while training draws it at ``class_dropout``."""
        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError("this DiT is class-conditional: pass labels y")
            c = c + self.y_embedder(y, force_drop)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, labels: torch.Tensor | None = None, steps: int = 50, cfg: float = 1.0,
               sampler: str = "euler", shift: float = 1.0) -> torch.Tensor:
        """Integrate the learned flow from ``noise`` (t = 1) to latents (t = 0) with `flow.sample`.

        ``cfg`` > 1 (class-conditional only) mixes v = v_uncond + cfg (v_cond - v_uncond) at every step; 1 is
        plain conditional sampling, the "w/o CFG" number papers report.
        """
        if labels is None or self.y_embedder is None or cfg == 1.0:
            return flow.sample(lambda x, t: self(x, t, labels), noise, steps, sampler, shift)
        if self.y_embedder.dropout <= 0:
            raise ValueError("classifier-free guidance needs a DiT trained with class_dropout > 0")
        n = noise.shape[0]
        drop = torch.arange(2 * n, device=noise.device) >= n
        y2 = torch.cat([labels, labels])

        def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            v_cond, v_uncond = self(torch.cat([x, x]), torch.cat([t, t]), y2, drop).chunk(2)
            return v_uncond + cfg * (v_cond - v_uncond)

        return flow.sample(guided, noise, steps, sampler, shift)


# --- sizes: DiT's table (depth, hidden, heads) with patch 1 or 2, and a tiny one for tests -------------------------

_SIZES = {"T": (2, 64, 2), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def _factory(size: str, patch: int):
    depth, hidden, heads = _SIZES[size]

    def make(**kw) -> DiTConfig:
        return DiTConfig(patch_size=patch, hidden_size=hidden, depth=depth, num_heads=heads,
                         preset=f"DiT-{size}/{patch}", **kw)

    make.__name__ = f"DiT_{size}_{patch}"
    make.__doc__ = f"DiT-{size}/{patch}: depth {depth}, hidden {hidden}, {heads} heads, patch {patch}."
    return make


DiT_models = {f"DiT-{size}/{patch}": _factory(size, patch) for size in _SIZES for patch in (1, 2)}
