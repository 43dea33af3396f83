"""The frame history on the real embedded engine (qdrant-edge): filters, retention while running, clear errors."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import cv2
import numpy as np
import pytest
import qdrant_edge as edge

import worker.config
from worker.config import SpoolConfig, StoreConfig
from worker.decode import decode, probe
from worker.evidence import EvidenceStore
from worker.labels import LabelService
from worker.query import QueryService
from worker.supervise import Liveness
from worker.recorder import Record, Recorder, Spool
from worker.store import Filters, StoreDamaged, StoreError, StoreMismatch, VectorStore, point_id

DIM = 16
NOW = 1_800_000_000.0


def _frames(n: int, seed: int = 0) -> list[tuple[str, np.ndarray, dict]]:
    """n frames on cameras a/b/c, one per hour going back from NOW, every 4th anomalous."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        camera = "abc"[i % 3]
        vec = rng.normal(size=DIM).astype(np.float32)
        anomalous = i % 4 == 0
        payload = {"frame_id": f"f{i}", "camera": camera, "captured_ts": NOW - 3600 * i, "anomalous": anomalous,
                   "verdict": "anomalous" if anomalous else "normal", "score": float(anomalous)}
        out.append((point_id(camera, f"f{i}"), vec / np.linalg.norm(vec), payload))
    return out


def _store(tmp_path: Path, **cfg) -> VectorStore:
    return VectorStore(StoreConfig(path=tmp_path / "store", **cfg), DIM)


def _exact(frames, query: np.ndarray, keep) -> list[str]:
    kept = [(float(v @ query), p["frame_id"]) for _, v, p in frames if keep(p)]
    return [fid for _, fid in sorted(kept, reverse=True)]


def test_filters_match_exact_search_and_persist(tmp_path):
    frames = _frames(60)
    store = _store(tmp_path)
    store.upsert(frames)
    query = frames[7][1]
    cases = {
        Filters(): lambda p: True,
        Filters(cameras=("b",)): lambda p: p["camera"] == "b",
        Filters(cameras=("a", "c")): lambda p: p["camera"] in ("a", "c"),
        Filters(anomalous_only=True): lambda p: p["anomalous"],
        Filters(since=NOW - 24 * 3600): lambda p: p["captured_ts"] >= NOW - 24 * 3600,
        Filters(since=NOW - 40 * 3600, until=NOW - 10 * 3600): lambda p: NOW - 40 * 3600 <= p["captured_ts"] <= NOW - 10 * 3600,
        Filters(cameras=("c",), anomalous_only=True, since=NOW - 30 * 3600): (
            lambda p: p["camera"] == "c" and p["anomalous"] and p["captured_ts"] >= NOW - 30 * 3600),
    }
    for flt, keep in cases.items():
        hits = store.search(query, 5, flt)
        assert [h.payload["frame_id"] for h in hits] == _exact(frames, query, keep)[:5], flt
        assert all(keep(h.payload) for h in hits)
    # A query by a stored frame leaves that frame out.
    hits = store.search(query, 5, Filters(), exclude=frames[7][0])
    assert "f7" not in [h.payload["frame_id"] for h in hits]
    assert hits[0].similarity <= 1.0
    store.close()

    reopened = _store(tmp_path)
    assert reopened.count() == 60
    pid, vector, payload = reopened.find("f7")
    assert pid == frames[7][0] and payload["camera"] == "b"
    np.testing.assert_allclose(vector, frames[7][1], atol=1e-6)
    assert reopened.find("f7", camera="a") is None
    assert reopened.find("nope") is None
    reopened.close()


def _evidence(tmp_path: Path, frames, **kw) -> EvidenceStore:
    evidence = EvidenceStore(tmp_path / "evidence", max_frames=1000, **kw)
    for pid, _, p in frames:
        p["evidence"] = evidence.save(pid, {"thumbnail": ("jpg", b"x")})
    return evidence


@pytest.mark.parametrize("engine", ["embedded", "qdrant-client"])
def test_a_frame_id_many_cameras_use_is_found_as_the_newest_frame(tmp_path, engine):
    """A query by frame id without a camera answers the newest frame of that id: only 16 points of the id were read
    and the newest among them taken, so with more cameras counting 1, 2, 3 ... an older frame came back."""
    from qdrant_client import QdrantClient

    client = QdrantClient(location=":memory:") if engine == "qdrant-client" else None
    store = VectorStore(StoreConfig(path=tmp_path / "store"), DIM, client=client)
    rng = np.random.default_rng(0)
    cameras = sorted((f"cam{i}" for i in range(40)), key=lambda c: point_id(c, "1"))  # the newest: the last written
    store.upsert([(point_id(c, "1"), rng.normal(size=DIM).astype(np.float32),  # and the last by point id
                   {"frame_id": "1", "camera": c, "captured_ts": NOW + n, "verdict": "normal"})
                  for n, c in enumerate(cameras)])
    assert store.find("1")[2]["camera"] == cameras[-1]
    store.close()


def test_retention_past_the_default_bound_says_why_and_how_to_keep_the_frames(tmp_path, monkeypatch, caplog):
    """A box upgraded from a version that kept every frame, its config.yaml without store.max_points: the first
    retention pass deleted the history past the embedded store's default bound with only 'N frames deleted'.  It now
    says once why (the default of an unset key) and how to keep them; a bound config.yaml sets is not explained."""
    monkeypatch.setattr(worker.config, "EMBEDDED_MAX_POINTS", 8)  # the default's bound, small enough to pass
    frames = _frames(20)
    for cfg, said in ((StoreConfig(path=tmp_path / "default"), True),
                      (StoreConfig(path=tmp_path / "set", max_points=8), False)):
        assert cfg.max_points == 8
        store = VectorStore(cfg, DIM)
        store.upsert(frames[:12])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="worker.store"):
            assert len(store.retain(now=NOW, force=True)) == 4
            store.upsert(frames[12:])
            assert len(store.retain(now=NOW, force=True)) == 8
        warned = [r.getMessage() for r in caplog.records if "max_points" in r.getMessage()]
        assert warned == (["retention: the history holds 12 frames, past store.max_points, which config.yaml leaves "
                           "unset: the embedded store keeps 8 by default (versions before 2026-12-04 kept every "
                           "frame); the oldest 4 go now, unlabelled normal frames first. Set store.max_points to keep "
                           "more (null: no bound; the worker's memory grows with each frame)"] if said else []), warned
        assert store.count() == 8
        store.close()


def test_retention_by_count_deletes_oldest_normal_vectors_first_and_their_evidence(tmp_path):
    frames = _frames(20)
    store = _store(tmp_path, max_points=8)
    evidence = _evidence(tmp_path, frames)
    store.upsert(frames)
    deleted = store.retain(evidence, now=NOW, force=True)
    assert len(deleted) == 12
    assert store.count() == 8
    kept = {h.payload["frame_id"] for h in store.search(frames[0][1], 20, Filters())}
    # by value: all 5 anomalous frames (every 4th) stay; the 3 newest normal ones fill the rest
    assert kept == {f"f{i}" for i in (0, 4, 8, 12, 16, 1, 2, 3)}
    assert len(evidence) == 8
    assert all(evidence.read(p["evidence"]["thumbnail"]) is None for _, _, p in frames if p["frame_id"] not in kept)
    assert store.retain(evidence, now=NOW) == []  # rate-limited: not due again yet
    store.close()


def test_retention_by_age_for_vectors_and_evidence(tmp_path):
    frames = _frames(20)
    store = _store(tmp_path, max_age_h=5.5)
    evidence = _evidence(tmp_path, frames[:3], max_age_h=2)
    store.upsert(frames)
    old = time.time() - 3 * 3600
    for path in (tmp_path / "evidence").glob("*/*"):
        if path.name.startswith(frames[0][0]):
            os.utime(path, (old, old))
    deleted = store.retain(evidence, now=NOW, force=True)
    assert sorted(deleted) == sorted(pid for pid, _, p in frames if p["captured_ts"] < NOW - 5.5 * 3600)
    assert {h.payload["frame_id"] for h in store.search(frames[0][1], 20, Filters())} == {f"f{i}" for i in range(6)}
    # Evidence age counts from when it was written: frame 0's files were made 3 h old, the others are new.
    assert evidence.read(frames[0][2]["evidence"]["thumbnail"]) is None
    assert evidence.read(frames[1][2]["evidence"]["thumbnail"]) == b"x"
    assert len(evidence) == 2
    store.close()


YEAR = 365 * 24 * 3600.0


def _arrived(fid: str, captured: float, received: float | None, verdict: str = "normal", label: str | None = None):
    """A frame of camera ``fid[:-1]`` captured and received at these times (None: written before ``received_ts``)."""
    vec = np.random.default_rng(len(fid) * 7 + int(fid[-1])).normal(size=DIM).astype(np.float32)
    payload = {"frame_id": fid, "camera": fid[:-1], "captured_ts": captured, "verdict": verdict,
               "anomalous": verdict == "anomalous", **({"received_ts": received} if received is not None else {}),
               **({"label": label} if label else {})}
    return point_id(fid[:-1], fid), vec / np.linalg.norm(vec), payload


