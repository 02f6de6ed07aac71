"""Unit tests for dgaetok.files: atomic writes, file discovery, preprocessing and the latent file format."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dgaetok.errors import InputError
from dgaetok.files import (IMAGE_SUFFIXES, LATENT_FORMAT, atomic_path, center_crop, find_files, open_image,
                           pad_to_multiple, padding_of, prepare_output_dir, read_latent, resize_shorter_side,
                           to_tensor, to_uint8, unpad, write_latent)


def leftovers(folder) -> list[str]:
    """Temporary files a writer may have left behind (ours end in .tmp, safetensors' start with .tmp)."""
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp"))


# --- atomic_path ----------------------------------------------------------------------------------------------


def test_atomic_path_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp != target
            tmp.write_bytes(b"half a file")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_failure_keeps_the_previous_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):  # an interrupt is not an Exception, and must clean up too
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new but half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_path_success_renames_with_normal_mode(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"data")
        os.chmod(tmp, 0o600)  # as safetensors does
    assert target.read_bytes() == b"data"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_path_writer_that_never_creates_the_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "out.bin"):
            pass  # nothing written: the rename must fail loudly, not create an empty output
    assert list(tmp_path.iterdir()) == []


# --- find_files -----------------------------------------------------------------------------------------------


def test_find_files_ignores_hidden_files_and_other_suffixes(tmp_path):
    for rel in ["b.jpg", "a.PNG", "sub/c.webp", "sub/deep/d.tiff", "e.tif", "f.bmp", "g.jpeg",
                ".hidden.jpg", ".cache/x.png", "sub/.thumbs/y.jpg", "notes.txt", "latent.safetensors",
                "photo.jpg.tmp", ".photo.jpg.1234abcd.tmp", "noext"]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (tmp_path / "folder.jpg").mkdir()  # a folder with an image suffix is not a file
    found = [p.relative_to(tmp_path).as_posix() for p in find_files(tmp_path, IMAGE_SUFFIXES)]
    assert found == ["a.PNG", "b.jpg", "e.tif", "f.bmp", "g.jpeg", "sub/c.webp", "sub/deep/d.tiff"]
    assert find_files(tmp_path, {".safetensors"}) == [tmp_path / "latent.safetensors"]


def test_find_files_inside_a_hidden_root_still_walks_it(tmp_path):
    root = tmp_path / ".data"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"x")
    assert find_files(root, IMAGE_SUFFIXES) == [root / "a.jpg"]


def test_find_files_single_file_and_missing_root(tmp_path):
    one = tmp_path / "one.jpg"
    one.write_bytes(b"x")
    assert find_files(one, IMAGE_SUFFIXES) == [one]
    with pytest.raises(InputError, match="no such file or folder") as err:
        find_files(tmp_path / "missing", IMAGE_SUFFIXES)
    assert str(tmp_path / "missing") in str(err.value)


# --- resizing and cropping ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, resized, box",
    [
        ((500, 375), (85, 64), (10, 0, 74, 64)),  # landscape: width follows the aspect ratio, crop is centered
        ((375, 500), (64, 85), (0, 10, 64, 74)),  # portrait
        ((40, 30), (85, 64), (10, 0, 74, 64)),  # tiny: upscaled
        ((40, 40), (64, 64), (0, 0, 64, 64)),  # tiny square
        ((64, 64), (64, 64), (0, 0, 64, 64)),  # already the size
        ((2000, 65), (1969, 64), (952, 0, 1016, 64)),  # extreme panorama
    ],
)
def test_resize_and_center_crop_sizes(size, resized, box):
    img = Image.new("RGB", size, (10, 20, 30))
    assert resize_shorter_side(img, 64).size == resized
    out, crop = center_crop(img, 64, 8)
    assert out.size == (64, 64)
    assert crop.source_size == size and crop.resized_size == resized and crop.box == box


def test_resize_keeps_an_image_of_the_right_size_untouched():
    img = Image.new("RGB", (64, 90))
    assert resize_shorter_side(img, 64) is img


def test_center_crop_takes_the_middle():
    arr = np.zeros((64, 192, 3), np.uint8)
    arr[:, 64:128] = 255  # white middle third
    out, _ = center_crop(Image.fromarray(arr), 64, 8)
    assert (np.asarray(out) == 255).all()


def test_keep_size_uses_the_whole_image_padded_by_mirroring():
    img = Image.new("RGB", (72, 48))
    out, crop = center_crop(img, 64, 8, keep_size=True)
    assert out is img and crop.box == (0, 0, 72, 48) and crop.resized_size == (72, 48)
    assert crop.padding == (0, 0, 0, 0)
    arr = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    out, crop = center_crop(Image.fromarray(arr), 64, 8, keep_size=True)
    assert out.size == (56, 40) and crop.padding == (0, 0, 6, 0) and crop.source_size == (50, 40)
    padded = np.asarray(out)
    assert np.array_equal(padded[:, :50], arr) and np.array_equal(padded[:, 50:], arr[:, 48:42:-1])


@pytest.mark.parametrize("size, padded, padding", [
    ((1, 1), (8, 8), (0, 0, 7, 7)), ((7, 3000), (8, 3000), (0, 0, 1, 0)), ((3000, 7), (3000, 8), (0, 0, 0, 1)),
    ((2, 17), (16, 32), (0, 0, 14, 15)),
])
def test_every_size_pads_even_when_the_padding_is_longer_than_the_side(size, padded, padding):
    arr = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out, crop = pad_to_multiple(Image.fromarray(arr), 16 if size == (2, 17) else 8)
    assert out.size == padded and crop.padding == padding
    back = unpad(torch.from_numpy(np.array(out)).permute(2, 0, 1), crop.padding)
    assert np.array_equal(back.permute(1, 2, 0).numpy(), arr)
    if size == (1, 1):
        assert (np.asarray(out) == arr[0, 0]).all()  # a single pixel mirrors into itself


