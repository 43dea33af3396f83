"""Operating the worker: shared subscriptions, hot reload, per-camera settings, Prometheus metrics."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client.parser import text_string_to_metric_families

from bundle import BundleError, read_manifest, write_manifest
from bundle.extension import folder_name
from conftest import ROOT, Client, WorkerProcess, good_png, killed_after, write_config
from scripts.broker import free_port
from worker.api_client import ApiClient
from worker.config import load_config


def _good(dataset: Path) -> bytes:
    return good_png(dataset).read_bytes()


def _online(client: Client, prefix: str, worker_id: str = "w-test") -> None:
    client.wait_for(lambda m: m.topic == f"{prefix}/workers/{worker_id}/availability" and m.payload == b"online",
                    timeout=120)


def _request(client: Client, topic: str, body: dict) -> dict:
    token = uuid.uuid4().hex.encode()
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = f"{client.prefix}/query/response/ops"
    props.CorrelationData = token
    client.client.publish(topic, json.dumps(body), qos=1, properties=props)
    msg = client.wait_for(lambda m: m.topic == props.ResponseTopic and m.properties.CorrelationData == token)[0]
    return json.loads(msg.payload)


def test_shared_subscription_balances_and_survives_a_worker_kill(broker, bundle_dir, dataset, tmp_path,
                                                                 worker_factory):
    prefix = f"g{uuid.uuid4().hex[:6]}"
    client = Client(broker.port, prefix)
    workers = []
    for i in range(3):
        config = write_config(tmp_path / f"w{i}", broker.port, bundle_dir,
                              worker={"id": f"w{i}", "stats_interval_s": 1},
                              topics={"prefix": prefix, "share_group": "line"},
                              mqtt={"session_expiry_s": 0},  # see deploy/README.md: a dead member's session must not keep its share
                              limits={"inference_threads": 1}, store={"log_normal_every": 0})
        workers.append(worker_factory(config))
    for i in range(3):
        _online(client, prefix, f"w{i}")
    frame = _good(dataset)
    n = 45
    for i in range(n):
        client.publish_frame("cam", frame, f"a{i:03d}")
    results = client.json_on(f"{prefix}/cam/result", count=n, timeout=180)
    assert sorted(r["frame_id"] for r in results) == [f"a{i:03d}" for i in range(n)], "each frame exactly once"
    share = {w: sum(r["worker"] == w for r in results) for w in ("w0", "w1", "w2")}
    assert min(share.values()) >= n // 6, share  # roughly even: the broker balances
    # A label reaches one member, which knows only the frames it scored: the answer names it and says so.
    answer = _request(client, f"{prefix}/label", {"action": "set", "frame_id": "never-sent", "camera": "cam",
                                                  "label": "false_alarm"})
    assert answer["worker"] in share and answer["error"]["code"] == "unknown_frame", answer
    assert f"of worker {answer['worker']}, one of share group 'line'" in answer["error"]["message"], answer

    workers[0].stop(signal.SIGKILL)
    # The broker has dropped the dead member once it publishes its last will: from then on it shares among two.
    client.wait_for(lambda m: m.topic == f"{prefix}/workers/w0/availability" and m.payload == b"offline", timeout=60)
    client.messages.clear()
    for i in range(30):
        client.publish_frame("cam", frame, f"b{i:03d}")
    results = client.json_on(f"{prefix}/cam/result", count=30, timeout=180)
    assert sorted(r["frame_id"] for r in results) == [f"b{i:03d}" for i in range(30)]
    assert {r["worker"] for r in results} == {"w1", "w2"}

    # A clean stop of a member while a camera streams: the frames the broker sent it after the stop began were left
    # unacknowledged, and lost with its session (expiry 0). It leaves the group first now, and finishes what it had.
    client.messages.clear()
    streaming = threading.Thread(target=lambda: [(client.publish_frame("cam", frame, f"c{i:03d}"),
                                                  time.sleep(0.02)) for i in range(80)])  # a camera's frame rate
    streaming.start()
    client.wait_for(lambda m: m.topic == f"{prefix}/cam/result" and json.loads(m.payload)["worker"] == "w1")
    assert workers[1].stop() == 0
    streaming.join()
    results = client.json_on(f"{prefix}/cam/result", count=80, timeout=180)
    assert sorted(r["frame_id"] for r in results) == [f"c{i:03d}" for i in range(80)], "each frame exactly once"
    assert not [m for m in client.messages if m.topic == f"{prefix}/cam/error"]
    assert workers[2].stop() == 0


def test_a_worker_that_joins_a_group_leaves_the_subscriptions_its_session_kept(broker, bundle_dir, dataset, tmp_path,
                                                                              worker_factory):
    """Scaling out as deploy/README says: a worker that ran alone (a persistent session) restarted with
    ``topics.share_group`` beside a second member.  Its session still held the plain frame subscription, so it took
    every frame besides its share of the group's: frames were scored and stored by both workers."""
    prefix = f"j{uuid.uuid4().hex[:6]}"
    client = Client(broker.port, prefix)
    alone = dict(worker={"id": "w0"}, topics={"prefix": prefix}, mqtt={"client_id": f"{prefix}-w0"},
                 limits={"inference_threads": 1})
    first = worker_factory(write_config(tmp_path / "w0", broker.port, bundle_dir, **alone))
    _online(client, prefix, "w0")
    assert first.stop() == 0
    grouped = {**alone, "topics": {"prefix": prefix, "share_group": "line"}}
    workers = [worker_factory(write_config(tmp_path / "w0", broker.port, bundle_dir, **grouped)),
               worker_factory(write_config(tmp_path / "w1", broker.port, bundle_dir,
                                           **{**grouped, "worker": {"id": "w1"}, "mqtt": {"client_id": f"{prefix}-w1"}}))]
    client.messages.clear()
    for worker_id in ("w0", "w1"):
        _online(client, prefix, worker_id)
    frame = _good(dataset)
    for i in range(20):
        client.publish_frame("cam", frame, f"a{i:03d}")
    client.json_on(f"{prefix}/cam/result", count=20, timeout=180)
    for w in workers:
        assert w.stop() == 0
    for worker_id in ("w0", "w1"):  # published after every result of its worker
        client.wait_for(lambda m, w=worker_id: m.topic == f"{prefix}/workers/{w}/availability" and m.payload == b"stopped")
    results = [json.loads(m.payload) for m in client.messages if m.topic == f"{prefix}/cam/result"]
    assert sorted(r["frame_id"] for r in results) == [f"a{i:03d}" for i in range(20)], "each frame once, by one worker"


def test_a_subscription_kept_from_an_earlier_prefix_is_named_and_left(broker, bundle_dir, dataset, tmp_path,
                                                                      worker_factory):
    """topics.prefix changed where the session's filters were not remembered (``mqtt.session_file: null``, or a state
    folder replaced): the kept subscription still delivered, and its messages were acknowledged, dropped and logged as
    "its camera level is empty".  They are named as an earlier configuration's, and its filter is left.  The metrics
    server on ``metrics.port: 0`` says in the log which port it took."""
    import re

    old_prefix, new_prefix = f"o{uuid.uuid4().hex[:6]}", f"n{uuid.uuid4().hex[:6]}"
    old, new = Client(broker.port, old_prefix), Client(broker.port, new_prefix)
    kept = {"client_id": f"{old_prefix}-w", "session_file": None}
    first = worker_factory(write_config(tmp_path / "a", broker.port, bundle_dir, topics={"prefix": old_prefix},
                                        mqtt=kept))
    _online(old, old_prefix, "w-test")
    assert first.stop() == 0
    worker = worker_factory(write_config(tmp_path / "b", broker.port, bundle_dir, topics={"prefix": new_prefix},
                                         mqtt=kept, metrics={"enabled": True, "host": "127.0.0.1", "port": 0}))
    try:
        _online(new, new_prefix, "w-test")
        frame = _good(dataset)
        old.publish_frame("cam1", frame, "old-1")
        said = "came through a subscription this configuration does not hold"
        deadline = time.monotonic() + 30
        while said not in worker.output():
            assert time.monotonic() < deadline, worker.output()[-3000:]
            time.sleep(0.1)  # polling the worker's log for the line, not waiting a fixed time
        assert f"{old_prefix}/+/frame" in worker.output().split(said, 1)[1].splitlines()[0]
        old.publish_frame("cam1", frame, "old-2")  # after the filter was left: not delivered
        new.publish_frame("cam1", frame, "barrier")
        assert new.json_on(f"{new_prefix}/cam1/result")[0]["frame_id"] == "barrier"
        log = worker.output()
        assert log.count(said) == 1 and "messages still come" not in log and "camera level is empty" not in log, log
        assert not [m for m in old.messages if m.topic.endswith(("/result", "/error"))]
        port = int(re.search(r"serving /metrics and /healthz on 127\.0\.0\.1:(\d+)", log).group(1))
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).status == 200
        assert worker.stop() == 0
    finally:
        old.close()
        new.close()


