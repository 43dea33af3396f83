"""``python -m exporter fold-extension`` (issue 17): a worker's bank extension folded into a new bundle's bank.

Real OpenVINO on the session bundle (128 px: 16 x 16 patches, all of them candidates, K = 256), so
the source bundle with the rows as its extension computes exactly the PatchCore of bank + rows, which is what the
folded bundle must compute with an empty extension.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
from conftest import train_bundle

from bundle import read_manifest, sha256_file, write_manifest
from bundle.extension import Extension
from bundle.runtime import CompiledBundle
from exporter.__main__ import main
from exporter.data import load_category, read_image
from exporter.fold import FoldError, fold, fold_ir


@pytest.fixture(scope="module", params=["reweighted", "map_max", "screened"])
def source(request, bundle_dir, dataset, tmp_path_factory) -> Path:
    """The session bundle (the default image score, re-weighted), one whose score is the map's maximum, and one
    with a screened bank (every patch refined, so the folded rows meet every patch as the extension's do): their
    IRs differ in what depends on the bank size."""
    if request.param == "reweighted":
        assert read_manifest(bundle_dir).training["image_score"] == "reweighted"
        return bundle_dir
    flags = ("--image-score", "map_max") if request.param == "map_max" else ("--screen-rows", "20", "--refine", "1")
    out = train_bundle(dataset, tmp_path_factory.mktemp("bundles") / "weave-patchcore", *flags)
    training = read_manifest(out).training
    assert training["image_score"] == "map_max" if request.param == "map_max" else training["screen_rows"] == 20
    return out


@pytest.fixture(scope="module")
def taught(source, dataset, tmp_path_factory):
    """The test images, the source's plain predictions and an extension folder (as the worker keeps it) holding
    the candidates of two defect frames, as two absorbed false alarms."""
    bundle_dir = source
    manifest = read_manifest(bundle_dir)
    assert manifest.extension is not None
    test = load_category(dataset, "weave").test
    batch = np.stack([read_image(s.path, manifest.input) for s in test])
    plain = CompiledBundle(bundle_dir).infer(batch)
    assert plain.candidates is not None
    defects = [i for i, s in enumerate(test) if s.label][:2]
    folder = tmp_path_factory.mktemp("learning") / f"{manifest.name}-{manifest.files['model.bin'][:16]}"
    ext = Extension(folder, manifest.extension.feature_dim, 10_000)
    for n, i in enumerate(defects):
        ext.add(f"0000-{n}", plain.candidates[i][:60], f"frame-{i}", "cam")
    return batch, plain, folder, ext.rows, defects


def test_the_folded_bank_scores_as_the_source_with_its_extension(source, taught, tmp_path):
    bundle_dir = source
    batch, plain, folder, rows, defects = taught
    out = tmp_path / "folded"
    assert main(["fold-extension", str(bundle_dir), str(folder), "--out", str(out)]) == 0
    source, manifest = read_manifest(bundle_dir), read_manifest(out)  # verifies the re-hashed files

    extended = CompiledBundle(bundle_dir, extension_rows=len(rows))
    extended.set_extension(rows)
    want = extended.infer(batch)
    folded = CompiledBundle(out)
    assert folded.extension_count == 0 and folded.extension_spec == source.extension
    got = folded.infer(batch)
    np.testing.assert_allclose(got.score, want.score, rtol=1e-4)
    # A row equal to a patch feature is at distance ~0, where |x|^2 - 2 x.r + |r|^2 cancels: a few 1e-2 absolute.
    np.testing.assert_allclose(got.anomaly_map, want.anomaly_map, atol=2e-3 * float(want.anomaly_map.max()))
    # The embedding pools the same whitened features by the bank's map (an extension leaves it as it was): the
    # folded bank moves the pooling of frames like the folded ones, not the space (README, fold-extension).
    np.testing.assert_allclose(want.embedding, plain.embedding, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got.embedding, axis=1), 1.0, atol=1e-4)
    others = [i for i in range(len(batch)) if i not in defects]
    assert ((got.embedding[others] * plain.embedding[others]).sum(1) > 0.8).all()
    assert got.candidate_scores is not None and want.candidate_scores is not None
    np.testing.assert_allclose(np.sort(got.candidate_scores, 1), np.sort(want.candidate_scores, 1), atol=0.05)
    assert (got.score[defects] < 0.9 * plain.score[defects]).all()
    assert (got.score <= plain.score * (1 + 1e-5)).all()

    assert manifest.name == source.name and manifest.version != source.version
    assert manifest.embedding_space == source.embedding_space  # same features, same embedder
    record = manifest.training["folds"][-1]
    assert record["source_version"] == source.version
    assert record["source_model_bin_sha256"] == sha256_file(bundle_dir / "model.bin")
    assert record["extension_rows"] == len(rows) and record["extension_revision"] == 2
    assert manifest.training["memory_bank"] == record["bank_after"] == record["bank_before"] + len(rows)
    assert manifest.thresholds.image == source.thresholds.image and manifest.thresholds.pixel == source.thresholds.pixel
    assert "conservative" in manifest.thresholds.method
    assert manifest.metrics == {}
    for precision, rec in manifest.precisions.items():
        assert rec.thresholds.image == source.precisions[precision].thresholds.image
    assert (out / "model.bin").stat().st_size > (bundle_dir / "model.bin").stat().st_size  # FP32, bank grown


def _copy_with(bundle_dir: Path, folder: Path, **changes) -> Path:
    """A copy of the bundle whose manifest has ``changes`` (files re-hashed, so it verifies)."""
    shutil.copytree(bundle_dir, folder)
    raw = json.loads((folder / "bundle.json").read_text())
    raw.pop("files")
    write_manifest(folder, {**raw, **changes})
    return folder


def test_what_cannot_be_folded_is_refused(bundle_dir, taught, tmp_path, capsys):
    _, _, folder, _, _ = taught
    dim = read_manifest(bundle_dir).extension.feature_dim  # type: ignore[union-attr]
    efficientad = _copy_with(bundle_dir, tmp_path / "ead", family="efficientad")
    with pytest.raises(FoldError, match="efficientad bundle: only PatchCore"):
        fold(efficientad, folder, tmp_path / "o1")
    no_ext = _copy_with(bundle_dir, tmp_path / "plain", extension=None)
    with pytest.raises(FoldError, match="has no bank extension"):
        fold(no_ext, folder, tmp_path / "o2")

    wrong = Extension(tmp_path / "wrong", dim + 1, 100)
    wrong.add("0000-9", np.ones((3, dim + 1), np.float32), "f", "cam")
    with pytest.raises(FoldError, match=rf"not \[n, {dim}\]"):
        fold(bundle_dir, tmp_path / "wrong", tmp_path / "o3")
    Extension(tmp_path / "empty", dim, 100)
    (tmp_path / "empty" / "index.json").write_text(json.dumps({"revision": 3, "entries": []}))
    with pytest.raises(FoldError, match="no rows"):
        fold(bundle_dir, tmp_path / "empty", tmp_path / "o4")
    other = tmp_path / "weave-patchcore-0123456789abcdef"
    shutil.copytree(folder, other)
    with pytest.raises(FoldError, match="not of this bundle's"):
        fold(bundle_dir, other, tmp_path / "o5")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    assert main(["fold-extension", str(bundle_dir), str(folder), "--out", str(tmp_path / "busy")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_a_fold_cut_short_by_a_full_disk_leaves_no_half_bundle(source, taught, tmp_path, capsys):
    """A full disk during the fold said only "basic_ios::clear: iostream error" and left a truncated model.bin and an
    empty model.xml at ``--out``, which the next fold and train refused as a folder not empty (a helper's probe on a
    small tmpfs).  The fold is built beside ``--out`` and renamed into place whole; the error names the folder.  The
    file size limit (RLIMIT_FSIZE, with SIGXFSZ ignored) makes the write fail part way, as a full disk does."""
    import resource
    import signal

    _, _, folder, _, _ = taught
    out = tmp_path / "folded"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
        assert main(["fold-extension", str(source), str(folder), "--out", str(out)]) == 2
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert f"cannot write the model to {tmp_path.resolve()}" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".folded.*")), list(tmp_path.iterdir())
    assert main(["fold-extension", str(source), str(folder), "--out", str(out)]) == 0  # room again: it folds
    read_manifest(out)


def test_a_bank_constant_that_cannot_be_rebuilt_is_named(bundle_dir):
    """An IR whose bank-norm constant does not hold the bank's norms is refused, naming that constant."""
    model = ov.Core().read_model(bundle_dir / "model.xml")
    dim = read_manifest(bundle_dir).extension.feature_dim  # type: ignore[union-attr]
    bank = next(op for op in model.get_ordered_ops() if op.get_type_name() == "Constant"
                and list(op.get_output_shape(0)) == [int(read_manifest(bundle_dir).training["memory_bank"]), dim])
    norms = next(op for op in model.get_ordered_ops() if op.get_type_name() == "Constant"
                 and op.get_data().dtype == np.float32 and op.get_data().size == bank.get_output_shape(0)[0])
    broken = ov.op.Constant(np.zeros(norms.get_data().shape, np.float32))
    broken.set_friendly_name("broken_norms")
    norms.output(0).replace(broken.output(0))
    with pytest.raises(FoldError, match=r"'broken_norms'.*cannot rebuild it"):
        fold_ir(model, bank.get_output_shape(0)[0], np.ones((2, dim), np.float32), 9)


def test_a_bank_as_large_as_another_dimension_of_the_graph_is_folded(dataset):
    """A bank of as many rows as the input has pixels a side (``--max-bank 512`` at 512 px: the blur matrix is
    [512, 64]), or as the grid or a kernel has, was refused as a constant "neither the bank nor its rows' squared
    norms". The bank's norms are told by their values; the folded IR scores as the graph of the merged bank."""
    import torch

    from exporter import backbones
    from exporter.export import convert, input_spec
    from exporter.train.patchcore import PatchcoreGraph, PatchcoreSettings, fit

    settings = PatchcoreSettings(input_size=64, coreset_ratio=1.0, max_bank=64, screen_rows=0)
    bb = backbones.resolve(settings.backbone)
    spec = input_spec(64, bb.mean, bb.std)
    graph, _ = fit(settings, bb, load_category(dataset, "weave").train[:4], spec)
    bank = graph.model.memory_bank
    assert bank.shape[0] == 64 and any(64 in list(c.get_output_shape(0)) and c.get_data().size != 64 for c in
                                       convert(graph, spec).get_ordered_ops() if c.get_type_name() == "Constant")
    rows = bank[:5] + 0.25
    model = convert(graph, spec)
    assert fold_ir(model, 64, rows.numpy(), settings.num_neighbors) == (64, 69)
    graph.model.memory_bank = torch.cat([bank, rows])
    merged = convert(PatchcoreGraph(graph.model, 64, graph.embedder, graph.k, offset=graph.offset).eval(), spec)
    images = np.stack([read_image(s.path, spec) for s in load_category(dataset, "weave").test[:4]])
    pad = np.full((1, rows.shape[1]), 1e3, np.float32)
    core = ov.Core()
    got, want = (core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})([images, pad]) for m in (model, merged))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4)
