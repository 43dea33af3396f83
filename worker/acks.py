"""Deferred acknowledgements of received QoS 1 messages, sent in the order the messages came (MQTT v5, 4.6).

Under ``limits.queue_policy: block`` a frame is acknowledged only once the broker has its answer, so a worker that
dies holds no frame the broker thinks is taken: the broker hands every unanswered one to the next start.  Together
with the Receive Maximum the worker sends on CONNECT, the broker then stops sending once that many frames wait
unanswered, and buffers the surge itself; paho's network thread never waits.

A :class:`Ticket` stands for one received message.  It is finished once every hold on it is released (the message's
own, and one per answer on its way to the broker); the longest finished prefix of the tickets is acknowledged, under
one lock, so the PUBACKs leave in the order the PUBLISHes came whichever thread finishes them.  A ticket of a lost
connection acknowledges nothing (its packet id means nothing on the next one); what waits on it still runs.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Collection


class Ticket:
    """One received message, acknowledged once finished and every earlier one is."""

    def __init__(self, ledger: Acks, mid: int, qos: int) -> None:
        self._ledger = ledger
        self.mid, self.qos = mid, qos
        self._holds = 1  # the message's own, released by whoever is done with it
        self._then: list[Callable[[], None]] = []
        self.finished = False

    @property
    def ledger(self) -> Acks:
        return self._ledger

    def hold(self) -> Callable[[], None]:
        """One more thing to wait for (an answer on its way): returns its release, which acts once."""
        with self._ledger.lock:
            self._holds += 1
        once = threading.Event()

        def release() -> None:
            if not once.is_set():
                once.set()
                self.release()

        return release

    def release(self) -> None:
        """Release one hold; the last one finishes the ticket."""
        with self._ledger.lock:
            self._holds -= 1
            if self._holds or self.finished:
                return
            self.finished = True
            self._ledger.send_finished()
            then, self._then = self._then, []
        for callback in then:
            callback()

    def then(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once this ticket is finished (at once if it is)."""
        with self._ledger.lock:
            if not self.finished:
                self._then.append(callback)
                return
        callback()


class Acks:
    """The tickets of the connection now up, in the order their messages came."""

    def __init__(self, send: Callable[[int, int], object]) -> None:
        """``send(mid, qos)``: paho's ``Client.ack`` (it only queues the packet for the network thread)."""
        self._send = send
        self.lock = threading.RLock()
        # Bounded by the broker, not here: it sends no more unacknowledged QoS 1/2 messages than its in-flight window
        # (mosquitto's max_inflight_messages), and a ticket leaves only in order.  A lost connection's are dropped:
        # they acknowledge nothing.
        self._pending: deque[Ticket] = deque()

    def open(self, mid: int, qos: int) -> Ticket:
        """A ticket for a QoS 1 or 2 message just received (on paho's network thread, in arrival order)."""
        with self.lock:
            ticket = Ticket(self, mid, qos)
            self._pending.append(ticket)
            return ticket

    def send_finished(self) -> None:
        """Acknowledge the finished tickets at the head (called with the lock held)."""
        while self._pending and self._pending[0].finished:
            ticket = self._pending.popleft()
            self._send(ticket.mid, ticket.qos)

    def tail(self, tickets: Collection[Ticket]) -> set[Ticket]:
        """Those of ``tickets`` that no other message of this connection follows: left unfinished (the broker hands
        their messages to the next session), they hold up the acknowledgement of nothing else.  One followed by
        another message (a request answered, or to be answered at the stop) would keep that one unacknowledged, and
        the broker would hand it out again: a request served twice."""
        with self.lock:
            tail: set[Ticket] = set()
            for ticket in reversed(self._pending):
                if ticket not in tickets:
                    break
                tail.add(ticket)
            return tail

    def reset(self) -> None:
        """The connection is lost: its tickets acknowledge nothing (the broker hands their messages out again)."""
        with self.lock:
            self._pending.clear()

    @property
    def unacknowledged(self) -> int:
        """Messages received on this connection and not yet acknowledged."""
        with self.lock:
            return len(self._pending)
