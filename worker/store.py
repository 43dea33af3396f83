"""The frame history: one point per logged frame (embedding + payload), behind one small interface.

Two engines, the same Qdrant semantics (points, payload indexes, filters, cosine):

* embedded (``store.path``, the default): **qdrant-edge-py**, Qdrant's own engine in
  process.  Exact search over payload-indexed segments answers a filtered top-5 in a
  few ms at 100k frames (docs/store.md); ``store.hnsw`` builds an HNSW index instead
  for much larger histories.
* server (``store.url``): a Qdrant server through **qdrant-client** over HTTP, for
  several workers sharing one history or millions of frames.

Writes arrive in batches from the worker's recorder thread, never from the inference
path; retention (count and age) runs on that thread too (:meth:`VectorStore.retain`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
import time
import uuid
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import numpy as np
import qdrant_edge as edge

from worker.config import StoreConfig
from worker.store_base import LABELS, PAYLOAD_INDEXES, Filters, StoreError, StoreMismatch, Tier, dense, first_found, mismatch
from worker.supervise import is_failure
from worker.wire import AHEAD_MARGIN_S, CLOCK_FLOOR, Restamp, clock_set, iso

if TYPE_CHECKING:
    from qdrant_client import QdrantClient

    from worker.evidence import EvidenceStore
    from worker.store_server import ServerEngine

log = logging.getLogger(__name__)

_NAMESPACE = uuid.UUID("5b0e4f8e-3f4c-4b8e-9a55-6a1c2f0d7e11")
_EDGE_SCHEMA = {"keyword": edge.PayloadSchemaType.Keyword, "float": edge.PayloadSchemaType.Float}
_DELETE_CHUNK = 1024
STALE_SEGMENTS = 2  # replaced segments kept after a vacuum before the embedded shard is loaded again (_Edge._reopen)
# qdrant-edge writes a whole write-ahead-log segment (32 MiB, fixed in the engine) when it opens a collection and each
# time its log starts a new one, and a new collection's first segment pages on top: a floor below this cannot keep
# those pages off a full disk, so ``store.min_free_mb`` never counts for less.
ENGINE_MIN_FREE = 40 * 2**20

# qdrant-client warns at each client made for a server it cannot reach ("Failed to obtain server version ... Set
# check_compatibility=False", an argument no config key reaches). The recorder makes one at each try (spool.retry_s) and
# each frame's decode resets Python's memory of the warnings shown (warnings.catch_warnings), so a server down for a day
# printed it at every try; the recorder's own line says why the store cannot be opened. Set here, at import, before
# any thread runs: a filter added while a decode holds catch_warnings would be undone at its exit.
warnings.filterwarnings("ignore", message="Failed to obtain server version", category=UserWarning)


def point_id(camera: str, frame_id: str) -> str:
    """Stable id of a frame: the same camera + frame id always maps to the same point."""
    return str(uuid.uuid5(_NAMESPACE, f"{camera}/{frame_id}"))


class StoreDamaged(StoreError):
    """The embedded collection's files cannot be loaded (cut or overwritten, e.g. by a power cut or a failing card):
    unlike an outage, trying again changes nothing until someone moves the folder aside."""


# Load failures that say nothing about the files' content: another process holds them (a lock), a permission, or
# the process or the disk out of a resource (open files, memory, space).
_NOT_DAMAGE = ("WouldBlock", "os error 11", "Permission denied", "os error 13", "Too many open files", "os error 24",
               "os error 23", "Cannot allocate memory", "os error 12", "No space left", "os error 28")


# What the engine says of a segment a newer version of it wrote.
_NEWER = "is newer than application version"


def _set_aside(path: Path) -> Path:
    """Rename ``path`` to a free ``<name>.damaged[-N]`` beside it: kept for whoever wants to look, out of the load."""
    target, n = path.with_name(f"{path.name}.damaged"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{n}")
    path.rename(target)
    return target


def _unreadable_config(folder: Path) -> str | None:
    """Why the collection's ``edge_config.json`` cannot be read as a config, or None (absent, fine, or an OS error
    such as a permission, which is not damage).  The worker holds the whole config itself, so such a file is set
    aside and the engine writes it again."""
    try:
        json.loads((folder / "edge_config.json").read_text())["vectors"][""]["size"]
    except OSError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _edge_size(folder: Path) -> int | None:
    """The vector size an embedded collection was created with (its ``edge_config.json``); None where unreadable,
    and the engine's own load then decides."""
    try:
        return int(json.loads((folder / "edge_config.json").read_text())["vectors"][""]["size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class StoreGone(StoreError):
    """The embedded collection's folder vanished while open (deleted or moved away): the engine would go on writing
    to files no longer there, and the history since would be missing at the next start without a word."""


class BatchRefused(StoreError):
    """Points of another vector size than the open store holds: no retry can write them there, unlike an outage."""


@dataclass(frozen=True)
class Hit:
    similarity: float
    payload: dict


def _edge_filter(filters: Filters, exclude: str | None = None, also: tuple = ()) -> edge.Filter | None:
    """``filters`` as the engine's filter (None: none), without point ``exclude``, with the conditions ``also``."""
    must: list = list(also)
    if filters.cameras:
        must.append(edge.FieldCondition("camera", match=edge.MatchAny(list(filters.cameras))))
    if filters.anomalous_only:
        must.append(edge.FieldCondition("verdict", match=edge.MatchValue("anomalous")))
    if filters.since is not None or filters.until is not None:
        must.append(edge.FieldCondition("captured_ts", range=edge.RangeFloat(gte=filters.since, lte=filters.until)))
    if filters.space is not None:
        must.append(edge.FieldCondition("embedding_space", match=edge.MatchValue(filters.space)))
    must_not: list = [edge.HasIdCondition({uuid.UUID(exclude)})] if exclude else []
    return edge.Filter(must=must, must_not=must_not) if must or must_not else None


def _received(**bounds: float | None) -> edge.FieldCondition:
    """``received_ts`` in a range (``lt``, ``gt``, ``gte``)."""
    return edge.FieldCondition("received_ts", range=edge.RangeFloat(**bounds))


def _said(exc: BaseException) -> str:
    """An engine error for a log line; a panic says so, with what to do about its files."""
    if isinstance(exc, Exception):
        return str(exc)
    return (f"the embedded engine panicked ({exc}): its files are damaged, e.g. by a power cut while it wrote; "
            "move the collection's folder aside to start a new history")


class _Edge:
    """qdrant-edge-py shard at ``path/collection``.

    The engine maps its files into memory, and a page it writes on a full disk kills the whole process (SIGBUS)
    instead of raising, so no write starts while the disk has less than ``min_free`` bytes free; a vacuum, which
    may rewrite every segment, needs the collection's own size on top.  The recorder then spools, as for any
    store outage, and tries again.
    """

    def __init__(self, folder: Path, dim: int, hnsw: bool, min_free: int = 0) -> None:
        self.folder = folder
        self.dim = dim
        self.min_free = min_free
        self._room("open")
        # Exact: indexing threshold 0 = never build a vector index (optimize() then only vacuums deletes).
        index = edge.HnswIndexConfig(m=16, ef_construct=100, full_scan_threshold=10_000) if hnsw else None
        optimizers = None if hnsw else edge.EdgeOptimizersConfig(indexing_threshold=0)
        config = edge.EdgeConfig(vectors=edge.EdgeVectorParams(size=dim, distance=edge.Distance.Cosine),
                                 hnsw_config=index, optimizers=optimizers, wal_enabled=True)
        self.config = config
        self.hnsw = hnsw
        if folder.is_dir() and any(folder.iterdir()):
            where = f"collection {folder.name!r} at {folder}"
            held = _edge_size(folder)  # checked before loading: the recorder tries again every spool.retry_s
            if held is not None and held != dim:
                raise StoreMismatch(mismatch(where, held, dim))
            if (why := _unreadable_config(folder)) is not None:
                aside = _set_aside(folder / "edge_config.json")
                log.warning("%s: its edge_config.json was damaged (%s), set aside as %s; written again from the "
                            "worker's store settings", where, why, aside.name)
            self.shard = self._load(where)
        else:
            self.shard = edge.EdgeShard.create(str(folder), config)
        indexed = self.shard.info().payload_schema
        for name, schema in PAYLOAD_INDEXES.items():  # a collection from an earlier version may lack the newer ones
            if name not in indexed:
                self.shard.update(edge.UpdateOperation.create_field_index(name, _EDGE_SCHEMA[schema]))
        self.params = edge.SearchParams(exact=not hnsw)

    def _load(self, where: str) -> edge.EdgeShard:
        """Load the existing collection.  A write-ahead log the engine cannot open (e.g. emptied by a power cut) is
        set aside and the collection loaded without it: the points already in its segments are kept, the last
        writes before the damage may be missing.  Any other load failure is :class:`StoreDamaged`."""
        try:
            return self._load_once(where)
        except StoreDamaged as exc:
            wal = self.folder / "wal"
            if "WAL" not in str(exc) or not wal.is_dir():
                raise
            aside = _set_aside(wal)
            try:
                shard = self._load_once(where)
            except StoreError:
                aside.rename(wal)  # not (only) the log: the folder is left as it was found, for whoever looks
                raise
            log.error("%s: its write-ahead log could not be opened (%s): set aside as %s and the history opened "
                      "without it; the last writes before the damage may be missing", where, exc.__cause__, aside.name)
            return shard

    def _load_once(self, where: str) -> edge.EdgeShard:
        try:
            shard = edge.EdgeShard.load(str(self.folder), self.config)
            try:  # a segment's vector or payload file a power cut emptied loads without a word, then fails every
                # read and write of the history (said as an outage at every retry): one point read says so now
                shard.scroll(edge.ScrollRequest(limit=1, with_payload=True, with_vector=True))
            except BaseException:
                with contextlib.suppress(Exception):
                    shard.close()
                raise
            return shard
        except BaseException as exc:
            if not is_failure(exc):
                raise
            if "vector size" in str(exc):
                raise StoreMismatch(f"{mismatch(where, None, self.dim)} ({exc})") from exc
            if any(sign in str(exc) for sign in _NOT_DAMAGE):
                raise  # the files may be fine: an outage, said as one, until the other process or the permissions let go
            cause = str(exc) if isinstance(exc, Exception) else f"the engine panicked: {exc}"
            if _NEWER in cause:  # a worker rolled back over the history a newer one wrote: its files are fine
                raise StoreDamaged(f"{where} was written by a newer version of the store's engine than this worker's "
                                   f"({cause}): this worker cannot read it, and leaves its files as they are. Run the "
                                   "newer worker again to go on with this history, or, to stay on this version, set "
                                   "store.collection to a new name (a new history beside it). Until then frames are "
                                   "inspected and their records spooled") from exc
            raise StoreDamaged(f"{where} cannot be loaded ({cause}): its files are damaged, e.g. by a power "
                               "cut or a failing card. Move the folder aside: the worker then starts a new history "
                               "without a restart (the frames in the old one are no longer found by queries). "
                               "Until then frames are inspected and their records spooled") from exc

    def _room(self, what: str, extra: int = 0) -> None:
        """Raise :class:`StoreError` unless the store's disk has ``min_free`` + ``extra`` bytes free."""
        if not self.min_free:
            return
        where = next(p for p in (self.folder, *self.folder.parents) if p.exists())
        free, need = shutil.disk_usage(where).free, self.min_free + extra
        if free < need:
            raise StoreError(f"not starting the store's {what}: {free / 2**20:.0f} MB free on the disk of {self.folder}, "
                             f"{need / 2**20:.0f} MB needed (store.min_free_mb): free some space")

    def writable(self) -> None:
        """Raise :class:`StoreError` where a write would be refused now: its folder gone, or below the floor."""
        if not self.folder.is_dir():
            raise StoreGone(f"the collection's folder {self.folder} is gone (deleted or moved away while the worker ran)")
        self._room("write")

    def upsert(self, items: list[tuple[str, np.ndarray, dict]]) -> None:
        self.writable()
        points = [edge.Point(uuid.UUID(pid), vec.astype(np.float32).tolist(), payload) for pid, vec, payload in items]
        self.shard.update(edge.UpdateOperation.upsert_points(points))

    def search(self, vector: np.ndarray, top_k: int, filters: Filters, exclude: str | None) -> list[tuple[float, dict]]:
        request = edge.QueryRequest(limit=top_k, query=edge.Query.Nearest(vector.astype(np.float32).tolist()),
                                    filter=_edge_filter(filters, exclude), with_payload=True, params=self.params)
        return [(float(p.score), dict(p.payload or {})) for p in self.shard.query(request)]

    def retrieve(self, ids: list[str], vectors: bool = True) -> list[tuple[str, list[float], dict]]:
        recs = self.shard.retrieve([uuid.UUID(i) for i in ids], with_payload=True, with_vector=vectors)
        return [(str(r.id), dense(r.vector) if vectors else [], dict(r.payload or {})) for r in recs]

    def by_frame(self, frame_id: str, limit: int) -> list[tuple[str, list[float], dict]]:
        """Points of this frame id, any camera's, the newest by capture time first."""
        flt = edge.Filter(must=[edge.FieldCondition("frame_id", match=edge.MatchValue(frame_id))])
        order = edge.OrderBy("captured_ts", direction=edge.Direction.Desc)
        recs, _ = self.shard.scroll(edge.ScrollRequest(limit=limit, filter=flt, order_by=order, with_payload=True,
                                                       with_vector=True))
        return [(str(r.id), dense(r.vector), dict(r.payload or {})) for r in recs]

    def labelled(self, limit: int) -> list[tuple[str, list[float], dict]]:
        flt = edge.Filter(must=[edge.FieldCondition("label", match=edge.MatchAny(list(LABELS)))])
        recs, _ = self.shard.scroll(edge.ScrollRequest(limit=limit, filter=flt, with_payload=True, with_vector=False))
        return [(str(r.id), [], dict(r.payload or {})) for r in recs]

    def latest(self, limit: int, filters: Filters) -> list[dict]:
        """The points last received first, then (an ordering skips points without its key) an earlier version's
        points, which have no ``received_ts``, the last captured first."""
        flt = _edge_filter(filters)
        order = edge.OrderBy("received_ts", direction=edge.Direction.Desc)
        recs, _ = self.shard.scroll(edge.ScrollRequest(limit=limit, order_by=order, filter=flt, with_payload=True,
                                                       with_vector=False))
        if len(recs) < limit:
            legacy = _edge_filter(filters, also=(edge.IsEmptyCondition("received_ts"),))
            more, _ = self.shard.scroll(edge.ScrollRequest(
                limit=limit - len(recs), order_by=edge.OrderBy("captured_ts", direction=edge.Direction.Desc),
                filter=legacy, with_payload=True, with_vector=False))
            recs = [*recs, *more]
        return [dict(r.payload or {}) for r in recs]

    def _ids(self, limit: int, flt: edge.Filter, key: str | None) -> list[str]:
        order = edge.OrderBy(key, direction=edge.Direction.Asc) if key else None
        recs, _ = self.shard.scroll(edge.ScrollRequest(limit=limit, order_by=order, filter=flt, with_payload=False))
        return [str(r.id) for r in recs]

    def oldest(self, n: int, tier: Tier) -> list[str]:
        must: list = [edge.FieldCondition("verdict", match=edge.MatchValue("normal"))] if tier == "normal" else []
        must_not: list = [edge.FieldCondition("label", match=edge.MatchAny(list(LABELS)))] if tier != "any" else []
        return first_found(n, self._ids, [
            (edge.Filter(must=[*must, edge.IsEmptyCondition("received_ts")], must_not=must_not), "captured_ts"),
            (edge.Filter(must=[*must, _received(gte=CLOCK_FLOOR)], must_not=must_not), "received_ts"),
            (edge.Filter(must=[*must, _received(lt=CLOCK_FLOOR)], must_not=must_not), "received_ts")])

    def received_in(self, n: int, lt: float | None = None, gt: float | None = None) -> list[str]:
        """Up to ``n`` ids of points received before ``lt`` and after ``gt``."""
        return self._ids(n, edge.Filter(must=[_received(lt=lt, gt=gt)]), None)

    def stamp(self, ids: list[str], payload: dict) -> None:
        """Set ``payload``'s keys on these points."""
        self._room("write")
        self.shard.update(edge.UpdateOperation.set_payload([uuid.UUID(i) for i in ids], payload))

    def before(self, ts: float, n: int) -> list[str]:
        return first_found(n, self._ids, [
            (edge.Filter(must=[edge.FieldCondition("received_ts", range=edge.RangeFloat(lt=ts))]), None),
            (edge.Filter(must=[edge.IsEmptyCondition("received_ts"),
                               edge.FieldCondition("captured_ts", range=edge.RangeFloat(lt=ts))]), None)])

    def delete(self, ids: list[str]) -> None:
        self._room("delete")
        self.shard.update(edge.UpdateOperation.delete_points([uuid.UUID(i) for i in ids]))

    def count(self) -> int:
        return int(self.shard.count(edge.CountRequest(exact=True)))

    def optimize(self) -> None:
        self._room("vacuum", sum(f.stat().st_size for f in self.folder.rglob("*") if f.is_file()))
        self.shard.optimize()
        segments = self.folder / "segments"
        kept = sum(1 for _ in segments.iterdir()) if segments.is_dir() else 0
        if kept > self.shard.info().segments_count + STALE_SEGMENTS:
            self._reopen()

    def _reopen(self) -> None:
        """qdrant-edge-py 0.9 keeps each segment a vacuum replaced mapped, and on disk, until the shard is closed:
        past ``store.max_points`` every retention pass deletes and vacuums, and a worker's memory and disk grew
        without bound (a segment per pass).  Closed and loaded again, the shard holds what it needs."""
        self._room("open")
        self.shard.flush()
        self.shard.close()
        self.shard = edge.EdgeShard.load(str(self.folder), self.config)

    def close(self) -> None:
        self.shard.flush()
        self.shard.close()


class VectorStore:
    """The history behind one interface: embedded qdrant-edge (``store.path``) or a Qdrant server (``store.url``).

    ``client`` replaces the engine with a ready qdrant-client (benchmarks use its local mode).
    All methods raise :class:`StoreError` with what went wrong, never a bare engine error.
    """

    def __init__(self, cfg: StoreConfig, dim: int, client: QdrantClient | None = None) -> None:
        self.cfg = cfg
        self.dim = dim  # the collection's vector size: an open store holds vectors of this size only
        self._lock = threading.Lock()  # the recorder thread writes, query threads read
        self._next_retention = 0.0
        self._default_bound_said = False  # the embedded store's default max_points named in the log, once a process
        self._restamp = Restamp()
        try:
            if client is not None or cfg.url:
                # qdrant-client takes seconds to import: only the server path pays for it.
                from qdrant_client import QdrantClient

                from worker.store_server import ServerEngine

                api_key = cfg.api_key.get_secret_value() if cfg.api_key else None
                client = client or QdrantClient(url=cfg.url, api_key=api_key, timeout=10)
                self.engine: _Edge | ServerEngine = ServerEngine(client, cfg.collection, dim)
                where = cfg.url or "qdrant-client (given)"
            else:
                if cfg.path is None:
                    raise StoreError("no vector store: set store.path (embedded) or store.url (a Qdrant server)")
                folder = cfg.path / cfg.collection
                folder.parent.mkdir(parents=True, exist_ok=True)
                self.engine = _Edge(folder, dim, cfg.hnsw, max(cfg.min_free_mb * 2**20, ENGINE_MIN_FREE))
                where = f"embedded qdrant-edge at {folder}{' (HNSW)' if cfg.hnsw else ''}"
        except StoreError:
            raise
        except BaseException as exc:
            if not is_failure(exc):
                raise
            raise StoreError(f"cannot open the vector store ({cfg.url or cfg.path}): {_said(exc)}") from exc
        log.info("vector store: %s, collection %s", where, cfg.collection)

    def _call(self, what: str, fn, *args) -> Any:
        try:
            with self._lock:
                return fn(*args)
        except StoreError:
            raise
        except BaseException as exc:
            if not is_failure(exc):
                raise
            raise StoreError(f"vector store {what} failed: {_said(exc)}") from exc

    def writable(self) -> None:
        """Raise :class:`StoreError` where the embedded store would refuse a write now (its folder gone, below its
        free-space floor): a caller that changes something else first (a label's extension) checks before.  A server
        is not asked: its refusal comes with the write."""
        if isinstance(self.engine, _Edge):
            self._call("write check", self.engine.writable)

    def upsert(self, items: list[tuple[str, np.ndarray, dict]]) -> None:
        """Write points; :class:`BatchRefused` (before any is written) where one has another size than the store's,
        which both engines refuse for good: the recorder must set such a batch aside, not retry it."""
        if not items:
            return
        sizes = sorted({int(np.size(vec)) for _, vec, _ in items} - {self.dim})
        if sizes:
            raise BatchRefused(f"{'/'.join(map(str, sizes))}-d vectors, but collection {self.cfg.collection!r} "
                               f"holds {self.dim}-d ones")
        self._call("write", self.engine.upsert, items)

    def search(self, vector: np.ndarray, top_k: int, filters: Filters, exclude: str | None = None) -> list[Hit]:
        hits = self._call("search", self.engine.search, np.asarray(vector, np.float32), top_k, filters, exclude)
        return [Hit(score, payload) for score, payload in hits]

    def get(self, key: str) -> tuple[str, np.ndarray, dict] | None:
        """A logged frame by its point id (an extension entry's key, which may lack its frame id: a torn index)."""
        found = self.retrieve([key])
        return found[0] if found else None

    def retrieve(self, keys: list[str]) -> list[tuple[str, np.ndarray, dict]]:
        """The logged frames of these point ids that the history holds."""
        if not keys:
            return []
        return [(k, np.asarray(v, np.float32), p) for k, v, p in self._call("read", self.engine.retrieve, keys)]

    def payloads(self, keys: list[str]) -> dict[str, dict]:
        """The payloads of these point ids that the history holds, without their vectors (a cheaper read)."""
        if not keys:
            return {}
        return {k: p for k, _, p in self._call("read", self.engine.retrieve, keys, False)}

    def find(self, frame_id: str, camera: str | None = None) -> tuple[str, np.ndarray, dict] | None:
        """A logged frame by id (newest if several cameras used the same id and none is named)."""
        if camera is not None:
            return self.get(point_id(camera, frame_id))
        found = self._call("read", self.engine.by_frame, frame_id, 1)  # ordered by the engine: any number of cameras
        if not found:
            return None
        pid, vector, payload = found[0]
        return pid, np.asarray(vector, np.float32), payload

    def count(self) -> int:
        return self._call("count", self.engine.count)

    def latest(self, limit: int, filters: Filters) -> list[dict]:
        """The payloads of the frames last received that match ``filters``, the last first (a point from before
        ``received_ts`` was recorded is not among them)."""
        return self._call("read", self.engine.latest, limit, filters)

    def labelled(self, limit: int = 100_000) -> list[dict]:
        """Payloads of the frames an operator has labelled (for export)."""
        return [payload for _, _, payload in self._call("read", self.engine.labelled, limit)]

    def delete(self, ids: list[str]) -> None:
        for start in range(0, len(ids), _DELETE_CHUNK):
            self._call("delete", self.engine.delete, ids[start : start + _DELETE_CHUNK])

    def optimize(self) -> None:
        """Embedded: vacuum deleted points and (``store.hnsw``) index new ones; a no-op for a server."""
        self._call("optimize", self.engine.optimize)

    def retain(self, evidence: EvidenceStore | None = None, now: float | None = None, force: bool = False,
               lock: AbstractContextManager | None = None) -> list[str]:
        """Apply ``store.max_age_h`` and ``store.max_points`` (the oldest unlabelled normal frames first, then
        unlabelled anomalous ones, labelled ones last; oldest by when they were received) and the evidence's own
        limits; returns the deleted point ids.  Runs at most every ``store.retention_every_s`` unless ``force``;
        called from the recorder thread, so it never blocks inference.  Errors are logged, not raised.  ``lock`` (the
        one labels hold) is held from each chunk's read to its deletion, not for the vacuum after: a label stored in
        between would otherwise be deleted with the frame it was read as unlabelled.

        While this box's clock is not set no age can be told: only ``max_points`` applies.  Once it is, points
        received while it was not, or while it ran ahead, are stamped anew (:meth:`_restamp_points`) before any
        is aged."""
        clock = time.monotonic()
        if not force and clock < self._next_retention:
            return []
        self._next_retention = clock + self.cfg.retention_every_s
        now = time.time() if now is None else now
        to = self._restamp.start(now)
        deleted: list[str] = []

        def drop(ids: list[str]) -> None:
            """Delete points and, at once, their evidence: a crash later in the pass leaves no files without a point."""
            self.delete(ids)
            deleted.extend(ids)
            if evidence is not None:
                evidence.delete(ids)

        try:
            if clock_set(now):
                self._restamp_points(now, to)
            if self.cfg.max_age_h is not None and clock_set(now):
                cutoff = now - self.cfg.max_age_h * 3600
                while True:
                    with lock or nullcontext():
                        if not (ids := self._call("read", self.engine.before, cutoff, _DELETE_CHUNK)):
                            break
                        drop(ids)
            if self.cfg.max_points is not None:
                excess = self.count() - self.cfg.max_points
                if excess > 0 and self.cfg._default_bound and not self._default_bound_said:
                    # a box upgraded from a version that kept every frame, config.yaml as it was: say why they go
                    self._default_bound_said = True
                    log.warning("retention: the history holds %d frames, past store.max_points, which config.yaml "
                                "leaves unset: the embedded store keeps %d by default (versions before 2026-12-04 "
                                "kept every frame); the oldest %d go now, unlabelled normal frames first. Set "
                                "store.max_points to keep more (null: no bound; the worker's memory grows with each "
                                "frame)", excess + self.cfg.max_points, self.cfg.max_points, excess)
                while excess > 0:  # by value: unlabelled normal frames go first, then defects, labels last
                    with lock or nullcontext():
                        ids = next((found for tier in get_args(Tier) if (
                            found := self._call("read", self.engine.oldest, min(excess, _DELETE_CHUNK), tier))), [])
                        if not ids:
                            break
                        drop(ids)
                    excess -= len(ids)
            if deleted or self.cfg.hnsw:
                self.optimize()  # embedded: vacuum deletes, build HNSW for new points; a server does it itself
        except StoreError as exc:
            log.warning("retention: %s", exc)
        if evidence is not None:
            evidence.retain()  # by write time (wall clock), not captured_at
        if deleted:
            log.info("retention: %d frames deleted from the history", len(deleted))
        return deleted

    def _restamp_points(self, now: float, to: float) -> None:
        """Points received while this box's clock was not set (a 1970 stamp: every one would be decades old to
        ``max_age_h``) or ahead of it (a step back: they would outlive the age limit by the step, and ``max_points``
        would take the frames received since first) are taken as received at ``to`` (:class:`worker.wire.Restamp`)."""
        bounds: tuple[tuple[str, int, float | None, float | None], ...] = (
            ("was not set", logging.INFO, CLOCK_FLOOR, None),  # every boot of a box without a battery-backed clock
            ("ran ahead (it has stepped back since)", logging.WARNING, None, now + AHEAD_MARGIN_S))
        for why, level, lt, gt in bounds:
            n = 0
            while ids := self._call("read", self.engine.received_in, _DELETE_CHUNK, lt, gt):
                self._call("write", self.engine.stamp, ids, {"received_ts": to})
                n += len(ids)
            if n:
                log.log(level, "retention: %d frames received while this box's clock %s are taken as received at %s: "
                        "they age from then", n, why, iso(to))

    def close(self) -> None:
        self._call("close", self.engine.close)
