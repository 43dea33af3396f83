"""Localisation metrics: pixel AUROC and AUPRO over the test images that have pixel ground truth.

AUPRO (Bergmann et al., MVTec AD) is the field's standard localisation metric: every
connected defect region counts equally, however small, so one large defect cannot hide
a missed small one as it can in pixel AUROC.  For each threshold, PRO is the mean over
all ground-truth regions of the share of the region's pixels at or above it, and FPR is
the share of defect-free pixels at or above it; AUPRO is the area under PRO(FPR) from 0
to ``fpr_limit`` (0.3), divided by ``fpr_limit``.

Both are exact at every distinct score (no sampled threshold grid) and are accumulated one
image at a time: only the scores are kept, in the maps' own dtype, and the defect-free ones
are sorted in place once, so a test split of thousands of images fits in memory where every
map, mask and sort index of the split held at once would not.
"""

from __future__ import annotations

import cv2
import numpy as np

FPR_LIMIT = 0.3
CHUNK = 1 << 22  # scores per vectorised step of the curves: bounds their temporaries, whatever the split's size


class PixelMetrics:
    """Pixel AUROC and AUPRO fed one image at a time; a ``None`` mask is a defect known by its image label only."""

    def __init__(self, fpr_limit: float = FPR_LIMIT) -> None:
        self.fpr_limit = fpr_limit
        self.regions = 0
        self._background: list[np.ndarray] = []
        self._joined: np.ndarray | None = None  # the background scores once sorted
        self._defect: list[np.ndarray] = []
        self._inverse_size: list[np.ndarray] = []  # per defect pixel: 1 / the size of its region
        self._masked: list[str] = []  # the type of every image with pixel truth
        self._unmasked: list[str] = []

    def add(self, anomaly_map: np.ndarray, mask: np.ndarray | None, defect_type: str = "") -> None:
        """Take one image's map and mask (non-zero = defect; its regions are the 8-connected components)."""
        if mask is None:
            self._unmasked.append(defect_type)
            return
        self._masked.append(defect_type)
        if self._joined is not None:  # an image added after a result: sort again with it
            self._background, self._joined = [self._joined], None
        count, components = cv2.connectedComponents((mask > 0).astype(np.uint8), connectivity=8)
        regions = components.reshape(-1)
        scores = np.asarray(anomaly_map).reshape(-1)
        self._background.append(scores[regions == 0])
        if count > 1:
            inside = regions > 0
            sizes = np.bincount(regions, minlength=count).astype(np.float64)
            self._defect.append(scores[inside])
            self._inverse_size.append(1.0 / sizes[regions[inside]])
            self.regions += count - 1

    def result(self) -> dict:
        """``pixel_auroc``, ``aupro`` and ``pixel_metrics``: which images they cover, or why they are absent."""
        unmasked = sorted(set(self._unmasked))
        if not self.regions:
            reason = f"no masks for types {', '.join(unmasked)}" if unmasked else "no defect pixels in any mask"
            return {"pixel_auroc": None, "aupro": None, "pixel_metrics": f"absent: {reason}"}
        background = self._sorted_background()
        if not background.size:
            return {"pixel_auroc": None, "aupro": None, "pixel_metrics": "absent: no defect-free pixel in any mask"}
        kept = len(self._masked)
        scope = f"all {kept} test images"
        if unmasked:
            masked = sorted(set(self._masked) - {"good"})
            scope = (f"{kept} of {kept + len(self._unmasked)} test images: good and the types with masks "
                     f"({', '.join(masked)}); left out, no masks: {', '.join(unmasked)}")
        defect, weight = self._sorted_defects()
        return {
            "pixel_auroc": round(_auroc(background, defect), 4),
            "aupro": round(_aupro(background, defect, weight, self.fpr_limit), 4),
            "pixel_metrics": scope,
        }

    def aupro(self) -> float | None:
        """Unrounded AUPRO; None without a defect region or without a defect-free pixel."""
        background = self._sorted_background()
        if not self.regions or not background.size:
            return None
        return _aupro(background, *self._sorted_defects(), self.fpr_limit)

    def _sorted_background(self) -> np.ndarray:
        """All defect-free scores, ascending: joined and sorted in place once, then kept as one array."""
        if self._joined is None:
            self._joined = np.concatenate(self._background) if self._background else np.zeros(0, np.float32)
            self._background = []
            self._joined.sort()
        return self._joined

    def _sorted_defects(self) -> tuple[np.ndarray, np.ndarray]:
        """Defect scores ascending, with each pixel's share of the mean PRO (1 / (region size * regions))."""
        defect = np.concatenate(self._defect)
        order = np.argsort(defect, kind="stable")
        return defect[order], np.concatenate(self._inverse_size)[order] / self.regions


def _auroc(background: np.ndarray, defect: np.ndarray) -> float:
    """Pixel AUROC as the Mann-Whitney statistic (ties count half): the area under the exact ROC curve."""
    below = ties = 0
    for start in range(0, defect.size, CHUNK):
        part = defect[start : start + CHUNK]
        low = np.searchsorted(background, part, side="left")
        high = np.searchsorted(background, part, side="right")
        below += int(low.sum())
        ties += int((high - low).sum())
    return (below + 0.5 * ties) / (defect.size * background.size)


def _aupro(background: np.ndarray, defect: np.ndarray, weight: np.ndarray, fpr_limit: float) -> float:
    """Trapezoid area under PRO(FPR) to ``fpr_limit``, walking the distinct defect-free scores from the top.

    FPR moves only at a defect-free score ``v``: from (#background > v) to (#background >= v) over their count,
    while PRO moves from the weight of the defects above ``v`` to that of the defects at or above it (defect-only
    scores in between add no area). The segment crossing ``fpr_limit`` is cut there by linear interpolation.
    """
    n = background.size
    above = np.append(np.cumsum(weight[::-1])[::-1], 0.0)  # above[i]: PRO once the threshold reaches defect[i]
    area, end = 0.0, n
    while end > 0:
        start = int(np.searchsorted(background, background[max(0, end - CHUNK)], side="left"))  # ties stay whole
        part = background[start:end]
        first = np.flatnonzero(np.append(True, part[1:] != part[:-1]))  # where each distinct score begins
        values = part[first]
        at_or_above = (n - end) + (part.size - first)
        fpr_high = np.minimum(at_or_above / n, 1.0)
        fpr_low = (at_or_above - np.diff(np.append(first, part.size))) / n
        pro_high = np.minimum(above[np.searchsorted(defect, values, side="left")], 1.0)
        pro_low = np.minimum(above[np.searchsorted(defect, values, side="right")], 1.0)
        inside = fpr_high <= fpr_limit
        area += float(np.sum((fpr_high - fpr_low)[inside] * (pro_high + pro_low)[inside]) / 2)
        crossing = np.flatnonzero(~inside & (fpr_low < fpr_limit))
        if crossing.size:
            i = crossing[0]
            cut = pro_low[i] + (pro_high[i] - pro_low[i]) * (fpr_limit - fpr_low[i]) / (fpr_high[i] - fpr_low[i])
            area += (fpr_limit - fpr_low[i]) * (pro_low[i] + cut) / 2
            break
        end = start
    return float(area / fpr_limit)


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = FPR_LIMIT) -> float | None:
    """AUPRO of a stack of maps against a stack of masks; None without defect regions or defect-free pixels."""
    metrics = PixelMetrics(fpr_limit)
    for anomaly_map, mask in zip(maps, masks, strict=True):
        metrics.add(anomaly_map, mask)
    return metrics.aupro()
