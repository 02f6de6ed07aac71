"""The CLI where a newcomer meets it: the sample photos, one file in and one file out, progress in a log file,
what `info` and `weights fetch` print, the rFID caveat."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import dgaetok.progress as progress
from dgaetok.bench import RFID_MIN_IMAGES, rfid_caveat
from dgaetok.cli import app, training_data_name
from dgaetok.files import read_latent
from dgaetok.models import file_sha256, read_model_file, save_with_stats
from dgaetok.stats import LatentStats

from conftest import PROGRESS_LINE

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "examples" / "photos"
runner = CliRunner()


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert "Traceback" not in result.output, result.output
    return result


def test_the_readmes_main_job_on_the_sample_photos(tmp_path):
    """The README's main job, on what the repository ships: every sample photo encodes with weights/default, and
    the one-step decoder distilled from it decodes every latent to a 256x256 PNG in its one step, with no note."""
    result = cli("encode", PHOTOS, "-o", tmp_path / "latents", "--device", "cpu")
    assert result.exit_code == 0, result.output
    latents = sorted(p.name for p in (tmp_path / "latents").glob("*.safetensors"))
    assert latents == sorted(p.stem + ".safetensors" for p in PHOTOS.glob("*.jpg"))
    default_hash = file_sha256(ROOT / "weights" / "default.safetensors")
    for name in latents:
        latent, meta = read_latent(tmp_path / "latents" / name)
        assert latent.shape == (4, 32, 32) and meta["model_hash"] == default_hash and torch.isfinite(latent).all()
    result = cli("decode", tmp_path / "latents", "-o", tmp_path / "recon", "--model", "default-1step", "--device", "cpu")
    assert result.exit_code == 0 and "note: model" not in result.output, result.output
    pngs = sorted((tmp_path / "recon").glob("*.png"))
    assert [p.stem + ".safetensors" for p in pngs] == latents
    assert all(Image.open(p).size == (256, 256) for p in pngs)


def test_one_image_to_a_named_file_and_back(tmp_path, tiny_model_file):
    """`-o x.safetensors` for one image writes that file (it made a folder of that name); the same for decode."""
    model = ["--model", tiny_model_file, "--device", "cpu"]
    result = cli("encode", PHOTOS / "chelsea.jpg", "-o", tmp_path / "one.safetensors", *model)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "one.safetensors").is_file()
    latent, meta = read_latent(tmp_path / "one.safetensors")
    assert latent.shape == (4, 8, 8) and meta["source"] == "chelsea.jpg"

    result = cli("decode", tmp_path / "one.safetensors", "-o", tmp_path / "sub" / "one.png", "--steps", "1", *model)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sub" / "one.png").is_file()

    # A folder of that name, or another suffix, keeps the folder meaning.
    (tmp_path / "dir.safetensors").mkdir()
    assert cli("encode", PHOTOS / "chelsea.jpg", "-o", tmp_path / "dir.safetensors", *model).exit_code == 0
    assert (tmp_path / "dir.safetensors" / "chelsea.safetensors").is_file()
    assert cli("encode", PHOTOS / "chelsea.jpg", "-o", tmp_path / "plain", *model).exit_code == 0
    assert (tmp_path / "plain" / "chelsea.safetensors").is_file()


def test_progress_is_printed_as_lines_when_stderr_is_not_a_terminal(tmp_path, tiny_model_file, monkeypatch):
    """CliRunner's stderr is no terminal, like a pipe or a log file: lines with done/total, rate, time left."""
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    model = ["--model", tiny_model_file, "--device", "cpu"]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("chelsea.jpg", "coffee.jpg"):
        shutil.copy(PHOTOS / name, src / name)
    assert cli("encode", src, "-o", tmp_path / "z", *model).exit_code == 0
    result = cli("decode", tmp_path / "z", "-o", tmp_path / "png", "--steps", "3", "--batch-size", "1", *model)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("decode: ") and "/6 steps" in line]
    assert lines, result.stderr
    pattern = re.compile(r"^decode: (\d)/6 steps \((\d)/2 files\), [\d.e+]+ steps/s(, \d+s left)?$")
    assert all(pattern.match(line) for line in lines), lines
    assert [int(pattern.match(line).group(1)) for line in lines][-1] == 6
    assert any(line.endswith(" left") for line in lines)
    assert "\x1b" not in result.stderr and "━" not in result.stderr  # no live-bar drawing
    assert all(PROGRESS_LINE.match(line) for line in lines)  # what the other tests leave out of stderr

    shown = cli("show", tmp_path / "z" / "chelsea.safetensors", "-o", tmp_path / "fig.png", "--image",
                src / "chelsea.jpg", "--steps", "4", *model)
    assert shown.exit_code == 0, shown.output
    assert re.search(r"^show: 4/4 steps, [\d.e+]+ steps/s$", shown.stderr, flags=re.MULTILINE), shown.stderr


