"""`dgaetok show` and `dgaetok.show`: a latent's principal components as RGB (the paper's Fig. 8)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dgaetok.cli import app
from dgaetok.errors import InputError
from dgaetok.files import read_latent, write_latent
from dgaetok.show import GAP, latent_pca, latent_picture, show

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def two_region_latent(c: int = 4) -> torch.Tensor:
    """Left half one code, right half another, plus a faint ramp along y on another direction."""
    gen = torch.Generator().manual_seed(0)
    a, b, d = torch.randn(3, c, generator=gen)
    z = torch.empty(c, 6, 8)
    z[:, :, :4] = a[:, None, None]
    z[:, :, 4:] = b[:, None, None]
    return z + 0.01 * d[:, None, None] * torch.linspace(-1, 1, 6)[None, :, None]


def test_pca_separates_what_the_latent_codes_differently():
    rgb = latent_pca(two_region_latent())
    assert rgb.shape == (3, 6, 8) and rgb.min() >= 0 and rgb.max() <= 1
    left, right = rgb[0, :, :4], rgb[0, :, 4:]  # the first component is the left/right split, at the range's ends
    assert sorted([left.mean().item(), right.mean().item()]) == pytest.approx([0, 1], abs=0.05)
    assert left.std() < 0.05 and right.std() < 0.05
    second = rgb[1]  # the second is the faint ramp along y, the same in every column
    assert (second[-1] - second[0]).abs().min() > 0.5 and second.std(dim=0).mean() > 10 * second.std(dim=1).mean()


def test_pca_colours_are_reproducible():
    z = two_region_latent()
    assert torch.equal(latent_pca(z), latent_pca(z.clone()))
    # the picture shows how positions differ, not the latent's scale or offset (this latent has rank 2 once
    # centred: its third component is rounding noise, so only two are compared)
    torch.testing.assert_close(latent_pca(z * 2 + 1)[:2], latent_pca(z)[:2], atol=1e-5, rtol=0)


def test_pca_of_a_two_channel_latent_is_grey_where_components_are_missing():
    rgb = latent_pca(torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(rgb[2], torch.full((5, 5), 0.5))


def test_latent_picture_is_the_image_size_without_padding():
    img = latent_picture(two_region_latent(), downsample=8, padding=(0, 0, 5, 3))
    assert isinstance(img, Image.Image) and img.size == (8 * 8 - 5, 6 * 8 - 3)
    arr = np.asarray(img)
    assert (arr[:8, :8] == arr[0, 0]).all()  # one latent position is one f x f block of colour


@pytest.fixture(scope="module")
def encoded_photo(tmp_path_factory, shared_data, tiny_model_file):
    root = tmp_path_factory.mktemp("show")
    photo = root / "photo.jpg"
    Image.open(shared_data / "eval" / "imagenet-val500" / "n01440764_tench.JPEG").convert("RGB") \
        .crop((0, 0, 203, 150)).save(photo)
    result = cli("encode", photo, "-o", root / "latents", "--keep-size", "--model", tiny_model_file, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return photo, root / "latents" / "photo.safetensors"


def test_show_with_the_image_puts_original_latent_and_reconstruction_side_by_side(tmp_path, encoded_photo,
                                                                                  tiny_model_file):
    photo, latent_file = encoded_photo
    out = tmp_path / "fig.png"
    result = cli("show", latent_file, "-o", out, "--image", photo, "--model", tiny_model_file, "--steps", 2,
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert f"wrote {out} ({3 * 203 + 2 * GAP}x150)" in result.stdout
    with Image.open(out) as img:
        fig = np.asarray(img.convert("RGB"))
    with Image.open(photo) as img:
        assert np.array_equal(fig[:, :203], np.asarray(img.convert("RGB")))
    latent, meta = read_latent(latent_file)
    assert np.array_equal(fig[:, 203 + GAP:2 * 203 + GAP], np.asarray(latent_picture(latent, 8, (0, 0, 5, 2))))
    assert json.loads(meta["padding"]) == [0, 0, 5, 2]
    # the reconstruction is what `dgaetok decode` writes for the same steps and seed
    result = cli("decode", latent_file, "-o", tmp_path / "decoded", "--steps", 2, "--model", tiny_model_file,
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "decoded" / "photo.png") as img:
        assert np.array_equal(fig[:, 2 * (203 + GAP):], np.asarray(img))
    assert (fig[:, 203:203 + GAP] == 255).all()


def test_show_python_api_returns_the_same_picture(tmp_path, encoded_photo):
    _, latent_file = encoded_photo
    picture = show(latent_file)
    assert isinstance(picture, Image.Image) and picture.size == (203, 150)
    assert cli("show", latent_file, "-o", tmp_path / "latent.png").exit_code == 0
    with Image.open(tmp_path / "latent.png") as img:
        assert np.array_equal(np.asarray(img), np.asarray(picture))


def test_show_errors_are_one_line(tmp_path, encoded_photo, tiny_model_file, shared_data):
    photo, latent_file = encoded_photo
    for args, message in [
        ((tmp_path / "missing.safetensors", "-o", tmp_path / "x.png"), "missing.safetensors: no such file"),
        ((tiny_model_file, "-o", tmp_path / "x.png"), "not a dgaetok latent file"),
        ((latent_file, "-o", tmp_path / "no" / "x.png"), "no: no such folder"),
        ((latent_file, "-o", tmp_path / "x.png", "--image", shared_data / "eval" / "imagenet-val500" /
          "n01484850_great_white_shark.JPEG", "--model", tiny_model_file),
         "the image is 500x333, but the latent was encoded from a 203x150 one"),
    ]:
        result = cli("show", *args)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("note: precision")]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "x.png").exists()
    bare = tmp_path / "bare.safetensors"
    write_latent(bare, torch.zeros(4, 2, 2), {})
    with pytest.raises(InputError, match="does not say which model made it"):
        show(bare)
