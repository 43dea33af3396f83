"""Inference precision is an explicit, recorded choice: f32 by default on every CPU, other precisions with their own thresholds.

OpenVINO's CPU plugin runs bf16 by default where the CPU has AMX or AVX512_BF16, so these tests pin what they
compare.  The bf16 and f16 checks run where the CPU runs them natively (f16: AVX512_FP16, as on Xeons with AMX);
elsewhere the same tests check that asking for them is refused, so both paths are exercised whichever CPU CI lands on.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid

import numpy as np
import openvino as ov
import pytest
from conftest import Client, good_png, write_config

from bundle import BundleError, read_manifest
from bundle.runtime import CompiledBundle, supported_precisions
from exporter.data import load_category, read_image
from exporter.export import score_images

SUPPORTED = supported_precisions(ov.Core(), "CPU")
def reduced(*precisions: str) -> list:
    """``precisions`` as parameters, each skipped where this CPU does not run it natively."""
    return [pytest.param(p, marks=pytest.mark.skipif(p not in SUPPORTED, reason=f"this CPU runs {SUPPORTED} natively, "
                                                                                 f"not {p}")) for p in precisions]


def test_f32_is_the_default_and_is_read_back_from_openvino(bundle_dir):
    compiled = CompiledBundle(bundle_dir)
    assert compiled.precision == "f32"
    assert compiled.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    assert compiled.thresholds == read_manifest(bundle_dir).thresholds


def test_auto_resolves_to_the_device_default_and_says_which(bundle_dir):
    device_default = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    assert CompiledBundle(bundle_dir, precision="auto").precision == device_default


def test_export_measures_thresholds_and_metrics_at_every_native_precision(bundle_dir):
    manifest = read_manifest(bundle_dir)
    assert list(manifest.precisions) == SUPPORTED and SUPPORTED[0] == "f32"
    assert manifest.precisions["f32"].thresholds == manifest.thresholds
    for precision, record in manifest.precisions.items():
        assert record.metrics["precision"] == precision and record.metrics["test"]["precision"] == precision
        assert record.measured_on == ov.Core().get_property("CPU", "FULL_DEVICE_NAME")
    assert manifest.metrics["precision"] == "f32"


@pytest.mark.parametrize("precision", ["bf16", "f16"])
def test_a_precision_without_thresholds_or_hardware_is_refused(bundle_dir, tmp_path, precision):
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    raw = json.loads((copy / "bundle.json").read_text())
    raw["precisions"] = {"f32": raw["precisions"]["f32"]}  # as a bundle exported on a CPU without it
    (copy / "bundle.json").write_text(json.dumps(raw))
    message = "no thresholds measured at" if precision in SUPPORTED else "does not run .* natively"
    with pytest.raises(BundleError, match=message):
        CompiledBundle(copy, precision=precision)


@pytest.mark.parametrize("precision", reduced("bf16", "f16"))
def test_reduced_thresholds_measured_on_another_cpu_are_named_in_the_log_once(bundle_dir, tmp_path, caplog, precision):
    """bf16 and f16 kernels round differently from CPU to CPU (AMX, AVX512_BF16, AVX512_FP16): thresholds measured
    on another CPU are served with a warning, as INT8's are; the bundle's own CPU, or f32, gives none."""
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    raw = json.loads((copy / "bundle.json").read_text())
    raw["precisions"][precision]["measured_on"] = raw["precisions"]["f32"]["measured_on"] = "another CPU"
    (copy / "bundle.json").write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING, logger="bundle.runtime"):
        CompiledBundle(bundle_dir, precision=precision)
        CompiledBundle(copy, precision="f32")
        assert not [r for r in caplog.records if "measured on" in r.getMessage()]
        low = CompiledBundle(copy, precision=precision)
        score_images(low, [np.zeros((low.manifest.input.height, low.manifest.input.width, 3), np.uint8)] * 2)
    (warning,) = [r.getMessage() for r in caplog.records if "measured on" in r.getMessage()]
    assert f"{precision} thresholds were measured on another CPU" in warning and low.device_name in warning


def test_int8_needs_a_quantised_bundle(bundle_dir):
    with pytest.raises(BundleError, match="needs a quantised bundle"):
        CompiledBundle(bundle_dir, precision="int8")


@pytest.mark.parametrize("precision", reduced("bf16", "f16"))
def test_reduced_verdicts_agree_with_f32_and_use_their_own_thresholds(bundle_dir, dataset, precision):
    manifest = read_manifest(bundle_dir)
    f32, low = CompiledBundle(bundle_dir, precision="f32"), CompiledBundle(bundle_dir, precision=precision)
    assert low.precision == precision
    assert low.thresholds == manifest.precisions[precision].thresholds != f32.thresholds
    cat = load_category(dataset, "weave")
    images = [read_image(s.path, f32.manifest.input) for s in cat.test]
    s32, _, _ = score_images(f32, images)
    s16, _, _ = score_images(low, images)
    assert not np.array_equal(s32, s16)  # the precision really changed
    np.testing.assert_array_equal(s16 >= low.thresholds.image.threshold, s32 >= f32.thresholds.image.threshold)


@pytest.mark.parametrize("precision", reduced("bf16", "f16"))
def test_worker_serves_a_reduced_precision_with_its_thresholds(broker, bundle_dir, dataset, tmp_path, worker_factory,
                                                               precision):
    prefix = f"t{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix},
                          model={"precision": precision}, cameras={"exact": {"precision": "f32"}})
    client = Client(broker.port, prefix)
    worker_factory(config)
    (model,) = client.json_on(f"{prefix}/workers/w-test/model", timeout=120)
    assert model["precision"] == precision and model["scopes"]["exact"]["precision"] == "f32"
    data = good_png(dataset).read_bytes()
    client.publish_frame("line", data, "f-1")
    client.publish_frame("exact", data, "f-2")
    (fast,) = client.json_on(f"{prefix}/line/result")
    (exact,) = client.json_on(f"{prefix}/exact/result")
    manifest = read_manifest(bundle_dir)
    assert fast["model"]["precision"] == precision and exact["model"]["precision"] == "f32"
    assert fast["threshold"] == pytest.approx(manifest.precisions[precision].thresholds.image.threshold, rel=1e-4)
    assert exact["threshold"] == pytest.approx(manifest.thresholds.image.threshold, rel=1e-4)
    image = [read_image(good_png(dataset), manifest.input)]
    for result, asked in ((fast, precision), (exact, "f32")):  # each scored at its own precision (the model cache)
        (raw,) = score_images(CompiledBundle(bundle_dir, precision=asked), image)[0]
        assert result["raw_score"] == pytest.approx(raw, rel=1e-5), asked
    client.close()


def test_a_model_cache_serves_each_precision_its_own_blob(bundle_dir, dataset, tmp_path):
    """OpenVINO's CPU plugin keys a cached blob by the graph and the CPU only, and an f16 blob keeps f16: with one
    cache, a bundle compiled at f16 after another precision ran that one's blob, and every precision compiled after
    f16 ran f16, each naming itself and scored at its own thresholds.  Each precision the CPU runs, then f32 and
    auto, share one cache here, compiled into it and then read back from it."""
    images = [read_image(s.path, read_manifest(bundle_dir).input) for s in load_category(dataset, "weave").test]
    order = [*SUPPORTED[1:], SUPPORTED[0], "auto"]
    expected = {p: score_images(CompiledBundle(bundle_dir, precision=p), images)[0] for p in order}
    for loaded in (False, True):
        for p in order:
            cached = CompiledBundle(bundle_dir, precision=p, cache_dir=tmp_path / "cache")
            np.testing.assert_array_equal(score_images(cached, images)[0], expected[p], err_msg=f"{p}, {loaded=}")
            assert cached.compiled.get_property("LOADED_FROM_CACHE") is loaded, p
