"""Cameras as they are (issue #14): MQTT 3.1.1 publishers without metadata, JSON envelopes, tiled
high-resolution frames.  Real mosquitto, a real worker process, the real OpenVINO bundle and store."""

from __future__ import annotations

import base64
import json
import textwrap
import time
import uuid
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from conftest import Client, good_png, user_props, write_config
from test_worker import _query

from bundle import tiling
from exporter.synthetic import _texture
from worker.config import TilingConfig
from worker.ingest import FrameIds
from worker.metrics import OTHER

TILING = {"grid": [4, 3], "overlap": 0.1}


@pytest.fixture
def running(broker, bundle_dir, tmp_path, worker_factory):
    prefix = f"c{uuid.uuid4().hex[:8]}"
    config = write_config(
        tmp_path, broker.port, bundle_dir, topics={"prefix": prefix},
        limits={"max_frame_bytes": 12_000_000},
        cameras={"loose": {"metadata": "optional"},
                 "strict": {},
                 "env": {"payload": "json_envelope"},
                 "envloose": {"payload": "json_envelope", "metadata": "optional"},
                 "tiled": {"tiling": TILING},
                 "whole": {},
                 # an MQTT 3.1.1 bridge of a machine-vision camera: its buffers declared once (the dataset's 128 px)
                 "mono311": {"metadata": "optional", "pixels": {"format": "Mono8", "width": 128, "height": 128}},
                 # an existing camera's bridge that publishes on a topic of its own
                 "own": {"metadata": "optional", "topic": _own_topic(prefix)}})
    client = Client(broker.port, prefix)
    worker = worker_factory(config)
    client.wait_for(lambda m: m.topic == f"{prefix}/workers/w-test/availability" and m.payload == b"online",
                    timeout=120)
    yield prefix, client, worker
    client.close()


def _own_topic(prefix: str) -> str:
    return f"site-{prefix}/line1/cam3/jpeg"


def _good(dataset: Path) -> bytes:
    return good_png(dataset).read_bytes()


def _query_until_found(client: Client, prefix: str, request: dict, timeout: float = 30) -> dict:
    """The recorder writes in batches: ask again until the frame is in the history (or the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = _query(client, prefix, request)
        if answer["ok"] or answer["error"]["code"] not in ("unknown_frame", "empty_store") or time.monotonic() > deadline:
            return answer
        time.sleep(0.2)  # polling interval between questions, not synchronisation


def test_generated_ids_are_unique_across_processes_and_ordered_within_one():
    first, restarted = FrameIds(), FrameIds()
    a, b = first.next(), first.next()
    assert a != b and a.rsplit("-", 1)[0] == b.rsplit("-", 1)[0] and int(b.rsplit("-", 1)[1]) == int(a.rsplit("-", 1)[1]) + 1
    assert restarted.next() not in (a, b)


def test_mqtt311_camera_without_metadata_gets_results_and_its_frames_are_queryable(running, broker, dataset):
    prefix, client, worker = running
    old = Client(broker.port, prefix, protocol=mqtt.MQTTv311)  # cannot send or receive user properties
    try:
        good = _good(dataset)
        before = time.time()
        for _ in range(3):
            old.client.publish(f"{prefix}/loose/frame", good, qos=1).wait_for_publish(5)
        results = [json.loads(m.payload) for m in old.wait_for(lambda m: m.topic == f"{prefix}/loose/result", count=3)]
        heatmaps = old.wait_for(lambda m: m.topic == f"{prefix}/loose/heatmap", count=3)
        assert all(m.payload[:2] == b"\xff\xd8" for m in heatmaps)  # JPEG heatmaps reach a 3.1.1 client

        ids = [r["frame_id"] for r in results]
        assert len(set(ids)) == 3 and all(i.startswith("g-") for i in ids)
        for r in results:
            assert r["generated"] == ["frame_id", "captured_at"]
            captured = datetime.fromisoformat(r["captured_at"]).timestamp()
            assert before - 2 <= captured <= time.time() + 1

        # The same frame on a camera that requires metadata is refused, not guessed.
        old.client.publish(f"{prefix}/strict/frame", good, qos=1).wait_for_publish(5)
        error = json.loads(old.wait_for(lambda m: m.topic == f"{prefix}/strict/error")[0].payload)
        assert error["code"] == "missing_metadata" and error["frame_id"] is None

        # The history holds them under their generated ids: a query by one finds the other two (each waited for in
        # the history first: the recorder writes in batches after the results leave).
        for frame_id in ids[1:]:
            assert _query_until_found(client, prefix, {"frame_id": frame_id, "camera": "loose", "top_k": 1})["ok"], frame_id
        answer = _query_until_found(client, prefix, {"frame_id": ids[0], "camera": "loose", "top_k": 5})
        assert answer["ok"], answer
        assert {h["frame_id"] for h in answer["hits"]} == set(ids[1:])

        # A 3.1.1 client has no response topic: it names one in the request, and gets the same answers.
        old.client.publish(f"{prefix}/query", json.dumps({"frame_id": ids[0], "camera": "loose", "top_k": 5,
                                                          "reply_to": f"{prefix}/replies/q"}), qos=1)
        old.client.publish(f"{prefix}/label", json.dumps({"action": "extensions", "reply_to": f"{prefix}/replies/l"}),
                           qos=1)
        old.client.publish(f"{prefix}/label", json.dumps({"action": "extensions", "reply_to": f"{prefix}/replies/#"}),
                           qos=1)  # a wildcard is no topic to answer on: logged, and the next request is served
        old.client.publish(f"{prefix}/workers/w-test/control",
                           json.dumps({"command": "status", "reply_to": f"{prefix}/replies/c"}), qos=1)
        replies = {m.topic.rsplit("/", 1)[1]: json.loads(m.payload)
                   for m in old.wait_for(lambda m: m.topic.startswith(f"{prefix}/replies/"), count=3)}
        assert {h["frame_id"] for h in replies["q"]["hits"]} == set(ids[1:])
        assert replies["l"]["ok"] and "extensions" in replies["l"], replies["l"]
        assert replies["c"]["ok"] and replies["c"]["models"], replies["c"]
        # Refused before parsing (too large, too deep): answered there too, not logged as having no topic.
        old.client.publish(f"{prefix}/query", json.dumps({"reply_to": f"{prefix}/replies/big",
                                                          "image_b64": "A" * 4_000_001}), qos=1)
        old.client.publish(f"{prefix}/query", '{"reply_to": "%s/replies/deep", "a": %s}' % (prefix, "[" * 9 + "]" * 9),
                           qos=1)
        for name, reason in (("big", "limit 4000000"), ("deep", "nested deeper than 8")):
            refused = json.loads(old.wait_for(lambda m, name=name: m.topic == f"{prefix}/replies/{name}")[0].payload)
            assert refused["error"]["code"] == "bad_request" and reason in refused["error"]["message"], refused
    finally:
        old.close()
    v5_results = client.json_on(f"{prefix}/loose/result", count=3)
    assert {r["frame_id"] for r in v5_results} == set(ids)
    assert worker.proc.poll() is None


def test_a_camera_on_a_topic_of_its_own_is_inspected_and_shown_as_any_other(running, broker, dataset):
    """A camera or bridge that publishes on its own topic (``cameras.<id>.topic``), here an MQTT 3.1.1 one without
    properties: its frames are scored and answered under ``<prefix>/<id>/`` as any camera's; the console keeps its
    frames for their results; no request's answer may be published on its topic (it would come back as a frame)."""
    from worker.config import ConsoleConfig
    from worker.console.hub import Hub
    from worker.topics import Topics

    prefix, client, worker = running
    old = Client(broker.port, prefix, protocol=mqtt.MQTTv311)
    try:
        old.client.publish(_own_topic(prefix), _good(dataset), qos=1).wait_for_publish(5)
        result = json.loads(old.wait_for(lambda m: m.topic == f"{prefix}/own/result")[0].payload)
        assert result["camera"] == "own" and result["generated"] == ["frame_id", "captured_at"], result
        assert old.wait_for(lambda m: m.topic == f"{prefix}/own/heatmap")
    finally:
        old.close()
    topics = Topics(prefix, "w-test", {_own_topic(prefix): "own"})
    assert topics.of_the_api(_own_topic(prefix)) and topics.camera_of(_own_topic(prefix)) == "own"
    assert not topics.of_the_api(f"site-{prefix}/line1/cam3") and topics.camera_of(f"{prefix}/own/frame") == "own"

    hub = Hub(topics, ConsoleConfig())
    assert _own_topic(prefix) in hub.subscriptions
    frame = mqtt.MQTTMessage(topic=_own_topic(prefix).encode())
    frame.payload, frame.properties = _good(dataset), Properties(PacketTypes.PUBLISH)
    frame.properties.UserProperty = [("frame_id", "f1")]
    shown = mqtt.MQTTMessage(topic=f"{prefix}/own/result".encode())
    shown.payload = json.dumps({**result, "frame_id": "f1"}).encode()
    hub.on_message(frame)
    hub.on_message(shown)
    assert hub.image("own", "f1", "frame") == _good(dataset)


