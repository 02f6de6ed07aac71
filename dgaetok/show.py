"""A look at the latent, as in the paper's Fig. 8: its first three principal components as RGB.

The channels of a latent are a c-dimensional vector per position. Projected on the three directions along
which they vary most over the image, they become a colour picture: regions the encoder codes alike share a
colour, so the picture shows what the latent keeps (layout, object boundaries) and what it leaves to the
decoder (texture). Given the source image, the picture sits between the original and the reconstruction.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from .errors import InputError
from .files import DEFAULT_MAX_PIXELS, display_name, open_image, padding_of, read_latent, to_uint8, unpad
from .models import DGAEConfig, Tokenizer, load_model
from .pipeline import as_encoded, check_latent, decode_batch, seeded_noise

GAP = 8  # white pixels between the panels of a side-by-side picture


def latent_pca(latent: torch.Tensor) -> torch.Tensor:
    """A latent (c, h, w) -> its first three principal components over positions, (3, h, w) in [0, 1].

    Each component is scaled so its 1st..99th percentiles span [0, 1] (a few outlying positions must not
    wash out the rest) and its sign is fixed so that its largest channel loading is positive, which makes the
    colours reproducible. Components a latent with fewer than 3 channels lacks are mid-grey.
    """
    c, h, w = latent.shape
    x = latent.reshape(c, h * w).T.double()
    x = x - x.mean(dim=0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    axes = vh[:3]
    axes = axes * torch.sign(axes.gather(1, axes.abs().argmax(dim=1, keepdim=True)))
    proj = x @ axes.T  # (hw, k)
    lo, hi = torch.quantile(proj, 0.01, dim=0), torch.quantile(proj, 0.99, dim=0)
    proj = ((proj - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    rgb = torch.full((h * w, 3), 0.5, dtype=torch.float64)
    rgb[:, : proj.shape[1]] = proj
    return rgb.T.reshape(3, h, w).float()


def latent_picture(latent: torch.Tensor, downsample: int, padding: tuple[int, ...] = (0, 0, 0, 0)) -> Image.Image:
    """`latent_pca` nearest-upsampled by ``downsample`` to the image's size, the encode padding cropped off."""
    rgb = latent_pca(latent).repeat_interleave(downsample, dim=1).repeat_interleave(downsample, dim=2)
    return Image.fromarray(to_uint8(unpad(rgb * 2 - 1, padding)).numpy())


def side_by_side(*panels: Image.Image) -> Image.Image:
    """Panels in a row, top-aligned, ``GAP`` white pixels apart."""
    width = sum(p.width for p in panels) + GAP * (len(panels) - 1)
    out = Image.new("RGB", (width, max(p.height for p in panels)), "white")
    left = 0
    for panel in panels:
        out.paste(panel, (left, 0))
        left += panel.width + GAP
    return out


def model_input(image: Image.Image, meta: dict[str, str], name: str | os.PathLike = "") -> Image.Image:
    """The picture the latent was encoded from: the source resized and cropped as its metadata records."""
    try:
        source, resized = tuple(json.loads(meta["source_size"])), tuple(json.loads(meta["resized_size"]))
        box = tuple(json.loads(meta["crop_box"]))
    except (KeyError, ValueError) as exc:
        raise InputError(f"{display_name(name)}: latent metadata lacks the crop it was encoded with ({exc})") from None
    if image.size != source:
        raise InputError(f"{display_name(name)}: the image is {image.width}x{image.height}, but the latent was "
                         f"encoded from a {source[0]}x{source[1]} one")
    if image.size != resized:  # the same resampling as files.resize_shorter_side
        image = image.resize(resized, Image.BICUBIC, reducing_gap=None)
    return image.crop(box)


def show(
    latent_file: str | os.PathLike,
    image: str | os.PathLike | None = None,
    model: Tokenizer | str | os.PathLike | None = None,
    steps: int | None = None,
    sampler: str = "euler",
    shift: float | None = None,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> Image.Image:
    """The latent of ``latent_file`` as a picture (`latent_picture`) at its image's size.

    With ``image`` (the file it was encoded from): original | latent | reconstruction, the reconstruction
    decoded by ``model`` (a loaded model or a file; default: the bundled one) exactly as ``dgaetok decode``
    with the same ``steps``, ``sampler``, ``shift`` and ``seed`` would (None: the model's own), tiled if it is
    large. ``on_step(1)`` is called after each step of that decode.
    """
    path = Path(latent_file)
    latent, meta = read_latent(path)
    latent = as_encoded(latent, meta, path)
    if "model_config" in meta:
        f = DGAEConfig.from_json(meta["model_config"]).downsample
    elif isinstance(model, Tokenizer):
        f = model.config.downsample
    else:
        raise InputError(f"{display_name(path)}: latent metadata does not say which model made it; pass the model")
    padding = padding_of(meta, (latent.shape[1] * f, latent.shape[2] * f), path)
    picture = latent_picture(latent, f, padding)
    if image is None:
        return picture
    original = model_input(open_image(image), meta, image)
    if not isinstance(model, Tokenizer):
        model = load_model(model)
    check_latent(model, path, latent, meta)
    device = next(model.parameters()).device
    z = latent[None].to(device)
    noise = seeded_noise(seed, z.shape[2] * f, z.shape[3] * f, 1)
    recon, _ = decode_batch(model, z, noise, steps, sampler, shift, on_step=on_step,  # as `decode`
                            max_pixels=DEFAULT_MAX_PIXELS)
    recon = Image.fromarray(to_uint8(unpad(recon[0], padding)).numpy())
    return side_by_side(original, picture, recon)

