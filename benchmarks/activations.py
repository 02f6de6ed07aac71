"""Activation memory of one training image, with and without `--grad-checkpoint`, counted on the meta device.

    python benchmarks/activations.py                                   # dgae-b/m/l and sdvae-f16c8, f16 c8, 256 px
    python benchmarks/activations.py --preset dgae-b --lpips none

`dgaetok.memory.training_activations`: the training forward (loss with LPIPS-VGG, as `dgaetok train`) on meta
tensors, counting the bytes still alive for backward, at batch 1 and 2 (differenced). float32 counts: bf16
autocast on a GPU stores most activations in half of that. No memory, no GPU, seconds per preset.
"""
from __future__ import annotations

import argparse
import json

from dgaetok.memory import training_activations
from dgaetok.models import MODELS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", help="presets (default: dgae-b, dgae-m, dgae-l, sdvae-f16c8)")
    parser.add_argument("-f", "--downsample", type=int, default=16)
    parser.add_argument("-c", "--latent-channels", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--lpips", default="vgg", help="LPIPS network of the loss (vgg, alex) or none")
    parser.add_argument("--batch", type=int, default=96, help="also show the total for this many images")
    args = parser.parse_args()
    print(f"| preset | latent | GiB/image | GiB/image, checkpointed | batch {args.batch} | "
          f"batch {args.batch}, checkpointed |")
    print("|---|---|---|---|---|---|")
    for preset in args.preset or ["dgae-b", "dgae-m", "dgae-l", "sdvae-f16c8"]:
        latent = {} if preset.startswith("sdvae-f") else {"downsample": args.downsample,
                                                          "latent_channels": args.latent_channels}
        config = MODELS[preset](resolution=args.resolution, **latent)
        lpips = None if args.lpips == "none" else args.lpips
        plain, ckpt = (training_activations(config, lpips, c) / 2**30 for c in (False, True))
        print(f"| {preset} | f{config.downsample}c{config.latent_channels} | {plain:.2f} | {ckpt:.2f} | "
              f"{args.batch * plain:.0f} | {args.batch * ckpt:.0f} |")
        print(json.dumps({"preset": preset, "gib_per_image": plain, "gib_per_image_checkpointed": ckpt}),
              flush=True)


if __name__ == "__main__":
    main()
