"""Run a bundle with the OpenVINO runtime: shared by the worker and by ``exporter evaluate``.

Evaluating through this module means the reported metrics are those of the
artefact the worker serves, not of the torch model it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openvino as ov

from bundle import Manifest, read_manifest


@dataclass(frozen=True)
class Prediction:
    """Outputs for a batch: raw scores [N], raw anomaly maps [N, H, W], embeddings [N, D]."""

    score: np.ndarray
    anomaly_map: np.ndarray
    embedding: np.ndarray


class CompiledBundle:
    """A verified bundle compiled for one device; hands out infer requests for concurrent use."""

    def __init__(self, folder: Path | str, device: str = "CPU", cache_dir: Path | None = None,
                 hint: str = "THROUGHPUT", verify: bool = True, batch: int | None = None) -> None:
        """``batch`` fixes the batch size (the IR's is dynamic).  The worker serves one frame per request:
        a static shape is what the CPU plugin runs best, and requests then never reshape their input
        tensors; two requests reshaping at once were seen to hang inside OpenVINO 2026.4."""
        self.folder = Path(folder)
        self.manifest: Manifest = read_manifest(self.folder, verify=verify)
        core = ov.Core()
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache_dir)})
        model = core.read_model(self.folder / "model.xml")
        if batch is not None:
            spec = self.manifest.input
            model.reshape({model.inputs[0].any_name: ov.PartialShape([batch, spec.height, spec.width, 3])})
        self.compiled = core.compile_model(model, device, {"PERFORMANCE_HINT": hint})
        self.optimal_requests = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        outputs = self.manifest.outputs
        self._names = (outputs["score"].name, outputs["anomaly_map"].name, outputs["embedding"].name)

    def create_request(self) -> ov.InferRequest:
        return self.compiled.create_infer_request()

    def infer(self, images: np.ndarray, request: ov.InferRequest | None = None) -> Prediction:
        """``images``: uint8 [N, H, W, 3] BGR at the bundle's input size (see :func:`bundle.prepare_image`)."""
        request = request or self.create_request()
        request.infer({0: images})
        return self.prediction(request)

    def prediction(self, request: ov.InferRequest) -> Prediction:
        """Copy the outputs of a finished request (sync, or in an :meth:`async_queue` callback)."""
        score, amap, emb = (request.get_tensor(name).data.copy() for name in self._names)
        return Prediction(score.reshape(-1), amap, emb)

    def async_queue(self, jobs: int = 0) -> ov.AsyncInferQueue:
        """``jobs`` requests (0 = the device's optimal number) run in OpenVINO's own threads, no Python thread each.

        ``queue.set_callback(fn(request, userdata))`` then ``queue.start_async({0: images}, userdata)``;
        read outputs in the callback with :meth:`prediction`.
        """
        return ov.AsyncInferQueue(self.compiled, jobs or self.optimal_requests)
