"""Ending a run on SIGINT, SIGTERM or SIGHUP: remove its staging folders, say so in one line, exit 128 + signal.

An exception raised from a signal handler lands in whatever library code runs at that moment: OpenVINO's
converter and NNCF's imports swallowed it (the run went on and wrote its bundle), and raised inside OpenVINO's
telemetry thread pool it aborted the process (SIGABRT), leaving the staging folder, a whole model, beside --out.
So the handler does the cleanup itself and ends the process there.
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
_abandon: set[Path] = set()


def remove_on_stop(folder: Path) -> None:
    """``folder`` is removed if a signal ends the run before :func:`keep_on_stop` (call both under :func:`deferred`
    where a signal between creating or moving it and this call would leave it behind)."""
    _abandon.add(folder)


def keep_on_stop(folder: Path) -> None:
    _abandon.discard(folder)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Signals wait until the block is done: a bundle being renamed into place is never left half replaced."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _stop(signum: int, _frame: FrameType | None) -> None:
    for folder in list(_abandon):
        shutil.rmtree(folder, ignore_errors=True)
    what = "interrupted (Ctrl-C)" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    sys.stdout.flush()
    print(f"error: {what}", file=sys.stderr, flush=True)
    os._exit(128 + signum)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """The signals end the run as :func:`_stop` says inside the block; the handlers before it are put back (main()
    is also called in tests).  Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.signal(sig, _stop) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
