"""`train --init-encoder`: DGAE starts from another model file's encoder, optionally frozen for the first steps."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from dgaetok.errors import InputError
from dgaetok.models import SDVAE, SDVAE_T, save_model
from dgaetok.train import train

from test_train import read_tensors, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def encoder_of(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def test_init_encoder_is_frozen_for_n_steps_then_trained(tmp_path, train_photos):
    torch.manual_seed(7)
    source = SDVAE(SDVAE_T(resolution=32))  # sdvae-t has dgae-t's encoder: f8 c4, 32 channels x (1, 2, 4, 4)
    save_model(source, tmp_path / "sdvae.safetensors")
    want = {k: v for k, v in source.encoder.state_dict().items()}

    cfg = tiny_config(train_photos, tmp_path / "run", steps=2, init_encoder=str(tmp_path / "sdvae.safetensors"),
                      freeze_encoder=2, stats_images=0)
    train(cfg)
    _, tensors = read_tensors(tmp_path / "run" / "checkpoint.safetensors")
    for prefix in ("model.encoder.", "ema.encoder."):
        got = encoder_of(tensors, prefix)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), prefix
    scratch = tiny_config(train_photos, tmp_path / "scratch", steps=2, stats_images=0)
    train(scratch)
    _, fresh = read_tensors(tmp_path / "scratch" / "checkpoint.safetensors")
    assert not torch.equal(fresh["model.encoder.conv_in.weight"], want["conv_in.weight"])

    # from step 2 on the encoder learns
    train(dataclasses.replace(cfg, steps=3, resume=True))
    _, later = read_tensors(tmp_path / "run" / "checkpoint.safetensors")
    assert not torch.equal(later["model.encoder.conv_in.weight"], want["conv_in.weight"])


def test_an_encoder_of_another_shape_is_refused(tmp_path, train_photos):
    save_model(SDVAE(SDVAE_T(resolution=32, latent_channels=8)), tmp_path / "c8.safetensors")
    with pytest.raises(InputError, match=r"c8.safetensors: its encoder \(f8 c8.*does not fit the model's \(f8 c4"):
        train(tiny_config(train_photos, tmp_path / "a", init_encoder=str(tmp_path / "c8.safetensors")))
    with pytest.raises(InputError, match="--init-encoder"):
        train(tiny_config(train_photos, tmp_path / "b", freeze_encoder=3))
