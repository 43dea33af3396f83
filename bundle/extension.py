"""A PatchCore bundle's memory bank, extended on the line with the patches of frames an operator marked as
false alarms (worker/learning.py absorbs them), kept on disk beside the worker's other state.  The folder
format is shared: the worker writes it, ``exporter fold-extension`` reads it (:func:`read_folder`).

A frame is normal when each of its patches has a close neighbour in the bank; adding
the patches that made a false alarm makes that appearance normal from the next frame
on, without retraining.  The extension is one :class:`Extension` per bundle (keyed by
the sha256 of its weights, so a retrained bundle starts empty), one entry per labelled
frame, so a label's rows can be taken back (``unlabel``).  It is bounded in rows: a
label that would overflow it is refused with a clear error rather than evicting an
older absorption (which would bring that false alarm back unannounced).

Files: ``<folder>/index.json`` (revision and entries) and one ``<entry>.npy`` per
entry, each written to a temporary file and renamed; the index is written last, so a
crash leaves either the old or the new state, and files the index does not name are
removed at start.  Fields of the index this version does not read (a newer worker wrote it, then the box was
rolled back) are kept and written back as they were.  An entry kept past the bound and not served is marked
``"held": true`` (the field is written on those only, so an index with none held is as earlier versions wrote it): a
start serves the entries served before while they fit, so a restart serves the labels that were served, not the
oldest that fit (a withdrawal serves what the room it frees lets in, which need not be those).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bundle import Manifest, make_folder

if TYPE_CHECKING:  # the runtime needs OpenVINO; the folder format (exporter fold-extension) does not
    import openvino as ov

    from bundle.runtime import CompiledBundle, ExtensionState

log = logging.getLogger(__name__)

INDEX = "index.json"
_KEY = re.compile(r"^[0-9a-f-]{1,64}$")  # entry keys are point ids (UUIDs), never camera-chosen text


class ExtensionFull(Exception):
    """Adding these rows would take the extension past its row bound."""


class ExtensionUnwritable(Exception):
    """The extension's folder could not be written (a full or read-only disk); the change was not made, on disk or in
    use, so the same request can be made again once the folder can be written."""


@dataclass(frozen=True)
class Entry:
    key: str  # the labelled frame's point id
    frame_id: str
    camera: str
    rows: int
    at: float


HELD = "held"  # an index entry's mark: kept past the bound, not served (written on those entries only)
_ENTRY_FIELDS = frozenset(f.name for f in fields(Entry))
_KNOWN = _ENTRY_FIELDS | {HELD}


def _entry(written: dict) -> tuple[Entry, bool, dict]:
    """An index entry as written, whether it is marked held (not served), and the fields of it this software does not
    know (a newer worker wrote the index: kept and written back as they were, so a rollback costs the entry nothing);
    TypeError or ValueError otherwise, so the index is taken for damaged: an ``at`` of text failed later in sorting
    the entries, and a key naming a path read another folder's rows."""
    if not isinstance(written, dict):
        raise TypeError(f"index entry {written!r} is not a record")
    entry = Entry(**{k: v for k, v in written.items() if k in _ENTRY_FIELDS})
    held = written.get(HELD, False)
    if not (isinstance(entry.key, str) and _KEY.match(entry.key) and isinstance(entry.frame_id, str)
            and isinstance(entry.camera, str) and type(entry.rows) is int
            and isinstance(entry.at, int | float) and not isinstance(entry.at, bool) and isinstance(held, bool)):
        raise ValueError(f"index entry {written!r} is not of the kind this software writes")
    return entry, held, {k: v for k, v in written.items() if k not in _KNOWN}


def _sync(fh) -> None:
    """A file's bytes on the disk before it replaces the one in use: a power cut after the rename otherwise can leave
    an empty file under the final name (the rename reaches the disk before the data)."""
    fh.flush()
    os.fsync(fh.fileno())