def test_line_progress_waits_its_interval():
    from rich.console import Console

    console = Console(record=True, width=200, file=open("/dev/null", "w"))
    with progress.LineProgress("x", console, "images", interval=3600) as bar:
        bar.add_task("x", total=10)
        bar.advance(0, 5)
    assert console.export_text() == ""  # nothing before the interval has passed
    bar = progress.LineProgress("x", console, "images", interval=0)
    bar.add_task("x", total=10, files="1/2 files")
    bar.update(0, completed=5)
    assert re.fullmatch(r"x: 5/10 images \(1/2 files\), [\d.e+]+ images/s, \d+s left\n", console.export_text())
    assert progress.duration(59) == "59s" and progress.duration(61) == "1m01s" and progress.duration(3720) == "1h02m"


def test_info_shows_the_full_hash_the_tensors_and_the_latent_statistics(tmp_path, tiny_model_file):
    result = cli("info", tiny_model_file)
    assert result.exit_code == 0, result.output
    assert file_sha256(tiny_model_file, length=64) in result.stdout
    assert re.search(r"latent\s+4 x 8\^2 \(f8\) at 64x64\s*$", result.stdout, flags=re.MULTILINE)
    _, tensors = read_model_file(tiny_model_file)
    assert re.search(rf"tensors\s+{len(tensors)}\s*$", result.stdout, flags=re.MULTILINE)
    assert re.search(r"latent stats\s+none", result.stdout)

    stats = LatentStats(mean=[0.1, 0.2, 0.3, 0.4], std=[1.0, 2.0, 2.0, 1.0], images=7, source="test")
    with_stats = tmp_path / "stats.safetensors"
    save_with_stats(tiny_model_file, stats, with_stats)
    result = cli("info", with_stats)
    assert re.search(r"latent stats\s+scaling_factor [\d.]+, shift_factor [\d.]+ \(7 images\)", result.stdout)
    assert "latent_stats" not in result.stdout  # the raw metadata row is the row above, not shown twice

    assert training_data_name("../shared/data/train (1765 photos)") == "train (1765 photos)"
    assert training_data_name("/data/imagenet/train") == "train"
    assert training_data_name("1765 photos") == "1765 photos"


def test_weights_fetch_names_each_file_once(tmp_path):
    """With the weights already converted, `weights fetch` checks them and prints each path once."""
    from dgaetok.pretrained import NETS, cache_root

    real = cache_root()
    manifest = real / "manifest.json"
    if not manifest.is_file() or any(not (real / f"{n}.safetensors").is_file() for n in NETS):
        pytest.skip("the metric networks' weights are not converted here (run `dgaetok weights fetch`)")
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(manifest, cache / "manifest.json")
    for entry in json.loads(manifest.read_text())["nets"].values():
        (cache / entry["file"]).symlink_to(real / entry["file"])
    result = cli("weights", "fetch", "--cache", cache)
    assert result.exit_code == 0, result.output
    for name in NETS:
        path = str(cache / f"{name}.safetensors")
        assert result.output.count(path) == 1, result.output
        assert f"{name}: {path}" in result.stdout


def test_rfid_caveat_below_the_feature_dimension():
    assert rfid_caveat(RFID_MIN_IMAGES) == "" and rfid_caveat(50_000) == ""
    assert "rFID over 4 images is biased upwards" in rfid_caveat(4)
    assert "rFID over 500 images" in rfid_caveat(500)


def test_missing_evaluation_data_skips_but_fails_under_ci(tmp_path, monkeypatch):
    from conftest import require_shared_data

    def outcome() -> BaseException:  # a skip or a failure, caught whichever it is
        with pytest.raises(BaseException) as caught:
            require_shared_data(tmp_path / "missing")
        return caught.value

    monkeypatch.delenv("CI", raising=False)
    skipped = outcome()
    assert isinstance(skipped, pytest.skip.Exception) and "needs the project's evaluation data" in str(skipped)
    monkeypatch.setenv("CI", "true")
    failed = outcome()
    assert isinstance(failed, pytest.fail.Exception) and "CI=true requires it" in str(failed)
    assert require_shared_data(tmp_path) == tmp_path


def test_tests_reach_the_evaluation_data_only_through_the_fixture():
    """So that every test needing it skips (or, under CI, fails) the same way where it is absent."""
    for path in sorted((ROOT / "tests").glob("*.py")):
        if path.name in ("conftest.py", "test_product_text.py", Path(__file__).name):  # these two name it as text
            continue
        text = path.read_text()
        assert not re.search(r"""SHARED|["']shared["']|\.\./shared|/work/shared""", text), path.name