# by age (store.max_age_h 5): a camera 25 years behind but received now stays; one a year ahead, received 9-10 h
# ago, goes; of the earlier version's points, the one captured 8 h ago goes
BY_AGE = [_arrived("slow1", NOW - 25 * YEAR, NOW - 60), _arrived("slow2", NOW - 25 * YEAR, NOW - 30, "anomalous"),
          _arrived("fast1", NOW + YEAR, NOW - 10 * 3600), _arrived("fast2", NOW + YEAR, NOW - 9 * 3600, "anomalous"),
          _arrived("legacy1", NOW - 8 * 3600, None), _arrived("legacy2", NOW - 1 * 3600, None)]
# by count (store.max_points 4): unlabelled normal frames first (cam3, cam6), then the oldest unlabelled defects (the
# earlier version's old8, then cam2), labelled frames last
BY_COUNT = [_arrived("cam1", NOW, NOW - 7000, "anomalous", "confirmed_defect"),
            _arrived("cam2", NOW, NOW - 6000, "anomalous"), _arrived("cam3", NOW, NOW - 5000, "normal"),
            _arrived("cam4", NOW, NOW - 4000, "anomalous"), _arrived("cam5", NOW, NOW - 3000, "normal", "false_alarm"),
            _arrived("cam6", NOW, NOW - 2000, "normal"), _arrived("slo7", NOW - 25 * YEAR, NOW - 1000, "anomalous"),
            _arrived("old8", NOW - 9 * YEAR, None, "anomalous")]


def _kept(store: VectorStore, frames) -> set[str]:
    return {h.payload["frame_id"] for h in store.search(frames[0][1], 20, Filters())}


def test_retention_goes_by_when_frames_arrived_not_by_the_cameras_clocks(tmp_path):
    """A camera whose clock was reset to 2000 lost every frame, defects and labels too, at the next retention pass
    (``max_age_h``); one a year ahead kept its frames past every other camera's (``max_points``).  Retention goes by
    when the worker received a frame; points written before it recorded that (an earlier version's collection,
    without its index) age by their capture time and go first.  Among what ``max_points`` takes, unlabelled
    defects go before labelled frames."""
    store = _store(tmp_path, max_age_h=5)
    store.upsert(BY_AGE)
    store.close()
    engine = _store(tmp_path).engine  # an earlier version's collection: no index of received_ts
    engine.shard.update(edge.UpdateOperation.delete_field_index("received_ts"))
    engine.close()
    store = _store(tmp_path, max_age_h=5)
    assert len(store.retain(now=NOW, force=True)) == 3
    assert _kept(store, BY_AGE) == {"slow1", "slow2", "legacy2"}
    store.close()

    store = _store(tmp_path / "count", max_points=4)
    store.upsert(BY_COUNT)
    store.retain(now=NOW, force=True)
    assert _kept(store, BY_COUNT) == {"cam1", "cam4", "cam5", "slo7"}
    store.close()


def test_a_server_store_retains_by_arrival_too():
    """The server engine's retention, in qdrant-client's local mode (no Qdrant server can run here)."""
    from qdrant_client import QdrantClient

    for cfg, frames, kept in ((StoreConfig(path=None, max_age_h=5), BY_AGE, {"slow1", "slow2", "legacy2"}),
                              (StoreConfig(path=None, max_points=4), BY_COUNT, {"cam1", "cam4", "cam5", "slo7"})):
        store = VectorStore(cfg, DIM, client=QdrantClient(location=":memory:"))
        store.upsert(frames)
        store.retain(now=NOW, force=True)
        assert _kept(store, frames) == kept
        store.close()


BOOT = 120.0  # a box without a battery-backed clock reads 1970-01-01T00:02Z two minutes after power-on


def _engines(tmp_path: Path) -> list[Callable[..., VectorStore]]:
    """Both engines: embedded, and the server's in qdrant-client's local mode (no Qdrant server can run here)."""
    from qdrant_client import QdrantClient

    return [lambda **cfg: _store(tmp_path, **cfg),
            lambda **cfg: VectorStore(StoreConfig(path=None, **cfg), DIM, client=QdrantClient(location=":memory:"))]


def test_the_latest_frames_go_by_when_they_arrived_with_the_filters_on_both_engines(tmp_path):
    """What a console that starts lists: the frames last received, whatever the cameras' clocks say (a camera set
    to 2000 is not put last, one a year ahead not first). The points an earlier version wrote, without an arrival
    time, were left out (an ordering skips points without its key): they were received before every other, and
    come after them, the last captured first."""
    for make in _engines(tmp_path):
        store = make()
        store.upsert(BY_AGE + BY_COUNT)
        arrived = sorted((p for _, _, p in BY_AGE + BY_COUNT if "received_ts" in p), key=lambda p: -p["received_ts"])
        legacy = ["legacy2", "legacy1", "old8"]  # captured 1 h, 8 h and 9 years ago
        assert [p["frame_id"] for p in store.latest(20, Filters())] == [p["frame_id"] for p in arrived] + legacy
        defects = [p["frame_id"] for p in arrived if p["verdict"] == "anomalous"]
        assert [p["frame_id"] for p in store.latest(3, Filters(anomalous_only=True))] == defects[:3]
        assert [p["frame_id"] for p in store.latest(20, Filters(anomalous_only=True))] == [*defects, "old8"]
        assert [p["frame_id"] for p in store.latest(20, Filters(cameras=("slo", "fast")))] == ["slo7", "fast2", "fast1"]
        store.close()


def _stamp(evidence_root: Path, pid: str, at: float) -> None:
    """A frame's evidence files as a kernel whose clock read ``at`` wrote them."""
    for path in evidence_root.glob(f"*/{pid}.*"):
        os.utime(path, (at, at))


def test_frames_received_before_the_box_clock_was_set_are_stamped_anew_not_deleted(tmp_path):
    """An edge box without a battery-backed clock boots at 1970 until NTP steps it: the first retention pass after
    the step deleted every frame received meanwhile (``max_age_h``: decades old), operator labels included, and
    their evidence files.  While the clock is not set nothing is aged, and ``max_points`` takes those frames after
    every frame with a real stamp (they arrived after them); once it is set, they and their files are stamped
    anew and age from then, while frames that are really old still go."""
    for n, make in enumerate(_engines(tmp_path)):
        now = time.time()
        boot = [_arrived("boot1", now, BOOT), _arrived("boot2", now, BOOT + 5, "anomalous", "confirmed_defect")]
        past = [_arrived("past1", now - 48 * 3600, now - 48 * 3600)]  # an earlier boot's, past max_age_h
        earlier = [_arrived("prev1", now, now - 3000), _arrived("prev2", now, now - 2000)]  # an earlier boot's
        root = tmp_path / f"evidence{n}"
        evidence = EvidenceStore(root, max_frames=100, max_age_h=24)
        for pid, _, p in boot + past:
            p["evidence"] = evidence.save(pid, {"thumbnail": ("jpg", b"x")})
            _stamp(root, pid, p["received_ts"])
        evidence = EvidenceStore(root, max_frames=100, max_age_h=24)  # a restart reads the files' times

        counted = make(max_points=2)
        counted.upsert(earlier + boot)
        counted.retain(now=BOOT + 60, force=True)  # the clock still unset: only max_points applies
        assert _kept(counted, boot) == {"boot1", "boot2"}, "max_points took the newest frames first"
        counted.close()

        store = make(max_age_h=24)
        store.upsert(boot + past)
        assert store.retain(now=BOOT + 60, force=True) == [] and evidence.retain(now=BOOT + 60) == 0
        set_at = time.time()
        deleted = store.retain(evidence, force=True)  # NTP has set the clock
        assert deleted == [past[0][0]], "frames received while the clock was unset were deleted as decades old"
        assert _kept(store, boot) == {"boot1", "boot2"}
        assert store.labelled()[0]["frame_id"] == "boot2"
        for pid, _, p in boot:
            assert set_at - 60 <= store.find(p["frame_id"], p["camera"])[2]["received_ts"] <= time.time()
            assert evidence.read(p["evidence"]["thumbnail"]) == b"x"
            assert all(f.stat().st_mtime >= set_at - 60 for f in root.glob(f"*/{pid}.*"))
        assert evidence.read(past[0][2]["evidence"]["thumbnail"]) is None
        assert store.retain(evidence, now=time.time() + 23 * 3600, force=True) == []  # they age from the step
        store.close()


