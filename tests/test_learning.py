"""Learns on the line, end to end: a real worker behind mosquitto absorbs a false alarm labelled over MQTT, the
next frame of that appearance passes, the label can be taken back, and the extension survives a restart."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import ROOT, Client, damage, good_png, train_bundle, wait_online, write_config
from test_worker import _query
from test_pixels import _packed

from bundle import read_manifest
from bundle.extension import Extension, folder_name
from exporter.data import load_category
from worker.config import StoreConfig
from worker.store import VectorStore, point_id


def _marked(dataset: Path, name: str = "000", radius: int = 9) -> bytes:
    """A good test frame with a dark dot on it: an appearance the bundle never saw (a mark the line accepts)."""
    image = cv2.imread(str(dataset / "weave" / "test" / "good" / f"{name}.png"), cv2.IMREAD_COLOR)
    cv2.circle(image, (40, 52), radius, (90, 40, 30), -1)
    return cv2.imencode(".png", image)[1].tobytes()


def _next_tick(client: Client) -> None:
    """Until the next stats message (every second): a pace for asking again, after something has changed."""
    ticks = len(client.wait_for(lambda m: m.topic.endswith("/stats"), timeout=5))
    client.wait_for(lambda m: m.topic.endswith("/stats"), timeout=5, count=ticks + 1)


def _until_stored(client: Client, prefix: str, frame_id: str, camera: str) -> None:
    """Until the recorder has written the frame: the operator labels what the history shows."""
    for _ in range(200):
        if _query(client, prefix, {"frame_id": frame_id, "camera": camera, "top_k": 1})["ok"]:
            return
        _next_tick(client)
    raise AssertionError(f"{frame_id} never reached the store")


def _absorbed_false_alarm(client: Client, prefix: str, dataset: Path) -> tuple[bytes, dict]:
    """A marked frame m-0 on cam1, flagged, stored and labelled a false alarm: its bytes and the label's absorbed."""
    marked = _marked(dataset)
    assert _score(client, prefix, marked, "m-0")["verdict"] == "anomalous"
    _until_stored(client, prefix, "m-0", "cam1")
    absorbed = _query(client, prefix, {"action": "set", "frame_id": "m-0", "camera": "cam1", "label": "false_alarm"},
                      topic="label")["absorbed"]
    assert absorbed["patches"] > 0, absorbed
    return marked, absorbed


@pytest.fixture
def learning(broker, bundle_dir, tmp_path, worker_factory):
    prefix = f"t{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix})
    client = Client(broker.port, prefix)
    worker = worker_factory(config)
    wait_online(client, prefix)
    yield prefix, client, worker, config, worker_factory
    client.close()


def _score(client: Client, prefix: str, data: bytes, frame_id: str) -> dict:
    client.publish_frame("cam1", data, frame_id)
    msg = client.wait_for(lambda m: m.topic == f"{prefix}/cam1/result" and json.loads(m.payload)["frame_id"] == frame_id,
                          timeout=60)[0]
    return json.loads(msg.payload)


