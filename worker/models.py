"""The compiled bundles a worker serves, by scope: ``default`` (model.bundle) or a camera id with its own bundle.

A reload verifies and compiles the new bundle beside the running one and then
swaps one reference, so inference threads switch between two frames and none is
dropped; the replaced model is kept for one rollback.  All bundles must produce
embeddings of the same size, since they share one vector-store collection.  A camera
with its own precision but no bundle of its own gets its own compiled copy of the
default bundle, which follows the default through reloads.  Each reload and rollback is recorded in
``model.rollout_path`` (``rollout.json``: per scope the bundle served, the one kept for rollback, and what
config.yaml named then), so a restart (a power cut, the watchdog's exit) serves what was rolled out rather than
silently going back to config.yaml's bundles; a scope whose bundle config.yaml has since changed serves
config.yaml's.  A PatchCore bundle with a bank-extension input
is compiled with room for ``learning.max_rows`` extension rows and starts with the rows its
:class:`~bundle.extension.Extension` holds on disk; compiled copies of one bundle share one extension.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from bundle import MANIFEST, BundleError, Manifest, Normalisation, read_manifest, tiling
from bundle.extension import INDEX, Extension, folder_name, stored_dimension
from bundle.runtime import BLOB_DIGEST, CompiledBundle, OutputError
from worker.config import CameraConfig, Config, camera_tiling
from worker.supervise import OPENVINO_THREADS, os_thread_named

log = logging.getLogger(__name__)

DEFAULT = "default"
ROLLOUT = "rollout.json"
RELOAD_ERRORS = (BundleError, OSError, RuntimeError, ValueError)  # what a bundle that cannot be served raises
IN_USE = ".in-use"  # in a model cache folder: shared-locked by each worker that serves its bundle


@dataclass(frozen=True)
class Rolled:
    """A scope as the last reload or rollback left it: its bundle, the one kept for rollback, and the bundle
    config.yaml named for the scope then (a different one now means config.yaml was edited since, and wins)."""

    bundle: Path
    configured: Path
    previous: Path | None


def configured_bundle(cfg: Config, scope: str) -> Path:
    """The bundle config.yaml gives ``scope``: a camera's own, else model.bundle."""
    override = cfg.cameras.get(scope)
    return override.bundle if override is not None and override.bundle is not None else cfg.model.bundle


def read_rollout(root: Path) -> dict[str, Rolled]:
    """What ``root``/rollout.json records per scope; raises what reading or parsing it raises."""
    body = json.loads((root / ROLLOUT).read_text())
    return {str(scope): Rolled(Path(e["bundle"]), Path(e["configured"]), Path(e["previous"]) if e["previous"] else None)
            for scope, e in body["scopes"].items()}


def serving_bundles(cfg: Config, camera: str) -> list[Path]:
    """The bundle the next start serves ``camera``, then config.yaml's for it: what a reload or rollback left its
    scope (its canary, else the default's) as rollout.json records it, where config.yaml still names what it named
    then (else config.yaml's serves, as :meth:`Models._restore` decides), for the commands that read the worker's
    folders without asking it.  A camera of its own precision only follows the default."""
    try:
        rolled = read_rollout(cfg.model.rollout_path) if cfg.model.rollout_path is not None else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # the worker says why at its start
        rolled = {}

    def restored(scope: str) -> list[Path] | None:
        """What a start restores for ``scope`` and what config.yaml gives it; None where no roll-out stands."""
        configured = configured_bundle(cfg, scope)
        entry = rolled.get(scope)
        return [entry.bundle, configured] if entry is not None and entry.configured == configured.absolute() else None

    override = cfg.cameras.get(camera)
    if override is not None and override.bundle is not None:
        return restored(camera) or [override.bundle]
    follows_default = override is not None and override.precision is not None
    if camera != DEFAULT and not follows_default and (canary := restored(camera)):
        return canary
    return restored(DEFAULT) or [cfg.model.bundle]


