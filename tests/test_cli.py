"""The `dgaetok` command end to end: encode, decode and info on real photos with a tiny seeded model.

Most tests drive the Typer app in-process with CliRunner (same exit codes and stderr as the real command); a few
run the real console command in a subprocess where only a separate process can show it (exit status and stderr
of the installed entry point, a SIGKILL mid-run).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

import dgaetok.files as files
from dgaetok.cli import app
from dgaetok.files import LATENT_FORMAT, center_crop, open_image, read_latent, to_tensor, write_latent
from dgaetok.models import file_sha256, load_model
from dgaetok.pipeline import decode_batch, seeded_noise

from conftest import save_tiny_model, without_progress

runner = CliRunner()
NOT_AN_IMAGE = "not an image file, or a format Pillow cannot decode"
SUMMARY = re.compile(r"^(encode|decode): (\d+) written, (\d+) already there \(skipped\), (\d+) failed$")


# --- helpers --------------------------------------------------------------------------------------------------


def cli(*args):
    """Run `dgaetok ARGS` in-process; whatever happens, no traceback may reach the user."""
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def model_args(model: Path) -> list[str]:
    return ["--model", str(model), "--device", "cpu"]


def err_lines(result) -> list[str]:
    """stderr's lines, less progress lines and the note every command that loads a model starts with
    (`test_precision` checks it)."""
    return without_progress([line for line in result.stderr.splitlines()
                             if line.strip() and not line.startswith("note: precision ")])


def summary(result) -> tuple[int, int, int]:
    """(written, skipped, failed) from the summary line, which must be the last line of stderr."""
    match = SUMMARY.match(err_lines(result)[-1])
    assert match, result.stderr
    return int(match[2]), int(match[3]), int(match[4])


def failures(result) -> list[str]:
    return [line for line in err_lines(result) if line.startswith("failed: ")]


def outputs(folder: Path, suffix: str) -> list[str]:
    """Files a user sees in an output tree (hidden files excluded), as sorted relative paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob(f"*{suffix}")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def leftovers(folder: Path) -> list[str]:
    """Temporary files (ours `.name.xxxx.tmp`, safetensors' `.tmpXXXX`) anywhere under folder."""
    if not folder.exists():
        return []
    return sorted(str(p) for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp"))


def assert_same_latents(a: Path, b: Path) -> None:
    """Two latent trees hold the same files with equal metadata and (to float rounding) equal latents.

    Latents are compared with a tolerance because CPU convolution kernels differ in the last bits between
    batch sizes, and a resumed run batches the remaining files differently.
    """
    assert outputs(a, ".safetensors") == outputs(b, ".safetensors")
    for rel in outputs(a, ".safetensors"):
        za, ma = read_latent(a / rel)
        zb, mb = read_latent(b / rel)
        assert ma == mb, rel
        torch.testing.assert_close(za, zb, atol=1e-5, rtol=0, msg=rel)


def unwritable_dir() -> Path | None:
    """An existing folder in which even root cannot create files (chmod does not stop root)."""
    for candidate in ("/proc", "/sys", "/sys/fs", "/proc/self"):
        folder = Path(candidate)
        if not folder.is_dir():
            continue
        probe = folder / f"dgaetok-probe-{os.getpid()}"
        try:
            probe.touch()
        except OSError:
            return folder
        probe.unlink()
    return None


def write_image(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


# --- fixtures -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def other_model_file(tmp_path_factory) -> Path:
    """A second tiny model with the same config but other weights (another seed)."""
    return save_tiny_model(tmp_path_factory.mktemp("models-b"), seed=1)


@pytest.fixture(scope="module")
def album(tmp_path_factory, shared_data) -> Path:
    """Five real photos in a nested tree: landscape, portrait, BSDS and a 40 px one. Read-only for tests."""
    root = tmp_path_factory.mktemp("album") / "album"
    val = sorted((shared_data / "eval" / "imagenet-val500").glob("*.JPEG"))
    (root / "sub" / "deep").mkdir(parents=True)
    shutil.copy(val[0], root / val[0].name)  # 500x375
    shutil.copy(val[1], root / "sub" / val[1].name)  # 500x333
    shutil.copy(val[2], root / "sub" / "deep" / val[2].name)  # 333x500, portrait
    shutil.copy(next((shared_data / "train" / "bsds500").rglob("*.jpg")), root / "bsds.jpg")
    Image.open(val[3]).convert("RGB").resize((40, 30), Image.BICUBIC).save(root / "sub" / "tiny.png")
    return root


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, album, tiny_model_file) -> Path:
    out = tmp_path_factory.mktemp("encoded") / "latents"
    result = cli("encode", album, "-o", out, *model_args(tiny_model_file))
    assert result.exit_code == 0, result.output
    assert summary(result) == (5, 0, 0)
    return out


@pytest.fixture(scope="module")
def decoded(tmp_path_factory, encoded, tiny_model_file) -> Path:
    out = tmp_path_factory.mktemp("decoded") / "pngs"
    result = cli("decode", encoded, "-o", out, "--steps", 2, "--seed", 0, *model_args(tiny_model_file))
    assert result.exit_code == 0, result.output
    assert summary(result) == (5, 0, 0)
    return out


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- encode ---------------------------------------------------------------------------------------------------

ALBUM_LATENTS = ["bsds.safetensors", "n01440764_tench.safetensors", "sub/deep/n01494475_hammerhead.safetensors",
                 "sub/n01484850_great_white_shark.safetensors", "sub/tiny.safetensors"]


def test_encode_mirrors_the_tree_with_latents_and_metadata(encoded, album, tiny_model_file):
    assert outputs(encoded, "") == ALBUM_LATENTS
    assert leftovers(encoded) == []
    model = load_model(tiny_model_file)
    for rel in ALBUM_LATENTS:
        latent, meta = read_latent(encoded / rel)
        assert latent.shape == (4, 8, 8)
        source = next(p for p in album.rglob("*") if p.is_file() and
                      p.relative_to(album).with_suffix(".safetensors").as_posix() == rel)
        assert meta["source"] == source.relative_to(album).as_posix()
        assert meta["model_hash"] == file_sha256(tiny_model_file)
        assert meta["model_config"] == model.config.to_json()
        assert meta["sampled"] == "false"
        img = open_image(source)
        crop, box = center_crop(img, 64, 8)
        assert json.loads(meta["source_size"]) == list(img.size)
        assert json.loads(meta["crop_box"]) == list(box.box) and json.loads(meta["resized_size"]) == list(box.resized_size)
        box_w, box_h = box.box[2] - box.box[0], box.box[3] - box.box[1]
        assert (box_w, box_h) == (64, 64) and min(box.resized_size) == 64
        # the stored latent is the posterior mean of the center crop
        with torch.no_grad():
            expected = model.encode(to_tensor(crop)[None]).latent_dist.mode()[0]
        torch.testing.assert_close(latent, expected, atol=1e-5, rtol=0)
    assert json.loads(read_latent(encoded / "sub/tiny.safetensors")[1]["source_size"]) == [40, 30]


def test_encode_ignores_hidden_files_and_other_suffixes(tmp_path, tiny_model_file):
    src = tmp_path / "src"
    write_image(src / "a.jpg", (64, 64))
    write_image(src / ".hidden.jpg", (64, 64))
    write_image(src / ".cache" / "b.png", (64, 64))
    (src / "notes.txt").write_text("not an image")
    (src / "c.safetensors").write_bytes(b"x")
    result = cli("encode", src, "-o", tmp_path / "out", *model_args(tiny_model_file))
    assert result.exit_code == 0, result.output
    assert summary(result) == (1, 0, 0)
    assert outputs(tmp_path / "out", "") == ["a.safetensors"]


def test_encode_single_file(tmp_path, album, tiny_model_file):
    photo = album / "bsds.jpg"
    result = cli("encode", photo, "-o", tmp_path / "out", *model_args(tiny_model_file))
    assert result.exit_code == 0, result.output
    assert summary(result) == (1, 0, 0)
    latent, meta = read_latent(tmp_path / "out" / "bsds.safetensors")
    assert latent.shape == (4, 8, 8) and meta["source"] == "bsds.jpg"


def test_encode_all_image_formats_and_keep_size(tmp_path, tiny_model_file):
    src = tmp_path / "src"
    suffixes = ["jpg", "jpeg", "png", "webp", "bmp", "tiff", "tif", "JPG"]
    for i, suffix in enumerate(suffixes):
        write_image(src / f"img_{suffix.lower()}{i}.{suffix}", (72, 48), seed=i)
    odd = write_image(src / "odd.png", (50, 40))

    result = cli("encode", src, "-o", tmp_path / "cropped", *model_args(tiny_model_file))
    assert result.exit_code == 0, result.output
    assert summary(result) == (len(suffixes) + 1, 0, 0)
    assert {read_latent(p)[0].shape for p in (tmp_path / "cropped").glob("*.safetensors")} == {(4, 8, 8)}

    result = cli("encode", src, "-o", tmp_path / "whole", "--keep-size", *model_args(tiny_model_file))
    assert result.exit_code == 0, result.output
    assert summary(result) == (len(suffixes) + 1, 0, 0) and leftovers(tmp_path / "whole") == []
    for path in (tmp_path / "whole").glob("img_*.safetensors"):
        latent, meta = read_latent(path)
        assert latent.shape == (4, 6, 9)
        assert json.loads(meta["crop_box"]) == [0, 0, 72, 48] and json.loads(meta["source_size"]) == [72, 48]
        assert json.loads(meta["padding"]) == [0, 0, 0, 0]
    latent, meta = read_latent(tmp_path / "whole" / "odd.safetensors")  # 50x40: mirrored out to 56x40
    assert latent.shape == (4, 5, 7) and json.loads(meta["padding"]) == [0, 0, 6, 0]


def test_keep_size_round_trips_any_size_and_crops_back(tmp_path, tiny_model_file):
    """Odd, non-square, 1x1 and 7x300 images encode whole (padded by mirroring) and decode at their own size."""
    src = tmp_path / "src"
    sizes = {"odd": (50, 41), "dot": (1, 1), "strip": (300, 7), "tall": (9, 70)}
    for name, size in sizes.items():
        write_image(src / f"{name}.png", size)
    result = cli("encode", src, "-o", tmp_path / "latents", "--keep-size", *model_args(tiny_model_file))
    assert result.exit_code == 0 and summary(result) == (4, 0, 0), result.output
    latent, meta = read_latent(tmp_path / "latents" / "strip.safetensors")
    assert latent.shape == (4, 1, 38) and json.loads(meta["padding"]) == [0, 0, 4, 1]
    model = load_model(tiny_model_file)
    with torch.no_grad():  # the latent is the padded image's: the right/bottom edges mirrored
        padded = np.pad(np.asarray(open_image(src / "strip.png")), ((0, 1), (0, 4), (0, 0)), mode="reflect")
        expected = model.encode(to_tensor(Image.fromarray(padded))[None]).latent_dist.mode()[0]
    torch.testing.assert_close(latent, expected, atol=1e-5, rtol=0)

    result = cli("decode", tmp_path / "latents", "-o", tmp_path / "out", "--steps", 1, *model_args(tiny_model_file))
    assert result.exit_code == 0 and summary(result) == (4, 0, 0), result.output
    for name, size in sizes.items():
        with Image.open(tmp_path / "out" / f"{name}.png") as img:
            assert img.size == size, name


def test_decode_tiled_and_the_fallback_decode_alike(tmp_path, tiny_model_file, monkeypatch):
    """--tile decodes any size; an image over --max-pixels, or one that runs out of memory, is decoded in tiles
    instead, of the model's resolution (64 px here), with one note line per file, and exactly as `--tile 64`
    decodes it; up to 16 times the budget."""
    src = tmp_path / "src"
    write_image(src / "a.png", (72, 40))
    write_image(src / "b.png", (72, 40), seed=1)
    cli("encode", src, "-o", tmp_path / "latents", "--keep-size", *model_args(tiny_model_file))
    args = ["--steps", 1, *model_args(tiny_model_file)]

    tiled = cli("decode", tmp_path / "latents", "-o", tmp_path / "tiled", "--tile", 64, *args)
    assert tiled.exit_code == 0 and summary(tiled) == (2, 0, 0) and not any("note:" in x for x in err_lines(tiled))
    small = cli("decode", tmp_path / "latents", "-o", tmp_path / "small", "--tile", 32, "--overlap", 8, *args)
    assert small.exit_code == 0 and summary(small) == (2, 0, 0)
    with Image.open(tmp_path / "small" / "a.png") as img:
        assert img.size == (72, 40)

    budget = cli("decode", tmp_path / "latents", "-o", tmp_path / "budget", "--max-pixels", 2000, *args)
    assert budget.exit_code == 0 and summary(budget) == (2, 0, 0)
    notes = [line for line in err_lines(budget) if line.startswith("note: ")]
    assert notes == [f"note: {tmp_path / 'latents' / name}.safetensors: 72x40 is over the pixel budget of 2,000 per "
                     "image decoded whole; decoded in 64-pixel tiles (as --tile 64 --overlap 32)" for name in "ab"]
    refused = cli("decode", tmp_path / "latents", "-o", tmp_path / "refused", "--max-pixels", 100, *args)
    assert refused.exit_code == 1 and summary(refused) == (0, 0, 2)
    assert failures(refused)[0] == (f"failed: {tmp_path / 'latents' / 'a.safetensors'}: its latent decodes to 2,880 "
                                    "pixels, over 16 x the pixel budget of 100 per image, the most it decodes even in "
                                    "tiles; raise it with --max-pixels")

    real_decode = type(load_model(tiny_model_file)).decode

    def decode_oom_when_whole(self, z, *a, tile=None, **kw):
        if tile is None:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_decode(self, z, *a, tile=tile, **kw)

    monkeypatch.setattr(type(load_model(tiny_model_file)), "decode", decode_oom_when_whole)
    oom = cli("decode", tmp_path / "latents", "-o", tmp_path / "oom", *args)
    assert oom.exit_code == 0 and summary(oom) == (2, 0, 0)
    assert [line for line in err_lines(oom) if line.startswith("note: ")] == [
        f"note: {tmp_path / 'latents' / name}.safetensors: out of memory decoding 72x40 whole; decoded in "
        "64-pixel tiles (as --tile 64 --overlap 32)" for name in "ab"]
    for name in ("a.png", "b.png"):
        assert (tmp_path / "budget" / name).read_bytes() == (tmp_path / "tiled" / name).read_bytes()
        assert (tmp_path / "oom" / name).read_bytes() == (tmp_path / "tiled" / name).read_bytes()


def test_decode_batch_falls_back_to_tiles_one_image_at_a_time(tiny_model_file, monkeypatch):
    """Out of memory: a batch of several re-raises (the folder job then retries its images one by one, whole);
    a single image is decoded in tiles of the model's resolution instead. Other errors are not caught."""
    model = load_model(tiny_model_file)
    z = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    noise = seeded_noise(0, 40, 48, 2)
    real_decode, calls, error = type(model).decode, [], [torch.OutOfMemoryError("CUDA out of memory")]

    def decode(self, z, *args, tile=None, **kwargs):
        calls.append((len(z), tile))
        if tile is None:
            raise error[0]
        return real_decode(self, z, *args, tile=tile, **kwargs)

    monkeypatch.setattr(type(model), "decode", decode)
    with pytest.raises(torch.OutOfMemoryError):
        decode_batch(model, z, noise, 1, "euler", 1.0)
    images, note = decode_batch(model, z[:1], noise[:1], 1, "euler", 1.0)
    assert calls == [(2, None), (1, None), (1, 64)] and images.shape == (1, 3, 40, 48)
    assert note == "out of memory decoding 48x40 whole; decoded in 64-pixel tiles (as --tile 64 --overlap 32)"
    calls.clear()
    error[0] = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 400000000000 bytes")
    assert decode_batch(model, z[:1], noise[:1], 1, "euler", 1.0)[1].startswith("out of memory decoding")
    error[0] = RuntimeError("Calculated padded input size per channel: (0 x 0)")
    with pytest.raises(RuntimeError, match="padded input"):
        decode_batch(model, z[:1], noise[:1], 1, "euler", 1.0)
    calls.clear()
    _, note = decode_batch(model, z, noise, 1, "euler", 1.0, max_pixels=100)
    assert calls == [(2, 64)] and note == ("48x40 is over the pixel budget of 100 per image decoded whole; decoded in "
                                           "64-pixel tiles (as --tile 64 --overlap 32)")


def test_bad_tile_options(tmp_path, encoded, album, tiny_model_file):
    result = cli("decode", encoded, "-o", tmp_path / "out", "--tile", 100, *model_args(tiny_model_file))
    assert_user_error(result, "--tile 100: must be a positive multiple of 8 for this model")
    result = cli("decode", encoded, "-o", tmp_path / "out", "--tile", 64, "--overlap", 40, *model_args(tiny_model_file))
    assert_user_error(result, "--overlap 40: must be between 0 and 32 for --tile 64")
    result = cli("encode", album, "-o", tmp_path / "enc", "--tile", 12, *model_args(tiny_model_file))
    assert_user_error(result, "--tile 12: must be a positive multiple of 8 for this model")
    assert not (tmp_path / "out").exists() and not (tmp_path / "enc").exists()


def test_encode_sample_is_seeded_per_image(tmp_path, album, encoded, tiny_model_file):
    mean_dir = encoded
    runs = {}
    for name, extra in [("a", ["--seed", 0]), ("b", ["--seed", 0, "--batch-size", 1]), ("c", ["--seed", 1])]:
        result = cli("encode", album, "-o", tmp_path / name, "--sample", *extra, *model_args(tiny_model_file))
        assert result.exit_code == 0, result.output
        runs[name] = {rel: read_latent(tmp_path / name / rel) for rel in ALBUM_LATENTS}
    for rel in ALBUM_LATENTS:
        (za, ma), (zb, _), (zc, _) = runs["a"][rel], runs["b"][rel], runs["c"][rel]
        zmean = read_latent(mean_dir / rel)[0]
        assert ma["sampled"] == "true"
        # same seed: same draw, whatever the batching (up to float32 rounding, which oneDNN's channels_last
        # kernels make batch-size dependent; another draw would differ by about the posterior std)
        torch.testing.assert_close(za, zb, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(za, zc)  # another seed: another draw
        assert not torch.allclose(za, zmean)  # a draw, not the mean
    # z = mean + std * eps with eps ~ N(0, I), and a fresh eps for each image (not one noise for every file)
    model = load_model(tiny_model_file)
    eps = []
    for rel in ALBUM_LATENTS[:2]:
        z, meta = runs["a"][rel]
        with torch.no_grad():
            dist = model.encode(to_tensor(center_crop(open_image(album / meta["source"]), 64, 8)[0])[None]).latent_dist
        eps.append(((z - dist.mean[0]) / dist.std[0]).flatten())
        assert abs(eps[-1].mean()) < 0.3 and 0.7 < eps[-1].std() < 1.3
    assert abs(torch.corrcoef(torch.stack(eps))[0, 1]) < 0.3

    # resuming a sampled run gives what the uninterrupted run gave
    resumed = copy_tree(tmp_path / "a", tmp_path / "resumed")
    (resumed / ALBUM_LATENTS[2]).unlink()
    result = cli("encode", album, "-o", resumed, "--sample", "--seed", 0, *model_args(tiny_model_file))
    assert summary(result) == (1, 4, 0)
    assert_same_latents(resumed, tmp_path / "a")


def test_encode_bad_images_fail_one_by_one(tmp_path, album, tiny_model_file):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    shutil.copy(album / "bsds.jpg", src / "good.jpg")
    real = (album / "n01440764_tench.JPEG").read_bytes()
    (src / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    (src / "sub" / "truncated.jpg").write_bytes(real[: len(real) // 2])
    (src / "empty.png").write_bytes(b"")
    (src / "x.png").write_text("this is a text file\n")
    out = tmp_path / "out"

    result = cli("encode", src, "-o", out, "--batch-size", 2, *model_args(tiny_model_file))
    assert result.exit_code == 1
    assert summary(result) == (1, 0, 4)
    assert sorted(failures(result)) == sorted([
        f"failed: {src / 'corrupt.jpg'}: {NOT_AN_IMAGE}",
        f"failed: {src / 'empty.png'}: empty file",
        f"failed: {src / 'x.png'}: {NOT_AN_IMAGE}",
        next(line for line in failures(result) if line.startswith(f"failed: {src / 'sub' / 'truncated.jpg'}: "
                                                                  "corrupt or truncated image (")),
    ])
    assert len(err_lines(result)) == 5  # four one-line errors and the summary, nothing else
    assert outputs(out, "") == ["good.safetensors"]
    assert leftovers(out) == []

    # the bad files stay bad on a re-run; the good one is skipped
    result = cli("encode", src, "-o", out, *model_args(tiny_model_file))
    assert result.exit_code == 1 and summary(result) == (0, 1, 4)


def test_encode_resumes_after_an_output_is_deleted(tmp_path, encoded, album, tiny_model_file):
    out = copy_tree(encoded, tmp_path / "out")
    lost = out / ALBUM_LATENTS[3]
    lost.unlink()
    kept = {rel: ((out / rel).stat().st_mtime_ns, (out / rel).read_bytes()) for rel in ALBUM_LATENTS if rel != ALBUM_LATENTS[3]}
    result = cli("encode", album, "-o", out, *model_args(tiny_model_file))
    assert result.exit_code == 0, result.output
    assert summary(result) == (1, 4, 0)
    for rel, (mtime, data) in kept.items():  # skipped files are not touched
        assert (out / rel).stat().st_mtime_ns == mtime and (out / rel).read_bytes() == data
    assert_same_latents(out, encoded)

    result = cli("encode", album, "-o", out, "--overwrite", *model_args(tiny_model_file))
    assert summary(result) == (5, 0, 0)
    assert_same_latents(out, encoded)


def test_encode_interrupted_mid_batch_then_resumed(tmp_path, encoded, album, tiny_model_file, monkeypatch):
    out = tmp_path / "out"
    real_write = files.write_file
    calls = []

    def interrupted_write(filename, data):
        calls.append(filename)
        if len(calls) == 3:  # the third file of the first batch: some bytes reach the disk, then Ctrl-C
            Path(filename).write_bytes(data[:12])
            raise KeyboardInterrupt
        return real_write(filename, data)

    monkeypatch.setattr(files, "write_file", interrupted_write)
    result = runner.invoke(app, ["encode", str(album), "-o", str(out), "--batch-size", "4",
                                 *model_args(tiny_model_file)])
    assert result.exit_code not in (0, 2)  # click turns Ctrl-C into "Aborted!" and exit 1
    assert outputs(out, "") == ALBUM_LATENTS[:2]
    assert leftovers(out) == []  # the interrupted write left neither a temp file nor a final file
    monkeypatch.undo()

    # a SIGKILL leaves temp files that no cleanup could remove: they must not confuse the next run
    (out / "sub").mkdir(exist_ok=True)
    (out / "sub" / ".n01484850_great_white_shark.safetensors.deadbeef.tmp").write_bytes(b"half a latent")
    (out / "sub" / ".tmpAbC123").write_bytes(b"safetensors' own temp file")

    result = cli("encode", album, "-o", out, *model_args(tiny_model_file))
    assert result.exit_code == 0, result.output
    assert summary(result) == (3, 2, 0)
    assert_same_latents(out, encoded)  # equal to the uninterrupted run


def test_encode_killed_by_sigkill_then_resumed(tmp_path, album, tiny_model_file):
    """A real `kill -9` at some point of a run: the re-run finishes it, and every output is complete."""
    src = tmp_path / "src"
    photo = Image.open(album / "bsds.jpg").convert("RGB").resize((64, 64))
    src.mkdir()
    for i in range(12):
        photo.rotate(30 * i).save(src / f"{i:02d}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dgaetok.cli", "encode", str(src), "-o", str(out), "--batch-size", "1",
           "--workers", "1", *model_args(tiny_model_file)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while proc.poll() is None and time.monotonic() < deadline and not list(out.glob("*.safetensors")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    rc = proc.wait()
    written_before = len(outputs(out, ".safetensors"))
    if rc == 0 or written_before == 12:
        pytest.skip("the run finished before it could be killed")
    assert rc == -signal.SIGKILL

    result = cli("encode", src, "-o", out, *model_args(tiny_model_file))
    assert result.exit_code == 0, result.output
    written, skipped, failed = summary(result)
    assert (skipped, failed) == (written_before, 0) and written + skipped == 12
    assert leftovers(out) == []  # a temp file the killed run was writing is gone too
    reference = tmp_path / "reference"
    cli("encode", src, "-o", reference, *model_args(tiny_model_file))
    assert_same_latents(out, reference)


def test_pil_warnings_do_not_reach_the_terminal(tmp_path, tiny_model_file):
    """A palette PNG with byte transparency makes PIL warn on conversion; it decodes fine, so nothing is printed."""
    src = tmp_path / "src"
    src.mkdir()
    palette = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).convert("P")
    palette.save(src / "palette.png", transparency=bytes(range(256)))
    cmd = [sys.executable, "-m", "dgaetok.cli", "encode", str(src), "-o", str(tmp_path / "out"),
           *map(str, model_args(tiny_model_file))]
    result = subprocess.run(cmd, capture_output=True, text=True)  # a real process: pytest would catch warnings
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "palette.safetensors").is_file()
    assert "Warning" not in result.stderr and "warnings.warn" not in result.stderr, result.stderr


def test_temp_files_of_dead_runs_are_removed_and_live_ones_kept(tmp_path, album, tiny_model_file):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = out / "sub" / f".a.safetensors.p{int(gone.stdout)}-0123abcd.tmp"
    live = out / f".b.safetensors.p{os.getpid()}-0123abcd.tmp"  # a concurrent writer: not ours to remove
    other = out / ".notes.tmp"  # not an atomic_path name
    for path in (dead, live, other):
        path.write_bytes(b"half a file")
    assert cli("encode", album, "-o", out, *model_args(tiny_model_file)).exit_code == 0
    assert not dead.exists() and live.exists() and other.exists()


def test_encode_outputs_that_collide(tmp_path, tiny_model_file):
    src = tmp_path / "src"
    write_image(src / "x.jpg", (64, 64))
    write_image(src / "x.png", (64, 64))
    result = cli("encode", src, "-o", tmp_path / "out", *model_args(tiny_model_file))
    assert result.exit_code == 1
    assert summary(result) == (1, 0, 1)
    [line] = failures(result)
    assert line.startswith(f"failed: {src / 'x.png'}: output ") and "also the output of" in line
    assert read_latent(tmp_path / "out" / "x.safetensors")[1]["source"] == "x.jpg"


def test_encode_write_failures_are_per_file(tmp_path, album, tiny_model_file, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").write_text("a file where the mirrored folder should go")
    (out / "bsds.safetensors").mkdir()  # a folder in the way is not an encoded file: it must fail, not be skipped
    real_write = files.write_file

    def disk_full_for_tench(filename, data):
        if "n01440764_tench" in str(filename):
            Path(filename).write_bytes(data[:7])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(filename, data)

    monkeypatch.setattr(files, "write_file", disk_full_for_tench)
    result = cli("encode", album, "-o", out, *model_args(tiny_model_file))
    assert result.exit_code == 1
    assert summary(result) == (0, 0, 5)
    lines = sorted(failures(result))
    assert lines[0] == f"failed: {out / 'bsds.safetensors'}: cannot write (Is a directory)"
    assert lines[1].startswith(f"failed: {out / 'n01440764_tench.safetensors'}: cannot write (")
    assert "No space left on device" in lines[1]
    assert lines[2:] == [  # the mirrored folder cannot be made: a file is in its place
        f"failed: {out / 'sub' / 'deep' / 'n01494475_hammerhead.safetensors'}: cannot write (Not a directory)",
        f"failed: {out / 'sub' / 'n01484850_great_white_shark.safetensors'}: cannot write (File exists)",
        f"failed: {out / 'sub' / 'tiny.safetensors'}: cannot write (File exists)",
    ]
    assert leftovers(out) == []
    assert sorted(p.name for p in out.iterdir()) == ["bsds.safetensors", "sub"]


def test_encode_reads_ahead_by_a_bounded_window(tmp_path, tiny_model_file, monkeypatch):
    """Loading runs ahead of the model, but only by a few batches: a million-image folder must not be held in
    memory at once."""
    import dgaetok.pipeline as pipeline

    src = tmp_path / "src"
    for i in range(16):
        write_image(src / f"{i:02d}.png", (64, 64), seed=i)
    loaded, saved, ahead = [], [], []
    real_open, real_write = pipeline.open_image, files.write_file

    def counting_open(path, *args):
        loaded.append(path)
        return real_open(path, *args)

    def counting_write(filename, data):
        ahead.append(len(loaded) - len(saved))
        saved.append(filename)
        return real_write(filename, data)

    monkeypatch.setattr(pipeline, "open_image", counting_open)
    monkeypatch.setattr(files, "write_file", counting_write)
    result = cli("encode", src, "-o", tmp_path / "out", "--batch-size", 2, "--workers", 1, *model_args(tiny_model_file))
    assert result.exit_code == 0 and summary(result) == (16, 0, 0)
    # the batch being written, the input that closed it, and a window of batch size + 2 x workers
    assert max(ahead) <= 2 + 1 + (2 + 2 * 1), ahead


# --- usage errors: exit 2, one line, nothing written ------------------------------------------------------------


def assert_user_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    lines = err_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_missing_source(tmp_path, tiny_model_file):
    out = tmp_path / "out"
    for command in ("encode", "decode"):
        result = cli(command, tmp_path / "nowhere", "-o", out, *model_args(tiny_model_file))
        assert_user_error(result, str(tmp_path / "nowhere"), "no such file or folder")
    assert not out.exists()


def test_output_path_is_a_file_or_under_one(tmp_path, album, encoded, tiny_model_file):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    for command, src in (("encode", album), ("decode", encoded)):
        assert_user_error(cli(command, src, "-o", afile, *model_args(tiny_model_file)), str(afile), "is a file")
        assert_user_error(cli(command, src, "-o", afile / "sub", *model_args(tiny_model_file)),
                          str(afile / "sub"), "not writable", "Not a directory")
    assert afile.read_text() == "keep"


def test_output_location_that_cannot_be_written(tmp_path, album, tiny_model_file):
    folder = unwritable_dir()
    if folder is None:
        pytest.skip("no folder here that root cannot write to")
    for out in (folder, folder / f"dgaetok-test-{os.getpid()}" / "latents"):
        assert_user_error(cli("encode", album, "-o", out, *model_args(tiny_model_file)), str(out), "not writable")
        assert not (folder / f"dgaetok-test-{os.getpid()}").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith((".dgaetok", "dgaetok"))]


def test_bad_model_file(tmp_path, album, encoded):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(np.random.default_rng(0).bytes(3000))
    text_model = tmp_path / "model.safetensors"
    text_model.write_text("{}")
    for command, src in (("encode", album), ("decode", encoded)):
        for model, message in [(garbage, "unreadable model file"), (text_model, "unreadable model file"),
                               (tmp_path / "missing.safetensors", "no such model file")]:
            out = tmp_path / f"out-{command}"
            assert_user_error(cli(command, src, "-o", out, "--model", model, "--device", "cpu"), str(model), message)
            assert not out.exists()  # a bad --model leaves no output folder behind


def test_non_model_safetensors_as_model(tmp_path, album, encoded):
    latent = encoded / ALBUM_LATENTS[0]
    assert_user_error(cli("encode", album, "-o", tmp_path / "out", *model_args(latent)),
                      str(latent), "not a dgaetok model file")


def test_unknown_sampler_device_and_compile_mode(tmp_path, album, encoded, tiny_model_file, monkeypatch):
    out = tmp_path / "out"
    assert_user_error(cli("decode", encoded, "-o", out, "--sampler", "rk4", *model_args(tiny_model_file)),
                      "--sampler rk4", "euler, heun")
    assert_user_error(cli("decode", encoded, "-o", out, "--model", tiny_model_file, "--device", "tpu9"),
                      "--device tpu9", "not a torch device")
    with monkeypatch.context() as patch:  # a machine without CUDA, whatever this one has
        patch.setattr(torch.cuda, "is_available", lambda: False)
        for command in ("encode", "decode"):
            assert_user_error(cli(command, encoded, "-o", out, "--model", tiny_model_file, "--device", "cuda"),
                              "--device cuda", "CUDA is not available")
    assert not out.exists()
    result = cli("decode", encoded, "-o", out, "--steps", 0, *model_args(tiny_model_file))
    assert result.exit_code == 2 and "--steps" in result.output  # click's own range check
    for command, src in (("encode", album), ("decode", encoded)):
        assert_user_error(cli(command, src, "-o", out, "--compile", "fast", *model_args(tiny_model_file)),
                          "unknown compile mode 'fast'", "reduce-overhead")
    assert not out.exists()


def test_train_on_a_folder_without_a_readable_image(tmp_path):
    """One line naming the folder, exit 2, and no --out folder left behind."""
    data, out = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    (data / "a.jpg").write_bytes(b"not a jpeg")
    (data / "b.png").write_text("text")
    result = cli("train", data, "--out", out, "--preset", "dgae-t", "--resolution", 32, "-f", 8, "-c", 4,
                 "--steps", 1, "--workers", 0, "--lpips-weight", 0, "--device", "cpu")
    assert_user_error(result, str(data), "no readable image among its 2 image files")
    assert not out.exists()


def test_train_decay_from_cools_down_a_copy_of_a_flat_run(tmp_path, train_photos):
    """--decay-from reaches the schedule: the copy, resumed, keeps --lr to that step, then falls to --min-lr."""
    args = ("--preset", "dgae-t", "--resolution", 32, "-f", 8, "-c", 4, "--batch-size", 2, "--workers", 0,
            "--lpips-weight", 0, "--device", "cpu", "--lr", 1e-3, "--warmup", 1, "--log-every", 1)
    result = cli("train", train_photos, "--out", tmp_path / "flat", "--steps", 2, "--min-lr", 1e-3, *args)
    assert result.exit_code == 0, result.output
    shutil.copytree(tmp_path / "flat", tmp_path / "cool")
    result = cli("train", train_photos, "--out", tmp_path / "cool", "--steps", 4, "--min-lr", 1e-6, "--decay-from", 2,
                 "--resume", *args)
    assert result.exit_code == 0, result.output
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "cool" / "log.jsonl").read_text().splitlines()) if "lr" in r]
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3, (1e-3 + 1e-6) / 2])


