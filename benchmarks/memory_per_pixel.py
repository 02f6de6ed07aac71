"""Peak memory per image pixel of one decode (one ODE step) or one encode, on the CPU, in float32: what the
default pixel budget (`files.DEFAULT_MAX_PIXELS`) is sized on. Run once per configuration, in a fresh process
(the peak resident size only grows):

    python benchmarks/memory_per_pixel.py dgae-s 1024 decode
    python benchmarks/memory_per_pixel.py dgae-b 512 decode
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from dgaetok.models import MODELS, build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=sorted(MODELS))
    parser.add_argument("side", type=int, help="image side in pixels")
    parser.add_argument("what", choices=("decode", "encode"))
    args = parser.parse_args()
    latent = {} if args.preset.startswith("sdvae-f") else {"downsample": 8, "latent_channels": 4}
    model = build_model(MODELS[args.preset](**latent)).eval().requires_grad_(False)
    model = model.to(memory_format=torch.channels_last)  # as load_model
    f = model.config.downsample
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.no_grad():
        if args.what == "decode":
            model.decode(torch.randn(1, model.config.latent_channels, args.side // f, args.side // f), steps=1)
        else:
            model.encode(torch.randn(1, 3, args.side, args.side))
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # ru_maxrss is in KiB on Linux
    print(f"{args.preset} {args.what} at {args.side}x{args.side}: {peak / args.side ** 2:.0f} bytes per pixel "
          f"({peak / 2 ** 30:.2f} GiB peak), {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