def test_a_worker_moved_from_a_group_to_another_line_leaves_the_groups_subscriptions(broker, bundle_dir, dataset,
                                                                                      tmp_path, worker_factory):
    """A group member (persistent session, as by default) reconfigured for another line (``topics.prefix``, no
    group) kept the group's ``$share`` subscriptions in its session: the broker still gave it its share of the old
    line's frames, which it could not read as its own, and they were lost with no error.  The worker remembers the
    filters its session holds (``mqtt.session_file``) and leaves those no longer configured at the next connect."""
    import paho.mqtt.client as mqtt

    old, new = f"m{uuid.uuid4().hex[:6]}", f"n{uuid.uuid4().hex[:6]}"
    grouped = dict(worker={"id": "w0"}, topics={"prefix": old, "share_group": "line"}, mqtt={"client_id": f"{old}-w0"})
    first = worker_factory(write_config(tmp_path / "w0", broker.port, bundle_dir, **grouped))
    client = Client(broker.port, old)
    _online(client, old, "w0")
    assert first.stop() == 0
    moved = write_config(tmp_path / "w0", broker.port, bundle_dir, **{**grouped, "topics": {"prefix": new}})
    worker_factory(moved)
    watcher = Client(broker.port, new)
    _online(watcher, new, "w0")
    watcher.close()
    record, key = tmp_path / "w0" / "data" / "mqtt-session.json", f"{old}-w0@127.0.0.1:{broker.port}"
    deadline = time.monotonic() + 60  # the record is rewritten at the broker's UNSUBACK
    while not record.is_file() or any(f.startswith("$share/") for f in json.loads(record.read_text())[key]):
        assert time.monotonic() < deadline, record.read_text() if record.is_file() else "no record"
        time.sleep(0.1)
    # The group's remaining member on the old line: a client of the very filter the worker had
    member = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                         client_id=f"{old}-member")
    got: list[str] = []
    subscribed = threading.Event()
    member.on_message = lambda c, u, m: got.append(m.topic)
    member.on_subscribe = lambda *args: subscribed.set()
    member.connect("127.0.0.1", broker.port)
    member.loop_start()
    try:
        member.subscribe(f"$share/line/{old}/+/frame", qos=1)
        assert subscribed.wait(30)
        for i in range(20):
            client.publish_frame("cam", _good(dataset), f"f{i:02d}")
        deadline = time.monotonic() + 60
        while len(got) < 20:
            assert time.monotonic() < deadline, f"the group's member got {len(got)} of 20 frames"
            time.sleep(0.1)
    finally:
        member.loop_stop()
        member.disconnect()
        client.close()


def _waiting_for_a_lock(path: Path) -> bool:
    """Whether a process waits for an OS lock on ``path`` (a blocked request, ``->`` in /proc/locks)."""
    inode = f":{path.stat().st_ino} " if path.exists() else None
    return inode is not None and any("->" in line and inode in line
                                     for line in Path("/proc/locks").read_text().splitlines())


def test_two_workers_on_one_session_file_each_keep_their_record(broker, tmp_path, monkeypatch):
    """Two workers started from one config.yaml (``worker.id`` set apart, its folders per worker in the environment)
    share ``mqtt.session_file``, which holds a record per client id.  The one that read the file before the other
    had written it put it back without the other's record (and both wrote one ``.tmp``): that worker forgot the
    filters its session holds, and after a change of topics they stayed at the broker, delivering.  Here the first
    link's write is held after it read the file (its rename waits for the test) while the second connects and
    writes: both records are kept."""
    from worker.config import MQTTConfig
    from worker.mqtt import MqttLink

    record = tmp_path / "data" / "mqtt-session.json"
    cfg = MQTTConfig(port=broker.port)
    prefix = f"s{uuid.uuid4().hex[:6]}"
    ids = [f"{prefix}-w0", f"{prefix}-w1"]
    held, go = threading.Event(), threading.Event()
    rename = Path.replace

    def held_rename(self: Path, target: str | Path) -> Path:
        """The first link's first rename of the record waits until the test lets it go."""
        if Path(target) == record and threading.current_thread().name == f"paho-mqtt-client-{ids[0]}" \
                and not go.is_set():
            held.set()
            go.wait(30)
        return rename(self, target)

    monkeypatch.setattr(Path, "replace", held_rename)
    links = [MqttLink(cfg, client_id, subscriptions=[f"{prefix}/{client_id}/+/frame"], record=record)
             for client_id in ids]
    try:
        links[0].start()
        assert held.wait(30), "the first link never wrote its record"
        links[1].start()
        lock = record.with_name(record.name + ".lock")
        deadline = time.monotonic() + 30
        # the second has written (unguarded), or waits for the first's lock
        while not (record.is_file() and f"{ids[1]}@127.0.0.1:{broker.port}" in record.read_text()) \
                and not _waiting_for_a_lock(lock):
            assert time.monotonic() < deadline, "the second link neither wrote its record nor waited for the lock"
            time.sleep(0.02)  # polling the file and /proc/locks, with a deadline
        go.set()
        expected = {f"{client_id}@127.0.0.1:{broker.port}": [f"{prefix}/{client_id}/+/frame"] for client_id in ids}
        deadline = time.monotonic() + 30
        while not (record.is_file() and json.loads(record.read_text()) == expected):
            assert time.monotonic() < deadline, record.read_text() if record.is_file() else "no record"
            time.sleep(0.05)  # polling the record, with a deadline
        assert all(link.wait_connected(10) for link in links)
    finally:
        go.set()
        for link in links:
            link.stop()


def test_a_group_member_whose_worker_id_changed_ends_the_session_it_left(bundle_dir, dataset, tmp_path,
                                                                        worker_factory):
    """A group member (persistent session, client id edge-inspect-<worker.id> by default) restarted under another
    ``worker.id``: its old client id's session stayed at the broker with the group's subscription until it expired
    (``mqtt.session_expiry_s``, an hour by default), and the broker queued half of the group's frames for it, lost.
    The record names the worker that held each session (its spool folder): the worker ends its earlier client id's
    session and every frame reaches it."""
    from scripts.broker import Broker

    broker = Broker(tmp_path / "broker")
    prefix = f"r{uuid.uuid4().hex[:6]}"
    client = Client(broker.port, prefix)
    try:
        grouped = dict(topics={"prefix": prefix, "share_group": "line"}, mqtt={"client_id": None})
        first = worker_factory(write_config(tmp_path / "w", broker.port, bundle_dir, worker={"id": "w0"}, **grouped))
        _online(client, prefix, "w0")
        assert first.stop() == 0
        renamed = worker_factory(write_config(tmp_path / "w", broker.port, bundle_dir, worker={"id": "w1"},
                                              **grouped))
        _online(client, prefix, "w1")
        deadline = time.monotonic() + 30
        while "ended the session this worker left at the broker as client id 'edge-inspect-w0'" not in renamed.output():
            assert time.monotonic() < deadline, renamed.output()[-3000:]
            time.sleep(0.1)  # polling the worker's log, with a deadline
        record = json.loads((tmp_path / "w" / "data" / "mqtt-session.json").read_text())
        assert list(record["owners"]) == [f"edge-inspect-w1@127.0.0.1:{broker.port}"], record
        for i in range(10):
            client.publish_frame("cam", _good(dataset), f"f{i}")
        results = client.json_on(f"{prefix}/cam/result", timeout=60, count=10)
        assert sorted(r["frame_id"] for r in results) == [f"f{i}" for i in range(10)]
        assert renamed.stop() == 0
    finally:
        client.close()
        broker.stop()


def _relabelled(bundle_dir: Path, folder: Path, version: str, name: str | None = None) -> Path:
    """A copy of a bundle under another version (same weights), as a new release would be installed; with
    ``name``, as another product's bundle would be."""
    shutil.copytree(bundle_dir, folder)
    manifest = read_manifest(folder)
    fields = manifest.model_dump()
    fields.pop("files")
    fields["version"] = version
    if name is not None:
        fields["name"] = name
    write_manifest(folder, fields)
    return folder


def test_the_model_cache_keeps_only_the_bundles_served_or_kept_for_rollback(bundle_dir, tmp_path):
    """Each retrained bundle adds its compiled blobs to OpenVINO's cache: a line retrained every week would fill the
    disk.  The cache holds a folder per bundle, and the folders of bundles neither served nor kept for rollback go,
    as do blobs of the older flat layout; nothing else in the folder is touched."""
    from bundle.extension import folder_name
    from worker.config import Config
    from worker.models import DEFAULT, Models

    cache = tmp_path / "ov"
    cache.mkdir()
    (cache / "1234.blob").write_bytes(b"compiled by an older worker, flat")
    (cache / "README").write_text("not ours")
    b, c = (_relabelled(bundle_dir, tmp_path / name, "1.0.0", name=name) for name in ("line-b", "line-c"))
    names = {p: folder_name(read_manifest(p)) for p in (bundle_dir, b, c)}
    models = Models(Config.model_validate({"model": {"bundle": str(bundle_dir), "cache_dir": str(cache),
                                                     "rollout_path": str(tmp_path / "rollout")},
                                           "learning": {"path": str(tmp_path / "extensions")}}))

    def kept() -> set[str]:
        return {p.name for p in cache.iterdir()}

    assert kept() == {names[bundle_dir], "README"}
    assert list((cache / names[bundle_dir]).glob("*.blob"))  # compiled into its own folder
    models.load(DEFAULT, b)
    assert kept() == {names[bundle_dir], names[b], "README"}  # the replaced one is kept for rollback
    models.load(DEFAULT, c)
    assert kept() == {names[b], names[c], "README"}
    # so are the bank extensions listed (stats, console, label withdrawals): one per bundle ever served, until now
    assert {e.folder.name for e in models.extensions()} == {names[b], names[c]}
    assert models.rollback(DEFAULT).bundle.manifest.name == "line-b"
    assert kept() == {names[b], names[c], "README"}