def manifest_signature(path: Path) -> tuple[int, ...] | None:
    """Which bundle.json is at ``path`` now (device, inode, size, modification time), None when there is none (a
    folder being replaced): a release copied with its times kept (``cp -a``, ``rsync -a``) is older than the model
    served, and a ``current`` link switched to another bundle shows that bundle's times, so "newer than the load"
    missed both.  One that cannot be looked at (a folder this user may not read) is ``(-errno,)``: a change, so the
    watcher tries it and says why it was refused, rather than serving the old model without a word."""
    try:
        st = (path / MANIFEST).stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        return (-(exc.errno or 1),)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def warm_up(bundle: CompiledBundle) -> None:
    """One inference on the calling thread before any inference thread may use ``bundle``.

    The first ``InferRequest.infer`` in a process initialises numpy's C API inside pybind11
    (``gil_safe_call_once_and_store``); two threads entering it at once deadlock (one holds the
    GIL waiting for the once-flag, the other holds the flag waiting for the GIL).  Models are
    compiled on the main thread at start and on the request thread on reload, never concurrently.
    """
    spec = bundle.manifest.input
    try:
        bundle.infer(np.zeros((1, spec.height, spec.width, 3), np.uint8))
    except OutputError as exc:
        raise OutputError(f"{bundle.folder}: {exc} for a black frame at {bundle.precision}: it cannot be served "
                          "(export it again; at another precision, see model.precision)") from None


@dataclass(frozen=True)
class Model:
    bundle: CompiledBundle
    path: Path
    manifest: tuple[int, ...] | None  # bundle.json as it was when read (:func:`manifest_signature`)
    extension: Extension | None = None  # None: the bundle has no extension input, or learning is off
    # the folder it was read from, links followed when it was: what a rollback after a restart must load, since a
    # link (bundles/current) may name another folder by then
    source: Path | None = None

    def tiling(self, camera: CameraConfig | None) -> tiling.Grid | None:
        """How a camera's frames are cut for this model: the camera's ``tiling``, else the bundle's (trained on tiles)."""
        return camera_tiling(camera, self.bundle.manifest.tiling)

    @property
    def info(self) -> dict:
        """What the model topic says of the model; the version gains ``+x<revision>`` once the extension has
        changed, so two results scored by different extensions never claim the same model."""
        return self.scored_by(None)

    def scored_by(self, revision: int | None) -> dict:
        """:attr:`info` for a result whose prediction names the extension ``revision`` that scored it (None: the
        current one), so a frame in flight while a label lands is not credited to the new extension.  ``extension``
        is null for a model without one (EfficientAD, learning off), not left out: every result has one schema."""
        m = self.bundle.manifest
        info: dict = {"name": m.name, "version": m.version, "family": m.family, "precision": self.bundle.precision,
                      "extension": None}
        if self.extension is not None:
            ext = self.extension.info()
            if revision is not None and revision != ext["revision"]:
                ext = {**ext, "revision": revision, "rows": None}  # an older extension: its row count is gone
            info["extension"] = ext
            if ext["revision"]:
                info["version"] = f"{m.version}+x{ext['revision']}"
        return info


_CACHE_FOLDER = re.compile(r".+-[0-9a-f]{16}")


