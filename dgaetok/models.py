"""The two tokenizer families, presets and the model file format.

DGAE: an SD-VAE encoder with a latent-conditioned ADM diffusion decoder. SD-VAE: the same encoder with LDM's
deterministic decoder, the GAN-guided baseline DGAE is compared against. A model file is one ``.safetensors``
whose metadata holds the JSON config; the config's ``arch`` names the family, so a file alone rebuilds its model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from . import flow
from .errors import InputError
from .files import write_safetensors
from .precision import Precision, autocast, resolve
from .stats import LatentStats
from .tiling import TileGrid, check_tiling
from .unet import UNet
from .vae import Checkpointed, Decoder, DiagonalGaussian, Encoder, ch_mult_for

FORMAT = "dgaetok-model/1"


class JsonConfig:
    """Config dataclasses that travel as JSON in file metadata; unknown keys (from newer files) are dropped."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class DGAEConfig(JsonConfig):
    """Everything needed to rebuild a tokenizer; the latent is (latent_channels, res / downsample, res / downsample).

    ``arch`` is the family: "dgae" or "sdvae" (files written before SD-VAE existed have no ``arch`` and load as
    DGAE). ``enc_*`` configure the SD-VAE encoder (``enc_ch_mult`` None: derived from ``downsample``); an SD-VAE's
    decoder mirrors it, as LDM builds both from one config. ``unet_*`` configure DGAE's ADM decoder (see `UNet`
    for each knob, ``unet_patch`` is its ``patch_size``; unused by SD-VAE), ``resolution`` the training and default
    encoding size.
    """

    arch: str = "dgae"
    resolution: int = 256
    downsample: int = 16
    latent_channels: int = 8
    enc_channels: int = 128
    enc_ch_mult: tuple[int, ...] | None = None
    enc_res_blocks: int = 2
    unet_channels: int = 128
    unet_ch_mult: tuple[int, ...] = (1, 2, 2, 4, 4)
    unet_res_blocks: int = 2
    unet_attention: tuple[int, ...] = ()
    unet_patch: int = 1
    head_channels: int = 64
    dropout: float = 0.0
    preset: str = field(default="", compare=False)

    def __post_init__(self):
        # JSON round trips turn tuples into lists; normalise so configs compare equal and hash.
        for name in ("enc_ch_mult", "unet_ch_mult", "unet_attention"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        if self.enc_ch_mult is None:
            object.__setattr__(self, "enc_ch_mult", ch_mult_for(self.downsample))
        if 2 ** (len(self.enc_ch_mult) - 1) != self.downsample:
            raise ValueError(f"enc_ch_mult {self.enc_ch_mult} does not downsample by {self.downsample}")
        if self.unet_patch < 1 or self.downsample % self.unet_patch:
            raise ValueError(f"unet_patch {self.unet_patch} must divide the downsample factor {self.downsample}")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.downsample
        return (self.latent_channels, side, side)


@dataclass(frozen=True)
class Distilled(JsonConfig):
    """What a distilled decoder is (`dgaetok.distill`), as its model file's ``distilled`` metadata records it: it
    was trained to produce in ``steps`` Euler steps on its time ``grid`` (``shift``) what the model file whose
    sha256 starts with ``teacher`` produces in ``teacher_steps`` steps at ``teacher_shift``, from the same latent
    and noise. Its encoder is the teacher's, so it decodes the teacher's latents."""

    teacher: str
    teacher_steps: int
    teacher_shift: float
    steps: int
    shift: float = 1.0
    grid: tuple[float, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "grid", tuple(self.grid))


@dataclass
class EncoderOutput:
    latent_dist: DiagonalGaussian


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


class Tokenizer(nn.Module):
    """What both families share: the config, the SD-VAE encoder, ``encode`` and the parameter counts.

    Subclasses add a ``decoder`` and ``decode(z, steps, sampler, shift, noise, generator, on_step, tile, overlap,
    chunk)``. ``latent_stats`` (a `LatentStats`, or None) are the latent statistics the model file carries;
    `normalize`, `denormalize` and `scaling_factor` use them. ``precision`` ("auto", "bf16" or "fp32", see
    `dgaetok.precision`) is what `encode` and `decode` compute in: float32 for a freshly built model, "auto" for
    one from `load_model`; `set_precision` changes it. Weights, latents and images stay float32 either way.
    """

    single_step = False  # True: decode ignores the diffusion arguments (steps, sampler, shift, noise)
    latent_multiple = 1  # decode needs latent sides that are multiples of this

    def __init__(self, config: DGAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(*self.vae_args())
        self.file_hash = ""  # set by load_model: latents record which model file made them
        self.latent_stats: LatentStats | None = None
        self.precision: str | Precision = "fp32"
        self.compiled = False  # compile_networks: tiles go through the networks in chunks of one size
        self.distilled: Distilled | None = None  # a distilled decoder's record (its file's ``distilled`` metadata)

    def set_precision(self, precision: str | Precision) -> "Tokenizer":
        resolve(precision, "cpu")  # refuse unknown names here, not at the first encode
        self.precision = precision
        return self

    @property
    def default_steps(self) -> int:
        """The decode step count when none is given: 50 (the paper's), a distilled decoder's own K, SD-VAE's 1."""
        return 1 if self.single_step else self.distilled.steps if self.distilled else 50

    @property
    def default_shift(self) -> float:
        """The time-grid shift when none is given: a distilled decoder's, else 1 (uniform)."""
        return self.distilled.shift if self.distilled else 1.0

    def steps_note(self, steps: int | None) -> str:
        """A line for the user when ``steps`` overrides a distilled decoder's own K ("" otherwise)."""
        d = self.distilled
        if d is None or steps is None or steps == d.steps:
            return ""
        return (f"model {self.file_hash} is distilled to decode in {d.steps} step(s); decoding with {steps} as "
                f"asked (leave out the step count to use {d.steps})")

    def made(self, model_hash: str) -> bool:
        """Whether latents recorded as made by ``model_hash`` are this model's to decode: its own, or its
        teacher's when it is a distilled decoder (the same, frozen, encoder)."""
        return model_hash in (self.file_hash, self.distilled.teacher if self.distilled else self.file_hash)

    def require_stats(self) -> LatentStats:
        if self.latent_stats is None:
            raise InputError(f"model {self.file_hash or self.config.preset or self.config.arch} has no latent "
                             f"statistics; add them with `dgaetok stats DATA --model M -o M2`")
        return self.latent_stats

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Latents to zero mean and unit std per channel, ``(z - mean) / std``, as a latent diffusion model wants
        them; z is (B, c, h, w) or (c, h, w)."""
        return self.require_stats().normalize(z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of `normalize`: ``z * std + mean``, ready for `decode`."""
        return self.require_stats().denormalize(z)

    @property
    def scaling_factor(self) -> float:
        """diffusers' single number: 1 / the std of the latents over all channels (``z * scaling_factor``)."""
        return self.require_stats().scaling_factor

    def vae_args(self) -> tuple:
        """(latent_channels, ch, ch_mult, num_res_blocks, dropout) of the SD-VAE encoder (and SD-VAE's decoder)."""
        c = self.config
        return c.latent_channels, c.enc_channels, c.enc_ch_mult, c.enc_res_blocks, c.dropout

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: f times `latent_multiple`."""
        return self.config.downsample * self.latent_multiple

    def encode(self, x: torch.Tensor, tile: int | None = None, overlap: int = 32,
               chunk: int | None = None) -> EncoderOutput:
        """Images (B, 3, H, W) in [-1, 1] -> the posterior (float32, whatever `precision` the encoder runs in).

        ``tile`` (pixels, a multiple of f) encodes overlapping tiles, ``chunk`` at a time (default, as `decode`:
        `images_per_call` of 8), and blends their moments over ``overlap`` pixels (see `dgaetok.tiling`): memory
        follows the tile, not the image. The
        latent then differs from the whole image's where the encoder's GroupNorm statistics and mid-block
        attention, computed per tile, differ from the whole image's, and near tile edges.
        """
        with autocast(x.device, self.precision):
            if tile is None:
                # inference goes `images_per_call` at a time, so that on the CPU a latent does not depend on its
                # batch (nor on how a resumed job batches); training keeps whole batches
                calls = [(0, len(x))] if torch.is_grad_enabled() else _calls(x)
                moments = torch.cat([self.encoder(x[a:b]).float() for a, b in calls])
            else:
                f = self.config.downsample
                check_tiling(tile, overlap, f)
                grid = TileGrid(x.shape[2] // f, x.shape[3] // f, tile // f, overlap // f)
                moments = x.new_empty(x.shape[0], 2 * self.config.latent_channels, grid.height, grid.width,
                                      dtype=torch.float32)
                grid.blend(lambda boxes: self.encoder(grid.tiles(x, boxes, scale=f)).float(), moments,
                           chunk or images_per_call(x.device, 8), self.compiled)
        return EncoderOutput(DiagonalGaussian(moments.contiguous()))  # NCHW whatever the weights' layout

    def compile_networks(self, mode: str = "default") -> "Tokenizer":
        """Compile the encoder and the decoder in place with `torch.compile` (inductor); names of parameters and
        the file format are unchanged.

        DGAE's decoder is the network each sampling step calls, so an N-step decode runs compiled code N times.
        ``mode`` is one of `COMPILE_MODES`: "default"; "reduce-overhead" also captures each call in a CUDA graph
        (CUDA only: one launch per step instead of hundreds of small kernels); "max-autotune" also searches
        kernel configurations. Shapes are static: each new batch shape compiles once more.
        """
        if mode not in COMPILE_MODES:
            raise InputError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
        for net in (self.encoder, self.decoder):
            net.compile(mode=None if mode == "default" else mode, dynamic=False)
        self.compiled = True
        return self

    def set_grad_checkpointing(self, enabled: bool = True) -> "Tokenizer":
        """Recompute each residual and attention block in backward instead of storing its activations (the
        encoder's, the U-Net's or SD-VAE decoder's): about a third more compute for a fraction of the memory (see
        `memory.training_activations`). Only training forwards with gradients are affected; outputs and
        gradients are the same either way, and nothing is stored in model files."""
        for module in self.modules():
            if isinstance(module, Checkpointed):
                module.grad_checkpointing = enabled
        return self

    def num_params(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"encoder": count(self.encoder), "decoder": count(self.decoder), "total": count(self)}


class DGAE(Tokenizer):
    """Diffusion-Guided Autoencoder. Images are (B, 3, H, W) in [-1, 1] with H, W multiples of `size_multiple`."""

    def __init__(self, config: DGAEConfig):
        super().__init__(config)
        self.decoder = UNet(
            in_channels=3,
            cond_channels=config.latent_channels,
            out_channels=3,
            model_channels=config.unet_channels,
            channel_mult=config.unet_ch_mult,
            num_res_blocks=config.unet_res_blocks,
            attention_resolutions=config.unet_attention,
            head_channels=config.head_channels,
            dropout=config.dropout,
            patch_size=config.unet_patch,
        )

    @property
    def size_multiple(self) -> int:
        """f, and what the U-Net needs: it folds p x p patches (``unet_patch``), then halves its working size
        len(unet_ch_mult) - 1 times."""
        c = self.config
        return math.lcm(c.downsample, c.unet_patch * 2 ** (len(c.unet_ch_mult) - 1))

    def condition(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest-upsample the latent to the U-Net's working size (pixel size, or 1/p of it with ``unet_patch``
        p: the same values as upsampling to pixels and folding) and project it with the decoder's first conv."""
        scale = self.config.downsample // self.config.unet_patch
        return self.decoder.condition(F.interpolate(z, scale_factor=float(scale), mode="nearest"))

    def tiled_velocity(self, z: torch.Tensor, tile: int, overlap: int, chunk: int | None = None) -> flow.Velocity:
        """The velocity of the whole image, from the U-Net run on overlapping tiles and blended (`dgaetok.tiling`).

        Tile positions are multiples of `size_multiple`, so each tile's latent is an exact slice. Its condition
        features come from that slice plus a one-latent-pixel halo (zeros beyond the image, as the whole image's
        padding), so they equal the whole image's features under the tile; only the U-Net's own receptive
        field is cut at tile edges.
        """
        f = self.config.downsample
        grid = TileGrid(z.shape[2] * f, z.shape[3] * f, tile, overlap, self.size_multiple)
        z_halo = F.pad(z, (1, 1, 1, 1))
        s = f // self.config.unet_patch  # one latent pixel at the U-Net's working size
        chunk = chunk or images_per_call(z.device, 8)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            def tiles(boxes):
                cond = self.condition(grid.tiles(z_halo, boxes, scale=1 / f, halo=1))[..., s:-s, s:-s]
                return self.decoder(grid.tiles(x, boxes), t.repeat(len(boxes)), cond).float()

            return grid.blend(tiles, torch.empty_like(x), chunk, self.compiled)

        return velocity

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(x_t, t, self.condition(z.to(x_t.dtype)))

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, DiagonalGaussian]:
        """One training pass: encode, sample z, noise x to time t, predict the velocity.

        Returns (predicted velocity, x_t, posterior). It is the module's forward so that DistributedDataParallel
        sees every parameter used in a single call.
        """
        posterior = self.encode(x).latent_dist
        x_t = flow.interpolate(x, noise, t)
        return self.velocity(x_t, t, posterior.sample(generator)), x_t, posterior

    @property
    def latent_multiple(self) -> int:
        """Latent sides must be multiples of this, so that the image's are of `size_multiple`."""
        return self.size_multiple // self.config.downsample

    @torch.no_grad()
    def decode(
        self,
        z: torch.Tensor,
        steps: int | None = None,
        sampler: str = "euler",
        shift: float | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        on_step: Callable[[int], None] | None = None,
        tile: int | None = None,
        overlap: int = 32,
        chunk: int | None = None,
    ) -> torch.Tensor:
        """Latents (B, c, h, w) -> images (B, 3, h*f, w*f) in [-1, 1] by integrating the flow ODE from noise.

        ``steps`` and ``shift`` default to `default_steps` and `default_shift`: 50 on the uniform grid, or the K
        steps and grid a distilled decoder was trained for.

        ``noise`` fixes the starting point; otherwise it is drawn with ``generator`` (on the generator's device,
        then moved, so a CPU generator gives the same noise whatever device decodes). ``on_step(n)`` is called
        after every ODE step with the number of images that step advanced. Images go through the network
        `images_per_call` at a time. ``tile`` (pixels, a multiple of `size_multiple`) runs the U-Net on
        overlapping tiles, ``chunk`` at a time (default: `images_per_call` of 8), and blends their velocities
        over ``overlap`` pixels at every step (`tiled_velocity`); the noise is still one draw for the whole
        image, so a seed and a tile size give one image.
        """
        steps = self.default_steps if steps is None else steps
        shift = self.default_shift if shift is None else shift
        f = self.config.downsample
        shape = (z.shape[0], 3, z.shape[2] * f, z.shape[3] * f)
        if noise is None:
            gen_device = generator.device if generator is not None else z.device
            noise = torch.randn(shape, generator=generator, device=gen_device)
        noise = noise.to(z.device, torch.float32)
        out = []
        with autocast(z.device, self.precision):
            for a, b in _calls(z):
                if tile is None:
                    cond = self.condition(z[a:b].float())
                    # a copy: a CUDA-graph replay reuses its output buffer, and Heun still needs the previous velocity
                    velocity = lambda x, t: self.decoder(x, t, cond).to(torch.float32, copy=True)  # noqa: E731
                else:
                    velocity = self.tiled_velocity(z[a:b].float(), tile, overlap, chunk)
                out.append(flow.sample(velocity, noise[a:b], steps, sampler, shift, _images_done(on_step, b - a)))
        return torch.cat(out).clamp(-1, 1).contiguous()


class SDVAE(Tokenizer):
    """The GAN-guided baseline (SD-VAE / LDM `AutoencoderKL`): DGAE's encoder and a deterministic decoder."""

    single_step = True

    def __init__(self, config: DGAEConfig):
        super().__init__(config)
        self.decoder = Decoder(*self.vae_args())  # LDM builds encoder and decoder from one config

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """One training pass: encode, sample z, decode. Returns (reconstruction, posterior)."""
        posterior = self.encode(x).latent_dist
        return self.decoder(posterior.sample(generator).to(x.dtype)), posterior

    @torch.no_grad()
    def decode(
        self,
        z: torch.Tensor,
        steps: int | None = 1,
        sampler: str = "euler",
        shift: float | None = 1.0,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        on_step: Callable[[int], None] | None = None,
        tile: int | None = None,
        overlap: int = 32,
        chunk: int | None = None,
    ) -> torch.Tensor:
        """Latents (B, c, h, w) -> images (B, 3, h*f, w*f) in [-1, 1], in one pass; the other arguments exist so
        that SD-VAE and DGAE are called the same way, and are ignored (``on_step(n)`` is called once per
        network call, for the n images it decoded).

        ``tile`` (pixels, a multiple of f) decodes overlapping latent tiles, ``chunk`` at a time, and blends the
        decoded tiles once over ``overlap`` pixels, as diffusers' ``enable_tiling`` (`dgaetok.tiling`).
        """
        f = self.config.downsample
        out = []
        with autocast(z.device, self.precision):
            for a, b in _calls(z):
                za = z[a:b].float()
                if tile is None:
                    out.append(self.decoder(za).float())
                else:
                    grid = TileGrid(za.shape[2] * f, za.shape[3] * f, tile, overlap, f)
                    out.append(grid.blend(lambda boxes: self.decoder(grid.tiles(za, boxes, scale=1 / f)).float(),
                                          za.new_empty(len(za), 3, grid.height, grid.width),
                                          chunk or images_per_call(z.device, 8), self.compiled))
                _images_done(on_step, b - a)(1)
        return torch.cat(out).clamp(-1, 1).contiguous()


def images_per_call(device: torch.device | str, batch: int) -> int:
    """How many images of a batch go through a network at once when decoding: all of them on a GPU, one on the
    CPU. oneDNN picks other kernels for other batch sizes, whose last-bit differences moved one pixel in ~1000 by
    one level between --batch-size 1 and 2; one image per call makes an image's decode independent of its batch,
    and on an idle CPU is a third faster than whole batches (benchmarks/RESULTS.md). Tiles follow the same rule."""
    return batch if torch.device(device).type != "cpu" else 1


def _calls(z: torch.Tensor) -> list[tuple[int, int]]:
    n = images_per_call(z.device, len(z))
    return [(a, min(len(z), a + n)) for a in range(0, len(z), max(1, n))]


def _images_done(on_step: Callable[[int], None] | None, n: int) -> Callable[[int], None]:
    return (lambda step: on_step(n)) if on_step is not None else (lambda step: None)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device, so that wall-clock timings cover the work queued on it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# --- presets: decoder sizes as in the paper's Table 1; the latent (downsample, latent_channels) is a kwarg ----


def DGAE_B(**kw) -> DGAEConfig:
    return DGAEConfig(unet_channels=128, preset="dgae-b", **kw)


def DGAE_M(**kw) -> DGAEConfig:
    return DGAEConfig(unet_channels=192, preset="dgae-m", **kw)


def DGAE_L(**kw) -> DGAEConfig:
    return DGAEConfig(unet_channels=256, preset="dgae-l", **kw)


def DGAE_S(**kw) -> DGAEConfig:
    """A CPU-sized DGAE (~5M parameters) for the bundled default weights and quick experiments."""
    return DGAEConfig(
        enc_channels=32, enc_res_blocks=1, unet_channels=32, unet_ch_mult=(1, 2, 2, 4), unet_res_blocks=1,
        preset="dgae-s", **kw,
    )


def DGAE_S2(**kw) -> DGAEConfig:
    """dgae-s's encoder and a U-Net on 2x2 pixel patches (DiT's "/2"), twice as wide: the bundled default's size.

    About 39 GFLOP per decoder pass at 256x256, like dgae-s, but with 2x the decoder parameters (7.5M), since the
    patches let the widths grow at the same cost: small enough to decode 8 steps in about 2 s on 2 CPU cores and to
    travel as one 16 MiB file, wide enough to keep an H100 busy.
    """
    return DGAEConfig(
        enc_channels=32, enc_res_blocks=1, unet_channels=64, unet_ch_mult=(1, 2, 2, 2), unet_res_blocks=1,
        unet_patch=2, preset="dgae-s2", **kw,
    )


def DGAE_T(**kw) -> DGAEConfig:
    """A tiny DGAE for tests: seconds per step on a laptop CPU, nothing more."""
    kw.setdefault("resolution", 64)
    kw.setdefault("downsample", 8)
    kw.setdefault("latent_channels", 4)
    return DGAEConfig(
        enc_channels=32, enc_res_blocks=1, unet_channels=32, unet_ch_mult=(1, 2), unet_res_blocks=1, preset="dgae-t",
        **kw,
    )


DGAE_models = {"dgae-b": DGAE_B, "dgae-m": DGAE_M, "dgae-l": DGAE_L, "dgae-s": DGAE_S, "dgae-s2": DGAE_S2,
               "dgae-t": DGAE_T}


# --- SD-VAE presets: LDM's autoencoder (ch 128, 2 residual blocks) at the latents the paper compares --------------


def _fixed_latent(preset: str, downsample: int, latent_channels: int, kw: dict) -> dict:
    """The preset names its latent; an explicit different one is a contradiction, not an override."""
    for key, value in (("downsample", downsample), ("latent_channels", latent_channels)):
        if kw.setdefault(key, value) != value:
            raise ValueError(f"preset {preset} has {key} {value}, not {kw[key]}")
    return kw


def SDVAE_f8c4(**kw) -> DGAEConfig:
    return DGAEConfig(arch="sdvae", preset="sdvae-f8c4", **_fixed_latent("sdvae-f8c4", 8, 4, kw))


def SDVAE_f16c16(**kw) -> DGAEConfig:
    return DGAEConfig(arch="sdvae", preset="sdvae-f16c16", **_fixed_latent("sdvae-f16c16", 16, 16, kw))


def SDVAE_f16c8(**kw) -> DGAEConfig:
    return DGAEConfig(arch="sdvae", preset="sdvae-f16c8", **_fixed_latent("sdvae-f16c8", 16, 8, kw))


def SDVAE_f16c4(**kw) -> DGAEConfig:
    return DGAEConfig(arch="sdvae", preset="sdvae-f16c4", **_fixed_latent("sdvae-f16c4", 16, 4, kw))


def SDVAE_f32c64(**kw) -> DGAEConfig:
    return DGAEConfig(arch="sdvae", preset="sdvae-f32c64", **_fixed_latent("sdvae-f32c64", 32, 64, kw))


def SDVAE_S(**kw) -> DGAEConfig:
    """dgae-s's encoder with the mirrored SD-VAE decoder; the latent is a kwarg as for DGAE."""
    return DGAEConfig(arch="sdvae", enc_channels=32, enc_res_blocks=1, preset="sdvae-s", **kw)


def SDVAE_T(**kw) -> DGAEConfig:
    """dgae-t's encoder with the mirrored SD-VAE decoder, for tests."""
    kw.setdefault("resolution", 64)
    kw.setdefault("downsample", 8)
    kw.setdefault("latent_channels", 4)
    return DGAEConfig(arch="sdvae", enc_channels=32, enc_res_blocks=1, preset="sdvae-t", **kw)


SDVAE_models = {
    "sdvae-f8c4": SDVAE_f8c4, "sdvae-f16c16": SDVAE_f16c16, "sdvae-f16c8": SDVAE_f16c8, "sdvae-f16c4": SDVAE_f16c4,
    "sdvae-f32c64": SDVAE_f32c64, "sdvae-s": SDVAE_S, "sdvae-t": SDVAE_T,
}
ARCHS = {"dgae": (DGAE, DGAE_models), "sdvae": (SDVAE, SDVAE_models)}  # family -> (model class, presets)
MODELS = {**DGAE_models, **SDVAE_models}

# --- files ----------------------------------------------------------------------------------------------------

DEFAULT_MODEL = "default"  # weights/default.safetensors; its card is weights/README.md


def weights_dir() -> Path:
    """``$DGAETOK_WEIGHTS``, else the bundled models: ``weights/`` inside the package where it was installed from
    a wheel (pyproject.toml packages the repository's folder there), else the repository's ``weights/`` beside the
    package (a clone, an editable install)."""
    if "DGAETOK_WEIGHTS" in os.environ:
        return Path(os.environ["DGAETOK_WEIGHTS"])
    package = Path(__file__).resolve().parent
    return package / "weights" if (package / "weights").is_dir() else package.parent / "weights"


def resolve_model(name_or_path: str | os.PathLike | None = None) -> Path:
    """A file path as given, else a name looked up as ``weights/<name>.safetensors``."""
    name = str(name_or_path or DEFAULT_MODEL)
    candidates = [Path(name), weights_dir() / name, weights_dir() / f"{name}.safetensors"]
    for path in candidates:
        if path.is_file():
            return path
    if name.endswith(".safetensors") or os.sep in name:
        raise InputError(f"{name}: no such model file")
    raise InputError(f"{name}: no such model file, and no {name}.safetensors in {weights_dir()}")


def file_sha256(path: str | os.PathLike, length: int = 16) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def read_model_file(path: str | os.PathLike,
                    shards_ok: bool = False) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of a model file, with a one-line InputError for anything that is not one (or for a
    shard of one, unless ``shards_ok``)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FORMAT:
                raise InputError(f"{path}: not a dgaetok model file (metadata format {meta.get('format')!r})")
            if "shard" in meta and not shards_ok:
                raise InputError(f"{path}: shard {meta['shard']} of a model file; join the shards first "
                                 "(dgaetok.models.join_model_files)")
            return meta, {k: fh.get_tensor(k) for k in fh.keys()}
    except InputError:
        raise
    except Exception as exc:  # safetensors raises several types for truncated or foreign files
        raise InputError(f"{path}: unreadable model file ({exc})") from None


def save_model(model: Tokenizer, path: str | os.PathLike, dtype: torch.dtype | None = None, **meta: str) -> None:
    """Write a self-describing model file atomically; ``dtype`` (e.g. bfloat16) shrinks storage only. The model's
    ``latent_stats``, when set, go into the metadata."""
    tensors = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "config": model.config.to_json(), **meta}
    if model.latent_stats is not None:
        metadata["latent_stats"] = model.latent_stats.to_json()
    if model.distilled is not None:
        metadata["distilled"] = model.distilled.to_json()
    write_safetensors(tensors, path, metadata)  # the same bytes from every process: a model file's hash names it


