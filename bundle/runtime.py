"""Run a bundle with the OpenVINO runtime: shared by the worker and by ``exporter evaluate``.

Evaluating through this module means the reported metrics are those of the
artefact the worker serves, not of the torch model it came from.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import numpy as np
import openvino as ov

from bundle import (
    BUNDLE_FILES,
    MANIFEST,
    PRECISIONS,
    PROVISIONAL,
    BundleError,
    ExtensionSpec,
    Manifest,
    Precision,
    Thresholds,
    make_folder,
    read_manifest,
    sha256_file,
    unreadable,
    verify_file,
)

log = logging.getLogger(__name__)

AUTO = "auto"
_CAPABILITY = {"bf16": "BF16", "f16": "FP16"}  # OPTIMIZATION_CAPABILITIES a device needs for a floating precision


def supported_precisions(core: ov.Core, device: str, weights: str = "FP32") -> list[Precision]:
    """Precisions ``device`` runs natively for a bundle with ``weights``; the reference one always comes first."""
    capabilities = set(core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
    first: Precision = "int8" if weights == "INT8" else "f32"
    return [first] + [p for p in ("bf16", "f16") if _CAPABILITY[p] in capabilities]


def device_name(core: ov.Core, device: str) -> str:
    try:
        return str(core.get_property(device, "FULL_DEVICE_NAME"))
    except RuntimeError:
        return device


class OutputError(BundleError):
    """The graph answered NaN or infinity: no verdict can be read from it (a broken export, or an overflow at a
    reduced precision); a NaN score would otherwise compare as below every threshold and pass as normal."""


def _check_finite(**arrays: np.ndarray | None) -> None:
    """Raise :class:`OutputError` naming every output that holds NaN or infinity (a max and a min find both)."""
    bad = [name for name, a in arrays.items()
           if a is not None and a.size and not (np.isfinite(a.max()) and np.isfinite(a.min()))]
    if bad:
        raise OutputError(f"the model answered NaN or infinity in its {', '.join(bad)}")


@dataclass(frozen=True)
class Prediction:
    """Outputs for a batch: raw scores [N], raw anomaly maps [N, H, W], embeddings [N, D]; for a bundle with a
    bank extension also the candidate patch features [N, K, C] and their distances after the extension [N, K]
    (the rows to add to the extension when the frame is declared a false alarm), else None."""

    score: np.ndarray
    anomaly_map: np.ndarray
    embedding: np.ndarray
    candidates: np.ndarray | None = None
    candidate_scores: np.ndarray | None = None
    extension_revision: int | None = None  # the revision of the extension these outputs were computed with (infer)


@dataclass(frozen=True)
class ExtensionState:
    """The extension rows in use (``count`` of them, then pad rows), the tensor that shares their memory, and the
    caller's revision of them (so a result can name the extension that really scored it)."""

    rows: np.ndarray
    count: int
    tensor: ov.Tensor
    revision: int = 0


def _eight_bit_dense_weights(model: ov.Model) -> bool:
    """Whether a dense convolution's INT8 weights use the 8th bit, which saturates 16-bit pair sums on CPUs without
    VNNI (exporter.quantize keeps them to 7 bits; depthwise convolutions, 5-D weights, do not sum pairs)."""
    return any(op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8
               and len(op.get_output_shape(0)) == 4 and int(np.abs(op.get_data().astype(np.int16)).max(initial=0)) > 64
               for op in model.get_ordered_ops())


def ran_precision(compiled: ov.CompiledModel) -> str:
    """The floating-point precision a compiled model really runs, read back from OpenVINO (not the one asked for)."""
    try:
        return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    except RuntimeError:  # a device without the property runs the IR's own precision
        return "f32"


BLOB_DIGEST = ".sha256"  # beside each blob that OpenVINO writes into a model cache: <blob>.blob.sha256


