"""Teacher distillation: resumable checkpoints without pickle, the held-out figure, the manifest, shipped teachers."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SHARED, fill_disk
from safetensors import safe_open
from safetensors.torch import load_file

from exporter.__main__ import main
from exporter.teacher import (
    TeacherSettings,
    cache_path,
    check_train_precision,
    checkpoint_path,
    distill,
    load_teacher,
    manifest_path,
    native_bf16,
    random_crops,
    sha256_file,
    shipped_teacher,
    teacher_file,
)
from exporter.train import efficientad

TINY = TeacherSettings(steps=6, batch_size=2, crop=64)
PHOTOS = SHARED / "natural" / "imagenet-sample"


@pytest.fixture(scope="module")
def natural(tmp_path_factory) -> Path:
    """20 of the natural photos (16 give training crops, 4 are held out); generated images where they are absent."""
    root = tmp_path_factory.mktemp("natural")
    if PHOTOS.is_dir():
        for photo in sorted(PHOTOS.glob("*.jpg"))[::50]:
            shutil.copy(photo, root)
        return root
    from exporter.synthetic import generate

    generate(root, "weave", size=128, n_train=20, n_test=1, seed=2)
    return root / "weave" / "train"


@pytest.fixture(scope="module")
def straight(natural, tmp_path_factory) -> Path:
    """TINY distilled in one go, a figure every 3 steps."""
    return distill(TINY, natural, tmp_path_factory.mktemp("straight") / "pdn-small.safetensors", eval_every=3)


def test_resumed_distillation_ends_where_an_uninterrupted_one_does(natural, straight, tmp_path):
    out = tmp_path / "pdn-small.safetensors"
    ckpt = distill(TINY, natural, out, eval_every=3, checkpoint_every=2, stop_after=3)
    assert ckpt == checkpoint_path(out) and ckpt.is_file() and not out.exists()
    with pytest.raises(ValueError, match="--resume"):
        distill(TINY, natural, out)  # never silently overwrites a run in progress
    with pytest.raises(ValueError, match="other settings"):
        distill(TeacherSettings(steps=6, batch_size=2, crop=64, lr=1e-2), natural, out, resume=True)
    with pytest.raises(ValueError, match="other settings"):  # not torch's state-dict error from loading it first
        distill(TeacherSettings(steps=6, batch_size=2, crop=64, size="medium"), natural, out, resume=True)
    assert distill(TINY, natural, out, eval_every=3, resume=True) == out
    assert not ckpt.exists()  # the finished teacher replaces its checkpoint
    a, b = load_file(str(straight)), load_file(str(out))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    ma, mb = json.loads(manifest_path(straight).read_text()), json.loads(manifest_path(out).read_text())
    assert ma["held_out_curve"] == mb["held_out_curve"] and ma["loss_curve"] == mb["loss_curve"]


def test_a_teacher_written_on_the_way_keeps_its_checkpoint_and_the_run_goes_on(natural, straight, tmp_path):
    out = tmp_path / "pdn-small.safetensors"
    with pytest.raises(ValueError, match="--stop-after"):
        distill(TINY, natural, out, write_now=True)  # nothing to write from
    assert distill(TINY, natural, out, eval_every=3, stop_after=4, write_now=True) == out
    early = json.loads(manifest_path(out).read_text())
    assert checkpoint_path(out).is_file() and early["steps_done"] == 4 and early["recipe"]["steps"] == 6
    meta = load_teacher(out)[1]
    assert meta["steps"] == 6 and meta["steps_done"] == 4  # the header says what was done, as the bundle copies it
    assert [s for s, _ in early["held_out_curve"]] == [0, 3, 4]  # the figure of what is shipped
    first = out.read_bytes()
    assert distill(TINY, natural, out, resume=True, write_now=True) == out  # from the checkpoint, no step more
    assert out.read_bytes() == first and checkpoint_path(out).is_file()
    assert distill(TINY, natural, out, eval_every=3, resume=True) == out and not checkpoint_path(out).exists()
    assert load_file(str(out)).keys() == load_file(str(straight)).keys()
    assert json.loads(manifest_path(out).read_text())["held_out_curve"] == json.loads(
        manifest_path(straight).read_text())["held_out_curve"]  # the early figure stays out of the run's curve


def test_stop_after_0_with_write_now_writes_the_untrained_teacher(natural, tmp_path):
    """docs/quality's step-0 baseline (``--stop-after 0 --write-now``); without --write-now it would write nothing."""
    out = tmp_path / "pdn-small.safetensors"
    with pytest.raises(ValueError, match="--write-now"):
        distill(TINY, natural, out, stop_after=0)
    assert distill(TINY, natural, out, eval_every=3, stop_after=0, write_now=True) == out
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["steps_done"] == 0 and [s for s, _ in manifest["held_out_curve"]] == [0], manifest


