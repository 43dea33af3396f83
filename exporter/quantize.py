"""INT8 post-training quantisation of an exported bundle graph with NNCF.

Calibration uses normal training images only, prepared exactly as the worker feeds
them (uint8 NHWC BGR at the input size), because pre-processing is inside the graph.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import nncf
import numpy as np
import openvino as ov

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8")
# Operations quantised by default: anomalib's CNN feature extractor.  The heads (memory-bank
# distances, blur, score re-weighting, embedding normalisation) stay FP32: quantising their
# inputs breaks the output contract (embeddings no longer unit length) for little speed.
BACKBONE = r"feature_extractor"


def quantize(model: ov.Model, calibration_images: Sequence[np.ndarray], subset_size: int = 300,
             scope: str | None = BACKBONE) -> ov.Model:
    """INT8 copy of ``model`` (NNCF PTQ, mixed preset); ``calibration_images``: uint8 HWC BGR at the input size.

    Only operations whose friendly name matches the regex ``scope`` are quantised (``None``: all).
    """
    if not calibration_images:
        raise ValueError("INT8 quantisation needs at least one calibration image")
    dataset = nncf.Dataset(list(calibration_images), lambda image: image[np.newaxis])
    ignored = nncf.IgnoredScope(patterns=[f"^(?!.*(?:{scope})).*$"], validate=False) if scope else nncf.IgnoredScope()
    log.info("NNCF INT8 quantisation on %d calibration images (scope %s)", len(calibration_images), scope or "all")
    return nncf.quantize(model, dataset, preset=nncf.QuantizationPreset.MIXED,
                         subset_size=min(subset_size, len(calibration_images)), ignored_scope=ignored)