def test_file_names_with_brackets_are_printed_literally(tmp_path, tiny_model_file):
    """Rich markup must not eat `[bold]` in a file name, nor crash on `[/b]`."""
    src = tmp_path / "src"
    (src / "[").mkdir(parents=True)
    (src / "[" / "b].png").write_text("text")
    (src / "c[bold]x.png").write_text("text")
    write_image(src / "ok[red].png", (64, 64))
    result = cli("encode", src, "-o", tmp_path / "out", *model_args(tiny_model_file))
    assert result.exit_code == 1
    assert sorted(failures(result)) == [f"failed: {src / '[' / 'b].png'}: {NOT_AN_IMAGE}",
                                        f"failed: {src / 'c[bold]x.png'}: {NOT_AN_IMAGE}"]
    latent = tmp_path / "out" / "ok[red].safetensors"
    result = cli("info", latent)
    assert result.exit_code == 0 and "ok[red].png" in result.stdout
    assert_user_error(cli("info", src / "[" / "b].png"), str(src / "[" / "b].png"))


# --- decode ---------------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_round_trip_matches_the_cpu_one(tmp_path, album, encoded, decoded, tiny_model_file):
    """--device cuda end to end: the same files, latents equal to bf16 precision, images within a few levels."""
    result = cli("encode", album, "-o", tmp_path / "latents", "--model", tiny_model_file, "--device", "cuda")
    assert result.exit_code == 0 and summary(result) == (5, 0, 0)
    for rel in ALBUM_LATENTS:
        torch.testing.assert_close(read_latent(tmp_path / "latents" / rel)[0], read_latent(encoded / rel)[0],
                                   atol=0.05, rtol=0.05)
    result = cli("decode", encoded, "-o", tmp_path / "pngs", "--steps", 2, "--model", tiny_model_file,
                 "--device", "cuda")
    assert result.exit_code == 0 and summary(result) == (5, 0, 0)
    for rel in outputs(decoded, ""):
        a, b = (np.asarray(Image.open(folder / rel), dtype=np.int16) for folder in (tmp_path / "pngs", decoded))
        assert np.abs(a - b).mean() < 4, rel


