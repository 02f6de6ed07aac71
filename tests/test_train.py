"""Training: the loss falls on real photos, interrupted runs resume bit-exactly, and DDP keeps ranks in sync."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from dgaetok.data import ImageFolder
from dgaetok.dit import DiT, DiT_models
from dgaetok.errors import InputError
from dgaetok import flow
from dgaetok.models import DGAE, DGAE_T, MODELS, build_model, file_sha256, load_model
from dgaetok.train import TrainConfig, accumulate, lr_at, train, update_ema

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(data: Path, out: Path, **kw) -> TrainConfig:
    """dgae-t at 32 px on the CPU, batch 4, no LPIPS, nothing written between steps unless asked."""
    base = dict(
        data=str(data), out=str(out), preset="dgae-t", resolution=32, downsample=8, latent_channels=4,
        batch_size=4, steps=4, lr=1e-3, min_lr=1e-4, warmup=2, lpips_weight=0.0, lpips_pretrained=False,
        log_every=1, ckpt_every=10**9, sample_every=10**9, sample_count=0, workers=0, seed=0,
        device="cpu",  # bit-exact comparisons need CPU kernels; a GPU's conv backward may be nondeterministic
    )
    return TrainConfig(**{**base, **kw})


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


TIMINGS = ("img_per_s", "cpu_s")  # log fields measured by the clock: they differ between identical runs


def without_timings(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMINGS}


def read_tensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}


@torch.no_grad()
def reconstruction_mse(model, x: torch.Tensor) -> float:
    z = model.encode(x).latent_dist.mode()
    return (model.decode(z, steps=10, generator=torch.Generator().manual_seed(0)) - x).pow(2).mean().item()


def test_lr_schedule():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-5, warmup=10, steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3) and lr_at(60, cfg) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(110, cfg) == pytest.approx(1e-5) and lr_at(500, cfg) == pytest.approx(1e-5)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    # a cooldown: flat at lr until decay_from, then the whole cosine over the steps left
    cool = TrainConfig(lr=1e-3, min_lr=1e-5, warmup=10, steps=300, decay_from=200)
    assert lr_at(5, cool) == lr_at(5, cfg)
    assert lr_at(10, cool) == lr_at(199, cool) == lr_at(200, cool) == pytest.approx(1e-3)
    assert lr_at(250, cool) == pytest.approx((1e-3 + 1e-5) / 2) and lr_at(300, cool) == pytest.approx(1e-5)
    assert lr_at(60, TrainConfig(lr=1e-3, min_lr=1e-5, warmup=10, steps=110, decay_from=0)) == lr_at(60, cfg)



def rss_mb() -> float:
    """This process's resident set size (Linux /proc)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.parametrize("make", [lambda: DGAE(DGAE_T()), lambda: DiT(DiT_models["DiT-T/2"](input_size=8))],
                         ids=["dgae-t", "DiT-T/2"])
def test_ema_update_records_no_graph(make):
    """The EMA follows trainable weights without becoming part of their autograd graph: recorded, every update
    would keep a node per tensor alive (about 100 kB a step for dgae-t), a leak as long as the run."""
    torch.manual_seed(0)
    model = make()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for _ in range(3):
        update_ema(ema, model, 0.5)
    for (name, e), p in zip(ema.named_parameters(), model.parameters()):
        assert e.is_leaf and not e.requires_grad and e.grad_fn is None, name
        assert p.requires_grad and p.is_leaf, name  # the model's own weights are untouched
    left = torch.cat([(p - e).flatten() for e, p in zip(ema.parameters(), model.parameters())])
    assert torch.allclose(left, torch.full_like(left, 1 / 8), atol=1e-5)  # three halvings of the distance 1

    for _ in range(50):  # the allocator's first growth
        update_ema(ema, model, 0.99)
    before = rss_mb()
    for _ in range(500):
        update_ema(ema, model, 0.99)
    assert rss_mb() - before < 10, "500 EMA updates grew the process"


def test_training_returns_a_detached_ema(tmp_path, train_photos):
    ema = train(tiny_config(train_photos, tmp_path / "run", steps=3))
    for name, p in ema.named_parameters():
        assert p.is_leaf and not p.requires_grad and p.grad_fn is None, name


