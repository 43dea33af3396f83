"""The box's own wall clock: an edge box without a battery-backed clock boots at 1970 until NTP steps it to now.
A real worker process whose wall clock is shifted (tests/shifted_clock.py; its monotonic clock is not), real
mosquitto, the real bundle, store and evidence files."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from conftest import ROOT, Client, good_png, wait_online, write_config
from test_learning import _until_stored
from test_worker import _query


def _until(predicate, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)  # polling interval, with a deadline
    return found


@contextlib.contextmanager
def _worker_on_shifted_clock(config: Path, clock: Path, log: Path, client: Client, prefix: str) -> Iterator[None]:
    """A worker process whose wall clock is the real one plus the seconds the ``clock`` file holds, online; stopped
    on leaving (its ``log`` then complete), and ``client`` closed."""
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("shifted_clock.py")), "--config",
                                 str(config)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "SHIFTED_CLOCK_FILE": str(clock)})
    try:
        wait_online(client, prefix)
        yield
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_a_box_booted_at_1970_serves_every_camera_and_keeps_its_history_when_ntp_sets_the_clock(
        broker, bundle_dir, dataset, tmp_path):
    """Before NTP: a camera without a clock (metadata: optional) had every frame refused bad_metadata, the worker
    range-checking the receive time it made itself; the camera-clock warning blamed the camera for the box's clock.
    At the step: the first retention pass deleted every frame received before it as decades old, labels included,
    with their evidence files; ``uptime_s`` jumped by 56 years."""
    prefix = f"k{uuid.uuid4().hex[:8]}"
    clock = tmp_path / "clock"
    clock.write_text(str(120 - time.time()))  # 1970-01-01T00:02Z
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix},
                          cameras={"opt": {"metadata": "optional"}},
                          store={"path": str(tmp_path / "qdrant"), "flush_s": 0.1, "max_age_h": 720,
                                 "retention_every_s": 0.5},
                          evidence={"path": str(tmp_path / "evidence"), "max_frames": 100, "max_age_h": 720})
    log = tmp_path / "worker.log"
    client = Client(broker.port, prefix)
    with _worker_on_shifted_clock(config, clock, log, client, prefix):
        good = good_png(dataset).read_bytes()
        for frame_id in ("req-1", "req-2"):  # the cameras' clocks are right
            client.publish_frame("req", good, frame_id)
        client.publish_frame("opt", good, "opt-1", captured_at=None)  # a camera without a clock
        results = {r["frame_id"]: r for r in client.json_on(f"{prefix}/req/result", count=2)}
        opt = client.wait_for(lambda m: m.topic in (f"{prefix}/opt/result", f"{prefix}/opt/error"))[0]
        assert opt.topic.endswith("/result"), f"refused: {opt.payload!r}"
        stamped = json.loads(opt.payload)
        assert stamped["generated"] == ["captured_at"] and stamped["captured_at"].startswith("1970-01-01")
        assert results["req-1"]["received_at"].startswith("1970-01-01")
        for frame_id, camera in (("req-1", "req"), ("req-2", "req"), ("opt-1", "opt")):  # their evidence is written
            _until_stored(client, prefix, frame_id, camera)
        label = _query(client, prefix, {"action": "set", "frame_id": "req-1", "camera": "req",
                                        "label": "confirmed_defect"}, topic="label")
        assert label["ok"], label
        evidence = sorted(p.name for p in (tmp_path / "evidence").glob("*/*.*"))
        assert len(evidence) >= 4  # three thumbnails and a label's marker

        clock.write_text("0")  # NTP steps the clock to now
        _until(lambda: "received while this box's clock was not set" in log.read_text(errors="replace"),
               "the first retention pass on the set clock")
        hits = _query(client, prefix, {"frame_id": "req-2", "camera": "req", "top_k": 10, "include_heatmaps": False})
        assert hits["ok"], hits
        assert {h["frame_id"]: h["label"] for h in hits["hits"]} == {"req-1": "confirmed_defect", "opt-1": None}
        assert all(h["thumbnail_b64"] for h in hits["hits"])
        assert sorted(p.name for p in (tmp_path / "evidence").glob("*/*.*")) == evidence
        labels = _query(client, prefix, {"action": "export", "format": "json"}, topic="label")
        assert [r["frame_id"] for r in labels["labels"]] == ["req-1"]

        client.messages.clear()
        stats = client.json_on(f"{prefix}/workers/w-test/stats", timeout=30)[0]
        assert not stats["at"].startswith("1970") and stats["uptime_s"] < 3600, stats
    said = log.read_text(errors="replace")
    assert said.count("this box's clock is not set") == 1, said
    assert "camera req stamps its frames" not in said  # the box's clock, not the camera's


def test_the_frame_age_limit_refuses_nothing_while_the_box_clock_is_not_set(broker, bundle_dir, dataset, tmp_path):
    """Every age read from a clock not set is wrong: a box booted at 2024 (no battery-backed clock, NTP not yet there)
    must score a frame whose camera stamps it an hour before the box's time, and refuse such a frame stale_frame once
    NTP has set the clock (``limits.max_frame_age_s``)."""
    prefix = f"a{uuid.uuid4().hex[:8]}"
    unset = 1_704_067_200.0  # 2024-01-01T00:00Z: a time before wire.CLOCK_FLOOR, read as a clock not set
    clock = tmp_path / "clock"
    clock.write_text(str(unset - time.time()))
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix},
                          limits={"max_frame_age_s": 60})
    client = Client(broker.port, prefix)
    with _worker_on_shifted_clock(config, clock, tmp_path / "worker.log", client, prefix):
        good = good_png(dataset).read_bytes()
        answered = (f"{prefix}/cam/result", f"{prefix}/cam/error")
        client.publish_frame("cam", good, "unset", captured_at="2023-12-31T23:00:00Z")  # an hour before the box's time
        [before] = client.wait_for(lambda m: m.topic in answered)
        assert before.topic.endswith("/result"), before.payload
        clock.write_text("0")  # NTP steps the clock to now
        _until(lambda: client.json_on(f"{prefix}/workers/w-test/stats", timeout=30)[-1]["at"][:4] != "2024",
               "stats stamped on the set clock")
        client.messages.clear()
        client.publish_frame("cam", good, "set", captured_at=str(time.time() - 3600))
        [after] = client.wait_for(lambda m: m.topic in answered)
        assert after.topic.endswith("/error") and json.loads(after.payload)["code"] == "stale_frame", after.payload
