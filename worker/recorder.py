"""Writes logged frames to the evidence folder and the vector store, in batches, on its own thread.

Inference threads only hand a record over (a deque append); thumbnail encoding,
file writes and Qdrant upserts happen here.  A failed write is retried with backoff
and the batch is kept, so a store hiccup delays history instead of losing it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from worker.evidence import EvidenceStore
from worker.heatmap import encode, fit_size
from worker.queueing import BoundedQueue, Closed
from worker.config import QueuePolicy, StoreConfig
from worker.store import VectorStore

log = logging.getLogger(__name__)


@dataclass
class Record:
    key: str
    vector: np.ndarray
    payload: dict
    frame: np.ndarray  # the prepared (model-size) frame, for the thumbnail
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # evidence kind -> (ext, data)


class Recorder:
    def __init__(self, store: VectorStore, evidence: EvidenceStore, cfg: StoreConfig, thumbnail_size: int,
                 capacity: int = 10_000) -> None:
        self.store = store
        self.evidence = evidence
        self.cfg = cfg
        self.thumbnail_size = thumbnail_size
        self.queue: BoundedQueue[Record] = BoundedQueue(capacity, QueuePolicy.DROP_OLDEST)
        self.dropped = 0
        self.written = 0
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, record: Record) -> None:
        self._idle.clear()
        if self.queue.put(record) is not None:
            self.dropped += 1
            log.warning("recorder backlog full: oldest record dropped (%d so far)", self.dropped)

    @property
    def pending(self) -> int:
        return len(self.queue)

    def flush(self, timeout: float) -> bool:
        """Wait until everything submitted so far is written."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._idle.wait(0.05) and not len(self.queue):
                return True
        return False

    def stop(self, timeout: float = 10) -> None:
        self.queue.close()
        self._thread.join(timeout)

    def _next_batch(self) -> list[Record] | None:
        try:
            first = self.queue.get(timeout=0.2)
        except Closed:
            return None
        if first is None:
            return []
        batch = [first]
        deadline = time.monotonic() + self.cfg.flush_s
        while len(batch) < self.cfg.batch_size:
            try:
                item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except Closed:
                break
            if item is None:
                break
            batch.append(item)
        return batch

    def _write(self, batch: list[Record]) -> None:
        items = []
        for rec in batch:
            thumb = encode(fit_size(rec.frame, self.thumbnail_size), "jpeg", 80)
            rec.payload["evidence"] = self.evidence.save(rec.key, {"thumbnail": ("jpg", thumb), **rec.files})
            items.append((rec.key, rec.vector, rec.payload))
        delay = 0.5
        while True:
            try:
                self.store.upsert(items)
                break
            except Exception as exc:
                log.warning("vector store write of %d points failed (%s); retrying in %.1f s", len(items), exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30)
        self.written += len(items)

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                self._idle.set()
                return
            if batch:
                try:
                    self._write(batch)
                except Exception:
                    log.exception("recorder failed on a batch of %d", len(batch))
            self.store.retain(self.evidence)  # retention (store.max_points/max_age_h, evidence.max_age_h), rate-limited
            if not len(self.queue):
                self._idle.set()