def test_bf16_training_is_refused_where_the_cpu_would_emulate_it(natural, tmp_path):
    check_train_precision("bf16", native=True)
    check_train_precision("f32", native=False)
    with pytest.raises(ValueError, match="bf16 units"):
        check_train_precision("bf16", native=False)
    with pytest.raises(ValueError, match="training precision"):
        distill(TeacherSettings(steps=6, batch_size=2, crop=64, train_precision="fp8"), natural, tmp_path / "x.safetensors")
    if not native_bf16():  # this CPU: refused before anything is written
        out = tmp_path / "pdn-small.safetensors"
        with pytest.raises(ValueError, match="bf16 units"):
            distill(TeacherSettings(steps=6, batch_size=2, crop=64, train_precision="bf16"), natural, out)
        assert not out.exists() and not checkpoint_path(out).exists()


@pytest.mark.skipif(not native_bf16(), reason="this CPU has no bf16 units: bf16 training is refused here (test above)")
def test_bf16_distillation_is_its_own_run_and_says_so(natural, tmp_path):
    out = tmp_path / "pdn-small.safetensors"
    bf16 = TeacherSettings(steps=6, batch_size=2, crop=64, train_precision="bf16")
    assert distill(bf16, natural, out, eval_every=3, stop_after=3, write_now=True) == out
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["recipe"]["train_precision"] == "bf16" and np.isfinite(manifest["final_loss"])
    with pytest.raises(ValueError, match="other settings"):
        distill(TINY, natural, out, resume=True)  # an f32 run never continues a bf16 checkpoint


def test_checkpoint_is_safetensors_with_json_header_and_no_pickle(natural, tmp_path):
    out = tmp_path / "pdn-small.safetensors"
    ckpt = distill(TINY, natural, out, checkpoint_every=2, stop_after=2)
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.name]  # no temporary file left behind
    assert not ckpt.read_bytes().startswith(b"\x80")  # a pickle stream starts with its protocol byte
    with safe_open(str(ckpt), "pt") as f:
        state = json.loads(f.metadata()["checkpoint"])
        names = set(f.keys())
    assert state["step"] == 2 and len(state["losses"]) == 2 and state["settings"] == TINY.as_dict()
    assert {"torch_rng", "norm.mean", "norm.std", "net.conv1.weight", "optimiser.0.exp_avg"} <= names
    assert state["scheduler"]["last_epoch"] == 2 and len(state["python_rng"][1]) == 625


def test_manifest_records_recipe_curves_checksum_and_a_held_out_figure_that_improves(natural, straight):
    manifest = json.loads(manifest_path(straight).read_text())
    assert manifest["sha256"] == sha256_file(straight) and manifest["steps_done"] == 6
    recipe = manifest["recipe"]
    assert recipe["natural"] == str(natural) and recipe["natural_images"] == 20
    assert recipe["training_images"] == 16 and recipe["held_out_images"] == 4 and recipe["steps"] == 6
    curve = manifest["held_out_curve"]
    assert [s for s, _ in curve] == [0, 3, 6] and [s for s, _ in manifest["loss_curve"]] == [3, 6]
    untrained, final = curve[0][1], manifest["held_out_explained_variance"]
    assert all(v <= 1 for _, v in curve)
    assert "terms of the images" in manifest["data_licence"]  # a copy, not the project's folder
    # fp16 only when it keeps the figure; the loaded weights are float32 either way.
    assert manifest["dtype"] == "float16"
    assert manifest["held_out_explained_variance_fp32"] - final <= 1e-3
    state, meta = load_teacher(straight)
    assert all(v.dtype == torch.float32 for v in state.values()) and meta["held_out_images"] == 4
    if not PHOTOS.is_dir():
        pytest.skip(f"{PHOTOS} absent: generated textures are no test of learning natural features")
    assert final > untrained, curve  # the untrained PDN's figure is the baseline a few steps must beat


