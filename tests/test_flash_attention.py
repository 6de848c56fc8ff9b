"""pallas_kernels.flash_attention: Pallas kernels (interpret mode) vs the jnp reference.

Every case draws fresh inputs and checks the output and dq, dk, dv of the kernels against
``attention_reference`` (itself checked against a float64 numpy repeat-KV softmax). Sequence
lengths are mostly not multiples of the blocks, and the blocks are small and unequal
(q tiles != k tiles) so the block-range arithmetic is exercised at every edge.

Interpret-mode kernels are compiled by XLA:CPU; compiling at optimisation level 0 cuts that
time ~3x without changing what is computed, which keeps this module well under 90 s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels._backend import triton_custom_call_target
from pallas_kernels.flash_attention import (
    BlockSizes,
    attention_logsumexp,
    attention_reference,
    flash_attention,
    resolve_impl,
    save_forward_residuals,
)
from pallas_kernels.flash_attention_kernels import KernelSpec, flash_backward, flash_forward

# jax 0.11 warns whenever a Triton-lowered Pallas kernel is lowered (the cross-lowering tests).
pytestmark = pytest.mark.filterwarnings("ignore:.*Pallas Triton backend is deprecated")

SMALL_BLOCKS = BlockSizes(
    block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=32, block_k_dq=16
)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int = 1
    seq_len: int = 100
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    causal: bool = True
    window: int | None = None
    softcap: float | None = None
    segments: bool = False
    dtype: Any = jnp.float32
    blocks: BlockSizes | None = SMALL_BLOCKS  # None: the defaults for head_dim


def _segment_ids(rng: np.random.Generator, batch: int, seq_len: int) -> np.ndarray:
    """Packed rows: 1-4 documents of random lengths, then a tail of padding (segment 0)."""
    ids = np.zeros((batch, seq_len), np.int32)
    for b in range(batch):
        used = int(seq_len * rng.uniform(0.6, 0.9))
        cuts = np.sort(rng.choice(np.arange(1, used), size=rng.integers(0, 4), replace=False))
        ids[b, :used] = np.searchsorted(cuts, np.arange(used), side="right") + 1
    return ids


def _inputs(case: Case, seed: int) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)
    q_shape = (case.batch, case.seq_len, case.q_heads, case.head_dim)
    kv_shape = (case.batch, case.seq_len, case.kv_heads, case.head_dim)
    q, k, v, d_out = (
        jnp.asarray(rng.standard_normal(shape), case.dtype)
        for shape in (q_shape, kv_shape, kv_shape, q_shape)
    )
    segments = jnp.asarray(_segment_ids(rng, case.batch, case.seq_len)) if case.segments else None
    return q, k, v, d_out, segments


def _naive(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    causal: bool,
    window: int | None,
    softcap: float | None,
    q_segments: np.ndarray | None,
    kv_segments: np.ndarray | None,
    scale: float,
) -> np.ndarray:
    """float64 numpy attention with K/V repeated per query head (the textbook definition)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    seq = q.shape[1]
    rows, cols = np.arange(seq)[:, None], np.arange(seq)[None, :]
    mask = np.ones((1, 1, seq, seq), bool)
    if causal:
        mask &= cols <= rows
    if window is not None:
        mask &= cols > rows - window
    if q_segments is not None:
        mask = mask & (q_segments[:, None, :, None] == kv_segments[:, None, None, :])
    s = np.where(mask, s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0.0)) * mask
    denom = p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p / np.where(denom == 0, 1, denom), v)


def _rel_err(actual: jax.Array, expected: jax.Array) -> float:
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(a - e).max() / max(np.abs(e).max(), 1e-30))


