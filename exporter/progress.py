"""Console progress for long training loops: step, loss, speed and ETA at a steady interval.

Distillation and student training run for minutes to hours on a few cores; a line every
half minute tells the user the run is alive and when it will end, without flooding the log.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)
EVERY_S = 10.0  # seconds between the progress lines of a fit's passes over the images


class Every:
    """Whether a loop's next progress line is due: at most one per ``interval`` seconds, whatever a step costs (a
    line per so many images was minutes apart with many views or tiles per image, and a heavy backbone), and the
    last step's always."""

    def __init__(self, interval: float | None = None) -> None:
        self.interval = EVERY_S if interval is None else interval
        self.started = self.last = time.monotonic()

    def due(self, last: bool = False) -> bool:
        now = time.monotonic()
        if not last and now - self.last < self.interval:
            return False
        self.last = now
        return True

    def eta(self, fraction: float) -> str:
        """``ETA`` and the time left when ``fraction`` of the work is done, at the pace so far; once all is done, the
        time it took."""
        spent = time.monotonic() - self.started
        if fraction >= 1:
            return f"took {_duration(spent)}"
        return f"ETA {_duration(spent / fraction - spent if fraction > 0 else float('inf'))}"


class Progress:
    """Logs ``label step k/n loss L, S steps/s, ETA`` at most every ``interval`` seconds, and at the last step."""

    def __init__(self, label: str, total: int, start: int = 0, interval: float = 30.0) -> None:
        self.label, self.total, self.interval = label, total, interval
        self.first, self.started = start, time.monotonic()
        self.last_log = self.started
        self.losses: list[float] = []

    def update(self, step: int, loss: float) -> None:
        """Record the loss of ``step`` (1-based, steps done so far) and log if the interval has passed."""
        self.losses.append(loss)
        now = time.monotonic()
        if now - self.last_log < self.interval and step < self.total:
            return
        rate = (step - self.first) / max(now - self.started, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        log.info("%s step %d/%d loss %.4f, %.2f steps/s, ETA %s", self.label, step, self.total,
                 sum(self.losses) / len(self.losses), rate, _duration(eta))
        self.losses.clear()
        self.last_log = now


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    s = round(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
