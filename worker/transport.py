"""The seam between paho and the worker: what an inbound message is, and what publishing needs.

The pipeline and the request server see only :class:`Inbound` and a :class:`Transport`; paho stays
in worker/mqtt.py (:class:`worker.mqtt.MqttLink` is the production transport).  So admission,
fairness and request handling run the same with :class:`MemoryTransport`, in-process, without a
broker (tests, benchmarks), much as Frigate's ``comms/base_communicator.py`` separates its MQTT
and websocket communicators from the code that uses them.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Inbound:
    """One received message: topic, payload, QoS, v5 user properties and request/response properties."""

    topic: str
    payload: bytes
    qos: int = 0
    user: dict[str, str] = field(default_factory=dict)
    response_topic: str | None = None
    correlation: bytes | None = None
    mid: int = 0
    # redelivered (DUP): sent to us before, unacknowledged.  Not the retain flag: frames are subscribed
    # retain-as-published, so a camera's live frame published retained carries it too (retained ones waiting at
    # subscribe time are not sent at all: retain handling 2); the watched availability topic reads ``retained``
    replayed: bool = False
    repeated: frozenset[str] = frozenset()  # user property names given more than once (``user`` keeps the last)
    retained: bool = False  # the retain flag: as published on frame topics, from the broker's store on watched ones

    @classmethod
    def from_paho(cls, msg: Any) -> Inbound:
        """From a paho ``MQTTMessage`` (the last value wins on duplicate user properties; their names are kept in
        ``repeated``, for a frame to be refused when one of its metadata fields is ambiguous)."""
        props = getattr(msg, "properties", None)
        pairs = list(getattr(props, "UserProperty", None) or [])
        names = Counter(name for name, _ in pairs)
        return cls(msg.topic, bytes(msg.payload), msg.qos, dict(pairs),
                   getattr(props, "ResponseTopic", None) or None, getattr(props, "CorrelationData", None), msg.mid,
                   bool(msg.dup), frozenset(name for name, n in names.items() if n > 1), bool(msg.retain))


class Transport(Protocol):
    def publish(self, topic: str, payload: bytes | str, *, retain: bool = False, qos: int | None = None,
                properties: Any = None, accepted: Callable[[], None] | None = None,
                settled: Callable[[], None] | None = None) -> Any:
        """Send one message; raises :class:`worker.mqtt.PacketTooLarge` past the broker's packet size.

        ``accepted`` runs once the message will be sent and before it leaves, so what it counts is counted before
        any subscriber can see the message.  ``settled`` runs once the broker has it (its PUBACK; at once for QoS 0),
        or once it is certain never to go (the publish raised)."""


@dataclass
class Published:
    topic: str
    payload: bytes
    properties: Any


class MemoryTransport:
    """A transport that keeps what is published, for running the pipeline without a broker."""

    def __init__(self) -> None:
        self.published: list[Published] = []
        self.cond = threading.Condition()

    def publish(self, topic: str, payload: bytes | str, *, retain: bool = False, qos: int | None = None,
                properties: Any = None, accepted: Callable[[], None] | None = None,
                settled: Callable[[], None] | None = None) -> None:
        if accepted is not None:
            accepted()
        with self.cond:
            self.published.append(Published(topic, payload.encode() if isinstance(payload, str) else payload,
                                            properties))
            self.cond.notify_all()
        if settled is not None:
            settled()

    def on(self, topic: str) -> list[Published]:
        with self.cond:
            return [p for p in self.published if p.topic == topic]

    def wait(self, predicate, count: int, timeout: float) -> list[Published]:
        """The published messages matching ``predicate`` once there are ``count`` of them (else what there is)."""
        with self.cond:
            self.cond.wait_for(lambda: sum(map(predicate, self.published)) >= count, timeout)
            return [p for p in self.published if predicate(p)]
