"""Files on disk: atomic writes, reading and preprocessing images, and the latent file format."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .errors import InputError, TooLarge

_UMASK = os.umask(0)
os.umask(_UMASK)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
LATENT_FORMAT = "dgaetok-latent/1"
# The pixel budget: the largest image, in pixels, that is decoded by the model, resized to or encoded whole, per
# file (2896x2896). Decoding costs about 2 KB per output pixel with dgae-s on a CPU (dgae-b 8.7 KB in float32, about
# half in bf16 on a GPU): 8.4M pixels is 17 GB for dgae-s, what a 24 GB machine can give one image.
DEFAULT_MAX_PIXELS = 2**23


def printable(text: str) -> str:
    """``text`` with the bytes of a name that is not UTF-8 (which Python keeps as surrogate escapes) written as
    ``\\xNN``, so it can be printed, logged or stored as UTF-8 metadata."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that did not come from a file name
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def display_name(path: str | os.PathLike) -> str:
    """A path as printable text (see `printable`)."""
    return printable(os.fspath(path))


def describe_failure(path: str | os.PathLike, exc: BaseException) -> str:
    """The one-line message for a file that raised ``exc``: an InputError's own message; otherwise the file, the
    exception's type and its first line, so that running out of memory says so and a bug shows as one."""
    if isinstance(exc, InputError):
        return str(exc)
    text = f"{display_name(path)}: {type(exc).__name__}: {first_line(exc)}"
    if is_out_of_memory(exc):
        return f"{text} (out of memory: a smaller --batch-size or --max-pixels keeps to what the machine has)"
    return text


