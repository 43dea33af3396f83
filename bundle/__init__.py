"""The model bundle: the one contract between the exporter and the worker.

A bundle is a folder::

    bundle.json      the manifest below (schema_version, what the graph expects and returns)
    model.xml/.bin   OpenVINO IR

Both sides import this module; it needs only numpy, OpenCV and pydantic, so the
worker stays free of torch and anomalib.  What the graph does and what the caller
must do is written in the manifest, never assumed:

* the caller decodes the frame to 8-bit BGR and resizes it to ``input.height`` x
  ``input.width`` with OpenCV's ``INTER_AREA`` (:func:`prepare_image`);
* the graph takes ``uint8`` NHWC BGR, dynamic batch, and does colour conversion,
  scaling and normalisation itself (OpenVINO PrePostProcessor);
* the graph returns the raw image score, the raw anomaly map and an L2-normalised
  embedding; thresholds and normalisation live here, not baked into the graph,
  so they can be changed without re-exporting.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
MANIFEST = "bundle.json"


class BundleError(Exception):
    """A bundle that is missing, malformed, of another schema, or fails its checksums."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class InputSpec(_Strict):
    """What the caller feeds the graph."""

    name: str = "image"
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    element_type: Literal["u8"] = "u8"
    layout: Literal["NHWC"] = "NHWC"
    colour_order: Literal["BGR"] = "BGR"
    resize: Literal["cv2.INTER_AREA, outside the graph"] = "cv2.INTER_AREA, outside the graph"
    in_graph: list[str] = Field(description="Pre-processing steps the graph performs itself, in order.")
    mean: tuple[float, float, float] = Field(description="RGB mean on the 0..1 scale, applied in the graph.")
    std: tuple[float, float, float] = Field(description="RGB std on the 0..1 scale, applied in the graph.")


class OutputSpec(_Strict):
    """One named output of the graph and what it means."""

    name: str
    shape: list[int | str]
    meaning: str


class Normalisation(_Strict):
    """Maps a raw score linearly so that ``low`` -> 0 and ``threshold`` -> 0.5 (clipped to 0..1).

    Both numbers come from held-out normal images (never test labels): ``low`` is
    their minimum, ``threshold`` the decision boundary.
    """

    low: float
    threshold: float

    def __call__(self, raw: np.ndarray | float) -> np.ndarray | float:
        span = max(self.threshold - self.low, 1e-12)
        return np.clip(0.5 * (np.asarray(raw, dtype=np.float32) - self.low) / span, 0.0, 1.0)


class Thresholds(_Strict):
    """Decision thresholds on raw scores, and how they were chosen."""

    image: Normalisation
    pixel: Normalisation
    method: str


class Manifest(_Strict):
    """``bundle.json``."""

    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    family: Literal["patchcore", "efficientad"]
    category: str
    created_at: str
    input: InputSpec
    outputs: dict[Literal["score", "anomaly_map", "embedding"], OutputSpec]
    embedding_dim: int = Field(gt=0)
    thresholds: Thresholds
    training: dict = Field(description="Backbone, layers, sizes, coreset ratio, step budget, timings.")
    metrics: dict = Field(default_factory=dict, description="Measured at export on the category's test split.")
    versions: dict[str, str] = Field(description="Library versions used to train and export.")
    precision: Literal["FP32", "FP16", "INT8"] = "FP32"
    files: dict[str, str] = Field(description="sha256 of each file of the bundle except the manifest.")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, manifest_fields: dict) -> Manifest:
    """Checksum every file in ``folder`` and write ``bundle.json``; returns the validated manifest."""
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = Manifest(**{**manifest_fields, "files": files})
    (folder / MANIFEST).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return manifest


def read_manifest(folder: Path | str, verify: bool = True) -> Manifest:
    """Read and validate ``bundle.json``; with ``verify`` also check every file's sha256.

    Raises :class:`BundleError` naming the problem, so a half-copied or tampered
    bundle is refused before anything is compiled.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(f"{folder}: no {MANIFEST} (not a model bundle)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not JSON: {exc}") from exc
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(f"{path}: schema_version {raw.get('schema_version')!r}, this software reads {SCHEMA_VERSION}")
    try:
        manifest = Manifest.model_validate(raw)
    except ValueError as exc:
        raise BundleError(f"{path}: invalid manifest: {exc}") from exc
    if verify:
        for name, expected in manifest.files.items():
            file = folder / name
            if not file.is_file():
                raise BundleError(f"{folder}: {name} is listed in {MANIFEST} but missing")
            if sha256_file(file) != expected:
                raise BundleError(f"{folder}: {name} does not match its sha256 in {MANIFEST}")
    return manifest


def prepare_image(bgr: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Resize a decoded 8-bit BGR image to the graph's input size (HWC, uint8, contiguous)."""
    if bgr.ndim == 2:
        bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
    if bgr.shape[:2] != (spec.height, spec.width):
        bgr = cv2.resize(bgr, (spec.width, spec.height), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(bgr)
