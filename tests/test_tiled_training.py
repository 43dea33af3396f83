"""Training on tiles (`exporter train --tiling`): images are cut as the worker cuts a tiled camera's frames, the
threshold is set on frame scores as the worker reads them, and the worker tiles every camera by the bundle unless the
camera sets its own tiling.  Real OpenVINO, mosquitto and worker; a generated weave of 243 px frames, on which a
2x2 grid of 128 px tiles shows the weave at the scale of the tests' other bundles."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import Client, wait_online, write_config
from test_learning import _until_stored
from test_worker import _query

from bundle import read_manifest
from bundle.runtime import CompiledBundle
from bundle.tiling import see, tiles
from exporter.build import THRESHOLD_SIGMAS, VAL_FRACTION
from exporter.data import load_category
from exporter.export import image_threshold
from exporter.synthetic import generate
from worker.capture import train_command
from worker.config import camera_tiling, load_config

FRAME = 243  # the canvas of 2x2 tiles of 128 px overlapping by 0.1: round(128 * 1.9)


def _train(data: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter", "train", "--data", str(data), "--category", "weave",
                           "--out", str(out), "--input-size", "128", "--coreset-ratio", "0.05", "--precisions", "f32",
                           *flags], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiled(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiled")
    generate(root / "data", "weave", size=FRAME, n_train=24, n_test=4, seed=1)
    # Every patch of a tile is an extension candidate, as in the tests' session bundle (conftest.train_bundle): at
    # 128 px the default's 64 candidates left the labelled mark's frame just above the threshold.
    proc = _train(root / "data", root / "bundle", "--tiling", "2x2", "--extension-candidates", "256")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cut into 2x2 tiles" in proc.stdout and "note: most images" not in proc.stdout
    return root / "data", root / "bundle"


def test_a_tiled_bundle_records_its_tiles_and_is_measured_on_frames_as_the_worker_scores_them(tiled):
    data, bundle = tiled
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["tiling"] == {"grid": [2, 2], "overlap": 0.1}
    test = manifest["metrics"]["test"]
    assert test["images"] == 16  # frames, not their 64 tiles
    assert test["image_auroc"] >= 0.9 and test["pixel_metrics"] == "all 16 test images"

    # The held-out normals scored as the worker scores a frame (the decoded file, cut by bundle.tiling.see): the
    # bundle's threshold is the rule's on these frame scores, not on the scores of their tiles.
    compiled = CompiledBundle(bundle, hint="LATENCY", precision="f32")
    request = compiled.create_request()
    _, held = load_category(data, "weave").split_train(VAL_FRACTION, 0)
    frames = [see(compiled, request, cv2.imread(str(p)), compiled.manifest.tiling).score for p in held]
    spec, tiling = compiled.manifest.input, compiled.manifest.tiling
    tile_scores = [see(compiled, request, tile, None).score for p in held for tile in tiles(cv2.imread(str(p)), spec, tiling)]
    threshold = manifest["thresholds"]["image"]["threshold"]
    assert threshold == pytest.approx(image_threshold(np.array(frames), THRESHOLD_SIGMAS), rel=1e-5)
    assert abs(image_threshold(np.array(tile_scores), THRESHOLD_SIGMAS) - threshold) > 1e-3 * threshold


def test_the_worker_tiles_a_camera_by_its_bundle_learns_on_its_tiles_and_asks_for_them_in_training(
        tiled, broker, tmp_path, worker_factory):
    data, bundle = tiled
    prefix = f"t{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path, broker.port, bundle, topics={"prefix": prefix},
                          cameras={"own": {"tiling": {"grid": [1, 1]}}})
    client = Client(broker.port, prefix)
    try:
        worker_factory(config)
        wait_online(client, prefix)
        good_file = min((data / "weave" / "test" / "good").glob("*.png"))
        marked = cv2.imread(str(good_file))
        cv2.circle(marked, (60, 70), 9, (90, 40, 30), -1)  # a mark the line accepts, in the first tile only
        frames = {"good": good_file.read_bytes(), "hole": min((data / "weave" / "test" / "hole").glob("*.png")).read_bytes(),
                  "m-0": cv2.imencode(".png", marked)[1].tobytes()}
        for frame_id, payload in frames.items():
            client.publish_frame("line", payload, frame_id)
        client.publish_frame("own", frames["good"], "good")
        line = {r["frame_id"]: r for r in client.json_on(f"{prefix}/line/result", count=3)}
        own = client.json_on(f"{prefix}/own/result")[0]
        assert line["good"]["tiles"]["count"] == 4 and line["good"]["tiles"]["grid"] == [2, 2]
        assert line["good"]["verdict"] == "normal" and line["hole"]["verdict"] == "anomalous"
        assert own["tiles"] == {"count": 1, "grid": [1, 1], "worst": [0, 0]}  # the camera's own tiling wins
        model = json.loads(client.wait_for(lambda m: m.topic == f"{prefix}/workers/w-test/model")[0].payload)
        assert model["tiling"] == {"grid": [2, 2], "overlap": 0.1} and model["input"] == [128, 128], model

        # A false alarm on a tiled camera: its tiles' patches are absorbed, and the mark passes from the next frame on.
        assert line["m-0"]["verdict"] == "anomalous" and line["m-0"]["tiles"]["worst"] == [0, 0], line["m-0"]
        _until_stored(client, prefix, "m-0", "line")
        answer = _query(client, prefix, {"action": "set", "frame_id": "m-0", "camera": "line", "label": "false_alarm"},
                        topic="label")
        assert answer["ok"] and answer["absorbed"]["patches"] > 0, answer
        client.publish_frame("line", frames["m-0"], "m-1")
        again = client.json_on(f"{prefix}/line/result", count=4)[-1]
        assert again["frame_id"] == "m-1" and again["verdict"] == "normal", again

        # The capture's training command asks for the tiles each camera's frames are cut into.
        exported = _query(client, prefix, {"command": "export_capture"}, topic="workers/w-test/control")
        assert exported["ok"], exported
        assert "--tiling 2x2 --tile-overlap 0.1 " in exported["train"]["line"]
        assert "own" not in exported["train"]  # its frames, shrunk whole, were all flagged: nothing captured
    finally:
        client.close()
    own = camera_tiling(load_config(config).cameras["own"], read_manifest(bundle).tiling)  # its own tiles win
    assert "--tiling 1x1 --tile-overlap 0.1 " in train_command(tmp_path, "own", own)


def test_the_training_command_of_an_untiled_camera_and_bundle_names_no_tiles(tmp_path):
    assert train_command(tmp_path, "line", None) == f"python -m exporter train --data {tmp_path} --category=line --out BUNDLE"


def test_the_training_command_asks_for_the_tiles_of_the_model_serving_the_camera_now(tiled, bundle_dir, broker,
                                                                                    tmp_path, worker_factory):
    """After a camera's canary (a reload to a tiled bundle), its capture's training command named the tiles of the
    bundle config.yaml gives it (none here), so the next bundle would be trained whole for a camera cut in tiles."""
    data, bundle = tiled
    prefix = f"t{uuid.uuid4().hex[:8]}"
    client = Client(broker.port, prefix)
    try:
        worker_factory(write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix}))
        wait_online(client, prefix)
        answer = _query(client, prefix, {"command": "reload", "camera": "line", "bundle": str(bundle)},
                        topic="workers/w-test/control")
        assert answer["ok"] and answer["models"]["line"]["version"] == read_manifest(bundle).version, answer
        client.publish_frame("line", min((data / "weave" / "test" / "good").glob("*.png")).read_bytes(), "good")
        assert client.json_on(f"{prefix}/line/result")[0]["verdict"] == "normal"
        exported = _query(client, prefix, {"command": "export_capture"}, topic="workers/w-test/control")
        assert exported["ok"] and "--tiling 2x2 --tile-overlap 0.1 " in exported["train"]["line"], exported
    finally:
        client.close()


@pytest.mark.parametrize("flags, message", [
    (("--tile-overlap", "0.2"), "--tile-overlap is for --tiling"),
    (("--tiling", "0x2"), "cols and rows must be 1..16"),
    (("--tiling", "2x2", "--tile-overlap", "0.5"), "--tile-overlap 0.5"),
    (("--tiling", "2by2"), "COLSxROWS"),
])
def test_tiling_options_that_cannot_be_honoured_are_refused_before_any_fit(dataset, tmp_path, flags, message):
    proc = _train(dataset, tmp_path / "out", *flags)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "features" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_benchmark_refuses_tiling(dataset, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "exporter", "benchmark", "--data", str(dataset), "--out",
                           str(tmp_path / "report"), "--tiling", "2x2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--tiling is for train" in proc.stderr


def test_the_data_summary_suggests_tiles_for_elongated_images_and_not_for_square_ones(tmp_path, dataset):
    from bundle import TilingSpec
    from exporter.data import summarise

    good = tmp_path / "strip" / "train" / "good"
    good.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(10):  # 80x230: a strip like KolektorSDD2's, about three times longer than wide
        cv2.imwrite(str(good / f"{i}.png"), rng.integers(0, 255, (230, 80), np.uint8))
    text = summarise(load_category(tmp_path, "strip")).text
    assert "note: most images are 80x230, 2.9 times longer than wide" in text(9, 1) and "--tiling 1x3" in text(9, 1)
    tiled = text(9, 1, TilingSpec(grid=(1, 3)))
    assert "note: most images" not in tiled and "cut into 1x3 tiles" in tiled
    assert "note: most images" not in summarise(load_category(dataset, "weave")).text(9, 1)  # square: no note
    line = tmp_path / "line" / "train" / "good"
    line.mkdir(parents=True)
    for i in range(10):  # a line-scan strip, 20 times longer than high: the note asked for 20 tiles, 16 is the most
        cv2.imwrite(str(line / f"{i}.png"), rng.integers(0, 255, (20, 400), np.uint8))
    assert "--tiling 16x1" in summarise(load_category(tmp_path, "line")).text(9, 1)
    mixed = tmp_path / "mixed" / "train" / "good"
    mixed.mkdir(parents=True)
    for i, (h, w) in enumerate([(200, 300), (200, 300), (480, 640), (640, 480), (300, 300), (256, 200), (512, 512),
                                (800, 200), (224, 224), (100, 150)]):  # the first size is the commonest, of 2 in 10
        cv2.imwrite(str(mixed / f"{i}.png"), rng.integers(0, 255, (h, w), np.uint8))
    assert "note: most images" not in summarise(load_category(tmp_path, "mixed")).text(9, 1)


def test_choose_scores_its_candidates_on_tiles_as_the_worker_would(tiled, tmp_path):
    data, _ = tiled
    proc = subprocess.run([sys.executable, "-m", "exporter", "train", "--data", str(data), "--category", "weave", "--out",
                           str(tmp_path / "chosen"), "--tiling", "2x2", "--choose", "fast,default", "--coreset-ratio",
                           "0.02", "--precisions", "f32"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "chosen" / "bundle.json").read_text())
    chosen = manifest["training"]["chosen"]
    assert manifest["tiling"] == chosen["validation"]["tiling"] == {"grid": [2, 2], "overlap": 0.1}
    assert [c["name"] for c in chosen["candidates"]] == ["fast", "default"]
    assert all(c["aupro"] is not None for c in chosen["candidates"])  # maps merged on the canvas, masks at its size


def test_a_candidate_is_scored_on_tiles_as_its_exported_bundle_scores_a_frame(tiled, tmp_path):
    """The torch graph over a frame's tiles (choose) and the exported bundle in OpenVINO (the worker's see)."""
    from exporter.build import fit_patchcore, package
    from exporter.choose import _tiled
    from exporter.train.patchcore import PatchcoreSettings

    data, _ = tiled
    trained = fit_patchcore(data, "weave", PatchcoreSettings(input_size=128, coreset_ratio=0.05, tiling=(2, 2)))
    compiled = CompiledBundle(package(trained, tmp_path / "b", evaluate_test=False, precisions=["f32"]),
                              hint="LATENCY", precision="f32")
    frame = cv2.imread(str(min((data / "weave" / "test" / "hole").glob("*.png"))))
    score, merged = _tiled(trained.graph, frame, trained.spec, trained.tiling)
    seen = see(compiled, compiled.create_request(), frame, compiled.manifest.tiling)
    assert merged.shape == seen.anomaly_map.shape == (FRAME, FRAME)
    assert score == pytest.approx(seen.score, rel=1e-3)
    assert np.allclose(merged, seen.anomaly_map, rtol=1e-3, atol=1e-3 * float(seen.anomaly_map.max()))


def test_the_mosaic_benchmark_set_puts_each_test_image_and_its_mask_in_one_corner(dataset, tmp_path):
    from benchmarks.mosaic import build

    root = build(dataset, "weave", tmp_path, size=64)
    category = load_category(tmp_path, root.name)
    assert len(category.train) == 32 // 4 and len(category.test) == 4 * 4  # each normal used once; each test image
    for sample in category.test:
        frame = cv2.imread(str(sample.path), cv2.IMREAD_GRAYSCALE)
        assert frame.shape == (128, 128)
        if sample.mask is not None:
            mask = cv2.imread(str(sample.mask), cv2.IMREAD_GRAYSCALE) > 0
            corners = [mask[y:y + 64, x:x + 64].any() for y in (0, 64) for x in (0, 64)]
            assert corners.count(True) == 1, sample.path  # the defect lies in its own part only
            source = cv2.imread(str(dataset / "weave" / "test" / sample.defect / sample.path.name), cv2.IMREAD_GRAYSCALE)
            y, x = divmod(corners.index(True), 2)
            part = frame[64 * y:64 * y + 64, 64 * x:64 * x + 64]
            assert np.abs(part.astype(int) - cv2.resize(source, (64, 64), interpolation=cv2.INTER_AREA)).max() <= 1
