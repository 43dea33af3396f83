"""A second worker process running as the same worker.id: found and named, instead of an unexplained reconnect loop.

Two edge boxes installed from one image or one config.yaml share ``worker.id`` and so the MQTT client id: the broker
then hands the session back and forth between them (mosquitto closes the older connection without a reason, so
each side only sees "disconnected"), and both answer frames and publish under the same worker topics.

Each process announces itself with its retained ``online`` message (user properties: a random instance id, its
host, pid, client id and announcement number) and reads that topic back with its retained message.  Another
instance's ``online`` proves a second live process when it arrives live, or when a second distinct one arrives
from the broker's store: the retained ``online`` found at start may be a predecessor's that froze without its
last will being sent and was replaced by the service manager, so that one alone proves nothing.

With ``mqtt.session_expiry_s: 0`` two processes with one client id never see each other's ``online`` live: each
takeover ends the session, and each only finds the other's retained last will (which carries the same identity) or
its ``online`` at its own next connect.  There the broker's closing of our connection again and again
(:meth:`Presence.takeover`, from the link) together with another instance's messages found after two or more of our
own connects is the proof.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from worker.supervise import Throttle
from worker.wire import iso

log = logging.getLogger(__name__)

REPEAT_S = 600  # while the other process lives, the error is repeated this often (each reconnect would spam it)
PROVEN_KEPT = 16  # other processes remembered (a flood of made-up announcements must not grow memory)
ECHO_S = 10.0  # an announcement not read back within this of its PUBACK: the broker does not let us read (or write) it
REANNOUNCE_S = 2.0  # at most this often, ``online`` again over another message on our availability topic


@dataclass(frozen=True)
class Instance:
    """What a process says about itself in its ``online`` message."""

    instance: str
    host: str
    pid: str
    client_id: str
    announcement: str = ""

    @classmethod
    def of(cls, props: dict[str, str]) -> Instance | None:
        """The sender of an ``online`` message from its user properties (None: a sender that does not say,
        e.g. an older worker or another client)."""
        if not props.get("instance"):
            return None
        return cls(props["instance"], props.get("host", "?"), props.get("pid", "?"), props.get("client_id", "?"),
                   props.get("announcement", ""))


class Presence:
    """This process's identity on the broker, and the other processes seen running under the same worker.id."""

    def __init__(self, worker_id: str, client_id: str) -> None:
        self.worker_id = worker_id
        self.me = Instance(uuid.uuid4().hex[:12], socket.gethostname(), str(os.getpid()), client_id)
        self._lock = threading.Lock()
        self._announcements = 0
        self._first_replayed: Instance | None = None
        self._proven: dict[str, None] = {}  # instance ids proven live, oldest first (bounded)
        self._other: Instance | None = None
        self._seen_at = 0.0
        self._sightings = 0
        self._report = Throttle(REPEAT_S)
        self._unread = False  # an announcement was made and none has been read back since
        self._delivered_at: float | None = None  # when the broker took it (its PUBACK), while unread
        self._owed = False  # another message replaced our retained ``online``: announce again
        self._reannounce = Throttle(REANNOUNCE_S)
        self._found: Instance | None = None  # another instance whose status messages this process read last...
        self._found_after: set[int] = set()  # ...and after which of our announcements (the first two kept)
        self.read_back: bool | None = None  # whether our last announcement came back (None: not yet known)

    def online_properties(self) -> Properties:
        """User properties for an ``online`` announcement (each numbered: at every connect, and again when another
        process is found)."""
        with self._lock:
            self._announcements += 1
            number = self._announcements
            self._unread, self._delivered_at, self._owed = True, None, False
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("instance", self.me.instance), ("host", self.me.host), ("pid", self.me.pid),
                              ("client_id", self.me.client_id), ("announcement", str(number))]
        return props

    def delivered(self) -> None:
        """The broker has taken an announcement (its PUBACK; at once at QoS 0): the echo check's clock starts.  The
        broker sends the echo with or before the PUBACK, behind whatever the session held for us (a backlog of
        frames), so a stream of frames arriving meanwhile does not delay the verdict."""
        with self._lock:
            if self._unread and self._delivered_at is None:
                self._delivered_at = time.monotonic()

    def will_properties(self) -> Properties:
        """The last will says who it is, as ``online`` does: read by another process at its next connect."""
        return self._identity(Properties(PacketTypes.WILLMESSAGE))

    def stopped_properties(self) -> Properties:
        """A clean stop's ``stopped`` says who it is, as the will does: a process left running under the same
        worker.id tells it from its own status, and announces itself again."""
        return self._identity(Properties(PacketTypes.PUBLISH))

    def _identity(self, props: Properties) -> Properties:
        props.UserProperty = [("instance", self.me.instance), ("host", self.me.host), ("pid", self.me.pid),
                              ("client_id", self.me.client_id)]
        return props

    def observe(self, payload: bytes, replayed: bool, props: dict[str, str]) -> bool:
        """An availability message on this worker's own topic (paho's thread); ``replayed``: from the broker's
        store (retained, or redelivered from the session), so possibly sent by a process that is gone.  True when
        it proves a process not proven before: the caller announces itself again, so that the other one, which
        may have found only our retained ``online`` from before it started, learns of us too.  Any other live
        message there but ``online`` (another process's ``stopped`` or last will) has replaced our retained
        ``online``: one is owed (:meth:`owed`), or this process would read stopped or offline for as long as it
        runs.  (Another's ``online`` owes none: two live processes would answer each other for ever.)"""
        sender = Instance.of(props)
        if sender is not None and sender.instance == self.me.instance:
            if payload == b"online":
                with self._lock:
                    self._unread, self._delivered_at, self.read_back = False, None, True
            return False
        if not replayed and payload != b"online":
            with self._lock:
                self._owed = True
        if sender is None:
            return False  # an older worker's or another client's
        with self._lock:
            if sender != self._found:
                self._found, self._found_after = sender, set()
            if len(self._found_after) < 2:
                self._found_after.add(self._announcements)
            if payload != b"online":
                return False  # offline / stopped (a will or a clean stop): proof only with a takeover (takeover())
            if replayed and self._first_replayed in (None, sender):
                self._first_replayed = sender
                return False  # possibly a dead predecessor's: only a second one proves a live process
            return self._sighted(sender)

    def takeover(self) -> None:
        """The broker keeps closing our connection (the link's guess: another client with our client id).  Where the
        same other instance's messages were found after two or more of our connects, with our client id, that is
        the process: named in the log and the stats.  A dead predecessor's will is found after our first connect
        only, our own ``online`` replacing it."""
        with self._lock:
            other = self._found
            if other is not None and other.client_id == self.me.client_id and len(self._found_after) >= 2:
                self._sighted(other)

    def _sighted(self, sender: Instance) -> bool:
        """Another live process (under ``_lock``); True when it was not proven before."""
        self._other, self._seen_at = sender, time.time()
        self._sightings += 1
        new = sender.instance not in self._proven
        self._proven[sender.instance] = None
        while len(self._proven) > PROVEN_KEPT:
            self._proven.pop(next(iter(self._proven)))
        if self._report.ready(force=new):  # said before the stats can show it
            log.error("%s", self.explain(sender))
        return new

    def owed(self) -> bool:
        """True when an announcement is owed (:meth:`observe`) and none was made in the last ``REANNOUNCE_S``: a
        stream of messages on our topic (a client publishing there) costs at most one announcement per period, and
        one owed meanwhile is made at its end."""
        with self._lock:
            if not self._owed or not self._reannounce.ready():
                return False
            self._owed = False
            return True

    def unread(self) -> bool:
        """True, once per announcement, when it has not come back within ``ECHO_S`` of the broker taking it
        (:meth:`delivered`): the broker takes our subscription to our own topic and drops what we may not read
        (mosquitto's ``acl_file`` does, and does the same to frames), or refused the announcement itself; then no
        second process can be seen either."""
        with self._lock:
            if self._delivered_at is None or time.monotonic() - self._delivered_at < ECHO_S:
                return False
            self._unread, self._delivered_at, self.read_back = False, None, False
            return True

    def explain(self, other: Instance) -> str:
        same = other.client_id == self.me.client_id
        return (f"another worker process runs as worker.id {self.worker_id!r} on this broker: host {other.host}, pid "
                f"{other.pid} (this one: host {self.me.host}, pid {self.me.pid}). "
                + (f"Both connect as MQTT client {self.me.client_id!r}, so the broker takes the session from one to "
                   "give it to the other, again and again (the disconnects in this log); "
                   if same else "Both publish under the same worker topics; ")
                + "give each worker its own worker.id (and mqtt.client_id), or stop one of them")

    def identity(self) -> dict:
        """For the stats topic: which process sent it."""
        return {"host": self.me.host, "pid": self.me.pid, "instance": self.me.instance}

    def snapshot(self) -> dict | None:
        """For the stats topic: the other process last seen (None while none was)."""
        with self._lock:
            if self._other is None:
                return None
            o = self._other
            return {"host": o.host, "pid": o.pid, "client_id": o.client_id, "instance": o.instance,
                    "last_seen": iso(self._seen_at), "sightings": self._sightings}
