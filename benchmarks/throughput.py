"""Encode / decode / training-step throughput of DGAE presets, as a fraction of the card's measured matmul peak.

    python benchmarks/throughput.py                                  # dgae-b f16c8 on the GPU, batch 64
    python benchmarks/throughput.py --preset dgae-b --preset dgae-l --batch 128
    python benchmarks/throughput.py --device cpu --model dgae-s-f8c4 --batch 1 --train-batch 0 --steps 8

One run measures, on one device and in one process:
- the dense matmul peak (bf16 on CUDA, float32 on CPU: the dtypes the library computes in), best of several
  square products; every line's MFU is its achieved FLOP/s over this number;
- per preset: images/s of `encode`, of `decode` at each --steps (Euler, the CLI's default), and of one training
  step (DGAE loss with LPIPS-VGG, backward, clip, AdamW, EMA: what `dgaetok train` does per step);
- the peer: the SD-VAE decoder of the same latent size (LDM's ch 128), one pass per image;
- with --compile MODE, the encode, decode and training rows again with the networks compiled in place
  (`Tokenizer.compile_networks`, what the CLI's --compile does), so each change is measured in the same run.

FLOPs per image come from `torch.utils.flop_counter` (2 per multiply-add; matmuls, convolutions and attention),
counted on the model itself, so MFU is over the work the network really does. The table is printed last; the
JSON (--out) holds every number plus the device, torch version and settings.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dgaetok.bench import synchronize
from dgaetok.losses import DGAELoss, perceptual_net
from dgaetok.models import COMPILE_MODES, MODELS, DGAEConfig, autocast, build_model, load_model
from dgaetok.train import TrainConfig, make_optimizer, update_ema


def seconds_per_call(fn, device: torch.device, min_time: float, warmup: int = 2) -> float:
    """Mean wall time of ``fn()`` over at least ``min_time`` seconds (and 3 calls), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < min_time:
        fn()
        calls += 1
        synchronize(device)
    return (time.perf_counter() - start) / calls


def matmul_peak(device: torch.device, min_time: float) -> tuple[float, str]:
    """Best measured FLOP/s of a square matmul in the library's compute dtype on ``device``."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    best = 0.0
    for n in ((4096, 8192, 16384) if device.type == "cuda" else (1024, 2048)):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        best = max(best, 2 * n**3 / seconds_per_call(lambda: a @ b, device, min_time))
    return best, str(dtype).removeprefix("torch.")


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_model(config: DGAEConfig, args, device: torch.device, peak: float) -> list[dict]:
    """Rows for one preset: encode, decode at each step count, a training step; plus the SD-VAE peer decoder."""
    torch.manual_seed(0)
    res, f, c = config.resolution, config.downsample, config.latent_channels
    x = torch.randn(args.batch, 3, res, res, device=device).clamp(-1, 1)
    z = torch.randn(args.batch, c, res // f, res // f, device=device)
    noise = torch.randn_like(x)
    one = (slice(0, 1),)  # FLOPs are counted on one image

    def row(what: str, batch: int, flops_per_image: float, seconds: float, steps: int | None = None) -> dict:
        img_s = batch / seconds
        return {"preset": config.preset, "latent": f"f{f}c{c}", "what": what, "steps": steps, "batch": batch,
                "img_per_s": img_s, "gflop_per_img": flops_per_image / 1e9,
                "tflop_per_s": img_s * flops_per_image / 1e12, "mfu": img_s * flops_per_image / peak}

    def laid_out(model):
        """FLOPs are counted before this: CPU's fused channels_last attention kernel is invisible to the counter."""
        return model.to(memory_format=torch.channels_last) if args.memory_format == "channels_last" else model

    model = build_model(config).to(device).eval()
    enc = lambda x: model.encode(x).latent_dist.mode()  # noqa: E731
    dec = lambda z, noise, steps: model.decode(z, steps=steps, noise=noise)  # noqa: E731
    with torch.no_grad():
        enc_flops = count_flops(lambda: enc(x[one]))
        # decode FLOPs are linear in the steps: the latent's conditioning once, then one U-Net pass per step
        first, second = (count_flops(lambda k=k: dec(z[one], noise[one], k)) for k in (1, 2))
    rows, train_flops = [], None
    # eager first, then the same model compiled in place (what `--compile` does in the CLI): before and after
    for mode in [None] + ([args.compile] if args.compile else []):
        tag = f" (compiled: {mode})" if mode else ""
        if mode:
            model.compile_networks(mode)
        model = laid_out(model).eval()
        with torch.no_grad():
            rows.append(row("encode" + tag, args.batch, enc_flops,
                            seconds_per_call(lambda: enc(x), device, args.min_time)))
            for steps in args.steps:
                rows.append(row("decode" + tag, args.batch, (2 * first - second) + steps * (second - first),
                                seconds_per_call(lambda: dec(z, noise, steps), device, args.min_time), steps))
        if args.train_batch:
            rows.append(train_row(model, config, args, device, row, tag, train_flops))
            train_flops = rows[-1]["gflop_per_img"] * 1e9  # counted eagerly: compiled kernels escape the counter
    model = None  # frees its memory before the peer is built

    peer = build_model(DGAEConfig(arch="sdvae", preset="sdvae", resolution=res, downsample=f, latent_channels=c))
    peer = peer.to(device).eval()
    with torch.no_grad():
        flops = count_flops(lambda: peer.decode(z[one]))
        peer = laid_out(peer)
        rows.append(row("sdvae decode (peer)", args.batch, flops,
                        seconds_per_call(lambda: peer.decode(z), device, args.min_time), 1))
    return rows


