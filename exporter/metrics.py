"""Localisation metrics: pixel AUROC and AUPRO over the test images that have pixel ground truth.

AUPRO (Bergmann et al., MVTec AD) is the field's standard localisation metric: every
connected defect region counts equally, however small, so one large defect cannot hide
a missed small one as it can in pixel AUROC.  For each threshold, PRO is the mean over
all ground-truth regions of the share of the region's pixels at or above it, and FPR is
the share of defect-free pixels at or above it; AUPRO is the area under PRO(FPR) from 0
to ``fpr_limit`` (0.3), divided by ``fpr_limit``.
"""

from __future__ import annotations

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score

FPR_LIMIT = 0.3


def region_labels(masks: np.ndarray) -> np.ndarray:
    """8-connected components of every mask, numbered 1..R across the whole stack (0 = background)."""
    labels = np.zeros(masks.shape, np.int64)
    offset = 0
    for i, mask in enumerate(masks):
        count, components = cv2.connectedComponents((mask > 0).astype(np.uint8), connectivity=8)
        foreground = components > 0
        labels[i][foreground] = components[foreground] + offset
        offset += count - 1
    return labels


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = FPR_LIMIT) -> float | None:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit``; None without defect regions.

    Exact at every distinct score (one sort of all pixels, cumulative sums), not on a
    sampled threshold grid, so the value does not depend on a step count.
    """
    labels = region_labels(masks).reshape(-1)
    scores = maps.reshape(-1)
    n_regions = int(labels.max())
    background = labels == 0
    n_background = int(background.sum())
    if n_regions == 0 or n_background == 0:
        return None
    sizes = np.bincount(labels, minlength=n_regions + 1).astype(np.float64)
    # What each pixel adds to FPR and to mean PRO when the threshold drops to its score.
    fpr_step = background / n_background
    pro_step = np.where(background, 0.0, 1.0 / (sizes[labels] * n_regions))
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    fpr = np.cumsum(fpr_step[order])
    pro = np.cumsum(pro_step[order])
    # Tied scores cross the threshold together: keep the last index of every run of equal scores.
    last = np.append(sorted_scores[:-1] != sorted_scores[1:], True)
    fpr = np.concatenate([[0.0], np.minimum(fpr[last], 1.0)])
    pro = np.concatenate([[0.0], np.minimum(pro[last], 1.0)])
    end = int(np.searchsorted(fpr, fpr_limit, side="right"))  # fpr[:end] <= fpr_limit
    if end < len(fpr) and fpr[end - 1] < fpr_limit:
        f1, f2, p1, p2 = fpr[end - 1], fpr[end], pro[end - 1], pro[end]
        fpr = np.append(fpr[:end], fpr_limit)
        pro = np.append(pro[:end], p1 + (p2 - p1) * (fpr_limit - f1) / (f2 - f1))
    else:
        fpr, pro = fpr[:end], pro[:end]
    return float(np.trapezoid(pro, fpr) / fpr_limit)


def pixel_metrics(maps: np.ndarray, masks: list[np.ndarray | None], types: list[str]) -> dict:
    """Pixel AUROC and AUPRO over the images with pixel ground truth (``None`` mask = image label only).

    Good images have known ground truth (no defect pixel); a defect image without a mask
    cannot be scored per pixel and is left out, and the result says which types were.
    """
    keep = [i for i, m in enumerate(masks) if m is not None]
    unmasked = sorted({t for t, m in zip(types, masks, strict=True) if m is None})
    present = [m for m in masks if m is not None]
    truth = np.stack(present) if present else np.zeros((0, 1, 1), np.uint8)
    if not truth.any():
        reason = f"no masks for types {', '.join(unmasked)}" if unmasked else "no defect pixels in any mask"
        return {"pixel_auroc": None, "aupro": None, "pixel_metrics": f"absent: {reason}"}
    picked = maps[keep]
    scope = f"all {len(keep)} test images"
    if unmasked:
        masked = sorted({types[i] for i in keep} - {"good"})
        scope = (f"{len(keep)} of {len(masks)} test images: good and the types with masks ({', '.join(masked)}); "
                 f"left out, no masks: {', '.join(unmasked)}")
    area = aupro(picked, truth)  # not None: truth has defect pixels and (maps being 2-D) background
    return {
        "pixel_auroc": round(float(roc_auc_score(truth.reshape(-1), picked.reshape(-1))), 4),
        "aupro": round(area, 4) if area is not None else None,
        "pixel_metrics": scope,
    }
