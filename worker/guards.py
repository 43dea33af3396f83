"""What each confirmed defect guards against a false-alarm label (worker/learning.py): its decisive patches and their
reach (bundle.extension.decisive_patches), scored by the bank alone.

Scoring one takes a decode and an inference per tile; with ``learning.guard_defects`` of them, doing that again at the
first label after a restart would hold that label (and the frames waiting behind it) for seconds.  So each guard is
kept in memory and on disk, in ``guards/`` inside the bundle's extension folder (which is tied to the bundle's weights):
a restart reads it back, and it outlives the frame's image (evidence budget).  A guard records how it was scored
(precision, threshold, the camera's roi and tiling, the frame's decode); one scored otherwise is scored again.  Files are written to a
temporary name and renamed, and those of frames no longer confirmed are removed.  Entries of the folder it does not
write (a folder, another version's or an operator's file) are left as they are and named once.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from worker.models import Model

log = logging.getLogger(__name__)

FOLDER = "guards"
_KEY = re.compile(r"^[0-9a-f-]{1,64}$")  # point ids (UUIDs); never camera-chosen text in a file name

Guard = tuple[np.ndarray, np.ndarray]  # (decisive patches [m, C], reach [m])


class Guards:
    """Confirmed defects' guards by (model, point id), in memory and on disk; used from the request thread only."""

    def __init__(self) -> None:
        self._memory: dict[tuple[Model, str], tuple[str, Guard]] = {}
        self._foreign: set[Path] = set()  # entries of a guards folder already named as not the worker's

    @staticmethod
    def _file(model: Model, key: str) -> Path | None:
        if model.extension is None or not _KEY.match(key):
            return None
        return model.extension.folder / FOLDER / f"{key}.npz"

    def get(self, model: Model, key: str, how: str) -> Guard | None:
        """The guard of ``key`` for ``model`` scored as ``how`` says, from memory or disk; None if there is none."""
        held = self._memory.get((model, key))
        if held is not None and held[0] == how:
            return held[1]
        path = self._file(model, key)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as saved:
                recorded, patches, reach = str(saved["how"]), saved["patches"], saved["reach"]
        except Exception as exc:  # a damaged file (a power cut) can make numpy raise almost anything
            log.warning("guard %s is unreadable (%s): the confirmed defect is scored again", path, exc)
            return None
        spec = model.bundle.extension_spec
        if recorded != how or spec is None or patches.ndim != 2 or patches.shape[1] != spec.feature_dim \
                or reach.shape != (len(patches),):
            return None
        guard = (patches.astype(np.float32, copy=False), reach.astype(np.float32, copy=False))
        self._memory[(model, key)] = (how, guard)
        return guard

    def put(self, model: Model, key: str, how: str, guard: Guard) -> None:
        """Remember a freshly scored guard, and write it to disk (a failed write is logged: it is scored again later)."""
        self._memory[(model, key)] = (how, guard)
        path = self._file(model, key)
        if path is None:
            return
        tmp = path.with_suffix(".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as out:
                np.savez(out, how=np.array(how), patches=guard[0], reach=guard[1])
            tmp.replace(path)
        except OSError as exc:
            log.warning("guard %s could not be written (%s): it is scored again after a restart", path, exc)

    def served(self, live: set[Model]) -> None:
        """Forget the guards of models no longer served (so a replaced bundle is not kept alive by them)."""
        self._memory = {k: v for k, v in self._memory.items() if k[0] in live}

    def keep(self, live: set[Model], model: Model, keys: set[str], confirmed: set[str]) -> None:
        """Forget guards of models no longer served and, for ``model``, those not in ``keys`` (the confirmed defects it
        guards now); delete the files of frames not in ``confirmed`` (every confirmed defect, any camera)."""
        self.served(live)
        self._memory = {k: v for k, v in self._memory.items() if k[0] is not model or k[1] in keys}
        if model.extension is None:
            return
        folder, foreign = model.extension.folder / FOLDER, []
        for path in folder.glob("*"):
            if path.suffix not in (".npz", ".tmp") or not _KEY.match(path.stem) or path.is_symlink() \
                    or not path.is_file():
                if path not in self._foreign:
                    self._foreign.add(path)
                    foreign.append(path.name)
            elif path.suffix == ".tmp" or path.stem not in confirmed:
                path.unlink(missing_ok=True)
        if foreign:
            log.warning("%s holds %s, which the worker does not write (another version's, or put there by hand): left "
                        "as they are", folder, ", ".join(sorted(foreign)))
