"""The Mosaic GPU causal attention backward, run by the Mosaic GPU interpreter on the CPU.

What this checks: the TMA ring and its barriers (the interpreter fails on a barrier phase that
is never observed), the causal tile ranges of both kernels (S = 256 gives each kernel one CTA
that streams only masked tiles and one that streams both kinds), the GQA reduction inside the
dK/dV kernel (4 query heads on 2 KV heads) and the math, against float32 autodiff of
attention. The wgmma operand forms are the GPU's (``scripts/check_mgpu_attention_bwd.py``).
About 45 s on a 2-core CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention_mgpu import MgpuBackwardConfig, flash_backward_mgpu

interpret_params = pytest.importorskip(
    "jax._src.pallas.mosaic_gpu.interpret.params",
    reason="this jax has no Mosaic GPU interpreter (the kernels then need a GPU to run)",
)


def _attention(q, k, v, scale):
    groups = q.shape[2] // k.shape[2]
    kk = jnp.repeat(k, groups, axis=2)
    vv = jnp.repeat(v, groups, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    n = q.shape[1]
    s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(s - lse[..., None]), vv), lse


def test_matches_reference_gradients(rng):
    b, s, hq, hkv, d = 1, 256, 4, 2, 64
    q, k, v, do = (
        jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.bfloat16) for h in (hq, hkv, hkv, hq)
    )
    scale = d**-0.5
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (out, lse), vjp = jax.vjp(lambda *x: _attention(*x, scale), *f32)
    want = vjp((do.astype(jnp.float32), jnp.zeros_like(lse)))
    got = flash_backward_mgpu(
        q, k, v, out.astype(jnp.bfloat16), lse, do, scale=scale,
        interpret=interpret_params.InterpretGPUParams(),
    )  # fmt: skip
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert g.shape == w.shape and g.dtype == jnp.bfloat16, name
        err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)) / jnp.max(jnp.abs(w)))
        # bf16 inputs, P and dS rounded to bf16 for the tensor cores: ~2^-8 relative.
        assert err < 1.5e-2, (name, err)


def test_argument_errors():
    q = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
    kv = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    lse = jnp.zeros((1, 4, 256), jnp.float32)
    with pytest.raises(ValueError, match="multiple of 128"):
        flash_backward_mgpu(q[:, :192], kv[:, :192], kv[:, :192], q[:, :192], lse, q[:, :192],
                            scale=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="head_dim 32"):
        flash_backward_mgpu(q[..., :32], kv[..., :32], kv[..., :32], q[..., :32], lse,
                            q[..., :32], scale=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="bf16 or f16"):
        f = q.astype(jnp.float32)
        flash_backward_mgpu(f, kv.astype(jnp.float32), kv.astype(jnp.float32), f, lse, f,
                            scale=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="multiple of 64"):
        MgpuBackwardConfig(block=96)
    np.testing.assert_equal(MgpuBackwardConfig().block, 64)
