"""Property-based fuzzing of every input channel against a real worker, a real console and a real mosquitto.

Frame user properties and payloads, JSON envelopes (a camera with payload: json_envelope), topic levels, query,
control and label requests, and the availability topic the worker reads back, drawn from the strategies of
benchmarks/fuzz.py (which runs >= 10,000 of them; figures in docs/reliability.md).  After each batch the canaries
(a QoS 1 frame from another camera, a control status, a query) must be answered; at the end no QoS 1 message may
be left unacknowledged and the frame counters must add up.  Requests are fuzzed in their MQTT properties too
(correlation data, response topic or none, user properties, content type, payload format indicator), from MQTT v5
and 3.1.1 clients, at QoS 0, 1 and 2, retained, sent twice: each must be answered exactly once per sending where it
names a topic an answer may go to, with its correlation data and a code of its type.  The console's inputs (camera
frames and heatmaps, results, errors, a worker's status messages, HTTP requests), drawn from
benchmarks/console_fuzz.py, must leave it showing a canary after each batch, with no traceback and no HTTP 500.
"""

from __future__ import annotations

import json
import signal
import time
import uuid

import paho.mqtt.client as mqtt
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from benchmarks import console_fuzz
from benchmarks.fuzz import CHANNELS, ENVELOPE_CAMERA, TEXT, Fuzzer, _request_body, message, tracebacks_in, unacked_after_stop
from conftest import Client, WorkerProcess, write_config
from scripts.broker import free_port
from scripts.console_helpers import ConsoleProcess

PREFIX = f"y{uuid.uuid4().hex[:6]}"
WORKER_ID = "w-test"
_totals = {"batches": 0, "sent": 0}
CONSOLE_PREFIX = f"x{uuid.uuid4().hex[:6]}"
_console_batches = [0]


@pytest.fixture(scope="module")
def fuzzed(broker, bundle_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzzch")
    client_id = f"fuzzch-{uuid.uuid4().hex[:6]}"
    config = write_config(folder, broker.port, bundle_dir, topics={"prefix": PREFIX},
                          mqtt={"client_id": client_id, "session_expiry_s": 600},
                          # room for every fuzzed request: one refused busy gets no answer where it names its topic
                          # in its body (an MQTT 3.1.1 client's reply_to), which the request test below counts on
                          limits={"max_frame_bytes": 200_000, "request_queue_size": 256,
                                  "request_queue_max_bytes": 400_000_000}, store={"log_normal_every": 0},
                          metrics={"enabled": False, "max_cameras": 8},
                          cameras={ENVELOPE_CAMERA: {"payload": "json_envelope"}})
    fuzzer = Fuzzer(broker.port, PREFIX, WORKER_ID)
    worker = WorkerProcess(config, folder / "worker.log")
    assert fuzzer.wait(f"{PREFIX}/workers/{WORKER_ID}/availability", 120, lambda p: p == b"online")
    yield fuzzer, worker, client_id
    fuzzer.client.loop_stop()
    if worker.proc.poll() is None:
        worker.stop(signal.SIGKILL)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.lists(message(PREFIX, WORKER_ID), min_size=10, max_size=25))
def test_every_channel_fuzzed_and_the_canaries_are_answered(fuzzed, batch):
    fuzzer, worker, _ = fuzzed
    for info in [fuzzer.publish(m) for m in batch]:
        info.wait_for_publish(30)
    assert fuzzer.canaries(90) == 3, worker.output()[-3000:]
    assert worker.proc.poll() is None
    _totals["batches"] += 1
    _totals["sent"] += len(batch)


REQUEST_TOPICS = {"query": "query", "label": "label", "control": f"workers/{WORKER_ID}/control"}
# The codes each request type may be answered with (README, "Errors"); internal_error (a bug) is none of them.
REQUEST_CODES = {
    "query": {"bad_request", "unknown_frame", "bad_image", "empty_store", "store_unavailable", "busy",
              "response_too_large", "invalid_output"},
    "label": {"bad_request", "unknown_frame", "store_unavailable", "busy", "response_too_large"},
    "control": {"bad_request", "reload_failed", "busy", "response_too_large"},
}
_requests = {"sent": 0, "answered": 0}


_ODD = object()  # where an odd string goes in a request's shape
ODD_TEXT = st.sampled_from(["", " ", "\x00", "a\x01b", "\ud800", "\uffff", "\u0085", "\u202e", "..", ".", "../..",
                            "a/b", "+", "#", "$SYS", "=1+2", "é" * 200, "x" * 5000])
