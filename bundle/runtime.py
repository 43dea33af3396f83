"""Run a bundle with the OpenVINO runtime: shared by the worker and by ``exporter evaluate``.

Evaluating through this module means the reported metrics are those of the
artefact the worker serves, not of the torch model it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openvino as ov

from bundle import PRECISIONS, BundleError, Manifest, Precision, Thresholds, read_manifest

AUTO = "auto"
_CAPABILITY = {"bf16": "BF16", "f16": "FP16"}  # OPTIMIZATION_CAPABILITIES a device needs for a floating precision


def supported_precisions(core: ov.Core, device: str, weights: str = "FP32") -> list[Precision]:
    """Precisions ``device`` runs natively for a bundle with ``weights``; the reference one always comes first."""
    capabilities = set(core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
    first: Precision = "int8" if weights == "INT8" else "f32"
    return [first] + [p for p in ("bf16", "f16") if _CAPABILITY[p] in capabilities]


def device_name(core: ov.Core, device: str) -> str:
    try:
        return str(core.get_property(device, "FULL_DEVICE_NAME"))
    except RuntimeError:
        return device


@dataclass(frozen=True)
class Prediction:
    """Outputs for a batch: raw scores [N], raw anomaly maps [N, H, W], embeddings [N, D]."""

    score: np.ndarray
    anomaly_map: np.ndarray
    embedding: np.ndarray


class CompiledBundle:
    """A verified bundle compiled for one device; hands out infer requests for concurrent use."""

    def __init__(self, folder: Path | str, device: str = "CPU", cache_dir: Path | None = None,
                 hint: str = "THROUGHPUT", verify: bool = True, batch: int | None = None,
                 precision: Precision | str = "f32", require_thresholds: bool = True) -> None:
        """``batch`` fixes the batch size (the IR's is dynamic).  The worker serves one frame per request:
        a static shape is what the CPU plugin runs best, and requests then never reshape their input
        tensors; two requests reshaping at once were seen to hang inside OpenVINO 2026.4.

        ``precision`` is always set explicitly (``auto`` = the device's own default, resolved and recorded):
        OpenVINO's CPU plugin runs bf16 by default on CPUs with AMX or AVX512_BF16, so an unset hint gives
        other numbers on other machines.  The thresholds used are the ones the bundle measured at that
        precision; a bundle without them is refused (``require_thresholds``), since raw scores move with it.
        """
        self.folder = Path(folder)
        self.manifest: Manifest = read_manifest(self.folder, verify=verify)
        core = ov.Core()
        config: dict = {"PERFORMANCE_HINT": hint}
        if precision != AUTO:
            config["INFERENCE_PRECISION_HINT"] = self._hint_for(core, device, precision)
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache_dir)})
        model = core.read_model(self.folder / "model.xml")
        if batch is not None:
            spec = self.manifest.input
            model.reshape({model.inputs[0].any_name: ov.PartialShape([batch, spec.height, spec.width, 3])})
        self.compiled = core.compile_model(model, device, config)
        self.optimal_requests = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.device_name = device_name(core, device)
        self.precision: Precision = self._effective_precision()
        thresholds = self.manifest.thresholds_for(self.precision)
        if thresholds is None and require_thresholds:
            have = sorted({self.manifest.reference_precision, *self.manifest.precisions})
            raise BundleError(f"{self.folder}: no thresholds measured at {self.precision} (this bundle has "
                              f"{', '.join(have)}); run one of those, or re-export on a CPU that runs {self.precision}")
        self.thresholds: Thresholds = thresholds or self.manifest.thresholds
        outputs = self.manifest.outputs
        self._names = (outputs["score"].name, outputs["anomaly_map"].name, outputs["embedding"].name)

    def _hint_for(self, core: ov.Core, device: str, precision: str) -> str:
        if precision not in PRECISIONS:
            raise BundleError(f"unknown precision {precision!r}; choose from {', '.join((AUTO, *PRECISIONS))}")
        if precision == "int8" and self.manifest.precision != "INT8":
            raise BundleError(f"{self.folder}: precision int8 needs a quantised bundle "
                              "(python -m exporter train --precision int8); this one is " + self.manifest.precision)
        native = supported_precisions(core, device, self.manifest.precision)
        if precision in _CAPABILITY and precision not in native:
            raise BundleError(f"{device} ({device_name(core, device)}) does not run {precision} natively; "
                              f"it runs {', '.join(native)}")
        return "f32" if precision == "int8" else precision

    def _effective_precision(self) -> Precision:
        """What the compiled model really runs, read back from OpenVINO (not what was asked)."""
        try:
            hint = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        except RuntimeError:  # a device without the property runs the IR's own precision
            hint = "f32"
        if hint not in ("bf16", "f16", "f32"):
            raise BundleError(f"{self.folder}: the device runs {hint}, which this software has no thresholds for")
        if hint == "f32" and self.manifest.precision == "INT8":
            return "int8"
        return hint

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
