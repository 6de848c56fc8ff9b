"""nf4_lora_matmul: Pallas kernels (interpret mode) and the custom VJP vs the jnp reference.

Every case draws fresh random inputs from the ``rng`` fixture (seed printed on failure). Tiles
are shrunk (``SMALL``) so that even these small shapes span several grid steps with ragged
M/N edges, exercising the grouped launch order, the K/N loops and the padding paths.

Tolerances: float32 cases must match the reference to ~1e-5 of the output's scale (only the
summation order differs). bfloat16 cases round W, the rank-r intermediates and the result to
bf16 (eps 2^-8 ≈ 3.9e-3) and may sum in another order, so they are checked at 2e-2 of the
output's scale for values and 4e-2 for gradients (the reference differentiates through
float32 intermediates where the op rounds ``dy·B`` to bf16).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _backend
from pallas_kernels.nf4 import NF4_CODE, NF4Tensor, dequantize_nf4, quantize_nf4, stack
from pallas_kernels.nf4_matmul import (
    NF4MatmulConfig,
    nf4_dequantize,
    nf4_lora_matmul,
    nf4_lora_matmul_group,
    nf4_lora_matmul_reference,
    plan_nf4_lora_matmul,
)
from pallas_kernels.nf4_matmul_kernels import nf4_lookup
from pallas_kernels.nf4_matmul_mgpu import prepare_weight, stack_prepared

SMALL = NF4MatmulConfig(
    block_m=16,
    block_n=32,
    block_k=64,
    group_m=2,
    bwd_block_m=16,
    bwd_block_n=16,
    bwd_block_k=64,
    dequant_rows=16,
)
OPTIONS = {"": {}, "table": dict(lookup="table"), "dq-in-kernel": dict(absmax_decode="kernel")}
TOL = {
    jnp.float32: (2e-5, 2e-5),
    jnp.bfloat16: (2e-2, 4e-2),
    jnp.float16: (4e-3, 8e-3),
}  # (y, grads)


def _rel(a, b) -> float:
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _case(rng, lead, n, k, r, dtype, weight="nf4_dq", bias=False):
    """Random x [*lead, k], W [n, k] (NF4 double-quantized, NF4, or dense), LoRA A, B, bias."""
    x = jnp.asarray(rng.standard_normal((*lead, k)), dtype)
    w_dense = (0.05 * rng.standard_normal((n, k))).astype(np.float32)
    if weight == "dense":
        w = jnp.asarray(w_dense, dtype)
    else:
        w = quantize_nf4(jnp.asarray(w_dense), blocksize=64, double_quant=weight == "nf4_dq")
    a = b = None
    if r:
        # B is zero at PEFT init; use random B so the LoRA term and dA are non-trivial.
        a = jnp.asarray(0.1 * rng.standard_normal((r, k)), jnp.float32)
        b = jnp.asarray(0.1 * rng.standard_normal((n, r)), jnp.float32)
    bias_arr = jnp.asarray(rng.standard_normal(n), jnp.float32) if bias else None
    return x, w, a, b, bias_arr


def _value_and_grads(fn, x, w, a, b, bias, scale, dy):
    """y and the VJP of the sampled cotangent dy w.r.t. (x, a, b), in one jit."""

    def run(x, a, b):
        y, vjp = jax.vjp(lambda x, a, b: fn(x, w, a, b, scale, bias=bias), x, a, b)
        return y, vjp(dy)

    return jax.jit(run)(x, a, b)


def _check(rng, lead, n, k, r, dtype, weight, variant, bias=False, scale=0.75):
    x, w, a, b, bias_arr = _case(rng, lead, n, k, r, dtype, weight, bias)
    dy = jnp.asarray(rng.standard_normal((*lead, n)), dtype)
    if variant == "reference":
        kw = dict(impl="reference")
    elif variant == "dense":
        kw = dict(interpret=True, config=SMALL)
    else:
        variant, _, option = variant.partition("/")
        cfg = dataclasses.replace(SMALL, variant=variant, **OPTIONS[option])
        kw = dict(interpret=True, config=cfg)
    assert plan_nf4_lora_matmul(x, w, **kw).variant == variant

    def op(*args, **kws):
        return nf4_lora_matmul(*args, **kws, **kw)

    y, grads = _value_and_grads(op, x, w, a, b, bias_arr, scale, dy)
    y_ref, grads_ref = _value_and_grads(nf4_lora_matmul_reference, x, w, a, b, bias_arr, scale, dy)
    assert y.shape == (*lead, n) and y.dtype == dtype
    tol_y, tol_g = TOL[dtype]
    assert _rel(y, y_ref) < tol_y, "forward"
    for name, g, g_ref in zip(("dx", "dA", "dB"), grads, grads_ref, strict=True):
        if g_ref is None:
            assert g is None, name
            continue
        assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, name
        assert _rel(g, g_ref) < tol_g, name


# Each case is one fwd+bwd compile of the kernels in interpret mode (seconds on a small CPU), so
# the matrix is covered diagonally rather than as a full product: every variant sees both
# dtypes, both NF4 flavours, LoRA on and off, bias, leading dims and ragged M/N (and K for the
# dequant kernel, whose flat layout takes any K). "variant/option": see OPTIONS.
CASES = [
    # variant, lead, N, K, r, dtype, weight, bias
    ("fused", (3, 11), 200, 192, 8, jnp.float32, "nf4_dq", False),
    ("fused/table", (2, 9), 96, 256, 4, jnp.bfloat16, "nf4", True),
    ("fused", (45,), 80, 128, 0, jnp.float32, "nf4_dq", True),
    ("dequant_then_dot/dq-in-kernel", (3, 11), 200, 192, 8, jnp.bfloat16, "nf4_dq", False),
    ("dequant_then_dot/table", (9,), 50, 100, 0, jnp.float32, "nf4", True),
    ("dense", (5, 7), 72, 48, 6, jnp.bfloat16, "dense", True),
    ("dense", (5, 7), 72, 48, 6, jnp.float32, "dense", False),
    # The Mosaic GPU kernels (Mosaic GPU interpreter): x·Wᵀ forward, dy·W backward.
    ("mosaic", (3, 45), 200, 192, 8, jnp.bfloat16, "nf4_dq", True),
    ("mosaic", (70,), 96, 128, 0, jnp.float16, "nf4", False),
    ("reference", (13,), 40, 96, 8, jnp.float32, "nf4_dq", True),
    ("reference", (13,), 40, 96, 8, jnp.bfloat16, "dense", False),
]


@pytest.mark.parametrize(
    "variant, lead, n, k, r, dtype, weight, bias",
    CASES,
    ids=[f"{c[0]}-{c[6]}-{jnp.dtype(c[5]).name}-r{c[4]}{'-bias' if c[7] else ''}" for c in CASES],
)
def test_matches_reference(rng, variant, lead, n, k, r, dtype, weight, bias):
    _check(rng, lead, n, k, r, dtype, weight, variant, bias=bias)


def test_k_not_multiple_of_64_is_routed_or_rejected(rng):
    """K = 100: absmax blocks straddle rows of W, so "auto" with the fused kernel opted in
    (``fused_max_m``) picks dequant instead, and "fused" raises."""
    x, w, a, b, _ = _case(rng, (9,), 50, 100, 4, jnp.float32)
    opted_in = dataclasses.replace(SMALL, fused_max_m=256)
    plan = plan_nf4_lora_matmul(x, w, interpret=True, config=opted_in)
    assert plan.variant == "dequant_then_dot" and "K % 64" in plan.reason
    fused = dataclasses.replace(SMALL, variant="fused")
    with pytest.raises(ValueError, match=r"\[N, K\] = \[50, 100\]"):
        nf4_lora_matmul(x, w, a, b, 1.0, interpret=True, config=fused)


def test_single_row_default_tiles(rng):
    """M = 1 (decode) with the default, large tiles: rows pad up to the 16-row minimum."""
    x, w, a, b, _ = _case(rng, (1,), 64, 128, 16, jnp.float32)
    cfg = NF4MatmulConfig(variant="fused")
    y = jax.jit(lambda x: nf4_lora_matmul(x, w, a, b, 2.0, interpret=True, config=cfg))(x)
    assert _rel(y, jax.jit(nf4_lora_matmul_reference)(x, w, a, b, 2.0)) < 2e-5


def test_dequantize_kernel_is_bit_exact(rng):
    """The decode kernel equals dequantize_nf4 bit for bit (numel % 64 != 0, stacked too).

    Decoding double quantization in the kernel computes ``code * nested + offset`` where the
    compiler may contract it into one FMA (XLA:CPU does here; so may XLA:GPU in the
    reference, see pallas_kernels.nf4), so that case is allowed one float32 ulp in the scale.
    """
    w_dq = quantize_nf4(jnp.asarray(rng.standard_normal((40, 192)), jnp.float32))
    w_odd = quantize_nf4(jnp.asarray(rng.standard_normal((7, 90)), jnp.float32), double_quant=False)
    w_stacked = stack([w_dq, w_dq])  # [2, ...]: decoded in one launch
    in_kernel = dataclasses.replace(SMALL, absmax_decode="kernel", lookup="table")

    def cases(fn):
        return (
            fn(w_dq, jnp.bfloat16, SMALL),
            fn(w_odd, jnp.float32, SMALL),
            fn(w_stacked, jnp.bfloat16, SMALL),
            fn(w_dq, jnp.float32, in_kernel),
        )

    got = jax.jit(lambda: cases(lambda w, d, c: nf4_dequantize(w, d, interpret=True, config=c)))()
    want = jax.jit(lambda: cases(lambda w, d, c: dequantize_nf4(w, d)))()
    for g, e in zip(got, want, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
    for g, e in zip(got[:3], want[:3], strict=True):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(e, np.float32))
    np.testing.assert_allclose(np.asarray(got[3]), np.asarray(want[3]), rtol=2.5e-7, atol=0)


def test_select_tree_lookup_is_exact():
    codes = jnp.arange(16, dtype=jnp.uint8).reshape(2, 8)
    np.testing.assert_array_equal(
        np.asarray(nf4_lookup(codes)).reshape(-1), np.asarray(NF4_CODE, np.float32)
    )


@pytest.mark.parametrize("weight", ["nf4_dq", "dense"])
def test_weight_gets_zero_cotangent(rng, weight):
    """W is frozen: the custom VJP (shared by all variants; the cheap one here) returns zeros."""
    x, w, a, b, _ = _case(rng, (6,), 32, 64, 4, jnp.float32, weight)
    dy = jnp.asarray(rng.standard_normal((6, 32)), jnp.float32)
    op = lambda w: nf4_lora_matmul(x, w, a, b, 1.0, impl="reference")
    (dw,) = jax.jit(lambda w, dy: jax.vjp(op, w)[1](dy))(w, dy)
    for leaf in jax.tree.leaves(dw):
        if leaf.dtype != jax.dtypes.float0:
            assert not np.any(np.asarray(leaf)), "W must get a zero cotangent"


def test_jit_scan_over_stacked_layers(rng):
    """The model's use: a scanned stack of NF4 layers, jitted, differentiated w.r.t. LoRA.

    Through the op's custom VJP with the reference variant (the kernels are covered above;
    slicing the stacked NF4Tensor and the VJP plumbing are the same for every variant).
    """
    layers = [_case(rng, (4, 8), 64, 64, 4, jnp.float32) for _ in range(2)]
    x = layers[0][0]
    w = stack([c[1] for c in layers])
    a = jnp.stack([c[2] for c in layers])
    b = jnp.stack([c[3] for c in layers])
    assert isinstance(w, NF4Tensor) and w.packed.ndim == 2

    def loss(fn, a, b, **kw):
        def body(h, layer):
            wl, al, bl = layer
            return jnp.tanh(fn(h, wl, al, bl, 0.5, **kw)), None

        h, _ = jax.lax.scan(body, x, (w, a, b))
        return jnp.sum(h**2)

    got = jax.jit(jax.value_and_grad(
        lambda a, b: loss(nf4_lora_matmul, a, b, impl="reference"), argnums=(0, 1)
    ))(a, b)  # fmt: skip
    want = jax.jit(
        jax.value_and_grad(lambda a, b: loss(nf4_lora_matmul_reference, a, b), argnums=(0, 1))
    )(a, b)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert _rel(g, r) < 1e-4


def test_zero_rows(rng):
    x, w, a, b, _ = _case(rng, (0,), 32, 64, 4, jnp.float32)
    assert nf4_lora_matmul(x, w, a, b, 1.0, interpret=True).shape == (0, 32)


# ------------------------------------------------------------------------------------------
# Groups of projections sharing x (q/k/v, gate/up)
# ------------------------------------------------------------------------------------------


def _group_case(rng, lead, k, members, dtype, weight="nf4_dq"):
    """Per member ``(n, r, bias)``: weights, adapters ((A, B) or None), biases and cotangents."""
    x = jnp.asarray(rng.standard_normal((*lead, k)), dtype)
    ws, adapters, biases, dys = [], [], [], []
    for n, r, bias in members:
        _, w, a, b, bias_arr = _case(rng, lead, n, k, r, dtype, weight, bias)
        ws.append(w)
        adapters.append(None if a is None else (a, b))
        biases.append(bias_arr)
        dys.append(jnp.asarray(rng.standard_normal((*lead, n)), dtype))
    return x, ws, adapters, biases, tuple(dys)


def _group_vjp(fn, x, adapters, dys):
    def run(x, adapters):
        ys, vjp = jax.vjp(fn, x, adapters)
        return ys, vjp(dys)

    return jax.jit(run)(x, adapters)


def _assert_group_matches(dtype, got, want) -> None:
    """Values, dx and every member's dA/dB of a group's ``(ys, (dx, adapter grads))`` against
    the member-by-member reference's."""
    (ys, (dx, dad)), (ys_ref, (dx_ref, dad_ref)) = got, want
    tol_y, tol_g = TOL[dtype]
    for y, y_ref in zip(ys, ys_ref, strict=True):
        assert y.shape == y_ref.shape and y.dtype == dtype
        assert _rel(y, y_ref) < tol_y
    assert _rel(dx, dx_ref) < tol_g, "dx"
    for i, (g, g_ref) in enumerate(zip(dad, dad_ref, strict=True)):
        if g_ref is None:
            assert g is None, i
            continue
        for name, gi, ri in zip(("dA", "dB"), g, g_ref, strict=True):
            assert gi.dtype == ri.dtype and _rel(gi, ri) < tol_g, f"member {i} {name}"