def _outputs_and_grads(case: Case, impl: str, interpret: bool | None, args) -> tuple:
    q, k, v, d_out, segments = args

    def run(q, k, v, d_out, segments):
        def attn(q, k, v):
            return flash_attention(
                q,
                k,
                v,
                causal=case.causal,
                sliding_window=case.window,
                softcap=case.softcap,
                segment_ids=segments,
                impl=impl,
                interpret=interpret,
                block_sizes=case.blocks,
            )

        out, vjp = jax.vjp(attn, q, k, v)
        return (out, *vjp(d_out))

    return jax.jit(run)(q, k, v, d_out, segments)


# ---- the reference is the definition: check it against the textbook first ----------------


@pytest.mark.parametrize(
    "case",
    [
        Case("causal-gqa", q_heads=4, kv_heads=2),
        Case(
            "window-softcap-segments-mqa",
            q_heads=4,
            kv_heads=1,
            window=17,
            softcap=3.0,
            segments=True,
            batch=2,
        ),
        Case("noncausal-segments", causal=False, segments=True, q_heads=2, kv_heads=2),
    ],
    ids=lambda c: c.name,
)
def test_reference_matches_naive(case: Case) -> None:
    q, k, v, _, segments = _inputs(case, seed=zlib.crc32(case.name.encode()))

    def reference(q, k, v, segments):
        return attention_reference(
            q,
            k,
            v,
            causal=case.causal,
            sliding_window=case.window,
            softcap=case.softcap,
            segment_ids=segments,
        )

    out = jax.jit(reference)(q, k, v, segments)
    seg = None if segments is None else np.asarray(segments)
    expected = _naive(
        np.asarray(q),
        np.asarray(k),
        np.asarray(v),
        causal=case.causal,
        window=case.window,
        softcap=case.softcap,
        q_segments=seg,
        kv_segments=seg,
        scale=case.head_dim**-0.5,
    )
    assert _rel_err(out, expected) < 1e-6


# ---- kernels vs reference -------------------------------------------------------------------

F32_CASES = [
    Case("causal-window-gqa2", seq_len=130, window=24),
    Case("causal-softcap-gqa4", seq_len=96, q_heads=8, kv_heads=2, softcap=2.0),
    Case("causal-segments-mqa", batch=2, seq_len=120, q_heads=4, kv_heads=1, segments=True),
    Case("window-segments-gqa2-d128", seq_len=150, head_dim=128, window=40, segments=True),
    Case("noncausal-gqa2", seq_len=70, causal=False),
    Case(
        "d256-window-softcap-default-blocks",
        seq_len=80,
        head_dim=256,
        window=32,
        softcap=2.0,
        blocks=None,
    ),
    Case("d96-causal-mha-default-blocks", batch=2, seq_len=50, q_heads=2, head_dim=96, blocks=None),
    Case(
        "all-options-gqa4-default-blocks",
        seq_len=200,
        q_heads=8,
        kv_heads=2,
        window=64,
        softcap=2.0,
        segments=True,
        blocks=None,
    ),
]

LOW_PRECISION_CASES = [
    Case(
        "bf16-all-options-gqa4-d128",
        seq_len=160,
        q_heads=8,
        kv_heads=2,
        head_dim=128,
        window=48,
        softcap=2.0,
        segments=True,
        dtype=jnp.bfloat16,
    ),
    Case("f16-causal-gqa2", seq_len=90, dtype=jnp.float16),
]


@pytest.mark.parametrize("case", F32_CASES + LOW_PRECISION_CASES, ids=lambda c: c.name)
def test_kernel_matches_reference(case: Case) -> None:
    args = _inputs(case, seed=zlib.crc32(case.name.encode()))
    got = _outputs_and_grads(case, "pallas", True, args)
    if case.dtype == jnp.float32:
        want, tol = _outputs_and_grads(case, "reference", None, args), 1e-5
    else:  # truth: the float32 reference on the same (rounded) inputs
        up = tuple(None if x is None else x.astype(jnp.float32) for x in args[:4]) + args[4:]
        want = _outputs_and_grads(case, "reference", None, up)
        tol = 1.5e-2 if case.dtype == jnp.bfloat16 else 3e-3  # ~4x the observed rounding error
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert g.dtype == case.dtype, name
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        err = _rel_err(g, w)
        assert err < tol, f"{name}: rel err {err:.2e} >= {tol:.0e}"