def test_an_optional_metadata_camera_with_an_unset_clock_is_stamped_not_refused(running, dataset):
    """A camera whose clock was never set sends 1970, and a sloppy one an unusable id: with ``metadata: optional`` the
    worker stamps such frames as it stamps frames without metadata, and says so (``generated``); a camera that
    requires metadata still gets ``bad_metadata``."""
    prefix, client, worker = running
    good = _good(dataset)
    before = time.time()
    client.publish_frame("loose", good, "clock-unset", captured_at="1970-01-01T00:00:12Z")
    client.publish_frame("loose", good, "bad/id", captured_at="now")
    client.publish_frame("strict", good, "clock-unset", captured_at="1970-01-01T00:00:12Z")
    results = client.json_on(f"{prefix}/loose/result", count=2)
    stamped = next(r for r in results if r["frame_id"] == "clock-unset")
    assert stamped["generated"] == ["captured_at"]
    assert before - 2 <= datetime.fromisoformat(stamped["captured_at"]).timestamp() <= time.time() + 1
    renamed = next(r for r in results if r["frame_id"] != "clock-unset")
    assert renamed["generated"] == ["frame_id"] and renamed["frame_id"].startswith("g-")
    error = client.json_on(f"{prefix}/strict/error")[0]
    assert error["code"] == "bad_metadata" and error["frame_id"] == "clock-unset"
    assert not [m for m in client.messages if m.topic == f"{prefix}/loose/error"]
    assert worker.proc.poll() is None


