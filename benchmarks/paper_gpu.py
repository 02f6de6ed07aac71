"""The paper's two claims on rented or preemptible GPUs, in jobs of at most 10 minutes: Table 2 in miniature and
DiT convergence on the latents.

    python benchmarks/paper_gpu.py plan                      # the plan, and what the next GPU job will do
    OUT=<the job's output folder> bash scripts/paper_gpu.sh  # the GPU job (LIMIT_S: its time limit, 600 s by default)
    python benchmarks/paper_gpu.py collect <that folder, copied back> --gpu-minutes M   # join, score, record, tabulate

Each GPU job (a "call": ``call.json`` records it) runs for at most 10 minutes, and nothing of it survives but what
it leaves in its output folder, $OUT (kept to 8 files of at most 16 MiB each, so that it comes back whole); the next
job may start from a fresh clone on another machine. So no model is trained across jobs (its optimizer state would
not come back): each one is trained from scratch to completion inside one job, and only its EMA weights return, as
bf16 shards. Everything the next job needs lives in the committed results folder (``--state``, default
``benchmarks/results/paper-gpu/``): ``state.json`` (the plan, the calibration, which models and DiTs are done,
their numbers and the jobs that made them), training logs, grid strips, curve.csv; and when complete, table2.md /
table2.json / table2.png / table2-grid.png and curve.png.

The plan (`PLANS`) is a list of call groups, each sized to fit one job: Table 2's models (`table2.SCALES`: DGAE
and SD-VAE at f16 c16, c8, c4, equal compute) and DiTs on tokenizer latents (the GPU default's, and those of
models trained in the same job, since their weights exist only in its output folder until collected). Each job
works on the first group with work left (and the next ones while time is left, ``--groups``):

- **device** (`scripts/paper_gpu.sh`, the GPU job): calibrates the families not yet calibrated (seconds per
  training step on this card, and the step count that fills the scale's minutes; every later job trains those
  step counts), then trains each model of the group that is not done, if its time fits before the deadline, with
  the pack the job takes along (`scripts/make_gpu_pack.py`) on the device (`--data-on-device`), LPIPS-alex and
  SD-VAE's KL weight, like the default. Each finished model is split into bf16 shards in $OUT and joined back, so
  the DiT reads the very file the CPU will decode with. Each DiT trains on the latents of the group's tokenizers
  (`bench gen` with ``defer_to``: no Inception on the GPU) and leaves its sampled latents in $OUT at each
  evaluation. ``call.json`` (card, calibration, per model its log and times, per DiT its sample files) is
  rewritten after every stage, so a job stopped at its limit still returns what it finished.
- **collect** (on the machine that keeps the repository, with the job's output folder copied back): joins the
  shards, scores each model with `bench rfid` on all 500 evaluation images (DGAE at 8 decode steps), decodes and
  scores the DiT samples (gFID, sFID, precision, recall against the training photos; `gen.score_deferred`),
  records everything in ``--state`` and, once all six models are in, writes the table and its figure. Resumable:
  a rerun skips what is recorded. The Inception scoring of the DiT samples is the long part: see RESULTS.md for
  its CPU time.

``--scale tiny`` runs the same code on the CPU in seconds; `tests/test_paper_gpu.py` rehearses a series of jobs
with it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import table2  # noqa: E402
from dgaetok.errors import InputError  # noqa: E402
from dgaetok.files import atomic_path  # noqa: E402
from dgaetok.gen import GenConfig, bench_gen, read_curve, score_deferred, write_curve  # noqa: E402
from dgaetok.models import (DEFAULT_MODEL, file_sha256, join_model_files, load_model, resolve_model,  # noqa: E402
                            split_model_file)

SHARD_BYTES = 16 * 2**20
RETURN_FILES, RETURN_BYTES = 8, 64 * 2**20  # what a job leaves in OUT, at most, to be copied back whole

# Call groups: each fits one GPU job of 10 minutes (RESULTS.md has the arithmetic). "default" is the bundled
# default (dgae-s2 f16c8 once scripts/gpu_default.sh has trained it on the GPU); other DiT tokenizers are trained
# in the job.
PLANS = {
    "gpu": [
        {"train": ["c16-sdvae", "c16-dgae"]},
        {"train": ["c4-sdvae", "c4-dgae"]},
        {"train": ["c8-sdvae"], "dit": ["default", "c8-sdvae"]},
        {"train": ["c8-dgae"], "dit": ["c8-dgae"]},
    ],
    "tiny": [
        {"train": ["c8-sdvae", "c8-dgae"]},
        {"train": ["c4-sdvae", "c4-dgae"], "dit": ["default", "c4-sdvae"]},
    ],
}
# The DiTs: equal steps on latents of one shape (8x16x16) are equal compute; `minutes` only guards the job.
GEN = {
    "gpu": dict(dit="DiT-S/2", steps=1800, eval_every=600, minutes=1.6, batch_size=256, lr=1e-4, ema_decay=0.9999,
                num_samples=2000, sample_steps=50, cfg=1.0, decode_steps=4, decode_shift=0.5, conditional=False,
                seed=0),
    "tiny": dict(dit="DiT-T/2", steps=4, eval_every=2, minutes=1.0, batch_size=4, lr=1e-4, ema_decay=0.9,
                 num_samples=8, sample_steps=2, cfg=1.0, decode_steps=2, decode_shift=0.5, conditional=False,
                 seed=0),
}
# The latent every DiT of the plan trains on: equal steps are equal compute only on latents of one shape (the
# default must be the GPU default, dgae-s2 f16c8, not the CPU stand-in's f8c4).
DIT_LATENT = {"gpu": [8, 16, 16], "tiny": None}
# Seconds a model or a DiT needs beyond its training: building it, LPIPS, decoding the pack onto the device,
# shards and export; and the final export of a job. Estimates for the time guard, not measurements.
OVERHEAD_S = {"gpu": {"model": 25.0, "dit": 60.0, "reserve": 15.0}, "tiny": {"model": 0.0, "dit": 0.0,
                                                                             "reserve": 0.0}}


def plan_of(scale: str) -> dict:
    return json.loads(json.dumps({"scale": scale, "calls": PLANS[scale], "table2": dataclasses.asdict(
        table2.SCALES[scale]), "gen": GEN[scale], "channels": sorted({table2.parse_name(n)[0] for g in PLANS[scale]
                                                                       for n in g["train"]}, reverse=True)}))


class State:
    """``state.json`` in the results folder: the plan, the calibration, what is done; written atomically."""

    def __init__(self, folder: Path, scale: str):
        self.folder, self.path = folder, folder / "state.json"
        plan = plan_of(scale)
        if self.path.is_file():
            self.data = json.loads(self.path.read_text())
            if self.data["plan"] != plan:
                raise InputError(f"{self.path}: made for another plan than benchmarks/paper_gpu.py's {scale!r} one; "
                                 "finish it with the code that made it, or start another --state")
        else:
            self.data = {"plan": plan, "calibration": {}, "models": {}, "dits": {}, "calls": []}

    def write(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(self.data, indent=2) + "\n")

    def pending(self, group: dict) -> tuple[list[str], list[str]]:
        """(models to train, DiTs to run) of a call group: models not recorded, DiTs not recorded, and the
        models those DiTs need, which exist only in the job that trains them."""
        dits = [t for t in group.get("dit", []) if self.data["dits"].get(t, {}).get("status") in (None, "lost")]
        need = [m for m in group["train"] if m not in self.data["models"] or m in dits]
        return need, dits

    def next_groups(self, count: int) -> list[int]:
        return [i for i, g in enumerate(self.data["plan"]["calls"]) if any(self.pending(g))][:count]

    def table_done(self) -> bool:
        return all(m in self.data["models"] for g in self.data["plan"]["calls"] for m in g["train"])


def gen_config(scale: str, **kw) -> GenConfig:
    return GenConfig(**{**GEN[scale], **kw})


# --- the GPU job -------------------------------------------------------------------------------------------------


class Call:
    """``call.json`` in $OUT: what this job did, rewritten after every stage."""

    def __init__(self, out: Path, **facts):
        self.out, self.facts = out, {**facts, "calibration": {}, "models": {}, "dits": {}, "status": "running"}
        self.write()

    def write(self) -> None:
        with atomic_path(self.out / "call.json") as tmp:
            tmp.write_text(json.dumps(self.facts, indent=2) + "\n")


def export_model(name: str, run: Path, out: Path, work: Path) -> Path:
    """Shards of the run's EMA model in OUT, and the model file they join into (what the CPU will score)."""
    named = work / "export" / f"{name}.safetensors"
    named.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "model.safetensors", named)
    shards = split_model_file(named, out, SHARD_BYTES)
    (work / "transported").mkdir(exist_ok=True)
    return join_model_files(sorted(shards), work / "transported" / f"{name}.safetensors")


