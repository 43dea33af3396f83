"""MQTT v5 connection (paho-mqtt 2.x): credentials, TLS, last will, persistent session, reconnects.

paho reconnects by itself (``connect_async`` + ``loop_start`` + backoff); on every
(re)connect we subscribe again and re-publish availability.  paho does not enforce
the broker's CONNACK ``Maximum Packet Size``: an oversize publish makes the broker
drop the connection and paho loops reconnecting, so :meth:`MqttLink.publish`
refuses such payloads itself.  Nor does it keep to the CONNACK's ``Receive Maximum``: :func:`fit_window` does.
paho also drops the connection on a received string property it
deems malformed (:func:`_read_utf` reads them leniently instead), and on a reason code its table does not list for
the packet that carries it (:func:`_reason_name`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt import properties as paho_properties
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from worker.acks import Acks
from worker.config import ConfigError, MQTTConfig, TLSConfig
from worker.supervise import Throttle

log = logging.getLogger(__name__)


def _read_utf(buffer: bytes, maxlen: int) -> tuple[str, int]:
    """A string of a received packet, read as paho 2.2 reads it but without dropping the connection over its content.

    paho raises MalformedPacket for U+FEFF (which MQTT v5, 1.5.4, says a receiver must keep) and U+0000, and closes
    the connection; the broker then delivers the same message again on every reconnect, so one camera's user
    property would wedge the worker for good.  Read leniently (undecodable bytes as U+FFFD), the frame reaches the
    metadata check, which refuses it with an error answer, and the message is acknowledged.
    """
    if maxlen < 2:
        raise MalformedPacket("Not enough data to read string length")
    length = int.from_bytes(buffer[:2], "big")
    if length > maxlen - 2:
        raise MalformedPacket("Length delimited string too long")
    return bytes(buffer[2 : 2 + length]).decode("utf-8", errors="replace"), length + 2


paho_properties.readUTF = _read_utf  # looked up by name when paho unpacks received properties

_strict_name = ReasonCode.__getName__


def _reason_name(self: ReasonCode, packet_type: int, identifier: int) -> str:
    """A received reason code's name, read leniently: paho 2.2 drops the connection over a code the MQTT v5 table
    does not list for that packet, and mosquitto answers a publish over its ``message_size_limit`` with a PUBACK of
    149 (Packet too large), a code the table gives DISCONNECT only.  paho then resent the publish at every
    reconnect, for ever, and the frames behind it were delivered and scored again each time."""
    try:
        return _strict_name(self, packet_type, identifier)
    except (KeyError, ValueError):
        names = ReasonCode.names.get(identifier)
        return next(iter(names)) if names else f"reason code {identifier}"


def _unpack_reason(self: ReasonCode, buffer: bytes | bytearray) -> int:
    self.value = buffer[0]
    return 1


ReasonCode.__getName__ = _reason_name  # type: ignore[method-assign,assignment]
ReasonCode.unpack = _unpack_reason  # type: ignore[method-assign]


class PacketTooLarge(Exception):
    """A publish that the broker announced it would refuse (CONNACK Maximum Packet Size)."""


def publish_properties(user: dict[str, str] | None = None, content_type: str | None = None,
                       response_topic: str | None = None, correlation: bytes | None = None,
                       expiry_s: float | None = None) -> Properties:
    """``expiry_s``: the broker discards the message once it has waited this long for a subscriber (MQTT v5
    Message Expiry Interval, whole seconds)."""
    props = Properties(PacketTypes.PUBLISH)
    if expiry_s is not None:
        props.MessageExpiryInterval = max(1, math.ceil(expiry_s))
    if user:
        props.UserProperty = [(k, str(v)) for k, v in user.items()]
    if content_type:
        props.ContentType = content_type
    if response_topic:
        props.ResponseTopic = response_topic
    if correlation is not None:
        props.CorrelationData = correlation
    return props


def user_properties(msg: mqtt.MQTTMessage) -> dict[str, str]:
    """User properties of a received v5 message as a dict (the last value wins on duplicates)."""
    props = getattr(msg, "properties", None)
    return dict(getattr(props, "UserProperty", None) or [])


def tls_context(tls: TLSConfig) -> ssl.SSLContext:
    """The client's TLS context: the broker's certificate checked against ``ca_file`` (else the system's CAs) and
    against the host name, unless ``insecure_skip_verify``.  An encrypted client key is refused, never its pass phrase
    asked for: OpenSSL asks on the terminal, where a worker or console started from a shell waited at the prompt, and
    a service, which has none, stopped with "Invalid argument"."""
    # as paho's tls_set makes it: not create_default_context, whose stricter checks (Python 3.13) refuse certificates
    # that older or hand-made CAs issue (without an authority key identifier, for one)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls.ca_file is not None:
        context.load_verify_locations(str(tls.ca_file))
    else:
        context.load_default_certs()
    if tls.insecure_skip_verify:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if tls.cert_file is not None:
        key = tls.key_file or tls.cert_file

        def encrypted() -> str:
            raise ConfigError(f"mqtt.tls: the client key {key} is encrypted with a pass phrase, which nothing here can "
                              f"ask for: store it decrypted (openssl pkey -in {key} -out <new file>), readable only by "
                              "the user the worker runs as, and name that file in mqtt.tls.key_file")

        context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None, password=encrypted)
    return context


CERT_NOT_YET_VALID, CERT_HAS_EXPIRED = 9, 10  # OpenSSL's X509_V_ERR_ codes (ssl.SSLCertVerificationError.verify_code)


def _client(cfg: MQTTConfig, client_id: str) -> mqtt.Client:
    """A paho MQTT v5 client of ``client_id`` with the configured login and TLS; ConfigError where the password or
    certificate files cannot be read (read here, not when the config is checked: the files may exist only where the
    worker runs)."""
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
    if cfg.username is not None:
        try:
            secret = cfg.secret()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"mqtt.password_file: {cfg.password_file} cannot be read ({exc})") from None
        client.username_pw_set(cfg.username, secret)
    if cfg.tls is not None:
        try:
            client.tls_set_context(tls_context(cfg.tls))
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            files = ", ".join(f"{k} {v}" for k, v in cfg.tls.model_dump().items() if isinstance(v, Path))
            raise ConfigError(f"mqtt.tls: the certificate files cannot be loaded ({files}): {exc}") from None
    return client


def fit_window(client: mqtt.Client, window: int, receive_maximum: int) -> int:
    """Keep ``client``'s unacknowledged QoS 1 messages within the broker's CONNACK Receive Maximum, and return the window
    now used.  A broker past whose Receive Maximum a client sends closes its connection (MQTT v5 3.3.4; HiveMQ's default
    is 10, paho's window 20), and paho sends its whole backlog again at the reconnect: it would never get through.

    paho 2.x lets its window be set only while no connection is open, before any CONNACK says what the broker takes,
    and at a reconnect it marks its backlog to be sent after the CONNACK callback without counting it, so what is
    published meanwhile (the worker's announcement, a frame's result) goes out on top of it.  So this runs on paho's
    thread inside its CONNACK handling, holding its lock: it sets the window, sends the backlog that fits now (counted,
    in order, as paho would) and puts the rest back in paho's queue, which paho sends as PUBACKs free the window."""
    window = min(window, receive_maximum)
    with client._out_message_mutex:
        client._max_inflight_messages = window
        for m in client._out_messages.values():
            if m.qos == 1 and m.state == mqtt.mqtt_ms_publish:
                if client._inflight_messages < window:
                    client._inflight_messages += 1
                    m.state = mqtt.mqtt_ms_wait_for_puback
                    client._send_publish(m.mid, m.topic.encode(), m.payload, m.qos, m.retain, m.dup,
                                         properties=m.properties)
                else:
                    m.state = mqtt.mqtt_ms_queued
    return window


def _untrusted_advice(code: int) -> str:
    """What to mend for a broker certificate the client refused.  Its dates are read by this box's clock, which on an
    edge box without a battery-backed clock or NTP yet can be years off: the CA file and the host name are then
    right, and were what the advice named."""
    if code in (CERT_NOT_YET_VALID, CERT_HAS_EXPIRED):
        return ("its validity dates are read by this box's clock: where the clock is wrong (date -u; no NTP yet, a "
                "clock reset at boot) set it, else " + ("renew the broker's certificate" if code == CERT_HAS_EXPIRED
                                                        else "make the broker a certificate valid from now"))
    return "mqtt.tls.ca_file must hold the CA that signed it, and the certificate must name mqtt.host"


TAKEOVER_CLOSES, TAKEOVER_WINDOW_S = 3, 60.0  # closes by the broker within the window that suggest a takeover
# CONNACK reason codes after which the same attempt may succeed later: the broker unavailable or busy, a quota or
# a connection rate, the will's retain flag or QoS (the link then lowers them), so retrying is worth it
TRANSIENT_REFUSALS = frozenset({0x88, 0x89, 0x97, 0x9A, 0x9B, 0x9F})
RESUBSCRIBE_S = (2.0, 60.0)  # a subscription the broker refused is asked for again after 2 s, doubling up to 60 s
OWNERS = "owners"  # the record's key for each session's owner (client keys hold an "@")
EARLIER_SESSION_S = 10.0  # the broker's CONNACK to ending a session this worker held under an earlier client id
LEFT_KEPT = 64  # filters of an earlier configuration left (remembered, so each is asked for once; bounded)


class MqttLink:
    """One client connection; callers set ``on_message`` and ``on_connected`` before :meth:`start`."""

    def __init__(self, cfg: MQTTConfig, client_id: str, subscriptions: Sequence[str] = (),
                 will: tuple[str, str] | None = None, retained: bool = True, watch: Sequence[str] = (),
                 stale: Sequence[str] = (), record: Path | None = None, will_properties: Properties | None = None,
                 on_takeover: Callable[[], None] | None = None, prefix: str | None = None,
                 receive_maximum: int | None = None, owner: str | None = None) -> None:
        """``retained`` False: the broker keeps its retained messages to itself when we subscribe (MQTT v5 retain
        handling 2), so a frame or a command a client published with the retain flag is not handed to us again at
        every start and reconnect; what is published while we are subscribed still arrives.  ``watch``: topics
        subscribed with their retained message whatever ``retained`` says (the worker's own status), at QoS 0: the
        broker queues nothing of them for the session while we are away, and nothing waits for our acknowledgement
        (our own last ``stopped`` would otherwise stay in the session after every shutdown).  ``stale``: filters a
        resumed session may still hold from an earlier configuration (a persistent session keeps its subscriptions),
        unsubscribed at every connect that finds a session.  ``record``: a file where the filters this session holds
        are remembered, so that those an earlier configuration subscribed and this one does not are left too.
        ``receive_maximum``: at most this many QoS 1 messages the broker may send us unacknowledged (MQTT v5 Receive
        Maximum on CONNECT; None: the protocol's 65535), for messages acknowledged through :attr:`acks`.  ``owner``:
        what stays this worker's when its client id changes (its spool folder, which no other live worker holds),
        recorded beside its filters: the sessions a record gives this owner under other client ids are ended."""
        self.cfg = cfg
        self.subscriptions = list(subscriptions)
        self.stale = list(stale)
        self.record, self._record_key = record, f"{client_id}@{cfg.host}:{cfg.port}"
        self._unlocked_said = False  # said once: the record's lock file cannot be locked
        self.owner = owner
        self._earlier_pending = owner is not None  # this process has not looked for earlier sessions yet
        self._leaving: int | None = None  # the UNSUBSCRIBE of filters an earlier configuration left, until its UNSUBACK
        self._unsubscribed: dict[int, threading.Event] = {}  # UNSUBSCRIBE message id -> set at its UNSUBACK
        self._left: set[str] = set()  # filters left by :meth:`leftover`
        self._left_done: threading.Event | None = None  # set at the UNSUBACK of the last of them
        self._leftover_log = Throttle(60)
        self._subscribing: dict[int, list[tuple[str, int]]] = {}  # SUBSCRIBE message id -> (topic, QoS asked)
        self._refused: dict[str, str] = {}  # topic -> the broker's reason, while its last SUBACK refused it
        self._resubscribe_at, self._resubscribe_after = float("inf"), RESUBSCRIBE_S[0]
        self.publishes_refused = 0  # QoS 1 messages the broker refused in its PUBACK (lost)
        self.last_sent: mqtt.MQTTMessageInfo | None = None  # the last publish: once acknowledged, so is every one before
        self.last_refused: dict[str, str] | None = None  # the last one's topic and the broker's reason
        self._refusals_said, self._refusal_log = 0, Throttle(60)
        self.client_id = client_id
        self._closed_at: deque[float] = deque(maxlen=TAKEOVER_CLOSES)  # when the broker last closed a connection
        self._takeover_said = -float("inf")
        self._lock = threading.Lock()
        self.watch = list(watch)
        self._retain_handling = 0 if retained else 2
        self.on_message: Callable[[mqtt.MQTTMessage], None] | None = None
        self.on_connected: Callable[[], None] | None = None
        self.max_packet_size: int | None = None
        self.connected = threading.Event()
        # the broker has answered this connection's subscriptions (SUBACK): what is published to them from now on
        # reaches this client (a publisher on another connection races the SUBSCRIBE until then)
        self.subscribed = threading.Event()
        self._subscribing_on_connect: int | None = None  # the message id of that SUBSCRIBE
        self.connect_failures = 0  # attempts that did not reach the broker since the last connection
        self.problem: str | None = None  # why there is no connection now (None while connected or not yet tried)
        self.connect_refused = False  # the problem is the broker's refusal in its CONNACK, not a network failure
        self.on_change: Callable[[], None] | None = None  # called (on paho's thread) when connected, subscribed or problem changes
        # the broker refused these credentials/settings, or its certificate failed verification: retrying cannot help
        self.turned_away = threading.Event()
        self._next_failure_log = 0.0
        self._attempting = False  # a connection attempt is under way: no CONNACK, refusal or failure yet
        self.client = _client(cfg, client_id)
        if cfg.tls is not None and cfg.tls.insecure_skip_verify:
            log.warning("TLS certificate verification is OFF (mqtt.tls.insecure_skip_verify)")
        self.client.max_queued_messages_set(0)
        self.window = self.client.max_inflight_messages  # ours; a broker's CONNACK may lower it (fit_window)
        self.receive_maximum = receive_maximum
        self.acks = Acks(self.client.ack)
        self._settle: dict[int, Callable[[], None]] = {}  # message id of a QoS 1 publish -> run at its PUBACK
        self._tell: dict[int, Callable[[str], None]] = {}  # message id of a QoS 1 publish -> told the broker's refusal
        self.client.reconnect_delay_set(min_delay=cfg.reconnect_min_s, max_delay=cfg.reconnect_max_s)
        self.will, self.will_properties, self.on_takeover = will, will_properties, on_takeover
        self.prefix = prefix  # the worker's own topics (topics.prefix); a refused publish outside it was a requester's
        self.max_qos, self.retain_available = 1, True  # as the broker's last CONNACK announced
        self._window_said: int | None = None  # the lowered window last logged
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True, properties=will_properties)
        self.client.on_pre_connect = self._on_pre_connect
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_message = self._on_message
        self.client.on_unsubscribe = self._on_unsubscribe
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.cfg.session_expiry_s
        if self.receive_maximum is not None:
            props.ReceiveMaximum = self.receive_maximum
        self.client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive_s,
                                  clean_start=self.cfg.session_expiry_s == 0, properties=props)
        self.client.loop_start()

    def unsubscribe(self, timeout: float) -> bool:
        """Leave every subscription (not the watched topics) and wait for the broker's UNSUBACK: what it sent before
        is then in hand, and nothing more comes; False when not connected or not answered in time."""
        topics, self.subscriptions = self.subscriptions, []  # a reconnect meanwhile does not take them again
        if not topics or not self.connected.is_set():
            return False
        done = threading.Event()
        with self._lock:
            result, mid = self.client.unsubscribe(topics)
            if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
                return False
            self._unsubscribed[mid] = done
        return done.wait(timeout)

    def leftover(self, topic: str, filters: list[str]) -> None:
        """A message on ``topic`` came through none of this configuration's subscriptions: a persistent session kept
        one of an earlier configuration (where mqtt.session_file did not remember it).  ``filters`` (those that can
        have delivered it; none of this configuration's) are unsubscribed, once each; said at once, and once a
        minute while messages still come after the broker confirmed it."""
        wanted = set(self.subscriptions + self.watch)
        with self._lock:
            new = [f for f in filters if f not in self._left and f not in wanted][: max(0, LEFT_KEPT - len(self._left))]
            in_flight = self._left_done is not None and not self._left_done.is_set()
            if new and self.connected.is_set():
                result, mid = self.client.unsubscribe(new)
                if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                    self._left.update(new)
                    self._left_done = self._unsubscribed[mid] = threading.Event()
        if new:
            log.warning("a message on %s came through a subscription this configuration does not hold: the broker's "
                        "persistent session kept it from an earlier configuration (topics.prefix, worker.id or a "
                        "camera's topic changed); acknowledged and ignored, and %s left", topic[:200], ", ".join(new))
        elif not in_flight and self._leftover_log.ready():
            log.warning("messages still come on %s through a subscription of an earlier configuration: the session "
                        "holds a filter that cannot be told from the message (a shared subscription of an earlier "
                        "topics.share_group); they are acknowledged and ignored until the session ends (connect once "
                        "with mqtt.session_expiry_s: 0)", topic[:200])

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._lock:
            done = self._unsubscribed.pop(mid, None)
        if done is not None:
            done.set()
        if mid == self._leaving:
            self._leaving = None
            self._remember(self.subscriptions + self.watch)

    def _read_record(self) -> dict:
        """What :attr:`record` holds ({} when there is none, or it cannot be read or is not a record)."""
        try:
            sessions = json.loads(self.record.read_text()) if self.record else {}
        except (OSError, ValueError):
            return {}
        return sessions if isinstance(sessions, dict) else {}

    def _recorded(self) -> list[str]:
        """The filters :attr:`record` says this client's session holds at this broker ([] when unknown)."""
        filters = self._read_record().get(self._record_key, [])
        return [f for f in filters if isinstance(f, str)] if isinstance(filters, list) else []

    def _remember(self, filters: list[str]) -> None:
        """Record the filters the session holds now, and whose session it is (:attr:`owner`)."""
        def change(sessions: dict) -> None:
            sessions[self._record_key] = filters
            if self.owner is not None:
                owners = sessions.get(OWNERS)
                sessions[OWNERS] = {**(owners if isinstance(owners, dict) else {}), self._record_key: self.owner}
        self._rewrite(change)

    def _rewrite(self, change: Callable[[dict], None]) -> None:
        """Change the record (written whole, then renamed: a crash leaves the old record).

        The file holds a record per client id: two workers started from one config.yaml (``worker.id`` set apart)
        share it.  Each reads, changes and writes it holding an OS lock on ``<file>.lock``: unguarded, the one that
        read before the other wrote put back the file without the other's record (and both wrote one ``.tmp``), so
        the other forgot its filters and left them at the broker after a change of topics."""
        if self.record is None:
            return
        try:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            lock_path = self.record.with_name(self.record.name + ".lock")
            # opened to read: a lock file another user made (a worker once run as root) is locked all the same
            with os.fdopen(os.open(lock_path, os.O_RDONLY | os.O_CREAT, 0o644)) as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX)  # held for one read and one write, by this or another worker
                except OSError as exc:  # a file system without locks (some network mounts): written unguarded
                    if not self._unlocked_said:
                        self._unlocked_said = True
                        log.warning("%s cannot be locked (%s): two workers must not share this mqtt.session_file",
                                    lock_path, exc)
                sessions = self._read_record()
                change(sessions)
                partial = self.record.with_name(self.record.name + ".tmp")
                partial.write_text(json.dumps(sessions, indent=1) + "\n")
                partial.replace(self.record)
        except OSError as exc:
            log.warning("cannot remember this session's subscriptions in %s (mqtt.session_file): %s; a later change "
                        "of topics may leave the old ones delivering", self.record, exc)

    def _earlier_ids(self) -> list[str]:
        """The client ids this worker (:attr:`owner`) had at this broker before its own changed, by the record."""
        owners = self._read_record().get(OWNERS) if self.owner else None
        if not isinstance(owners, dict):
            return []
        here = f"@{self.cfg.host}:{self.cfg.port}"
        return [key[: -len(here)] for key, owner in owners.items()
                if owner == self.owner and key != self._record_key and key.endswith(here)]

    def _end_earlier_sessions(self) -> None:
        """End the sessions this worker left at the broker under the client ids it had before (``worker.id`` or
        ``mqtt.client_id`` changed): nobody connects as them again, and until they expired
        (``mqtt.session_expiry_s``) the broker queued for them what their subscriptions matched, a share group's
        frames among them (half of a two-worker group's, lost).  Each is taken with a clean start and a session
        expiry of 0, then left; the record forgets it once the broker has.  Runs on a thread of its own, once per
        process while the broker takes the connections."""
        for earlier in self._earlier_ids():
            answer: list[ReasonCode] = []
            answered = threading.Event()

            def connack(client: mqtt.Client, userdata: object, flags: object, reason_code: ReasonCode,
                        properties: object, answer: list[ReasonCode] = answer, answered: threading.Event = answered
                        ) -> None:
                answer.append(reason_code)
                answered.set()

            try:
                client = _client(self.cfg, earlier)
                client.on_connect = connack
                client.connect(self.cfg.host, self.cfg.port, self.cfg.keepalive_s, clean_start=True)
            except (OSError, ValueError, ConfigError) as exc:
                log.warning("the session of client id %r, this worker's before its client id changed, could not be "
                            "ended (%s): it is tried again at the next start", earlier, exc)
                return
            client.loop_start()
            try:
                ended = answered.wait(EARLIER_SESSION_S) and not answer[0].is_failure
            finally:
                client.disconnect()
                client.loop_stop()
            if not ended:
                log.warning("the broker did not let this worker end the session of client id %r, its own before its "
                            "client id changed (%s): the session's subscriptions take their share of the messages "
                            "until it expires (mqtt.session_expiry_s); it is tried again at the next start", earlier,
                            answer[0] if answer else "no answer")
                continue
            key = f"{earlier}@{self.cfg.host}:{self.cfg.port}"

            def forget(sessions: dict, key: str = key) -> None:
                sessions.pop(key, None)
                owners = sessions.get(OWNERS)
                if isinstance(owners, dict):
                    owners.pop(key, None)

            self._rewrite(forget)
            log.info("ended the session this worker left at the broker as client id %r before its client id changed "
                     "(worker.id or mqtt.client_id): its subscriptions no longer take messages", earlier)

    def _degrade(self, max_qos: int, retain: bool) -> None:
        """Take the broker's announced limits (MQTT v5 CONNACK: Maximum QoS, Retain Available) for what the worker
        publishes and its last will: a broker refuses a connection whose will exceeds them, and closes one that
        publishes beyond them.  Said once each."""
        if max_qos < 1 <= self.max_qos:
            log.warning("the broker takes QoS 0 only: results, heatmaps, answers and frames travel at most once and "
                        "are lost when the connection drops")
        if not retain and self.retain_available:
            log.warning("the broker keeps no retained messages: this worker's availability and model are published "
                        "unretained, seen only by clients subscribed at the time")
        self.max_qos, self.retain_available = max_qos, retain

    def _subscribe(self, topics: list[str]) -> int | None:
        """Subscribe and remember what was asked, for the SUBACK to be read against it; the message id, or None
        when nothing was asked or paho could not send it."""
        if not topics:
            return None
        asked = [(topic, SubscribeOptions(qos=0, retainHandling=0) if topic in self.watch
                  else SubscribeOptions(qos=self.cfg.qos, retainHandling=self._retain_handling, retainAsPublished=True))
                 for topic in topics]
        with self._lock:
            result, mid = self.client.subscribe(asked)
            if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                self._subscribing[mid] = [(topic, options.QoS) for topic, options in asked]
                return mid
        return None

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        """A broker refuses a subscription in its SUBACK only (an ACL without the topic, a prefix changed on one side
        only): the connection stays up and nothing arrives on that topic, so say which and why, and ask again, less
        and less often (``RESUBSCRIBE_S``), for as long as it refuses: a mended ACL then takes effect without a
        restart."""
        with self._lock:
            asked = self._subscribing.pop(mid, [])
        if mid == self._subscribing_on_connect:
            self.subscribed.set()
            self._changed()
        refused, granted = {}, []
        for (topic, qos), code in zip(asked, reason_codes, strict=False):
            if code.is_failure:
                refused[topic] = str(code)
                continue
            granted.append(topic)
            if code.value < min(qos, self.max_qos) and topic not in self.watch:  # not what the broker announced
                log.warning("the broker granted QoS %d, not %d, for %s: frames and requests sent to it at QoS 1 "
                            "reach this worker at most once and are lost when the connection drops", code.value,
                            qos, topic)
        with self._lock:
            new = {t: r for t, r in refused.items() if self._refused.get(t) != r}
            mended = [t for t in granted if t in self._refused]
            for topic in mended:
                del self._refused[topic]
            self._refused.update(refused)
            if not self._refused:
                self._resubscribe_at, self._resubscribe_after = float("inf"), RESUBSCRIBE_S[0]
            elif self._resubscribe_at == float("inf"):
                self._resubscribe_at = time.monotonic() + self._resubscribe_after
        if new:
            log.error("the broker refused to subscribe this worker to %s: nothing published there reaches it; the "
                      "broker's ACL must let %s read it, under the prefix set in topics.prefix; asking again every "
                      "%.0f s at most", ", ".join(f"{t} ({r})" for t, r in new.items()), self.who, RESUBSCRIBE_S[1])
        if mended:
            log.info("the broker now takes the subscription to %s", ", ".join(mended))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        """A QoS 1 message the broker refused in its PUBACK (v5: an ACL without the topic, a quota) is lost, and paho
        says so only here: named with its topic the first time, then once a minute with the count."""
        settle, tell = self._settle.pop(mid, None), self._tell.pop(mid, None)
        if settle is not None:
            try:
                settle()
            except Exception:  # raised into paho, it would end the network thread
                log.exception("settling the publish %d failed", mid)
        if not reason_code.is_failure:
            return
        message = getattr(client, "_out_messages", {}).get(mid)  # paho keeps it until this callback returns
        topic = message.topic if message is not None else "?"
        size = len(message.payload) if message is not None else None
        with self._lock:
            self.publishes_refused += 1
            self.last_refused = {"topic": topic, "reason": str(reason_code)}
            count = self.publishes_refused - self._refusals_said
            say = tell is None and self._refusal_log.ready()
            if say:
                self._refusals_said = self.publishes_refused
        if tell is not None:  # the publisher says it to whoever asked
            try:
                tell(str(reason_code))
            except Exception:
                log.exception("telling the refusal of the publish %d failed", mid)
        if not say:
            return
        if reason_code.value == 149:  # Packet too large: mosquitto's message_size_limit, which no CONNACK announces
            cause = (f"its {size}-byte payload is over the broker's message size limit (mosquitto: message_size_limit): "
                     "raise it, or make heatmaps smaller (heatmap.size, heatmap.format: jpeg) or send fewer (heatmap.publish)")
        elif self.prefix is not None and not topic.startswith(f"{self.prefix}/"):
            cause = (f"{topic} is outside topics.prefix: a response topic a request named, which the broker's ACL does "
                     f"not let {self.who} write; the requester must name one it may (e.g. under the prefix)")
        else:
            cause = (f"the broker's ACL must let {self.who} write the worker's topics, under the prefix set in "
                     "topics.prefix")
        log.error("the broker refused %d message(s) this worker published, the last on %s (%s): they are lost (%s); "
                  "%s", count, topic, reason_code, self._kind(topic), cause)

    def _kind(self, topic: str) -> str:
        """What a refused publish on ``topic`` was, for the log: the worker's own status under ``workers/``, a
        frame's answer under the prefix, else a request's answer."""
        if self.prefix is None:
            return "a result, heatmap, error, answer or the worker's status"
        if topic.startswith(f"{self.prefix}/workers/"):
            return "the worker's own status: stats, availability or model"
        if topic.startswith(f"{self.prefix}/"):
            return "a frame's result, heatmap or error, or a request's answer"
        return "a request's answer"

    @property
    def who(self) -> str:
        """Whom a broker's ACL must name for this connection."""
        return f"user {self.cfg.username!r}" if self.cfg.username else "anonymous clients"

    @property
    def refused(self) -> dict[str, str]:
        """The topics the broker refuses us, with its reasons (a copy: the network thread updates them)."""
        with self._lock:
            return dict(self._refused)

    def resubscribe_refused(self) -> None:
        """Ask again for the subscriptions the broker refused, when due; called from the service's loop."""
        with self._lock:
            due = time.monotonic() >= self._resubscribe_at and self.connected.is_set()
            topics = [t for t in self._refused if t in self.subscriptions or t in self.watch] if due else []
            if due:
                self._resubscribe_after = min(2 * self._resubscribe_after, RESUBSCRIBE_S[1])
                self._resubscribe_at = time.monotonic() + self._resubscribe_after
        self._subscribe(topics)

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def _on_pre_connect(self, client, userdata) -> None:
        self._attempting = True

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._attempting = False
        if reason_code.is_failure:
            self._problem(f"the broker refused the connection: {reason_code} ("
                          + (f"as user {self.cfg.username!r})" if self.cfg.username
                             else "anonymous: mqtt.username is not set)"), refused=True)
            log.error("%s", self.problem)
            if reason_code.value not in TRANSIENT_REFUSALS:
                self.turned_away.set()
            if reason_code.value in (0x9A, 0x9B) and self.will is not None:  # the will's retain flag or QoS 1
                self._degrade(0 if reason_code.value == 0x9B else self.max_qos,
                              self.retain_available and reason_code.value != 0x9A)
                client.will_set(self.will[0], self.will[1], qos=self.max_qos, retain=self.retain_available,
                                properties=self.will_properties)
            return
        self.max_packet_size = getattr(properties, "MaximumPacketSize", None)
        sending = fit_window(client, self.window, getattr(properties, "ReceiveMaximum", 65535))
        if sending < self.window and self._window_said != sending:
            self._window_said = sending
            log.info("the broker takes at most %d unacknowledged messages from a client (its Receive Maximum): this "
                     "worker sends no more than that at once", sending)
        self._degrade(min(getattr(properties, "MaximumQoS", 2), 1), bool(getattr(properties, "RetainAvailable", 1)))
        self.connect_failures, self._next_failure_log = 0, 0.0
        self.problem, self.connect_refused = None, False
        self.turned_away.clear()
        log.info("connected to %s:%d (session present: %s)", self.cfg.host, self.cfg.port, flags.session_present)
        wanted = self.subscriptions + self.watch
        left = [t for t in dict.fromkeys(self.stale + self._recorded()) if t not in wanted] if flags.session_present else []
        if self._earlier_pending:
            self._earlier_pending = False
            threading.Thread(target=self._end_earlier_sessions, name="earlier-sessions", daemon=True).start()
        if left:
            log.info("leaving what an earlier configuration subscribed in this session: %s", ", ".join(left))
            self._leaving = client.unsubscribe(left)[1]  # the record is rewritten at its UNSUBACK
        else:
            self._remember(wanted)
        self._subscribing_on_connect = self._subscribe(wanted)
        if not wanted:
            self.subscribed.set()
        self.connected.set()
        self._changed()
        if self.on_connected:
            try:
                self.on_connected()
            except Exception:  # raised into paho, it would end the network thread: no message would come again
                log.exception("announcing this worker on the connection failed")

    def _problem(self, problem: str, refused: bool = False) -> None:
        """Why there is no connection now; ``refused``: the broker's CONNACK said no (else it was not reached)."""
        self.problem, self.connect_refused = problem, refused
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:  # raised into paho, it would end the network thread
                log.exception("announcing the connection's state failed")

    def _attempt_failed(self, reason: object) -> None:
        """paho retries a broker it cannot reach without a word, so a worker started before its broker, or pointed
        at the wrong one, would look idle: say so at the first failed attempt and then once a minute."""
        self.connect_failures += 1
        self._closed_at.clear()  # a broker restarting, not a takeover: another client's takeover leaves it reachable
        self._problem(f"cannot reach the broker: {reason}")
        now = time.monotonic()
        if now < self._next_failure_log:
            return
        self._next_failure_log = now + 60.0
        log.error("cannot reach the broker at %s:%d (mqtt.host, mqtt.port): %s; retrying (%d attempt(s) so far)",
                  self.cfg.host, self.cfg.port, reason, self.connect_failures)

    def _on_connect_fail(self, client, userdata) -> None:
        """No connection at all: no such host, nothing listening, a firewall, a TLS handshake that failed."""
        self._attempting = False
        exc = sys.exc_info()[1]  # paho calls this inside its `except OSError`
        if isinstance(exc, ssl.SSLCertVerificationError):
            self._attempt_failed(f"the broker's certificate is not trusted ({exc.verify_message}): "
                                 + _untrusted_advice(exc.verify_code))
            self.turned_away.set()  # a command says so at once, not after its whole timeout; a worker keeps trying
        elif self.cfg.tls is not None and isinstance(exc, (ssl.SSLError, ConnectionResetError)):
            self._attempt_failed(f"the TLS handshake failed ({exc}); a listener without TLS at this port does this")
        else:
            self._attempt_failed(exc or "connection failed")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        """Called once per lost connection or failed attempt, and a second time for a keep-alive timeout (paho's
        ``loop_misc`` reports it again): only the first is said."""
        self.acks.reset()  # before paho connects again: a packet id of this connection means nothing on the next
        was_connected, attempting = self.connected.is_set(), self._attempting
        self.connected.clear()
        self.subscribed.clear()
        self._attempting = False
        if was_connected:
            self._problem(f"the connection was lost ({reason_code}); reconnecting")
            if reason_code != 0:
                log.warning("disconnected from broker (%s); paho will reconnect with backoff", reason_code)
                if reason_code != "Keep alive timeout":  # the broker's own doing, not a hung broker's or link's
                    self._closed(reason_code)
        elif not attempting:
            return  # said already: the second report of a keep-alive timeout, or the close after a refusal
        elif reason_code == "Keep alive timeout":
            self._attempt_failed(f"the broker took the connection but did not answer it within mqtt.keepalive_s "
                                 f"({self.cfg.keepalive_s} s): a hung or overloaded broker")
        else:
            self._attempt_failed(f"the connection was closed before the broker answered ({reason_code}); "
                                 + ("a broker that requires a client certificate (mqtt.tls.cert_file, key_file) "
                                    "does this" if self.cfg.tls is not None else
                                    "a TLS listener reached without mqtt.tls does this"))

    def _closed(self, reason: object) -> None:
        """A connection the broker keeps closing soon after it is made is most often a second process with the same
        client id taking the session over (mosquitto says only "Unspecified error"): say so, once an hour.  A broker
        restarted faster than the first reconnect attempt (no attempt failed in between) closes it the same way: the
        line says that too.  Presence (worker/presence.py) names the other instance where it sees one."""
        now = time.monotonic()
        self._closed_at.append(now)
        if len(self._closed_at) < TAKEOVER_CLOSES or now - self._closed_at[0] >= TAKEOVER_WINDOW_S:
            return
        if self.on_takeover is not None:
            self.on_takeover()
        if now - self._takeover_said > 3600:
            self._takeover_said = now
            log.error("the broker closed this connection %d times in %.0f s (%s): unless the broker was restarted that "
                      "often, the usual cause is another client connecting with the same client id %r, each taking "
                      "the session from the other; give each process its own mqtt.client_id (the default is "
                      "edge-inspect-<worker.id>)", TAKEOVER_CLOSES, now - self._closed_at[0], reason, self.client_id)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        if self.on_message is None:
            return
        try:
            self.on_message(msg)
        except Exception:  # a bug in a handler must not kill paho's network thread
            log.exception("message handler failed for %s", msg.topic)

    def publish(self, topic: str, payload: bytes | str, *, retain: bool = False, qos: int | None = None,
                properties: Properties | None = None, accepted: Callable[[], None] | None = None,
                settled: Callable[[], None] | None = None,
                refused: Callable[[str], None] | None = None) -> mqtt.MQTTMessageInfo:
        """See :meth:`worker.transport.Transport.publish`. ``refused``: a QoS 1 message's refusal in the broker's PUBACK
        (its reason) goes to it instead of the link's log, for a client to tell whoever asked at once."""
        data = payload.encode() if isinstance(payload, str) else payload
        # a broker closes the connection over a QoS or a retain flag its CONNACK said it does not take
        qos = min(self.cfg.qos if qos is None else qos, self.max_qos)
        try:
            if self.max_packet_size is not None:
                # fixed header (5) + topic (2+len) + packet id (2) + properties (bounded generously)
                overhead = 9 + len(topic.encode()) + (len(properties.pack()) if properties is not None else 1)
                if len(data) + overhead > self.max_packet_size:
                    raise PacketTooLarge(f"{topic}: {len(data) + overhead} bytes exceed the broker's maximum packet "
                                         f"size {self.max_packet_size}")
            if accepted is not None:
                accepted()
            # paho's PUBACK handler holds this (re-entrant) lock: ``settled`` is in place before it can look (a
            # paho without it: a PUBACK faster than this line leaves the frame unacknowledged until a reconnect)
            with getattr(self.client, "_out_message_mutex", None) or contextlib.nullcontext():
                self.last_sent = self.client.publish(topic, data, qos=qos, retain=retain and self.retain_available,
                                                     properties=properties)
                if settled is not None and qos:
                    self._settle[self.last_sent.mid] = settled
                if refused is not None and qos:
                    self._tell[self.last_sent.mid] = refused
        except BaseException:
            if settled is not None:  # nothing goes to the broker
                settled()
            raise
        if settled is not None and not qos:
            settled()
        return self.last_sent

    @property
    def unsent(self) -> int:
        """QoS 1 messages published and not yet acknowledged by the broker: paho holds them (while the broker is away
        too) and sends them again at a reconnect, but only while this process runs."""
        return len(getattr(self.client, "_out_messages", {}))

    def wait_delivered(self, timeout: float) -> bool:
        """Wait up to ``timeout`` until the broker has acknowledged every QoS 1 message published so far (paho
        reconnects meanwhile, with its backoff); True when none is left."""
        deadline = time.monotonic() + timeout
        while self.unsent:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(0.1, left))  # paho tells of each acknowledgement, not of an empty outgoing queue
        return True

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
