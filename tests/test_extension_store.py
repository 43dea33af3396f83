"""The bank extension on disk: bounded, undoable per label, survives restarts and crashes mid-write."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import uuid

import numpy as np
import pytest

from bundle.extension import (INDEX, Extension, ExtensionFull, ExtensionUnwritable, Views, offending, read_folder,
                              stored_dimension)
from conftest import DAMAGE, damage, fill_disk

C = 8


def key() -> str:
    return str(uuid.uuid4())


def rows(n: int, value: float) -> np.ndarray:
    return np.full((n, C), value, np.float32)


def test_add_remove_and_restart(tmp_path) -> None:
    ext = Extension(tmp_path, C, max_rows=10)
    a, b = key(), key()
    ext.add(a, rows(3, 1.0), "f1", "cam")
    ext.add(b, rows(2, 2.0), "f2", "cam")
    assert ext.rows.shape == (5, C) and ext.info() == {"revision": 2, "rows": 5, "labels": 2, "held": 0, "max_rows": 10}
    assert ext.remove(a) == 3 and ext.remove(a) == 0
    assert np.array_equal(ext.rows, rows(2, 2.0)) and ext.revision == 3
    again = Extension(tmp_path, C, max_rows=10)
    assert again.revision == 3 and np.array_equal(again.rows, rows(2, 2.0))
    assert [e.frame_id for e in again.entries()] == ["f2"]


def test_an_index_a_newer_worker_wrote_is_served_and_keeps_its_fields(tmp_path, caplog) -> None:
    """A box rolled back to this version after a newer worker added fields to the index: the index was taken for
    damaged, moved aside, and its entries rebuilt from their files (frame ids and cameras lost, the revision back to
    1, the newer fields gone for the roll forward).  Its entries are served as written and its fields kept."""
    ext = Extension(tmp_path, C, max_rows=20)
    a, b = key(), key()
    ext.add(a, rows(3, 1.0), "f1", "cam")
    ext.add(b, rows(2, 2.0), "f2", "cam")
    written = json.loads((tmp_path / INDEX).read_text())
    written["format"] = 2
    for entry in written["entries"]:
        entry["views"] = "d4"
    (tmp_path / INDEX).write_text(json.dumps(written))
    again = Extension(tmp_path, C, max_rows=20)
    assert [(e.frame_id, e.camera) for e in again.entries()] == [("f1", "cam"), ("f2", "cam")]
    assert again.revision == 2 and not (tmp_path / "index.corrupt").exists()
    assert "written by a newer worker" in caplog.text and "format, views" in caplog.text
    again.add(a, rows(4, 3.0), "f1", "cam")  # rows of this version's: the newer fields no longer describe them
    again.add(key(), rows(1, 4.0), "f3", "cam")
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["format"] == 2 and index["revision"] == 4
    assert {e["frame_id"]: e.get("views") for e in index["entries"]} == {"f1": None, "f2": "d4", "f3": None}


@pytest.mark.parametrize("entries", [None, "x", {"k": {}}])
def test_an_index_whose_entries_are_not_records_is_taken_for_damaged(tmp_path, entries) -> None:
    """Entries that are not records (another layout, damage) are a damaged index, its rows taken from their files."""
    Extension(tmp_path, C, max_rows=20).add(key(), rows(3, 1.0), "f1", "cam")
    written = json.loads((tmp_path / INDEX).read_text())
    (tmp_path / INDEX).write_text(json.dumps({**written, "entries": [entries]}))
    assert Extension(tmp_path, C, max_rows=20).rows.shape == (3, C) and (tmp_path / "index.corrupt").is_file()


def test_folding_an_index_a_newer_worker_wrote_says_so(tmp_path) -> None:
    """``exporter fold-extension`` on a folder a newer worker wrote said only "unreadable (Entry.__init__() got an
    unexpected keyword argument ...)"; it names the fields, who wrote them and which exporter folds it."""
    ext = Extension(tmp_path, C, max_rows=20)
    ext.add(key(), rows(3, 1.0), "f1", "cam")
    assert read_folder(tmp_path, C)[0] == 1
    written = json.loads((tmp_path / INDEX).read_text())
    written["entries"][0]["views"] = "d4"
    (tmp_path / INDEX).write_text(json.dumps(written))
    with pytest.raises(ValueError, match=r"fields this exporter does not read \(views\): written by a newer worker"):
        read_folder(tmp_path, C)


