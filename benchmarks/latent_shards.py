"""Latent datasets on this machine: `encode --shards` throughput with 1 and 2 processes, what `LatentDataset`
delivers through a DataLoader, and the bytes on disk against one latent file per image.

    python benchmarks/latent_shards.py --data ../shared/data/train --images 64 --latents 32768

Encoding: ``--images`` photos spread evenly over DATA's sorted list (linked into a temporary class tree, so the
labels are DATA's first-level folders) are encoded with ``--model`` by the real command, as

* one process, 1 thread, and one process, 2 threads (``OMP_NUM_THREADS``);
* ``torchrun --nproc_per_node 2`` on the CPU (gloo), 1 thread per process;

images/s counts the whole command (start-up, listing, model load, writing) from launch to exit. The 1-process and
2-process outputs at 1 thread are compared byte for byte.

Disk: the shard folder of the 1-process run against ``dgaetok encode`` of the same images to one file per image:
apparent bytes and allocated bytes (st_blocks), total and per image.

Loading: ``--latents`` random 8x16x16 latents (float32) are written as shards of ``--shard-size`` with a
dataset.json, read once to warm the page cache, then timed through ``torch.utils.data.DataLoader`` (shuffled
batches of ``--batch-size``, normalised) for ``--epochs`` epochs: with the batched path DataLoader takes through
``__getitems__``, with 0 and 2 worker processes, with flip draws, and, for comparison, a wrapper that offers only
per-item ``__getitem__``. Goal: at least 50,000 latents/s from a warm page cache.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dgaetok.data import LatentDataset  # noqa: E402
from dgaetok.files import IMAGE_SUFFIXES, find_files  # noqa: E402
from dgaetok.shards import ShardInfo, shard_name, write_dataset, write_shard  # noqa: E402
from dgaetok.stats import Moments  # noqa: E402


def subset(data: Path, n: int, into: Path) -> Path:
    """``n`` images spread evenly over DATA, linked into ``into`` under their first-level folders."""
    files = find_files(data, IMAGE_SUFFIXES)
    picked = [files[i * len(files) // n] for i in range(min(n, len(files)))]
    for path in picked:
        rel = path.relative_to(data)
        link = into / rel.parts[0] / "_".join(rel.parts[1:]) if len(rel.parts) > 1 else into / rel.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path.resolve())
    return into


def run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):  # 1: some image failed, which the summary says
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return seconds


def disk(folder: Path) -> tuple[int, int, int]:
    """(files, apparent bytes, allocated bytes) under ``folder``."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files), sum(p.stat().st_blocks * 512 for p in files)


def encoding(args, work: Path) -> tuple[list[dict], dict]:
    src = subset(args.data, args.images, work / "src")
    n = len(find_files(src, IMAGE_SUFFIXES))
    common = ["encode", str(src), "--model", args.model, "--shards", str(args.images_per_shard), "--device", "cpu",
              "--batch-size", str(args.encode_batch)]
    py = [sys.executable, "-m"]
    rows = []
    for name, cmd, threads in (
        ("1 process x 1 thread", py + ["dgaetok.cli", *common, "-o", str(work / "p1t1")], 1),
        ("1 process x 2 threads", py + ["dgaetok.cli", *common, "-o", str(work / "p1t2")], 2),
        ("2 processes x 1 thread (torchrun, gloo)", py + ["torch.distributed.run", "--standalone",
                                                          "--nproc_per_node", "2", "-m", "dgaetok.cli", *common,
                                                          "-o", str(work / "p2t1")], 1),
    ):
        seconds = run(cmd, threads)
        rows.append({"run": name, "images": n, "seconds": round(seconds, 1), "images_per_s": round(n / seconds, 2)})
        print(json.dumps(rows[-1]), flush=True)
    same = sorted(os.listdir(work / "p1t1")) == sorted(os.listdir(work / "p2t1")) and all(
        (work / "p1t1" / f).read_bytes() == (work / "p2t1" / f).read_bytes() for f in os.listdir(work / "p1t1"))
    seconds = run(py + ["dgaetok.cli", "encode", str(src), "--model", args.model, "--device", "cpu", "-o",
                        str(work / "files")], 1)
    per_file = disk(work / "files")
    shards = disk(work / "p1t1")
    sizes = {"images": n, "one_file_per_image": {"files": per_file[0], "bytes": per_file[1],
                                                 "allocated": per_file[2]},
             "shards": {"files": shards[0], "bytes": shards[1], "allocated": shards[2]},
             "two_processes_byte_identical_to_one": same,
             "one_file_per_image_encode_images_per_s": round(n / seconds, 2)}
    print(json.dumps(sizes), flush=True)
    return rows, sizes