# Messages of allocations that failed, as torch raises them: the CPU allocator, cuBLAS and cuDNN creating handles
# or workspaces, and oneDNN, whose only word when its scratchpad cannot be had under a memory limit is this one.
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                  "could not create a primitive")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed: Python's MemoryError, CUDA's OutOfMemoryError, or a
    RuntimeError of the CPU allocator, cuBLAS, cuDNN or oneDNN."""
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or any(s in str(exc) for s in _OUT_OF_MEMORY)


def first_line(exc: BaseException) -> str:
    """An exception's message cut to one line, or its type when it has none."""
    text = str(exc).strip()
    return printable(text.splitlines()[0]) if text else type(exc).__name__


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it is renamed onto ``path``, on failure removed.

    A killed process therefore never leaves a half-written file under the final name, which is what makes
    "skip files that already exist" a safe way to resume.
    """
    path = Path(path)
    # the pid: see remove_stale_temps; a printable name, so that writers which need UTF-8 paths accept it
    tmp = path.with_name(f".{printable(path.name)}.p{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # writers like safetensors create 0600 files; give outputs normal modes
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def walk_files(root: str | os.PathLike, suffixes: set[str], errors: list[str] | None = None) -> list[str]:
    """`find_files` as strings, each ``root`` joined with the file's path below it; for callers that handle
    millions of files (a `Path` costs microseconds to build).

    One ``scandir`` per folder and no ``stat`` per file (the entry's type comes from the directory listing).
    Folders are walked in name order, which lists the files sorted by path.
    """
    root = os.fspath(root)
    if os.path.isfile(root):
        return [root]
    if not os.path.isdir(root):
        raise InputError(f"{display_name(root)}: no such file or folder")
    suffixes = {s.lower() for s in suffixes}
    found: list[str] = []
    seen: set[tuple[int, int]] = set()

    def listing(folder: str) -> Iterator[os.DirEntry]:
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:  # a link loop, or a second link to a folder already listed
                return iter(())
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = [e for e in it if not e.name.startswith(".")]
        except OSError as exc:
            if errors is not None:
                errors.append(f"{display_name(folder)}: cannot read the folder ({exc.strerror or exc})")
            return iter(())
        return iter(sorted(entries, key=lambda e: e.name))

    stack = [listing(root)]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
        elif _is_dir(entry):  # follows a symbolic link to a folder
            stack.append(listing(entry.path))
        elif os.path.splitext(entry.name)[1].lower() in suffixes and (entry.is_file() or entry.is_symlink()):
            found.append(entry.path)  # a broken link is listed, so that it fails with a message, not silently
    return found


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def find_files(root: str | os.PathLike, suffixes: set[str], errors: list[str] | None = None) -> list[Path]:
    """Files under ``root`` (or ``root`` itself) with one of ``suffixes``, sorted by path.

    Names starting with "." (hidden files and folders, temporary files) are skipped below ``root``. Symbolic
    links to folders are followed; a folder reached twice (a link loop, or two links to one folder) is listed
    once, where it is first met. A folder that cannot be read is skipped and, when ``errors`` is given, reported
    there as a one-line message. Names that are not UTF-8 are kept as they are (see `display_name`).
    """
    return [Path(p) for p in walk_files(root, suffixes, errors)]


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


def check_pixels(path: str | os.PathLike, size: tuple[int, int], max_pixels: int | None, what: str) -> None:
    """Raise `TooLarge` when an image of ``size`` (w, h) is over ``max_pixels`` (None: no limit); ``what`` says
    what the size is ("the image is", "its latent decodes to"...), for the message."""
    pixels = size[0] * size[1]
    if max_pixels is not None and pixels > max_pixels:
        raise TooLarge(f"{display_name(path)}: {what} {size[0]}x{size[1]} ({mega(pixels)} pixels), over the "
                       f"pixel budget of {mega(max_pixels)} per image; raise it with --max-pixels", pixels, max_pixels)


def mega(n: int) -> str:
    return f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def open_image(path: str | os.PathLike, max_pixels: int | None = None, shorter_side: int | None = None,
               data: bytes | None = None) -> Image.Image:
    """Decode an image fully (so truncation shows here, not later), upright (EXIF rotation) and in RGB.

    ``data``: the file's bytes, read elsewhere (a member of an archive); ``path`` then only names it in messages.

    The pixel budget is checked from the header, before anything is decoded: ``max_pixels`` bounds the image
    itself, or with ``shorter_side`` the size it takes once `resize_shorter_side` brings its shorter side there
    (a 1x20000 strip would become 256x5120000). PIL's own decompression-bomb limit (179M pixels) applies on top.
    Float images (TIFF mode F) are read as 0-1 or 0-255, 16-bit and 32-bit grey is scaled to 8 bits; other
    ranges are refused rather than clipped to black or white.
    """
    name = display_name(path)
    try:
        if (len(data) if data is not None else os.stat(path).st_size) == 0:
            raise InputError(f"{name}: empty file")
        with Image.open(path if data is None else io.BytesIO(data)) as img:
            if shorter_side is None:
                check_pixels(path, img.size, max_pixels, "the image is")
            else:
                w, h = img.size
                check_pixels(path, resized_size(img.size, shorter_side), max_pixels,
                             f"the {w}x{h} image resized to {shorter_side} px on its shorter side is")
            img.load()
            img = ImageOps.exif_transpose(img)  # phone photos store rotation in EXIF; encode them upright
            return _to_rgb(img, name)
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise InputError(f"{name}: refused as a possible decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise InputError(f"{name}: not an image file, or a format Pillow cannot decode") from None
    except OSError as exc:
        if exc.errno is not None:  # the file system's error (permission denied, a folder, I/O error), not PIL's
            raise InputError(f"{name}: cannot read ({exc.strerror or exc})") from None
        raise InputError(f"{name}: corrupt or truncated image ({exc})") from None
    except (SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"{name}: corrupt or truncated image ({exc})") from None


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    """RGB with 8 bits per channel; convert("RGB") alone clips wider modes, which turns 0-1 floats black."""
    if img.mode == "F" or img.mode.startswith("I"):
        arr = np.asarray(img)
        if img.mode == "F":
            if not np.isfinite(arr).all():
                raise InputError(f"{name}: float image with NaN or infinite values")
            lo, hi = float(arr.min()), float(arr.max())
            if lo < 0 or hi > 255:
                raise InputError(f"{name}: float image with values in [{lo:.4g}, {hi:.4g}]; expected 0-1 or 0-255")
            arr = arr * 255.0 if hi <= 1 else arr
            arr = np.round(arr)
        else:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi > 65535:
                raise InputError(f"{name}: integer image with values in [{lo}, {hi}]; expected 8 or 16 bits")
            arr = arr.astype(np.uint32) >> (8 if hi > 255 or img.mode.startswith("I;16") else 0)
        img = Image.fromarray(arr.astype(np.uint8))
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise InputError(f"{name}: colour mode {img.mode} cannot be converted to RGB ({exc})") from None


@dataclass(frozen=True)
class Crop:
    """Where a model input came from: source size, the resized size, the crop box in resized pixels, and the
    padding (left, top, right, bottom) added around that box to reach a size the model takes."""

    source_size: tuple[int, int]
    resized_size: tuple[int, int]
    box: tuple[int, int, int, int]  # left, top, right, bottom
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)


def resized_size(size: tuple[int, int], shorter_side: int) -> tuple[int, int]:
    """(w, h) after scaling ``size`` so that its shorter side is ``shorter_side``."""
    w, h = size
    scale = shorter_side / min(w, h)
    return max(shorter_side, round(w * scale)), max(shorter_side, round(h * scale))


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    new = resized_size(img.size, size)
    return img if new == img.size else img.resize(new, Image.BICUBIC, reducing_gap=None)


def center_crop(img: Image.Image, resolution: int, multiple: int, keep_size: bool = False) -> tuple[Image.Image, Crop]:
    """The evaluation protocol: shorter side to ``resolution`` (up- or downscaling), then a centered square crop.

    With ``keep_size`` the image is used whole, padded to multiples of ``multiple`` (`pad_to_multiple`).
    """
    if keep_size:
        return pad_to_multiple(img, multiple)
    resized = resize_shorter_side(img, resolution)
    w, h = resized.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    box = (left, top, left + resolution, top + resolution)
    return resized.crop(box), Crop(img.size, (w, h), box)


def pad_to_multiple(img: Image.Image, multiple: int) -> tuple[Image.Image, Crop]:
    """Extend the right and bottom edges to the next multiples of ``multiple`` by mirroring the image there.

    Mirroring continues the picture's texture and colour, so the encoder sees no artificial edge and nothing
    bleeds into the real pixels, which a decode crops back out (`Crop.padding`). It is numpy's "reflect", which
    reflects again where the padding is longer than the side, so every size works: a 1-pixel side repeats its
    pixel, a 7x3000 image becomes 8x3000.
    """
    w, h = img.size
    right, bottom = -w % multiple, -h % multiple
    crop = Crop((w, h), (w, h), (0, 0, w, h), (0, 0, right, bottom))
    if not (right or bottom):
        return img, crop
    arr = np.pad(np.asarray(img), ((0, bottom), (0, right), (0, 0)), mode="reflect")
    return Image.fromarray(arr), crop


def unpad(x: torch.Tensor, padding: tuple[int, int, int, int]) -> torch.Tensor:
    """The picture inside an image (..., H, W) that was padded by ``padding`` (left, top, right, bottom)."""
    left, top, right, bottom = padding
    return x[..., top:x.shape[-2] - bottom, left:x.shape[-1] - right]


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float (3, H, W) in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div(127.5).sub(1.0)


def eval_crop(path: str | os.PathLike, resolution: int) -> torch.Tensor:
    """The evaluation protocol's model input from an image file: shorter side to ``resolution``, center crop,
    [-1, 1] (3, res, res); InputError for an unreadable file or one over the default pixel budget."""
    return to_tensor(center_crop(open_image(path, DEFAULT_MAX_PIXELS, resolution), resolution, 1)[0])


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (..., 3, H, W) -> uint8 (..., H, W, 3) with round-to-nearest."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1).cpu()


def save_png(x: torch.Tensor, path: str | os.PathLike) -> None:
    """Save one [-1, 1] image (3, H, W) as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(to_uint8(x).numpy()).save(tmp, format="PNG")


def save_grid(images: torch.Tensor, columns: int, path: str | os.PathLike, labels: list[str] | None = None) -> None:
    """Save [-1, 1] images (N, 3, H, W) as one PNG grid, row-major, separated by white lines; ``labels`` are
    written over the columns, on a white strip."""
    from torchvision.utils import make_grid

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images.cpu(), nrow=columns, padding=2, pad_value=1.0)
    if labels:
        grid = labelled_columns(grid, labels, images.shape[-1] + 2)
    save_png(grid, path)