def test_relabelling_a_frame_replaces_its_rows(tmp_path) -> None:
    ext = Extension(tmp_path, C, max_rows=4)
    a = key()
    ext.add(a, rows(3, 1.0), "f1", "cam")
    ext.add(a, rows(4, 5.0), "f1", "cam")  # fits: its own earlier 3 rows do not count
    assert np.array_equal(ext.rows, rows(4, 5.0))


def test_a_frame_absorbed_again_keeps_the_time_it_was_first_absorbed(tmp_path) -> None:
    """A withdrawal scores again the false alarms labelled after the withdrawn one, by the time each was absorbed: a
    re-absorption (after an earlier label's withdrawal) moved its entry's time to now, so withdrawing it next skipped
    the labels that came after it and may have leaned on its first rows (a helper's probe)."""
    ext = Extension(tmp_path, C, max_rows=10)
    a, b = key(), key()
    first = ext.add(a, rows(1, 1.0), "f1", "cam").at
    later = ext.add(b, rows(1, 2.0), "f2", "cam").at
    assert ext.add(a, rows(2, 3.0), "f1", "cam").at == first < later
    assert {e.key: e.at for e in Extension(tmp_path, C, max_rows=10).entries()}[a] == first  # after a restart too


def test_full_extension_refuses_and_keeps_what_it_has(tmp_path) -> None:
    ext = Extension(tmp_path, C, max_rows=4)
    ext.add(key(), rows(3, 1.0), "f1", "cam")
    with pytest.raises(ExtensionFull, match="3 of its 4 rows"):
        ext.add(key(), rows(2, 2.0), "f2", "cam")
    assert ext.rows.shape == (3, C) and ext.revision == 1


def test_bad_rows_and_keys_are_refused(tmp_path) -> None:
    ext = Extension(tmp_path, C, max_rows=4)
    with pytest.raises(ValueError, match="rows must be"):
        ext.add(key(), np.zeros((2, C + 1), np.float32), "f", "cam")
    with pytest.raises(ValueError, match="not a point id"):
        ext.add("../escape", rows(1, 0.0), "f", "cam")
    assert not any(tmp_path.glob("*.npy"))


def test_crash_states_recover(tmp_path) -> None:
    ext = Extension(tmp_path, C, max_rows=10)
    kept = key()
    ext.add(kept, rows(2, 1.0), "f1", "cam")
    stray = key()  # rows written, but the crash came before the index named them
    np.save(tmp_path / f"{stray}.npy", rows(1, 9.0))
    (tmp_path / "x.npy.tmp").write_bytes(b"half")
    again = Extension(tmp_path, C, max_rows=10)
    assert np.array_equal(again.rows, rows(2, 1.0))
    assert not (tmp_path / f"{stray}.npy").exists() and not (tmp_path / "x.npy.tmp").exists()
    other = key()
    again.add(other, rows(1, 3.0), "f2", "cam")
    (tmp_path / INDEX).write_text("")  # a torn index (a power cut after its rename): moved aside; the entries, each
    rebuilt = Extension(tmp_path, C, max_rows=10)  # in a file of its own, are taken again (they were all deleted)
    assert (tmp_path / "index.corrupt").is_file()
    assert sorted(e.key for e in rebuilt.entries()) == sorted([kept, other]) and rebuilt.rows.shape == (3, C)
    assert rebuilt.remove(other) == 1 and rebuilt.rows.shape == (2, C)  # withdrawn by its key (frame and camera)
    assert [e.key for e in Extension(tmp_path, C, max_rows=10).entries()] == [kept]  # the new index holds


