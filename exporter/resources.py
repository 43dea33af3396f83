"""The memory a fit may still take, so that a training set too large is refused in seconds, not killed in minutes.

PatchCore holds every patch feature of the training set in memory until the coreset has picked the bank; on a
set too large for the machine the kernel's out-of-memory killer ends the run (a bare "Killed", no message)
after the minutes of feature extraction that filled the memory. The need is known after the first batch.
"""

from __future__ import annotations

from pathlib import Path

import psutil

# (limit, usage, stat file, key of reclaimable page cache in it) for cgroup v2 and v1, as a container sees them
_CGROUPS = (
    ("memory.max", "memory.current", "memory.stat", "inactive_file"),
    ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_inactive_file"),
)


def _cgroup_headroom(root: Path) -> int | None:
    """Bytes left under this process's cgroup memory limit (page cache the kernel can drop counts as free)."""
    for limit_file, usage_file, stat_file, cache_key in _CGROUPS:
        try:
            limit = int((root / limit_file).read_text())  # "max" (no limit) is not an int
            usage = int((root / usage_file).read_text())
            stats = dict(line.split() for line in (root / stat_file).read_text().splitlines())
        except (OSError, ValueError):
            continue
        if limit >= psutil.virtual_memory().total:  # v1 writes "no limit" as a huge number
            return None
        return max(limit - (usage - int(stats.get(cache_key, 0))), 0)
    return None


def available_bytes(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Memory this process can still take: the machine's available memory, or less under a container's limit."""
    available = psutil.virtual_memory().available
    headroom = _cgroup_headroom(cgroup_root)
    return available if headroom is None else min(available, headroom)


class OutOfMemory(RuntimeError):
    """A step would need more memory than the machine has left; the message says how much and what to change."""


def check_fits(need: int, what: str, advice: str, available: int | None = None) -> None:
    """Refuse ``what`` when it needs more than the memory available now (``available``: measured when omitted)."""
    free = available_bytes() if available is None else available
    if need > free:
        raise OutOfMemory(f"{what} need about {need / 1e9:.1f} GB of memory and {free / 1e9:.1f} GB is available: "
                          f"{advice}")
