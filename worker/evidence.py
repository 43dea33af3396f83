"""Bounded on-disk evidence, kept by value: a thumbnail of every logged frame; the original frame and heatmap of
anomalous ones.

Files are named by the frame's point id (a UUID), never by anything a camera sent,
so no payload can choose a path.  Frames are kept in three classes, each with its
own budget (frames, bytes, age): ``normal``, ``anomalous`` (it has a ``frame`` file)
and ``labelled`` (an operator labelled it; a ``label`` marker file says so).  A
class only ever evicts its own oldest frames, so a busy line of normal frames can
never push a defect out, and a labelled frame outlives both.  The index is rebuilt
from the folder at start.

Age goes by a frame's time: the write time (mtime) of its newest file, which for a labelled frame is its label
marker's (the time it was labelled).  Each class is kept in the order of that time, the age test reads it too, so
the age and count budgets take a class's oldest frames first and the age pass stops at the first young enough.

Files written while this box's clock was not set (a box without a
battery-backed clock boots at 1970) or ahead of it are never aged by that time: the first pass on a set clock stamps
them anew (:class:`worker.wire.Restamp`), as the vector store does its points.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from bundle import make_folder
from worker.wire import AHEAD_MARGIN_S, Restamp, clock_set, iso

log = logging.getLogger(__name__)

NORMAL, ANOMALOUS, LABELLED = "normal", "anomalous", "labelled"
CLASSES = (NORMAL, ANOMALOUS, LABELLED)
_MARKER = ("label", "txt")
# what this store writes: <point id>.<kind>.<ext> in the folder of the id's first two characters (.tmp while written)
_OURS = re.compile(r"^(?P<key>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\.[a-z_]+\.[a-z0-9]+(?:\.tmp)?$")


@dataclass(frozen=True)
class Budget:
    """What one class of evidence may hold; None = no limit on that axis."""

    max_frames: int
    max_bytes: int | None = None
    max_age_s: float | None = None

    @classmethod
    def of(cls, max_frames: int, max_mb: float | None, max_age_h: float | None) -> Budget:
        """From the config's units (megabytes, hours)."""
        return cls(max_frames, None if max_mb is None else int(max_mb * 1_000_000),
                   None if max_age_h is None else max_age_h * 3600)


