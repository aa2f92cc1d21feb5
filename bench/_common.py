"""Helpers shared by the bench scripts: side-by-side timing and JSON results."""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def timeit(fn: Callable[[], object], reps: int = 5, warmup: int = 1) -> float:
    """Median seconds of `reps` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def emit(name: str, result: dict) -> dict:
    """Print one JSON object and write it to bench/results/NAME.json (atomically)."""
    result = {"bench": name, "machine": platform.machine(), "python": platform.python_version(), **result}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mnet.io import write_json

    write_json(RESULTS / f"{name}.json", result)
    print(json.dumps(result, indent=2))
    return result
