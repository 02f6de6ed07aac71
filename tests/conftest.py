"""Shared fixtures: the project's real data beside the clone, and tiny seeded models saved as model files."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dgaetok.models import DGAE, DGAE_T, save_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"{SHARED} is missing: tests read the project's data from ../shared/data beside the clone")
    return SHARED


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory) -> Path:
    """A seeded, untrained dgae-t (64x64, f8, c4) saved as a model file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    save_model(DGAE(DGAE_T()), path)
    return path


@pytest.fixture()
def photos(tmp_path, shared_data) -> Path:
    """Five real photos (different sizes, one under 256 px) in a nested folder."""
    src = sorted((shared_data / "eval" / "imagenet-val500").glob("*.JPEG"))[:4]
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i, path in enumerate(src):
        shutil.copy(path, root / ("sub" if i % 2 else ".") / path.name)
    shutil.copy(next((shared_data / "train" / "bsds500").rglob("*.jpg")), root / "bsds.jpg")
    return root
