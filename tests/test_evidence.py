"""Evidence kept by value: normal, anomalous and labelled frames each evict only their own oldest."""

from __future__ import annotations

import os
import time

from worker.evidence import ANOMALOUS, LABELLED, NORMAL, Budget, EvidenceStore


def _key(i: int) -> str:
    return f"{i:08x}-0000-0000-0000-000000000000"


def test_a_flood_of_normal_frames_never_pushes_out_a_defect_and_labels_outlive_both(tmp_path):
    evidence = EvidenceStore(tmp_path, max_frames=50, budgets={ANOMALOUS: Budget(10), LABELLED: Budget(5)})
    defects = [evidence.save(_key(i), {"thumbnail": ("jpg", b"t"), "frame": ("png", b"f")}, ANOMALOUS)
               for i in range(3)]
    labelled = evidence.save(_key(3), {"thumbnail": ("jpg", b"t")}, NORMAL)
    evidence.set_labelled(_key(3), True, anomalous=False)
    for i in range(100, 2100):  # a busy line: 2000 normal frames, 40x the normal budget
        evidence.save(_key(i), {"thumbnail": ("jpg", b"t")}, NORMAL)
    assert all(evidence.read(d["frame"]) == b"f" for d in defects)
    assert evidence.read(labelled["thumbnail"]) == b"t"
    assert evidence.counts()[NORMAL]["frames"] == 50
    for i in range(200, 230):  # more defects than their budget: the oldest defects go, labels stay
        evidence.save(_key(i), {"thumbnail": ("jpg", b"t"), "frame": ("png", b"f")}, ANOMALOUS)
    assert all(evidence.read(d["frame"]) is None for d in defects)
    assert evidence.read(labelled["thumbnail"]) == b"t"
    assert evidence.counts()[ANOMALOUS]["frames"] == 10 and evidence.counts()[LABELLED]["frames"] == 1

    again = EvidenceStore(tmp_path, max_frames=50, budgets={ANOMALOUS: Budget(10), LABELLED: Budget(5)})
    assert {v: c["frames"] for v, c in again.counts().items()} == {NORMAL: 50, ANOMALOUS: 10, LABELLED: 1}
    again.set_labelled(_key(3), False, anomalous=False)
    assert again.counts()[LABELLED]["frames"] == 0 and again.counts()[NORMAL]["frames"] == 50


def test_byte_and_age_budgets_apply_per_class(tmp_path):
    evidence = EvidenceStore(tmp_path, max_frames=1000, budgets={NORMAL: Budget(1000, max_bytes=1000),
                                                                 ANOMALOUS: Budget(1000, max_age_s=3600)})
    for i in range(20):
        evidence.save(_key(i), {"thumbnail": ("jpg", b"x" * 100)}, NORMAL)
    assert evidence.counts()[NORMAL] == {"frames": 10, "bytes": 1000}
    old = evidence.save(_key(500), {"thumbnail": ("jpg", b"a")}, ANOMALOUS)
    new = evidence.save(_key(501), {"thumbnail": ("jpg", b"b")}, ANOMALOUS)
    stale = time.time() - 7200
    os.utime(tmp_path / old["thumbnail"], (stale, stale))
    assert evidence.retain() == 1
    assert evidence.read(old["thumbnail"]) is None and evidence.read(new["thumbnail"]) == b"b"
    assert evidence.counts()[NORMAL]["frames"] == 10  # normal frames have no age budget here


