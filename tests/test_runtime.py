"""bundle.runtime's async queue (OpenVINO's own request threads) gives the same outputs as synchronous infer,
bank extension included; its model cache serves no blob damaged on disk; a bundle's files changed after it was
compiled change nothing."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import numpy as np
import pytest

from bundle import BundleError, read_manifest, sha256_file
from bundle.runtime import BLOB_DIGEST, CompiledBundle
from exporter.data import load_category, read_image


def test_async_queue_matches_infer(bundle_dir, dataset):
    compiled = CompiledBundle(bundle_dir, extension_rows=300)
    spec = compiled.manifest.input
    images = [read_image(s.path, spec) for s in load_category(dataset, "weave").test[:6]]
    taught = compiled.infer(images[0][np.newaxis])
    assert taught.candidates is not None
    compiled.set_extension(taught.candidates[0])  # every output below is the extended model's
    queue = compiled.async_queue()
    assert len(queue) == compiled.optimal_requests
    got = {}
    queue.set_callback(lambda request, i: got.__setitem__(i, compiled.prediction(request)))
    for i, image in enumerate(images):
        queue.start_async(compiled.inputs(image[np.newaxis]), i)
    queue.wait_all()
    request = compiled.create_request()
    for i, image in enumerate(images):
        want = compiled.infer(image[np.newaxis], request)
        np.testing.assert_allclose(got[i].score, want.score, rtol=1e-5)
        np.testing.assert_allclose(got[i].anomaly_map, want.anomaly_map, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[i].embedding, want.embedding, atol=1e-5)
        np.testing.assert_allclose(got[i].candidate_scores, want.candidate_scores, rtol=1e-4, atol=1e-5)
    assert got[0].score[0] < 0.5 * taught.score[0]  # the taught frame: the queue's requests use the extension


def test_a_cached_blob_damaged_on_disk_is_compiled_again_not_served(bundle_dir, dataset, tmp_path):
    """OpenVINO reads a cached blob back without checking its bytes: one flipped bit was served silently."""
    image = read_image(load_category(dataset, "weave").test[0].path, CompiledBundle(bundle_dir).manifest.input)
    want = CompiledBundle(bundle_dir, batch=1).infer(image[np.newaxis]).score
    CompiledBundle(bundle_dir, cache_dir=tmp_path, batch=1)
    blobs = sorted(tmp_path.glob("*.blob"))
    assert blobs and all(blob.with_name(blob.name + BLOB_DIGEST).is_file() for blob in blobs)
    blob = blobs[0]
    damaged = bytearray(blob.read_bytes())
    damaged[len(damaged) // 2] ^= 0x40
    blob.chmod(0o600)  # OpenVINO writes it read-only
    blob.write_bytes(damaged)
    again = CompiledBundle(bundle_dir, cache_dir=tmp_path, batch=1)
    assert sha256_file(blob) != hashlib.sha256(damaged).hexdigest(), "the damaged blob was served"
    np.testing.assert_allclose(again.infer(image[np.newaxis]).score, want, rtol=1e-6)  # compiled afresh, as before
    blob.with_name(blob.name + BLOB_DIGEST).unlink()  # a blob without a digest: half written when the power went
    blob.chmod(0o600)
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    CompiledBundle(bundle_dir, cache_dir=tmp_path, batch=1)
    assert blob.with_name(blob.name + BLOB_DIGEST).read_text().strip() == sha256_file(blob)


def test_a_bundle_copied_over_the_served_one_changes_nothing_until_reloaded(bundle_dir, dataset, tmp_path):
    """OpenVINO maps model.bin from its file unless told otherwise: bytes copied over the served bundle (the next
    model, a copy half way) changed its scores with no reload and no word, or ended the process with SIGBUS.  The
    graph is read into memory, from the bytes its checksums were compared with."""
    served = tmp_path / "served"
    shutil.copytree(bundle_dir, served)
    image = read_image(load_category(dataset, "weave").test[0].path, CompiledBundle(bundle_dir).manifest.input)
    compiled = CompiledBundle(served, batch=1)
    before = compiled.infer(image[np.newaxis]).score
    weights = served / "model.bin"
    with weights.open("r+b") as fh:  # in place, same size: what a copy over the file does to its pages
        fh.write(np.random.default_rng(0).integers(0, 255, weights.stat().st_size, np.uint8).tobytes())
    np.testing.assert_array_equal(compiled.infer(image[np.newaxis]).score, before)
    with pytest.raises(BundleError, match="model.bin does not match its sha256"):
        CompiledBundle(served, batch=1)


def test_a_manifest_that_leaves_the_model_unlisted_is_refused(bundle_dir, tmp_path):
    """A bundle.json whose `files` leaves out model.bin loaded it unchecked (a tampered model served under the
    genuine name and version), or answered a reload with a KeyError."""
    edited = tmp_path / "edited"
    shutil.copytree(bundle_dir, edited)
    manifest = json.loads((edited / "bundle.json").read_text())
    del manifest["files"]["model.bin"]
    (edited / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="files does not list model.bin"):
        CompiledBundle(edited, batch=1)


def test_a_manifest_from_a_newer_exporter_is_refused_in_one_line_that_says_so(bundle_dir, tmp_path):
    """An unknown field was refused with pydantic's multi-line text and a link to its website."""
    edited = tmp_path / "edited"
    shutil.copytree(bundle_dir, edited)
    manifest = json.loads((edited / "bundle.json").read_text())
    manifest["calibration"] = {"added": "later"}
    (edited / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError) as refused:
        CompiledBundle(edited, batch=1)
    said = str(refused.value)
    assert "calibration: Extra inputs are not permitted" in said and "written by a newer exporter?" in said, said
    assert "\n" not in said and "pydantic.dev" not in said, said