def test_default_teacher_is_the_shipped_one_and_a_changed_file_is_refused(straight, tmp_path, monkeypatch):
    shipped = tmp_path / "teachers"
    monkeypatch.setenv("EDGE_INSPECT_TEACHERS", str(shipped))
    assert shipped_teacher("small") is None  # none ships: train distils (cached), as before
    shipped.mkdir()
    shutil.copy(straight, shipped / "pdn-small.safetensors")
    shutil.copy(manifest_path(straight), shipped / "pdn-small.json")
    assert shipped_teacher("small") == shipped / "pdn-small.safetensors"
    model, info = efficientad.build_model(efficientad.EfficientAdSettings())
    assert info["teacher_file"] == str(shipped / "pdn-small.safetensors")
    assert info["teacher_sha256"] == sha256_file(straight) and model.teacher_out_channels == 152
    manifest = json.loads((shipped / "pdn-small.json").read_text())
    (shipped / "pdn-small.json").write_text(json.dumps({**manifest, "sha256": "0" * 64}))
    with pytest.raises(ValueError, match="sha256"):
        efficientad.build_model(efficientad.EfficientAdSettings())


def test_student_budget_is_ten_passes_unless_steps_are_given():
    assert efficientad.step_budget(efficientad.EfficientAdSettings(), 238) == 2380
    assert efficientad.step_budget(efficientad.EfficientAdSettings(steps=40), 238) == 40


def test_backbone_scale_targets_the_same_cells_from_an_upscaled_crop(natural):
    """At scale 2 (the default, the paper's recipe) the backbone sees the crop at twice its size: the targets keep
    the PDN's output grid but are other features; scale 1 keeps the key a teacher had before the option existed."""
    from exporter.teacher import BackboneTargets, _key, _listing

    crops = torch.rand(2, 3, 64, 64)
    one, two = (BackboneTargets(TeacherSettings(backbone_scale=s)) for s in (1, 2))
    plain, scaled = one(crops, (8, 8), 33), two(crops, (8, 8), 33)
    assert plain.shape == scaled.shape == (2, 152, 8, 8)
    assert not torch.allclose(plain, scaled, atol=1e-3)
    first = TeacherSettings(backbone_scale=1)
    fields = first.as_dict()
    del fields["train_precision"], fields["backbone_scale"]  # the fields of the first f32 teachers' keys
    before = json.dumps({**fields, "backbone_sha256": "sha", "natural": _listing([])}, sort_keys=True)
    assert _key(first, "sha", []) == hashlib.sha256(before.encode()).hexdigest()[:12]
    assert _key(TeacherSettings(), "sha", []) != _key(first, "sha", [])
    with pytest.raises(ValueError, match="whole factor"):
        BackboneTargets(TeacherSettings(backbone_scale=0))


def test_a_teacher_written_on_the_way_is_never_taken_from_the_cache_for_the_finished_one(natural, tmp_path,
                                                                                        monkeypatch, capsys):
    """`distill-teacher --stop-after 3 --write-now` without --out put a 3-step teacher at the cache path of the 6-step
    one; `--resume` then only printed it, and `train --teacher-steps 6` used it, recording 6."""
    monkeypatch.setenv("EDGE_INSPECT_CACHE", str(tmp_path))
    tiny = ["distill-teacher", "--natural", str(natural), "--steps", "6", "--batch-size", "2", "--crop", "64"]
    assert main([*tiny, "--stop-after", "3", "--write-now"]) == 2
    assert "give --out" in capsys.readouterr().err and not (tmp_path / "teachers").exists()
    cached = cache_path(TINY, natural)
    distill(TINY, natural, cached, stop_after=3, write_now=True)  # what the command wrote there before
    assert main([*tiny, "--resume"]) == 0 and capsys.readouterr().out.strip() == str(cached)
    assert json.loads(manifest_path(cached).read_text())["steps_done"] == 6 and not checkpoint_path(cached).exists()
    distill(TINY, natural, cached, stop_after=3, write_now=True)
    checkpoint_path(cached).unlink()  # a run on the way whose checkpoint is gone: distilled again, not taken
    assert teacher_file(TINY, natural) == cached
    assert json.loads(manifest_path(cached).read_text())["steps_done"] == 6 and load_teacher(cached)[1]["steps_done"] == 6


def test_a_natural_photo_smaller_than_the_crop_is_upscaled_to_hold_it():
    """A thumbnail among the photos ended the distillation with "empty range for randrange()"."""
    from exporter.teacher import at_least

    thumb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)
    crops = random_crops([thumb], 4, 64, 0.0, random.Random(0))
    assert crops.shape == (4, 3, 64, 64) and float(crops.std()) > 0
    assert at_least(thumb, 64).shape == (64, 80, 3)
    photo = np.zeros((64, 90, 3), np.uint8)
    assert at_least(photo, 64) is photo  # photos that hold a crop are cropped as before: the same crops, the same run


