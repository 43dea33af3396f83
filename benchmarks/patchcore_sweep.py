"""PatchCore settings side by side on a real category: backbone, layers, input size, coreset ratio, blur.

    python -m benchmarks.patchcore_sweep --config size=256 --config size=640,ratio=0.005
    python -m benchmarks.patchcore_sweep --config bb=efficientnet_lite1 --config size=640,sigma=4

Each ``--config`` is comma-separated ``key=value`` over the defaults of
``PatchcoreSettings`` (keys: ``bb``, ``layers`` as ``blocks.2+blocks.4``, ``size``, ``ratio``,
``sigma`` = a fixed map blur in px (``map_sigma``) instead of the default that scales with the input, ``rows`` =
``max_bank``, ``seed`` = another draw: other held-out normals, other synthetic anomalies, other coreset; ``score`` =
``image_score``, ``map_max`` or ``reweighted``; ``views`` = ``bank_views``, ``frame``, ``flips`` or ``d4``;
``screen`` = ``screen_rows``, the bank rows every patch meets, and ``refine`` the share of patches that meets them all;
``unrefined`` = ``bound`` or ``scaled``, what the other patches' distance is; ``pool`` = ``neighbourhood``, the
p x p feature cells averaged into each patch; ``align`` = ``map_alignment``, ``anomalib`` or ``centred``, where the map
puts each patch's distance; ``layeralign`` = ``layer_alignment``, ``anomalib`` or ``centred``, how the deeper layers meet
the first layer's grid;
``precision`` = ``torch`` (the default), ``f32`` or ``int8``: the graph converted to OpenVINO as ``exporter train``
converts it, INT8 quantised as ``--precision int8`` does, and run at f32 elsewhere).  Each is
fitted on the category's train split (minus the held-out normals, as ``exporter train`` does)
and scored on the test split with the torch export graph (``PatchcoreGraph``, which the parity
tests tie to the OpenVINO bundle) or its OpenVINO conversion: image AUROC, pixel AUROC over all test pixels, and pixel
AUROC per defect type (that type's images plus the good ones).  On the validation split it also counts the
benign variants of the held-out normals (``exporter.validation.BENIGN_KINDS``: exposure, focus, placement, ...)
that the bundle's image threshold, set on the clean held-out normals, would flag: the false alarms a setting
invites when good parts drift.  This is how the defaults were picked (docs/quality/README.md); the accuracy of
an exported bundle is ``exporter benchmark``'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from benchmarks.common import DATA, TORCH, header, md_table, openvino_ran
from bundle import InputSpec, prepare_image
from bundle.extension import Views
from exporter import backbones
from exporter.build import THRESHOLD_SIGMAS, VAL_FRACTION
from exporter.data import Category, load_category, prepare_mask, read_image, read_mask
from exporter.export import convert, extension_spec, image_threshold, input_spec
from exporter.metrics import aupro
from exporter.train.patchcore import IMAGE_SCORES, PatchcoreSettings, fit, to_tensor
from exporter.validation import BENIGN_KINDS, HARD_KINDS, KINDS, benign_variants, examples, natural_photos

log = logging.getLogger("benchmarks.patchcore_sweep")
KEYS = {"bb": "backbone", "layers": "layers", "size": "input_size", "ratio": "coreset_ratio", "sigma": "map_sigma",
        "rows": "max_bank", "seed": "seed", "score": "image_score", "views": "bank_views",
        "screen": "screen_rows", "refine": "refine", "unrefined": "unrefined", "pool": "neighbourhood",
        "align": "map_alignment", "layeralign": "layer_alignment"}


PRECISIONS = ("torch", "f32", "int8")


def parse(config: str) -> tuple[PatchcoreSettings, str]:
    """The settings a config names, and what runs the graph (``precision``)."""
    defaults = PatchcoreSettings()
    changes: dict = {}
    precision = "torch"
    for item in filter(None, config.split(",")):
        key, _, value = item.partition("=")
        if key == "precision":
            if value not in PRECISIONS:
                raise SystemExit(f"precision={value!r} in {config!r}: use one of {', '.join(PRECISIONS)}")
            precision = value
            continue
        if key not in KEYS:
            raise SystemExit(f"unknown key {key!r} in {config!r}; use {sorted(KEYS)}")
        field = KEYS[key]
        if field == "image_score" and value not in IMAGE_SCORES:
            raise SystemExit(f"score={value!r} in {config!r}: use one of {', '.join(IMAGE_SCORES)}")
        if field == "bank_views" and value not in {v.value for v in Views}:
            raise SystemExit(f"views={value!r} in {config!r}: use one of {', '.join(v.value for v in Views)}")
        changes[field] = value.split("+") if field == "layers" else float(value) if field == "map_sigma" else \
            int(value) if field in ("max_bank", "screen_rows") else type(getattr(defaults, field))(value)
    return dataclasses.replace(defaults, **changes), precision


Scorer = Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]]


def _torch_scorer(graph: torch.nn.Module, bb: backbones.Backbone) -> Scorer:
    def scores(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        out_scores, maps = [], []
        with torch.no_grad():
            for i in range(0, len(images), 4):
                s, m = graph(to_tensor(images[i : i + 4], bb))[:2]
                out_scores.append(s.numpy())
                maps.append(m.numpy())
        return np.concatenate(out_scores), np.concatenate(maps)

    return scores


def _openvino_scorer(graph: torch.nn.Module, spec: InputSpec, train: list[Path], precision: str) -> tuple[Scorer, str]:
    """The graph as a bundle holds it (INT8: calibrated on the fitting images, as ``exporter train`` does), run at
    f32 with its bank extension empty; and the precision OpenVINO ran (read back)."""
    import openvino as ov

    from bundle import EXTENSION_PAD
    from bundle.runtime import ran_precision
    from exporter.quantize import CALIBRATION_IMAGES, quantize

    model = convert(graph, spec)
    if precision == "int8":
        model = quantize(model, [read_image(p, spec) for p in train[:CALIBRATION_IMAGES]])
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
    ext = extension_spec(graph)
    feeds = {1: np.full((1, ext.feature_dim), EXTENSION_PAD, np.float32)} if ext is not None else {}

    def scores(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        out = [compiled({0: image[np.newaxis], **feeds}) for image in images]
        return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])

    ran = ran_precision(compiled)
    return scores, openvino_ran([ran], "f32") + (", INT8 backbone" if precision == "int8" else "")


def _metrics(score: np.ndarray, amap: np.ndarray, labels: np.ndarray, masks: np.ndarray, types: list[str]) -> dict:
    good = labels == 0
    per_type = {}
    for defect in sorted(set(types) - {"good"}):
        pick = good | np.array([t == defect for t in types])
        per_type[defect] = roc_auc_score(masks[pick].ravel(), amap[pick].ravel())
    return {"image": roc_auc_score(labels, score), "pixel": roc_auc_score(masks.ravel(), amap.ravel()),
            "aupro": aupro(amap, masks), "per_type": per_type}


def validation_set(cat: Category, seed: int, natural: Path | None,
                   kinds: tuple[str, ...] = KINDS) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Held-out normals (good) and one synthetic anomaly of each kind on each of them, at full resolution."""
    _, val = cat.split_train(VAL_FRACTION, seed)
    drawn = list(examples(val, seed, natural_photos(natural), kinds, benign=()))
    ordered = [e for e in drawn if e.mask is None] + [e for e in drawn if e.mask is not None]  # the normals first
    masks = [np.zeros(e.image.shape[:2], np.uint8) if e.mask is None else e.mask for e in ordered]
    return [e.image for e in ordered], masks, [e.kind for e in ordered]