def _edited(bundle_dir, tmp_path, edit, name: str = "edited"):
    """A copy of the session bundle whose bundle.json ``edit`` (a function of the parsed manifest) changed."""
    copy = tmp_path / name
    shutil.copytree(bundle_dir, copy)
    manifest = json.loads((copy / "bundle.json").read_text())
    edit(manifest)
    (copy / "bundle.json").write_text(json.dumps(manifest))
    return copy


def test_thresholds_with_low_at_or_above_threshold_are_refused(bundle_dir, tmp_path):
    """low 50 over threshold 40 published a raw 44.9 as score 0.0 and anomalous; low -1e39 and threshold 1e39 (beyond
    float32, in which scores are computed) made every score NaN.  The exporter writes neither."""
    cases = {"above": (50.0, 40.0), "beyond float32": (-1e39, 1e39)}
    for name, (low, threshold) in cases.items():
        def edit(m, low=low, threshold=threshold):
            m["thresholds"]["image"].update(low=low, threshold=threshold)
        with pytest.raises(BundleError, match=r"thresholds\.image"):
            read_manifest(_edited(bundle_dir, tmp_path, edit, name.replace(" ", "-")))


def test_a_manifest_without_an_output_is_refused_naming_it(bundle_dir, tmp_path):
    """A bundle.json without outputs.score passed validation and failed with a KeyError: a traceback at start,
    internal_error at a reload, and a worker that could not start once it was the rolled-out bundle."""
    edited = _edited(bundle_dir, tmp_path, lambda m: m["outputs"].pop("score"))
    with pytest.raises(BundleError, match="names no score output") as refused:
        CompiledBundle(edited, batch=1)
    assert "\n" not in str(refused.value)


def test_output_sizes_and_names_other_than_the_graphs_are_refused(bundle_dir, tmp_path):
    """embedding_dim 999 on a graph of 152 made the store collection 999 wide and refused every frame's record; an
    extension feature_dim of 100 failed in OpenVINO's reshape, an output named "nope" at the first inference."""
    dim = read_manifest(bundle_dir).embedding_dim
    cases = {
        "embedding_dim": lambda m: m.__setitem__("embedding_dim", dim + 1),
        "extension": lambda m: m["extension"].__setitem__("feature_dim", 100),
        "no output named": lambda m: m["extension"].__setitem__("candidates_output", "nope"),
    }
    for said, edit in cases.items():
        with pytest.raises(BundleError, match=said):
            CompiledBundle(_edited(bundle_dir, tmp_path, edit, said.replace(" ", "-")), batch=1)


