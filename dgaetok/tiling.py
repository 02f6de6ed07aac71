"""Overlapping tiles and their smooth blending: how images of any size decode (and encode) in bounded memory.

A `TileGrid` covers an (H, W) output with equal tiles whose positions are multiples of ``align`` and whose
neighbours overlap by at least ``overlap``. Each tile's contribution is weighted by a raised-cosine ramp
across every overlap it shares, normalised so the weights of all tiles sum to exactly 1 at every pixel:
where two tiles meet, one fades out as the other fades in, and an operation that is the same on a tile as on
the whole image is reproduced exactly.

DGAE blends the U-Net's *velocities* over the tiles at every ODE step (MultiDiffusion, Bar-Tal et al. 2023):
all tiles integrate one shared image, so they agree with each other by construction and no seam can form at
the end. SD-VAE's deterministic decoder and the encoder run once, so their tiles are blended once, on the
output (diffusers' ``enable_tiling``). Memory then grows with what one network call holds, ``chunk`` tiles of
each image in the batch (chunk x batch x tile^2 pixels), plus a few 3-channel (or latent-sized) full-image
tensors, instead of with the image's activations. The folder jobs (`dgaetok.pipeline`) take one tile per call
on the CPU and, on a GPU, as many as keep a call within the pixel budget (`pipeline.tiles_per_call`).

Where tiled differs from whole: each tile sees only itself, so GroupNorm statistics, attention and the
networks' zero padding at tile edges are per tile. The blend hides the edges; the per-tile statistics remain.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .errors import InputError

Box = tuple[int, int]  # (top, left) of a tile, in the grid's units
# A tiled decode holds only a few image-sized tensors of 3 channels (noise, state, velocity, ...: about 80 bytes
# per pixel) next to its tiles, against about 2 KB per pixel of activations for a whole dgae-s decode
# (benchmarks/RESULTS.md): a folder decode takes images over its pixel budget in tiles, up to this many times it.
TILED_BUDGET_FACTOR = 16


def tile_starts(size: int, tile: int, overlap: int, align: int) -> list[int]:
    """Starts of the fewest tiles of length ``tile`` that cover [0, size) with overlaps of at least ``overlap``,
    spread evenly, each a multiple of ``align`` (``size`` and ``tile`` must be multiples of it)."""
    if tile >= size:
        return [0]
    units, per_step = (size - tile) // align, (tile - overlap) // align  # stride <= tile - overlap, in align units
    n = math.ceil(units / per_step) + 1
    return [round(i * units / (n - 1)) * align for i in range(n)]


def ramp(length: int, fade_in: int, fade_out: int) -> torch.Tensor:
    """Weights along one tile side: sin^2 rising over the first ``fade_in`` samples, 1 in the middle, falling
    over the last ``fade_out``. A rise and a fall over the same samples sum to 1 (sin^2 + cos^2)."""
    w = torch.ones(length, dtype=torch.float64)
    if fade_in:
        w[:fade_in] *= _rise(fade_in)
    if fade_out:
        w[length - fade_out:] *= _rise(fade_out).flip(0)
    return w


def _rise(n: int) -> torch.Tensor:
    return torch.sin(0.5 * math.pi * (torch.arange(n, dtype=torch.float64) + 0.5) / n) ** 2


def _axis_weights(size: int, tile: int, starts: list[int]) -> list[torch.Tensor]:
    """Normalised 1-D weights per start: each tile fades over the whole overlap with each neighbour."""
    raw = []
    for i, s in enumerate(starts):
        fade_in = starts[i - 1] + tile - s if i > 0 else 0
        fade_out = s + tile - starts[i + 1] if i + 1 < len(starts) else 0
        raw.append(ramp(tile, max(fade_in, 0), max(fade_out, 0)))
    total = torch.zeros(size, dtype=torch.float64)
    for s, w in zip(starts, raw):
        total[s:s + tile] += w
    return [(w / total[s:s + tile]).float() for s, w in zip(starts, raw)]


class TileGrid:
    """Equal overlapping tiles over an (height, width) image; each side takes ``min(tile, side)``.

    Args:
        height, width: the output's size, multiples of ``align``.
        tile: the tile side (a multiple of ``align``).
        overlap: the least overlap between neighbours (0 <= overlap <= tile / 2); the weights fade over the
            whole actual overlap, which is larger when the tiles are spread to fit the image evenly.
        align: every tile position is a multiple of it (DGAE: the latent factor f times the U-Net's own
            downsampling, so each tile's latent is an exact slice and its pooling grid is the whole image's).
    """

    def __init__(self, height: int, width: int, tile: int, overlap: int, align: int = 1):
        check_tiling(tile, overlap, align)
        if height % align or width % align:
            raise ValueError(f"image {width}x{height} is not a multiple of {align}")
        self.height, self.width = height, width
        self.tile_h, self.tile_w = min(tile, height), min(tile, width)
        self.tops = tile_starts(height, self.tile_h, overlap, align)
        self.lefts = tile_starts(width, self.tile_w, overlap, align)
        self.boxes: list[Box] = [(t, l) for t in self.tops for l in self.lefts]
        # the weights are separable because the tiles form a product grid, so their normalisation is too
        rows = dict(zip(self.tops, _axis_weights(height, self.tile_h, self.tops)))
        cols = dict(zip(self.lefts, _axis_weights(width, self.tile_w, self.lefts)))
        self._weights = {(t, l): rows[t][:, None] * cols[l][None] for t, l in self.boxes}

    def __len__(self) -> int:
        return len(self.boxes)

    def weight(self, box: Box) -> torch.Tensor:
        """The normalised (tile_h, tile_w) weight of one tile; summed over all tiles it is 1 everywhere."""
        return self._weights[box]

    def blend(self, fn: Callable[[list[Box]], torch.Tensor], out: torch.Tensor, chunk: int = 8,
              full_chunks: bool = False) -> torch.Tensor:
        """Fill ``out`` (B, C, height, width) with the weighted sum over tiles of ``fn(boxes)``.

        ``fn`` returns its tiles' values stacked tile-major, (len(boxes) * B, C, tile_h, tile_w); it is called
        with at most ``chunk`` tiles at a time, which bounds the memory of whatever it computes.
        The tiles are split into as few calls as ``chunk`` allows, of sizes that differ by one at most;
        ``full_chunks`` fills the last up to the others' size with repeats of its last tile (whose values are
        dropped), so that ``fn`` sees one shape per grid: a compiled network compiles once for it.
        """
        out.zero_()
        b = out.shape[0]
        calls = math.ceil(len(self.boxes) / max(1, chunk))
        chunk = math.ceil(len(self.boxes) / calls)
        if next(iter(self._weights.values())).device != out.device:  # moved once, not at every step
            self._weights = {box: w.to(out.device) for box, w in self._weights.items()}
        for i in range(0, len(self.boxes), chunk):
            boxes = self.boxes[i:i + chunk]
            values = fn(boxes + boxes[-1:] * (chunk - len(boxes)) if full_chunks else boxes)
            for j, (top, left) in enumerate(boxes):
                region = out[:, :, top:top + self.tile_h, left:left + self.tile_w]
                region += self.weight((top, left)) * values[j * b:(j + 1) * b]
        return out

    def tiles(self, x: torch.Tensor, boxes: list[Box], scale: float = 1, halo: int = 0) -> torch.Tensor:
        """The regions of ``x`` under ``boxes``, stacked tile-major as `blend` expects.

        ``x`` is in units ``scale`` times the grid's (1 / f: a latent under a pixel grid; f: pixels under a
        latent grid); ``halo`` adds that many of x's samples on each side, so x must be padded by ``halo``.
        """
        h, w = round(self.tile_h * scale) + 2 * halo, round(self.tile_w * scale) + 2 * halo
        return torch.cat([x[..., round(t * scale):round(t * scale) + h, round(l * scale):round(l * scale) + w]
                          for t, l in boxes])


def seam_ratio(image: torch.Tensor, grid: TileGrid) -> float:
    """How much sharper an image (H, W, C) changes across the grid's tile borders than elsewhere: the mean
    |difference| between neighbouring pixels across every row and column where a tile starts or ends inside
    the image, over the same mean at all other rows and columns. About 1 when the borders leave no trace; a
    seam is a step the picture does not have elsewhere, and lifts it."""
    u = image.float()
    dy, dx = (u[1:] - u[:-1]).abs().mean(dim=(1, 2)), (u[:, 1:] - u[:, :-1]).abs().mean(dim=(0, 2))
    on_row, on_col = torch.zeros_like(dy, dtype=torch.bool), torch.zeros_like(dx, dtype=torch.bool)
    on_row[[t - 1 for t in grid.tops[1:]] + [t + grid.tile_h - 1 for t in grid.tops[:-1]]] = True
    on_col[[s - 1 for s in grid.lefts[1:]] + [s + grid.tile_w - 1 for s in grid.lefts[:-1]]] = True
    if not (on_row.any() or on_col.any()):
        raise ValueError("a grid of one tile has no borders")
    border = torch.cat([dy[on_row], dx[on_col]]).mean()
    return (border / torch.cat([dy[~on_row], dx[~on_col]]).mean()).item()


def check_tiling(tile: int, overlap: int, align: int) -> None:
    """A one-line InputError for a tile size or overlap the networks cannot use."""
    if tile < align or tile % align:
        raise InputError(f"--tile {tile}: must be a positive multiple of {align} for this model")
    most = min(tile // 2, tile - align)  # neighbours must be at least one aligned step apart
    if not 0 <= overlap <= most:
        raise InputError(f"--overlap {overlap}: must be between 0 and {most} for --tile {tile}")
