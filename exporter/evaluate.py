"""Metrics of an exported bundle, computed by running the OpenVINO IR (not torch) on a test split."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score

from bundle import Thresholds
from bundle.runtime import CompiledBundle
from exporter.data import Category, read_frame, read_mask, short_digest
from exporter.export import score_images
from exporter.metrics import PixelMetrics

log = logging.getLogger(__name__)

BATCH = 8  # images scored per inference call


def evaluate(bundle: CompiledBundle, category: Category, thresholds: Thresholds | None = None) -> dict:
    """Image AUROC, F1 and per-type detection at the bundle threshold; pixel AUROC and AUPRO (at the graph's
    resolution, or the tiles' canvas for a bundle trained on tiles) over the images with pixel ground truth, or
    ``None`` with the reason when no defect has a mask.  A split of defects only has no image AUROC (``None``, the
    reason in ``image_metrics``) but its masks' pixels hold both classes; one of good images only has neither, and
    its figure is the false alarms.  ``good_flagged``: the good images at or above the threshold, named (a false
    alarm is looked at one by one), the highest score first.

    The threshold is the bundle's for the precision it was compiled at (``thresholds`` overrides it while
    the exporter is still measuring them).  The result names that precision and the device, and, where the bundle
    records its training images, how many test images have their bytes (``trained_test_images``).
    """
    spec = bundle.manifest.input
    samples = category.test
    trained = set(bundle.manifest.training.get("trained_images") or [])  # absent in bundles exported before
    if not samples:
        raise ValueError(f"{category.root}: no test images ({category.split}); evaluation needs labelled good and "
                         "defect images, or good images only for the false alarms (README: Training data)")
    labels = np.array([s.label for s in samples])
    both_classes = bool(0 < labels.sum() < len(labels))
    score_pixels = both_classes or any(s.mask is not None for s in samples)
    started = time.monotonic()
    request = bundle.create_request()
    tiling = bundle.manifest.tiling  # trained on tiles: each image scored as the worker scores a frame, maps merged
    pixels = PixelMetrics()
    parts = []
    for first in range(0, len(samples), BATCH):  # a batch at a time: neither the images nor the maps are all held
        batch = samples[first : first + BATCH]
        scores, maps, _ = score_images(bundle, [read_frame(s.path, spec, tiling) for s in batch], BATCH, request)
        parts.append(scores)
        for sample, anomaly_map in zip(batch, maps, strict=True) if score_pixels else ():
            pixels.add(anomaly_map, read_mask(sample.mask, spec, tiling) if sample.has_pixel_truth else None,
                       sample.defect)
        done = first + len(batch)
        if done == len(samples) or (done // BATCH) % 8 == 0:
            log.info("evaluate (%s): %d/%d test images", bundle.precision, done, len(samples))
    scores = np.concatenate(parts)
    elapsed = time.monotonic() - started
    threshold = (thresholds or bundle.thresholds).image.threshold
    predicted = (scores >= threshold).astype(int)
    result: dict = {
        "precision": bundle.precision,
        "device": bundle.device_name,
        "images": len(samples),
        "threshold": threshold,
        # undefined without a defect image (no true positive can exist): not 0, which reads as a model that missed all
        "image_f1": round(float(f1_score(labels, predicted, zero_division=0)), 4) if any(labels) else None,
        "seconds": round(elapsed, 2),
    }
    if trained:
        if copied := sum(short_digest(s.path) in trained for s in samples):
            log.warning("%d of %d test images are byte for byte images this bundle was trained on: the test figures "
                        "overstate the model", copied, len(samples))
        result["trained_test_images"] = copied
    if both_classes:
        result["image_auroc"] = round(float(roc_auc_score(labels, scores)), 4)
    else:
        log.warning("test split has only one class: AUROC undefined")
        result.update(image_auroc=None, image_metrics="image AUROC undefined: "
                      + ("no good test images" if labels.all() else "no defect test images"))
    if score_pixels:
        result.update(pixels.result())
    if good := [i for i, s in enumerate(samples) if s.defect == "good"]:  # the false alarms, each named
        flagged = sorted((i for i in good if predicted[i]), key=lambda i: -scores[i])
        result["good_flagged"] = {
            "count": len(flagged), "of": len(good), "fraction": round(len(flagged) / len(good), 4),
            "files": [{"path": category.recorded(samples[i].path), "score": round(float(scores[i]), 4)} for i in flagged],
        }
    types = sorted({s.defect for s in samples})
    result["detection_rate"] = {
        t: round(float(predicted[[i for i, s in enumerate(samples) if s.defect == t]].mean()), 4) for t in types
    }
    return result


def evaluate_folder(bundle_dir: Path, category: Category, device: str = "CPU", precision: str = "f32") -> dict:
    return evaluate(CompiledBundle(bundle_dir, device=device, hint="LATENCY", precision=precision), category)