def test_the_shipped_teacher_records_the_steps_it_was_distilled_for_and_done(monkeypatch):
    """Its recipe says 10000 steps, 700 were done; a bundle trained on it said 10000 (the header has no steps_done:
    the manifest beside it, which names the file by sha256, says it)."""
    monkeypatch.delenv("EDGE_INSPECT_TEACHERS", raising=False)
    path = shipped_teacher("small")
    assert path is not None
    manifest = json.loads(manifest_path(path).read_text())
    _, info = efficientad.build_model(efficientad.EfficientAdSettings())
    assert info["teacher_file"] == str(path)
    assert info["teacher"]["steps"] == manifest["recipe"]["steps"]
    assert info["teacher"]["steps_done"] == manifest["steps_done"] < manifest["recipe"]["steps"]


def test_a_distillation_onto_a_full_disk_ends_in_one_line_naming_its_checkpoint(natural, small_disk, capsys):
    """The checkpoint write on a full disk raised safetensors' own error, not an OSError: the run ended in a
    traceback, exit 1.  Now one line names the checkpoint and the disk's free space, exit 2, and no partial file is
    left on the disk."""
    out = small_disk / "pdn.safetensors"
    fill_disk(small_disk)
    code = main(["distill-teacher", "--natural", str(natural), "--steps", "6", "--batch-size", "2", "--crop", "64",
                 "--out", str(out), "--checkpoint-every", "2"])
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and said.startswith(f"error: cannot write the checkpoint {checkpoint_path(out)}: "), said
    assert "No space left on device" in said and said.endswith("(0 MB free on its disk)"), said
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_a_distillation_removes_the_temporary_files_a_killed_run_left(natural, tmp_path, caplog):
    """The teacher, its checkpoint and its manifest are each written to a temporary file beside them and renamed: a
    run killed in between (SIGKILL, a power cut) left that file, a whole checkpoint, for ever.  The next run to the
    same place removes those of processes that are gone and says so; a running one's and the user's files stay."""
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    out = tmp_path / "pdn.safetensors"
    stale = [tmp_path / f".{p.name}.{gone.pid}.tmp" for p in (out, checkpoint_path(out), manifest_path(out))]
    kept = [tmp_path / f".{checkpoint_path(out).name}.{os.getppid()}.tmp", tmp_path / "pdn.safetensors.bak",
            tmp_path / f".{out.name}.x{gone.pid}.tmp"]
    for path in [*stale, *kept]:
        path.write_bytes(b"partial")
    with caplog.at_level(logging.INFO, logger="exporter.staging"):
        assert main(["distill-teacher", "--natural", str(natural), "--steps", "2", "--batch-size", "2", "--crop", "64",
                     "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, manifest_path(out).name,
                                                                 *(k.name for k in kept)])
    said = [r.getMessage() for r in caplog.records if r.name == "exporter.staging"]
    assert said == [f"removing {s}, left by an exporter run (pid {gone.pid}) that was killed while writing "
                    f"{s.parent / s.name[1:].rsplit('.', 2)[0]}" for s in stale], said


def test_a_distillation_stopped_by_ctrl_c_says_which_step_it_kept_and_how_to_go_on(natural, tmp_path):
    """Ctrl-C on a distillation (hours, on a few cores) said only "error: interrupted (Ctrl-C)": not that its work
    up to the last checkpoint was kept, nor how to go on from it."""
    out = tmp_path / "pdn.safetensors"
    err = (tmp_path / "stderr").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "exporter", "distill-teacher", "--natural", str(natural), "--steps",
                             "100000", "--batch-size", "2", "--crop", "64", "--out", str(out), "--checkpoint-every", "1"],
                            stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
    deadline = time.monotonic() + 300
    while proc.poll() is None and not checkpoint_path(out).exists() and time.monotonic() < deadline:
        time.sleep(0.01)  # polling for the first checkpoint: the signal is sent once one is kept
    assert proc.poll() is None, "the run ended before its first checkpoint was seen"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
    err.seek(0)
    text = err.read()
    step = json.loads(safe_open(str(checkpoint_path(out)), "pt").metadata()["checkpoint"])["step"]
    assert "Traceback" not in text and text.splitlines()[-1] == (
        f"error: interrupted (Ctrl-C); step {step}/100000 is kept in {checkpoint_path(out)}: run the command again "
        "with --resume to go on from it"), text[-2000:]
