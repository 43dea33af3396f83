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

import errno
import hashlib
import io
import json
import logging
import math
import os
import re
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal, NamedTuple

import cv2
import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)  # 1: thresholds for the reference precision only, no embedding space
MANIFEST = "bundle.json"
BUNDLE_FILES = ("model.xml", "model.bin")
PROVISIONAL = "provisional"
"""``thresholds.method`` of the manifest the exporter writes in its staging folder before thresholds are measured;
such a folder is left behind only by a run that was killed, and is never a bundle to serve."""

Precision = Literal["f32", "bf16", "f16", "int8"]
"""Inference precision of a compiled bundle.  ``f32``/``bf16``/``f16`` name OpenVINO's
``INFERENCE_PRECISION_HINT``; ``int8`` is a quantised (INT8) bundle whose other operations run in f32."""
PRECISIONS: tuple[Precision, ...] = ("f32", "bf16", "f16", "int8")

EXTENSION_PAD = 1e3
"""Every value of an unused bank-extension row.  The extension input has a fixed number of rows once compiled,
and the runtime fills the rows not in use with it; the graph puts a row of nothing but this value at infinite
distance (masked, so no f16/bf16 overflow), and it is far from any patch feature besides."""


_FRAME_SIZE = re.compile(r"[1-9][0-9]{0,5}x[1-9][0-9]{0,5}")
FLOAT32_MAX = float(np.finfo(np.float32).max)


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


OutputKey = Literal["score", "anomaly_map", "embedding"]
OUTPUTS: tuple[OutputKey, ...] = ("score", "anomaly_map", "embedding")


class Normalisation(_Strict):
    """Maps a raw score linearly so that ``low`` -> 0 and ``threshold`` -> 0.5 (clipped to 0..1).

    Both numbers come from held-out normal images (never test labels): ``low`` is
    their minimum, ``threshold`` the decision boundary.
    """

    low: float = Field(allow_inf_nan=False)
    threshold: float = Field(allow_inf_nan=False)  # NaN compares false: every frame would pass

    def __call__(self, raw: np.ndarray | float) -> np.ndarray | float:
        span = max(self.threshold - self.low, 1e-12)
        return np.clip(0.5 * (np.asarray(raw, dtype=np.float32) - self.low) / span, 0.0, 1.0)


class Thresholds(_Strict):
    """Decision thresholds on raw scores, and how they were chosen."""

    image: Normalisation
    pixel: Normalisation
    method: str

    @field_validator("image", "pixel")
    @classmethod
    def _low_below_threshold(cls, norm: Normalisation) -> Normalisation:
        """``low`` under ``threshold``, both and their span within float32 (the scores' arithmetic): ``low`` above
        the threshold published a flagged frame as score 0.0, and a span float32 cannot hold made every score NaN.
        The exporter writes neither; a manifest edited by hand or damaged can."""
        if not norm.low < norm.threshold:
            raise ValueError(f"low {norm.low:g} must be below threshold {norm.threshold:g}")
        if not max(abs(norm.low), abs(norm.threshold), norm.threshold - norm.low) <= FLOAT32_MAX:
            raise ValueError(f"low {norm.low:g} and threshold {norm.threshold:g} must lie within float32's range "
                             "(scores are computed in float32)")
        return norm


class PrecisionRecord(_Strict):
    """What was measured at export for one inference precision: thresholds on held-out normals and test metrics.

    bf16 and f16 move raw scores, so a threshold chosen in f32 is not the right one in bf16.
    """

    thresholds: Thresholds
    metrics: dict = Field(default_factory=dict, description="Test-split metrics at this precision (empty: not evaluated).")
    measured_on: str = Field(description="OpenVINO device name the thresholds were measured on (the CPU model).")


class ExtensionSpec(_Strict):
    """The bank extension (issue 17): rows declared normal after export, fed as a second input.

    The graph takes ``input`` [E, feature_dim] f32 (E >= 1, dynamic in the IR; unused rows = ``pad``) and, per
    frame, returns the ``candidates`` patch features farthest from the memory bank (``candidates_output``
    [N, K, feature_dim]) and their distances after the extension (``candidate_scores_output`` [N, K]).  A
    false alarm is taught by adding its candidates (those above the pixel threshold, say) to the extension.
    """

    input: str = "extension"
    feature_dim: int = Field(gt=0, description="C: the patch-feature (memory-bank row) dimension.")
    candidates: int = Field(gt=0, description="K: patches per frame compared with the extension and returned.")
    candidates_output: str = "candidates"
    candidate_scores_output: str = "candidate_scores"
    pad: float = Field(EXTENSION_PAD, description="Value of every entry of an unused extension row.")

    @field_validator("pad")
    @classmethod
    def _the_graphs_pad(cls, pad: float) -> float:
        """The graph masks rows of :data:`EXTENSION_PAD` itself, whatever the manifest says: the runtime filling unused
        rows with another value (NaN, 0) fed them as real patches, and an anomalous frame scored normal."""
        if pad != EXTENSION_PAD:
            raise ValueError(f"must be {EXTENSION_PAD:g} (bundle.EXTENSION_PAD, what the graph masks), not {pad!r}")
        return pad