GROUPS = [
    # lead, K, members (N, r, bias), dtype
    ((3, 5), 128, [(64, 8, False), (32, 0, True), (32, 4, False)], jnp.float32),
    ((7,), 192, [(96, 16, False), (96, 16, False)], jnp.bfloat16),
    ((9,), 64, [(40, 4, True)], jnp.bfloat16),
]


@pytest.mark.parametrize("lead, k, members, dtype", GROUPS, ids=["qkv", "gate-up", "one"])
def test_group_matches_members(rng, lead, k, members, dtype):
    """The grouped op equals the reference projection by projection, values and gradients
    (x: one folded GEMM summing every member's dx and LoRA term; A, B per member)."""
    x, ws, adapters, biases, dys = _group_case(rng, lead, k, members, dtype)
    scale = 0.75

    def grouped(x, adapters):
        return nf4_lora_matmul_group(x, ws, adapters, scale, biases=biases, impl="reference")

    def reference(x, adapters):
        return tuple(
            nf4_lora_matmul_reference(x, w, *(ab or (None, None)), scale, bias=bias)
            for w, ab, bias in zip(ws, adapters, biases, strict=True)
        )

    got, want = (_group_vjp(fn, x, adapters, dys) for fn in (grouped, reference))
    _assert_group_matches(dtype, got, want)