def test_round_trip_gives_a_png_per_input_at_model_resolution(decoded, encoded):
    assert outputs(decoded, "") == [rel.replace(".safetensors", ".png") for rel in ALBUM_LATENTS]
    assert leftovers(decoded) == []
    for rel in outputs(decoded, ""):
        with Image.open(decoded / rel) as img:
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (64, 64)


def test_decode_is_deterministic_and_independent_of_batching(tmp_path, decoded, encoded, tiny_model_file):
    subset = tmp_path / "subset"
    rel = ALBUM_LATENTS[3]
    (subset / rel).parent.mkdir(parents=True)
    shutil.copy(encoded / rel, subset / rel)
    out = tmp_path / "one-by-one"
    result = cli("decode", subset, "-o", out, "--steps", 2, "--seed", 0, "--batch-size", 1,
                 *model_args(tiny_model_file))
    assert result.exit_code == 0 and summary(result) == (1, 0, 0)
    assert outputs(out, "") == [rel.replace(".safetensors", ".png")]
    for rel in outputs(out, ""):  # alone in a batch of 1: byte-identical to the same image in the batch-of-5 run
        assert (out / rel).read_bytes() == (decoded / rel).read_bytes(), rel

    other_seed = tmp_path / "seed1"
    cli("decode", subset, "-o", other_seed, "--steps", 2, "--seed", 1, *model_args(tiny_model_file))
    png = ALBUM_LATENTS[3].replace(".safetensors", ".png")
    assert (other_seed / png).read_bytes() != (decoded / png).read_bytes()


