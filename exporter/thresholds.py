"""How the image threshold is chosen: from held-out normals (default), or for a target false-alarm rate or recall.

Every mode uses images the model was not trained on and that are not in the test split, so
the test metrics stay an honest estimate.  The pixel threshold always comes from the normals
(it only scales the heatmap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from bundle import Normalisation, Thresholds
from bundle.runtime import CompiledBundle
from exporter.export import score_images, thresholds_from_normals

VAL_DEFECT_FRACTION = 0.5  # share of each defect type held out of test to choose a recall threshold
FEW_NORMALS = 10  # the held-out normals a set of 40 good images gives (a quarter of a small set, up to 10)


@dataclass(frozen=True)
class ThresholdChoice:
    """``normals``: max(mean + k std, max) of held-out normals; ``far``: at most ``target`` of them flagged;
    ``recall``: at least ``target`` of held-out labelled defects flagged."""

    mode: Literal["normals", "far", "recall"] = "normals"
    target: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("normals", "far", "recall"):
            raise ValueError(f"unknown threshold mode {self.mode!r}; choose normals, far or recall")
        if self.mode != "normals" and not (self.target is not None and 0 < self.target < 1):
            raise ValueError(f"--threshold-mode {self.mode} needs a target in (0, 1): "
                             f"{'--target-far 0.01' if self.mode == 'far' else '--target-recall 0.95'}")

    @property
    def needs_defects(self) -> bool:
        return self.mode == "recall"

    def describe(self) -> str:
        """One line for the data summary: what the threshold will be chosen on."""
        if self.mode == "far":
            return f"lowest that flags at most {self.target:g} of the held-out normals"
        if self.mode == "recall":
            return (f"highest that flags at least {self.target:g} of a seeded {VAL_DEFECT_FRACTION:g} of each defect "
                    "type, which leaves the test split")
        return "max(mean + 3 std, max) of the held-out normals' scores"

    def warning(self, normals: int) -> str | None:
        """A line for the data summary where ``normals`` held-out normals are too few for this image threshold:
        a false-alarm target finer than they resolve is not met but set above them all, and a threshold from a
        handful of images moves with each of them; None where they suffice (recall: set on the defects)."""
        if self.mode == "far" and self.target is not None and math.floor(round(self.target * normals, 9)) < 1:
            return (f"  warning: --target-far {self.target:g} is finer than {normals} held-out normals resolve "
                    f"(1/{normals}): the image threshold is set just above the highest of them, a false-alarm rate "
                    "that is not measured; more good training images make it measurable")
        if self.mode != "recall" and normals < FEW_NORMALS:
            return (f"  warning: only {normals} held-out normals set the image threshold, so each of them moves it; "
                    f"more good training images make it firmer (a set of 40 holds out {FEW_NORMALS})")
        return None


def far_threshold(normal_scores: np.ndarray, target_far: float) -> float:
    """The lowest threshold at which at most ``floor(target_far * n)`` normals score at or above it."""
    ranked = np.sort(normal_scores)[::-1]
    allowed = math.floor(round(target_far * len(ranked), 9))  # 0.58 x 50 is 28.999999999999996 in floats
    return float(np.nextafter(ranked[allowed], np.inf)) if allowed < len(ranked) else float(ranked[-1])


def recall_threshold(defect_scores: np.ndarray, target_recall: float) -> float:
    """The highest threshold at which at least ``ceil(target_recall * n)`` defects score at or above it."""
    ranked = np.sort(defect_scores)[::-1]
    return float(ranked[math.ceil(round(target_recall * len(ranked), 9)) - 1])  # 0.56 x 25 is 14.000000000000002


def choose_thresholds(bundle: CompiledBundle, normals: list[np.ndarray], defects: list[np.ndarray],
                      choice: ThresholdChoice, sigmas: float) -> Thresholds:
    """Score the held-out images (prepared, as :func:`exporter.data.read_image` returns them) with the exported
    bundle and set its thresholds as ``choice`` says."""
    scores, maps, _ = score_images(bundle, normals)
    base = thresholds_from_normals(scores, maps, sigmas)
    if choice.mode == "normals" or choice.target is None:  # a target is set for far and recall (__post_init__)
        return base
    if choice.mode == "far":
        threshold = far_threshold(scores, choice.target)
        how = f"far: lowest image threshold with at most {choice.target:g} of {len(scores)} held-out normal " \
              f"training images at or above it"
    else:
        if not defects:
            raise ValueError("--threshold-mode recall needs held-out labelled defect images")
        defect_scores, _, _ = score_images(bundle, defects)
        threshold = recall_threshold(defect_scores, choice.target)
        how = f"recall: highest image threshold flagging at least {choice.target:g} of {len(defects)} labelled defect " \
              f"images held out of the test split (a seeded {VAL_DEFECT_FRACTION:g} of each type; listed in " \
              f"training.validation_defects); their recall there {float((defect_scores >= threshold).mean()):.3f}"
    far = float((scores >= threshold).mean())
    low = min(base.image.low, threshold - 1e-6)
    return Thresholds(
        image=Normalisation(low=low, threshold=threshold),
        pixel=base.pixel,
        method=f"{how}; false-alarm rate on the {len(scores)} held-out normals {far:.3f}. Pixel low/threshold: "
               "50th/99.99th percentile of the normals' anomaly-map pixels. No test labels used.",
    )


NORMALS = ThresholdChoice()  # the default: no labels needed