def test_mosaic_group_matches_members(rng):
    """On the Mosaic GPU kernel (interpreter) the group is one kernel call per direction, the
    LoRA terms in its reduction: values and gradients match the reference member by member,
    from weights stacked once in the quad layout; NF4Tensors, stacked on every call, give the
    same outputs bit for bit."""
    members = [(96, 16, False), (40, 0, True), (136, 8, False)]
    x, ws, adapters, biases, dys = _group_case(rng, (2, 35), 192, members, jnp.bfloat16)
    weights = stack_prepared([prepare_weight(w) for w in ws])
    config = dataclasses.replace(SMALL, variant="mosaic")

    def grouped(x, adapters, weights=weights):
        return nf4_lora_matmul_group(
            x, weights, adapters, 0.75, biases=biases, interpret=True, config=config
        )

    def reference(x, adapters):
        return tuple(
            nf4_lora_matmul_reference(x, w, *(ab or (None, None)), 0.75, bias=bias)
            for w, ab, bias in zip(ws, adapters, biases, strict=True)
        )

    got, want = (_group_vjp(fn, x, adapters, dys) for fn in (grouped, reference))
    _assert_group_matches(jnp.bfloat16, got, want)
    ys_ref = want[0]
    for y, y_nf4 in zip(got[0], jax.jit(grouped)(x, adapters, ws), strict=True):
        np.testing.assert_array_equal(y, y_nf4)
    # The CPU reference path takes the prepared stack too.
    ys_cpu = nf4_lora_matmul_group(x, weights, adapters, 0.75, biases=biases, impl="reference")
    for y, y_ref in zip(ys_cpu, ys_ref, strict=True):
        assert _rel(y, y_ref) < TOL[jnp.bfloat16][0]
    with pytest.raises(ValueError, match="stacks 3 members; got 2 adapters"):
        nf4_lora_matmul_group(x, weights, adapters[:2], 0.75, impl="reference")


