"""How fast is jax's own Mosaic GPU attention *backward* next to cuDNN's? (issue 5 planning)

jax ships a FlashAttention-3-style Mosaic GPU kernel (``jax.experimental.pallas.ops.gpu.
attention_mgpu``) whose backward handles only non-causal attention. Before writing a causal
GQA backward in the same style, this measures what that design reaches where it runs:
non-causal, fp16 (its scratch buffers are fp16), GQA 32/8 heads, d = 128, against cuDNN on the
same problem. FLOPs: non-causal forward 4·B·Hq·S²·D, forward+backward 3.5x that.

    python scripts/probe_mgpu_attention.py [--shapes 1x8192,2x2048]
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from _common import median_ms


def _fwd_bwd(attend):
    def loss(q, k, v):
        return jnp.sum(attend(q, k, v).astype(jnp.float32) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1x8192,2x2048")
    args = parser.parse_args()
    from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu

    fields = {f.name for f in dataclasses.fields(mgpu.TuningConfig)}
    print(f"jax {jax.__version__}; TuningConfig fields: {sorted(fields)}")
    hq, hkv, d = 32, 8, 128
    for shape in args.shapes.split(","):
        b, s = (int(x) for x in shape.split("x"))
        rng = np.random.default_rng(0)
        q, k, v = (
            jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float16) for h in (hq, hkv, hkv)
        )
        flops_fwd = 4 * b * hq * s * s * d

        def cudnn(q, k, v):
            # jax's mgpu kernel applies no softmax scale: ask cuDNN for the same function.
            return jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation="cudnn")

        results = {"cudnn": cudnn}
        for bq, bkv, wgs in ((64, 64, 1), (64, 128, 1), (128, 64, 1), (64, 64, 2)):
            kw = dict(block_q=64, block_kv=128, max_concurrent_steps=2)
            kw.update(block_q_dq=bq, block_kv_dq=bkv, block_q_dkv=bq, block_kv_dkv=bkv)
            kw.update(compute_wgs_bwd=wgs)
            cfg = mgpu.TuningConfig(**{k_: v_ for k_, v_ in kw.items() if k_ in fields})
            results[f"mgpu dq/dkv blocks {bq}x{bkv} wgs={wgs}"] = lambda q, k, v, cfg=cfg: (
                mgpu.attention(q, k, v, cfg)
            )
        ref = None
        for name, attend in results.items():
            try:
                fwd = jax.jit(attend)
                grad = _fwd_bwd(attend)
                g = grad(q, k, v)
                if ref is None:
                    ref = g
                err = max(
                    float(jnp.max(jnp.abs(a.astype(jnp.float32) - r.astype(jnp.float32))))
                    / float(jnp.max(jnp.abs(r.astype(jnp.float32))))
                    for a, r in zip(g, ref, strict=True)
                )
                t_f = median_ms(fwd, q, k, v)
                t_fb = median_ms(grad, q, k, v)
                print(
                    f"{shape} {name:<34} fwd {t_f:7.2f} ms {flops_fwd / t_f / 1e9:6.0f} TFLOP/s"
                    f"   fwd+bwd {t_fb:7.2f} ms {3.5 * flops_fwd / t_fb / 1e9:6.0f} TFLOP/s"
                    f"   grad rel err vs cudnn {err:.1e}",
                    flush=True,
                )
            except Exception as e:  # noqa: BLE001 - a probe reports every failure and goes on
                print(f"{shape} {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
