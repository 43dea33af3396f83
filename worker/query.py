"""Similar-past-defect queries: one code path for MQTT request/response and the CLI.

A request names a past frame (``frame_id`` [+ ``camera``]) or carries an image
(``image_b64``); the answer lists the nearest logged frames with similarity,
metadata and a thumbnail (and heatmap, when the frame was anomalous).  A request with
neither lists the frames last received that match its filters (a console that starts
shows the defects logged before it).
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bundle.runtime import OutputError
from worker.decode import FrameError
from worker.evidence import EvidenceStore
from worker.recorder import StoreUnavailable
from worker.spaces import PAYLOAD_KEY
from worker.store import Filters, StoreError, VectorStore
from worker.wire import (
    ID_RULE,
    MAX_ID_LENGTH,
    CapturedAtField,
    ErrorCode,
    FrameIdField,
    RequestError,
    b64_image,
    check_same_capture,
    decode_json,
    error_answer,
    iso,
    parse_timestamp,
    parse_until,
    valid_id,
    validate,
)

log = logging.getLogger(__name__)
R = TypeVar("R", bound=BaseModel)  # the request model serve_request validates and hands on


class QueryFilters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cameras: list[str] = Field(default_factory=list, max_length=1000)
    anomalous_only: bool = Field(False, strict=True)
    since: str | float | None = None
    until: str | float | None = None

    @field_validator("cameras")
    @classmethod
    def _cameras(cls, v: list[str]) -> list[str]:
        """Camera ids, each once (a list that names one camera twice is about that camera: its model embeds an
        uploaded image); an id no camera can have ("" among them) matches nothing and is refused."""
        for camera in v:
            if not valid_id(camera):
                raise ValueError(f"{camera[:64]!r} is no camera id: {ID_RULE}")
        return list(dict.fromkeys(v))

    def to_filters(self) -> Filters:
        try:
            since = parse_timestamp(self.since) if self.since is not None else None
            until = parse_until(self.until) if self.until is not None else None
        except ValueError as exc:
            raise RequestError(ErrorCode.BAD_REQUEST, f"filters.since/until: {exc}") from None
        if since is not None and until is not None and since > until:  # answered ok with no hits, as if none matched
            raise RequestError(ErrorCode.BAD_REQUEST, f"filters.since ({self.since}) is after filters.until ({self.until})")
        return Filters(tuple(self.cameras), self.anomalous_only, since, until)


class QueryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    frame_id: FrameIdField | None = Field(None, max_length=MAX_ID_LENGTH)
    camera: str | None = Field(None, max_length=MAX_ID_LENGTH, description="Camera of frame_id, when frame ids repeat across cameras.")
    captured_at: CapturedAtField | None = None  # of frame_id, as its result said: not a later frame of a reused id
    image_b64: str | None = None
    top_k: int = Field(5, ge=1, strict=True)  # strict: "3", 3.0 and true are refused, not read as a number
    filters: QueryFilters = QueryFilters()
    include_heatmaps: bool = Field(True, strict=True)
    # a client whose MQTT v5 Maximum Packet Size is below an answer gets none (the broker drops it): it can ask less
    include_thumbnails: bool = Field(True, strict=True)

    @field_validator("frame_id", "camera")
    @classmethod
    def _named(cls, v: str | None) -> str | None:
        """An empty frame id or camera names none: refused, not looked up as a point no frame can have."""
        if v == "":
            raise ValueError("must not be empty (leave it out instead)")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> QueryRequest:
        if self.frame_id is not None and self.image_b64 is not None:
            raise ValueError("give one of frame_id or image_b64, not both (neither: the latest frames)")
        if self.captured_at is not None and (self.frame_id is None or self.camera is None):
            raise ValueError("captured_at names the capture of frame_id from camera: give both")
        if self.frame_id is None and self.image_b64 is None and self.camera is not None:
            raise ValueError("camera names the camera of frame_id or image_b64; the latest frames of a camera are "
                             "asked with filters.cameras")
        return self


def _b64(data: bytes | None) -> str | None:
    return base64.b64encode(data).decode() if data else None


def serve_request(payload: bytes, pick: Callable[[object], type[R]],
                  use_store: Callable[[], AbstractContextManager[VectorStore]],
                  handle: Callable[[R, VectorStore], dict], settle: Callable[[], object] | None = None,
                  without_store: Callable[[R], dict | None] | None = None) -> dict:
    """Parse and validate one JSON request (``pick`` chooses its model) and answer it against the store.

    Shared by queries and labels, so both report bad requests and an unavailable store the same way;
    never raises: a store that fails mid-request answers ``store_unavailable``, anything else ``internal_error``.
    A frame not found is looked for once more after ``settle`` (the recorder's frames on their way are written):
    a client that asks about a frame as soon as its result arrives would otherwise beat the recorder's batch.
    ``without_store`` answers a request that needs no store (else None), so that one is answered while it is away.
    """
    try:
        raw = decode_json(payload)
        request = validate(pick(raw), raw)
        if without_store is not None and (answer := without_store(request)) is not None:
            return answer
        try:
            with use_store() as store:
                return handle(request, store)
        except RequestError as exc:
            if settle is None or exc.code not in (ErrorCode.UNKNOWN_FRAME, ErrorCode.EMPTY_STORE):
                raise
        settle()  # with the store let go: the recorder takes it to write
        with use_store() as store:
            return handle(request, store)
    except (StoreUnavailable, StoreError) as exc:
        return error_answer(ErrorCode.STORE_UNAVAILABLE, str(exc))
    except RequestError as exc:
        return error_answer(exc.code, exc.message)
    except OutputError as exc:  # a query's image or a label's frame the model gives no numbers for
        return error_answer(ErrorCode.INVALID_OUTPUT, str(exc))
    except Exception as exc:
        log.exception("request failed")
        return error_answer(ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")


class QueryService:
    def __init__(self, use_store: Callable[[], AbstractContextManager[VectorStore]], evidence: EvidenceStore,
                 embed: Callable[[bytes, str | None], tuple[np.ndarray, str | None]], max_top_k: int,
                 settle: Callable[[], object] | None = None) -> None:
        """``embed(image, camera)`` turns an uploaded image into a vector as the model serving ``camera`` (None: the
        default model) embeds that camera's frames, with the name of its space (None: compared with any); ``settle``
        waits for the frames on their way to the store (:func:`serve_request`)."""
        self.settle = settle
        self.use_store = use_store
        self.evidence = evidence
        self.embed = embed
        self.max_top_k = max_top_k

    def answer_bytes(self, payload: bytes) -> dict:
        """Answer a raw request payload; never raises, errors come back as ``{"ok": false, "error": ...}``."""
        started = time.monotonic()
        answer = serve_request(payload, lambda raw: QueryRequest, self.use_store, self.answer, self.settle)
        answer["took_ms"] = round((time.monotonic() - started) * 1000, 1)
        return answer

    def answer(self, request: QueryRequest, store: VectorStore) -> dict:
        if request.top_k > self.max_top_k:
            raise RequestError(ErrorCode.BAD_REQUEST, f"top_k {request.top_k} exceeds the limit {self.max_top_k}")
        filters = request.filters.to_filters()
        if request.frame_id is None and request.image_b64 is None:
            return {"ok": True, "query": {"latest": True}, "space": None,
                    "hits": [self._hit(None, payload, request.include_thumbnails, request.include_heatmaps)
                             for payload in store.latest(request.top_k, filters)]}
        if store.count() == 0:
            raise RequestError(ErrorCode.EMPTY_STORE, "no frames have been logged yet")
        exclude = None
        query: dict = {}
        if request.frame_id is not None:
            found = store.find(request.frame_id, request.camera)
            if found is None:
                where = f" from camera {request.camera}" if request.camera else ""
                raise RequestError(ErrorCode.UNKNOWN_FRAME, f"frame {request.frame_id!r}{where} is not in the history")
            exclude, vector, payload = found
            check_same_capture(payload, request.frame_id, str(payload.get("camera")), request.captured_at)
            space = payload.get(PAYLOAD_KEY)
            query = {"frame_id": payload.get("frame_id"), "camera": payload.get("camera")}
        else:
            try:
                data = b64_image(request.image_b64 or "")
            except ValueError:
                raise RequestError(ErrorCode.BAD_IMAGE, "image_b64 is not valid base64") from None
            # as the model of the camera it is about (its camera, or the only one filtered on) embeds its frames
            camera = request.camera or (request.filters.cameras[0] if len(request.filters.cameras) == 1 else None)
            try:
                vector, space = self.embed(data, camera)
            except FrameError as exc:
                raise RequestError(ErrorCode.BAD_IMAGE, f"{exc.code}: {exc.message}") from None
            query = {"image_bytes": len(data), "camera": camera}
        # Only vectors of the query's embedding space are comparable with it (a point from before spaces: any).
        hits = store.search(vector, request.top_k, replace(filters, space=space), exclude=exclude)
        answer = {"ok": True, "query": query, "space": space,
                  "hits": [self._hit(h.similarity, h.payload, request.include_thumbnails, request.include_heatmaps)
                           for h in hits]}
        if space is not None and len(hits) < request.top_k and (note := self._elsewhere(store, vector, request, filters,
                                                                                        space, exclude, len(hits))):
            answer["note"] = note
        return answer

    @staticmethod
    def _elsewhere(store: VectorStore, vector: np.ndarray, request: QueryRequest, filters: Filters, space: str,
                   exclude: str | None, found: int) -> str | None:
        """Fewer hits than asked for: say so when frames that match the filters were embedded by other models (a
        reload or a retrain starts a new space), which this query cannot be compared with, or None.  ``found``: the
        hits of the query's own space, every one of them (fewer than asked for), which the search over all spaces
        lists too: asked for ``found`` more, it lists every other frame up to ``top_k`` of them."""
        others = [h.payload for h in store.search(vector, request.top_k + found, filters, exclude=exclude)
                  if h.payload.get(PAYLOAD_KEY) not in (space, None)][:request.top_k]
        if not others:
            return None
        models = sorted({f"{p.get('model_name')} {p.get('model_version')}" for p in others})
        return (f"{'at least ' if len(others) == request.top_k else ''}{len(others)} frame(s) matching the filters "
                f"were scored by other models ({', '.join(models[:5])}), whose embeddings cannot be compared with "
                "this query's: ask about one of those frames by frame_id to search among them")

    def _hit(self, similarity: float | None, payload: dict, thumbnails: bool, heatmaps: bool) -> dict:
        """``similarity`` None: a frame listed among the latest, not compared."""
        evidence = payload.get("evidence") or {}
        received = payload.get("received_ts")
        hit = {
            "similarity": round(similarity, 4) if similarity is not None else None,
            **{k: payload.get(k) for k in ("frame_id", "camera", "captured_at", "score", "raw_score", "verdict",
                                            "model_name", "model_version", "label", "defect_type")},
            "received_at": iso(received) if isinstance(received, int | float) else None,
        }
        if thumbnails:
            hit["thumbnail_b64"] = _b64(self.evidence.read(evidence.get("thumbnail")))
        if heatmaps:
            hit["heatmap_b64"] = _b64(self.evidence.read(evidence.get("heatmap")))
        return hit
