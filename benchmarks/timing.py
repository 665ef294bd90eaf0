"""Wall-clock timing shared by the benchmark scripts (run as ``python benchmarks/<script>.py``,
which puts this folder on ``sys.path``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def seconds(work: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of ``work``."""
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def median_seconds(work: Callable[[], object], repeats: int, warmup: bool = False) -> float:
    """Median wall-clock seconds of ``repeats`` calls, after one untimed call if ``warmup``."""
    if warmup:
        work()
    return statistics.median(seconds(work) for _ in range(repeats))