def test_the_extensions_of_bundles_no_longer_served_are_let_go(bundle_dir, tmp_path):
    """Each bundle ever served kept its bank extension in the worker's memory (its rows too) and an empty folder under
    learning.path, for good: a line retrained weekly grew both by one per roll-out.  Only those of the bundles served
    or kept for rollback stay; a folder holding rows stays on disk."""
    from bundle.extension import folder_name
    from worker.config import Config
    from worker.models import DEFAULT, Models

    learning = tmp_path / "extensions"
    models = Models(Config.model_validate({"model": {"bundle": str(bundle_dir), "cache_dir": None,
                                                     "rollout_path": str(tmp_path / "rollout")},
                                           "learning": {"path": str(learning)}}))
    first = folder_name(models.default.bundle.manifest)
    (learning / first / "rows.npy").write_bytes(b"a label's rows")  # stands for a folder that holds rows
    releases = [_relabelled(bundle_dir, tmp_path / f"line-{i}", "1.0.0", name=f"line-{i}") for i in range(5)]
    for release in releases:
        models.load(DEFAULT, release)
    served = {folder_name(read_manifest(p)) for p in releases[-2:]}  # the one served and the one kept for rollback
    assert {f.name for f in models._extensions} == served
    assert {f.name for f in learning.iterdir() if f.is_dir()} == served | {first}
    models.rollback(DEFAULT)
    assert {f.name for f in models._extensions} == {folder_name(read_manifest(releases[-2]))}


def test_a_bundle_replaced_on_disk_is_rolled_back_on_the_cameras_that_follow_the_default_too(bundle_dir, tmp_path):
    """``model.watch_s`` listed a camera with only its own precision beside the default: reloaded once with the
    default and once more on its own, its kept rollback was the new bundle, and a rollback left it serving that
    bundle (a helper's probe).  It is reloaded with the default only, and rolls back with it."""
    from worker.config import Config
    from worker.models import DEFAULT, Models

    served = _relabelled(bundle_dir, tmp_path / "current", "1.0.0")
    models = Models(Config.model_validate({"model": {"bundle": str(served), "cache_dir": str(tmp_path / "ov"),
                                                     "rollout_path": str(tmp_path / "rollout")},
                                           "learning": {"path": str(tmp_path / "extensions")},
                                           "cameras": {"own-precision": {"precision": "f32"}}}))
    assert sorted(models.scopes()) == [DEFAULT, "own-precision"] and not models.changed_on_disk()
    shutil.rmtree(served)
    _relabelled(bundle_dir, served, "2.0.0")  # a new release installed in place
    changed = models.changed_on_disk()
    assert changed == [(DEFAULT, served)], changed
    for scope, path in changed:  # as the service's watch does
        models.load(scope, path)
    assert {s: m.bundle.manifest.version for s, m in models.scopes().items()} == {DEFAULT: "2.0.0",
                                                                                 "own-precision": "2.0.0"}
    models.rollback(DEFAULT)
    assert {s: m.bundle.manifest.version for s, m in models.scopes().items()} == {DEFAULT: "1.0.0",
                                                                                 "own-precision": "1.0.0"}


def test_a_rollback_after_a_restart_goes_to_the_folder_the_earlier_bundle_was_read_from(bundle_dir, tmp_path):
    """A bundle replaced where it is served (a link switched to a new release, or the folder swapped as the exporter
    does) and reloaded kept the same path "for rollback": after a restart the rollback compiled the served bundle
    again and answered ok (a helper's probe).  The folder the earlier bundle was read from is kept (the link's old
    target); where that folder now holds the served bundle, nothing is kept and the rollback says so.  A rollback
    target's compiled blobs stay in the model cache over the restart."""
    from bundle.extension import folder_name
    from worker.config import Config
    from worker.models import DEFAULT, Models

    def config(served: Path) -> Config:
        return Config.model_validate({"model": {"bundle": str(served), "cache_dir": str(tmp_path / "ov"),
                                                "rollout_path": str(tmp_path / "rollout")},
                                      "learning": {"path": str(tmp_path / "extensions")}})

    v1 = _relabelled(bundle_dir, tmp_path / "releases" / "v1", "1.0.0", name="line")
    v2 = _relabelled(bundle_dir, tmp_path / "releases" / "v2", "2.0.0", name="line-next")
    link = tmp_path / "current"
    link.symlink_to(v1)
    models = Models(config(link))
    link.unlink()
    link.symlink_to(v2)  # the next release
    models.load(DEFAULT, link)
    assert models.default.bundle.manifest.version == "2.0.0"
    models = Models(config(link))  # a restart
    assert (tmp_path / "ov" / folder_name(read_manifest(v1))).is_dir()  # the rollback target's blobs stay
    assert models.rollback(DEFAULT).bundle.manifest.version == "1.0.0"

    folder = _relabelled(bundle_dir, tmp_path / "swapped", "1.0.0")
    models = Models(config(folder))
    shutil.rmtree(folder)
    _relabelled(bundle_dir, folder, "2.0.0")  # replaced in place, as exporter train --out does
    models.load(DEFAULT, folder)
    models = Models(config(folder))  # a restart
    with pytest.raises(BundleError, match="no previous model to roll back to"):
        models.rollback(DEFAULT)
    assert models.default.bundle.manifest.version == "2.0.0"


def test_what_was_rolled_out_is_served_after_a_restart_until_config_yaml_names_another(bundle_dir, tmp_path, caplog):
    """A restart (a power cut, the watchdog's exit) went back to config.yaml's bundles without a word: a model rolled
    out from the console, and a canary, were gone, and so was the rollback.  Each reload and rollback is recorded;
    a restart serves them with their rollback, until config.yaml names another bundle for the scope."""
    from worker.config import Config
    from worker.models import DEFAULT, Models

    v1 = read_manifest(bundle_dir).version
    v2, v3 = (_relabelled(bundle_dir, tmp_path / v, v) for v in ("2.0.0", "3.0.0"))

    def start(bundle: Path, cameras: dict | None = None) -> Models:
        return Models(Config.model_validate({"model": {"bundle": str(bundle), "cache_dir": None,
                                                       "rollout_path": str(tmp_path / "rollout")},
                                             "learning": {"path": str(tmp_path / "extensions")},
                                             "cameras": cameras or {}}))

    def serving(models: Models) -> dict[str, str]:
        return {scope: model.bundle.manifest.version for scope, model in models.scopes().items()}

    models = start(bundle_dir)
    models.load(DEFAULT, v2)
    models.load("line2", v3)  # a canary
    models.load("line3", bundle_dir)  # a canary of config.yaml's own bundle, while the default serves another
    models = start(bundle_dir)  # the restart
    assert serving(models) == {DEFAULT: "2.0.0", "line2": "3.0.0", "line3": v1}
    # A camera given its own precision since follows what the default serves, not config.yaml's bundle.
    assert serving(start(bundle_dir, {"fast": {"precision": "f32"}}))["fast"] == "2.0.0"
    assert models.rollback("line3").bundle.manifest.version == "2.0.0"
    assert models.rollback("line2").bundle.manifest.version == "2.0.0"  # the canary ends: the default serves it
    assert models.rollback(DEFAULT).bundle.manifest.version == v1  # kept for rollback by the run before
    # A rollback was a toggle: a second one put back the bundle just rolled back from (2.0.0) and called it "back
    # on".  It goes back one bundle, once; a second is refused and changes nothing, after a restart too.
    with pytest.raises(BundleError, match="no previous model to roll back to for 'default': it serves"):
        models.rollback(DEFAULT)
    assert serving(models) == {DEFAULT: v1}
    models = start(bundle_dir)
    assert serving(models) == {DEFAULT: v1}
    with pytest.raises(BundleError, match="no previous model"):
        models.rollback(DEFAULT)
    models.load(DEFAULT, v2)

    shutil.move(v2, tmp_path / "away")  # what was rolled out is gone: config.yaml's serves, and the log says why
    with caplog.at_level("ERROR", logger="worker.models"):
        models = start(bundle_dir)
    assert serving(models) == {DEFAULT: v1} and "cannot serve" in caplog.text
    # gone for one start only (a mount not ready at boot): the roll-out was forgotten for good, and the next start
    # served config.yaml's older bundle without a word
    shutil.move(tmp_path / "away", v2)
    models = start(bundle_dir)
    assert serving(models) == {DEFAULT: "2.0.0"}
    models.load(DEFAULT, v3)
    assert serving(start(bundle_dir)) == {DEFAULT: "3.0.0"}
    v4 = _relabelled(bundle_dir, tmp_path / "4.0.0", "4.0.0")
    with caplog.at_level("WARNING", logger="worker.models"):
        models = start(v4)  # config.yaml edited since the rollout: it wins
    assert serving(models) == {DEFAULT: "4.0.0"} and "config.yaml names" in caplog.text
    # Nothing rolled out since (rollout.json is written at every start and stop): an edit of config.yaml was met
    # with the same warning, naming a roll-out nobody did
    caplog.clear()
    with caplog.at_level("WARNING", logger="worker.models"):
        models = start(v3)
    assert serving(models) == {DEFAULT: "3.0.0"} and "rolled out" not in caplog.text, caplog.text


