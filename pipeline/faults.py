"""Crash injection for the exactly-once tests: die at a named point as a killed job would.

`DITHAROS_FAULT=<point>` makes the process that reaches `fault_point(<point>)` kill the job:
the driver whose PID is in `DITHAROS_FAULT_PID` (exported by `pipeline/run.py`, inherited by
the local Ray workers it starts) and then itself, with SIGKILL-like abruptness — nothing is
flushed or cleaned up. Unset in production; the check is one environment lookup.
"""

from __future__ import annotations

import os
import signal

POINTS = ("after_cut", "mid_write", "after_shard_move", "during_index")


def fault_point(name: str) -> None:
    if os.environ.get("DITHAROS_FAULT") != name:
        return
    pid = os.environ.get("DITHAROS_FAULT_PID")
    if pid and int(pid) != os.getpid():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(17)
