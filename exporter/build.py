"""data -> backbone -> fit -> export -> thresholds -> evaluate -> bundle folder."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import openvino as ov
import torch
from torch import nn

from bundle import (
    GREY_CHROMA,
    PRECISIONS,
    PROVISIONAL,
    InputSpec,
    Normalisation,
    Precision,
    PrecisionRecord,
    Thresholds,
    TilingSpec,
    bundle_name,
    write_manifest,
)
from bundle.runtime import CompiledBundle, supported_precisions
from exporter import backbones, stopping
from exporter.data import (
    Category,
    DatasetError,
    Sample,
    chroma_range,
    frame_sizes,
    hold_out_defects,
    load_category,
    read_frame,
    read_tiles,
    short_digest,
    tiling_of,
)
from exporter.evaluate import evaluate
from exporter.export import convert, extension_spec, input_spec, library_versions, output_specs, save_ir, timestamp
from exporter.quantize import CALIBRATION_IMAGES, quantize
from exporter.staging import refusal, remove_stale_staging, replaceable, staged
from exporter.thresholds import NORMALS, VAL_DEFECT_FRACTION, ThresholdChoice, choose_thresholds
from exporter.train import efficientad
from exporter.train.efficientad import EfficientAdSettings
from exporter.train.patchcore import PatchcoreSettings, fit

log = logging.getLogger(__name__)

VAL_FRACTION = 0.1
THRESHOLD_SIGMAS = 3.0


@dataclass
class Trained:
    """A fitted export graph and everything the bundle step needs to know about how it was made."""

    graph: nn.Module
    spec: InputSpec
    family: str
    category: Category
    train: list[Path]
    val: list[Path]  # held-out normals: thresholds (and EfficientAD's map quantiles)
    training: dict
    started: float = field(default_factory=time.monotonic)
    val_defects: list[Sample] = field(default_factory=list)  # labelled defects held out of test to set a threshold
    threshold: ThresholdChoice = field(default_factory=ThresholdChoice)
    tiling: TilingSpec | None = None  # trained on tiles: every image is cut as the worker cuts a tiled camera's frames


def _split(data: Path, category: str | None, seed: int, threshold: ThresholdChoice
           ) -> tuple[Category, list[Path], list[Path], list[Sample], dict]:
    """Train / held-out normals / test, plus the labelled defects a recall threshold is chosen on (out of test)."""
    cat = load_category(data, category, seed)
    val_defects: list[Sample] = []
    if threshold.needs_defects:
        cat, val_defects = hold_out_defects(cat, VAL_DEFECT_FRACTION, seed)
        if not val_defects:
            raise DatasetError(f"--threshold-mode {threshold.mode} needs labelled defect images, at least 2 of a type "
                               f"({VAL_DEFECT_FRACTION:g} of each type is held out of test to choose the threshold); "
                               f"{cat.root} has none to spare: add defects or use --threshold-mode normals or far")
    train, val = cat.split_train(VAL_FRACTION, seed)
    log.info("%s: %d train, %d held-out normals, %d held-out defects, %d test images", cat.name, len(train), len(val),
             len(val_defects), len(cat.test))
    record = {"data_layout": cat.layout, "test_split": cat.split, "seed": seed,
              **({"validation_defects": [cat.recorded(s.path) for s in val_defects]} if val_defects else {})}
    return cat, train, val, val_defects, record


def _colour(train: list[Path], val: list[Path]) -> tuple[bool, dict]:
    """Whether the graph is to turn frames grey (every image it learns normal from, and is thresholded on, is grey),
    and the record of the images' chroma (``training.chroma``: a worker says when a grey frame meets a model of
    colour images, :meth:`bundle.Manifest.unlike_training_colour`)."""
    span = chroma_range([*train, *val])
    if span is None:
        return False, {}
    grey = span[1] < GREY_CHROMA
    if grey:
        log.info("the training images are all grey: the bundle turns every frame grey before scoring it, so a colour "
                 "camera's frames (and its tint) are judged as the grey ones it learned")
    return grey, {"chroma": {"min": round(span[0], 2), "max": round(span[1], 2)}}


def fit_patchcore(data: Path, category: str | None, settings: PatchcoreSettings,
                  threshold: ThresholdChoice = NORMALS) -> Trained:
    started = time.monotonic()
    cat, train, val, val_defects, record = _split(data, category, settings.seed, threshold)
    bb = backbones.resolve(settings.backbone, Path(settings.backbone_weights) if settings.backbone_weights else None)
    grey, colour = _colour(train, val)
    spec = input_spec(settings.input_size, bb.mean, bb.std, grey)
    graph, timings = fit(settings, bb, train, spec)
    training = {
        **settings.as_dict(),
        **colour,
        "backbone_source": bb.timm_name if not bb.timm_name.startswith("local-dir:") else "offline weights",
        "backbone_weights_sha256": bb.weights_sha256,
        **timings,
        **record,
    }
    return Trained(graph, spec, "patchcore", cat, train, val, training, started, val_defects, threshold,
                   tiling_of(settings))


def fit_efficientad(data: Path, category: str | None, settings: EfficientAdSettings,
                    threshold: ThresholdChoice = NORMALS) -> Trained:
    """EfficientAD with a distilled (cached) or given teacher; nothing is downloaded."""
    started = time.monotonic()
    cat, train, val, val_defects, record = _split(data, category, settings.seed, threshold)
    grey, colour = _colour(train, val)
    spec = input_spec(settings.input_size, efficientad.MEAN, efficientad.STD, grey)
    graph, timings = efficientad.fit(settings, train, val, spec)
    return Trained(graph, spec, "efficientad", cat, train, val, {**settings.as_dict(), **colour, **timings, **record},
                   started, val_defects, threshold, tiling_of(settings))


def default_name(category: str, family: str) -> str:
    """The bundle's name without ``--name``, CATEGORY-MODEL, when it can name one (:func:`bundle.bundle_name`); else
    ValueError saying to give ``--name``: checked before the fit, since a folder named ``.set`` failed only when the
    manifest was written, after the whole fit and export."""
    try:
        return bundle_name(f"{category}-{family}")
    except ValueError as exc:
        raise ValueError(f"{exc} (the default name: the data's folder and the model): give one with --name") from None


def package(trained: Trained, out: Path, name: str | None = None, evaluate_test: bool = True,
            precision: str = "fp32", precisions: list[str] | None = None, then: str | None = stopping.REST) -> Path:
    """Export the graph, set thresholds on held-out images (``trained.threshold``) and measure the test split at
    every inference precision the CPU runs (``precisions`` limits them), write the manifest; returns ``out``.

    The bundle is built in a temporary folder beside ``out`` and renamed into place when complete, so a
    worker watching ``out`` never sees a half-written or provisional bundle.  ``then``: what the caller does after,
    said if a signal stops it there (None: nothing but printing ``out``; :func:`exporter.staging.staged`).
    """
    graph, spec, family, cat, val = trained.graph, trained.spec, trained.family, trained.category, trained.val
    category = cat.name
    with torch.no_grad():
        embedding_dim = int(graph(torch.zeros(1, 3, spec.height, spec.width))[2].shape[1])
    out = out.resolve()
    with staged(out, then) as staging:
        log.info("exporting to OpenVINO IR")
        model = convert(graph, spec)
        if precision == "int8":
            tiles = (t for p in trained.train for t in read_tiles(p, spec, trained.tiling))
            model = quantize(model, list(islice(tiles, CALIBRATION_IMAGES)))
        save_ir(model, staging)
        version = timestamp().replace(":", "").replace("-", "")
        name = name or default_name(category, family)
        fields: dict[str, Any] = dict(
            name=name,
            version=version,
            family=family,
            category=category,
            created_at=timestamp(),
            input=spec,
            outputs=output_specs(spec, embedding_dim),
            embedding_dim=embedding_dim,
            embedding_space=f"{family}/{trained.training.get('backbone', 'pdn')}/whitened by {name}@{version}",
            thresholds=Thresholds(image=Normalisation(low=0, threshold=1), pixel=Normalisation(low=0, threshold=1),
                                  method=PROVISIONAL),
            training={**trained.training, "train_images": len(trained.train), "threshold_images": len(val),
                      "frame_sizes": frame_sizes([*trained.train, *val]),
                      # fitted and held-out images: a test image with their bytes is counted (and evaluate tells it)
                      "trained_images": sorted({short_digest(p) for p in [*trained.train, *val]})},
            versions=library_versions(),
            precision=precision.upper(),
            extension=extension_spec(graph),
            tiling=trained.tiling,
        )
        write_manifest(staging, fields)  # provisional, in the staging folder only: the runtime reads the IR through it
        val_images = [read_frame(p, spec, trained.tiling) for p in val]
        defect_images = [read_frame(s.path, spec, trained.tiling) for s in trained.val_defects]
        evaluated = cat if evaluate_test and cat.test else None
        records = {p: measure_precision(staging, p, val_images, evaluated, defect_images, trained.threshold)
                   for p in precisions_to_measure(precision, precisions)}
        reference = records[next(iter(records))]
        fields["thresholds"] = reference.thresholds
        fields["precisions"] = records
        if reference.metrics:
            fields["metrics"] = reference.metrics
        elif not cat.test:
            fields["metrics"] = {"test": None, "not_evaluated": f"no test split ({cat.split})"}
            log.warning("not evaluated: the data has no labelled test images (%s)", cat.layout)
        fields["training"]["total_s"] = round(time.monotonic() - trained.started, 2)
        write_manifest(staging, fields)
    return out


def precisions_to_measure(weights: str, wanted: list[str] | None) -> list[Precision]:
    """The reference precision first, then each other one the CPU runs natively (or the ones asked for).  Called
    before the fit too: a precision asked for that cannot be measured was refused only after the whole fit."""
    supported = supported_precisions(ov.Core(), "CPU", weights.upper())
    if wanted is None:
        return supported
    if unknown := [p for p in wanted if p not in PRECISIONS]:
        raise ValueError(f"--precisions {', '.join(unknown)}: not an inference precision (of {', '.join(PRECISIONS)})")
    if other := [p for p in wanted if p in ("f32", "int8") and p != supported[0]]:
        raise ValueError(f"--precisions {other[0]}: {weights.upper()} weights run at {supported[0]}, not {other[0]}"
                         + (" (INT8 weights: train --precision int8)" if other[0] == "int8" else ""))
    if missing := [p for p in wanted if p not in supported]:
        raise ValueError(f"this CPU does not run {', '.join(missing)} natively (it runs {', '.join(supported)})")
    return [p for p in supported if p in wanted or p == supported[0]]


def measure_precision(folder: Path, precision: Precision, val_images: list, category: Category | None,
                      defect_images: list | None = None, threshold: ThresholdChoice = NORMALS) -> PrecisionRecord:
    """Thresholds from held-out images as ``threshold`` says, and the test metrics when ``category`` is given,
    at one precision."""
    compiled = CompiledBundle(folder, hint="LATENCY", precision=precision, require_thresholds=False)
    thresholds = choose_thresholds(compiled, val_images, defect_images or [], threshold, THRESHOLD_SIGMAS)
    metrics = {}
    if category is not None:
        test = evaluate(compiled, category, thresholds)
        metrics = {"test": test, "precision": precision,
                   "measured_by": f"OpenVINO runtime, {precision}, {compiled.device_name}"}
        log.info("test metrics at %s: %s", precision, test)
    return PrecisionRecord(thresholds=thresholds, metrics=metrics, measured_on=compiled.device_name)


def check_out(out: Path) -> None:
    """Refuse ``--out`` before any fit, where the bundle could not be moved there after it: a folder (or file) that
    is not a model bundle, or a place the exporter cannot write."""
    out = out.resolve()
    if not replaceable(out):
        raise ValueError(f"--out {refusal(out)}")
    above = next(p for p in out.parents if p.exists())
    if not above.is_dir():
        raise ValueError(f"--out {out}: {above} is a file, not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(prefix=f".{out.name}.check-{os.getpid()}-", dir=out.parent).cleanup()
    except OSError as exc:
        raise ValueError(f"--out {out}: the bundle cannot be written there ({exc.strerror or exc})") from None
    remove_stale_staging(out)  # before the fit: a bundle a killed run left set aside is served again at once


