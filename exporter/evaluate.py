"""Metrics of an exported bundle, computed by running the OpenVINO IR (not torch) on a test split."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score

from bundle import Thresholds
from bundle.runtime import CompiledBundle
from exporter.data import Category, read_image, read_mask
from exporter.export import score_images
from exporter.metrics import pixel_metrics

log = logging.getLogger(__name__)


def evaluate(bundle: CompiledBundle, category: Category, thresholds: Thresholds | None = None) -> dict:
    """Image AUROC, F1 and per-type detection at the bundle threshold; pixel AUROC and AUPRO (at the graph's
    resolution) over the images with pixel ground truth, or ``None`` with the reason when no defect has a mask.

    The threshold is the bundle's for the precision it was compiled at (``thresholds`` overrides it while
    the exporter is still measuring them).  The result names that precision and the device.
    """
    spec = bundle.manifest.input
    samples = category.test
    if not samples:
        raise ValueError(f"{category.root}: no test images ({category.split}); evaluation needs labelled good and "
                         "defect images (README: Training data)")
    started = time.monotonic()
    images = [read_image(s.path, spec) for s in samples]
    scores, maps, _ = score_images(bundle, images)
    elapsed = time.monotonic() - started
    labels = np.array([s.label for s in samples])
    threshold = (thresholds or bundle.thresholds).image.threshold
    predicted = (scores >= threshold).astype(int)
    result: dict = {
        "precision": bundle.precision,
        "device": bundle.device_name,
        "images": len(samples),
        "threshold": threshold,
        "image_f1": round(float(f1_score(labels, predicted, zero_division=0)), 4),
        "seconds": round(elapsed, 2),
    }
    if 0 < labels.sum() < len(labels):
        result["image_auroc"] = round(float(roc_auc_score(labels, scores)), 4)
        masks = [read_mask(s.mask, spec) if s.has_pixel_truth else None for s in samples]
        result.update(pixel_metrics(maps, masks, [s.defect for s in samples]))
    else:
        log.warning("test split has only one class: AUROC undefined")
    types = sorted({s.defect for s in samples})
    result["detection_rate"] = {
        t: round(float(predicted[[i for i, s in enumerate(samples) if s.defect == t]].mean()), 4) for t in types
    }
    return result


def evaluate_folder(bundle_dir: Path, category: Category, device: str = "CPU", precision: str = "f32") -> dict:
    return evaluate(CompiledBundle(bundle_dir, device=device, hint="LATENCY", precision=precision), category)