# Each request type's fields, one at a time given a string JSON can carry and the fuzzed bodies above do not draw
# (control characters, lone surrogates, noncharacters, path steps, wildcards, huge ones).
SHAPES = {
    "query": [{"frame_id": _ODD}, {"frame_id": "x", "camera": _ODD}, {"image_b64": _ODD},
              {"filters": {"cameras": [_ODD]}}, {"filters": {"since": _ODD}}, {"filters": {"until": _ODD}}],
    "label": [{"action": "set", "frame_id": _ODD, "camera": "c", "label": "false_alarm"},
              {"action": "set", "frame_id": "x", "camera": _ODD, "label": None},
              {"action": "set", "frame_id": "x", "camera": "c", "label": "confirmed_defect", "defect_type": _ODD},
              {"action": "set", "frame_id": "x", "camera": "c", "label": "confirmed_defect", "note": _ODD},
              {"action": "unlabel", "frame_id": _ODD, "camera": _ODD}, {"action": _ODD},
              {"action": "export", "format": _ODD}],
    "control": [{"command": _ODD}, {"command": "reload", "bundle": _ODD}, {"command": "rollback", "camera": _ODD},
                {"command": "reload", "camera": _ODD, "bundle": _ODD}, {"command": "export_capture", "camera": _ODD}],
}


def _filled(shape: object, text: str) -> object:
    if shape is _ODD:
        return text
    if isinstance(shape, dict):
        return {k: _filled(v, text) for k, v in shape.items()}
    return [_filled(v, text) for v in shape] if isinstance(shape, list) else shape


def _odd_body(channel: str) -> st.SearchStrategy[bytes]:
    return st.builds(lambda shape, text: json.dumps(_filled(shape, text)).encode(), st.sampled_from(SHAPES[channel]),
                     ODD_TEXT)


def _with_reply_to(body: bytes, topic: str) -> bytes | None:
    """``body`` with an MQTT 3.1.1 client's ``reply_to`` where it is a JSON object, else None (no answer topic)."""
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return json.dumps({**raw, "reply_to": topic}).encode() if isinstance(raw, dict) else None


@st.composite
def fuzzed_request(draw: st.DrawFn) -> dict:
    """One request as any client may send it: a fuzzed body on any request topic, from an MQTT v5 client (a
    response topic, odd but valid or one no answer may go to, or none; correlation data of any size and bytes,
    user properties, content type, payload format indicator, expiry) or an MQTT 3.1.1 one (no properties: its
    answer topic in the body), at QoS 0, 1 or 2, retained or not, sent once or twice."""
    channel = draw(st.sampled_from(sorted(REQUEST_TOPICS)))
    tag = uuid.uuid4().hex[:10]
    answer_to = f"{PREFIX}/replies/r{tag}" + draw(st.sampled_from(["", "/", "/ a b", "//x", "/é€😀", "/" + "l" * 2000]))
    body = draw(st.one_of(_request_body(channel), _odd_body(channel)))
    route = draw(st.sampled_from(["v5", "v5", "v3", "v5-nowhere", "none"]))
    props = None
    if route == "v3":
        body_v3 = _with_reply_to(body, answer_to)
        body, route = (body, "none") if body_v3 is None else (body_v3, "v3")
    else:
        props = Properties(PacketTypes.PUBLISH)
        if route == "v5":
            props.ResponseTopic = answer_to
        elif route == "v5-nowhere":  # a wildcard, a $-topic, the API's own topics: logged, never published to
            answer_to = draw(st.sampled_from([f"{PREFIX}/replies/r{tag}/+", f"$SYS/r{tag}", f"{PREFIX}/r{tag}/result",
                                              f"{PREFIX}/r{tag}/frame", f"{PREFIX}/workers/r{tag}/control"]))
            props.ResponseTopic = answer_to
        correlation = draw(st.one_of(st.none(), st.binary(max_size=64),
                                     st.sampled_from([b"", bytes(range(256)) * 255 + bytes(255)])))
        if correlation is not None:
            props.CorrelationData = correlation
        if user := draw(st.lists(st.tuples(TEXT, TEXT), max_size=3)):
            props.UserProperty = user
        if (content_type := draw(st.one_of(st.none(), TEXT))) is not None:
            props.ContentType = content_type
        try:  # UTF-8 declared only where it is: a broker may refuse a payload that is not (MQTT v5 3.3.2.3.2)
            body.decode()
            utf8 = True
        except UnicodeDecodeError:
            utf8 = False
        if (indicator := draw(st.sampled_from([None, 0, 1 if utf8 else 0]))) is not None:
            props.PayloadFormatIndicator = indicator
        if draw(st.booleans()):
            props.MessageExpiryInterval = 3600
    return {"channel": channel, "topic": f"{PREFIX}/{REQUEST_TOPICS[channel]}", "body": body, "route": route,
            "answer_to": answer_to, "props": props, "qos": draw(st.sampled_from([0, 1, 2])),
            "retain": draw(st.booleans()), "times": draw(st.sampled_from([1, 1, 2]))}


