"""Writes logged frames to the evidence folder and the vector store, in batches, on its own thread.

Inference threads only hand a record over (a deque append); thumbnail encoding,
file writes and store upserts happen here.  When the store cannot be opened or a
write fails, batches go to a bounded on-disk spool and are replayed in arrival
order once the store answers again, so an outage delays history instead of losing
it and inference never waits.  The spool survives restarts; a batch file that cannot
be read (a crash mid-write, a full disk) is moved aside as ``*.corrupt`` and counted,
so it can never stop the worker from starting or the spool from draining.  A batch the open store refuses
for good (vectors of another size, spooled while another bundle served) is moved to ``refused/`` and counted, so
it cannot hold up the batches behind it either.  A store whose collection holds vectors of another size than the
served model's is no outage: no retry writes there, so nothing is spooled for it (the frames are counted as not
recorded) and its cause, with what to do, is said once and answered to queries.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bundle import make_folder
from worker.config import QueuePolicy, SpoolConfig, StoreConfig
from worker.evidence import ANOMALOUS, NORMAL, EvidenceStore
from worker.heatmap import encode, fit_size
from worker.pixels import Pixels, image_file
from worker.queueing import BoundedQueue, Closed
from worker.store import BatchRefused, StoreDamaged, StoreError, StoreGone, StoreMismatch, VectorStore
from worker.supervise import Liveness, StopLoop, Throttle, supervised_loop

log = logging.getLogger(__name__)

Point = tuple[str, np.ndarray, dict]
REFUSED = "refused"  # the spool's sub-folder of batches the store refused for good
SWEEP_CHUNK = 1024  # evidence keys checked against the store per recorder step (Recorder._sweep)
IDLE_WAIT_S = 0.2  # the longest the recorder waits for a record before it counts as progress again


class StoreUnavailable(Exception):
    """The vector store cannot be used right now (embeddings are being spooled); the message says why."""


@dataclass
class Record:
    key: str
    vector: np.ndarray
    payload: dict
    frame: np.ndarray  # the prepared (model-size) frame, for the thumbnail
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # evidence kind -> (ext, data)
    frame_pixels: Pixels | None = None  # files["frame"] is a raw pixel buffer of this layout: written as its TIFF

    @property
    def nbytes(self) -> int:
        return self.vector.nbytes + self.frame.nbytes + sum(len(data) for _, data in self.files.values())


class Spool:
    """Batches the store has not taken yet, one JSON file each, oldest first; bounded in bytes."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = Path(folder)
        make_folder(self.folder, "spool.path")  # on a full disk: made at the next write
        self.max_bytes = max_bytes
        foreign = []  # entries of a temporary file's name it does not write (another version's, an operator's)
        for tmp in self.folder.glob("*.tmp"):  # its own: a batch cut short, <seq>.tmp
            if tmp.stem.isdigit() and tmp.is_file() and not tmp.is_symlink():
                tmp.unlink()
            else:
                foreign.append(tmp.name)
        if foreign:
            log.warning("spool %s holds %s, which the worker does not write (another version's, or put there by "
                        "hand): left as they are", self.folder, ", ".join(sorted(foreign)))
        self.dropped_points = 0
        self.corrupt_batches = 0
        self.refused_batches = 0
        self.refused_points = 0
        self._files: list[Path] = []
        self._counts: dict[Path, int] = {}
        # each batch's bytes as written: a file deleted under the worker (someone freeing space) cannot fail a push
        self._sizes: dict[Path, int] = {}
        for path in sorted(self.folder.glob("*.json")):
            points = self._read(path)
            if points is not None:
                self._files.append(path)
                self._counts[path] = len(points)
                self._sizes[path] = path.stat().st_size
        named = [*self.folder.glob("*.*"), *(self.folder / REFUSED).glob("*.json")]  # a new batch never takes a set-aside name
        last = max((int(p.stem) for p in named if p.stem.isdigit()), default=-1)
        self._seq = last + 1

    def _read(self, path: Path) -> list[dict] | None:
        """The points of a batch file, or None after moving an unreadable one aside."""
        try:
            points = json.loads(path.read_bytes())["points"]
            if not isinstance(points, list):
                raise ValueError("points is not a list")
            return points
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.corrupt_batches += 1
            log.error("spool batch %s is unreadable (%s): moved aside as .corrupt", path.name, exc)
            try:
                path.replace(path.with_suffix(".corrupt"))
            except OSError:
                log.exception("could not move %s aside", path)
            return None

    def __len__(self) -> int:
        return len(self._files)

    @property
    def points(self) -> int:
        return sum(self._counts.values())

    def push(self, points: list[Point]) -> None:
        body = {"points": [{"id": pid, "vector": vec.astype(float).tolist(), "payload": payload}
                           for pid, vec, payload in points]}
        # a name taken by a batch moved in by hand while this worker ran (another worker's refused ones): kept, not
        # written over; the next start reads it with the others
        while (path := self.folder / f"{self._seq:012d}.json").exists():
            self._seq += 1
        self._seq += 1
        tmp = path.with_suffix(".tmp")
        data = json.dumps(body).encode()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)  # deleted by hand (space freed): made again
            tmp.write_bytes(data)
            tmp.replace(path)
        except OSError:  # a full disk: the part written would stay, uncounted in max_mb, one per failed batch
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        self._files.append(path)
        self._counts[path] = len(points)
        self._sizes[path] = len(data)
        self._enforce()

    def oldest(self) -> tuple[Path, list[Point]] | None:
        """The oldest readable batch; unreadable ones on the way are moved aside and forgotten."""
        while self._files:
            path = self._files[0]
            points = self._read(path)
            try:
                if points is not None:
                    return path, [(p["id"], np.asarray(p["vector"], np.float32), p["payload"]) for p in points]
            except (KeyError, TypeError, ValueError) as exc:
                self.corrupt_batches += 1
                log.error("spool batch %s has malformed points (%s): moved aside as .corrupt", path.name, exc)
                path.replace(path.with_suffix(".corrupt"))
            self._files.pop(0)
            self._counts.pop(path, None)
            self._sizes.pop(path, None)
        return None

    def remove(self, path: Path) -> None:
        self._files.remove(path)
        self._counts.pop(path, None)
        self._sizes.pop(path, None)
        path.unlink(missing_ok=True)

    def set_aside(self, path: Path, reason: str) -> None:
        """Move a batch the store refuses for good to ``refused/``: kept for a store of its vector size, out of the
        way of the batches behind it.  The first one is explained in the log; all are counted."""
        self._files.remove(path)
        points = self._counts.pop(path, 0)
        self._sizes.pop(path, None)
        self.refused_batches += 1
        self.refused_points += points
        target = self.folder / REFUSED / path.name
        try:
            target.parent.mkdir(exist_ok=True)
            path.replace(target)
        except OSError as exc:  # left where it is: refused again after a restart, still never blocking
            log.error("could not move refused spool batch %s to %s (%s)", path.name, target.parent, exc)
        if self.refused_batches == 1:
            log.error("spool batch %s (%d points) cannot be written to this store: %s. It was spooled while a bundle "
                      "of another embedding size served; it and any like it are moved to %s and counted "
                      "(spool_refused_batches), and replay goes on. Such points fit only a collection of their size: "
                      "move the files into the spool.path of a worker serving one (it replays them from its next "
                      "start), or delete them", path.name, points, reason, target.parent)
        else:
            log.debug("spool batch %s refused by the store (%s): moved to %s", path.name, reason, target.parent)

    def _enforce(self) -> None:
        total = sum(self._sizes.values())
        while total > self.max_bytes and len(self._files) > 1:
            oldest = self._files.pop(0)
            total -= self._sizes.pop(oldest)
            self.dropped_points += self._counts.pop(oldest)
            oldest.unlink(missing_ok=True)
            log.error("spool over %d bytes: oldest batch dropped (%d points lost so far)", self.max_bytes,
                      self.dropped_points)


