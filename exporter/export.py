"""Torch graph -> OpenVINO IR with in-graph pre-processing -> bundle folder with thresholds and manifest."""

from __future__ import annotations

import logging
import platform
import shutil
import warnings
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import openvino as ov
import torch
from openvino.preprocess import ColorFormat, PrePostProcessor
from torch import nn

from bundle import EXTENSION_PAD, ExtensionSpec, InputSpec, Normalisation, OutputSpec, Thresholds
from bundle.runtime import CompiledBundle
from bundle.tiling import see
from exporter.train.grey import GREY_STEP, as_served

log = logging.getLogger(__name__)

OUTPUT_NAMES = ("score", "anomaly_map", "embedding")
IN_GRAPH_STEPS = [
    "u8 -> f32",
    "BGR -> RGB",
    "divide by 255, subtract mean, divide by std (as one mean/scale on the 0..255 scale)",
    "NHWC -> NCHW",
]


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "anomalib", "timm", "openvino", "nncf"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def input_spec(size: int, mean: tuple[float, float, float], std: tuple[float, float, float],
               grey: bool = False) -> InputSpec:
    """``grey``: the graph turns every frame grey first (:data:`GREY_STEP`), as a model that learned grey images
    only cannot judge colour: a colour camera's tint alone would flag every frame."""
    return InputSpec(height=size, width=size, in_graph=[*IN_GRAPH_STEPS, *([GREY_STEP] if grey else [])], mean=mean,
                     std=std)


def extension_spec(graph: nn.Module) -> ExtensionSpec | None:
    """The graph's bank-extension input and candidate outputs, or None for a graph without them (EfficientAD)."""
    spec = getattr(graph, "extension_spec", None)
    return spec() if callable(spec) else None


def convert(graph: nn.Module, spec: InputSpec) -> ov.Model:
    """Trace the graph with a dynamic batch (and, with an extension input, dynamic extension rows), its images turned
    grey first where ``spec`` says so, and fold pre-processing into the image input with PrePostProcessor."""
    image = torch.zeros(2, 3, spec.height, spec.width)
    shapes = [([-1, 3, spec.height, spec.width], ov.Type.f32)]
    names: tuple[str, ...] = OUTPUT_NAMES
    ext = extension_spec(graph)
    graph = as_served(graph, spec)
    with torch.no_grad(), warnings.catch_warnings():
        if not log.isEnabledFor(logging.DEBUG):  # -v shows them
            # Python values read from tensors (anomalib's constants, its map size) are traced as constants: right
            # here, since the graph's height and width are fixed by the input spec and only the batch varies.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if ext is None:
            model = ov.convert_model(graph, example_input=image, input=shapes)
        else:
            rows = torch.full((3, ext.feature_dim), EXTENSION_PAD)
            model = ov.convert_model(graph, example_input=(image, rows), input=[*shapes, ([-1, ext.feature_dim], ov.Type.f32)])
            model.inputs[1].get_tensor().set_names({ext.input})
            names = (*OUTPUT_NAMES, ext.candidates_output, ext.candidate_scores_output)
    for output, name in zip(model.outputs, names, strict=True):
        output.get_tensor().set_names({name})
    model.inputs[0].get_tensor().set_names({spec.name})
    ppp = PrePostProcessor(model)
    ppp.input(spec.name).tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC")).set_color_format(ColorFormat.BGR)
    ppp.input(spec.name).model().set_layout(ov.Layout("NCHW"))
    ppp.input(spec.name).preprocess().convert_element_type(ov.Type.f32).convert_color(ColorFormat.RGB).mean(
        [255.0 * m for m in spec.mean]
    ).scale([255.0 * s for s in spec.std])
    return ppp.build()


def output_specs(spec: InputSpec, embedding_dim: int) -> dict[str, OutputSpec]:
    return {
        "score": OutputSpec(name="score", shape=["N"], meaning="raw image anomaly score (higher = more anomalous)"),
        "anomaly_map": OutputSpec(
            name="anomaly_map", shape=["N", spec.height, spec.width],
            meaning="raw per-pixel anomaly score at input resolution",
        ),
        "embedding": OutputSpec(
            name="embedding", shape=["N", embedding_dim],
            meaning="L2-normalised descriptor for similarity search (cosine)",
        ),
    }


def image_threshold(scores: np.ndarray, sigmas: float) -> float:
    """The image threshold from held-out normal scores: mean + k*std, never below their maximum, and never at it
    either: a score at the threshold is flagged, and where every held-out score is the same (frames that do not
    change) the threshold would otherwise flag each frame like them."""
    top = np.asarray(scores, np.float32).max()
    return max(float(scores.mean() + sigmas * scores.std()), float(np.nextafter(top, np.float32(np.inf))))


def thresholds_from_normals(scores: np.ndarray, maps: np.ndarray, sigmas: float) -> Thresholds:
    """Thresholds from held-out normal images only: :func:`image_threshold`, and the map's percentiles."""
    image_thr = image_threshold(scores, sigmas)
    pixel_low, pixel_thr = np.quantile(maps, [0.5, 0.9999])
    return Thresholds(
        image=Normalisation(low=float(scores.min()), threshold=image_thr),
        pixel=Normalisation(low=float(pixel_low), threshold=float(max(pixel_thr, pixel_low + 1e-6))),
        method=(
            f"{len(scores)} held-out normal training images: image threshold = max(mean + {sigmas:g} std, max); "
            "pixel low/threshold = 50th/99.99th percentile of their anomaly-map pixels. No test labels used."
        ),
    )


def timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def save_ir(model: ov.Model, folder: Path) -> None:
    """Write ``model.xml`` + ``model.bin``; an OSError that names the folder and its free space where OpenVINO cannot
    (it says a failed write, e.g. a full disk, only as a C++ stream error: "basic_ios::clear: iostream error")."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        ov.save_model(model, str(folder / "model.xml"), compress_to_fp16=False)
    except RuntimeError as exc:
        free = shutil.disk_usage(folder).free
        raise OSError(f"cannot write the model to {folder} ({str(exc).strip()}): {free / 2**20:.0f} MB free on its "
                      "disk; a full disk, or a file size limit") from exc


def score_images(bundle: CompiledBundle, images: list[np.ndarray], batch: int = 8,
                 request: ov.InferRequest | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the compiled bundle over images as :func:`exporter.data.read_frame` reads them; returns (scores, maps,
    embeddings).  A bundle trained on tiles scores each image as the worker scores a frame (bundle.tiling.see: its
    highest tile, the maps merged on the tiles' canvas)."""
    request = request or bundle.create_request()
    if bundle.manifest.tiling is not None:
        seen = [see(bundle, request, image, bundle.manifest.tiling) for image in images]
        return (np.array([s.score for s in seen], np.float32), np.stack([s.anomaly_map for s in seen]),
                np.stack([s.embedding for s in seen]))
    parts = [bundle.infer(np.stack(images[i : i + batch]), request) for i in range(0, len(images), batch)]
    return (
        np.concatenate([p.score for p in parts]),
        np.concatenate([p.anomaly_map for p in parts]),
        np.concatenate([p.embedding for p in parts]),
    )
