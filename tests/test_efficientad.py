"""EfficientAD without downloads: PDN geometry, teacher distillation + cache, OpenVINO/torch parity, the CLI."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bundle import read_manifest, sha256_file
from bundle.runtime import CompiledBundle
from conftest import ROOT
from exporter.build import fit_efficientad, package
from exporter.data import read_image
from exporter.teacher import (
    TeacherSettings,
    cache_path,
    load_teacher,
    native_bf16,
    pdn,
    receptive_field,
    teacher_channels,
    teacher_file,
)
from exporter.train import efficientad
from exporter.train.patchcore import to_tensor

SCORE_RTOL = 1e-3  # OpenVINO FP32 vs torch: relative tolerance on image scores
TINY_TEACHER = dict(steps=2, batch_size=2, crop=64)


@pytest.mark.parametrize("size", ["small", "medium"])
def test_pdn_output_cell_sees_a_33_pixel_patch(size):
    """The paper's claim, measured: the gradient of one output cell is non-zero on exactly 33x33 input pixels."""
    torch.manual_seed(0)  # the PDN's initial weights and the probe inputs: the same every run
    assert receptive_field(pdn(size, 4)) == (33, 33)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A smaller generated set than conftest's: EfficientAD runs at 256 px at least, so keep the image count low."""
    from exporter.synthetic import generate

    root = tmp_path_factory.mktemp("small")
    generate(root, "weave", size=128, n_train=10, n_test=2, seed=2)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def teacher(small, cache) -> Path:
    """A teacher distilled by the CLI (two steps) on the generated images standing in for natural photos."""
    env = {**os.environ, "EDGE_INSPECT_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "exporter", "distill-teacher", "--natural", str(small / "weave" / "train"),
                           "--steps", "2", "--batch-size", "2", "--crop", "64"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.is_relative_to(cache)
    return path


def test_teacher_is_cached_by_settings_and_loads_without_pickle(teacher, small, cache, monkeypatch):
    monkeypatch.setenv("EDGE_INSPECT_CACHE", str(cache))
    natural = small / "weave" / "train"
    before = teacher.stat().st_mtime_ns
    assert teacher_file(TeacherSettings(**TINY_TEACHER), natural) == teacher
    assert teacher.stat().st_mtime_ns == before  # reused, not distilled again
    other = TeacherSettings(**{**TINY_TEACHER, "seed": 1})
    assert cache_path(other, natural) != teacher
    state, meta = load_teacher(teacher)
    assert teacher_channels(state) == ("small", 152)  # Lite0 blocks.2 (40) + blocks.4 (112)
    assert meta["receptive_field"] == 33 and meta["steps"] == 2 and meta["natural_images"] == 10


def test_openvino_bundle_matches_anomalib_torch_model(small, teacher, tmp_path):
    """EfficientAdGraph compiled by OpenVINO against anomalib's EfficientAdModel.forward in torch."""
    settings = efficientad.EfficientAdSettings(teacher=str(teacher), steps=3, natural=str(small / "weave" / "train"))
    trained = fit_efficientad(small, "weave", settings)
    graph, spec, cat = trained.graph, trained.spec, trained.category
    assert efficientad.EfficientAdModel.is_set(graph.model.quantiles) and trained.training["train_steps_s"] > 0
    compiled = CompiledBundle(package(trained, tmp_path, evaluate_test=False))

    images = [read_image(s.path, spec) for s in cat.test]
    ov_pred = compiled.infer(np.stack(images))
    with torch.no_grad():
        reference = graph.model(to_tensor(images, spec))  # anomalib's EfficientAdModel, eval mode
        ours = graph(to_tensor(images, spec))
    torch_scores = reference.pred_score.numpy().reshape(-1)
    np.testing.assert_allclose(ours[0].numpy(), torch_scores, rtol=1e-6)
    np.testing.assert_allclose(ov_pred.score, torch_scores, rtol=SCORE_RTOL)
    torch_maps = reference.anomaly_map.numpy()[:, 0]
    np.testing.assert_allclose(ov_pred.anomaly_map, torch_maps, rtol=1e-3, atol=1e-3 * np.abs(torch_maps).max())
    threshold = float(np.median(torch_scores))
    assert ((ov_pred.score >= threshold) == (torch_scores >= threshold)).all()
    assert ov_pred.anomaly_map.shape == (len(images), 256, 256)
    np.testing.assert_allclose(np.linalg.norm(ov_pred.embedding, axis=1), 1.0, atol=1e-4)
    alone = compiled.infer(np.stack(images[:1]))  # dynamic batch
    np.testing.assert_allclose(alone.score, ov_pred.score[:1], rtol=1e-4)


def test_train_command_builds_an_efficientad_bundle_from_a_given_teacher(small, teacher, tmp_path):
    """In bf16 where the CPU has bf16 units; elsewhere bf16 is refused at once, and f32 builds the bundle."""
    def train(out: Path, precision: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "exporter", "train", "--model", "efficientad", "--data", str(small),
                               "--category", "weave", "--out", str(out), "--steps", "2", "--train-precision", precision,
                               "--teacher", str(teacher), "--natural", str(small / "weave" / "train")],
                              capture_output=True, text=True, timeout=900, cwd=ROOT)

    precision = "bf16" if native_bf16() else "f32"
    if precision == "f32":
        refused = train(tmp_path / "refused", "bf16")
        assert refused.returncode == 2 and "bf16 units" in refused.stderr, refused.stderr[-3000:]
        assert not (tmp_path / "refused").exists()
    out = tmp_path / "b"
    proc = train(out, precision)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TracerWarning" not in proc.stderr  # torch's notes on tracing anomalib's constants: -v shows them
    manifest = read_manifest(out)
    assert manifest.family == "efficientad" and manifest.name == "weave-efficientad"
    assert manifest.training["steps"] == 2 and manifest.training["teacher_file"] == str(teacher)
    assert manifest.training["train_precision"] == precision and np.isfinite(manifest.training["final_loss"])
    assert manifest.training["teacher"]["receptive_field"] == 33
    assert manifest.input.mean == (0.0, 0.0, 0.0) and manifest.input.std == (1.0, 1.0, 1.0)
    assert manifest.thresholds.image.threshold > manifest.thresholds.image.low
    assert set(manifest.metrics["test"]["detection_rate"]) == {"good", "hole", "scratch", "smear"}