def measure(data: Path, category: str, config: str, split: str, natural: Path | None,
            kinds: tuple[str, ...] = KINDS) -> dict:
    settings, precision = parse(config)
    cat = load_category(data, category)
    train, _ = cat.split_train(VAL_FRACTION, settings.seed)
    bb = backbones.resolve(settings.backbone)
    spec = input_spec(settings.input_size, bb.mean, bb.std)
    started = time.monotonic()
    graph, timings = fit(settings, bb, train, spec)
    fit_s = time.monotonic() - started
    scorer, ran = (_torch_scorer(graph, bb), TORCH) if precision == "torch" else \
        _openvino_scorer(graph, spec, train, precision)
    if split == "validation":
        full, full_masks, types = validation_set(cat, settings.seed, natural, kinds)
        images = [prepare_image(i, spec) for i in full]
        masks = np.stack([prepare_mask(m, spec) for m in full_masks])
    else:
        images = [read_image(x.path, spec) for x in cat.test]
        masks = np.stack([read_mask(x.mask, spec) for x in cat.test])
        types = [x.defect for x in cat.test]
    labels = np.array([t != "good" for t in types], dtype=int)
    score, amap = scorer(images)
    flagged: dict[str, int] = {}
    if split == "validation":
        threshold = image_threshold(score[labels == 0], THRESHOLD_SIGMAS)
        variants = benign_variants([i for i, t in zip(full, types, strict=True) if t == "good"], settings.seed)
        benign_scores, _ = scorer([prepare_image(v, spec) for _, v in variants])
        flagged = {k: int(sum(s >= threshold for (kind, _), s in zip(variants, benign_scores, strict=True) if kind == k))
                   for k in BENIGN_KINDS}
    return {"config": config or "defaults", "bank": timings["memory_bank"], "fit_s": fit_s,
            "coreset_s": timings["coreset_s"], "precision": ran, "sigma": settings.blur_sigma, "benign_flagged": flagged,
            "benign_total": int(labels.size - labels.sum()) * len(BENIGN_KINDS) if flagged else 0,
            **_metrics(score, amap, labels, masks, types)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--category", default="grid")
    ap.add_argument("--config", action="append", help="key=value,... over the defaults (repeatable)")
    ap.add_argument("--split", choices=("validation", "test"), default="validation",
                    help="validation: synthetic anomalies on the held-out normals (choose here); test: report once")
    ap.add_argument("--natural", type=Path, default=DATA.parent / "natural",
                    help="natural photos the Perlin anomalies are filled with (noise when absent)")
    ap.add_argument("--kinds", default=",".join(KINDS),
                    help=f"synthetic anomaly kinds of the validation split, comma-separated (default: %(default)s; "
                         f"subtler, in the texture's own material: {','.join(HARD_KINDS)})")
    args = ap.parse_args(argv)
    kinds = tuple(filter(None, args.kinds.split(",")))
    if unknown := set(kinds) - set(KINDS + HARD_KINDS):  # refused before the fit, not minutes into it
        ap.error(f"unknown anomaly kinds {sorted(unknown)}; choose from {','.join(KINDS + HARD_KINDS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    results = []
    for config in args.config or [""]:
        results.append(measure(args.data, args.category, config, args.split, args.natural, kinds))
        log.info("%s", results[-1])
    types = list(results[0]["per_type"])
    validation = args.split == "validation"
    print(header(*sorted({r["precision"] for r in results})) + "; fits: " + TORCH)
    print(f"{args.category}, {args.split} split" + (f" ({','.join(kinds)})" if validation else "") + "\n")
    print(md_table(["config", "bank rows", "blur sigma px", "fit s (coreset s)", "image AUROC", "pixel AUROC", "AUPRO"]
                   + [f"pixel {t}" for t in types]
                   + (["benign variants flagged", "flagged " + " / ".join(BENIGN_KINDS)] if validation else []),
                   [[r["config"], str(r["bank"]), f"{r['sigma']:g}", f"{r['fit_s']:.0f} ({r['coreset_s']:.0f})",
                     f"{r['image']:.4f}", f"{r['pixel']:.4f}", f"{r['aupro']:.4f}"]
                    + [f"{r['per_type'][t]:.4f}" for t in types]
                    + ([f"{sum(r['benign_flagged'].values())} of {r['benign_total']}",
                        " / ".join(str(r["benign_flagged"][k]) for k in BENIGN_KINDS)] if validation else [])
                    for r in results]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