class EvidenceStore:
    def __init__(self, root: Path, max_frames: int, max_age_h: float | None = None,
                 budgets: dict[str, Budget] | None = None) -> None:
        """``max_frames``/``max_age_h`` are the normal frames' budget; ``budgets`` sets any class's."""
        self.root = Path(root)
        make_folder(self.root, "evidence.path")  # on a full disk: made at the next write
        normal = Budget(max_frames, None, None if max_age_h is None else max_age_h * 3600)
        self.budgets = {NORMAL: normal, ANOMALOUS: normal, LABELLED: normal, **(budgets or {})}
        self._lock = threading.Lock()
        self._index: dict[str, OrderedDict[str, tuple[list[Path], int]]] = {c: OrderedDict() for c in CLASSES}
        self._bytes = dict.fromkeys(CLASSES, 0)
        self._class_of: dict[str, str] = {}
        self._times: dict[str, float] = {}  # a frame's time (its newest file's mtime): its place in its class
        self._restamp = Restamp()
        self._unset = False  # a file was written while this box's clock was not set
        self._latest = 0.0  # the latest time a file was written at: past a set clock, that clock stepped back
        by_key: dict[str, list[Path]] = {}
        times: dict[str, float] = {}
        ours: list[Path] = []
        foreign: list[Path] = []
        for path in self.root.glob("*/*"):
            if path.is_file():
                named = _OURS.match(path.name)
                (ours if named and path.parent.name == named["key"][:2] else foreign).append(path)
        if foreign:  # a file manager's Thumbs.db or .DS_Store, another version's: not a frame's, never counted or deleted
            log.warning("evidence: %d files it does not write are left as they are, not counted in any budget: %s",
                        len(foreign), ", ".join(str(p.relative_to(self.root)) for p in sorted(foreign)[:5]))
        for partial in [p for p in ours if p.name.endswith(".tmp")]:  # a write cut short (a full disk, a crash)
            with contextlib.suppress(OSError):
                partial.unlink()
        written = {p: p.stat().st_mtime for p in ours if not p.name.endswith(".tmp")}
        for mtime in written.values():
            self._wrote(mtime)
        for path, mtime in written.items():
            key = path.name.split(".", 1)[0]
            by_key.setdefault(key, []).append(path)
            times[key] = max(times.get(key, mtime), mtime)
        for key in sorted(by_key, key=times.__getitem__):
            paths = by_key[key]
            kinds = {p.name.split(".")[1] for p in paths}
            value = LABELLED if _MARKER[0] in kinds else ANOMALOUS if "frame" in kinds else NORMAL
            self._add(key, value, paths, times[key])
        with self._lock:
            for value in CLASSES:
                self._enforce(value)

    def _path(self, key: str, kind: str, ext: str) -> Path:
        return self.root / key[:2] / f"{key}.{kind}.{ext}"

    @staticmethod
    def _size(paths: list[Path]) -> int:
        total = 0
        for p in paths:
            try:
                total += p.stat().st_size
            except FileNotFoundError:
                continue
        return total

    @staticmethod
    def _newest(paths: list[Path]) -> float:
        """A frame's time: the mtime of its newest file (0 where none is left)."""
        times = []
        for path in paths:
            try:
                times.append(path.stat().st_mtime)
            except FileNotFoundError:
                continue
        return max(times, default=0.0)

    def _add(self, key: str, value: str, paths: list[Path], at: float) -> None:
        """Index a frame of time ``at`` at the end of its class: the caller adds them in time order, or places it."""
        size = self._size(paths)
        self._index[value][key] = (paths, size)
        self._bytes[value] += size
        self._class_of[key] = value
        self._times[key] = at

    def _pop(self, key: str) -> list[Path]:
        value = self._class_of.pop(key, None)
        if value is None:
            return []
        del self._times[key]
        paths, size = self._index[value].pop(key)
        self._bytes[value] -= size
        return paths

    def save(self, key: str, files: dict[str, tuple[str, bytes]], value: str = NORMAL) -> dict[str, str]:
        """Write ``{kind: (ext, data)}`` for a frame of class ``value``; returns the paths relative to the root."""
        with self._lock:
            previous = self._pop(key)
        targets = [self._path(key, kind, ext) for kind, (ext, _) in files.items()]
        # An earlier frame's files under this id (a reused frame id; a label marker of an earlier history's frame:
        # the recorder writes no frame over one the store holds labelled) go: an anomalous frame's frame file left
        # under a normal one would class it anomalous at the next start, where it would push out a real defect.
        for stale in set(previous) - set(targets):
            stale.unlink(missing_ok=True)
        written: list[Path] = []
        for path, (_, data) in zip(targets, files.values(), strict=True):
            tmp = path.with_suffix(path.suffix + ".tmp")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)  # the root too: deleted by hand, it is made again
                tmp.write_bytes(data)
                tmp.replace(path)
            except OSError:  # a full disk: the part written would stay for good, and the files written before it
                for part in (tmp, *written):  # unindexed, under no point, until a restart
                    with contextlib.suppress(OSError):
                        part.unlink(missing_ok=True)
                raise
            written.append(path)
        with self._lock:
            now = time.time()
            self._add(key, value, written, now)
            self._wrote(now)
            self._enforce(value)
        return {kind: str(p.relative_to(self.root)) for kind, p in zip(files, written, strict=True)}

    def labelled(self, key: str) -> bool:
        """Whether the frame's files are in the labelled class (an operator labelled it)."""
        with self._lock:
            return self._class_of.get(key) == LABELLED

    def set_labelled(self, key: str, labelled: bool, anomalous: bool) -> None:
        """Move a frame into (or back out of) the labelled class; its files stay where they are.  Raises OSError where
        its marker cannot be written or removed, the frame then indexed as it was (not left unindexed, its files
        beyond every budget until a restart)."""
        marker = self._path(key, *_MARKER)
        with self._lock:
            if key not in self._class_of:
                return  # rotated out already
            if labelled:
                marker.parent.mkdir(exist_ok=True)
                marker.write_bytes(b"")
            else:
                marker.unlink(missing_ok=True)
            paths = self._pop(key)
            value = LABELLED if labelled else ANOMALOUS if anomalous else NORMAL
            if labelled:  # labelled now: the newest of its class
                now = time.time()
                self._wrote(now)
                self._add(key, value, list(dict.fromkeys([*paths, marker])), now)
            else:  # back among the frames of its write time, as a start would place it: not after newer ones
                paths = [p for p in paths if p != marker]
                self._add(key, value, paths, self._newest(paths))
                self._order(value)
            self._enforce(value)

    def read(self, relative: str | None) -> bytes | None:
        """Bytes of a file named in a payload, or None if it has been rotated out."""
        if not relative:
            return None
        path = (self.root / relative).resolve()
        if self.root.resolve() not in path.parents or not path.is_file():
            return None
        return path.read_bytes()

    def delete(self, keys: list[str]) -> None:
        """Drop frames whose points the vector store deleted (retention)."""
        with self._lock:
            for key in keys:
                for path in self._pop(key):
                    path.unlink(missing_ok=True)

    def _wrote(self, at: float) -> None:
        """Note a file written at ``at`` (this box's clock), for :meth:`retain` to know when to stamp files anew."""
        self._unset = self._unset or not clock_set(at)
        self._latest = max(self._latest, at)

    def retain(self, now: float | None = None) -> int:
        """Delete frames written longer ago than their class's age budget (oldest first); returns how many.  While
        this box's clock is not set no age can be told; once it is, files written while it was not, or while it ran
        ahead, are stamped anew first (:meth:`_restamp_files`)."""
        now = time.time() if now is None else now
        to = self._restamp.start(now)
        if not clock_set(now):
            return 0
        removed = 0
        with self._lock:
            if self._unset or self._latest > now + AHEAD_MARGIN_S:
                self._restamp_files(now, to)
            for value, index in self._index.items():
                max_age = self.budgets[value].max_age_s
                if max_age is None:
                    continue
                cutoff = now - max_age
                while index:
                    key, (paths, _) = next(iter(index.items()))
                    if self._newest(paths) >= cutoff:
                        break
                    for path in self._pop(key):
                        path.unlink(missing_ok=True)
                    removed += 1
        return removed

    def _restamp_files(self, now: float, to: float) -> None:
        """Files written while this box's clock was not set (1970: decades old to an age budget) or ahead of it (a
        step back) take the time ``to`` (:class:`worker.wire.Restamp`), and each class is put back in the order of
        its frames' times, as a start reads it: the age pass stops at the first frame young enough.  The caller
        holds ``_lock``."""
        stamped = 0
        for value, index in self._index.items():
            for key, (paths, _) in index.items():
                times = []
                for path in paths:
                    try:
                        mtime = path.stat().st_mtime
                    except FileNotFoundError:
                        continue
                    if not Restamp.trusted(mtime, now):
                        os.utime(path, (to, to))
                        mtime = to
                        stamped += 1
                    times.append(mtime)
                self._times[key] = max(times, default=0.0)
            self._order(value)
        self._unset, self._latest = False, now
        if stamped:
            log.info("retention: %d evidence files written while this box's clock was not set, or ran ahead, are taken as "
                     "written at %s: they age from then", stamped, iso(to))

    def _order(self, value: str) -> None:
        """Put a class back in the order of its frames' times (the caller holds ``_lock``)."""
        index = self._index[value]
        self._index[value] = OrderedDict((key, index[key]) for key in sorted(index, key=self._times.__getitem__))

    def keys(self) -> list[str]:
        """The ids of the frames held, in no set order."""
        with self._lock:
            return list(self._class_of)

    def counts(self) -> dict[str, dict[str, int]]:
        """Frames and bytes held per class (for the stats topic)."""
        with self._lock:
            return {v: {"frames": len(self._index[v]), "bytes": self._bytes[v]} for v in CLASSES}

    def __len__(self) -> int:
        return len(self._class_of)

    def _enforce(self, value: str) -> None:
        budget, index = self.budgets[value], self._index[value]
        while index and (len(index) > budget.max_frames
                         or (budget.max_bytes is not None and self._bytes[value] > budget.max_bytes)):
            for path in self._pop(next(iter(index))):
                path.unlink(missing_ok=True)
