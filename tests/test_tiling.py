"""Tiles and their blending; tiled DGAE and SD-VAE decoding and tiled encoding, against whole-image runs.

The blend is checked exactly where exactness is the claim (weights sum to 1, a local operation is reproduced,
one tile is the whole image, condition features are the whole image's). What tiling changes in a real
network (GroupNorm statistics per tile) is checked on the bundled default weights and a real photo: tiled
against whole at 4 steps, and the seam test along tile borders. Peak memory of a 2048x2048 decode is measured
in a subprocess.
"""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from dgaetok.errors import InputError
from dgaetok.files import center_crop, open_image, to_tensor, to_uint8
from dgaetok.models import DGAE, DGAE_S2, DGAE_T, SDVAE, SDVAE_T, load_model
from dgaetok.tiling import TileGrid, check_tiling, ramp, seam_ratio, tile_starts

pytestmark = pytest.mark.usefixtures("one_thread")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two [-1, 1] images."""
    return 10 * math.log10(4 / (a - b).pow(2).mean().item())


def seeded_model(cls, config, seed=0):
    """A tiny model whose zero-initialised output layers get small random weights, so outputs depend on inputs."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


# --- the grid and its weights ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size, tile, overlap, align", [
    (256, 128, 32, 8), (2048, 512, 64, 16), (1000, 200, 40, 8), (520, 256, 32, 8), (264, 256, 0, 8), (64, 256, 32, 8),
])
def test_tiles_cover_the_side_aligned_with_at_least_the_overlap(size, tile, overlap, align):
    starts = tile_starts(size, tile, overlap, align)
    tile = min(tile, size)
    assert starts[0] == 0 and starts[-1] + tile == size
    assert all(s % align == 0 for s in starts)
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # neighbours overlap by >= overlap
    if len(starts) > 1:  # and no fewer tiles would do
        assert math.ceil((size - tile) / ((tile - overlap) // align * align)) == len(starts) - 1


def test_ramps_rise_and_fall_as_a_partition_of_unity():
    up, down = ramp(16, 16, 0), ramp(16, 0, 16)
    torch.testing.assert_close(up + down, torch.ones(16, dtype=torch.float64))
    assert (up.diff() > 0).all() and up[0] > 0 and up[-1] < 1
    assert torch.equal(ramp(10, 0, 0), torch.ones(10, dtype=torch.float64))


@pytest.mark.parametrize("height, width, tile, overlap", [(256, 384, 128, 32), (72, 200, 64, 16), (40, 96, 64, 8)])
def test_weights_sum_to_one_and_change_smoothly(height, width, tile, overlap):
    grid = TileGrid(height, width, tile, overlap, align=8)
    total = torch.zeros(height, width)
    for top, left in grid.boxes:
        w = grid.weight((top, left))
        assert w.shape == (grid.tile_h, grid.tile_w) and w.min() > 0 and w.max() <= 1 + 1e-6
        total[top:top + grid.tile_h, left:left + grid.tile_w] += w
    torch.testing.assert_close(total, torch.ones(height, width))
    for top, left in grid.boxes:  # no step: a weight changes by at most the steepest sin^2 slope per pixel
        w = grid.weight((top, left))
        assert max(w.diff(dim=0).abs().max(), w.diff(dim=1).abs().max()) <= math.pi / (2 * overlap) + 1e-6


def test_blending_a_local_operation_reproduces_it_exactly():
    x = torch.randn(2, 3, 96, 160, generator=torch.Generator().manual_seed(0))
    grid = TileGrid(96, 160, 64, 16, align=8)
    assert len(grid) == 6
    torch.testing.assert_close(grid.blend(lambda boxes: grid.tiles(x, boxes), torch.empty_like(x), chunk=4), x)
    # and across scales: nearest-upsampling 8x a latent tile by tile equals upsampling the whole latent
    z = x[:, :, :12, :20]
    up = lambda t: F.interpolate(t, scale_factor=8.0, mode="nearest")  # noqa: E731
    out = grid.blend(lambda boxes: up(grid.tiles(z, boxes, scale=1 / 8)), torch.empty_like(x))
    torch.testing.assert_close(out, up(z))


def test_seam_ratio_finds_a_step_at_the_borders_and_nothing_elsewhere():
    grid = TileGrid(64, 96, 48, 16, align=8)
    noise = torch.rand(64, 96, 3, generator=torch.Generator().manual_seed(0)) * 50
    assert seam_ratio(noise, grid) == pytest.approx(1, abs=0.1)
    stepped = noise.clone()
    stepped[grid.tops[1]:] += 100  # a brightness step where the second row of tiles starts
    assert seam_ratio(stepped, grid) > 1.5
    with pytest.raises(ValueError, match="no borders"):
        seam_ratio(noise, TileGrid(64, 96, 128, 16, align=8))


@pytest.mark.parametrize("tile, overlap, message", [
    (100, 32, "--tile 100: must be a positive multiple of 8 for this model"),
    (0, 0, "--tile 0: must be a positive multiple of 8 for this model"),
    (64, 40, "--overlap 40: must be between 0 and 32 for --tile 64"),
    (8, 4, "--overlap 4: must be between 0 and 0 for --tile 8"),
])
def test_bad_tilings_are_one_line_input_errors(tile, overlap, message):
    with pytest.raises(InputError) as exc:
        check_tiling(tile, overlap, 8)
    assert str(exc.value) == message


# --- tiled DGAE decoding on a tiny model: what must be exact ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return seeded_model(DGAE, DGAE_T())


def test_one_tile_covering_the_image_is_the_whole_decode(tiny):
    z = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(2))
    whole = tiny.decode(z, steps=2, noise=noise)
    torch.testing.assert_close(tiny.decode(z, steps=2, noise=noise, tile=128), whole, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_p2():
    """dgae-s2's structure (a U-Net on 2x2 patches, three downsamplings: size multiple 16) at tiny widths."""
    config = dataclasses.replace(DGAE_S2(resolution=64, downsample=8, latent_channels=4), unet_channels=32,
                                 preset="")
    assert config.unet_patch == 2
    return seeded_model(DGAE, config)


@pytest.mark.parametrize("which", ["tiny", "tiny_p2"])
def test_tile_conditions_are_the_whole_images_features(which, request, monkeypatch):
    """With a U-Net that returns its condition features, tiled and whole velocities must agree exactly: each
    tile's features, from its latent slice and a one-pixel halo, equal the whole image's under the tile (at
    the U-Net's working size, which a 2x2 patch U-Net halves: the halo is then f / 2 of its pixels)."""
    model = request.getfixturevalue(which)
    p = model.config.unet_patch
    z = torch.randn(1, 4, 12, 20, generator=torch.Generator().manual_seed(3))
    x = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(4))
    t = torch.full((1,), 0.5)
    # features (B, C, H/p, W/p) back at pixel size: p x p pixels per feature, as the U-Net's unpatchify puts them
    monkeypatch.setattr(model.decoder, "forward",
                        lambda x, t, cond: F.interpolate(cond[:, :3], scale_factor=float(p), mode="nearest"))
    whole = model.decoder(x, t, model.condition(z))
    assert whole.shape == x.shape
    tiled = model.tiled_velocity(z, tile=64, overlap=16)(x, t)
    assert len(TileGrid(96, 160, 64, 16, model.size_multiple)) > 4
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-6)