def test_decode_resumes_and_skips_existing(tmp_path, decoded, encoded, tiny_model_file):
    out = copy_tree(decoded, tmp_path / "out")
    lost = ALBUM_LATENTS[4].replace(".safetensors", ".png")
    (out / lost).unlink()
    result = cli("decode", encoded, "-o", out, "--steps", 2, "--seed", 0, *model_args(tiny_model_file))
    assert result.exit_code == 0 and summary(result) == (1, 4, 0)
    assert (out / lost).read_bytes() == (decoded / lost).read_bytes()


def test_decode_with_another_model_names_each_latent(tmp_path, encoded, tiny_model_file, other_model_file):
    out = tmp_path / "out"
    result = cli("decode", encoded, "-o", out, "--steps", 2, *model_args(other_model_file))
    assert result.exit_code == 1
    assert summary(result) == (0, 0, 5)
    hash_a, hash_b = file_sha256(tiny_model_file), file_sha256(other_model_file)
    assert sorted(failures(result)) == sorted(
        f"failed: {encoded / rel}: latent was made by model {hash_a}, not by the loaded model {hash_b}"
        for rel in ALBUM_LATENTS)
    assert outputs(out, "") == [] and leftovers(out) == []


def test_decode_bad_latents_fail_one_by_one(tmp_path, encoded, tiny_model_file):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(encoded / ALBUM_LATENTS[0], src / "good.safetensors")
    write_latent(src / "wide.safetensors", torch.randn(4, 6, 8) * 0.3, {})  # a --keep-size latent: 64x48 image
    write_latent(src / "channels.safetensors", torch.zeros(3, 8, 8), {})
    save_file({"latent": torch.zeros(8, 8)}, str(src / "flat.safetensors"), metadata={"format": LATENT_FORMAT})
    nan = torch.zeros(4, 8, 8)
    nan[1, 2, 3] = float("nan")
    save_file({"latent": nan}, str(src / "nan.safetensors"), metadata={"format": LATENT_FORMAT})
    shutil.copy(tiny_model_file, src / "model.safetensors")  # a safetensors file that is not a latent
    (src / "garbage.safetensors").write_bytes(np.random.default_rng(0).bytes(2000))
    (src / "empty.safetensors").write_bytes(b"")
    out = tmp_path / "out"

    result = cli("decode", src, "-o", out, "--steps", 2, *model_args(tiny_model_file))
    assert result.exit_code == 1
    assert summary(result) == (2, 0, 6)
    lines = {line.split(": ", 2)[1]: line.split(": ", 2)[2] for line in failures(result)}
    assert lines == {
        str(src / "channels.safetensors"): "latent has 3 channels, the model expects 4",
        str(src / "flat.safetensors"): "latent has shape (8, 8), expected (channels, height, width)",
        str(src / "nan.safetensors"): "latent contains NaN or infinite values",
        str(src / "model.safetensors"): "not a dgaetok latent file",
        str(src / "garbage.safetensors"): lines.get(str(src / "garbage.safetensors"), ""),
        str(src / "empty.safetensors"): lines.get(str(src / "empty.safetensors"), ""),
    }
    assert lines[str(src / "garbage.safetensors")].startswith("unreadable latent file (")
    assert lines[str(src / "empty.safetensors")].startswith("unreadable latent file (")
    assert len(err_lines(result)) == 7
    assert outputs(out, "") == ["good.png", "wide.png"] and leftovers(out) == []
    with Image.open(out / "wide.png") as img:
        assert img.size == (64, 48)