def read_log(run: Path) -> list[dict]:
    path = run / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def device(args) -> int:
    t0 = time.time()
    deadline = args.deadline or t0 + 60 * args.session_minutes
    scale = table2.SCALES[args.scale]
    over = OVERHEAD_S[args.scale]
    state = State(args.state, args.scale)
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)  # nothing carries over between jobs but the committed state
    args.work.mkdir(parents=True)
    data = str(args.pack / "train")
    call = Call(args.out, scale=args.scale, card=table2.device_name(), torch=torch.__version__,
                started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)), deadline=deadline,
                groups=state.next_groups(args.groups))
    print(f"{call.facts['card']}: groups {call.facts['groups']} of the {args.scale} plan, "
          f"{(deadline - t0) / 60:.1f} min", flush=True)
    calibration = dict(state.data["calibration"])
    left = lambda: deadline - over["reserve"] - time.time()  # noqa: E731
    transported: dict[str, Path] = {}
    try:
        for index in call.facts["groups"]:
            models, dits = state.pending(state.data["plan"]["calls"][index])
            for name in models:
                channels, family = table2.parse_name(name)
                if family not in calibration:
                    calibration[family] = call.facts["calibration"][family] = table2.calibrate(
                        scale, family, channels, data, args.seed)
                    call.write()
                steps, sps = calibration[family]["steps"], calibration[family]["seconds_per_step"]
                if steps * sps + over["model"] > left():
                    call.facts["models"][name] = {"status": "not started: no time left"}
                    call.write()
                    continue
                run = args.work / name
                cfg = table2.train_config(scale, family, channels, steps, data, run, args.seed)
                cfg = dataclasses.replace(cfg, ckpt_every=steps, sample_count=0)  # checkpoints would not come back
                start = time.time()
                status = table2.train_run(run, cfg, time.monotonic() + left())
                facts = {"status": status, "steps": table2.trained_step(run), "planned_steps": steps,
                         "train_seconds": time.time() - start, "log": read_log(run)}
                if status in ("done", "diverged"):
                    transported[name] = export_model(name, run, args.out, args.work)
                    facts["sha256"] = file_sha256(transported[name])
                call.facts["models"][name] = facts
                call.write()
                print(f"train: {name}: {status} at step {facts['steps']} of {steps}", flush=True)
            for tok in dits:
                call.facts["dits"][tok] = run_dit(tok, args, transported, left, over["dit"])
                call.write()
        call.facts["status"] = "done"
    except BaseException as exc:  # a kill at the limit or a crash: what is in OUT is reported, then re-raised
        call.facts["status"] = f"stopped: {type(exc).__name__}: {exc}"
        raise
    finally:
        call.facts["wall_seconds"] = time.time() - t0
        call.facts["returned"] = check_return(args.out)
        call.write()
        print(json.dumps({k: v for k, v in call.facts.items() if k not in ("models", "dits")}, indent=2))
    return 0


