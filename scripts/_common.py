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


def attention_inputs(batch: int, seq_len: int, heads: tuple[int, int, int],
                     seed: int = 0) -> tuple[Any, Any, Any, Any]:  # fmt: skip
    """Seeded bf16 ``q, k, v, d_out`` for attention of ``heads = (query heads, KV heads,
    head dim)``: what the attention scripts time and check (the same values in each)."""
    import jax
    import jax.numpy as jnp

    q_heads, kv_heads, dim = heads
    keys = jax.random.split(jax.random.key(seed), 4)
    shapes = [(batch, seq_len, h, dim) for h in (q_heads, kv_heads, kv_heads, q_heads)]
    return tuple(
        jax.random.normal(key, shape, jnp.bfloat16) for key, shape in zip(keys, shapes, strict=True)
    )


def packed_rows(batch: int, seq_len: int, mean_len: int, seed: int = 0) -> tuple[Any, Any]:
    """``(segment_ids, positions)``, int32 ``[batch, seq_len]``, of rows packed as
    ``lorax.data.packing`` packs them: examples ``1..k`` of lengths drawn uniformly from
    ``[mean_len/2, 3·mean_len/2]`` back to back, the last one cut at the row's end."""
    import numpy as np

    rng = np.random.default_rng(seed)
    segments = np.zeros((batch, seq_len), np.int32)
    positions = np.zeros((batch, seq_len), np.int32)
    for row in range(batch):
        start, segment = 0, 1
        while start < seq_len:
            length = min(int(rng.integers(mean_len // 2, 3 * mean_len // 2 + 1)), seq_len - start)
            segments[row, start : start + length] = segment
            positions[row, start : start + length] = np.arange(length)
            start, segment = start + length, segment + 1
    return segments, positions
