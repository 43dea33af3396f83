"""Ending a run on SIGINT, SIGTERM or SIGHUP: remove its staging folders, say so in one line, exit 128 + signal.

An exception raised from a signal handler lands in whatever library code runs at that moment: OpenVINO's
converter and NNCF's imports swallowed it (the run went on and wrote its bundle), and raised inside OpenVINO's
telemetry thread pool it aborted the process (SIGABRT), leaving the staging folder, a whole model, beside --out.
So the handler does the cleanup itself and ends the process there.

A signal that comes once the run's new bundle is in place whole (:func:`placed`) does not call the run stopped:
where nothing else was left to do the run ends as finished, saying the signal came too late to stop anything;
else the one line names the bundle in place and what did not run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
REST = "the rest of the run"  # what a run does after a bundle is in place, unless it says
_abandon: set[Path] = set()
_placed: list[tuple[Path, str | None]] = []  # bundles this run put in place whole, each with what was left after it
_installer = [0]  # the id of the process that installed the handlers: a forked child inherits them, not the run
_kept: list[str] = []  # what a stopped run keeps for a later one to go on from, said with the stop


def remove_on_stop(folder: Path) -> None:
    """``folder`` is removed if a signal ends the run before :func:`keep_on_stop` (call both under :func:`deferred`
    where a signal between creating or moving it and this call would leave it behind)."""
    _abandon.add(folder)


def keep_on_stop(folder: Path) -> None:
    _abandon.discard(folder)


def kept(what: str | None) -> None:
    """A signal from now on says ``what`` the run keeps for a later one (the last checkpoint, how to go on from it;
    None: nothing): a distillation stopped after hours said only "interrupted", not that its work up to the
    checkpoint was kept."""
    _kept[:] = [what] if what else []


def placed(out: Path, then: str | None) -> None:
    """``out`` now holds this run's new bundle, whole; ``then``: what the run still does after it, None for nothing
    but printing where it is.  Call under :func:`deferred` with the rename: a signal held back by it is delivered
    as the block ends, after the rename, and was told "stopped" though the bundle was in place."""
    _placed.append((out, then))


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Signals wait until the block is done: a bundle being renamed into place is never left half replaced."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _stop(signum: int, _frame: FrameType | None) -> None:
    if os.getpid() != _installer[0]:
        # A forked child (a data-loading worker, a converter's helper) that its owner ends with SIGTERM: it is not
        # the run, so it says nothing ("error: stopped by SIGTERM" from a run that went on to exit 0) and removes
        # none of the run's staging folders; it ends as it would have without the handler.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    if _placed and _placed[-1][1] is None:  # nothing left to stop: the run finishes (prints the path, exit 0)
        print(f"note: {name} came after the new bundle at {_placed[-1][0]} was complete and in place; nothing was "
              "left to stop", file=sys.stderr, flush=True)
        return
    for folder in list(_abandon):
        shutil.rmtree(folder, ignore_errors=True)
    what = "interrupted (Ctrl-C)" if signum == signal.SIGINT else f"stopped by {name}"
    if _placed:
        out, then = _placed[-1]
        more = f" ({len(_placed)} new bundles in place in all)" if len(_placed) > 1 else ""
        what += f" after the new bundle at {out} was complete and in place{more}; not done: {then}"
    what += "".join(f"; {k}" for k in _kept)
    sys.stdout.flush()
    print(f"error: {what}", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def install() -> dict:
    """The signals end the run as :func:`_stop` says from now on (in this process, not in a child forked later); the
    handlers they had."""
    _installer[0] = os.getpid()
    return {sig: signal.signal(sig, _stop) for sig in SIGNALS}


def finished() -> None:
    """The command is done and has said so: a signal from here until the process is gone (the interpreter's exit,
    long with torch and OpenVINO loaded) has nothing to stop, and killed it with 128 + the signal, read as a run
    stopped.  Ignored instead (Python leaves an ignored signal ignored as it exits)."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """The signals end the run as :func:`_stop` says inside the block; the handlers before it are put back (main()
    is also called in tests; a call forgets the bundles an earlier one put in place, kept after the block for a
    signal until the process exits).  Only the main thread can set handlers."""
    _placed.clear()
    _kept.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = install()
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