def test_rows_that_see_no_key_give_zero_and_no_nan() -> None:
    """Query segment 7 exists in no key: its rows must give out 0, lse +inf, dq 0, no NaN."""
    seq, groups = 64, 2
    spec = KernelSpec(
        causal=True,
        sliding_window=None,
        softcap=None,
        scale=0.125,
        seq_len=seq,
        block_sizes=SMALL_BLOCKS,
        interpret=True,
    )
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, seq, 2 * groups, 64)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, seq, 2, 64)), jnp.float32) for _ in range(2))
    d_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    kv_seg = np.ones((1, seq), np.int32)
    q_seg = kv_seg.copy()
    q_seg[0, 20:40] = 7  # no key has segment 7
    segments = (jnp.asarray(q_seg), jnp.asarray(kv_seg))
    empty = q_seg[0] == 7

    out, lse = jax.jit(lambda *a: flash_forward(*a, segments, spec))(q, k, v)
    out, lse = np.asarray(out), np.asarray(lse)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[0, empty], 0.0)
    assert np.isposinf(lse[0, :, empty]).all() and np.isfinite(lse[0, :, ~empty]).all()
    expected = _naive(
        np.asarray(q),
        np.asarray(k),
        np.asarray(v),
        causal=True,
        window=None,
        softcap=None,
        q_segments=q_seg,
        kv_segments=kv_seg,
        scale=spec.scale,
    )
    assert _rel_err(out, expected) < 1e-5

    def grads(d_out):
        return flash_backward(q, k, v, segments, jnp.asarray(out), jnp.asarray(lse), d_out, spec)

    dq, dk, dv = (np.asarray(g) for g in jax.jit(grads)(d_out))
    assert all(np.isfinite(g).all() for g in (dq, dk, dv))
    np.testing.assert_array_equal(dq[0, empty], 0.0)
    # The empty rows contribute nothing: zeroing their cotangent leaves dK/dV unchanged.
    d_out_masked = d_out.at[:, jnp.asarray(empty)].set(0.0)
    _, dk2, dv2 = (np.asarray(g) for g in jax.jit(grads)(d_out_masked))
    np.testing.assert_allclose(dk, dk2, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dv, dv2, rtol=1e-6, atol=1e-6)


# ---- structure and API --------------------------------------------------------------------


def _jaxpr_text(fn: Callable[..., Any], *args: Any) -> str:
    return str(jax.make_jaxpr(fn)(*args))


def test_selection_rules() -> None:
    backend_is_gpu = jax.default_backend() == "gpu"
    default = ("pallas", False) if backend_is_gpu else ("reference", False)
    assert resolve_impl(None, None) == default
    assert resolve_impl(None, True) == ("pallas", True)
    assert resolve_impl("reference", None) == ("reference", False)
    assert resolve_impl("pallas", None) == ("pallas", not backend_is_gpu)
    assert resolve_impl("cudnn", None) == ("cudnn", False)
    assert resolve_impl("mosaic", None) == ("mosaic", not backend_is_gpu)
    assert resolve_impl("mosaic", True) == ("mosaic", True)
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("triton", None)

    q = jnp.zeros((1, 32, 2, 64), jnp.float32)
    kernel = _jaxpr_text(lambda q: flash_attention(q, q, q, interpret=True), q)
    reference = _jaxpr_text(lambda q: flash_attention(q, q, q, impl="reference"), q)
    assert "pallas_call" in kernel and "pallas_call" not in reference


def _eqns(jaxpr: Any) -> list[Any]:
    """All equations of a jaxpr and of the jaxprs nested in its params (kernels excluded)."""
    found = []
    for eqn in jaxpr.eqns:
        found.append(eqn)
        if eqn.primitive.name == "pallas_call":
            continue
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found += _eqns(sub)
    return found