def labelled_columns(grid: torch.Tensor, labels: list[str], pitch: int) -> torch.Tensor:
    """``grid`` (3, H, W in [-1, 1]) under a white strip with ``labels[i]`` centred over the column at i * pitch."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    strip = Image.new("RGB", (grid.shape[-1], 16), "white")
    draw = ImageDraw.Draw(strip)
    for i, label in enumerate(labels):
        width = draw.textlength(label, font=font)
        draw.text((i * pitch + max(0.0, (pitch - width) / 2), 2), label, fill="black", font=font)
    top = torch.from_numpy(np.array(strip)).permute(2, 0, 1).float() / 127.5 - 1  # a copy: PIL's buffer is read-only
    return torch.cat([top, grid], dim=1)


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


def write_file(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes through Python's own file layer, which takes any file name (safetensors' writer needs UTF-8)."""
    with open(path, "wb") as fh:
        fh.write(data)


def write_latent(path: str | os.PathLike, latent: torch.Tensor, meta: dict[str, str]) -> None:
    data = save_safetensors({"latent": latent.detach().float().cpu().contiguous()},
                            metadata={"format": LATENT_FORMAT, **meta})
    with atomic_path(path) as tmp:
        write_file(tmp, data)


_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def _read_header(fh) -> tuple[bytes, dict]:
    """The raw bytes up to the end of a safetensors file's JSON header, and the header parsed."""
    prefix = fh.read(8)
    size = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
    if not 2 <= size <= _MAX_HEADER:
        raise ValueError("no safetensors header")
    raw = fh.read(size)
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("no safetensors header")
    return prefix + raw, header