def _sync_folder(folder: Path) -> None:
    """The folder's entries (a rename) on the disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def weights_key(manifest: Manifest) -> str:
    """The part of an extension folder's name that ties it to one bundle's weights (its model.bin sha256)."""
    return manifest.files["model.bin"][:16]


def stored_dimension(folder: Path) -> int | None:
    """The feature dimension of the rows an extension folder holds (read from its first entry's file), or None where
    it holds none or they cannot be read: enough to open it for a withdrawal without its bundle."""
    for rows in sorted(Path(folder).glob("*.npy")):
        if not _KEY.match(rows.stem):  # not an entry's file (another version's, an operator's): says nothing
            continue
        try:
            shape = np.load(rows, mmap_mode="r", allow_pickle=False).shape
        except (OSError, ValueError, EOFError):
            continue
        if len(shape) == 2:
            return int(shape[1])
    return None


def folder_name(manifest: Manifest) -> str:
    """The worker's folder for a bundle's extension: ``<name>-<weights_key>``, so a retrained bundle starts empty."""
    return f"{manifest.name}-{weights_key(manifest)}"


def offending(candidates: np.ndarray, scores: np.ndarray, threshold: float, margin: float) -> np.ndarray:
    """The candidate patches an absorption adds: those whose distance is at least ``margin`` x the threshold.

    ``candidates`` [K, C] are the frame's most anomalous patches and ``scores`` [K] their distances (the
    graph's ``candidates`` / ``candidate_scores``); ``threshold`` is the bundle's raw image threshold.  A margin
    below 1 also takes the patches just under the threshold, so the next frame of the same appearance, which
    never matches exactly, passes too.
    """
    keep = np.asarray(scores, np.float32).reshape(-1) >= margin * threshold
    return np.ascontiguousarray(np.asarray(candidates, np.float32).reshape(len(keep), -1)[keep])


def decisive_patches(candidates: np.ndarray, scores: np.ndarray, image_score: float, threshold: float,
                     protect: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(patches [m, C], reach [m]) that keep a flagged frame flagged, what a confirmed defect's guard protects
    (:func:`spared`).

    The image score is the farthest patch's distance times a factor below 1 (PatchCore's re-weighting, or the
    map's blur), so the frame stays flagged while one patch keeps at least ``need`` = farthest distance x
    threshold / image score.  The patches at or above ``need`` are the decisive ones, and a new row within
    ``need`` of one of them is what could bring it below.  ``protect`` > 0 keeps only that many of them, the
    farthest first: one kept at or above ``need`` is enough for the frame itself, the others protect what looks
    like it.  Nothing for a frame that is not flagged.
    """
    scores = np.asarray(scores, np.float32).reshape(-1)
    if image_score < threshold or not len(scores):
        return np.empty((0, np.asarray(candidates).shape[-1]), np.float32), np.empty(0, np.float32)
    need = float(scores.max()) * threshold / image_score
    if protect > 0:
        farthest = np.argsort(-scores, kind="stable")[:protect]
        candidates, scores = np.asarray(candidates, np.float32).reshape(len(scores), -1)[farthest], scores[farthest]
    patches = offending(candidates, scores, need, 1.0)
    return patches, np.full(len(patches), need, np.float32)


# Distances are compared in float64 here and in f32 by the graph: a row this much nearer than the boundary
# could still land on the wrong side of it there.
_GUARD_SLACK = 1e-4


def spared(rows: np.ndarray, protected: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Which of ``rows`` [n, C] an absorption may add without unflagging a confirmed defect: none within the reach
    of one of its decisive patches (``protected``: (patches, reach) per defect, :func:`decisive_patches`).

    A benign mark and a real defect can look alike; the operator's confirmed defects say which ones must stay
    flagged, so the rows that would bring them below the threshold are left out (boolean mask, True = keep).
    """
    keep = np.ones(len(rows), bool)
    if not len(rows):
        return keep
    r = np.asarray(rows, np.float64)
    r_sq = (r * r).sum(1, keepdims=True)
    for patches, reach in protected:
        if not len(patches):
            continue
        p = np.asarray(patches, np.float64)
        d2 = r_sq - 2 * r @ p.T + (p * p).sum(1)
        keep &= ~(d2 < (np.asarray(reach, np.float64) * (1 + _GUARD_SLACK)) ** 2).any(1)
    return keep


def offending_views(bundle: CompiledBundle, request: ov.InferRequest, copies: list[np.ndarray], threshold: float,
                    margin: float, extension: ExtensionState | None = None) -> tuple[np.ndarray, list[float]]:
    """The offending rows (:func:`offending`) of each prepared view in ``copies``, scored by ``bundle`` with
    ``extension`` (an earlier state of it), else with the extension in use; and each view's raw image score."""
    found, scores = [], []
    for copy in copies:
        pred = bundle.infer(copy[np.newaxis], request, extension)
        if pred.candidates is None or pred.candidate_scores is None:
            raise ValueError(f"{bundle.folder}: the bundle has no bank extension")
        found.append(offending(pred.candidates[0], pred.candidate_scores[0], threshold, margin))
        scores.append(float(pred.score[0]))
    return np.concatenate(found), scores


@dataclass(frozen=True)
class Absorbed:
    """What :func:`absorb` did with one label."""

    entry: Entry | None  # the label's entry; None where nothing was added
    raw_score: float  # the frame's raw image score before the label (its highest tile's)
    left_out: int  # offending rows left out because they lie near a confirmed defect's decisive patches
    full: str = ""  # the ExtensionFull message where the frame's rows (entry None) or its views' rows did not fit
    after: float | None = None  # the frame's raw image score with the label's rows in use; None where none were added
    still: int = 0  # the frame's candidate patches still at or above the margin then (left out, or not matched)


def absorb(bundle: CompiledBundle, request: ov.InferRequest, ext: Extension, key: str, tiles: list[np.ndarray],
           views: Views, threshold: float, margin: float, protected: list[tuple[np.ndarray, np.ndarray]],
           put: Callable[[Extension], None], frame_id: str, camera: str) -> Absorbed:
    """Absorb a false-alarm label of the frame ``key`` (its prepared ``tiles``) into ``ext``; ``put`` puts the
    extension's rows to use wherever the bundle scores.

    The frame's own offending patches first, put to use at once so the next frames pass; then those of its other
    ``views``, scored against the extension as it was before this label (as if all had been read at once), in
    place of that entry.  Rows within reach of a ``protected`` confirmed defect (:func:`spared`) are left out.
    Where the extension is full the views' rows are dropped (the frame's own kept), or nothing is absorbed.  Where
    its folder cannot be written, nothing is absorbed (the frame's own rows are taken back) and ExtensionUnwritable
    is raised.
    Then the frame is scored once more, so the answer can say whether it passes now: it need not, since only the
    K candidate patches farthest from the bank meet the extension, and a change over much of the frame has more.
    """
    before = bundle.extension_state
    rows, scores = offending_views(bundle, request, tiles, threshold, margin)
    raw_score = max(scores)
    keep = spared(rows, protected)
    left_out = int((~keep).sum())
    if not keep.any():
        return Absorbed(None, raw_score, left_out)
    rows = rows[keep]
    others = [view for tile in tiles for view in views.of(tile)[1:]]
    try:
        entry = ext.add(key, rows, frame_id, camera)
    except ExtensionFull as exc:  # the frame's own patches: its views, read after them, would need more rows still
        said = " (the frame's own patches only: its flipped and turned views, learning.views, need more)" if others else ""
        return Absorbed(None, raw_score, left_out, f"{exc}{said}")
    put(ext)
    full = ""
    if others:
        more, _ = offending_views(bundle, request, others, threshold, margin, before)
        keep = spared(more, protected)
        left_out += int((~keep).sum())
        if keep.any():
            try:
                entry = ext.add(key, np.concatenate([rows, more[keep]]), frame_id, camera)
            except ExtensionFull as exc:
                full = str(exc)
            except ExtensionUnwritable as exc:  # all or nothing: the frame's own rows are taken back
                try:
                    ext.remove(key)
                except ExtensionUnwritable:
                    raise ExtensionUnwritable(f"{exc}; the frame's own rows, absorbed first, could not be taken back "
                                              "either: withdraw the label (unlabel) once there is space, then label "
                                              "it again") from exc
                put(ext)
                raise
            else:
                put(ext)
    still, after = offending_views(bundle, request, tiles, threshold, margin)
    return Absorbed(entry, raw_score, left_out, full, max(after), len(still))


def reabsorb(bundle: CompiledBundle, request: ov.InferRequest, ext: Extension, key: str, tiles: list[np.ndarray],
             views: Views, threshold: float, margin: float, protected: list[tuple[np.ndarray, np.ndarray]],
             put: Callable[[Extension], None], frame_id: str, camera: str, before: ExtensionState | None
             ) -> Absorbed | None:
    """After rows were withdrawn from ``ext``: add to the entry of the false alarm ``key`` (a new one where it has
    none) what its frame and ``views`` now miss, if the frame is flagged now but passed with the extension as it
    was ``before``; None where it passes, or was flagged then too (not the withdrawal's doing).

    A label absorbs only the patches the rows in use leave at or above the margin, so its frame can lean on an
    earlier label's rows; withdrawing that label must not bring this one back unannounced.  The views are scored
    together against the extension as it is now, and rows near a ``protected`` confirmed defect are left out, as
    :func:`absorb` does.  Raises ExtensionFull or ExtensionUnwritable (then nothing was added).
    """
    rows, scores = offending_views(bundle, request, tiles, threshold, margin)
    if max(scores) < threshold or max(offending_views(bundle, request, tiles, threshold, margin, before)[1]) >= threshold:
        return None
    others = [view for tile in tiles for view in views.of(tile)[1:]]
    if others:
        rows = np.concatenate([rows, offending_views(bundle, request, others, threshold, margin)[0]])
    keep = spared(rows, protected)
    entry = None
    if keep.any():
        entry = ext.add(key, np.concatenate([ext.rows_of(key), rows[keep]]), frame_id, camera)
        put(ext)
    still, after = offending_views(bundle, request, tiles, threshold, margin)
    return Absorbed(entry, max(scores), int((~keep).sum()), "", max(after), len(still))


class Views(StrEnum):
    """Which views of a labelled frame an absorption reads its patches from.

    A false alarm recurs at other places on the part, over other texture than in the frame the operator
    labelled, so the patches of that one frame rarely cover it.  Flipped and rotated copies of the frame show
    the same appearance over differently arranged texture; their offending patches cover much more of it.
    """

    FRAME = "frame"  # the labelled frame alone
    FLIPS = "flips"  # the frame and its horizontal, vertical and double flips
    D4 = "d4"  # the flips and the four transposed / quarter-turned copies (square inputs; others get the flips)

    def of(self, image: np.ndarray) -> list[np.ndarray]:
        """The views of a prepared HWC image, the image itself first; every view has its shape."""
        out = [image]
        if self is not Views.FRAME:
            out += [image[:, ::-1], image[::-1], image[::-1, ::-1]]
        if self is Views.D4 and image.shape[0] == image.shape[1]:
            t = image.transpose(1, 0, *range(2, image.ndim))
            out += [t, t[:, ::-1], t[::-1], t[::-1, ::-1]]
        return [np.ascontiguousarray(v) for v in out]


class Extension:
    """The rows one bundle's bank is extended with, by label; thread-safe, persisted on every change."""

    def __init__(self, folder: Path, feature_dim: int, max_rows: int) -> None:
        self.folder = Path(folder)
        make_folder(self.folder, "learning.path")  # on a full disk: made at the first label (:meth:`_restore`)
        self.feature_dim = feature_dim
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self.revision = 0
        self._entries: dict[str, Entry] = {}
        # entries past max_rows (lowered, or a version with a higher bound wrote them): not served, kept on disk and in
        # the index, so raising the bound again, or a withdrawal freeing rows, serves them; their rows stay in _arrays
        self._held: dict[str, Entry] = {}
        self._arrays: dict[str, np.ndarray] = {}
        # what a newer worker wrote in the index that this one does not read: written back as it was
        self._unknown: dict = {}
        self._unknown_of: dict[str, dict] = {}
        self._load()
        self._rows = self._concat()

    def _load(self) -> None:
        index = self.folder / INDEX
        # A frame's earlier rows set aside while its new rows went into place (:meth:`add`): a stop between the two
        # renames left its file missing, which the index still names.  Put back, the index and the rows agree.
        for prev in self.folder.glob("*.prev.tmp"):
            npy = prev.with_name(prev.name.removesuffix(".prev.tmp") + ".npy")
            if _KEY.match(npy.stem) and prev.is_file() and not npy.exists():
                prev.replace(npy)
        broken: Path | None = None  # the unreadable index, moved aside
        marked: set[str] = set()  # the entries the index marks held: not served when it was written
        changed = False  # what is kept differs from what the index says: the index is written again
        if index.is_file():
            try:
                raw = json.loads(index.read_text())
                self.revision = int(raw["revision"])
                read = [_entry(e) for e in raw["entries"]]
                entries = [entry for entry, _, _ in read]
                marked = {entry.key for entry, held, _ in read if held}
                self._unknown = {k: v for k, v in raw.items() if k not in ("revision", "entries")}
                self._unknown_of = {entry.key: unknown for entry, _, unknown in read if unknown}
                if said := sorted({*self._unknown, *(k for _, _, unknown in read for k in unknown)}):
                    log.warning("extension index %s has fields this version does not read (%s): written by a newer "
                                "worker; its entries are served, and those fields kept as they are", index,
                                ", ".join(said))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                broken = index.with_suffix(".corrupt")
                index.replace(broken)
                # the rows are in their own files, named by their frames' point ids: kept, not lost with the index
                entries = [Entry(p.stem, "", "", 0, p.stat().st_mtime) for p in sorted(self.folder.glob("*.npy"))
                           if _KEY.match(p.stem)]
                self.revision, changed = 1, True
                log.error("extension index %s is unreadable (%s): moved aside as %s; its %d entries are taken again "
                          "from their files (their frame ids are unknown until labelled again: a withdrawal by frame "
                          "id still finds them)", index, exc, broken.name, len(entries))
            for entry in entries:
                rows = self._rows_of(entry)
                changed = changed or rows is None or entry.rows != len(rows) or entry.key in self._entries
                if rows is not None:
                    self._entries[entry.key] = Entry(**{**asdict(entry), "rows": len(rows)})
                    self._arrays[entry.key] = rows
        if (holds := sum(e.rows for e in self._entries.values())) > self.max_rows:
            # those served when the index was written first (oldest first, should the bound be lower now), then, in the
            # room left, the held ones that fit, as a withdrawal serves them: the labels served before a restart are
            # served after it (an index without marks, an earlier version's, serves the oldest that fit)
            served = _oldest_that_fit({k: e for k, e in self._entries.items() if k not in marked}, 0, self.max_rows)
            served += _oldest_that_fit({k: e for k, e in self._entries.items() if k not in {e.key for e in served}},
                                       sum(e.rows for e in served), self.max_rows)
            kept = {e.key: e for e in sorted(served, key=lambda e: e.at)}
            total = sum(e.rows for e in kept.values())
            self._held = {k: e for k, e in self._entries.items() if k not in kept}
            self._entries = kept
            log.warning("extension %s holds %d rows, more than learning.max_rows %d (lowered, or the extension was "
                        "written by a version with a higher bound): the entries served before that fit are served, "
                        "oldest first, then the oldest others that fit; the other "
                        "%d (%d rows; frames %s) are kept on disk but not served, so those false alarms are flagged "
                        "again, until learning.max_rows is raised to %d or withdrawals free their rows; the "
                        "label API's extensions list shows them as held", self.folder, holds, self.max_rows,
                        len(self._held), holds - total, ", ".join(f"{e.camera}/{e.frame_id}" for e in
                                                                  list(self._held.values())[:5]), holds)
        changed = changed or set(self._held) != marked & {*self._entries, *self._held}  # the marks say what is held
        if changed:
            self._rewrite_index(broken)
        foreign = []  # files the worker does not write here (another version's, an operator's): left as they are
        for stray in self.folder.glob("*.npy"):  # written, but no index names it (a crash, or dropped above)
            if not _KEY.match(stray.stem) or not stray.is_file():
                foreign.append(stray.name)
            elif stray.stem not in self._entries and stray.stem not in self._held:
                stray.unlink(missing_ok=True)
        for tmp in self.folder.glob("*.tmp"):  # the index's, an entry's rows (.npy.tmp) or earlier rows (.prev.tmp)
            if tmp.is_file() and (tmp.name == INDEX + ".tmp" or tmp.name.endswith((".npy.tmp", ".prev.tmp"))):
                tmp.unlink(missing_ok=True)
            else:
                foreign.append(tmp.name)
        if foreign:
            log.warning("extension %s holds %s, which the worker does not write (another version's, or put there by "
                        "hand): left as they are, not read as rows", self.folder, ", ".join(sorted(foreign)))

    def _rows_of(self, entry: Entry) -> np.ndarray | None:
        """An entry's rows as its file holds them, or None (said) where they cannot be used: the entry is dropped."""
        try:
            rows = np.load(self.folder / f"{entry.key}.npy", allow_pickle=False)
        except Exception as exc:  # a damaged file (a power cut) can make numpy raise almost anything
            log.error("extension entry %s of %s is unreadable (%s): dropped", entry.key, self.folder, exc)
            return None
        if rows.ndim != 2 or rows.shape[1] != self.feature_dim:
            log.error("extension entry %s of %s has shape %s, not [n, %d]: dropped", entry.key, self.folder,
                      rows.shape, self.feature_dim)
            return None
        if not np.isfinite(rows).all():  # damaged bytes; a row of NaN would make every frame's score NaN
            log.error("extension entry %s of %s holds values that are not finite: dropped", entry.key, self.folder)
            return None
        return rows.astype(np.float32, copy=False)

    def _rewrite_index(self, broken: Path | None) -> None:
        """Write the index of what :meth:`_load` kept.  Where it cannot be written (a full disk at a restart) the
        rows kept are served all the same, and the change is written with the next one: opening must not stop the
        worker from inspecting.  An unreadable index moved aside goes back, so the next start takes its entries
        from their files again rather than finding no index and removing them as strays."""
        try:
            self._write_index()
        except OSError as exc:
            if broken is not None:
                with contextlib.suppress(OSError):
                    broken.replace(self.folder / INDEX)
            log.error("extension %s: its index cannot be written (%s); its %d entries are served as read, and "
                      "the index is written with the next label or withdrawal", self.folder, exc, len(self._entries))

    def _concat(self) -> np.ndarray:
        parts = [self._arrays[k] for k in self._entries]
        return np.concatenate(parts) if parts else np.empty((0, self.feature_dim), np.float32)

    def _write_index(self, revision: int | None = None, entries: dict[str, Entry] | None = None,
                     held: dict[str, Entry] | None = None, fresh: str | None = None) -> None:
        """Write the index of the served ``entries`` and the ``held`` ones (marked so) at ``revision`` (by default the
        state in use), whole, or raise OSError and leave the one on disk as it was.  ``fresh``: the entry this version
        writes anew, whose fields from a newer version no longer describe its rows."""
        entries = self._entries if entries is None else entries
        held = self._held if held is None else held
        listed = [*((e, False) for e in entries.values()), *((e, True) for e in held.values())]
        body = {**self._unknown, "revision": self.revision if revision is None else revision,
                "entries": [{**(self._unknown_of.get(e.key, {}) if e.key != fresh else {}), **asdict(e),
                             **({HELD: True} if marked else {})} for e, marked in listed]}
        tmp = self.folder / (INDEX + ".tmp")
        try:
            with tmp.open("w") as fh:
                fh.write(json.dumps(body, indent=1))
                _sync(fh)
            tmp.replace(self.folder / INDEX)
            _sync_folder(self.folder)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise

    def _restore(self) -> None:
        """Write back the rows in use whose file is gone: the folder, or files in it, deleted under the worker (space
        freed by hand; a guard written since may have made the folder again), so that a label is not refused until a
        restart and the index written next names only files that are there.  Raises OSError where they cannot be."""
        self.folder.mkdir(parents=True, exist_ok=True)
        missing = [key for key in [*self._entries, *self._held] if not (self.folder / f"{key}.npy").is_file()]
        for key in missing:
            tmp = self.folder / f"{key}.npy.tmp"
            with tmp.open("wb") as fh:
                np.save(fh, self._arrays[key], allow_pickle=False)
                _sync(fh)
            tmp.replace(self.folder / f"{key}.npy")
        if missing:
            log.warning("extension %s: the files of %d entries were deleted under the worker: written back from the "
                        "rows in use", self.folder, len(missing))

    def _unwritable(self, exc: OSError, what: str) -> ExtensionUnwritable:
        return ExtensionUnwritable(f"{what}: the bank extension in {self.folder} could not be written ({exc}); nothing "
                                   "was changed: free space there (learning.path) and try again")

    @property
    def rows(self) -> np.ndarray:
        """All rows [n, C], oldest entry first (a new array after every change; never modified in place)."""
        return self._rows

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._entries.values())

    def held(self) -> list[Entry]:
        """The entries kept past ``max_rows``: on disk and in the index, not served (listed, so the operator sees why
        those false alarms are flagged again)."""
        with self._lock:
            return list(self._held.values())

    def _filled(self, entries: dict[str, Entry], held: dict[str, Entry]
                ) -> tuple[dict[str, Entry], dict[str, Entry], list[Entry]]:
        """The served ``entries`` with the ``held`` ones that fit the rows a withdrawal (or a frame absorbed again with
        fewer rows) freed, oldest first, rather than only at the next start: (served, still held, newly served), to
        be written in the index before they are put to use, so a restart serves them too."""
        served = _oldest_that_fit(held, sum(e.rows for e in entries.values()), self.max_rows)
        keys = {e.key for e in served}
        return ({**entries, **{e.key: e for e in served}}, {k: e for k, e in held.items() if k not in keys}, served)

    def _said_served(self, served: list[Entry]) -> None:
        if served:
            log.info("extension %s: %d entries held past learning.max_rows %d are served again in the rows freed "
                     "(frames %s); %d are still held", self.folder, len(served), self.max_rows,
                     ", ".join(f"{e.camera}/{e.frame_id}" for e in served[:5]), len(self._held))

    def rows_of(self, key: str) -> np.ndarray:
        """The rows frame ``key`` added [n, C] (none where it has no entry)."""
        with self._lock:
            return self._arrays.get(key, np.empty((0, self.feature_dim), np.float32))

    def info(self) -> dict:
        """What results and the retained model topic say about the extension: ``labels`` served, ``held`` past
        ``max_rows`` (a held label withdrawn changes no revision, and the topic still tells every console)."""
        with self._lock:
            return {"revision": self.revision, "rows": int(self._rows.shape[0]), "labels": len(self._entries),
                    "held": len(self._held), "max_rows": self.max_rows}

    def add(self, key: str, rows: np.ndarray, frame_id: str, camera: str) -> Entry:
        """Absorb ``rows`` for the frame ``key`` (replacing that frame's earlier rows); raises ExtensionFull, or
        ExtensionUnwritable where the folder cannot be written (then nothing changed)."""
        if not _KEY.match(key):
            raise ValueError(f"extension entry key {key!r} is not a point id")
        rows = np.ascontiguousarray(rows, np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.feature_dim:
            raise ValueError(f"extension rows must be [n, {self.feature_dim}], not {list(rows.shape)}")
        with self._lock:
            others = sum(e.rows for k, e in self._entries.items() if k != key)
            if len(rows) > self.max_rows:  # no withdrawal or fold makes room for these
                raise ExtensionFull(f"these patches alone need {len(rows)} rows, more than the whole extension holds "
                                    f"(learning.max_rows: {self.max_rows}): raise learning.max_rows")
            if others + len(rows) > self.max_rows:
                raise ExtensionFull(f"the extension is full: it holds {others} of its {self.max_rows} rows "
                                    f"({self.max_rows - others} free) and these patches need {len(rows)}: undo older "
                                    "false-alarm labels, fold the extension into a new bundle (python -m exporter "
                                    "fold-extension), or raise learning.max_rows")
            # a frame absorbed again (its views, a re-absorption after a withdrawal) keeps the time it was first
            # absorbed: a later withdrawal re-scores the labels that came after it, by that time
            earlier = self._entries.get(key) or self._held.get(key)
            entry = Entry(key, frame_id, camera, len(rows), earlier.at if earlier is not None else time.time())
            entries = {k: e for k, e in self._entries.items() if k != key}
            entries[key] = entry
            # a frame absorbed again with fewer rows frees some, as a withdrawal does
            entries, held, served = self._filled(entries, {k: e for k, e in self._held.items() if k != key})
            npy, tmp, prev = (self.folder / f"{key}{suffix}" for suffix in (".npy", ".npy.tmp", ".prev.tmp"))
            try:  # all or nothing: the rows and the index on disk first, then in use
                self._restore()
                try:
                    with tmp.open("wb") as fh:
                        np.save(fh, rows, allow_pickle=False)
                        _sync(fh)
                except OSError:
                    with contextlib.suppress(OSError):
                        tmp.unlink(missing_ok=True)
                    raise
                kept = earlier is not None and npy.is_file()
                if kept:  # the frame's earlier rows stay on disk until the index no longer names them
                    npy.replace(prev)
                tmp.replace(npy)
                try:
                    self._write_index(self.revision + 1, entries, held, fresh=key)
                except OSError:
                    if kept:
                        prev.replace(npy)
                    else:
                        npy.unlink(missing_ok=True)
                    raise
            except OSError as exc:
                raise self._unwritable(exc, f"the false alarm {frame_id} from camera {camera} was not absorbed") from exc
            if kept:
                with contextlib.suppress(OSError):  # removed at the next start otherwise
                    prev.unlink(missing_ok=True)
            self._entries, self._held, self._arrays[key] = entries, held, rows
            self._unknown_of.pop(key, None)
            self._said_served(served)
            self.revision += 1
            self._rows = self._concat()
            return entry

    def remove(self, key: str) -> int:
        """Take back the rows of frame ``key``; returns how many (0 when it had none).  Raises ExtensionUnwritable
        where the folder cannot be written: the rows are then still listed and in use."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                if (held := self._held.get(key)) is not None:  # not served: withdrawn, it is no longer kept either
                    try:
                        self._restore()
                        self._write_index(held={k: e for k, e in self._held.items() if k != key})
                    except OSError as exc:
                        raise self._unwritable(exc, f"the false alarm {held.frame_id} from camera {held.camera} was "
                                                    "not withdrawn") from exc
                    del self._held[key], self._arrays[key]
                    self._unknown_of.pop(key, None)
                    with contextlib.suppress(OSError):
                        (self.folder / f"{key}.npy").unlink(missing_ok=True)
                return 0
            entries, still, served = self._filled({k: e for k, e in self._entries.items() if k != key}, self._held)
            try:  # all or nothing: the index on disk first, then in use
                self._restore()
                self._write_index(self.revision + 1, entries, still)
            except OSError as exc:
                raise self._unwritable(exc, f"the false alarm {entry.frame_id} from camera {entry.camera} was not "
                                            "withdrawn") from exc
            self._entries, self._held = entries, still
            del self._arrays[key]
            self._unknown_of.pop(key, None)
            self._said_served(served)
            self.revision += 1
            self._rows = self._concat()
            with contextlib.suppress(OSError):  # no index names it now: removed at the next start otherwise
                (self.folder / f"{key}.npy").unlink(missing_ok=True)
            return entry.rows


def _oldest_that_fit(candidates: dict[str, Entry], used: int, bound: int) -> list[Entry]:
    """Of ``candidates``, oldest first, those that fit in ``bound`` rows beside ``used`` ones: the entries a start
    serves of an extension past its bound, and those a freed row serves of the held ones."""
    chosen = []
    for entry in sorted(candidates.values(), key=lambda e: e.at):
        if used + entry.rows <= bound:
            chosen.append(entry)
            used += entry.rows
    return chosen


SETTLE_S = 2.0  # how long a reader outside the worker waits for one change of the worker's to be written whole


class _Missing(ValueError):
    """An entry's rows file the index names is not there: withdrawn since the index was read, or deleted."""


def read_folder(folder: Path, feature_dim: int) -> tuple[int, list[Entry], np.ndarray]:
    """An extension folder's revision, entries and rows [n, C], read strictly and without changing anything.

    For a reader outside the worker (``python -m exporter fold-extension``): where :class:`Extension` drops a
    broken entry and carries on serving, this raises ValueError naming it, since folding part of what an
    operator absorbed would bring the rest of those false alarms back unannounced.  A running worker rewrites the
    folder as labels come in (the rows of a frame, then the index; the index, then a withdrawn frame's file): the
    folder is read again until the index is the same before and after its rows and counts them, so what is read is
    one revision whole, not a withdrawal taken for a damaged file nor rows the reported revision did not hold.
    """
    folder = Path(folder)
    index = folder / INDEX
    if not index.is_file():
        raise ValueError(f"{folder}: no {INDEX} (not a bank-extension folder)")
    deadline = time.monotonic() + SETTLE_S
    while True:
        text = _index_text(index)
        revision, entries = _parse_index(index, text)
        missing: _Missing | None = None
        try:
            parts = [_entry_rows(folder, index, entry, feature_dim) for entry in entries]
        except _Missing as exc:
            missing, parts = exc, []
        same = _index_text(index) == text
        counted = missing is None and all(entry.rows == len(part) for entry, part in zip(entries, parts, strict=True))
        if same and counted:
            break
        if time.monotonic() >= deadline:
            if not same:
                raise ValueError(f"{folder}: a worker changed it each time it was read for {SETTLE_S:g} s (labels "
                                 "absorbed or withdrawn): run again when fewer labels come in")
            if missing is not None:
                raise missing
            # a worker stopped between writing a frame's rows and the index: it serves the rows as their file holds them
            entries = [replace(entry, rows=len(part)) for entry, part in zip(entries, parts, strict=True)]
            break
        time.sleep(0.02)  # the worker's next write (the index after a frame's rows) is on its way
    rows = np.concatenate(parts) if parts else np.empty((0, feature_dim), np.float32)
    return revision, entries, rows


def _index_text(index: Path) -> str:
    try:
        return index.read_text()
    except OSError as exc:
        raise ValueError(f"{index}: unreadable ({exc})") from exc


def _parse_index(index: Path, text: str) -> tuple[int, list[Entry]]:
    try:
        raw = json.loads(text)
        revision = int(raw["revision"])
        read = [_entry(e) for e in raw["entries"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{index}: unreadable ({exc})") from exc
    # what they would mean for the rows is unknown here: the worker keeps them, a fold would drop them
    if newer := sorted({*(k for k in raw if k not in ("revision", "entries")),
                        *(k for _, _, unknown in read for k in unknown)}):
        raise ValueError(f"{index}: fields this exporter does not read ({', '.join(newer)}): written by a newer "
                         "worker; fold it with an exporter of that worker's version")
    return revision, [entry for entry, _, _ in read]


def _entry_rows(folder: Path, index: Path, entry: Entry, feature_dim: int) -> np.ndarray:
    path = folder / f"{entry.key}.npy"
    if not _KEY.match(entry.key):
        raise ValueError(f"{index}: entry key {entry.key!r} is not a point id")
    try:
        rows = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise _Missing(f"{path}: unreadable ({exc})") from exc
    except Exception as exc:  # a damaged file can make numpy raise almost anything
        raise ValueError(f"{path}: unreadable ({exc})") from exc
    if rows.ndim != 2 or rows.shape[1] != feature_dim:
        raise ValueError(f"{path}: rows of shape {list(rows.shape)}, not [n, {feature_dim}] (the bundle's "
                         "feature dimension): this extension belongs to another bundle")
    if not np.isfinite(rows).all():
        raise ValueError(f"{path}: rows are not all finite")
    return rows.astype(np.float32, copy=False)
