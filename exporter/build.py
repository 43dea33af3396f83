"""data -> backbone -> fit -> export -> thresholds -> evaluate -> bundle folder."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from bundle import Normalisation, Thresholds, write_manifest
from bundle.runtime import CompiledBundle
from exporter import backbones
from exporter.data import load_category, read_image
from exporter.evaluate import evaluate
from exporter.export import convert, input_spec, library_versions, output_specs, save_ir, score_images, thresholds_from_normals, timestamp
from exporter.train.patchcore import PatchcoreSettings, fit

log = logging.getLogger(__name__)

VAL_FRACTION = 0.1
THRESHOLD_SIGMAS = 3.0


def train_patchcore(data: Path, category: str, out: Path, settings: PatchcoreSettings, name: str | None = None,
                    evaluate_test: bool = True) -> Path:
    """Train PatchCore on ``data/category`` and write a bundle to ``out``; returns ``out``."""
    started = time.monotonic()
    cat = load_category(data, category)
    train, val = cat.split_train(VAL_FRACTION, settings.seed)
    log.info("%s: %d train, %d held-out normals, %d test images", category, len(train), len(val), len(cat.test))
    bb = backbones.resolve(settings.backbone, Path(settings.backbone_weights) if settings.backbone_weights else None)
    spec = input_spec(settings.input_size, bb.mean, bb.std)
    graph, timings = fit(settings, bb, train, spec)
    with torch.no_grad():
        embedding_dim = int(graph(torch.zeros(1, 3, spec.height, spec.width))[2].shape[1])
    log.info("exporting to OpenVINO IR")
    save_ir(convert(graph, spec), out)
    version = timestamp().replace(":", "").replace("-", "")
    fields = dict(
        name=name or f"{category}-patchcore",
        version=version,
        family="patchcore",
        category=category,
        created_at=timestamp(),
        input=spec,
        outputs=output_specs(spec, embedding_dim),
        embedding_dim=embedding_dim,
        thresholds=Thresholds(image=Normalisation(low=0, threshold=1), pixel=Normalisation(low=0, threshold=1),
                              method="provisional"),
        training={
            **settings.as_dict(),
            "backbone_source": bb.timm_name if not bb.timm_name.startswith("local-dir:") else "offline weights",
            "backbone_weights_sha256": bb.weights_sha256,
            "train_images": len(train),
            "threshold_images": len(val),
            **timings,
        },
        versions=library_versions(),
    )
    write_manifest(out, fields)
    compiled = CompiledBundle(out, hint="LATENCY")
    scores, maps, _ = score_images(compiled, [read_image(p, spec) for p in val])
    fields["thresholds"] = thresholds_from_normals(scores, maps, THRESHOLD_SIGMAS)
    write_manifest(out, fields)
    if evaluate_test and cat.test:
        compiled = CompiledBundle(out, hint="LATENCY")
        fields["metrics"] = {"test": evaluate(compiled, cat), "measured_by": "OpenVINO runtime, FP32, CPU"}
        log.info("test metrics: %s", fields["metrics"]["test"])
    fields["training"]["total_s"] = round(time.monotonic() - started, 2)
    write_manifest(out, fields)
    return out
