"""Unit tests for dgaetok.files: atomic writes, file discovery, preprocessing and the latent file format."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dgaetok.errors import InputError, TooLarge
from dgaetok.files import (IMAGE_SUFFIXES, LATENT_FORMAT, atomic_path, center_crop, describe_failure, display_name,
                           find_files, is_out_of_memory, open_image, pad_to_multiple, padding_of, prepare_output_dir,
                           read_latent, resize_shorter_side, to_tensor, to_uint8, unpad, walk_files, write_latent)


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


def old_find_files(root, suffixes):
    """The pathlib walk find_files replaced: the reference for its order and its choices."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def test_find_files_lists_what_the_pathlib_walk_listed_in_the_same_order(tmp_path):
    rng = np.random.default_rng(0)
    names = ["a", "a b", "a.b", "A", "b-1", "b_1", "b1", "z", "Z.x", "ä", "日本"]
    for i in range(300):
        depth = rng.integers(0, 4)
        parts = [str(rng.choice(names)) for _ in range(depth)]
        name = f"{rng.choice(names)}{rng.choice(['.jpg', '.PNG', '.txt', '.jpeg', ''])}"
        path = tmp_path.joinpath(*parts, name)
        if any(p.is_file() for p in path.parents) or path.is_dir():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    found = find_files(tmp_path, IMAGE_SUFFIXES)
    assert len(found) > 50 and found == old_find_files(tmp_path, IMAGE_SUFFIXES)
    assert walk_files(tmp_path, IMAGE_SUFFIXES) == [str(p) for p in found]


def test_find_files_follows_linked_folders_once_and_survives_loops(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    (outside / "deep").mkdir(parents=True)
    for path in (root / "a.jpg", root / "sub" / "b.jpg", outside / "c.jpg", outside / "deep" / "d.jpg"):
        path.write_bytes(b"x")
    (root / "link").symlink_to(outside)
    (root / "link2").symlink_to(outside)  # the same folder again: listed once, under its first name
    (root / "sub" / "up").symlink_to(root)  # a loop
    (outside / "back").symlink_to(outside / "deep")  # reached twice from inside the linked folder too
    (root / "file-link.jpg").symlink_to(root / "a.jpg")  # a link to a file is a file
    (root / "broken.jpg").symlink_to(root / "missing.jpg")  # listed, so that reading it fails with a message
    found = [p.relative_to(root).as_posix() for p in find_files(root, IMAGE_SUFFIXES)]
    assert found == ["a.jpg", "broken.jpg", "file-link.jpg", "link/back/d.jpg", "link/c.jpg", "sub/b.jpg"]


def test_find_files_reports_folders_it_cannot_read(tmp_path, monkeypatch):
    (tmp_path / "locked").mkdir()
    (tmp_path / "open").mkdir()
    (tmp_path / "open" / "a.jpg").write_bytes(b"x")
    real_scandir = os.scandir

    def scandir(path):  # root reads any folder, so the refusal is simulated
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    errors = []
    assert find_files(tmp_path, IMAGE_SUFFIXES, errors) == [tmp_path / "open" / "a.jpg"]
    assert errors == [f"{tmp_path / 'locked'}: cannot read the folder (Permission denied)"]


def test_names_that_are_not_utf8_are_kept_and_printed_escaped(tmp_path):
    name = os.fsdecode(b"caf\xe9 \xff.jpg")  # Latin-1 bytes, as an old camera or a zip may leave them
    folder = tmp_path / os.fsdecode(b"dir\xfe")
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / name, format="JPEG")
    [found] = find_files(tmp_path, IMAGE_SUFFIXES)
    assert found == folder / name and open_image(found).size == (8, 8)
    assert display_name(found) == f"{tmp_path}/dir\\xfe/caf\\xe9 \\xff.jpg"
    display_name(found).encode("utf-8")  # printable
    write_latent(folder / "z\udcff.safetensors", torch.ones(4, 2, 2), {"source": display_name(name)})
    latent, meta = read_latent(folder / "z\udcff.safetensors")
    assert torch.equal(latent, torch.ones(4, 2, 2)) and meta["source"] == "caf\\xe9 \\xff.jpg"
    (folder / "x\udcff.png").write_bytes(b"not an image")
    with pytest.raises(InputError) as err:
        open_image(folder / "x\udcff.png")
    assert str(err.value).startswith(f"{tmp_path}/dir\\xfe/x\\xff.png: ")


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