def test_a_false_alarm_on_an_efficientad_bundle_says_it_cannot_be_absorbed_and_what_to_do(small, teacher, tmp_path,
                                                                                          broker, worker_factory):
    """A false-alarm label on an EfficientAD bundle answered "has no bank extension: re-export it with this version's
    exporter (PatchCore)": re-exporting an EfficientAD bundle never gives it one.  It now says that only PatchCore
    bundles absorb false alarms, and that the frame is kept for the next training set."""
    import json
    import uuid

    from conftest import Client, wait_online, write_config
    from test_learning import _until_stored
    from test_worker import _query

    settings = efficientad.EfficientAdSettings(teacher=str(teacher), steps=2, natural=str(small / "weave" / "train"))
    bundle = package(fit_efficientad(small, "weave", settings), tmp_path / "bundle", evaluate_test=False)
    prefix = f"e{uuid.uuid4().hex[:6]}"
    # every frame at or above a tiny raw threshold is flagged: a frame the operator calls a false alarm
    config = write_config(tmp_path / "run", broker.port, bundle, topics={"prefix": prefix}, model={"threshold": 1e-9})
    client = Client(broker.port, prefix)
    worker_factory(config)
    wait_online(client, prefix)
    image = sorted((small / "weave" / "test" / "good").glob("*.png"))[0]
    client.publish_frame("cam1", image.read_bytes(), "e-0")
    result = json.loads(client.wait_for(lambda m: m.topic == f"{prefix}/cam1/result", timeout=120)[0].payload)
    assert result["verdict"] == "anomalous", result
    _until_stored(client, prefix, "e-0", "cam1")
    answer = _query(client, prefix, {"action": "set", "frame_id": "e-0", "camera": "cam1", "label": "false_alarm"},
                    topic="label")
    reason = answer["absorbed"]["reason"]
    assert answer["ok"] and answer["absorbed"]["patches"] == 0, answer
    assert "re-export" not in reason, reason
    assert "cannot absorb false alarms: only PatchCore bundles learn from labels on the line" in reason, reason
    assert "kept for the next training set" in reason, reason
    client.close()


