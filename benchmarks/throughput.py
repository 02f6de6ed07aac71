"""Throughput of a DGAE preset on one device: images/s, MFU against the matmul peak measured in the same run, and
peak memory; one JSON line per measurement, written the moment it is made.

    python benchmarks/throughput.py                                  # dgae-b f16c8 on the GPU, the default rows
    python benchmarks/throughput.py --rows unet unet@default unet@reduce-overhead --profile runs/profile
    python benchmarks/throughput.py --device cpu --model default --batch 1 --rows encode decode peer --steps 8

Rows (``--rows``, measured in the order given; ``KIND@MODE`` measures KIND with the networks compiled in place in
MODE, as the CLI's ``--compile`` does):
- ``unet``: one U-Net evaluation, i.e. one sampling step, at ``--unet-batch`` (the latent's conditioning is
  computed once per decode, so it is left out);
- ``train`` and ``train-ckpt``: one `dgaetok train` step (DGAE loss with LPIPS through `train.accumulate`,
  backward, clip, AdamW, EMA) without and with ``--grad-checkpoint``, at the largest batch up to
  ``--train-batch`` that fits;
- ``encode``; ``decode`` at each of ``--steps`` (Euler, the CLI's sampler); ``peer``: the SD-VAE decoder of the
  same latent (LDM's ch 128), one pass.

Every row runs at the largest batch that fits: it starts at the batch asked for and halves when the GPU runs out
of memory (`memory.largest_batch`, with ``--fit-refine`` bisection steps), and reports the peak memory allocated.
FLOPs per image come from `torch.utils.flop_counter` (2 per multiply-add: matmuls, convolutions, attention),
counted eagerly on one image (the training step's on the meta device, `flops.training_flops_per_image`).
Checkpointed and compiled rows are credited with the same model FLOPs, so their MFU compares useful work
(recomputation is not counted). The peak is `flops.matmul_peak`: the best of several square matmuls in the
compute dtype (bf16 on CUDA, float32 on CPU).

``--out`` receives JSON lines: a header (device, torch, the peak), then one line per row, flushed, so a run that
is killed keeps what it measured. A row that fails or runs out of time is a line with ``error``. Compiling
dgae-b takes minutes: ``--compile-guard S`` abandons a compiled row after S seconds (0: skip compiled rows) and
``--deadline S`` ends every row S seconds after start. ``--profile DIR`` writes torch.profiler's top kernels of
the eager ``unet`` and ``train`` rows there (and their top 10 to ``--out``). The table is printed last.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from dgaetok.flops import count_flops, matmul_peak, seconds_per_call, training_flops_per_image
from dgaetok.memory import largest_batch
from dgaetok.models import COMPILE_MODES, MODELS, DGAEConfig, Tokenizer, build_model, load_model, synchronize
from dgaetok.precision import autocast, resolve, training_layout

KINDS = ("unet", "train", "train-ckpt", "encode", "decode", "peer")
DEFAULT_ROWS = ["unet", "train", "train-ckpt", "encode", "decode", "peer"]


class OutOfTime(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float | None, why: str):
    """Raise `OutOfTime` in the main thread after ``seconds`` (None: no limit). Compiling spends its time in
    Python, so this interrupts it too."""
    if seconds is None:
        yield
        return
    if seconds <= 0:
        raise OutOfTime(f"skipped: {why}")

    def fire(signum, frame):
        raise OutOfTime(f"stopped after {seconds:.0f} s: {why}")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def profile_top(fn, device: torch.device, path: Path, calls: int = 3) -> list[dict]:
    """Profile ``calls`` calls of ``fn`` (after one warm call); write the kernel table to ``path`` and return the
    top 10 by self time on the device (CPU: on the host)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    fn()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    events = prof.key_averages()
    key = next(k for k in ((["self_device_time_total", "self_cuda_time_total"] if cuda else []) +
                           ["self_cpu_time_total"]) if hasattr(events[0], k))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(events.table(sort_by=key, row_limit=30) + "\n")
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:10]
    total = sum(getattr(e, key) for e in events)
    return [{"name": e.key, "ms_per_call": getattr(e, key) / 1e3 / calls, "share": getattr(e, key) / total,
             "count_per_call": e.count / calls} for e in top]


def cpu_name() -> str:
    """The CPU's model name as Linux reports it (with its family, which tells generations of one name apart)."""
    try:
        info = dict(map(str.strip, line.split(":", 1)) for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if ":" in line)
        return f"{info['model name']}, family {info['cpu family']}"
    except (OSError, KeyError):
        return platform.processor() or platform.machine()


