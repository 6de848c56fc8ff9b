"""The Mosaic GPU causal attention kernels, run by the Mosaic GPU interpreter on the CPU.

What this checks: the TMA rings and their barriers (the interpreter fails on a barrier phase
that is never observed), the tensor-core turn-taking of the forward, the causal tile ranges
(S = 256 gives each kernel CTAs that stream only masked tiles and CTAs that stream both
kinds), the GQA reduction inside the dK/dV kernel (4 query heads on 2 KV heads), both dQ tile widths
and both head dims, packed segments, sliding windows and the softcap (their tile ranges and
masks), and the math, against float32 autodiff of attention. The wgmma
operand forms are the GPU's (``scripts/check_mgpu_attention.py``).

What the tests cost: the interpreter compiles one program per warpgroup and CTA (about a
second each), so a test's time is its kernels' grid points (query or KV heads x tiles of 128
rows x batch). Each test takes the fewest heads and the shortest rows that still give its
tile story. A second KV head (KV head 1 read by query heads 2-3: ``head // groups``, and the
GQA sum of a KV head after the first) is in the 64-wide forward, the head-dim-128 backward
and the head-dim-128 fused backward; the window test's first case has two query heads on
one KV head (the dK/dV kernel's per-head loops with a window).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention_mgpu as mgpu
from pallas_kernels.flash_attention import attention_logsumexp, attention_reference
from pallas_kernels.flash_attention_mgpu import (
    MgpuAttentionConfig,
    flash_attention_mgpu,
    flash_backward_mgpu,
    flash_forward_mgpu,
    segment_spans,
)

interpret_params = pytest.importorskip(
    "jax._src.pallas.mosaic_gpu.interpret.params",
    reason="this jax has no Mosaic GPU interpreter (the kernels then need a GPU to run)",
)


def _attention(q, k, v, scale, segment_ids=None, **options):
    """Causal attention and its log-sum-exp (what the forward saves), from the references."""
    options.update(causal=True, scale=scale, segment_ids=segment_ids)
    return attention_reference(q, k, v, **options), attention_logsumexp(q, k, **options)


def _packed_segments(s=384, lengths=(150, 170, 40)):
    """A packed row as lorax.data.packing makes it: examples 1..k, then padding (0).

    With the default S = 384: the boundaries fall inside tiles; the second example's rows in the
    second query block see none of their keys in the first K/V tile (the forward's online
    softmax must not produce NaN there); the last query block's span starts in the second K/V
    tile and the first key block's ends in the third query tile (of 64 rows), so every kernel
    skips tiles that lie across segments.
    """
    ids = np.repeat([*range(1, len(lengths) + 1), 0], [*lengths, s - sum(lengths)])
    return jnp.asarray(ids[None], jnp.int32)


def _inputs(rng, b=1, s=256, hq=4, hkv=2, d=64):
    return tuple(
        jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.bfloat16) for h in (hq, hkv, hkv, hq)
    )


def _rel_err(got, want):
    return float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))


@pytest.mark.parametrize(
    ("block_kv", "launch_order", "hq", "hkv"), [(64, "heads", 4, 2), (128, "tiles", 2, 1)]
)
def test_forward_matches_reference(rng, block_kv, launch_order, hq, hkv):
    """S = 256: the 64-wide K/V tiles run the ring past its two slots and the skipped tile
    above the earlier warpgroup's diagonal, on two KV heads; the 128-wide tiles stream one
    unmasked and one diagonal tile."""
    q, k, v, _ = _inputs(rng, hq=hq, hkv=hkv)
    scale = 0.3  # not D**-0.5: the scale must reach the kernel
    want_out, want_lse = _attention(*(x.astype(jnp.float32) for x in (q, k, v)), scale)
    config = MgpuAttentionConfig(fwd_block_kv=block_kv, launch_order=launch_order)
    out, lse = flash_forward_mgpu(
        q, k, v, scale=scale, config=config, interpret=interpret_params.InterpretGPUParams()
    )
    assert out.dtype == jnp.bfloat16 and lse.shape == (1, hq, 256)
    assert _rel_err(out, want_out) < 1e-2
    np.testing.assert_allclose(lse, want_lse, rtol=0, atol=2e-3)


def test_auto_launch_order_goes_heads_first_once_a_head_fills_the_gpu():
    """Grid axes in launch order: tiles first for short sequences (each head's CTAs alone leave
    SMs idle), heads first from ``_HEADS_FIRST_MIN_CTAS`` CTAs per head (tiles x batch)."""
    auto, forced = MgpuAttentionConfig(), MgpuAttentionConfig(launch_order="tiles")
    tiles, heads = ("q_tiles", mgpu._HEADS_FIRST_MIN_CTAS), ("heads", 32)
    assert list(mgpu._grid(auto, tiles, heads, 1)) == ["heads", "q_tiles", "batch"]
    assert list(mgpu._grid(forced, tiles, heads, 1)) == ["q_tiles", "heads", "batch"]
    short = ("q_tiles", mgpu._HEADS_FIRST_MIN_CTAS // 2 - 1)
    assert list(mgpu._grid(auto, short, heads, 2)) == ["q_tiles", "heads", "batch"]
    assert mgpu._grid(auto, short, heads, 2) == {"q_tiles": short[1], "heads": 32, "batch": 2}


@pytest.mark.parametrize(
    ("config", "d", "hq", "hkv"),
    [
        (MgpuAttentionConfig(dq_block_kv=64), 64, 2, 1),
        (MgpuAttentionConfig(), 64, 2, 1),
        # The other launch order; 4 query heads on 2 KV heads (KV head 1 in both kernels).
        (MgpuAttentionConfig(launch_order="heads"), 128, 4, 2),
    ],
    ids=["dq-kernel-kv64", "dq-kernel-kv128", "head-dim-128-heads-first"],
)
def test_backward_matches_reference_gradients(rng, config, d, hq, hkv):
    q, k, v, do = _inputs(rng, hq=hq, hkv=hkv, d=d)
    scale = d**-0.5
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (out, lse), vjp = jax.vjp(lambda *x: _attention(*x, scale), *f32)
    want = vjp((do.astype(jnp.float32), jnp.zeros_like(lse)))
    got = flash_backward_mgpu(
        q, k, v, out.astype(jnp.bfloat16), lse, do, scale=scale,
        config=config,
        interpret=interpret_params.InterpretGPUParams(),
    )  # fmt: skip
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert g.shape == w.shape and g.dtype == jnp.bfloat16, name
        # bf16 inputs, P and dS rounded to bf16 for the tensor cores: ~2^-8 relative.
        assert _rel_err(g, w) < 1.5e-2, (name, _rel_err(g, w))


def test_packed_segments_match_reference(rng):
    """Forward (out, lse) and backward (dq, dk, dv) with segment ids, against the references."""
    q, k, v, do = _inputs(rng, s=384, hq=1, hkv=1)
    segment_ids = _packed_segments()
    np.testing.assert_array_equal(
        segment_spans(segment_ids, 128)[0], [[0, 149], [0, 319], [150, 383]]
    )  # the tiles the kernels stream: K/V from 150 // 128 = 1 for rows 256-383, and so on
    scale = 0.125
    params = interpret_params.InterpretGPUParams()
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (want_out, want_lse), vjp = jax.vjp(lambda *x: _attention(*x, scale, segment_ids), *f32)
    want = vjp((do.astype(jnp.float32), jnp.zeros_like(want_lse)))
    # The segments matter: attention across them gives other values.
    assert _rel_err(_attention(*f32, scale)[0], want_out) > 0.1
    out, lse = flash_forward_mgpu(q, k, v, scale=scale, interpret=params, segment_ids=segment_ids)
    assert not jnp.isnan(out.astype(jnp.float32)).any()
    assert _rel_err(out, want_out) < 1e-2
    np.testing.assert_allclose(lse, want_lse, rtol=0, atol=2e-3)
    got = flash_backward_mgpu(
        q, k, v, want_out.astype(jnp.bfloat16), want_lse, do, scale=scale, interpret=params,
        segment_ids=segment_ids,
    )  # fmt: skip
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert _rel_err(g, w) < 1.5e-2, (name, _rel_err(g, w))


@pytest.mark.parametrize(
    ("window", "softcap", "segmented", "s", "hq"),
    [(193, None, False, 384, 2), (None, 2.0, False, 256, 1), (100, 2.0, True, 384, 1)],
    ids=["window", "softcap", "window-softcap-segments"],
)
def test_window_and_softcap_match_reference(rng, window, softcap, segmented, s, hq):
    """Forward and backward with a sliding window and/or a softcap, against the references.

    S = 384 with a window of 193: the forward's and dQ's last CTA masks K/V tile 0 (the window's
    edge; the later warpgroup's rows see no key there), streams tile 1 unmasked and masks tile 2
    (the diagonal); the dK/dV kernel's first CTA masks query tiles 0-1 (the diagonal), streams
    tile 2 unmasked, masks tiles 3-4 (the window's edge) and stops there, before the last
    (for each of its two query heads). A window of 100 is narrower than a CTA's rows: the
    forward's and dQ's last CTA skips K/V tile 0 (before every row's window), and the later
    warpgroup's first tile holds no key it may see. The softcap of 2 with scores of magnitude
    ~3 saturates the tanh.
    """
    q, k, v, do = _inputs(rng, s=s, hq=hq, hkv=1)
    segment_ids = _packed_segments() if segmented else None
    options = dict(sliding_window=window, softcap=softcap)
    scale = 0.4
    params = interpret_params.InterpretGPUParams()
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    attend = lambda *x: _attention(*x, scale, segment_ids, **options)
    (want_out, want_lse), vjp = jax.vjp(attend, *f32)
    want = vjp((do.astype(jnp.float32), jnp.zeros_like(want_lse)))
    # The options matter: without them attention gives other values.
    assert _rel_err(_attention(*f32, scale, segment_ids)[0], want_out) > 0.05
    out, lse = flash_forward_mgpu(
        q, k, v, scale=scale, interpret=params, segment_ids=segment_ids, **options
    )
    assert not jnp.isnan(out.astype(jnp.float32)).any()
    assert _rel_err(out, want_out) < 1e-2
    np.testing.assert_allclose(lse, want_lse, rtol=0, atol=2e-3)
    got = flash_backward_mgpu(
        q, k, v, want_out.astype(jnp.bfloat16), want_lse, do, scale=scale, interpret=params,
        segment_ids=segment_ids, **options,
    )  # fmt: skip
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert _rel_err(g, w) < 1.5e-2, (name, _rel_err(g, w))


@pytest.mark.parametrize(
    ("d", "hq", "hkv", "options"),
    [(64, 2, 1, {}), (128, 4, 2, {}), (64, 2, 1, dict(sliding_window=100, softcap=2.0))],
    ids=["head-dim-64", "head-dim-128", "window-softcap-segments"],
)
def test_fused_backward_matches_reference(rng, d, hq, hkv, options):
    """dQ inside the dK/dV kernel (``bwd_dq="fused"``): warpgroup 0 hands P to warpgroup 1
    through a double-buffered tile, and each CTA's dQ partials are added into a float32
    buffer. S = 256 gives per head a CTA that streams only the two masked query tiles at its
    diagonal and one that streams two unmasked tiles after them; two query heads per KV head
    (KV head 1 at head dim 128). The last case adds packed rows (the first CTA's keys stop
    after query tile 2: their example ends at 149), a window narrower than a CTA's keys and a
    saturating softcap (the P tile then carries the softcap's derivative)."""
    q, k, v, do = _inputs(rng, s=256, hq=hq, hkv=hkv, d=d)
    segment_ids = _packed_segments(256, (150, 80)) if options else None
    scale = d**-0.5
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    attend = lambda *x: _attention(*x, scale, segment_ids, **options)
    (out, lse), vjp = jax.vjp(attend, *f32)
    want = vjp((do.astype(jnp.float32), jnp.zeros_like(lse)))
    got = flash_backward_mgpu(
        q, k, v, out.astype(jnp.bfloat16), lse, do, scale=scale, segment_ids=segment_ids,
        config=MgpuAttentionConfig(bwd_dq="fused"),
        interpret=interpret_params.InterpretGPUParams(), **options,
    )  # fmt: skip
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert g.shape == w.shape and g.dtype == jnp.bfloat16, name
        assert _rel_err(g, w) < 1.5e-2, (name, _rel_err(g, w))


def test_segment_spans_need_no_contiguous_runs():
    """Per block of rows: the first key and the last query any row of it may pair with, also
    when a segment id comes back after another one (not a contiguous run)."""
    ids = jnp.asarray([[1, 2, 1, 3, 3, 2, 4, 4]], jnp.int32)
    np.testing.assert_array_equal(segment_spans(ids, 2), [[[0, 5], [0, 4], [1, 5], [6, 7]]])


def test_custom_vjp_end_to_end(rng):
    """jax.grad through the forward kernel's residuals into the backward kernels, on two batch
    rows (the other tests take one; GQA goes through the custom VJP in the entry-point tests)."""
    q, k, v, do = _inputs(rng, b=2, s=128, hq=1, hkv=1, d=128)
    scale = 128**-0.5
    params = interpret_params.InterpretGPUParams()

    def loss(attend, *x):
        return jnp.sum(attend(*x).astype(jnp.float32) * do.astype(jnp.float32))

    got = jax.grad(lambda *x: loss(lambda *y: flash_attention_mgpu(*y, scale, interpret=params),
                                   *x), argnums=(0, 1, 2))(q, k, v)  # fmt: skip
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = jax.grad(lambda *x: loss(lambda *y: _attention(*y, scale)[0], *x), argnums=(0, 1, 2))(
        *f32
    )
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert _rel_err(g, w) < 1.5e-2, (name, _rel_err(g, w))


def test_argument_errors():
    q = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
    kv = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    lse = jnp.zeros((1, 4, 256), jnp.float32)
    with pytest.raises(ValueError, match="multiple of 128"):
        flash_backward_mgpu(q[:, :192], kv[:, :192], kv[:, :192], q[:, :192], lse, q[:, :192],
                            scale=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="head_dim 32"):
        flash_forward_mgpu(q[..., :32], kv[..., :32], kv[..., :32], scale=1.0)
    with pytest.raises(ValueError, match="bf16, f16"):
        f = q.astype(jnp.float32)
        flash_forward_mgpu(f, kv.astype(jnp.float32), kv.astype(jnp.float32), scale=1.0)
    with pytest.raises(ValueError, match="not a multiple of 3 KV heads"):
        flash_forward_mgpu(q, kv[:, :, :1].repeat(3, 2), kv[:, :, :1].repeat(3, 2), scale=1.0)
    with pytest.raises(ValueError, match="fwd_block_kv"):
        MgpuAttentionConfig(fwd_block_kv=96)
    with pytest.raises(ValueError, match=r"bwd_registers: .*\(248, 248, 24\).* at most 504"):
        MgpuAttentionConfig(bwd_registers=(248, 24))  # beyond 3 x the 168 of the launch
    with pytest.raises(ValueError, match=r"fused_registers: .* at most 504"):
        MgpuAttentionConfig(fused_registers=(232, 256, 24))  # deadlocked on the H200
    with pytest.raises(ValueError, match="fwd_registers"):
        MgpuAttentionConfig(fwd_registers=(232, 20))  # setmaxnreg's floor is 24
    with pytest.raises(ValueError, match="launch_order must be one of"):
        MgpuAttentionConfig(launch_order="batch")
    with pytest.raises(ValueError, match=r"segment_ids \(1, 128\) int32: need integers of shape"):
        flash_forward_mgpu(q, kv, kv, scale=1.0, segment_ids=jnp.zeros((1, 128), jnp.int32))
    with pytest.raises(ValueError, match="need integers"):
        flash_forward_mgpu(q, kv, kv, scale=1.0, segment_ids=jnp.zeros((1, 256), jnp.float32))
    with pytest.raises(ValueError, match="sliding_window must be a positive integer"):
        flash_forward_mgpu(q, kv, kv, scale=1.0, sliding_window=0)
    with pytest.raises(ValueError, match="softcap must be positive"):
        flash_forward_mgpu(q, kv, kv, scale=1.0, softcap=-1.0)


def test_flash_attention_entry_point_pads_and_differentiates(rng):
    """``flash_attention(impl="mosaic")``: S = 100 is padded to 128 and sliced back, with
    packed segment ids (the padding gets a segment of its own), a window and a softcap."""
    from pallas_kernels.flash_attention import attention_reference, flash_attention

    q, k, v, do = _inputs(rng, s=100, hq=2, hkv=1)
    segment_ids = jnp.asarray(np.repeat([1, 2, 0], [30, 60, 10])[None], jnp.int32)

    def loss(impl, *x):
        out = flash_attention(
            *x, causal=True, segment_ids=segment_ids, sliding_window=40, softcap=3.0, impl=impl,
            interpret=impl == "mosaic" or None,
        )  # fmt: skip
        return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32)), out

    (_, got_out), got = jax.value_and_grad(
        lambda *x: loss("mosaic", *x), argnums=(0, 1, 2), has_aux=True
    )(q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (_, want_out), want = jax.value_and_grad(
        lambda *x: loss("reference", *x), argnums=(0, 1, 2), has_aux=True
    )(*f32)
    assert got_out.shape == q.shape
    plain = attention_reference(*f32, causal=True, segment_ids=segment_ids)
    assert _rel_err(plain, want_out) > 0.05  # the window and softcap matter
    assert _rel_err(got_out, want_out) < 1e-2
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert _rel_err(g, w) < 1.5e-2, (name, _rel_err(g, w))


def test_flash_attention_entry_point_pads_the_head_dim(rng):
    """A head dim the kernels lack (Phi-3's 96) runs zero-padded to 128: same values and
    gradients as the reference, in the caller's shapes."""
    from pallas_kernels.flash_attention import flash_attention

    q, k, v, do = _inputs(rng, s=128, hq=2, hkv=1, d=96)

    def loss(impl, *x):
        out = flash_attention(*x, causal=True, impl=impl, interpret=impl == "mosaic" or None)
        return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32)), out

    grad = lambda impl, *x: jax.value_and_grad(
        lambda *y: loss(impl, *y), argnums=(0, 1, 2), has_aux=True
    )(*x)
    (_, got_out), got = grad("mosaic", q, k, v)
    (_, want_out), want = grad("reference", *(x.astype(jnp.float32) for x in (q, k, v)))
    assert got_out.shape == q.shape and [g.shape for g in got] == [q.shape, k.shape, v.shape]
    assert _rel_err(got_out, want_out) < 1e-2
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert _rel_err(g, w) < 1.5e-2, (name, _rel_err(g, w))


def test_flash_attention_entry_point_refuses_what_it_lacks():
    from pallas_kernels.flash_attention import flash_attention

    q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="causal attention only"):
        flash_attention(q, q, q, causal=False, impl="mosaic", interpret=True)


