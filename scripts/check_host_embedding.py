"""Can a jitted GPU step read its frozen embedding table from pinned host memory?

The Llama-3 8B embedding table is 1 GiB of bf16 that a LoRA step only gathers a few thousand
rows from. Kept in ``pinned_host`` memory (``lorax.embeddings_to_host``), ``lorax.model.embed``
gathers only those rows on the host and copies them over, and the table leaves device memory.
This script checks, on a GPU: the gather inside ``jit`` works from a pinned-host table, its
result equals the on-device gather and lives in device memory, the device-memory peak does
not hold the table, and how long the gather takes.

    python scripts/check_host_embedding.py [--vocab 128256 --hidden 4096 --tokens 8192]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from _common import median_ms

from lorax.model import embed


def _peak_gib(device: jax.Device) -> float:
    stats = device.memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**30


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
    gather = jax.jit(lambda table, ids: embed(table, ids) * 2)
    got = gather(table_host, ids)
    ms = median_ms(gather, table_host, ids)
    print(
        f"host table: out on {got.sharding.memory_kind}, {ms:.2f} ms, "
        f"device peak {_peak_gib(device):.3f} GiB"
    )
    table_dev = jax.device_put(table_np, device)
    want = gather(table_dev, ids)
    ms_dev = median_ms(gather, table_dev, ids)
    print(f"device table: {ms_dev:.2f} ms, device peak {_peak_gib(device):.3f} GiB")
    same = np.array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))
    print(f"equal to the on-device gather: {same}")


if __name__ == "__main__":
    main()