def test_no_score_matrix_and_no_kv_repeat() -> None:
    """Forward + backward of the kernel path hold nothing of size S x S outside the kernels,
    and K/V go straight into the kernels (GQA via the index map, never jnp.repeat)."""
    seq = 256
    q = jnp.zeros((1, seq, 8, 64), jnp.bfloat16)
    kv = jnp.zeros((1, seq, 2, 64), jnp.bfloat16)
    segments = jnp.ones((1, seq), jnp.int32)

    def loss(q, k, v):
        out = flash_attention(
            q,
            k,
            v,
            sliding_window=100,
            softcap=30.0,
            segment_ids=segments,
            impl="pallas",
            interpret=False,  # traced only: the compiled (GPU) graph, not the interpreter's
        )
        return out.astype(jnp.float32).sum()

    closed = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, kv, kv)
    eqns = _eqns(closed.jaxpr)
    shapes = [getattr(v.aval, "shape", ()) for e in eqns for v in e.outvars]
    assert not [s for s in shapes if sum(d >= seq for d in s) >= 2], "S x S intermediate"
    kv_vars = {id(var) for var in closed.jaxpr.invars[1:]}
    kv_users = {e.primitive.name for e in closed.jaxpr.eqns if kv_vars & {id(x) for x in e.invars}}
    assert kv_users == {"pallas_call"}
    assert sum(e.primitive.name == "pallas_call" for e in eqns) == 3  # fwd, dK/dV, dQ


def _cuda_target() -> contextlib.AbstractContextManager[Any]:
    """jax 0.11's Triton lowering reads the GPU model (compute capability); with no GPU
    present, name the H200 through an abstract mesh (0.10 ignores it)."""
    if jax.default_backend() == "gpu" or not hasattr(jax.sharding, "AbstractDevice"):
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "gqa4-window-softcap-segments",
            seq_len=200,
            q_heads=8,
            kv_heads=2,
            window=50,
            softcap=30.0,
            segments=True,
            blocks=None,
        ),
        Case(
            "mqa-noncausal-d96",
            seq_len=100,
            q_heads=4,
            kv_heads=1,
            head_dim=96,
            causal=False,
            blocks=None,
        ),
        Case("mha-d256", seq_len=64, q_heads=2, kv_heads=2, head_dim=256, blocks=None),
    ],
    ids=lambda c: c.name,
)
def test_kernels_lower_to_triton_for_cuda(case: Case) -> None:
    """Cross-lower (no GPU needed) the compiled path for CUDA: all three kernels must go to
    the Triton backend (not Mosaic GPU) and pass its lowering checks (power-of-two tiles,
    supported primitives). Triton's own compile to PTX still only happens on a GPU."""
    q, k, v, d_out, segments = (
        None
        if x is None
        else jax.ShapeDtypeStruct(x.shape, jnp.bfloat16 if x.ndim == 4 else x.dtype)
        for x in _inputs(case, seed=0)
    )

    def fwd_bwd(q, k, v, d_out, segments):
        def attn(q, k, v):
            return flash_attention(
                q,
                k,
                v,
                causal=case.causal,
                sliding_window=case.window,
                softcap=case.softcap,
                segment_ids=segments,
                impl="pallas",
                interpret=False,
            )

        out, vjp = jax.vjp(attn, q, k, v)
        return (out, *vjp(d_out))

    with _cuda_target():
        traced = jax.jit(fwd_bwd).trace(q, k, v, d_out, segments)
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count(triton_custom_call_target()) == 3  # forward, dK/dV, dQ
    assert "mosaic" not in text.lower()


