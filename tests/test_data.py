"""Training data: epoch permutations, per-draw augmentation as pure functions, packed paths, shard sampling."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dgaetok.data import DeviceImages, DrawSampler, ImageFolder, PathTable
from dgaetok.errors import InputError
from dgaetok.files import to_tensor


def synthetic(n: int, **kw) -> ImageFolder:
    """A folder of ``n`` paths that do not exist: everything but decoding works on it."""
    return ImageFolder("synthetic", 32, files=[f"/nowhere/c{i % 7}/{i}.jpg" for i in range(n)], **kw)


def test_an_epoch_visits_every_file_once_in_a_seeded_order():
    data = synthetic(50)
    epoch0 = [next(data.candidates(k)) for k in range(50)]
    epoch1 = [next(data.candidates(k)) for k in range(50, 100)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(50))
    assert epoch0 != epoch1 and epoch0 != list(range(50))
    assert epoch0 == [next(synthetic(50).candidates(k)) for k in range(50)]  # a pure function of (seed, draw)
    assert epoch0 != [next(synthetic(50, seed=1).candidates(k)) for k in range(50)]
    # the permutation is made once per epoch and cached (two epochs: a batch may straddle the boundary)
    assert data.order(1) is data.order(1) and data.order(0) is not data.order(1)
    data.order(2)
    assert sorted(data._orders) == [1, 2]
    # after an unreadable file come the next ones in the epoch's order
    assert list(data.candidates(3))[:3] == [epoch0[3], epoch0[4], epoch0[5]]
    assert len(list(data.candidates(49))) == 50 and list(data.candidates(49))[1] == epoch0[0]


def test_augmentation_is_a_pure_function_of_the_draw_and_size():
    data = synthetic(10)
    augs = [data.augmentation(k, (50, 40)) for k in range(200)]
    assert augs == [synthetic(10).augmentation(k, (50, 40)) for k in range(200)]
    assert all(0 <= a.left <= 50 - 32 and 0 <= a.top <= 40 - 32 for a in augs)
    assert {a.flip for a in augs} == {True, False}
    assert len({(a.left, a.top) for a in augs}) > 50
    assert data.augmentation(0, (32, 32)) == data.augmentation(0, (32, 32))
    assert {(a.left, a.top) for a in (data.augmentation(k, (32, 32)) for k in range(20))} == {(0, 0)}


def draw_by_hand(data: ImageFolder, draw: int, index: int) -> torch.Tensor:
    """What ``data[draw]`` must be when file ``index`` is the one read: its crop and flip, from the pure methods."""
    img = data.load(index)
    aug = data.augmentation(draw, img.size)
    x = to_tensor(img.crop((aug.left, aug.top, aug.left + data.crop, aug.top + data.crop)))
    return x.flip(-1) if aug.flip else x


def test_getitem_is_load_then_the_draws_crop_and_flip(train_photos):
    data = ImageFolder(train_photos, 48, crop=32, seed=3)
    for draw in range(6):
        index = next(data.candidates(draw))
        assert min(data.load(index).size) == 48
        assert torch.equal(data[draw], draw_by_hand(data, draw, index))


def test_an_unreadable_file_is_skipped_with_a_warning(train_photos):
    (train_photos / "broken.jpg").write_bytes(b"not a jpeg")
    data = ImageFolder(train_photos, 32)
    bad = next(i for i in range(len(data)) if data.files[i].name == "broken.jpg")
    draw = int(np.flatnonzero(data.order(0) == bad)[0])
    with pytest.warns(UserWarning, match="broken.jpg: not an image file"):
        x = data[draw]
    assert torch.equal(x, draw_by_hand(data, draw, list(data.candidates(draw))[1]))


def test_a_folder_without_images_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no images found"):
        ImageFolder(tmp_path, 32)
    with pytest.raises(InputError, match="synthetic: no images found"):
        ImageFolder("synthetic", 32, files=[])


def test_path_table_round_trips_any_name(tmp_path):
    names = ["a.jpg", "dir with space/b.png", "ünï/c.JPEG", os.fsdecode(b"\xffbad\xfe.jpg")]
    table = PathTable([tmp_path / n for n in names])
    assert len(table) == 4
    assert list(table) == [tmp_path / n for n in names]
    assert table[-1] == tmp_path / names[-1] and os.fsencode(table[3]).endswith(b"\xffbad\xfe.jpg")
    with pytest.raises(IndexError):
        table[4]


def test_non_utf8_file_names_train(tmp_path, train_photos):
    if os.uname().sysname == "Darwin":
        pytest.skip("macOS file systems reject names that are not UTF-8")
    root = tmp_path / "odd"
    root.mkdir()
    src = next(train_photos.iterdir())
    shutil.copy(src, os.fsencode(root) + b"/\xffphoto.jpg")
    data = ImageFolder(root, 32)
    assert len(data) == 1 and data[0].shape == (3, 32, 32)


def test_shards_make_accumulation_and_processes_see_the_same_images():
    """One process with accum K takes, micro-batch by micro-batch, the draws that K processes take."""
    take = lambda s, n: [next(it) for it in [iter(s)] for _ in range(n)]  # noqa: E731
    one = take(DrawSampler(3, start_step=2, accum=4), 3 * 4 * 2)
    ranks = [take(DrawSampler(3, start_step=2, rank=r, world=4), 3 * 2) for r in range(4)]
    steps = [one[:12], one[12:]]
    for s, batch in enumerate(steps):
        assert [batch[3 * j:3 * j + 3] for j in range(4)] == [ranks[r][3 * s:3 * s + 3] for r in range(4)]
    # two processes with accum 2 split the same way
    two = [take(DrawSampler(3, start_step=2, rank=r, world=2, accum=2), 6) for r in range(2)]
    assert two[0] + two[1] == one[:12]
    # with accum 1 process rank takes draws rank, rank + world, ... (unchanged from before accumulation)
    assert take(DrawSampler(2, rank=1, world=3), 6) == [1, 4, 7, 10, 13, 16]
    # all draws of a step are distinct and the steps tile the draw numbers
    assert sorted(take(DrawSampler(3, accum=4), 12 * 5)) == list(range(60))
    assert DrawSampler(3, rank=1, world=2, accum=2).draws(2) == one[6:12]


def test_device_images_make_the_folders_batches(train_photos):
    """(tests/test_cuda.py checks the same on a GPU.)"""
    device = "cpu"
    (train_photos / "broken.jpg").write_bytes(b"not a jpeg")  # skipped the same way on both paths
    data = ImageFolder(train_photos, 48, crop=32, seed=3)
    with pytest.warns(UserWarning, match="broken.jpg"):
        resident = DeviceImages(data, device, workers=2)
    assert resident.images[0].dtype == torch.uint8 and resident.images[0].device.type == device
    bad = next(i for i in range(len(data)) if data.files[i].name == "broken.jpg")
    draws = DrawSampler(4, start_step=3).draws(3) + [int(np.flatnonzero(data.order(0) == bad)[0])]
    with pytest.warns(UserWarning, match="broken.jpg"):
        expected = torch.stack([data[d] for d in draws])
    got = resident.batch(draws)
    assert got.device.type == device and got.dtype == torch.float32
    assert torch.equal(got.cpu(), expected)  # the same files, crops and flips, bit for bit


def test_device_images_need_a_readable_image(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(InputError, match="no readable image"):
        DeviceImages(ImageFolder(tmp_path, 32), "cpu")