def test_after_the_clock_steps_back_the_frames_received_since_are_not_taken_first(tmp_path):
    """A box whose clock ran a year ahead and then stepped back: the frames received before the step sorted as the
    newest, so ``max_points`` deleted the frames received since (the newest) first, and ``max_age_h`` kept the
    earlier ones a year too long.  Retention takes such stamps as made at the step (before every frame since)."""
    for n, make in enumerate(_engines(tmp_path)):
        store = make(max_points=4)
        root = tmp_path / f"evidence{n}"
        evidence = EvidenceStore(root, max_frames=100, max_age_h=1)
        ahead = [_arrived(f"ahead{i}", time.time(), time.time() + YEAR + i) for i in range(3)]
        # received after the store opened and before the check below: stamps of the clock as it reads (one a few ms
        # ahead was still in the future at the check on a fast machine)
        since = [_arrived(f"now{i}", time.time(), time.time()) for i in range(3)]
        for pid, _, p in ahead:
            evidence.save(pid, {"thumbnail": ("jpg", b"x")})
            _stamp(root, pid, p["received_ts"])
        evidence = EvidenceStore(root, max_frames=100, max_age_h=1)
        store.upsert(ahead + since)
        store.retain(evidence, force=True)
        kept = _kept(store, ahead + since)
        assert {"now0", "now1", "now2"} <= kept and len(kept) == 4, kept
        stamps = [store.find(p["frame_id"], p["camera"])[2]["received_ts"] for _, _, p in ahead + since
                  if p["frame_id"] in kept]
        assert max(stamps) <= time.time(), "a stamp made while the clock ran ahead is still in the future"
        assert all(f.stat().st_mtime <= time.time() for f in root.glob("*/*.*")), "evidence a year in the future"
        store.close()


def test_a_history_at_its_bound_keeps_its_segments_and_memory_bounded(tmp_path):
    """Past ``store.max_points`` every retention pass deletes and vacuums; qdrant-edge-py 0.9 kept each segment a
    vacuum replaced, mapped and on disk, until the shard was closed: a worker at its bound grew in memory and disk
    without end (docs/store.md).  The shard is loaded again when replaced segments pile up."""
    from worker.store import STALE_SEGMENTS

    store = _store(tmp_path, max_points=300)
    segments = tmp_path / "store" / "frames" / "segments"
    rng = np.random.default_rng(0)
    most = 0
    for batch in range(100):
        items = []
        for i in range(40):
            n = batch * 40 + i
            vec = rng.normal(size=DIM).astype(np.float32)
            items.append((point_id("c", f"f{n}"), vec / np.linalg.norm(vec),
                          {"frame_id": f"f{n}", "camera": "c", "captured_ts": NOW + n, "received_ts": NOW + n,
                           "verdict": "normal", "anomalous": False}))
        store.upsert(items)
        store.retain(now=NOW + n, force=True)  # the clock reads the newest frame's time
        most = max(most, sum(1 for _ in segments.iterdir()))
    assert most <= 1 + STALE_SEGMENTS, most
    assert store.count() == 300 and store.find("f3999", "c") is not None and store.find("f3699", "c") is None
    store.close()


def test_retention_runs_while_the_recorder_writes(tmp_path):
    store = _store(tmp_path, max_points=5, retention_every_s=0.05, flush_s=0.05, batch_size=4)
    evidence = EvidenceStore(tmp_path / "evidence", max_frames=1000)
    recorder = Recorder(lambda: store, evidence, store.cfg, SpoolConfig(path=tmp_path / "spool"), thumbnail_size=16,
                        liveness=Liveness(0))
    recorder.start()
    try:
        for pid, vec, payload in _frames(30):
            recorder.submit(Record(pid, vec, payload, np.zeros((32, 32, 3), np.uint8)))
        assert recorder.flush(20)
        deadline = time.monotonic() + 10
        while (store.count() > 5 or len(evidence) > 5) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.count() == 5
        assert len(evidence) == 5
    finally:
        recorder.stop()  # closes the store it opened


def _png(color: int) -> bytes:
    return cv2.imencode(".png", np.full((24, 24, 3), color, np.uint8))[1].tobytes()


def _embed(data: bytes, camera: str | None = None) -> tuple[np.ndarray, None]:
    """Stands in for the model: real decoding and its errors, a vector from the image's mean colour (no space:
    compared with any)."""
    probe(data, 1 << 20, 1 << 20)
    level = float(decode(data).mean()) / 255
    vec = np.full(DIM, 0.1, np.float32)
    vec[0] = level
    return vec / np.linalg.norm(vec), None


def _ask(service: QueryService, **request) -> dict:
    return service.answer_bytes(json.dumps(request).encode())


def test_query_errors_are_answered_clearly(tmp_path):
    store = _store(tmp_path)
    evidence = EvidenceStore(tmp_path / "evidence", max_frames=100)
    service = QueryService(lambda: nullcontext(store), evidence, _embed, max_top_k=10)
    empty = _ask(service, frame_id="f1")
    assert empty["ok"] is False and empty["error"]["code"] == "empty_store"

    frames = _frames(12)
    for pid, _, p in frames:
        p["evidence"] = evidence.save(pid, {"thumbnail": ("jpg", b"thumb")})
    store.upsert(frames)
    unknown = _ask(service, frame_id="nope", camera="a")
    assert unknown["error"]["code"] == "unknown_frame" and "nope" in unknown["error"]["message"]
    for bad in (b"not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 20):
        answer = _ask(service, image_b64=base64.b64encode(bad).decode())
        assert answer["ok"] is False and answer["error"]["code"] == "bad_image", answer
    assert _ask(service, image_b64="%%%")["error"]["code"] == "bad_image"
    assert _ask(service, frame_id="f1", top_k=11)["error"]["code"] == "bad_request"

    good = _ask(service, image_b64=base64.b64encode(_png(128)).decode(), filters={"cameras": ["a"]})
    assert good["ok"] and good["hits"] and all(h["camera"] == "a" for h in good["hits"])
    assert base64.b64decode(good["hits"][0]["thumbnail_b64"]) == b"thumb"
    by_frame = _ask(service, frame_id="f4", filters={"anomalous_only": True})
    assert by_frame["ok"] and all(h["verdict"] == "anomalous" and h["frame_id"] != "f4" for h in by_frame["hits"])
    store.close()


def test_a_date_alone_as_until_means_the_whole_day(tmp_path):
    """``until: "2027-01-15"`` matched only the frames captured at that day's midnight: a date alone now means the
    whole day (UTC), a week alone the whole week; a time given with it still bounds exactly, and since/until of one
    day is not refused."""
    store = _store(tmp_path)
    evidence = EvidenceStore(tmp_path / "evidence", max_frames=100)
    service = QueryService(lambda: nullcontext(store), evidence, _embed, max_top_k=30)
    store.upsert(_frames(24))  # NOW = 2027-01-15T08:00Z, then one an hour back: f0..f8 on the 15th, f9.. the 14th
    image = base64.b64encode(_png(128)).decode()

    def day(**filters) -> set[str]:
        answer = _ask(service, image_b64=image, top_k=30, filters=filters)
        assert answer["ok"], answer
        return {h["frame_id"] for h in answer["hits"]}

    assert day(since="2027-01-15", until="2027-01-15") == {f"f{i}" for i in range(9)}
    assert day(until="2027-01-14") == {f"f{i}" for i in range(9, 24)}
    assert day(since="2027-01-15", until="2027-01-15T00:00:00Z") == {"f8"}
    assert day(until="2027-W02") == {f"f{i}" for i in range(24)}  # a week alone: the whole week (it meant its Monday)
    assert day(until="2027-W02-4") == {f"f{i}" for i in range(9, 24)}  # Thursday the 14th
    store.close()


def test_the_embedded_store_is_not_opened_below_its_free_space_floor(tmp_path):
    """qdrant-edge maps its files into memory, and a page it writes on a full disk kills the process (SIGBUS):
    below ``store.min_free_mb`` the store refuses to open, saying why, and writes nothing; 0 leaves the engine's own
    need (``ENGINE_MIN_FREE``, which the test's disk has)."""
    store = _store(tmp_path)
    store.upsert(_frames(3))
    store.close()
    files = {f: f.stat().st_size for f in (tmp_path / "store").rglob("*") if f.is_file()}
    with pytest.raises(StoreError, match=r"MB free on the disk of .*store.min_free_mb"):
        _store(tmp_path, min_free_mb=2**40)  # more than any disk has
    assert {f: f.stat().st_size for f in (tmp_path / "store").rglob("*") if f.is_file()} == files
    store = _store(tmp_path, min_free_mb=0)
    assert store.count() == 3
    store.close()


def test_store_errors_are_clear(tmp_path):
    store = _store(tmp_path)
    store.upsert(_frames(3))
    store.close()
    with pytest.raises(StoreError, match="another size"):
        VectorStore(StoreConfig(path=tmp_path / "store"), DIM + 1)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StoreError, match=f"127.0.0.1:{port}.*refused"):
        VectorStore(StoreConfig(url=f"http://127.0.0.1:{port}"), DIM)