def test_remat_policy_keeps_forward_residuals() -> None:
    """Under jax.checkpoint the forward kernel re-runs in the backward unless the policy saves
    its outputs; save_forward_residuals does (names on the output alone do not)."""
    q = jnp.zeros((1, 64, 4, 64), jnp.bfloat16)
    kv = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)

    def forward_kernels(policy: Any) -> int:
        def layer(q, k, v):
            out = flash_attention(q * 2, k * 2, v * 2, impl="pallas", interpret=False)
            return checkpoint_name(out, "attention_out")

        layer = jax.checkpoint(layer, policy=policy)
        grad = jax.grad(lambda *a: layer(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))
        eqns = _eqns(jax.make_jaxpr(grad)(q, kv, kv).jaxpr)
        return sum(str(e.params.get("name")) == "flash_attention_fwd" for e in eqns)

    policies = jax.checkpoint_policies
    assert forward_kernels(policies.save_only_these_names("attention_out")) == 2
    combined = policies.save_from_both_policies(
        policies.save_only_these_names("attention_out"), save_forward_residuals
    )
    assert forward_kernels(combined) == 1


@pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="cuDNN attention only exists on NVIDIA GPUs"
)
def test_remat_policy_keeps_cudnn_forward_residuals() -> None:
    """The same for cuDNN's attention (the model's default on GPU): without the policy its
    forward runs again in the backward pass to rebuild the softmax statistics."""
    q = jnp.zeros((1, 128, 4, 64), jnp.bfloat16)
    kv = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)

    def forward_kernels(policy: Any) -> int:
        def layer(q, k, v):
            out = flash_attention(q * 2, k * 2, v * 2, impl="cudnn")
            return checkpoint_name(out, "attention_out")

        layer = jax.checkpoint(layer, policy=policy)
        grad = jax.grad(lambda *a: layer(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))
        eqns = _eqns(jax.make_jaxpr(grad)(q, kv, kv).jaxpr)
        return sum(e.primitive.name.startswith("dot_product_attention_fwd") for e in eqns)

    policies = jax.checkpoint_policies
    assert forward_kernels(policies.save_only_these_names("attention_out")) == 2
    combined = policies.save_from_both_policies(
        policies.save_only_these_names("attention_out"), save_forward_residuals
    )
    assert forward_kernels(combined) == 1


def test_invalid_arguments() -> None:
    q = jnp.zeros((1, 16, 4, 64))
    kv = jnp.zeros((1, 16, 3, 64))
    with pytest.raises(ValueError, match="multiple"):
        flash_attention(q, kv, kv, interpret=True)
    with pytest.raises(ValueError, match="causal"):
        flash_attention(q, q, q, causal=False, sliding_window=4, interpret=True)
    with pytest.raises(ValueError, match="dtype"):
        flash_attention(q, q.astype(jnp.bfloat16), q, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(block_q=48)
    with pytest.raises(NotImplementedError):
        flash_attention(q, q, q, softcap=5.0, impl="cudnn")


def test_reference_logsumexp_is_the_softmax_normaliser(rng):
    """``attention_logsumexp`` (the lse a forward saves) against scores built head by head with
    K repeated: GQA grouping, window, softcap, segments (one row alone in its segment)."""
    b, s, hq, hkv, d = 2, 9, 4, 2, 8
    q = jnp.asarray(rng.standard_normal((b, s, hq, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32)
    segments = jnp.asarray([[1] * 5 + [2] * 4, [1] * 9])
    segments = segments.at[1, 4].set(3)  # row 4 of batch 1 sees only itself
    got = attention_logsumexp(
        q, k, causal=True, sliding_window=3, softcap=4.0, segment_ids=segments, scale=0.5
    )
    kk = jnp.repeat(k, hq // hkv, axis=2)
    scores = 4.0 * jnp.tanh(jnp.einsum("bqhd,bkhd->bhqk", q, kk) * 0.5 / 4.0)
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    visible = (j <= i) & (j > i - 3)
    visible = visible & (segments[:, :, None] == segments[:, None, :])
    want = jax.nn.logsumexp(jnp.where(visible[:, None], scores, -jnp.inf), axis=-1)
    assert got.shape == (b, hq, s)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