@pytest.fixture(scope="module")
def requesters(fuzzed, broker):
    v5, v3 = Client(broker.port, PREFIX), Client(broker.port, PREFIX, protocol=mqtt.MQTTv311)
    yield v5, v3
    v5.close()
    v3.close()


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.lists(fuzzed_request(), min_size=4, max_size=12))
def test_every_request_fuzzed_gets_exactly_one_answer_with_its_correlation_and_a_stable_code(fuzzed, requesters, batch):
    """Each request that names a topic an answer may go to is answered there once per time it was sent, carrying its
    correlation data, ``ok`` or an error code of its type; one naming none, or one no answer may go to, is answered
    nowhere.  Frames are answered meanwhile (the canaries)."""
    fuzzer, worker, _ = fuzzed
    v5, v3 = requesters
    retained = set()
    for r in batch:
        sender = v3 if r["route"] == "v3" else v5
        for _ in range(r["times"]):
            info = sender.client.publish(r["topic"], r["body"], qos=r["qos"], retain=r["retain"], properties=r["props"])
            info.wait_for_publish(30)
        if r["retain"]:
            retained.add(r["topic"])
    for topic in retained:  # an empty retained message clears it (and is itself answered nowhere: it names no topic)
        v3.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(30)
    # A barrier from each client: the worker serves requests in the order they came, and each connection's in order.
    barriers = []
    for sender, protocol in ((v5, "v5"), (v3, "v3")):
        topic = f"{PREFIX}/replies/barrier-{protocol}-{uuid.uuid4().hex[:8]}"
        props = Properties(PacketTypes.PUBLISH)
        if protocol == "v5":
            props.ResponseTopic = topic
        body = {"command": "status", **({"reply_to": topic} if protocol == "v3" else {})}
        sender.client.publish(f"{PREFIX}/workers/{WORKER_ID}/control", json.dumps(body), qos=1,
                              properties=props if protocol == "v5" else None).wait_for_publish(30)
        barriers.append(topic)
    for topic in barriers:
        v5.wait_for(lambda m, topic=topic: m.topic == topic, timeout=120)
    expected = {r["answer_to"]: 0 for r in batch}
    for r in batch:
        expected[r["answer_to"]] += r["times"] if r["route"] in ("v5", "v3") else 0
    deadline = time.monotonic() + 30  # a QoS 0 request from the other connection may still be on its way
    while True:
        with v5.lock:
            answers = {t: [m for m in v5.messages if m.topic == t] for t in expected}
        if all(len(answers[t]) >= n for t, n in expected.items()) or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # poll interval, with a deadline
    for r in batch:
        got = answers[r["answer_to"]]
        assert len(got) == expected[r["answer_to"]], (r["route"], r["channel"], r["body"][:200], len(got))
        for m in got:
            answer = json.loads(m.payload)
            assert answer["worker"] == WORKER_ID and isinstance(answer["ok"], bool), answer
            if not answer["ok"]:
                assert answer["error"]["code"] in REQUEST_CODES[r["channel"]], (r["body"][:200], answer)
            sent = getattr(r["props"], "CorrelationData", None) if r["route"] == "v5" else None
            assert getattr(m.properties, "CorrelationData", None) == sent, r
            assert getattr(m.properties, "ContentType", None) == "application/json"
    assert fuzzer.canaries(90) == 3, worker.output()[-3000:]
    assert worker.proc.poll() is None
    _requests["sent"] += sum(r["times"] for r in batch)
    _requests["answered"] += sum(expected.values())


def test_a_reload_naming_no_camera_id_is_refused_not_made_a_canary(fuzzed, requesters, bundle_dir):
    """A reload for a camera id no frame's topic level can carry ("a/b", a control character, "..", a wildcard) made
    a canary that no frame could reach, answered ok, kept in the roll-out record and compiled again at every start."""
    _, _, _ = fuzzed
    v5, _ = requesters
    for camera in ("a/b", "\u0001x", "..", "c+", "c#", "x\ufffe"):
        topic = f"{PREFIX}/replies/canary-{uuid.uuid4().hex[:8]}"
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = topic
        v5.client.publish(f"{PREFIX}/workers/{WORKER_ID}/control",
                          json.dumps({"command": "reload", "camera": camera, "bundle": str(bundle_dir)}), qos=1,
                          properties=props).wait_for_publish(30)
        answer = v5.json_on(topic, timeout=60)[0]
        assert not answer["ok"] and answer["error"]["code"] == "bad_request" and "no camera id" in answer["error"][
            "message"], (camera, answer)
    topic = f"{PREFIX}/replies/status-{uuid.uuid4().hex[:8]}"
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = topic
    v5.client.publish(f"{PREFIX}/workers/{WORKER_ID}/control", json.dumps({"command": "status"}), qos=1,
                      properties=props).wait_for_publish(30)
    assert list(v5.json_on(topic, timeout=60)[0]["models"]) == ["default"]


