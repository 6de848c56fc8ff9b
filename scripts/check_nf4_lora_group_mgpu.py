"""Correctness and speed of the model's LoRA projection groups on the Mosaic GPU NF4 kernel
(issue 4): ``nf4_lora_matmul_group`` with weights stacked once in the kernel's layout
(``lorax.prepare_kernel_weights`` does this for a model), the LoRA terms in the kernel's
reduction, against the default path (``variant="xla"``: XLA's decode of the stacked NF4
bytes, then one cuBLAS GEMM with the LoRA terms folded in).

For each Llama-8B group (q/k/v, o, gate/up, down; K×ΣN) and token count M, with LoRA r=16 on
every member: the relative L2 error of y, dx, dA and dB of both paths against the float32
reference (``impl="reference"`` on float32 x: W decoded by ``dequantize_nf4``), then pipelined
medians (``_common.pipelined_ms``) of the forward and of forward+backward (``jax.vjp``: y, then
dx, dA, dB), in TFLOP/s of the base GEMMs (2·M·ΣN·K each), beside the bf16 cuBLAS dot of a
dense W of the same shape (``dot``; fwd+bwd: ``x·Wᵀ`` and ``dy·W``). ``mosaic, no LoRA`` is
the kernel with the adapters left out: the cost of the LoRA terms is the difference.

    python scripts/check_nf4_lora_group_mgpu.py [--ms 4096,8192] [--groups qkv,o,gate_up,down]

CPU smoke test (the kernel in the Mosaic GPU interpreter, small shapes)::

    JAX_PLATFORMS=cpu python scripts/check_nf4_lora_group_mgpu.py --interpret --ms 128 \
        --groups tiny
"""

from __future__ import annotations

import argparse
import sys

GROUPS = {  # name: (K, members' N)
    "qkv": (4096, (4096, 1024, 1024)),
    "o": (4096, (4096,)),
    "gate_up": (4096, (14336, 14336)),
    "down": (14336, (4096,)),
    "tiny": (128, (128, 64)),  # the CPU smoke test
}
RANK, SCALE = 16, 1.0


def _case(m: int, k: int, ns: tuple[int, ...]):
    import jax
    import jax.numpy as jnp

    from pallas_kernels.nf4 import quantize_nf4

    keys = iter(jax.random.split(jax.random.key(0), 4 + 3 * len(ns)))
    x = jax.random.normal(next(keys), (m, k), jnp.bfloat16)
    ws, adapters, dys = [], [], []
    for n in ns:
        w16 = (0.02 * jax.random.normal(next(keys), (n, k), jnp.float32)).astype(jnp.bfloat16)
        ws.append(quantize_nf4(w16, double_quant=True))
        a = jax.random.uniform(next(keys), (RANK, k), jnp.float32, -1, 1) / k**0.5
        b = 0.02 * jax.random.normal(next(keys), (n, RANK), jnp.float32)
        adapters.append((a, b))
        dys.append(jax.random.normal(next(keys), (m, n), jnp.bfloat16))
    return x, ws, adapters, tuple(dys)


def _group(config, **kw):
    """``(weights, x, adapters) -> ys`` of ``nf4_lora_matmul_group``. The weights are an
    argument, never a closure: XLA would fold a constant W's decode at compile time."""
    from pallas_kernels.nf4_matmul import nf4_lora_matmul_group

    def group(weights, x, adapters):
        return nf4_lora_matmul_group(x, weights, adapters, SCALE, config=config, **kw)

    return group


def _fwd_bwd(group):
    import jax

    def run(weights, x, adapters, dys):
        ys, vjp = jax.vjp(lambda x, adapters: group(weights, x, adapters), x, adapters)
        return ys, vjp(dys)

    return jax.jit(run)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", default="4096,8192")
    p.add_argument("--groups", default="qkv,o,gate_up,down")
    p.add_argument("--interpret", action="store_true", help="Mosaic GPU interpreter (CPU)")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from _common import pipelined_ms

    from pallas_kernels import NF4MatmulConfig
    from pallas_kernels.nf4_matmul_mgpu import prepare_weight, stack_prepared

    print(f"jax {jax.__version__}, device {jax.devices()[0].device_kind}", flush=True)
    kernel = dict(interpret=True) if args.interpret else {}
    xla, mosaic = NF4MatmulConfig(variant="xla"), NF4MatmulConfig(variant="mosaic")

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    for m in (int(v) for v in args.ms.split(",")):
        for name in args.groups.split(","):
            k, ns = GROUPS[name]
            x, ws, adapters, dys = _case(m, k, ns)
            stack = jax.block_until_ready(stack_prepared([prepare_weight(w) for w in ws]))

            runs = {
                "xla (default)": (_group(xla, **kernel), ws, adapters),
                "mosaic, prepared": (_group(mosaic, **kernel), stack, adapters),
            }
            truth = _fwd_bwd(_group(None, impl="reference"))(
                ws, x.astype(jnp.float32), adapters, tuple(d.astype(jnp.float32) for d in dys)
            )
            t_leaves = jax.tree.leaves(truth)
            print(f"{name} M={m} K={k} N={'+'.join(map(str, ns))}", flush=True)
            for label, (group, weights, ads) in runs.items():
                leaves = jax.tree.leaves(_fwd_bwd(group)(weights, x, ads, dys))
                errs = [rel(a, b) for a, b in zip(leaves, t_leaves, strict=True)]
                n = len(ns)
                print(
                    f"  {label:<18} rel.L2 y {max(errs[:n]):.2e}  dx {errs[n]:.2e}  "
                    f"dA/dB {max(errs[n + 1 :]):.2e}",
                    flush=True,
                )
            if args.interpret:
                continue
            flops = 2 * m * k * sum(ns)
            # Random values: cuBLAS on a zero W runs ~10% faster than on real data.
            w16 = jax.random.normal(jax.random.key(1), (sum(ns), k), jnp.bfloat16)
            dy_all = jnp.concatenate(dys, axis=1)
            dot_f = pipelined_ms(jax.jit(lambda x, w: x @ w.T), x, w16)
            dot_fb = dot_f + pipelined_ms(jax.jit(lambda dy, w: dy @ w), dy_all, w16)
            print(f"  {'dot (bf16 cuBLAS)':<18} fwd {dot_f:7.3f} ms {flops / dot_f / 1e9:6.1f} "
                  f"TFLOP/s          fwd+bwd {dot_fb:7.3f} ms {2 * flops / dot_fb / 1e9:6.1f}",
                  flush=True)  # fmt: skip
            runs["mosaic, no LoRA"] = (_group(mosaic), stack, [None] * len(ns))
            for label, (group, weights, ads) in runs.items():
                t_f = pipelined_ms(jax.jit(group), weights, x, ads)
                t_fb = pipelined_ms(_fwd_bwd(group), weights, x, ads, dys)
                print(f"  {label:<18} fwd {t_f:7.3f} ms {flops / t_f / 1e9:6.1f} TFLOP/s "
                      f"({100 * dot_f / t_f:5.1f}%)  fwd+bwd {t_fb:7.3f} ms "
                      f"{2 * flops / t_fb / 1e9:6.1f} ({100 * dot_fb / t_fb:5.1f}%)",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