def test_a_camera_that_restarts_its_frame_ids_is_still_inspected(running, dataset):
    """A camera whose frame counter starts again at a reboot sends ids it sent before: those frames were taken for
    QoS 1 redeliveries and dropped without a result for as long as the ids were remembered
    (``limits.dedupe_window``).  A redelivery repeats the frame's ``captured_at`` and its bytes; a reused id does
    not (a camera whose clock starts again too repeats the time, not the picture), is served, and the reuse is said
    once per camera.  A frame refused (cut short
    in transit) and sent again whole is no redelivery either."""
    prefix, client, worker = running
    good = _good(dataset)
    other = cv2.imencode(".png", cv2.flip(cv2.imdecode(np.frombuffer(good, np.uint8), cv2.IMREAD_COLOR), 1))[1].tobytes()
    boot = time.time() - 600
    for n in (1, 2):
        client.publish_frame("strict", good, str(n), captured_at=str(boot + n))
    client.publish_frame("strict", good, "1", captured_at=str(boot + 1))  # a redelivery
    client.publish_frame("strict", other, "1", captured_at=str(boot + 1))  # clock and counter both reset: a new frame
    client.publish_frame("strict", good[: len(good) // 2], "3", captured_at=str(boot + 3))  # cut short in transit
    assert client.json_on(f"{prefix}/strict/error")[0]["frame_id"] == "3"
    client.publish_frame("strict", good, "3", captured_at=str(boot + 3))  # sent again, whole: not a redelivery
    for n in (1, 2):  # after the reboot
        client.publish_frame("strict", good, str(n), captured_at=str(boot + 300 + n))
    client.publish_frame("loose", good, "7", captured_at=None)
    client.publish_frame("loose", good, "7", captured_at=None)  # a redelivery: stamped on arrival, same bytes
    client.publish_frame("loose", other, "7", captured_at=None)  # the id again, another frame
    strict = client.json_on(f"{prefix}/strict/result", count=6)
    assert sorted((r["frame_id"], round(datetime.fromisoformat(r["captured_at"]).timestamp() - boot)) for r in strict) \
        == [("1", 1), ("1", 1), ("1", 301), ("2", 2), ("2", 302), ("3", 3)]
    assert len(client.json_on(f"{prefix}/loose/result", count=2)) == 2
    assert worker.stop() == 0

    def settled(m: mqtt.MQTTMessage) -> bool:
        if m.topic != f"{prefix}/workers/w-test/stats":
            return False
        cams = json.loads(m.payload)["cameras"]
        return all(c in cams and cams[c]["received"] == n == cams[c]["processed"] + cams[c]["duplicates"]
                   + cams[c]["errored"] for c, n in (("strict", 8), ("loose", 3)))

    counts = json.loads(client.wait_for(settled)[-1].payload)["cameras"]
    assert (counts["strict"]["processed"], counts["strict"]["duplicates"]) == (6, 1), counts
    assert (counts["loose"]["processed"], counts["loose"]["duplicates"]) == (2, 1), counts
    said = [line for line in worker.output().splitlines() if "reuses frame ids" in line]
    assert len(said) == 2 and "camera strict reuses frame ids ('1' again" in said[0] + said[1] \
        and "camera loose reuses frame ids ('7' again" in said[0] + said[1], said


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_json_envelopes_are_validated_like_user_properties(running, dataset):
    prefix, client, worker = running
    good = _good(dataset)
    frames = [
        (json.dumps({"image_b64": _b64(good), "frame_id": "env-1", "captured_at": "2026-11-30T08:00:00Z"}), None),
        # Node-RED / Frigate style names: a data URL, "id", epoch seconds in "timestamp", extra fields ignored.
        (json.dumps({"image": "data:image/png;base64," + _b64(good), "id": "env-2", "timestamp": 1795000000,
                     "camera": "env", "label": "part"}), None),
        ("not json {", "bad_envelope"),
        (json.dumps([1, 2, 3]), "bad_envelope"),
        (json.dumps({"frame_id": "no-image", "captured_at": "2026-11-30T08:00:00Z"}), "bad_envelope"),
        (json.dumps({"image_b64": "%%%not base64%%%", "frame_id": "bad-b64", "captured_at": "1795000000"}), "bad_envelope"),
        (json.dumps({"image_b64": _b64(good), "image": _b64(good), "frame_id": "two-images", "captured_at": "1795000000"}),
         "bad_envelope"),
        (json.dumps({"image_b64": _b64(b"garbage bytes"), "frame_id": "garbage", "captured_at": "1795000000"}), "not_an_image"),
        (json.dumps({"image_b64": _b64(good), "captured_at": "1795000000"}), "missing_metadata"),
        (json.dumps({"image_b64": _b64(good), "frame_id": "bad-time", "captured_at": "soon"}), "bad_metadata"),
        (json.dumps({"image_b64": _b64(good), "frame_id": "bool-time", "captured_at": True}), "bad_metadata"),
        (json.dumps({"image_b64": _b64(good), "frame_id": {"nested": 1}, "captured_at": "1795000000"}), "bad_metadata"),
        (json.dumps({"image_b64": _b64(good), "frame_id": "wrong-cam", "captured_at": "1795000000", "camera_id": "cam9"}),
         "camera_mismatch"),
        ("", "empty_payload"),
        (json.dumps({"image_b64": _b64(good), "frame_id": "env-3", "captured_at": "1795000000"}), None),
    ]
    for body, _ in frames:
        client.client.publish(f"{prefix}/env/frame", body.encode(), qos=1).wait_for_publish(5)
    client.client.publish(f"{prefix}/envloose/frame", json.dumps({"image_b64": _b64(good)}).encode(),
                          qos=1).wait_for_publish(5)

    expected_errors = [code for _, code in frames if code]
    errors = client.json_on(f"{prefix}/env/error", count=len(expected_errors))
    assert [e["code"] for e in errors] == expected_errors
    # each error names the frame where the envelope gave a usable id, for its publisher to match it
    assert [e["frame_id"] for e in errors] == [None, None, "no-image", "bad-b64", "two-images", "garbage", None,
                                               "bad-time", "bool-time", None, "wrong-cam", None]
    assert all(e["message"] for e in errors)
    results = {r["frame_id"]: r for r in client.json_on(f"{prefix}/env/result", count=3)}
    assert set(results) == {"env-1", "env-2", "env-3"}  # the last one came after all the bad ones: no stall
    assert results["env-1"]["captured_at"].startswith("2026-11-30T08:00:00") and results["env-1"]["generated"] == []
    assert results["env-2"]["captured_at"].startswith("2026-11-18")
    heatmaps = client.wait_for(lambda m: m.topic == f"{prefix}/env/heatmap", count=3)
    assert {user_props(m)["frame_id"] for m in heatmaps} == set(results)
    loose = client.json_on(f"{prefix}/envloose/result")[0]
    assert loose["generated"] == ["frame_id", "captured_at"] and loose["frame_id"].startswith("g-")

    # A frame id sent as a number (Frigate's event id, a PLC's counter) is said as text, and a query or a label that
    # names the frame by the same number finds it.
    client.client.publish(f"{prefix}/env/frame", json.dumps({"image": _b64(good), "id": 1795, "timestamp": 1795000000}),
                          qos=1).wait_for_publish(5)
    assert "1795" in {r["frame_id"] for r in client.json_on(f"{prefix}/env/result", count=4)}
    found = _query_until_found(client, prefix, {"frame_id": 1795, "camera": "env", "top_k": 2})
    assert found["ok"] and found["query"]["frame_id"] == "1795", found
    labelled = _query(client, prefix, {"action": "set", "frame_id": 1795, "camera": "env", "label": "confirmed_defect"},
                      topic="label")
    assert labelled["ok"] and labelled["frame_id"] == "1795", labelled
    assert worker.proc.poll() is None


def test_a_raw_camera_may_send_base64_text_and_json_is_refused_with_the_setting_that_reads_it(running, dataset):
    """Home Assistant's MQTT camera (``image_encoding: b64``) and Node-RED flows publish an image as base64 text,
    a data URL too: a raw camera decodes it.  A JSON document sent to a raw camera is refused with the setting
    that reads envelopes, not as an unrecognised image."""
    prefix, client, worker = running
    good = _good(dataset)
    jpeg = cv2.imencode(".jpg", cv2.imread(str(good_png(dataset))))[1].tobytes()
    mime = "\r\n".join(textwrap.wrap("data:image/jpeg;base64," + _b64(jpeg), 76)).encode()  # MIME's line breaks
    sent = [("b64-png", _b64(good).encode(), None), ("b64-url", mime, None), ("raw", good, None),
            ("json", json.dumps({"image_b64": _b64(good)}).encode(), "not_an_image"),
            ("bad-b64", b"/9j/%%% not base64 %%%", "not_an_image")]
    for frame_id, body, _ in sent:
        client.publish_frame("strict", body, frame_id)
    errors = {e["frame_id"]: e for e in client.json_on(f"{prefix}/strict/error", count=2)}
    assert {k: e["code"] for k, e in errors.items()} == {f: code for f, _, code in sent if code}
    assert "cameras.strict.payload: json_envelope" in errors["json"]["message"]
    results = {r["frame_id"]: r for r in client.json_on(f"{prefix}/strict/result", count=3)}
    assert set(results) == {"b64-png", "b64-url", "raw"}
    assert results["b64-png"]["raw_score"] == results["raw"]["raw_score"]  # the same image, decoded from text
    assert worker.proc.poll() is None


def test_raw_pixel_buffers_score_as_the_same_image_file_does(running, broker, dataset, tmp_path):
    """A machine-vision camera (GigE Vision, USB3 Vision) hands its bridge a buffer of pixels, which the bridge may
    publish as it is, saying its PFNC format and size: colour buffers score exactly as the frame's PNG, grey ones (8
    or 12 bits) as its grey PNG, a Bayer one as the PNG of its demosaiced image; a buffer that does not fit what it
    says is answered with its frame id and why; an MQTT 3.1.1 bridge declares its camera's buffers in config.yaml."""
    prefix, client, worker = running
    image = cv2.imread(str(good_png(dataset)))
    height, width = image.shape[:2]
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    mosaic = image[..., 1].copy()  # RGGB: red at even rows and columns, blue at odd ones, green between
    mosaic[0::2, 0::2], mosaic[1::2, 1::2] = image[0::2, 0::2, 2], image[1::2, 1::2, 0]
    size = {"width": str(width), "height": str(height)}

    def png(pixels: np.ndarray) -> bytes:
        return cv2.imencode(".png", pixels)[1].tobytes()

    sent = [("png", png(image), {}), ("bgr8", image.tobytes(), {"pixel_format": "BGR8", **size}),
            ("rgb8", image[..., ::-1].tobytes(), {"pixel_format": "RGB8", **size}),
            ("grey-png", png(grey), {}), ("mono8", grey.tobytes(), {"pixel_format": "Mono8", **size}),
            ("mono12", (grey.astype("<u2") << 4).tobytes(), {"pixel_format": "Mono12", **size}),
            ("bayer-png", png(cv2.cvtColor(mosaic, cv2.COLOR_BayerRGGB2BGR_EA)), {}),
            ("bayer", mosaic.tobytes(), {"pixel_format": "BayerRG8", **size})]
    refused = [("short", grey.tobytes()[:-width], {"pixel_format": "Mono8", **size}, "truncated_image"),
               ("packed", grey.tobytes(), {"pixel_format": "Mono14p", **size}, "unsupported_format"),
               ("no-height", grey.tobytes(), {"pixel_format": "Mono8", "width": str(width)}, "missing_metadata"),
               ("a-file", png(grey) + bytes(width * height), {"pixel_format": "Mono8", **size}, "bad_dimensions")]
    for frame_id, body, extra, *_ in sent + refused:
        client.publish_frame("strict", body, frame_id, extra=extra)
    errors = {e["frame_id"]: e for e in client.json_on(f"{prefix}/strict/error", count=len(refused))}
    assert {k: e["code"] for k, e in errors.items()} == {f: code for f, _, _, code in refused}
    assert "a Mono8 frame of 128x128 is 16384" in errors["short"]["message"]
    assert "begins like an image file" in errors["a-file"]["message"]
    scores = {r["frame_id"]: r["raw_score"] for r in client.json_on(f"{prefix}/strict/result", count=len(sent))}
    assert scores["bgr8"] == scores["rgb8"] == scores["png"], scores
    assert scores["mono8"] == scores["mono12"] == scores["grey-png"], scores
    assert scores["bayer"] == scores["bayer-png"], scores

    old = Client(broker.port, prefix, protocol=mqtt.MQTTv311)  # no user properties: the camera's config says it
    try:
        for _ in range(2):
            old.client.publish(f"{prefix}/mono311/frame", grey.tobytes(), qos=1).wait_for_publish(5)
        results = [json.loads(m.payload) for m in old.wait_for(lambda m: m.topic == f"{prefix}/mono311/result", count=2)]
        assert [r["raw_score"] for r in results] == [scores["grey-png"]] * 2
        # Recorded under its generated id, as like as can be to the same grey image sent as a file or a buffer (the
        # colour frames may tie with them: the top 10 holds every frame sent here). The recorder writes in batches
        # after the results leave: each frame compared is waited for in the history first.
        for camera, frame_id in [("strict", f) for f in ("mono8", "mono12", "grey-png")] + [("mono311", results[1]["frame_id"])]:
            assert _query_until_found(client, prefix, {"frame_id": frame_id, "camera": camera, "top_k": 1})["ok"], frame_id
        answer = _query_until_found(client, prefix, {"frame_id": results[0]["frame_id"], "camera": "mono311", "top_k": 10})
        assert answer["ok"], answer
        hits = {h["frame_id"]: h["similarity"] for h in answer["hits"]}
        assert {hits.get(f) for f in ("mono8", "mono12", "grey-png", results[1]["frame_id"])} == {1.0}, answer
    finally:
        old.close()
    # The capture sample keeps the buffer as a file the exporter reads: the pixels that were scored.
    client.wait_for(lambda m: m.topic.endswith("/stats") and ((json.loads(m.payload).get("capture") or {})
                                                              .get("mono311") or {}).get("kept"), timeout=60)
    kept = [cv2.imread(str(path)) for path in (tmp_path / "capture").rglob("*.tiff")]
    assert any(np.array_equal(image, cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)) for image in kept), len(kept)
    assert worker.proc.poll() is None


def test_tiff_and_webp_frames_score_as_the_same_png_does(running, dataset):
    """Machine-vision cameras save TIFF (often 16-bit grey), which the exporter trains on, and some bridges send
    WebP: lossless copies of a frame score exactly as its PNG, raw or as base64 text, and a 16-bit grey TIFF as its
    top 8 bits in an 8-bit PNG; a format the worker does not read is refused naming the ones it does."""
    prefix, client, worker = running
    image = cv2.imread(str(good_png(dataset)))
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    tiff = cv2.imencode(".tiff", image)[1].tobytes()
    sent = [("png", _good(dataset)), ("tiff", tiff), ("tiff-b64", _b64(tiff).encode()),
            ("webp", cv2.imencode(".webp", image, [cv2.IMWRITE_WEBP_QUALITY, 101])[1].tobytes()),  # over 100: lossless
            ("grey8", cv2.imencode(".png", grey)[1].tobytes()),
            ("grey16", cv2.imencode(".tiff", grey.astype(np.uint16) << 8 | 0x5A)[1].tobytes()),
            ("ppm", cv2.imencode(".ppm", image)[1].tobytes())]
    for frame_id, body in sent:
        client.publish_frame("strict", body, frame_id)
    (error,) = client.json_on(f"{prefix}/strict/error")
    assert error["frame_id"] == "ppm" and error["code"] == "unsupported_format"
    assert "(JPEG, PNG, BMP, TIFF or WebP)" in error["message"]
    scores = {r["frame_id"]: r["raw_score"] for r in client.json_on(f"{prefix}/strict/result", count=len(sent) - 1)}
    assert scores["tiff"] == scores["tiff-b64"] == scores["webp"] == scores["png"], scores
    assert scores["grey16"] == scores["grey8"], scores
    assert worker.proc.poll() is None


def test_frames_unlike_the_training_images_are_scored_and_say_so(running, dataset, bundle_dir):
    """A camera whose frames have proportions no training image had (a 16:9 camera on a model of square parts) is
    stretched to the input like any frame, and every one of its frames scored as anomalous with nothing said; now
    its results carry why (``unlike_training``) and the log says it once per camera and size.  A camera's tiles of
    the training images' shape, and frames like the training images, carry nothing.  A JPEG stored on its side with
    an EXIF orientation is judged as decoded (upright, as training read such images): it was judged by its stored
    sides, so every frame of such a camera was said unlike frames the model had been trained on (a helper's probe)."""
    import io

    from PIL import Image

    from bundle import read_manifest

    prefix, client, worker = running
    assert read_manifest(bundle_dir).training["frame_sizes"] == {"128x128": 32}  # the generated set's 32 images
    image = cv2.imread(str(good_png(dataset)))
    sent = [("strict", "square", _good(dataset)),
            ("strict", "wide-1", cv2.imencode(".png", cv2.resize(image, (228, 128)))[1].tobytes()),
            ("strict", "wide-2", cv2.imencode(".png", cv2.resize(image, (228, 128)))[1].tobytes()),
            ("strict", "small", cv2.imencode(".png", cv2.resize(image, (64, 64)))[1].tobytes()),
            # 4x3 tiles overlapping by 0.1: tiles of 200x200 pixels, the training images' shape
            ("tiled", "tiles", cv2.imencode(".png", cv2.resize(image, (740, 560)))[1].tobytes())]
    on_its_side, exif = io.BytesIO(), Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: turn a quarter clockwise to show it
    Image.fromarray(cv2.resize(image, (228, 128))[:, :, ::-1]).save(on_its_side, "JPEG", exif=exif)
    sent.append(("strict", "rotated", on_its_side.getvalue()))
    for camera, frame_id, body in sent:
        client.publish_frame(camera, body, frame_id)
    results = {r["frame_id"]: r for r in client.json_on(f"{prefix}/strict/result", count=5)}
    results.update((r["frame_id"], r) for r in client.json_on(f"{prefix}/tiled/result"))
    assert "unlike_training" not in results["square"] and "unlike_training" not in results["tiles"]
    for frame_id in ("wide-1", "wide-2"):
        assert results[frame_id]["unlike_training"].startswith("228x128 has proportions none of the training "
                                                               "images had (128x128)"), results[frame_id]
    assert results["small"]["unlike_training"].startswith("64x64 is smaller than the model's 128x128 input")
    assert results["rotated"]["unlike_training"].startswith("128x228 has proportions"), results["rotated"]
    assert worker.output().count("camera strict sends frames that") == 3, worker.output()[-3000:]


def test_a_grey_frame_on_a_model_of_colour_images_says_so(broker, dataset, tmp_path, worker_factory):
    """A camera switched to a mono pixel format (or a bridge that sends grey) shows a model of colour images another
    picture: its results carry why (``unlike_training``), said once in the log; colour frames carry nothing."""
    from bundle import read_manifest
    from conftest import train_bundle

    gain = np.float32([0.8, 1.0, 1.2])  # every image of the generated weave tinted: a model of colour images
    coloured = tmp_path / "data"
    for path in (dataset / "weave").rglob("*.png"):
        target = coloured / path.relative_to(dataset)
        target.parent.mkdir(parents=True, exist_ok=True)
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if "ground_truth" not in path.parts:
            image = np.clip(image * gain, 0, 255).astype(np.uint8)
        cv2.imwrite(str(target), image if "ground_truth" not in path.parts else image[..., 0])
    bundle = train_bundle(coloured, tmp_path / "colour-bundle")
    manifest = read_manifest(bundle)
    assert manifest.training["chroma"]["min"] > 2 and "grey" not in " ".join(manifest.input.in_graph)
    prefix = f"g{uuid.uuid4().hex[:8]}"
    client = Client(broker.port, prefix)
    worker = worker_factory(write_config(tmp_path, broker.port, bundle, topics={"prefix": prefix}))
    try:
        client.wait_for(lambda m: m.topic == f"{prefix}/workers/w-test/availability" and m.payload == b"online",
                        timeout=120)
        colour = cv2.imread(str(min((coloured / "weave" / "test" / "good").glob("*.png"))))
        for frame_id, image in (("colour", colour), ("grey-1", cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)),
                                ("grey-2", cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY))):
            client.publish_frame("cam", cv2.imencode(".png", image)[1].tobytes(), frame_id)
        results = {r["frame_id"]: r for r in client.json_on(f"{prefix}/cam/result", count=3)}
        assert "unlike_training" not in results["colour"], results["colour"]
        for frame_id in ("grey-1", "grey-2"):
            assert results[frame_id]["unlike_training"].startswith("the frame is grey and every training image was "
                                                                   "in colour"), results[frame_id]
        assert worker.stop() == 0
        assert worker.output().count("camera cam sends frames that") == 1, worker.output()[-3000:]
    finally:
        client.close()


