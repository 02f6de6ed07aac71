"""The hostile corpus: inputs a new user throws at `encode` and `decode`, run as the real command in a process
with a memory limit (resource.setrlimit). Every input either goes through or fails alone with one line; the good
files beside it are written; no traceback reaches the terminal, and the process itself never dies.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dgaetok.files import LATENT_FORMAT, display_name, read_latent, write_latent
from dgaetok.models import file_sha256

from conftest import save_tiny_model, without_progress

REPO = Path(__file__).resolve().parents[1]
HEADROOM = 2_500_000_000  # bytes of address space the command gets beyond what importing torch took
SUMMARY = ("encode: ", "decode: ")

# Sets the memory limit once torch is imported (its libraries reserve gigabytes of address space they never
# touch), then runs the command exactly as the console script does. torch imports its flop counter at the first
# operation; under a tight limit that import fails and warns, so it is imported before the limit too.
RUNNER = textwrap.dedent("""
    import resource, sys
    import torch, torch.utils.flop_counter, dgaetok.cli
    vm = int(open("/proc/self/status").read().split("VmPeak:")[1].split()[0]) * 1024
    limit = vm + int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.argv = ["dgaetok", *sys.argv[2:]]
    dgaetok.cli.main()
""")


def run_limited(*args, headroom: int = HEADROOM) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2", "COLUMNS": "200"}
    # stderr must be UTF-8: a name that is not is printed with its bytes escaped
    return subprocess.run([sys.executable, "-c", RUNNER, str(headroom), *map(str, args)], capture_output=True,
                          env=env, encoding="utf-8", errors="strict", timeout=600)


def failures(proc: subprocess.CompletedProcess, notes: tuple[str, ...] = ()) -> dict[str, str]:
    """file -> message of each `failed: FILE: message` line; every stderr line must be one of those, the summary
    or one of ``notes`` (besides the precision note every command that loads a model starts with), so a traceback,
    a warning or a second line for one file fails the test."""
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = without_progress([line for line in proc.stderr.splitlines() if line.strip() and line not in notes
                              and not line.startswith("note: precision ")])
    assert lines and lines[-1].startswith(SUMMARY), proc.stderr
    out = {}
    for line in lines[:-1]:
        assert line.startswith("failed: "), proc.stderr
        path, message = line[len("failed: "):].split(": ", 1)
        assert path not in out, f"two lines for {path}"
        out[path] = message
    return out


def png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels of 8-bit grey in a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


def photo(shared_data: Path, i: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    path = sorted((shared_data / "eval" / "imagenet-val500").glob("*.JPEG"))[i]
    return Image.open(path).convert("RGB").resize(size, Image.BICUBIC)


def image_corpus(root: Path, outside: Path, shared_data: Path) -> tuple[list[str], dict[str, str]]:
    """(names that must encode, name -> fragment of its error) for a folder of hostile images."""
    root.mkdir(parents=True)
    good, bad = [], {}

    def add(name: str, save, error: str | None = None) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save(path) if callable(save) else path.write_bytes(save)
        if error is None:
            good.append(name)
        else:
            bad[name] = error

    def array(values: np.ndarray):
        return lambda p: Image.fromarray(values).save(p)

    real = (sorted((shared_data / "eval" / "imagenet-val500").glob("*.JPEG"))[0]).read_bytes()
    rotated = Image.Exif()
    rotated[0x0112] = 6  # EXIF orientation: shown rotated by 90 degrees
    add("good.jpg", lambda p: photo(shared_data, 1).save(p))
    add(os.fsdecode(b"bad\xff name.jpg"), lambda p: photo(shared_data, 2).save(p, format="JPEG"))  # not UTF-8
    add(os.fsdecode(b"folder\xe9/inside.png"), lambda p: photo(shared_data, 3).save(p, format="PNG"))
    add("float01.tif", array(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)))
    add("grey16.png", array(np.arange(4096, dtype=np.uint16).reshape(64, 64) * 16))
    add("int32.tif", array(np.arange(4096, dtype=np.int32).reshape(64, 64) * 8))
    add("cmyk.jpg", lambda p: photo(shared_data, 4).convert("CMYK").save(p))
    add("palette.png", lambda p: photo(shared_data, 5).convert("P").save(p, transparency=3))
    add("rgba.webp", lambda p: photo(shared_data, 6).convert("RGBA").save(p))
    add("one-pixel.bmp", lambda p: Image.new("RGB", (1, 1), (200, 30, 30)).save(p))
    add("jpeg-named.png", lambda p: photo(shared_data, 7).save(p, format="JPEG"))  # the content decides
    add("rotated.jpg", lambda p: photo(shared_data, 8).save(p, exif=rotated))
    add("panorama.png", lambda p: photo(shared_data, 10, (2000, 40)).save(p))  # 6400x128 once resized: in budget
    # a symbolic link to a folder outside SRC is followed; a second link to it, or a link back up (a loop), is
    # not walked again
    outside.mkdir(parents=True)
    photo(shared_data, 9).save(outside / "linked.png")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    good.append("linked/linked.png")
    (root / "linked-again").symlink_to(outside, target_is_directory=True)
    (root / "sub").mkdir()
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    (root / ".hidden.jpg").write_bytes(b"hidden files are not inputs")

    add("thin.png", lambda p: Image.new("L", (1, 20000)).save(p), "over the pixel budget")  # 64 x 1.28M resized
    add("bomb.png", png_header(20000, 20000), "decompression bomb")
    add("cut-in-data.png", png_header(64, 64)[:50], "corrupt or truncated image")
    add("cut-in-header.png", png_header(64, 64)[:30], "not an image file")
    add("float-range.tif", array(np.full((32, 32), 1000.0, np.float32)), "expected 0-1 or 0-255")
    add("float-nan.tif", array(np.full((32, 32), np.nan, np.float32)), "NaN")
    add("int-range.tif", array(np.full((32, 32), 1 << 20, np.int32)), "expected 8 or 16 bits")
    add("corrupt.jpg", np.random.default_rng(0).bytes(3000), "not an image file")
    add("truncated.jpg", real[: len(real) // 2], "corrupt or truncated image")
    add("empty.png", b"", "empty file")
    add("text.png", b"just text\n", "not an image file")
    add("dangling.jpg", lambda p: p.symlink_to(root / "nowhere.jpg"), "cannot read (No such file or directory)")
    return good, bad


def latent_corpus(root: Path, model: Path, other_model: Path) -> tuple[list[str], dict[str, str]]:
    """(names that must decode, name -> fragment of its error) for a folder of hostile latents."""
    root.mkdir(parents=True)
    made_by = {"model_hash": file_sha256(model)}
    good, bad = [], {}
    rng = torch.Generator().manual_seed(0)

    def ok(name: str, latent: torch.Tensor) -> None:
        write_latent(root / name, latent, made_by)
        good.append(name)

    def fails(name: str, latent: torch.Tensor | None, fragment: str, meta=None, raw: bytes | None = None) -> None:
        if raw is not None:
            (root / name).write_bytes(raw)
        elif meta is None:
            write_latent(root / name, latent, made_by)
        else:
            save_file({"latent": latent}, str(root / name), metadata=meta)
        bad[name] = fragment

    ok("good.safetensors", torch.randn(4, 8, 8, generator=rng) * 0.5)
    ok(os.fsdecode(b"bad\xff name.safetensors"), torch.randn(4, 8, 8, generator=rng) * 0.5)
    ok("wide.safetensors", torch.randn(4, 6, 10, generator=rng) * 0.5)  # a --keep-size latent
    ok("tiny.safetensors", torch.randn(4, 1, 1, generator=rng) * 0.5)  # an 8x8 image
    save_file({"latent": (torch.randn(4, 8, 8, generator=rng) * 0.5).half()}, str(root / "half.safetensors"),
              metadata={"format": LATENT_FORMAT, **made_by})
    good.append("half.safetensors")

    fails("empty-size.safetensors", torch.zeros(4, 0, 0), "an empty image")
    # 36 MB, a 12000x12000 image: over 16 times the default pixel budget, the most decode takes even in tiles
    fails("large.safetensors", torch.zeros(4, 1500, 1500), "the most it decodes even in tiles")
    fails("scaled.safetensors", torch.full((4, 8, 8), 1e30), "far outside")
    nan = torch.zeros(4, 8, 8)
    nan[0, 0, 0] = float("nan")
    fails("nan.safetensors", nan, "NaN")
    fails("channels.safetensors", torch.zeros(3, 8, 8), "3 channels")
    fails("flat.safetensors", torch.zeros(8, 8), "expected (channels, height, width)",
          meta={"format": LATENT_FORMAT})
    fails("foreign.safetensors", torch.zeros(4, 8, 8), "not a dgaetok latent file", meta={"format": "other"})
    fails("other-model.safetensors", torch.zeros(4, 8, 8), "not by the loaded model",
          meta={"format": LATENT_FORMAT, "model_hash": file_sha256(other_model)})
    fails("model.safetensors", None, "not a dgaetok latent file", raw=model.read_bytes())
    fails("garbage.safetensors", None, "unreadable latent file", raw=np.random.default_rng(1).bytes(500))
    fails("empty.safetensors", None, "unreadable latent file", raw=b"")
    huge_header = (10**15).to_bytes(8, "little") + b"{}"
    fails("huge-header.safetensors", None, "unreadable latent file", raw=huge_header)
    write_latent(root / "cut.safetensors", torch.zeros(4, 8, 8), made_by)
    fails("cut.safetensors", None, "unreadable latent file", raw=(root / "cut.safetensors").read_bytes()[:-100])
    return good, bad


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("hostile-models")
    return save_tiny_model(folder, seed=0), save_tiny_model(folder, seed=1)


def assert_failures_match(got: dict[str, str], root: Path, bad: dict[str, str]) -> None:
    expected = {display_name(root / name): fragment for name, fragment in bad.items()}
    assert got.keys() == expected.keys()
    for path, fragment in expected.items():
        assert fragment in got[path], (path, got[path])


def test_hostile_images_fail_alone_under_a_memory_limit(tmp_path, shared_data, models):
    src, out = tmp_path / "src", tmp_path / "out"
    good, bad = image_corpus(src, tmp_path / "outside", shared_data)
    assert len(good) + len(bad) >= 25
    proc = run_limited("encode", src, "-o", out, "--model", models[0], "--device", "cpu", "--batch-size", 4)
    assert proc.returncode == 1, proc.stderr
    assert_failures_match(failures(proc), src, bad)
    assert proc.stderr.splitlines()[-1] == f"encode: {len(good)} written, 0 already there (skipped), {len(bad)} failed"
    for name in good:
        latent, meta = read_latent(out / Path(name).with_suffix(".safetensors"))
        assert latent.shape == (4, 8, 8) and json.loads(meta["source_size"])
    # the non-UTF-8 name is stored printable, and the float image was scaled, not clipped to black
    assert read_latent(out / os.fsdecode(b"bad\xff name.safetensors"))[1]["source"] == "bad\\xff name.jpg"
    assert not (out / "linked-again").exists() and not (out / "sub").exists()


def test_hostile_latents_fail_alone_under_a_memory_limit(tmp_path, models):
    model, other = models
    src, out = tmp_path / "src", tmp_path / "out"
    good, bad = latent_corpus(src, model, other)
    assert len(good) + len(bad) >= 15
    proc = run_limited("decode", src, "-o", out, "--model", model, "--device", "cpu", "--steps", 2)
    assert proc.returncode == 1, proc.stderr
    assert_failures_match(failures(proc), src, bad)
    assert proc.stderr.splitlines()[-1] == f"decode: {len(good)} written, 0 already there (skipped), {len(bad)} failed"
    sizes = {}
    for name in good:
        with Image.open(out / Path(name).with_suffix(".png")) as img:
            sizes[name] = img.size
            assert np.asarray(img).std() > 0  # an image, not a black frame
    assert sizes["wide.safetensors"] == (80, 48) and sizes["tiny.safetensors"] == (8, 8)


def test_over_a_raised_budget_the_memory_limit_fails_the_file_not_the_run(tmp_path, shared_data, models):
    """With --max-pixels raised past what the machine has, the allocation itself fails: that file fails with
    an out-of-memory line, and the files beside it are still made."""
    images, latents = tmp_path / "images", tmp_path / "latents"
    images.mkdir()
    photo(shared_data, 0).save(images / "a-good.png")
    Image.new("L", (1, 200_000)).save(images / "thin.png")  # 64 x 12.8M pixels, 3.3 GB, once resized
    proc = run_limited("encode", images, "-o", tmp_path / "z", "--model", models[0], "--device", "cpu",
                       "--max-pixels", 10**10)
    got = failures(proc)
    assert proc.returncode == 1 and list(got) == [str(images / "thin.png")]
    assert "out of memory" in got[str(images / "thin.png")] and (tmp_path / "z" / "a-good.safetensors").is_file()

    # decode, in 400 MB: a 512x512 image runs out of memory whole and is decoded in tiles instead, with a note;
    # an 8192x8192 one does not fit even in tiles (its noise alone is 805 MB) and fails alone
    latents.mkdir()
    write_latent(latents / "a-good.safetensors", torch.zeros(4, 8, 8), {})
    write_latent(latents / "big.safetensors", torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(0)), {})
    write_latent(latents / "huge.safetensors", torch.zeros(4, 1024, 1024), {})  # 16 MB
    # float32: the 400 MB are sized on its memory; under bf16 autocast the tiled retry did not fit them either
    proc = run_limited("decode", latents, "-o", tmp_path / "png", "--model", models[0], "--device", "cpu",
                       "--steps", 1, "--max-pixels", 10**10, "--precision", "fp32", headroom=400_000_000)
    note = (f"note: {latents / 'big.safetensors'}: out of memory decoding 512x512 whole; decoded in 64-pixel tiles "
            "(as --tile 64 --overlap 32)")
    got = failures(proc, notes=(note,))
    assert note in proc.stderr.splitlines()
    assert proc.returncode == 1 and list(got) == [str(latents / "huge.safetensors")]
    assert "out of memory" in got[str(latents / "huge.safetensors")] and (tmp_path / "png" / "a-good.png").is_file()
    with Image.open(tmp_path / "png" / "big.png") as img:
        assert img.size == (512, 512) and np.asarray(img).std() > 0


def tar_corpus(root: Path, shared_data: Path) -> tuple[list[str], dict[str, str]]:
    """(samples that must encode, archive or sample name below ``root`` -> fragment of its error) for a folder of
    hostile WebDataset archives: each hostile member beside good ones, so that only it may fail."""
    import io
    import tarfile

    root.mkdir(parents=True)
    good, bad = [], {}

    def png(i: int) -> bytes:
        buf = io.BytesIO()
        photo(shared_data, i).save(buf, format="PNG")
        return buf.getvalue()

    def archive(name: str, members: list[tuple[str, bytes | None, str | None]], cut_last: bool = False) -> None:
        """members: (member name, payload (None: a symbolic link), error fragment or None when it must encode);
        ``cut_last``: the archive ends halfway through its last member's data."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for member, payload, error in members:
                info = tarfile.TarInfo(member)
                if payload is None:
                    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                else:
                    info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload or b""))
                if member.endswith(".cls"):
                    continue
                (good.append(f"{name}:{member}") if error is None else bad.__setitem__(f"{name}:{member}", error))
        data = buf.getvalue()
        if cut_last:
            last = tarfile.open(fileobj=io.BytesIO(data)).getmembers()[-1]
            data = data[:last.offset_data + last.size // 2]
        (root / name).write_bytes(data)

    archive("a.tar", [("000.png", png(0), None), ("000.cls", b"3\n", None),
                      ("../escape.png", png(1), "member path leaves the archive"),
                      ("/etc/absolute.png", png(2), "member path leaves the archive"),
                      ("link.jpg", None, "not a regular file")])
    thin = io.BytesIO()
    Image.new("L", (1, 20000)).save(thin, format="PNG")  # 64 x 1.28M pixels once resized
    archive("b.tar", [("thin.png", thin.getvalue(), "over the pixel budget"),
                      ("bomb.png", png_header(20000, 20000), "decompression bomb"),
                      ("label.png", png(3), "not a decimal number"), ("label.cls", b"cat", None),
                      ("text.jpg", b"just text", "not an image file"),
                      ("001.webp", png(4), None), ("001.cls", b"7", None)])
    archive("c.tar", [("002.png", png(5), None), ("cut.png", png(6), "truncated archive")], cut_last=True)
    (root / "d.tar").write_bytes(np.random.default_rng(0).bytes(5000))
    bad["d.tar"] = "unreadable archive, stopped before any sample"
    import gzip
    (root / "e.tar").write_bytes(gzip.compress((root / "a.tar").read_bytes()))  # images are read at file offsets
    bad["e.tar"] = "not an uncompressed tar archive"
    return good, bad


def test_hostile_archives_fail_a_member_not_the_run(tmp_path, shared_data, models):
    from safetensors import safe_open

    src, out = tmp_path / "src", tmp_path / "out"
    good, bad = tar_corpus(src, shared_data)
    samples = len(good) + len(bad) - 2  # d.tar and e.tar hold none
    proc = run_limited("encode", src, "-o", out, "--model", models[0], "--device", "cpu", "--shards", 3)
    assert proc.returncode == 1, proc.stderr
    summary = (f"wrote {out}: {len(good)} images in {-(-samples // 3)} shards, {len(bad)} failed (listed in "
               f"dataset.json)")
    assert proc.stderr.splitlines()[-1] == summary
    assert_failures_match(failures(proc, notes=(summary,)), src, bad)
    info = json.loads((out / "dataset.json").read_text())
    assert sorted(f["error"].split(": ", 1)[0] for f in info["failed"]) == sorted(str(src / k) for k in bad)
    labels = []
    for shard in info["shards"]:
        with safe_open(str(out / shard["file"]), framework="pt") as fh:
            labels += fh.get_tensor("labels").tolist()
    assert labels == [3, 7, -1] and info["images"] == len(good) == 3
