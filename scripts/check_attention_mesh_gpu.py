"""The Pallas attention kernels with the batch split over a multi-GPU mesh: run per device (each
on its own rows, inside ``jax.shard_map``, as the model does) against left to XLA's partitioner.

    python scripts/check_attention_mesh_gpu.py                  # every GPU, packed 1x8192 per GPU
    python scripts/check_attention_mesh_gpu.py --impls mosaic --seq 32768

Why: a Pallas kernel is a custom call that XLA's partitioner cannot see into. Given inputs split
by batch rows, it may gather them and run the whole batch on every device; the model therefore
wraps its kernel attention in ``jax.shard_map`` over the activations' batch split
(``lorax.model._per_batch_shard``). For each implementation and both ways this prints the
collectives in the compiled forward+backward (all-gathers and the bytes they move), the time
per call, and the relative L2 error of out, dq, dk, dv against the same kernel run on one
device over the whole batch. Exits with status 1 if a per-device run fails, has a collective
or an error above 1e-2. (Measured on 2 H200s: left to the partitioner the Triton kernels gather
both rows to both GPUs and take twice the time, and the Mosaic kernels fail to lower.)

Inputs: the Llama-3.1-8B attention shape (32 query / 8 KV heads, head_dim 128, bf16, causal),
``--rows`` rows per device packed with examples of mean length ``--packed`` (segment ids: the
rows the trainer makes, which cuDNN cannot mask; 0 for unpacked rows).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "scripts")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import packed_rows, pipelined_ms  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from lorax import sharding  # noqa: E402
from lorax.model import _per_batch_shard  # noqa: E402
from pallas_kernels.flash_attention import flash_attention  # noqa: E402

HEADS = (32, 8, 128)  # Hq, Hkv, D
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u8": 1, "pred": 1}


def collectives(hlo: str) -> dict[str, tuple[int, int]]:
    """``{kind: (count, bytes)}`` of the collectives in compiled HLO text."""
    found: dict[str, tuple[int, int]] = {}
    kinds = "all-gather|all-reduce|all-to-all|collective-permute"
    pattern = rf"=\s*\(?(\w+)\[([\d,]*)\][^\n]*?\s({kinds})(?:-start)?\("
    for dtype, dims, kind in re.findall(pattern, hlo):
        size = int(np.prod([int(d) for d in dims.split(",") if d])) * _BYTES.get(dtype, 4)
        count, total = found.get(kind, (0, 0))
        found[kind] = (count + 1, total + size)
    return found


def rel_l2(a: jax.Array, b: jax.Array) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", default=None, help="e.g. data=1,fsdp=2 (default: make_mesh())")
    p.add_argument("--impls", default="mosaic,pallas", help="comma list of mosaic, pallas")
    p.add_argument("--rows", type=int, default=1, help="rows per device")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--packed", type=int, default=1024, help="mean example length (0: unpacked)")
    a = p.parse_args()
    mesh = sharding.make_mesh(a.mesh)
    rows = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))
    batch = a.rows * sharding.batch_divisor(mesh)
    hq, hkv, d = HEADS
    print(
        f"jax {jax.__version__}, {jax.devices()[0].device_kind}, mesh {sharding.describe(mesh)}, "
        f"B={batch} S={a.seq} Hq={hq} Hkv={hkv} D={d} causal bf16"
        + (f", packed rows (mean example {a.packed})" if a.packed else "")
    )
    keys = jax.random.split(jax.random.key(0), 4)
    shapes = ((batch, a.seq, hq, d), (batch, a.seq, hkv, d), (batch, a.seq, hkv, d))
    q, k, v, do = (
        jax.random.normal(key, shape, jnp.bfloat16)
        for key, shape in zip(keys, (*shapes, shapes[0]), strict=True)
    )
    segment_ids = jnp.asarray(packed_rows(batch, a.seq, a.packed)[0]) if a.packed else None
    whole = (q, k, v, segment_ids, do)
    split = tuple(None if x is None else jax.device_put(x, rows) for x in whole)

    failed = []
    print(f"\n{'impl':<7} {'how':<12} {'collectives':<40} {'ms':>9}  error vs one device")
    for impl in a.impls.split(","):

        def attend(q, k, v, segment_ids, impl=impl):
            return flash_attention(q, k, v, causal=True, segment_ids=segment_ids, impl=impl)

        def fwd_bwd(fn):
            def run(q, k, v, segment_ids, do):
                out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, segment_ids), q, k, v)
                return (out, *vjp(do))

            return jax.jit(run)

        want = fwd_bwd(attend)(*whole)  # one device (the arrays' own), the whole batch
        for how, fn in (("per device", _per_batch_shard(attend, rows)), ("partitioner", attend)):
            try:
                compiled = fwd_bwd(fn).lower(*split).compile()
                found = collectives(compiled.as_text())
                ms = pipelined_ms(compiled, *split)
                got = compiled(*split)
            except Exception as err:  # report and go on to the next way
                print(f"{impl:<7} {how:<12} FAILED: {type(err).__name__}: {str(err)[:200]}")
                if how == "per device":  # the partitioner's way is what this compares against
                    failed.append(f"{impl} {how}")
                continue
            text = ", ".join(f"{n} {kind} {b / 2**20:.0f} MiB" for kind, (n, b) in found.items())
            errors = [rel_l2(g, w) for g, w in zip(got, want, strict=True)]
            names = ("out", "dq", "dk", "dv")
            print(
                f"{impl:<7} {how:<12} {text or 'none':<40} {ms:9.3f}  "
                + " ".join(f"{n}={e:.1e}" for n, e in zip(names, errors, strict=True)),
                flush=True,
            )
            if how == "per device" and (found or max(errors) > 1e-2):
                failed.append(f"{impl} {how}")
    print("\nFAILED: " + ", ".join(failed) if failed else "\nall per-device runs: no collective")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
