"""Capture for retraining: a bounded, uniform, de-duplicated sample per camera that the exporter can train on."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import DAMAGE, ROOT, Client, WorkerProcess, damage, good_png, wait_online, write_config
from exporter.__main__ import build_parser
from exporter.data import load_category
from worker.api_client import ApiClient
from worker.capture import DEFECTS, EMBEDDINGS, INDEX, Capture, NoRoom, camera_folder, train_command
from worker.config import StoreConfig, load_config
from worker.labels import LabelService, SetLabel
from worker.store import VectorStore, point_id
from worker.supervise import Liveness


def image(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (24, 24, 3), dtype=np.uint8)  # unlike each other


def frame(i: int) -> bytes:
    return cv2.imencode(".png", image(i))[1].tobytes()


def png(i: int) -> Callable[[], tuple[bytes, str]]:
    return lambda: (frame(i), "png")


def test_the_sample_is_bounded_and_uniform_over_the_history(tmp_path) -> None:
    capture = Capture(tmp_path, max_frames=50, min_distance=0.0, seed=0)
    for i in range(1000):
        capture.offer("cam", f"k{i:04d}", image(i), png(i))
    counts = capture.counts()["cam"]
    assert (counts["seen"], counts["kept"], counts["false_alarms"]) == (1000, 50, 0)
    kept = sorted(int(p.stem[1:]) for p in (tmp_path / "cam").glob("k*.png"))
    assert len(kept) == 50
    assert sum(k >= 500 for k in kept) in range(15, 36)  # about half from each half of the history, not the newest 50


def test_the_sample_stops_at_its_megabytes_and_stays_uniform(tmp_path) -> None:
    """Full-resolution PNG or BMP frames fill the disk long before the frame count: the sample also stops at
    capture.max_mb, still drawn uniformly from the whole history, and when larger frames come later it drops kept
    ones until it fits again."""
    budget = 20_000
    capture = Capture(tmp_path, max_frames=500, min_distance=0.0, seed=0, max_mb=budget / 1e6)

    def on_disk() -> int:
        return sum(p.stat().st_size for p in (tmp_path / "cam").glob("k*.png"))

    for i in range(1000):
        capture.offer("cam", f"k{i:04d}", image(i), png(i))
        assert on_disk() <= budget
    kept = sorted(int(p.stem[1:]) for p in (tmp_path / "cam").glob("k*.png"))
    assert len(frame(0)) * len(kept) > budget - 2 * len(frame(0))  # full: about budget / frame size
    assert capture.counts()["cam"]["kept"] == len(kept) and capture.counts()["cam"]["mb"] == round(on_disk() / 1e6, 1)
    assert sum(k >= 500 for k in kept) in range(len(kept) // 4, len(kept) * 3 // 4 + 1)  # not the newest ones

    def large(i: int) -> np.ndarray:
        return np.random.default_rng(i).integers(0, 256, (48, 48, 3), dtype=np.uint8)

    for i in range(1000, 3000):  # the camera's resolution went up: each frame four times the bytes
        capture.offer("cam", f"k{i:04d}", large(i), lambda i=i: (cv2.imencode(".png", large(i))[1].tobytes(), "png"))
        assert on_disk() <= budget
    again = Capture(tmp_path, max_frames=500, min_distance=0.0, max_mb=budget / 1e6)  # counted again from disk
    assert again.counts()["cam"]["mb"] == round(on_disk() / 1e6, 1)


def test_near_duplicates_are_skipped(tmp_path) -> None:
    capture = Capture(tmp_path, max_frames=50, min_distance=0.01, seed=0)
    same = image(1)
    assert capture.offer("cam", "a", same, lambda: (frame(1), "png"))
    brighter = np.clip(same.astype(int) + 3, 0, 255).astype(np.uint8)  # the same part, the light a bit up
    assert not capture.offer("cam", "b", brighter, lambda: (frame(2), "png"))
    assert capture.offer("cam", "c", image(2), lambda: (frame(3), "png"))
    assert capture.counts()["cam"]["kept"] == 2


def test_state_survives_a_restart_and_exports_a_training_folder(tmp_path) -> None:
    capture = Capture(tmp_path / "cap", max_frames=20, min_distance=0.0, seed=0)
    for i in range(12):
        capture.offer("line 1/cam", f"k{i}", image(i), png(i))
    capture.add_false_alarm("line 1/cam", "fa", image(99))
    capture.add_false_alarm("line 1/cam", "gone", image(98))
    capture.remove_false_alarm("line 1/cam", "gone")
    capture.flush()  # the worker's shutdown
    again = Capture(tmp_path / "cap", max_frames=20, min_distance=0.0)
    counts = again.counts()["line 1/cam"]
    assert (counts["seen"], counts["kept"], counts["false_alarms"]) == (12, 12, 1)
    written = again.export(tmp_path / "out")
    name = camera_folder("line 1/cam")
    assert "/" not in name and name != "line 1/cam"
    assert written == {"line 1/cam": {"folder": str(tmp_path / "out" / name), "normal": 12, "false_alarms": 1,
                                      "confirmed_defects": 0}}
    category = load_category(tmp_path / "out", name)
    assert len(category.train) == 13 and category.test == []


def test_two_cameras_never_share_a_capture_folder(tmp_path) -> None:
    """Camera ``line_1-04e33246`` (``line 1`` as earlier versions hashed it) was given camera ``line 1``'s folder: each
    deleted the other's frames as strays, the export failed half-written ("already holds 1 files") and after a restart
    one camera's sample was gone (a helper's probe).  Each camera has a folder of its own, also where another
    camera's index already lies in the one its id maps to, and plain ids keep the folder they had."""
    crafted = "line_1-" + hashlib.sha1(b"line 1").hexdigest()[:8]
    assert camera_folder("line 1") == crafted and camera_folder("line1") == "line1"  # as before: their samples stay
    capture = Capture(tmp_path / "cap", max_frames=20, min_distance=0.0, seed=0)
    (tmp_path / "cap" / camera_folder("cam 2")).mkdir(parents=True)  # another id with the short hash of "cam 2"
    (tmp_path / "cap" / camera_folder("cam 2") / INDEX).write_text(json.dumps({"camera": "other", "seen": 1,
                                                                              "files": ["o.png"]}))
    (tmp_path / "cap" / camera_folder("cam 2") / "o.png").write_bytes(frame(9))
    for i, camera in enumerate(("line 1", crafted, "line 1", crafted, "-x", "cam 2")):
        assert capture.offer(camera, f"{camera[:2]}{i}", image(i), png(i))
    assert (tmp_path / "cap" / camera_folder("cam 2") / "o.png").read_bytes() == frame(9)
    capture.flush()
    again = Capture(tmp_path / "cap", max_frames=20, min_distance=0.0)
    assert {c: n["kept"] for c, n in again.counts().items()} == {"line 1": 2, crafted: 2, "-x": 1, "cam 2": 1}
    written = again.export(tmp_path / "out")
    folders = {c: w["folder"] for c, w in written.items()}
    assert len(set(folders.values())) == 4 and not any(Path(f).name.startswith("-") for f in folders.values())
    for camera, folder in folders.items():
        assert len(list((Path(folder) / "good").iterdir())) == written[camera]["normal"]


def test_the_printed_train_command_gives_the_exporter_the_exact_folder_and_category(tmp_path) -> None:
    """``--category -x`` was read by the exporter's argparse as an option (the command failed as printed), and an
    export folder with a space was split in two by the shell."""
    capture = Capture(tmp_path / "cap", max_frames=5, min_distance=0.0)
    capture.offer("-x", "a", image(1), png(1))
    out = tmp_path / "capture exports" / "-x"
    folder = Path(capture.export(out)["-x"]["folder"])
    for category in (folder.name, "-x", "line 1's"):
        argv = shlex.split(train_command(out, category, None))
        assert argv[:4] == ["python", "-m", "exporter", "train"]
        args = build_parser().parse_args(argv[3:])
        assert (Path(args.data), args.category) == (out, category)
    assert load_category(out, folder.name).train