class Bench:
    """One preset's rows. Inputs are made once at the largest batch any row asks for and sliced per row."""

    def __init__(self, config: DGAEConfig, args, device: torch.device, peak: float, emit: Callable[[dict], None]):
        self.config, self.args, self.device, self.peak, self.emit = config, args, device, peak, emit
        self.precision = resolve(args.precision, device)
        torch.manual_seed(0)
        res, f, c = config.resolution, config.downsample, config.latent_channels
        n = max(args.batch, args.unet_batch)
        self.x = torch.randn(n, 3, res, res, device=device).clamp(-1, 1)
        self.z = torch.randn(n, c, res // f, res // f, device=device)
        self.noise = torch.randn_like(self.x)
        self.t = torch.rand(n, device=device)
        self.model = build_model(config).to(device).eval()
        one = (slice(0, 1),)
        with torch.no_grad():  # counted before the layout change: CPU's channels_last attention escapes the counter
            self.enc_flops = count_flops(lambda: self.model.encode(self.x[one]))
            self.dec_flops = [count_flops(lambda k=k: self.model.decode(self.z[one], k, noise=self.noise[one]))
                              for k in (1, 2)]
            cond = self.model.condition(self.z[one])
            self.unet_flops = count_flops(lambda: self.model.decoder(self.x[one], self.t[one], cond))
        self.model = self.laid_out(self.model).set_precision(self.precision)
        self.compiled: dict[str, Tokenizer] = {}

    def laid_out(self, model: Tokenizer) -> Tokenizer:
        return model.to(memory_format=torch.channels_last) if self.args.memory_format == "channels_last" else model

    def inference_model(self, mode: str | None) -> Tokenizer:
        """The model, or a copy of it compiled in place in ``mode`` (made once per mode)."""
        if not mode:
            return self.model
        if mode not in self.compiled:
            twin = build_model(self.config).to(self.device).eval()
            twin.load_state_dict(self.model.state_dict())
            self.compiled[mode] = self.laid_out(twin).set_precision(self.precision).compile_networks(mode)
        return self.compiled[mode]

    def record(self, what: str, mode: str | None, batch: int, flops_per_image: float, seconds: float,
               peak_gib: float | None, steps: int | None = None, **extra) -> dict:
        img_s = batch / seconds
        c = self.config
        return {"kind": "row", "preset": c.preset, "latent": f"f{c.downsample}c{c.latent_channels}", "what": what,
                "precision": self.precision.name, "compile": mode, "steps": steps, "batch": batch, "seconds_per_call": seconds, "img_per_s": img_s,
                "gflop_per_img": flops_per_image / 1e9, "tflop_per_s": img_s * flops_per_image / 1e12,
                "mfu": img_s * flops_per_image / self.peak, "peak_mem_gib": peak_gib, **extra}

    def fitted(self, seconds_at: Callable[[int], float], start: int) -> tuple[int, float, float | None]:
        """(batch, seconds per call, peak GiB) at the largest batch from ``start`` down that fits."""
        cuda = self.device.type == "cuda"

        def attempt(batch: int):
            if cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            seconds = seconds_at(batch)
            return seconds, torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else None

        batch, (seconds, peak) = largest_batch(attempt, start, self.args.fit_refine)
        return batch, seconds, peak

    def run(self, spec: str) -> None:
        """Measure one ``--rows`` entry and emit its line(s); failures and time-outs become error lines."""
        kind, _, mode = spec.partition("@")
        mode = mode or None
        args = self.args
        left = None if args.deadline is None else args.deadline - (time.perf_counter() - args.started)
        limit, why = left, "past --deadline"
        if mode and (limit is None or args.compile_guard < limit):
            limit, why = args.compile_guard, "--compile-guard"
        try:
            with time_limit(limit, why):
                getattr(self, kind.replace("-", "_"))(mode)
        except Exception as exc:  # noqa: BLE001 - a failed row (out of time, memory, a missing package) is a line
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.emit({"kind": "row", "preset": self.config.preset, "what": kind, "precision": self.precision.name,
                       "compile": mode,
                       "error": f"{type(exc).__name__}: {message}"[:300]})
            if mode:
                torch._dynamo.reset()
                self.compiled.pop(mode, None)
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @torch.no_grad()
    def unet(self, mode: str | None) -> None:
        model = self.inference_model(mode)
        with autocast(self.device, self.precision):
            cond = model.condition(self.z)

        def step(b: int):
            torch.compiler.cudagraph_mark_step_begin()  # each call a new replay under reduce-overhead
            with autocast(self.device, self.precision):
                model.decoder(self.x[:b], self.t[:b], cond[:b])

        batch, seconds, peak = self.fitted(lambda b: seconds_per_call(lambda: step(b), self.device,
                                                                      self.args.min_time), self.args.unet_batch)
        self.emit(self.record("unet", mode, batch, self.unet_flops, seconds, peak))
        if self.args.profile and not mode:
            top = profile_top(lambda: step(batch), self.device, Path(self.args.profile) / "profile-unet.txt",
                              self.args.profile_calls)
            self.emit({"kind": "profile", "what": "unet", "batch": batch, "top": top})

    @torch.no_grad()
    def encode(self, mode: str | None) -> None:
        model = self.inference_model(mode)
        batch, seconds, peak = self.fitted(
            lambda b: seconds_per_call(lambda: model.encode(self.x[:b]).latent_dist.mode(), self.device,
                                       self.args.min_time), self.args.batch)
        self.emit(self.record("encode", mode, batch, self.enc_flops, seconds, peak))

    @torch.no_grad()
    def decode(self, mode: str | None) -> None:
        model = self.inference_model(mode)
        first, second = self.dec_flops  # linear in the steps: the conditioning once, then one U-Net pass a step
        for steps in self.args.steps:
            long = steps > 8  # a 50-step decode of dgae-b takes seconds: warm up and time it once
            batch, seconds, peak = self.fitted(
                lambda b: seconds_per_call(lambda: model.decode(self.z[:b], steps, noise=self.noise[:b]),
                                           self.device, self.args.min_time, warmup=1 if long else 2,
                                           min_calls=1 if long else 3), self.args.batch)
            self.emit(self.record("decode", mode, batch, (2 * first - second) + steps * (second - first), seconds,
                                  peak, steps))

    @torch.no_grad()
    def peer(self, mode: str | None) -> None:
        c = self.config
        peer = build_model(DGAEConfig(arch="sdvae", preset="sdvae", resolution=c.resolution,
                                      downsample=c.downsample, latent_channels=c.latent_channels))
        peer = peer.to(self.device).eval()
        flops = count_flops(lambda: peer.decode(self.z[:1]))
        peer = self.laid_out(peer).set_precision(self.precision)
        if mode:
            peer.compile_networks(mode)
        batch, seconds, peak = self.fitted(
            lambda b: seconds_per_call(lambda: peer.decode(self.z[:b]), self.device, self.args.min_time),
            self.args.batch)
        self.emit(self.record("sdvae decode (peer)", mode, batch, flops, seconds, peak, 1))

    def train(self, mode: str | None, checkpointing: bool = False) -> None:
        from dgaetok.losses import DGAELoss, perceptual_net  # needs lpips: only the training rows do
        from dgaetok.train import TrainConfig, accumulate, make_optimizer, update_ema

        cfg = TrainConfig(lpips_net=self.args.lpips_net, lpips_pretrained=False)  # a random trunk: same cost
        device, res = self.device, self.config.resolution
        torch.manual_seed(0)
        layout = training_layout(device, self.precision)  # as `train.train` lays out weights and inputs
        model = build_model(self.config).to(device, memory_format=layout).train()
        model.set_grad_checkpointing(checkpointing).set_precision(self.precision)
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        opt = make_optimizer(model, cfg)
        loss_fn = DGAELoss(perceptual_net(cfg.lpips_net, False), cfg.velocity_weight, cfg.kl_weight,
                           cfg.lpips_weight).to(device)
        x = torch.randn(self.args.train_batch, 3, res, res, device=device).clamp(-1, 1)
        x = x.contiguous(memory_format=layout)
        generator = torch.Generator(device).manual_seed(0)
        flops = training_flops_per_image(self.config, cfg.lpips_net)  # the model's, without recomputation
        if mode:
            model.compile_networks(mode)

        def step(b: int) -> None:
            opt.zero_grad(set_to_none=True)
            accumulate(model, (x[:b],), lambda j, x: loss_fn(model, x, generator), device, self.precision)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            update_ema(ema, model, cfg.ema_decay)

        def seconds_at(b: int) -> float:
            try:
                return seconds_per_call(lambda: step(b), device, self.args.min_time)
            finally:
                opt.zero_grad(set_to_none=True)  # a step that ran out of memory leaves gradients behind

        what = "train step" + (" (checkpointed)" if checkpointing else "")
        batch, seconds, peak = self.fitted(seconds_at, self.args.train_batch)
        self.emit(self.record(what, mode, batch, flops, seconds, peak, grad_checkpoint=checkpointing))
        if self.args.profile and not mode:
            name = "profile-train" + ("-ckpt" if checkpointing else "") + ".txt"
            top = profile_top(lambda: step(batch), device, Path(self.args.profile) / name, self.args.profile_calls)
            self.emit({"kind": "profile", "what": what, "batch": batch, "top": top})

    def train_ckpt(self, mode: str | None) -> None:
        self.train(mode, checkpointing=True)


def parse_rows(rows: list[str]) -> list[str]:
    for spec in rows:
        kind, _, mode = spec.partition("@")
        if kind not in KINDS or (mode and mode not in COMPILE_MODES):
            raise SystemExit(f"--rows {spec}: expected KIND or KIND@MODE, KIND one of {', '.join(KINDS)} and MODE "
                             f"one of {', '.join(COMPILE_MODES)}")
    return rows


def print_table(header: dict, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{header['device']}: {header['matmul_dtype']} matmul peak "
                        f"{header['matmul_peak_tflop_per_s']:.2f} TFLOP/s (measured), {header['resolution']}px, "
                        f"{header['compute']}, {header['memory_format']}")
    for col in ("preset", "what", "compile", "steps", "batch", "img/s", "GFLOP/img", "TFLOP/s", "MFU", "peak GiB"):
        table.add_column(col, justify="left" if col in ("preset", "what", "compile") else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["preset"], r["what"], r["compile"] or "", "", "", r["error"], "", "", "", "")
            continue
        peak = "" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        table.add_row(r["preset"], r["what"], r["compile"] or "", str(r["steps"] or ""), str(r["batch"]),
                      f"{r['img_per_s']:.2f}", f"{r['gflop_per_img']:.1f}", f"{r['tflop_per_s']:.3f}",
                      f"{100 * r['mfu']:.1f}%", peak)
    Console(width=max(Console().width, 140)).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", help="DGAE preset(s) (default: dgae-b)")
    parser.add_argument("--model", help="time this model file's architecture (or a name in weights/) instead")
    parser.add_argument("-f", "--downsample", type=int, default=16)
    parser.add_argument("-c", "--latent-channels", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, help=f"KIND or KIND@MODE, in order; "
                        f"KIND: {', '.join(KINDS)}; MODE: {', '.join(COMPILE_MODES)}")
    parser.add_argument("--batch", type=int, default=16, help="encode/decode/peer batch (largest tried)")
    parser.add_argument("--unet-batch", type=int, default=32, help="U-Net step batch (largest tried)")
    parser.add_argument("--train-batch", type=int, default=96, help="training-step batch (largest tried; 0: no "
                        "training rows)")
    parser.add_argument("--lpips-net", default="vgg", help="LPIPS network of the training rows' loss (the "
                        "paper's: vgg; alex builds faster, for rehearsals)")
    parser.add_argument("--fit-refine", type=int, default=1, help="bisection steps after the first batch that fits")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 4, 8, 50], help="decode step counts")
    parser.add_argument("--memory-format", choices=("channels_last", "contiguous"), default="channels_last",
                        help="weights' layout for the inference rows (channels_last: what load_model gives)")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds timed per row")
    parser.add_argument("--compile-guard", type=float, default=180.0,
                        help="seconds a compiled row may take, compiling included (0: skip compiled rows)")
    parser.add_argument("--deadline", type=float, help="seconds after start past which rows are stopped or skipped")
    parser.add_argument("--profile", metavar="DIR", help="write torch.profiler top kernels of the eager unet and "
                        "train rows here")
    parser.add_argument("--profile-calls", type=int, default=3, help="calls profiled per row")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", help="auto, bf16 or fp32 (`dgaetok.precision`)")
    parser.add_argument("--out", default="runs/throughput/throughput.jsonl", help="JSON lines, appended")
    args = parser.parse_args()
    args.started = time.perf_counter()
    args.rows = [r for r in parse_rows(args.rows) if args.train_batch or not r.startswith("train")]
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with open(out, "a") as fh:
        def emit(record: dict) -> None:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            if record["kind"] == "row":
                rows.append(record)
            print(json.dumps(record), flush=True)

        name = (torch.cuda.get_device_name(device) if device.type == "cuda" else
                f"CPU ({cpu_name()}, {torch.get_num_threads()} threads)")
        precision = resolve(args.precision, device)
        peak, peak_dtype = matmul_peak(device, min(args.min_time, 1.0), precision.bf16)
        if args.model:  # its architecture; timing does not depend on the weights' values
            configs = [load_model(args.model).config]
        else:
            configs = [MODELS[p](resolution=args.resolution, downsample=args.downsample,
                                 latent_channels=args.latent_channels) for p in args.preset or ["dgae-b"]]
        header = {"kind": "header", "device": name, "torch": torch.__version__, "argv": sys.argv[1:],
                  "matmul_peak_tflop_per_s": peak / 1e12, "matmul_dtype": peak_dtype,
                  "compute": precision.note(),
                  "resolution": configs[0].resolution, "memory_format": args.memory_format}
        emit(header)
        for config in configs:
            bench = Bench(config, args, device, peak, emit)
            for spec in args.rows:
                bench.run(spec)
            del bench
    print_table(header, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