def drop_unverified_blobs(cache_dir: Path) -> bool:
    """Delete the compiled blobs in ``cache_dir`` that do not match the digest :func:`record_blobs` wrote after a
    compile, or have none (half written by a crash, or left by a version without digests); OpenVINO then compiles
    the model again.  OpenVINO reads a cached blob back without checking its bytes, so a bit that flips on the disk
    would change every score silently, where the bundle's own files are verified against its manifest.

    Returns whether the cache may be used: False where such a blob could not be deleted, or checked (a folder this
    process may not change or read), since OpenVINO would then serve it."""
    usable = True
    for blob in sorted(cache_dir.glob("*.blob")):
        digest = blob.with_name(blob.name + BLOB_DIGEST)
        try:
            recorded = digest.read_text().strip() if digest.is_file() else None
            if recorded is not None and recorded == sha256_file(blob):
                continue
            if recorded is not None:
                log.warning("model cache: %s does not match its digest (damaged on disk): compiling again", blob)
            blob.unlink(missing_ok=True)
            digest.unlink(missing_ok=True)
        except OSError as exc:
            usable = False
            log.warning("model cache: cannot check or delete %s (%s): compiling without the cache (%s) until it "
                        "can be, so that blob is not served", blob, exc, cache_dir)
    for digest in cache_dir.glob("*.blob" + BLOB_DIGEST):
        if not digest.with_name(digest.name.removesuffix(BLOB_DIGEST)).exists():
            with contextlib.suppress(OSError):  # a digest without its blob serves nothing
                digest.unlink(missing_ok=True)
    return usable


def record_blobs(cache_dir: Path) -> None:
    """Write the digest of each blob in ``cache_dir`` that has none yet (those the compile just wrote)."""
    for blob in sorted(cache_dir.glob("*.blob")):
        digest = blob.with_name(blob.name + BLOB_DIGEST)
        if digest.exists():
            continue
        tmp = digest.with_name(digest.name + ".tmp")
        try:
            tmp.write_text(sha256_file(blob) + "\n")
            tmp.replace(digest)
        except OSError as exc:  # e.g. a full disk: the blob is compiled again at the next start
            tmp.unlink(missing_ok=True)
            log.warning("model cache: cannot record the digest of %s (%s)", blob, exc)


def _key_cache_by(model: ov.Model, config: dict) -> None:
    """Make the compile ``config`` part of the model, so of its key in the model cache: the CPU plugin keys a cached
    blob by the graph and the CPU's name only, and a blob compiled at f16 keeps f16, so a bundle compiled at one
    precision was served the blob of another (a camera at f16 beside one at f32) while its results, and its
    thresholds, named the precision asked for."""
    for name, value in sorted(config.items()):
        model.set_rt_info(str(value), ["edge_inspect", "compile", name])


