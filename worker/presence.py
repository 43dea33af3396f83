"""A second worker process running as the same worker.id: found and named, instead of an unexplained reconnect loop.

Two edge boxes installed from one image or one config.yaml share ``worker.id`` and so the MQTT client id: the broker
then hands the session back and forth between them (mosquitto closes the older connection without a reason, so
each side only sees "disconnected"), and both answer frames and publish under the same worker topics.

Each process announces itself with its retained ``online`` message (user properties: a random instance id, its
host, pid, client id and connection number) and reads that topic back with its retained message.  Another
instance's ``online`` proves a second live process when it arrives live, or when a second distinct one arrives
from the broker's store: the retained ``online`` found at start may be a predecessor's that froze without its
last will being sent and was replaced by the service manager, so that one alone proves nothing.
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

from worker.wire import iso

log = logging.getLogger(__name__)

REPEAT_S = 600  # while the other process lives, the error is repeated this often (each reconnect would spam it)


@dataclass(frozen=True)
class Instance:
    """What a process says about itself in its ``online`` message."""

    instance: str
    host: str
    pid: str
    client_id: str
    connection: str = ""

    @classmethod
    def of(cls, props: dict[str, str]) -> Instance | None:
        """The sender of an ``online`` message from its user properties (None: a sender that does not say,
        e.g. an older worker or another client)."""
        if not props.get("instance"):
            return None
        return cls(props["instance"], props.get("host", "?"), props.get("pid", "?"), props.get("client_id", "?"),
                   props.get("connection", ""))


class Presence:
    """This process's identity on the broker, and the other processes seen running under the same worker.id."""

    def __init__(self, worker_id: str, client_id: str) -> None:
        self.worker_id = worker_id
        self.me = Instance(uuid.uuid4().hex[:12], socket.gethostname(), str(os.getpid()), client_id)
        self._lock = threading.Lock()
        self._connections = 0
        self._replayed: set[Instance] = set()
        self._other: Instance | None = None
        self._seen_at = 0.0
        self._sightings = 0
        self._reported_at = float("-inf")

    def online_properties(self) -> Properties:
        """User properties for this connection's ``online`` message (each connection numbered)."""
        with self._lock:
            self._connections += 1
            number = self._connections
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("instance", self.me.instance), ("host", self.me.host), ("pid", self.me.pid),
                              ("client_id", self.me.client_id), ("connection", str(number))]
        return props

    def observe(self, payload: bytes, replayed: bool, props: dict[str, str]) -> None:
        """An availability message on this worker's own topic (paho's thread); ``replayed``: from the broker's
        store (retained, or redelivered from the session), so possibly sent by a process that is gone."""
        sender = Instance.of(props)
        if payload != b"online" or sender is None or sender.instance == self.me.instance:
            return  # offline / stopped (a will or a clean stop), or our own announcement
        with self._lock:
            if replayed:
                self._replayed.add(sender)
                if len(self._replayed) < 2:
                    return  # possibly a dead predecessor's: only a second one proves a live process
            self._other, self._seen_at = sender, time.time()
            self._sightings += 1
            now = time.monotonic()
            report = now - self._reported_at >= REPEAT_S
            if report:
                self._reported_at = now
        if report:
            log.error("%s", self.explain(sender))

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