# Embeddings of two sizes (a bundle swap) ------------------------------------------------------------------

def _records(n: int, dim: int, start: int = 0) -> list[Record]:
    """n records on camera a whose embeddings have ``dim`` dimensions (a bundle of that embedding size)."""
    rng = np.random.default_rng(start)
    return [Record(point_id("a", f"f{i}"), rng.normal(size=dim).astype(np.float32),
                   {"frame_id": f"f{i}", "camera": "a", "captured_ts": NOW + i, "anomalous": False, "verdict": "normal"},
                   np.zeros((32, 32, 3), np.uint8)) for i in range(start, start + n)]


def _unreachable() -> VectorStore:
    raise StoreError("the vector store is not reachable")


def _wait_for(check: Callable[[], bool], timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)  # poll interval of an observable state, with a deadline
    return check()


def test_a_spooled_batch_of_another_vector_size_is_set_aside_and_replay_goes_on(tmp_path):
    """A bundle of another embedding size served during an outage spooled batches the store can never take; the
    first of them stopped every later batch (new frames too) until the spool overflowed.  It is set aside now."""
    cfg = StoreConfig(path=tmp_path / "store", flush_s=0.05, batch_size=4)
    spool = SpoolConfig(path=tmp_path / "spool", retry_s=0.05)
    evidence = EvidenceStore(tmp_path / "evidence", max_frames=1000)
    store = VectorStore(cfg, DIM)  # the history of the bundle of DIM-d embeddings
    store.upsert([(r.key, r.vector, r.payload) for r in _records(2, DIM)])
    store.close()

    other = Recorder(_unreachable, evidence, cfg, spool, 16, Liveness(0))  # the other bundle, during an outage
    other.start()
    for rec in _records(3, DIM * 2, start=10):
        other.submit(rec)
    assert other.flush(20)
    other.stop()
    spooled = sorted(p.name for p in (tmp_path / "spool").glob("*.json"))
    assert spooled and other.spool.points == 3

    back = Recorder(lambda: VectorStore(cfg, DIM), evidence, cfg, spool, 16, Liveness(0))
    back.start()
    try:
        for rec in _records(5, DIM, start=20):
            back.submit(rec)
        assert back.flush(20)
        assert _wait_for(lambda: back.written == 5 and len(back.spool) == 0), (back.written, len(back.spool))
        assert back.spool.refused_batches == len(spooled) and back.spool.refused_points == 3
        assert sorted(p.name for p in (tmp_path / "spool" / "refused").iterdir()) == spooled
        with back.use_store() as opened:
            assert opened.count() == 7 and opened.find("f24", "a") is not None and opened.find("f10", "a") is None
    finally:
        back.stop()
    again = Recorder(lambda: VectorStore(cfg, DIM), evidence, cfg, spool, 16, Liveness(0))
    assert len(again.spool) == 0  # set aside for good: not read again at the next start
    again.spool.push([(r.key, r.vector, r.payload) for r in _records(1, DIM, start=30)])
    assert [int(p.stem) for p in (tmp_path / "spool").glob("*.json")] == [len(spooled)]  # no set-aside name reused


def test_a_store_of_another_embedding_size_is_said_once_answered_and_not_spooled(tmp_path, caplog):
    """Restarting on a bundle of another embedding size than the collection's was taken for an outage: the same
    warning every spool.retry_s, every frame spooled for a store that can never take it, queries told the store was
    "not reachable".  Now inspection goes on, the cause is said once and answered, and nothing is spooled."""
    cfg = StoreConfig(path=tmp_path / "store", flush_s=0.05, batch_size=4)
    spool = SpoolConfig(path=tmp_path / "spool", retry_s=0.05)
    store = VectorStore(cfg, DIM)
    store.upsert([(r.key, r.vector, r.payload) for r in _records(2, DIM)])
    store.close()
    opened: list[int] = []

    def open_store() -> VectorStore:
        opened.append(1)
        return VectorStore(cfg, DIM * 2)

    evidence = EvidenceStore(tmp_path / "evidence", max_frames=1000)
    recorder = Recorder(open_store, evidence, cfg, spool, 16, Liveness(0))
    recorder.start()
    try:
        assert recorder.store_error is not None and f"{DIM}-d" in recorder.store_error
        for rec in _records(6, DIM * 2, start=10):
            recorder.submit(rec)
        assert recorder.flush(20)
        assert recorder.unrecorded == 6 and len(recorder.spool) == 0 and len(evidence) == 0
        assert _wait_for(lambda: len(opened) >= 3)  # tried again...
        said = [r for r in caplog.records if r.name == "worker.recorder" and r.levelname in ("WARNING", "ERROR")]
        assert len(said) == 1 and "store.collection" in said[0].getMessage()  # ...but said once
        answer = _ask(QueryService(recorder.use_store, evidence, _embed, max_top_k=10), frame_id="f10", camera="a")
        message = answer["error"]["message"]
        assert answer["error"]["code"] == "store_unavailable" and "not reachable" not in message
        assert all(s in message for s in ("'frames'", f"{DIM}-d", f"{DIM * 2}-d", "store.collection")), message

        (tmp_path / "store" / "frames").rename(tmp_path / "store" / "frames-old")  # the way out without a restart
        assert _wait_for(lambda: recorder.store is not None)
        assert recorder.store_error is None
        for rec in _records(3, DIM * 2, start=20):
            recorder.submit(rec)
        assert recorder.flush(20)
        assert _wait_for(lambda: recorder.written == 3)
    finally:
        recorder.stop()


def test_damaged_embedded_files_are_set_aside_or_said_as_damage(tmp_path, caplog):
    """A store whose files a failing card or a power cut left damaged was answered "not reachable" for good, with a
    warning at every retry.  A damaged config or write-ahead log is set aside and the points kept; a damaged segment
    is said once as damage, answered as such, spooled, and a new history starts once the folder is moved aside."""
    folder = tmp_path / "store" / "frames"
    store = _store(tmp_path)
    store.upsert(_frames(3))
    with pytest.raises(StoreError) as held:  # another process holding the files is no damage: nothing set aside
        _store(tmp_path)
    assert not isinstance(held.value, StoreDamaged) and sorted(p.name for p in folder.iterdir()) == [
        "edge_config.json", "segments", "wal"], held.value
    store.close()
    (folder / "edge_config.json").write_text("")  # emptied: the worker holds the whole config itself
    store = _store(tmp_path)
    assert store.count() == 3 and (folder / "edge_config.json.damaged").read_text() == ""
    store.close()
    wal = sorted(p for p in (folder / "wal").iterdir() if p.name.startswith("open"))
    assert wal, "the engine's file layout changed: pick another write-ahead log file a power cut can leave empty"
    wal[0].write_bytes(b"")
    store = _store(tmp_path)
    assert store.count() == 3 and (folder / "wal.damaged").is_dir()
    store.close()

    status = sorted(folder.rglob("vector_storage/deleted/status.dat"))
    assert status, "the engine's file layout changed: pick another segment file a power cut can leave empty"
    status[0].write_bytes(b"")  # the engine panics loading it
    cfg = StoreConfig(path=tmp_path / "store", flush_s=0.05, batch_size=4)
    spool = SpoolConfig(path=tmp_path / "spool", retry_s=0.05)
    evidence = EvidenceStore(tmp_path / "evidence", max_frames=1000)
    opened: list[int] = []

    def open_store() -> VectorStore:
        opened.append(1)
        return VectorStore(cfg, DIM)

    recorder = Recorder(open_store, evidence, cfg, spool, 16, Liveness(0))
    recorder.start()
    try:
        assert recorder.store is None and recorder.store_damaged is not None
        for rec in _records(4, DIM, start=10):
            recorder.submit(rec)
        assert recorder.flush(20) and recorder.spool.points == 4
        assert _wait_for(lambda: len(opened) >= 4)  # tried again, said once
        said = [r for r in caplog.records if r.name == "worker.recorder" and r.levelname in ("WARNING", "ERROR")]
        assert len(said) == 1 and said[0].levelname == "ERROR" and "damaged" in said[0].getMessage(), said
        answer = _ask(QueryService(recorder.use_store, evidence, _embed, max_top_k=10), frame_id="f10", camera="a")
        message = answer["error"]["message"]
        assert answer["error"]["code"] == "store_unavailable" and "damaged" in message and str(folder) in message
        assert "Move the folder aside" in message and "not reachable" not in message

        folder.rename(folder.with_name("frames-damaged"))  # what the answer says to do, without a restart
        assert _wait_for(lambda: recorder.written == 4), recorder.written
        assert recorder.store_damaged is None and len(recorder.spool) == 0
    finally:
        recorder.stop()