def test_padding_metadata_is_checked_against_the_image():
    assert padding_of({}, (40, 56)) == (0, 0, 0, 0)  # latents from before padding was recorded
    assert padding_of({"padding": "[0, 0, 6, 0]"}, (40, 56)) == (0, 0, 6, 0)
    for bad in ("[0, 0, 56, 0]", "[1, 2]", "[0, -1, 0, 0]", "nonsense"):
        with pytest.raises(InputError, match=r"^x.safetensors: latent metadata has a padding .* that does not fit"):
            padding_of({"padding": bad}, (40, 56), "x.safetensors")


# --- tensors --------------------------------------------------------------------------------------------------


def test_to_tensor_to_uint8_round_trip_is_exact():
    values = np.arange(256, dtype=np.uint8)
    arr = np.stack(np.meshgrid(values, values[::-1]), -1)[..., [0, 1, 0]]  # 256x256x3, every value in each channel
    x = to_tensor(Image.fromarray(np.ascontiguousarray(arr)))
    assert x.shape == (3, 256, 256) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    back = to_uint8(x)
    assert back.dtype == torch.uint8 and back.shape == (256, 256, 3)
    assert np.array_equal(back.numpy(), arr)


def test_to_uint8_clamps_and_batches():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0]).view(1, 1, 1, 5).expand(2, 3, 1, 5)
    out = to_uint8(x)
    assert out.shape == (2, 1, 5, 3)
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


# --- reading images -------------------------------------------------------------------------------------------


def test_open_image_converts_modes_to_rgb(tmp_path):
    for mode, fill in [("L", 7), ("RGBA", (1, 2, 3, 4)), ("P", 3), ("CMYK", (0, 0, 0, 0))]:
        path = tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        Image.new(mode, (9, 7), fill).save(path)
        img = open_image(path)
        assert img.mode == "RGB" and img.size == (9, 7)


def test_open_image_scales_16_bit_grey_instead_of_clipping(tmp_path):
    arr = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    path = tmp_path / "grey16.png"
    Image.fromarray(arr).save(path)
    out = np.asarray(open_image(path))
    assert np.array_equal(out[..., 0], (arr >> 8).astype(np.uint8))


def test_open_image_errors_name_the_file(tmp_path, shared_data):
    real = next((shared_data / "eval" / "imagenet-val500").glob("*.JPEG")).read_bytes()
    cases = {
        "empty.jpg": (b"", "empty file"),
        "text.png": (b"hello, not a picture\n", "not an image file"),
        "random.jpg": (np.random.default_rng(0).bytes(4000), "not an image file"),
        "half.jpg": (real[: len(real) // 2], "truncated"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(InputError, match=message) as err:
            open_image(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


# --- latent files ---------------------------------------------------------------------------------------------


def test_latent_round_trip(tmp_path):
    z = torch.randn(4, 6, 8)
    path = tmp_path / "z.safetensors"
    write_latent(path, z, {"source": "a.jpg"})
    latent, meta = read_latent(path)
    assert torch.equal(latent, z)
    assert meta == {"format": LATENT_FORMAT, "source": "a.jpg"}
    assert [p.name for p in tmp_path.iterdir()] == ["z.safetensors"]


@pytest.mark.parametrize(
    "tensor, message",
    [
        (torch.tensor([[[float("nan")]]]).expand(4, 8, 8).contiguous(), "NaN"),
        (torch.zeros(4, 8, 8).index_fill_(1, torch.tensor([3]), float("inf")), "infinite"),
        (torch.zeros(8, 8), r"shape \(8, 8\)"),
        (torch.zeros(1, 4, 8, 8), r"shape \(1, 4, 8, 8\)"),
        (torch.zeros(0), r"shape \(0,\)"),
    ],
    ids=["nan", "inf", "2d", "4d", "1d"],
)
def test_read_latent_rejects_bad_tensors(tmp_path, tensor, message):
    path = tmp_path / "bad.safetensors"
    save_file({"latent": tensor}, str(path), metadata={"format": LATENT_FORMAT})
    with pytest.raises(InputError, match=message) as err:
        read_latent(path)
    assert str(path) in str(err.value)


def test_read_latent_rejects_other_files(tmp_path):
    other = tmp_path / "weights.safetensors"
    save_file({"latent": torch.zeros(4, 8, 8)}, str(other))  # right key, but no dgaetok format tag
    with pytest.raises(InputError, match="not a dgaetok latent file"):
        read_latent(other)
    wrong_key = tmp_path / "key.safetensors"
    save_file({"z": torch.zeros(4, 8, 8)}, str(wrong_key), metadata={"format": LATENT_FORMAT})
    with pytest.raises(InputError, match="not a dgaetok latent file"):
        read_latent(wrong_key)
    for name, data in [("garbage.safetensors", b"\x00garbage" * 50), ("empty.safetensors", b"")]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(InputError, match="unreadable latent file") as err:
            read_latent(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError, match="unreadable latent file"):
        read_latent(tmp_path / "missing.safetensors")


# --- output folder --------------------------------------------------------------------------------------------


def test_prepare_output_dir(tmp_path):
    assert prepare_output_dir(tmp_path / "a" / "b").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the write probe is gone
    afile = tmp_path / "file"
    afile.write_text("keep me")
    with pytest.raises(InputError, match="is a file, not a folder"):
        prepare_output_dir(afile)
    with pytest.raises(InputError, match="not writable"):
        prepare_output_dir(afile / "sub")
    assert afile.read_text() == "keep me"