class Recorder:
    def __init__(self, open_store: Callable[[], VectorStore], evidence: EvidenceStore, cfg: StoreConfig,
                 spool: SpoolConfig, thumbnail_size: int, liveness: Liveness, max_records: int = 1000,
                 max_bytes: int = 128_000_000) -> None:
        self._open_store = open_store
        self.store: VectorStore | None = None
        self.evidence = evidence
        self.cfg = cfg
        self.spool = Spool(spool.path, spool.max_mb * 1_000_000)
        self.retry_s = spool.retry_s
        self.thumbnail_size = thumbnail_size
        # Policy: drop_oldest past max_records or max_bytes: history is best effort, inference never waits.
        self.queue: BoundedQueue[Record] = BoundedQueue(max_records, QueuePolicy.DROP_OLDEST, max_bytes,
                                                        size=lambda r: r.nbytes)
        self.liveness = liveness
        self.dropped = 0
        self.lost = 0  # records neither stored nor spooled (the store away and the spool could not be written)
        self._lost_log = Throttle(60)
        self.evidence_failed = 0  # records kept without their evidence files (the evidence folder could not be written)
        self._evidence_failing = False  # while evidence writes fail: said once when they start, once when they stop
        self.unrecorded = 0  # records not kept because the store holds vectors of another size (store_error)
        self.labelled_kept = 0  # records not kept because their id names a frame an operator labelled (_spare_labels)
        self._reuse_log = Throttle(60)
        self.store_error: str | None = None  # why the store can never take this model's points, while it cannot
        self.store_damaged: str | None = None  # why the embedded store's files cannot be loaded, while they cannot
        self._outage: tuple[str, Throttle] = ("", Throttle(600))  # the last outage said, and when to say it again
        self.written = 0
        self._write_error: str | None = None  # why the open store's last write failed, until one succeeds
        self._available_at_stop: bool | None = None  # the store as it was when the stop closed it
        # Readers, label writes and this thread's batches; reentrant, since a batch holds it from the check of its
        # ids' labels through its write (:meth:`_step`) and the write takes it too.
        self._store_lock = threading.RLock()
        self._next_try = 0.0
        self._next_evidence_retention = 0.0  # while no store is open (the store rate-limits its own passes)
        self._unswept: list[str] | None = None  # evidence keys still to check against the open store (_sweep)
        self._outstanding = 0  # submitted records not yet written, spooled or dropped
        self._submitted = 0  # records submitted so far, and of them settled (written, spooled, dropped or lost): the
        self._finished = 0  # queue is first in, first out, so the first ``_finished`` are settled
        self._done = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)

    def start(self) -> None:
        self._try_open()
        self.liveness.register(self._thread.name, self._thread)
        self._thread.start()

    def submit(self, record: Record) -> None:
        with self._done:
            self._outstanding += 1
            self._submitted += 1
        dropped = self.queue.put(record)
        if dropped:
            self.dropped += len(dropped)
            self._settled(len(dropped))
            log.warning("recorder backlog full: %d record(s) dropped (%d so far)", len(dropped), self.dropped)

    def _settled(self, n: int) -> None:
        with self._done:
            self._outstanding -= n
            self._finished += n
            self._done.notify_all()

    @property
    def pending(self) -> int:
        return len(self.queue)

    @property
    def store_available(self) -> bool:
        """Whether the store takes writes: open, and its last write (if any since it opened) succeeded.  An open store
        that refuses them (its free-space floor, ``store.min_free_mb``) still answers reads, but frames are spooled.
        Once the stop has closed it: as it was before (the last stats would say a store that was up was down)."""
        if self._available_at_stop is not None:  # the stop's last stats: closed by the stop, not down
            return self._available_at_stop
        return self.store is not None and self._write_error is None

    @contextmanager
    def use_store(self) -> Iterator[VectorStore]:
        """The open store, for readers (queries); serialised with writes."""
        with self._store_lock:
            if self.store is None:
                if self.store_error is not None:
                    raise StoreUnavailable(f"{self.store_error}; until then frames are inspected but not recorded")
                if self.store_damaged is not None:
                    raise StoreUnavailable(self.store_damaged)
                why = self._outage[0] or "it is not open yet"  # e.g. its free-space floor, not only the network
                raise StoreUnavailable(f"the vector store cannot be opened ({why}); embeddings are being spooled")
            yield self.store

    def flush(self, timeout: float, waiting: Callable[[], object] | None = None) -> bool:
        """Wait until every record submitted so far is written, spooled or dropped (not merely dequeued); records
        submitted meanwhile are not waited for, so a steady stream of frames cannot hold it up.  ``waiting`` is called
        at least every IDLE_WAIT_S meanwhile (the caller's progress, for the watchdog)."""
        deadline = time.monotonic() + timeout
        with self._done:
            target = self._submitted
            while self._finished < target:
                if (left := deadline - time.monotonic()) <= 0:
                    return False
                if waiting is not None:
                    waiting()
                self._done.wait(min(left, IDLE_WAIT_S))
            return True

    def stop(self, timeout: float = 10) -> None:
        """Close the queue and the store, within ``timeout`` in all: a recorder thread stuck in a write (a hung
        disk) holds the store's lock, and the stop must end before the service manager's kill."""
        deadline = time.monotonic() + timeout
        self.queue.close()
        self._thread.join(timeout)
        if not self._store_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            log.error("the store is left unclosed at the stop: a thread still holds it after %g s (a write or a read "
                      "that does not return: a hung disk or server); what it had not flushed may be lost", timeout)
            return
        try:
            self._available_at_stop = self.store_available
            self._close_store(logging.ERROR)  # e.g. a full disk: said, and the shutdown goes on
        finally:
            self._store_lock.release()

    # --- recorder thread ---------------------------------------------------------------------
    def _try_open(self) -> bool:
        with self._store_lock:
            if self.store is not None:
                return True
            try:
                store = self._open_store()
            except StoreMismatch as exc:  # said once (again only if the cause changes), tried quietly on
                self._next_try = time.monotonic() + self.retry_s
                if str(exc) != self.store_error:
                    log.error("%s. Inspection goes on; frames are not recorded in the history (counted as "
                              "recorder_unrecorded) until the store fits, tried again every %g s", exc, self.retry_s)
                self.store_error = str(exc)
                return False
            except StoreDamaged as exc:  # said once (again if the cause changes); spooled, tried quietly on
                self._next_try = time.monotonic() + self.retry_s
                self.store_error = None
                if str(exc) != self.store_damaged:
                    log.error("%s (tried again every %g s)", exc, self.retry_s)
                self.store_damaged = str(exc)
                return False
            except Exception as exc:  # an outage: said when its cause changes, else every ten minutes
                self._next_try = time.monotonic() + self.retry_s
                self.store_error = self.store_damaged = None
                said, again = self._outage
                if str(exc) != said or again.ready():
                    again.ready(force=True)
                    self._outage = (str(exc), again)
                    log.warning("vector store unavailable (%s); spooling, tried again every %g s (said again "
                                "every ten minutes while the cause is the same)", exc, self.retry_s)
                return False
            if self.store_error is not None:
                log.warning("the vector store fits the served model now: frames are recorded again")
            if self.store_damaged is not None:
                log.warning("the vector store opens again: frames are recorded again, the spooled ones replayed")
            # before the store: whoever sees it open (stats, tests) sees no error with it
            self.store_error = self.store_damaged = None
            self._outage = ("", self._outage[1])
            self.store = store
            self._write_error = None
            self._unswept = None  # a new store (or a new history in it) is checked against the evidence anew
            log.info("vector store available")
            return True

    def _upsert(self, points: list[Point]) -> bool:
        with self._store_lock:
            if self.store is None:
                return False
            try:
                self.store.upsert(points)
            except BatchRefused:
                raise  # not an outage: the caller sets the batch aside
            except StoreGone as exc:  # opened again at once: a new collection, which the spool then fills
                log.error("%s: a new one is made there and this batch and the next are written to it", exc)
                self._let_go()
                return False
            except Exception as exc:
                log.warning("vector store write of %d points failed (%s); spooling", len(points), exc)
                self._next_try = time.monotonic() + self.retry_s
                self._write_error = str(exc)
                return False
            self._write_error = None
        self.written += len(points)
        return True

    def _let_go(self) -> None:
        """Close a store whose folder is gone (its engine may fail to flush there) so the next turn opens it anew."""
        self._next_try = 0.0
        self._close_store(logging.DEBUG)

    def _close_store(self, level: int) -> None:
        """Close the open store, if any (the caller holds ``_store_lock``); a failure to close is logged at ``level``."""
        store, self.store = self.store, None
        if store is not None:
            try:
                store.close()
            except StoreError as exc:
                log.log(level, "closing the vector store: %s", exc)

    def _replay(self) -> None:
        """Write spooled batches oldest first; stop at the first outage, set aside a batch the store refuses for good."""
        if time.monotonic() < self._next_try or not self._try_open():
            return
        while (item := self.spool.oldest()) is not None:
            path, points = item
            try:
                with self._store_lock:  # no label comes between the check of the ids and the write
                    # spooled while the store was away, when only the evidence could say which ids are labelled
                    spared = self._labelled([key for key, _, _ in points], ask_store=True)
                    if time.monotonic() < self._next_try:  # the store did not answer which ids are labelled: later,
                        return  # as a batch of _step waits in the spool then (a server may still take the write)
                    if spared:
                        self.evidence.delete([k for k in spared if not self.evidence.labelled(k)])  # the new frame's
                        self._said_spared([payload for key, _, payload in points if key in spared])
                        points = [point for point in points if point[0] not in spared]
                    if not self._upsert(points):
                        return
            except BatchRefused as exc:
                self.spool.set_aside(path, str(exc))
                continue
            self.spool.remove(path)
            log.info("replayed %d spooled points (%d batches left)", len(points), len(self.spool))

    def _retain(self) -> None:
        """Retention (store.max_points/max_age_h, evidence.max_age_h); the store rate-limits it itself.  While there
        is no open store (an outage, damaged files, another embedding size) the evidence's own budgets still apply,
        at the same rate: an outage of days would otherwise keep every frame past ``evidence.max_age_h``.

        Runs without ``_store_lock`` but for each chunk's read and deletion (a label between them would be deleted
        with its frame): an HNSW optimize can take long and queries must not wait for it (the store serialises each
        call itself; only this thread writes or closes it while running).
        """
        store = self.store
        if store is not None:
            store.retain(self.evidence, lock=self._store_lock)
            self._sweep(store)
        elif (clock := time.monotonic()) >= self._next_evidence_retention:
            self._next_evidence_retention = clock + self.cfg.retention_every_s
            self.evidence.retain()

    def _sweep(self, store: VectorStore) -> None:
        """Delete the evidence of frames the open store does not hold, a chunk a step, once per opened store: a worker
        killed in a retention pass (points deleted, their files not yet) or a new history (``store.collection`` set
        anew, the folder moved aside) left files no point names, which no retention pass would ever take (but a
        labelled frame's, which its class's budget takes in turn).  It checks only while nothing is spooled, so every frame
        whose evidence was written is in the store by then (or was lost, its files deleted)."""
        if self._unswept is None:
            self._unswept = self.evidence.keys()
        if not self._unswept or len(self.spool):
            return
        chunk = self._unswept[-SWEEP_CHUNK:]
        with self._store_lock:  # a label between the read and the markers' check would be undone by it
            try:
                held = store.payloads(chunk)
            except StoreError as exc:
                log.warning("vector store read of %d points failed (%s); checking the evidence again later", len(chunk),
                            exc)
                return
            del self._unswept[-SWEEP_CHUNK:]
            self._mark_labels(held)
        # an operator's labelled frames stay (their class's own budget takes them): a history set aside by a new
        # store.collection may be served again, and its labels would then show their frames
        if orphans := [key for key in chunk if key not in held and not self.evidence.labelled(key)]:
            self.evidence.delete(orphans)
            log.info("deleted the evidence of %d frames the history does not hold (a crash during retention, or a new "
                     "history)", len(orphans))

    def _mark_labels(self, held: dict[str, dict]) -> None:
        """Put each frame's evidence in the budget its label says: a label written to the store and not to its marker
        (a stop between the two, a marker that could not be written) left the frame's files in the budget of
        unlabelled frames, which would take them, and a camera reusing the id during an outage could write over
        them."""
        moved = 0
        for key, payload in held.items():
            if bool(payload.get("label")) != self.evidence.labelled(key):
                try:
                    self.evidence.set_labelled(key, bool(payload.get("label")), payload.get("verdict") == "anomalous")
                except OSError as exc:
                    log.warning("evidence of %s: its label's marker cannot be changed (%s)", key, exc)
                    return
                moved += 1
        if moved:
            log.info("evidence of %d frames moved to the budget their label says (a stop between a label's store and "
                     "marker writes)", moved)

    def _next_batch(self) -> list[Record] | None:
        try:
            first = self.queue.get(timeout=IDLE_WAIT_S)
        except Closed:
            return None
        if first is None:
            return []
        batch = [first]
        deadline = time.monotonic() + self.cfg.flush_s
        while len(batch) < self.cfg.batch_size and (left := deadline - time.monotonic()) > 0:
            # Waiting for the rest of a batch is idle, not work: counted as progress at least every IDLE_WAIT_S, or a
            # store.flush_s longer than worker.watchdog_s made the watchdog take the recorder for stuck at the first
            # frame, and the worker exited for a restart, losing the batch, at every frame.
            self.liveness.progress(self._thread.name)
            try:
                item = self.queue.get(timeout=min(left, IDLE_WAIT_S))
            except Closed:
                break
            if item is not None:
                batch.append(item)
        return batch

    def _spare_labels(self, batch: list[Record]) -> list[Record]:
        """The records whose id does not name a frame an operator labelled.  A camera whose frame counter starts
        again at a reboot (or a redelivery after a restart, past the dedupe window) would otherwise replace that
        frame's record and evidence, and with them the label: the new frame is scored and answered, not recorded.
        The store is asked only while writes go to it (not while the batch would be spooled anyway: an unreachable
        server would hold every batch up for its timeout); the replay asks it for what was spooled."""
        writing = not len(self.spool) and time.monotonic() >= self._next_try
        spared = self._labelled([r.key for r in batch], ask_store=writing)
        self._said_spared([r.payload for r in batch if r.key in spared])
        return [r for r in batch if r.key not in spared]

    def _labelled(self, keys: list[str], ask_store: bool) -> set[str]:
        """The keys that name a frame an operator labelled: by the open store (``ask_store``), which is the history;
        else, or where it does not answer (then tried again after ``spool.retry_s``), by the evidence's labelled class,
        which is all there is to ask during an outage (its marker may be of an earlier history: the replay asks the
        store again)."""
        store = self.store if ask_store else None  # only this thread opens or closes it
        if store is not None:
            try:
                return {key for key, payload in store.payloads(keys).items() if payload.get("label")}
            except StoreError as exc:
                log.warning("vector store read of %d points failed (%s); spooling", len(keys), exc)
                self._next_try = time.monotonic() + self.retry_s
        return {k for k in keys if self.evidence.labelled(k)}

    def _said_spared(self, payloads: list[dict]) -> None:
        """Count the frames not recorded because their id names a labelled frame, and say so once a minute."""
        if not payloads:
            return
        self.labelled_kept += len(payloads)
        if self._reuse_log.ready():
            log.warning("frame %s/%s is not recorded: its id names a frame an operator labelled, whose record and label "
                        "are kept (the camera reused the id, or sent the frame again after a restart); it is scored and "
                        "answered only. Give frames ids that do not repeat (%d such frames so far, said at most once a "
                        "minute)", payloads[0].get("camera"), payloads[0].get("frame_id"), self.labelled_kept)

    def _evidence_files(self, rec: Record) -> dict[str, tuple[str, bytes]]:
        """A frame's evidence files, encoded: its thumbnail, and a raw buffer's image file, made here, not on the
        inference thread."""
        files = dict(rec.files)
        if "frame" in files:
            data, ext = image_file(files["frame"][1], files["frame"][0], rec.frame_pixels)
            files["frame"] = (ext, data)
        return {"thumbnail": ("jpg", encode(fit_size(rec.frame, self.thumbnail_size), "jpeg", 80)), **files}

    def _prepare(self, batch: list[tuple[Record, dict[str, tuple[str, bytes]]]], saved: list[str]) -> list[Point]:
        """The batch's points, each record's evidence files (:meth:`_evidence_files`) written; ``saved`` gets the key of
        each frame whose evidence was.  A frame whose evidence cannot be written (its folder's disk full) is recorded
        without it: the history's point (score, verdict, embedding, labels) does not need the thumbnail and heatmap,
        and the store may have room."""
        points = []
        for rec, files in batch:
            value = ANOMALOUS if rec.payload.get("anomalous") else NORMAL
            try:
                rec.payload["evidence"] = self.evidence.save(rec.key, files, value)
            except OSError as exc:
                rec.payload["evidence"] = {}
                self._without_evidence(exc)
            else:
                saved.append(rec.key)
                if self._evidence_failing:
                    self._evidence_failing = False
                    log.warning("evidence is written again to %s (%d frames recorded without it so far, "
                                "recorder_evidence_failed)", self.evidence.root, self.evidence_failed)
            points.append((rec.key, rec.vector, rec.payload))
        return points

    def _without_evidence(self, exc: OSError) -> None:
        """Count a frame recorded without its evidence; said once while the writes fail (a full disk fails them all)."""
        self.evidence_failed += 1
        if not self._evidence_failing:
            self._evidence_failing = True
            log.error("the evidence folder %s cannot be written (%s): frames are recorded in the history without "
                      "their thumbnail and heatmap (counted as recorder_evidence_failed) until it can; said again "
                      "when it can", self.evidence.root, exc)

    def _run(self) -> None:
        supervised_loop(self.liveness, self._thread.name, self._step)

    def _step(self) -> None:
        batch = self._next_batch()
        try:
            if batch:
                kept = batch
                saved: list[str] = []  # the keys whose evidence _prepare wrote: deleted if the batch is lost
                try:
                    if self.store_error is not None and self.store is None:  # spooled, they would never be written
                        self.unrecorded += len(batch)
                    else:
                        encoded = [(rec, self._evidence_files(rec)) for rec in batch]  # before the lock: the CPU work
                        # A label between the check of the batch's ids and its write would be written over by a later
                        # frame of its id (a camera that reused it), its evidence with it: queries and labels wait.
                        with self._store_lock:
                            if kept := self._spare_labels(batch):
                                keep = {id(rec) for rec in kept}
                                points = self._prepare([pair for pair in encoded if id(pair[0]) in keep], saved)
                                # Order is kept: while anything is spooled (or the store just failed), new batches
                                # queue behind.
                                if len(self.spool) or time.monotonic() < self._next_try or not self._upsert(points):
                                    self.spool.push(points)
                except BatchRefused as exc:  # not expected (the store opened for this model's size): never spooled
                    self.unrecorded += len(kept)
                    self.evidence.delete(saved)  # no point will name these files: no retention pass would take them
                    log.error("the vector store refused a batch of %d for good (%s); not recorded", len(kept), exc)
                except Exception as exc:  # an OSError is e.g. a full disk (the store away and the spool not taking it)
                    self.lost += len(kept)
                    self.evidence.delete(saved)  # no point will name these files: no retention pass would take them
                    if self._lost_log.ready():  # a full disk fails every batch: said once a minute, with the count
                        log.error("recorder could not write a batch of %d (%s: %s); it is lost (%d records so far; "
                                  "said at most once a minute)", len(kept), type(exc).__name__, exc, self.lost,
                                  exc_info=not isinstance(exc, OSError))
                finally:
                    self._settled(len(batch))
            if batch is None:
                self._next_try = 0.0  # last chance before exit; what is left stays spooled on disk
            if len(self.spool):
                self._replay()
            elif (self.store_error or self.store_damaged) is not None and time.monotonic() >= self._next_try:
                self._try_open()  # e.g. the collection's folder moved aside: a new history without a restart
            self._retain()
        finally:
            if batch is None:
                raise StopLoop