def test_a_command_given_a_field_it_does_not_take_is_refused(fuzzed, requesters, bundle_dir):
    """README: reload {bundle?, camera?}, rollback {camera?}, status, export_capture {camera?}, no other fields.  A
    rollback given a bundle went back to the model served before, not to that bundle (answered ok where there was
    one), an export or a status dropped what it was given."""
    v5, _ = requesters
    for body, field in (({"command": "rollback", "bundle": str(bundle_dir)}, "bundle"),
                        ({"command": "export_capture", "bundle": str(bundle_dir)}, "bundle"),
                        ({"command": "status", "camera": "fz"}, "camera")):
        topic = f"{PREFIX}/replies/fields-{uuid.uuid4().hex[:8]}"
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = topic
        v5.client.publish(f"{PREFIX}/workers/{WORKER_ID}/control", json.dumps(body), qos=1,
                          properties=props).wait_for_publish(30)
        answer = v5.json_on(topic, timeout=60)[0]
        assert not answer["ok"] and answer["error"]["code"] == "bad_request" and field in answer["error"]["message"], (
            body, answer)


def test_fuzzing_left_nothing_unacknowledged_and_every_channel_was_reached(fuzzed, broker):
    fuzzer, worker, client_id = fuzzed
    assert _totals["batches"] >= 12, "the fuzz test above must have run first"
    assert all(fuzzer.counts[c] > 0 for c in CHANNELS), fuzzer.counts
    rss_mb = psutil.Process(worker.proc.pid).memory_info().rss / 1e6
    assert worker.stop() == 0
    assert not tracebacks_in(worker.output()), worker.output()[-3000:]  # no message may be an internal_error (a bug)
    final = json.loads(worker.output().split("stopped: ", 1)[1].split("; ", 1)[0])
    for camera, c in final.items():
        assert c["received"] == c["processed"] + c["errored"] + c["dropped"] + c["duplicates"], (camera, c)
    assert len(final) <= 8 + 1  # metrics.max_cameras, then metrics.OTHER
    assert unacked_after_stop(broker.port, client_id, f"{PREFIX}/workers/{WORKER_ID}/control") == 0
    assert _requests["sent"] > 0, "the request fuzz test above must have run first"
    print(f"\nFIGURES fuzz channels: {_totals['sent']} messages {fuzzer.counts}, {_requests['sent']} requests "
          f"({_requests['answered']} answers expected and got), 0 unacked, RSS {rss_mb:.0f} MB")


@pytest.fixture(scope="module")
def console_fuzzed(broker, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cfuzz")
    port = free_port()
    config = write_config(folder, broker.port, folder / "no-bundle", topics={"prefix": CONSOLE_PREFIX},
                          limits={"max_frame_bytes": 200_000}, query={"timeout_s": 1},
                          console={"port": port, "control_timeout_s": 1, "max_workers": 8})
    console = ConsoleProcess(config, folder / "console.log", port)
    fuzzer = console_fuzz.ConsoleFuzzer(broker.port, CONSOLE_PREFIX, port)
    yield fuzzer, console
    fuzzer.client.loop_stop()
    console.stop()


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.lists(console_fuzz.message(CONSOLE_PREFIX), min_size=10, max_size=25))
def test_every_console_input_fuzzed_and_the_canary_is_shown(console_fuzzed, batch):
    fuzzer, console = console_fuzzed
    for info in [fuzzer.publish(m) for m in batch]:
        if info is not None:
            info.wait_for_publish(30)
    assert fuzzer.canary(60), console.log_path.read_text()[-3000:]
    assert not fuzzer.failed, fuzzer.failed
    _console_batches[0] += 1


def test_console_fuzzing_reached_every_input_and_logged_no_traceback(console_fuzzed):
    fuzzer, console = console_fuzzed
    assert _console_batches[0] >= 10, "the console fuzz test above must have run first"
    assert all(fuzzer.counts[c] > 0 for c in console_fuzz.CHANNELS), fuzzer.counts
    assert console.stop() == 0
    log = console.log_path.read_text(errors="replace")
    assert not tracebacks_in(log), log[-3000:]
