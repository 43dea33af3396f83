"""INT8 post-training quantisation of an exported bundle graph with NNCF.

Calibration uses normal training images only, prepared exactly as the worker feeds
them (uint8 NHWC BGR at the input size), because pre-processing is inside the graph.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import nncf
import numpy as np
import openvino as ov

from bundle import EXTENSION_PAD

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8")
# Operations kept FP32 by default (regex on OpenVINO friendly names): PatchCore's heads after the
# CNN - feature pooling, memory-bank distances and score (top-level ``aten::`` ops of the export
# graph), blur, embedding.  Quantising their inputs breaks the output contract (embeddings no
# longer unit length).  The convolutions keep generic names after conversion, so the heads are
# what is named, not the backbone.  Quantising the heads too cost image AUROC (docs/benchmarks.md, "INT8").  A model
# of grey images has its graph inside exporter.train.grey.GreyFirst, whose own grey step (top-level) is kept FP32 too
# and whose graph's top-level operations are named under its attribute ``inner``.
HEADS = r".*(embedder|anomaly_map_generator|feature_pooler)|(__module\.inner/)?aten::"  # NNCF applies re.match


# NNCF collects its statistics on the first this many calibration images and never reads the rest: a caller reads
# no more images than that.
CALIBRATION_IMAGES = 300


def quantize(model: ov.Model, calibration_images: Sequence[np.ndarray], subset_size: int = CALIBRATION_IMAGES,
             keep_fp32: str | None = HEADS) -> ov.Model:
    """INT8 copy of ``model`` (NNCF PTQ, mixed preset); ``calibration_images``: uint8 HWC BGR at the input size.

    Every layer's weights get 7 bits (NNCF's overflow fix on all layers, not only the first): CPUs without VNNI
    (AVX2, AVX-512 before VNNI) sum pairs of 8-bit products in 16 bits, which saturates on depthwise networks
    like EfficientNet-Lite, so 8-bit weights would score differently there than on a VNNI or AMX CPU
    (docs/benchmarks.md, "INT8 weights in 7 bits").

    Operations whose friendly name matches the regex ``keep_fp32`` are not quantised (``None``: all are).
    """
    if not calibration_images:
        raise ValueError("INT8 quantisation needs at least one calibration image")
    dataset = nncf.Dataset(list(calibration_images), _feed(model))
    ignored = nncf.IgnoredScope(patterns=[keep_fp32], validate=False) if keep_fp32 else nncf.IgnoredScope()
    log.info("NNCF INT8 quantisation on %d calibration images (kept FP32: %s)", len(calibration_images), keep_fp32)
    return nncf.quantize(model, dataset, preset=nncf.QuantizationPreset.MIXED,
                         subset_size=min(subset_size, len(calibration_images)), ignored_scope=ignored,
                         advanced_parameters=nncf.AdvancedQuantizationParameters(overflow_fix=nncf.OverflowFix.ENABLE))


def _feed(model: ov.Model) -> Callable[[np.ndarray], np.ndarray | dict[int, np.ndarray]]:
    """Calibration input for one image; a graph with a bank-extension input gets the empty (one pad row) extension,
    so the calibration sees what a bundle serves before any false alarm is taught."""
    if len(model.inputs) == 1:
        return lambda image: image[np.newaxis]
    pad = np.full((1, model.inputs[1].get_partial_shape()[1].get_length()), EXTENSION_PAD, np.float32)
    return lambda image: {0: image[np.newaxis], 1: pad}
