"""Where `encode --shards` takes its images from: a folder tree, or a folder of WebDataset ``.tar`` archives.

Both number their images in a fixed order (the position recorded as a shard's ``index``) and give each a label:

* `FolderSource`: the image files under SRC sorted by path, as `files.walk_files` lists them; an image's label is
  its first-level folder's position among SRC's first-level folders, sorted (torchvision's ImageFolder), or -1
  for an image directly in SRC.
* `TarSource`: the archives under SRC sorted by path, and in each the samples in archive order. A sample is the
  members sharing a key (WebDataset's: the member name up to the first dot of its base name): ``key.jpg``,
  ``key.jpeg``, ``key.png`` or ``key.webp`` holds the image, ``key.cls`` the label as decimal text (-1 without).

Archives (uncompressed, as WebDataset writes them) are read with the standard library's `tarfile`, never
unpacked: listing one reads its headers in a single pass, seeking over the data, and an image is read as its
member's bytes at their offset. A member
that cannot be used (a path leaving the archive, a link, an unreadable label, bytes cut off by a truncated
archive, an image over the pixel budget) fails alone when its image is loaded, with a one-line message; an
archive whose listing breaks keeps the samples listed before the break and reports the break once.
"""
from __future__ import annotations

import hashlib
import os
import re
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from .data import PathTable
from .errors import InputError
from .files import IMAGE_SUFFIXES, display_name, first_line, mega, open_image, walk_files

TAR_IMAGE_SUFFIXES = {"jpg", "jpeg", "png", "webp"}
# An image member is read into memory whole before it is decoded: a member larger than this fails instead (the
# pixel budget's largest image, 8.4M pixels, takes 25 MB uncompressed).
MAX_MEMBER_BYTES = 256 * 2**20
_MAX_CLS_BYTES = 64
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset's base_plus_ext: key, then everything after the dot


class ImageSource:
    """Images numbered 0 .. len - 1, each with a printable ``name(i)`` and a ``label(i)``; ``classes`` names the
    labels (empty when they are bare numbers or absent), ``errors`` are (input, one-line message) for inputs that
    could not even be listed."""

    root: Path
    classes: list[str]
    errors: list[tuple[str, str]]

    def __len__(self) -> int:
        raise NotImplementedError

    def name(self, i: int) -> str:
        raise NotImplementedError

    def label(self, i: int) -> int:
        raise NotImplementedError

    def open(self, i: int, max_pixels: int | None, shorter_side: int | None) -> Image.Image:
        """Image ``i`` decoded as `files.open_image` decodes a file; InputError when it cannot be."""
        raise NotImplementedError

    def digest(self, indices: range) -> str:
        """A fingerprint of the names of images ``indices``: a shard made from other images is not kept."""
        h = hashlib.sha256()
        for i in indices:
            h.update(self.name(i).encode() + b"\n")
        return h.hexdigest()[:32]


class FolderSource(ImageSource):
    def __init__(self, root: str | Path, files: list[str]):
        self.root, self.errors = Path(root), []
        self.files = PathTable(files)
        prefix = os.path.join(os.fspath(root), "")  # walk_files joins below the root exactly so
        below = [f[len(prefix):] for f in files] if os.path.isdir(root) else [""] * len(files)
        tops = [rel.split(os.sep, 1)[0] if os.sep in rel else None for rel in below]
        classes = sorted({t for t in tops if t is not None})
        position = {c: k for k, c in enumerate(classes)}
        self.labels = np.array([-1 if t is None else position[t] for t in tops], dtype=np.int64)
        self.classes = [display_name(c) for c in classes]

    def __len__(self) -> int:
        return len(self.files)

    def name(self, i: int) -> str:
        return display_name(self.files[i])

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def open(self, i: int, max_pixels: int | None, shorter_side: int | None) -> Image.Image:
        return open_image(self.files[i], max_pixels, shorter_side)