def test_remat_policy_keeps_the_mosaic_forward_outputs():
    """Under ``jax.checkpoint``, ``save_forward_residuals`` spares the backward a second run of
    the Mosaic forward kernel (and ``nothing_saveable`` does not). Traced for the GPU (no
    lowering happens here); the interpreter's callbacks are effects remat cannot take."""
    from pallas_kernels.flash_attention import save_forward_residuals
    from pallas_kernels.flash_attention_mgpu import FORWARD_KERNEL_NAME

    q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)

    def forward_runs(policy) -> int:
        f = jax.checkpoint(
            lambda q: flash_attention_mgpu(q, q, q, 0.1).astype(float).sum(),
            policy=policy,
        )
        return str(jax.make_jaxpr(jax.grad(f))(q)).count(f"name={FORWARD_KERNEL_NAME}")

    assert forward_runs(save_forward_residuals) == 1
    assert forward_runs(jax.checkpoint_policies.nothing_saveable) == 2


@pytest.mark.parametrize(
    ("segmented", "options"),
    [(False, {}), (True, {}), (True, dict(sliding_window=100, softcap=30.0))],
    ids=["causal", "segments", "segments-window-softcap"],
)
@pytest.mark.parametrize("bwd_dq", ["kernel", "fused"])
@pytest.mark.parametrize("d", [64, 128])
def test_kernels_lower_for_hopper(d, segmented, options, bwd_dq):
    """The compiled kernels (no interpreter) lower to Mosaic GPU custom calls for ``cuda``.

    The Pallas-to-Mosaic-GPU lowering runs without a GPU, so this catches what the interpreter
    cannot: unsupported layouts or operand forms (e.g. static ref indices in wgmma operands on
    jax 0.11) and shared memory overflow. ptxas and the run itself are the GPU's.
    """
    q = jax.ShapeDtypeStruct((1, 256, 4, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 256, 2, d), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 256), jnp.int32) if segmented else None

    config = MgpuAttentionConfig(bwd_dq=bwd_dq)

    def fwd_bwd(q, k, v, seg):
        attend = lambda *x: flash_attention_mgpu(*x, d**-0.5, config, segment_ids=seg, **options)
        out, vjp = jax.vjp(attend, q, k, v)
        return vjp(out)

    text = jax.jit(fwd_bwd).trace(q, kv, kv, seg).lower(lowering_platforms=("cuda",)).as_text()
    assert "lorax_mgpu_attention_fwd" in text
    # A kernel that writes into a ref (the fused dQ buffer) may lose its name: count the calls.
    fused = bwd_dq != "kernel"
    assert text.count("stablehlo.custom_call @mosaic_gpu") == (2 if fused else 3)
    assert ("lorax_mgpu_attention_dq" in text) != fused
    assert fused or "lorax_mgpu_attention_dkdv" in text


