"""A bundle is built in a staging folder beside ``--out`` and renamed into place whole, so a worker watching ``--out``
never sees a half-written or provisional bundle, and a run stopped or killed part way leaves nothing at ``--out``.

Used by ``train`` (exporter/build.py) and ``fold-extension`` (exporter/fold.py).  Staging folders are
``.NAME.partial-PID-*``; a bundle being replaced is renamed aside to ``.NAME.replaced-PID`` for the moment of the swap.
A single file (a teacher, its checkpoint, ``evaluate --json``) is written to ``.NAME.PID.tmp`` beside it and renamed
(:func:`temporary`).  Each name holds the writing run's pid, so a later run removes what a killed one left and leaves
a running one's alone.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bundle import BUNDLE_FILES, MANIFEST, BundleError, process_running, read_manifest
from exporter import stopping

log = logging.getLogger(__name__)
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a quota, a file size limit
STARTED = time.time()  # when this run started: a bundle at --out written since was put there by another run


def replaceable(out: Path) -> bool:
    """Whether a bundle may be moved to ``out``: nothing is there, an empty folder, or a bundle (which it replaces)
    holding nothing but its own files (:func:`foreign`)."""
    return not out.exists() or (out.is_dir() and ((out / MANIFEST).is_file() or not any(out.iterdir()))
                                and not foreign(out))


def foreign(out: Path) -> list[str]:
    """The names in the bundle folder ``out`` that are not a bundle's own files: replacing the bundle removed the
    whole folder, a user's notes or anything else put there with it."""
    if not (out / MANIFEST).is_file():
        return []
    return sorted(p.name for p in out.iterdir() if p.name not in (MANIFEST, *BUNDLE_FILES))


def temporary(path: Path) -> Path:
    """Where this run writes ``path`` before renaming it into place: ``.NAME.PID.tmp`` beside it."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_stale_temporaries(path: Path) -> None:
    """Remove the :func:`temporary` files (or folders) of ``path`` that runs writing it were killed before renaming
    (SIGKILL, a power cut): each can be a whole teacher, checkpoint or backbone, and nothing else ever removed them.
    Only names of that pattern, and only those of processes no longer running."""
    for entry, pid, _ in _left_by_killed_runs(path, r"(\d+)\.tmp"):
        if entry.is_symlink():
            continue
        log.info("removing %s, left by an exporter run (pid %d) that was killed while writing %s", entry, pid, path)
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _left_by_killed_runs(path: Path, pattern: str) -> Iterator[tuple[Path, int, re.Match[str]]]:
    """The entries beside ``path`` named ``.NAME.<pattern>``, whose first group that matched is the pid of the run
    that wrote them, where that run is no longer running (nor is this one): a run to the same place at once keeps
    its own."""
    for entry in path.parent.glob(f".{glob.escape(path.name)}.*"):
        match = re.fullmatch(rf"\.{re.escape(path.name)}\.{pattern}", entry.name)
        if match is None:
            continue
        pid = int(next(group for group in match.groups() if group))
        if pid != os.getpid() and not process_running(pid):
            yield entry, pid, match


def remove_stale_staging(out: Path) -> None:
    """Remove the folders beside ``out`` that runs to it were killed before removing (``.NAME.partial-PID-*``,
    ``.NAME.replaced-PID``, :func:`exporter.build.check_out`'s empty ``.NAME.check-PID-*``): each can hold a whole
    model.  Only those of processes no longer running, so two runs to one ``--out`` at once leave each other's
    staging folder alone.  A run killed between renaming the bundle at
    ``out`` aside and its own into place left ``out`` missing: the bundle set aside goes back instead."""
    for entry, pid, match in _left_by_killed_runs(out, r"(?:(?:partial|check)-(\d+)-.+|replaced-(\d+))"):
        if not entry.is_dir():
            continue
        if match[2] and not out.exists() and (entry / MANIFEST).is_file():  # killed between its two renames:
            log.warning("%s is missing and %s holds the bundle an exporter run (pid %d) was replacing when it was "
                        "killed: putting it back", out, entry, pid)
            entry.rename(out)  # the bundle it was replacing goes back
            continue
        log.info("removing %s, left by an exporter run (pid %d) that was killed", entry, pid)
        shutil.rmtree(entry, ignore_errors=True)


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished bundle to ``out``; an existing bundle (or empty folder) there is replaced (renamed aside,
    then removed).

    The staging folder gets the mode any folder made under this umask has: mkdtemp makes it 0700, and a bundle
    copied from there as root (deploy/README) was then unreadable to the worker's own user."""
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    if not out.exists():
        staging.rename(out)
        return
    if not replaceable(out):
        raise ValueError(refusal(out))
    _say_if_put_there_since_start(out)
    aside = out.parent / f".{out.name}.replaced-{os.getpid()}"
    out.rename(aside)
    staging.rename(out)
    shutil.rmtree(aside, ignore_errors=True)


def _say_if_put_there_since_start(out: Path) -> None:
    """Warn before replacing a bundle written at ``out`` after this run started: two runs to one ``--out`` at once
    (a cron job and an operator) each said only where they wrote, and the one that finished first never learned its
    bundle was gone; this run's operator is told whose bundle this one replaces."""
    try:
        written = (out / MANIFEST).stat().st_mtime
    except OSError:  # an empty folder: nobody's bundle
        return
    if written < STARTED:
        return
    try:
        replaced = read_manifest(out, verify=False)
        what = f"bundle {replaced.name} {replaced.version}"
    except (OSError, ValueError, BundleError):  # a manifest this version cannot read: a bundle all the same
        what = "a bundle"
    log.warning("%s held %s, put there at %s while this run was running (another run to the same --out, or a copy): "
                "replacing it with this run's, so that one is gone", out, what,
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(written)))


def refusal(out: Path) -> str:
    """Why a bundle cannot be moved to ``out`` (not :func:`replaceable`)."""
    if others := foreign(out):
        return (f"{out} is a model bundle holding other files too ({', '.join(others[:5])}"
                f"{', ...' if len(others) > 5 else ''}): replacing it would delete them; move them out or choose "
                "another folder")
    return f"{out} exists and is not a model bundle; not replacing it: choose another folder"


@contextlib.contextmanager
def staged(out: Path, then: str | None = stopping.REST) -> Iterator[Path]:
    """A new staging folder beside ``out`` (stale ones of killed runs removed first), renamed to ``out`` when the
    block ends without an error and removed otherwise, on a signal too (:mod:`exporter.stopping`).  ``then``: what
    the run does after the bundle is in place (None: nothing but saying where), for a signal that comes after."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    with stopping.deferred():
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
        stopping.remove_on_stop(staging)
    try:
        yield staging
        with stopping.deferred():
            _move_into_place(staging, out)
            stopping.placed(out, then)
    except OSError as exc:
        if exc.errno not in FULL:
            raise
        # A write that fails part way names no file ("[Errno 28] No space left on device" was all the run said,
        # after the whole fit), an open names the staging folder, removed here: the bundle and its disk are named.
        free = shutil.disk_usage(out.parent).free
        raise OSError(f"cannot write the bundle {out}: {exc.strerror} ({free / 2**20:.0f} MB free on its disk); "
                      f"the unfinished bundle was removed and {out} is as it was before this run") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone once renamed
        stopping.keep_on_stop(staging)