def train_row(model, config: DGAEConfig, args, device: torch.device, row, tag: str = "",
              flops: float | None = None) -> dict:
    """One `dgaetok train` step at --train-batch: loss (velocity + KL + LPIPS-VGG), backward, clip, AdamW, EMA."""
    cfg = TrainConfig(lpips_pretrained=False)  # a random LPIPS trunk costs the same FLOPs, and needs no weights
    model = model.to(memory_format=torch.contiguous_format).train()
    ema = build_model(config).to(device).eval().requires_grad_(False)
    opt = make_optimizer(model, cfg)
    loss_fn = DGAELoss(perceptual_net(cfg.lpips_net, False), cfg.velocity_weight, cfg.kl_weight, cfg.lpips_weight)
    loss_fn = loss_fn.to(device)
    x = torch.randn(args.train_batch, 3, config.resolution, config.resolution, device=device).clamp(-1, 1)
    generator = torch.Generator(device).manual_seed(0)

    def forward_backward(x):
        with autocast(device):
            loss, _ = loss_fn(model, x, generator)
        loss.backward()

    def step():
        opt.zero_grad(set_to_none=True)
        forward_backward(x)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        update_ema(ema, model, cfg.ema_decay)

    if flops is None:
        flops = count_flops(lambda: forward_backward(x[:1]))
    return row("train step" + tag, args.train_batch, flops, seconds_per_call(step, device, args.min_time))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", help="DGAE preset(s) (default: dgae-b)")
    parser.add_argument("--model", help="time this model file (or name in weights/) instead of presets")
    parser.add_argument("-f", "--downsample", type=int, default=16)
    parser.add_argument("-c", "--latent-channels", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="encode/decode batch")
    parser.add_argument("--train-batch", type=int, default=96, help="training-step batch (0: skip)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 25, 50])
    parser.add_argument("--memory-format", choices=("channels_last", "contiguous"), default="channels_last",
                        help="weights' layout for encode/decode (channels_last: what load_model gives)")
    parser.add_argument("--compile", choices=COMPILE_MODES, help="also time the model compiled in this mode "
                        "(encode, decode, train step), after the eager rows")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds timed per line")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/throughput.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    peak, peak_dtype = matmul_peak(device, args.min_time)
    if args.model:  # its architecture; timing does not depend on the weights' values
        configs = [load_model(args.model).config]
    else:
        configs = [MODELS[p](resolution=args.resolution, downsample=args.downsample,
                             latent_channels=args.latent_channels) for p in args.preset or ["dgae-b"]]
    rows = [r for config in configs for r in bench_model(config, args, device, peak)]

    result = {"device": name, "torch": torch.__version__, "matmul_peak_tflop_per_s": peak / 1e12,
              "matmul_dtype": peak_dtype, "compute": "bf16 autocast" if device.type == "cuda" else "float32",
              "resolution": configs[0].resolution, "memory_format": args.memory_format, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{name}: {peak_dtype} matmul peak {peak / 1e12:.2f} TFLOP/s (measured), "
                        f"{result['resolution']}px, {result['compute']}, {args.memory_format}")
    for col in ("preset", "latent", "what", "steps", "batch", "img/s", "GFLOP/img", "TFLOP/s", "MFU"):
        table.add_column(col, justify="left" if col in ("preset", "what") else "right")
    for r in rows:
        table.add_row(r["preset"], r["latent"], r["what"], str(r["steps"] or ""), str(r["batch"]),
                      f"{r['img_per_s']:.2f}", f"{r['gflop_per_img']:.1f}", f"{r['tflop_per_s']:.3f}",
                      f"{100 * r['mfu']:.1f}%")
    Console(width=max(Console().width, 120)).print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