def run_dit(tok: str, args, transported: dict[str, Path], left, overhead: float) -> dict:
    """A DiT on ``tok``'s latents of the pack's photos, its samples left unscored in OUT."""
    if tok == "default":
        transported[tok] = args.work / "transported" / "default.safetensors"
        transported[tok].parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(resolve_model(args.default_model), transported[tok])
    if tok not in transported:
        return {"status": "not run: its tokenizer was not trained in this call"}
    shape = list(load_model(transported[tok]).config.latent_shape)
    if DIT_LATENT[args.scale] not in (None, shape):
        return {"status": f"not run: latents {'x'.join(map(str, shape))}, not the plan's "
                          f"{'x'.join(map(str, DIT_LATENT[args.scale]))}"}
    minutes = GEN[args.scale]["minutes"]  # all of it or none: DiTs of one plan train the same steps
    if minutes * 60 + overhead > left():
        return {"status": "not run: no time left"}
    cfg = gen_config(args.scale, data=str(args.pack / "train"), tokenizers=[str(transported[tok])],
                     out=str(args.work / "gen"), device="cuda" if torch.cuda.is_available() else "cpu",
                     defer_to=str(args.out))
    start = time.time()
    result = bench_gen(cfg, log=lambda line: print(line, flush=True))
    run = result.runs[0]
    files = sorted(p.name for p in args.out.glob(f"{tok}.step-*.safetensors"))
    print(f"dit: {tok}: {run.steps} steps in {run.train_s:.0f} s, {len(files)} sample files", flush=True)
    return {"status": "sampled", "model_hash": run.model_hash, "steps": run.steps, "train_s": run.train_s,
            "wall_seconds": time.time() - start, "dit_params": run.dit_params,
            "images": result.images, "files": files}