MAX_TILES = 16  # tiles along one side of a frame
# The largest frame a worker takes unless told otherwise (limits.max_pixels, limits.max_frame_bytes): here, so that
# training can say when its images are larger than the frames a worker would take.
FRAME_MAX_PIXELS = 16_000_000
FRAME_MAX_BYTES = 8_000_000
# The formats a worker takes a frame in, by Pillow's name for the file's content (not its name) -> the worker's own
# name: here, so that training refuses images its worker would refuse as unsupported_format.
# TIFF: what machine-vision cameras save (often 16-bit grey), and what the exporter trains on; only its first page
# is read. WebP: what some camera bridges and browsers send.
# MPO: a JPEG carrying a second picture (a phone's HDR gain map, a stereo pair); its first is the photo, as OpenCV
# and the exporter read it.
# A frame whose proportions differ from every training image's by more than this factor is another picture once
# stretched to the input (a 16:9 camera on a model of square images): said, since its scores are not comparable.
ASPECT_TOLERANCE = 1.1
# Mean |B - G| + |G - R| of a picture in 8-bit levels (:func:`chroma`) below which it is grey: a grey picture saved
# in colour (JPEG) is rounded a level off.  A model whose every training image lay at twice this or more learned
# colour, and a grey frame (a camera set to a mono format) is another picture to it: said, as its scores are not
# comparable.
GREY_CHROMA = 1.0
# The fewest good images the exporter trains on: below this the fit and the held-out threshold images are too few
# to mean anything.  Here, so that a worker's capture export can say a camera has too few before training is tried.
MIN_TRAIN_IMAGES = 8
FRAME_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "BMP": "bmp", "TIFF": "tiff", "WEBP": "webp"}


def _tile_grid(v: tuple[int, int]) -> tuple[int, int]:
    if not (1 <= v[0] <= MAX_TILES and 1 <= v[1] <= MAX_TILES):
        raise ValueError(f"cols and rows must be 1..{MAX_TILES}")
    return v


TileGrid = Annotated[tuple[int, int], AfterValidator(_tile_grid)]
"""Tiles across and down, [cols, rows], each 1..16: a bundle's and a camera's tiling."""


class TilingSpec(_Strict):
    """The model was trained on tiles, not whole frames: the caller cuts a frame as :func:`bundle.tiling.cut` does
    (resized once with ``INTER_AREA`` to a canvas on which ``grid`` tiles of the input size overlap by ``overlap``)
    and scores it as its highest tile, so each tile shows the model the scale it learnt."""

    grid: TileGrid = Field(description="Tiles across and down [cols, rows], each 1..16.")
    overlap: float = Field(0.1, ge=0, lt=0.5, description="Fraction of a tile shared with its neighbour.")


def plain_name(value: str, what: str) -> str:
    """``value`` when a folder can be named after it, one plain path component (a path such as ``../x`` would put
    the folder elsewhere); ValueError naming ``what`` it was to name."""
    if not 1 <= len(value) <= 200 or value.startswith(".") or any(c in value for c in "/\\\0"):
        raise ValueError(f"{value!r} cannot name {what}: 1..200 characters, no '/', '\\' or NUL, not starting with '.'")
    return value


def bundle_name(value: str) -> str:
    """``value`` when it can name a bundle: the worker names folders after it (its bank extension, its compiled
    cache); ``--name ../x`` would have put them outside their folders."""
    return plain_name(value, "a bundle")


