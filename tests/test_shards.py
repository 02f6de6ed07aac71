"""Latent datasets: `encode --shards` (one process, two under torchrun, resumed, from tar archives), the shard
format, and `data.LatentDataset` feeding a DataLoader."""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from dgaetok.cli import app
from dgaetok.data import LatentDataset
from dgaetok.errors import InputError
from dgaetok.files import eval_crop, find_files, IMAGE_SUFFIXES
from dgaetok.models import load_model
from dgaetok.pipeline import encode_shards
from dgaetok.shards import read_dataset, shard_name
from dgaetok.sources import open_source
from dgaetok.stats import measure

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture()
def classes(tmp_path, shared_data) -> Path:
    """Nine real photos: three in each of two class folders, two directly in the root, and one broken file."""
    root = tmp_path / "classes"
    for name in ("urban100", "bsds500"):
        (root / name).mkdir(parents=True)
        for path in sorted((shared_data / "train" / name).rglob("*.jpg"))[:3]:
            shutil.copy(path, root / name / path.name)
    for path in sorted((shared_data / "train" / "sun_hays80").rglob("*.jpg"))[:2]:
        shutil.copy(path, root / path.name)
    (root / "bsds500" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def encode(src: Path, out: Path, model_file: Path, *extra) -> list:
    model = load_model(model_file)
    return list(encode_shards(model, open_source(src), out, *extra))


def test_shards_hold_center_crop_latents_labels_and_statistics(tmp_path, classes, tiny_model_file):
    out = tmp_path / "out"
    items = encode(classes, out, tiny_model_file, 3, True, "float32", 2)
    files = find_files(classes, IMAGE_SUFFIXES)
    assert [i.status for i in items].count("failed") == 1 and len(items) == len(files) == 9
    info = read_dataset(out)
    assert info["classes"] == ["bsds500", "urban100"]  # sorted first-level folders, as torchvision's ImageFolder
    assert [s["images"] for s in info["shards"]] == [3, 2, 3] and info["images"] == 8
    assert [f["file"] for f in info["failed"]] == [str(classes / "bsds500" / "broken.jpg")]

    from torchvision.datasets import ImageFolder
    class_of = {Path(p).name: c for p, c in ImageFolder(str(classes), is_valid_file=lambda p: "broken" not in p).samples}
    model = load_model(tiny_model_file)
    good = [p for p in files if p.name != "broken.jpg"]
    x = torch.stack([eval_crop(p, 64) for p in good])
    with torch.no_grad():
        want = model.encode(x).latent_dist.mode()
        want_flip = model.encode(x.flip(-1)).latent_dist.mode()
    got = [tensors(out / s["file"]) for s in info["shards"]]
    index = torch.cat([g["index"] for g in got])
    assert index.tolist() == [files.index(p) for p in good]  # positions in the sorted file list
    torch.testing.assert_close(torch.cat([g["latents"] for g in got]), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([g["latents_flip"] for g in got]), want_flip, atol=1e-5, rtol=1e-5)
    assert torch.cat([g["labels"] for g in got]).tolist() == [class_of.get(p.name, -1) if p.parent != classes else -1
                                                              for p in good]
    # the statistics are `dgaetok stats`'s numbers over the same images
    stats = measure(model, good)
    assert info["latent_stats"]["mean"] == pytest.approx(stats.mean, rel=1e-6, abs=1e-7)
    assert info["latent_stats"]["std"] == pytest.approx(stats.std, rel=1e-6)
    assert info["latent_stats"]["images"] == 8 and info["model"]["hash"] == model.file_hash


def test_resume_keeps_finished_shards_and_redoes_an_interrupted_one(tmp_path, classes, tiny_model_file,
                                                                    monkeypatch):
    whole = tmp_path / "whole"
    encode(classes, whole, tiny_model_file, 2)
    model = load_model(tiny_model_file)
    calls, real = [0], model.encode

    def interrupted(*args, **kwargs):  # Ctrl-C while the second shard is being encoded
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "out"
    monkeypatch.setattr(model, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        list(encode_shards(model, open_source(classes), out, 2))
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.safetensors"]  # nothing half-written
    first = (out / "shard-00000.safetensors").stat()
    monkeypatch.setattr(model, "encode", real)
    items = list(encode_shards(model, open_source(classes), out, 2))
    assert [i.status for i in items[:2]] == ["skipped", "skipped"]
    assert (out / "shard-00000.safetensors").stat().st_ino == first.st_ino  # kept, not rewritten
    for path in whole.iterdir():
        assert path.read_bytes() == (out / path.name).read_bytes(), path.name

    # a shard made with other settings is refused, unless everything is redone
    with pytest.raises(InputError, match=r"other settings \(dtype 'float32' -> 'bf16'\)"):
        next(encode_shards(model, open_source(classes), out, 2, dtype="bf16"))
    # a changed source redoes the shards whose images changed, and only those; a shard left over is removed
    files = find_files(classes, IMAGE_SUFFIXES)
    gone = files.index(classes / "urban100" / sorted(os.listdir(classes / "urban100"))[0])
    files[gone].unlink()
    before = {p.name: p.stat().st_ino for p in out.glob("shard-*")}
    assert len(before) == 5
    list(encode_shards(model, open_source(classes), out, 2))
    after = {p.name: p.stat().st_ino for p in out.glob("shard-*")}
    assert [k for k in sorted(after) if before[k] != after[k]] == [shard_name(k) for k in range(gone // 2, 4)]
    assert len(after) == 4 and read_dataset(out)["images"] == 7


def test_two_processes_write_the_same_bytes_as_one(tmp_path, classes, tiny_model_file):
    """torchrun with 2 processes on the CPU (gloo) and a plain run: byte-identical shards and dataset.json, at one
    thread per process in both (oneDNN's results depend on the thread count)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    args = ["encode", str(classes), "--shards", "2", "--flip", "--batch-size", "2", "--model", str(tiny_model_file)]
    one = subprocess.run([sys.executable, "-m", "dgaetok.cli", *args, "-o", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "dgaetok.cli", *args, "-o", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 1 and "wrote" in one.stderr, one.stderr  # 1: the broken file
    assert "encode (rank 1/2): 4 written" in two.stderr and "encode (rank 0/2): 4 written" in two.stderr, two.stderr
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(names) == 6
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_latent_dataset_normalises_flips_and_feeds_a_data_loader(tmp_path, classes, tiny_model_file):
    out, half = tmp_path / "out", tmp_path / "bf16"
    encode(classes, out, tiny_model_file, 3, True)
    encode(classes, half, tiny_model_file, 3, True, "bf16")
    info = read_dataset(out)
    raw = [tensors(out / s["file"]) for s in info["shards"]]
    z, z_flip = torch.cat([r["latents"] for r in raw]), torch.cat([r["latents_flip"] for r in raw])
    labels = torch.cat([r["labels"] for r in raw])
    mean = torch.tensor(info["latent_stats"]["mean"]).view(-1, 1, 1)
    std = torch.tensor(info["latent_stats"]["std"]).view(-1, 1, 1)

    plain = LatentDataset(out, normalize=False)
    assert len(plain) == 8 and plain.classes == ["bsds500", "urban100"]
    assert all(torch.equal(plain[i][0], z[i]) and plain[i][1] == labels[i] for i in range(8))
    normed = LatentDataset(out)
    torch.testing.assert_close(normed[5][0], (z[5] - mean) / std)
    assert normed[-1][1] == labels[-1]
    with pytest.raises(IndexError):
        normed[8]

    torch.manual_seed(0)
    flipped = LatentDataset(out, normalize=False, flip=True)
    drawn, _ = flipped.batch(list(range(8)) * 8)
    is_flip = [torch.equal(d, z_flip[i % 8]) for i, d in enumerate(drawn)]
    assert all(f or torch.equal(d, z[i % 8]) for i, (f, d) in enumerate(zip(is_flip, drawn)))
    assert 16 < sum(is_flip) < 48  # about half of 64
    with pytest.raises(InputError, match="no dataset.json"):
        LatentDataset(tmp_path / "nothing")
    encode(classes, tmp_path / "noflip", tiny_model_file, 3)
    with pytest.raises(InputError, match="without --flip"):
        LatentDataset(tmp_path / "noflip", flip=True)

    # bf16 shards hold the float32 latents rounded to bf16
    assert torch.equal(LatentDataset(half, normalize=False).batch(range(8))[0], z.bfloat16().float())
    # a DataLoader takes whole batches through __getitems__, from worker processes too; the memory maps are not
    # pickled into a worker
    assert len(pickle.dumps(normed)) < 20_000
    loader = torch.utils.data.DataLoader(normed, batch_size=3, shuffle=False, num_workers=1)
    xs, ys = zip(*loader)
    torch.testing.assert_close(torch.cat(xs), (z - mean) / std)
    assert torch.cat(ys).tolist() == labels.tolist()


def test_a_replaced_or_cut_shard_is_refused(tmp_path, classes, tiny_model_file):
    out = tmp_path / "out"
    encode(classes, out, tiny_model_file, 4)
    shard = out / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(InputError, match="shard-00001.safetensors: cut short"):
        LatentDataset(out)
    shutil.copy(out / "shard-00000.safetensors", shard)  # 4 latents where dataset.json says 4... and 4 labels
    info = json.loads((out / "dataset.json").read_text())
    info["shards"][1]["images"] = 3
    (out / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(InputError, match="dataset.json says"):
        LatentDataset(out)


def webdataset(path: Path, samples: list[tuple[str, bytes, bytes | None]], cut: int = 0) -> Path:
    """A tar of ``key.jpg`` (or the suffix the key has) and ``key.cls`` members; ``cut`` bytes cut off its end."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data, cls in samples:
            for member, payload in ((name, data), (name.rsplit(".", 1)[0] + ".cls", cls)):
                if payload is None:
                    continue
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    data = buf.getvalue()
    path.write_bytes(data[:len(data) - cut] if cut else data)
    return path


def test_tar_archives_encode_as_their_images_do(tmp_path, classes, tiny_model_file):
    files = [p for p in find_files(classes, IMAGE_SUFFIXES) if p.name != "broken.jpg"]
    tars = tmp_path / "tars"
    tars.mkdir()
    samples = [(f"{k:06d}.{p.suffix[1:]}", p.read_bytes(), str(k % 3).encode()) for k, p in enumerate(files)]
    webdataset(tars / "part-000.tar", samples[:5])
    webdataset(tars / "part-001.tar", samples[5:])
    from_tars, from_files = tmp_path / "a", tmp_path / "b"
    assert not [i for i in encode(tars, from_tars, tiny_model_file, 3) if i.status != "done"]
    encode(classes, from_files, tiny_model_file, 3)
    a = [tensors(from_tars / s["file"]) for s in read_dataset(from_tars)["shards"]]
    b = [tensors(from_files / s["file"]) for s in read_dataset(from_files)["shards"]]
    assert torch.equal(torch.cat([t["latents"] for t in a]), torch.cat([t["latents"] for t in b]))
    assert torch.cat([t["labels"] for t in a]).tolist() == [k % 3 for k in range(8)]
    assert torch.cat([t["index"] for t in a]).tolist() == list(range(8))
    assert read_dataset(from_tars)["classes"] == []


def test_cli_shard_options(tmp_path, classes, tiny_model_file):
    def cli(*args):
        return runner.invoke(app, ["encode", str(classes), "-o", str(tmp_path / "o"), "--model",
                                   str(tiny_model_file), "--device", "cpu", *map(str, args)])

    for args, message in ((("--flip",), "need --shards"), (("--shards", 4, "--sample"), "--sample does not go"),
                          (("--shards", 4, "--keep-size"), "--keep-size does not go"),
                          (("--shards", 4, "--dtype", "fp8"), "choose one of float32, bf16")):
        result = cli(*args)
        assert result.exit_code == 2 and message in result.stderr, result.stderr
    result = cli("--shards", 4, "--dtype", "bf16")
    assert result.exit_code == 1 and "8 images in 3 shards, 1 failed (listed in dataset.json)" in result.stderr
    assert tensors(tmp_path / "o" / "shard-00000.safetensors")["latents"].dtype == torch.bfloat16
    result = runner.invoke(app, ["encode", str(classes), "-o", str(tmp_path / "five"), "--model",
                                 str(tiny_model_file), "--shards", "4", "--limit", "5"])
    assert result.exit_code == 0 and "5 images in 2 shards, 0 failed" in result.stderr, result.stderr


def test_the_documented_training_loop_runs_as_written(tmp_path, classes, tiny_model_file):
    """docs/latent-datasets.md's DiT loop and sampling, with its settings line and model file swapped for tiny
    ones."""
    import re

    text = (REPO / "docs" / "latent-datasets.md").read_text()
    train, sample = re.findall(r"```python\n(.*?)```", text, re.S)
    settings = 'DATA, DIT, EPOCHS, BATCH, WORKERS = "/data/imagenet-latents", "DiT-B/2", 80, 256, 8'
    assert settings in train and '"weights/default.safetensors"' in sample
    for path in classes.glob("*.jpg"):  # images outside class folders have no class (label -1)
        path.unlink()
    encode(classes, tmp_path / "latents", tiny_model_file, 3, True)
    script = train.replace(settings, 'DATA, DIT, EPOCHS, BATCH, WORKERS = "latents", "DiT-T/2", 2, 4, 1') + \
        sample.replace('"weights/default.safetensors"', repr(str(tiny_model_file))).replace("steps=50", "steps=2") + \
        "assert images.shape == (8, 3, 64, 64) and torch.isfinite(images).all()\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "dit.pt").is_file()