def test_a_bundle_rolled_out_to_all_ends_its_canary_so_a_rollback_takes_every_camera_back(bundle_dir, tmp_path):
    """The README's roll-out: a canary on one camera, then to all, then a rollback if it misbehaves.  The canary's
    camera kept its own scope on the new bundle, so the rollback left it there (and every later release too)."""
    from worker.config import Config
    from worker.models import DEFAULT, Models

    v1 = read_manifest(bundle_dir).version
    v2, v3 = (_relabelled(bundle_dir, tmp_path / v, v) for v in ("2.0.0", "3.0.0"))
    models = Models(Config.model_validate({"model": {"bundle": str(bundle_dir), "cache_dir": None, "rollout_path": None},
                                           "learning": {"path": str(tmp_path / "extensions")}}))
    models.load("line2", v2)
    models.load("line3", v3)  # another trial, not rolled out: it stays
    models.load(DEFAULT, v2)
    assert set(models.scopes()) == {DEFAULT, "line3"}
    models.rollback(DEFAULT)
    assert models.for_camera("line2").bundle.manifest.version == v1
    assert models.for_camera("line3").bundle.manifest.version == "3.0.0"

def test_a_reload_sent_twice_keeps_the_bundle_a_rollback_goes_back_to(bundle_dir, tmp_path):
    """A reload retried (its wait ran out, an operator clicked twice) loaded the bundle served over itself: the
    bundle before it was no longer kept, and a rollback answered ok and stayed on the new one."""
    from worker.models import DEFAULT

    v1 = read_manifest(bundle_dir).version
    v2 = _relabelled(bundle_dir, tmp_path / "2.0.0", "2.0.0")
    models = _models(bundle_dir, tmp_path)
    models.load(DEFAULT, v2)
    models.load(DEFAULT, v2)
    models.load("line2", v2)  # a canary, retried
    models.load("line2", v2)
    assert models.rollback(DEFAULT).bundle.manifest.version == v1
    assert models.rollback("line2").bundle.manifest.version == v1  # its first canary dropped: it follows the default
    assert models.for_camera("line2").bundle.manifest.version == v1


def _models(bundle: Path, folder: Path):
    """A worker's models (as at a start) on ``bundle``, recording roll-outs under ``folder``."""
    from worker.config import Config
    from worker.models import Models

    return Models(Config.model_validate({"model": {"bundle": str(bundle), "cache_dir": None,
                                                   "rollout_path": str(folder / "rollout")},
                                         "learning": {"path": str(folder / "extensions")}}))


def test_a_rollout_record_this_version_cannot_read_is_set_aside_not_overwritten(bundle_dir, tmp_path, caplog):
    """A rollout.json of another layout (a newer worker's, met by one rolled back; a hand edit) was said unreadable
    and then overwritten by the start's own record: the roll-outs it held were gone when the newer worker came back.
    It is renamed beside it, the log names it, and config.yaml's bundle serves."""
    from worker.models import DEFAULT

    (tmp_path / "rollout").mkdir()
    newer = json.dumps({"format": 2, "scopes": [{"scope": DEFAULT, "bundle": str(bundle_dir)}]})
    (tmp_path / "rollout" / "rollout.json").write_text(newer)
    with caplog.at_level("ERROR", logger="worker.models"):
        models = _models(bundle_dir, tmp_path)
    assert models.default.bundle.manifest.version == read_manifest(bundle_dir).version
    assert (tmp_path / "rollout" / "rollout.json.unreadable").read_text() == newer
    assert "set aside as rollout.json.unreadable" in caplog.text, caplog.text
    assert json.loads((tmp_path / "rollout" / "rollout.json").read_text())["scopes"][DEFAULT]["bundle"]
    (tmp_path / "rollout" / "rollout.json").write_text("{")  # again: the earlier one set aside is kept too
    _models(bundle_dir, tmp_path)
    assert (tmp_path / "rollout" / "rollout.json.unreadable").read_text() == newer
    assert (tmp_path / "rollout" / "rollout.json.unreadable-2").read_text() == "{"


def test_a_canary_missing_at_a_start_ends_with_a_roll_out_of_its_bundle_and_can_be_rolled_back(bundle_dir, tmp_path):
    """A canary whose bundle was missing at a start (a mount not ready at boot) is kept for the next start; it came
    back at a later one over the bundles rolled out to every camera since, and a rollback of its camera was refused
    (a helper's probe).  A roll-out of its bundle ends it, a rollback drops it, and the answers list it meanwhile."""
    from worker.models import DEFAULT

    v1 = read_manifest(bundle_dir).version
    v2, v3 = (_relabelled(bundle_dir, tmp_path / v, v) for v in ("2.0.0", "3.0.0"))
    for ending in ("roll-out", "rollback"):
        root = tmp_path / ending
        _models(bundle_dir, root).load("cam1", v2)
        shutil.move(v2, tmp_path / "away")
        models = _models(bundle_dir, root)  # the restart: cam1 follows the default meanwhile
        assert models.for_camera("cam1").bundle.manifest.version == v1 and models.pending() == {"cam1": str(v2)}
        shutil.move(tmp_path / "away", v2)
        if ending == "rollback":
            assert models.rollback("cam1").bundle.manifest.version == v1
        else:
            models.load(DEFAULT, v2)
        models.load(DEFAULT, v3)
        assert models.pending() == {}
        assert _models(bundle_dir, root).for_camera("cam1").bundle.manifest.version == "3.0.0"  # the next start


def test_a_rollback_of_the_default_ends_the_canaries_of_its_bundle_with_or_without_a_restart(bundle_dir, tmp_path):
    """Roll out v2, put one camera back on v1 (a canary), roll the default back to v1, roll out v4: the camera stayed
    on v1 without a restart between, and went to v4 with one (a helper's probe).  Both now end the canary."""
    from worker.models import DEFAULT

    v2, v4 = (_relabelled(bundle_dir, tmp_path / v, v) for v in ("2.0.0", "4.0.0"))
    for restart in (False, True):
        root = tmp_path / f"restart-{restart}"
        models = _models(bundle_dir, root)
        models.load(DEFAULT, v2)
        models.load("cam1", bundle_dir)
        if restart:
            models = _models(bundle_dir, root)
        models.rollback(DEFAULT)
        assert set(models.scopes()) == {DEFAULT}, restart
        models.load(DEFAULT, v4)
        assert models.for_camera("cam1").bundle.manifest.version == "4.0.0", restart


def _serving(broker, bundle: Path, folder: Path, worker_factory, **sections) -> tuple[str, Client, object, str]:
    """A worker online on ``bundle`` under a prefix of its own (and more config ``sections``): (prefix, client,
    worker, its control topic)."""
    prefix = f"o{uuid.uuid4().hex[:6]}"
    client = Client(broker.port, prefix)
    worker = worker_factory(write_config(folder, broker.port, bundle, topics={"prefix": prefix}, **sections))
    _online(client, prefix)
    return prefix, client, worker, f"{prefix}/workers/w-test/control"


def test_hot_reload_and_rollback_under_a_steady_stream(broker, bundle_dir, dataset, tmp_path, worker_factory):
    """The stream runs until the reload and the rollback are answered, and a few frames more: a stream of a fixed
    length could end before a compile slowed by a loaded machine was done, leaving no frame scored after it."""
    v1 = read_manifest(bundle_dir).version
    v2 = _relabelled(bundle_dir, tmp_path / "v2", "2.0.0")
    prefix, client, worker, control = _serving(broker, bundle_dir, tmp_path, worker_factory)
    frame = _good(dataset)
    sent: list[str] = []
    stop = threading.Event()

    def stream() -> None:
        after = 0  # frames sent once every answer is in: scored by the model the last one left serving
        while after < 10 and len(sent) < 10_000:
            if stop.is_set():
                after += 1
            sent.append(f"h{len(sent):05d}")
            client.publish_frame("cam", frame, sent[-1])
            time.sleep(0.1)  # a camera's frame rate

    feeder = threading.Thread(target=stream)
    feeder.start()
    try:
        client.wait_for(lambda m: m.topic == f"{prefix}/cam/result", count=10)
        bad = _request(client, control, {"command": "reload", "bundle": str(tmp_path / "missing")})
        assert bad["ok"] is False and bad["error"]["code"] == "reload_failed"
        answer = _request(client, control, {"command": "reload", "bundle": str(v2)})
        assert answer["ok"] and answer["models"]["default"]["version"] == "2.0.0", answer
        client.wait_for(lambda m: m.topic == f"{prefix}/cam/result" and b'"2.0.0"' in m.payload, count=10)
        back = _request(client, control, {"command": "rollback"})
        assert back["ok"] and back["models"]["default"]["version"] == v1
        again = _request(client, control, {"command": "rollback"})  # it put 2.0.0 back: a toggle
        assert again["ok"] is False and again["error"]["code"] == "reload_failed", again
        assert "no previous model to roll back to" in again["error"]["message"], again
        # a camera without a model of its own, "read again", was pinned to the default's bundle out of later
        # roll-outs; a camera named "default" given a canary rolled it out to every camera (a helper's probe): both
        # refused
        pinned = _request(client, control, {"command": "reload", "camera": "cam"})
        assert pinned["error"]["code"] == "bad_request" and "give a bundle for a canary" in pinned["error"]["message"]
        named = _request(client, control, {"command": "reload", "camera": "default", "bundle": str(v2)})
        assert named["error"]["code"] == "bad_request" and "rename the camera" in named["error"]["message"], named
    finally:
        stop.set()
        feeder.join()
    n = len(sent)
    results = client.json_on(f"{prefix}/cam/result", count=n, timeout=120)
    assert not [m for m in client.messages if m.topic.endswith("/error")], "no frame may be lost to a reload"
    versions = [r["model"]["version"] for r in sorted(results, key=lambda r: r["frame_id"])]
    switches = [i for i in range(1, n) if versions[i] != versions[i - 1]]
    assert versions[0] == v1 and versions[-1] == v1 and "2.0.0" in versions and len(switches) == 2, versions
    retained = client.json_on(f"{prefix}/workers/w-test/model", count=1)[-1]
    assert retained["version"] == v1 and retained["tiling"] is None and retained["input"] == [128, 128], retained
    assert set(retained["scopes"]) == {"default"} and retained["pending"] == {}, retained
    assert worker.stop() == 0


