"""The lent-GPU plan of Table 2 and the DiT curves, rehearsed on the CPU across two simulated sessions.

What a session has is the committed results folder and whatever one device call returns: so each "session" here
starts from a copy of the state the last one left (as a fresh clone would), trains in a work folder of its own
(nothing from the last call's survives, as on the device), returns through an $OUT-like folder, and collects from
it. `benchmarks/paper_gpu.py --scale tiny` is the same code as the GPU plan at a size that runs in seconds.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dgaetok.files import IMAGE_SUFFIXES, find_files
from dgaetok.models import file_sha256, load_model

ROOT = Path(__file__).resolve().parents[1]


def run(*args, expect: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=900)
    assert done.returncode == expect, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def paper(command: str, state: Path, *args, expect: int = 0) -> subprocess.CompletedProcess:
    return run("benchmarks/paper_gpu.py", command, "--scale", "tiny", "--state", state, *args, expect=expect)


@pytest.mark.slow
def test_two_sessions_carry_state_and_finish_table_and_curves(tmp_path, shared_data, tiny_model_file):
    photos = tmp_path / "photos"  # the training photos of this rehearsal; the pack is made from them
    photos.mkdir()
    for path in find_files(shared_data / "train" / "bsds500", IMAGE_SUFFIXES)[:6]:
        shutil.copy(path, photos / path.name)
    pack = tmp_path / "pack"
    run("scripts/make_gpu_pack.py", "--data", photos, "--out", pack, "--no-wheels")
    device = ("--pack", pack, "--default-model", tiny_model_file, "--groups", "1")
    spool = tmp_path / "spool"  # outside the clones: what this machine keeps between sessions, if it does
    scoring = ("--gen-data", photos, "--default-model", tiny_model_file, "--decode-batch", "3")
    collect = ("--eval-data", shared_data / "eval" / "imagenet-val500", "--grid-rows", "2", "--spool", spool,
               *scoring)

    # session 1: the committed plan; the call trains the first group (the c8 pair), calibrating both families
    state1 = tmp_path / "clone1" / "state"
    assert "call group 1: c8-sdvae, c8-dgae: to do" in paper("plan", state1).stdout
    out1 = tmp_path / "out1"
    paper("device", state1, "--out", out1, "--work", tmp_path / "work1", *device)
    call = json.loads((out1 / "call.json").read_text())
    assert call["status"] == "done" and call["groups"] == [0] and set(call["calibration"]) == {"sdvae", "dgae"}
    assert {n: m["status"] for n, m in call["models"].items()} == {"c8-sdvae": "done", "c8-dgae": "done"}
    assert call["returned"]["problems"] == [] and call["returned"]["files"] <= 8
    assert sorted(p.name for p in out1.iterdir()) == ["c8-dgae.shard-1-of-1.safetensors",
                                                      "c8-sdvae.shard-1-of-1.safetensors", "call.json"]
    paper("collect", state1, out1, "--runs", tmp_path / "runs1", "--gpu-minutes", "9.5", *collect)
    state = json.loads((state1 / "state.json").read_text())
    assert set(state["models"]) == {"c8-sdvae", "c8-dgae"} and state["dits"] == {}
    assert state["calls"][0]["gpu_minutes"] == 9.5 and set(state["calibration"]) == {"sdvae", "dgae"}
    for name, m in state["models"].items():
        assert m["train_steps"] == state["calibration"][name.split("-")[1]]["steps"]
        assert m["rfid"]["images"] == 3 and 0 < m["rfid"]["results"][0]["psnr"] < 60
        assert (state1 / "logs" / f"{name}.jsonl").read_text() and (state1 / "strips" / f"{name}.png").is_file()
    assert not (state1 / "table2.md").exists()

    # session 2: a fresh clone holds only what session 1 committed; its first call finds no time and returns
    # nothing trained, which collect records and the next call makes up for
    state2 = tmp_path / "clone2" / "state"
    shutil.copytree(state1, state2)
    late = tmp_path / "out-late"
    paper("device", state2, "--out", late, "--work", tmp_path / "work2", "--session-minutes", "0", *device)
    call = json.loads((late / "call.json").read_text())
    assert call["groups"] == [1] and call["calibration"] == {}
    assert {m["status"] for m in call["models"].values()} == {"not started: no time left"}
    assert call["dits"] == {"default": {"status": "not run: no time left"},
                            "c4-sdvae": {"status": "not run: its tokenizer was not trained in this call"}}
    paper("collect", state2, late, "--runs", tmp_path / "runs2", *collect)

    out2 = tmp_path / "out2"
    paper("device", state2, "--out", out2, "--work", tmp_path / "work2", *device)
    call = json.loads((out2 / "call.json").read_text())
    assert call["groups"] == [1] and call["calibration"] == {}  # the step counts of session 1's calibration
    assert {n: m["steps"] for n, m in call["models"].items()} == {
        "c4-sdvae": state["calibration"]["sdvae"]["steps"], "c4-dgae": state["calibration"]["dgae"]["steps"]}
    assert {t: d["status"] for t, d in call["dits"].items()} == {"default": "sampled", "c4-sdvae": "sampled"}
    assert call["dits"]["default"]["model_hash"] == file_sha256(tiny_model_file)
    assert call["dits"]["c4-sdvae"]["model_hash"] == call["models"]["c4-sdvae"]["sha256"]
    assert call["dits"]["default"]["files"] == ["default.step-0000002.safetensors",
                                                "default.step-0000004.safetensors"]
    assert call["returned"]["problems"] == [] and call["returned"]["files"] == 7
    # the samples wait in the spool: scoring them takes CPU-hours at the GPU scale, so it may go on in a later
    # session; one whose machine lost the spool marks them lost, and the plan runs their group again
    paper("collect", state2, out2, "--runs", tmp_path / "runs2", "--no-score", *collect)
    state = json.loads((state2 / "state.json").read_text())
    assert {t: d["status"] for t, d in state["dits"].items()} == {"default": "sampled", "c4-sdvae": "sampled"}
    assert "DiT samples to score here" in paper("plan", state2).stdout
    unlucky = tmp_path / "clone-unlucky" / "state"
    shutil.copytree(state2, unlucky)
    lost = paper("score", unlucky, "--runs", tmp_path / "runs-unlucky", "--spool", tmp_path / "empty", *scoring)
    assert "its samples are gone" in lost.stdout
    assert "to do: c4-sdvae, DiT default, DiT c4-sdvae" in paper("plan", unlucky).stdout  # retrained for its DiT

    state3 = tmp_path / "clone3" / "state"  # session 3, on a machine that kept the spool
    shutil.copytree(state2, state3)
    paper("score", state3, "--runs", tmp_path / "runs3", "--spool", spool, *scoring)
    assert not list(spool.rglob("*.safetensors"))  # scored: the spool is emptied
    state2 = state3

    state = json.loads((state2 / "state.json").read_text())
    assert [c["status"] for c in state["calls"]] == ["done", "done", "done"] and len(state["models"]) == 4
    assert {t: d["status"] for t, d in state["dits"].items()} == {"default": "scored", "c4-sdvae": "scored"}
    assert state["dits"]["c4-sdvae"]["model_hash"] == state["models"]["c4-sdvae"]["sha256"]
    table = json.loads((state2 / "table2.json").read_text())["rows"]
    assert [(r["channels"], r["family"]) for r in table] == [(8, "sdvae"), (8, "dgae"), (4, "sdvae"), (4, "dgae")]
    assert "| 64 (4x4x4) | DGAE (dgae-t)" in (state2 / "table2.md").read_text()
    assert Image.open(state2 / "table2.png").size == (840, 360)
    assert Image.open(state2 / "table2-grid.png").size == (5 * 66 + 2, 2 * 66 + 2)  # original + 4 models, 2 rows
    with open(state2 / "curve.csv") as fh:
        curve = [line.split(",")[:2] for line in fh.read().splitlines()[1:]]
    assert sorted(curve) == [["c4-sdvae", "2"], ["c4-sdvae", "4"], ["default", "2"], ["default", "4"]]
    assert Image.open(state2 / "curve.png").size[0] > 0 and (state2 / "samples" / "default.png").is_file()
    assert json.loads((state2 / "eval.json").read_text())["decode_shift"] == 0.5
    assert "table complete" in paper("plan", state2).stdout

    # what was committed is small, and the joined model is the device's file, byte for byte
    assert sum(p.stat().st_size for p in state2.rglob("*") if p.is_file()) < 2 * 2**20
    joined = tmp_path / "runs2" / "transported" / "c4-dgae.safetensors"  # collect of session 2 joined it
    assert file_sha256(joined) == call["models"]["c4-dgae"]["sha256"]
    assert load_model(joined).config.preset == "dgae-t"
    # a state made for another plan is refused in one line
    bad = json.loads((state2 / "state.json").read_text())
    bad["plan"]["calls"] = bad["plan"]["calls"][:1]
    (state2 / "state.json").write_text(json.dumps(bad))
    refused = paper("plan", state2, expect=2)
    assert refused.stderr.startswith("error: ") and "another plan" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