# --- info -----------------------------------------------------------------------------------------------------


def test_info_model_and_latent(encoded, tiny_model_file):
    result = cli("info", tiny_model_file)
    assert result.exit_code == 0, result.output
    assert re.search(r"kind\s+model", result.stdout)
    assert file_sha256(tiny_model_file) in result.stdout
    assert "4 x 8^2" in result.stdout and "dgae-t" in result.stdout

    result = cli("info", encoded / ALBUM_LATENTS[2])
    assert result.exit_code == 0, result.output
    assert re.search(r"kind\s+latent", result.stdout) and "(4, 8, 8)" in result.stdout
    assert "sub/deep/n01494475_hammerhead.JPEG" in result.stdout
    assert file_sha256(tiny_model_file) in result.stdout and "[333, 500]" in result.stdout


def test_info_errors(tmp_path, album):
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    nan = tmp_path / "nan.safetensors"
    save_file({"latent": torch.full((4, 8, 8), float("nan"))}, str(nan), metadata={"format": LATENT_FORMAT})
    text = tmp_path / "x.png"
    text.write_text("hello")
    cases = [
        (tmp_path / "missing.safetensors", "no such file or folder"),
        (album / "bsds.jpg", "not a safetensors file"),
        (text, "not a safetensors file"),
        (other, "neither a dgaetok model nor a latent file"),
        (nan, "NaN"),
    ]
    for path, message in cases:
        assert_user_error(cli("info", path), str(path), message)