def test_reload_rollback_and_status_from_the_command_line(broker, bundle_dir, tmp_path, worker_factory):
    """A canary, a roll-out and a rollback without the console meant hand-writing an MQTT v5 request with a response
    topic and correlation data: the command line had no way to send a control command."""
    v1 = read_manifest(bundle_dir).version
    v2 = _relabelled(bundle_dir, tmp_path / "v2", "2.0.0")
    _, client, worker, _ = _serving(broker, bundle_dir, tmp_path / "w", worker_factory)
    config = tmp_path / "w" / "config.yaml"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "worker", *args, "--config", str(config)], capture_output=True,
                              text=True, cwd=ROOT, timeout=300)

    def models(done: subprocess.CompletedProcess) -> dict[str, str]:
        assert done.returncode == 0, done.stderr
        return {scope: m["version"] for scope, m in json.loads(done.stdout)["models"].items()}

    assert models(cli("status")) == {"default": v1}
    assert models(cli("reload", "--bundle", str(v2), "--camera", "cam")) == {"default": v1, "cam": "2.0.0"}
    refused = cli("reload", "--bundle", str(tmp_path / "missing"))
    assert refused.returncode == 1 and "\nerror: reload_failed: " in refused.stderr, refused.stderr
    assert models(cli("reload", "--bundle", str(v2))) == {"default": "2.0.0"}  # the roll-out ends the canary
    assert models(cli("rollback")) == {"default": v1}
    again = cli("rollback")
    assert again.returncode == 1 and "no previous model to roll back to" in again.stderr, again.stderr
    client.close()
    assert worker.stop() == 0
    for wrong in ("5e9", "0", "nan"):  # 5e9 s passed the 32-bit message expiry: a traceback
        refused = cli("reload", "--bundle", str(v2), "--timeout", wrong)
        assert refused.returncode == 2 and "at most a day" in refused.stderr and "Traceback" not in refused.stderr
    unanswered = cli("reload", "--bundle", str(v2), "--timeout", "2")
    assert unanswered.returncode == 2 and "error: no answer from a worker" in unanswered.stderr, unanswered.stderr
    assert "python -m worker status says what serves" in unanswered.stderr, unanswered.stderr


def test_a_bundle_for_a_camera_that_sets_only_its_precision_is_refused_not_dropped_later(broker, bundle_dir, tmp_path,
                                                                                          worker_factory):
    """A camera with only its own precision follows the default's bundle: a canary on it was served, then dropped
    without a word at the next start, or moved by a roll-out to all (a helper's probe).  It is refused, saying how to
    give the camera a bundle of its own; reading its bundle again, and a roll-out to all, still work.  A camera
    with other settings of its own (an roi, a heatmap policy) and no precision takes a canary: it was refused too."""
    v1 = read_manifest(bundle_dir).version
    v2 = _relabelled(bundle_dir, tmp_path / "v2", "2.0.0")
    _, client, worker, _ = _serving(broker, bundle_dir, tmp_path / "w", worker_factory,
                                    cameras={"fast": {"precision": "f32"}, "cut": {"roi": [0, 0, 32, 32]},
                                             "quiet": {"heatmap": "never"}})
    try:
        with ApiClient(load_config(tmp_path / "w" / "config.yaml"), "test") as api:
            refused = api.control({"command": "reload", "bundle": str(v2), "camera": "fast"}, timeout=60)
            assert refused["error"]["code"] == "bad_request" and "cameras.fast.bundle" in refused["error"]["message"]
            for camera in ("cut", "quiet"):
                canary = api.control({"command": "reload", "bundle": str(v2), "camera": camera}, timeout=120)
                assert canary["ok"] and canary["models"][camera]["version"] == "2.0.0", canary
                back = api.control({"command": "rollback", "camera": camera}, timeout=120)
                assert back["ok"] and camera not in back["models"], back
            again = api.control({"command": "reload", "bundle": str(bundle_dir), "camera": "fast"}, timeout=120)
            assert again["ok"] and again["models"]["fast"]["version"] == v1, again
            rolled = api.control({"command": "reload", "bundle": str(v2)}, timeout=120)
            assert {s: m["version"] for s, m in rolled["models"].items()} == {"default": "2.0.0", "fast": "2.0.0"}
    finally:
        client.close()
        assert worker.stop() == 0


def test_a_worker_that_reloaded_twice_still_stops_cleanly(broker, bundle_dir, dataset, tmp_path, worker_factory):
    """OpenVINO's CPU plugin gives the thread that compiles a model an alternate signal stack of its own and, when
    the model is destroyed, unmaps it and restores the old one on the thread that destroys it.  The start-up model
    was compiled on the main thread and destroyed by another at the second reload (it left the rollback slot), so
    the main thread kept a stack that was gone, and SIGTERM there ended the worker with SIGSEGV: no "stopped", no
    flushed store, availability left to the last will."""
    prefix, client, worker, control = _serving(broker, bundle_dir, tmp_path, worker_factory)
    frame = _good(dataset)
    stop = threading.Event()

    def stream() -> None:  # three cameras at a line's pace while the models change
        for i in range(10_000):
            if stop.is_set():
                return
            client.publish_frame(f"cam{i % 3}", frame, f"s{i:05d}")
            time.sleep(0.2)

    feeder = threading.Thread(target=stream)
    feeder.start()
    try:
        for bundle in (_relabelled(bundle_dir, tmp_path / "v2", "2.0.0"), bundle_dir):
            client.wait_for(lambda m: m.topic.startswith(f"{prefix}/cam") and m.topic.endswith("/result"), count=5)
            answer = _request(client, control, {"command": "reload", "bundle": str(bundle)})
            assert answer["ok"], answer
            client.messages.clear()
        client.wait_for(lambda m: m.topic.startswith(f"{prefix}/cam") and m.topic.endswith("/result"), count=5)
    finally:
        stop.set()
        feeder.join()
    assert worker.stop() == 0, worker.output()[-2000:]
    client.wait_for(lambda m: m.topic == f"{prefix}/workers/w-test/availability" and m.payload == b"stopped")


def _watching(port: int, bundle_dir: Path, tmp_path: Path, prefix: str) -> tuple[Path, Path, Path]:
    """A copy of the bundle served under ``model.watch_s``, a release of it (2.0.0) to swap in, and the config."""
    served = shutil.copytree(bundle_dir, tmp_path / "served")
    release = _relabelled(bundle_dir, tmp_path / "release", "2.0.0")
    config = write_config(tmp_path / "w", port, served, topics={"prefix": prefix}, model={"watch_s": 0.2},
                          worker={"id": "w-test", "stats_interval_s": 0.5})
    return served, release, config


