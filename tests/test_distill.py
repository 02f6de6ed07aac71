"""Few-step distillation: the student learns the teacher's many-step decode, its file says what it is and decodes
in its own K steps by default, and an interrupted distillation resumes bit-exactly."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dgaetok import flow
from dgaetok.cli import app
from dgaetok.data import ImageFolder
from dgaetok.errors import InputError
from dgaetok.models import file_sha256, load_model
from dgaetok.train import TrainConfig, train
from test_train import read_log, read_tensors, tiny_config, without_timings

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photos(tmp_path_factory, shared_data) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for path in sorted((shared_data / "train" / "bsds500").rglob("*.jpg"))[:4]:
        shutil.copy(path, root / path.name)
    return root


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, photos) -> Path:
    """A dgae-t trained for 30 steps on the photos at 32 px: few enough for seconds, enough for its 1-step and
    4-step decodes to differ as a trained decoder's do (an untrained ADM U-Net's velocity is zero)."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    train(tiny_config(photos, out, steps=30, lr=2e-3, warmup=5, ema_decay=0.9, stats_images=0))
    return out / "model.safetensors"


def distill_config(photos: Path, out: Path, teacher_file: Path, **kw) -> TrainConfig:
    base = dict(teacher=str(teacher_file), teacher_steps=4, teacher_shift=0.5, lr=5e-4, warmup=2, ema_decay=0.9,
                stats_images=0)
    return tiny_config(photos, out, **{**base, **kw})


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().item()


@pytest.mark.slow
def test_a_short_distillation_brings_one_step_closer_to_the_teachers_many(tmp_path, photos, teacher):
    out = tmp_path / "student"
    train(distill_config(photos, out, teacher, steps=20))
    log = read_log(out)
    assert {"mse_teacher", "loss"} <= log[0].keys()
    assert sum(r["loss"] for r in log[-5:]) < 0.5 * sum(r["loss"] for r in log[:5])

    t, s = load_model(teacher), load_model(out / "model.safetensors")
    assert torch.equal(s.state_dict()["encoder.conv_in.weight"], t.state_dict()["encoder.conv_in.weight"])  # frozen
    x = ImageFolder(photos, 32).fixed_batch(4)
    z = t.encode(x).latent_dist.mode()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(123))  # not a noise the run drew
    target = t.decode(z, steps=4, shift=0.5, noise=noise)
    teacher_one, student_one = t.decode(z, steps=1, noise=noise), s.decode(z, steps=1, noise=noise)
    assert mse(student_one, target) < 0.5 * mse(teacher_one, target), (mse(student_one, target),
                                                                         mse(teacher_one, target))


def test_the_students_file_carries_k_and_decodes_with_k_by_default(tmp_path, photos, teacher):
    out = tmp_path / "student"
    train(distill_config(photos, out, teacher, steps=1, student_steps=2, student_shift=0.5))
    path = out / "model.safetensors"
    meta, _ = read_tensors(path)
    record = json.loads(meta["distilled"])
    assert record == {"teacher": file_sha256(teacher), "teacher_steps": 4, "teacher_shift": 0.5, "steps": 2,
                      "shift": 0.5, "grid": flow.time_grid(2, 0.5).tolist()}

    student = load_model(path)
    assert (student.default_steps, student.default_shift) == (2, 0.5)
    assert load_model(teacher).default_steps == 50
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    default = student.decode(z, noise=noise)
    assert torch.equal(default, student.decode(z, steps=2, shift=0.5, noise=noise))
    assert not torch.equal(default, student.decode(z, steps=2, shift=1.0, noise=noise))  # the uniform grid differs

    # the CLI: the teacher's latents decode with the student, in K steps unless told otherwise (then a note)
    runner = CliRunner()
    image = tmp_path / "in"
    image.mkdir()
    shutil.copy(next(photos.iterdir()), image / "a.jpg")
    assert runner.invoke(app, ["encode", str(image), "-o", str(tmp_path / "z"), "--model", str(teacher)]).exit_code == 0
    plain = runner.invoke(app, ["decode", str(tmp_path / "z"), "-o", str(tmp_path / "k"), "--model", str(path)])
    assert plain.exit_code == 0, plain.output
    assert "note: model" not in plain.output  # no step note (the precision note is every command's)
    same = runner.invoke(app, ["decode", str(tmp_path / "z"), "-o", str(tmp_path / "two"), "--model", str(path),
                               "--steps", "2", "--shift", "0.5"])
    assert same.exit_code == 0 and "note: model" not in same.output
    assert (tmp_path / "k" / "a.png").read_bytes() == (tmp_path / "two" / "a.png").read_bytes()
    other = runner.invoke(app, ["decode", str(tmp_path / "z"), "-o", str(tmp_path / "three"), "--model", str(path),
                                "--steps", "3"])
    assert other.exit_code == 0 and "note: model" in other.output and "distilled to decode in 2 step(s)" in other.output
    info = runner.invoke(app, ["info", str(path)])
    assert "distilled: 2 Euler step(s)" in info.output and file_sha256(teacher) in info.output


