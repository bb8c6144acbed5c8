"""Seconds since this process started, for the "ready in X s" lines of servers and workers.

Read from /proc (the kernel's start time of the process, so interpreter start-up and imports
count); elsewhere, from the first import of this module.
"""

from __future__ import annotations

import os
import time

_IMPORTED = time.monotonic()


def process_age_s() -> float:
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # after "pid (comm)": field 3 onwards
        start_ticks = int(fields[19])  # field 22: start time in clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED
