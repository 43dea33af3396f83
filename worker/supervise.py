"""Supervision of the worker's long-lived threads: one loop helper, one liveness registry, one watchdog.

Every long-lived thread (inference, recorder, request server, and paho's network
thread through its callbacks) runs its work through :func:`supervised_loop` or a
:meth:`Liveness.busy` block, so an exception is logged with its traceback,
counted, and the loop goes on, and the registry knows for each thread when it last
made progress and whether it is busy right now.  A thread busy for longer than
``worker.watchdog_s`` is *stuck*; one that ended while the worker runs is *dead*.
Both make ``/healthz`` fail and the worker exit non-zero so its service manager
restarts it.  Python cannot see a thread that holds the GIL forever, so the main
loop also re-arms :func:`faulthandler.dump_traceback_later` (a C thread that needs
no GIL): if the main loop itself stops running, that timer dumps every thread's
stack and ends the process.  Its timeout is ``SWITCH_FACTOR`` times the watchdog's, so that a stuck thread is
always ended by the watchdog, with its reason, and a freeze of the whole process (SIGSTOP, ``docker pause``, a
paused VM: the monotonic clock runs on meanwhile) shorter than that is excused (:meth:`Liveness.excuse`) instead of
taken for a hang.  Each supervised loop also names its thread at the OS level, so
``top -H``, ``ps -L`` and ``/proc/PID/task/*/comm`` tell the worker's loops from OpenVINO's threads.
"""

from __future__ import annotations

import ctypes
import faulthandler
import functools
import logging
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class StopLoop(Exception):
    """Raised by a loop step to end its :func:`supervised_loop` normally (e.g. its queue was closed)."""


@dataclass
class ThreadState:
    """What the watchdog knows about one thread (monotonic clock)."""

    name: str
    thread: threading.Thread | None = None
    last_progress: float = field(default_factory=time.monotonic)
    busy_since: float | None = None
    restarts: int = 0  # times its loop went on after an exception it did not handle itself
    finished: bool = False


class Liveness:
    """Registry of supervised threads; read by the stats topic, /metrics, /healthz and the watchdog."""

    def __init__(self, stuck_after_s: float) -> None:
        self.stuck_after_s = stuck_after_s
        self._lock = threading.Lock()
        self._threads: dict[str, ThreadState] = {}

    def register(self, name: str, thread: threading.Thread | None = None) -> ThreadState:
        with self._lock:
            state = self._threads.setdefault(name, ThreadState(name))
            state.thread = thread or state.thread
            return state

    @contextmanager
    def busy(self, name: str) -> Iterator[None]:
        """Mark ``name`` busy for the block; progress when it ends, however it ends.  The times are set under the
        lock, so that :meth:`excuse` cannot put back a start the thread has just cleared."""
        state = self.register(name)
        with self._lock:
            state.busy_since = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                state.busy_since = None
                state.last_progress = time.monotonic()

    def progress(self, name: str) -> None:
        """Progress inside one long piece of work (a file of an export copied): its busy start moves to now, so work
        that keeps moving is not taken for a stuck thread, and work that stops moving still is."""
        state = self.register(name)
        with self._lock:
            now = time.monotonic()
            if state.busy_since is not None:
                state.busy_since = now
            state.last_progress = now

    def excuse(self, gap_s: float, resumed_at: float) -> None:
        """The whole process did not run for ``gap_s`` seconds up to ``resumed_at`` (stopped, paused): no thread could
        make progress meanwhile, so every busy start and last progress before then moves forward by the gap (never
        past ``resumed_at``), and a freeze is not taken for a stuck thread."""
        with self._lock:
            for s in self._threads.values():
                if s.busy_since is not None and s.busy_since < resumed_at:
                    s.busy_since = min(s.busy_since + gap_s, resumed_at)
                if s.last_progress < resumed_at:
                    s.last_progress = min(s.last_progress + gap_s, resumed_at)

    def failed(self, name: str) -> None:
        with self._lock:
            self._threads[name].restarts += 1

    def finished(self, name: str) -> None:
        self.register(name).finished = True

    def problems(self, now: float | None = None) -> list[str]:
        """Threads that are dead (ended unexpectedly) or stuck (busy past the limit); empty when healthy."""
        now = time.monotonic() if now is None else now
        out = []
        with self._lock:
            states = list(self._threads.values())
        for s in states:
            if s.thread is not None and not s.thread.is_alive() and not s.finished:
                out.append(f"{s.name}: dead")
            busy = s.busy_since
            if busy is not None and self.stuck_after_s and now - busy > self.stuck_after_s:
                out.append(f"{s.name}: stuck for {now - busy:.0f} s")
        return out

    def snapshot(self, now: float | None = None) -> dict[str, dict]:
        """Per thread: seconds since progress, busy seconds (or null), restarts, alive."""
        now = time.monotonic() if now is None else now
        with self._lock:
            states = list(self._threads.values())
        return {s.name: {"since_progress_s": round(now - s.last_progress, 1),
                         "busy_s": None if s.busy_since is None else round(now - s.busy_since, 1),
                         "restarts": s.restarts,
                         "alive": s.thread.is_alive() if s.thread is not None else True}
                for s in states}