def test_tiled_decode_is_seeded_by_the_whole_images_noise(tiny):
    z = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(5))
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    a = tiny.decode(z, steps=2, generator=gen(), tile=48, overlap=16, chunk=3)
    b = tiny.decode(z, steps=2, generator=gen(), tile=48, overlap=16, chunk=1)  # chunking changes no tile
    noise = torch.randn(1, 3, 96, 96, generator=gen())
    c = tiny.decode(z, steps=2, noise=noise, tile=48, overlap=16)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-5)


@pytest.mark.parametrize("latent", [(3, 17), (5, 11), (9, 9)], ids=["24x136", "40x88", "72x72"])
def test_tiled_decoding_takes_any_shape_the_model_does(tiny, monkeypatch, latent):
    """Any shape the model decodes whole (one row of tiles, uneven grids) decodes in tiles to the same image
    when the network's output at a pixel depends only on that pixel: the blend then adds nothing of its own."""
    z = torch.randn(1, 4, *latent, generator=torch.Generator().manual_seed(6))
    noise = torch.randn(1, 3, latent[0] * 8, latent[1] * 8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(tiny.decoder, "forward", lambda x, t, cond: cond[:, :3] - x * t.view(-1, 1, 1, 1))
    whole = tiny.decode(z, steps=3, noise=noise)
    tiled = tiny.decode(z, steps=3, noise=noise, tile=32, overlap=8)
    assert tiled.shape == whole.shape == (1, 3, latent[0] * 8, latent[1] * 8)
    assert len(TileGrid(*whole.shape[2:], 32, 8, tiny.size_multiple)) > 1 and whole.std() > 0.1
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)


