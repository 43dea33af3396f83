"""Run the worker (``python tests/shifted_clock.py --config ...``) on a box whose wall clock is off by the seconds
written in the file $SHIFTED_CLOCK_FILE, read again as it changes: rewriting the file stands in for NTP stepping
the clock.  Only the wall clock moves: ``time.time``/``time_ns`` and the times of the files written through
pathlib, as a kernel on that clock stamps them; ``time.monotonic`` does not, as on a real box."""

from __future__ import annotations

import contextlib
import os
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_FILE = Path(os.environ["SHIFTED_CLOCK_FILE"])
_real_time, _real_ns = time.time, time.time_ns
_read = [0.0, -1.0]  # the offset, and when (monotonic) it was read


def offset() -> float:
    """The clock's offset from the real time, read from the file at most every 50 ms."""
    now = time.monotonic()
    if now - _read[1] > 0.05:
        with contextlib.suppress(OSError, ValueError):  # being rewritten: the last offset read holds
            _read[0] = float(_FILE.read_text().strip() or 0)
        _read[1] = now
    return _read[0]


def _stamped(method):
    """A pathlib write whose file then carries the shifted clock's time."""
    def write(self: Path, *args, **kwargs):
        out = method(self, *args, **kwargs)
        target = out if isinstance(out, Path) else self
        at = time.time()
        os.utime(target, (at, at))
        return out
    return write


time.time = lambda: _real_time() + offset()
time.time_ns = lambda: _real_ns() + int(offset() * 1e9)
Path.write_bytes = _stamped(Path.write_bytes)  # type: ignore[method-assign]
Path.replace = _stamped(Path.replace)  # type: ignore[method-assign]
sys.path.insert(0, str(ROOT))
sys.argv = ["worker", *sys.argv[1:]]
runpy.run_module("worker", run_name="__main__", alter_sys=True)
