"""`dgaetok bench rfid` end to end on a tiny model and a few real evaluation photos."""
from __future__ import annotations

import json
import math

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from dgaetok.bench import rfid
from dgaetok.cli import app
from dgaetok.models import load_model


def test_bench_rfid_cli(tiny_model_file, shared_data, tmp_path):
    out = tmp_path / "bench"
    args = ["bench", "rfid", str(shared_data / "eval" / "imagenet-val500"), "--model", str(tiny_model_file),
            "--steps", "1", "--steps", "2", "--limit", "3", "--resolution", "64", "--device", "cpu", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "rfid.json").read_text())
    assert report["images"] == 3 and report["latent_shape"] == [4, 8, 8] and report["device"] == "cpu"
    assert [r["steps"] for r in report["results"]] == [1, 2]
    for r in report["results"]:
        assert 0 < r["psnr"] < 40 and -1 <= r["ssim"] <= 1 and r["lpips"] > 0 and r["rfid"] > 0
        assert r["images_per_s"] > 0 and r["colour"] >= 0 and r["border"] > 0
    grid = Image.open(out / "rfid-grid.png")
    # 3 images x (original, 1 step, 2 steps), under a 16 px strip that labels the columns
    assert grid.size == (3 * 64 + 4 * 2, 16 + 3 * 64 + 4 * 2)
    strip = np.asarray(grid.convert("L"))[:16]
    for column in range(3):  # dark text over each column, white elsewhere in the strip
        assert strip[:, column * 66 + 2:(column + 1) * 66].min() < 128, column
    assert np.median(strip) == 255
    assert "PSNR" in result.output
    assert "warning: rFID over 3 images is biased upwards" in " ".join(result.stderr.split())


def test_bench_steps_share_seeds_and_reference(tiny_model_file, shared_data):
    """The same step count twice gives the same numbers: seeds are fixed, reference stats come from the cache."""
    model = load_model(tiny_model_file)
    data = shared_data / "eval" / "imagenet-val500"
    first = rfid(model, "tiny", data, [2, 2], limit=3, resolution=64, lpips_net="alex")
    a, b = first.results
    assert (a.psnr, a.ssim, a.lpips) == (b.psnr, b.ssim, b.lpips)
    assert math.isclose(a.rfid, b.rfid, rel_tol=1e-9)


def test_bench_psnr_colour_and_border_match_direct_computation(tiny_model_file, shared_data):
    """PSNR, the colour offset and the border ratio reported by the benchmark equal those computed by hand from the
    decoded images."""
    from dgaetok.bench import eval_images
    from dgaetok.files import to_uint8

    model = load_model(tiny_model_file)
    data = shared_data / "eval" / "imagenet-val500"
    report = rfid(model, "tiny", data, [1], limit=2, resolution=64)
    _, images, _ = eval_images(data, 64, 2)
    x = torch.stack(images)
    noise = torch.randn((1, 3, 64, 64), generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    recon = model.decode(model.encode(x).latent_dist.mode(), steps=1, noise=noise)
    a, b = to_uint8(x).numpy().astype(np.float64), to_uint8(recon).numpy().astype(np.float64)
    mse = ((a - b) ** 2).reshape(2, -1).mean(axis=1)
    assert math.isclose(report.results[0].psnr, float(np.mean(10 * np.log10(255**2 / mse))), rel_tol=1e-9)
    colour = np.abs(a.mean(axis=(1, 2)) - b.mean(axis=(1, 2))).mean()  # per image over R, G, B, then over images
    assert math.isclose(report.results[0].colour, float(colour), rel_tol=1e-6)
    err = np.abs(a - b)
    strips = [err[:, :3].mean(), err[:, -3:].mean(), err[:, :, :3].mean(), err[:, :, -3:].mean()]
    assert math.isclose(report.results[0].border, float(max(strips) / err[:, 8:-8, 8:-8].mean()), rel_tol=1e-5)


def test_weights_list_cli():
    result = CliRunner().invoke(app, ["weights", "list"])
    assert result.exit_code == 0
    for name in ("lpips-alex", "lpips-vgg", "fid-inception"):
        assert name in result.output