def test_compiled_networks_see_one_tile_count_per_grid(tiny, monkeypatch):
    """9 tiles at 2 per call: 2, 2, 2, 2, 1; a compiled network (which compiles once per input shape) gets the
    last call filled up with a repeat, whose values are dropped, so the image is the same."""
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(10))
    noise = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(11))
    calls = []
    hook = tiny.decoder.register_forward_pre_hook(lambda net, args: calls.append(len(args[0])))
    eager = tiny.decode(z, steps=1, noise=noise, tile=32, overlap=8, chunk=2)
    assert calls == [2, 2, 2, 2, 1]
    calls.clear()
    monkeypatch.setattr(tiny, "compiled", True, raising=False)  # as compile_networks leaves it, without compiling
    full = tiny.decode(z, steps=1, noise=noise, tile=32, overlap=8, chunk=2)
    hook.remove()
    assert calls == [2] * 5
    torch.testing.assert_close(full, eager, rtol=0, atol=1e-5)  # oneDNN's kernels differ by batch size in the last bit
    grid = TileGrid(64, 64, 32, 8, 8)
    sizes = []
    grid.blend(lambda boxes: sizes.append(len(boxes)) or torch.zeros(len(boxes), 1, 32, 32),
               torch.zeros(1, 1, 64, 64), chunk=4)
    assert sizes == [3, 3, 3]  # as few calls as 4 per call allows, balanced


# --- SD-VAE: tiles decoded once and blended; tiled encoding ------------------------------------------------------


def test_sdvae_tiles_blend_their_decodes():
    model = seeded_model(SDVAE, SDVAE_T())
    z = torch.randn(1, 4, 8, 14, generator=torch.Generator().manual_seed(8))  # 64x112: tiles at 0 and 48
    whole = model.decode(z)
    torch.testing.assert_close(model.decode(z, tile=128), whole, rtol=0, atol=1e-6)
    tiled = model.decode(z, tile=64, overlap=16)
    assert tiled.shape == whole.shape
    left, right = model.decode(z[..., :8]), model.decode(z[..., 6:])
    torch.testing.assert_close(tiled[..., :48], left[..., :48], rtol=0, atol=2e-5)  # one tile only: its decode
    torch.testing.assert_close(tiled[..., 64:], right[..., 16:], rtol=0, atol=2e-5)
    lo, hi = torch.minimum(left[..., 48:], right[..., :16]), torch.maximum(left[..., 48:], right[..., :16])
    assert (tiled[..., 48:64] >= lo - 2e-5).all() and (tiled[..., 48:64] <= hi + 2e-5).all()  # a blend of both


def test_tiled_encoding_one_tile_is_exact_and_more_tiles_blend(tiny):
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(9)) * 2 - 1
    whole = tiny.encode(x).latent_dist
    torch.testing.assert_close(tiny.encode(x, tile=128).latent_dist.mean, whole.mean, rtol=0, atol=1e-6)
    tiled = tiny.encode(x, tile=64, overlap=16).latent_dist
    assert tiled.mean.shape == whole.mean.shape == (1, 4, 8, 12)
    left = tiny.encode(x[..., :64]).latent_dist
    torch.testing.assert_close(tiled.mean[..., :4], left.mean[..., :4], rtol=0, atol=2e-5)
    with pytest.raises(InputError, match="--tile 60"):
        tiny.encode(x, tile=60)


# --- the bundled default weights on a real photo ------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo_decodes(shared_data):
    """A 256x256 ImageNet photo through the default model: its latent, the noise and the whole 4-step decode."""
    model = load_model()
    photo = open_image(shared_data / "eval" / "imagenet-val500" / "n01440764_tench.JPEG")
    x = to_tensor(center_crop(photo, 256, 8)[0])[None]
    z = model.encode(x).latent_dist.mode()
    noise = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    return model, z, noise, model.decode(z, steps=4, noise=noise)


def test_tiled_decode_is_close_to_the_whole_decode(photo_decodes):
    """2x2 tiles of 192 px: within 30 dB of the whole decode. Smaller tiles drift further (28.5 dB at 160 px,
    26.7 dB at 128 px here), evenly over the image rather than at the borders: each tile normalises with its
    own GroupNorm statistics (benchmarks/RESULTS.md)."""
    model, z, noise, whole = photo_decodes
    tiled = model.decode(z, steps=4, noise=noise, tile=192, overlap=32)
    assert len(TileGrid(256, 256, 192, 32, model.size_multiple)) == 4
    assert 30 <= psnr(tiled, whole) < 60  # close, and really tiled