class CompiledBundle:
    """A verified bundle compiled for one device; hands out infer requests for concurrent use."""

    def __init__(self, folder: Path | str, device: str = "CPU", cache_dir: Path | None = None,
                 hint: str = "THROUGHPUT", verify: bool = True, batch: int | None = None,
                 precision: Precision | str = "f32", require_thresholds: bool = True,
                 extension_rows: int | None = None) -> None:
        """``batch`` fixes the batch size (the IR's is dynamic).  The worker serves one frame per request:
        a static shape is what the CPU plugin runs best, and requests then never reshape their input
        tensors; two requests reshaping at once were seen to hang inside OpenVINO 2026.4.

        ``precision`` is always set explicitly (``auto`` = the device's own default, resolved and recorded):
        OpenVINO's CPU plugin runs bf16 by default on CPUs with AMX or AVX512_BF16, so an unset hint gives
        other numbers on other machines.  The thresholds used are the ones the bundle measured at that
        precision; a bundle without them, or with the exporter's provisional ones, is refused
        (``require_thresholds``; only the exporter, measuring them, compiles without), since raw scores move with it.
        """
        self.folder = Path(folder)
        self.manifest: Manifest = read_manifest(self.folder, verify=False)  # the model's files: checked as read
        if verify:
            for name in sorted(set(self.manifest.files) - set(BUNDLE_FILES)):
                verify_file(self.folder, name, self.manifest.files[name])
        core = ov.Core()
        config: dict = {"PERFORMANCE_HINT": hint}
        if precision != AUTO:
            config["INFERENCE_PRECISION_HINT"] = self._hint_for(core, device, precision)
        if cache_dir is not None:
            if make_folder(Path(cache_dir), "model.cache_dir") and drop_unverified_blobs(Path(cache_dir)):
                core.set_property({"CACHE_DIR": str(cache_dir)})
            else:
                cache_dir = None
        model = self._read_model(core, verify)
        self.extension_spec: ExtensionSpec | None = self.manifest.extension
        declared = {self.manifest.input.name} | ({self.extension_spec.input} if self.extension_spec else set())
        found = {i.any_name for i in model.inputs}
        if found != declared:
            raise BundleError(f"{self.folder}: the graph's inputs {sorted(found)} are not the ones its manifest "
                              f"declares {sorted(declared)}")
        spec = self.manifest.input
        image = model.input(spec.name).get_partial_shape()
        taken = [image[i].get_length() if image.rank.is_static and image[i].is_static else None for i in (1, 2)]
        if None not in taken and taken != [spec.height, spec.width]:  # the graph's own size is static: it is the truth
            raise BundleError(f"{self.folder}: the graph takes {taken[1]}x{taken[0]} images, its manifest says "
                              f"{spec.width}x{spec.height} (bundle.json edited, or from another model): frames would be "
                              "resized to a size it was not trained at")
        self._check_outputs(model)
        shapes: dict[str, ov.PartialShape] = {}
        if batch is not None:
            shapes[spec.name] = ov.PartialShape([batch, spec.height, spec.width, 3])
        self.extension_capacity = 0
        if self.extension_spec is not None:
            self.extension_capacity = 1 if extension_rows is None else extension_rows
            if self.extension_capacity < 1:
                raise BundleError(f"extension_rows must be at least 1 (one pad row is the plain model), not {extension_rows}")
            shapes[self.extension_spec.input] = ov.PartialShape([self.extension_capacity, self.extension_spec.feature_dim])
        if shapes:
            model.reshape(shapes)
        if cache_dir is not None:
            _key_cache_by(model, config)
        self.compiled = core.compile_model(model, device, config)
        if cache_dir is not None:
            record_blobs(Path(cache_dir))
        self.optimal_requests = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.device_name = device_name(core, device)
        self.precision: Precision = self._effective_precision()
        asked = config.get("INFERENCE_PRECISION_HINT")
        if asked is not None and (ran := ran_precision(self.compiled)) != asked:
            # OpenVINO may substitute another precision for a hint (an f16 hint runs bf16 on a CPU without FP16
            # units): serving it would use thresholds, and report figures, of a precision nobody chose
            raise BundleError(f"{self.folder}: asked {precision}, but {device} ({self.device_name}) runs it at "
                              f"{ran}; ask for {ran} (or auto) to serve that")
        thresholds = self.manifest.thresholds_for(self.precision)
        if thresholds is None and require_thresholds:
            have = sorted({self.manifest.reference_precision, *self.manifest.precisions})
            raise BundleError(f"{self.folder}: no thresholds measured at {self.precision} (this bundle has "
                              f"{', '.join(have)}); run one of those, or re-export on a CPU that runs {self.precision}")
        self.thresholds: Thresholds = thresholds or self.manifest.thresholds
        if require_thresholds and self.thresholds.method == PROVISIONAL:
            raise BundleError(f"{self.folder}: its thresholds are provisional, not measured (an exporter's staging "
                              "folder, left by a run that was killed): every frame would be scored against them; "
                              "export the bundle again")
        self._warn_if_measured_elsewhere()
        if self.precision == "int8" and _eight_bit_dense_weights(model):
            record = self.manifest.precisions.get("int8")
            measured_on = record.measured_on if record is not None else "the exporting CPU"
            if measured_on != self.device_name:
                log.warning("%s: its INT8 layers have 8-bit weights (exported before 7-bit weights), which CPUs "
                            "without VNNI compute differently from CPUs with it; its thresholds were measured on %s, "
                            "not on this %s, so they may not hold here: export it again with "
                            "python -m exporter train --precision int8", self.folder, measured_on, self.device_name)
        outputs = self.manifest.outputs
        self._names: tuple[str, ...] = (outputs["score"].name, outputs["anomaly_map"].name, outputs["embedding"].name)
        self._extension: ExtensionState | None = None
        if self.extension_spec is not None:
            self._names += (self.extension_spec.candidates_output, self.extension_spec.candidate_scores_output)
            self.set_extension(np.zeros((0, self.extension_spec.feature_dim), np.float32))

    def _warn_if_measured_elsewhere(self) -> None:
        """Warn, once per compile, when bf16/f16 thresholds were measured on another CPU: reduced-precision kernels
        (AMX, AVX512_BF16, AVX512_FP16, ARM) round differently, so those thresholds may not hold on this one."""
        record = self.manifest.precisions.get(self.precision) if self.precision in _CAPABILITY else None
        if record is not None and record.measured_on != self.device_name:
            log.warning("%s: its %s thresholds were measured on %s, not on this %s, whose %s kernels may round "
                        "differently: they may not hold here (export it again on this CPU, or serve f32)",
                        self.folder, self.precision, record.measured_on, self.device_name, self.precision)

    def _check_outputs(self, model: ov.Model) -> None:
        """Refuse a graph whose outputs, or extension input, are not the ones its manifest names and sizes (where
        the graph's size is static), as a mismatched input size is: an output named wrong failed at the first
        inference (a traceback at start), an extension of another width in OpenVINO's reshape, and an
        ``embedding_dim`` other than the graph's made the store collection that size, refusing every frame's record."""
        m, ext = self.manifest, self.manifest.extension
        graph = {name: o.get_partial_shape() for o in model.outputs for name in o.get_names()}
        named = {f"outputs.{key}": spec.name for key, spec in m.outputs.items()}
        if ext is not None:
            named |= {"extension.candidates_output": ext.candidates_output,
                      "extension.candidate_scores_output": ext.candidate_scores_output}
        if missing := [f"{key} {name!r}" for key, name in named.items() if name not in graph]:
            raise BundleError(f"{self.folder}: the graph has no output named as its manifest's {', '.join(missing)} "
                              f"(its outputs: {', '.join(sorted(graph))}): bundle.json edited, or from another model")
        # (what, the graph's shape, the manifest's shape: an int is a size, anything else a dynamic axis)
        sizes: list[tuple[str, ov.PartialShape, list[int | str]]] = [
            (f"outputs.{key}", graph[spec.name], spec.shape) for key, spec in m.outputs.items()]
        sizes.append(("embedding_dim", graph[m.outputs["embedding"].name], ["N", m.embedding_dim]))
        if ext is not None:
            sizes += [("extension", model.input(ext.input).get_partial_shape(), ["E", ext.feature_dim]),
                      ("extension.candidates", graph[ext.candidates_output], ["N", ext.candidates, ext.feature_dim]),
                      ("extension.candidates", graph[ext.candidate_scores_output], ["N", ext.candidates])]
        for what, shape, declared in sizes:
            if shape.rank.is_static and shape.rank.get_length() != len(declared):
                raise BundleError(f"{self.folder}: the graph's {what} has {shape.rank.get_length()} axes, its "
                                  f"manifest says {declared}: bundle.json edited, or from another model")
            if shape.rank.is_static and any(isinstance(want, int) and shape[i].is_static
                                            and shape[i].get_length() != want for i, want in enumerate(declared)):
                raise BundleError(f"{self.folder}: the graph's {what} is {shape}, its manifest says {declared}: "
                                  "bundle.json edited, or from another model")

    def _read_model(self, core: ov.Core, verify: bool) -> ov.Model:
        """The graph from the bytes its manifest's checksums were compared with, read into memory: OpenVINO maps
        ``model.bin`` from its file by default, so a bundle copied over the served one changed its scores with no
        reload (and a copy caught half way ended the worker with SIGBUS), and a file swapped after the check was
        read unchecked."""
        data = {}
        for name in BUNDLE_FILES:
            try:
                data[name] = (self.folder / name).read_bytes()
            except FileNotFoundError:
                raise BundleError(f"{self.folder}: {name} is listed in {MANIFEST} but missing") from None
            except OSError as exc:
                raise unreadable(self.folder / name, exc) from exc
            if verify:
                verify_file(self.folder, name, self.manifest.files[name], data[name])
        self._weights = np.frombuffer(data["model.bin"], np.uint8)  # the graph's constants may share this memory
        try:
            return core.read_model(data["model.xml"].decode(), ov.Tensor(self._weights))
        except (RuntimeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{self.folder}: OpenVINO cannot read the model ({exc})") from exc

    def _hint_for(self, core: ov.Core, device: str, precision: str) -> str:
        if precision not in PRECISIONS:
            raise BundleError(f"unknown precision {precision!r}; choose from {', '.join((AUTO, *PRECISIONS))}")
        if precision == "int8" and self.manifest.precision != "INT8":
            raise BundleError(f"{self.folder}: precision int8 needs a quantised bundle "
                              "(python -m exporter train --precision int8); this one is " + self.manifest.precision)
        native = supported_precisions(core, device, self.manifest.precision)
        if precision in _CAPABILITY and precision not in native:
            raise BundleError(f"{device} ({device_name(core, device)}) does not run {precision} natively; "
                              f"it runs {', '.join(native)}")
        return "f32" if precision == "int8" else precision

    def _effective_precision(self) -> Precision:
        """What the compiled model really runs, read back from OpenVINO (not what was asked)."""
        hint = ran_precision(self.compiled)
        if hint not in ("bf16", "f16", "f32"):
            raise BundleError(f"{self.folder}: the device runs {hint}, which this software has no thresholds for")
        if hint == "f32" and self.manifest.precision == "INT8":
            return "int8"
        return cast(Precision, hint)

    def set_extension(self, rows: np.ndarray, revision: int = 0) -> None:
        """Use ``rows`` (float32 [e, C], e <= ``extension_capacity``; e = 0 empties it), the caller's ``revision``
        of them, as the bank extension from the next request on.  The rows are copied and padded with the
        manifest's pad value to the compiled capacity, and the new array replaces the old one in one assignment,
        so a request running concurrently uses either the old extension or the new one, whole."""
        ext = self.extension_spec
        if ext is None:
            raise BundleError(f"{self.folder}: this bundle ({self.manifest.family}) has no bank extension input")
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != ext.feature_dim:
            raise BundleError(f"extension rows must be [e, {ext.feature_dim}], not {list(rows.shape)}")
        if rows.shape[0] > self.extension_capacity:
            raise BundleError(f"{rows.shape[0]} extension rows exceed the compiled capacity of {self.extension_capacity} "
                              "(CompiledBundle(extension_rows=...))")
        if not np.isfinite(rows).all():
            raise BundleError("extension rows must be finite")
        self._extension = self.extension_state_of(rows, revision)

    def extension_state_of(self, rows: np.ndarray, revision: int = 0) -> ExtensionState:
        """An extension state holding ``rows`` (checked by :meth:`set_extension`), to score with (:meth:`infer`)
        without putting it to use: e.g. the bank alone, with no rows."""
        ext = self.extension_spec
        if ext is None:
            raise BundleError(f"{self.folder}: this bundle ({self.manifest.family}) has no bank extension input")
        full = np.full((self.extension_capacity, ext.feature_dim), ext.pad, np.float32)
        full[: rows.shape[0]] = rows  # shared with the requests' input tensors from here on: never changed in place
        return ExtensionState(full, int(rows.shape[0]), ov.Tensor(full, shared_memory=True), revision)

    @property
    def extension_count(self) -> int:
        """Extension rows in use (0 for an empty extension or a bundle without one)."""
        return self._extension.count if self._extension else 0

    def extension(self) -> np.ndarray | None:
        """The extension rows in use [e, C] (read-only), or None for a bundle without an extension input."""
        if self._extension is None:
            return None
        view = self._extension.rows[: self._extension.count]
        view.flags.writeable = False
        return view

    def inputs(self, images: np.ndarray) -> dict[int | str, np.ndarray | ov.Tensor]:
        """A request's inputs for ``images``: the images, and the current extension where the bundle has one."""
        return self._inputs(images)[0]

    @property
    def extension_state(self) -> ExtensionState | None:
        """The extension in use now, to score against later whatever set_extension does meanwhile (:meth:`infer`)."""
        return self._extension

    def _inputs(self, images: np.ndarray, state: ExtensionState | None = None
                ) -> tuple[dict[int | str, np.ndarray | ov.Tensor], int | None]:
        """The inputs and the revision of the extension among them (None without one), from one read of it, so
        the rows fed and the revision reported agree whatever set_extension does meanwhile."""
        ext = state or self._extension
        if ext is None or self.extension_spec is None:
            return {0: images}, None
        return {0: images, self.extension_spec.input: ext.tensor}, ext.revision

    def create_request(self) -> ov.InferRequest:
        """A request whose extension input already holds the current extension (never OpenVINO's uninitialised
        buffer), for a caller that feeds ``{0: images}`` only."""
        return self._with_extension(self.compiled.create_infer_request())

    def _with_extension(self, request: ov.InferRequest) -> ov.InferRequest:
        ext = self._extension
        if ext is not None and self.extension_spec is not None:
            request.set_tensor(self.extension_spec.input, ext.tensor)
        return request

    def infer(self, images: np.ndarray, request: ov.InferRequest | None = None,
              extension: ExtensionState | None = None) -> Prediction:
        """``images``: uint8 [N, H, W, 3] BGR at the bundle's input size (see :func:`bundle.prepare_image`); the
        prediction names the extension revision it was computed with: ``extension`` (an earlier
        :attr:`extension_state`), else the one in use."""
        request = request or self.create_request()
        inputs, revision = self._inputs(images, extension)
        request.infer(inputs)
        return replace(self.prediction(request), extension_revision=revision)

    def prediction(self, request: ov.InferRequest) -> Prediction:
        """Copy the outputs of a finished request (sync, or in an :meth:`async_queue` callback); raises
        :class:`OutputError` where one holds NaN or infinity."""
        score, amap, emb, *candidates = (request.get_tensor(name).data.copy() for name in self._names)
        _check_finite(score=score, anomaly_map=amap, embedding=emb, **dict(zip(("candidates", "candidate_scores"),
                                                                                 candidates, strict=False)))
        return Prediction(score.reshape(-1), amap, emb, *candidates)

    def async_queue(self, jobs: int = 0) -> ov.AsyncInferQueue:
        """``jobs`` requests (0 = the device's optimal number) run in OpenVINO's own threads, no Python thread each.

        ``queue.set_callback(fn(request, userdata))`` then ``queue.start_async(bundle.inputs(images), userdata)``
        (:meth:`inputs` adds the bank extension where the bundle has one); read outputs in the callback with
        :meth:`prediction`.
        """
        queue = ov.AsyncInferQueue(self.compiled, jobs or self.optimal_requests)
        for i in range(len(queue)):
            self._with_extension(queue[i])
        return queue