def test_an_interrupted_distillation_resumes_bit_exactly(tmp_path, photos, teacher):
    # LPIPS (random alex trunk) and the real-image term on the path too
    cfg = distill_config(photos, tmp_path / "a", teacher, lpips_weight=0.5, lpips_net="alex", real_weight=0.5)

    def interrupt(step, logs):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=interrupt)
    train(dataclasses.replace(cfg, resume=True))
    train(dataclasses.replace(cfg, out=str(tmp_path / "b")))
    meta_a, resumed = read_tensors(tmp_path / "a" / "checkpoint.safetensors")
    meta_b, straight = read_tensors(tmp_path / "b" / "checkpoint.safetensors")
    assert meta_a["step"] == meta_b["step"] == "4" and resumed.keys() == straight.keys()
    for k in resumed:
        assert torch.equal(resumed[k], straight[k]), k
    log_a, log_b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert log_a.pop(2) == {"event": "resumed", "step": 2}
    assert {"mse_teacher", "lpips_teacher", "mse_real", "lpips_real"} <= log_b[0].keys()
    for ra, rb in zip(log_a, log_b):
        assert without_timings(ra) == without_timings(rb)

    # another teacher (by content, wherever its file is) is another run
    other = tmp_path / "other-teacher.safetensors"
    teacher_model = load_model(teacher)
    with torch.no_grad():
        teacher_model.decoder.out[-1].bias.add_(0.01)
    from dgaetok.models import save_model
    save_model(teacher_model, other)
    with pytest.raises(InputError, match="teacher_hash"):
        train(dataclasses.replace(cfg, teacher=str(other), steps=5, resume=True))


def test_bad_distillation_settings_are_input_errors(tmp_path, photos, teacher, tiny_model_file):
    sdvae = tmp_path / "sdvae"
    train(tiny_config(photos, sdvae, preset="sdvae-t", steps=1, stats_images=0))
    for kw, message in [
        (dict(teacher=str(sdvae / "model.safetensors")), "decodes in one pass already"),
        (dict(student_steps=4), "choose 1 to 3"),
        (dict(teacher_steps=1), "2 or more steps"),
        (dict(init_encoder=str(tiny_model_file)), "keeps its teacher's encoder"),
        (dict(warm_start=str(sdvae / "model.safetensors")), "same config"),
        (dict(teacher=str(tmp_path / "missing.safetensors")), "no such model file"),
    ]:
        with pytest.raises(InputError, match=message):
            train(distill_config(photos, tmp_path / "run", teacher, **kw))
        assert not (tmp_path / "run").exists()


def test_a_warm_started_student_takes_the_earlier_decoder_and_keeps_its_teachers_encoder(tmp_path, photos, teacher):
    """Distilling a new version of a teacher need not start over: the student's decoder starts as an earlier
    student's (of the teacher before), its encoder is the new teacher's, and its record names the new teacher."""
    from dgaetok.models import save_model

    earlier = load_model(teacher)
    with torch.no_grad():  # an encoder and a decoder that differ from the teacher's
        for p in earlier.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    earlier_file = tmp_path / "earlier-student.safetensors"
    save_model(earlier, earlier_file)
    out = tmp_path / "student"
    train(distill_config(photos, out, teacher, steps=1, lr=0.0, warm_start=str(earlier_file)))
    student, t = load_model(out / "model.safetensors"), load_model(teacher)
    assert json.loads(read_tensors(out / "model.safetensors")[0]["distilled"])["teacher"] == file_sha256(teacher)
    for name, value in student.state_dict().items():
        source = t if name.startswith("encoder.") else earlier
        assert torch.equal(value, source.state_dict()[name]), name
    assert not torch.equal(student.state_dict()["decoder.out.2.weight"], t.state_dict()["decoder.out.2.weight"])
    start = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert (start["event"], start["part"], start["sha256"]) == ("warm_start", "decoder", file_sha256(earlier_file))


def test_the_student_keeps_its_teachers_latent_statistics(tmp_path, photos, teacher):
    """The student's encoder is its teacher's, frozen: its file carries the teacher's latent statistics, not a new
    measurement over other images, so latents normalised for a diffusion model mean the same with either file."""
    from dgaetok.models import save_model
    from dgaetok.stats import measure_folder

    t = load_model(teacher)
    t.latent_stats = measure_folder(t, photos, 2)  # over 2 of the 4 photos: the student measures all 4
    with_stats = tmp_path / "teacher.safetensors"
    save_model(t, with_stats)
    out = tmp_path / "student"
    train(distill_config(photos, out, with_stats, steps=1, stats_images=4))
    assert load_model(out / "model.safetensors").latent_stats == t.latent_stats