def test_training_entries_the_worker_reads_are_validated_at_load(bundle_dir, tmp_path):
    """training.chroma 5 failed every frame with AttributeError, training.frame_sizes {"abc": 1} with ValueError
    (internal_error each); they are refused with the bundle, as other malformed manifests are."""
    cases = {"chroma": 5, "frame_sizes": {"abc": 1}}
    for key, value in cases.items():
        with pytest.raises(BundleError, match=rf"training\.{key}"):
            read_manifest(_edited(bundle_dir, tmp_path, lambda m, k=key, v=value: m["training"].__setitem__(k, v), key))


def test_a_schema_version_of_true_is_refused(bundle_dir, tmp_path):
    """JSON true equals 1 to Python: it was read as a schema 1 bundle."""
    with pytest.raises(BundleError, match="schema_version True"):
        read_manifest(_edited(bundle_dir, tmp_path, lambda m: m.__setitem__("schema_version", True)))


def test_a_bundle_of_a_newer_schema_says_what_to_do(tmp_path):
    """A bundle from a newer exporter, met by a worker not yet updated (or rolled back), was refused with only
    "schema_version 3, this software reads 1, 2": it now says where such a bundle comes from and what to do."""
    (tmp_path / "bundle.json").write_text(json.dumps({"schema_version": 3, "name": "x"}))
    with pytest.raises(BundleError, match=r"schema_version 3, this software reads 1, 2 \(a bundle from a newer "
                                          r"exporter: update this software, or export"):
        read_manifest(tmp_path)
    (tmp_path / "bundle.json").write_text(json.dumps({"schema_version": 0}))
    with pytest.raises(BundleError, match=r"schema_version 0, this software reads 1, 2$"):
        read_manifest(tmp_path)


def test_a_damaged_blob_the_worker_cannot_delete_is_not_served(bundle_dir, tmp_path):
    """A cache folder made immutable (as a read-only disk would be): the damaged blob could not be deleted, was only
    warned about, and OpenVINO served it.  Now the bundle is compiled without the cache."""
    cache = tmp_path / "cache"
    CompiledBundle(bundle_dir, cache_dir=cache, batch=1)
    blob = sorted(cache.glob("*.blob"))[0]
    damaged = bytearray(blob.read_bytes())
    damaged[len(damaged) // 2] ^= 0x40
    blob.chmod(0o600)
    blob.write_bytes(damaged)
    if subprocess.run(["chattr", "+i", str(cache)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (file system, or no CAP_LINUX_IMMUTABLE)")
    try:
        again = CompiledBundle(bundle_dir, cache_dir=cache, batch=1)
        assert blob.read_bytes() == damaged  # it could not be deleted
        assert not again.compiled.get_property("LOADED_FROM_CACHE"), "the damaged blob was served"
    finally:
        subprocess.run(["chattr", "-i", str(cache)], check=True)


def test_a_manifest_naming_a_file_outside_its_bundle_is_refused_naming_the_entry(bundle_dir, tmp_path):
    """bundle.json's ``files`` is what the loader reads and hashes: ``../x`` or an absolute path made it read a file
    outside the bundle's folder (and a bundle whose checksum of that file matched was served as verified)."""
    outside = tmp_path / "outside.txt"
    outside.write_text("not the bundle's\n")
    digest = sha256_file(outside)
    for name, entry in (("up", "../outside.txt"), ("absolute", str(outside))):
        edited = _edited(bundle_dir, tmp_path, lambda m, e=entry: m["files"].__setitem__(e, digest), name)
        with pytest.raises(BundleError, match=f"files: Value error, {entry!r} cannot name a bundle file"):
            read_manifest(edited)
        with pytest.raises(BundleError, match=f"{entry!r} cannot name a bundle file"):
            CompiledBundle(edited, batch=1)
