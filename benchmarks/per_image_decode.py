"""What decoding one image per network call costs on a CPU, against one call for the whole batch.

`models.images_per_call` sends images through the decoder one at a time on the CPU, so that an image's decode
does not depend on its batch (oneDNN's kernels differ in the last bits between batch sizes). This times both ways
on the same latents, alternating, and reports the minimum and median of each:

    python benchmarks/per_image_decode.py --threads 2 --batch 8 --steps 2 --repeats 4
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from dgaetok import flow
from dgaetok.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model file or name (default: the bundled model)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, "cpu")
    c, side = model.config.latent_channels, model.config.resolution // model.config.downsample
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(args.batch, c, side, side, generator=gen) * 0.4
    noise = torch.randn(args.batch, 3, model.config.resolution, model.config.resolution, generator=gen)

    @torch.no_grad()
    def batched() -> torch.Tensor:  # the whole batch in each network call
        cond = model.condition(z)
        return flow.sample(lambda x, t: model.decoder(x, t, cond), noise, args.steps)

    def per_image() -> torch.Tensor:  # what DGAE.decode does on a CPU
        return model.decode(z, steps=args.steps, noise=noise)

    times: dict[str, list[float]] = {"batched": [], "per image": []}
    for _ in range(args.repeats):
        for name, fn in (("batched", batched), ("per image", per_image)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name:10s} min {min(values):7.2f} s  median {statistics.median(values):7.2f} s  "
              f"({args.batch} images x {args.steps} steps, {args.threads} threads)")
    print(f"per image / batched: min {min(times['per image']) / min(times['batched']):.2f}, median "
          f"{statistics.median(times['per image']) / statistics.median(times['batched']):.2f}")


if __name__ == "__main__":
    main()
