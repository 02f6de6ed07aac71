"""Folder jobs as a library: what a file can cause fails that file only, batches keep to the pixel budget, and
decoding reports its progress step by step."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dgaetok.models as models
import dgaetok.pipeline as pipeline
from dgaetok.errors import InputError, TooLarge
from dgaetok.files import write_latent
from dgaetok.models import DGAE, DGAE_B, load_model
from dgaetok.pipeline import check_latent, decode_folder, decode_job, summarize

pytestmark = pytest.mark.usefixtures("one_thread")

MARK, NAN_MARK = 0.123, 0.456  # latents filled with these values are the ones the fake failures pick


@pytest.fixture()
def latents(tmp_path) -> Path:
    root = tmp_path / "latents"
    root.mkdir()
    for i in range(5):
        z = 0.3 * torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(i))
        write_latent(root / f"{i}.safetensors", torch.full_like(z, {1: NAN_MARK, 2: MARK}.get(i, 0)) if i in (1, 2)
                     else z, {})
    return root


def run(model, src: Path, out: Path, **kw) -> dict[str, list]:
    return summarize(decode_folder(model, decode_job(src, out), steps=2, **kw))


def marked(z: torch.Tensor, value: float = MARK) -> torch.Tensor:
    return (z == value).flatten(1).all(1)


def test_a_failing_batch_is_retried_image_by_image(tmp_path, latents, tiny_model_file):
    model = load_model(tiny_model_file)
    real_decode, calls = model.decode, []

    def decode(z, **kw):  # a kernel that cannot take one of the inputs, as torch does with odd shapes
        calls.append(len(z))
        if marked(z).any():
            raise RuntimeError("Calculated padded input size per channel: (0 x 0)\nmore detail")
        return real_decode(z, **kw)

    model.decode = decode
    result = run(model, latents, tmp_path / "out", batch_size=4)
    assert [item.src.name for item in result["done"]] == ["0.safetensors", "1.safetensors", "3.safetensors",
                                                         "4.safetensors"]
    [failed] = result["failed"]
    assert failed.error == f"{latents / '2.safetensors'}: RuntimeError: Calculated padded input size per channel: " \
                           "(0 x 0)"
    assert calls == [4, 1, 1, 1, 1, 1]  # the batch of 4 failed, so each of its images went alone; then the 5th
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.png", "1.png", "3.png", "4.png"]


def test_running_out_of_memory_and_nan_outputs_fail_the_file(tmp_path, latents, tiny_model_file):
    model = load_model(tiny_model_file)
    real_decode = model.decode

    def decode(z, **kw):
        if marked(z).any():
            raise MemoryError()
        x = real_decode(z, **kw)
        x[marked(z, NAN_MARK)] = float("nan")  # which the PNG writer would turn into a black image
        return x

    model.decode = decode
    result = run(model, latents, tmp_path / "out", batch_size=2)
    errors = {item.src.name: item.error for item in result["failed"]}
    assert errors["2.safetensors"].startswith(f"{latents / '2.safetensors'}: MemoryError: MemoryError (out of memory")
    assert errors["1.safetensors"] == f"{latents / '1.safetensors'}: the decoder produced NaN or infinite values"
    assert [item.src.name for item in result["done"]] == ["0.safetensors", "3.safetensors", "4.safetensors"]


def test_unexpected_errors_name_their_type(tmp_path, latents, tiny_model_file, monkeypatch):
    real_read = pipeline.read_latent

    def read_latent(path, check=None):
        if path.name == "3.safetensors":
            raise ZeroDivisionError("division by zero")  # a bug is reported as one, not as a bad file
        return real_read(path, check)

    monkeypatch.setattr(pipeline, "read_latent", read_latent)
    result = run(load_model(tiny_model_file), latents, tmp_path / "out")
    assert [item.error for item in result["failed"]] == [
        f"{latents / '3.safetensors'}: ZeroDivisionError: division by zero"]
    assert len(result["done"]) == 4


def test_batches_keep_to_the_pixel_budget_and_progress_counts_image_steps(tmp_path, latents, tiny_model_file):
    model = load_model(tiny_model_file)
    real_decode, calls = model.decode, []
    model.decode = lambda z, **kw: calls.append(len(z)) or real_decode(z, **kw)
    steps = []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "0.png").write_bytes(b"already there")
    result = run(model, latents, tmp_path / "out", batch_size=16, max_pixels=2 * 64 * 64, on_step=steps.append)
    assert calls == [2, 2] and len(result["done"]) == 4 and len(result["skipped"]) == 1
    assert sum(steps) == 4 * 2  # images decoded x steps; the skipped file took none


def test_latents_refused_before_their_data_is_read(tmp_path, tiny_model_file):
    model = load_model(tiny_model_file)
    path = tmp_path / "z.safetensors"
    check_latent(model, path, (4, 8, 8), {})
    with pytest.raises(InputError, match=r"latent has shape \(4, 0, 3\), an empty image"):
        check_latent(model, path, (4, 0, 3), {})
    with pytest.raises(TooLarge, match=r"latent \(4, 64, 64\) decodes to 512x512 \(262,144 pixels\)") as err:
        check_latent(model, path, (4, 64, 64), {}, max_pixels=512 * 511)
    assert err.value.pixels == 512 * 512
    with torch.device("meta"):  # dgae-b at f8 halves the image four times: latent sides must be even
        big = DGAE(DGAE_B(downsample=8, latent_channels=4))
    assert big.latent_multiple == 2 and model.latent_multiple == 1
    check_latent(big, path, (4, 6, 8), {})
    with pytest.raises(InputError, match=r"\(4, 7, 8\); this model decodes sides that are multiples of 2"):
        check_latent(big, path, (4, 7, 8), {})


def test_progress_does_not_count_a_failed_attempts_steps_twice(tmp_path, latents, tiny_model_file):
    """A batch that fails after a step is redone image by image, and an image that runs out of memory whole
    after a step is redone in tiles: the count still ends at images x steps, as a progress bar's total."""
    model = load_model(tiny_model_file)
    real_decode = model.decode

    def decode(z, on_step=None, tile=None, **kw):
        if tile is None and (len(z) > 1 or marked(z).any()):
            on_step(len(z))  # one step made, then it fails
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_decode(z, on_step=on_step, tile=tile, **kw)

    model.decode = decode
    steps = []
    result = run(model, latents, tmp_path / "out", batch_size=4, on_step=steps.append)
    assert len(result["done"]) == 5 and "decoded in 64-pixel tiles" in result["done"][2].note
    assert sum(steps) == 5 * 2 and min(steps) > 0