@pytest.mark.slow
def test_overfitting_a_few_photos_lowers_the_loss(tmp_path, train_photos):
    out = tmp_path / "run"
    cfg = tiny_config(train_photos, out, steps=40, lr=2e-3, warmup=5, sample_count=2, sample_steps=2)
    ema = train(cfg)

    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 41))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    first = sum(r["loss"] for r in log[:10]) / 10
    last = sum(r["loss"] for r in log[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    assert log[0]["lr"] == pytest.approx(2e-3 / 5) and log[-1]["lr"] < log[5]["lr"]

    # the EMA weights reconstruct the photos better than the same model at initialisation
    x = ImageFolder(train_photos, 32).fixed_batch(4)
    torch.manual_seed(cfg.seed)
    init = build_model(cfg.model_config()).eval()
    before, after = reconstruction_mse(init, x), reconstruction_mse(ema, x)
    assert after < 0.75 * before, (before, after)

    # what the run leaves behind: a loadable EMA model equal to the returned one, a checkpoint, a sample grid
    saved = load_model(out / "model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), ema.state_dict().values()))
    meta, _ = read_tensors(out / "checkpoint.safetensors")
    assert meta["step"] == "40"
    assert (out / "samples" / "step-0000040.png").is_file()


@pytest.mark.parametrize("family", [
    {"preset": "dgae-t"},
    # SD-VAE: the GAN starts at step 1, so the discriminator, its BatchNorm statistics and its optimizer are on
    # the path both before and after the interruption
    {"preset": "sdvae-t", "disc_start": 1, "disc_channels": 8},
    # two micro-batches per step, checkpointed blocks: the discriminator's micro-batches too
    {"preset": "sdvae-t", "disc_start": 1, "disc_channels": 8, "accum": 2, "grad_checkpoint": True},
], ids=["dgae", "sdvae", "sdvae-accum-checkpointed"])
def test_interrupted_run_resumes_bit_exactly(tmp_path, train_photos, family):
    # the random LPIPS trunk (alex: the cheapest) puts the perceptual term on the path too
    cfg = tiny_config(train_photos, tmp_path / "a", lpips_weight=0.5, lpips_net="alex", **family)

    def interrupt(step, logs):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=interrupt)
    meta, _ = read_tensors(tmp_path / "a" / "checkpoint.safetensors")
    assert meta["step"] == "2"
    assert load_model(tmp_path / "a" / "model.safetensors").num_params()["total"] > 0

    # starting over in a folder that holds a checkpoint is refused rather than overwriting it
    with pytest.raises(InputError, match="resume"):
        train(cfg)
    # resuming with other model options is refused too
    with pytest.raises(InputError, match="another model config"):
        train(dataclasses.replace(cfg, latent_channels=8, resume=True))

    train(dataclasses.replace(cfg, resume=True))
    straight = dataclasses.replace(cfg, out=str(tmp_path / "b"))
    train(straight)

    meta_a, resumed = read_tensors(tmp_path / "a" / "checkpoint.safetensors")
    meta_b, uninterrupted = read_tensors(tmp_path / "b" / "checkpoint.safetensors")
    assert meta_a["step"] == meta_b["step"] == "4"
    assert resumed.keys() == uninterrupted.keys()
    assert any(k.startswith("ema.") for k in resumed) and any(k.startswith("model.") for k in resumed)
    for k in resumed:
        assert torch.equal(resumed[k], uninterrupted[k]), k
    _, model_a = read_tensors(tmp_path / "a" / "model.safetensors")
    _, model_b = read_tensors(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_b)
    opt_a = torch.load(tmp_path / "a" / "optimizer.pt", weights_only=True)
    opt_b = torch.load(tmp_path / "b" / "optimizer.pt", weights_only=True)
    assert opt_a["step"] == opt_b["step"] == 4
    assert opt_a.keys() == opt_b.keys() == ({"step", "optimizer", "disc_optimizer"} if "disc_start" in family
                                            else {"step", "optimizer"})
    for name in opt_b.keys() - {"step"}:
        for pa, pb in zip(opt_a[name]["state"].values(), opt_b[name]["state"].values()):
            assert all(torch.equal(pa[k], pb[k]) for k in pb)
    if "disc_start" in family:
        assert any(k.startswith("disc.") for k in resumed)

    # the log of the resumed run continues where it stopped, with the same losses step for step
    log_a, log_b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert log_a.pop(2) == {"event": "resumed", "step": 2}
    assert [r["step"] for r in log_a] == [1, 2, 3, 4] == [r["step"] for r in log_b]
    for ra, rb in zip(log_a, log_b):
        assert ra.keys() == rb.keys() and {"loss", "kl", "lpips", "lr"} <= ra.keys()
        assert without_timings(ra) == without_timings(rb)


def test_micro_batches_give_the_gradient_of_one_batch():
    """`accumulate` over K micro-batches gives one batch's gradients, to float32 rounding, when every image's
    randomness is the same either way (here drawn up front for the whole batch: the DGAE objective with the
    velocity, KL and posterior-sample terms)."""
    torch.manual_seed(0)
    model = build_model(MODELS["dgae-t"](resolution=32)).train()
    with torch.no_grad():  # ADM's zero-initialised output layers would leave most gradients exactly zero
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0, 0.05)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 32, 32, generator=gen) * 2 - 1
    noise, eps = torch.randn(x.shape, generator=gen), torch.randn(8, 4, 4, 4, generator=gen)
    t = torch.rand(8, generator=gen)

    def loss_of(j: int, x: torch.Tensor):
        part = slice(j * len(x), (j + 1) * len(x))
        posterior = model.encode(x).latent_dist
        z = posterior.mean + posterior.std * eps[part]
        v = model.velocity(flow.interpolate(x, noise[part], t[part]), t[part], z)
        loss = F.mse_loss(v, flow.velocity_target(x, noise[part])) + 1e-3 * posterior.kl().mean()
        return loss, {"loss": loss.detach()}

    def grads(k: int):
        model.zero_grad(set_to_none=True)
        logs = accumulate(model, x.split(len(x) // k), loss_of, torch.device("cpu"))
        return logs["loss"], [p.grad.clone() for p in model.parameters()]

    loss, whole = grads(1)
    for k in (2, 4):
        loss_k, accumulated = grads(k)
        torch.testing.assert_close(loss_k, loss)
        for a, b in zip(accumulated, whole):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_run_resumes_only_with_the_same_number_of_shards(tmp_path, train_photos):
    cfg = tiny_config(train_photos, tmp_path / "run", steps=1, accum=2)
    train(cfg)
    with pytest.raises(InputError, match="shards 2 -> 1"):
        train(dataclasses.replace(cfg, steps=2, accum=1, resume=True))
    with pytest.raises(InputError, match="does not split into 1 process.* x 3 micro-batch"):
        train(dataclasses.replace(cfg, out=str(tmp_path / "other"), accum=3))


def test_a_copy_of_a_flat_run_cools_down_and_the_flat_run_goes_on(tmp_path, train_photos):
    """Warmup-stable-decay: a flat-rate run's folder, copied, resumes with its schedule and EMA changed (they are not
    among what an exact resume keeps): the copy's rate falls from lr to min_lr over its own steps; the flat run is
    untouched and goes on as if the cooldown had not happened."""
    flat = tiny_config(train_photos, tmp_path / "flat" / "full256", steps=3, warmup=1, min_lr=1e-3, ckpt_every=3)
    train(flat)
    shutil.copytree(tmp_path / "flat", tmp_path / "cooldown")
    before = (tmp_path / "flat" / "full256" / "checkpoint.safetensors").read_bytes()
    cooldown = dataclasses.replace(flat, out=str(tmp_path / "cooldown" / "full256"), steps=7, min_lr=1e-6,
                                   decay_from=3, ema_decay=0.9, resume=True)
    train(cooldown)
    cooled = [r["lr"] for r in read_log(tmp_path / "cooldown" / "full256") if "lr" in r]
    assert cooled[:3] == [pytest.approx(1e-3)] * 3  # the flat run's steps, copied
    assert cooled[3:] == pytest.approx([lr_at(s, cooldown) for s in range(3, 7)])  # each step's rate, before it
    assert cooled[3] == pytest.approx(1e-3) and all(a > b for a, b in zip(cooled[3:], cooled[4:])) and cooled[-1] < 2e-4
    assert lr_at(7, cooldown) == pytest.approx(1e-6)
    assert (tmp_path / "flat" / "full256" / "checkpoint.safetensors").read_bytes() == before
    train(dataclasses.replace(flat, steps=5, resume=True))
    assert [r["lr"] for r in read_log(tmp_path / "flat" / "full256") if "lr" in r] == [pytest.approx(1e-3)] * 5


def test_resuming_a_finished_run_changes_nothing(tmp_path, train_photos):
    cfg = tiny_config(train_photos, tmp_path / "run", steps=2)
    train(cfg)
    before = (tmp_path / "run" / "checkpoint.safetensors").read_bytes()
    ema = train(dataclasses.replace(cfg, resume=True))
    assert (tmp_path / "run" / "checkpoint.safetensors").read_bytes() == before
    saved = load_model(tmp_path / "run" / "model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), ema.state_dict().values()))


def test_the_log_of_a_killed_run_is_cut_back_to_its_checkpoint(tmp_path, train_photos):
    """After kill -9, log.jsonl holds rows past the last checkpoint (and maybe half a row); the resumed run logs
    those steps again, so resuming cuts the log back to the checkpoint and marks the seam: no step twice."""
    out = tmp_path / "run"
    cfg = tiny_config(train_photos, out, steps=2)
    train(cfg)  # the checkpoint is at step 2
    with open(out / "log.jsonl", "a") as fh:  # what the killed run wrote after it, as kill -9 leaves it
        fh.write(json.dumps({"step": 3, "loss": 123.0}) + "\n" + '{"step": 4, "lo')
    train(dataclasses.replace(cfg, steps=4, resume=True))
    log = read_log(out)
    assert [r.get("step") for r in log] == [1, 2, 2, 3, 4]
    assert log[2] == {"event": "resumed", "step": 2} and log[3]["loss"] != 123.0


def test_a_folder_without_a_readable_image_fails_before_anything_is_written(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jpg").write_bytes(b"not a jpeg")
    (data / "b.png").write_bytes(b"")
    with pytest.raises(InputError, match="no readable image among its 2 image files"):
        train(tiny_config(data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_bad_options_are_input_errors(tmp_path, train_photos):
    with pytest.raises(InputError, match="preset"):
        train(tiny_config(train_photos, tmp_path / "x", preset="dgae-xxl"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no images"):
        train(tiny_config(empty, tmp_path / "y"))
    with pytest.raises(InputError, match="lowpass"):
        train(tiny_config(train_photos, tmp_path / "z", preset="sdvae-t", lowpass_weight=1.0))
    assert not (tmp_path / "z").exists()


def test_lowpass_term_counts_colour_and_shading_not_texture():
    from dgaetok.losses import lowpass_mse

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None]) % 2 * 0.4 - 0.2  # zero mean in every 8x8 block
    assert lowpass_mse(x + checker, x).item() < 1e-12
    assert F.mse_loss(x + checker, x).item() == pytest.approx(0.04)  # what a per-pixel MSE would charge for it
    tint = torch.tensor([0.0, -0.1, 0.1]).view(1, 3, 1, 1)  # a green-to-blue cast shared by the whole image
    assert lowpass_mse(x + tint, x).item() == pytest.approx(0.02 / 3)
    shading = torch.linspace(-0.2, 0.2, 32).view(1, 1, 1, 32)  # smooth across blocks: counted, blurred only a little
    assert lowpass_mse(x + shading, x).item() == pytest.approx(F.mse_loss(x + shading, x).item(), rel=0.1)


def test_lowpass_weight_adds_the_block_mse_of_x0_to_the_dgae_loss():
    from dgaetok.losses import DGAELoss, lowpass_mse

    torch.manual_seed(0)
    model = build_model(MODELS["dgae-t"](resolution=32, downsample=8, latent_channels=4))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    run = lambda weight: DGAELoss(None, lpips_weight=0.0, lowpass_weight=weight)(  # noqa: E731
        model, x, torch.Generator().manual_seed(2))
    (plain, plain_logs), (loss, logs) = run(0.0), run(3.0)
    assert "lowpass" not in plain_logs and logs["lowpass"] > 0
    assert loss.item() == pytest.approx(plain.item() + 3.0 * logs["lowpass"].item(), rel=1e-5)
    # The same noise and t as the loss draws: its x0' against the images, block by block.
    gen = torch.Generator().manual_seed(2)
    noise, t = torch.randn(x.shape, generator=gen), flow.sample_t(2, "cpu", gen)
    v, x_t, _ = model(x, t, noise, gen)
    assert logs["lowpass"].item() == pytest.approx(lowpass_mse(flow.predict_x0(x_t, t, v.float()), x).item(), rel=1e-5)


# --- DDP ------------------------------------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    from dgaetok.models import load_model
    from dgaetok.train import TrainConfig, train

    cfg = TrainConfig(**json.loads(sys.argv[1]))
    losses = []
    ema = train(cfg, on_step=lambda step, logs: losses.append(logs["loss"].item()))
    rank, world = dist.get_rank(), dist.get_world_size()
    flat = torch.cat([p.detach().flatten() for p in ema.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    dist.barrier()  # rank 0 has written model.safetensors before anyone reads it
    saved = load_model(os.path.join(cfg.out, "model.safetensors"))
    same_as_file = torch.equal(torch.cat([p.flatten() for p in saved.parameters()]), flat)
    result = {"rank": rank, "world": world, "losses": losses,
              "ranks_equal": all(torch.equal(g, gathered[0]) for g in gathered),
              "same_as_file": same_as_file, "checksum": flat.double().sum().item()}
    with open(sys.argv[2], "w") as fh:
        json.dump(result, fh)
    dist.destroy_process_group()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["train", "distill"])
def test_ddp_on_two_cpu_processes_keeps_ranks_identical(tmp_path, train_photos, kind):
    """Two gloo processes train like one process with two micro-batches, bit for bit; a distillation (a kind of
    training run, with the teacher's targets made per micro-batch) too."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    extra = {}
    if kind == "distill":
        train(tiny_config(train_photos, tmp_path / "teacher", steps=3, stats_images=0))
        extra = dict(teacher=str(tmp_path / "teacher" / "model.safetensors"), teacher_steps=2, stats_images=0)
    cfg = dataclasses.asdict(tiny_config(train_photos, tmp_path / "run", steps=3, **extra))
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        procs.append(subprocess.Popen(
            [sys.executable, str(script), json.dumps(cfg), str(tmp_path / f"rank{rank}.json")],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=150)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{output[-3000:]}"

    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world"] == 2
        assert res["ranks_equal"] and res["same_as_file"]
        assert len(res["losses"]) == 3 and all(map(torch.isfinite, torch.tensor(res["losses"])))
    assert results[0]["checksum"] == results[1]["checksum"]
    # each rank trained on its own half of the batch, so the per-rank losses differ
    assert results[0]["losses"] != results[1]["losses"]
    # only rank 0 writes: one log with every step, one checkpoint
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1, 2, 3]
    meta, ddp = read_tensors(tmp_path / "run" / "checkpoint.safetensors")
    assert meta["step"] == "3"

    # one process with two micro-batches per step: each is one rank's share, with that rank's images and noise.
    # Gradients are summed in the same two halves (halving is exact in binary floats), so the runs agree bit for
    # bit; with 3 shards they would agree to float rounding
    losses = []
    train(dataclasses.replace(tiny_config(train_photos, tmp_path / "accum", steps=3, **extra), accum=2),
          on_step=lambda step, logs: losses.append(logs["loss"].item()))
    _, accumulated = read_tensors(tmp_path / "accum" / "checkpoint.safetensors")
    assert accumulated.keys() == ddp.keys()
    assert all(torch.equal(accumulated[k], ddp[k]) for k in ddp)
    # the logged loss is the mean over the micro-batches, which on two processes are the ranks' losses
    assert losses == pytest.approx([(a + b) / 2 for a, b in zip(results[0]["losses"], results[1]["losses"])],
                                   rel=1e-6)


# --- the fast path: data on the device, a wall-time budget, warm starts, no per-step host sync -----------------


def test_data_on_device_trains_exactly_as_the_loader(tmp_path, train_photos):
    """The resident images give the same batches as the DataLoader, so the runs match bit for bit."""
    a = train(tiny_config(train_photos, tmp_path / "loader", steps=3, accum=2))
    b = train(tiny_config(train_photos, tmp_path / "device", steps=3, accum=2, data_on_device=True))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert [without_timings(r) for r in read_log(tmp_path / "loader")] == \
        [without_timings(r) for r in read_log(tmp_path / "device")]


def test_log_tells_cpu_time_from_wall_time(tmp_path, train_photos, monkeypatch):
    """Each record's ``cpu_s`` is the process's CPU time over its window, so a window the process spent waiting
    (paused, or on a shared machine) shows as wall time (from img_per_s) well above it."""
    import dgaetok.train as train_module

    def waiting_ema(*args, **kwargs):
        time.sleep(0.5)  # the process waits: wall time passes, CPU time does not
        return update_ema(*args, **kwargs)

    update_ema = train_module.update_ema
    monkeypatch.setattr(train_module, "update_ema", waiting_ema)
    cfg = tiny_config(train_photos, tmp_path / "run", steps=2)
    train(cfg)
    for record in read_log(tmp_path / "run"):
        wall = cfg.log_every * cfg.batch_size / record["img_per_s"]
        assert 0 < record["cpu_s"] < wall - 0.4, record


def test_non_finite_gradients_stop_at_a_log_step_and_keep_the_good_checkpoint(tmp_path, train_photos, monkeypatch):
    from dgaetok.losses import DGAELoss
    from dgaetok.train import Diverged

    forward = DGAELoss.forward

    def poisoned(self, model, x, generator=None, step=0):
        loss, logs = forward(self, model, x, generator, step)
        return (loss * float("nan") if step == 4 else loss), logs  # step 5 (1-based) has NaN gradients

    monkeypatch.setattr(DGAELoss, "forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(Diverged, match="diverged at step 5"):
        train(tiny_config(train_photos, out, steps=8, log_every=3, ckpt_every=3))
    meta, tensors = read_tensors(out / "checkpoint.safetensors")
    assert meta["step"] == "3" and all(torch.isfinite(t).all() for t in tensors.values())
    log = read_log(out)
    assert [r.get("step") for r in log] == [3, 6] and log[-1]["event"] == "diverged"


def test_budget_plans_the_steps_that_fit(monkeypatch):
    from dgaetok import train as train_module

    clock = iter([100.0, 110.0, 130.0])  # start; after step 5; after step 25: 20 steps in 20 s
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: next(clock))
    budget = train_module.Budget(minutes=1.0, start_step=0)  # 60 s; 30 s gone at step 25: 30 more steps fit
    assert budget.plan(4, torch.device("cpu")) is None
    assert budget.plan(5, torch.device("cpu")) is None
    assert budget.plan(25, torch.device("cpu")) == 25 + int(0.97 * 30)
    assert budget.plan(25, torch.device("cpu")) is None  # decided once


def test_a_flat_schedule_is_not_replanned_from_the_first_steps(tmp_path, train_photos, monkeypatch):
    """min_lr == lr: the step count changes nothing in the schedule, so a budget never cuts it from the first
    steps' speed (measured on a busy machine, that once ended a 2-hour run after 103 steps); it runs until spent."""
    from dgaetok import train as train_module

    monkeypatch.setattr(train_module.Budget, "plan", lambda self, step, device: 30)  # "30 steps fit"
    out = tmp_path / "run"
    train(tiny_config(train_photos, out, steps=40, minutes=10.0, lr=1e-3, min_lr=1e-3, log_every=10))
    assert [r.get("step") for r in read_log(out)] == [10, 20, 30, 40]
    train(tiny_config(train_photos, tmp_path / "cosine", steps=40, minutes=10.0, log_every=10))
    log = read_log(tmp_path / "cosine")
    assert log[0] == {"step": 1, "event": "budget", "steps": 30} and log[-1]["step"] == 30


def test_a_spent_budget_ends_the_run_with_a_checkpoint(tmp_path, train_photos):
    out = tmp_path / "run"
    train(tiny_config(train_photos, out, steps=100, minutes=0.0, log_every=2))
    meta, _ = read_tensors(out / "checkpoint.safetensors")
    assert meta["step"] == "2" and [r["step"] for r in read_log(out)] == [2]
    assert (out / "model.safetensors").is_file()


def test_warm_start_begins_from_the_model_file(tmp_path, train_photos):
    first = train(tiny_config(train_photos, tmp_path / "a", steps=2))
    (tmp_path / "b").mkdir()  # an attempt killed before its first checkpoint left a log: the run starts a new one
    (tmp_path / "b" / "log.jsonl").write_text('{"step": 0, "event": "warm_start", "sha256": "0"}\n{"step": 7, "lo')
    # lr 0: the second run cannot move, so its EMA is the file it started from
    again = train(tiny_config(train_photos, tmp_path / "b", steps=2, lr=0.0, min_lr=0.0,
                              warm_start=str(tmp_path / "a" / "model.safetensors")))
    for (name, p), q in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name
    # the log starts with what the run started from, which stays known when that file is replaced later on
    start = read_log(tmp_path / "b")[0]
    assert start == {"step": 0, "event": "warm_start", "part": "all", "from": str(tmp_path / "a" / "model.safetensors"),
                     "sha256": file_sha256(tmp_path / "a" / "model.safetensors"), "from_step": "2"}
    assert [r["step"] for r in read_log(tmp_path / "b")[1:]] == [1, 2]
    other = tiny_config(train_photos, tmp_path / "c", steps=2, latent_channels=8,
                        warm_start=str(tmp_path / "a" / "model.safetensors"))
    with pytest.raises(InputError, match="same config"):
        train(other)
