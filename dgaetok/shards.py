"""The latent dataset format that `dgaetok encode --shards` writes and `data.LatentDataset` reads.

A dataset is a folder of ``shard-00000.safetensors``, ``shard-00001.safetensors`` ... and ``dataset.json``.
Shard k is made from images ``k * shard_size`` up to ``(k + 1) * shard_size`` of the source (`sources`), less
those that failed, and holds:

* ``latents`` (n, c, h, w): float32, or bfloat16 rounded from float32;
* ``latents_flip`` (n, c, h, w), with ``--flip``: the latents of the horizontally mirrored images;
* ``labels`` (n,) int64: the image's class, -1 for none;
* ``index`` (n,) int64: the image's position in the source's order.

Its metadata (`ShardInfo`) records the settings it was made with, which images it covers, the images that failed,
and the float64 sums of its latents (`stats.Moments`), so that statistics over the whole set come from the shards
alone, added in shard order, and do not depend on how many processes wrote them. ``dataset.json`` (`write_dataset`)
gathers them: the model, the classes, the preprocessing, the shards and their counts, the latent statistics and
the failures. Shards are written whole to a temporary name and renamed, so a shard under its final name is
finished; a killed run leaves none half-written.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError
from .files import atomic_path, display_name, first_line, safetensors_header, write_safetensors

SHARD_FORMAT = "dgaetok-latent-shard/1"
DATASET_FORMAT = "dgaetok-latent-dataset/1"
DATASET_FILE = "dataset.json"
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


@dataclass(frozen=True)
class ShardPlan:
    """``images`` inputs cut into shards of ``shard_size``; process ``rank`` of ``world`` writes shards rank,
    rank + world, ... so every process gets a fair share of a fixed split."""

    images: int
    shard_size: int

    def __len__(self) -> int:
        return -(-self.images // self.shard_size)

    def inputs(self, k: int) -> range:
        return range(k * self.shard_size, min(self.images, (k + 1) * self.shard_size))

    def assigned(self, rank: int, world: int) -> range:
        return range(rank, len(self), world)


@dataclass
class ShardInfo:
    """What a shard's metadata records besides its tensors."""

    settings: dict  # what its latents depend on (model, preprocessing, dtype, flip, shard size)
    inputs: list[int]  # [first, stop) of the source positions it covers
    digest: str  # of those inputs' names (`sources.ImageSource.digest`)
    moments: dict  # `stats.Moments.state` of its float32 latents
    failed: list[dict]  # {"file": name, "error": one-line message} per input that failed

    def metadata(self) -> dict[str, str]:
        return {"format": SHARD_FORMAT, "settings": canonical(self.settings), "inputs": json.dumps(self.inputs),
                "digest": self.digest, "moments": json.dumps(self.moments), "failed": json.dumps(self.failed)}

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> ShardInfo:
        return cls(json.loads(meta["settings"]), json.loads(meta["inputs"]), meta["digest"],
                   json.loads(meta["moments"]), json.loads(meta["failed"]))


def canonical(value) -> str:
    """JSON with sorted keys: the same settings are the same text, whatever built the dict."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def write_shard(path: str | os.PathLike, tensors: dict[str, torch.Tensor], info: ShardInfo) -> None:
    """The shard file, atomically, with bytes that depend only on its contents (`files.write_safetensors`)."""
    write_safetensors(tensors, path, info.metadata())


def read_shard_info(path: str | os.PathLike) -> ShardInfo:
    """A shard's `ShardInfo`, from its header alone; InputError for a file that is not a shard."""
    meta = safetensors_header(path).get("__metadata__") or {}
    if meta.get("format") != SHARD_FORMAT:
        raise InputError(f"{display_name(path)}: not a dgaetok latent shard")
    try:
        return ShardInfo.from_metadata(meta)
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(f"{display_name(path)}: unreadable shard metadata ({first_line(exc)})") from None


def write_dataset(root: str | os.PathLike, info: dict) -> Path:
    """``dataset.json``, atomically; keys sorted, so the same dataset is the same file."""
    path = Path(root) / DATASET_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"format": DATASET_FORMAT, **info}, indent=1, sort_keys=True) + "\n")
    return path


def read_dataset(root: str | os.PathLike) -> dict:
    """``dataset.json`` of a shard folder; InputError when the folder is not one."""
    path = Path(root) / DATASET_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{display_name(root)}: no {DATASET_FILE}; not a folder of `dgaetok encode --shards`, "
                         f"or its encode has not finished") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{display_name(path)}: unreadable ({first_line(exc)})") from None
    if not isinstance(info, dict) or info.get("format") != DATASET_FORMAT:
        raise InputError(f"{display_name(path)}: not a dgaetok latent dataset description")
    return info


def is_dataset(root: str | os.PathLike) -> bool:
    return (Path(root) / DATASET_FILE).is_file()