def test_a_damaged_tiff_is_answered_without_libtiffs_messages_in_the_log(running, dataset):
    """A TIFF whose compressed pixels are damaged (a bad link) gets its result or error like any frame, and
    libtiff's complaints, which name no frame, stay out of the worker's log: a camera sending such frames would
    fill the journal."""
    prefix, client, worker = running
    tiff = bytearray(cv2.imencode(".tiff", cv2.imread(str(good_png(dataset))))[1].tobytes())  # LZW by default
    directory = int.from_bytes(tiff[4:8], "little")  # OpenCV writes the pixels first, the directory after them
    for i in range(16, directory, 7):
        tiff[i] ^= 0xFF
    client.publish_frame("strict", bytes(tiff), "damaged")
    client.wait_for(lambda m: m.topic in (f"{prefix}/strict/result", f"{prefix}/strict/error")
                    and json.loads(m.payload).get("frame_id") == "damaged")
    assert "TIFF" not in worker.output()
    assert worker.proc.poll() is None


def test_a_png_whose_colour_profile_does_not_fit_is_scored_without_libpngs_warnings_in_the_log(running, dataset):
    """A grey PNG carrying an RGB colour profile (some camera software writes one) made libpng warn on stderr at
    every frame, a line naming no frame: the profile is left out before decoding (OpenCV does not apply it), and the
    frame scores as the same PNG without it."""
    import io

    from PIL import Image, ImageCms

    prefix, client, worker = running
    grey = Image.open(good_png(dataset)).convert("L")
    plain, profiled = io.BytesIO(), io.BytesIO()
    grey.save(plain, "PNG")
    grey.save(profiled, "PNG", icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    for frame_id, body in (("plain", plain.getvalue()), ("profiled-1", profiled.getvalue()),
                           ("profiled-2", profiled.getvalue())):
        client.publish_frame("strict", body, frame_id)
    scores = {r["frame_id"]: r["raw_score"] for r in client.json_on(f"{prefix}/strict/result", count=3)}
    assert scores["profiled-1"] == scores["profiled-2"] == scores["plain"], scores
    assert "libpng" not in worker.output(), worker.output()[-2000:]


def _big_frames(dataset: Path) -> tuple[bytes, bytes, tuple[float, float, float, float]]:
    """A 4000x3000 good frame and the same with one small hole, as JPEG, and the hole's box (x0, y0, x1, y1)
    in frame pixels.

    The weave is drawn at the scale a 4x3 tile sees at the model's input size (a continuous texture,
    no seams), then enlarged to 4000x3000; the hole is a test image's defect pixels only (its mask),
    about 0.15% of the frame.
    """
    cw, ch = tiling.canvas_size(TilingConfig(**TILING), 128, 128)
    texture = cv2.cvtColor(_texture(np.random.default_rng(3), max(cw, ch))[:ch, :cw], cv2.COLOR_GRAY2BGR)
    hole = cv2.imread(str(min((dataset / "weave" / "test" / "hole").glob("*.png"))))
    mask = cv2.imread(str(min((dataset / "weave" / "ground_truth" / "hole").glob("*.png"))), 0) > 0
    defective = texture.copy()
    x0, y0 = 10, 10
    defective[y0:y0 + 128, x0:x0 + 128][mask] = hole[mask]
    ys, xs = np.nonzero(mask)
    step = (cw - 128) / 3  # the second tile starts here: the hole must lie in the first tile only
    assert x0 + xs.max() < step and y0 + ys.max() < (ch - 128) / 2, "the generated hole moved; place it again"
    box = ((x0 + xs.min()) * 4000 / cw, (y0 + ys.min()) * 3000 / ch,
           (x0 + xs.max() + 1) * 4000 / cw, (y0 + ys.max() + 1) * 3000 / ch)

    def big(image: np.ndarray) -> bytes:
        return cv2.imencode(".jpg", cv2.resize(image, (4000, 3000), interpolation=cv2.INTER_LINEAR),
                            [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()

    return big(texture), big(defective), box


def test_tiling_finds_a_small_defect_the_whole_frame_misses(running, dataset, bundle_dir):
    prefix, client, _ = running
    threshold = json.loads((bundle_dir / "bundle.json").read_text())["thresholds"]["image"]["threshold"]
    good, defective, (bx0, by0, bx1, by1) = _big_frames(dataset)
    for camera in ("tiled", "whole"):
        client.publish_frame(camera, good, "good")
        client.publish_frame(camera, defective, "hole")
    tiled = {r["frame_id"]: r for r in client.json_on(f"{prefix}/tiled/result", count=2, timeout=120)}
    whole = {r["frame_id"]: r for r in client.json_on(f"{prefix}/whole/result", count=2, timeout=120)}

    assert tiled["good"]["verdict"] == "normal" and tiled["good"]["raw_score"] < 0.9 * threshold
    assert tiled["hole"]["verdict"] == "anomalous" and tiled["hole"]["raw_score"] > 1.3 * threshold
    assert tiled["hole"]["tiles"] == {"count": 12, "grid": [4, 3], "worst": [0, 0]}
    # Shrunk whole to 128x128 the hole is about two pixels: it barely moves the whole frame's score, while
    # it moves the tiled score by more than half the threshold.  (The whole frame scores anomalous with or
    # without the hole: at 1/31 scale the weave is not what the model was trained on; README, Tiling.)
    assert "tiles" not in whole["hole"]
    assert abs(whole["hole"]["raw_score"] - whole["good"]["raw_score"]) < 0.15 * threshold
    assert tiled["hole"]["raw_score"] - tiled["good"]["raw_score"] > 0.5 * threshold

    heatmap = next(m for m in client.wait_for(lambda m: m.topic == f"{prefix}/tiled/heatmap", count=2)
                   if user_props(m)["frame_id"] == "hole")
    image = cv2.imdecode(np.frombuffer(heatmap.payload, np.uint8), cv2.IMREAD_COLOR)
    cw, ch = tiling.canvas_size(TilingConfig(**TILING), 128, 128)
    assert image.shape == (ch, cw, 3)  # one merged map over the whole frame, not one tile's
    # JET runs blue -> red: the reddest spot of the merged map is on the hole, within the map's resolution
    # (one feature cell is 8 model pixels, about 70 frame pixels here; the map is blurred over a few cells).
    heat = cv2.GaussianBlur(image[:, :, 2].astype(np.float32) - image[:, :, 0], (0, 0), 3)
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    fx, fy, margin = x * 4000 / cw, y * 3000 / ch, 300
    assert bx0 - margin < fx < bx1 + margin and by0 - margin < fy < by1 + margin, ((fx, fy), (bx0, by0, bx1, by1))


def test_frames_that_no_label_or_query_could_name_are_refused_and_a_cleared_retained_frame_is_not(running, dataset):
    """A camera id over 128 characters or '..' was scored and stored, then no label, query or console could name it;
    one at MQTT's longest topic was scored, then answered internal_error with a 65 KB traceback.  A frame_id given
    twice was read as the last one, and the first never answered.  Clearing a retained frame (an empty retained
    publish) was answered missing_metadata and counted as an error (a helper's probe)."""
    prefix, client, worker = running
    good = _good(dataset)
    client.publish_frame("C" * 129, good, "long-camera")
    client.publish_frame("..", good, "dots")
    longest = "L" * (65535 - len(f"{prefix}//frame"))  # no error topic can be longer than MQTT allows
    client.publish_frame(longest, good, "longest")
    client.publish_frame("strict", good, "dup-a", extra={"frame_id": "dup-b"})
    client.client.publish(f"{prefix}/strict/frame", b"", qos=1, retain=True).wait_for_publish(5)
    client.publish_frame("strict", good, "after")
    for camera, frame_id in (("C" * 129, "long-camera"), ("..", "dots")):
        error = client.json_on(f"{prefix}/{camera}/error")[0]
        assert (error["code"], error["frame_id"], error["camera"]) == ("bad_camera", frame_id, camera), error
    assert client.json_on(f"{prefix}/strict/result")[0]["frame_id"] == "after"
    errors = client.json_on(f"{prefix}/strict/error")  # the result came after: every answer before it is in
    assert [(e["code"], e["frame_id"]) for e in errors] == [("bad_metadata", None)], errors
    assert "frame_id given more than once" in errors[0]["message"]
    assert not [m for m in client.messages if m.topic.endswith("/result") and "strict" not in m.topic]
    log = worker.output()
    assert log.count("frames refused (bad_camera)") == 1 and "Traceback" not in log, log[-3000:]  # once a minute

    # A camera may be named like the stats' bucket of refused and uncounted cameras: its counts stay its own.
    client.publish_frame("_other", good, "named-like-the-bucket")
    assert client.json_on(f"{prefix}/_other/result")[0]["frame_id"] == "named-like-the-bucket"

    def settled(m: mqtt.MQTTMessage) -> bool:
        """A stats message built once the frame was answered: the frame is counted received when it arrives and
        processed before its result leaves, so stats built in between, which reach us before the result, show it in
        flight."""
        if m.topic != f"{prefix}/workers/w-test/stats":
            return False
        counts = json.loads(m.payload)["cameras"].get("_other")
        return counts is not None and counts["received"] == sum(
            counts[f] for f in ("processed", "errored", "dropped", "duplicates"))

    cams = json.loads(client.wait_for(settled)[-1].payload)["cameras"]
    assert (cams["_other"]["received"], cams["_other"]["processed"], cams["_other"]["errored"]) == (1, 1, 0), cams
    assert cams[OTHER]["errored"] >= 2, cams  # the long and the '..' camera


def test_base64_as_web_encoders_write_it_is_read_on_raw_and_envelope_cameras(dataset):
    """URL-safe base64 (RFC 4648 section 5: ``-`` and ``_`` for ``+`` and ``/``, as browsers' and JWT-style encoders
    write it) and base64 without its ``=`` padding (section 3.2) hold the same image: both were refused, a raw
    camera's frame as ``not_an_image`` and an envelope's as ``bad_envelope`` ("not valid base64")."""
    from worker.config import Config
    from worker.decode import FrameError, probe
    from worker.ingest import Ingest

    ingest = Ingest(Config.model_validate({"model": {"bundle": "unused"}, "cameras": {"env": {"payload": "json_envelope"}}}))
    jpeg = cv2.imencode(".jpg", cv2.imread(str(good_png(dataset))))[1].tobytes()
    image = jpeg + b"\0" * ((1 - len(jpeg)) % 3)  # bytes after the end marker, as cameras append: base64 pads it "=="
    standard, safe = base64.b64encode(image).decode(), base64.urlsafe_b64encode(image).decode()
    assert standard.endswith("==") and safe != standard and safe.startswith("_9j_")  # the cases are really there
    for text in (safe, safe.rstrip("="), standard.rstrip("="), "data:image/jpeg;base64," + safe.rstrip("=")):
        assert ingest.arrive("raw", {}, text.encode()).data == image, text[:30]
        assert ingest.arrive("env", {}, json.dumps({"image": text}).encode()).data == image, text[:30]
    assert probe(image, 10**7, 10**7).format == "jpeg"
    # what is not base64 still is not: both alphabets at once, or a length no padding can mend
    mixed = standard[:40] + safe[40:]
    assert set(mixed) & set("+/") and set(mixed) & set("-_")
    for text in (mixed, standard.rstrip("=")[:-1]):
        with pytest.raises(FrameError) as refused:
            ingest.arrive("env", {}, json.dumps({"image": text}).encode())
        assert refused.value.code == "bad_envelope", text[:30]


def test_the_console_shows_the_frames_of_base64_and_envelope_cameras(dataset):
    """README: the console reads a camera's frames "exactly as" the worker does, "the same payloads".  It read only
    image files: a frame sent as base64 text (Home Assistant, Node-RED) was dropped as not an image, and an envelope's
    frame, whose id is in the envelope and not a user property, was never kept; their tiles showed no picture."""
    from worker.config import CameraConfig, ConsoleConfig
    from worker.console.hub import Hub
    from worker.topics import Topics

    good = _good(dataset)
    hub = Hub(Topics("p", "w"), ConsoleConfig(), cameras={"env": CameraConfig(payload="json_envelope")})

    def arrive(camera: str, payload: bytes, scored_as: str, **user: str) -> None:
        frame = mqtt.MQTTMessage(topic=f"p/{camera}/frame".encode())
        frame.payload, frame.properties = payload, Properties(PacketTypes.PUBLISH)
        frame.properties.UserProperty = list(user.items())
        hub.on_message(frame)
        shown = mqtt.MQTTMessage(topic=f"p/{camera}/result".encode())
        shown.payload = json.dumps({"camera": camera, "frame_id": scored_as, "score": 0.1, "verdict": "normal",
                                    "captured_at": "2026-12-06T18:00:00+00:00"}).encode()
        hub.on_message(shown)

    arrive("b64", ("data:image/png;base64," + _b64(good)).encode(), "t1", frame_id="t1")
    arrive("env", json.dumps({"image": _b64(good), "id": 7, "timestamp": 1795000000}).encode(), "7")
    arrive("env", json.dumps({"image": _b64(good), "frame_id": "e2"}).encode(), "p2", frame_id="p2")  # property wins
    assert hub.image("b64", "t1", "frame") == good
    assert hub.image("env", "7", "frame") == good
    assert hub.image("env", "p2", "frame") == good
    # what the worker refuses the console does not keep either
    arrive("env", b"not json", "bad", frame_id="bad")
    assert hub.image("env", "bad", "frame") is None and hub.dropped.get("bad_envelope") == 1, hub.dropped


def test_an_envelope_refused_whole_names_a_frame_id_sent_as_a_number_as_its_result_would(dataset):
    """README: an envelope's frame id may be a number, which becomes its text (``42`` -> ``"42"``).  An envelope
    refused whole (no image, an image that is not base64) named a text id in its error but not a numeric one
    (``frame_id`` null): a Frigate-style publisher could not match the error to its frame."""
    from worker.config import Config
    from worker.decode import FrameError
    from worker.ingest import Ingest

    ingest = Ingest(Config.model_validate({"model": {"bundle": "unused"}, "cameras": {"env": {"payload": "json_envelope"}}}))
    for doc, named in (({"image": "%%%", "id": 42}, "42"), ({"id": 1795.5}, "1795.5"), ({"image": "%%%", "id": "a"}, "a"),
                       ({"image": "%%%", "id": True}, None), ({"image": 7, "frame_id": "x/y"}, None)):
        with pytest.raises(FrameError) as refused:
            ingest.arrive("env", {}, json.dumps(doc).encode())
        assert (refused.value.code, refused.value.frame_id) == ("bad_envelope", named), doc


def test_a_raw_camera_reads_a_data_url_of_any_media_type_as_an_envelope_does(dataset):
    """README: a raw camera's frame may be base64 text, "a ``data:`` URL too".  Only ``data:image/...`` was read:
    a browser's ``FileReader`` names a file of unknown type ``data:application/octet-stream;base64,`` and RFC 2397
    allows ``data:;base64,``; such a frame was refused ``not_an_image``, where an envelope's image was read."""
    from worker.config import Config
    from worker.ingest import Ingest

    ingest = Ingest(Config.model_validate({"model": {"bundle": "unused"}, "cameras": {"env": {"payload": "json_envelope"}}}))
    good = _good(dataset)
    for url in ("data:application/octet-stream;base64,", "data:;base64,", "data:image/png;base64,"):
        assert ingest.arrive("raw", {}, (url + _b64(good)).encode()).data == good, url
        assert ingest.arrive("env", {}, json.dumps({"image": url + _b64(good)}).encode()).data == good, url


def test_a_binary_image_marked_as_utf8_text_is_delivered_and_scored(running, dataset):
    """A client library's option can mark a binary image as UTF-8 text (MQTT v5 payload format indicator 1).  The
    docs said mosquitto closes such a publisher's connection and the frame is lost unanswered; mosquitto 2.0.11, the
    broker these tests run, delivers it from paho, and the worker scores it as any frame."""
    prefix, client, worker = running
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("frame_id", "marked-text"), ("captured_at", str(time.time()))]
    props.PayloadFormatIndicator = 1
    client.client.publish(f"{prefix}/strict/frame", _good(dataset), qos=1, properties=props).wait_for_publish(5)
    assert client.json_on(f"{prefix}/strict/result")[0]["frame_id"] == "marked-text"
    assert client.client.is_connected() and worker.proc.poll() is None
