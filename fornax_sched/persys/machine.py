"""This machine's utilization, in percent (0-100), as a Persys agent's HealthCheck reports it.

Memory from /proc/meminfo (MemTotal less MemAvailable), disk from statvfs
of a path (used over used plus available, as df counts), CPU from
/proc/stat: the busy share of the jiffies between two readings (the first
reading is taken when the sampler is made).  Parsing is apart from reading,
so each can be checked on its own.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable


def memory_utilization_of(meminfo: str) -> float:
    values: dict[str, int] = {}
    for line in meminfo.splitlines():
        key, _, rest = line.partition(":")
        words = rest.split()
        if words and words[0].isdigit():
            values[key.strip()] = int(words[0])
    total = values.get("MemTotal", 0)
    avail = values.get("MemAvailable", values.get("MemFree", 0))
    return _pct(total - avail, total)


def memory_utilization(path: str = "/proc/meminfo") -> float:
    try:
        with open(path) as f:
            return memory_utilization_of(f.read())
    except OSError:
        return 0.0


def disk_utilization(path: str) -> float:
    try:
        st = os.statvfs(path)
    except OSError:
        return 0.0
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    return _pct(used, used + st.f_bavail * st.f_frsize)


def cpu_times_of(stat: str) -> tuple[int, int]:
    """(busy, total) jiffies from the aggregate ``cpu`` line of /proc/stat (idle and iowait are not busy)."""
    for line in stat.splitlines():
        words = line.split()
        if words and words[0] == "cpu":
            nums = [int(w) for w in words[1:]]
            total = sum(nums[:8])  # user nice system idle iowait irq softirq steal (guest is within user)
            idle = nums[3] + (nums[4] if len(nums) > 4 else 0)
            return total - idle, total
    return 0, 0


def _read_stat() -> str:
    try:
        with open("/proc/stat") as f:
            return f.read()
    except OSError:
        return ""


class CpuSampler:
    """CPU utilization since the previous reading; readings closer than ``min_gap`` seconds reuse the last figure."""

    def __init__(self, read: Callable[[], str] = _read_stat, clock: Callable[[], float] = time.monotonic,
                 min_gap: float = 0.25) -> None:
        self._read, self._clock, self._min_gap = read, clock, min_gap
        self._last = cpu_times_of(read())
        self._at = clock()
        self._value = 0.0

    def utilization(self) -> float:
        now = self._clock()
        if now - self._at < self._min_gap:
            return self._value
        busy, total = cpu_times_of(self._read())
        d_busy, d_total = busy - self._last[0], total - self._last[1]
        if d_total > 0:
            self._value = _pct(d_busy, d_total)
            self._last, self._at = (busy, total), now
        return self._value


def _pct(part: float, whole: float) -> float:
    return round(min(max(100.0 * part / whole, 0.0), 100.0), 2) if whole > 0 else 0.0
