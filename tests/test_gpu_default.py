"""The default model's GPU session, rehearsed on the CPU: a lent GPU must never be lost to a bug in the script.

The same entry point as the device call (`scripts/gpu_default.py`, after `scripts/make_gpu_pack.py`), with its
tiny `--rehearse` recipe on the CPU for a dozen steps; then `scripts/gpu_default_collect.py` on what it left in
OUT, into a scratch weights folder: join, score, decide, card.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgaetok.models import file_sha256, join_model_files, load_model, read_model_file, save_model

from conftest import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_gpu_default_session_rehearsed_on_cpu(tmp_path, shared_data, monkeypatch):
    pack, out, work, weights = tmp_path / "pack", tmp_path / "out", tmp_path / "work", tmp_path / "weights"
    made = run("scripts/make_gpu_pack.py", "--data", str(shared_data / "train"), "--limit", "6", "--out", str(pack),
               "--no-wheels")
    assert "6 photos" in made.stdout and len(list((pack / "train").rglob("*.jpg"))) == 6
    assert (pack / "lpips-alex.safetensors").is_file()

    run("scripts/gpu_default.py", "--rehearse", "--pack", str(pack), "--out", str(out), "--work", str(work),
        "--steps", "12", "--minutes", "10", "--export-every", "0")
    session = json.loads((out / "run.json").read_text())
    assert session["status"] == "done" and session["step"] == 12 and session["device"] == "cpu"
    assert session["matmul_peak_tflops"] > 0 and session["train_gflop_per_img"] > 0
    assert 0 < session["mfu"] < 1 and session["img_per_s"] > 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [5, 10, 12]
    assert (out / "samples.png").is_file()
    shards = sorted(out.glob("model.shard-*.safetensors"))
    assert shards and all(p.stat().st_size <= 16 * 2**20 for p in shards)
    model = load_model(join_model_files(shards, tmp_path / "joined.safetensors"))
    assert model.config.preset == "dgae-t"

    # collect: a scratch weights folder whose default is another tiny model
    weights.mkdir()
    shutil.copy(save_tiny_model(tmp_path, seed=5), weights / "default.safetensors")
    (weights / "README.md").write_text("# card\n")
    before = file_sha256(weights / "default.safetensors")
    done = run("scripts/gpu_default_collect.py", str(out), "--gpu-minutes", "1.5", "--limit", "3", "--steps", "2",
               "--runs", str(tmp_path / "runs"), env={"DGAETOK_WEIGHTS": str(weights)})
    replaced = "replaced weights/default.safetensors" in done.stdout
    assert replaced != ("kept the current default" in done.stdout)
    assert (file_sha256(weights / "default.safetensors") != before) == replaced
    scores = json.loads((weights / "scores.json").read_text())
    assert len(scores) == 2 and all(0 < s["psnr"] < 60 and s["images"] == 3 for s in scores.values())
    card = (weights / "README.md").read_text()
    row = [line for line in card.splitlines() if line.startswith(f"| {session['started']}")]
    assert len(row) == 1 and row[0].endswith("| yes |" if replaced else "| no |")
    if replaced:
        new = load_model(weights / "default.safetensors")
        assert new.config.preset == "dgae-t" and new.encoder.conv_in.weight.dtype == torch.float32

    # the rule, with constructed scores: replace only when PSNR, SSIM and LPIPS all improve
    spec = importlib.util.spec_from_file_location("gpu_default_collect", ROOT / "scripts" / "gpu_default_collect.py")
    collect = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collect)
    current = weights / "default.safetensors"
    monkeypatch.setenv("DGAETOK_WEIGHTS", str(weights))
    monkeypatch.setattr(sys, "argv", ["gpu_default_collect.py", str(out), "--runs", str(tmp_path / "runs")])
    base = next(iter(scores.values()))
    for psnr, ssim, lpips, becomes in ((21.0, 0.45, 0.25, True), (21.0, 0.45, 0.35, False), (19.0, 0.45, 0.25, False),
                                       (21.0, 0.35, 0.25, False), (20.0, 0.40, 0.30, False)):
        shutil.copy(tmp_path / "tiny-5.safetensors", current)
        (weights / "README.md").write_text("# card\n")
        (weights / "scores.json").unlink()
        monkeypatch.setattr(collect, "score", lambda path, *args: {
            **base, **({"psnr": 20.0, "ssim": 0.40, "lpips": 0.30} if path == current else
                       {"psnr": psnr, "ssim": ssim, "lpips": lpips})})
        assert collect.main() == 0
        (candidate,) = (tmp_path / "runs").glob("*/model.safetensors")
        assert file_sha256(current) == (file_sha256(candidate) if becomes else before), (psnr, ssim, lpips)
        assert (weights / "README.md").read_text().splitlines()[-2].endswith("| yes |" if becomes else "| no |")


def test_the_cpu_candidate_is_scored_drawn_and_replaces_the_default_only_if_better(tmp_path, train_photos,
                                                                                    monkeypatch):
    """scripts/default_candidate.py on a tiny run laid out as train_default_cpu.sh lays its own: the candidate (as
    it would ship, in bf16) and a scratch default are scored (colour and border too), the curve gets the bundled
    point and the candidate's, with the candidate's training summed from its log, and a second look reuses the
    scores and adds no row."""
    from dgaetok.train import TrainConfig, train

    runs, weights = tmp_path / "runs", tmp_path / "weights"
    train(TrainConfig(data=str(train_photos), out=str(runs / "crop128"), preset="dgae-t", resolution=64,
                      downsample=8, latent_channels=4, batch_size=2, steps=3, warmup=1, lpips_weight=0.0,
                      workers=0, log_every=1, ckpt_every=3, sample_every=100, stats_images=2, precision="fp32"))
    weights.mkdir()
    shutil.copy(save_tiny_model(tmp_path, seed=5), weights / "default.safetensors")
    before = file_sha256(weights / "default.safetensors")
    args = ("scripts/default_candidate.py", str(runs), "--data", str(train_photos), "--limit", "3", "--steps", "2",
            "--phase", "crop128", "--replace")
    done = run(*args, env={"DGAETOK_WEIGHTS": str(weights)})
    rows = [json.loads(line) for line in (weights / "default-curve.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["start", "crop128"]
    bundled, candidate = rows
    assert bundled["cpu_hours"] == 1.25 and bundled["sha256"] == before[:16]
    assert candidate["steps"] == {"crop128": 3} and candidate["images_seen"] == 6 and candidate["cpu_hours"] > 1.25
    assert candidate["dtype"] == "bfloat16"
    assert all(r["images"] == 3 and 0 < r["psnr"] < 60 and r["colour"] >= 0 and r["border"] > 0 for r in rows)
    assert (weights / "default-curve.png").stat().st_size > 10_000
    replaced = f"replaced {weights / 'default.safetensors'}" in done.stdout
    assert replaced == candidate["better_than_default"] == (
        candidate["psnr"] > bundled["psnr"] and candidate["ssim"] > bundled["ssim"]
        and candidate["lpips"] < bundled["lpips"])
    assert (file_sha256(weights / "default.safetensors") != before) == replaced
    assert len(json.loads((weights / "scores.json").read_text())) == 2
    assert file_sha256(runs / "scored" / "crop128.safetensors")[:16] == candidate["sha256"]  # what was scored
    # is what ships: the bf16 export itself (its rounding moves the scores)
    assert read_model_file(runs / "scored" / "crop128.safetensors")[1]["encoder.conv_in.weight"].dtype == torch.bfloat16
    if replaced:
        assert file_sha256(weights / "default.safetensors") == file_sha256(runs / "scored" / "crop128.safetensors")

    if not replaced:  # looked at again: scores from the cache, the same two rows
        run(*args, env={"DGAETOK_WEIGHTS": str(weights)})
        assert len((weights / "default-curve.jsonl").read_text().splitlines()) == 2

    # both outcomes of the rule, with constructed scores: the default is replaced (in bf16, its training recorded
    # in the file) only when PSNR, SSIM and LPIPS all improve
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("default_candidate", ROOT / "scripts" / "default_candidate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setenv("DGAETOK_WEIGHTS", str(weights))
    monkeypatch.setattr(sys, "argv", ["default_candidate.py", *args[1:]])
    current = weights / "default.safetensors"
    base = {"images": 3, "rfid": 100.0, "colour": 5.0, "border": 1.2}
    for psnr, ssim, lpips, becomes in ((21.0, 0.45, 0.25, True), (21.0, 0.45, 0.35, False)):
        shutil.copy(tmp_path / "tiny-5.safetensors", current)
        monkeypatch.setattr(script, "score", lambda path, *a: {**base, **(
            {"psnr": 20.0, "ssim": 0.40, "lpips": 0.30} if path == current else
            {"psnr": psnr, "ssim": ssim, "lpips": lpips})})
        assert script.main() == 0
        assert (file_sha256(current) != before) == becomes
    # the last one kept the default; replace it once more
    monkeypatch.setattr(script, "score", lambda path, *a: {**base, **(
        {"psnr": 20.0, "ssim": 0.40, "lpips": 0.30} if path == current else {"psnr": 21.0, "ssim": 0.45, "lpips": 0.2})})
    assert script.main() == 0
    assert file_sha256(current) == file_sha256(runs / "scored" / "crop128.safetensors")  # the very file scored
    meta, tensors = read_model_file(current)
    assert meta["phase"] == "crop128" and meta["step"] == "3" and float(meta["cpu_hours"]) > 1.25
    assert meta["images_seen"] == "6" and all(t.dtype == torch.bfloat16 for t in tensors.values())
    # its latent statistics name the training folder, not where it lay on the machine that trained
    assert json.loads(meta["latent_stats"])["source"].startswith(f"{train_photos.name} (")

    # a run stopped before its end exports its model without latent statistics: the new default gets them measured
    # as the run would have at its end (over the run's --stats-images of its training photos)
    stopped = load_model(runs / "crop128" / "model.safetensors")
    stopped.latent_stats = None
    save_model(stopped, runs / "crop128" / "model.safetensors", step="3")
    assert script.main() == 0
    stats = json.loads(read_model_file(current)[0]["latent_stats"])
    assert stats["images"] == 2 and stats["source"].startswith(f"{train_photos.name} (")
    # a run folder copied from another machine names a training folder this one lacks: --stats-data names it here,
    # and a folder that is not there either is one line naming it, with nothing replaced
    copied = tmp_path / "copied-photos"
    shutil.copytree(train_photos, copied)
    monkeypatch.setattr(sys, "argv", ["default_candidate.py", *args[1:], "--stats-data", str(copied)])
    assert script.main() == 0
    assert json.loads(read_model_file(current)[0]["latent_stats"])["source"].startswith("copied-photos (")
    kept = file_sha256(current)
    monkeypatch.setattr(sys, "argv", ["default_candidate.py", *args[1:], "--stats-data", str(tmp_path / "gone")])
    with pytest.raises(SystemExit, match=r"gone: no such folder.*--stats-data FOLDER$"):
        script.main()
    assert file_sha256(current) == kept

    # a new machine: full256 warm-starts from the bundled default, which it then replaces, and goes on; its steps,
    # images and hours add to the default's it started from, however often it replaces the default since
    flat = TrainConfig(data=str(train_photos), preset="dgae-t", resolution=64, downsample=8, latent_channels=4,
                       batch_size=2, steps=2, warmup=1, lpips_weight=0.0, workers=0, log_every=1, ckpt_every=2,
                       sample_every=100, stats_images=2, precision="fp32")

    def full256_run(name: str) -> Path:
        train(dataclasses.replace(flat, out=str(tmp_path / name / "full256"), warm_start=str(current)))
        monkeypatch.setattr(sys, "argv", ["default_candidate.py", str(tmp_path / name), *args[2:-3], "--replace"])
        return tmp_path / name

    started = read_model_file(current)[0]
    full256_run("later")
    for better in (1.0, 2.0):  # the second look finds the default this very run made
        monkeypatch.setattr(script, "score", lambda path, *a: {**base, **(
            {"psnr": 20.0, "ssim": 0.40, "lpips": 0.30} if path == current else
            {"psnr": 20.0 + better, "ssim": 0.45, "lpips": 0.2})})
        assert script.main() == 0
        meta = read_model_file(current)[0]
        assert meta["phase"] == "full256" and meta["step"] == "2" and meta["images_seen"] == "10"
        hours = float(meta["cpu_hours"]) - float(started["cpu_hours"])
        assert 0 < hours < 0.05, hours
    full256_run("later-still")  # from a full256 default: its steps go on from that default's
    assert script.main() == 0
    meta = read_model_file(current)[0]
    assert meta["phase"] == "full256" and meta["step"] == "4" and meta["images_seen"] == "14"

    # a cooldown of that run: a copy of its folder resumed with a falling rate (--decay-from) and
    # a shorter EMA; the row and the file record the flat run's step it branched from, and the EMA it ships
    shutil.copytree(tmp_path / "later-still" / "full256", tmp_path / "cooldown" / "full256")
    train(dataclasses.replace(flat, out=str(tmp_path / "cooldown" / "full256"), steps=4, min_lr=1e-6, decay_from=2,
                              ema_decay=0.9, resume=True))
    monkeypatch.setattr(sys, "argv", ["default_candidate.py", str(tmp_path / "cooldown"), *args[2:-3], "--replace"])
    assert script.main() == 0
    meta = read_model_file(current)[0]
    assert meta["step"] == "6" and meta["cooldown_from"] == "4" and meta["weights"] == "EMA 0.9"
    rows = [json.loads(line) for line in (weights / "default-curve.jsonl").read_text().splitlines()]
    assert rows[-1]["cooldown_from"] == 4 and rows[-1]["steps"] == {"full256": 6}
    assert not any("cooldown_from" in r for r in rows[:-1]) and rows[-2]["cpu_hours"] < rows[-1]["cpu_hours"]
