"""Bounded on-disk evidence: a thumbnail of every logged frame; the original frame and heatmap of anomalous ones.

Files are named by the frame's point id (a UUID), never by anything a camera sent,
so no payload can choose a path.  Past ``max_frames`` the oldest frame's files are
deleted, and with ``max_age_h`` frames written longer ago than that (checked by
:meth:`EvidenceStore.retain`, which the store's retention pass calls); the index is
rebuilt from the folder at start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger(__name__)


class EvidenceStore:
    def __init__(self, root: Path, max_frames: int, max_age_h: float | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_frames = max_frames
        self.max_age_s = None if max_age_h is None else max_age_h * 3600
        self._lock = threading.Lock()
        self._index: OrderedDict[str, list[Path]] = OrderedDict()
        files = sorted((p for p in self.root.glob("*/*.*") if p.is_file()), key=lambda p: p.stat().st_mtime)
        for path in files:
            self._index.setdefault(path.name.split(".", 1)[0], []).append(path)
        self._enforce()

    def _path(self, key: str, kind: str, ext: str) -> Path:
        return self.root / key[:2] / f"{key}.{kind}.{ext}"

    def save(self, key: str, files: dict[str, tuple[str, bytes]]) -> dict[str, str]:
        """Write ``{kind: (ext, data)}`` for a frame; returns the paths relative to the root."""
        written = []
        for kind, (ext, data) in files.items():
            path = self._path(key, kind, ext)
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
            written.append(path)
        with self._lock:
            self._index.setdefault(key, []).extend(written)
            self._index.move_to_end(key)
            self._enforce()
        return {kind: str(p.relative_to(self.root)) for kind, p in zip(files, written, strict=True)}

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
                for path in self._index.pop(key, []):
                    path.unlink(missing_ok=True)

    def retain(self, now: float | None = None) -> int:
        """Delete frames written more than ``max_age_h`` ago (oldest first); returns how many."""
        if self.max_age_s is None:
            return 0
        cutoff = (time.time() if now is None else now) - self.max_age_s
        removed = 0
        with self._lock:
            while self._index:
                key, paths = next(iter(self._index.items()))
                newest = max((p.stat().st_mtime for p in paths if p.exists()), default=0.0)
                if newest >= cutoff:
                    break
                self._index.popitem(last=False)
                for path in paths:
                    path.unlink(missing_ok=True)
                removed += 1
        return removed

    def __len__(self) -> int:
        return len(self._index)

    def _enforce(self) -> None:
        while len(self._index) > self.max_frames:
            _, paths = self._index.popitem(last=False)
            for path in paths:
                path.unlink(missing_ok=True)