def _dot_output_shapes(jaxpr) -> list[tuple[int, ...]]:
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            shapes.extend(_dot_output_shapes(sub))
    return shapes


def test_group_is_one_gemm_per_direction(rng):
    """What the group is for: x·Wᵀ for all members is one dot, and dx is one dot (the LoRA
    terms folded in), where member-by-member calls would take 3 base dots and 6 for dx."""
    m, k = 12, 192  # sum of N = 128: the base product [m, 128], dx [m, 192]
    x, ws, adapters, _, dys = _group_case(
        rng, (m,), k, [(64, 8, False), (32, 8, False), (32, 8, False)], jnp.float32
    )

    def grouped(x, adapters):
        return nf4_lora_matmul_group(x, ws, adapters, 1.0, impl="reference")

    def members(x, adapters):
        return tuple(
            nf4_lora_matmul(x, w, *ab, 1.0, impl="reference")
            for w, ab in zip(ws, adapters, strict=True)
        )

    def dx_dots(fn):
        jaxpr = jax.make_jaxpr(lambda x, ad: jax.vjp(fn, x, ad)[1](dys))(x, adapters).jaxpr
        return _dot_output_shapes(jaxpr).count((m, k))

    assert dx_dots(grouped) == 1
    assert dx_dots(members) == 3  # each member's own (LoRA-folded) dx GEMM
    fwd = _dot_output_shapes(jax.make_jaxpr(grouped)(x, adapters).jaxpr)
    assert fwd.count((m, 128)) == 1  # [y_q | y_k | y_v] in one dot
    assert fwd.count((m, 24)) == 1  # x·[A_q; A_k; A_v]ᵀ in one dot
    assert len(fwd) == 5  # K > ΣN: each member's LoRA up-projection is its own dot
    # K <= ΣN: the up-projections ride in the base dot ([x | s·xA]·[W | B]ᵀ).
    x, ws, adapters, _, dys = _group_case(
        rng, (m,), 96, [(64, 8, False), (32, 8, False), (32, 8, False)], jnp.float32
    )
    assert sorted(_dot_output_shapes(jax.make_jaxpr(grouped)(x, adapters).jaxpr)) == [
        (m, 24),
        (m, 128),
    ]


