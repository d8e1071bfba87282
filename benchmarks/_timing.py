"""Interleaved repeated timing: ratios measured in one run, robust to a noisy machine."""
from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# The slow references live with the tests; benchmarks measure against the same code.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def interleaved_medians(candidates: dict[str, Callable[[], object]], repeats: int, sync=lambda: None) -> dict[str, float]:
    """Median seconds of each candidate, run round-robin `repeats` times after one warm-up each."""
    for run in candidates.values():
        run()
    sync()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