class PerItem(Dataset):
    """The dataset without its batched path: what per-item indexing costs."""

    def __init__(self, data: LatentDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.data[i]


def synthetic(folder: Path, n: int, shard_size: int, shape=(8, 16, 16)) -> Path:
    """``n`` random latents as a shard folder with its dataset.json (what `encode --shards` would write)."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    shards, moments = [], Moments()
    for k, start in enumerate(range(0, n, shard_size)):
        count = min(shard_size, n - start)
        z = torch.randn((count, *shape), generator=gen) * 0.8 + 0.1
        m = Moments()
        m.add(z)
        moments.merge(m)
        write_shard(folder / shard_name(k), {"latents": z, "labels": torch.arange(start, start + count) % 1000,
                                             "index": torch.arange(start, start + count)},
                    ShardInfo({"synthetic": True}, [start, start + count], "", m.state(), []))
        shards.append({"file": shard_name(k), "images": count})
    stats = moments.stats("synthetic")
    write_dataset(folder, {"classes": [str(c) for c in range(1000)], "latent_shape": list(shape), "flip": False,
                           "dtype": "float32", "images": n, "shards": shards, "failed": [],
                           "latent_stats": {"mean": stats.mean, "std": stats.std, "images": n, "source": "random"}})
    return folder


def loading(args, work: Path) -> list[dict]:
    folder = synthetic(work / "latents", args.latents, args.shard_size)
    for path in folder.iterdir():  # warm the page cache
        path.read_bytes()
    rows = []
    for name, make, workers in (("batched (__getitems__), 0 workers", lambda: LatentDataset(folder), 0),
                                ("batched (__getitems__), 2 workers", lambda: LatentDataset(folder), 2),
                                ("per-item __getitem__, 0 workers", lambda: PerItem(LatentDataset(folder)), 0)):
        loader = DataLoader(make(), batch_size=args.batch_size, shuffle=True, num_workers=workers,
                            persistent_workers=workers > 0, drop_last=False)
        for _ in loader:  # one epoch to start workers and touch every page
            pass
        start, count = time.perf_counter(), 0
        for _ in range(args.epochs):
            for z, y in loader:
                count += len(z)
        seconds = time.perf_counter() - start
        rows.append({"run": name, "latents": count, "seconds": round(seconds, 2),
                     "latents_per_s": round(count / seconds)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "train")
    ap.add_argument("--model", default=str(ROOT / "weights" / "default.safetensors"))
    ap.add_argument("--images", type=int, default=64, help="images to encode (0: skip encoding)")
    ap.add_argument("--images-per-shard", type=int, default=16)
    ap.add_argument("--encode-batch", type=int, default=8)
    ap.add_argument("--latents", type=int, default=32768, help="synthetic latents to load (0: skip loading)")
    ap.add_argument("--shard-size", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", type=Path, help="also write the results here (JSON)")
    args = ap.parse_args()
    device = f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(device, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        encode_rows, sizes = encoding(args, work) if args.images else ([], {})
        load_rows = loading(args, work) if args.latents else []
    result = {"device": device, "encode": encode_rows, "disk": sizes, "loading": load_rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