def test_a_stop_while_a_frame_is_absorbed_again_keeps_its_earlier_rows(tmp_path) -> None:
    """A frame absorbed again (its views after its own patches, or a re-absorption after a withdrawal) sets its
    earlier rows aside while the new ones go into place: a stop between the two renames left no rows file for an
    entry the index names, and the next start dropped the label's rows without a word (a helper's probe).  Its earlier
    rows are put back; a stop after the second rename keeps the new ones."""
    ext = Extension(tmp_path, C, max_rows=10)
    frame = key()
    ext.add(frame, rows(2, 1.0), "f1", "cam")
    npy = tmp_path / f"{frame}.npy"
    np.save(tmp_path / "new.npy", rows(3, 2.0))
    (tmp_path / "new.npy").replace(tmp_path / f"{frame}.npy.tmp")  # the new rows written,
    npy.replace(tmp_path / f"{frame}.prev.tmp")  # the earlier ones set aside: the stop comes here
    again = Extension(tmp_path, C, max_rows=10)
    assert [e.frame_id for e in again.entries()] == ["f1"] and np.array_equal(again.rows, rows(2, 1.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([INDEX, npy.name])
    np.save(tmp_path / "new.npy", rows(3, 2.0))
    npy.replace(tmp_path / f"{frame}.prev.tmp")
    (tmp_path / "new.npy").replace(npy)  # the new rows in place, the index not yet written: the stop comes here
    assert np.array_equal(Extension(tmp_path, C, max_rows=10).rows, rows(3, 2.0))


@pytest.mark.parametrize("how", [*DAMAGE, "not finite"])
def test_a_damaged_entry_is_dropped_and_the_others_kept(tmp_path, how) -> None:
    """An emptied entry stopped the worker's start with EOFError; a NaN row would make every score NaN."""
    ext = Extension(tmp_path, C, max_rows=10)
    kept, broken = key(), key()
    ext.add(kept, rows(2, 1.0), "f1", "cam")
    ext.add(broken, rows(3, 2.0), "f2", "cam")
    if how == "not finite":
        np.save(tmp_path / f"{broken}.npy", np.full((3, C), np.nan, np.float32))
    else:
        damage(tmp_path / f"{broken}.npy", how)
    again = Extension(tmp_path, C, max_rows=10)
    assert np.array_equal(again.rows, rows(2, 1.0)) and [e.frame_id for e in again.entries()] == ["f1"]


def test_entries_of_another_shape_or_beyond_the_bound_are_dropped(tmp_path) -> None:
    ext = Extension(tmp_path, C, max_rows=10)
    first, second = key(), key()
    ext.add(first, rows(4, 1.0), "f1", "cam")
    ext.add(second, rows(4, 2.0), "f2", "cam")
    assert np.array_equal(Extension(tmp_path, C, max_rows=5).rows, rows(4, 1.0))  # a smaller bound serves the oldest
    assert Extension(tmp_path, C + 1, max_rows=10).rows.shape == (0, C + 1)  # a bundle with other features


def test_entries_past_a_lower_bound_are_kept_on_disk_for_a_higher_one(tmp_path, caplog) -> None:
    """A worker rolled back to a version with a lower learning.max_rows (an earlier default), or the bound lowered: the
    entries past it were deleted, files and all, so the roll forward (or the bound raised again) had lost those
    labels' absorptions for good.  They are named, not served, kept on disk, and served again under a higher bound;
    a label absorbed or withdrawn meanwhile keeps them, and a withdrawn one among them goes."""
    ext = Extension(tmp_path, C, max_rows=20)
    first, second, third = key(), key(), key()
    ext.add(first, rows(4, 1.0), "f1", "cam")
    ext.add(second, rows(4, 2.0), "f2", "cam")
    ext.add(third, rows(4, 3.0), "f3", "cam")
    lower = Extension(tmp_path, C, max_rows=5)
    assert np.array_equal(lower.rows, rows(4, 1.0)) and [e.frame_id for e in lower.entries()] == ["f1"]
    assert sorted(p.name for p in tmp_path.glob("*.npy")) == sorted(f"{k}.npy" for k in (first, second, third))
    assert "until learning.max_rows is raised to 12" in caplog.text and "cam/f2, cam/f3" in caplog.text
    lower.remove(first)  # a label withdrawn and another absorbed while the bound is low: the index keeps the rest
    lower.add(key(), rows(1, 4.0), "f4", "cam")
    lower.remove(third)  # held, not served: withdrawn, it is gone from the disk too
    assert not (tmp_path / f"{third}.npy").exists()
    again = Extension(tmp_path, C, max_rows=20)
    assert sorted(e.frame_id for e in again.entries()) == ["f2", "f4"] and again.rows.shape == (5, C)


def test_a_frame_absorbed_again_with_fewer_rows_serves_the_entries_held_that_now_fit(tmp_path, caplog) -> None:
    """A frame absorbed again (a withdrawal's re-scoring gives a later false alarm what it now misses) with fewer rows
    frees rows as a withdrawal does: the entries held past the bound that fit were served only at the next start, so
    their false alarms were flagged until the worker restarted."""
    ext = Extension(tmp_path, C, max_rows=20)
    first, second = key(), key()
    ext.add(first, rows(8, 1.0), "f1", "cam")
    ext.add(second, rows(4, 2.0), "f2", "cam")
    lower = Extension(tmp_path, C, max_rows=10)
    assert [e.frame_id for e in lower.held()] == ["f2"]
    with caplog.at_level(logging.INFO, logger="bundle.extension"):
        lower.add(first, rows(6, 1.0), "f1", "cam")  # 6 + 4 rows fit the bound of 10
    assert [e.frame_id for e in lower.entries()] == ["f1", "f2"] and lower.held() == []
    assert lower.rows.shape == (10, C) and "are served again in the rows freed" in caplog.text
    assert sorted(e.frame_id for e in Extension(tmp_path, C, max_rows=10).entries()) == ["f1", "f2"]  # as a start


def test_a_restart_serves_the_entries_served_before_it_not_the_oldest_that_fit(tmp_path) -> None:
    """A start served the oldest entries that fit the bound and a withdrawal served what the room it freed let in, so
    after a withdrawal a restart could swap which labels were served (a held one for a served one), silently.  The
    index marks the held ones; a start serves those served before while they fit, and an index without marks (an
    earlier version's) still serves the oldest that fit."""
    ext = Extension(tmp_path, C, max_rows=20)
    first, second, third = key(), key(), key()
    ext.add(first, rows(5, 1.0), "f1", "cam")
    ext.add(second, rows(6, 2.0), "f2", "cam")
    ext.add(third, rows(5, 3.0), "f3", "cam")
    lower = Extension(tmp_path, C, max_rows=10)
    assert [e.frame_id for e in lower.entries()] == ["f1", "f3"] and [e.frame_id for e in lower.held()] == ["f2"]
    lower.remove(first)  # frees 5 rows: f2 needs 6 beside f3's 5, so it stays held
    assert [e.frame_id for e in lower.entries()] == ["f3"] and [e.frame_id for e in lower.held()] == ["f2"]
    again = Extension(tmp_path, C, max_rows=10)
    assert [e.frame_id for e in again.entries()] == ["f3"] and [e.frame_id for e in again.held()] == ["f2"]
    assert np.array_equal(again.rows, rows(5, 3.0)) and again.revision == lower.revision
    assert sorted(e.frame_id for e in Extension(tmp_path, C, max_rows=11).entries()) == ["f2", "f3"]  # raised: all


def test_an_index_that_marks_held_entries_is_read_by_fold_and_without_marks_serves_the_oldest(tmp_path) -> None:
    """The mark is written on held entries only, so an index with none held is as earlier versions wrote it; the fold
    reads every entry, held ones too (the operator's labels), and an unmarked index serves the oldest that fit."""
    ext = Extension(tmp_path, C, max_rows=20)
    first, second = key(), key()
    ext.add(first, rows(4, 1.0), "f1", "cam")
    ext.add(second, rows(4, 2.0), "f2", "cam")
    assert "held" not in (tmp_path / INDEX).read_text()
    Extension(tmp_path, C, max_rows=5)
    written = json.loads((tmp_path / INDEX).read_text())["entries"]
    assert [(e["frame_id"], e.get("held")) for e in written] == [("f1", None), ("f2", True)]
    revision, entries, folded = read_folder(tmp_path, C)
    assert revision == 2 and [e.frame_id for e in entries] == ["f1", "f2"] and folded.shape == (8, C)
    index = json.loads((tmp_path / INDEX).read_text())
    index["entries"] = [{k: v for k, v in e.items() if k != "held"} for e in reversed(index["entries"])]
    (tmp_path / INDEX).write_text(json.dumps(index))
    assert [e.frame_id for e in Extension(tmp_path, C, max_rows=5).entries()] == ["f1"]


def test_offending_takes_the_patches_at_or_above_the_margin() -> None:
    candidates = np.arange(4 * C, dtype=np.float32).reshape(1, 4, C)
    scores = np.array([[5.0, 3.0, 2.0, 0.5]], np.float32)
    picked = offending(candidates, scores, threshold=4.0, margin=0.5)
    assert np.array_equal(picked, candidates[0, :3])
    assert offending(candidates, scores, threshold=4.0, margin=2.0).shape == (0, C)


@pytest.mark.parametrize("views, square, other", [(Views.FRAME, 1, 1), (Views.FLIPS, 4, 4), (Views.D4, 8, 4)])
def test_views_are_the_frame_and_its_symmetries(views: Views, square: int, other: int) -> None:
    """Each view is the frame's pixels rearranged (so its patches are the frame's, seen flipped or turned), none
    twice, the frame first; a frame that is not square cannot be turned a quarter and keeps its shape."""
    for shape, count in (((6, 6, 3), square), ((4, 6, 3), other)):
        image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        out = views.of(image)
        assert len(out) == count and np.array_equal(out[0], image)
        assert len({v.tobytes() for v in out}) == count
        assert all(v.shape == image.shape and v.flags.c_contiguous for v in out)
        assert all(np.array_equal(np.sort(v, axis=None), np.sort(image, axis=None)) for v in out)
    turned = Views.D4.of(np.arange(4, dtype=np.uint8).reshape(2, 2))
    assert any(np.array_equal(v, np.rot90(turned[0])) for v in turned)


def _block(path) -> None:
    """Make writing ``path`` fail for real, as root too: a directory where the file is to be written."""
    path.mkdir()


def test_a_withdrawal_that_cannot_be_written_changes_nothing_and_can_be_retried(tmp_path) -> None:
    """remove took the entry out of memory before writing the index: on a full disk the rows stayed in use with no
    entry naming them, a second remove released nothing, and a restart brought the entry back."""
    ext = Extension(tmp_path, C, max_rows=10)
    a, b = key(), key()
    ext.add(a, rows(3, 1.0), "f1", "cam")
    ext.add(b, rows(2, 2.0), "f2", "cam")
    _block(tmp_path / f"{INDEX}.tmp")
    with pytest.raises(ExtensionUnwritable, match=f"f1 from camera cam was not withdrawn.*{tmp_path}.*try again"):
        ext.remove(a)
    assert [e.frame_id for e in ext.entries()] == ["f1", "f2"] and ext.rows.shape == (5, C) and ext.revision == 2
    (tmp_path / f"{INDEX}.tmp").rmdir()  # space again: what is on disk is as before, and the retry works
    assert Extension(tmp_path, C, max_rows=10).rows.shape == (5, C)
    assert ext.remove(a) == 3 and np.array_equal(ext.rows, rows(2, 2.0)) and ext.revision == 3
    again = Extension(tmp_path, C, max_rows=10)
    assert [e.frame_id for e in again.entries()] == ["f2"] and again.revision == 3


@pytest.mark.parametrize("blocked", [".npy.tmp", "index"])
def test_an_absorption_that_cannot_be_written_changes_nothing(tmp_path, blocked) -> None:
    """add put the rows in use before the index was written; where the index failed, a replaced entry's rows on disk
    were the new ones while the index and memory disagreed."""
    ext = Extension(tmp_path, C, max_rows=10)
    a = key()
    ext.add(a, rows(2, 1.0), "f1", "cam")
    b = key()
    for k, n in ((a, 4), (b, 3)):  # a replacement of a frame's rows, and a new frame
        obstacle = tmp_path / (f"{k}.npy.tmp" if blocked == ".npy.tmp" else f"{INDEX}.tmp")
        _block(obstacle)
        with pytest.raises(ExtensionUnwritable, match=r"was not absorbed.*could not be written"):
            ext.add(k, rows(n, 5.0), "f", "cam")
        assert np.array_equal(ext.rows, rows(2, 1.0)) and ext.revision == 1 and len(ext.entries()) == 1
        obstacle.rmdir()
        assert {p.name for p in tmp_path.glob("*.npy")} == {f"{a}.npy"}
        again = Extension(tmp_path, C, max_rows=10)
        assert np.array_equal(again.rows, rows(2, 1.0)) and again.revision == 1
    ext.add(b, rows(3, 5.0), "f", "cam")  # the retry works
    assert ext.rows.shape == (5, C) and Extension(tmp_path, C, max_rows=10).rows.shape == (5, C)


def test_an_extension_whose_index_cannot_be_written_at_a_start_is_served_as_read(small_disk, caplog) -> None:
    """Opening an extension wrote its index again whatever it found: a restart on a full disk refused the bundle
    (exit 2, "make it writable by uid 0 ... chown"), so no frame was inspected.  Now the index is written only where
    what is kept differs from it, and where that write fails the rows read are served, said in the log; an unreadable
    index goes back in place, so that the next start takes the entries from their files again, not as strays."""
    folder = small_disk / "ext"
    ext = Extension(folder, C, max_rows=10)
    a, b = key(), key()
    ext.add(a, rows(2, 1.0), "f1", "cam")
    ext.add(b, rows(3, 2.0), "f2", "cam")
    filler = fill_disk(small_disk)
    same = Extension(folder, C, max_rows=10)  # nothing changed: nothing to write
    assert same.rows.shape == (5, C) and same.revision == 2
    damage(folder / f"{b}.npy", "cut")  # a change to write, which the disk refuses: served without the entry
    fill_disk(small_disk)  # full again: the cut freed some
    dropped = Extension(folder, C, max_rows=10)
    assert np.array_equal(dropped.rows, rows(2, 1.0)) and f"extension {folder}: its index cannot be written" in caplog.text
    (folder / INDEX).write_text("")  # torn: its entries are taken from their files, and it is left for the next start
    fill_disk(small_disk)
    rebuilt = Extension(folder, C, max_rows=10)
    assert [e.key for e in rebuilt.entries()] == [a] and (folder / INDEX).read_text() == ""
    filler.unlink()
    again = Extension(folder, C, max_rows=10)
    assert [e.key for e in again.entries()] == [a] and json.loads((folder / INDEX).read_text())["entries"][0]["key"] == a


def test_a_folder_deleted_under_the_worker_is_made_again_with_the_rows_in_use(tmp_path) -> None:
    """``rm -rf`` of an extension folder under a running worker (space freed by hand): every later label and
    withdrawal was refused with "free space there (learning.path)" until a restart.  The folder is made again at the
    next write, the rows in use written back into it, so a restart keeps them too; also where something else (a
    confirmed defect's guard) made the folder again first."""
    folder = tmp_path / "ext"
    ext = Extension(folder, C, max_rows=10)
    a, b, c = key(), key(), key()
    ext.add(a, rows(2, 1.0), "f1", "cam")
    ext.add(b, rows(1, 3.0), "f3", "cam")
    shutil.rmtree(folder)
    ext.add(c, rows(3, 2.0), "f2", "cam")
    assert ext.rows.shape == (6, C) and ext.revision == 3
    again = Extension(folder, C, max_rows=10)
    assert [e.frame_id for e in again.entries()] == ["f1", "f3", "f2"] and np.array_equal(again.rows, ext.rows)
    shutil.rmtree(folder)
    (folder / "guards").mkdir(parents=True)
    assert ext.remove(a) == 2
    again = Extension(folder, C, max_rows=10)
    assert [e.frame_id for e in again.entries()] == ["f3", "f2"] and np.array_equal(again.rows, ext.rows)


def test_files_an_extension_folder_does_not_write_are_left_and_not_read_as_rows(tmp_path, caplog) -> None:
    """A ``.npy`` file in an extension folder not named by a point id (a newer version's, an operator's) was deleted
    at every open as a stray entry; listed first, it was also taken for the rows' feature dimension when a folder no
    bundle serves was opened for a withdrawal (worker/models.py), so every entry was dropped as of another shape, files
    and all.  Such files are now left as they are, named once at the open, and never read as rows."""
    ext = Extension(tmp_path, C, max_rows=20)
    ext.add(key(), rows(2, 1.0), "f1", "cam")
    ext.add(key(), rows(3, 2.0), "f2", "cam")
    foreign = tmp_path / "0-centres.npy"  # sorts before every point id
    np.save(foreign, np.zeros((4, 3), np.float32))
    (tmp_path / "notes.tmp").mkdir()  # a folder with a temporary file's name is not the worker's either
    assert stored_dimension(tmp_path) == C
    again = Extension(tmp_path, C, max_rows=20)
    assert foreign.is_file() and (tmp_path / "notes.tmp").is_dir()
    assert sorted(e.frame_id for e in again.entries()) == ["f1", "f2"] and again.rows.shape == (5, C)
    said = [r.getMessage() for r in caplog.records if "0-centres.npy" in r.getMessage()]
    assert len(said) == 1 and "notes.tmp" in said[0] and "left as" in said[0], said


def test_folding_while_the_worker_absorbs_and_withdraws_reads_one_revision_whole(tmp_path) -> None:
    """``exporter fold-extension`` reads the folder a running worker keeps rewriting: a withdrawal between its
    reading the index and an entry's rows stopped the fold with "unreadable (No such file ...)", as if the disk
    were damaged, and a frame absorbed again in between gave rows the index it reported did not list.  Each read
    now returns one revision whole (its rows as its index counts them) or says the worker kept changing it."""
    ext = Extension(tmp_path, C, max_rows=400)
    keys = [key() for _ in range(8)]
    for i, k in enumerate(keys):
        ext.add(k, rows(3, float(i)), f"f{i}", "cam")
    done = threading.Event()

    def worker() -> None:
        """Withdraw and absorb again, each absorption with another number of rows than the one before."""
        try:
            for turn in range(300):
                k = keys[turn % len(keys)]
                ext.remove(k)
                ext.add(k, rows(1 + turn % 5, float(turn)), f"f{turn}", "cam")
        finally:
            done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    reads = 0
    try:
        while not done.is_set() or reads == 0:
            revision, entries, read = read_folder(tmp_path, C)
            assert sum(e.rows for e in entries) == len(read), f"revision {revision}: rows of another revision"
            reads += 1
    finally:
        thread.join()
    assert read_folder(tmp_path, C)[0] == ext.revision


def test_folding_rows_a_stopped_worker_wrote_before_its_index_counts_them_as_the_worker_does(tmp_path) -> None:
    """A worker stopped between writing a frame's new rows and the index left a count the rows do not have: the
    fold waits for an index that does not come, then counts the rows as the worker serves them at its next start."""
    ext = Extension(tmp_path, C, max_rows=20)
    a = key()
    ext.add(a, rows(3, 1.0), "f1", "cam")
    np.save(tmp_path / f"{a}.npy", rows(5, 2.0), allow_pickle=False)
    revision, entries, read = read_folder(tmp_path, C)
    assert (revision, [e.rows for e in entries], read.shape) == (1, [5], (5, C))
    assert Extension(tmp_path, C, max_rows=20).rows.shape == (5, C)