@pytest.mark.parametrize("part", ["vector_storage/vectors/chunk_0.mmap", "payload_storage/page_0.dat"])
def test_a_segment_file_a_power_cut_emptied_is_said_as_damage_at_the_open(tmp_path, part):
    """A segment's vectors or payloads emptied (a power cut soon after they were made) loaded without a word: every
    write then failed, was spooled and said as a failed write at every retry, and every query answered the engine's
    error, never that the files are damaged and what to do about them.  One point read at the open says so."""
    store = _store(tmp_path)
    store.upsert(_frames(3))
    store.close()
    emptied = sorted((tmp_path / "store" / "frames").rglob(part))
    assert emptied, "the engine's file layout changed: pick another segment file a power cut can leave empty"
    emptied[0].write_bytes(b"")
    with pytest.raises(StoreDamaged, match="files are damaged.*Move the folder aside"):
        _store(tmp_path)


def test_a_history_a_newer_engine_wrote_is_not_said_as_damage(tmp_path):
    """A box rolled back to an older worker over the history a newer one wrote (its engine's segments of a newer data
    version): the open said "its files are damaged ... Move the folder aside", so the operator set the whole history
    aside for a store that was fine.  It is said as written by a newer version, with what to do, files untouched."""
    store = _store(tmp_path)
    store.upsert(_frames(3))
    store.close()
    versions = sorted((tmp_path / "store" / "frames").rglob("segments/*/version.info"))
    assert versions, "the engine's file layout changed: find where a segment records its data version"
    for version in versions:
        version.write_text("99.0.0")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "store").rglob("*"))
    with pytest.raises(StoreDamaged) as held:
        _store(tmp_path)
    said = str(held.value)
    assert "written by a newer version of the store's engine" in said and "99.0.0" in said, said
    assert "store.collection" in said and "damaged" not in said and "Move the folder aside" not in said, said
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "store").rglob("*")) == before
    assert all(version.read_text() == "99.0.0" for version in versions)


def test_a_store_folder_deleted_while_the_worker_runs_is_made_again(tmp_path, caplog):
    """``rm -rf`` of the collection while the worker ran: the engine went on writing to files no longer on disk,
    queries kept answering, and after the next start the history since was gone, said only as a failed close."""
    import shutil

    cfg = StoreConfig(path=tmp_path / "store", flush_s=0.05, batch_size=4)
    spool = SpoolConfig(path=tmp_path / "spool", retry_s=0.05)
    evidence = EvidenceStore(tmp_path / "evidence", max_frames=1000)
    recorder = Recorder(lambda: VectorStore(cfg, DIM), evidence, cfg, spool, 16, Liveness(0))
    recorder.start()
    try:
        for rec in _records(2, DIM):
            recorder.submit(rec)
        assert recorder.flush(20) and _wait_for(lambda: recorder.written == 2)
        shutil.rmtree(tmp_path / "store" / "frames")
        for rec in _records(3, DIM, start=10):
            recorder.submit(rec)
        assert recorder.flush(20) and _wait_for(lambda: recorder.written == 5 and len(recorder.spool) == 0)
        with recorder.use_store() as opened:
            assert opened.count() == 3 and opened.find("f12", "a") is not None
    finally:
        recorder.stop()
    said = [r.getMessage() for r in caplog.records if r.name == "worker.recorder" and r.levelname == "ERROR"]
    assert len(said) == 1 and "is gone (deleted or moved away" in said[0], said
    reopened = VectorStore(cfg, DIM)  # what the next start reads
    assert reopened.count() == 3
    reopened.close()


def test_a_server_collection_of_another_size_is_a_mismatch_not_an_outage():
    """The server engine says the same (qdrant-client's local mode stands in for a server: none can run here)."""
    from qdrant_client import QdrantClient

    client = QdrantClient(location=":memory:")
    VectorStore(StoreConfig(path=None), DIM, client=client)
    with pytest.raises(StoreMismatch, match=rf"'frames' holds vectors of another size \({DIM}-d\).*store.collection.*serve a bundle of {DIM}-d"):
        VectorStore(StoreConfig(path=None), DIM * 2, client=client)


def test_a_store_the_process_lacks_the_files_to_open_is_an_outage_not_damage(tmp_path):
    """Out of file descriptors, loading an intact store failed with "Too many open files": it was said as damage, with
    "move the folder aside", and its write-ahead log was set aside and back (a helper's review)."""
    import subprocess
    import sys

    store = _store(tmp_path)
    store.upsert(_frames(3))
    store.close()
    code = f"""
import os, resource
from pathlib import Path
from worker.config import StoreConfig
from worker.store import StoreDamaged, StoreError, VectorStore
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
used = len(os.listdir("/proc/self/fd"))
said = set()
for extra in range(0, 60):  # each limit in turn, up to one the load gets through
    resource.setrlimit(resource.RLIMIT_NOFILE, (used + extra, hard))
    try:
        VectorStore(StoreConfig(path=Path({str(tmp_path / "store")!r})), {DIM}).close()
        break
    except StoreError as exc:
        said.add(type(exc).__name__)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
print(sorted(said))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0 and "StoreDamaged" not in done.stdout, done.stdout + done.stderr[-2000:]
    assert "StoreError" in done.stdout  # the limits below the load's needs were met
    assert sorted(p.name for p in (tmp_path / "store" / "frames").iterdir()) == ["edge_config.json", "segments", "wal"]


def _recording(tmp_path: Path, n: int, evidence_frames: int) -> tuple[Recorder, EvidenceStore, StoreConfig, SpoolConfig]:
    """A started recorder that has written ``n`` records of camera a (f0, f1, ...), its evidence of
    ``evidence_frames`` normal frames, and its store and spool settings."""
    cfg = StoreConfig(path=tmp_path / "store", flush_s=0.05, batch_size=4)
    spool = SpoolConfig(path=tmp_path / "spool", retry_s=0.05)
    evidence = EvidenceStore(tmp_path / "evidence", max_frames=evidence_frames)
    recorder = Recorder(lambda: VectorStore(cfg, DIM), evidence, cfg, spool, 16, Liveness(0))
    recorder.start()
    for rec in _records(n, DIM):
        recorder.submit(rec)
    assert recorder.flush(20) and _wait_for(lambda: recorder.written == n)
    return recorder, evidence, cfg, spool


def test_a_reused_frame_id_does_not_replace_a_labelled_frame(tmp_path, caplog):
    """A camera whose frame counter starts again at a reboot sends a new frame under the id of one an operator
    labelled: its record replaced the labelled one, and with it the label and its evidence, without a word.  The new
    frame is now not recorded (counted, said), whether the evidence or only the store still knows the label."""
    recorder, evidence, _, _ = _recording(tmp_path, 3, evidence_frames=1000)
    try:
        with recorder.use_store() as store:
            for i, label in ((0, "false_alarm"), (1, "confirmed_defect")):
                pid, vector, payload = store.find(f"f{i}", "a")
                store.upsert([(pid, vector, {**payload, "label": label})])
            thumbnail = (tmp_path / "evidence" / store.find("f0", "a")[2]["evidence"]["thumbnail"]).read_bytes()
        evidence.set_labelled(point_id("a", "f0"), True, False)  # as the label service does; f1's only in the store
        again = _records(3, DIM, start=100)  # the counter started again: f0, f1, f2 name new frames
        for i, rec in enumerate(again):
            rec.key, rec.payload["frame_id"] = point_id("a", f"f{i}"), f"f{i}"
            rec.frame[:] = 255
            recorder.submit(rec)
        assert recorder.flush(20) and _wait_for(lambda: recorder.written == 4)
        assert recorder.labelled_kept == 2
        with recorder.use_store() as store:
            kept = {i: store.find(f"f{i}", "a")[2] for i in range(3)}
        assert kept[0]["label"] == "false_alarm" and kept[1]["label"] == "confirmed_defect"
        assert kept[0]["captured_ts"] == NOW and kept[1]["captured_ts"] == NOW + 1
        assert kept[2].get("label") is None and kept[2]["captured_ts"] == NOW + 102  # an unlabelled frame is replaced
        assert (tmp_path / "evidence" / kept[0]["evidence"]["thumbnail"]).read_bytes() == thumbnail
        said = [r.getMessage() for r in caplog.records if r.name == "worker.recorder" and r.levelname == "WARNING"]
        assert len(said) == 1 and "a/f0" in said[0] and "labelled" in said[0], said
    finally:
        recorder.stop()


class _HeldEvidence(EvidenceStore):
    """Evidence on a disk that holds one write until the test lets it go: the recorder then sits between its check of
    a batch's ids and their write, as on a slow card."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hold: str | None = None
        self.inside, self.release = threading.Event(), threading.Event()

    def save(self, key, files, value="normal"):
        if key == self.hold and not self.inside.is_set():
            self.inside.set()
            assert self.release.wait(20)
        return super().save(key, files, value)