def test_group_falls_back_member_by_member(rng):
    """Dense weights (a concatenation would copy them) and the Pallas variants run each
    member through nf4_lora_matmul, with identical results."""
    for weight, kw in (
        ("dense", dict(impl="reference")),
        ("nf4_dq", dict(interpret=True, config=dataclasses.replace(SMALL, variant="fused"))),
    ):
        x, ws, adapters, biases, _ = _group_case(
            rng, (5,), 128, [(32, 4, True), (64, 0, False)], jnp.float32, weight
        )
        ys = nf4_lora_matmul_group(x, ws, adapters, 0.5, biases=biases, **kw)
        for y, w, ab, bias in zip(ys, ws, adapters, biases, strict=True):
            want = nf4_lora_matmul(x, w, *(ab or (None, None)), 0.5, bias=bias, **kw)
            np.testing.assert_array_equal(np.asarray(y), np.asarray(want))


def test_group_argument_errors(rng):
    x, ws, adapters, biases, _ = _group_case(rng, (4,), 64, [(32, 4, False)], jnp.float32)
    with pytest.raises(ValueError, match="at least one weight"):
        nf4_lora_matmul_group(x, [], [], 1.0)
    with pytest.raises(ValueError, match="must pair up"):
        nf4_lora_matmul_group(x, ws, adapters + [None], 1.0)
    with pytest.raises(ValueError, match="must end in K=64"):
        nf4_lora_matmul_group(x[:, :32], ws, adapters, 1.0)
    assert nf4_lora_matmul_group(x[:0], ws, adapters, 1.0)[0].shape == (0, 32)