def test_a_watched_bundle_is_loaded_once_copied_whole_and_a_half_copy_is_said_once(broker, bundle_dir, dataset,
                                                                                   tmp_path, worker_factory):
    """``model.watch_s``: a release copied over the served bundle is loaded between two frames. While the copy is
    incomplete (its bundle.json there, its model.bin not yet whole) the worker keeps its model and tries again at
    every tick; it logged the refusal at every tick too (five lines a second here), now once. A release copied with
    its times kept is older than the served model: it was never loaded while the watcher looked for a newer file."""
    prefix = f"w{uuid.uuid4().hex[:6]}"
    served, release, config = _watching(broker.port, bundle_dir, tmp_path, prefix)
    client = Client(broker.port, prefix)
    worker = worker_factory(config)
    _online(client, prefix)
    weights = (release / "model.bin").read_bytes()
    (served / "model.bin").write_bytes(weights[: len(weights) // 2])
    shutil.copy2(release / "bundle.json", served / "bundle.json")  # its times kept, as cp -a and rsync -a do
    refusal = "changed on disk but was not loaded"
    deadline = time.monotonic() + 60
    while refusal not in worker.output():
        assert time.monotonic() < deadline and worker.proc.poll() is None, worker.output()[-2000:]
        time.sleep(0.1)
    stats = f"{prefix}/workers/w-test/stats"
    seen = len([m for m in client.messages if m.topic == stats])
    client.wait_for(lambda m: m.topic == stats, count=seen + 4)  # 2 s at least: ten ticks
    assert worker.output().count(refusal) == 1, worker.output()[-3000:]
    (served / "model.bin").write_bytes(weights)  # the copy completes
    client.wait_for(lambda m: m.topic == f"{prefix}/workers/w-test/model" and b'"2.0.0"' in m.payload)
    client.publish_frame("cam", _good(dataset), "after")
    assert client.json_on(f"{prefix}/cam/result")[0]["model"]["version"] == "2.0.0"
    assert worker.stop() == 0


def _as_service_user() -> list[str]:
    """The command prefix under which a folder with mode 0 is as unreadable to the worker as a root-only bundle is to
    its service user: root's override of file permissions dropped (nothing when the tests do not run as root)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot run the worker without root's file access")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


class _ServiceUserWorker(WorkerProcess):
    """The worker as its service user would run it: unable to read what its user may not."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log_path = log
        self.log = log.open("wb")
        self.proc = subprocess.Popen([*_as_service_user(), sys.executable, "-m", "worker", "--config", str(config)],
                                     cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)


def test_a_bundle_the_worker_may_not_read_stops_the_start_with_exit_2_naming_it(broker, bundle_dir, tmp_path):
    """A bundle copied as root kept modes only root may read (the exporter made its folders 0700): the start ended
    with a PermissionError traceback and exit 1, which the unit restarts in a loop; now exit 2 and one line naming
    the file, the reason and the user."""
    locked = shutil.copytree(bundle_dir, tmp_path / "locked")
    config = write_config(tmp_path / "w", broker.port, locked, topics={"prefix": f"u{uuid.uuid4().hex[:6]}"})
    locked.chmod(0)
    try:
        proc = subprocess.run([*_as_service_user(), sys.executable, "-m", "worker", "--config", str(config)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {locked / 'bundle.json'}: cannot be read (Permission denied"), line
    assert "must be readable by" in line, line


def _start_fails(config: Path) -> str:
    """The worker's start on ``config``: asserted to end with exit 2 and one error line, which is returned."""
    proc = subprocess.run([sys.executable, "-m", "worker", "--config", str(config)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def test_a_manifest_without_an_output_stops_the_start_with_exit_2_naming_it(broker, bundle_dir, tmp_path):
    """A bundle.json without outputs.score ended the start with a KeyError traceback and exit 1."""
    edited = shutil.copytree(bundle_dir, tmp_path / "edited")
    manifest = json.loads((edited / "bundle.json").read_text())
    del manifest["outputs"]["score"]
    (edited / "bundle.json").write_text(json.dumps(manifest))
    line = _start_fails(write_config(tmp_path / "w", broker.port, edited, topics={"prefix": f"u{uuid.uuid4().hex[:6]}"}))
    assert line.startswith(f"error: {edited / 'bundle.json'}: invalid manifest: outputs") and "score" in line, line


def test_an_extension_folder_the_worker_cannot_write_stops_the_start_with_exit_2_naming_it(broker, bundle_dir, tmp_path):
    """learning.path's root was checked, not the bundle's folder in it: one the worker could not write (another
    user's, immutable) ended the start with a PermissionError traceback, as opening it rewrites its index."""
    config = write_config(tmp_path / "w", broker.port, bundle_dir, topics={"prefix": f"u{uuid.uuid4().hex[:6]}"})
    folder = load_config(config).learning.path / folder_name(read_manifest(bundle_dir))
    folder.mkdir(parents=True)
    (folder / "index.json").write_text(json.dumps({"revision": 0, "entries": []}))
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (file system, or no CAP_LINUX_IMMUTABLE)")
    try:
        line = _start_fails(config)
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    assert line.startswith("error: ") and f"bank extension folder {folder} cannot be written" in line, line
    assert "learning.path" in line, line


def test_a_watched_bundle_swapped_for_one_the_worker_may_not_read_is_said_once(broker, bundle_dir, dataset, tmp_path):
    """``model.watch_s`` and a release swapped in with ``mv`` (deploy/README) that the worker's user may not read:
    the watcher took the folder it could not look into for one being copied and kept the old model without a word.
    Now the refusal is said once, the old model serves meanwhile, and the release is loaded once it is readable."""
    prefix = f"u{uuid.uuid4().hex[:6]}"
    served, release, config = _watching(broker.port, bundle_dir, tmp_path, prefix)
    client = Client(broker.port, prefix)
    with killed_after(lambda n, cfg: _ServiceUserWorker(cfg, tmp_path / f"worker{n}.log")) as start:
        worker = start(config)
        _online(client, prefix)
        release.chmod(0)
        try:
            served.rename(tmp_path / "old")
            release.rename(served)
            deadline = time.monotonic() + 30
            while "changed on disk but was not loaded" not in worker.output():
                assert time.monotonic() < deadline and worker.proc.poll() is None, worker.output()[-2000:]
                time.sleep(0.1)
            stats = f"{prefix}/workers/w-test/stats"
            seen = len([m for m in client.messages if m.topic == stats])
            client.wait_for(lambda m: m.topic == stats, count=seen + 4)  # 2 s at least: ten ticks
            said = [line for line in worker.output().splitlines() if "changed on disk but was not loaded" in line]
            assert len(said) == 1 and "Permission denied" in said[0] and str(served) in said[0], said
            client.publish_frame("cam", _good(dataset), "meanwhile")
            assert client.json_on(f"{prefix}/cam/result")[0]["model"]["version"] != "2.0.0"
        finally:
            served.chmod(0o755)
        client.wait_for(lambda m: m.topic == f"{prefix}/workers/w-test/model" and b'"2.0.0"' in m.payload)
        assert worker.stop() == 0, worker.output()[-2000:]


def test_a_camera_sending_only_bad_frames_logs_one_line_per_kind_not_one_per_frame(broker, bundle_dir, dataset, tmp_path,
                                                                                   worker_factory):
    """Each refused frame was one INFO line: a misconfigured camera at 10 frames/s wrote 36,000 lines an hour, and
    journald's rate limit then dropped the worker's real errors.  Now a camera's first refusal of a kind is logged,
    later ones at most once a minute with their count; every one is still answered on the error topic.  A publisher
    that invents a camera name per frame (a fuzzer, a bridge's wildcard) still wrote a line per frame, and its
    once-per-camera warnings filled the memory of what was said, after which no real camera's was said: cameras past
    metrics.max_cameras now share one key."""
    prefix = f"r{uuid.uuid4().hex[:6]}"
    config = write_config(tmp_path / "w", broker.port, bundle_dir, topics={"prefix": prefix}, metrics={"max_cameras": 3})
    client = Client(broker.port, prefix)
    worker = worker_factory(config)
    _online(client, prefix)
    for i in range(100):
        client.publish_frame("cam", b"not an image", None, captured_at=None, wait=i == 99)  # no metadata
    for i in range(100):
        client.publish_frame("cam", b"not an image", f"bad-{i}", wait=i == 99)
    errors = client.json_on(f"{prefix}/cam/error", count=200)
    codes = {code: sum(e["code"] == code for e in errors) for code in {e["code"] for e in errors}}
    assert codes["missing_metadata"] == 100 and len(codes) == 2, codes
    other = next(code for code in codes if code != "missing_metadata")
    refused = [line for line in worker.output().splitlines() if " refused: " in line]
    assert [line.split(" refused: ")[1].split(":")[0] for line in refused] == ["missing_metadata", other], refused
    assert refused[0].endswith("(more missing_metadata refusals of cam: one line a minute)"), refused

    ahead = str(time.time() + 3 * 3600)  # a camera clock hours ahead: said once per camera
    good = good_png(dataset).read_bytes()
    for i in range(30):
        client.publish_frame(f"fz-{i}", b"not an image", f"x{i}", wait=False)
        client.publish_frame(f"fz-{i}", good, f"y{i}", captured_at=ahead, wait=i == 29)
    client.wait_for(lambda m: m.topic.startswith(f"{prefix}/fz-") and m.topic.endswith("/result"), count=30, timeout=120)
    assert len(client.wait_for(lambda m: m.topic.startswith(f"{prefix}/fz-") and m.topic.endswith("/error"), count=30)) == 30
    lines = worker.output().splitlines()
    flood = [line for line in lines if " refused: " in line and "/x" in line]
    assert 1 <= len(flood) <= 3 and flood[-1].endswith("refusals of cameras past metrics.max_cameras: one line a minute)"), flood
    assert 1 <= sum("stamps its frames" in line for line in lines) <= 3, lines[-40:]
    client.publish_frame("cam", good, "late-ahead", captured_at=ahead)  # a camera seen first keeps its own key
    assert client.json_on(f"{prefix}/cam/result")[0]["frame_id"] == "late-ahead"
    assert "camera cam stamps its frames" in worker.output()
    assert worker.stop() == 0


def test_a_threshold_override_below_every_normal_still_reads_one_half_at_the_threshold(bundle_dir, tmp_path):
    """A camera's threshold set at or below the held-out normals' lowest score made the normalisation's span 0:
    every frame it flagged read score 0.0 (a helper's probe).  The threshold still reads 0.5, higher scores more;
    an override above that lowest score normalises as before."""
    from worker.config import Config
    from worker.models import DEFAULT, Models

    base = read_manifest(bundle_dir).thresholds.image
    models = Models(Config.model_validate({
        "model": {"bundle": str(bundle_dir), "cache_dir": str(tmp_path / "ov"), "rollout_path": str(tmp_path / "r")},
        "learning": {"path": str(tmp_path / "extensions")},
        "cameras": {"strict": {"threshold": base.low - 1.0}, "mild": {"threshold": base.threshold + 1.0}}}))
    model = models.scopes()[DEFAULT]
    strict = models.image_norm(model, "strict")
    assert strict(base.low - 1.0) == pytest.approx(0.5) and 0.5 < strict(base.low) < 1.0
    mild = models.image_norm(model, "mild")
    assert (mild.low, mild.threshold) == (base.low, base.threshold + 1.0)


def test_per_camera_threshold_heatmap_policy_and_roi(broker, bundle_dir, dataset, tmp_path, worker_factory):
    # A defect whose mask lies in one half of the image: a region of interest on the other half hides it.
    for mask_path in sorted((dataset / "weave" / "ground_truth").glob("*/*_mask.png")):
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        if not mask[:, : mask.shape[1] // 2].any():
            break
    else:
        raise AssertionError("no defect confined to the right half in the generated set")
    defect_type, stem = mask_path.parent.name, mask_path.stem.replace("_mask", "")
    data = (dataset / "weave" / "test" / defect_type / f"{stem}.png").read_bytes()
    width = mask.shape[1]
    prefix = f"c{uuid.uuid4().hex[:6]}"
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix})
    cfg = json.loads(json.dumps(__import__("yaml").safe_load(config.read_text())))
    cfg["cameras"] = {
        "left": {"roi": [0, 0, width // 2, mask.shape[0]], "heatmap": "never", "threshold": 1e9},
        "quiet": {"heatmap": "anomalous", "heatmap_format": "png", "heatmap_size": 64},
        "beyond": {"roi": [width // 2, 0, width, mask.shape[0]]},  # half of it outside: was cut off and stretched
    }
    config.write_text(__import__("yaml").safe_dump(cfg))
    client = Client(broker.port, prefix)
    worker = worker_factory(config)
    _online(client, prefix)
    for camera in ("full", "left", "quiet", "beyond"):
        client.publish_frame(camera, data, f"{camera}-defect")
    client.publish_frame("quiet", _good(dataset), "quiet-good")
    full = client.json_on(f"{prefix}/full/result")[0]
    left = client.json_on(f"{prefix}/left/result")[0]
    quiet = {r["frame_id"]: r for r in client.json_on(f"{prefix}/quiet/result", count=2)}
    assert left["raw_score"] < full["raw_score"], "the ROI must hide the defect outside it"
    beyond = client.json_on(f"{prefix}/beyond/error")[0]
    assert beyond["code"] == "roi_outside_frame" and "does not fit in the" in beyond["message"], beyond
    assert left["threshold"] == 1e9 and left["verdict"] == "normal" and left["heatmap"] is None
    assert not [m for m in client.messages if m.topic == f"{prefix}/left/heatmap"]
    heatmaps = [m for m in client.messages if m.topic == f"{prefix}/quiet/heatmap"]
    flagged = [r for r in quiet.values() if r["verdict"] == "anomalous"]
    assert len(heatmaps) == len(flagged) and all(r["heatmap"] for r in flagged)
    for m in heatmaps:
        assert m.properties.ContentType == "image/png"
        assert max(cv2.imdecode(np.frombuffer(m.payload, np.uint8), 1).shape[:2]) == 64
    assert worker.stop() == 0


def test_a_metrics_port_in_use_stops_the_start_with_exit_2_naming_its_keys(broker, bundle_dir, tmp_path):
    """The worker logged an ERROR and ran on without /metrics and /healthz: the service's health check then got
    nothing, or the other process's answer, which looks fine.  Now the start stops with exit 2, as the console's."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": f"p{uuid.uuid4().hex[:6]}"},
                              metrics={"enabled": True, "host": "127.0.0.1", "port": port})
        proc = subprocess.run([sys.executable, "-m", "worker", "--config", str(config)], cwd=ROOT, capture_output=True,
                              text=True, timeout=90)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: metrics.host/metrics.port: cannot listen on 127.0.0.1:{port} (Address already in use)"), proc.stderr[-2000:]


def test_prometheus_metrics_match_what_happened(broker, bundle_dir, dataset, tmp_path, worker_factory):
    prefix = f"m{uuid.uuid4().hex[:6]}"
    port = free_port()
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix},
                          metrics={"enabled": True, "port": port})
    client = Client(broker.port, prefix)
    worker = worker_factory(config)
    _online(client, prefix)
    for i in range(5):
        client.publish_frame("cam", _good(dataset), f"m{i}")
    client.publish_frame("cam", b"not an image", "m-bad")
    client.json_on(f"{prefix}/cam/result", count=5)
    client.json_on(f"{prefix}/cam/error", count=1)  # each frame is counted before its answer is published
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("edge_inspect_frames_total", (("camera", "cam"), ("outcome", "processed")))] == 5
    assert samples[("edge_inspect_frames_total", (("camera", "cam"), ("outcome", "received")))] == 6
    assert samples[("edge_inspect_frame_errors_total", (("camera", "cam"), ("code", "not_an_image")))] == 1
    assert samples[("edge_inspect_latency_seconds_count", (("stage", "total"),))] == 5
    version = read_manifest(bundle_dir).version
    assert samples[("edge_inspect_model_info", (("name", "weave-patchcore"), ("precision", "f32"),
                                                 ("scope", "default"), ("version", version)))] == 1

    def models() -> set[tuple]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        return {(s.labels["scope"], s.labels["version"]) for family in text_string_to_metric_families(text)
                for s in family.samples if s.name == "edge_inspect_model_info"}

    control = f"{prefix}/workers/w-test/control"  # a canary, then its rollback: its sample goes with it
    canary = _relabelled(bundle_dir, tmp_path / "v2", "2.0.0")
    answer = _request(client, control, {"command": "reload", "bundle": str(canary), "camera": "cam"})
    assert answer["ok"] and "note" not in answer, answer
    assert models() == {("default", version), ("cam", "2.0.0")}
    typo = _request(client, control, {"command": "reload", "bundle": str(canary), "camera": "cma"})
    assert typo["ok"] and "camera 'cma' has sent this worker no frame" in typo["note"], typo  # a canary it would wait for
    assert _request(client, control, {"command": "rollback", "camera": "cma"})["ok"]
    assert _request(client, control, {"command": "rollback", "camera": "cam"})["ok"]
    assert models() == {("default", version)}
    assert worker.stop() == 0


def test_metrics_name_the_served_model_while_the_broker_cannot_be_reached(bundle_dir, tmp_path, worker_factory):
    """``edge_inspect_model_info`` was set only when the retained model topic was published, at a connect: a worker
    started while its broker was away (or never reaching it: a wrong host) served /metrics without any model, so
    a dashboard or an alert on the served version saw none.  It names the bundle from the start."""
    metrics_port = free_port()
    config = write_config(tmp_path, free_port(), bundle_dir, metrics={"enabled": True, "port": metrics_port},
                          mqtt={"reconnect_max_s": 1})  # a port nothing listens on: the broker is away
    worker = worker_factory(config)

    def samples() -> dict[str, list] | None:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        except OSError:
            return None  # not serving yet
        found: dict[str, list] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                found.setdefault(s.name, []).append(s)
        return found

    deadline = time.monotonic() + 120
    while (seen := samples()) is None or "edge_inspect_broker_connected" not in seen:
        assert time.monotonic() < deadline and worker.proc.poll() is None, worker.output()[-2000:]
        time.sleep(0.1)  # poll interval while the worker starts, with a deadline
    assert [s.value for s in seen["edge_inspect_broker_connected"]] == [0]
    assert [(s.labels, s.value) for s in seen.get("edge_inspect_model_info", [])] == [
        ({"scope": "default", "name": "weave-patchcore", "version": read_manifest(bundle_dir).version,
          "precision": "f32"}, 1)]


def test_metrics_gauges_follow_the_worker_through_its_stop(broker, bundle_dir, dataset, tmp_path):
    """The gauges were set by the main loop, which ends when a stop begins: for the whole stop (up to 110 s, its
    queue drained, its results delivered, the broker left) /metrics still said what the loop last saw: the broker
    connected after the link had closed, the queue as it was before it drained.  They are read at each scrape.  The
    worker runs in this process so that /metrics can still be read once its stop is over."""
    from worker.service import Worker
    from worker.supervise import StopSignals

    prefix, metrics_port = f"g{uuid.uuid4().hex[:6]}", free_port()
    worker = Worker(load_config(write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix},
                                             metrics={"enabled": True, "port": metrics_port})))
    client = Client(broker.port, prefix)
    stop, signals = threading.Event(), StopSignals()
    running = threading.Thread(target=worker.run, args=(stop, signals), daemon=True)

    def gauges() -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
                if s.name in ("edge_inspect_broker_connected", "edge_inspect_queue_depth")}

    try:
        running.start()
        _online(client, prefix)
        deadline = time.monotonic() + 30
        while gauges()["edge_inspect_broker_connected"] != 1:
            assert time.monotonic() < deadline, gauges()
            time.sleep(0.1)  # poll interval: the connection is up before the gauge may say so
        for i in range(8):
            client.publish_frame("cam", _good(dataset), f"s{i}")
        client.wait_for(lambda m: m.topic == f"{prefix}/cam/result")  # frames are in: the stop has some to finish
        signals.received = signal.SIGTERM
        running.join(120)
        assert not running.is_alive(), "the stop did not end"
        assert not worker.link.connected.is_set() and len(worker.pipeline.queue) == 0
        assert gauges() == {"edge_inspect_broker_connected": 0, "edge_inspect_queue_depth": 0}
    finally:
        worker.stats.close()
        client.close()
        for claim in worker.claims:
            claim.close()


def test_an_image_query_is_embedded_by_the_model_of_its_camera_and_says_what_other_models_hold(
        broker, bundle_dir, dataset, tmp_path, worker_factory):
    """Image queries were always embedded by the default model: a canary camera's frames since its canary (another
    embedding space) could not be found by image, and after a reload an image query over a full history answered
    ok with no hit and no word.  The image is embedded by the model serving the camera asked about, and an answer
    short of hits names the other models that scored frames matching the filters."""
    import base64

    prefix = f"q{uuid.uuid4().hex[:6]}"
    client = Client(broker.port, prefix)
    worker_factory(write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix},
                                store={"log_normal_every": 1, "flush_s": 0.1}))
    _online(client, prefix)
    control, query = f"{prefix}/workers/w-test/control", f"{prefix}/query"
    frame = _good(dataset)
    image = base64.b64encode(frame).decode()
    retrained = _relabelled(bundle_dir, tmp_path / "v2", "2.0.0")  # as a retrained bundle: its own space
    fields = read_manifest(retrained).model_dump()
    fields.pop("files")
    write_manifest(retrained, {**fields, "embedding_space": fields["embedding_space"].replace(
        read_manifest(bundle_dir).version, "2.0.0")})
    assert _request(client, control, {"command": "reload", "bundle": str(retrained), "camera": "cam2"})["ok"]
    for camera in ("cam1", "cam2"):
        client.publish_frame(camera, frame, f"{camera}-f")
    client.json_on(f"{prefix}/cam1/result")
    client.json_on(f"{prefix}/cam2/result")
    deadline = time.monotonic() + 60
    for camera in ("cam1", "cam2"):  # both written to the store: the image queries below count them, and do not wait
        while not _request(client, query, {"frame_id": f"{camera}-f", "camera": camera})["ok"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)  # polling the store, with a deadline
    by_camera = _request(client, query, {"image_b64": image, "camera": "cam2", "top_k": 3})
    assert [h["frame_id"] for h in by_camera["hits"]] == ["cam2-f"], by_camera  # the canary's space, cam2's frame
    assert "2.0.0" in by_camera["space"] and by_camera["query"]["camera"] == "cam2"
    assert "1 frame(s) matching the filters were scored by other models (weave-patchcore " in by_camera["note"]
    filtered = _request(client, query, {"image_b64": image, "filters": {"cameras": ["cam2"]}, "top_k": 3})
    assert [h["frame_id"] for h in filtered["hits"]] == ["cam2-f"] and "note" not in filtered, filtered
    default = _request(client, query, {"image_b64": image, "top_k": 3})
    assert [h["frame_id"] for h in default["hits"]] == ["cam1-f"] and "2.0.0)" in default["note"], default
    client.close()


def test_a_rollout_the_disk_refuses_is_said_and_written_once_it_can_be(bundle_dir, tmp_path, caplog):
    """A reload whose rollout.json could not be written was answered ok with no word, the log said a restart would
    serve config.yaml's bundles while it served the older file's, and the file was never written again.  Now the
    failure is kept for the answer, the log names what the file on disk still records, and it is written again."""
    from worker.config import Config
    from worker.models import DEFAULT, Models

    v2, v3 = (_relabelled(bundle_dir, tmp_path / v, v) for v in ("2.0.0", "3.0.0"))

    def start() -> Models:
        return Models(Config.model_validate({"model": {"bundle": str(bundle_dir), "cache_dir": None,
                                                       "rollout_path": str(tmp_path / "rollout")},
                                             "learning": {"path": str(tmp_path / "extensions")}}))

    models = start()
    models.load(DEFAULT, v2)
    assert models.unrecorded is None
    blocked = tmp_path / "rollout" / "rollout.json.tmp"
    blocked.mkdir()  # writing the file fails for real, as on a full disk (and as root, unlike a read-only folder)
    with caplog.at_level(logging.ERROR, logger="worker.models"):
        models.load(DEFAULT, v3)
    assert models.unrecorded is not None and "rollout.json could not be written" in models.unrecorded
    said = [r.getMessage() for r in caplog.records if "cannot record" in r.getMessage()]
    assert len(said) == 1 and f"what it still records from before: default {v2.absolute()}" in said[0], said
    models.record_again(quiet=True)  # still refused: said once only
    assert len([r for r in caplog.records if "cannot record" in r.getMessage()]) == 1
    blocked.rmdir()
    models.record_again()  # the stats tick or the clean stop, once there is space
    assert models.unrecorded is None
    assert start().default.bundle.manifest.version == "3.0.0"  # the restart serves what was rolled out last


def test_the_announcement_at_a_connect_read_before_a_reload_does_not_replace_the_reloads(broker, bundle_dir,
                                                                                          tmp_path) -> None:
    """The retained model topic is published by paho's network thread at every connect (a broker restart) and by
    the request thread after every reload, rollback or label.  A connect's announcement that read the models just
    before a reload was published after the reload's own: the retained topic (and the console, and /metrics) named
    the bundle replaced, until the next change.  Here the connect's announcement is held between its read and its
    publish while a reload is served; an announcement read before a newer one was published is dropped."""
    from worker.service import Worker
    from worker.wire import ControlRequest

    prefix = f"m{uuid.uuid4().hex[:6]}"
    v2 = _relabelled(bundle_dir, tmp_path / "v2", "2.0.0")
    worker = Worker(load_config(write_config(tmp_path / "w", broker.port, bundle_dir, topics={"prefix": prefix})))
    read, go, done = threading.Event(), threading.Event(), threading.Event()
    scopes, publish = worker.models.scopes, worker._publish_models

    def held_scopes():
        seen = scopes()
        if threading.current_thread() is not threading.main_thread() and not read.is_set():
            read.set()  # the connect's announcement has read the models: it waits here
            go.wait(60)
        return seen

    def announced() -> None:
        publish()
        if threading.current_thread() is not threading.main_thread():
            done.set()

    worker.models.scopes = held_scopes  # type: ignore[method-assign]
    worker._publish_models = announced  # type: ignore[method-assign]
    client = Client(broker.port, prefix)
    try:
        worker.link.start()
        assert read.wait(60), "the worker never connected"
        answer = worker.control(ControlRequest(command="reload", bundle=str(v2)))
        assert answer["ok"] and answer["models"]["default"]["version"] == "2.0.0", answer
        go.set()
        assert done.wait(60) and worker.link.wait_delivered(30)
        fresh = Client(broker.port, prefix)  # what a console connecting now reads
        try:
            retained = fresh.json_on(f"{prefix}/workers/w-test/model", timeout=30)[0]
        finally:
            fresh.close()
        assert retained["version"] == "2.0.0", retained
        assert {s.labels["version"] for m in worker.stats.model.collect() for s in m.samples} == {"2.0.0"}  # /metrics
    finally:
        go.set()
        worker.link.stop()
        client.close()
        for claim in worker.claims:
            claim.close()


def test_a_model_cache_shared_by_two_workers_keeps_the_bundle_each_serves(bundle_dir, tmp_path):
    """``model.cache_dir`` may be shared, but a worker's reload deleted the cache folders of every bundle it did not
    serve itself, the other worker's included, so that worker compiled again at each start.  A folder a worker
    serves is locked as in use, kept by the other's reloads, and goes once no worker serves it."""
    from bundle.extension import folder_name
    from worker.config import Config
    from worker.models import DEFAULT, Models

    cache = tmp_path / "ov"
    b, c, d = (_relabelled(bundle_dir, tmp_path / name, "1.0.0", name=name) for name in ("line-b", "line-c", "line-d"))
    names = {p: folder_name(read_manifest(p)) for p in (bundle_dir, b, c, d)}

    def worker(bundle: Path, own: str) -> Models:
        return Models(Config.model_validate({"model": {"bundle": str(bundle), "cache_dir": str(cache),
                                                       "rollout_path": str(tmp_path / own / "rollout")},
                                             "learning": {"path": str(tmp_path / own / "extensions")}}))

    first = worker(bundle_dir, "first")
    other = worker(b, "other")  # another line on the same box, its blobs beside the first's
    assert {p.name for p in cache.iterdir()} == {names[bundle_dir], names[b]}
    first.load(DEFAULT, c)
    first.load(DEFAULT, d)  # the first's own bundle goes out of its rollback: its folder is deleted
    assert {p.name for p in cache.iterdir()} == {names[b], names[c], names[d]}
    assert list((cache / names[b]).glob("*.blob"))
    other.load(DEFAULT, c)
    other.load(DEFAULT, d)  # neither serves b now: the other's reload deletes it
    assert {p.name for p in cache.iterdir()} == {names[c], names[d]}
