"""Helpers shared by the benchmark scripts (one copy of each)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_ms(fn: Callable[..., Any], *args: Any, reps: int = 10) -> float:
    """Median milliseconds of ``fn(*args)`` to completion, after one untimed call (compile)."""
    import jax  # here, so that the PyTorch-side scripts import this module without jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def pipelined_ms(fn: Callable[..., Any], *args: Any, warmup: int = 3, reps: int = 7,
                 min_calls: int = 1, max_calls: int = 50) -> float:  # fmt: skip
    """Median milliseconds per call with dispatch hidden: each rep runs ``n`` calls back to back
    (about 50 ms in all, within ``[min_calls, max_calls]``) and blocks on the last. Close to
    device time; what every kernel rate in BENCHMARKS.md is computed from."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    single = time.perf_counter() - t0
    n = int(min(max_calls, max(min_calls, round(0.05 / max(single, 1e-6)))))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / n)
    return 1e3 * statistics.median(samples)


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return my - b * mx, b


def nf4_matmul_inputs(m: int, width: int, k: int, n: int) -> tuple[Any, Any, Any]:
    """Seeded bf16 activations ``[m, width]`` (x: width K; dy: width N) and W ``[n, k]``, dense
    bf16 and double-quantized NF4: what the NF4 matmul scripts time and check."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.nf4 import quantize_nf4

    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (m, width), jnp.bfloat16)
    w16 = (0.02 * jax.random.normal(kw, (n, k), jnp.float32)).astype(jnp.bfloat16)
    return x, w16, quantize_nf4(w16, double_quant=True)
