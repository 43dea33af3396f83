"""bundle.runtime's async queue (OpenVINO's own request threads) gives the same outputs as synchronous infer,
bank extension included."""

from __future__ import annotations

import numpy as np

from bundle.runtime import CompiledBundle
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
