"""Can a jitted GPU step read its frozen embedding table from pinned host memory?

The Llama-3 8B embedding table is 1 GiB of bf16 that a LoRA step only gathers a few thousand
rows from. Kept in ``pinned_host`` memory, the gather reads only those rows over the host link
(tens of MB), and the table leaves device memory. This script checks, on a GPU: the gather
inside ``jit`` works from a pinned-host table (with and without ``compute_on``), its result
equals the on-device gather and lives in device memory, the device-memory peak does not hold
the table, and how long the gather takes.

    python scripts/check_host_embedding.py [--vocab 128256 --hidden 4096 --tokens 8192]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def _peak_gib(device: jax.Device) -> float:
    stats = device.memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**30


def _time_ms(fn, *args, reps: int = 20) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _gather_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """``table[ids]`` as one gather op with no bounds arithmetic (whose constants would live
    in device memory, and an op's operands must share a memory space)."""
    dnums = jax.lax.GatherDimensionNumbers(
        offset_dims=(ids.ndim,), collapsed_slice_dims=(0,), start_index_map=(0,)
    )
    return jax.lax.gather(
        table, ids[..., None], dnums, (1, table.shape[1]),
        mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    device = jax.devices()[0]
    rng = np.random.default_rng(0)
    table_np = rng.standard_normal((args.vocab, args.hidden), np.float32).astype(jnp.bfloat16)
    ids = jnp.asarray(rng.integers(0, args.vocab, (1, args.tokens)), jnp.int32)
    host = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    table_host = jax.device_put(table_np, host)
    print(
        f"table {table_host.shape} {table_host.dtype} on {table_host.sharding.memory_kind}; "
        f"device peak after placing it {_peak_gib(device):.3f} GiB"
    )

    def gather(table, ids):
        return jnp.take(table, ids, axis=0) * 2

    def gather_host_table(table, ids):
        # Operands of one op share a memory space: the ids go to the table's side, the rows
        # come back to the device.
        rows = _gather_rows(table, jax.device_put(ids, jax.memory.Space.Host))
        return jax.device_put(rows, jax.memory.Space.Device) * 2

    results = {}
    variants = {"plain jit": jax.jit(gather_host_table)}
    try:
        from jax.experimental.compute_on import compute_on

        def gather_on_host(table, ids):
            with compute_on("device_host"):
                rows = _gather_rows(table, jax.device_put(ids, jax.memory.Space.Host))
            return jax.device_put(rows, jax.memory.Space.Device) * 2

        variants["compute_on host"] = jax.jit(gather_on_host)
    except Exception as e:  # noqa: BLE001 - report, do not hide
        print(f"compute_on unavailable: {type(e).__name__}: {e}")
    for label, fn in variants.items():
        try:
            out = fn(table_host, ids)
            ms = _time_ms(fn, table_host, ids)
            results[label] = np.asarray(out.astype(jnp.float32))
            print(
                f"{label}: ok, out on {out.sharding.memory_kind}, {ms:.2f} ms, "
                f"device peak {_peak_gib(device):.3f} GiB"
            )
        except Exception as e:  # noqa: BLE001
            print(f"{label}: FAILED {type(e).__name__}: {str(e)[:400]}")
    table_dev = jax.device_put(table_np, device)
    want = np.asarray(jax.jit(gather)(table_dev, ids).astype(jnp.float32))
    ms_dev = _time_ms(jax.jit(gather), table_dev, ids)
    print(f"on-device table: {ms_dev:.2f} ms, device peak {_peak_gib(device):.3f} GiB")
    for label, got in results.items():
        print(f"{label}: equal to the on-device gather: {np.array_equal(got, want)}")


if __name__ == "__main__":
    main()