def test_no_seam_along_tile_borders(photo_decodes):
    """Velocities blended at every step leave tile borders as smooth as the rest of the image: the mean
    gradient across them (uint8, `seam_ratio`) is within 10 % of the interior's. Tiles that merely abut (no
    overlap) leave a visible step there, which the same measure catches."""
    model, z, noise, _ = photo_decodes
    grid = TileGrid(256, 256, 128, 32, model.size_multiple)
    assert len(grid) == 9
    blended = model.decode(z, steps=4, noise=noise, tile=128, overlap=32)
    assert abs(seam_ratio(to_uint8(blended[0]), grid) - 1) <= 0.10
    abutting = model.decode(z, steps=4, noise=noise, tile=128, overlap=0)
    assert seam_ratio(to_uint8(abutting[0]), TileGrid(256, 256, 128, 0, model.size_multiple)) > 1.5


PEAK_RSS_SCRIPT = textwrap.dedent(r"""
    import json, re, sys, time
    from pathlib import Path
    import torch
    from dgaetok.models import DGAE, DGAEConfig
    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = DGAEConfig(resolution=64, downsample=8, latent_channels=4, enc_channels=32, enc_res_blocks=1,
                        unet_channels=32, unet_ch_mult=(1, 1, 1, 1), unet_res_blocks=0)
    model = DGAE(config).eval().to(memory_format=torch.channels_last)  # as load_model returns models
    size, tile = map(int, sys.argv[1:3])
    z = torch.randn(1, 4, size // 8, size // 8)
    def mib(key):  # VmHWM, not ru_maxrss: a child's ru_maxrss starts from the RSS its parent had at fork
        return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) / 1024
    before = mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = time.time()
    x = model.decode(z, steps=1, generator=torch.Generator().manual_seed(0), tile=tile or None, overlap=32, chunk=4)
    print(json.dumps({"shape": list(x.shape), "before_mib": before, "peak_mib": mib("VmHWM"),
                      "seconds": time.time() - start}))
""")


def peak_rss(size: int, tile: int) -> dict:
    result = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(size), str(tile)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout.splitlines()[-1])
    assert stats["shape"] == [1, 3, size, size]
    return stats


@pytest.mark.slow
def test_a_2048_pixel_decode_in_bounded_memory(tmp_path):
    """A 2048x2048 tiled decode (256 px tiles, 4 per network call) adds under 1 GiB to the process's peak RSS,
    less than the same network decoding a quarter of those pixels (1024x1024) whole.

    The network is dgae-t's width (32 channels) with its attention at 1/8 scale and no residual blocks between
    resamplings, so that one step takes seconds rather than minutes on a CPU. Measured on the 2-core machine,
    the tiled decode adds 650 MiB at 2048 px and 533 MiB at 512 px: the difference is the image-sized tensors
    (noise, state, velocity: 48 MiB each at 2048 px), the rest follows the tile. The same network decoding
    whole adds 1.25 GiB at 1024 px and 4.3 GiB at 2048 px (one 32-channel activation alone is 512 MiB there).
    """
    tiled, whole = peak_rss(2048, 256), peak_rss(1024, 0)
    added = {name: s["peak_mib"] - s["before_mib"] for name, s in (("tiled 2048", tiled), ("whole 1024", whole))}
    assert added["tiled 2048"] < 1024 and added["tiled 2048"] < added["whole 1024"], added


def test_the_fallback_tiles_at_the_models_resolution_with_an_overlap_it_allows():
    """A latent over the pixel budget, or out of memory whole, is decoded in tiles of the model's resolution;
    --overlap (default 32) is lowered where that tile is too small for it, instead of refusing the decode."""
    from dgaetok.pipeline import fallback_tiling

    torch.manual_seed(0)
    dgae, small = DGAE(DGAE_T()), SDVAE(SDVAE_T(resolution=32))
    assert fallback_tiling(dgae, 32) == (64, 32) and fallback_tiling(dgae, 8) == (64, 8)
    assert fallback_tiling(small, 32) == (32, 16)
    for model in (dgae, small):
        check_tiling(*fallback_tiling(model, 32), model.size_multiple)