def gpu_rule(device, batch: int) -> int:
    return batch  # models.images_per_call on a GPU: the whole batch in one call


def test_tiled_calls_keep_to_the_pixel_budget_on_a_gpu(tmp_path, tiny_model_file, monkeypatch):
    """With a GPU's rule of one call per batch, a tiled decode or encode of a batch that fills the pixel budget
    puts at most that budget through the network per call (tiles x images x tile pixels): the batch was sized by
    whole images, so the tiles per call are sized by it too."""
    monkeypatch.setattr(pipeline, "images_per_call", gpu_rule, raising=False)
    monkeypatch.setattr(models, "images_per_call", gpu_rule)
    model = load_model(tiny_model_file)
    calls = []
    for net in (model.encoder, model.decoder):
        net.register_forward_pre_hook(lambda net, args: calls.append(args[0].shape[0] * args[0][0, 0].numel()))
    budget = 4 * 64 * 64  # four 64x64 images: 9 tiles of 32 px each at --tile 32 --overlap 8
    pipeline.decode_batch(model, torch.zeros(4, 4, 8, 8), pipeline.seeded_noise(0, 64, 64, 4), 1, "euler", 1.0,
                          tile=32, overlap=8, max_pixels=budget)
    assert calls and max(calls) <= budget, calls
    calls.clear()
    src = tmp_path / "images"
    src.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(src / f"{i}.png")
    job = pipeline.encode_job(src, tmp_path / "z")
    result = summarize(pipeline.encode_folder(model, job, src, batch_size=4, keep_size=True, workers=0,
                                              max_pixels=budget, tile=32, overlap=8))
    assert len(result["done"]) == 4 and calls and max(calls) <= budget, calls


def test_tiled_encoding_follows_decoding(tmp_path, tiny_model_file):
    """One tile per call on the CPU, as decoding; and with --tile, images up to 16 x the pixel budget, which
    without it are refused with a pointer to --tile."""
    model = load_model(tiny_model_file)
    calls = []
    model.encoder.register_forward_pre_hook(lambda net, args: calls.append(len(args[0])))
    x = torch.zeros(2, 3, 64, 64)
    model.encode(x, tile=32, overlap=8)
    assert calls == [2] * 9

    src = tmp_path / "images"
    src.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(src / "a.png")
    encode = lambda out, max_pixels, tile=None: summarize(pipeline.encode_folder(  # noqa: E731
        model, pipeline.encode_job(src, tmp_path / out), src, keep_size=True, workers=0, max_pixels=max_pixels,
        tile=tile, overlap=8))
    assert len(encode("tiled", 96 * 64 // 10, tile=32)["done"]) == 1
    [whole] = encode("whole", 96 * 64 // 10)["failed"]
    assert whole.error.endswith("(or encode it in tiles with --tile, up to 16 x the budget)"), whole.error
    [over] = encode("over", 96 * 64 // 20, tile=32)["failed"]
    assert over.error == (f"{src / 'a.png'}: the image to encode is 6,144 pixels, over 16 x the pixel budget of 307 "
                          "per image, the most it encodes even in tiles; raise it with --max-pixels")