def test_the_printed_train_command_trains_the_recipe_the_camera_runs(dataset, tmp_path) -> None:
    """The command printed for a capture export kept only the serving bundle's family and input size: a camera
    served the fast setting (EfficientNet-Lite1, a 1500-row bank, no screen, d4 views) got a command that trained
    the exporter's defaults, another backbone.  It now names the serving bundle's whole PatchCore recipe, and the
    bundle it trains records the same one."""
    from bundle import read_manifest
    from conftest import train_bundle

    serving = train_bundle(dataset, tmp_path / "serving", "--backbone", "efficientnet_lite1", "--max-bank", "300",
                           "--screen-rows", "0", "--bank-views", "flips")
    command = train_command(dataset, "weave", None, read_manifest(serving, verify=False))
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "exporter", "train"] and argv[-2:] == ["--out", "BUNDLE"], command
    proc = subprocess.run([sys.executable, *argv[1:-1], str(tmp_path / "next")], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = (read_manifest(b, verify=False).training for b in (serving, tmp_path / "next"))
    assert before["backbone"] == "efficientnet_lite1" and before["bank_views"] == "flips", before
    recipe = ("input_size", "backbone", "layers", "coreset_ratio", "neighbourhood", "max_bank", "image_score",
              "bank_views", "screen_rows", "refine", "unrefined", "map_alignment", "layer_alignment",
              "extension_candidates")
    assert {k: after[k] for k in recipe} == {k: before[k] for k in recipe}, command


@pytest.mark.parametrize("dropped", [
    # what an exporter of 2026-11-30 did not record: the options it did not have
    ("neighbourhood", "image_score", "bank_views", "screen_rows", "refine", "unrefined", "map_alignment",
     "layer_alignment", "tiling", "tile_overlap", "frame_sizes", "trained_images", "map_offset_px", "layer_shift_px"),
    # and one of 2026-12-04
    ("map_alignment", "layer_alignment", "frame_sizes", "trained_images", "map_offset_px", "layer_shift_px"),
], ids=["2026-11-30", "2026-12-04"])
def test_the_printed_train_command_trains_the_recipe_an_older_bundle_runs(bundle_dir, tmp_path, dropped) -> None:
    """A box upgraded with its bundles kept: a bundle exported before --screen-rows or --map-alignment existed does
    not record them, and the command printed for its camera's capture left them out, so the exporter's defaults of
    today trained a screened bank and a centred map, another model than the one the camera runs.  It now names what
    such a bundle was trained with."""
    from bundle import MANIFEST, read_manifest

    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    manifest["training"] = {k: v for k, v in manifest["training"].items() if k not in dropped}
    older = tmp_path / "older"
    older.mkdir()
    (older / MANIFEST).write_text(json.dumps(manifest))
    argv = shlex.split(train_command(tmp_path / "capture", "line1", None, read_manifest(older, verify=False)))
    args = build_parser().parse_args(argv[3:])
    kept = manifest["training"]
    assert (args.screen_rows, args.map_alignment) == (kept.get("screen_rows", 0), "anomalib"), argv
    assert (args.backbone, args.max_bank) == (kept["backbone"], kept["max_bank"]), argv


def test_the_printed_train_command_keeps_the_candidates_a_bundle_got_by_default(bundle_dir, tmp_path) -> None:
    """A bundle trained without --extension-candidates records it unset; the default share of the frame changed
    on 2026-12-07 (a sixteenth to a 32nd), so the command printed for its camera left it out and the next bundle
    checked half as many patches against the extension as the one the camera runs.  It now names the bundle's K."""
    from bundle import MANIFEST, read_manifest

    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    manifest["training"]["extension_candidates"] = None
    unset = tmp_path / "unset"
    unset.mkdir()
    (unset / MANIFEST).write_text(json.dumps(manifest))
    argv = shlex.split(train_command(tmp_path / "capture", "line1", None, read_manifest(unset, verify=False)))
    args = build_parser().parse_args(argv[3:])
    assert args.extension_candidates == manifest["extension"]["candidates"], argv


def test_the_printed_train_command_on_another_box_refuses_other_backbone_weights_at_its_path(dataset, bundle_dir,
                                                                                             tmp_path) -> None:
    """A serving bundle trained with ``--backbone-weights FILE`` got a command naming that file by its path on the
    box that trained it: on another box another weights file there trained another model without a word, and a file
    not there stopped the run only after the data was read.  The command now carries the file's sha256 (the bundle's
    ``training.backbone_weights_sha256``): another file, or none, is refused before the data is read, naming it."""
    import torch

    from bundle import read_manifest
    from conftest import train_bundle
    from exporter.backbones import OFFLINE, _package_file

    weights = tmp_path / "box" / "lite0.pth"
    weights.parent.mkdir()
    shutil.copyfile(_package_file(OFFLINE["efficientnet_lite0"]), weights)
    serving = train_bundle(dataset, tmp_path / "serving", "--backbone-weights", str(weights))
    manifest = read_manifest(serving, verify=False)
    wanted = manifest.training["backbone_weights_sha256"]
    argv = shlex.split(train_command(dataset, "weave", None, manifest))
    assert argv[argv.index("--backbone-weights") + 1] == str(weights), argv
    assert argv[argv.index("--backbone-weights-sha256") + 1] == wanted, argv
    run = [sys.executable, *argv[1:-1], str(tmp_path / "next")]
    state = torch.load(weights, map_location="cpu", weights_only=True)
    first = next(iter(state))
    torch.save({**state, first: state[first] + 0.01}, weights)  # other weights of the same network at that path
    proc = subprocess.run(run, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 2 and "data:" not in proc.stdout, (proc.stdout, proc.stderr[-3000:])
    actual = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert (f"error: backbone weights file {weights} has sha256 {actual}, not {wanted} as --backbone-weights-sha256 "
            "asks") in proc.stderr, proc.stderr[-3000:]
    weights.unlink()
    proc = subprocess.run(run, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 2 and "data:" not in proc.stdout, (proc.stdout, proc.stderr[-3000:])
    assert (f"error: backbone weights file {weights} not found: --backbone-weights-sha256 asks for the file of sha256 "
            f"{wanted}") in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "next").exists()
    offline = train_command(dataset, "weave", None, read_manifest(bundle_dir, verify=False))
    assert "--backbone-weights" not in offline, offline  # the package's weights: no file to name


def test_a_sample_in_the_folder_an_earlier_version_gave_its_camera_is_kept(tmp_path) -> None:
    """Ids that now map to another folder (one ending like a hash, one starting with ``-``) keep their sample."""
    capture = Capture(tmp_path / "cap", max_frames=20, min_distance=0.0, seed=0)
    for i, camera in enumerate(("line-20261205", "-x")):
        capture.offer(camera, "k", image(i), png(i))
    capture.flush()
    for camera in ("line-20261205", "-x"):  # where earlier versions kept them
        (tmp_path / "cap" / camera_folder(camera)).rename(tmp_path / "cap" / camera)
    reader = Capture(tmp_path / "cap", max_frames=20, min_distance=0.0, read_only=True)
    assert {c: n["kept"] for c, n in reader.counts().items()} == {"line-20261205": 1, "-x": 1}
    again = Capture(tmp_path / "cap", max_frames=20, min_distance=0.0)
    assert {c: n["kept"] for c, n in again.counts().items()} == {"line-20261205": 1, "-x": 1}
    assert sorted(p.name for p in (tmp_path / "cap").iterdir()) == sorted(map(camera_folder, ("line-20261205", "-x")))
    assert again.export(tmp_path / "out")["-x"]["normal"] == 1


def test_files_the_sample_does_not_write_are_left_and_named(tmp_path, caplog) -> None:
    """A camera's sample folder holding files the worker does not write (a newer version's state file, met by a
    worker rolled back; an operator's notes): every start deleted them without a word, as it deletes the images a
    crash left unlisted.  Those are still deleted; the others are left, named, and not exported."""
    capture = Capture(tmp_path / "cap", max_frames=5, min_distance=0.0, seed=0)
    capture.offer("cam", "a", image(1), png(1))
    capture.flush()
    folder = tmp_path / "cap" / "cam"
    (folder / "b.png").write_bytes(frame(2))  # kept, then a crash before the index listed it
    (folder / "c.png.tmp").write_bytes(b"cut")
    (folder / "index.json.tmp").write_text("{")
    (folder / "labels.v2.json").write_text("{}")
    (folder / "notes.txt").write_text("lens cleaned on Monday")
    again = Capture(tmp_path / "cap", max_frames=5, min_distance=0.0)
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", INDEX, "labels.v2.json", "notes.txt", EMBEDDINGS]
    assert (folder / "notes.txt").read_text() == "lens cleaned on Monday"
    said = [r.getMessage() for r in caplog.records if r.name == "worker.capture" and r.levelname == "WARNING"]
    assert len(said) == 1 and "labels.v2.json, notes.txt" in said[0] and "left as they are" in said[0], said
    assert again.export(tmp_path / "out")["cam"]["normal"] == 1
    assert sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file()) == ["a.png"]


def test_a_state_listing_its_files_in_another_layout_keeps_its_images(tmp_path) -> None:
    """An index whose ``files`` are not file names (another version's layout, each file a record) was read as the
    names' text: no file matched, and every image of the sample was deleted as unlisted.  It is rebuilt from them."""
    capture = Capture(tmp_path, max_frames=5, min_distance=0.0)
    capture.offer("cam", "a", image(1), png(1))
    capture.offer("cam", "b", image(2), png(2))
    capture.flush()
    index = json.loads((tmp_path / "cam" / INDEX).read_text())
    index["files"] = [{"name": name, "bytes": 1} for name in index["files"]]
    (tmp_path / "cam" / INDEX).write_text(json.dumps(index))
    again = Capture(tmp_path, max_frames=5, min_distance=0.0)
    assert again.counts()["cam"]["kept"] == 2
    assert sorted(p.name for p in (tmp_path / "cam").glob("*.png")) == ["a.png", "b.png"]


def test_a_file_manager_s_file_among_false_alarms_is_not_exported_as_an_image(tmp_path, caplog) -> None:
    """Windows' Thumbs.db, or macOS's ``._<name>.png`` beside an image, in a camera's false-alarm or confirmed-defect
    folder (browsed over a share) was taken for a kept image: counted (the export's answer and the counts said two
    false alarms and two defects for one of each) and copied into good/ and test/.  They are left as they are,
    named, and not exported."""
    capture = Capture(tmp_path / "cap", max_frames=5, min_distance=0.0, seed=0)
    capture.offer("cam", "a", image(1), png(1))
    capture.add_false_alarm("cam", "fa", image(2))
    capture.add_defect("cam", "d", image(3))
    for sub in ("false_alarm", DEFECTS):
        (tmp_path / "cap" / "cam" / sub / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (tmp_path / "cap" / "cam" / "false_alarm" / "._fa.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    again = Capture(tmp_path / "cap", max_frames=5, min_distance=0.0)
    assert again.export(tmp_path / "out")["cam"] == {"folder": str(tmp_path / "out" / "cam"), "normal": 1,
                                                     "false_alarms": 1, "confirmed_defects": 1}
    assert not list((tmp_path / "out").rglob("Thumbs.db")) and not list((tmp_path / "out").rglob("._fa.png"))
    assert all((tmp_path / "cap" / "cam" / sub / "Thumbs.db").is_file() for sub in ("false_alarm", DEFECTS))
    assert caplog.text.count("Thumbs.db") == 2 and "not exported" in caplog.text
    assert load_category(tmp_path / "out", "cam").train  # the exporter reads the export as a training set


def test_an_unreadable_state_is_rebuilt_from_its_images(tmp_path) -> None:
    """A torn index started the sample afresh and deleted its images, which a power cut had left whole."""
    capture = Capture(tmp_path, max_frames=5, min_distance=0.0)
    capture.offer("cam", "a", image(1), lambda: (frame(1), "png"))
    (tmp_path / "cam" / INDEX).write_text("{torn")
    again = Capture(tmp_path, max_frames=5, min_distance=0.0)
    assert again.offer("cam", "b", image(2), lambda: (frame(2), "png"))
    assert json.loads((tmp_path / "cam" / INDEX).read_text())["files"] == ["a.png", "b.png"]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_signatures_are_computed_again_from_the_images(tmp_path, how) -> None:
    """The worker's start read them unguarded: an emptied file stopped it with EOFError, a restart loop; then the
    sample started afresh and deleted its images.  The signatures are computed again from them."""
    capture = Capture(tmp_path, max_frames=5, min_distance=0.0)
    capture.offer("cam", "a", image(1), png(1))
    capture.flush()
    damage(tmp_path / "cam" / EMBEDDINGS, how)
    again = Capture(tmp_path, max_frames=5, min_distance=0.05)
    assert again.counts()["cam"]["kept"] == 1
    assert not again.offer("cam", "a2", image(1), png(1))  # a near-duplicate of the kept one, by its new signature
    assert again.offer("cam", "b", image(2), png(2)) and again.counts()["cam"]["kept"] == 2


def test_a_reader_beside_the_running_worker_changes_nothing(tmp_path) -> None:
    """The export CLI opens the folder read-only: frames the worker kept since its last state write stay on disk."""
    worker = Capture(tmp_path / "cap", max_frames=20, min_distance=0.0, seed=0)
    for i in range(5):
        worker.offer("cam", f"k{i}", image(i), png(i))  # the first one wrote the state; the others not yet
    files = sorted(p.name for p in (tmp_path / "cap" / "cam").iterdir())
    written = Capture(tmp_path / "cap", max_frames=20, min_distance=0.0, read_only=True).export(tmp_path / "out")
    assert written["cam"]["normal"] == 1
    assert sorted(p.name for p in (tmp_path / "cap" / "cam").iterdir()) == files
    worker.flush()
    assert Capture(tmp_path / "cap", max_frames=20, min_distance=0.0, read_only=True).counts()["cam"]["kept"] == 5


def test_cameras_past_the_bound_are_counted_not_sampled_even_after_a_restart(tmp_path) -> None:
    """Where any topic level is accepted as a camera, a client that invents camera ids must not fill the disk: at most
    ``max_cameras`` cameras get a sample (those on disk count after a restart); a false alarm is kept regardless."""
    capture = Capture(tmp_path, max_frames=5, min_distance=0.0, seed=0, max_cameras=2)
    for i in range(6):
        for camera in ("a", "b", "c"):
            capture.offer(camera, f"{camera}{i}", image(i), png(i))
    assert sorted(capture.counts()) == ["a", "b"] and capture.counts()["b"]["kept"] == 5
    assert capture.skipped_frames == 6 and not (tmp_path / "c").exists()
    capture.flush()

    again = Capture(tmp_path, max_frames=5, min_distance=0.0, seed=0, max_cameras=2)
    assert not again.offer("d", "d0", image(0), png(0)) and again.skipped_frames == 1
    again.offer("a", "a9", image(9), png(9))
    assert again.counts()["a"]["seen"] == 7  # a camera with a sample goes on
    again.add_false_alarm("e", "e0", image(1))
    assert again.counts()["e"]["false_alarms"] == 1
    # a camera known for a false alarm, or an unlabel, gets no sample past the bound
    again.remove_false_alarm("f", "f0")
    assert not (tmp_path / "f").exists() and "f" not in again.counts()
    for camera in ("e", "f"):
        assert not again.offer(camera, f"{camera}1", image(2), png(2))
    assert again.skipped_frames == 3 and again.counts()["e"]["kept"] == 0


def test_a_frame_labelled_a_defect_leaves_the_sample_and_an_export_does_not_merge(tmp_path) -> None:
    """A normal-scored frame the operator confirmed as a defect stayed in the captured good frames, and an export
    into an earlier one's folder kept files the sample had since dropped: the next model learnt them as good."""
    capture = Capture(tmp_path / "cap", max_frames=5, min_distance=0.0, seed=0)
    for i in range(3):
        capture.offer("cam", f"k{i}", image(i), png(i))
    assert capture.forget("cam", "k1") and not capture.forget("cam", "k1") and not capture.forget("other", "k0")
    written = capture.export(tmp_path / "out")
    assert written["cam"]["normal"] == 2
    assert sorted(p.stem for p in (tmp_path / "out" / "cam" / "good").iterdir()) == ["k0", "k2"]
    capture.flush()
    assert Capture(tmp_path / "cap", max_frames=5, min_distance=0.0).counts()["cam"]["kept"] == 2  # after a restart
    assert [p.stem for p in (tmp_path / "out" / "cam" / DEFECTS).iterdir()] == ["k1"]  # see the next test
    with pytest.raises(FileExistsError, match="already holds 3 files: export to a new folder"):
        capture.export(tmp_path / "out")


def test_a_withdrawn_defect_label_puts_the_frame_back_in_the_sample(tmp_path) -> None:
    """A normal frame mistakenly confirmed as a defect, then unlabelled, was deleted from the sample for good (a
    helper's probe): it goes back where the sample has room, also after a restart, as it does when the label is
    changed to a false alarm; a sample full since drops it as before."""
    capture = Capture(tmp_path / "cap", max_frames=4, min_distance=0.0, seed=0)
    for i in range(3):
        capture.offer("cam", f"k{i}", image(i), png(i))
    assert capture.forget("cam", "k1") and capture.forget("cam", "k2")
    capture.flush()
    capture = Capture(tmp_path / "cap", max_frames=4, min_distance=0.0, seed=0)  # a restart in between
    assert capture.remove_defect("cam", "k1") == "back"
    assert capture.remove_defect("cam", "k2") == "back" and capture.forget("cam", "k2")  # made a false alarm: back, too
    assert (capture.counts()["cam"]["kept"], capture.counts()["cam"]["confirmed_defects"]) == (2, 1)
    assert capture.offer("cam", "k3", image(3), png(3)) and capture.offer("cam", "k4", image(4), png(4))
    assert capture.forget("cam", "k4")
    assert capture.offer("cam", "k5", image(5), png(5))  # the sample is full again
    assert capture.remove_defect("cam", "k4") == "removed"
    assert capture.forget("cam", "k3") and not capture.offer("cam", "k3", image(6), png(6))  # the id reused
    assert capture.forget("cam", "k0")  # room in the sample again
    assert capture.remove_defect("cam", "k3") == "back"  # the labelled frame, not the later one of its id
    capture.flush()
    again = Capture(tmp_path / "cap", max_frames=4, min_distance=0.0)
    assert (again.counts()["cam"]["kept"], again.counts()["cam"]["confirmed_defects"]) == (3, 2)
    again.export(tmp_path / "out")
    assert sorted(p.stem for p in (tmp_path / "out" / "cam" / "good").iterdir()) == ["k1", "k3", "k5"]
    assert cv2.imread(str(tmp_path / "out" / "cam" / "good" / "k3.png")).tobytes() == image(3).tobytes()


def test_confirmed_defects_are_the_exports_test_images(tmp_path) -> None:
    """A capture export held good frames only, so the next bundle trained on it was exported unevaluated: it missed
    the very defect the operator had confirmed, and nothing said so (a helper's probe).  Confirmed defects, moved out
    of the sample or kept from their stored frame, are exported beside good/, which the exporter reads as a labelled
    set: it holds some good frames out and evaluates the new bundle on them and the defects."""
    capture = Capture(tmp_path / "cap", max_frames=20, min_distance=0.0, seed=0)
    for i in range(10):
        capture.offer("cam", f"k{i}", image(i), png(i))
    assert capture.forget("cam", "k3")  # scored normal and captured: moved
    capture.add_defect("cam", "flagged", image(50))  # scored anomalous: from its stored frame
    capture.add_defect("cam", "withdrawn", image(51))
    capture.remove_defect("cam", "withdrawn")
    capture.flush()
    again = Capture(tmp_path / "cap", max_frames=20, min_distance=0.0)
    assert (again.counts()["cam"]["kept"], again.counts()["cam"]["confirmed_defects"]) == (9, 2)
    written = again.export(tmp_path / "out")
    assert written["cam"]["confirmed_defects"] == 2
    category = load_category(tmp_path / "out", "cam")
    defects = sorted(s.path.stem for s in category.test if s.label)
    assert defects == ["flagged", "k3"] and len(category.test) == 4 and len(category.train) == 7, category.test


def test_the_export_cli_says_when_it_cannot_write_the_training_folder(tmp_path, capsys) -> None:
    """An --out below a file (or on a full disk) gave a traceback."""
    from worker.__main__ import main

    capture = Capture(tmp_path / "cap", max_frames=5, min_distance=0.0)
    capture.offer("cam", "a", image(1), png(1))
    capture.flush()
    (tmp_path / "c.yaml").write_text(f"model: {{bundle: b}}\ncapture: {{path: {tmp_path / 'cap'}}}\n")
    (tmp_path / "a-file").write_text("")
    assert main(["capture", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "a-file" / "out")]) == 2
    assert f"error: the training folder cannot be written under {tmp_path / 'a-file' / 'out'}" in capsys.readouterr().err



def test_the_export_cli_trains_the_recipe_of_the_bundle_rolled_out_to_the_camera(bundle_dir, tmp_path, capsys) -> None:
    """``python -m worker capture`` printed the recipe of the bundle config.yaml names, where a reload had rolled out
    another one (a canary, kept in rollout.json over restarts and an upgrade): the command trained another model than
    the one the camera runs.  It now reads rollout.json as the worker's start does; where config.yaml names another
    bundle since, config.yaml's serves and is named."""
    from bundle import MANIFEST
    from worker.__main__ import main

    canary = tmp_path / "canary"
    shutil.copytree(bundle_dir, canary)
    manifest = json.loads((canary / MANIFEST).read_text())
    manifest["training"]["max_bank"] = 321  # another recipe than the default's bundle
    (canary / MANIFEST).write_text(json.dumps(manifest))
    capture = Capture(tmp_path / "cap", max_frames=5, min_distance=0.0)
    for i, camera in enumerate(("cam", "other", "edited")):
        capture.offer(camera, "a", image(i), png(i))
    capture.flush()
    edited = tmp_path / "edited-since"
    shutil.copytree(bundle_dir, edited)
    config = write_config(tmp_path / "w", 1883, bundle_dir, cameras={"edited": {"bundle": str(edited)}},
                          capture={"path": str(tmp_path / "cap")})
    (tmp_path / "w" / "rollout").mkdir()
    scopes = {"default": {"bundle": str(bundle_dir), "configured": str(bundle_dir), "previous": None},
              "cam": {"bundle": str(canary), "configured": str(bundle_dir), "previous": None},  # a canary
              "edited": {"bundle": str(canary), "configured": str(bundle_dir), "previous": None}}  # config.yaml's since
    (tmp_path / "w" / "rollout" / "rollout.json").write_text(json.dumps({"scopes": scopes}))
    assert main(["capture", "--config", str(config), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    commands = {line.split(":")[0]: next_line for line, next_line in zip(printed.splitlines(), printed.splitlines()[1:],
                                                                          strict=False) if line.endswith("train with")}
    default_bank = json.loads((bundle_dir / MANIFEST).read_text())["training"]["max_bank"]
    assert "--max-bank 321 " in commands["cam"], printed
    assert f"--max-bank {default_bank} " in commands["other"] and f"--max-bank {default_bank} " in commands["edited"], \
        printed


def test_the_export_cli_names_a_capture_folder_it_may_not_read(tmp_path) -> None:
    """Run by an operator's login beside a worker whose service umask makes its folders 0750 or 0700, the export
    said "nothing captured" (a folder it may not list read as empty), or "the training folder cannot be written
    under --out" where it may not enter it: the operator looked at the sample or at --out.  It now names the capture
    folder and whose it is to read."""
    capture = Capture(tmp_path / "cap", max_frames=5, min_distance=0.0)
    capture.offer("cam", "a", image(1), png(1))
    capture.flush()
    (tmp_path / "c.yaml").write_text(f"model: {{bundle: b}}\ncapture: {{path: {tmp_path / 'cap'}}}\n")
    # root reads every folder: without its capabilities it is held to the modes, as any other login is
    unprivileged = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"] if os.geteuid() == 0 else []
    if unprivileged and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: the folder's mode does not hold root")
    (tmp_path / "cap").chmod(0o000)
    try:
        proc = subprocess.run([*unprivileged, sys.executable, "-m", "worker", "--config", str(tmp_path / "c.yaml"),
                               "capture", "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
    finally:
        (tmp_path / "cap").chmod(0o700)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: the captured frames in {tmp_path / 'cap'} cannot be read (Permission "
                                  "denied): run this as the worker's user"), proc.stderr
    assert not (tmp_path / "out").exists()

_CLI_UNDER_A_SIZE_LIMIT = """
import resource, sys
from worker.__main__ import main
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.exit(main(["capture", "--config", sys.argv[1], "--out", sys.argv[2]]))
"""


def test_the_export_cli_leaves_no_camera_folder_cut_short(tmp_path) -> None:
    """``python -m worker capture --out DIR`` wrote straight into DIR/<camera>/good/: on a full disk it left the
    frames copied so far and one cut short, which the exporter reads as a training set, and a second try was refused
    as merging.  Under a file-size limit (RLIMIT_FSIZE, as in the test above) it now fails with exit 2 and leaves
    DIR empty; without the limit the same command writes every frame."""
    capture = Capture(tmp_path / "cap", max_frames=20, min_distance=0.0)
    for i in range(3):
        frame_image = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        capture.offer("cam", f"k{i}", frame_image, lambda f=frame_image: (cv2.imencode(".png", f)[1].tobytes(), "png"))
    capture.flush()
    (tmp_path / "c.yaml").write_text(f"model: {{bundle: b}}\ncapture: {{path: {tmp_path / 'cap'}}}\n")
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", _CLI_UNDER_A_SIZE_LIMIT, str(tmp_path / "c.yaml"), str(out), "4096"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "error: the training folder cannot be written" in done.stderr, done
    assert list(out.iterdir()) == []
    done = subprocess.run([sys.executable, "-c", _CLI_UNDER_A_SIZE_LIMIT, str(tmp_path / "c.yaml"), str(out),
                           str(10**9)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done
    assert len(list((out / "cam" / "good").iterdir())) == 3 and [p.name for p in out.iterdir()] == ["cam"]


def test_an_export_its_disk_has_no_room_for_is_refused_before_it_writes(tmp_path, capsys) -> None:
    """An export wrote until its disk was full, which it shares with the store, the evidence and the sample (each
    then failing for a while): now it is refused before it writes anything when the disk lacks what it takes plus
    the room kept for the worker's other writes (``store.min_free_mb``), and says how much.  Here that room is all
    the disk has free; with none kept the same export is written."""
    from worker.__main__ import main

    capture = Capture(tmp_path / "cap", max_frames=5, min_distance=0.0)
    for i in range(3):
        capture.offer("cam", f"k{i}", image(i), png(i))
    capture.flush()
    exports = tmp_path / "training"
    with pytest.raises(NoRoom, match=r"the export takes [\d.]+ [KM]B and its disk has [\d.]+ [KM]B free, [\d.]+ [KM]B "
                                     "of which stay") as refused:
        capture.export_new(exports, "T", reserve=shutil.disk_usage(tmp_path).free)
    assert "takes 0 MB" not in str(refused.value) and " KB " in str(refused.value)  # a small export said "0 MB"
    assert list(exports.iterdir()) == []
    folder, written = capture.export_new(exports, "T")
    assert written["cam"]["normal"] == 3 and len(list((folder / "cam" / "good").iterdir())) == 3
    (tmp_path / "c.yaml").write_text(f"model: {{bundle: b}}\ncapture: {{path: {tmp_path / 'cap'}}}\n"
                                     f"store: {{min_free_mb: {shutil.disk_usage(tmp_path).free // 2**20 + 1}}}\n")
    assert main(["capture", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "cli")]) == 2
    assert "MB of which stay free for the worker's other writes" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()
    (tmp_path / "c.yaml").write_text(f"model: {{bundle: b}}\ncapture: {{path: {tmp_path / 'cap'}}}\n"
                                     "store: {min_free_mb: 0}\n")
    assert main(["capture", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "cli")]) == 0
    said = capsys.readouterr()  # what was written, and that three good images are too few to train on
    assert "cam: 3 normal frames, 0 false alarms in " in said.out
    assert "note: cam has 3 good images; train needs at least 8" in said.err


def test_an_export_does_not_hold_up_the_frames_offered_meanwhile(tmp_path, monkeypatch) -> None:
    """An export copied the whole sample under the lock an inference thread takes to offer a frame: a large export
    (gigabytes, on an edge box's disk) stalled every inference thread for as long, so frames were dropped and the
    watchdog's deadline ran down.  The copy now runs outside that lock.  Here the export is held inside its first
    copy (the real copy, behind a gate) while an inference thread offers a frame: the offer completes, and the export
    then holds the sample as it was listed."""
    capture = Capture(tmp_path / "cap", max_frames=10, min_distance=0.0)
    for i in range(3):
        capture.offer("cam", f"k{i}", image(i), png(i))
    inside, go_on = threading.Event(), threading.Event()
    real_copy = shutil.copyfile

    def gated(source, target, **kwargs):
        inside.set()
        go_on.wait(60)
        return real_copy(source, target, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", gated)
    exported: list = []
    export = threading.Thread(target=lambda: exported.append(capture.export_new(tmp_path / "training", "T")))
    export.start()
    try:
        assert inside.wait(60), "the export never began to copy"
        offer = threading.Thread(target=capture.offer, args=("cam", "k9", image(9), png(9)))
        offer.start()
        offer.join(20)
        waited = offer.is_alive()
    finally:
        go_on.set()
        export.join(60)
    offer.join(60)
    assert not waited, "the frame waited for the export"
    (folder, written), = exported
    assert written["cam"]["normal"] == 3 and len(list((folder / "cam" / "good").iterdir())) == 3
    assert capture.counts()["cam"]["kept"] == 4


def test_each_file_an_export_copies_is_progress_for_the_watchdog(tmp_path) -> None:
    """An export runs on the request thread, which the watchdog took for stuck once one piece of its work had lasted
    ``worker.watchdog_s`` (exit 3, for a restart): an export of gigabytes on a slow disk restarted the worker.  Each
    file copied is now progress, so the thread is stuck only when one file takes that long."""
    capture = Capture(tmp_path / "cap", max_frames=10, min_distance=0.0)
    for i in range(3):
        capture.offer("cam", f"k{i}", image(i), png(i))
    liveness = Liveness(stuck_after_s=60)
    copied_at: list[float] = []

    def progress() -> None:
        liveness.progress("requests")
        copied_at.append(time.monotonic())

    with liveness.busy("requests"):
        began = liveness.register("requests").busy_since
        capture.export_new(tmp_path / "training", "T", progress=progress)
        moved = liveness.register("requests").busy_since
        assert len(copied_at) == 3 and began is not None and moved is not None
        assert began < copied_at[0] < moved  # the busy start moved with the last file
        assert liveness.problems(now=moved + 59) == []
        assert liveness.problems(now=moved + 61) == ["requests: stuck for 61 s"]  # a stall after it is still seen


def test_a_camera_that_reuses_frame_ids_keeps_one_file_per_id_and_loses_no_label(tmp_path) -> None:
    """A camera whose frame counter restarts sends ids again (a helper's probes): the sample listed the name twice
    (the counts off the disk, a withdrawn defect not put back), a later normal frame sampled under a confirmed
    defect's id was moved over the defect's image at the next label, and one under a false alarm's id overwrote it
    (or was overwritten) in the export's good/.  A later frame takes its id's slot; one under a labelled id is not
    sampled; a false alarm takes a sampled frame of its id out; a defect's image is never replaced."""
    capture = Capture(tmp_path / "cap", max_frames=5, min_distance=0.0, seed=0)
    assert capture.offer("cam", "k0", image(0), png(0))
    assert capture.offer("cam", "k0", image(1), png(1))  # the counter restarted: the later frame takes the slot
    capture.flush()
    assert json.loads((tmp_path / "cap" / "cam" / INDEX).read_text())["files"] == ["k0.png"]
    assert capture.counts()["cam"]["kept"] == 1
    assert capture.forget("cam", "k0") and capture.remove_defect("cam", "k0") == "back"
    assert capture.counts()["cam"]["kept"] == 1
    assert cv2.imread(str(tmp_path / "cap" / "cam" / "k0.png")).tobytes() == image(1).tobytes()

    capture.add_defect("cam", "d", image(10))
    assert not capture.offer("cam", "d", image(11), png(11))  # the id of a confirmed defect: not sampled
    assert not capture.forget("cam", "d")  # the label edited: the defect's image stays
    capture.add_false_alarm("cam", "f", image(12))
    assert not capture.offer("cam", "f", image(13), png(13))  # the id of a false alarm: not sampled
    assert capture.offer("cam", "g", image(14), png(14))
    capture.add_false_alarm("cam", "g", image(15))  # the camera reused a sampled frame's id for a flagged one: it
    # takes the sampled one out, else both were exported as good/g.png
    assert capture.offer("cam", "h", image(16), png(16))
    capture.add_defect("cam", "h", image(17))  # as an earlier version left it: the sample and the defects hold h
    assert capture.forget("cam", "h")  # the sampled frame leaves, the defect's image stays
    defects = tmp_path / "cap" / "cam" / DEFECTS
    assert cv2.imread(str(defects / "d.png")).tobytes() == image(10).tobytes()
    assert cv2.imread(str(defects / "h.png")).tobytes() == image(17).tobytes()
    capture.flush()
    again = Capture(tmp_path / "cap", max_frames=5, min_distance=0.0)
    assert (again.counts()["cam"]["kept"], again.counts()["cam"]["false_alarms"]) == (1, 2)
    again.export(tmp_path / "out")
    good = {p.name: cv2.imread(str(p)).tobytes() for p in (tmp_path / "out" / "cam" / "good").iterdir()}
    assert good == {"k0.png": image(1).tobytes(), "f.png": image(12).tobytes(), "g.png": image(15).tobytes()}


def _history(tmp_path, capture: Capture, frames: dict[str, str]) -> tuple[LabelService, VectorStore]:
    """A real store holding ``frames`` (frame id: verdict) of camera "cam", and the label service over it and
    ``capture`` (no learning, no evidence)."""
    store = VectorStore(StoreConfig(path=tmp_path / "qdrant"), 8)
    now = time.time()
    store.upsert([(point_id("cam", fid), np.ones(8, np.float32), {"camera": "cam", "frame_id": fid, "verdict": verdict,
                                                                 "received_ts": now, "captured_ts": now})
                  for fid, verdict in frames.items()])
    return LabelService(lambda: nullcontext(store), capture=capture), store


def test_a_confirmed_defect_corrected_to_a_false_alarm_goes_back_among_the_normal_frames(tmp_path) -> None:
    """A sampled normal frame mistakenly confirmed as a defect, then corrected to a false alarm (normal, by the
    operator's word), was deleted from the capture entirely (a helper's probe): it goes back as if withdrawn."""
    capture = Capture(tmp_path / "cap", max_frames=5, min_distance=0.0, seed=0)
    key = point_id("cam", "n-0")
    assert capture.offer("cam", key, image(0), png(0))
    labels, store = _history(tmp_path, capture, {"n-0": "normal"})
    confirmed = labels.set(SetLabel(action="set", frame_id="n-0", camera="cam", label="confirmed_defect"), store)
    assert confirmed["capture"] == "taken out of the captured normal frames"
    corrected = labels.set(SetLabel(action="set", frame_id="n-0", camera="cam", label="false_alarm"), store)
    assert corrected["capture"] == "back among the captured normal frames", corrected
    assert (capture.counts()["cam"]["kept"], capture.counts()["cam"]["confirmed_defects"]) == (1, 0)
    assert cv2.imread(str(tmp_path / "cap" / "cam" / f"{key}.png")).tobytes() == image(0).tobytes()


def test_a_frame_confirmed_a_defect_before_the_capture_thread_takes_its_offer_is_not_sampled(tmp_path) -> None:
    """A frame scored normal is offered to the sample by the capture thread after its result is out (a queue, behind a
    slow disk's writes), so an operator who confirms it a defect at once can be served first: the sample did not hold
    it yet, and the offer then kept the confirmed defect among the normal frames, exported as a good image for the
    next model to learn (a helper's probe).  The offer that comes after the label is refused; once the label is
    withdrawn (normal, by the operator's word) the frame may be sampled again."""
    capture = Capture(tmp_path / "cap", max_frames=5, min_distance=0.0, seed=0)
    key = point_id("cam", "n-0")
    labels, store = _history(tmp_path, capture, {"n-0": "normal"})
    answer = labels.set(SetLabel(action="set", frame_id="n-0", camera="cam", label="confirmed_defect"), store)
    assert answer["capture"].startswith("not kept for the next training set"), answer
    assert not capture.offer("cam", key, image(0), png(0))  # the capture thread takes the frame's offer now
    assert capture.export(tmp_path / "out") == {"cam": {"folder": str(tmp_path / "out" / "cam"), "normal": 0,
                                                        "false_alarms": 0, "confirmed_defects": 0}}
    labels.set(SetLabel(action="set", frame_id="n-0", camera="cam", label=None), store)
    assert capture.offer("cam", key, image(0), png(0))


def test_a_confirmed_defect_labelled_again_says_it_is_kept(tmp_path) -> None:
    """A confirmed defect taken out of the sample, labelled again (its defect type corrected, or the label retried
    after its wait ran out): the answer said it was "not kept for the next training set" (a frame scored normal keeps
    only a thumbnail), while its image was kept among the confirmed defects all along."""
    capture = Capture(tmp_path / "cap", max_frames=5, min_distance=0.0, seed=0)
    assert capture.offer("cam", point_id("cam", "n-0"), image(0), png(0))
    labels, store = _history(tmp_path, capture, {"n-0": "normal"})
    first = labels.set(SetLabel(action="set", frame_id="n-0", camera="cam", label="confirmed_defect",
                                defect_type="scratch"), store)
    assert first["capture"] == "taken out of the captured normal frames", first
    again = labels.set(SetLabel(action="set", frame_id="n-0", camera="cam", label="confirmed_defect",
                                defect_type="dent"), store)
    assert again["capture"] == "kept for the next training set's test images", again
    assert (capture.counts()["cam"]["kept"], capture.counts()["cam"]["confirmed_defects"]) == (0, 1)
    assert store.find("n-0", "cam")[2]["defect_type"] == "dent"


def test_a_defect_scored_anomalous_under_a_reused_id_is_kept_as_itself_not_as_the_earlier_frame(tmp_path) -> None:
    """A camera that reused an id: its earlier, normal frame was sampled; the later one, scored anomalous, is
    confirmed a defect.  The sampled file was moved into the confirmed defects as if it were the labelled frame: a
    good frame became the next bundle's test defect and the real one was not kept (a helper's probe).  The sample
    takes normal frames only, so next to a frame scored anomalous it holds an earlier frame: that one leaves the
    sample, and the defect is kept from its own stored frame."""
    from worker.evidence import EvidenceStore

    capture = Capture(tmp_path / "cap", max_frames=5, min_distance=0.0, seed=0)
    key = point_id("cam", "f-0")
    assert capture.offer("cam", key, image(0), png(0))  # the earlier frame of the id, scored normal
    evidence = EvidenceStore(tmp_path / "evidence", max_frames=100)
    stored = evidence.save(key, {"frame": ("png", frame(1))}, "anomalous")  # the later frame, scored anomalous
    store = VectorStore(StoreConfig(path=tmp_path / "qdrant"), 8)
    now = time.time()
    store.upsert([(key, np.ones(8, np.float32), {"camera": "cam", "frame_id": "f-0", "verdict": "anomalous",
                                                 "received_ts": now, "captured_ts": now, "evidence": stored})])
    labels = LabelService(lambda: nullcontext(store), evidence=evidence, capture=capture,
                          stored_image=lambda data, _: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))
    answer = labels.set(SetLabel(action="set", frame_id="f-0", camera="cam", label="confirmed_defect"), store)
    assert answer["capture"] == "kept for the next training set's test images", answer
    assert (capture.counts()["cam"]["kept"], capture.counts()["cam"]["confirmed_defects"]) == (0, 1)
    kept = list((tmp_path / "cap" / "cam" / DEFECTS).iterdir())
    assert [cv2.imread(str(p)).tobytes() for p in kept] == [image(1).tobytes()]


def test_a_defect_label_is_stored_and_answered_when_the_capture_disk_is_full(tmp_path) -> None:
    """A sampled normal frame confirmed a defect on a full capture disk: the state's write failed and the label was
    answered internal_error although it was stored (a helper's probe).  The label is answered as stored, the frame
    has left the sample, and the failed write is counted and said as any of the sample's."""
    capture = Capture(tmp_path / "cap", max_frames=5, min_distance=0.0, seed=0)
    key = point_id("cam", "n-0")
    assert capture.offer("cam", key, image(0), png(0))
    labels, store = _history(tmp_path, capture, {"n-0": "normal"})
    (tmp_path / "cap" / "cam" / (INDEX + ".tmp")).symlink_to("/dev/full")  # ENOSPC, for root too
    answer = labels.set(SetLabel(action="set", frame_id="n-0", camera="cam", label="confirmed_defect"), store)
    assert answer["capture"] == "taken out of the captured normal frames", answer
    assert store.find("n-0", "cam")[2]["label"] == "confirmed_defect"
    assert capture.counts()["cam"]["kept"] == 0 and capture.failed_writes == 1


def test_a_defect_label_on_a_normal_frame_not_in_the_sample_says_it_is_not_kept(tmp_path) -> None:
    """A frame scored normal and not sampled keeps only a thumbnail: confirmed a defect, it never became a test
    image of the next training set, and the answer said nothing of it (a helper's probe). It says so."""
    capture = Capture(tmp_path / "cap", max_frames=5, min_distance=0.0, seed=0)
    labels, store = _history(tmp_path, capture, {"n-0": "normal"})
    answer = labels.set(SetLabel(action="set", frame_id="n-0", camera="cam", label="confirmed_defect"), store)
    assert answer["ok"] and answer["capture"].startswith("not kept for the next training set: its picture is "), answer
    assert capture.counts().get("cam", {}).get("confirmed_defects", 0) == 0


def test_a_false_alarm_kept_before_a_crash_recorded_its_label_is_not_exported_as_good(tmp_path) -> None:
    """A worker killed while absorbing a false alarm had kept its image for the next training set, but the label was
    never recorded (a helper's probe): the export gave the flagged frame to the next model as good.  At start a false
    alarm whose frame the history holds unlabelled is deleted; one labelled, or whose frame aged out, stays."""
    capture = Capture(tmp_path / "cap", max_frames=5, min_distance=0.0, seed=0)
    for i, fid in enumerate(("killed", "labelled", "aged-out")):
        capture.add_false_alarm("cam", point_id("cam", fid), image(20 + i))
    capture.flush()
    restarted = Capture(tmp_path / "cap", max_frames=5, min_distance=0.0, seed=0)
    labels, store = _history(tmp_path, restarted, {"killed": "anomalous", "labelled": "anomalous"})
    labels.set(SetLabel(action="set", frame_id="labelled", camera="cam", label="false_alarm"), store)
    while labels.warm():
        pass
    assert restarted.counts()["cam"]["false_alarms"] == 2
    restarted.export(tmp_path / "out")
    assert sorted(p.stem for p in (tmp_path / "out" / "cam" / "good").iterdir()) == sorted(
        point_id("cam", fid) for fid in ("labelled", "aged-out"))


def test_a_confirmed_defect_whose_frame_aged_out_can_still_be_withdrawn(tmp_path) -> None:
    """A confirmed defect whose frame retention took out of the history could not be withdrawn (unknown_frame), so
    its image stayed a test image of every next training set for good (a helper's probe).  The withdrawal takes it
    out (back among the normal frames where it came from them); a frame nothing was kept of is still unknown."""
    from worker.wire import RequestError

    capture = Capture(tmp_path / "cap", max_frames=5, min_distance=0.0, seed=0)
    capture.add_defect("cam", point_id("cam", "flagged"), image(30))
    assert capture.offer("cam", point_id("cam", "sampled"), image(31), png(31))
    assert capture.forget("cam", point_id("cam", "sampled"))
    labels, store = _history(tmp_path, capture, {})  # both aged out of the history
    flagged = labels.set(SetLabel(action="set", frame_id="flagged", camera="cam", label=None), store)
    assert flagged["ok"] and "no longer a test image" in flagged["note"] and "capture" not in flagged, flagged
    sampled = labels.set(SetLabel(action="set", frame_id="sampled", camera="cam", label=None), store)
    assert sampled["capture"] == "back among the captured normal frames", sampled
    assert (capture.counts()["cam"]["kept"], capture.counts()["cam"]["confirmed_defects"]) == (1, 0)
    with pytest.raises(RequestError, match="is not in the history"):
        labels.set(SetLabel(action="set", frame_id="flagged", camera="cam", label=None), store)


def test_a_false_alarm_that_taught_nothing_and_aged_out_is_withdrawn_with_an_ok(tmp_path) -> None:
    """Withdrawing a false alarm whose frame aged out of the history and that had taught the model nothing (learning
    off) deleted its captured image but answered unknown_frame (a helper's probe): it answers ok, saying so."""
    from worker.wire import RequestError

    capture = Capture(tmp_path / "cap", max_frames=5, min_distance=0.0, seed=0)
    capture.add_false_alarm("cam", point_id("cam", "fa"), image(40))
    labels, store = _history(tmp_path, capture, {})
    answer = labels.set(SetLabel(action="set", frame_id="fa", camera="cam", label=None), store)
    assert answer["ok"] and "no longer a good image of the next training set" in answer["note"], answer
    assert capture.counts()["cam"]["false_alarms"] == 0
    with pytest.raises(RequestError, match="is not in the history"):
        labels.set(SetLabel(action="set", frame_id="fa", camera="cam", label=None), store)


def _one_frame_captured(client: Client, prefix: str, dataset: Path) -> None:
    """Once the worker is online, camera ``cam`` sends frame f1; returns when the capture sample holds it."""
    wait_online(client, prefix)
    client.publish_frame("cam", good_png(dataset).read_bytes(), "f1")
    client.wait_for(lambda m: m.topic.endswith("/stats") and ((json.loads(m.payload).get("capture") or {})
                                                              .get("cam") or {}).get("kept"), timeout=60)


def test_each_export_over_the_control_topic_gets_a_folder_of_its_own(broker, bundle_dir, dataset, tmp_path) -> None:
    """The export folder was named by the UTC second alone: a second export within it (a double click on the console's
    Export button) answered internal_error "... already holds 1 files" (a helper's probe).  Here the folders of the
    next minutes are taken by earlier exports, and two exports are asked back to back: each gets a new folder,
    said in its answer, and the earlier ones are left as they were."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path / "w", broker.port, bundle_dir, topics={"prefix": prefix})
    exports = tmp_path / "w" / "training"
    now = time.time()
    for s in range(-5, 600):  # earlier exports in every second the test may run in
        earlier = exports / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now + s)) / "cam" / "good"
        earlier.mkdir(parents=True)
        (earlier / "old.png").write_bytes(b"")
    client = Client(broker.port, prefix)
    worker = WorkerProcess(config, tmp_path / "worker.log")
    try:
        _one_frame_captured(client, prefix, dataset)
        with ApiClient(load_config(config), "t") as api:
            answers = [api.control({"command": "export_capture", "camera": "cam"}, timeout=60) for _ in range(2)]
    finally:
        worker.stop()
        client.close()
    assert all(a["ok"] for a in answers), answers
    folders = [Path(a["folder"]) for a in answers]
    assert folders[0] != folders[1] and all(f.parent == exports for f in folders), folders
    for answer, folder in zip(answers, folders):
        assert len(list((folder / "cam" / "good").iterdir())) == 1  # the frame sent, not an earlier export's
        assert f"--data {folder} " in answer["train"]["cam"]
    assert sum(1 for p in exports.glob("*/cam/good/old.png")) == 605


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux): a write there fails with ENOSPC")
def test_a_false_alarm_a_full_disk_refuses_leaves_neither_its_image_nor_its_entry(tmp_path) -> None:
    """On a full capture disk the false alarm's PNG was written, then the state's write failed: the label was
    answered internal_error while the PNG and the entry stayed, and the export copied the frame into good/ (a
    helper's probe).  Here the state is written to /dev/full, which fails as a full disk does (ENOSPC, for root
    too): the add raises, the frame's image and entry are gone, the sampled frame of its id stays in the sample, and
    the export holds it alone; once the disk takes writes again the same label is kept."""
    capture = Capture(tmp_path / "cap", max_frames=20, min_distance=0.0)
    capture.offer("cam", "k1", image(1), png(1))  # a sampled frame of the id the label names (a reused id)
    folder = tmp_path / "cap" / "cam"
    (folder / (INDEX + ".tmp")).symlink_to("/dev/full")
    with pytest.raises(OSError) as raised:
        capture.add_false_alarm("cam", "k1", image(2))
    assert raised.value.errno == errno.ENOSPC
    assert not list((folder / "false_alarm").iterdir())
    assert capture.counts()["cam"] == {"seen": 1, "kept": 1, "mb": 0.0, "false_alarms": 0, "confirmed_defects": 0}
    assert capture.false_alarm_keys() == {}
    capture.export(tmp_path / "out")
    assert [p.read_bytes() for p in (tmp_path / "out" / "cam" / "good").iterdir()] == [frame(1)]
    (folder / (INDEX + ".tmp")).unlink()
    capture.add_false_alarm("cam", "k1", image(2))
    assert (capture.counts()["cam"]["kept"], capture.false_alarm_keys()) == (0, {"cam": {"k1"}})


_EXPORT_UNDER_A_SIZE_LIMIT = """
import resource, sys
from pathlib import Path
from worker.capture import Capture
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    Capture(Path(sys.argv[1]), max_frames=20, min_distance=0.0, read_only=True).export_new(Path(sys.argv[2]), "T")
except OSError as exc:
    print(exc.errno)
"""


def test_an_export_that_fails_midway_leaves_no_partial_folder(tmp_path) -> None:
    """An export_capture on a full disk left its folder with the files copied so far and one cut short (0 bytes),
    which the exporter reads as a training set (a helper's probe).  Here a process whose files may not grow past a
    few kilobytes (RLIMIT_FSIZE: any user can set it; the write then fails, EFBIG, as a full disk's does) exports a
    sample whose frames are larger: it fails, and leaves nothing under the export folder.  Without the limit the
    same export is written whole, and a second one in the same second gets a folder of its own (``-2``)."""
    capture = Capture(tmp_path / "cap", max_frames=20, min_distance=0.0)
    big = [np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(3)]
    for i, frame_image in enumerate(big):
        capture.offer("cam", f"k{i}", frame_image, lambda f=frame_image: (cv2.imencode(".png", f)[1].tobytes(), "png"))
    capture.flush()
    exports = tmp_path / "training"
    exports.mkdir()
    limit = 4096  # below each frame's PNG (about 12 kB of noise)
    assert all(p.stat().st_size > limit for p in (tmp_path / "cap" / "cam").glob("*.png"))
    done = subprocess.run([sys.executable, "-c", _EXPORT_UNDER_A_SIZE_LIMIT, str(tmp_path / "cap"), str(exports),
                           str(limit)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == str(errno.EFBIG), (done.stdout, done.stderr)
    assert list(exports.iterdir()) == []
    folders = [capture.export_new(exports, "T") for _ in range(2)]
    assert [f.name for f, _ in folders] == ["T", "T-2"]
    for folder, written in folders:
        assert written["cam"]["folder"] == str(folder / "cam") and len(list((folder / "cam" / "good").iterdir())) == 3
    assert sorted(p.name for p in exports.iterdir()) == ["T", "T-2"]
    assert capture.export_new(exports, "T", ["other"]) == (exports / "T-3", {})  # nothing captured: no folder
    assert sorted(p.name for p in exports.iterdir()) == ["T", "T-2"]


class _SlowDiskWorker(WorkerProcess):
    """The worker on a disk whose copies into the export folder wait for the test (tests/slow_disk.py)."""

    def __init__(self, config: Path, log: Path, gate: Path, exports: Path) -> None:
        self.log_path = log
        self.log = log.open("wb")
        env = {**os.environ, "SLOW_DISK_GATE": str(gate), "SLOW_DISK_UNDER": str(exports)}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "slow_disk.py"), "--config", str(config)],
                                     cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env)


def _until(what: Callable[[], bool], timeout: float, why: str) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, why
        time.sleep(0.05)


def _exports(msg) -> dict:
    """A stats message's ``capture_export`` ({} for any other message)."""
    return (json.loads(msg.payload).get("capture_export") or {}) if msg.topic.endswith("/stats") else {}


def test_requests_are_answered_while_an_export_runs_and_a_stop_ends_it_leaving_nothing(broker, bundle_dir, dataset,
                                                                                        tmp_path) -> None:
    """An export ran on the request thread: while it copied (gigabytes, minutes on an edge box's disk) every query,
    label (a false alarm to absorb in seconds) and control command waited behind it, answered ``busy`` once
    ``limits.request_queue_size`` had piled up.  Exports now run on a thread of their own, one at a time with one
    more waiting (a third is answered busy), and a stop ends the one in hand at its next file, answered ``shutdown``
    and leaving no folder.  Here the disk holds the export's first copy until the test opens it."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path / "w", broker.port, bundle_dir, topics={"prefix": prefix})
    exports, gate = tmp_path / "w" / "training", tmp_path / "gate"
    gate.mkdir()
    client = Client(broker.port, prefix)
    worker = _SlowDiskWorker(config, tmp_path / "worker.log", gate, exports)
    pool = ThreadPoolExecutor(3)
    try:
        _one_frame_captured(client, prefix, dataset)
        with ApiClient(load_config(config), "t") as api:
            export = {"command": "export_capture", "camera": "cam"}
            first = pool.submit(api.control, export, 120)
            _until(lambda: (gate / "inside").exists(), 60, "the export never began to copy")
            second = pool.submit(api.control, export, 120)
            status = api.control({"command": "status"}, timeout=30)  # waited for the export before
            query = api.query({"frame_id": "f1", "camera": "cam", "top_k": 1}, timeout=30)
            third = api.control(export, timeout=30)
            # the stats say what runs and what waits
            client.wait_for(lambda m: _exports(m).get("waiting") == 1 and (_exports(m).get("running") or {}).get(
                "camera") == "cam", timeout=30)
            assert not first.done() and not second.done()
            (gate / "open").touch()
            answers = [first.result(60), second.result(60)]
            said, *_ = client.wait_for(lambda m: (_exports(m).get("last") or {}).get("folder") == answers[1].get("folder"),
                                       timeout=30)
            # a stop during an export: the disk holds its copy again until the worker is stopping
            (gate / "open").unlink()
            (gate / "inside").unlink()
            last = pool.submit(api.control, export, 120)
            _until(lambda: (gate / "inside").exists(), 60, "the last export never began to copy")
            worker.proc.send_signal(signal.SIGTERM)
            _until(lambda: "stopping: finishing" in worker.output(), 60, "the worker did not begin to stop")
            (gate / "open").touch()
            stopped = last.result(60)
            code = worker.stop()
    finally:
        (gate / "open").touch()
        pool.shutdown()
        worker.stop()
        client.close()
    assert status["ok"] and query["ok"], (status, query)
    assert _exports(said)["running"] is None  # ... and what the last one answered
    assert third["error"]["code"] == "busy" and "an export is running" in third["error"]["message"], third
    assert all(a["ok"] for a in answers), answers
    assert stopped["error"]["code"] == "shutdown", stopped
    assert code == 0, worker.output()[-3000:]
    assert sorted(p.name for p in exports.iterdir()) == sorted(Path(a["folder"]).name for a in answers)


_EXPORT_THEN = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from worker.capture import Capture

def progress():
    if sys.argv[4] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.readline()  # held after its first file until the test closes stdin

Capture(Path(sys.argv[1]), max_frames=10, min_distance=0.0).export_new(Path(sys.argv[2]), "T", progress=progress)
"""


def test_what_an_export_killed_midway_left_is_removed_by_the_next_and_a_running_ones_is_not(tmp_path) -> None:
    """An export killed midway (kill -9, a watchdog exit, a power cut) left its hidden partial folder, up to
    gigabytes that no listing shows, and its empty placeholder, which reads as a training set without images.  The
    next export removes both once the process that wrote them is gone, and leaves alone the folder of an export
    another process is still writing."""
    capture = Capture(tmp_path / "cap", max_frames=10, min_distance=0.0)
    for i in range(3):
        capture.offer("cam", f"k{i}", image(i), png(i))
    capture.flush()
    parent = tmp_path / "training"
    args = [sys.executable, "-c", _EXPORT_THEN, str(tmp_path / "cap"), str(parent), str(ROOT)]
    running = subprocess.Popen([*args, "hold"], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not [p for p in parent.glob(".T.*.partial") if any(p.rglob("*.png"))]:
            assert running.poll() is None, running.stderr.read().decode()[-2000:] if running.stderr else ""
            assert time.monotonic() < deadline, "the running export never copied a file"
            time.sleep(0.05)
        killed = subprocess.run([*args, "kill"], capture_output=True, timeout=120)
        assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
        assert (parent / "T-2").is_dir() and not any((parent / "T-2").iterdir())  # its placeholder...
        assert len(list(parent.glob(".T-2.*.partial"))) == 1  # ... and the partial folder it was writing
        folder, written = capture.export_new(parent, "U")
        assert written["cam"]["normal"] == 3
        assert sorted(p.name for p in parent.iterdir() if not p.name.startswith(".T.")) == ["T", "U"]
    finally:
        assert running.stdin is not None
        running.stdin.close()
        running.wait(60)
    assert running.returncode == 0, running.stderr.read().decode()[-2000:] if running.stderr else ""
    assert sorted(p.name for p in parent.iterdir()) == ["T", "U"]
    assert len(list((parent / "T" / "cam" / "good").iterdir())) == 3


def test_images_a_power_cut_left_empty_are_left_out_of_the_sample_and_the_export(tmp_path) -> None:
    """Kept images are written and renamed without a sync: a power cut soon after can leave one empty under its name.
    The sample listed it and the export copied it into the training folder, where ``exporter train`` refuses the
    whole set for one image it cannot decode.  Empty ones are left out (and deleted) when the sample is read."""
    capture = Capture(tmp_path / "cap", max_frames=5, min_distance=0.0)
    for i in range(3):
        capture.offer("cam", f"k{i}", image(i), png(i))
    capture.add_false_alarm("cam", "fa", image(10))
    capture.add_defect("cam", "cd", image(11))
    capture.flush()
    folder = tmp_path / "cap" / "cam"
    for path in (folder / "k1.png", folder / "false_alarm" / "fa.png", folder / DEFECTS / "cd.png"):
        damage(path, "empty")
    again = Capture(tmp_path / "cap", max_frames=5, min_distance=0.0)
    assert again.counts()["cam"] == {"seen": 3, "kept": 2, "mb": 0.0, "false_alarms": 0, "confirmed_defects": 0}
    written = again.export(tmp_path / "out")["cam"]
    assert (written["normal"], written["false_alarms"], written["confirmed_defects"]) == (2, 0, 0)
    exported = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(exported) == 2 and all(cv2.imread(str(p)) is not None for p in exported)
    assert again.offer("cam", "k9", image(9), png(9))  # its slot is free again


def test_a_camera_folder_deleted_under_the_worker_starts_its_sample_afresh(tmp_path, caplog) -> None:
    """``rm -rf`` of a camera's sample folder while the worker ran (space freed, or a sample reset by hand): the sample
    still listed the deleted files, the stats said them kept, and a full sample's reservoir replaced them so rarely
    that the export held next to nothing for good.  The sample now starts afresh, said in the log."""
    capture = Capture(tmp_path / "cap", max_frames=5, min_distance=0.0, seed=0)
    for i in range(50):
        capture.offer("cam", f"k{i}", image(i), png(i))
    shutil.rmtree(tmp_path / "cap" / "cam")
    for i in range(50, 60):
        capture.offer("cam", f"k{i}", image(i), png(i))
    capture.flush()
    assert capture.counts()["cam"]["kept"] == len(list((tmp_path / "cap" / "cam").glob("k*.png"))) == 5
    assert capture.export(tmp_path / "out")["cam"]["normal"] == 5
    assert "capture sample of camera 'cam': its folder" in caplog.text
