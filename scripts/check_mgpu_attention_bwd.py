"""Correctness and speed of the Mosaic GPU causal attention backward on a GPU (issue 5).

For each shape: cuDNN's causal forward gives ``out`` and its softmax statistics (lse); the
Mosaic GPU backward (``pallas_kernels.flash_attention_mgpu``) is compared with the jnp
reference gradients, then timed against cuDNN's own backward (the vjp of its forward).
Causal FLOPs: forward 2·B·Hq·S²·D, backward 2.5x that.

    python scripts/check_mgpu_attention_bwd.py [--shapes 2x2048,1x8192] [--block 64 --slots 2]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from _common import median_ms

from pallas_kernels.flash_attention_mgpu import MgpuBackwardConfig, flash_backward_mgpu


def _reference(q, k, v, scale):
    """Causal GQA attention in float32: output and natural-log logsumexp [B, Hq, S]."""
    groups = q.shape[2] // k.shape[2]
    kk = jnp.repeat(k, groups, axis=2).astype(jnp.float32)
    vv = jnp.repeat(v, groups, axis=2).astype(jnp.float32)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kk) * scale
    n = q.shape[1]
    s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(s - lse[..., None]), vv), lse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="2x2048,1x8192")
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--slots", type=int, default=2)
    args = parser.parse_args()
    config = MgpuBackwardConfig(block=args.block, slots=args.slots)
    hq, hkv, d = 32, 8, 128
    scale = d**-0.5
    for shape in args.shapes.split(","):
        b, s = (int(x) for x in shape.split("x"))
        rng = np.random.default_rng(0)
        q, k, v, do = (
            jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.bfloat16) for h in (hq, hkv, hkv, hq)
        )
        out, lse = jax.jit(_reference, static_argnums=3)(q, k, v, scale)
        out = out.astype(jnp.bfloat16)
        mosaic = jax.jit(lambda *a: flash_backward_mgpu(*a, scale=scale, config=config))
        try:
            got = mosaic(q, k, v, out, lse, do)
        except Exception as e:  # noqa: BLE001 - report the compile error and go on
            print(f"{shape}: mosaic backward FAILED {type(e).__name__}: {str(e)[:600]}")
            continue
        if s <= 4096:
            _, vjp = jax.vjp(lambda q, k, v: _reference(q, k, v, scale)[0], q, k, v)
            want = jax.jit(vjp)(do.astype(jnp.float32))
            errs = [
                float(jnp.max(jnp.abs(a.astype(jnp.float32) - w)) / jnp.max(jnp.abs(w)))
                for a, w in zip(got, want, strict=True)
            ]
            print(f"{shape}: rel. error dq/dk/dv vs float32 reference {errs}")

        def cudnn_fwd_bwd(q, k, v, do):
            def attend(q, k, v):
                return jax.nn.dot_product_attention(
                    q, k, v, is_causal=True, scale=scale, implementation="cudnn"
                )

            y, vjp = jax.vjp(attend, q, k, v)
            return y, vjp(do)

        cudnn = jax.jit(cudnn_fwd_bwd)
        cudnn_fwd = jax.jit(
            lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, scale=scale, implementation="cudnn"
            )
        )
        flops_fwd = 2 * b * hq * s * s * d
        t_fb = median_ms(cudnn, q, k, v, do)
        t_f = median_ms(cudnn_fwd, q, k, v)
        t_mosaic = median_ms(mosaic, q, k, v, out, lse, do)
        print(
            f"{shape}: cuDNN fwd {flops_fwd / t_f / 1e9:.0f} TFLOP/s, cuDNN bwd "
            f"{2.5 * flops_fwd / (t_fb - t_f) / 1e9:.0f} (fwd+bwd {t_fb:.2f} ms), Mosaic bwd "
            f"{2.5 * flops_fwd / t_mosaic / 1e9:.0f} ({t_mosaic:.2f} ms incl. delta)",
            flush=True,
        )


if __name__ == "__main__":
    main()