OPENVINO_THREADS = "openvino"  # the OS name of the threads OpenVINO starts while the worker compiles a model
_PR_SET_NAME, _PR_GET_NAME = 15, 16  # prctl options: the calling thread's OS name (Linux; at most 15 bytes)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _prctl(option: int, arg: ctypes.Array | ctypes.c_char_p) -> bool:
    """prctl(2) on the calling thread; False where libc has none (off Linux): the names stay Python's own."""
    prctl = getattr(_libc(), "prctl", None)
    return prctl is not None and prctl(option, arg, 0, 0, 0) == 0


def name_os_thread(name: str) -> None:
    """Name the calling thread for the OS too (Python 3.11 names it for Python only); a no-op off Linux."""
    _prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]))


@contextmanager
def os_thread_named(name: str) -> Iterator[None]:
    """The calling thread carries ``name`` for the OS inside the block.  Threads started meanwhile inherit it:
    OpenVINO's, started while a model compiles, are then named for what they run, whichever thread compiled."""
    old = ctypes.create_string_buffer(16)
    renamed = _prctl(_PR_GET_NAME, old)
    if renamed:
        name_os_thread(name)
    try:
        yield
    finally:
        if renamed:
            name_os_thread(old.value.decode(errors="replace"))


def off_the_main_thread(make: Callable[[], T], name: str) -> T:
    """``make()`` run on a thread of its own, its result or exception handed back.  For what compiles OpenVINO
    models: the CPU plugin gives the compiling thread an alternate signal stack and, when the model is destroyed,
    unmaps it and restores the old one on the destroying thread.  A model compiled on the main thread and dropped
    by another (a reload) left the main thread a stack that was gone, and the next signal there (SIGTERM) ended
    the process with SIGSEGV; process signals go to the main thread."""
    box: list = []

    def run() -> None:
        try:
            box.append((make(), None))
        except BaseException as exc:  # handed to the caller, as if raised there
            box.append((None, exc))

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join()
    result, exc = box[0]
    if exc is not None:
        raise exc
    return result


def is_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of the work, not the process being stopped: any Exception, or a Rust panic in a
    compiled library (qdrant-edge loading files that a power cut left half written, say), which pyo3 raises as
    ``PanicException``, a BaseException so that ``except Exception`` lets it through and ends the calling thread."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def supervised_loop(liveness: Liveness, name: str, step: Callable[[], object],
                    on_error: Callable[[BaseException], None] | None = None) -> None:
    """Call ``step`` (one item of work, or one bounded idle wait) until it raises :class:`StopLoop`.

    An exception out of ``step`` is logged with its traceback, counted as a restart, passed to
    ``on_error`` (which answers whoever was waiting), and the loop goes on.
    """
    liveness.register(name, threading.current_thread())
    name_os_thread(name)
    while True:
        try:
            with liveness.busy(name):
                step()
        except StopLoop:
            liveness.finished(name)
            return
        except BaseException as exc:
            if not is_failure(exc):
                raise
            liveness.failed(name)
            log.exception("%s: unexpected error; the loop goes on", name)
            if on_error is not None:
                try:
                    on_error(exc)
                except Exception:
                    log.exception("%s: the error handler failed too", name)