def test_a_write_cut_short_leaves_no_partial_file(tmp_path):
    """A full disk cut an evidence write short: its partial ``.tmp`` file stayed for good (at every later frame
    another), and a restart skipped such files without removing them; the frame's files written before it stayed,
    unindexed.  All are removed now.  The file size limit
    (RLIMIT_FSIZE, with SIGXFSZ ignored) makes the write fail part way, as a full disk does."""
    import resource
    import signal

    import pytest

    store = EvidenceStore(tmp_path, max_frames=10)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        with pytest.raises(OSError):
            store.save(_key(1), {"thumbnail": ("jpg", b"t"), "frame": ("png", b"x" * 10_000)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert not list(tmp_path.glob("*/*.tmp")), "the partial write stayed"
    assert not list(tmp_path.glob("*/*")), "the frame's thumbnail, written before, stayed under no record"
    crashed = tmp_path / _key(2)[:2] / f"{_key(2)}.frame.png.tmp"  # as a crash mid-write leaves it
    crashed.parent.mkdir(exist_ok=True)
    crashed.write_bytes(b"x" * 100)
    EvidenceStore(tmp_path, max_frames=10)
    assert not crashed.exists()


def test_a_reused_frame_id_keeps_only_the_new_frames_files_and_evicts_no_defect_after_a_restart(tmp_path):
    """A camera reused a frame id: its earlier frame was anomalous, the new one normal.  The earlier frame and heatmap
    stayed under the normal record, so at the next start the frame counted as anomalous (by its ``frame`` file) and
    pushed a real defect's evidence out of the anomalous budget.  Only the new frame's files are kept now."""
    budgets = {ANOMALOUS: Budget(2)}
    evidence = EvidenceStore(tmp_path, max_frames=100, budgets=budgets)
    defect = evidence.save(_key(1), {"thumbnail": ("jpg", b"t"), "frame": ("png", b"f")}, ANOMALOUS)
    evidence.save(_key(2), {"thumbnail": ("jpg", b"t"), "frame": ("png", b"f"), "heatmap": ("png", b"h")}, ANOMALOUS)
    reused = evidence.save(_key(2), {"thumbnail": ("jpg", b"n")}, NORMAL)  # the camera's counter started again
    other = evidence.save(_key(3), {"thumbnail": ("jpg", b"t"), "frame": ("png", b"f")}, ANOMALOUS)
    assert sorted(p.name for p in tmp_path.glob(f"*/{_key(2)}.*")) == [f"{_key(2)}.thumbnail.jpg"]
    again = EvidenceStore(tmp_path, max_frames=100, budgets=budgets)
    assert {v: c["frames"] for v, c in again.counts().items()} == {NORMAL: 1, ANOMALOUS: 2, LABELLED: 0}
    assert again.read(defect["frame"]) == b"f" and again.read(other["frame"]) == b"f"
    assert again.read(reused["thumbnail"]) == b"n"


def _age(root, key: str, seconds: float) -> None:
    at = time.time() - seconds
    for path in root.glob(f"*/{key}.*"):
        os.utime(path, (at, at))


def test_a_class_is_kept_in_the_order_its_age_test_reads(tmp_path):
    """A class's order was not its age order: at a start a labelled class went by each frame's oldest file (when it
    was captured) while the age test read its newest (the label marker), so the pass stopped at a frame labelled just
    now and kept one labelled past the budget; and a label withdrawn put an old frame after newer ones, so the age
    pass stopped before it and the count budget took the newer frames first.  Both go by a frame's newest file now."""
    hour = 3600
    budgets = {LABELLED: Budget(100, max_age_s=10 * hour), NORMAL: Budget(3, max_age_s=10 * hour)}
    evidence = EvidenceStore(tmp_path, max_frames=3, budgets=budgets)
    evidence.save(_key(1), {"thumbnail": ("jpg", b"a")})  # captured first, labelled just now
    evidence.save(_key(2), {"thumbnail": ("jpg", b"b")})  # captured later, labelled 20 h ago
    _age(tmp_path, _key(1), 30 * hour)
    evidence.set_labelled(_key(2), True, anomalous=False)
    _age(tmp_path, _key(2), 20 * hour)
    evidence.set_labelled(_key(1), True, anomalous=False)
    again = EvidenceStore(tmp_path, max_frames=3, budgets=budgets)
    assert again.retain() == 1 and again.keys() == [_key(1)]  # labelled 20 h ago, under a 10 h budget: gone

    evidence = EvidenceStore(tmp_path / "withdrawn", max_frames=3, budgets=budgets)
    old = evidence.save(_key(3), {"thumbnail": ("jpg", b"old")})
    _age(tmp_path / "withdrawn", _key(3), 30 * hour)
    evidence.set_labelled(_key(3), True, anomalous=False)
    for i in (4, 5):
        evidence.save(_key(i), {"thumbnail": ("jpg", b"new")})
    evidence.set_labelled(_key(3), False, anomalous=False)  # the label withdrawn: back among the normal frames
    assert evidence.retain() == 1 and evidence.read(old["thumbnail"]) is None
    evidence.set_labelled(_key(4), True, anomalous=False)
    evidence.set_labelled(_key(4), False, anomalous=False)
    for i in (6, 7):  # over the normal budget of 3: the oldest, frame 4, goes first, not the newest
        evidence.save(_key(i), {"thumbnail": ("jpg", b"new")})
    assert sorted(evidence.keys()) == [_key(5), _key(6), _key(7)]
