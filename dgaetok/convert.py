"""Import SD-VAE checkpoints as ``arch: sdvae`` model files, and export them back to diffusers.

Two layouts hold the same network (Rombach et al.'s ``AutoencoderKL``):

- **LDM / CompVis**: ``encoder.down.{i}.block.{j}``, ``encoder.mid.block_1`` / ``attn_1`` / ``block_2`` with the
  attention's q, k, v and proj_out as 1x1 convs, ``nin_shortcut``, ``quant_conv`` and ``post_quant_conv`` at the
  top level, and ``decoder.up.{i}`` indexed by level (so the first one applied is the last index). Found in a
  ``.ckpt`` (read with ``torch.load(weights_only=True)``, nothing else) or a ``.safetensors``, bare or under
  ``first_stage_model.`` (a whole Stable Diffusion checkpoint, whose other weights are ignored). The keys of LDM's
  training loss (``loss.*``: LPIPS and the discriminator) are dropped.
- **diffusers** ``AutoencoderKL``: a folder with ``config.json`` and ``diffusion_pytorch_model.safetensors``;
  ``down_blocks.{i}.resnets.{j}``, ``conv_shortcut``, ``mid_block``, the attention as Linear ``to_q`` / ``to_k`` /
  ``to_v`` / ``to_out.0`` (files from before diffusers 0.14: ``query`` / ``key`` / ``value`` / ``proj_attn``),
  ``conv_norm_out``, and ``decoder.up_blocks`` in the order applied.

dgaetok's own layout (`vae`) is LDM's with q, k and v fused into one 1x1 conv (``qkv``), ``skip`` for the
shortcut, ``quant_conv`` inside the encoder and ``post_quant_conv`` inside the decoder, and ``decoder.up`` in the
order applied. `our_names` maps each dgaetok key to the keys it comes from; import and export both use it.

The structure (f, c, base width, multipliers, blocks per level) is read off the weights and, for diffusers, checked
against config.json. diffusers itself is never imported: config.json and the tensors are read directly.

Latent statistics follow what diffusers' pipelines do with config.json's numbers (n: the normalised latent a
diffusion model sees, z: the VAE's latent):

- ``scaling_factor`` alone (SD, SDXL): ``z = n / scaling_factor``;
- with ``shift_factor`` (SD3, Flux): ``z = n / scaling_factor + shift_factor``;
- with per-channel ``latents_mean`` / ``latents_std`` (SDXL's pipelines, e.g. Playground v2.5):
  ``z = n * latents_std / scaling_factor + latents_mean``, so the channel's std is ``latents_std / scaling_factor``
  and ``shift_factor`` is not used.

Import reads them that way into the model file's per-channel mean and std (a config.json without
``scaling_factor`` has diffusers' default, 0.18215). Export writes the global ``scaling_factor`` and
``shift_factor`` (what pipelines without per-channel statistics use) and, where the channels differ,
``latents_mean`` and ``latents_std`` multiplied by that ``scaling_factor``, so that SDXL's pipelines recover each
channel's own mean and std exactly.

LDM checkpoints of a model trained with an EMA (``model_ema.*``: LitEma's copy of each weight, its name without
dots, and its ``decay`` / ``num_updates``) import the EMA weights.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import InputError
from .files import atomic_path
from .models import FORMAT, SDVAE, DGAEConfig, Tokenizer
from .stats import LatentStats

LAYOUTS = ("ldm", "diffusers")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_SCALING_FACTOR = 0.18215  # AutoencoderKL's default, for a config.json that states none
# Module renames from dgaetok's names, applied in order to a key; {up} is rewritten per layout (see `our_names`).
_RENAMES = {
    "ldm": [
        (r"^encoder\.quant_conv\.", "quant_conv."),
        (r"^decoder\.post_quant_conv\.", "post_quant_conv."),
        (r"\.mid\.0\.", ".mid.block_1."),
        (r"\.mid\.2\.", ".mid.block_2."),
        (r"\.mid\.1\.", ".mid.attn_1."),
        (r"\.skip\.", ".nin_shortcut."),
    ],
    "diffusers": [
        (r"^encoder\.quant_conv\.", "quant_conv."),
        (r"^decoder\.post_quant_conv\.", "post_quant_conv."),
        (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
        (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
        (r"^decoder\.up\.(\d+)\.block\.", r"decoder.up_blocks.\1.resnets."),
        (r"^decoder\.up\.(\d+)\.upsample\.", r"decoder.up_blocks.\1.upsamplers.0."),
        (r"\.mid\.0\.", ".mid_block.resnets.0."),
        (r"\.mid\.2\.", ".mid_block.resnets.1."),
        (r"\.mid\.1\.norm\.", ".mid_block.attentions.0.group_norm."),
        (r"\.mid\.1\.proj_out\.", ".mid_block.attentions.0.to_out.0."),
        (r"\.mid\.1\.", ".mid_block.attentions.0."),
        (r"\.skip\.", ".conv_shortcut."),
        (r"\.norm_out\.", ".conv_norm_out."),
    ],
}
_QKV = {"ldm": ("q", "k", "v"), "diffusers": ("to_q", "to_k", "to_v")}
# diffusers before 0.14 named the attention's projections differently (its own loader renames them the same way)
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def our_names(key: str, layout: str, levels: int) -> tuple[tuple[str, ...], bool]:
    """(their keys, linear) for one dgaetok key: one key, or three (q, k, v) for the fused ``qkv``; ``linear``:
    theirs is a Linear weight (diffusers' attention), ours a 1x1 conv."""
    if layout == "ldm":  # LDM indexes decoder levels from the top: ours applied k-th is its levels - 1 - k
        key = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.", key)
    for pattern, repl in _RENAMES[layout]:
        key = re.sub(pattern, repl, key)
    linear = layout == "diffusers" and ".attentions.0." in key and key.endswith(".weight") \
        and ".group_norm." not in key
    if ".qkv." in key:
        return tuple(key.replace(".qkv.", f".{name}.") for name in _QKV[layout]), linear
    return (key,), linear


# --- reading checkpoints ----------------------------------------------------------------------------------------


def _load_torch(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickles with code in them, truncated files, not a torch file at all
        raise InputError(f"{path}: cannot be read as plain tensors with torch.load(weights_only=True) "
                         f"({str(exc).strip().splitlines()[0]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # a Lightning checkpoint
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise InputError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            if (fh.metadata() or {}).get("format") == FORMAT:
                raise InputError(f"{path}: already a dgaetok model file (export it with --to diffusers)")
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: unreadable safetensors file ({str(exc).splitlines()[0]})") from None


def read_checkpoint(src: str | Path) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """(tensors, diffusers config or None, what was read) from a diffusers folder or a checkpoint file."""
    src = Path(src)
    if src.is_dir():
        config_path = src / "config.json"
        if not config_path.is_file():
            raise InputError(f"{src}: a folder, but no config.json in it (expected a diffusers AutoencoderKL)")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{config_path}: unreadable ({exc})") from None
        weights = src / DIFFUSERS_WEIGHTS
        if weights.is_file():
            return _load_safetensors(weights), config, str(weights)
        if (src / "diffusion_pytorch_model.bin").is_file():
            return _load_torch(src / "diffusion_pytorch_model.bin"), config, str(src / "diffusion_pytorch_model.bin")
        raise InputError(f"{src}: no {DIFFUSERS_WEIGHTS} in it")
    if not src.is_file():
        raise InputError(f"{src}: no such file or folder")
    if src.suffix == ".safetensors":
        return _load_safetensors(src), None, str(src)
    if src.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return _load_torch(src), None, str(src)
    raise InputError(f"{src}: not a checkpoint (expected a .ckpt or .safetensors file, or a diffusers folder)")


def _ema_weights(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """(tensors with LitEma's ``model_ema.*`` removed and its copies in place of the weights they follow, whether
    any were). LitEma names a weight's copy after the weight without its dots; its copies of the training loss's
    weights and its own ``decay`` / ``num_updates`` have no place in the autoencoder."""
    shadow = {k[len("model_ema."):]: v for k, v in tensors.items() if k.startswith("model_ema.")}
    tensors = {k: v for k, v in tensors.items() if not k.startswith("model_ema.")}
    ema = {k: shadow[k.replace(".", "")] for k in tensors if k.replace(".", "") in shadow}
    return tensors | ema, bool(ema)


def _their_state(tensors: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor], float | None, bool]:
    """(layout, the autoencoder's tensors with LDM's prefix and training-only keys removed, LDM's scale_factor,
    whether they are the checkpoint's EMA weights)."""
    scale = tensors.get("scale_factor")
    ema = False
    if any(k.startswith("first_stage_model.") for k in tensors):  # a whole Stable Diffusion checkpoint
        # (its model_ema.* is the EMA of the diffusion model, not of the autoencoder)
        tensors = {k[len("first_stage_model."):]: v for k, v in tensors.items() if k.startswith("first_stage_model.")}
    else:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("loss.") and k != "scale_factor"}
        tensors, ema = _ema_weights(tensors)
    if any(".down_blocks." in k or ".mid_block." in k for k in tensors):
        def modern(key: str) -> str:
            head, sep, tail = key.rpartition(".attentions.0.")
            if sep and tail.split(".")[0] in _LEGACY_ATTENTION:
                name, rest = tail.split(".", 1)
                return f"{head}{sep}{_LEGACY_ATTENTION[name]}.{rest}"
            return key
        return "diffusers", {modern(k): v for k, v in tensors.items()}, None, ema
    return "ldm", tensors, float(scale) if scale is not None and scale.numel() == 1 else None, ema


def _need(tensors: dict[str, torch.Tensor], key: str, src: str) -> torch.Tensor:
    if key not in tensors:
        raise InputError(f"{src}: not an SD-VAE checkpoint (no {key})")
    return tensors[key]


def infer_config(tensors: dict[str, torch.Tensor], layout: str, src: str, resolution: int) -> DGAEConfig:
    """f, c, base width, width multipliers and blocks per level, from the encoder's weights."""
    down, block = ("down", "block") if layout == "ldm" else ("down_blocks", "resnets")
    levels = 1 + max((int(m.group(1)) for k in tensors if (m := re.match(rf"encoder\.{down}\.(\d+)\.", k))),
                     default=-1)
    blocks = 1 + max((int(m.group(1)) for k in tensors
                      if (m := re.match(rf"encoder\.{down}\.0\.{block}\.(\d+)\.", k))), default=-1)
    if levels < 1 or blocks < 1:
        raise InputError(f"{src}: not an SD-VAE checkpoint (no encoder.{down}.0.{block}.0 weights)")
    ch = _need(tensors, "encoder.conv_in.weight", src).shape[0]
    widths = [_need(tensors, f"encoder.{down}.{i}.{block}.0.conv1.weight", src).shape[0] for i in range(levels)]
    if any(w % ch for w in widths):
        raise InputError(f"{src}: level widths {widths} are not multiples of the first conv's {ch} channels")
    latent_channels = _need(tensors, "encoder.conv_out.weight", src).shape[0] // 2
    try:
        return DGAEConfig(arch="sdvae", resolution=resolution, downsample=2 ** (levels - 1),
                          latent_channels=latent_channels, enc_channels=ch, enc_ch_mult=tuple(w // ch for w in widths),
                          enc_res_blocks=blocks, preset="")
    except ValueError as exc:
        raise InputError(f"{src}: {exc}") from None


def check_diffusers_config(config: dict, ours: DGAEConfig, src: str) -> None:
    """Refuse what `SDVAE` cannot represent, and a config.json that contradicts its weights."""
    expected = {
        "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "act_fn": "silu", "norm_num_groups": 32,
        "mid_block_add_attention": True, "latent_channels": ours.latent_channels,
        "layers_per_block": ours.enc_res_blocks,
        "block_out_channels": [ours.enc_channels * m for m in ours.enc_ch_mult],
        "down_block_types": ["DownEncoderBlock2D"] * len(ours.enc_ch_mult),
        "up_block_types": ["UpDecoderBlock2D"] * len(ours.enc_ch_mult),
    }
    for key, want in expected.items():
        have = config.get(key, want)
        if (list(have) if isinstance(have, (list, tuple)) else have) != want:
            raise InputError(f"{src}: config.json has {key} {have!r}; dgaetok's SD-VAE (and these weights) need "
                             f"{want!r}")


def _stats_from_diffusers(config: dict, channels: int) -> LatentStats | None:
    """The statistics with which diffusers' pipelines turn a normalised latent into this VAE's (module docstring)."""
    scale = config.get("scaling_factor", DIFFUSERS_SCALING_FACTOR)
    if not scale:
        return None
    scale = float(scale)
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:
        return LatentStats(config["latents_mean"], [s / scale for s in config["latents_std"]], 0,
                           "diffusers config.json latents_mean, latents_std / scaling_factor")
    return LatentStats.uniform(channels, scale, float(config.get("shift_factor") or 0.0),
                               "diffusers config.json scaling_factor/shift_factor")


def import_checkpoint(src: str | Path, resolution: int | None = None, scaling_factor: float | None = None,
                      shift_factor: float | None = None) -> tuple[SDVAE, str]:
    """An SD-VAE checkpoint in either layout as an `SDVAE` (float32), and its layout ("ldm" or "diffusers", with
    " (EMA weights)" where an LDM checkpoint's EMA copy was taken).

    ``resolution``: the model's default encoding size (None: diffusers' ``sample_size``, else 256).
    ``scaling_factor`` / ``shift_factor``: latent statistics as diffusers states them, overriding what the
    checkpoint says (an LDM autoencoder checkpoint carries none; SD's is 0.18215).
    """
    tensors, diffusers_config, what = read_checkpoint(src)
    layout, theirs, ldm_scale, ema = _their_state(tensors)
    if resolution is None:
        size = (diffusers_config or {}).get("sample_size", 256)
        resolution = int(size[0] if isinstance(size, (list, tuple)) else size)
    config = infer_config(theirs, layout, what, resolution)
    if resolution % config.downsample:
        raise InputError(f"{src}: resolution {resolution} is not a multiple of f = {config.downsample} "
                         f"(pass --resolution)")
    if diffusers_config is not None:
        check_diffusers_config(diffusers_config, config, str(Path(src) / "config.json"))
    model = SDVAE(config)
    state, used = {}, set()
    levels = len(config.enc_ch_mult)
    for key, param in model.state_dict().items():
        names, linear = our_names(key, layout, levels)
        if not all(n in theirs for n in names):
            if re.fullmatch(r"(encoder\.quant_conv|decoder\.post_quant_conv)\.(weight|bias)", key):
                # diffusers' use_quant_conv / use_post_quant_conv False (Flux's VAE): the identity is exact
                state[key] = torch.eye(param.shape[0]).view(param.shape) if key.endswith("weight") \
                    else torch.zeros(param.shape)
                continue
            raise InputError(f"{what}: missing key {next(n for n in names if n not in theirs)} "
                             f"(for a {layout} SD-VAE of f{config.downsample} c{config.latent_channels})")
        parts = [theirs[n].float() for n in names]
        value = torch.cat([p.reshape(p.shape + (1, 1)) if linear else p for p in parts])
        if value.shape != param.shape:
            raise InputError(f"{what}: key {names[0]} has shape {tuple(parts[0].shape)}, which does not fit an SD-VAE "
                             f"of f{config.downsample} c{config.latent_channels} ({key}: {tuple(param.shape)})")
        state[key] = value
        used.update(names)
    leftover = [k for k in theirs if k not in used]
    if leftover:
        raise InputError(f"{what}: cannot place key {leftover[0]} in dgaetok's SD-VAE ({layout} layout"
                         f"{f', and {len(leftover) - 1} more' if len(leftover) > 1 else ''})")
    model.load_state_dict(state)
    stats = _stats_from_diffusers(diffusers_config, config.latent_channels) if diffusers_config else None
    if ldm_scale is not None:
        stats = LatentStats.uniform(config.latent_channels, ldm_scale, 0.0, "checkpoint scale_factor")
    if scaling_factor is not None:
        stats = LatentStats.uniform(config.latent_channels, scaling_factor, shift_factor or 0.0,
                                    "convert --scaling-factor/--shift-factor")
    elif shift_factor is not None:
        raise InputError("--shift-factor needs --scaling-factor")
    model.latent_stats = stats
    return model.eval(), f"{layout} (EMA weights)" if ema else layout


def convert(src: str | Path, dst: str | Path, resolution: int | None = None, scaling_factor: float | None = None,
            shift_factor: float | None = None) -> tuple[SDVAE, str]:
    """`import_checkpoint` and save the result as a dgaetok model file ``dst``; returns (model, layout)."""
    from .models import save_model

    model, layout = import_checkpoint(src, resolution, scaling_factor, shift_factor)
    save_model(model, dst, converted_from=f"{layout}: {Path(src).name}")
    return model, layout


# --- export -----------------------------------------------------------------------------------------------------


def export_state_dict(model: Tokenizer, layout: str) -> dict[str, torch.Tensor]:
    """An `SDVAE`'s weights under ``layout``'s names ("ldm" or "diffusers"), float32 on the CPU."""
    if model.config.arch != "sdvae":
        raise InputError(f"a {model.config.arch} model has a diffusion decoder; only sdvae models export to an "
                         f"SD-VAE layout")
    if layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    out = {}
    for key, value in model.state_dict().items():
        names, linear = our_names(key, layout, len(model.config.enc_ch_mult))
        value = value.detach().float().cpu()
        for name, part in zip(names, value.chunk(len(names))):
            out[name] = (part.flatten(1) if linear else part).contiguous()
    return out


def diffusers_config(model: Tokenizer) -> dict:
    """The config.json of a diffusers ``AutoencoderKL`` with ``model``'s structure and latent statistics as its
    pipelines read them (module docstring; without statistics: scaling_factor 1.0, i.e. none)."""
    c, stats = model.config, model.latent_stats
    levels = len(c.enc_ch_mult)
    config = {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "in_channels": 3, "out_channels": 3,
        "block_out_channels": [c.enc_channels * m for m in c.enc_ch_mult],
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "layers_per_block": c.enc_res_blocks, "latent_channels": c.latent_channels, "norm_num_groups": 32,
        "sample_size": c.resolution, "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True,
        "mid_block_add_attention": True, "scaling_factor": 1.0, "shift_factor": None,
        "latents_mean": None, "latents_std": None,
    }
    if stats is not None:
        scale = stats.scaling_factor
        config |= {"scaling_factor": scale, "shift_factor": stats.shift_factor}
        if len(set(stats.mean)) > 1 or len(set(stats.std)) > 1:  # SDXL's pipelines divide latents_std by the scale
            config |= {"latents_mean": list(stats.mean), "latents_std": [s * scale for s in stats.std]}
    return config


def export_diffusers(model: Tokenizer, folder: str | Path) -> Path:
    """Write ``model`` (an `SDVAE`) as a diffusers ``AutoencoderKL`` folder: config.json and
    diffusion_pytorch_model.safetensors, each written atomically. Returns the folder."""
    tensors = export_state_dict(model, "diffusers")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: output path is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / DIFFUSERS_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    with atomic_path(folder / "config.json") as tmp:
        tmp.write_text(json.dumps(diffusers_config(model), indent=2) + "\n")
    return folder