def test_efficientad_settings_it_cannot_honour_are_refused_before_the_data_is_read(small, teacher, tmp_path, capsys):
    """--input-size 128 was refused only after the data was read; --teacher with --teacher-steps ignored the steps
    and recorded them; a --teacher that is not a PDN, or is damaged, ended in a traceback."""
    from exporter.__main__ import main

    not_pdn, junk = tmp_path / "not-pdn.pt", tmp_path / "junk.safetensors"
    torch.save({"foo": torch.zeros(2)}, not_pdn)
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 1000, np.uint8).tobytes())
    base = ["train", "--model", "efficientad", "--data", str(small), "--category", "weave", "--steps", "1",
            "--natural", str(small / "weave" / "train"), "--no-eval"]
    cases = [(["--input-size", "128", "--teacher", str(teacher)], "input_size >= 256"),
             (["--teacher", str(teacher), "--teacher-steps", "3"], "give one of them"),
             (["--teacher", str(not_pdn)], f"teacher {not_pdn} holds no PDN weights"),
             (["--teacher", str(junk)], f"teacher file {junk} cannot be read")]
    if not native_bf16():
        cases.append((["--teacher", str(teacher), "--train-precision", "bf16"], "bf16 units"))
    for i, (options, said) in enumerate(cases):
        assert main([*base, "--out", str(tmp_path / f"b{i}"), *options]) == 2, options
        out, err = capsys.readouterr()
        assert said in err and out == "", (options, out, err)  # out: the data summary, printed once it is read
        assert not (tmp_path / f"b{i}").exists()


def test_featureless_normal_images_are_refused_by_name_not_exported_as_nan(small, teacher, tmp_path):
    """Flat normal images gave maps whose 90th and 99.5th percentiles were equal: the map normalisation divided 0
    by 0 and the export failed on a NaN map after the whole fit."""
    import cv2

    from exporter.export import input_spec

    flat = []
    for i in range(4):
        flat.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(flat[-1]), np.full((64, 64, 3), 120 + i, np.uint8))
    settings = efficientad.EfficientAdSettings(teacher=str(teacher), steps=1, natural=str(small / "weave" / "train"))
    spec = input_spec(256, efficientad.MEAN, efficientad.STD, grey=False)
    with pytest.raises(ValueError, match="single flat colour"):  # before the teacher is even loaded
        efficientad.fit(settings, flat[:3], flat[3:], spec)
    # Normals that are not all flat can still give maps without spread: refused where the spread is measured.
    torch.manual_seed(0)
    model, _ = efficientad.build_model(settings)
    efficientad._channel_mean_std(model, torch.rand(2, 3, 256, 256))
    with pytest.raises(ValueError, match="student-teacher anomaly maps have no spread"):
        efficientad._map_quantiles(model, torch.full((2, 3, 256, 256), 0.5))


def test_a_training_run_reads_its_teacher_file_once(small, teacher, tmp_path, monkeypatch):
    """The teacher file was read three times in one `train --teacher` run: checked at the command line, checked
    again by the fit before it reads its data, and loaded to build the model."""

    from exporter import teacher as teacher_module
    from exporter.families import FAMILIES

    given = shutil.copy2(teacher, tmp_path / "pdn-small.safetensors")  # a file no earlier test has read
    reads = []

    def counted(path, *args, **kwargs):
        reads.append(path)
        return load_file(path, *args, **kwargs)

    monkeypatch.setattr(teacher_module, "load_file", counted)
    settings = efficientad.EfficientAdSettings(teacher=str(given), steps=2, natural=str(small / "weave" / "train"))
    FAMILIES["efficientad"].check(settings)
    trained = fit_efficientad(small, "weave", settings)
    assert reads == [str(given)], reads
    on_file = load_file(str(given))
    assert all(torch.equal(trained.graph.model.teacher.state_dict()[k], v.float()) for k, v in on_file.items())
    assert trained.training["teacher_file"] == str(given)


