"""Facts about the running process that benchmarks and tenants report."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def peak_rss_bytes() -> int:
    """This process's peak resident set size. VmHWM, unlike ru_maxrss, is not inherited from the
    parent across fork + exec, so a child's figure is its own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    """Wall seconds of `repeats` calls of fn: their median and every run."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times
