"""A bundle on the validation split, and how its image-threshold rule behaves: the held-out normals' scores,
leave-one-out false alarms, and what each rule catches on the validation split (synthetic anomalies) and on
the test split.

A threshold rule is chosen on data that is not the test split: leave-one-out over the held-out normals
estimates a rule's false-alarm rate (threshold from n - 1 normals, is the last one flagged?), the synthetic
anomalies its recall. The test split's columns are reported, never used to choose.

    python -m benchmarks.thresholds --bundle DIR --data ../shared/data/mvtec --category grid
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from benchmarks.common import DATA, md_table
from benchmarks.patchcore_sweep import validation_set
from bundle import prepare_image
from bundle.runtime import CompiledBundle
from exporter.build import THRESHOLD_SIGMAS as SIGMAS
from exporter.build import VAL_FRACTION
from exporter.data import load_category, prepare_mask, read_image
from exporter.export import image_threshold, score_images
from exporter.metrics import aupro

Rule = Callable[[np.ndarray], float]
RULES: dict[str, Rule] = {
    f"max(mean + {SIGMAS:g} std, max) (the bundle's)": lambda s: image_threshold(s, SIGMAS),
    "max of the normals": lambda s: float(s.max()),
}


def leave_one_out(normals: np.ndarray, rule: Rule) -> int:
    """How many normals the rule flags when each is left out of the scores that set it."""
    return sum(int(normals[i] >= rule(np.delete(normals, i))) for i in range(len(normals)))


def caught(scores: np.ndarray, kinds: np.ndarray, threshold: float) -> str:
    return ", ".join(f"{k} {int((scores[kinds == k] >= threshold).sum())}/{int((kinds == k).sum())}"
                     for k in sorted(set(kinds.tolist())))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--category", default="grid")
    ap.add_argument("--natural", type=Path, default=DATA.parent / "natural",
                    help="natural photos the Perlin anomalies are filled with (noise when absent)")
    ap.add_argument("--precision", default="f32", choices=("f32", "bf16", "f16"), help="inference precision (always set)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    bundle = CompiledBundle(args.bundle, hint="LATENCY", precision=args.precision)
    spec, seed = bundle.manifest.input, int(bundle.manifest.training.get("seed", 0))
    cat = load_category(args.data, args.category)
    images, masks, kinds = validation_set(cat, seed, args.natural)  # the bundle's own held-out normals, then synthetic
    val_scores, val_maps, _ = score_images(bundle, [prepare_image(i, spec) for i in images])
    val_kinds = np.array(kinds)
    val_masks = np.stack([prepare_mask(m, spec) for m in masks])
    normals = val_scores[val_kinds == "good"]
    test_scores, _, _ = score_images(bundle, [read_image(s.path, spec) for s in cat.test])
    test_kinds = np.array([s.defect for s in cat.test])
    print(f"{args.bundle} at {bundle.precision} on {bundle.device_name}; {args.category}: {len(normals)} held-out normals "
          f"(split {VAL_FRACTION:g}, seed {seed}), scores mean {normals.mean():.4f} std {normals.std():.4f} "
          f"max {normals.max():.4f}")
    print(f"validation split (to compare bundles on): image AUROC {roc_auc_score(val_kinds != 'good', val_scores):.4f}, "
          f"pixel AUROC {roc_auc_score(val_masks.ravel() > 0, val_maps.ravel()):.4f}, "
          f"AUPRO {aupro(val_maps, val_masks):.4f}\n")
    rows = []
    for name, rule in RULES.items():
        threshold = rule(normals)
        rows.append([name, f"{threshold:.4f}", f"{leave_one_out(normals, rule)} of {len(normals)}",
                     caught(val_scores[val_kinds != "good"], val_kinds[val_kinds != "good"], threshold),
                     caught(test_scores, test_kinds, threshold)])
    print(md_table(["rule", "threshold", "normals flagged, leave-one-out", "validation: synthetic caught",
                    "test split (reported, not chosen on): flagged of each type"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