def _inside(thread: threading.Thread, function: str) -> bool:
    """Whether ``thread`` is running in ``function`` now (a context manager waiting for the store's lock)."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None and frame.f_code.co_name != function:
        frame = frame.f_back
    return frame is not None


def test_a_label_sent_while_a_later_frame_of_its_id_is_written_is_not_written_over(tmp_path):
    """The recorder checked a batch's ids for labels, then wrote the batch: a label stored in between (its frame's id
    reused by the camera, a frame of it in the batch) was answered ok and then written over, its evidence with it,
    and the history no longer had it.  A label now waits for the batch being written, and then labels what the
    history holds under the id."""
    cfg = StoreConfig(path=tmp_path / "store", flush_s=0.05, batch_size=4)
    evidence = _HeldEvidence(tmp_path / "evidence", max_frames=1000)
    recorder = Recorder(lambda: VectorStore(cfg, DIM), evidence, cfg, SpoolConfig(path=tmp_path / "spool", retry_s=0.05),
                        16, Liveness(0))
    recorder.start()
    try:
        recorder.submit(_records(1, DIM)[0])
        assert recorder.flush(20) and _wait_for(lambda: recorder.written == 1)
        evidence.hold = point_id("a", "f0")
        again = _records(1, DIM, start=100)[0]  # the camera's counter started again: f0 names a new frame
        again.key, again.payload["frame_id"] = point_id("a", "f0"), "f0"
        recorder.submit(again)
        assert evidence.inside.wait(20)  # the recorder found f0 unlabelled and is writing the new frame's evidence
        answers: list[dict] = []
        label = threading.Thread(target=lambda: answers.append(LabelService(recorder.use_store, evidence=evidence)
                                 .answer_bytes(json.dumps({"action": "set", "frame_id": "f0", "camera": "a",
                                                           "label": "confirmed_defect"}).encode())))
        label.start()
        assert _wait_for(lambda: not label.is_alive() or _inside(label, "use_store"))
        assert label.is_alive(), f"the label was stored while the batch was being written: {answers}"
        evidence.release.set()
        label.join(20)
        assert answers and answers[0]["ok"], answers
        assert recorder.flush(20) and recorder.written == 2 and recorder.labelled_kept == 0
        with recorder.use_store() as store:
            payload = store.find("f0", "a")[2]
        assert payload["label"] == "confirmed_defect" and payload["captured_ts"] == NOW + 100
        assert evidence.labelled(point_id("a", "f0"))
        assert (tmp_path / "evidence" / payload["evidence"]["thumbnail"]).is_file()
    finally:
        evidence.release.set()
        recorder.stop()


class _HeldDelete(VectorStore):
    """A store whose first deletion waits until the test lets it go: retention then sits between reading the oldest
    ids and deleting them."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.inside, self.release = threading.Event(), threading.Event()

    def delete(self, ids):
        if not self.inside.is_set():
            self.inside.set()
            assert self.release.wait(20)
        return super().delete(ids)


def test_a_label_sent_while_retention_deletes_its_frame_is_refused_not_answered_and_lost(tmp_path):
    """Retention read the oldest unlabelled ids, then deleted them: a label stored in between was answered ok and
    deleted with its frame (a helper's probe).  Each chunk's read and deletion now hold the lock labels hold, so the
    label comes after and finds the frame gone."""
    store = _HeldDelete(StoreConfig(path=tmp_path / "store", max_points=2), DIM)
    store.upsert([(r.key, r.vector, {**r.payload, "received_ts": NOW + i}) for i, r in enumerate(_records(3, DIM))])
    lock = threading.RLock()

    @contextmanager
    def locked_store():
        with lock:
            yield store

    retention = threading.Thread(target=lambda: store.retain(now=NOW + 10, force=True, lock=lock))
    retention.start()
    answers: list[dict] = []
    try:
        assert store.inside.wait(20)  # f0, the oldest, is read as unlabelled and about to be deleted
        label = threading.Thread(target=lambda: answers.append(LabelService(locked_store).answer_bytes(json.dumps(
            {"action": "set", "frame_id": "f0", "camera": "a", "label": "confirmed_defect"}).encode())))
        label.start()
        assert _wait_for(lambda: not label.is_alive() or _inside(label, "locked_store"))
        assert label.is_alive(), f"the label was stored while retention was deleting its frame: {answers}"
    finally:
        store.release.set()
        retention.join(20)
    label.join(20)
    assert answers[0]["error"]["code"] == "unknown_frame", answers
    assert store.find("f0", "a") is None and store.count() == 2
    store.close()


def test_a_label_whose_marker_was_not_written_moves_its_evidence_at_the_next_start(tmp_path):
    """A label is written to the store, then its evidence's marker: a stop between the two (or a marker that could not
    be written) left the frame's files in the budget of unlabelled frames for good, which took them.  The marker that
    cannot be written keeps the frame indexed as it was (it was dropped from the index, its files beyond every budget),
    and the recorder's check of the evidence at a start moves the files to the budget the label says."""
    recorder, evidence, cfg, spool = _recording(tmp_path, 2, evidence_frames=1000)
    key = point_id("a", "f0")
    marker = tmp_path / "evidence" / key[:2] / f"{key}.label.txt"
    marker.mkdir()  # a marker that cannot be written
    with pytest.raises(OSError):
        evidence.set_labelled(key, True, False)
    assert key in evidence.keys() and not evidence.labelled(key)
    marker.rmdir()
    with recorder.use_store() as store:  # the label's store write, with no marker after it: a stop came between
        pid, vector, payload = store.find("f0", "a")
        store.upsert([(pid, vector, {**payload, "label": "confirmed_defect"})])
    recorder.stop()
    evidence = EvidenceStore(tmp_path / "evidence", max_frames=1000)
    again = Recorder(lambda: VectorStore(cfg, DIM), evidence, cfg, spool, 16, Liveness(0))
    again.start()
    try:
        assert _wait_for(lambda: evidence.labelled(key)) and not evidence.labelled(point_id("a", "f1"))
    finally:
        again.stop()


def test_a_frame_not_recorded_for_a_label_is_not_counted_unrecorded_too(tmp_path):
    """A batch the store refuses for good (vectors of another size: a bundle with another embedding) counts its
    records unrecorded; one whose id names a labelled frame was left out before the write and is counted once, as
    kept for its label, not twice."""
    recorder, _, _, _ = _recording(tmp_path, 1, evidence_frames=1000)
    try:
        with recorder.use_store() as store:
            pid, vector, payload = store.find("f0", "a")
            store.upsert([(pid, vector, {**payload, "label": "false_alarm"})])
        for rec in _records(3, DIM + 1):  # f0 (labelled), f1, f2, each of another embedding size
            recorder.submit(rec)
        assert recorder.flush(20) and _wait_for(lambda: recorder.labelled_kept + recorder.unrecorded >= 3)
        assert (recorder.labelled_kept, recorder.unrecorded, recorder.lost) == (1, 2, 0)
    finally:
        recorder.stop()


def test_a_reused_frame_id_spooled_in_an_outage_does_not_replace_a_labelled_frame(tmp_path):
    """The same, for a frame that came while the store could not be opened and whose labelled frame's evidence had
    rotated out (a helper's review): spooled, when only the evidence can say which ids are labelled, its replay
    replaced the labelled record.  The replay asks the store, and the new frame's evidence files go with it."""
    recorder, evidence, cfg, spool = _recording(tmp_path, 2, evidence_frames=1)  # f0's files rotate out at f1
    try:
        with recorder.use_store() as store:
            pid, vector, payload = store.find("f0", "a")
            store.upsert([(pid, vector, {**payload, "label": "confirmed_defect"})])
        evidence.set_labelled(pid, True, False)  # as the label service does: its files are gone, nothing to move
        assert not evidence.labelled(pid)
    finally:
        recorder.stop()
    holder = VectorStore(cfg, DIM)  # at the next start another process still holds the store: an outage
    recorder = Recorder(lambda: VectorStore(cfg, DIM), evidence, cfg, spool, 16, Liveness(0))
    recorder.start()
    try:
        again = _records(1, DIM, start=100)[0]  # the camera's counter started again: a new frame named f0
        again.key, again.payload["frame_id"] = pid, "f0"
        recorder.submit(again)
        assert recorder.flush(20) and len(recorder.spool) == 1
        holder.close()  # the store is back: the spool is replayed
        assert _wait_for(lambda: len(recorder.spool) == 0 and recorder.labelled_kept == 1), recorder.labelled_kept
        with recorder.use_store() as store:
            kept = store.find("f0", "a")[2]
        assert kept["label"] == "confirmed_defect" and kept["captured_ts"] == NOW, kept
        assert recorder.written == 0 and evidence.read(kept["evidence"]["thumbnail"]) is None  # not the new frame's
    finally:
        recorder.stop()