def test_info_on_a_folder_summarises_its_latents(tmp_path, encoded, tiny_model_file, other_model_file):
    folder = copy_tree(encoded, tmp_path / "latents")
    write_latent(folder / "other.safetensors", torch.zeros(4, 6, 8), {"model_hash": file_sha256(other_model_file)})
    shutil.copy(tiny_model_file, folder / "sub" / "model.safetensors")
    (folder / "broken.safetensors").write_bytes(b"\x00" * 40)
    (folder / "cut.safetensors").write_bytes((encoded / ALBUM_LATENTS[0]).read_bytes()[:-10])
    result = cli("info", folder)
    assert result.exit_code == 0, result.output
    assert re.search(r"latents\s+6, made by 2 model\(s\)", result.stdout)
    assert re.search(rf"model {file_sha256(tiny_model_file)}\s+dgae-t f8 c4: 5 x \(4, 8, 8\)", result.stdout)
    assert re.search(rf"model {file_sha256(other_model_file)}\s+config unknown: 1 x \(4, 6, 8\)", result.stdout)
    flat = re.sub(r"\s+", "", result.stdout)  # long paths fold over lines
    assert f"modelfiles{folder}/sub/model.safetensors".replace(" ", "") in flat
    assert re.search(r"other\s+2 \.safetensors file\(s\) unreadable", result.stdout)
    assert f"{folder / 'broken.safetensors'}: not a safetensors file" in result.stdout
    assert f"{folder / 'cut.safetensors'}: unreadable latent file (cut short" in result.stdout