class Models:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self._current: dict[str, Model] = {}
        self._previous: dict[str, Model] = {}
        self.embedding_dim: int | None = None
        self._extensions: dict[Path, Extension] = {}
        self._previous_paths: dict[str, Path] = {}  # kept for rollback by a run before this one, not compiled
        # rolled out before this start but not served now (its bundle was missing or broken at the start): kept in
        # the record for the next start, until a reload or rollback of its scope replaces it
        self._unrestored: dict[str, Rolled] = {}
        self._record_lock = threading.Lock()
        # why what serves now is not what rollout.json records (its last write failed); None when it is
        self.unrecorded: str | None = None
        self._started = False
        self._cache_claims: dict[str, IO[str]] = {}  # model cache folder name: its IN_USE file, shared-locked
        rolled = self._read_rollout(set_aside=True)
        for scope in [DEFAULT, *(camera for camera in cfg.cameras if self._configured(camera))]:
            if self.follows_default(scope):  # its own precision of whatever the default serves
                rolled.pop(scope, None)
                self.load(scope, self._current[DEFAULT].path)
            else:
                self._restore(scope, rolled.pop(scope, None), fallback=True)
        for scope, entry in rolled.items():  # canaries: camera scopes only a reload made
            if scope != DEFAULT:
                self._restore(scope, entry, fallback=False)
        self._started = True
        self._record()
        self._prune_cache()

    def _configured_bundle(self, scope: str) -> Path:
        """The bundle config.yaml gives ``scope``: a camera's own, else model.bundle."""
        return configured_bundle(self.cfg, scope)

    def _restore(self, scope: str, rolled: Rolled | None, fallback: bool) -> None:
        """Start ``scope`` on what was rolled out for it, else (``fallback``) on config.yaml's bundle."""
        configured = self._configured_bundle(scope).absolute()
        if rolled is not None and rolled.previous is not None and rolled.previous == rolled.bundle:
            # recorded before the folders were: a bundle replaced in place kept "for rollback" is the one served
            rolled = Rolled(rolled.bundle, rolled.configured, None)
        if rolled is not None and rolled.configured != configured:
            # rollout.json is written at every start and stop: a scope no reload or rollback touched records
            # config.yaml's bundle with nothing kept for rollback, and an edit of config.yaml since is no news
            if rolled.bundle != rolled.configured or rolled.previous is not None:
                log.warning("rollout: config.yaml names %s for %s since %s was rolled out (config.yaml named %s "
                            "then): config.yaml's serves", configured, scope, rolled.bundle, rolled.configured)
            rolled = None
        if rolled is not None and (rolled.bundle != configured or not fallback):  # a canary may be config.yaml's own
            try:
                model = self.load(scope, rolled.bundle)
            except RELOAD_ERRORS as exc:
                log.error("rollout: %s cannot serve %s, rolled out before this start (%s); %s, and the next start "
                          "tries it again (a reload or rollback of %s replaces it)", scope, rolled.bundle, exc,
                          f"config.yaml's {configured} serves" if fallback else "the camera follows the default", scope)
                self._unrestored[scope] = rolled
            else:
                log.info("rollout: %s serves %s %s from %s as rolled out before this start (config.yaml names %s)",
                         scope, model.info["name"], model.info["version"], rolled.bundle, configured)
                if rolled.previous is not None:
                    self._previous_paths[scope] = rolled.previous
                return
        elif rolled is not None and rolled.previous is not None:  # rolled back to config.yaml's: rollback goes on
            self._previous_paths[scope] = rolled.previous
        if fallback:
            self.load(scope, configured)

    def _read_rollout(self, set_aside: bool = False) -> dict[str, Rolled]:
        """What rollout.json records.  ``set_aside`` (at a start, which writes the file again): one that cannot be
        read is renamed beside it first, so that what it held (another version's format, a hand edit) is not lost."""
        root = self.cfg.model.rollout_path
        if root is None:
            return {}
        try:
            return read_rollout(root)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # damaged: a power cut, a hand edit
            kept = ""
            if set_aside and not isinstance(exc, OSError):
                aside, n = root / f"{ROLLOUT}.unreadable", 1
                while aside.exists():
                    n += 1
                    aside = root / f"{ROLLOUT}.unreadable-{n}"
                with contextlib.suppress(OSError):
                    (root / ROLLOUT).rename(aside)
                    kept = f", set aside as {aside.name} (another version's format, a hand edit or a power cut)"
            log.error("rollout: %s cannot be read (%s: %s)%s; config.yaml's bundles serve", root / ROLLOUT,
                      type(exc).__name__, exc, kept)
            return {}

    def record_again(self, quiet: bool = False) -> None:
        """Write rollout.json again where its last write failed (:attr:`unrecorded`): the worker calls this on its
        stats tick (``quiet``: a failure that persists is not logged each time) and at a clean stop."""
        if self.unrecorded is not None:
            self._record(quiet)

    def _record(self, quiet: bool = False) -> None:
        """Write what each scope serves and keeps for rollback, replacing the file whole (a crash leaves the old
        or the new one).  A write that fails is said, with what the file on disk still records (what a restart
        would serve), and kept in :attr:`unrecorded` for the answer and for :meth:`record_again`."""
        root = self.cfg.model.rollout_path
        if root is None:
            return
        tmp = root / (ROLLOUT + ".tmp")
        with self._record_lock:  # the state read and written by one caller at a time: the last change is the file's
            with self._lock:
                scopes = {}
                for scope, model in self._current.items():
                    previous = self._previous_paths.get(scope)
                    if (kept := self._previous.get(scope)) is not None:
                        # its folder as read; none where the served bundle was read from it since (a folder
                        # replaced in place): the earlier bundle is no longer on disk, and a rollback after a
                        # restart would load the one served
                        previous = None if kept.source == model.source else kept.source
                    scopes[scope] = {"bundle": str(model.path.absolute()),
                                     "configured": str(self._configured_bundle(scope).absolute()),
                                     "previous": None if previous is None else str(previous.absolute())}
                for scope, rolled in self._unrestored.items():  # a bundle missing for one start is not forgotten
                    scopes[scope] = {"bundle": str(rolled.bundle), "configured": str(rolled.configured),
                                     "previous": None if rolled.previous is None else str(rolled.previous)}
            try:
                try:
                    root.mkdir(parents=True, exist_ok=True)
                    tmp.write_text(json.dumps({"scopes": scopes}, indent=1))
                    tmp.replace(root / ROLLOUT)
                except OSError:
                    with contextlib.suppress(OSError):
                        tmp.unlink(missing_ok=True)
                    raise
            except OSError as exc:
                was, self.unrecorded = self.unrecorded, f"{root / ROLLOUT} could not be written ({exc})"
                if quiet and was is not None:
                    return
                old = self._read_rollout()
                serves = ("what it still records from before: " + ", ".join(f"{s} {r.bundle}" for s, r in old.items())
                          if old else "config.yaml's bundles")
                log.error("rollout: cannot record the models served in %s (%s): until it can, a restart would serve %s; "
                          "it is written again at the next reload or rollback, at the next stats tick and at a clean "
                          "stop", root / ROLLOUT, exc, serves)
                return
            if self.unrecorded is not None:
                log.info("rollout: %s records the models served again", root / ROLLOUT)
            self.unrecorded = None

    def precision(self, scope: str) -> str:
        override = self.cfg.cameras.get(scope)
        return override.precision if override and override.precision else self.cfg.model.precision

    def follows_default(self, scope: str) -> bool:
        """A camera scope that exists only for its own precision: it serves whatever the default serves.  A camera
        with other settings of its own (an roi, a heatmap policy) and no precision is no scope of config.yaml's: it
        serves the default model itself, or a canary of its own."""
        override = self.cfg.cameras.get(scope)
        return override is not None and override.bundle is None and override.precision is not None and scope != DEFAULT

    def _cache_for(self, path: Path) -> Path | None:
        """A bundle's own folder in the OpenVINO model cache (``<name>-<weights>``), so the blobs of bundles no
        longer served can be found and deleted (:meth:`_prune_cache`)."""
        root = self.cfg.model.cache_dir
        return None if root is None else root / folder_name(read_manifest(path, verify=False))

    def _claim_cache(self, path: Path) -> None:
        """Shared-lock the model cache folder of the bundle at ``path`` before compiling into it: a worker sharing
        ``model.cache_dir`` deleted, at each of its reloads, the folders of the bundles it did not serve itself,
        the ones the other worker served (or was compiling into) included, which then compiled again at every start."""
        folder = self._cache_for(path)
        if folder is None or folder.name in self._cache_claims:
            return
        for _ in range(3):  # the folder deleted by a worker that no longer served it, between our open and lock
            try:
                folder.mkdir(parents=True, exist_ok=True)
                handle = (folder / IN_USE).open("a")
            except OSError:  # the compile says why, or goes on without the cache
                return
            try:
                fcntl.flock(handle, fcntl.LOCK_SH)
                if os.fstat(handle.fileno()).st_ino == (folder / IN_USE).stat().st_ino:
                    self._cache_claims[folder.name] = handle
                    return
            except OSError:  # a file system without locks (some network mounts), or the folder gone: tried again
                pass
            handle.close()

    def _prune_cache(self) -> None:
        """Delete the cache folders of bundles neither served nor kept for rollback, and blobs of the older flat
        layout: each retrained bundle adds its compiled blobs, and a line retrained weekly would fill the disk.
        Only what looks like ours goes: ``<name>-<16 hex>`` folders holding blobs (and their digests), and ``*.blob``
        files; a folder another worker sharing the cache serves (its IN_USE file locked) stays."""
        root = self.cfg.model.cache_dir
        if root is None or not root.is_dir():
            return
        with self._lock:
            keep = {folder_name(m.bundle.manifest) for m in [*self._current.values(), *self._previous.values()]}
            kept_paths = list(self._previous_paths.values())
        for path in kept_paths:  # kept for rollback by a run before this one: compiled again at a rollback
            try:
                keep.add(folder_name(read_manifest(path, verify=False)))
            except RELOAD_ERRORS:  # gone or unreadable: a rollback to it fails and says why
                continue
        for name in [n for n in self._cache_claims if n not in keep]:  # ours no longer: free for any worker to delete
            self._cache_claims.pop(name).close()
        try:
            entries = list(root.iterdir())
        except OSError as exc:
            log.warning("model cache: cannot list %s (%s)", root, exc)
            return
        for entry in entries:
            try:
                if entry.is_dir() and entry.name not in keep and _CACHE_FOLDER.fullmatch(entry.name) \
                        and all(f.name == IN_USE or f.name.endswith((".blob", ".blob" + BLOB_DIGEST))
                                for f in entry.iterdir()):
                    if not _delete_unused(entry):
                        continue
                elif entry.is_file() and entry.suffix == ".blob":
                    entry.unlink()
                else:
                    continue
                log.info("model cache: deleted %s (no bundle served or kept for rollback uses it)", entry)
            except OSError as exc:
                log.warning("model cache: could not delete %s (%s)", entry, exc)

    def _compile_and_warm(self, path: Path, precision: str) -> tuple[CompiledBundle, Extension | None]:
        learning = self.cfg.learning
        self._claim_cache(path)
        bundle = CompiledBundle(path, self.cfg.model.device, self._cache_for(path), batch=1, precision=precision,
                                extension_rows=learning.max_rows if learning.enabled else None)
        dim = bundle.manifest.embedding_dim
        if self.embedding_dim is not None and dim != self.embedding_dim:
            raise BundleError(f"{path}: embedding_dim {dim} differs from the served models' {self.embedding_dim} "
                              "(they share one vector-store collection)")
        extension = self._extension(bundle.manifest) if learning.enabled else None
        if extension is not None:
            bundle.set_extension(extension.rows, extension.revision)
        warm_up(bundle)
        return bundle, extension

    def _compile(self, path: Path, precision: str) -> Model:
        """Verify, compile and warm up the bundle at ``path``; whatever stops it is a :class:`BundleError` naming the
        bundle, so the start ends with one line (exit 2) and a reload answers reload_failed, as for a bad checksum."""
        started, signature = time.monotonic(), manifest_signature(path)
        try:
            with os_thread_named(OPENVINO_THREADS):  # its threads start in the compile and the warm-up (top -H names them)
                bundle, extension = self._compile_and_warm(path, precision)
        except BundleError:
            raise
        except (OSError, RuntimeError, ValueError) as exc:  # OpenVINO's, or a file's: one line naming the bundle
            raise BundleError(f"{path}: cannot be served ({type(exc).__name__}: {' '.join(str(exc).split())})") from exc
        m = bundle.manifest
        log.info("bundle %s %s (%s) compiled on %s (%s) at %s in %.2f s, %d infer requests%s", m.name, m.version,
                 m.family, self.cfg.model.device, bundle.device_name, bundle.precision, time.monotonic() - started,
                 bundle.optimal_requests, f", extension of {len(extension.rows)} rows" if extension else "")
        return Model(bundle, Path(path), signature, extension, Path(path).resolve())

    def _extension(self, m: Manifest) -> Extension | None:
        """The on-disk extension of this bundle (by its weights' sha256), shared by its compiled copies."""
        if m.extension is None:
            return None
        folder = self.cfg.learning.path / folder_name(m)
        with self._lock:
            ext = self._extensions.get(folder)
            if ext is None:
                try:
                    ext = Extension(folder, m.extension.feature_dim, self.cfg.learning.max_rows)
                    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):  # opening it writes only an index that needs it
                        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))
                except OSError as exc:
                    # learning.path's own check found its root writable, not this bundle's folder in it: every label
                    # would fail, and opening it (rewriting its index) ended the start with a traceback
                    raise BundleError(f"{m.name} {m.version}: its bank extension folder {folder} cannot be written "
                                      f"({exc.strerror or exc}): make it writable by uid {os.geteuid()}, which runs "
                                      "this worker (chown -R, and chattr -i where it was made immutable), or set "
                                      "learning.path to a folder it can write") from exc
                self._extensions[folder] = ext
            return ext

    def _forget_extensions(self) -> None:
        """Let go of the extensions of bundles neither served nor kept for rollback: each bundle ever served (a line
        retrained weekly) kept its own, rows and all, for the life of the process, and an empty folder under
        ``learning.path`` for good.  A folder that holds rows stays on disk (a withdrawal opens it again); an empty
        one is removed (serving that bundle again makes it anew)."""
        with self._lock:
            keep = {m.extension.folder for m in [*self._current.values(), *self._previous.values()]
                    if m.extension is not None}
            kept_paths = list(self._previous_paths.values())
        for path in kept_paths:  # kept for rollback by a run before this one
            try:
                keep.add(self.cfg.learning.path / folder_name(read_manifest(path, verify=False)))
            except RELOAD_ERRORS:  # gone or unreadable: a rollback to it fails and says why
                continue
        with self._lock:
            gone = [folder for folder in self._extensions if folder not in keep]
            for folder in gone:
                del self._extensions[folder]
        for folder in gone:
            with contextlib.suppress(OSError):  # not empty (rows, guards), or gone: left as it is
                folder.rmdir()

    def extensions(self, every: bool = False) -> list[Extension]:
        """The extensions of the bundles served or kept for rollback: those a run before this one kept (a path, not
        compiled) are opened too.  Not those of bundles served earlier and replaced since (each reload opens one: the
        stats and the console grew by one per bundle ever rolled out).  ``every``: every extension under
        ``learning.path`` too, opened where this run has not, for a withdrawal, which must leave each one: serving
        that bundle again (a reload, a rollback after a restart) would otherwise bring the false alarm back."""
        with self._lock:
            kept = list(self._previous_paths.values())
            wanted = {m.extension.folder for m in [*self._current.values(), *self._previous.values()]
                      if m.extension is not None}
        if self.cfg.learning.enabled:
            for path in kept:
                try:
                    ext = self._extension(read_manifest(path, verify=False))
                except BundleError:
                    continue  # gone or unreadable: a rollback to it fails, and says so
                if ext is not None:
                    wanted.add(ext.folder)
        if every:
            self._open_stored()
        with self._lock:
            return [ext for folder, ext in self._extensions.items() if every or folder in wanted]

    def _open_stored(self) -> None:
        """Open each extension folder under ``learning.path`` this run has not (one with entries: its rows say their
        feature dimension); one that cannot be read is left as it is."""
        root = self.cfg.learning.path
        folders = [f for f in root.iterdir() if (f / INDEX).is_file()] if root.is_dir() else []
        for folder in folders:
            with self._lock:
                if folder in self._extensions:
                    continue
            dim = stored_dimension(folder)
            if dim is None:
                continue
            with self._lock:
                if folder not in self._extensions:
                    self._extensions[folder] = Extension(folder, dim, self.cfg.learning.max_rows)

    def apply(self, extension: Extension) -> None:
        """Every compiled bundle that shares ``extension`` scores with its current rows from the next frame on
        (the replaced models kept for rollback too, so a rollback does not bring a false alarm back)."""
        with self._lock:
            models = [*self._current.values(), *self._previous.values()]
        for model in models:
            if model.extension is extension:
                model.bundle.set_extension(extension.rows, extension.revision)

    def load(self, scope: str, path: Path) -> Model:
        """Verify, compile and switch ``scope`` to the bundle at ``path``; raises BundleError and keeps the old one.

        Reloading the default also moves the cameras that follow it (own precision, no own bundle); all are
        compiled before any is switched, so a bundle that fails at one precision changes nothing.  The bundle a scope
        serves already, loaded again (a reload retried after its wait ran out), keeps the one a rollback goes back
        to: it replaced it with itself, and the rollback then stayed where it was.
        """
        followers = [s for s in self.scopes() if scope == DEFAULT and self.follows_default(s)]
        compiled = {s: self._compile(path, self.precision(s)) for s in [scope, *followers]}
        with self._lock:
            self.embedding_dim = compiled[scope].bundle.manifest.embedding_dim
            for s, model in compiled.items():
                if s in self._current and self._current[s].bundle.manifest != model.bundle.manifest:
                    self._previous[s] = self._current[s]
                    self._previous_paths.pop(s, None)
                self._current[s] = model
                if self._started:
                    self._unrestored.pop(s, None)
            if scope == DEFAULT:
                self._end_canaries_of(compiled[scope])
        if self._started:
            self._record()
            self._prune_cache()
            self._forget_extensions()
        return compiled[scope]

    def _end_canaries_of(self, rolled: Model) -> None:
        """A bundle rolled out to all (or rolled back to) ends its canaries (camera scopes only a reload made, serving
        that bundle): they follow the default from now on, so a rollback of the default takes them back too (they
        stayed on it).  So does a canary of that bundle's folder not served since the start (its bundle was missing
        then): it would otherwise come back at a later start, over the bundles rolled out since."""
        manifest = rolled.bundle.manifest
        for scope, pending in list(self._unrestored.items()):
            if scope != DEFAULT and not self._configured(scope) and pending.bundle.resolve() == rolled.path.resolve():
                del self._unrestored[scope]
                log.info("canary on %s (%s, not served since the start) ends: it now serves every camera", scope,
                         pending.bundle)
        for scope, model in list(self._current.items()):
            m = model.bundle.manifest
            if scope != DEFAULT and not self._configured(scope) and (folder_name(m), m.version) == (
                    folder_name(manifest), manifest.version):
                del self._current[scope]
                self._previous.pop(scope, None)
                self._previous_paths.pop(scope, None)
                log.info("canary on %s ends: %s %s now serves every camera", scope, m.name, m.version)

    def _configured(self, scope: str) -> bool:
        """A scope config.yaml gives a model of its own (a bundle or a precision), as opposed to a canary's."""
        override = self.cfg.cameras.get(scope)
        return scope == DEFAULT or (override is not None and (override.bundle is not None or override.precision is not None))

    def rollback(self, scope: str) -> Model:
        """The scope's previous model again (compiled now where a run before this one kept it); a camera's first
        canary (a scope only a reload made) is dropped, so the camera follows the default again.  The model rolled
        back from is not kept: a second rollback is refused rather than putting it back (a rollback was a toggle,
        and an operator who clicked twice re-deployed the bundle just rolled back from)."""
        with self._lock:
            earlier = self._previous_paths.get(scope) if scope not in self._previous else None
            if earlier is None and scope in self._unrestored and scope not in self._current:
                # a canary whose bundle was missing at the start: the camera follows the default already
                log.info("rollback: the canary on %s (%s, not served since the start) is dropped", scope,
                         self._unrestored.pop(scope).bundle)
                model = self._current[DEFAULT]
            elif earlier is None:
                model = self._swap_back(scope)
                self._unrestored.pop(scope, None)
                if scope == DEFAULT:  # as a rollback that compiles its bundle again does (load)
                    self._end_canaries_of(model)
        if earlier is not None:
            model = self.load(scope, earlier)  # the path stays kept if it fails
            with self._lock:
                for s in [scope, *(s for s in self._previous if scope == DEFAULT and self.follows_default(s))]:
                    self._previous.pop(s, None)
        self._record()
        self._forget_extensions()
        return model

    def _swap_back(self, scope: str) -> Model:
        """:meth:`rollback` among the compiled models, under the lock."""
        if scope not in self._previous and scope in self._current and not self._configured(scope):
            del self._current[scope]
            return self._current[DEFAULT]
        if scope not in self._previous:
            now = self._current.get(scope) or self._current[DEFAULT]
            m = now.bundle.manifest
            raise BundleError(f"no previous model to roll back to for {scope!r}: it serves {m.name} {m.version}, and "
                              "no earlier bundle is kept (a rollback goes back one bundle, once; reload the bundle "
                              "you want)")
        followers = [s for s in self._previous if scope == DEFAULT and self.follows_default(s)]
        for s in [scope, *followers]:
            self._current[s] = self._previous.pop(s)
        return self._current[scope]

    @property
    def default(self) -> Model:
        return self._current[DEFAULT]

    def for_camera(self, camera: str) -> Model:
        current = self._current
        return current.get(camera) or current[DEFAULT]

    def scopes(self) -> dict[str, Model]:
        with self._lock:
            return dict(self._current)

    def pending(self) -> dict[str, str]:
        """Scopes rolled out before this start whose bundle could not serve at it, by their bundle's path: the next
        start tries them again, unless a reload or rollback of the scope (or a roll-out of that bundle) replaces them."""
        with self._lock:
            return {scope: str(rolled.bundle) for scope, rolled in self._unrestored.items()}

    def image_norm(self, model: Model, camera: str) -> Normalisation:
        """The bundle's image normalisation with the configured threshold override, per camera first."""
        override = self.cfg.cameras.get(camera)
        threshold = override.threshold if override and override.threshold is not None else self.cfg.model.threshold
        base = model.bundle.thresholds.image
        if threshold is None:
            return base
        # an override at or below the held-out normals' minimum keeps the bundle's span below it, so a frame at the
        # threshold still reads 0.5 (with the minimum as low, every flagged frame read 0)
        low = base.low if threshold > base.low else threshold - (base.threshold - base.low)
        return Normalisation(low=low, threshold=threshold)

    def changed_on_disk(self) -> list[tuple[str, Path]]:
        """Scopes whose bundle.json is another file, or was written again, since the model was read (model.watch_s);
        a folder with no bundle.json (being replaced) is left until one is there.  A camera that follows the default
        (its own precision only) is reloaded with it, not again: reloaded twice, its rollback kept the new bundle."""
        scopes = self.scopes()
        default = scopes.get(DEFAULT)
        return [(scope, model.path) for scope, model in scopes.items()
                if not (self.follows_default(scope) and default is not None and model.path == default.path)
                and (now := manifest_signature(model.path)) is not None and now != model.manifest]


def _delete_unused(folder: Path) -> bool:
    """Delete a model cache folder unless a worker sharing the cache serves its bundle (holds its IN_USE file);
    whether it was deleted.  Raises OSError where it cannot be."""
    with (folder / IN_USE).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:  # a file system without locks (some network mounts): deleted unguarded, as it always was
            pass
        shutil.rmtree(folder)
    return True