class Manifest(_Strict):
    """``bundle.json``."""

    schema_version: int = SCHEMA_VERSION
    name: Annotated[str, AfterValidator(bundle_name)]
    version: str
    family: Literal["patchcore", "efficientad"]
    category: str
    created_at: str
    input: InputSpec
    outputs: dict[OutputKey, OutputSpec]
    embedding_dim: int = Field(gt=0)
    thresholds: Thresholds = Field(description="Thresholds of the reference precision (f32; int8 for INT8 bundles).")
    precisions: dict[Precision, PrecisionRecord] = Field(
        default_factory=dict, description="Per inference precision measured at export, the reference one included.")
    embedding_space: str = Field("", description="Embeddings are comparable only within one space "
                                                 "(family/backbone/layers/pooling); empty in schema 1 bundles.")
    training: dict = Field(description="Backbone, layers, sizes, coreset ratio, step budget, timings.")
    metrics: dict = Field(default_factory=dict, description="Measured at export on the category's test split.")
    versions: dict[str, str] = Field(description="Library versions used to train and export.")
    precision: Literal["FP32", "FP16", "INT8"] = "FP32"
    files: dict[str, str] = Field(description="sha256 of each file of the bundle except the manifest.")
    extension: ExtensionSpec | None = Field(None, description="The bank-extension input and candidate outputs "
                                                             "(PatchCore); None: the graph has the image input only.")
    tiling: TilingSpec | None = Field(None, description="How frames are cut into tiles for this model (trained on "
                                                       "tiles); None: a frame is scored whole.")

    @field_validator("outputs")
    @classmethod
    def _names_every_output(cls, outputs: dict[str, OutputSpec]) -> dict[str, OutputSpec]:
        """Every output is read from every frame: a manifest without one failed with a KeyError at the start (a
        traceback), at a reload (internal_error) and at each start after it was rolled out."""
        if missing := [key for key in OUTPUTS if key not in outputs]:
            raise ValueError(f"names no {', '.join(missing)} output (it needs {', '.join(OUTPUTS)})")
        return outputs

    @field_validator("training")
    @classmethod
    def _readable_training(cls, training: dict) -> dict:
        """The entries of ``training`` a worker reads (the rest is a record, left as written): of the kind the
        exporter writes, or the bundle is refused at load.  Refused rather than ignored: ignored, a damaged one
        would silently drop the warnings it feeds (``unlike_training``); read, ``chroma: 5`` and ``frame_sizes
        {"abc": 1}`` failed every frame with internal_error."""
        sizes = training.get("frame_sizes")
        if sizes is not None and not (isinstance(sizes, dict) and all(
                isinstance(k, str) and _FRAME_SIZE.fullmatch(k) and type(n) is int for k, n in sizes.items())):
            raise ValueError("training.frame_sizes must map \"<width>x<height>\" (positive integers) to image counts")
        chroma_range = training.get("chroma")
        if chroma_range is not None and not (isinstance(chroma_range, dict) and all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                for v in chroma_range.values())):
            raise ValueError("training.chroma must hold numbers (min, max)")
        folds = training.get("folds")
        if folds is not None and not (isinstance(folds, list) and all(isinstance(f, dict) for f in folds)):
            raise ValueError("training.folds must be a list of fold records")
        for key, kind in (("input_size", int), ("backbone", str)):
            if training.get(key) is not None and (type(training[key]) is not kind):
                raise ValueError(f"training.{key} must be {'an integer' if kind is int else 'text'}")
        return training

    @field_validator("files")
    @classmethod
    def _lists_the_model(cls, files: dict[str, str]) -> dict[str, str]:
        """The model's files are what is verified: a manifest that leaves one out would serve it unchecked; and each is
        a file of the bundle's own folder: ``../x`` or an absolute path was read and hashed wherever it pointed."""
        if missing := [name for name in BUNDLE_FILES if name not in files]:
            raise ValueError(f"files does not list {', '.join(missing)}: its sha256 is what a bundle is verified by")
        for name in files:
            plain_name(name, "a bundle file")
        return files

    @property
    def reference_precision(self) -> Precision:
        """The precision ``thresholds`` and ``metrics`` belong to: the bundle's own weights, other operations f32."""
        return "int8" if self.precision == "INT8" else "f32"

    def unlike_training(self, width: int, height: int, tiled: bool = False) -> str | None:
        """Why a ``width`` x ``height`` picture (a frame, or its roi) is not what the model was trained on, or None:
        proportions no training image had, or smaller than the input where no training image was (upscaled).  Both
        sides stretch alike, so nothing fails: the scores are just not comparable.  None for bundles that do not
        record their training images' sizes (``training.frame_sizes``, since exporters of 2026-12-04: the commonest, and
        since 2026-12-05 one of every other proportion and the narrowest and lowest too)."""
        sizes = [tuple(map(int, key.split("x"))) for key in self.training.get("frame_sizes") or {}]
        if not sizes or width <= 0 or height <= 0:
            return None
        trained = ", ".join(f"{w}x{h}" for w, h in sizes[:3]) + (" ..." if len(sizes) > 3 else "")
        if all(max(r := (width / height) / (w / h), 1 / r) > ASPECT_TOLERANCE for w, h in sizes):
            return (f"{width}x{height} has proportions none of the training images had ({trained}): stretched to the "
                    "model's input, it is another picture and scores higher; crop it to the training images' shape "
                    "(cameras.<id>.roi) or train on frames from this camera")
        spec = self.input
        if not tiled and (width < spec.width or height < spec.height) \
                and all(w >= spec.width and h >= spec.height for w, h in sizes):
            return (f"{width}x{height} is smaller than the model's {spec.width}x{spec.height} input, which no training "
                    f"image was ({trained}): upscaled, it is blurrier than what the model learned as normal")
        return None

    def unlike_training_colour(self, image: np.ndarray) -> str | None:
        """Why ``image`` (8-bit BGR, as the graph is fed) is not what the model learned, or None: a grey frame where
        every training image was in colour (``training.chroma``, since exporters of 2026-12-06; a model of grey images
        turns every frame grey itself, so colour is never unlike its training).  Its :func:`chroma` is read from
        every eighth row and column, and only for a model of colour images."""
        least = (self.training.get("chroma") or {}).get("min")
        if not isinstance(least, int | float) or least < 2 * GREY_CHROMA or chroma(image, 8) >= GREY_CHROMA:
            return None
        return (f"the frame is grey and every training image was in colour (their chroma from {least:g} levels): "
                "a camera set to a mono pixel format, or a grey bridge, shows the model another picture, which "
                "scores higher; send colour frames, or train on this camera's grey frames")

    def thresholds_for(self, precision: Precision) -> Thresholds | None:
        """Thresholds measured at ``precision``, or None when the bundle has none for it."""
        if precision in self.precisions:
            return self.precisions[precision].thresholds
        return self.thresholds if precision == self.reference_precision else None


