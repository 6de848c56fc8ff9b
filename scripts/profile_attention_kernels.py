"""One forward+backward of each attention implementation, for Nsight Compute to profile.

Timings say how long a kernel takes, not what bounds it. This script runs each implementation's
forward and backward exactly once (after compiling), so that ``ncu`` with a kernel-name filter
profiles one launch of each kernel: tensor-pipe and shared-memory utilization, warp stall
reasons, against cuDNN's own backward on the same inputs. Causal, 32 query / 8 KV heads,
d = 128, bf16.

    ncu --clock-control none --set full -k 'regex:lorax_mgpu|sdpa|bprop|fmha' \\
        -o attention python3 scripts/profile_attention_kernels.py --shape 1x8192 \\
        --impls fused,kernel,cudnn

``--impls``: ``cudnn`` and any of :data:`pallas_kernels.flash_attention_mgpu.BWD_DQ` (the
Mosaic kernels with that ``bwd_dq``). Without ncu it just runs them (a smoke test).
"""

from __future__ import annotations

import argparse

import jax
from _common import attention_inputs

from pallas_kernels.flash_attention_mgpu import BWD_DQ, MgpuAttentionConfig, flash_attention_mgpu


def _attend(impl: str, scale: float):
    if impl == "cudnn":
        return lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, scale=scale, implementation="cudnn"
        )
    if impl not in BWD_DQ:
        raise SystemExit(f"--impls: {impl!r} is neither 'cudnn' nor one of {BWD_DQ}")
    config = MgpuAttentionConfig(bwd_dq=impl)
    return lambda q, k, v: flash_attention_mgpu(q, k, v, scale, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="1x8192", help="BxS")
    parser.add_argument("--impls", default="fused,kernel,cudnn", help="comma list")
    args = parser.parse_args()
    b, s = (int(x) for x in args.shape.split("x"))
    hq, hkv, d = 32, 8, 128
    q, k, v, do = attention_inputs(b, s, (hq, hkv, d))
    for impl in args.impls.split(","):
        attend = _attend(impl, d**-0.5)

        def fwd_bwd(q, k, v, do, attend=attend):
            out, vjp = jax.vjp(attend, q, k, v)
            return out, *vjp(do)

        compiled = jax.jit(fwd_bwd).lower(q, k, v, do).compile()  # no kernel runs here
        jax.block_until_ready(compiled(q, k, v, do))
        print(f"{impl}: ran once at {args.shape}", flush=True)


if __name__ == "__main__":
    main()
