"""``python -m exporter benchmark``: train, export and evaluate each model on each category found; write a report.

Every number comes from the exported OpenVINO bundle (f32 inference precision, CPU) on the category's test
split, with the threshold the bundle chose from held-out normal training images.  The
torch graph is run on the same images to check parity: per-image scores within
:data:`SCORE_RTOL` and identical verdicts at the bundle's threshold.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bundle.runtime import CompiledBundle
from exporter.build import VAL_FRACTION, package
from exporter.data import DatasetError, find_categories, load_category, read_image, read_mask, summarise
from exporter.export import as_served
from exporter.families import Family, select
from exporter.report import check_report_folder, write_report
from exporter.thresholds import NORMALS
from exporter.train.patchcore import to_tensor

log = logging.getLogger(__name__)

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
    "toothbrush", "transistor", "wood", "zipper",
)
# Image AUROC the seed tutorial published for grid (the only category it reports).
SEED_IMAGE_AUROC = {("patchcore", "grid"): 0.979, ("efficientad", "grid"): 0.993}
SCORE_RTOL = 1e-3
BATCH = 8  # test images scored per inference call


@dataclass(frozen=True)
class First:
    """A defect type's first test image with the bundle's outputs: one tile of the report's heatmap grid."""

    image: np.ndarray
    anomaly_map: np.ndarray
    mask: np.ndarray
    score: float


def _bundle_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def run_one(data: Path, category: str, family: Family[Any], out: Path, settings: Any,
            precisions: list[str] | None = None) -> dict:
    """Train one model on one category, export it, and measure bundle metrics and torch parity."""
    started = time.monotonic()
    model = family.name
    trained = family.fit(data, category, settings, NORMALS)
    bundle_dir = package(trained, out / "bundles" / f"{category}-{model}", precisions=precisions,
                         then="its torch parity check, any later models and categories, and the report")
    compiled = CompiledBundle(bundle_dir, hint="LATENCY", precision="f32")  # parity with torch: f32 on every CPU
    manifest = compiled.manifest
    samples = trained.category.test
    firsts: dict[str, First] = {}  # each type's first test image, in the order the types first appear
    ov_parts, torch_parts = [], []
    served = as_served(trained.graph, trained.spec)
    request = compiled.create_request()
    for start in range(0, len(samples), BATCH):  # a batch at a time: no image or map of the split is held but a type's first
        images = [read_image(s.path, trained.spec) for s in samples[start : start + BATCH]]
        result = compiled.infer(np.stack(images), request)
        with torch.no_grad():
            torch_parts.append(served(to_tensor(images, trained.spec))[0].numpy())
        ov_parts.append(result.score)
        for offset, sample in enumerate(samples[start : start + BATCH]):
            if sample.defect not in firsts:
                firsts[sample.defect] = First(images[offset], result.anomaly_map[offset],
                                            read_mask(sample.mask, trained.spec), float(result.score[offset]))
    ov_scores, torch_scores = np.concatenate(ov_parts), np.concatenate(torch_parts)
    threshold = compiled.thresholds.image.threshold
    rel = np.abs(ov_scores - torch_scores) / np.maximum(np.abs(torch_scores), 1e-12)
    return {
        "model": model,
        "category": category,
        **manifest.metrics["test"],
        "other_precisions": {p: r.metrics.get("test", {}) for p, r in manifest.precisions.items() if p != "f32"},
        "seed_image_auroc": SEED_IMAGE_AUROC.get((model, category)),
        "train_s": manifest.training["total_s"],
        "benchmark_s": round(time.monotonic() - started, 1),
        "bundle_bytes": _bundle_bytes(bundle_dir),
        "bundle": str(bundle_dir),
        "training": {k: v for k, v in manifest.training.items() if k != "trained_images"},  # digests: the bundle's
        "parity": {
            "score_rtol": SCORE_RTOL,
            "max_relative_score_difference": float(rel.max()),
            "within_tolerance": bool((rel <= SCORE_RTOL).all()),
            "same_verdicts": bool(((ov_scores >= threshold) == (torch_scores >= threshold)).all()),
        },
        # For the plots only (not in the JSON): the bundle's scores and the labels (ROC), each type's first image.
        "_scores": ov_scores,
        "_labels": np.array([s.label for s in samples]),
        "_firsts": firsts,
        "_pixel": (compiled.thresholds.pixel.low, compiled.thresholds.pixel.threshold),
    }


def absent_categories(found: list[str], categories: list[str] | None) -> list[str]:
    """The categories asked for that ``found`` lacks; none asked for, the MVTec AD categories it lacks where it holds
    one at least (a partial download), else none: a data root of other categories lacks all 15, which says nothing."""
    asked = categories or (MVTEC_CATEGORIES if set(found) & set(MVTEC_CATEGORIES) else ())
    return list(dict.fromkeys(c for c in asked if c not in found))


def run(data: Path, models: list[str], out: Path, command: str, categories: list[str] | None = None,
        settings: dict[str, Any] | None = None, precisions: list[str] | None = None) -> Path:
    """Benchmark every model on every category found under ``data``; returns the Markdown report's path.

    ``command``: the command line as given, for the report.  ``settings`` maps a family's name to its settings; a
    family not in it uses its defaults.
    """
    families = select(dict.fromkeys(models))  # a name given twice was fitted twice, its row in the report twice
    given = settings or {}
    found = find_categories(data)
    # A category named with --categories is read in any layout train reads (labelled folders, a list): only the
    # MVTec AD ones and those with masks beside their images are found, and a named one was refused as not there.
    named = [c for c in categories or [] if c not in found and (Path(data) / c).exists()]
    chosen = list(dict.fromkeys(c for c in (categories or found) if c in found or c in named))
    if not chosen:
        raise ValueError(f"no requested category under {data} (found: {found})" if categories else
                         f"no category found under {data}: benchmark finds categories in the MVTec AD layout "
                         "(CATEGORY/train/good) or with masks beside their images; name categories in another layout "
                         "(labelled folders, a list) with --categories")
    absent = absent_categories(found + named, categories)
    check_report_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], []
    for category in chosen:
        try:  # the checks train makes before its fit (too few good images, files it cannot read), and its notes
            summary = summarise(load_category(data, category))
            problems = summary.problems()
            if not summary.category.test:  # every figure of a row is measured on it: fitted, it ended the whole run
                problems.append(f"no test images ({summary.category.split}): add test/good and test/<defect> images")
            for note in summary.notes():
                log.warning("benchmark: %s: %s", category, note.strip())
            # train's summary says it: the row's F1 and detection rates are at a threshold set on so few images
            if not problems and (few := NORMALS.warning(len(summary.category.split_train(VAL_FRACTION)[1]))):
                log.warning("benchmark: %s: %s", category, few.strip())
        except DatasetError as exc:
            problems = [str(exc)]
        for family in families:
            log.info("benchmark: %s on %s", family.name, category)
            try:
                if problems:
                    raise DatasetError("unusable data: " + "; ".join(problems))
                rows.append(run_one(data, category, family, out, given.get(family.name) or family.settings(), precisions))
            except DatasetError as exc:  # one category's bad data costs that category's row, not the whole run
                log.error("benchmark: %s on %s cannot be run: %s", family.name, category, exc)
                failed.append({"model": family.name, "category": category, "error": str(exc)})
    if not rows:
        raise DatasetError("no category could be benchmarked: " + "; ".join(f"{f['category']}: {f['error']}" for f in failed))
    return write_report(rows, out, data, absent, failed, command)
