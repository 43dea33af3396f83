"""The bounded frame queue between the MQTT thread and the inference threads, with an explicit overflow policy."""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

from worker.config import QueuePolicy

T = TypeVar("T")


class Closed(Exception):
    """The queue was closed and is empty."""


class BoundedQueue(Generic[T]):
    """FIFO of at most ``maxsize`` items; :meth:`put` returns the item it had to drop, if any."""

    def __init__(self, maxsize: int, policy: QueuePolicy) -> None:
        self.maxsize = maxsize
        self.policy = policy
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, item: T) -> T | None:
        with self._cond:
            dropped = None
            if len(self._items) >= self.maxsize:
                if self.policy is QueuePolicy.DROP_NEWEST:
                    return item
                if self.policy is QueuePolicy.DROP_OLDEST:
                    dropped = self._items.popleft()
                else:
                    self._cond.wait_for(lambda: len(self._items) < self.maxsize or self._closed)
            self._items.append(item)
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
            self._cond.notify_all()
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._items)