def safetensors_header(path: str | os.PathLike) -> dict:
    """A safetensors file's header: tensor names -> dtype, shape, offsets, and ``__metadata__``, read without
    loading any tensor. InputError for a file that is not safetensors."""
    try:
        with open(path, "rb") as fh:
            return _read_header(fh)[1]
    except OSError as exc:
        raise InputError(f"{display_name(path)}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:  # json's errors are ValueErrors too
        raise InputError(f"{display_name(path)}: not a safetensors file ({first_line(exc)})") from None


def read_latent(path: str | os.PathLike, check: Callable[[tuple[int, ...], dict[str, str]], None] | None = None
                ) -> tuple[torch.Tensor, dict[str, str]]:
    """A latent (c, h, w) and its metadata; InputError for a file that is not a finite dgaetok latent.

    ``check(shape, metadata)`` runs once the header is read, before the tensor is: it can refuse a latent (by
    raising InputError) without its data ever being loaded.
    """
    name = display_name(path)
    try:
        with open(path, "rb") as fh:
            head, header = _read_header(fh)
            meta = header.get("__metadata__")
            if not isinstance(meta, dict) or meta.get("format") != LATENT_FORMAT or "latent" not in header:
                raise InputError(f"{name}: not a dgaetok latent file")
            shape = tuple(int(n) for n in header["latent"]["shape"])
            if len(shape) != 3:
                raise InputError(f"{name}: latent has shape {shape}, expected (channels, height, width)")
            if check is not None:
                check(shape, meta)
            latent = load_safetensors(head + fh.read())["latent"]
    except (InputError, MemoryError):
        raise
    except OSError as exc:
        raise InputError(f"{name}: unreadable latent file ({exc.strerror or exc})") from None
    except Exception as exc:  # a broken header or data: json, safetensors and int() raise several types
        raise InputError(f"{name}: unreadable latent file ({first_line(exc)})") from None
    if not torch.isfinite(latent).all():
        raise InputError(f"{name}: latent contains NaN or infinite values")
    return latent.float(), meta


def crop_meta(crop: Crop) -> dict[str, str]:
    return {"source_size": json.dumps(crop.source_size), "resized_size": json.dumps(crop.resized_size),
            "crop_box": json.dumps(crop.box), "padding": json.dumps(crop.padding)}


def padding_of(meta: dict[str, str], size: tuple[int, int], path: str | os.PathLike = "") -> tuple[int, ...]:
    """A latent's recorded padding (left, top, right, bottom) of its (height, width) image; none for latents
    written before padding was recorded. InputError if it does not fit the image."""
    try:
        padding = tuple(int(v) for v in json.loads(meta.get("padding", "[0, 0, 0, 0]")))
    except (ValueError, TypeError):
        padding = ()
    if (len(padding) != 4 or min(padding) < 0
            or padding[0] + padding[2] >= size[1] or padding[1] + padding[3] >= size[0]):
        raise InputError(f"{display_name(path)}: latent metadata has a padding {meta.get('padding')!r} that does "
                         f"not fit its {size[1]}x{size[0]} image")
    return padding
