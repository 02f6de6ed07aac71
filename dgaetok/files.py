"""Files on disk: atomic writes, reading and preprocessing images, and the latent file format."""
from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import InputError

_UMASK = os.umask(0)
os.umask(_UMASK)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
LATENT_FORMAT = "dgaetok-latent/1"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it is renamed onto ``path``, on failure removed.

    A killed process therefore never leaves a half-written file under the final name, which is what makes
    "skip files that already exist" a safe way to resume.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.p{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")  # the pid: see remove_stale_temps
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # writers like safetensors create 0600 files; give outputs normal modes
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def find_files(root: str | os.PathLike, suffixes: set[str]) -> list[Path]:
    """Files under ``root`` (or ``root`` itself) with one of ``suffixes``, sorted, hidden files skipped."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise InputError(f"{root}: no such file or folder")
    return sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in suffixes and p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


_TEMP_NAME = re.compile(r"^\..+\.p(\d+)-[0-9a-f]{8}\.tmp$")


def remove_stale_temps(root: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of `atomic_path` under ``root`` whose writing process is gone (a run killed
    with SIGKILL or by a power cut cannot clean up after itself); those of live processes are left alone."""
    removed = []
    for path in Path(root).rglob(".*.tmp"):
        match = _TEMP_NAME.match(path.name)
        if match and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def prepare_output_dir(path: str | os.PathLike) -> Path:
    """Create the output folder and prove it is writable before any work is done; clear what killed runs left
    (`remove_stale_temps`)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: output path is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".dgaetok-write-test-{uuid.uuid4().hex[:8]}"
        probe.touch()
        probe.unlink()
        remove_stale_temps(path)
    except OSError as exc:
        raise InputError(f"{path}: output folder is not writable ({exc.strerror or exc})") from None
    return path


def open_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image fully (so truncation shows here, not later) and convert it to RGB."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise InputError(f"{path}: empty file")
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)  # phone photos store rotation in EXIF; encode them upright
            if img.mode.startswith("I;16"):  # 16-bit grey: convert("RGB") would clip it to white, not rescale
                img = Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8))
            return img.convert("RGB")
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image file") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"{path}: corrupt or truncated image ({exc})") from None


@dataclass(frozen=True)
class Crop:
    """Where a model input came from: source size, the resized size, and the crop box in resized pixels."""

    source_size: tuple[int, int]
    resized_size: tuple[int, int]
    box: tuple[int, int, int, int]  # left, top, right, bottom


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return img if new == img.size else img.resize(new, Image.BICUBIC, reducing_gap=None)


def center_crop(img: Image.Image, resolution: int, multiple: int, keep_size: bool = False) -> tuple[Image.Image, Crop]:
    """The evaluation protocol: shorter side to ``resolution`` (up- or downscaling), then a centered square crop.

    With ``keep_size`` the image is used whole, which requires both sides to be multiples of ``multiple``.
    """
    if keep_size:
        w, h = img.size
        if w % multiple or h % multiple:
            raise ValueError(f"size {w}x{h} is not a multiple of {multiple} (drop --keep-size to crop)")
        return img, Crop((w, h), (w, h), (0, 0, w, h))
    resized = resize_shorter_side(img, resolution)
    w, h = resized.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    box = (left, top, left + resolution, top + resolution)
    return resized.crop(box), Crop(img.size, (w, h), box)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float (3, H, W) in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (..., 3, H, W) -> uint8 (..., H, W, 3) with round-to-nearest."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1).cpu()


def save_png(x: torch.Tensor, path: str | os.PathLike) -> None:
    """Save one [-1, 1] image (3, H, W) as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(to_uint8(x).numpy()).save(tmp, format="PNG")


def save_grid(images: torch.Tensor, columns: int, path: str | os.PathLike) -> None:
    """Save [-1, 1] images (N, 3, H, W) as one PNG grid, row-major, separated by white lines."""
    from torchvision.utils import make_grid

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_png(make_grid(images.cpu(), nrow=columns, padding=2, pad_value=1.0), path)


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """A safetensors file whose bytes depend only on ``tensors`` and ``metadata``: keys sorted, tensors in name
    order. safetensors' own writer orders the metadata by a hash seed drawn per process, so one model saved by
    two processes hashes differently; a file joined from shards here and on a GPU machine must not."""
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(len(text).to_bytes(8, "little"))
        fh.write(text)
        for data in blobs:
            fh.write(data)


# --- latent files ---------------------------------------------------------------------------------------------


def write_latent(path: str | os.PathLike, latent: torch.Tensor, meta: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file({"latent": latent.detach().float().cpu().contiguous()}, str(tmp),
                  metadata={"format": LATENT_FORMAT, **meta})


def read_latent(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, str]]:
    """A latent (c, h, w) and its metadata; InputError for a file that is not a finite dgaetok latent."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != LATENT_FORMAT or "latent" not in fh.keys():
                raise InputError(f"{path}: not a dgaetok latent file")
            latent = fh.get_tensor("latent")
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: unreadable latent file ({str(exc).splitlines()[0]})") from None
    if latent.dim() != 3:
        raise InputError(f"{path}: latent has shape {tuple(latent.shape)}, expected (channels, height, width)")
    if not torch.isfinite(latent).all():
        raise InputError(f"{path}: latent contains NaN or infinite values")
    return latent.float(), meta


def crop_meta(crop: Crop) -> dict[str, str]:
    return {"source_size": json.dumps(crop.source_size), "resized_size": json.dumps(crop.resized_size),
            "crop_box": json.dumps(crop.box)}