def process_running(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (one of another user's too): whether a folder a run of the exporter or
    an export of the worker left is still being written.  A reused pid reads as running, which keeps a folder."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

log = logging.getLogger(__name__)


def make_folder(folder: Path, key: str) -> bool:
    """Make ``folder`` and its parents; False, said in the log, where the disk is full: most file systems (ext4; not
    tmpfs) need a block for a new folder, and a full disk must not stop inspection, so each part makes its folder
    again at its next write.  Any other error (a path below a file, a read-only mount) is raised."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        log.warning("%s: %s cannot be made (%s): nothing is kept there until the disk has room; inspection goes on",
                    key, folder, exc.strerror or exc)
        return False
    return True


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, manifest_fields: dict, files: tuple[str, ...] = BUNDLE_FILES) -> Manifest:
    """Checksum the bundle's own ``files`` and write ``bundle.json``; returns the validated manifest.

    Only named files are hashed: anything else in the folder (a log, an editor's backup) is not part of the bundle.
    """
    files_sha = {name: sha256_file(folder / name) for name in files}
    manifest = Manifest(**{**manifest_fields, "files": files_sha})
    # A bundle without an extension or tiling leaves the key out, so readers from before them (extra keys forbidden)
    # still read it; a tiled bundle is refused there rather than scored whole.
    omit = {key for key in ("extension", "tiling") if getattr(manifest, key) is None} or None
    (folder / MANIFEST).write_text(json.dumps(manifest.model_dump(mode="json", exclude=omit), indent=2) + "\n")
    return manifest


def read_manifest(folder: Path | str, verify: bool = True) -> Manifest:
    """Read and validate ``bundle.json``; with ``verify`` also check every file's sha256.

    Raises :class:`BundleError` naming the problem, so a half-copied or tampered
    bundle is refused before anything is compiled.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    try:
        if folder.is_file():
            raise BundleError(f"{folder} is a file: give the bundle's folder ({folder.parent}), not a file in it")
        if not folder.is_dir():
            raise BundleError(f"{folder}: no such folder (a model bundle is a folder holding {MANIFEST})")
        if not path.is_file():
            raise BundleError(f"{folder}: no {MANIFEST} (not a model bundle)")
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not JSON: {exc}") from exc
    except OSError as exc:  # a folder copied as root with the exporter's or cp's modes: not a traceback at start
        raise unreadable(path, exc) from exc
    # an integer, not true (== 1 to Python) nor 2.0
    if not isinstance(raw, dict) or type(raw.get("schema_version")) is not int \
            or raw["schema_version"] not in READABLE_SCHEMAS:
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        newer = " (a bundle from a newer exporter: update this software, or export the bundle with an exporter of " \
            "this version)" if type(version) is int and version > max(READABLE_SCHEMAS) else ""
        raise BundleError(f"{path}: schema_version {version!r}, this software reads "
                          f"{', '.join(map(str, READABLE_SCHEMAS))}{newer}")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:  # one line per problem, without pydantic's links
        errors = exc.errors()
        said = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in errors[:5])
        newer = " (fields this software does not know: written by a newer exporter?)" \
            if any(e["type"] == "extra_forbidden" for e in errors) else ""
        raise BundleError(f"{path}: invalid manifest: {said}{newer}") from exc
    if verify:
        for name, expected in manifest.files.items():
            verify_file(folder, name, expected)
    return manifest


def verify_file(folder: Path, name: str, expected: str, data: bytes | None = None) -> None:
    """Raise :class:`BundleError` unless ``folder/name`` is there with the sha256 ``expected`` (of ``data``, its
    bytes already read, where given)."""
    file = folder / name
    try:
        if data is None and not file.is_file():
            raise BundleError(f"{folder}: {name} is listed in {MANIFEST} but missing")
        actual = sha256_file(file) if data is None else hashlib.sha256(data).hexdigest()
    except OSError as exc:
        raise unreadable(file, exc) from exc
    if actual != expected:
        raise BundleError(f"{folder}: {name} does not match its sha256 in {MANIFEST}")


def unreadable(path: Path, exc: OSError) -> BundleError:
    """The error for a bundle file this process cannot read, naming the file, the reason and (permission denied:
    a bundle copied as root keeps modes only root may read) the user who must be able to read it."""
    reason = exc.strerror or str(exc)
    if isinstance(exc, PermissionError) and hasattr(os, "geteuid"):
        uid = os.geteuid()
        try:
            import pwd
            user = f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
        except (ImportError, KeyError):
            user = f"uid {uid}"
        reason += (f": the bundle's folder and files must be readable by {user}, which runs this "
                   "(e.g. chown -R that user, or chmod -R a+rX the bundle)")
    return BundleError(f"{path}: cannot be read ({reason})")


TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*")
# A TIFF's bits per sample that OpenCV decodes as the 8-bit colour training and the worker read (4-bit only as a
# palette's indexes).  10, 12 and 14 (a camera's packed samples) it reads only as stored; 2 and 4 not at all.
TIFF_SAMPLE_BITS = (1, 8, 16)


def _tiff_tags(data: bytes, *tags: int) -> tuple | None:
    """The values of ``tags`` in a TIFF's first directory (None for a tag it lacks), or None for other data and for a
    directory Pillow cannot read: one reader for the checks below, which both sides run on every TIFF."""
    if data[:4] not in TIFF_SIGNATURES:
        return None
    from PIL import TiffImagePlugin  # the worker's and the exporter's dependency, not the bundle's

    try:
        with warnings.catch_warnings():  # Pillow warns of a damaged directory on stderr, a line that names no frame
            warnings.simplefilter("ignore")
            directory = TiffImagePlugin.ImageFileDirectory_v2(ifh=data[:8])
            stream = io.BytesIO(data)
            stream.seek(directory.next)
            directory.load(stream)
            return tuple(directory.get(tag) for tag in tags)  # a tag's value is unpacked here: it may be damaged
    except Exception:  # Pillow raises many types for a damaged directory
        return None


def tiff_samples(data: bytes) -> str | None:
    """What a TIFF's first directory says its samples are (``"12-bit unsigned"``, ``"32-bit floating-point"``) where
    neither training nor the worker reads them: not unsigned, or of bits other than :data:`TIFF_SAMPLE_BITS`.  None
    for one they read, for other data and for a directory that cannot be read (the decoder says what is wrong).
    One rule for both sides: such a TIFF was answered as damaged or as no image by the worker, and passed the
    exporter's summary only to stop training on it."""
    if (tags := _tiff_tags(data, 258, 339, 262)) is None:  # bits per sample, sample format, photometric
        return None
    bits, formats, photometric = tags
    kinds = {1: "unsigned", 2: "signed integer", 3: "floating-point"}
    kind = {kinds.get(v, "undefined") for v in (formats if isinstance(formats, tuple) else (formats or 1,))}
    depths = set(bits if isinstance(bits, tuple) else (bits or 1,))
    if kind == {"unsigned"} and (depths <= set(TIFF_SAMPLE_BITS) or photometric == 3):  # 3: a palette
        return None
    return f"{max(depths)}-bit {' and '.join(sorted(kind))}"


_PHOTOMETRIC = {0: "grey", 1: "grey", 2: "RGB", 3: "palette", 5: "CMYK", 6: "YCbCr", 8: "CIELab"}
# What a layout's refusal says to do, on both sides (the worker's unsupported_format, the exporter's summary)
TIFF_LAYOUT_FIX = "save such a TIFF without its extra channel (alpha), with 8-bit samples, or as PNG"


def tiff_layout(data: bytes) -> str | None:
    """What a TIFF's first directory says its layout is (``"16-bit grey and alpha"``) where the frame's header reader
    (Pillow, which reads every frame's format, size and tags before it is decoded) does not open it, so the worker
    refuses it as a frame; None for a TIFF it opens, for other data and for a directory that cannot be read.  One rule
    for both sides: such a TIFF was answered ``not_an_image`` by the worker, and the exporter's summary called it a
    format (``unknown``) the worker refuses while it read it as 8-bit grey."""
    if data[:4] not in TIFF_SIGNATURES:
        return None
    from PIL import Image  # the worker's and the exporter's dependency, not the bundle's

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.open(io.BytesIO(data)).close()
        return None
    except Exception:  # Pillow raises many types: the directory below says what the layout is
        pass
    if (tags := _tiff_tags(data, 258, 262, 338)) is None:  # bits per sample, photometric, extra samples
        return None
    bits, photometric, extra = tags
    if bits is None or photometric is None:
        return None
    depth = max(bits) if isinstance(bits, tuple) else bits
    extras = extra if isinstance(extra, tuple) else () if extra is None else (extra,)
    names = ["alpha" if v in (1, 2) else "an extra channel" for v in extras]
    return " and ".join([f"{depth}-bit {_PHOTOMETRIC.get(photometric, f'photometric {photometric}')}", *names])


class JpegCutShort(ValueError):
    """A JPEG whose coded data ends before its picture does (:func:`decode_jpeg`)."""


# libjpeg-turbo's warnings for coded data that ends before the picture does, what is missing decoded as grey without
# an error: JWRN_HIT_MARKER (a marker, often the end-of-image marker a depacketiser closes a frame with after a lost
# fragment) and JWRN_JPEG_EOF (the bytes end)
_CUT_SHORT_WARNINGS = ("premature end of data segment", "premature end of jpeg file")


def _turned(image: np.ndarray, orientation: object) -> np.ndarray:
    """``image`` turned by an EXIF orientation (2-8) as OpenCV's IMREAD_COLOR turns it; as it is for any other."""
    if orientation == 2:
        return cv2.flip(image, 1)
    if orientation == 3:
        return cv2.rotate(image, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(image, 0)
    if orientation == 5:
        return cv2.transpose(image)
    if orientation == 6:
        return cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.flip(cv2.transpose(image), -1)
    if orientation == 8:
        return cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return image


def decode_jpeg(data: bytes, reduce: int = 1) -> np.ndarray | None:
    """A JPEG decoded to BGR by libjpeg-turbo (simplejpeg) as OpenCV's ``IMREAD_COLOR`` decodes it (the same pixels,
    its EXIF orientation applied; at 1/``reduce`` of its size as ``IMREAD_REDUCED_COLOR_<reduce>``), with its warnings
    heard: OpenCV passes none on, so a JPEG whose coded data ends before its picture did was read with the missing
    part grey.  Raises JpegCutShort for that; None where libjpeg-turbo warns otherwise (bytes between segments, which
    cameras write) or does not take it: then OpenCV decodes it, as before.  One decoder for frames and training."""
    import simplejpeg  # the worker's and the exporter's dependency, not the bundle's

    try:
        if reduce > 1:  # libjpeg's scaling: the smallest size of at least 1/reduce, which is 1/reduce
            height, width = simplejpeg.decode_jpeg_header(data)[:2]
            image = simplejpeg.decode_jpeg(data, colorspace="BGR", min_height=-(-height // reduce),
                                           min_width=-(-width // reduce), strict=True)
        else:
            image = simplejpeg.decode_jpeg(data, colorspace="BGR", strict=True)
    except ValueError as exc:
        if any(text in str(exc).lower() for text in _CUT_SHORT_WARNINGS):
            raise JpegCutShort(str(exc)) from None
        return None
    if b"Exif" not in data[:65536]:
        return image
    from PIL import ExifTags, Image  # the worker's and the exporter's dependency, not the bundle's

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            orientation = Image.open(io.BytesIO(data)).getexif().get(ExifTags.Base.Orientation)
    except Exception:  # Pillow raises many types for a damaged EXIF block: OpenCV reads it as it reads it
        return None
    return _turned(image, orientation)


def jpeg_cut_short(data: bytes) -> bool:
    """Whether ``data`` is a JPEG whose last scan is not followed by its end-of-image marker: cut short (a copy or
    a transfer that stopped).  libjpeg decodes such a file without an error, filling what is missing with grey,
    so the worker refuses the frame and the exporter the file.  Bytes after the marker are allowed: frames grabbed
    from an MJPEG stream often keep the multipart's line break, and some cameras append a trailer.  Inside a scan's
    coded data a 0xFF byte is always followed by 0x00 or a restart marker, so neither marker can appear there by
    chance.  A JPEG cut short and closed with an end marker (a depacketiser that drops a lost fragment and ends the
    frame) is told only where it has restart markers (:func:`_restarts_short`); without them, by decoding
    (:func:`decode_jpeg`)."""
    if not data.startswith(b"\xff\xd8"):
        return False
    end = data.rfind(b"\xff\xd9")
    return end < 0 or data.find(b"\xff\xda", end) >= 0 or _restarts_short(data)


_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # a marker that ends a scan's coded data
_RESTART = re.compile(rb"\xff[\xd0-\xd7]")


class JpegSegment(NamedTuple):
    """A marker segment of a JPEG: its marker, its payload ``data[start:end]``, and where the next marker is (after
    a scan's coded data, for a scan)."""

    marker: int
    start: int
    end: int
    next: int


def jpeg_segments(data: bytes) -> Iterator[JpegSegment]:
    """The marker segments of a JPEG's first picture, up to its end marker; one walk for every check that reads
    them (:func:`jpeg_cut_short`, the worker's scan count), so that they agree on fill bytes, markers without a length
    and where a scan's coded data ends.  Stops, without an error, where no marker is where one must be: the decoder
    says what is wrong."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0xD9:  # end of the (first) picture
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length
            at += 2
            continue
        start, end = at + 4, at + 2 + int.from_bytes(data[at + 2 : at + 4], "big")
        after = end
        if marker == 0xDA:  # the scan's coded data follows its header, up to the next marker
            found = _SCAN_END.search(data, end)
            after = found.start() if found else len(data)
        yield JpegSegment(marker, start, end, after)
        at = after


def _restarts_short(data: bytes) -> bool:
    """Whether a sequential JPEG with a restart interval (DRI) has fewer restart markers in its first scan than its
    picture's MCUs need: the scan was cut short, and an end marker written after it.  libjpeg fills the rest with
    grey and says so only on stderr.  A cut within the last interval, or in a JPEG without restart markers (most), is
    not told; a progressive or lossless one is not checked."""
    width, height, interval = 0, 0, 0
    factors: dict[int, tuple[int, int]] = {}  # component id -> (horizontal, vertical) sampling factors
    for marker, start, end, after in jpeg_segments(data):
        body = data[start:end]
        if 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # progressive, lossless or arithmetic
            return False
        if marker in (0xC0, 0xC1) and len(body) >= 6:  # the frame header: size, components' sampling
            height, width = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big")
            factors = {body[6 + 3 * i]: (body[7 + 3 * i] >> 4, body[7 + 3 * i] & 15)
                       for i in range(body[5]) if 8 + 3 * i <= len(body)}
        elif marker == 0xDD and len(body) >= 2:
            interval = int.from_bytes(body[:2], "big")
        elif marker == 0xDA:
            ids = [body[1 + 2 * i] for i in range(body[0])] if body else []
            if not (interval and width and height and ids and all(i in factors for i in ids)):
                return False  # no restarts, or a height given after the scan (DNL): nothing to count
            hmax, vmax = max(h for h, _ in factors.values()) or 1, max(v for _, v in factors.values()) or 1
            if len(ids) == 1:  # one component's blocks
                h, v = factors[ids[0]]
                mcus = math.ceil(math.ceil(width * h / hmax) / 8) * math.ceil(math.ceil(height * v / vmax) / 8)
            else:
                mcus = math.ceil(width / (8 * hmax)) * math.ceil(height / (8 * vmax))
            restarts = len(_RESTART.findall(data, end, after))
            return restarts < math.ceil(mcus / interval) - 1
    return False


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_cut_short(data: bytes) -> bool:
    """Whether ``data`` is a PNG whose chunks end before its IEND chunk: cut short (a copy or a transfer that
    stopped).  libpng refuses such a file only when decoding, and writes a line to stderr that names no file, so the
    worker refuses the frame (``truncated_image``, as a JPEG cut short) and the exporter the file before OpenCV reads
    them.  Bytes after IEND are allowed, as after a JPEG's end."""
    if not data.startswith(PNG_SIGNATURE):
        return False
    at = len(PNG_SIGNATURE)
    while at + 8 <= len(data):
        end = at + 12 + int.from_bytes(data[at : at + 4], "big")  # length, type, data, CRC
        if end > len(data):
            return True
        if data[at + 4 : at + 8] == b"IEND":
            return False
        at = end
    return True


def png_damaged(data: bytes) -> str | None:
    """The first critical chunk (IHDR, PLTE, IDAT) of a PNG whose CRC does not match its bytes, or None: damaged on
    its way (a flipped bit).  libpng refuses such a file only when decoding, and writes a line to stderr that names
    no file ("IDAT: CRC error", or "bad adaptive filter value" before it reaches the CRC), so the worker refuses the
    frame (``corrupt_image``) and the exporter the file before OpenCV reads them.  Not a PNG, or one cut short
    (:func:`png_cut_short`): None."""
    if not data.startswith(PNG_SIGNATURE):
        return None
    at = len(PNG_SIGNATURE)
    while at + 12 <= len(data):
        length, kind = int.from_bytes(data[at : at + 4], "big"), data[at + 4 : at + 8]
        end = at + 12 + length
        if end > len(data) or kind == b"IEND":
            return None
        if kind[:1].isupper() and not _crc_matches(data, at, end):
            return kind.decode("latin-1")
        at = end
    return None


_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # a whole IEND chunk: no data, and its CRC


def _crc_matches(data: bytes, at: int, end: int) -> bool:
    """Whether the chunk ``data[at:end]`` (length, type, data, CRC) matches its CRC."""
    return zlib.crc32(memoryview(data)[at + 4 : end - 4]) == int.from_bytes(data[end - 4 : end], "big")


def quiet_png(data: bytes) -> bytes:
    """A PNG without what makes libpng write to stderr though its pixels are whole, a line per frame or training image
    that names none, which OpenCV's log level does not reach: its iCCP chunk (the embedded colour profile, which
    OpenCV does not apply; libpng warns about one that does not fit the image, an RGB profile on a grey PNG, a known
    bad sRGB profile), an ancillary chunk whose CRC does not match (a text or time chunk damaged on its way) and an
    IEND whose CRC does not match (put back whole).  A critical chunk that does not match is :func:`png_damaged`'s.
    The worker and the exporter both decode this (the same pixels).  Other data is returned as it is."""
    if not data.startswith(PNG_SIGNATURE):
        return data
    cuts: list[tuple[int, int, bytes]] = []  # (start, end, what goes in their place)
    at = len(PNG_SIGNATURE)
    while at + 12 <= len(data):
        length, kind = int.from_bytes(data[at : at + 4], "big"), data[at + 4 : at + 8]
        end = at + 12 + length  # length, type, data, CRC
        if end > len(data):  # cut short: png_cut_short's
            break
        if kind == b"iCCP" or ((kind == b"IEND" or not kind[:1].isupper()) and not _crc_matches(data, at, end)):
            cuts.append((at, end, _IEND if kind == b"IEND" else b""))
        if kind == b"IEND":
            break
        at = end
    if not cuts:
        return data
    parts, kept = [], 0
    for start, end, instead in cuts:
        parts += [data[kept:start], instead]
        kept = end
    return b"".join([*parts, data[kept:]])


def chroma(bgr: np.ndarray, step: int = 1) -> float:
    """How far an 8-bit BGR picture is from grey: the mean of |B - G| + |G - R| over its pixels (every ``step``-th
    row and column), in levels; 0 for a grey one (:data:`GREY_CHROMA`)."""
    if bgr.ndim == 2 or bgr.shape[2] == 1:
        return 0.0
    wide = bgr[::step, ::step, :3].astype(np.int16)
    return float((np.abs(wide[..., 0] - wide[..., 1]) + np.abs(wide[..., 1] - wide[..., 2])).mean())


def prepare_image(bgr: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Resize a decoded 8-bit BGR image to the graph's input size (HWC, uint8, contiguous)."""
    if bgr.ndim == 2:
        bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
    if bgr.shape[:2] != (spec.height, spec.width):
        bgr = cv2.resize(bgr, (spec.width, spec.height), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(bgr)
