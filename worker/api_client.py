"""A client of the worker's MQTT v5 request/response APIs (similarity queries, labels, control).

The CLI (``python -m worker query``/``labels``) and the operator console both use it, so
every caller goes through the same worker code path: a request is published on
``<prefix>/query`` or ``<prefix>/label`` with a ``response_topic`` and
``correlation_data``; the worker answers on that topic.  One connection serves many
concurrent requests: answers are matched to requests by their correlation data.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence

import paho.mqtt.client as mqtt

from worker.config import Config
from worker.mqtt import MqttLink, publish_properties
from worker.topics import Topics
from worker.wire import parsed_json


class ApiError(Exception):
    """The broker cannot be reached, no worker answered in time (no answer from the worker at all), or what came
    back is no answer."""


class Unanswered(ApiError):
    """The request went out and no answer came in time: a worker may still have taken it (and carry it out)."""


class Refused(ApiError):
    """The broker refused the request in its PUBACK (its ACL does not let this login write the topic): nothing reached
    a worker, and asking again as the same login cannot help."""


class NotConnected(ApiError):
    """The console's (or CLI's) link to the broker is down: the request was not sent."""


def _answer(payload: bytes | bytearray) -> object:
    """An answer's JSON, or a short account of the bytes that are none (refused by :meth:`ApiClient.request`)."""
    value, problem = parsed_json(payload)
    return value if problem is None else f"{len(payload)} bytes that are {problem}"


class ApiClient:
    """One MQTT v5 connection for requests to the worker; ``on_message`` gets every other subscribed message."""

    def __init__(self, cfg: Config, name: str, subscriptions: Sequence[str] = (), qos: int | None = None) -> None:
        self.topics = Topics(cfg.topics.prefix, cfg.worker.id)
        self.timeout_s = cfg.query.timeout_s
        token = uuid.uuid4().hex
        self.reply_topic = f"{self.topics.query}/response/{token}"
        mqtt_cfg = cfg.mqtt.model_copy(update={"session_expiry_s": 0, **({"qos": qos} if qos is not None else {})})
        self.link = MqttLink(mqtt_cfg, f"edge-inspect-{name}-{token[:12]}",
                             subscriptions=[self.reply_topic, *subscriptions])
        self.link.on_message = self._on_message
        self.on_message: Callable[[mqtt.MQTTMessage], None] | None = None
        self._pending: dict[bytes, tuple[threading.Event, list[object]]] = {}
        self._lock = threading.Lock()

    def start(self, timeout: float | None = None) -> None:
        """Connect; raises :class:`ApiError` when the broker refuses us (at once: asking again with the same
        credentials cannot help) or cannot be reached within ``timeout``, saying why."""
        self.link.start()
        deadline = time.monotonic() + (self.timeout_s if timeout is None else timeout)
        while not self.link.connected.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            if self.link.turned_away.is_set() or time.monotonic() >= deadline:
                self.link.stop()
                raise ApiError(f"{self.link.problem or 'cannot reach the broker'} (broker "
                               f"{self.link.cfg.host}:{self.link.cfg.port}, mqtt: in the config)")

    def close(self) -> None:
        self.link.stop()

    def __enter__(self) -> ApiClient:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self.reply_topic:
            correlation = getattr(msg.properties, "CorrelationData", None)
            with self._lock:
                waiter = self._pending.get(correlation) if correlation is not None else None
            if waiter is not None:
                waiter[1].append(_answer(msg.payload))
                waiter[0].set()
        elif self.on_message is not None:
            self.on_message(msg)

    def request(self, topic: str, body: dict, timeout: float | None = None) -> dict:
        """Publish ``body`` as a request on ``topic`` and return the worker's JSON answer (blocking, thread-safe);
        :class:`NotConnected` at once while the link is down, after the first attempt to connect if it is still under
        way (a request made as the console starts)."""
        timeout = self.timeout_s if timeout is None else timeout
        if self.link.problem is None:  # no attempt has failed yet: the first one is under way
            self.link.wait_connected(timeout)
        if not self.link.connected.is_set():  # said at once: waiting out the timeout for the link tells nobody more
            raise NotConnected(f"not connected to the broker at {self.link.cfg.host}:{self.link.cfg.port} "
                               f"({self.link.problem or 'not connected yet'})")
        correlation = uuid.uuid4().hex.encode()
        done = threading.Event()
        answer: list[object] = []
        refusal: list[str] = []

        def refused(reason: str) -> None:
            refusal.append(reason)
            done.set()
        with self._lock:
            self._pending[correlation] = (done, answer)
        try:
            # expires with the wait: a label sent while the worker is away would otherwise be applied at its next
            # start, long after this caller was told it failed (a second less: brokers count it in whole seconds)
            self.link.publish(topic, json.dumps(body), qos=1, properties=publish_properties(
                content_type="application/json", response_topic=self.reply_topic, correlation=correlation,
                expiry_s=max(1.0, timeout - 1)), refused=refused)
            if not done.wait(timeout):
                raise Unanswered(f"no answer from a worker on {topic} within {timeout:g} s")
            if refusal:
                raise Refused(f"the broker refused the request on {topic} ({refusal[0]}), so no worker got it: its ACL "
                              f"must let {self.link.who} write that topic")
            if not isinstance(answer[0], dict):  # anyone may publish on the reply topic with a correlation seen on it
                raise ApiError(f"the answer on {self.reply_topic} is not a JSON object: {answer[0]}")
            return answer[0]
        finally:
            with self._lock:
                del self._pending[correlation]

    def query(self, request: dict, timeout: float | None = None) -> dict:
        """Similar past frames (the request and answer formats are in README "Worker API")."""
        return self.request(self.topics.query, request, timeout)

    def label(self, request: dict, timeout: float | None = None) -> dict:
        """Set a frame's label (``action: set``/``unlabel``), list what false alarms taught the model
        (``action: extensions``) or export every label (``action: export``)."""
        return self.request(self.topics.label, request, timeout)

    def control(self, request: dict, timeout: float | None = None) -> dict:
        """A command to this worker (reload, rollback, status, export_capture), on its own control topic."""
        return self.request(self.topics.control, request, timeout)
