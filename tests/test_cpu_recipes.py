"""The CPU recipes (scripts/train_default_cpu.sh, scripts/distill_default_cpu.sh) resume a run folder with any number
of processes that divides its shards (processes x --accum), and stop with one line, before they start anything,
when the number does not."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def run_folder(path: Path, world: int, accum: int) -> Path:
    """A run folder whose checkpoint says it trained in ``world`` processes of ``accum`` micro-batches."""
    path.mkdir(parents=True)
    save_file({"step": torch.zeros(1)}, str(path / "checkpoint.safetensors"),
              metadata={"train_config": json.dumps({"world": world, "accum": accum})})
    return path


def bash(script: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("world,accum,procs,expected", [(2, 1, 1, "2"), (1, 4, 2, "2"), (2, 2, 4, "1")])
def test_accum_for_keeps_a_runs_shards(tmp_path, world, accum, procs, expected):
    run = run_folder(tmp_path / "run", world, accum)
    done = bash(f"source scripts/cpu_processes.sh; accum_for {run}; accum_for {tmp_path / 'new'}", PROCS=str(procs))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [expected, "1"]  # a new run: one micro-batch per process


@pytest.mark.parametrize("recipe,folder", [("distill_default_cpu.sh", "RUN"), ("train_default_cpu.sh", "RUNS")])
def test_a_recipe_refuses_processes_that_do_not_divide_its_runs_shards(tmp_path, recipe, folder):
    run = run_folder(tmp_path / "run" / ("full256" if folder == "RUNS" else ""), world=1, accum=1)
    done = bash(f"bash scripts/{recipe}", PROCS="2", MINUTES="1", **{folder: str(tmp_path / "run")})
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        f"{run / 'checkpoint.safetensors'}: this run has 1 shard(s) (processes x accum); PROCS=2 does not divide them"]
    assert not (run / "log.jsonl").exists()
