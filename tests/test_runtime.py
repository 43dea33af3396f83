"""bundle.runtime's async queue (OpenVINO's own request threads) gives the same outputs as synchronous infer."""

from __future__ import annotations

import numpy as np

from bundle.runtime import CompiledBundle
from exporter.data import load_category, read_image


def test_async_queue_matches_infer(bundle_dir, dataset):
    compiled = CompiledBundle(bundle_dir)
    spec = compiled.manifest.input
    images = [read_image(s.path, spec) for s in load_category(dataset, "weave").test[:6]]
    queue = compiled.async_queue()
    assert len(queue) == compiled.optimal_requests
    got = {}
    queue.set_callback(lambda request, i: got.__setitem__(i, compiled.prediction(request)))
    for i, image in enumerate(images):
        queue.start_async({0: image[np.newaxis]}, i)
    queue.wait_all()
    request = compiled.create_request()
    for i, image in enumerate(images):
        want = compiled.infer(image[np.newaxis], request)
        np.testing.assert_allclose(got[i].score, want.score, rtol=1e-5)
        np.testing.assert_allclose(got[i].anomaly_map, want.anomaly_map, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[i].embedding, want.embedding, atol=1e-5)