def test_a_labelled_false_alarm_is_absorbed_undone_and_kept_across_restarts(learning, dataset):
    prefix, client, worker, config, start = learning
    marked = _marked(dataset)
    first = _score(client, prefix, marked, "m-0")
    assert first["verdict"] == "anomalous", first
    assert first["model"]["extension"]["revision"] == 0 and "+x" not in first["model"]["version"]
    plain = _score(client, prefix, (dataset / "weave" / "test" / "good" / "001.png").read_bytes(), "plain-0")
    _until_stored(client, prefix, "m-0", "cam1")
    _until_stored(client, prefix, "plain-0", "cam1")

    def label(body: dict) -> dict:
        return _query(client, prefix, body, topic="label")

    answer = label({"action": "set", "frame_id": "m-0", "camera": "cam1", "label": "false_alarm"})
    absorbed = answer["absorbed"]
    # One revision for the frame's own patches, one more when its flipped and turned views (learning.views) add some.
    rev = absorbed["revision"]
    assert answer["ok"] and absorbed["patches"] > 0 and rev in (1, 2), answer
    assert absorbed["extension_rows"] == absorbed["patches"]
    assert absorbed["message"].startswith(f"absorbed: {absorbed['patches']} patches; "), absorbed
    assert absorbed["passes"] is True and absorbed["message"].endswith("now pass")
    assert absorbed["score_after"] < absorbed["raw_score"]
    again = _score(client, prefix, marked, "m-1")
    assert again["verdict"] == "normal" and again["score"] < first["score"], again
    assert again["model"]["version"].endswith(f"+x{rev}") and again["model"]["extension"]["rows"] == absorbed["patches"]
    model = client.wait_for(lambda m: m.topic == f"{prefix}/workers/w-test/model"
                            and json.loads(m.payload).get("extension", {}).get("revision") == rev)[-1]
    assert json.loads(model.payload)["scopes"]["default"]["extension"]["rows"] == absorbed["patches"]

    # Labelling it again changes nothing; other labels absorb nothing.
    assert label({"action": "set", "frame_id": "m-0", "camera": "cam1", "label": "false_alarm"})["absorbed"]["revision"] == rev
    assert "absorbed" not in label({"action": "set", "frame_id": "plain-0", "camera": "cam1", "label": "confirmed_defect"})
    nothing = label({"action": "set", "frame_id": "plain-0", "camera": "cam1", "label": "false_alarm"})["absorbed"]
    assert plain["verdict"] == "normal" and nothing["patches"] == 0 and "not flagged" in nothing["reason"]

    # Undo: the rows go, the appearance is flagged again.
    released = label({"action": "unlabel", "frame_id": "m-0", "camera": "cam1"})["released"]
    assert released["patches"] == absorbed["patches"] and released["revision"] == rev + 1
    undone = _score(client, prefix, marked, "m-2")
    assert undone["verdict"] == "anomalous" and undone["model"]["extension"] == {
        "revision": rev + 1, "rows": 0, "labels": 0, "held": 0, "max_rows": 1024}

    # Absorbed again (the same rows: the same frame, the same bank), then a restart: the extension is read back from disk.
    relabelled = label({"action": "set", "frame_id": "m-0", "camera": "cam1", "label": "false_alarm"})["absorbed"]
    assert relabelled["revision"] == 2 * rev + 1 and relabelled["patches"] == absorbed["patches"], relabelled
    assert worker.stop() == 0
    client.messages.clear()
    start(config)
    wait_online(client, prefix)
    after = _score(client, prefix, marked, "m-3")
    assert after["verdict"] == "normal" and after["model"]["version"].endswith(f"+x{2 * rev + 1}"), after

    # The CLI: export what was captured as a training folder the exporter reads, withdraw the label, export again.
    cli = [sys.executable, "-m", "worker"]

    def exported(out: Path) -> set[str]:
        done = subprocess.run([*cli, "capture", "--config", str(config), "--out", str(out)], capture_output=True,
                              text=True, timeout=60, cwd=ROOT)
        assert done.returncode == 0 and "python -m exporter train --data" in done.stdout, done.stderr
        return {p.stem for p in load_category(out, "cam1").train}

    names = exported(config.parent / "training-1")
    assert point_id("cam1", "m-0") in names  # the false alarm
    assert point_id("cam1", "plain-0") in names  # confirmed a defect above, then corrected to a false alarm: normal
    assert len({point_id("cam1", f"m-{i}") for i in (1, 3)} & names) == 1  # the same frame twice: kept once
    done = subprocess.run([*cli, "label", "--config", str(config), "--frame-id", "m-0", "--camera", "cam1", "--clear"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0 and json.loads(done.stdout)["released"]["revision"] == 2 * rev + 2, done.stderr
    assert point_id("cam1", "m-0") not in exported(config.parent / "training-2")



def test_a_label_withdrawn_leaves_every_extension_that_holds_it(learning, dataset, tmp_path):
    """A false alarm labelled again after a reload to another bundle is in both bundles' extensions: the unlabel took
    it from the first extension it found only, and after a restart the bundle kept for rollback (a path, its
    extension never opened) kept it too, so the rollback brought the withdrawn label back."""
    prefix, client, worker, config, start = learning
    other = train_bundle(dataset, tmp_path / "other", "--coreset-ratio", "0.1")  # other weights: its own extension
    marked = _marked(dataset)
    assert _score(client, prefix, marked, "m-0")["verdict"] == "anomalous"
    _until_stored(client, prefix, "m-0", "cam1")

    def ask(body: dict, topic: str = "label") -> dict:
        return _query(client, prefix, body, topic=topic)

    label = {"action": "set", "frame_id": "m-0", "camera": "cam1", "label": "false_alarm"}
    first = ask(label)["absorbed"]["patches"]
    reloaded = ask({"command": "reload", "bundle": str(other)}, topic="workers/w-test/control")
    # the new bundle has not learned the label: the answer says so (a helper's probe: nothing did, the marked frames
    # were flagged again after a roll-out or rollback without a word)
    assert reloaded["ok"] and reloaded["untaught"]["frames"] == ["cam1/m-0"], reloaded
    assert "labelled false_alarm again" in reloaded["untaught"]["message"]
    second = ask(label)["absorbed"]["patches"]
    assert first > 0 and second > 0
    assert worker.stop() == 0
    client.messages.clear()
    start(config)  # the other bundle serves, the first is kept for rollback (model.rollout_path)
    wait_online(client, prefix)
    released = ask({"action": "unlabel", "frame_id": "m-0", "camera": "cam1"})["released"]
    assert released["patches"] == first + second and released["extensions"] == 2, released
    assert ask({"command": "rollback"}, topic="workers/w-test/control")["ok"]
    assert _score(client, prefix, marked, "m-1")["verdict"] == "anomalous"

def test_a_label_withdrawn_leaves_the_extension_of_a_bundle_served_two_reloads_ago(learning, dataset, bundle_dir,
                                                                                  tmp_path):
    """Two reloads later a bundle is neither served nor kept for rollback: its extension was not among those a
    withdrawal walks, so the unlabel released nothing and serving that bundle again made frames like the withdrawn
    false alarm pass (a helper's review).  A withdrawal reaches every extension under learning.path."""
    import shutil

    from bundle import read_manifest, write_manifest

    prefix, client, worker, config, start = learning
    others = []
    for name in ("line-b", "line-c"):  # the same weights under other names: extensions of their own
        folder = tmp_path / name
        shutil.copytree(bundle_dir, folder)
        fields = read_manifest(folder).model_dump()
        fields.pop("files")
        write_manifest(folder, {**fields, "name": name})
        others.append(folder)
    marked = _marked(dataset)
    assert _score(client, prefix, marked, "m-0")["verdict"] == "anomalous"
    _until_stored(client, prefix, "m-0", "cam1")

    def ask(body: dict, topic: str = "label") -> dict:
        return _query(client, prefix, body, topic=topic)

    absorbed = ask({"action": "set", "frame_id": "m-0", "camera": "cam1", "label": "false_alarm"})["absorbed"]["patches"]
    for other in others:
        assert ask({"command": "reload", "bundle": str(other)}, topic="workers/w-test/control")["ok"]
    released = ask({"action": "unlabel", "frame_id": "m-0", "camera": "cam1"})["released"]
    assert absorbed > 0 and released["patches"] == absorbed, released
    assert ask({"command": "reload", "bundle": str(bundle_dir)}, topic="workers/w-test/control")["ok"]
    assert _score(client, prefix, marked, "m-1")["verdict"] == "anomalous"


def test_a_false_alarm_made_a_confirmed_defect_guards_the_look_alikes_absorbed_again(learning, dataset):
    """A look-alike labelled a false alarm after the first absorbed nothing (it leaned on the first's rows).  Made a
    confirmed defect, the first was withdrawn and the look-alike re-absorbed all of it, unguarded: a copy of the
    confirmed defect then passed (a helper's review).  The defect being confirmed guards that re-absorption."""
    prefix, client, worker, config, start = learning
    marked = _marked(dataset)
    for fid in ("m-0", "m-1"):
        assert _score(client, prefix, marked, fid)["verdict"] == "anomalous"
        _until_stored(client, prefix, fid, "cam1")

    def label(frame_id: str, kind: str) -> dict:
        return _query(client, prefix, {"action": "set", "frame_id": frame_id, "camera": "cam1", "label": kind},
                      topic="label")

    assert label("m-0", "false_alarm")["absorbed"]["patches"] > 0
    assert label("m-1", "false_alarm")["absorbed"]["patches"] == 0  # it leans on m-0's rows
    assert label("m-0", "confirmed_defect")["ok"]
    assert _score(client, prefix, marked, "m-2")["verdict"] == "anomalous"


def test_a_frame_labelled_or_asked_about_as_soon_as_its_result_arrives_is_found(broker, bundle_dir, dataset, tmp_path,
                                                                                 worker_factory):
    """The recorder writes in batches (``store.flush_s``): a client that labelled or queried a frame as soon as its
    result arrived (a PLC, a script) was answered unknown_frame.  It now waits for the frames on their way."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix}, store={"flush_s": 3})
    client = Client(broker.port, prefix)
    worker_factory(config)
    wait_online(client, prefix)
    _score(client, prefix, (dataset / "weave" / "test" / "good" / "001.png").read_bytes(), "p-0")
    labelled = _query(client, prefix, {"action": "set", "frame_id": "p-0", "camera": "cam1", "label": "confirmed_defect"},
                      topic="label")
    assert labelled["ok"] and labelled["label"] == "confirmed_defect", labelled
    _score(client, prefix, (dataset / "weave" / "test" / "good" / "002.png").read_bytes(), "p-1")
    found = _query(client, prefix, {"frame_id": "p-1", "camera": "cam1", "top_k": 1})
    assert found["ok"], found
    missing = _query(client, prefix, {"frame_id": "never-sent", "camera": "cam1", "top_k": 1})
    assert missing["error"]["code"] == "unknown_frame", missing
    client.close()


def test_a_false_alarm_gone_from_the_history_can_still_be_withdrawn(broker, bundle_dir, dataset, tmp_path, worker_factory):
    """Retention by age removes labelled frames too; the unlabel then answered unknown_frame while the frame's rows
    went on making frames like it pass: a wrong false-alarm label could no longer be undone."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix},
                          store={"max_age_h": 0.006, "retention_every_s": 1})  # 21.6 s
    client = Client(broker.port, prefix)
    worker = worker_factory(config)
    wait_online(client, prefix)
    marked, absorbed = _absorbed_false_alarm(client, prefix, dataset)
    for _ in range(200):  # until retention has taken the frame out of the history
        found = _query(client, prefix, {"frame_id": "m-0", "camera": "cam1", "top_k": 1})
        if not found["ok"]:
            assert found["error"]["code"] in ("unknown_frame", "empty_store"), found
            break
        _next_tick(client)
    else:
        raise AssertionError("retention never took m-0")
    assert _score(client, prefix, marked, "m-1")["verdict"] == "normal"  # the rows still serve
    answer = _query(client, prefix, {"action": "unlabel", "frame_id": "m-0", "camera": "cam1"}, topic="label")
    assert answer["ok"] and answer["released"]["patches"] == absorbed["patches"], answer
    assert _score(client, prefix, marked, "m-2")["verdict"] == "anomalous"
    gone = _query(client, prefix, {"action": "unlabel", "frame_id": "m-0", "camera": "cam1"}, topic="label")
    assert gone["error"]["code"] == "unknown_frame", gone  # nothing left to withdraw
    assert worker.stop() == 0
    client.close()


def test_a_false_alarm_whose_id_a_camera_reused_keeps_its_label_and_can_be_withdrawn(learning, dataset):
    """A camera that starts its frame ids again (a reboot) sent a new frame under a labelled false alarm's id: its
    record replaced the labelled one, so the label was gone from the history while its rows made frames like it
    pass.  The new frame is scored and answered, not recorded; the label stays and can be withdrawn."""
    prefix, client, worker, config, start = learning
    marked, absorbed = _absorbed_false_alarm(client, prefix, dataset)
    client.publish_frame("cam1", (dataset / "weave" / "test" / "good" / "001.png").read_bytes(), "m-0",
                         captured_at=str(time.time() + 60))  # the camera rebooted: the same id, another frame
    client.wait_for(lambda m: m.topic == f"{prefix}/cam1/result" and json.loads(m.payload)["frame_id"] == "m-0",
                    timeout=60, count=2)
    client.wait_for(lambda m: m.topic.endswith("/stats") and json.loads(m.payload)["recorder_labelled_kept"] == 1,
                    timeout=60)
    labels = _query(client, prefix, {"action": "export", "format": "json"}, topic="label")["labels"]
    assert [(r["frame_id"], r["label"], r["verdict"]) for r in labels] == [("m-0", "false_alarm", "anomalous")], labels
    answer = _query(client, prefix, {"action": "unlabel", "frame_id": "m-0", "camera": "cam1"}, topic="label")
    assert answer["ok"] and answer["released"]["patches"] == absorbed["patches"], answer
    assert _score(client, prefix, marked, "m-1")["verdict"] == "anomalous"  # the rows are gone


def test_a_false_alarm_that_looks_like_a_confirmed_defect_absorbs_nothing_of_it(learning, dataset):
    """The operator confirmed a dot as a defect; a later false-alarm label on the same dot must not teach it: the
    patches that keep the confirmed frame flagged, and every patch near them, are left out, and the dot stays
    flagged.  A worker that finds no guard on disk (a new bundle, or a restart after an upgrade) scores it while
    idle, and keeps it on disk, so it guards after a restart that finds the frame's image gone.  Once the defect
    label is withdrawn, the same false alarm is absorbed."""
    prefix, client, worker, config, start = learning
    marked = _marked(dataset)
    for fid in ("d-0", "m-0"):
        assert _score(client, prefix, marked, fid)["verdict"] == "anomalous"
        _until_stored(client, prefix, fid, "cam1")

    def label(body: dict) -> dict:
        return _query(client, prefix, body, topic="label")

    confirmed = label({"action": "set", "frame_id": "d-0", "camera": "cam1", "label": "confirmed_defect"})
    # flagged, so never captured as normal: kept from its stored frame for the next training set's test images
    assert confirmed["ok"] and confirmed["capture"] == "kept for the next training set's test images", confirmed
    assert [p.stem for p in (config.parent / "capture" / "cam1" / "confirmed_defect").iterdir()] == [
        point_id("cam1", "d-0")]
    guards = config.parent / "extensions"
    assert worker.stop() == 0
    for kept in guards.glob("*/guards/*"):
        kept.unlink()
    client.messages.clear()
    worker = start(config)
    wait_online(client, prefix)
    for tick in range(1, 61):  # no request comes: the worker scores the missing guard on its own
        if list(guards.glob("*/guards/*.npz")):
            break
        client.wait_for(lambda m: m.topic.endswith("/stats"), timeout=5, count=tick)  # one more stats tick (1 s)
    else:
        raise AssertionError("the confirmed defect's guard was not scored while the worker was idle")
    assert worker.stop() == 0
    for image in (config.parent / "evidence").glob(f"*/{point_id('cam1', 'd-0')}.frame.*"):
        image.unlink()  # as the evidence budget would: nothing left to score the confirmed defect by
    client.messages.clear()
    start(config)
    wait_online(client, prefix)
    guarded = label({"action": "set", "frame_id": "m-0", "camera": "cam1", "label": "false_alarm"})["absorbed"]
    said = guarded.get("reason") or guarded["message"]
    assert guarded["left_out"] > 0 and "confirmed defect" in said, guarded
    assert _score(client, prefix, marked, "m-1")["verdict"] == "anomalous"

    assert label({"action": "unlabel", "frame_id": "d-0", "camera": "cam1"})["ok"]
    assert label({"action": "unlabel", "frame_id": "m-0", "camera": "cam1"})["ok"]
    taught = label({"action": "set", "frame_id": "m-0", "camera": "cam1", "label": "false_alarm"})["absorbed"]
    assert taught["patches"] > 0 and taught["left_out"] == 0, taught
    assert _score(client, prefix, marked, "m-2")["verdict"] == "normal"
    assert not list((config.parent / "extensions").glob("*/guards/*"))  # the withdrawn defect's guard is gone too


def test_a_defect_confirmed_on_a_camera_with_its_own_precision_guards_a_false_alarm_on_another(broker, bundle_dir,
                                                                                                  dataset, tmp_path,
                                                                                                  worker_factory):
    """A camera that sets only its own precision has a compiled copy of the default's bundle, which shares its
    extension: a false-alarm label on another camera put its rows to use there too, but the guard read only the
    defects confirmed on cameras of the labelling model, so a defect confirmed on that camera was taught away
    (a helper's probe).  The guard reads every camera whose model shares the extension."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix},
                          cameras={"cam2": {"precision": "f32"}})
    client = Client(broker.port, prefix)
    worker_factory(config)
    wait_online(client, prefix)
    marked = _marked(dataset)

    def score(camera: str, frame_id: str) -> str:
        client.publish_frame(camera, marked, frame_id)
        msg = client.wait_for(lambda m: m.topic == f"{prefix}/{camera}/result"
                              and json.loads(m.payload)["frame_id"] == frame_id, timeout=60)[0]
        return json.loads(msg.payload)["verdict"]

    try:
        assert score("cam2", "d-0") == "anomalous" and score("cam1", "m-0") == "anomalous"
        _until_stored(client, prefix, "d-0", "cam2")
        _until_stored(client, prefix, "m-0", "cam1")
        confirmed = _query(client, prefix, {"action": "set", "frame_id": "d-0", "camera": "cam2",
                                            "label": "confirmed_defect"}, topic="label")
        assert confirmed["ok"], confirmed
        guarded = _query(client, prefix, {"action": "set", "frame_id": "m-0", "camera": "cam1",
                                          "label": "false_alarm"}, topic="label")["absorbed"]
        assert guarded["left_out"] > 0, guarded
        assert score("cam2", "d-1") == "anomalous"  # the confirmed defect's look is still caught where it was seen
    finally:
        client.close()


def test_a_false_alarm_whose_stored_image_was_damaged_is_labelled_and_says_why_nothing_was_absorbed(learning, dataset):
    """The label was stored, then decoding the damaged evidence file failed and the request was answered
    internal_error, as if nothing had happened."""
    prefix, client, worker, config, start = learning
    for fid, how in (("m-0", "empty"), ("m-1", "cut")):
        assert _score(client, prefix, _marked(dataset), fid)["verdict"] == "anomalous"
        _until_stored(client, prefix, fid, "cam1")
        damage(next((config.parent / "evidence").glob(f"*/{point_id('cam1', fid)}.frame.*")), how)
        answer = _query(client, prefix, {"action": "set", "frame_id": fid, "camera": "cam1", "label": "false_alarm"},
                        topic="label")
        assert answer["ok"] and answer["label"] == "false_alarm", answer
        assert answer["absorbed"]["patches"] == 0 and "stored image cannot be read" in answer["absorbed"]["reason"]
    exported = _query(client, prefix, {"action": "export", "format": "json"}, topic="label")
    assert {r["frame_id"] for r in exported["labels"] if r["label"] == "false_alarm"} == {"m-0", "m-1"}, exported


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux): a write there fails with ENOSPC")
def test_a_false_alarm_on_a_full_capture_disk_is_absorbed_and_says_its_frame_is_not_kept(learning, dataset):
    """With the capture folder's disk full, a false_alarm label was answered internal_error ("OSError: [Errno 28] No
    space left on device", a traceback in the log), nothing absorbed, while the frame's image stayed among the
    camera's false alarms for the next training set's good images (a helper's probe).  Here the camera's capture
    state is written to /dev/full, which fails as a full disk does (ENOSPC, for root too): the label is stored and
    absorbed, its answer and one warning line say the frame is not kept for retraining, and no image of it is."""
    prefix, client, worker, config, _ = learning
    folder = config.parent / "capture" / "cam1"
    folder.mkdir(parents=True)
    (folder / "index.json.tmp").symlink_to("/dev/full")
    assert _score(client, prefix, _marked(dataset), "m-0")["verdict"] == "anomalous"
    _until_stored(client, prefix, "m-0", "cam1")
    answer = _query(client, prefix, {"action": "set", "frame_id": "m-0", "camera": "cam1", "label": "false_alarm"},
                    topic="label")
    assert answer["ok"] and answer["absorbed"]["patches"] > 0, answer
    assert answer["capture"] == "not kept for the next training set: the disk of the capture folder is full", answer
    assert not list((folder / "false_alarm").iterdir())
    # the second stats message after the answer: the first may have been built before the label was carried out
    # (its camera not in the sample's counts yet) and sent after the answer
    _next_tick(client)
    _next_tick(client)
    stats = client.json_on(f"{prefix}/workers/w-test/stats")[-1]
    assert stats["capture"]["cam1"]["false_alarms"] == 0, stats["capture"]
    labels = _query(client, prefix, {"action": "export"}, topic="label")["labels"]
    assert [(r["frame_id"], r["label"]) for r in labels] == [("m-0", "false_alarm")]
    assert worker.stop() == 0
    log = worker.output()
    assert log.count("false alarm cam1/m-0 is not kept for the next training set: the disk of the capture folder "
                     "is full") == 1 and "Traceback" not in log, log[-3000:]


def test_a_label_scores_the_frame_as_the_worker_did(learning, dataset):
    """A large JPEG frame is decoded smaller (limits.reduced_decode); the label must score the stored frame the same
    way, or a frame flagged near the threshold could come back as having nothing above it."""
    prefix, client, _, _, _ = learning
    image = cv2.imdecode(np.frombuffer(_marked(dataset), np.uint8), cv2.IMREAD_COLOR)
    large = cv2.imencode(".jpg", cv2.resize(image, (300, 300), interpolation=cv2.INTER_CUBIC),
                         [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    flagged = _score(client, prefix, large, "j-0")
    assert flagged["verdict"] == "anomalous", flagged
    _until_stored(client, prefix, "j-0", "cam1")
    absorbed = _query(client, prefix, {"action": "set", "frame_id": "j-0", "camera": "cam1", "label": "false_alarm"},
                      topic="label")["absorbed"]
    assert absorbed["patches"] > 0 and absorbed["raw_score"] == pytest.approx(flagged["raw_score"], abs=2e-5), (absorbed, flagged)


def test_a_raw_pixel_buffer_labelled_a_false_alarm_is_read_back_as_scored_and_then_passes(learning, dataset):
    """A machine-vision camera's buffer (worker/pixels.py) is kept as a TIFF the recorder writes; a label reads that
    file back, so it must give the pixels that were scored: a 12-bit grey buffer and a packed 12-bit Bayer one, each
    labelled, score as flagged when read back, and the next such frame passes."""
    prefix, client, _, _, _ = learning
    image = cv2.imdecode(np.frombuffer(_marked(dataset), np.uint8), cv2.IMREAD_COLOR)
    height, width = image.shape[:2]
    grey12 = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype("<u2") << 4 | 0x9  # low bits below the top 8 of 12
    # the model turns frames grey (its training images are): the Bayer frame gets a larger mark than the one absorbed
    image = cv2.imdecode(np.frombuffer(_marked(dataset, "001", 14), np.uint8), cv2.IMREAD_COLOR)
    mosaic = image[..., 1].copy()  # RGGB
    mosaic[0::2, 0::2], mosaic[1::2, 1::2] = image[0::2, 0::2, 2], image[1::2, 1::2, 0]

    def sent(buffer: bytes, kind: str, frame_id: str) -> dict:
        client.publish_frame("cam1", buffer, frame_id, extra={"pixel_format": kind, "width": str(width),
                                                               "height": str(height)})
        return json.loads(client.wait_for(lambda m: m.topic == f"{prefix}/cam1/result"
                                          and json.loads(m.payload)["frame_id"] == frame_id, timeout=60)[0].payload)

    mosaic12 = (mosaic.astype(np.uint16) << 4 | 0x9).ravel().tolist()  # a BayerRG8 mosaic in 12 bits, packed
    for kind, buffer in (("Mono12", grey12.tobytes()), ("BayerRG12p", _packed(mosaic12, "BayerRG12p"))):
        flagged = sent(buffer, kind, f"{kind}-0")
        assert flagged["verdict"] == "anomalous", flagged
        _until_stored(client, prefix, f"{kind}-0", "cam1")
        absorbed = _query(client, prefix, {"action": "set", "frame_id": f"{kind}-0", "camera": "cam1",
                                           "label": "false_alarm"}, topic="label")["absorbed"]
        assert absorbed["patches"] > 0 and absorbed["raw_score"] == pytest.approx(flagged["raw_score"], abs=2e-5), (
            kind, absorbed, flagged)
        assert sent(buffer, kind, f"{kind}-1")["verdict"] == "normal"


def test_a_label_that_cannot_make_its_frame_pass_says_so(broker, dataset, tmp_path, worker_factory):
    """Only the K candidate patches farthest from the bank meet the extension, so a false alarm spread over more
    patches than K stays flagged however it is absorbed.  The answer must say so, and why, rather than promise that
    such frames now pass; where the rows do make the frame pass (the first test), it says that."""
    bundle = train_bundle(dataset, tmp_path / "k8", "--extension-candidates", "8", "--no-eval", "--precisions", "f32")
    prefix = f"t{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path / "w", broker.port, bundle, topics={"prefix": prefix},
                          learning={"path": str(tmp_path / "w" / "extensions"), "guard_defects": 0})
    client = Client(broker.port, prefix)
    try:
        worker_factory(config)
        wait_online(client, prefix)
        image = cv2.imread(str(good_png(dataset)), cv2.IMREAD_COLOR)
        cv2.rectangle(image, (16, 16), (111, 111), (40, 40, 40), -1)  # a dark panel over most of the frame
        wide = cv2.imencode(".png", image)[1].tobytes()
        assert _score(client, prefix, wide, "w-0")["verdict"] == "anomalous"
        _until_stored(client, prefix, "w-0", "cam1")
        absorbed = _query(client, prefix, {"action": "set", "frame_id": "w-0", "camera": "cam1",
                                           "label": "false_alarm"}, topic="label")["absorbed"]
        assert absorbed["patches"] > 0 and absorbed["passes"] is False, absorbed
        assert absorbed["score_after"] < absorbed["raw_score"], absorbed
        assert "more of its patches stand out than the 8 per frame" in absorbed["message"], absorbed
        assert "now pass" not in absorbed["message"]
        assert _score(client, prefix, wide, "w-1")["verdict"] == "anomalous"  # as the answer said
    finally:
        client.close()


def test_a_withdrawal_the_disk_refuses_changes_nothing_and_a_retry_works(learning, dataset):
    """Unlabel with learning.path unwritable cleared the store's label and the in-memory entry while the rows stayed in
    use; a second unlabel then released nothing.  Now it is refused whole: the label, the entry and the rows stay,
    the answer names the folder and the cause, and the retry once the folder can be written releases the rows."""
    prefix, client, _, config, _ = learning
    marked, absorbed = _absorbed_false_alarm(client, prefix, dataset)
    [index] = (config.parent / "extensions").glob(f"*/{'index.json'}")
    blocked = index.parent / "index.json.tmp"
    blocked.mkdir()  # writing the index fails for real, as on a full disk (and as root, unlike a read-only folder)
    unlabel = {"action": "unlabel", "frame_id": "m-0", "camera": "cam1"}
    refused = _query(client, prefix, unlabel, topic="label")
    assert not refused["ok"] and "was not withdrawn" in refused["error"]["message"], refused
    assert str(index.parent) in refused["error"]["message"] and "Is a directory" in refused["error"]["message"]
    labels = _query(client, prefix, {"action": "export"}, topic="label")["labels"]
    assert [(r["frame_id"], r["label"]) for r in labels] == [("m-0", "false_alarm")]
    [ext] = _query(client, prefix, {"action": "extensions"}, topic="label")["extensions"]
    assert [e["frame_id"] for e in ext["entries"]] == ["m-0"] and ext["rows"] == absorbed["patches"], ext
    assert _score(client, prefix, marked, "m-1")["verdict"] == "normal"  # its rows are still in use
    blocked.rmdir()
    released = _query(client, prefix, unlabel, topic="label")["released"]
    assert released["patches"] == absorbed["patches"], released
    assert _query(client, prefix, {"action": "export"}, topic="label")["labels"] == []
    assert _score(client, prefix, marked, "m-2")["verdict"] == "anomalous"


def test_an_extension_folder_deleted_under_the_worker_is_made_again_at_the_next_label(learning, dataset):
    """``rm -rf`` of the bundle's extension folder under a running worker (space freed by hand): every later label
    and withdrawal was refused "free space there (learning.path)" until a restart.  The folder is made again at the
    next write, with the rows in use written back, and the label is carried out."""
    prefix, client, _, config, _ = learning
    marked, absorbed = _absorbed_false_alarm(client, prefix, dataset)
    [index] = (config.parent / "extensions").glob("*/index.json")
    shutil.rmtree(index.parent)
    unlabel = {"action": "unlabel", "frame_id": "m-0", "camera": "cam1"}
    released = _query(client, prefix, unlabel, topic="label")
    assert released["ok"] and released["released"]["patches"] == absorbed["patches"], released
    assert _score(client, prefix, marked, "m-1")["verdict"] == "anomalous"
    shutil.rmtree(index.parent)
    label = {"action": "set", "frame_id": "m-0", "camera": "cam1", "label": "false_alarm"}
    again = _query(client, prefix, label, topic="label")
    assert again["ok"] and again["absorbed"]["patches"] > 0, again
    assert _score(client, prefix, marked, "m-2")["verdict"] == "normal"
    assert [e["frame_id"] for e in json.loads(index.read_text())["entries"]] == ["m-0"]


def test_withdrawing_a_false_alarm_folded_into_the_serving_bundle_says_it_still_passes(learning, dataset, bundle_dir):
    """With a folded bundle serving (exporter fold-extension), withdrawing an absorbed false alarm took its rows out
    of the extension of the bundle kept for rollback and answered "released ...; frames like it are scored as
    before", while the folded bank that serves still held them and frames like it went on passing.  The answer now
    says the rows are folded into the serving bundle's bank and names the bundle to roll back to."""
    from bundle import read_manifest
    from bundle.extension import folder_name
    from exporter.__main__ import main as exporter

    prefix, client, worker, config, start = learning
    marked, absorbed = _absorbed_false_alarm(client, prefix, dataset)
    source = read_manifest(bundle_dir)
    folded = config.parent / "folded"
    assert exporter(["fold-extension", str(bundle_dir), str(config.parent / "extensions" / folder_name(source)),
                     "--out", str(folded)]) == 0
    version = read_manifest(folded).version
    reloaded = _query(client, prefix, {"command": "reload", "bundle": str(folded)}, topic="workers/w-test/control")
    assert reloaded["ok"] and "untaught" not in reloaded, reloaded  # folded in: learned
    assert _score(client, prefix, marked, "m-1")["verdict"] == "normal"  # the folded bank holds the label's rows

    released = _query(client, prefix, {"action": "unlabel", "frame_id": "m-0", "camera": "cam1"},
                      topic="label")["released"]
    assert released["patches"] == absorbed["patches"], released  # from the extension of the bundle kept for rollback
    message = released["message"]
    assert "released" not in message and "scored as before" not in message, message
    assert f"the serving bundle {source.name} {version} has this label's rows folded into its bank" in message, message
    assert f"roll back to {source.name} {source.version}" in message, message
    assert released["folded"] == {"bundle": f"{source.name} {version}", "from": f"{source.name} {source.version}"}
    assert _score(client, prefix, marked, "m-2")["verdict"] == "normal"  # what the answer says: it still passes


def test_withdrawing_a_held_false_alarm_folded_into_the_serving_bundle_says_it_still_passes(learning, dataset,
                                                                                          bundle_dir):
    """The fold reads every entry of the extension, those held past ``learning.max_rows`` too, so the folded bank that
    serves holds a held label's rows; withdrawing that label answered only "its rows were held ..., not served: they
    are deleted", while frames like it went on passing.  The answer now says the serving bundle has them folded in,
    as for a served label.  A held label set again, refused as full, says its earlier rows are still kept."""
    from exporter.__main__ import main as exporter

    prefix, client, worker, config, start = learning
    marked, absorbed = _absorbed_false_alarm(client, prefix, dataset)
    assert absorbed["patches"] > 1 and worker.stop() == 0
    lowered = yaml.safe_load(config.read_text())
    lowered["learning"]["max_rows"] = 1  # the label's rows do not fit: held
    config.write_text(yaml.safe_dump(lowered))
    client.messages.clear()
    start(config)
    wait_online(client, prefix)
    [ext] = _query(client, prefix, {"action": "extensions"}, topic="label")["extensions"]
    assert [("held" in e, e["frame_id"]) for e in ext["entries"]] == [(True, "m-0")], ext
    # labelled again (it is flagged again): refused as full, and the answer says its rows are still kept, held (it
    # said only that the extension is full, as if the label had taught nothing)
    again = _query(client, prefix, {"action": "set", "frame_id": "m-0", "camera": "cam1", "label": "false_alarm"},
                   topic="label")["absorbed"]
    assert again["full"] and f"the {absorbed['patches']} patches it absorbed before are kept, held past " \
        "learning.max_rows 1" in again["reason"], again
    source = read_manifest(bundle_dir)
    folded = config.parent / "folded"
    assert exporter(["fold-extension", str(bundle_dir), str(config.parent / "extensions" / folder_name(source)),
                     "--out", str(folded)]) == 0
    version = read_manifest(folded).version
    assert _query(client, prefix, {"command": "reload", "bundle": str(folded)}, topic="workers/w-test/control")["ok"]
    assert _score(client, prefix, marked, "m-1")["verdict"] == "normal"  # the folded bank holds the held label's rows

    released = _query(client, prefix, {"action": "unlabel", "frame_id": "m-0", "camera": "cam1"},
                      topic="label")["released"]
    assert released["patches"] == 0 and "held past learning.max_rows" in released["reason"], released
    assert f"the serving bundle {source.name} {version} has this label's rows folded into its bank" in released[
        "reason"], released
    assert released["folded"] == {"bundle": f"{source.name} {version}", "from": f"{source.name} {source.version}"}
    assert released["message"] == f"withdrawn: {released['reason']}", released  # what the console shows
    assert _score(client, prefix, marked, "m-2")["verdict"] == "normal"  # what the answer says: it still passes


def test_a_capture_export_names_its_camera_folders_and_the_serving_bundles_kind(learning, dataset):
    """``exporter train --data <capture export>`` without --category said the folder "has no images" (it holds one
    folder per camera), and the train command printed after an export (control topic, console, CLI) carried only
    the tiles, so run as printed it trained the default setting, not the family and input size the camera runs."""
    prefix, client, worker, config, start = learning
    for i, name in enumerate(("001", "002", "003")):
        for camera in ("cam1", "cam2"):
            client.publish_frame(camera, (dataset / "weave" / "test" / "good" / f"{name}.png").read_bytes(), f"g-{i}")
    client.wait_for(lambda m: m.topic.endswith("/result"), count=6, timeout=60)
    deadline = time.monotonic() + 60
    while True:  # until both cameras' frames are in the sample
        answer = _query(client, prefix, {"command": "export_capture"}, topic="workers/w-test/control")
        if answer["ok"] and set(answer["cameras"]) == {"cam1", "cam2"} or time.monotonic() > deadline:
            break
        _next_tick(client)
    assert answer["ok"] and set(answer["cameras"]) == {"cam1", "cam2"}, answer
    folder = answer["folder"]
    command = answer["train"]["cam1"]  # the serving bundle's recipe whole: tests/test_capture.py trains it
    assert command.startswith(f"python -m exporter train --data {folder} --category=cam1 --model patchcore "
                              "--input-size 128 --backbone efficientnet_lite0 ") and " --coreset-ratio 0.05 " in command \
        and command.endswith(" --extension-candidates 256 --out BUNDLE"), answer["train"]

    done = subprocess.run([sys.executable, "-m", "exporter", "train", "--data", folder, "--out",
                           str(config.parent / "b")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "has no images" not in done.stderr, done.stderr
    assert "one folder of good images per camera or part, ['cam1', 'cam2']" in done.stderr, done.stderr
    assert "pick one with --category NAME" in done.stderr, done.stderr

    deadline = time.monotonic() + 60
    while True:  # the CLI reads the sample from disk, which the worker writes every few seconds
        out = config.parent / f"cli-{time.monotonic_ns()}"
        cli = subprocess.run([sys.executable, "-m", "worker", "capture", "--config", str(config), "--out", str(out)],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        if cli.returncode == 0 or time.monotonic() > deadline:
            break
        _next_tick(client)
    assert f"--data {out} --category=cam1 --model patchcore --input-size 128 --backbone efficientnet_lite0 " \
        in cli.stdout and " --extension-candidates 256 --out BUNDLE" in cli.stdout, cli


def test_a_label_the_full_extension_cannot_take_says_so_and_the_cli_exits_3(broker, bundle_dir, dataset, tmp_path,
                                                                           worker_factory):
    """A full extension answered "needs N more" counting the frame's own patches only (its views took more, so an
    operator who freed N rows was refused again), and the CLI exited 0 with ok: true for a label that absorbed
    nothing.  The answer now says the extension is full, how many rows are free and that the views need more; the
    CLI exits 3.  Where the frame's own patches alone need more rows than the bound (as here), it said "the extension
    is full: it holds 0 of its 8 rows", sending the operator to undo or fold labels that would not make room: it now
    says the bound itself is too small."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix}, learning={"max_rows": 8})
    client = Client(broker.port, prefix)
    worker_factory(config)
    wait_online(client, prefix)
    assert _score(client, prefix, _marked(dataset), "m-0")["verdict"] == "anomalous"
    _until_stored(client, prefix, "m-0", "cam1")
    done = subprocess.run([sys.executable, "-m", "worker", "label", "--config", str(config), "--frame-id", "m-0",
                           "--camera", "cam1", "--false-alarm"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 3, (done.returncode, done.stdout, done.stderr)
    absorbed = json.loads(done.stdout)["absorbed"]
    assert absorbed["patches"] == 0 and absorbed["full"] is True, absorbed
    assert absorbed["reason"].startswith("these patches alone need "), absorbed
    assert "rows, more than the whole extension holds (learning.max_rows: 8): raise learning.max_rows" \
        in absorbed["reason"], absorbed
    assert "its flipped and turned views, learning.views, need more" in absorbed["reason"], absorbed
    assert "error: the label is stored but nothing was absorbed: these patches alone need" in done.stderr, done.stderr
    client.close()


def test_withdrawing_a_false_alarm_leaves_the_later_ones_that_leaned_on_it_passing(learning, dataset):
    """A label absorbs only what the rows already in use leave at or above the margin, so a later false alarm of the
    same mark absorbed a few patches and leaned on the first one's rows: withdrawing the first brought it back while
    the extensions list still showed it absorbed and its answer had said passes.  The withdrawal now scores the
    later false alarms again and re-absorbs what they miss; one whose image is gone is named in no_longer_pass."""
    prefix, client, _, config, _ = learning
    frames = {"a-0": _marked(dataset, "000"), "b-0": _marked(dataset, "001", 11), "c-0": _marked(dataset, "002", 11)}
    for fid, data in frames.items():
        assert _score(client, prefix, data, fid)["verdict"] == "anomalous"
        _until_stored(client, prefix, fid, "cam1")

    def label(body: dict) -> dict:
        return _query(client, prefix, body, topic="label")

    first = label({"action": "set", "frame_id": "a-0", "camera": "cam1", "label": "false_alarm"})["absorbed"]
    leaning = label({"action": "set", "frame_id": "b-0", "camera": "cam1", "label": "false_alarm"})["absorbed"]
    assert first["patches"] > 0 and leaning["passes"] is True, (first, leaning)
    assert leaning["patches"] < first["patches"] / 4, leaning  # the same mark: most of it was in use already
    assert label({"action": "set", "frame_id": "c-0", "camera": "cam1", "label": "false_alarm"})["ok"]
    for image in (config.parent / "evidence").glob(f"*/{point_id('cam1', 'c-0')}.frame.*"):
        image.unlink()  # as the evidence budget would: c-0 cannot be scored again

    released = label({"action": "unlabel", "frame_id": "a-0", "camera": "cam1"})["released"]
    assert released["patches"] == first["patches"], released
    assert _score(client, prefix, frames["b-0"], "b-1")["verdict"] == "normal"  # as its label's answer said
    [again] = released["reabsorbed"]
    assert again["frame_id"] == "b-0" and again["patches"] > 0 and again["passes"] is True, released
    assert "cam1/b-0" in released["message"] and "leaned on its rows" in released["message"], released
    [lost] = released["no_longer_pass"]
    assert lost["frame_id"] == "c-0" and "image is no longer kept" in lost["reason"], released
    [ext] = label({"action": "extensions"})["extensions"]
    entries = {e["frame_id"]: e for e in ext["entries"]}
    assert entries["b-0"]["rows"] == leaning["patches"] + again["patches"] and "no_longer_pass" not in entries["b-0"]
    if "c-0" in entries:  # c-0 absorbed rows of its own: the list says it may be flagged again
        assert "image is no longer kept" in entries["c-0"]["no_longer_pass"], entries


def _offline_store(config: Path, bundle_dir: Path) -> VectorStore:
    """The worker's history opened by the test while the worker is stopped."""
    from bundle import read_manifest

    return VectorStore(StoreConfig(path=config.parent / "qdrant"), read_manifest(bundle_dir).embedding_dim)


def test_a_false_alarm_absorbed_but_not_recorded_before_a_crash_is_labelled_at_start(learning, dataset, bundle_dir):
    """A label absorbs its frame first and records the label second: a worker killed in between kept the rows in use
    while the history had no label, so retention deleted the frame as an ordinary one and the label export did not
    show it.  At start the frame is labelled as the operator asked; an entry whose frame is gone is logged and marked
    in the extensions list, and can be withdrawn."""
    prefix, client, worker, config, start = learning
    marked, absorbed = _absorbed_false_alarm(client, prefix, dataset)
    assert worker.stop() == 0
    store = _offline_store(config, bundle_dir)
    try:  # the history as a kill between the absorption and the label's write left it
        pid, vector, payload = store.find("m-0", "cam1")
        payload.update(label=None, defect_type=None, note=None, labelled_at=None)
        store.upsert([(pid, vector, payload)])
    finally:
        store.close()
    client.messages.clear()
    worker = start(config)
    wait_online(client, prefix)
    for _ in range(60):  # labelled while the worker is idle after its start
        labels = _query(client, prefix, {"action": "export"}, topic="label")["labels"]
        if labels:
            break
        _next_tick(client)
    assert [(r["frame_id"], r["label"]) for r in labels] == [("m-0", "false_alarm")], labels
    assert "the worker stopped after absorbing it" in labels[0]["note"]
    assert "labelled now" in worker.output()

    assert worker.stop() == 0
    store = _offline_store(config, bundle_dir)
    try:  # now as retention left it: the frame gone from the history, its rows still in use
        store.delete([point_id("cam1", "m-0")])
    finally:
        store.close()
    client.messages.clear()
    worker = start(config)
    wait_online(client, prefix)
    for _ in range(60):
        [ext] = _query(client, prefix, {"action": "extensions"}, topic="label")["extensions"]
        if "unrecorded" in ext["entries"][0]:
            break
        _next_tick(client)
    assert "no label in the history names it" in ext["entries"][0]["unrecorded"], ext
    assert "no label in the history names them" in worker.output()
    assert "cam1/m-0 (its frame is no longer in the history)" in worker.output()
    assert _score(client, prefix, marked, "m-1")["verdict"] == "normal"  # the rows serve until withdrawn
    answer = _query(client, prefix, {"action": "unlabel", "frame_id": "m-0", "camera": "cam1"}, topic="label")
    assert answer["released"]["patches"] == absorbed["patches"], answer
    assert _query(client, prefix, {"action": "extensions"}, topic="label")["extensions"][0]["entries"] == []


def test_a_false_alarm_label_the_store_refuses_takes_its_absorption_back(learning, dataset):
    """The store refusing the label's write after the absorption left rows in use with no label in the history (the
    same half state as a kill in between), while the answer said store_unavailable.  The absorption is now taken
    back, and the answer says so."""
    prefix, client, _, config, _ = learning
    marked = _marked(dataset)
    assert _score(client, prefix, marked, "m-0")["verdict"] == "anomalous"
    _until_stored(client, prefix, "m-0", "cam1")
    collection = config.parent / "qdrant" / "frames"  # store.collection
    moved = collection.with_name("moved-away")
    collection.rename(moved)  # the store's next write fails for real (StoreGone), its reads still answer
    try:
        answer = _query(client, prefix, {"action": "set", "frame_id": "m-0", "camera": "cam1", "label": "false_alarm"},
                        topic="label")
        assert answer["error"]["code"] == "store_unavailable", answer
        assert _query(client, prefix, {"action": "extensions"}, topic="label")["extensions"][0]["entries"] == []
        assert "the label is unchanged and nothing was absorbed" in answer["error"]["message"], answer
    finally:
        moved.rename(collection)
    assert _score(client, prefix, marked, "m-1")["verdict"] == "anomalous"  # nothing was taught


def test_a_withdrawal_the_store_refuses_leaves_the_label_and_its_rows(learning, dataset):
    """An unlabel the store refused (its disk below ``store.min_free_mb``, its folder gone) took the false alarm's rows
    out of the extension and then failed to clear its label: the history said false_alarm while the extension held
    nothing of it, and no restart mended that.  The store is now asked before the extension changes: the answer is
    ``store_unavailable``, the label and its rows stay, and the withdrawal works once the store takes writes."""
    prefix, client, _, config, _ = learning
    marked, absorbed = _absorbed_false_alarm(client, prefix, dataset)
    unlabel = {"action": "unlabel", "frame_id": "m-0", "camera": "cam1"}
    collection = config.parent / "qdrant" / "frames"  # store.collection
    moved = collection.with_name("moved-away")
    collection.rename(moved)  # the store's next write is refused for real (its folder gone), its reads still answer
    try:
        refused = _query(client, prefix, unlabel, topic="label")
        assert refused["error"]["code"] == "store_unavailable", refused
        assert "the label is unchanged and nothing was absorbed or withdrawn" in refused["error"]["message"], refused
        [ext] = _query(client, prefix, {"action": "extensions"}, topic="label")["extensions"]
        assert [e["frame_id"] for e in ext["entries"]] == ["m-0"] and ext["rows"] == absorbed["patches"], ext
    finally:
        moved.rename(collection)
    labels = _query(client, prefix, {"action": "export"}, topic="label")["labels"]
    assert [(r["frame_id"], r["label"]) for r in labels] == [("m-0", "false_alarm")]
    assert _score(client, prefix, marked, "m-1")["verdict"] == "normal"  # its rows are still in use
    released = _query(client, prefix, unlabel, topic="label")["released"]
    assert released["patches"] == absorbed["patches"], released
    assert _query(client, prefix, {"action": "export"}, topic="label")["labels"] == []


def test_entries_of_the_guards_folder_the_worker_does_not_write_are_left_and_named(learning, dataset):
    """A folder (another version's layout, an operator's) and a file not named as a guard in the extension's
    ``guards/`` folder: a false-alarm label, which deletes the guards of frames no longer confirmed, raised
    IsADirectoryError on the folder and deleted the file.  Both are now left as they are and named once."""
    prefix, client, worker, config, start = learning
    [extension] = [p for p in (config.parent / "extensions").iterdir() if p.is_dir()]  # made at start
    (extension / "guards" / "v3").mkdir(parents=True)
    (extension / "guards" / "v3" / "layout.json").write_text("{}")
    (extension / "guards" / "notes.txt").write_text("the operator's")
    marked = _marked(dataset)
    for fid in ("d-0", "m-0", "m-1"):
        assert _score(client, prefix, marked, fid)["verdict"] == "anomalous"
        _until_stored(client, prefix, fid, "cam1")

    def label(frame_id: str, kind: str) -> dict:
        return _query(client, prefix, {"action": "set", "frame_id": frame_id, "camera": "cam1", "label": kind},
                      topic="label")

    assert label("d-0", "confirmed_defect")["ok"]
    for fid in ("m-0", "m-1"):
        answer = label(fid, "false_alarm")
        assert answer["ok"] and "absorbed" in answer, answer
    assert (extension / "guards" / "v3" / "layout.json").read_text() == "{}"
    assert (extension / "guards" / "notes.txt").read_text() == "the operator's"
    assert [p.name for p in (extension / "guards").glob("*.npz")] == [f"{point_id('cam1', 'd-0')}.npz"]
    assert worker.stop() == 0
    said = [line for line in worker.output().splitlines() if "notes.txt" in line]
    assert len(said) == 1 and "v3" in said[0] and "left as" in said[0], said


def _dotted(dataset: Path, name: str, centre: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    """A good test frame with a square of ``colour`` at ``centre``: another appearance than :func:`_marked`'s."""
    image = cv2.imread(str(dataset / "weave" / "test" / "good" / f"{name}.png"), cv2.IMREAD_COLOR)
    cv2.rectangle(image, (centre[0] - 9, centre[1] - 9), (centre[0] + 9, centre[1] + 9), colour, -1)
    return cv2.imencode(".png", image)[1].tobytes()


def test_entries_held_past_a_lower_bound_are_listed_and_served_when_a_withdrawal_frees_room(learning, dataset):
    """Entries kept past ``learning.max_rows`` (the bound lowered, or a rollback to a version with a lower one) were
    served again only at the next start, and the ``extensions`` answer did not list them: the operator could not see
    why a false alarm once absorbed was flagged again.  They are listed as held, with the bound that serves them, and
    a withdrawal that frees room serves them at once."""
    prefix, client, worker, config, start = learning
    first, second, third = _marked(dataset), _dotted(dataset, "001", (100, 30), (30, 200, 230)), _dotted(
        dataset, "002", (100, 100), (20, 20, 200))
    for fid, image in (("m-0", first), ("n-0", second), ("o-0", third)):
        assert _score(client, prefix, image, fid)["verdict"] == "anomalous"
        _until_stored(client, prefix, fid, "cam1")

    def label(body: dict) -> dict:
        return _query(client, prefix, body if body["action"] == "extensions" else {"camera": "cam1", **body},
                      topic="label")

    taken = [label({"action": "set", "frame_id": fid, "label": "false_alarm"})["absorbed"]["patches"]
             for fid in ("m-0", "n-0", "o-0")]
    assert all(taken), taken
    assert _score(client, prefix, second, "n-1")["verdict"] == "normal"
    assert worker.stop() == 0
    lowered = yaml.safe_load(config.read_text())
    lowered["learning"]["max_rows"] = taken[0]  # the oldest fits; the other is held
    config.write_text(yaml.safe_dump(lowered))
    client.messages.clear()
    start(config)
    wait_online(client, prefix)
    [ext] = label({"action": "extensions"})["extensions"]
    assert (ext["rows"], ext["held_rows"], ext["max_rows_to_serve_all"]) == (taken[0], sum(taken[1:]), sum(taken)), ext
    held = {e["frame_id"]: e.get("held") for e in ext["entries"]}
    assert held["m-0"] is None and all(f"raise it to {sum(taken)}" in held[f] for f in ("n-0", "o-0")), ext
    assert _score(client, prefix, second, "n-2")["verdict"] == "anomalous"  # why: the list says it is held
    withdrawn = label({"action": "unlabel", "frame_id": "o-0"})
    assert "held past learning.max_rows" in withdrawn["released"]["reason"], withdrawn  # not "added nothing"

    assert label({"action": "unlabel", "frame_id": "m-0"})["ok"]
    [ext] = label({"action": "extensions"})["extensions"]
    assert [(e["frame_id"], e.get("held")) for e in ext["entries"]] == [("n-0", None)], ext
    assert ext["rows"] == taken[1] and "held_rows" not in ext, ext
    assert _score(client, prefix, second, "n-3")["verdict"] == "normal"


def _written(config: Path, bundle_dir: Path, rows: dict[str, int], max_rows: int) -> None:
    """The stopped worker's extension holds an entry of ``rows[frame_id]`` rows per cam1 frame id, oldest first, as a
    worker with a higher bound (or an earlier version) wrote it, and its config bounds it at ``max_rows``."""
    manifest = read_manifest(bundle_dir)
    assert manifest.extension is not None
    dim = manifest.extension.feature_dim
    folder = Path(yaml.safe_load(config.read_text())["learning"]["path"]) / folder_name(manifest)
    written = Extension(folder, dim, max_rows=sum(rows.values()))
    for fid, n in rows.items():  # far from any patch: they change no score
        written.add(point_id("cam1", fid), np.full((n, dim), 100.0, np.float32), fid, "cam1")
    lowered = yaml.safe_load(config.read_text())
    lowered["learning"]["max_rows"] = max_rows
    config.write_text(yaml.safe_dump(lowered))


def test_a_restart_after_a_withdrawal_serves_the_labels_served_before_it(learning, bundle_dir):
    """With entries held past ``learning.max_rows``, a start served the oldest that fit and a withdrawal served what
    the room it freed let in: after a withdrawal a restart swapped a served label for a held one, silently (the model
    topic's and results' extension, the ``extensions`` list changed with no label sent).  The labels served before
    a restart are served after it."""
    prefix, client, worker, config, start = learning
    assert worker.stop() == 0
    _written(config, bundle_dir, {"a-0": 5, "b-0": 6, "c-0": 5}, max_rows=10)  # a-0 and c-0 fit; b-0 is held

    def state() -> tuple[list[tuple[str, bool]], dict]:
        """The extensions list's entries (held or not), and the extension the retained model topic announces."""
        [ext] = _query(client, prefix, {"action": "extensions"}, topic="label")["extensions"]
        listed = [(e["frame_id"], "held" in e) for e in ext["entries"]]
        model = client.wait_for(lambda m: m.topic == f"{prefix}/workers/w-test/model"
                                and json.loads(m.payload)["extension"]["revision"] == ext["revision"])[-1]
        return listed, json.loads(model.payload)["extension"]

    client.messages.clear()
    worker = start(config)
    wait_online(client, prefix)
    assert state()[0] == [("a-0", False), ("c-0", False), ("b-0", True)]
    released = _query(client, prefix, {"action": "unlabel", "frame_id": "a-0", "camera": "cam1"}, topic="label")
    assert released["released"]["patches"] == 5, released  # b-0's 6 rows do not fit beside c-0's 5: still held
    before = state()
    assert before == ([("c-0", False), ("b-0", True)], {"revision": 4, "rows": 5, "labels": 1, "held": 1, "max_rows": 10}), before
    assert worker.stop() == 0
    client.messages.clear()
    start(config)
    wait_online(client, prefix)
    assert state() == before


def test_an_entry_held_past_the_bound_with_no_label_naming_it_is_marked_unrecorded(learning, bundle_dir):
    """At start the history is made to agree with the extensions (a label whose frame was absorbed before the worker
    stopped is recorded; one no label names is marked ``unrecorded``), but only the served entries were looked at: a
    held one no label names was listed as merely held, and raising the bound served it with nothing saying why.  And
    withdrawing a held one whose frame is no longer in the history deleted its rows but was answered unknown_frame.
    And it moved no revision, so the model topic was not published again and other consoles did not refresh: the
    topic's extension now counts the labels held, and is published again."""
    from worker.console.app import learned_text  # the console's words for the answer

    prefix, client, worker, config, start = learning
    assert worker.stop() == 0
    _written(config, bundle_dir, {"a-0": 5, "b-0": 6}, max_rows=10)  # frames the history never held; b-0 is held
    client.messages.clear()
    start(config)
    wait_online(client, prefix)
    deadline = time.monotonic() + 60
    while True:  # the reconciliation runs once the request thread is idle
        [ext] = _query(client, prefix, {"action": "extensions"}, topic="label")["extensions"]
        doubts = {e["frame_id"]: sorted(k for k in ("held", "unrecorded") if k in e) for e in ext["entries"]}
        if doubts["a-0"] or time.monotonic() > deadline:
            break
        _next_tick(client)
    assert doubts == {"a-0": ["unrecorded"], "b-0": ["held", "unrecorded"]}, ext
    # withdrawn as the mark says: the held rows are deleted, and the answer says so (it was refused unknown_frame,
    # "not in the history", though the rows were gone)
    model_topic = f"{prefix}/workers/w-test/model"
    assert json.loads(client.wait_for(lambda m: m.topic == model_topic)[-1].payload)["extension"]["held"] == 1
    withdrawn = _query(client, prefix, {"action": "unlabel", "frame_id": "b-0", "camera": "cam1"}, topic="label")
    assert withdrawn["ok"] and withdrawn["released"]["held"], withdrawn
    # no revision moves, and the retained model topic says it all the same: consoles and the CLI elsewhere refresh
    client.wait_for(lambda m: m.topic == model_topic and json.loads(m.payload)["extension"]["held"] == 0, timeout=30)
    assert "what it taught the model is withdrawn" in withdrawn["note"], withdrawn
    # the console said "nothing to release: its rows were held ...: they are deleted"
    assert learned_text(withdrawn) == ("withdrawn: its rows were held past learning.max_rows, not served: they are "
                                       "deleted; frames like it are scored as before"), withdrawn
    [ext] = _query(client, prefix, {"action": "extensions"}, topic="label")["extensions"]
    assert [e["frame_id"] for e in ext["entries"]] == ["a-0"], ext
