"""Shared fixtures: the project's real data beside the clone, and tiny seeded models saved as model files."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import dgaetok.precision
from dgaetok.models import DGAE, DGAE_T, save_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_addoption(parser):
    parser.addoption("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                     help="What precision 'auto' picks during the tests, in every process ($DGAETOK_PRECISION): bf16 "
                          "or fp32 runs the suite as on a CPU with or without native bf16 units (default: what this "
                          "machine has).")


def pytest_configure(config):
    """`pytest --precision fp32|bf16`: every model that runs at "auto" computes in that precision, in the test
    process from its first fixture on and in every process it starts (the CLI, torchrun workers, scripts), through
    $DGAETOK_PRECISION; without the option the tests see what this machine has, whatever the shell exported."""
    choice = config.getoption("--precision")
    if choice != "auto":
        os.environ[dgaetok.precision.ENV] = choice
    else:
        os.environ.pop(dgaetok.precision.ENV, None)


def conv_output_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    """The dtypes the model's convolutions produce from now on (a live set): under bf16 autocast they compute in bf16,
    so a float32 here means bf16 was silently not used."""
    seen: set[torch.dtype] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, args, out: seen.add(out.dtype))
    return seen


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: skipped, with the reason shown, where torch sees none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# A progress line (`dgaetok.progress.LineProgress`): printed every few seconds when stderr is not a terminal, so
# a slow or busy machine adds some; tests that account for every stderr line leave these out.
PROGRESS_LINE = re.compile(r"^[a-z][a-z ]*: \d+/[\d?]+ (images|steps)\b")


def without_progress(lines: list[str]) -> list[str]:
    return [line for line in lines if not PROGRESS_LINE.match(line)]


def require_shared_data(root: Path = SHARED) -> Path:
    """The project's evaluation data (../shared/data beside the clone), or a one-line skip where it is absent.
    Under CI (`CI=true`) its absence fails the test instead, so CI never passes by skipping."""
    if root.is_dir():
        return root
    reason = f"needs the project's evaluation data in {root} (../shared/data beside the clone)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI=true requires it")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared_data()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions gain nothing from a second thread, and on a shared 2-core box OpenMP spin-waiting
    against another process's threads makes them many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def save_tiny_model(folder: Path, seed: int) -> Path:
    """A seeded, untrained dgae-t (64x64, f8, c4) saved as a model file."""
    torch.manual_seed(seed)
    path = folder / f"tiny-{seed}.safetensors"
    save_model(DGAE(DGAE_T()), path)
    return path


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models"), seed=0)


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


@pytest.fixture()
def train_photos(tmp_path, shared_data) -> Path:
    """Four real photos from the training pool."""
    root = tmp_path / "train"
    root.mkdir()
    for path in sorted((shared_data / "train" / "bsds500").rglob("*.jpg"))[:4]:
        shutil.copy(path, root / path.name)
    return root
