"""Run the worker (``python tests/slow_disk.py --config ...``) on a disk whose copies into $SLOW_DISK_UNDER wait:
each such copy first writes $SLOW_DISK_GATE/inside, then waits until $SLOW_DISK_GATE/open exists, as a copy of
gigabytes to a slow disk would hold its thread.  The copy itself is the real one."""

from __future__ import annotations

import os
import runpy
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_GATE = Path(os.environ["SLOW_DISK_GATE"])
_UNDER = Path(os.environ["SLOW_DISK_UNDER"])
_real_copy = shutil.copyfile


def _gated(source, target, **kwargs):
    if Path(target).is_relative_to(_UNDER):
        (_GATE / "inside").touch()
        while not (_GATE / "open").exists():
            time.sleep(0.02)
    return _real_copy(source, target, **kwargs)


shutil.copyfile = _gated
sys.path.insert(0, str(ROOT))
sys.argv = ["worker", *sys.argv[1:]]
runpy.run_module("worker", run_name="__main__", alter_sys=True)
