"""What the training data costs beyond decoding images, at ImageNet scale (1.28M files), on the CPU.

    python benchmarks/data_overhead.py                      # sampling over a synthetic 1.28M-entry file list
    python benchmarks/data_overhead.py --tree 1000 1281     # ... and listing a real tree of 1.28M empty files

Sampling: an `ImageFolder` over 1.28M made-up paths (nothing is read), timed per draw for what `__getitem__`
does besides decoding: the draw's file (epoch permutation lookup), its path, and its crop and flip. The
permutation itself is timed apart: it is made once per epoch. The crop of an in-memory image, its tensor and
flip are timed apart too, as the per-image work that stays. Target: sampling at most 50 us per image.

Listing (``--tree DIRS FILES``): DIRS folders of FILES empty ``.JPEG`` files each (ImageNet's layout) are
created in a temporary folder, timed through `files.find_files` and `ImageFolder(...)` construction, and deleted.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from dgaetok.data import ImageFolder
from dgaetok.files import IMAGE_SUFFIXES, find_files, to_tensor


def timed(fn):
    """(result, wall seconds, CPU seconds of this process): on a shared machine the CPU time is the steadier."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def sampling(n: int, draws: int, resolution: int) -> dict:
    names = [f"/data/train/n{i // 1281:08d}/n{i // 1281:08d}_{i}.JPEG" for i in range(n)]
    data, build_s, _ = timed(lambda: ImageFolder("synthetic", resolution, files=names))
    _, order_s, _ = timed(lambda: data.order(0))
    size = (resolution * 4 // 3, resolution)  # a 4:3 photo after resizing

    def sample_all():
        for draw in range(draws):
            index = next(data.candidates(draw))
            data.files[index]
            data.augmentation(draw, size)

    _, sample_s, sample_cpu = timed(sample_all)
    img = Image.new("RGB", size, (120, 60, 30))

    def crop_all():
        for draw in range(min(draws, 2000)):
            aug = data.augmentation(draw, size)
            x = to_tensor(img.crop((aug.left, aug.top, aug.left + resolution, aug.top + resolution)))
            if aug.flip:
                x.flip(-1)

    _, crop_s, _ = timed(crop_all)
    return {"files": n, "draws": draws, "build_s": build_s, "epoch_permutation_s": order_s,
            "sampling_us_per_image": 1e6 * sample_s / draws, "sampling_cpu_us_per_image": 1e6 * sample_cpu / draws,
            "crop_to_tensor_us_per_image": 1e6 * crop_s / min(draws, 2000)}


def listing(dirs: int, per_dir: int, resolution: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="dgaetok-tree-"))
    try:
        def make():
            for d in range(dirs):
                folder = root / f"n{d:08d}"
                folder.mkdir()
                for i in range(per_dir):
                    (folder / f"n{d:08d}_{i}.JPEG").touch()

        _, make_s, _ = timed(make)
        files, find_s, find_cpu = timed(lambda: find_files(root, IMAGE_SUFFIXES))
        data, folder_s, folder_cpu = timed(lambda: ImageFolder(root, resolution))
        assert len(files) == len(data) == dirs * per_dir
        return {"files": len(files), "create_s": make_s, "find_files_s": find_s, "find_files_cpu_s": find_cpu,
                "image_folder_s": folder_s, "image_folder_cpu_s": folder_cpu}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1_281_167, help="entries of the synthetic file list")
    parser.add_argument("--draws", type=int, default=200_000, help="draws timed")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--tree", type=int, nargs=2, metavar=("DIRS", "FILES"),
                        help="also create, list and delete a tree of DIRS x FILES empty files")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    result = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "python": platform.python_version(),
              "torch": torch.__version__, "sampling": sampling(args.files, args.draws, args.resolution)}
    if args.tree:
        result["listing"] = listing(*args.tree, args.resolution)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
