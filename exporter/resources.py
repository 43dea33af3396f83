"""The memory a fit may still take, so that a training set too large is refused in seconds, not killed in minutes.

PatchCore holds every patch feature of the training set in memory until the coreset has picked the bank; on a
set too large for the machine the kernel's out-of-memory killer ends the run (a bare "Killed", no message)
after the minutes of feature extraction that filled the memory. The need is known after the first batch.
"""

from __future__ import annotations

from pathlib import Path

import psutil

# (limit, usage, stat file, key of reclaimable page cache in it) for cgroup v2 and v1
V2 = ("memory.max", "memory.current", "memory.stat", "inactive_file")
V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat", "total_inactive_file")


def _memory_cgroups(root: Path) -> list[tuple[Path, tuple[str, str, str, str]]]:
    """This process's memory cgroup folders from its own up to the hierarchy's root (a parent's limit binds too),
    then the roots themselves, which is where a container sees its own."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    out: list[tuple[Path, tuple[str, str, str, str]]] = []
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:
            base, files = root, V2
        elif "memory" in controllers.split(","):
            base, files = root / "memory", V1
        else:
            continue
        folder = base / path.lstrip("/")
        out += [(f, files) for f in (folder, *folder.parents) if f == base or base in f.parents]
    return list(dict.fromkeys([*out, (root, V2), (root / "memory", V1)]))  # each folder read once


def _cgroup_headroom(root: Path) -> int | None:
    """Bytes left under the tightest cgroup memory limit over this process (page cache the kernel can drop counts
    as free); None without a limit."""
    headroom: int | None = None
    for folder, (limit_file, usage_file, stat_file, cache_key) in _memory_cgroups(root):
        try:
            limit = int((folder / limit_file).read_text())  # "max" (no limit) is not an int
            usage = int((folder / usage_file).read_text())
            stats = dict(line.split()[:2] for line in (folder / stat_file).read_text().splitlines())
        except (OSError, ValueError):
            continue
        if limit >= psutil.virtual_memory().total:  # v1 writes "no limit" as a huge number
            continue
        left = max(limit - (usage - int(stats.get(cache_key, 0))), 0)
        headroom = left if headroom is None else min(headroom, left)
    return headroom


def available_bytes(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Memory this process can still take: the machine's available memory, or less under a container's limit."""
    available = psutil.virtual_memory().available
    headroom = _cgroup_headroom(cgroup_root)
    return available if headroom is None else min(available, headroom)


class OutOfMemory(RuntimeError):
    """A step would need more memory than the machine has left; the message says how much and what to change."""


def check_fits(unit: int, count: int, what: str, advice: str, available: int | None = None) -> None:
    """Refuse ``what``, ``count`` items of ``unit`` bytes each, when it needs more than the memory available now
    (``available``: measured when omitted); the message says how many would fit."""
    free = available_bytes() if available is None else available
    need = unit * count
    if need > free:
        raise OutOfMemory(f"{what} need about {need / 1e9:.1f} GB of memory and {free / 1e9:.1f} GB is available, "
                          f"enough for about {free // unit} of the {count}: {advice}")
