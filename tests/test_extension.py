"""The bank extension (issue 17): a second graph input of rows declared normal after a false alarm.

The exported graph compares each frame's K most anomalous patches with the extension; the torch-free runtime
compiles the input with a static row count and feeds it on every request.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import torch

from bundle import EXTENSION_PAD, BundleError, Normalisation, Thresholds, read_manifest, write_manifest
from bundle.extension import Extension, ExtensionUnwritable, Views, absorb, decisive_patches, spared
from bundle.runtime import CompiledBundle, supported_precisions
from exporter import backbones
from exporter.data import load_category, read_image
from exporter.export import convert, extension_spec, input_spec, library_versions, output_specs, save_ir, timestamp
from exporter.train.patchcore import PatchcoreGraph, PatchcoreSettings, auto_candidates, fit, to_tensor


def _bundle(graph: PatchcoreGraph, spec, folder: Path) -> Path:
    """Export ``graph`` as a minimal bundle (placeholder thresholds) in ``folder``."""
    save_ir(convert(graph, spec), folder)
    norm = Normalisation(low=0, threshold=1)
    with torch.no_grad():
        dim = int(graph(torch.zeros(1, 3, spec.height, spec.width))[2].shape[1])
    write_manifest(folder, dict(
        name="ext", version="0", family="patchcore", category="weave", created_at=timestamp(), input=spec,
        outputs=output_specs(spec, dim), embedding_dim=dim, extension=extension_spec(graph),
        thresholds=Thresholds(image=norm, pixel=norm, method="test"), training={}, versions=library_versions()))
    return folder


@pytest.fixture(scope="module")
def fitted(dataset):
    """A tiny fitted graph (128 px: 16 x 16 patches, all of them candidates), its input spec, backbone and the
    generated test images."""
    settings = PatchcoreSettings(input_size=128, coreset_ratio=0.05, extension_candidates=256)
    cat = load_category(dataset, "weave")
    bb = backbones.resolve(settings.backbone)
    spec = input_spec(settings.input_size, bb.mean, bb.std)
    graph, _ = fit(settings, bb, cat.train, spec)
    images = [read_image(s.path, spec) for s in cat.test]
    labels = np.array([s.label for s in cat.test])
    return graph, spec, bb, images, labels


def test_pad_rows_change_nothing(fitted):
    """One pad row (the empty extension) or many give the same outputs, and the candidates are the K patches
    farthest from the bank with their bank distances."""
    graph, _, bb, images, _ = fitted
    x = to_tensor(images[:4], bb)
    with torch.no_grad():
        one = graph(x, graph.pad_extension())
        many = graph(x, torch.full((50, graph.feature_dim), EXTENSION_PAD))
        features = graph.model.generate_embedding(
            {k: graph.model.feature_pooler(f) for k, f in graph.model.feature_extractor(x).items()})
        flat = features.flatten(2).transpose(1, 2)
        bank = torch.cdist(flat, graph.model.memory_bank).amin(-1)
    for a, b in zip(one, many, strict=True):
        torch.testing.assert_close(a, b)
    k = graph.extension_spec().candidates
    assert one[3].shape == (4, k, graph.feature_dim) and one[4].shape == (4, k)
    torch.testing.assert_close(one[4], bank.topk(k, 1).values, rtol=1e-4, atol=1e-4)


def test_extension_equals_a_bank_holding_its_rows(fitted, tmp_path):
    """Every patch a candidate (K = h*w): the OpenVINO bundle with extension X scores and maps like a bundle whose
    memory bank is bank + X with an empty extension (the exact PatchCore of the union), and embeds as without X."""
    graph, spec, bb, images, labels = fitted
    assert graph.extension_spec().candidates == graph.patches()
    with torch.no_grad():  # X: patch features of two defect frames, the kind of rows a false alarm adds
        defects = [i for i, label in enumerate(labels) if label][:2]
        x_rows = graph(to_tensor([images[i] for i in defects], bb))[3][:, :40].reshape(-1, graph.feature_dim)
    model = graph.model
    bank = model.memory_bank
    model.memory_bank = torch.cat([bank, x_rows])
    union = PatchcoreGraph(model, spec.height, graph.embedder, graph.k, offset=graph.offset).eval()
    union_dir = _bundle(union, spec, tmp_path / "union")
    model.memory_bank = bank
    extended = CompiledBundle(_bundle(graph, spec, tmp_path / "extended"), extension_rows=100)
    extended.set_extension(x_rows.numpy())
    assert extended.extension_count == 80
    batch = np.stack(images)
    want = CompiledBundle(union_dir).infer(batch)
    got = extended.infer(batch)
    np.testing.assert_allclose(got.score, want.score, rtol=1e-3)
    np.testing.assert_allclose(got.anomaly_map, want.anomaly_map, rtol=1e-3, atol=1e-3 * want.anomaly_map.max())
    plain = CompiledBundle(extended.folder).infer(batch)
    assert (got.score[defects] < plain.score[defects] * 0.9).all(), (got.score, plain.score)
    np.testing.assert_allclose(got.embedding, plain.embedding, atol=1e-5)  # the bank's: the extension is no new space


def test_a_false_alarm_taught_scores_as_normal(bundle_dir, dataset):
    """The bundle `exporter train` writes: a defect frame's own candidates put into the extension bring its score
    to the floor (below every normal test frame's), and no frame's map rises (distances can only drop); a state
    of the extension taken before scores as before."""
    manifest = read_manifest(bundle_dir)
    assert manifest.extension is not None and manifest.training["extension_candidates"] == 256
    compiled = CompiledBundle(bundle_dir, extension_rows=manifest.extension.candidates)
    spec = manifest.input
    test = load_category(dataset, "weave").test
    batch = np.stack([read_image(s.path, spec) for s in test])
    before = compiled.infer(batch)
    assert before.candidates is not None and before.candidate_scores is not None
    assert before.candidates.shape == (len(test), manifest.extension.candidates, manifest.extension.feature_dim)
    good = np.array([s.label == 0 for s in test])
    alarm = int(np.argmax(np.where(good, -np.inf, before.score)))
    empty = compiled.extension_state
    compiled.set_extension(before.candidates[alarm], revision=1)
    after = compiled.infer(batch)
    assert after.score[alarm] < 0.1 * before.score[good].min(), (after.score[alarm], before.score[good])
    assert after.candidate_scores is not None and after.candidate_scores[alarm].max() < 1e-2 * before.score[alarm]
    assert (after.anomaly_map <= before.anomaly_map + 1e-4 * before.anomaly_map.max()).all()
    # The frame is embedded as before: its history is searched in one space before and after the label.
    np.testing.assert_allclose(after.embedding, before.embedding, atol=1e-5)
    # An earlier state scores as it did then (a label's other views are read against the extension before it).
    then = compiled.infer(batch, extension=empty)
    assert then.extension_revision == 0 and after.extension_revision == 1
    np.testing.assert_allclose(then.score, before.score, rtol=1e-5)
    compiled.set_extension(np.zeros((0, manifest.extension.feature_dim), np.float32))
    np.testing.assert_allclose(compiled.infer(batch).score, before.score, rtol=1e-5)


def test_rows_spared_for_a_confirmed_defect_keep_it_flagged(bundle_dir, dataset):
    """Absorbing two defect frames' candidates blinds the bundle to both; with one of them confirmed (``spared``
    against its decisive patches) that one keeps those patches at their reach or farther and stays flagged, while
    the other frame's rows that do not come near them are still absorbed."""
    manifest = read_manifest(bundle_dir)
    assert manifest.extension is not None
    compiled = CompiledBundle(bundle_dir, extension_rows=2 * manifest.extension.candidates)
    threshold = compiled.thresholds.image.threshold
    test = load_category(dataset, "weave").test
    batch = np.stack([read_image(s.path, manifest.input) for s in test])
    before = compiled.infer(batch)
    assert before.candidates is not None and before.candidate_scores is not None
    flagged = [i for i in np.argsort(-before.score) if test[i].label and before.score[i] >= threshold]
    taught, confirmed = flagged[0], next(i for i in flagged if test[i].defect != test[flagged[0]].defect)
    rows = np.concatenate([before.candidates[taught], before.candidates[confirmed]])
    compiled.set_extension(rows)
    assert compiled.infer(batch).score[confirmed] < threshold  # unguarded: the confirmed defect would pass
    patches, reach = decisive_patches(before.candidates[confirmed], before.candidate_scores[confirmed],
                                      float(before.score[confirmed]), threshold)
    decisive = before.candidate_scores[confirmed] >= reach[0]
    assert decisive.any() and len(patches) == decisive.sum() and reach[0] <= before.candidate_scores[confirmed].max()
    keep = spared(rows, [(patches, reach)])
    assert keep[: len(rows) // 2].any() and not keep[len(rows) // 2:][decisive].any()  # not its decisive patches
    compiled.set_extension(rows[keep])
    after = compiled.infer(batch)
    assert after.candidate_scores is not None
    assert (after.candidate_scores[confirmed][decisive] >= reach[0] * (1 - 1e-5)).all()
    assert after.score[confirmed] >= threshold and after.score[taught] < before.score[taught]
    # A frame that is not flagged has nothing decisive.
    good = next(i for i in range(len(test)) if before.score[i] < threshold)
    assert len(decisive_patches(before.candidates[good], before.candidate_scores[good], float(before.score[good]),
                                threshold)[0]) == 0


def test_a_guard_of_the_farthest_decisive_patches_spares_rows_near_the_others():
    """``protect`` = n keeps the n decisive patches farthest from the bank, whatever the candidates' order: a row near
    a nearer decisive patch is then absorbed, one near the farthest is still left out."""
    candidates = np.array([[1000, 0], [2000, 0], [0, 0], [3000, 0]], np.float32)  # far apart against a reach of ~44
    scores = np.array([40, 45, 50, 10], np.float32)
    need = 50 * 40 / 45  # farthest distance x threshold / image score
    patches, reach = decisive_patches(candidates, scores, 45.0, 40.0)
    assert sorted(map(tuple, patches)) == [(0, 0), (2000, 0)] and np.allclose(reach, need)
    top, top_reach = decisive_patches(candidates, scores, 45.0, 40.0, protect=1)
    np.testing.assert_array_equal(top, [[0, 0]])
    assert np.allclose(top_reach, need)
    assert len(decisive_patches(candidates, scores, 45.0, 40.0, protect=8)[0]) == 2  # never more than the decisive ones
    rows = np.array([[2010, 0], [5, 0], [1000, 0]], np.float32)  # near the second farthest, the farthest, neither
    np.testing.assert_array_equal(spared(rows, [(patches, reach)]), [False, False, True])
    np.testing.assert_array_equal(spared(rows, [(top, top_reach)]), [True, False, True])


def test_a_confirmed_defect_guarded_by_its_farthest_patch_alone_stays_flagged(bundle_dir, dataset):
    """Protecting only a confirmed defect's farthest decisive patch leaves out fewer of the rows that look like it than
    protecting all of them, and still keeps it flagged once the rest are absorbed."""
    manifest = read_manifest(bundle_dir)
    assert manifest.extension is not None
    compiled = CompiledBundle(bundle_dir, extension_rows=manifest.extension.candidates)
    threshold = compiled.thresholds.image.threshold
    test = load_category(dataset, "weave").test
    batch = np.stack([read_image(s.path, manifest.input) for s in test])
    before = compiled.infer(batch)
    assert before.candidates is not None and before.candidate_scores is not None
    confirmed = next(i for i in np.argsort(-before.score) if test[i].label and before.score[i] >= threshold)
    rows = before.candidates[confirmed]  # a label whose patches are the defect's own: the worst case
    guard = [decisive_patches(before.candidates[confirmed], before.candidate_scores[confirmed],
                              float(before.score[confirmed]), threshold, protect) for protect in (0, 1)]
    assert len(guard[1][0]) == 1 < len(guard[0][0])
    every, farthest = (spared(rows, [g]) for g in guard)
    assert (every <= farthest).all() and farthest.sum() > every.sum()
    compiled.set_extension(rows[farthest])
    assert compiled.infer(batch).score[confirmed] >= threshold


def test_pad_rows_are_safe_at_every_precision(bundle_dir, dataset):
    """A pad row's squared norm overflows f16; the graph masks pad rows, so at every precision the CPU runs, a
    bundle with a large empty extension scores as with one pad row and near its f32 scores."""
    spec = read_manifest(bundle_dir).input
    batch = np.stack([read_image(s.path, spec) for s in load_category(dataset, "weave").test])
    reference = CompiledBundle(bundle_dir).infer(batch).score
    for precision in supported_precisions(ov.Core(), "CPU"):
        one = CompiledBundle(bundle_dir, precision=precision).infer(batch)
        many = CompiledBundle(bundle_dir, precision=precision, extension_rows=64).infer(batch)
        assert np.isfinite(one.anomaly_map).all() and np.isfinite(one.candidate_scores).all(), precision
        np.testing.assert_allclose(many.score, one.score, rtol=1e-3, err_msg=precision)
        np.testing.assert_allclose(one.score, reference, rtol=0.02, err_msg=precision)


def test_extension_rows_are_checked(bundle_dir):
    compiled = CompiledBundle(bundle_dir, extension_rows=4)
    dim = compiled.manifest.extension.feature_dim if compiled.manifest.extension else 0
    with pytest.raises(BundleError, match="exceed the compiled capacity of 4"):
        compiled.set_extension(np.zeros((5, dim), np.float32))
    with pytest.raises(BundleError, match=rf"must be \[e, {dim}\]"):
        compiled.set_extension(np.zeros((2, dim + 1), np.float32))
    with pytest.raises(BundleError, match="finite"):
        compiled.set_extension(np.full((1, dim), np.nan, np.float32))
    with pytest.raises(BundleError, match="at least 1"):
        CompiledBundle(bundle_dir, extension_rows=0)
    rows = np.ones((3, dim), np.float32)
    compiled.set_extension(rows)
    rows[:] = 7  # the caller's array is copied, not shared with the requests
    extension = compiled.extension()
    assert extension is not None and extension.shape == (3, dim) and (extension == 1).all()


def test_a_new_extension_reaches_concurrent_requests_whole(bundle_dir, dataset):
    """Two threads infer on their own requests while the extension is swapped between empty and a taught false
    alarm: every score is the frame's score under one of the two, never a mix or a stale half."""
    compiled = CompiledBundle(bundle_dir, batch=1, extension_rows=256)
    spec = compiled.manifest.input
    frame = np.stack([read_image(s.path, spec) for s in load_category(dataset, "weave").test if s.label][:1])
    plain = compiled.infer(frame)
    assert plain.candidates is not None
    taught = plain.candidates[0][:128]
    compiled.set_extension(taught)
    low = float(compiled.infer(frame).score[0])
    high = float(plain.score[0])
    assert low < 0.9 * high
    scores: list[float] = []
    done = threading.Event()

    def run() -> None:
        request = compiled.create_request()
        while not done.is_set():
            scores.append(float(compiled.infer(frame, request).score[0]))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        i = 0
        while len(scores) < 40:  # swap until both threads have run 40 requests between them
            i += 1
            compiled.set_extension(taught if i % 2 else taught[:0])
    finally:
        done.set()
        for t in threads:
            t.join()
    assert any(np.isclose(s, low, rtol=1e-4) for s in scores) and any(np.isclose(s, high, rtol=1e-4) for s in scores)
    assert all(np.isclose(s, low, rtol=1e-4) or np.isclose(s, high, rtol=1e-4) for s in scores), sorted(set(scores))


def test_the_default_candidates_are_a_share_of_the_frame(fitted):
    """Unset, K is a 32nd of the frame's patches within 64..256 (512 px: 128 of 4096; 256 px: 64 of 1024), so
    a small input does not compare a large share of its patches with every extension row; never more than it has."""
    assert [auto_candidates(n) for n in (4096, 6400, 1024, 2304, 16384, 256, 40)] == [128, 200, 64, 72, 256, 64, 40]
    graph, spec, _, _, _ = fitted
    default = PatchcoreGraph(graph.model, spec.height, graph.embedder, offset=graph.offset).eval()
    spec64 = default.extension_spec()
    assert graph.patches() == 256 and spec64 is not None and spec64.candidates == 64


def test_a_graph_without_candidates_has_no_extension(fitted, tmp_path):
    """``extension_candidates`` 0 exports the graph as before issue 17: image input only, three outputs, the same
    numbers as the extension graph with an empty extension; the runtime serves it with ``candidates`` None and
    refuses to set an extension on it."""
    graph, spec, bb, images, _ = fitted
    plain = PatchcoreGraph(graph.model, spec.height, graph.embedder, 0, offset=graph.offset).eval()
    assert plain.extension_spec() is None
    with torch.no_grad():
        want = graph(to_tensor(images[:4], bb))
        got = plain(to_tensor(images[:4], bb))
    assert len(got) == 3
    for a, b in zip(got, want[:3], strict=True):
        torch.testing.assert_close(a, b)
    compiled = CompiledBundle(_bundle(plain, spec, tmp_path / "plain"), extension_rows=10)
    assert compiled.manifest.extension is None and compiled.extension_capacity == 0
    assert "extension" not in json.loads((compiled.folder / "bundle.json").read_text())  # as bundles before it
    assert [i.any_name for i in compiled.compiled.inputs] == [spec.name]
    pred = compiled.infer(np.stack(images[:4]))
    assert pred.candidates is None and pred.candidate_scores is None and compiled.extension() is None
    np.testing.assert_allclose(pred.score, want[0].numpy(), rtol=1e-3)
    with pytest.raises(BundleError, match="has no bank extension input"):
        compiled.set_extension(np.zeros((1, graph.feature_dim), np.float32))


def test_a_manifest_must_declare_the_graphs_inputs(bundle_dir, tmp_path):
    """An extension graph whose manifest does not declare the extension (a reader would leave the input unfed)
    is refused before anything runs."""
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    raw = json.loads((copy / "bundle.json").read_text())
    del raw["extension"]
    (copy / "bundle.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="inputs"):
        CompiledBundle(copy)


def test_an_extension_pad_other_than_the_graphs_is_refused(bundle_dir, tmp_path):
    """The runtime fills unused rows with the manifest's pad, the graph masks rows of EXTENSION_PAD: ``"pad": NaN``
    scored an anomalous frame 0.0, normal, with no error."""
    for name, pad in (("nan", "NaN"), ("zero", "0.0")):
        copy = tmp_path / name
        shutil.copytree(bundle_dir, copy)
        text = (copy / "bundle.json").read_text()
        assert f'"pad": {EXTENSION_PAD!r}' in text
        (copy / "bundle.json").write_text(text.replace(f'"pad": {EXTENSION_PAD!r}', f'"pad": {pad}'))
        with pytest.raises(BundleError, match=r"extension\.pad"):
            read_manifest(copy)


def test_an_index_with_a_malformed_entry_is_taken_for_damaged(tmp_path):
    """An entry whose ``at`` is text, in an extension holding more rows than max_rows, failed with a TypeError (not
    a reload error) when the oldest entries were sorted out; it is a damaged index, recovered from the row files."""
    folder = tmp_path / "ext"
    ext = Extension(folder, 8, 100)
    for key in ("aa", "bb"):
        ext.add(key, np.ones((3, 8), np.float32), f"f-{key}", "cam")
    index = json.loads((folder / "index.json").read_text())
    index["entries"][0]["at"] = "yesterday"
    (folder / "index.json").write_text(json.dumps(index))
    reopened = Extension(folder, 8, 4)
    assert len(reopened.rows) == 3 and (folder / "index.corrupt").is_file()


def test_a_label_cut_short_by_the_disk_is_absorbed_whole_or_not_at_all(bundle_dir, dataset, tmp_path):
    """absorb handled only ExtensionFull between its two adds: where the disk refused the views' rows, the frame's own
    stayed in use and a retry answered "already absorbed", so the views were never added.  Now the frame's own rows
    are taken back, ExtensionUnwritable says so, and a retry once the folder can be written absorbs it whole."""
    manifest = read_manifest(bundle_dir)
    assert manifest.extension is not None
    compiled = CompiledBundle(bundle_dir, extension_rows=64 * manifest.extension.candidates)
    threshold = compiled.thresholds.image.threshold
    test = load_category(dataset, "weave").test
    images = [read_image(s.path, manifest.input) for s in test]
    scores = compiled.infer(np.stack(images)).score
    tile = images[int(np.argmax(scores))]
    assert scores.max() >= threshold
    ext = Extension(tmp_path / "ext", manifest.extension.feature_dim, max_rows=64 * manifest.extension.candidates)
    blocked = ext.folder / "index.json.tmp"
    puts: list[int] = []

    def put(e: Extension) -> None:
        compiled.set_extension(e.rows, e.revision)
        puts.append(len(e.rows))
        if len(puts) == 1 and not blocked.exists():  # the disk fills between the frame's own rows and its views'
            blocked.mkdir()

    key = "0f0f0f0f-0000-0000-0000-000000000001"
    args = (compiled, compiled.create_request(), ext, key, [tile], Views.FLIPS, threshold, 0.9, [], put, "f", "cam")
    with pytest.raises(ExtensionUnwritable, match=r"was not absorbed.*could not be written.*own rows.*could not be "
                                                  r"taken back either"):
        absorb(*args)  # the index cannot be written to take them back either
    assert [e.frame_id for e in ext.entries()] == ["f"]  # what is left is in use and listed, to be withdrawn
    blocked.rmdir()
    assert ext.remove(key) and not len(ext.rows)
    put(ext)  # out of use too, as the label service does
    puts.clear()
    with pytest.raises(ExtensionUnwritable, match=r"was not absorbed.*nothing was changed"):
        absorb(*args[:9], _blocking_views(ext, key, puts, compiled), "f", "cam")
    assert not ext.entries() and not len(ext.rows) and puts[-1] == 0  # taken back, and out of use
    (ext.folder / f"{key}.npy.tmp").rmdir()
    done = absorb(*args)  # the retry absorbs the frame and its views
    assert done.entry is not None and not done.full and done.entry.rows > puts[0] and done.entry.rows == len(ext.rows)


def _blocking_views(ext: Extension, key: str, puts: list[int], compiled: CompiledBundle):
    """A ``put`` that, after the frame's own rows, makes writing the entry's rows fail for real (a directory where
    its temporary file goes), as a disk that fills between the two writes."""
    def put(e: Extension) -> None:
        compiled.set_extension(e.rows, e.revision)
        puts.append(len(e.rows))
        if len(puts) == 1:
            (ext.folder / f"{key}.npy.tmp").mkdir()
    return put