def check_return(out: Path) -> dict:
    """What the job leaves in OUT, against the limits that let it be copied back whole: at most RETURN_FILES files of
    at most SHARD_BYTES each, RETURN_BYTES in all, plain names."""
    files = [p for p in out.rglob("*") if p.is_file()]
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in files}
    problems = [f"{len(files)} files (at most {RETURN_FILES})"] if len(files) > RETURN_FILES else []
    problems += [f"{n}: {s / 2**20:.1f} MiB (at most 16)" for n, s in sizes.items() if s > SHARD_BYTES]
    problems += [f"{n}: a name that may not be copied back" for n in sizes
                 if not re.fullmatch(r"[\w.-]+(/[\w.-]+){0,2}", n)]
    if sum(sizes.values()) > RETURN_BYTES:
        problems.append(f"{sum(sizes.values()) / 2**20:.1f} MiB in all (at most 64)")
    return {"files": len(files), "mib": round(sum(sizes.values()) / 2**20, 2), "problems": problems}


# --- back on the CPU machine ---------------------------------------------------------------------------------------


def collect(args) -> int:
    files = args.files
    if not (files / "call.json").is_file():
        raise InputError(f"{files}: no call.json (not the output folder of a paper_gpu.sh job)")
    call = json.loads((files / "call.json").read_text())
    if call["scale"] != args.scale:
        raise InputError(f"{files}: a {call['scale']!r} job, not {args.scale!r}")
    state = State(args.state, args.scale)
    scale = table2.SCALES[args.scale]
    runs = args.runs
    (runs / "transported").mkdir(parents=True, exist_ok=True)
    minutes = args.gpu_minutes if args.gpu_minutes is not None else call.get("wall_seconds", 0.0) / 60
    record = {"started": call["started"], "card": call["card"], "gpu_minutes": round(minutes, 2),
              "status": call["status"], "returned": call.get("returned"),
              "models": {n: m["status"] for n, m in call["models"].items()},
              "dits": {t: d["status"] for t, d in call["dits"].items()}}
    calls = [c for c in state.data["calls"] if c["started"] != call["started"]]
    state.data["calls"] = calls + [record]
    for family, cal in call["calibration"].items():
        state.data["calibration"].setdefault(family, {**cal, "call": call["started"]})
    state.write()

    transported = {}
    for name, m in call["models"].items():
        if m["status"] not in ("done", "diverged"):
            print(f"{name}: {m['status']}: left for a later job")
            continue
        shards = sorted(files.glob(f"{name}.shard-*.safetensors"))
        transported[name] = join_model_files(shards, runs / "transported" / f"{name}.safetensors")
        if file_sha256(transported[name]) != m["sha256"]:
            raise InputError(f"{transported[name]}: the joined shards differ from the GPU job's file")
        if name in state.data["models"]:
            print(f"{name}: already in the table (from the job of {state.data['models'][name]['call']}); this one "
                  "serves its DiT only")
            continue
        logs = args.state / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with atomic_path(logs / f"{name}.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in m["log"]))
        print(f"{name}: scoring on {args.eval_data}", flush=True)
        start = time.time()
        result = table2.score(transported[name], scale, args.eval_data, args.grid_rows,
                              args.state / "strips" / f"{name}.png")
        cal = state.data["calibration"][table2.parse_name(name)[1]]
        state.data["models"][name] = {
            "call": call["started"], "card": call["card"], "sha256": m["sha256"], "rfid": result,
            "train_steps": m["steps"], "budget_minutes": cal["steps"] * cal["seconds_per_step"] / 60,
            "train_minutes": m["train_seconds"] / 60, "diverged": m["status"] == "diverged",
            "device": call["card"], "score_seconds": time.time() - start}
        state.write()
        print(f"{name}: " + ", ".join(f"{r['steps']} steps rFID {r['rfid']:.1f} PSNR {r['psnr']:.2f} "
                                      f"SSIM {r['ssim']:.3f} LPIPS {r['lpips']:.3f}" for r in result["results"]))
    if state.table_done():
        write_table(state, scale, args)

    for tok, d in call["dits"].items():
        if d["status"] != "sampled":
            print(f"dit {tok}: {d['status']}")
        elif state.data["dits"].get(tok, {}).get("status") in ("sampled", "scored"):
            print(f"dit {tok}: already recorded (the job of {state.data['dits'][tok]['call']})")
        else:
            spool_dit(tok, d, files, transported, call, state, args)
    if not args.no_score:
        score(args, state)
    print_status(state)
    return 0


def spool_dit(tok: str, d: dict, files: Path, transported: dict[str, Path], call: dict, state: State, args) -> None:
    """Keep a DiT's samples and its tokenizer in the spool until they are scored: scoring takes CPU-hours (RESULTS.md)
    and may be spread over several runs of `score`; the samples are too large to commit, so they survive only where
    this machine keeps ``--spool``, outside the clone."""
    where = f"{re.sub(r'[^0-9]', '', call['started'])}/{tok}"
    folder = args.spool / where
    folder.mkdir(parents=True, exist_ok=True)
    model = transported.get(tok) or resolve_model(args.default_model)  # "default": the file the job read
    shutil.copyfile(model, folder / f"{tok}.safetensors")
    if file_sha256(folder / f"{tok}.safetensors") != d["model_hash"]:
        raise InputError(f"{model}: not the model the DiT's samples were drawn on ({d['model_hash']})")
    for name in d["files"]:
        shutil.copyfile(files / name, folder / name)
    state.data["dits"][tok] = {**{k: v for k, v in d.items() if k != "status"}, "status": "sampled",
                               "call": call["started"], "card": call["card"], "spool": where}
    state.write()


def score(args, state: State | None = None) -> int:
    """Decode and score the spooled DiT samples into the committed curve.csv: the last evaluation of every DiT
    first, so that a stopped run leaves comparable points. Resumable file by file."""
    state = state or State(args.state, args.scale)
    sampled = {t: d for t, d in state.data["dits"].items() if d["status"] == "sampled"}
    for tok, d in list(sampled.items()):
        if not all((args.spool / d["spool"] / f).is_file() for f in d["files"] + [f"{tok}.safetensors"]):
            print(f"dit {tok}: its samples are gone from {args.spool / d['spool']} (this machine did not keep "
                  "them): its call group runs again")
            state.data["dits"][tok]["status"] = "lost"
            del sampled[tok]
    state.write()
    if not sampled:
        return 0
    gen_out = args.runs / "gen"
    gen_out.mkdir(parents=True, exist_ok=True)
    for name in ("curve.csv", "eval.json"):  # the committed curve, so that scored rows are skipped
        if (args.state / name).is_file():
            shutil.copyfile(args.state / name, gen_out / name)
    models = [str(args.spool / d["spool"] / f"{t}.safetensors") for t, d in sampled.items()]
    cfg = gen_config(args.scale, data=str(args.gen_data), tokenizers=models, out=str(gen_out),
                     batch_size=args.decode_batch, device="cpu")
    step_of = lambda name: int(name.rsplit("step-", 1)[1].split(".")[0])  # noqa: E731
    order = sorted(((t, f) for t, d in sampled.items() for f in d["files"]), key=lambda tf: (-step_of(tf[1]), tf[0]))
    for tok, name in order:
        start = time.time()
        d = sampled[tok]
        if score_deferred(cfg, [args.spool / d["spool"] / name], log=lambda line: print(line, flush=True)):
            d["score_seconds"] = d.get("score_seconds", 0.0) + time.time() - start
        write_curve(args.state / "curve.csv", read_curve(gen_out / "curve.csv"))
        shutil.copyfile(gen_out / "eval.json", args.state / "eval.json")
        if (gen_out / "curve.png").is_file():
            shutil.copyfile(gen_out / "curve.png", args.state / "curve.png")
        grid = gen_out / tok / "samples" / f"step-{step_of(name):07d}.png"
        if step_of(name) == max(map(step_of, d["files"])) and grid.is_file():
            save_half(grid, args.state / "samples" / f"{tok}.png")  # the last evaluation's first 16 samples
        state.write()
    for tok, d in sampled.items():
        d["status"] = "scored"
        shutil.rmtree(args.spool / d.pop("spool"), ignore_errors=True)
    state.write()
    return 0


def save_half(src: Path, dst: Path) -> None:
    """A PNG at half its size: small enough to commit."""
    from PIL import Image

    img = Image.open(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        img.resize((img.width // 2, img.height // 2), Image.BICUBIC).save(tmp, format="PNG")


def write_table(state: State, scale: table2.Scale, args) -> None:
    entries = state.data["models"]
    rows = table2.table_rows(entries, scale)
    cards = sorted({e["card"] for e in entries.values()})
    cal = state.data["calibration"]
    intro = (f"DGAE vs SD-VAE at f16 on GPUs, in jobs of at most 10 minutes ({', '.join(cards)}): {scale.minutes:g} min of training per "
             f"model on the card that calibrated ({cal['dgae']['device']}), fixed as step counts for every latent "
             f"size; scored on this machine ({rows[0]['images']} evaluation images). Budget: steps x the "
             f"calibrated time per step; wall: the time the training took in its job.")
    table2.write_table(args.state, rows, scale, intro, {"calibration": cal})
    names = [table2.run_name(c, f) for c in state.data["plan"]["channels"] for f in table2.FAMILIES]
    table2.comparison_grid([args.state / "strips" / f"{n}.png" for n in names], scale, args.eval_data,
                           args.grid_rows, args.state / "table2-grid.png")
    print((args.state / "table2.md").read_text())


def print_status(state: State) -> None:
    for i, group in enumerate(state.data["plan"]["calls"]):
        models, dits = state.pending(group)
        what = ", ".join(group["train"]) + (f"; DiTs on {', '.join(group['dit'])}" if group.get("dit") else "")
        left = ", ".join(models + [f"DiT {t}" for t in dits])
        print(f"call group {i + 1}: {what}: " + (f"to do: {left}" if left else "done"))
    waiting = [t for t, d in state.data["dits"].items() if d["status"] == "sampled"]
    if waiting:
        print(f"DiT samples to score here (`paper_gpu.py score`): {', '.join(waiting)}")
    spent = sum(c["gpu_minutes"] for c in state.data["calls"])
    print(f"{len(state.data['calls'])} GPU jobs so far, {spent:.1f} GPU-minutes; table "
          + ("complete" if state.table_done() else "not complete"))


def plan(args) -> int:
    state = State(args.state, args.scale)
    if not state.path.is_file():
        state.write()
        print(f"wrote {state.path}")
    print_status(state)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--scale", choices=PLANS, default="gpu")
    common.add_argument("--state", type=Path, default=None, help="the committed results folder "
                                                                 "(default: benchmarks/results/paper-gpu[-SCALE])")
    common.add_argument("--default-model", default=DEFAULT_MODEL, help="the tokenizer called 'default' in the plan")
    common.add_argument("--seed", type=int, default=0)
    sub.add_parser("plan", parents=[common], help="write state.json if missing; show what is done and to do")
    scoring = argparse.ArgumentParser(add_help=False)
    scoring.add_argument("--gen-data", default=str(ROOT.parent / "shared" / "data" / "train"),
                         help="the DiT's reference images: the photos the pack was made from")
    scoring.add_argument("--runs", type=Path, default=ROOT / "runs" / "paper-gpu", help="joined models, caches")
    scoring.add_argument("--spool", type=Path, default=Path.home() / ".cache" / "dgaetok" / "paper-gpu-spool",
                         help="DiT samples and their tokenizers until scored (outside the clone)")
    scoring.add_argument("--decode-batch", type=int, default=16)
    sub.add_parser("score", parents=[common, scoring], help="after collect: decode and score the spooled DiT samples")
    dev = sub.add_parser("device", parents=[common], help="the GPU job (scripts/paper_gpu.sh): the next call groups")
    dev.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "runs" / "paper-gpu" / "out")))
    dev.add_argument("--pack", type=Path, default=ROOT / ".gpu", help="from scripts/make_gpu_pack.py")
    dev.add_argument("--work", type=Path, default=Path("/tmp/dgaetok-paper-gpu"), help="emptied first")
    dev.add_argument("--deadline", type=float, default=None, help="unix time by which the job must be done")
    dev.add_argument("--job-minutes", "--session-minutes", dest="session_minutes", type=float, default=9.0,
                     help="the job's time when no --deadline")
    dev.add_argument("--groups", type=int, default=2, help="call groups to work on, while time is left")
    col = sub.add_parser("collect", parents=[common, scoring], help="join, score and record a GPU job's output "
                                                                    "folder, copied back")
    col.add_argument("files", type=Path, help="the GPU job's output folder (OUT), copied back")
    col.add_argument("--gpu-minutes", type=float, default=None, help="the GPU time the job took "
                                                                     "(default: its wall time)")
    col.add_argument("--eval-data", default=str(ROOT.parent / "shared" / "data" / "eval" / "imagenet-val500"),
                     help="the evaluation images (default: the project's evaluation data)")
    col.add_argument("--grid-rows", type=int, default=4)
    col.add_argument("--no-score", action="store_true", help="spool the DiT samples, score them later (`score`)")
    args = parser.parse_args()
    if args.state is None:
        suffix = "" if args.scale == "gpu" else f"-{args.scale}"
        args.state = ROOT / "benchmarks" / "results" / f"paper-gpu{suffix}"
    try:
        return {"plan": plan, "device": device, "collect": collect, "score": score}[args.command](args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
