"""The worker end to end: real mosquitto, real OpenVINO bundle, real embedded Qdrant, real images."""

from __future__ import annotations

import base64
import csv
import io
import json
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ROOT, Client, good_png, user_props, wait_online, write_config
from worker.config import StoreConfig
from worker.store import VectorStore, point_id


def _frames(dataset: Path) -> list[tuple[str, bytes, str]]:
    """(frame_id, PNG or JPEG bytes, defect type) for the generated test split."""
    out = []
    for path in sorted((dataset / "weave" / "test").glob("*/*.png")):
        data = path.read_bytes()
        if path.stem.endswith("1"):  # some frames as JPEG, as cameras usually send
            data = cv2.imencode(".jpg", cv2.imread(str(path)), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
        out.append((f"{path.parent.name}-{path.stem}", data, path.parent.name))
    return out


@pytest.fixture
def running(broker, bundle_dir, tmp_path, worker_factory):
    prefix = f"t{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix})
    client = Client(broker.port, prefix)
    worker = worker_factory(config)
    client.wait_for(lambda m: m.topic == f"{prefix}/workers/w-test/availability" and m.payload == b"online",
                    timeout=120)
    yield prefix, client, worker, config, tmp_path
    client.close()


def test_frames_results_heatmaps_store_and_shutdown(running, dataset, bundle_dir):
    prefix, client, worker, config, folder = running
    frames = _frames(dataset)
    for frame_id, data, _ in frames:
        client.publish_frame("cam1", data, frame_id)
    results = {r["frame_id"]: r for r in client.json_on(f"{prefix}/cam1/result", count=len(frames), timeout=120)}
    assert set(results) == {f for f, _, _ in frames}

    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    for r in results.values():
        assert r["camera"] == "cam1"
        assert 0.0 <= r["score"] <= 1.0
        assert r["threshold"] == pytest.approx(manifest["thresholds"]["image"]["threshold"], rel=1e-4)
        assert r["verdict"] == ("anomalous" if r["raw_score"] >= r["threshold"] else "normal")
        assert r["model"] == {"name": manifest["name"], "version": manifest["version"], "family": "patchcore",
                              "precision": "f32", "extension": {"revision": 0, "rows": 0, "labels": 0, "held": 0, "max_rows": 1024}}
        assert set(r["latency_ms"]) == {"queue", "decode", "infer", "post", "total"}
        assert r["latency_ms"]["total"] >= r["latency_ms"]["infer"] > 0
    good = [r["raw_score"] for f, r in results.items() if f.startswith("good")]
    bad = [r["raw_score"] for f, r in results.items() if not f.startswith("good")]
    assert np.mean(bad) > np.mean(good), "defects should score higher than good frames"
    assert sum(r["verdict"] == "anomalous" for f, r in results.items() if not f.startswith("good")) >= len(bad) // 2

    heatmaps = client.wait_for(lambda m: m.topic == f"{prefix}/cam1/heatmap", count=len(frames))
    for msg in heatmaps:
        assert msg.properties.ContentType == "image/jpeg"
        image = cv2.imdecode(np.frombuffer(msg.payload, np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (128, 128, 3)
    assert {user_props(m)["frame_id"] for m in heatmaps} == set(results)

    def all_processed(m) -> bool:
        """Stats built once every frame was counted: the last stats before the last result may have been built
        before the burst, or in it (each frame is counted processed before its result leaves)."""
        return m.topic == f"{prefix}/workers/w-test/stats" and json.loads(m.payload).get("cameras", {}).get(
            "cam1", {}).get("processed", 0) >= len(frames)

    counted = json.loads(client.wait_for(all_processed, timeout=30)[0].payload)["cameras"]["cam1"]
    assert (counted["received"], counted["processed"]) == (len(frames), len(frames)), counted

    assert worker.stop() == 0, worker.output()
    client.wait_for(lambda m: m.topic == f"{prefix}/workers/w-test/availability" and m.payload == b"stopped")

    # Every frame is in the history with its payload; anomalous ones have their evidence on disk.
    store = VectorStore(StoreConfig(path=folder / "qdrant"), manifest["embedding_dim"])
    try:
        count = store.count()
        by_id = {frame_id: store.find(frame_id, "cam1") for frame_id in results}
    finally:
        store.close()
    assert count == len(frames)
    for frame_id, found in by_id.items():
        assert found is not None, frame_id
        _, vector, payload = found
        assert payload["frame_id"] == frame_id
        assert payload["verdict"] == results[frame_id]["verdict"]
        assert payload["camera"] == "cam1"
        # retention goes by when the worker received the frame (store.py), not by the camera's clock
        assert payload["received_ts"] == pytest.approx(
            datetime.fromisoformat(results[frame_id]["received_at"]).timestamp(), abs=0.001)
        assert len(vector) == manifest["embedding_dim"]
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-3)
        assert (folder / "evidence" / payload["evidence"]["thumbnail"]).is_file()
        if payload["anomalous"]:
            assert (folder / "evidence" / payload["evidence"]["frame"]).is_file()
            assert (folder / "evidence" / payload["evidence"]["heatmap"]).is_file()


def test_the_last_stats_of_a_clean_stop_report_the_store_as_it_was(running, dataset):
    """The stop closed the store before publishing its last stats, which then said ``store_available: false``: a
    dashboard's last reading of a worker stopped for maintenance showed its store as down.  They say it as it was."""
    prefix, client, worker, _, _ = running
    frame_id, data, _ = _frames(dataset)[0]
    client.publish_frame("cam1", data, frame_id)
    client.json_on(f"{prefix}/cam1/result", timeout=60)
    topic = f"{prefix}/workers/w-test/stats"
    client.wait_for(lambda m: m.topic == topic and json.loads(m.payload)["store_written"] == 1
                    and json.loads(m.payload)["store_available"], timeout=60)
    assert worker.stop() == 0, worker.output()
    stopped = client.wait_for(lambda m: m.topic == f"{prefix}/workers/w-test/availability" and m.payload == b"stopped")
    with client.lock:
        order = list(client.messages)
    last = [json.loads(m.payload) for m in order[:order.index(stopped[0])] if m.topic == topic][-1]
    assert last["store_available"] is True and last["store_written"] == 1, last


def _truncated_jpeg(dataset: Path) -> bytes:
    image = cv2.imread(str(good_png(dataset)))
    data = cv2.imencode(".jpg", image)[1].tobytes()
    return data[: len(data) * 2 // 3]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="OS thread names are read from Linux's /proc")
def test_top_tells_the_worker_loops_from_openvino_threads(running, dataset):
    """``top -H`` / ``ps -L`` show each loop by name and OpenVINO's threads as ``openvino`` (what the throughput
    benchmark splits the worker's CPU by)."""
    prefix, client, worker, _, _ = running
    frame_id, data, _ = _frames(dataset)[0]
    client.publish_frame("cam1", data, frame_id)
    client.json_on(f"{prefix}/cam1/result", count=1, timeout=60)  # every loop has run by now

    def names() -> set[str]:
        found = set()
        for task in Path(f"/proc/{worker.proc.pid}/task").iterdir():
            try:
                found.add((task / "comm").read_text().strip())
            except OSError:  # a thread that ended meanwhile
                continue
        return found

    assert {"infer-0", "recorder", "requests", "openvino"} <= names()


def test_bad_input_gets_an_error_and_the_next_frame_still_works(running, dataset):
    prefix, client, worker, _, _ = running
    good = good_png(dataset).read_bytes()
    bomb = cv2.imencode(".png", np.zeros((5000, 5000), np.uint8))[1].tobytes()  # 25 Mpx in a few kB
    cases = [
        ("not-image", b"this is not an image at all", "not_an_image", {}),
        ("truncated", _truncated_jpeg(dataset), "truncated_image", {}),
        ("truncated-png", good[: len(good) // 2], "truncated_image", {}),  # was corrupt_image, and a libpng line
        ("oversize", b"\x89PNG" + bytes(2_100_000), "payload_too_large", {}),
        ("bomb", bomb, "image_too_large", {}),
        (None, good, "missing_metadata", {}),
        ("no-time", good, "missing_metadata", {"captured_at": None}),
        ("bad-time", good, "bad_metadata", {"captured_at": "yesterday-ish"}),
        ("mismatch", good, "camera_mismatch", {"camera_id": "cam9"}),
        ("empty", b"", "empty_payload", {}),
    ]
    for frame_id, data, _, extra in cases:
        captured = extra.pop("captured_at", "now") if "captured_at" in extra else "now"
        client.publish_frame("cam2", data, frame_id, captured_at=captured, extra=extra)
    client.publish_frame("", good, "no-camera")  # <prefix>//frame: no camera to answer, so said in the log
    client.publish_frame("cam2", good, "after-the-garbage")

    errors = client.json_on(f"{prefix}/cam2/error", count=len(cases))
    assert [e["code"] for e in errors] == [code for _, _, code, _ in cases]
    for e, (frame_id, *_rest) in zip(errors, cases):
        assert e["frame_id"] == frame_id and e["message"] and e["camera"] == "cam2"
    result = client.json_on(f"{prefix}/cam2/result")[0]
    assert result["frame_id"] == "after-the-garbage"
    assert worker.proc.poll() is None, "the worker must keep running"
    assert f"frames on {prefix}//frame are ignored: its camera level is empty" in worker.output()
    assert "libpng" not in worker.output()  # a stderr line per frame cut short, naming none


def _query(client: Client, prefix: str, request: dict, timeout: float = 30, topic: str = "query") -> dict:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    token = uuid.uuid4().hex.encode()
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = f"{prefix}/query/response/test"
    props.CorrelationData = token
    client.client.publish(f"{prefix}/{topic}", json.dumps(request), qos=1, properties=props)
    msg = client.wait_for(lambda m: m.topic == props.ResponseTopic and m.properties.CorrelationData == token,
                          timeout=timeout)[0]
    return json.loads(msg.payload)


def _wait_stored(client, prefix: str, results: list[dict]) -> None:
    """Until the worker's stats say every logged result is in the store (the recorder writes in batches)."""
    logged = sum(bool(r["logged"]) for r in results)

    def caught_up(m) -> bool:
        if m.topic != f"{prefix}/workers/w-test/stats":
            return False
        stats = json.loads(m.payload)
        return stats["store_written"] >= logged and stats["store_pending"] == 0

    client.wait_for(caught_up, timeout=60)


def test_similarity_queries_over_mqtt_and_cli(running, dataset, tmp_path):
    prefix, client, _, config, _ = running
    empty = _query(client, prefix, {"frame_id": "nothing-yet", "top_k": 3})
    assert empty["ok"] is False and empty["error"]["code"] == "empty_store"
    none_yet = _query(client, prefix, {"top_k": 3})  # neither frame_id nor image: the latest frames, none yet
    assert none_yet["ok"] and none_yet["hits"] == [] and none_yet["query"] == {"latest": True}, none_yet

    frames = _frames(dataset)
    for frame_id, data, _ in frames:
        client.publish_frame("cam3", data, frame_id)
    results = client.json_on(f"{prefix}/cam3/result", count=len(frames), timeout=120)
    _wait_stored(client, prefix, results)

    # The latest frames matching the filters, the last received first: what a console that starts shows.
    defects = [r["frame_id"] for r in results if r["verdict"] == "anomalous"]
    assert defects and all(r["logged"] for r in results if r["verdict"] == "anomalous")
    latest = _query(client, prefix, {"top_k": 50, "filters": {"cameras": ["cam3"], "anomalous_only": True}})
    assert latest["ok"] and sorted(h["frame_id"] for h in latest["hits"]) == sorted(defects), (latest, defects)
    received = [h["received_at"] for h in latest["hits"]]
    assert received == sorted(received, reverse=True) and all(received), received
    assert all(h["similarity"] is None and h["thumbnail_b64"] and h["heatmap_b64"] for h in latest["hits"])
    newest = _query(client, prefix, {"top_k": 2, "filters": {"cameras": ["cam3"]}, "include_heatmaps": False})
    logged = {r["frame_id"] for r in results if r["logged"]}  # received in publish order; results come as they finish
    assert [h["frame_id"] for h in newest["hits"]] == [f for f, _, _ in frames if f in logged][-1:-3:-1], newest
    # A time range bounded by a frame's captured_at as its result gives it (milliseconds) holds the frame: the
    # camera's stamp (here time.time()) was stored to the microsecond, just after the range's end.
    at = newest["hits"][0]["captured_at"]
    bounded = _query(client, prefix, {"top_k": 5, "filters": {"cameras": ["cam3"], "since": at, "until": at}})
    # (frames published back to back can share the millisecond: each hit is of it, the newest frame among them)
    assert newest["hits"][0]["frame_id"] in [h["frame_id"] for h in bounded["hits"]], bounded
    assert all(h["captured_at"] == at for h in bounded["hits"]), bounded

    # The very image of a logged frame finds that frame first, with cosine similarity ~1.
    frame_id, data, _ = frames[5]
    answer = _query(client, prefix, {"image_b64": base64.b64encode(data).decode(), "top_k": 4})
    assert answer["ok"], answer
    assert answer["hits"][0]["frame_id"] == frame_id
    assert answer["hits"][0]["similarity"] == pytest.approx(1.0, abs=1e-3)
    sims = [h["similarity"] for h in answer["hits"]]
    assert sims == sorted(sims, reverse=True) and len(sims) == 4
    thumb = cv2.imdecode(np.frombuffer(base64.b64decode(answer["hits"][0]["thumbnail_b64"]), np.uint8), 1)
    assert thumb is not None and max(thumb.shape[:2]) <= 128
    # Base64 as other tools write it (wrapped in lines by the base64 CLI, a data: URL) reads as a frame's does.
    for text in (base64.encodebytes(data).decode(), "data:image/png;base64," + base64.b64encode(data).decode()):
        written = _query(client, prefix, {"image_b64": text, "top_k": 1})
        assert written["ok"] and written["hits"][0]["frame_id"] == frame_id, written

    # By past frame id: the frame itself is excluded; filters apply.
    anomalous = _query(client, prefix, {"frame_id": frame_id, "top_k": 50, "filters": {"anomalous_only": True}})
    assert anomalous["ok"] and frame_id not in {h["frame_id"] for h in anomalous["hits"]}
    assert anomalous["hits"] and all(h["verdict"] == "anomalous" for h in anomalous["hits"])
    # A client that takes only small packets (its MQTT v5 Maximum Packet Size: the broker drops a larger answer)
    # asks for hits without their images.
    bare = _query(client, prefix, {"frame_id": frame_id, "top_k": 3, "include_thumbnails": False,
                                   "include_heatmaps": False})
    assert bare["ok"] and len(bare["hits"]) == 3 and not any({"thumbnail_b64", "heatmap_b64"} & set(h) for h in bare["hits"])
    full = _query(client, prefix, {"frame_id": frame_id, "top_k": 3})
    assert [h["frame_id"] for h in full["hits"]] == [h["frame_id"] for h in bare["hits"]]
    assert len(json.dumps(bare)) < 2000 < len(json.dumps(full))
    other_cam = _query(client, prefix, {"frame_id": frame_id, "top_k": 5, "filters": {"cameras": ["nope"]}})
    assert other_cam["ok"] and other_cam["hits"] == []

    for request, code in [
        ({"frame_id": "no-such-frame"}, "unknown_frame"),
        ({"image_b64": base64.b64encode(b"garbage").decode()}, "bad_image"),
        ({"frame_id": frame_id, "image_b64": "AAAA"}, "bad_request"),
        ({"camera": "cam3"}, "bad_request"),  # the latest frames of a camera: filters.cameras
        ({"frame_id": frame_id, "top_k": 1000}, "bad_request"),
        ({"frame_id": frame_id, "top_k": "3"}, "bad_request"),  # strict: read as 3 before
        ({"frame_id": frame_id, "top_k": True}, "bad_request"),  # read as 1
        ({"frame_id": frame_id, "include_heatmaps": "no"}, "bad_request"),
        ({"frame_id": frame_id, "include_thumbnails": 0}, "bad_request"),
        ({"frame_id": frame_id, "filters": {"since": "2026-12-04T00:00:00Z", "until": "2026-12-03T00:00:00Z"}},
         "bad_request"),  # answered ok with no hits
    ]:
        reply = _query(client, prefix, request)
        assert reply["ok"] is False and reply["error"]["code"] == code, reply
    assert "since (2026-12-04T00:00:00Z) is after filters.until (2026-12-03T00:00:00Z)" in reply["error"]["message"]

    # The CLI goes through the same request/response API.
    cli = subprocess.run([sys.executable, "-m", "worker", "query", "--config", str(config), "--frame-id", frame_id,
                          "--top-k", "3", "--json"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr
    out = json.loads(cli.stdout)
    assert out["ok"] and len(out["hits"]) == 3 and out["query"]["frame_id"] == frame_id
    listed = subprocess.run([sys.executable, "-m", "worker", "query", "--config", str(config), "--cameras", "cam3",
                             "--anomalous-only", "--top-k", "2"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split()[0] == "received_at" and latest["hits"][0]["frame_id"] in listed.stdout, listed.stdout
    mixed = subprocess.run([sys.executable, "-m", "worker", "query", "--config", str(config), "--camera", "cam3"],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert mixed.returncode == 2 and "the latest frames of a camera: --cameras cam3" in mixed.stderr, mixed.stderr
    # Camera filters are names separated by spaces: a camera's name may hold a comma ("a,b" was two cameras).
    for cameras, found in ((["cam3"], 2), (["nope", "cam3"], 2), (["cam3,nope"], 0)):
        filtered = subprocess.run([sys.executable, "-m", "worker", "query", "--config", str(config), "--frame-id",
                                   frame_id, "--top-k", "2", "--json", "--cameras", *cameras], capture_output=True,
                                  text=True, timeout=60, cwd=ROOT)
        assert filtered.returncode == 0 and len(json.loads(filtered.stdout)["hits"]) == found, filtered
        assert ("is read as one camera's name" in filtered.stderr) == ("," in cameras[0]), filtered.stderr
    image = tmp_path / "query.png"
    image.write_bytes(data)  # by image, embedded as the camera named (the CLI dropped --camera with --image)
    by_image = subprocess.run([sys.executable, "-m", "worker", "query", "--config", str(config), "--image", str(image),
                               "--camera", "cam3", "--top-k", "1", "--json"], capture_output=True, text=True, timeout=60,
                              cwd=ROOT)
    assert by_image.returncode == 0, by_image.stderr
    assert json.loads(by_image.stdout)["query"] == {"image_bytes": len(data), "camera": "cam3"}
    missing = subprocess.run([sys.executable, "-m", "worker", "query", "--config", str(config), "--frame-id", "nope",
                              "--top-k", "3"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert missing.returncode == 1 and "unknown_frame" in missing.stderr
    backwards = subprocess.run([sys.executable, "-m", "worker", "query", "--config", str(config), "--frame-id", frame_id,
                                "--since", "2099-01-01", "--until", "2000-01-01"], capture_output=True, text=True,
                               timeout=60, cwd=ROOT)
    assert backwards.returncode == 1 and "bad_request" in backwards.stderr and "is after filters.until" in backwards.stderr


def test_a_label_for_a_frame_whose_id_the_camera_reused_since_does_not_land_on_the_later_frame(running, dataset):
    """A camera whose frame counter starts again at a reboot sends frame 7 again: the history keeps one frame per
    camera and id, so the later one replaced the earlier's record, and a label the operator gave the earlier (its card
    still on the console's feed) landed on the later frame, which a false alarm then taught the model; its similar
    frames were the later frame's.  A label or query that names its frame's ``captured_at`` (the console's page sends
    it) is refused ``unknown_frame`` when the stored frame is another, and nothing is labelled (a withdrawal is said
    as one, not as a label)."""
    prefix, client, _, config, _ = running
    defects = [data for _, data, kind in _frames(dataset) if kind != "good"][:2]
    client.publish_frame("cam", defects[0], "7", captured_at=str(time.time() - 60))
    earlier = client.json_on(f"{prefix}/cam/result")[0]
    client.publish_frame("cam", defects[1], "7")  # after the reboot: its counter is at 7 again
    results = client.json_on(f"{prefix}/cam/result", count=2)
    _wait_stored(client, prefix, results)
    later = results[1]
    assert earlier["captured_at"] != later["captured_at"] and all(r["logged"] for r in results), results

    def label(captured_at: str) -> dict:
        return _query(client, prefix, {"action": "set", "frame_id": "7", "camera": "cam", "captured_at": captured_at,
                                       "label": "false_alarm"}, topic="label")

    similar = _query(client, prefix, {"frame_id": "7", "camera": "cam", "captured_at": earlier["captured_at"]})
    assert not similar["ok"] and similar["error"]["code"] == "unknown_frame", similar
    assert later["captured_at"] in similar["error"]["message"], similar
    assert _query(client, prefix, {"frame_id": "7", "camera": "cam", "captured_at": later["captured_at"]})["ok"]
    unnamed = _query(client, prefix, {"frame_id": "7", "captured_at": later["captured_at"]})  # which camera's frame 7?
    assert unnamed["error"]["code"] == "bad_request" and "give both" in unnamed["error"]["message"], unnamed
    refused = label(earlier["captured_at"])
    assert not refused["ok"] and refused["error"]["code"] == "unknown_frame", refused
    assert later["captured_at"] in refused["error"]["message"] and "nothing was labelled" in refused["error"]["message"]
    withdrawal = _query(client, prefix, {"action": "unlabel", "frame_id": "7", "camera": "cam",
                                         "captured_at": earlier["captured_at"]}, topic="label")
    assert not withdrawal["ok"] and withdrawal["error"]["code"] == "unknown_frame", withdrawal
    assert "no label was withdrawn" in withdrawal["error"]["message"], withdrawal  # not "nothing was labelled"
    cli = subprocess.run([sys.executable, "-m", "worker", "label", "--config", str(config), "--frame-id", "7",
                          "--camera", "cam", "--captured-at", earlier["captured_at"], "--false-alarm"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert cli.returncode == 1 and "unknown_frame" in cli.stderr, cli.stderr[-2000:]
    exported = _query(client, prefix, {"action": "export", "format": "json"}, topic="label")
    assert exported["ok"] and exported["labels"] == [], exported
    assert label(later["captured_at"])["ok"]  # the frame the history holds, named by its own time
    exported = _query(client, prefix, {"action": "export", "format": "json"}, topic="label")
    assert [(x["frame_id"], x["captured_at"], x["label"]) for x in exported["labels"]] == [
        ("7", later["captured_at"], "false_alarm")], exported


def test_labels_round_trip_into_the_store_and_export(running, dataset):
    prefix, client, _, config, _ = running
    frames = _frames(dataset)[:6]
    for frame_id, data, _ in frames:
        client.publish_frame("cam4", data, frame_id)
    _wait_stored(client, prefix, client.json_on(f"{prefix}/cam4/result", count=len(frames), timeout=120))
    target, other = frames[0][0], frames[1][0]

    def label(body: dict) -> dict:
        return _query(client, prefix, body, topic="label")

    answer = label({"action": "set", "frame_id": target, "camera": "cam4", "label": "false_alarm", "note": "glare"})
    assert "patches" in answer.pop("absorbed")  # what the model learned from it: tests/test_learning.py
    assert answer == {"ok": True, "frame_id": target, "camera": "cam4", "label": "false_alarm", "defect_type": None,
                      "worker": "w-test"}  # the worker that answered: in a share group, one of several
    confirmed = label({"action": "set", "frame_id": other, "camera": "cam4", "label": "confirmed_defect",
                       "defect_type": "hole"})
    # scored normal, it was captured as a good frame: the next model must not learn it as one
    assert confirmed["ok"] and confirmed["capture"] == "taken out of the captured normal frames", confirmed
    exported = _query(client, prefix, {"command": "export_capture"}, topic="workers/w-test/control")
    good = {p.stem for p in Path(exported["cameras"]["cam4"]["folder"], "good").iterdir()}
    assert point_id("cam4", other) not in good and point_id("cam4", frames[2][0]) in good, good
    assert [p.stem for p in Path(exported["cameras"]["cam4"]["folder"], "confirmed_defect").iterdir()] == [
        point_id("cam4", other)]  # the next bundle's test image
    assert exported["cameras"]["cam4"]["confirmed_defects"] == 1
    hits = _query(client, prefix, {"frame_id": other, "camera": "cam4", "top_k": 10})["hits"]
    labelled = {h["frame_id"]: (h["label"], h["defect_type"]) for h in hits}
    assert labelled[target] == ("false_alarm", None)
    # The CLI's table shows them too: a similar frame labelled a false alarm read as one more defect like it.
    table = subprocess.run([sys.executable, "-m", "worker", "query", "--config", str(config), "--frame-id", target,
                            "--camera", "cam4", "--top-k", "10"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert table.returncode == 0, table.stderr[-2000:]
    rows = {line.split()[2]: line.split(None, 6)[-1] for line in table.stdout.splitlines()[1:]}
    assert table.stdout.split()[:7] == ["similarity", "camera", "frame_id", "captured_at", "score", "verdict", "label"]
    assert rows[other] == "confirmed_defect: hole" and rows[frames[2][0]] == "-", table.stdout

    export = label({"action": "export", "format": "json"})
    assert export["ok"] and export["count"] == 2 and {(r["frame_id"], r["label"]) for r in export["labels"]} == {
        (target, "false_alarm"), (other, "confirmed_defect")}
    export = label({"action": "export", "format": "csv"})
    assert export["ok"] and export["count"] == 2 and "labels" not in export, export  # each label once: in the CSV
    assert export["csv"].splitlines()[0].startswith("frame_id,camera,captured_at")
    assert len(export["csv"].splitlines()) == 3

    assert label({"action": "set", "frame_id": target, "camera": "cam4", "label": None})["ok"]  # cleared
    assert {r["frame_id"] for r in label({"action": "export"})["labels"]} == {other}
    bad = label({"action": "set", "frame_id": "nope", "camera": "cam4", "label": "false_alarm"})
    assert bad["ok"] is False and bad["error"]["code"] == "unknown_frame"
    bad = label({"action": "set", "frame_id": target, "camera": "cam4", "label": "maybe"})
    assert bad["ok"] is False and bad["error"]["code"] == "bad_request"
    for action in ({"export": 1}, ["unlabel"], 3):  # an action that is no string: a bad request, not a crash
        bad = label({"action": action, "frame_id": target, "camera": "cam4"})
        assert bad["ok"] is False and bad["error"]["code"] == "bad_request" and "action" in bad["error"]["message"], bad


def test_frames_confirmed_as_defects_before_leave_the_capture_at_the_next_start(broker, bundle_dir, dataset, tmp_path,
                                                                                 worker_factory):
    """A frame confirmed as a defect leaves the capture sample when it is labelled; one labelled before that (an
    earlier version, or capture off then) stayed in it for good, and the next bundle trained on the capture learned
    it as good.  At the next start the sample gives such frames up, and the log says so."""
    prefix = f"k{uuid.uuid4().hex[:6]}"
    client = Client(broker.port, prefix)
    settings = dict(topics={"prefix": prefix}, store={"log_normal_every": 1})
    first = worker_factory(write_config(tmp_path, broker.port, bundle_dir, **settings))
    client.wait_for(lambda m: m.topic == f"{prefix}/workers/w-test/availability" and m.payload == b"online", 120)
    images = sorted((dataset / "weave" / "train" / "good").glob("*.png"))[:4]
    for i, path in enumerate(images):
        client.publish_frame("cam", path.read_bytes(), f"g{i}")
    _wait_stored(client, prefix, client.json_on(f"{prefix}/cam/result", count=len(images), timeout=120))
    assert first.stop() == 0
    kept = lambda: {p.name.split(".", 1)[0] for p in (tmp_path / "capture").glob("*/*") if p.suffix != ".json"}  # noqa: E731
    assert point_id("cam", "g0") in kept(), kept()
    client.messages.clear()
    off = worker_factory(write_config(tmp_path, broker.port, bundle_dir, **settings, capture={"enabled": False}))
    client.wait_for(lambda m: m.topic == f"{prefix}/workers/w-test/availability" and m.payload == b"online", 120)
    answer = _query(client, prefix, {"action": "set", "frame_id": "g0", "camera": "cam", "label": "confirmed_defect"},
                    topic="label")
    assert answer["ok"] and "capture" not in answer, answer
    assert off.stop() == 0 and point_id("cam", "g0") in kept()
    again = worker_factory(write_config(tmp_path, broker.port, bundle_dir, **settings))
    deadline = time.monotonic() + 60  # the log line follows the sample's change
    while "capture: 1 frame(s) labelled confirmed defects were still among the captured" not in again.output():
        assert time.monotonic() < deadline, again.output()[-2000:]
        time.sleep(0.1)
    assert point_id("cam", "g0") not in kept() and point_id("cam", "g1") in kept(), kept()
    client.close()


def test_a_label_no_worker_answered_is_not_applied_at_the_next_start(broker, bundle_dir, dataset, tmp_path,
                                                                     worker_factory):
    """A label sent while the worker was away was answered "no answer from a worker" and kept in the worker's
    session by the broker: the next start applied it (a false alarm absorbed into the model) although the operator
    had been told it failed.  A request now expires with its caller's wait."""
    from worker.api_client import ApiClient, ApiError
    from worker.config import load_config

    prefix = f"t{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix}, query={"timeout_s": 1})
    client = Client(broker.port, prefix)
    online = (lambda m: m.topic == f"{prefix}/workers/w-test/availability" and m.payload == b"online")
    worker = worker_factory(config)
    client.wait_for(online, timeout=120)
    frame_id, data, _ = _frames(dataset)[0]
    client.publish_frame("cam1", data, frame_id)
    _wait_stored(client, prefix, client.json_on(f"{prefix}/cam1/result"))
    assert worker.stop() == 0
    with ApiClient(load_config(config, environ={}), "late") as api, pytest.raises(ApiError, match="no answer"):
        api.label({"action": "set", "frame_id": frame_id, "camera": "cam1", "label": "false_alarm"})
    # mosquitto counts expiry in whole seconds: a 1 s expiry still delivers up to 2 s after the publish, which was at
    # least 1 s before the answer above; a worker that started faster than that took the label.  The time itself
    # is what is tested here.
    time.sleep(1.2)
    client.messages.clear()
    worker = worker_factory(config)  # the same session: what the broker kept for it comes first
    client.wait_for(online, timeout=120)
    assert _query(client, prefix, {"action": "export"}, topic="label")["labels"] == []
    assert "absorbed" not in worker.output()
    assert worker.stop() == 0
    client.close()


def test_the_csv_export_shows_formulas_as_text(running, dataset):
    """A camera picks its own frame ids and camera ids, an operator types notes: a CSV cell starting with = + - @ tab or
    CR ran as a formula in the spreadsheet it was opened in. CSV cells so started get a leading ', JSON keeps them."""
    prefix, client, _, config, _ = running
    defects = [(data, kind) for _, data, kind in _frames(dataset) if kind != "good"][:3]
    frames = [("=1+2", "-cam"), ("@SUM(1;2)", "-cam"), ("'=1+2", "-cam")]  # the last one: told apart from the first
    for (frame_id, camera), (data, _) in zip(frames, defects, strict=True):
        client.publish_frame(camera, data, frame_id)
    results = client.json_on(f"{prefix}/-cam/result", count=3, timeout=120)
    assert all(r["logged"] for r in results), results
    _wait_stored(client, prefix, results)
    notes = {"=1+2": ('=HYPERLINK("http://evil.example","x")', "-1+1"), "@SUM(1;2)": ("\tpadded", "+x"),
             "'=1+2": ("'quoted", "bent")}
    for frame_id, (note, defect_type) in notes.items():
        assert _query(client, prefix, {"action": "set", "frame_id": frame_id, "camera": "-cam", "note": note,
                                       "label": "confirmed_defect", "defect_type": defect_type}, topic="label")["ok"]

    export = _query(client, prefix, {"action": "export", "format": "json"}, topic="label")
    assert {r["frame_id"]: (r["note"], r["defect_type"], r["camera"]) for r in export["labels"]} == {
        "=1+2": ('=HYPERLINK("http://evil.example","x")', "-1+1", "-cam"), "@SUM(1;2)": ("\tpadded", "+x", "-cam"),
        "'=1+2": ("'quoted", "bent", "-cam")}
    export = _query(client, prefix, {"action": "export", "format": "csv"}, topic="label")
    cli = subprocess.run([sys.executable, "-m", "worker", "labels", "--config", str(config), "--format", "csv"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr
    for text in (export["csv"], cli.stdout):
        rows = {r["frame_id"]: (r["note"], r["defect_type"], r["camera"], r["label"])
                for r in csv.DictReader(io.StringIO(text))}
        assert rows == {"'=1+2": ('\'=HYPERLINK("http://evil.example","x")', "'-1+1", "'-cam", "confirmed_defect"),
                        "'@SUM(1;2)": ("'\tpadded", "'+x", "'-cam", "confirmed_defect"),
                        "''=1+2": ("''quoted", "bent", "'-cam", "confirmed_defect")}, rows


def _worker_api_section() -> str:
    """README's "Worker API (MQTT v5)" section: the one reference an integrator writes a PLC's or flow's side from."""
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("### Worker API (MQTT v5)"):readme.index("### Operating it")]


def test_every_json_message_carries_its_content_type_and_every_field_is_in_the_reference(running, dataset):
    """The model and stats were published without the content type that results, errors and answers carry, so a
    client that parses by it read them as bytes; and fields of the model, stats and answers were in no doc."""
    prefix, client, _, _, _ = running
    client.publish_frame("cam1", good_png(dataset).read_bytes(), "wire-1")
    client.publish_frame("cam1", b"", "wire-2")
    client.json_on(f"{prefix}/cam1/result")
    requests = {"query": {"top_k": 1}, "label": {"action": "extensions"}}
    answers = [_query(client, prefix, body, topic=topic) for topic, body in requests.items()]
    answers.append(_query(client, prefix, {"frame_id": "wire-1", "camera": "cam1", "label": "false_alarm",
                                           "action": "set"}, topic="label"))
    answers.append(_query(client, prefix, {"command": "status"}, topic="workers/w-test/control"))
    answers.append(_query(client, prefix, {"top_k": "3"}))
    assert [a["ok"] for a in answers] == [True, True, True, True, False], answers
    kinds = {leaf: client.wait_for(lambda m, leaf=leaf: m.topic == f"{prefix}/{leaf}", timeout=30)[0]
             for leaf in ("cam1/result", "cam1/error", "workers/w-test/model", "query/response/test")}
    kinds["workers/w-test/stats"] = client.wait_for(  # one sent once the frames were counted
        lambda m: m.topic == f"{prefix}/workers/w-test/stats" and "cam1" in json.loads(m.payload).get("cameras", {}))[-1]
    for leaf, msg in kinds.items():
        assert getattr(msg.properties, "ContentType", None) == "application/json", leaf
    reference = _worker_api_section()
    fields = set().union(*(json.loads(m.payload) for m in kinds.values()), *answers)
    fields |= set(json.loads(kinds["workers/w-test/stats"].payload)["cameras"]["cam1"])
    fields |= set(next(iter(json.loads(kinds["workers/w-test/model"].payload)["scopes"].values())))
    unnamed = sorted(f for f in fields if f"`{f}`" not in reference and f'"{f}"' not in reference)
    assert not unnamed, f"published, but not in README's Worker API: {unnamed}"


def test_a_result_of_a_model_without_a_bank_extension_has_the_same_fields(broker, bundle_dir, dataset, tmp_path,
                                                                           worker_factory):
    """A model without a bank extension (EfficientAD, learning off) left ``model.extension`` out of its results and
    model topic, so a flow reading ``model.extension.rows`` failed on one family only; it is null now."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix}, learning={"enabled": False})
    client = Client(broker.port, prefix)
    try:
        worker_factory(config)
        wait_online(client, prefix)
        client.publish_frame("cam1", good_png(dataset).read_bytes(), "no-ext")
        [result] = client.json_on(f"{prefix}/cam1/result", timeout=120)
        [model] = client.json_on(f"{prefix}/workers/w-test/model", timeout=30)
        assert result["model"]["extension"] is None, result["model"]
        assert model["extension"] is None and model["scopes"]["default"]["extension"] is None, model
    finally:
        client.close()