# ------------------------------------------------------------------------------------------
# Selection and errors
# ------------------------------------------------------------------------------------------


def test_selection(rng):
    x, w, a, b, _ = _case(rng, (8,), 32, 64, 4, jnp.float32)
    dense = jnp.zeros((32, 64))
    assert jax.default_backend() == "cpu"
    plan = plan_nf4_lora_matmul(x, w)
    assert (plan.variant, plan.interpret) == ("reference", False) and "cpu" in plan.reason
    assert plan_nf4_lora_matmul(x, w, impl="pallas").interpret is True
    assert plan_nf4_lora_matmul(x, w, impl="reference").variant == "reference"
    compiled = plan_nf4_lora_matmul(x, w, interpret=False)
    assert (compiled.variant, compiled.interpret) == ("xla", False)  # every M by default
    small_fused = NF4MatmulConfig(fused_max_m=8)  # opt in: M <= 8 takes the fused kernel
    assert plan_nf4_lora_matmul(x, w, interpret=False, config=small_fused).variant == "fused"
    assert plan_nf4_lora_matmul(x, w, interpret=False, config=NF4MatmulConfig(fused_max_m=7)
                                ).variant == "xla"  # fmt: skip
    big_m = jax.ShapeDtypeStruct((4, 4096, 64), jnp.bfloat16)
    assert plan_nf4_lora_matmul(big_m, w, interpret=True).variant == "xla"
    assert plan_nf4_lora_matmul(x, dense, interpret=True).variant == "dense"
    forced = NF4MatmulConfig(variant="dequant_then_dot")
    assert plan_nf4_lora_matmul(x, w, interpret=True, config=forced).variant == "dequant_then_dot"
    for variant in ("xla", "mosaic"):  # "auto" never picks mosaic: asked for by name only
        forced = NF4MatmulConfig(variant=variant)
        x16 = x.astype(jnp.bfloat16)
        assert plan_nf4_lora_matmul(x16, w, interpret=True, config=forced).variant == variant
    mosaic = NF4MatmulConfig(variant="mosaic")
    with pytest.raises(ValueError, match="bf16 or f16"):
        plan_nf4_lora_matmul(x, w, interpret=True, config=mosaic)
    w_k96 = quantize_nf4(jnp.asarray(rng.standard_normal((32, 96)), jnp.float32), blocksize=64)
    with pytest.raises(ValueError, match="K % 64"):
        plan_nf4_lora_matmul(jnp.zeros((8, 96), jnp.bfloat16), w_k96, interpret=True, config=mosaic)
    with pytest.raises(ValueError, match="variant must be one of"):
        NF4MatmulConfig(variant="cublas")
    # Other blocksizes: reference by default, an error when a kernel is forced.
    w128 = quantize_nf4(jnp.asarray(rng.standard_normal((32, 128)), jnp.float32), blocksize=128)
    x128 = jnp.zeros((8, 128))
    assert plan_nf4_lora_matmul(x128, w128, impl=None).variant == "reference"
    with pytest.raises(ValueError, match="blocksize 128"):
        plan_nf4_lora_matmul(x128, w128, interpret=True)


