"""Bounded queues between threads: bounded in items *and* bytes, with an explicit overflow policy.

Every queue in the worker is one of these (frames: ``limits.queue_*``; recorder
records; requests).  With a ``key`` (the camera, for frames) the eviction is fair:
a full queue gives up an item of whichever key holds the most, so one camera
flooding the worker loses its own frames and never pushes out another camera's.
A closed queue refuses new items (they are returned to the caller to answer).  Under ``block`` a full queue makes
:meth:`put` wait; the frame queue is kept from filling by the broker (the worker's MQTT v5 Receive Maximum,
worker/acks.py), so it waits only where a broker sends past it.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from worker.config import QueuePolicy

T = TypeVar("T")


class Closed(Exception):
    """The queue was closed and is empty."""


class BoundedQueue(Generic[T]):
    """FIFO of at most ``maxsize`` items and ``max_bytes`` bytes; :meth:`put` returns the item it had to drop."""

    def __init__(self, maxsize: int, policy: QueuePolicy, max_bytes: int | None = None,
                 size: Callable[[T], int] = lambda item: 0, key: Callable[[T], Hashable] = lambda item: None) -> None:
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self.policy = policy
        self._size = size
        self._key = key
        self._items: deque[T] = deque()
        self._per_key: Counter = Counter()
        self._bytes = 0
        self._cond = threading.Condition()
        self._closed = False

    def _full(self, incoming: int) -> bool:
        if not self._items:
            return False  # one item is always accepted, however large (its size was checked at admission)
        return len(self._items) >= self.maxsize or (self.max_bytes is not None and self._bytes + incoming > self.max_bytes)

    def _remove(self, item: T) -> None:
        self._items.remove(item)
        self._forget(item)

    def _forget(self, item: T) -> None:
        k = self._key(item)
        self._per_key[k] -= 1
        if not self._per_key[k]:
            del self._per_key[k]
        self._bytes -= self._size(item)

    def _victim(self, item: T) -> T:
        """Under a drop policy: the item to give up for ``item`` (may be ``item`` itself)."""
        incoming = self._key(item)
        counts = self._per_key.copy()
        counts[incoming] += 1
        heaviest = max(counts, key=lambda k: (counts[k], k == incoming))  # ties: the newcomer's key pays
        same = [x for x in self._items if self._key(x) == heaviest]
        if self.policy is QueuePolicy.DROP_OLDEST:
            return same[0] if same else item
        return item if heaviest == incoming else same[-1]

    def put(self, item: T) -> list[T]:
        """Queue ``item``; returns what was given up for it: evicted items, or ``[item]`` when refused or closed."""
        size = self._size(item)
        with self._cond:
            if self._closed:
                return [item]
            dropped: list[T] = []
            if self.policy is QueuePolicy.BLOCK:
                self._cond.wait_for(lambda: not self._full(size) or self._closed)
                if self._closed:
                    return [item]
            else:
                while self._full(size):
                    victim = self._victim(item)
                    if victim is item:
                        return [*dropped, item]
                    self._remove(victim)
                    dropped.append(victim)
            self._items.append(item)
            self._per_key[self._key(item)] += 1
            self._bytes += size
            self._cond.notify_all()
            return dropped

    def get(self, timeout: float | None = None) -> T | None:
        """Next item; None on timeout; raises :class:`Closed` once closed and drained."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout):
                return None
            if not self._items:
                raise Closed
            item = self._items.popleft()
            self._forget(item)
            self._cond.notify_all()
            return item

    def drain(self) -> list[T]:
        """Everything still queued, taken at once (at a stop, for the caller to answer each)."""
        with self._cond:
            items = list(self._items)
            self._items.clear()
            for item in items:
                self._forget(item)
            self._cond.notify_all()
            return items

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