def save_with_stats(src: str | os.PathLike, stats: LatentStats, dst: str | os.PathLike) -> None:
    """Copy the model file ``src`` to ``dst`` (atomically; ``dst`` may be ``src``) with ``stats`` in its metadata;
    the tensors are copied as stored, in their dtype."""
    meta, tensors = read_model_file(src)
    check_stats(config_of(meta, src), stats, dst)
    write_safetensors(tensors, dst, {**meta, "latent_stats": stats.to_json()})


def check_stats(config: DGAEConfig, stats: LatentStats, path: str | os.PathLike) -> LatentStats:
    if len(stats.mean) != config.latent_channels:
        raise InputError(f"{path}: latent statistics have {len(stats.mean)} channels, the model "
                         f"{config.latent_channels}")
    return stats


def read_stats(meta: dict[str, str], config: DGAEConfig, path: str | os.PathLike) -> LatentStats | None:
    """The latent statistics in a model file's metadata; None in files without (all before issue 15)."""
    if "latent_stats" not in meta:
        return None
    try:
        stats = LatentStats.from_json(meta["latent_stats"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: unreadable latent statistics ({exc})") from None
    return check_stats(config, stats, path)


def read_distilled(meta: dict[str, str], path: str | os.PathLike) -> Distilled | None:
    """The ``distilled`` record in a model file's metadata; None for a model that is not a distilled decoder."""
    if "distilled" not in meta:
        return None
    try:
        return Distilled.from_json(meta["distilled"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: unreadable distillation record ({str(exc).splitlines()[0]})") from None


def config_of(meta: dict[str, str], path: str | os.PathLike) -> DGAEConfig:
    """The config in a model file's metadata (from `read_model_file`)."""
    try:
        return DGAEConfig.from_json(meta["config"])
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: unreadable model config ({str(exc).splitlines()[0]})") from None


def load_encoder(model: Tokenizer, path: str | os.PathLike) -> None:
    """Copy the encoder of the model file ``path`` (either family) into ``model`` (`train --init-encoder`); an
    encoder of another shape (f, c, widths, blocks) is refused."""
    path = resolve_model(path)
    meta, tensors = read_model_file(path)

    def shape(c: DGAEConfig) -> str:
        return (f"f{c.downsample} c{c.latent_channels}, {c.enc_channels} channels x {list(c.enc_ch_mult)}, "
                f"{c.enc_res_blocks} blocks per level")

    if shape(config_of(meta, path)) != shape(model.config):
        raise InputError(f"{path}: its encoder ({shape(config_of(meta, path))}) does not fit the model's "
                         f"({shape(model.config)})")
    model.encoder.load_state_dict({k[len("encoder."):]: v.float() for k, v in tensors.items()
                                   if k.startswith("encoder.")})


def split_model_file(src: str | os.PathLike, folder: str | os.PathLike, max_bytes: int = 16 * 2**20,
                     dtype: torch.dtype = torch.bfloat16) -> list[Path]:
    """Write a model file as model files of at most ``max_bytes`` each, for transports that cap file sizes (a
    device call returns files of 16 MiB at most). Shard i of n is ``<stem>.shard-i-of-n.safetensors`` with the
    tensors in ``dtype``, the metadata of ``src`` and ``shard`` = "i/n"; `join_model_files` puts them back."""
    meta, tensors = read_model_file(src)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    room = max_bytes - 64 * 2**10 - len(json.dumps(meta))  # the header: metadata and ~100 bytes per tensor
    groups: list[dict[str, torch.Tensor]] = [{}]
    for key, value in tensors.items():
        size = value.numel() * value.element_size()
        if size > room:
            raise InputError(f"{src}: tensor {key} ({size} bytes) does not fit a {max_bytes}-byte shard")
        if sum(t.numel() * t.element_size() for t in groups[-1].values()) + size > room:
            groups.append({})
        groups[-1][key] = value
    folder, stem = Path(folder), Path(src).name.removesuffix(".safetensors")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, group in enumerate(groups, 1):
        paths.append(folder / f"{stem}.shard-{i}-of-{len(groups)}.safetensors")
        write_safetensors(group, paths[-1], {**meta, "shard": f"{i}/{len(groups)}"})
    return paths


def join_model_files(shards: list[str | os.PathLike], dst: str | os.PathLike) -> Path:
    """One model file from the shards `split_model_file` wrote (all of them, in any order)."""
    parts = [read_model_file(path, shards_ok=True) for path in shards]
    counts = {meta.get("shard", "").split("/")[-1] for meta, _ in parts}
    found = sorted(int(meta.get("shard", "0/0").split("/")[0]) for meta, _ in parts)
    if len(counts) != 1 or found != list(range(1, int(counts.pop() or 0) + 1)):
        raise InputError(f"{dst}: the shards given are not one complete set (found shards {found})")
    meta = {k: v for k, v in parts[0][0].items() if k != "shard"}
    tensors = {k: v for _, part in parts for k, v in part.items()}
    write_safetensors(tensors, dst, meta)  # the same bytes on every machine: the joined file's hash names it
    return Path(dst)


def build_model(config: DGAEConfig) -> Tokenizer:
    if config.arch not in ARCHS:
        raise InputError(f"unknown model family {config.arch!r}; known: {', '.join(ARCHS)}")
    return ARCHS[config.arch][0](config)


def load_model(name_or_path: str | os.PathLike | None = None, device: torch.device | str = "cpu",
               compile: str | None = None, precision: str | Precision = "auto") -> Tokenizer:
    """Load a model file (or a name in ``weights/``) in float32 and eval mode, for inference; ``compile``: a
    `COMPILE_MODES` mode for `Tokenizer.compile_networks` (None: eager); ``precision``: what encode and decode
    compute in (`dgaetok.precision`: "auto" is bf16 autocast where the device multiplies bf16 natively).

    A distilled decoder (`dgaetok.distill`) comes back with its record in ``distilled``: its ``decode`` then
    takes the K steps and grid it was trained for unless told otherwise.

    Weights are channels_last: convolutions then run in NHWC, which oneDNN and cuDNN prefer (1.3x faster
    decoding on CPU, see benchmarks/RESULTS.md); outputs are the same up to float rounding.
    """
    path = resolve_model(name_or_path)
    meta, tensors = read_model_file(path)
    try:
        config = DGAEConfig.from_json(meta["config"])
        model = build_model(config)
        model.load_state_dict({k: v.float() for k, v in tensors.items()})
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise InputError(f"{path}: model file does not match its config ({str(exc).splitlines()[0]})") from None
    model.file_hash = file_sha256(path)
    model.latent_stats = read_stats(meta, config, path)
    model.distilled = read_distilled(meta, path)
    model = model.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    model.set_precision(precision)
    return model.compile_networks(compile) if compile else model
