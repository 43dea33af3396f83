"""Choose PatchCore's setting for the data at hand on its own validation split, then export the winner.

The defaults were chosen on grid's validation split (docs/quality/README.md), and a setting chosen on one
dataset need not carry over: on a second real dataset the 256 px setting ranked above the 640 px one that grid
preferred (issue 15).  ``exporter train --choose fast,default`` fits each named candidate as ``train`` would
(same split, same held-out normals), scores each on the validation split of this data (the held-out normals, one
synthetic anomaly of each kind on each, and one benign variant of each kind: exporter/validation.py), picks one
by :func:`pick` and exports it; the candidates' figures and the rule go into ``bundle.json``
(``training.chosen``).  The test split is not looked at until the winner is exported and evaluated.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from bundle import InputSpec, TilingSpec, prepare_image
from bundle.tiling import canvas_size, cut, paste, record
from exporter.build import THRESHOLD_SIGMAS, Trained, fit_patchcore
from exporter.data import prepare_mask
from exporter.export import as_served, image_threshold
from exporter.metrics import PixelMetrics
from exporter.thresholds import ThresholdChoice
from exporter.train.patchcore import PatchcoreSettings, to_tensor
from exporter.validation import BENIGN_KINDS, HARD_KINDS, KINDS, Example, examples, natural_photos

log = logging.getLogger(__name__)

# The named candidates, cheapest first: the settings each changes from PatchcoreSettings' defaults.
CANDIDATES: dict[str, dict[str, Any]] = {
    "fast": {"input_size": 256, "max_bank": 1500, "screen_rows": 0},  # the demo's, without its d4 views and Lite1
    "default": {},
    "fine": {"input_size": 640, "coreset_ratio": 0.005, "max_bank": 0, "screen_rows": 0},  # the old default
}
VALIDATION_KINDS = KINDS + HARD_KINDS  # the five kinds the defaults were chosen on
LEVEL = 0.005  # validation image AUROCs this close count as level
MAX_NORMALS = 50  # held-out normals the validation split is drawn on (the first of them): bounds its cost
FEW_NORMALS = 20  # below this many held-out normals the summary says the ranking is coarse
BATCH = 4
RULE = (f"the highest validation image AUROC; candidates within {LEVEL} of it are level, and among those the one "
        "that flags the fewest benign variants of the held-out normals at its own image threshold wins, then the "
        "cheaper (the order fast, default, fine)")


@dataclass
class Scored:
    """One candidate fitted and measured on the validation split."""

    name: str
    trained: Trained
    image_auroc: float
    pixel_auroc: float | None
    aupro: float | None
    benign_flagged: int
    benign_total: int
    fit_s: float

    def record(self) -> dict:
        settings = self.trained.training
        return {"name": self.name, "changes": CANDIDATES[self.name], "input_size": settings["input_size"],
                "memory_bank": settings.get("memory_bank"), "image_auroc": round(self.image_auroc, 4),
                "pixel_auroc": self.pixel_auroc, "aupro": self.aupro,
                "benign_flagged": self.benign_flagged, "benign_total": self.benign_total,
                "fit_s": round(self.fit_s, 1)}


def candidate_names(value: str) -> list[str]:
    """``fast,default`` -> the names in cost order; an unknown or single name is refused."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise ValueError(f"--choose: unknown candidates {unknown}; choose from {', '.join(CANDIDATES)}")
    if len(set(names)) < 2:
        raise ValueError(f"--choose needs at least two candidates, e.g. fast,default (of {', '.join(CANDIDATES)})")
    return [n for n in CANDIDATES if n in names]


def candidate_settings(base: PatchcoreSettings, given: Iterable[str], name: str) -> PatchcoreSettings:
    """The base settings with the candidate's changes; an option the user set that a candidate changes is refused
    (it would be silently overridden for that candidate)."""
    clash = sorted(set(given) & set(CANDIDATES[name]))
    if clash:
        flags = ", ".join("--" + c.replace("_", "-") for c in clash)
        raise ValueError(f"{flags} cannot be given with --choose: candidate {name!r} sets it ({CANDIDATES[name]})")
    return dataclasses.replace(base, **CANDIDATES[name])


def score(trained: Trained, natural: Path | None, kinds: tuple[str, ...] = VALIDATION_KINDS) -> Scored:
    """Image AUROC (held-out normals against their synthetic anomalies), pixel AUROC and AUPRO over them, and the
    benign variants flagged at the image threshold the held-out normals set, with the torch export graph as served
    (turning images grey first where the bundle will)."""
    spec, seed, tiling = trained.spec, int(trained.training["seed"]), trained.tiling
    graph = as_served(trained.graph, spec).eval()
    scores: dict[str, list[float]] = {"good": [], "anomalous": [], "benign": []}
    pixels = PixelMetrics()
    size = canvas_size(tiling, spec.width, spec.height) if tiling else (spec.width, spec.height)  # the map's
    blank = np.zeros((size[1], size[0]), np.uint8)
    batch: list[tuple[np.ndarray, Example]] = []  # the image prepared for the graph; the example's mask as read

    def flush() -> None:
        if tiling is None:
            with torch.no_grad():
                out = graph(to_tensor([image for image, _ in batch], spec))
            values, maps = list(out[0].numpy()), list(out[1].numpy())
        else:
            values, maps = map(list, zip(*(_tiled(graph, image, spec, tiling) for image, _ in batch), strict=True))
        for (_, example), value, anomaly_map in zip(batch, values, maps, strict=True):
            group = "benign" if example.benign else "good" if example.mask is None else "anomalous"
            scores[group].append(float(value))
            if group != "benign":
                pixels.add(anomaly_map, blank if example.mask is None else prepare_mask(example.mask, size),
                           example.kind)
        batch.clear()

    for example in examples(trained.val[:MAX_NORMALS], seed, natural_photos(natural), kinds):
        # Tiled: the canvas the worker's one resize makes (the tiles are cut from it), not the full-size image.
        image = prepare_image(example.image, spec) if tiling is None else cv2.resize(example.image, size, interpolation=cv2.INTER_AREA)
        batch.append((image, dataclasses.replace(example, image=blank)))
        if len(batch) == BATCH:
            flush()
    if batch:
        flush()
    good, anomalous = np.array(scores["good"]), np.array(scores["anomalous"])
    threshold = image_threshold(good, THRESHOLD_SIGMAS)
    auroc = roc_auc_score(np.r_[np.zeros(good.size), np.ones(anomalous.size)], np.r_[good, anomalous])
    result = pixels.result()
    return Scored("", trained, float(auroc), result["pixel_auroc"], result["aupro"],
                  int(sum(b >= threshold for b in scores["benign"])), len(scores["benign"]), 0.0)