class TarSource(ImageSource):
    """The samples of ``archives``, at most ``limit`` (archives after the limit are not even listed)."""

    def __init__(self, root: str | Path, archives: list[str], limit: int | None = None):
        self.root, self.classes, self.errors = Path(root), [], []
        self.archives = archives
        names, archive, offset, size, labels, self.problems = [], [], [], [], [], {}
        for a, path in enumerate(archives):
            if limit is not None and len(names) >= limit:
                break
            for name, off, n, label, problem in self._list(path)[:None if limit is None else limit - len(names)]:
                if problem:
                    self.problems[len(names)] = problem
                names.append(name)
                archive.append(a)
                offset.append(off)
                size.append(n)
                labels.append(label)
        self.names = PathTable(names)
        self.archive = np.array(archive, dtype=np.int32)
        self.offset, self.size = np.array(offset, dtype=np.int64), np.array(size, dtype=np.int64)
        self.labels = np.array(labels, dtype=np.int64)

    def _list(self, path: str) -> list[tuple[str, int, int, int, str]]:
        """(name, data offset, size, label, problem) of each sample of the archive, in archive order."""
        samples: dict[str, dict] = {}
        where, last = display_name(path), None
        try:
            with tarfile.open(path, "r:") as tf:  # uncompressed: images are read at their offsets in the file
                for member in tf:
                    last = member
                    match = _KEY.match(member.name)
                    if match is None:
                        continue
                    key, ext = match.group(1), match.group(2).lower()
                    if ext not in TAR_IMAGE_SUFFIXES and ext != "cls":
                        continue
                    sample = samples.setdefault(key, {})
                    if ext == "cls":
                        sample["cls"] = _read_label(tf, member, where)
                    elif "image" not in sample:
                        sample["image"] = member
        except (tarfile.TarError, OSError, EOFError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
            if last is None and isinstance(exc, tarfile.ReadError):  # tarfile says "could not be opened successfully"
                why = "not an uncompressed tar archive"
            cut_image = last is not None and last.isreg() and os.path.getsize(path) < last.offset_data + last.size \
                and any(sample.get("image") is last for sample in samples.values())
            if not cut_image:
                listed = f"after {len(samples)} samples" if samples else "before any sample"
                self.errors.append((where, f"{where}: unreadable archive, stopped {listed} ({why})"))
            # else the archive ends inside its last image, and that image fails alone when it is read
        out = []
        for key, sample in samples.items():
            member = sample.get("image")
            if member is None:
                continue
            label, problem = sample.get("cls", (-1, ""))
            name = f"{where}:{display_name(member.name)}"
            problem = _member_problem(member, name) or (problem and f"{name}: {problem}")
            out.append((name, member.offset_data, member.size, label, problem))
        return out

    def __len__(self) -> int:
        return len(self.names)

    def name(self, i: int) -> str:
        return os.fspath(self.names[i])

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def open(self, i: int, max_pixels: int | None, shorter_side: int | None) -> Image.Image:
        name = self.name(i)
        if i in self.problems:
            raise InputError(self.problems[i])
        size = int(self.size[i])
        with open(self.archives[self.archive[i]], "rb") as fh:
            fh.seek(int(self.offset[i]))
            data = fh.read(size)
        if len(data) < size:
            raise InputError(f"{name}: truncated archive ({len(data)} of the member's {size} bytes)")
        return open_image(name, max_pixels, shorter_side, data=data)


def _member_problem(member: tarfile.TarInfo, name: str) -> str:
    """Why an image member cannot be used, or ""."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        return f"{name}: member path leaves the archive"
    if not member.isreg():
        return f"{name}: not a regular file in the archive (a link or a device)"
    if member.size > MAX_MEMBER_BYTES:
        return f"{name}: member of {mega(member.size)} bytes, over the {mega(MAX_MEMBER_BYTES)} an image may take"
    return ""


def _read_label(tf: tarfile.TarFile, member: tarfile.TarInfo, where: str) -> tuple[int, str]:
    """(label, problem) of a ``.cls`` member: decimal text; a problem fails the sample's image, not the archive."""
    if not member.isreg() or member.size > _MAX_CLS_BYTES:
        return -1, f"unreadable label {display_name(member.name)} (not a short regular file)"
    try:
        text = tf.extractfile(member).read()
        label = int(text.decode("ascii").strip())
    except (ValueError, UnicodeDecodeError):
        return -1, f"unreadable label {display_name(member.name)} (not a decimal number)"
    except (tarfile.TarError, OSError, EOFError) as exc:
        return -1, f"unreadable label {display_name(member.name)} ({first_line(exc)})"
    if label < 0:
        return -1, f"label {label} in {display_name(member.name)} is negative"
    return label, ""


def open_source(src: str | Path, limit: int | None = None) -> ImageSource:
    """The images of ``src``: a folder of ``.tar`` archives (or one archive) is a `TarSource`, anything else a
    `FolderSource`; only the first ``limit`` images. InputError when there is nothing to encode."""
    src = Path(src)
    unreadable: list[str] = []
    found = walk_files(src, IMAGE_SUFFIXES | {".tar"}, unreadable)
    archives = [f for f in found if f.lower().endswith(".tar")]
    images = [f for f in found if not f.lower().endswith(".tar")]
    if archives and images:
        raise InputError(f"{display_name(src)}: holds both .tar archives and image files "
                         f"({display_name(archives[0])}, {display_name(images[0])}); give a folder of one kind")
    if archives:
        source: ImageSource = TarSource(src, archives, limit)
    else:
        source = FolderSource(src, images[:limit])
    source.errors = [(display_name(src), message) for message in unreadable] + source.errors
    if not len(source) and not source.errors:
        raise InputError(f"{display_name(src)}: no {' / '.join(sorted(IMAGE_SUFFIXES | {'.tar'}))} files found")
    return source