def test_backend_choose_table():
    on = jax.default_backend()
    assert _backend.choose(None, None) == _backend.KernelChoice(
        False, False, f"default on {on}: reference"
    )
    assert _backend.choose(None, True).use_kernel and _backend.choose(None, True).interpret
    assert _backend.choose("pallas", False) == _backend.KernelChoice(
        True, False, "interpret=False (compiled kernel requested)"
    )
    with pytest.raises(ValueError, match="impl must be"):
        _backend.choose("triton", None)
    with pytest.raises(ValueError, match="meaningless"):
        _backend.choose("reference", True)
    assert _backend.triton_available()
    params = _backend.triton_compiler_params(num_warps=4, num_stages=2)
    assert (params.num_warps, params.num_stages) == (4, 2)


def test_argument_errors(rng):
    x, w, a, b, _ = _case(rng, (8,), 32, 64, 4, jnp.float32)
    with pytest.raises(ValueError, match="both LoRA factors"):
        nf4_lora_matmul(x, w, a, None, 1.0)
    with pytest.raises(ValueError, match="must end in K=64"):
        nf4_lora_matmul(x[:, :32], w, a, b, 1.0)
    with pytest.raises(ValueError, match="b must be"):
        nf4_lora_matmul(x, w, a, b.T, 1.0)
    with pytest.raises(ValueError, match="bias must be"):
        nf4_lora_matmul(x, w, a, b, 1.0, bias=jnp.zeros(31))
    stacked = stack([w, w])
    with pytest.raises(ValueError, match="Index the stacked layer axis"):
        nf4_lora_matmul(x, stacked, a, b, 1.0)
    with pytest.raises(ValueError, match="variant must be"):
        NF4MatmulConfig(variant="fast")
    with pytest.raises(ValueError, match="power of two"):
        NF4MatmulConfig(block_k=96)
    with pytest.raises(ValueError, match="lookup must be"):
        NF4MatmulConfig(lookup="gather")
    with pytest.raises(ValueError, match="absmax_decode must be"):
        NF4MatmulConfig(absmax_decode="xla")


def test_kernels_lower_to_triton(rng):
    """Both variants, forward and backward, go through the Pallas Triton lowering for CUDA.

    Cross-platform export runs Pallas' Triton lowering on this CPU machine (no GPU needed),
    catching unsupported primitives and non-power-of-two tile shapes before GPU time is spent.
    The Triton → PTX compile itself happens on the GPU.
    """
    x, w, a, b, bias = _case(rng, (256,), 384, 512, 16, jnp.bfloat16, bias=True)
    target = _backend.triton_custom_call_target()
    for variant, lookup in (("fused", "select"), ("dequant_then_dot", "table")):
        cfg = NF4MatmulConfig(variant=variant, lookup=lookup)

        def fwd_bwd(x, a, b, cfg=cfg):
            y, vjp = jax.vjp(
                lambda x, a, b: nf4_lora_matmul(
                    x, w, a, b, 2.0, bias=bias, interpret=False, config=cfg
                ),
                x, a, b,
            )  # fmt: skip
            return y, vjp(y)

        try:
            exported = jax.export.export(
                jax.jit(fwd_bwd),
                platforms=["cuda"],
                disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)],
            )(x, a, b)
        except ImportError as e:  # a jaxlib without the Triton bindings
            pytest.skip(f"cannot lower Pallas Triton kernels here: {e}")
        except RuntimeError as e:  # newer jax lowers Triton only with a (possibly abstract) GPU
            if "GPU" not in str(e):
                raise
            pytest.skip(f"this jax lowers Pallas Triton kernels only with a GPU: {e}")
        assert exported.mlir_module().count(target) == 2, variant