def test_help_names_arguments_and_describes_every_option():
    for command in ("encode", "decode", "info", "train", "bench rfid"):
        result = runner.invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0
        usage = next(line for line in result.output.splitlines() if "Usage:" in line)
        assert "{" not in usage and re.search(r"\[OPTIONS\] [A-Z]+", usage), usage
        assert "<bool>" not in result.output
    for command in ("encode", "decode"):
        help_text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        options = re.findall(r"│ [ *] +(--[a-z-]+)(?: +-\w)? +(?:<[^>]+>(?: \[[^]]+\])?)? *(\S.*?)? *│", help_text)
        described = {name for name, text in options if text}
        assert {"--overwrite", "--device", "--max-pixels", "--output"} <= described, options
    for command in ("weights fetch", "weights list"):  # the sub-app formats its commands' help alike
        result = runner.invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0 and "<bool>" not in result.output, result.output
        assert re.search(r"--cache +<path> +Cache folder", result.output), result.output


# --- the real console command -----------------------------------------------------------------------------------


def test_console_command_exit_codes_and_stderr(tmp_path, album, tiny_model_file):
    """The installed entry point: one stderr line and exit 2 for a user error; per-file lines and exit 1."""
    exe = shutil.which("dgaetok")
    cmd = [exe] if exe else [sys.executable, "-m", "dgaetok.cli"]
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(np.random.default_rng(0).bytes(3000))
    proc = subprocess.run([*cmd, "encode", str(album), "-o", str(tmp_path / "o1"), "--model", str(garbage)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"error: {garbage}: unreadable model file (")

    src = tmp_path / "src"
    write_image(src / "a.png", (64, 64))
    (src / "b.png").write_text("not an image")
    proc = subprocess.run([*cmd, "encode", str(src), "-o", str(tmp_path / "o2"), *model_args(tiny_model_file)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = without_progress([line for line in proc.stderr.splitlines() if line.strip()])
    assert lines[0].startswith("note: precision ")  # which precision the run computes in, and why
    assert lines[1:] == [f"failed: {src / 'b.png'}: {NOT_AN_IMAGE}",
                     "encode: 1 written, 0 already there (skipped), 1 failed"]
    assert outputs(tmp_path / "o2", "") == ["a.safetensors"]


def test_the_decode_bar_moves_with_every_step(monkeypatch):
    """The bar counts images x steps: a batch of two at 3 steps moves at each step, before any file is done."""
    import dgaetok.cli as cli_module
    from dgaetok.pipeline import Item

    seen = []

    class Recorder:
        def __init__(self, *columns, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def add_task(self, description, total, **fields):
            seen.append(("total", total))
            return 0

        def update(self, task, completed=None, **fields):
            seen.append(("at", completed))

    def items(on_step):
        for _ in range(3):
            on_step(2)  # one ODE step of a batch of two images
        yield Item(Path("a"), Path("a.png"), "done")
        yield Item(Path("b"), Path("b.png"), "done")

    monkeypatch.setattr(cli_module, "make_progress", Recorder)
    cli_module.run_job([None, None], items, "decode", steps=3)  # no failure: returns
    assert seen == [("total", 6), ("at", 2), ("at", 4), ("at", 6), ("at", 6), ("at", 6)]