def _tiled(graph: torch.nn.Module, frame: np.ndarray, spec: InputSpec, tiling: TilingSpec) -> tuple[float, np.ndarray]:
    """A frame as the worker scores it with a tiled bundle (bundle.tiling.see), by the torch graph: its highest
    tile's score and the tiles' maps merged on the canvas."""
    canvas, boxes = cut(frame, spec.width, spec.height, tiling)
    merged = np.full(canvas.shape[:2], -np.inf, np.float32)
    best = -np.inf
    for first in range(0, len(boxes), BATCH):
        chunk = boxes[first : first + BATCH]
        crops = [prepare_image(canvas[y : y + spec.height, x : x + spec.width], spec) for _, _, x, y in chunk]
        with torch.no_grad():
            out = graph(to_tensor(crops, spec))
        best = max(best, float(out[0].max()))
        for (_, _, x, y), anomaly_map in zip(chunk, out[1].numpy(), strict=True):
            paste(merged, anomaly_map, x, y, spec.width, spec.height)
    return best, merged


def pick(scored: list[Scored]) -> Scored:
    """:data:`RULE`, over candidates given in cost order."""
    best = max(s.image_auroc for s in scored)
    level = [s for s in scored if s.image_auroc >= best - LEVEL]
    fewest = min(s.benign_flagged for s in level)
    return next(s for s in level if s.benign_flagged == fewest)


def choose(data: Path, category: str | None, base: PatchcoreSettings, given: Iterable[str], names: list[str],
           threshold: ThresholdChoice, natural: Path | None) -> Trained:
    """Fit and score every candidate, pick one, and return it fitted with the choice recorded in its training."""
    given = list(given)
    settings = {n: candidate_settings(base, given, n) for n in names}  # every clash refused before the first fit
    scored: list[Scored] = []
    for i, name in enumerate(names, 1):
        log.info("candidate %s (%d of %d): fitting %s", name, i, len(names), CANDIDATES[name] or "the defaults")
        started = time.monotonic()
        trained = fit_patchcore(data, category, settings[name], threshold)
        fit_s = time.monotonic() - started
        log.info("candidate %s: scoring the validation split (%d held-out normals, %s anomalies, %s benign variants)",
                 name, min(len(trained.val), MAX_NORMALS), "+".join(VALIDATION_KINDS), "+".join(BENIGN_KINDS))
        result = dataclasses.replace(score(trained, natural), name=name, fit_s=fit_s)
        log.info("candidate %s: %s", name, result.record())
        scored.append(result)
    winner = pick(scored)
    table = [s.record() for s in scored]
    winner.trained.training["chosen"] = {
        "winner": winner.name, "rule": RULE, "candidates": table,
        "validation": {"normals": min(len(winner.trained.val), MAX_NORMALS), "kinds": list(VALIDATION_KINDS),
                       "benign_kinds": list(BENIGN_KINDS), "seed": int(winner.trained.training["seed"]),
                       "tiling": record(winner.trained.tiling),
                       "scored_by": f"torch export graph, f32, {torch.get_num_threads()} threads"}}
    print(summary(scored, winner), flush=True)
    return winner.trained


def summary(scored: list[Scored], winner: Scored) -> str:
    """The candidates side by side, as ``train --choose`` prints them before exporting the winner."""
    lines = ["validation split (held-out normals, synthetic anomalies, benign variants):",
             "  candidate  input  bank  image AUROC  pixel AUROC  AUPRO   benign flagged  fit s"]
    for s in scored:
        r = s.record()
        lines.append(f"{'*' if s is winner else ' '} {s.name:<9}  {r['input_size']:>5}  {r['memory_bank']!s:>5}  "
                     f"{r['image_auroc']:>11.4f}  {_figure(r['pixel_auroc']):>11}  {_figure(r['aupro']):>6}  "
                     f"{r['benign_flagged']:>5} of {r['benign_total']:<5}  {r['fit_s']:>5.0f}")
    lines.append(f"chosen: {winner.name} ({RULE})")
    normals = min(len(winner.trained.val), MAX_NORMALS)
    if normals < FEW_NORMALS:
        lines.append(f"note: only {normals} held-out normals: each moves the validation image AUROC by up to "
                     f"{1 / normals:.2f}, so close figures rank nothing; more good training images make the choice firmer")
    return "\n".join(lines)


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