def test_default_fuses_dq_for_long_plain_attention():
    """``bwd_dq="auto"`` (the default): the fused backward where it was timed faster (plain
    causal attention, head dim 128, from ``_FUSED_MIN_SEQ_LEN`` tokens), the two kernels
    elsewhere (short rows, a window, the softcap, packed rows, head dim 64); a forced design
    is kept. The compiled graph shows the choice."""
    from pallas_kernels.flash_attention import flash_attention

    long = mgpu._FUSED_MIN_SEQ_LEN
    auto = MgpuAttentionConfig()
    shape = lambda s, d=128: (1, s, 32, d)
    plain = mgpu._Scores(0.1)
    assert mgpu._bwd_dq(auto, shape(long // 2), plain, False) == "kernel"
    assert mgpu._bwd_dq(auto, shape(long), plain, False) == "fused"
    assert mgpu._bwd_dq(auto, shape(long), plain, True) == "kernel"  # packed rows
    assert mgpu._bwd_dq(auto, shape(long, d=64), plain, False) == "kernel"
    for options in (dict(window=long), dict(softcap=30.0)):
        assert mgpu._bwd_dq(auto, shape(4 * long), mgpu._Scores(0.1, **options), False) == "kernel"
    forced = MgpuAttentionConfig(bwd_dq="kernel"), MgpuAttentionConfig(bwd_dq="fused")
    assert mgpu._bwd_dq(forced[0], shape(4 * long), plain, False) == "kernel"
    assert mgpu._bwd_dq(forced[1], shape(256, d=64), plain, True) == "fused"

    def kernel_calls(s, config=None):  # through the public entry point, compiled
        q = jax.ShapeDtypeStruct((1, s, 4, 128), jnp.bfloat16)
        kv = jax.ShapeDtypeStruct((1, s, 2, 128), jnp.bfloat16)
        attend = functools.partial(
            flash_attention, impl="mosaic", interpret=False, mosaic_config=config
        )

        def fwd_bwd(q, k, v):
            out, vjp = jax.vjp(attend, q, k, v)
            return vjp(out)

        text = jax.jit(fwd_bwd).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
        return text.count("stablehlo.custom_call @mosaic_gpu")

    assert kernel_calls(long // 2) == 3  # forward, dK/dV, dQ
    assert kernel_calls(long) == 2  # forward, fused backward
    assert kernel_calls(long, forced[0]) == 3


def test_model_takes_mosaic_for_packed_rows_on_hopper(monkeypatch):
    """The model's default attention on a (stand-in) GPU: cuDNN without segment ids or softcap,
    the Mosaic kernels for packed rows or a softcap on Hopper, the Triton kernels where Mosaic
    cannot go."""
    from lorax.model import _attention_impl

    class Device:
        platform, compute_capability = "gpu", "9.0"

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda: [Device()])
    q = jax.ShapeDtypeStruct((1, 256, 4, 128), jnp.bfloat16)
    seg = jnp.ones((1, 256), jnp.int32)
    assert _attention_impl(None, None, q, None) == "cudnn"
    assert _attention_impl(None, seg, q, None) == "mosaic"
    assert _attention_impl(None, seg, q, 256) == "mosaic"  # the window covers the row
    assert _attention_impl(None, seg, q, 64) == "mosaic"  # a narrower window
    assert _attention_impl("pallas", seg, q, None) == "pallas"  # a request stands
    assert _attention_impl(None, seg, jax.ShapeDtypeStruct((1, 256, 4, 96), q.dtype), None) == (
        "mosaic"
    )  # padded to 128
    assert _attention_impl(None, seg, jax.ShapeDtypeStruct((1, 256, 4, 256), q.dtype), None) is None
    # A softcap (Gemma 2) is beyond cuDNN: the Mosaic kernels, or Triton's at head dim 256.
    assert _attention_impl(None, None, q, 64, softcap=50.0) == "mosaic"
    gemma = jax.ShapeDtypeStruct((1, 256, 4, 256), q.dtype)
    assert _attention_impl(None, None, gemma, 64, softcap=50.0) is None
    assert _attention_impl(None, None, gemma, 64) == "cudnn"  # Gemma 3: no softcap
    Device.compute_capability = "8.0"  # no wgmma before Hopper
    assert _attention_impl(None, seg, q, None) is None
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert _attention_impl(None, seg, q, None) is None  # the reference