class Throttle:
    """Says yes at most once per ``period_s``: for logs a failing disk would repeat every frame, and for timers that
    are costly to re-arm."""

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._at = float("-inf")

    def ready(self, force: bool = False) -> bool:
        """True (and the period starts again) when ``period_s`` has passed since the last True, or ``force``."""
        now = time.monotonic()
        if force or now - self._at >= self.period_s:
            self._at = now
            return True
        return False

    def reset(self) -> None:
        """The next :meth:`ready` says yes."""
        self._at = float("-inf")


class StopSignals:
    """SIGTERM, SIGINT and SIGHUP, noted for the main loop to read (:attr:`received`).

    The handler only stores the signal: Python runs it in the main thread between two bytecodes, and one that set a
    ``threading.Event`` there took the Event's lock, which the main thread may hold at that moment (inside its own
    ``Event.wait``): it then waited for itself forever, and the stop never came (seen once in a test run)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: int | None = None

    def install(self) -> StopSignals:
        for sig in self.SIGNALS:
            signal.signal(sig, self._note)
        return self

    def _note(self, signum: int, _frame: object) -> None:
        self.received = signum


class Repeats:
    """Per key (a camera and an error code, say): yes to the first event, then at most once per ``period_s``, with
    how many were passed over since; so a camera that sends nothing valid at 10 frames/s logs one line a minute, not
    36,000 an hour that journald's rate limit answers by dropping the worker's own errors.  Policy past ``max_keys``
    keys: the least recently seen is forgotten (its next event is said again)."""

    def __init__(self, period_s: float, max_keys: int) -> None:
        self.period_s = period_s
        self.max_keys = max_keys
        self._keys: OrderedDict[Hashable, tuple[Throttle, list[int]]] = OrderedDict()
        self._lock = threading.Lock()

    def ready(self, key: Hashable) -> int | None:
        """None: pass this one over; else how many of ``key`` were passed over since the last yes (0: the first)."""
        with self._lock:
            entry = self._keys.pop(key, None) or (Throttle(self.period_s), [0])
            self._keys[key] = entry
            if len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
            throttle, passed = entry
            if not throttle.ready():
                passed[0] += 1
                return None
            said, passed[0] = passed[0], 0
            return said


SWITCH_FACTOR = 2  # the dead man's switch's timeout, in watchdog_s: clearly after the watchdog's own check
PAUSE_S = 5.0  # a main-loop wait this much longer than asked means the process did not run (at most watchdog_s / 4)


def switch_timeout(watchdog_s: float) -> float:
    """The dead man's switch's timeout for ``worker.watchdog_s`` (0: off)."""
    return SWITCH_FACTOR * watchdog_s


def pause_after(watchdog_s: float) -> float:
    """How much longer than asked a main-loop wait must take to count as a freeze of the process: well under the
    watchdog's limit, so a freeze is excused before a thread could be called stuck for it."""
    return min(PAUSE_S, watchdog_s / 4) if watchdog_s else PAUSE_S


class DeadMansSwitch:
    """Ends the process when the main loop stops re-arming it (e.g. a thread holds the GIL forever).

    Re-arming replaces faulthandler's timer thread and waits, holding the GIL, until the old one has exited: on
    cores busy with inference that wait can last milliseconds, during which no other Python thread runs.  So
    :meth:`arm` re-arms at most every tenth of the timeout; the process ends between 0.9 and 1.0 of the timeout
    after the loop stopped.  The timer counts time the process was stopped: after a freeze longer than that it
    fires as the process resumes, before the loop can re-arm it (no faulthandler option avoids that)."""

    REARM_FRACTION = 0.1

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._rearm = Throttle(timeout_s * self.REARM_FRACTION)

    def arm(self, force: bool = False) -> None:
        """Re-arm when a tenth of the timeout has passed since the last time, or ``force`` (after a freeze)."""
        if self.timeout_s and self._rearm.ready(force):
            faulthandler.dump_traceback_later(self.timeout_s, repeat=False, file=sys.stderr, exit=True)

    def disarm(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        self._rearm.reset()
