"""INT8 export (NNCF post-training quantisation): a real tiny bundle through the CLI, run with OpenVINO."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter

import numpy as np
import openvino as ov
import pytest
from conftest import train_bundle

from bundle import read_manifest
from bundle.runtime import CompiledBundle
from exporter.data import load_category, read_image
from exporter.export import score_images


@pytest.fixture(scope="module")
def int8_dir(dataset, tmp_path_factory):
    # same data, settings and seed as the bundle_dir fixture: the same graph (its extension candidates too, which
    # the runtime checks against the manifest), quantised
    return train_bundle(dataset, tmp_path_factory.mktemp("int8") / "weave-int8", "--precision", "int8")


def test_int8_bundle_is_quantised_and_labelled(int8_dir, bundle_dir):
    manifest = read_manifest(int8_dir)
    assert manifest.precision == "INT8" and read_manifest(bundle_dir).precision == "FP32"
    assert manifest.metrics["precision"] == manifest.reference_precision == "int8"
    assert CompiledBundle(int8_dir).precision == "int8"  # the default f32 hint on an INT8 bundle
    assert manifest.precisions["int8"].thresholds == manifest.thresholds
    quantised = Counter(consumer.get_node().get_type_name()
                        for op in ov.Core().read_model(int8_dir / "model.xml").get_ordered_ops()
                        if op.get_type_name() == "FakeQuantize" for consumer in op.output(0).get_target_inputs())
    assert quantised["Convolution"] + quantised["GroupConvolution"] >= 10, quantised  # the backbone is INT8
    assert quantised["MatMul"] == 0, quantised  # memory-bank distances stay FP32
    assert "FakeQuantize" not in (bundle_dir / "model.xml").read_text()


def test_int8_weights_fit_in_7_bits_so_every_cpu_kind_computes_the_same(int8_dir):
    """CPUs without VNNI add pairs of u8 x s8 products (over input channels) in 16 bits with saturation; 7-bit
    weights cannot saturate there, so an INT8 bundle scores the same on AVX2 as on VNNI/AMX CPUs (its thresholds
    hold on both).  Depthwise convolutions (5-D grouped weights) sum no channel pairs and keep 8 bits."""
    weights = [op.get_data() for op in ov.Core().read_model(int8_dir / "model.xml").get_ordered_ops()
               if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8]
    dense = [w for w in weights if w.ndim == 4]  # Convolution weights [out, in, kh, kw]
    assert len(dense) >= 10 and len(weights) > len(dense)
    assert max(int(np.abs(w.astype(int)).max()) for w in dense) <= 64


def test_a_bundle_with_8_bit_weights_warns_on_a_cpu_its_thresholds_were_not_measured_on(int8_dir, bundle_dir, dataset,
                                                                                       tmp_path, caplog):
    """INT8 bundles exported before 7-bit weights score differently on CPUs with and without VNNI: served on a CPU
    other than the one its thresholds were measured on, such a bundle is named in the log; a current one is not."""
    import nncf

    from exporter.quantize import HEADS, _feed

    def moved(name: str, model: ov.Model | None = None):
        folder = tmp_path / name
        shutil.copytree(int8_dir, folder)
        manifest = json.loads((folder / "bundle.json").read_text())
        manifest["precisions"]["int8"]["measured_on"] = "another CPU"
        (folder / "bundle.json").write_text(json.dumps(manifest))
        if model is not None:
            ov.save_model(model, str(folder / "model.xml"), compress_to_fp16=False)
        return folder

    spec = read_manifest(int8_dir).input
    images = [read_image(p, spec) for p in load_category(dataset, "weave").train[:8]]
    source = ov.Core().read_model(bundle_dir / "model.xml")  # the same graph in FP32, quantised as NNCF defaults do
    old = nncf.quantize(source, nncf.Dataset(images, _feed(source)), preset=nncf.QuantizationPreset.MIXED,
                        subset_size=len(images), ignored_scope=nncf.IgnoredScope(patterns=[HEADS], validate=False))
    with caplog.at_level(logging.WARNING, logger="bundle.runtime"):
        CompiledBundle(moved("current"), verify=False)
        assert not [r for r in caplog.records if "8-bit weights" in r.getMessage()]
        CompiledBundle(moved("old", old), verify=False)
    (warning,) = [r.getMessage() for r in caplog.records if "8-bit weights" in r.getMessage()]
    assert "another CPU" in warning and "exporter train --precision int8" in warning


def test_int8_outputs_are_finite_and_agree_with_fp32(int8_dir, bundle_dir, dataset):
    cat = load_category(dataset, "weave")
    int8, fp32 = CompiledBundle(int8_dir), CompiledBundle(bundle_dir)
    spec = fp32.manifest.input
    images = [read_image(s.path, spec) for s in cat.test] + [read_image(p, spec) for p in cat.train[:8]]
    s8, m8, e8 = score_images(int8, images)
    s32, _, _ = score_images(fp32, images)
    assert np.isfinite(s8).all() and np.isfinite(m8).all() and np.isfinite(e8).all()
    assert m8.shape == (len(images), spec.height, spec.width)
    np.testing.assert_allclose(np.linalg.norm(e8, axis=1), 1, atol=1e-3)
    v8 = s8 >= int8.manifest.thresholds.image.threshold
    v32 = s32 >= fp32.manifest.thresholds.image.threshold
    assert (v8 == v32).mean() >= 0.75, (s8, s32)
    assert np.corrcoef(s8, s32)[0, 1] > 0.8
