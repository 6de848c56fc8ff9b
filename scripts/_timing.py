"""Wall-clock timing shared by the GPU scripts: median of synchronous runs after a warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def median_ms(fn: Callable[..., Any], *args: Any, reps: int = 10) -> float:
    """Median milliseconds of ``fn(*args)`` to completion, after one untimed call (compile)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)