def test_a_new_history_records_frames_under_ids_an_earlier_one_labelled(tmp_path):
    """The store's folder moved aside (the way out of a damaged store): the evidence still held the earlier history's
    label markers, and a new frame under such an id was taken for a labelled one and never recorded (a helper's
    review).  The open store is the history: the frame is recorded, and the stale marker goes."""
    recorder, evidence, cfg, spool = _recording(tmp_path, 1, evidence_frames=1000)
    try:
        with recorder.use_store() as store:
            pid, vector, payload = store.find("f0", "a")
            store.upsert([(pid, vector, {**payload, "label": "false_alarm"})])
        evidence.set_labelled(pid, True, False)
    finally:
        recorder.stop()
    (tmp_path / "store" / "frames").rename(tmp_path / "store" / "frames-damaged")
    recorder = Recorder(lambda: VectorStore(cfg, DIM), evidence, cfg, spool, 16, Liveness(0))
    recorder.start()
    try:
        again = _records(1, DIM, start=100)[0]
        again.key, again.payload["frame_id"] = pid, "f0"
        recorder.submit(again)
        assert recorder.flush(20) and _wait_for(lambda: recorder.written == 1), recorder.labelled_kept
        with recorder.use_store() as store:
            kept = store.find("f0", "a")[2]
        assert kept.get("label") is None and kept["captured_ts"] == NOW + 100 and recorder.labelled_kept == 0
        assert not evidence.labelled(pid) and not list((tmp_path / "evidence").rglob("*.label.*"))
    finally:
        recorder.stop()


def test_a_batch_lost_to_a_full_disk_leaves_no_partial_spool_file_and_no_evidence(tmp_path):
    """The store away and the disk full: each batch's spool write was cut short and left its partial ``.tmp`` (one per
    batch, uncounted in ``spool.max_mb``, removed only at a restart), and the lost records' evidence stayed under no
    point, which no retention pass would ever take.  Both go now.  The file size limit (RLIMIT_FSIZE, SIGXFSZ
    ignored) cuts the spool's JSON short as a full disk does, while the small thumbnails still fit."""
    import resource
    import signal

    cfg = StoreConfig(path=tmp_path / "store", flush_s=0.05, batch_size=64)
    evidence = EvidenceStore(tmp_path / "evidence", max_frames=1000)
    recorder = Recorder(_unreachable, evidence, cfg, SpoolConfig(path=tmp_path / "spool", max_mb=1, retry_s=0.05),
                        16, Liveness(0))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    recorder.start()
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, hard))  # a batch of 64 16-d points is about 25 KB of JSON
        for n in range(3):
            for record in _records(64, DIM, start=n * 64):
                recorder.submit(record)
            assert recorder.flush(20)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
        recorder.stop()
    assert recorder.lost == 192 and len(recorder.spool) == 0
    assert not list((tmp_path / "spool").glob("*.tmp")), "a partial spool file stayed"
    assert len(evidence) == 0 and not list((tmp_path / "evidence").glob("*/*")), "a lost record's evidence stayed"


def _recorder_in_an_outage(tmp_path: Path) -> tuple[StoreConfig, SpoolConfig, EvidenceStore, Recorder]:
    """A recorder whose store cannot be reached, so every batch is spooled, with the settings a replay reopens."""
    cfg = StoreConfig(path=tmp_path / "store", flush_s=0.05, batch_size=4)
    spool = SpoolConfig(path=tmp_path / "spool", retry_s=0.05)
    evidence = EvidenceStore(tmp_path / "evidence", max_frames=1000)
    return cfg, spool, evidence, Recorder(_unreachable, evidence, cfg, spool, 16, Liveness(0))


def test_a_spooled_batch_deleted_under_the_worker_loses_no_later_batch(tmp_path):
    """During an outage someone deletes a spooled batch (freeing space on a full disk): every later batch was written
    to the spool and then counted lost, its evidence deleted, because bounding the spool read each batch's size
    from its file; those batches were replayed later all the same, their points naming evidence gone."""
    cfg, spool, evidence, recorder = _recorder_in_an_outage(tmp_path)
    recorder.start()
    try:
        for start in (0, 4):
            for rec in _records(4, DIM, start=start):
                recorder.submit(rec)
            assert recorder.flush(20)
        min((tmp_path / "spool").glob("*.json")).unlink()
        for start in (8, 12):
            for rec in _records(4, DIM, start=start):
                recorder.submit(rec)
            assert recorder.flush(20)
    finally:
        recorder.stop()
    assert recorder.lost == 0 and len(evidence) == 16
    replay = Recorder(lambda: VectorStore(cfg, DIM), evidence, cfg, spool, 16, Liveness(0))
    replay.start()
    try:
        assert _wait_for(lambda: replay.written == 12), replay.written
        with replay.use_store() as store:
            assert {p["frame_id"] for p in store.latest(20, Filters())} == {f"f{i}" for i in range(4, 16)}
    finally:
        replay.stop()


def test_spool_and_evidence_folders_deleted_under_the_worker_are_made_again(tmp_path):
    """``rm -rf`` of the spool and evidence folders while the store is out (space freed by hand): every later batch
    was lost and every later frame recorded without its evidence until a restart, each write failing for a folder
    that was no longer there.  They are made again at the next write, as the store's collection folder is."""
    cfg, spool, evidence, recorder = _recorder_in_an_outage(tmp_path)
    recorder.start()
    try:
        for start in (0, 4):
            if start:
                shutil.rmtree(tmp_path / "spool")
                shutil.rmtree(tmp_path / "evidence")
            for rec in _records(4, DIM, start=start):
                recorder.submit(rec)
            assert recorder.flush(20)
    finally:
        recorder.stop()
    assert recorder.lost == 0 and recorder.evidence_failed == 0
    assert len(list((tmp_path / "spool").glob("*.json"))) == 1
    assert len(list((tmp_path / "evidence").glob("*/*.thumbnail.jpg"))) == 4


def test_a_batch_moved_into_a_running_workers_spool_is_not_written_over(tmp_path):
    """What the log says to do with batches of another embedding size, set aside: move them into the ``spool.path``
    of a worker serving that size.  Moved in while that worker ran, a batch took a name its spool was to write next,
    and its next batches were written over it: the moved points were lost without a word.  A name taken is skipped,
    and the next start reads the moved batch with the others."""
    spool = Spool(tmp_path / "spool", 10**7)
    other = Spool(tmp_path / "other", 10**7)
    point = lambda name: [(name, np.ones(DIM, np.float32), {"frame_id": name})]  # noqa: E731
    for i in range(3):
        other.push(point(f"moved{i}"))
    spool.push(point("own0"))
    for path in sorted((tmp_path / "other").glob("*.json"))[1:]:  # 000000000001.json, 000000000002.json
        path.rename(tmp_path / "spool" / path.name)
    for i in range(1, 4):
        spool.push(point(f"own{i}"))
    again = Spool(tmp_path / "spool", 10**7)
    held = []
    while (item := again.oldest()) is not None:
        held += [pid for pid, _, _ in item[1]]
        again.remove(item[0])
    assert held == ["own0", "moved1", "moved2", "own1", "own2", "own3"]


def test_the_evidence_age_budget_applies_while_the_store_is_out(tmp_path):
    """``evidence.max_age_h`` (and the other classes' age budgets) ran only inside the store's retention pass: an
    outage of days (an unreachable server, damaged files) kept every frame's evidence past its age.  While no store is
    open the recorder now runs the evidence's own pass, every ``store.retention_every_s``."""
    cfg = StoreConfig(path=tmp_path / "store", flush_s=0.05, batch_size=4, retention_every_s=0.05)
    evidence = EvidenceStore(tmp_path / "evidence", max_frames=1000, max_age_h=1)
    recorder = Recorder(_unreachable, evidence, cfg, SpoolConfig(path=tmp_path / "spool", retry_s=0.05), 16,
                        Liveness(0))
    recorder.start()
    try:
        for record in _records(4, DIM):
            recorder.submit(record)
        assert recorder.flush(20) and len(evidence) == 4
        old = time.time() - 2 * 3600
        for path in (tmp_path / "evidence").glob("*/*"):
            os.utime(path, (old, old))
        assert _wait_for(lambda: len(evidence) == 0, timeout=5), "evidence two hours old kept under a one-hour budget"
        assert recorder.spool.points == 4  # the history itself waits for the store
    finally:
        recorder.stop()