def test_float_and_wide_integer_images_are_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    cases = {"unit.tif": ramp, "bytes.tif": ramp * 255, "int16.tif": (ramp * 65535).astype(np.int32),
             "int8.tif": (ramp * 255).astype(np.int32)}
    for name, values in cases.items():
        Image.fromarray(values).save(tmp_path / name)
        out = np.asarray(open_image(tmp_path / name))[..., 0].astype(int)
        assert np.abs(out - np.round(ramp * 255)).max() <= 1, name  # 0 .. 255, not black / white
    for values, message in [(ramp * 300, r"values in \[0, 300\]; expected 0-1 or 0-255"), (ramp - 0.5, "-0.5"),
                            (np.full((4, 4), np.inf, np.float32), "NaN or infinite"),
                            (np.full((4, 4), 70000, np.int32), "expected 8 or 16 bits")]:
        Image.fromarray(values).save(tmp_path / "bad.tif")
        with pytest.raises(InputError, match=message):
            open_image(tmp_path / "bad.tif")


def test_each_failure_gets_its_own_label(tmp_path, monkeypatch):
    (tmp_path / "folder.jpg").mkdir()
    with pytest.raises(InputError, match=r"folder.jpg: cannot read \(Is a directory\)"):
        open_image(tmp_path / "folder.jpg")
    with pytest.raises(InputError, match=r"missing.jpg: cannot read \(No such file or directory\)"):
        open_image(tmp_path / "missing.jpg")
    path = tmp_path / "big.png"
    Image.new("L", (200, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # PIL refuses twice its warning limit: 10000 < 20000
    with pytest.raises(InputError, match=r"big.png: refused as a possible decompression bomb \(Image size"):
        open_image(path)
    assert describe_failure(path, MemoryError()).startswith(f"{path}: MemoryError: MemoryError (out of memory")
    assert describe_failure(path, RuntimeError("bad shape\nmore")) == f"{path}: RuntimeError: bad shape"
    assert describe_failure(path, InputError("as it was")) == "as it was"


def test_the_pixel_budget_is_checked_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "thin.png"
    Image.new("L", (1, 20000)).save(path)  # 121 bytes: 64 x 1.28M pixels once its shorter side is 64
    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda img: decoded.append(img) or real_load(img))
    with pytest.raises(TooLarge) as err:
        open_image(path, 1_000_000, shorter_side=64)
    assert str(err.value) == (f"{path}: the 1x20000 image resized to 64 px on its shorter side is 64x1280000 "
                              "(81.9M pixels), over the pixel budget of 1.0M per image; raise it with --max-pixels")
    assert err.value.pixels == 64 * 1_280_000 and err.value.budget == 1_000_000 and decoded == []
    with pytest.raises(TooLarge, match=r"the image is 1x20000 \(20,000 pixels\), over the pixel budget of 19,999"):
        open_image(path, 19_999)
    assert open_image(path, 20_000).size == (1, 20000) and decoded
    assert open_image(path).size == (1, 20000)  # no budget


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


def test_read_latent_checks_the_header_before_loading_the_tensor(tmp_path):
    path = tmp_path / "z.safetensors"
    write_latent(path, torch.zeros(4, 6, 8), {"model_hash": "abc"})
    seen = []

    def refuse(shape, meta):
        seen.append((shape, meta["model_hash"]))
        raise InputError("refused")

    with pytest.raises(InputError, match="refused"):
        read_latent(path, refuse)
    assert seen == [((4, 6, 8), "abc")]
    path.write_bytes(path.read_bytes()[:-4])  # a latent cut short: the header is fine, the data is not
    with pytest.raises(InputError, match="unreadable latent file"):
        read_latent(path)


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


@pytest.mark.parametrize("exc, expected", [
    (MemoryError(), True),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), True),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 400000000000 bytes"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
    (RuntimeError("could not create a primitive"), True),  # oneDNN under a memory limit
    (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED"), False),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"), False),
    (ValueError("bad value"), False),
])
def test_is_out_of_memory(exc, expected):
    assert is_out_of_memory(exc) is expected