@pytest.fixture(scope="module")
def serving(small, teacher, tmp_path_factory) -> Path:
    """An EfficientAD bundle trained on a teacher file and natural photos of a folder of their own (the training box's
    paths, which a test may take away or replace), as a camera serves it."""
    box = tmp_path_factory.mktemp("training-box")
    shutil.copyfile(teacher, box / "teacher.safetensors")
    shutil.copytree(small / "weave" / "train", box / "natural")
    proc = subprocess.run([sys.executable, "-m", "exporter", "train", "--model", "efficientad", "--data", str(small),
                           "--category", "weave", "--out", str(box / "serving"), "--steps", "1", "--teacher",
                           str(box / "teacher.safetensors"), "--natural", str(box / "natural"), "--no-eval"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return box / "serving"


def test_the_train_command_printed_after_a_capture_export_carries_the_efficientad_recipe(small, serving, tmp_path):
    """The train command printed after a capture export carried the whole recipe of a serving PatchCore bundle but
    only the family and input size of an EfficientAD one: the next bundle was trained with the shipped teacher (or
    another one distilled) and the default photos and precision, not the model the camera runs.  It now names the
    recorded teacher file, PDN size, natural photos and training precision, and the bundle it trains records them."""
    from worker.capture import train_command

    argv = shlex.split(train_command(small, "weave", None, read_manifest(serving, verify=False)))
    assert argv[:4] == ["python", "-m", "exporter", "train"] and argv[-2:] == ["--out", "BUNDLE"], argv
    proc = subprocess.run([sys.executable, *argv[1:-1], str(tmp_path / "next"), "--steps", "1", "--no-eval"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = (read_manifest(b, verify=False).training for b in (serving, tmp_path / "next"))
    box = serving.parent
    assert before["teacher_file"] == str(box / "teacher.safetensors") and before["natural"] == str(box / "natural")
    recipe = ("input_size", "model_size", "teacher_file", "teacher_sha256", "natural", "train_precision")
    assert {k: after[k] for k in recipe} == {k: before[k] for k in recipe}, argv


def test_the_train_command_of_a_capture_export_on_another_box_trains_its_teacher_or_says_what_is_missing(
        small, serving, tmp_path, monkeypatch):
    """The command names the serving bundle's teacher and photos by their paths on the box that trained it.  Run on
    another box, another teacher at that path (another checkout's shipped one) trained another model without a
    word, and photos not there stopped the run only after the data was read, "no natural images under ...".  The
    command now carries the teacher's sha256: another file is refused before the data is read, a missing one is this
    exporter's shipped teacher where that has the sha256, else refused naming it; missing photos are refused first."""
    from worker.capture import train_command

    manifest = read_manifest(serving, verify=False)
    wanted = manifest.training["teacher_sha256"]
    argv = [sys.executable, *shlex.split(train_command(small, "weave", None, manifest))[1:-1], str(tmp_path / "next"),
            "--steps", "1", "--no-eval"]
    assert argv[argv.index("--teacher-sha256") + 1] == wanted
    box = serving.parent
    teacher, natural = box / "teacher.safetensors", box / "natural"
    state = load_file(teacher)
    first = next(iter(state))
    another = tmp_path / "another.safetensors"
    with safe_open(str(teacher), "pt") as f:  # a whole teacher file, as another checkout's shipped one
        save_file({**state, first: state[first] + 0.01}, another, metadata=f.metadata())
    kept = tmp_path / "kept.safetensors"
    os.replace(teacher, kept)
    try:
        os.replace(another, teacher)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=ROOT)
        assert proc.returncode == 2 and "data:" not in proc.stdout, (proc.stdout, proc.stderr[-3000:])
        assert f"teacher file {teacher} has sha256 {sha256_file(teacher)}, not {wanted}" in proc.stderr, proc.stderr
        assert not (tmp_path / "next").exists()

        teacher.unlink()
        settings = efficientad.EfficientAdSettings(teacher=str(teacher), teacher_sha256=wanted)
        with pytest.raises(FileNotFoundError, match=f"teacher file {teacher} not found: --teacher-sha256 asks for "
                                                    f"the teacher of sha256 {wanted}"):
            efficientad.given_teacher(settings)
        shipped = tmp_path / "shipped"
        shipped.mkdir()
        shutil.copyfile(kept, shipped / "pdn-small.safetensors")
        (shipped / "pdn-small.json").write_text(json.dumps({"file": "pdn-small.safetensors", "sha256": wanted}))
        monkeypatch.setenv("EDGE_INSPECT_TEACHERS", str(shipped))
        assert efficientad.given_teacher(settings) == shipped / "pdn-small.safetensors"

        os.replace(natural, tmp_path / "natural")
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=ROOT,
                              env={**os.environ, "EDGE_INSPECT_TEACHERS": str(shipped)})
        assert proc.returncode == 2 and "data:" not in proc.stdout, (proc.stdout, proc.stderr[-3000:])
        assert f"error: --natural {natural}: no such folder, or no images in it" in proc.stderr, proc.stderr
    finally:
        os.replace(kept, teacher)
        if not natural.exists():
            os.replace(tmp_path / "natural", natural)
