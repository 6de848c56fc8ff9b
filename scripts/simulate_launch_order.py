"""How well the Mosaic attention kernels' launch order fills the GPU (CPU only, no device).

Each kernel's CTAs do causal work of very different sizes, and the GPU starts them in the
grid's row-major order (Mosaic GPU makes the last grid axis ``blockIdx.x``, which CUDA
dispatches fastest; ``pallas_kernels.flash_attention_mgpu._grid``), each on the first SM that
is free (one CTA per SM: shared memory allows no more). This simulates that greedy dispatch
with each CTA's work in tile steps and prints the schedule's efficiency (the work over SMs x
makespan) for the two launch orders:

``heads first``  the grids ``(heads, tiles, batch)``: one head's CTAs heaviest first, then the
                 next head's (``MgpuAttentionConfig(launch_order="heads")``);
``tiles first``  ``(tiles, heads, batch)``: every head's heaviest CTAs first
                 (``launch_order="tiles"``). The default, ``"auto"``, picks per shape.

Work per CTA (causal, no window or segments; 128 rows per CTA, 64-row warpgroup tiles):
dK/dV, 128 keys streaming every later 64-row query tile of each of the G query heads of its
KV head; dQ and the forward, 128 queries streaming the 128-wide K/V tiles up to the diagonal.
Fixed per-CTA costs and L2 effects are left out: this is the launch order alone.

    python scripts/simulate_launch_order.py [--shapes 2x2048,1x8192,1x32768] [--sms 132]
"""

from __future__ import annotations

import argparse
import heapq
from collections.abc import Iterable

CTA_ROWS = 128  # rows (keys or queries) per CTA: two 64-row warpgroup tiles
Q_TILE = 64  # the dK/dV kernel's query tile


def makespan(work: Iterable[float], sms: int) -> float:
    """Greedy in-order dispatch: each CTA starts on the SM that frees up first."""
    free_at = [0.0] * sms
    for w in work:
        heapq.heappush(free_at, heapq.heappop(free_at) + w)
    return max(free_at)


def efficiency(work: list[float], sms: int) -> float:
    return sum(work) / sms / makespan(work, sms)


def launch_orders(tile_work: list[float], heads: int, batch: int) -> dict[str, list[float]]:
    """Each CTA's work in launch order; ``tile_work[t]`` is tile index ``t``'s (the kernels
    number their tiles heaviest first)."""
    return {
        "heads first": [w for _ in range(heads) for w in tile_work for _ in range(batch)],
        "tiles first": [w for w in tile_work for _ in range(heads) for _ in range(batch)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="2x2048,1x8192,1x32768", help="comma list of BxS")
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--sms", type=int, default=132, help="SMs (H200: 132)")
    args = parser.parse_args()
    groups = args.q_heads // args.kv_heads
    print(f"{'shape':<9} {'kernel':<13} {'heads first':>12} {'tiles first':>12}")
    for shape in args.shapes.split(","):
        batch, seq = (int(x) for x in shape.split("x"))
        tiles = seq // CTA_ROWS
        # dK/dV: tile t's keys are seen by the query tiles from its own on, for G heads.
        dkdv = [groups * (seq - CTA_ROWS * t) / Q_TILE for t in range(tiles)]
        # dQ / forward: tile t (numbered longest first) streams K/V tiles up to its diagonal.
        dq = [float(tiles - t) for t in range(tiles)]
        kernels = (("dK/dV", dkdv, args.kv_heads), ("dQ, forward", dq, args.q_heads))
        for name, work, heads in kernels:
            orders = launch_orders(work, heads, batch)
            rates = [
                efficiency(orders[order], args.sms) for order in ("heads first", "tiles first")
            ]
            print(f"{shape:<9} {name:<13} {rates[0]:>12.3f} {rates[1]:>12.3f}")


if __name__ == "__main__":
    main()