def test_evidence_no_point_names_is_deleted_once_a_store_opens(tmp_path):
    """A worker killed in a retention pass (its points deleted, their files not yet) or a new history (the store's
    folder moved aside, ``store.collection`` set anew) left evidence no point names: no retention pass took it, and
    the labelled ones held the labelled budget's places for good.  Once a store opens, the recorder deletes the
    evidence of every frame it does not hold, but an operator's labelled ones (an earlier history may be served
    again; their class's budget takes them in turn); the frames it holds keep theirs."""
    recorder, evidence, cfg, spool = _recording(tmp_path, 6, evidence_frames=1000)
    try:
        with recorder.use_store() as store:
            ids = [store.find(f"f{i}", "a")[0] for i in range(6)]
            evidence.set_labelled(ids[0], True, False)
            store.delete(ids[:3])  # as a retention pass killed before it deleted their files leaves them
    finally:
        recorder.stop()
    assert len(evidence) == 6
    recorder = Recorder(lambda: VectorStore(cfg, DIM), evidence, cfg, spool, 16, Liveness(0))
    recorder.start()
    try:
        assert _wait_for(lambda: len(evidence) == 4), evidence.counts()
        assert sorted(evidence.keys()) == sorted([ids[0], *ids[3:]]) and evidence.labelled(ids[0])
        assert not list((tmp_path / "evidence").rglob(f"{ids[1]}.*"))
    finally:
        recorder.stop()
    moved = StoreConfig(path=tmp_path / "store", collection="frames-v2", flush_s=0.05, batch_size=4)
    recorder = Recorder(lambda: VectorStore(moved, DIM), evidence, moved, spool, 16, Liveness(0))
    recorder.start()
    try:
        assert _wait_for(lambda: len(evidence) == 1), evidence.counts()
        assert evidence.keys() == [ids[0]] and len(list((tmp_path / "evidence").glob("*/*"))) == 2  # thumbnail, marker
    finally:
        recorder.stop()


def test_entries_of_the_spool_it_does_not_write_are_left_and_its_half_written_batches_go(tmp_path, caplog):
    """The spool deleted every ``*.tmp`` entry of its folder at start, its half-written batches meant: a folder of
    that name (another version's, an operator's) raised IsADirectoryError, so the worker could not start at all,
    and a file of that name that is not a batch of its was deleted.  Those are now left as they are, named once."""
    folder = tmp_path / "spool"
    Spool(folder, 10**7).push([("p0", np.ones(DIM, np.float32), {"frame_id": "p0"})])
    (folder / "000000000007.tmp").write_bytes(b"{\"poi")  # a batch cut short by a crash: its own
    (folder / "replay.tmp").mkdir()
    (folder / "notes.tmp").write_text("the operator's")
    again = Spool(folder, 10**7)
    assert len(again) == 1 and not (folder / "000000000007.tmp").exists()
    assert (folder / "replay.tmp").is_dir() and (folder / "notes.tmp").read_text() == "the operator's"
    said = [r.getMessage() for r in caplog.records if "notes.tmp" in r.getMessage()]
    assert len(said) == 1 and "replay.tmp" in said[0] and "left as" in said[0], said


def test_files_the_evidence_does_not_write_neither_stall_its_sweep_nor_are_deleted(tmp_path, caplog):
    """A file in the evidence folder not named by a point id (Windows' Thumbs.db or macOS's .DS_Store from browsing
    a share, another version's file) was indexed as a frame: the sweep's store read of its chunk failed ("badly
    formed hexadecimal UUID string"), so it was said again at every recorder step and no orphan was ever deleted,
    and the normal budget counted and in time deleted the file.  Such files are left as they are, named once."""
    recorder, _, cfg, spool = _recording(tmp_path, 4, evidence_frames=1000)
    try:
        with recorder.use_store() as store:
            ids = [store.find(f"f{i}", "a")[0] for i in range(4)]
            store.delete(ids[:2])  # as a retention pass killed before it deleted their files leaves them
    finally:
        recorder.stop()
    strays = [tmp_path / "evidence" / ids[3][:2] / "Thumbs.db", tmp_path / "evidence" / "meta" / "format.json"]
    for stray in strays:
        stray.parent.mkdir(exist_ok=True)
        stray.write_text("not a frame's")
    evidence = EvidenceStore(tmp_path / "evidence", max_frames=1)  # a restart; a budget of one frame
    recorder = Recorder(lambda: VectorStore(cfg, DIM), evidence, cfg, spool, 16, Liveness(0))
    recorder.start()
    try:
        assert _wait_for(lambda: len(evidence) == 1), evidence.counts()
        assert evidence.keys() == [ids[3]]
    finally:
        recorder.stop()
    assert all(stray.read_text() == "not a frame's" for stray in strays)
    assert "failed" not in caplog.text, caplog.text
    assert "Thumbs.db" in caplog.text and "format.json" in caplog.text and "left as they are" in caplog.text


def test_a_frame_whose_evidence_cannot_be_written_is_recorded_without_it(tmp_path, caplog):
    """A full evidence disk lost the whole history although the store had room: the evidence write raised and the
    recorder counted each batch lost (``recorder_lost``).  The point is recorded now, without its thumbnail and
    heatmap, the frames are counted (``recorder_evidence_failed``), and it is said once when the writes start failing
    and once when they work again.  A file in the evidence folder's place fails its writes for real, as root too."""
    import logging

    cfg = StoreConfig(path=tmp_path / "store", flush_s=0.05, batch_size=4)
    evidence = EvidenceStore(tmp_path / "evidence", max_frames=1000)
    recorder = Recorder(lambda: VectorStore(cfg, DIM), evidence, cfg, SpoolConfig(path=tmp_path / "spool"), 16,
                        Liveness(0))
    recorder.start()
    try:
        with caplog.at_level(logging.INFO, logger="worker.recorder"):
            (tmp_path / "evidence").rename(tmp_path / "aside")
            (tmp_path / "evidence").write_bytes(b"")
            for n in range(3):
                for record in _records(4, DIM, start=4 * n):
                    recorder.submit(record)
                assert recorder.flush(20)
            (tmp_path / "evidence").unlink()
            (tmp_path / "aside").rename(tmp_path / "evidence")
            for record in _records(4, DIM, start=12):
                recorder.submit(record)
            assert recorder.flush(20)
        assert (recorder.lost, recorder.written, len(recorder.spool)) == (0, 16, 0), "the store had room"
        assert recorder.evidence_failed == 12
        with recorder.use_store() as store:
            held = store.payloads([point_id("a", f"f{i}") for i in range(16)])
        assert [bool(held[point_id("a", f"f{i}")]["evidence"]) for i in range(16)] == [False] * 12 + [True] * 4
        assert len(evidence) == 4
        said = [r.getMessage() for r in caplog.records if "evidence" in r.getMessage()]
        assert len([m for m in said if "cannot be written" in m]) == 1, said
        assert len([m for m in said if "written again" in m]) == 1, said
    finally:
        recorder.stop()


def test_a_store_below_its_free_space_floor_is_reported_unavailable_and_says_why(tmp_path):
    """``store_available`` (the stats, ``edge_inspect_store_available``) stayed true while the free-space floor
    (``store.min_free_mb``) refused every write of the open store, and a store the floor kept from opening answered
    queries and exports "not reachable", which sends the operator after the network; ``extensions``, which needs no
    store, was refused too.  Now the store is unavailable while its writes are refused and available again once one
    succeeds, the answers carry the floor's own message, and the extensions list is answered.  The floor is set above
    the free space of the test's disk (the open store's own knob, ``min_free``, for its writes)."""
    floor = {"mb": shutil.disk_usage(tmp_path).free // 2**20 + 1024}
    cfg = StoreConfig(path=tmp_path / "store", flush_s=0.05, batch_size=4)
    evidence = EvidenceStore(tmp_path / "evidence", max_frames=1000)
    recorder = Recorder(lambda: VectorStore(cfg.model_copy(update={"min_free_mb": floor["mb"]}), DIM), evidence, cfg,
                        SpoolConfig(path=tmp_path / "spool", retry_s=0.05), 16, Liveness(0))
    labels = LabelService(recorder.use_store)
    recorder.start()
    try:
        refused = labels.answer_bytes(json.dumps({"action": "export"}).encode())["error"]
        assert refused["code"] == "store_unavailable", refused
        assert re.search(r"\d+ MB free on the disk of .*, \d+ MB needed \(store.min_free_mb\)", refused["message"])
        assert "not reachable" not in refused["message"], refused
        assert labels.answer_bytes(json.dumps({"action": "extensions"}).encode()) == {"ok": True, "extensions": []}
        assert not recorder.store_available
        floor["mb"] = 0  # room again: the next try opens it
        for record in _records(4, DIM):
            recorder.submit(record)
        assert _wait_for(lambda: recorder.written == 4) and recorder.store_available
        assert recorder.store is not None
        recorder.store.engine.min_free = shutil.disk_usage(tmp_path).free + 2**30  # open, its writes refused
        for record in _records(4, DIM, start=4):
            recorder.submit(record)
        assert recorder.flush(20) and recorder.spool.points == 4
        assert recorder.store is not None and not recorder.store_available, "open, but its writes are refused"
        recorder.store.engine.min_free = 0
        assert _wait_for(lambda: recorder.written == 8), "replayed once there is room"
        assert recorder.store_available and len(recorder.spool) == 0
    finally:
        recorder.stop()
