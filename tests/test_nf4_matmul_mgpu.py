"""The quad-layout NF4 matmul (``pallas_kernels.nf4_matmul_mgpu``): its layout, its register-level
addressing (simulated on the CPU), and both orientations in the Mosaic GPU interpreter.

What runs where. The interpreter has no ``ldmatrix``, inline PTX or register layouts, so the
kernel's interpreter branch decodes each ring slot in jnp; it checks the ring, the tile
indexing of both orientations, padding, the epilogue and the refusals. What the GPU does in
registers is checked by ``test_register_level_simulation``: ``ldmatrix`` (plain and ``.trans``)
simulated over the kernel's own address function, the scale loads over its own offsets, and
the decode PTX run by the emulator in ``ptx_emulation``, must give every thread's operand
registers bit for bit. ``test_lowers_for_hopper`` lowers the compiled kernel for ``cuda``;
ptxas and the run itself are left to ``scripts/check_nf4_matmul_mgpu.py`` on the GPU.

What the interpreter tests cost: one compiled program per warpgroup and CTA (about a second
each), so their shapes take the fewest token tiles that keep each case's tile story (several
token tiles where the token index matters: ``fill-sms``, ``persistent``, ``grouped-order``
and the low-rank term's second case), and the persistent cases run many tiles on two CTAs
(``max_ctas``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_l2
from jax.experimental.pallas import mosaic_gpu as plgpu
from ptx_emulation import run_ptx

from pallas_kernels import nf4_matmul_mgpu as nf4_mgpu
from pallas_kernels.nf4 import NF4_CODE, NF4Tensor, dequantize_absmax, dequantize_nf4, quantize_nf4
from pallas_kernels.nf4_matmul_mgpu import (
    SLOTS,
    MgpuNF4Config,
    MgpuNF4Weight,
    _prmt_emulated,
    _quad_asm,
    _quad_row_offset,
    _scale_offset,
    _slot_targets,
    _split,
    _tile_values,
    dequantize_prepared,
    nf4_matmul_mgpu,
    nf4_matmul_t_mgpu,
    prepare_weight,
    stack_prepared,
    stacked_member,
)

interpret_params = pytest.importorskip(
    "jax._src.pallas.mosaic_gpu.interpret.params",
    reason="this jax has no Mosaic GPU interpreter (the kernel then needs a GPU to run)",
)


def _weight(rng, n, k, double_quant=True):
    w = jnp.asarray(rng.standard_normal((n, k)) * 0.05, jnp.bfloat16)
    return quantize_nf4(w, double_quant=double_quant)


def _codes(w: NF4Tensor) -> np.ndarray:
    packed = np.asarray(w.packed)
    return np.stack([packed >> 4, packed & 0xF], axis=-1).reshape(w.shape).astype(np.int64)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_layout(rng, dtype):
    """Quad (a, b) of block (nb, kb) holds codes W[a + 8·hn, b + 8·hk] in slot hn + 2·hk at the
    documented (swizzled) position; the scale words hold the split absmax of row pairs; the
    decoded weights are the Mosaic decode's (within one ulp of dequantize_nf4) and the padding
    decodes to zero."""
    n, k = 130, 320
    w = _weight(rng, n, k)
    p = prepare_weight(w, dtype)
    assert p.quads.shape == (128, 192) and p.quads.dtype == jnp.uint16
    assert p.scales.shape == (6, 16, 16) and p.scales.dtype == jnp.uint32
    assert p.dtype == jnp.dtype(dtype).name and p.shape == (n, k)
    quads, codes = np.asarray(p.quads), _codes(w)
    for nb, kb, a, b in [(0, 0, 0, 0), (3, 5, 7, 2), (8, 19, 1, 6), (2, 9, 5, 3)]:
        col = 8 * (kb - kb % 8) + 8 * ((kb % 8) ^ a) + b
        word = int(quads[8 * nb + a, col])
        for s, (hn, hk) in enumerate(SLOTS):
            r, c = 16 * nb + a + 8 * hn, 16 * kb + b + 8 * hk
            want = codes[r, c] if r < n and c < k else 7
            assert (word >> (4 * s)) & 0xF == want, (nb, kb, a, b, s)
    absmax = np.asarray(dequantize_absmax(w)).reshape(n, k // 64)
    hi, lo = (np.asarray(v).view(np.uint16) for v in _split(jnp.asarray(absmax), dtype))
    words = np.asarray(p.scales)
    for blk, row in [(0, 0), (4, 37), (2, 129), (1, 66)]:
        nb, rem = divmod(row, 16)
        h, rem = divmod(rem, 8)
        q, e = divmod(rem, 2)
        for part, want in ((0, hi), (1, lo)):
            got = (int(words[blk, nb, 4 * q + 2 * h + part]) >> (16 * e)) & 0xFFFF
            assert got == want[row, blk], (blk, row, part)
    values = np.asarray(dequantize_prepared(p).astype(jnp.float32))
    s_hi, s_lo = (jnp.repeat(v, 64, axis=1) for v in _split(jnp.asarray(absmax), dtype))
    want = np.asarray(_prmt_emulated(jnp.asarray(codes), s_hi, s_lo, dtype).astype(jnp.float32))
    np.testing.assert_array_equal(values, want)
    exact = np.asarray(dequantize_nf4(w, dtype).astype(jnp.float32))
    bits = 7 if dtype == jnp.bfloat16 else 10
    ulp = np.exp2(np.floor(np.log2(np.maximum(np.abs(exact), np.abs(values)) + 1e-30)) - bits)
    assert np.all(np.abs(values - exact) <= ulp)
    full = _tile_values(p.quads[64:128, 128:192], p.scales[4:6, 8:16], dtype)  # the padding
    assert np.all(np.asarray(full)[2:, :] == 0) and np.all(np.asarray(full)[:, 64:] == 0)


def _ldmatrix(tile: np.ndarray, offsets: np.ndarray, trans: bool) -> np.ndarray:
    """``ldmatrix.sync.aligned.m8n8.x4[.trans].b16`` for every warp in ``offsets [warps, 32]``
    (byte offsets of the rows lanes give) on a uint16 tile: ``[warps, 32 lanes, 4]`` uint32."""
    flat = tile.reshape(-1).astype(np.uint32)
    rows = flat[(offsets // 2)[..., None] + np.arange(8)]  # [warps, lane, 8]: row lane % 8 of
    mats = rows.reshape(rows.shape[0], 4, 8, 8)  # matrix lane // 8: [warps, matrix, row, col]
    lane = np.arange(32)
    r, c = lane // 4, 2 * (lane % 4)
    if trans:
        lo, hi = mats[:, :, c, r], mats[:, :, c + 1, r]
    else:
        lo, hi = mats[:, :, r, c], mats[:, :, r, c + 1]
    return (lo | (hi << 16)).transpose(0, 2, 1)  # [warps, lane, matrix]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_register_level_simulation(rng, backward, dtype):
    """Every thread's operand registers, built as the GPU builds them (module docstring), are
    the operand of the interpreter branch bit for bit: ``ldmatrix`` over
    ``_quad_row_offset``, the scale words at ``_scale_offset`` (and the forward's ``prmt``
    broadcast), ``_quad_asm`` on each register, and ``_slot_targets`` placing its outputs in
    the WGMMA register layout (warp w, lane 4r + q, register (h, c) holds operand row
    ``16w + 8h + r``, columns ``8c + 2q``, ``+1``)."""
    w = _weight(rng, 256, 384)
    p = prepare_weight(w, dtype)
    tile = np.asarray(p.quads[64:128, 128:192])  # a 128x128 W tile away from the origin
    words = np.asarray(p.scales[4:6, 8:16])
    values = np.asarray(_tile_values(jnp.asarray(tile), jnp.asarray(words), dtype))
    if backward:
        values = values.T
    asm = _quad_asm(dtype)
    warp, lane = np.arange(4)[:, None], np.arange(32)[None, :]
    flat_words = words.reshape(-1)
    for wg in range(2):
        for half in range(2):
            regs = _ldmatrix(tile, _quad_row_offset(lane, warp, wg, half, backward), backward)
            operand = np.zeros((64, 64), np.uint16)
            for j in range(4):
                off = _scale_offset(lane, warp, wg, half, j, backward) // 4
                scales = [np.broadcast_to(flat_words[off + i], (4, 32)) for i in range(4)]
                if not backward:
                    sel = ((lane >> 2) & 1) * 0x2222 + 0x1010
                    scales = [run_ptx("prmt.b32 $0, $1, $1, $2;", [v, sel], dtype, 1)[0]
                              for v in scales]  # fmt: skip
                outs = run_ptx(asm, [regs[:, :, j], *scales], dtype, 4)
                for (h, dc), out in zip(_slot_targets(backward), outs, strict=True):
                    rows = 16 * warp + 8 * h + lane // 4
                    cols = 8 * (2 * j + dc) + 2 * (lane % 4)
                    operand[rows, cols] = out & 0xFFFF
                    operand[rows, cols + 1] = out >> 16
            want = values[64 * wg : 64 * wg + 64, 64 * half : 64 * half + 64]
            np.testing.assert_array_equal(operand, want.view(np.uint16), err_msg=f"{wg=} {half=}")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_quad_asm_every_code(rng, dtype):
    """The decode PTX gives, for every code in every slot of both quads and random split
    scales, the interpreter branch's weight bit for bit, each within one ulp of the single
    rounding of the float32 product (``dequantize_nf4``'s)."""
    size = 1 << 14
    words = rng.integers(0, 1 << 32, size, dtype=np.uint64).astype(np.uint32)
    words[:256] = np.arange(256, dtype=np.uint32) * 0x01010101  # every byte value everywhere
    scales = [np.exp2(rng.uniform(-8, 0, size)).astype(np.float32) for _ in range(4)]
    parts = [np.asarray(p).view(np.uint16).astype(np.uint32) for s in scales
             for p in _split(jnp.asarray(s), dtype)]  # fmt: skip
    # slots 0, 2 use scale A (element s: scales[0], element t: scales[1]); 1, 3 use B.
    hi_a, lo_a = parts[0] | parts[2] << 16, parts[1] | parts[3] << 16
    hi_b, lo_b = parts[4] | parts[6] << 16, parts[5] | parts[7] << 16
    outs = run_ptx(_quad_asm(dtype), [words, hi_a, lo_a, hi_b, lo_b], dtype, 4)
    bits = 7 if dtype == jnp.bfloat16 else 10
    for slot, out in enumerate(outs):
        for half in (0, 1):
            codes = (words >> (16 * half + 4 * slot)) & 0xF
            scale = scales[2 * (slot % 2) + half]
            s_hi, s_lo = _split(jnp.asarray(scale), dtype)
            want = np.asarray(_prmt_emulated(jnp.asarray(codes.astype(np.int32)), s_hi, s_lo,
                                             dtype))  # fmt: skip
            got = ((out >> (16 * half)) & 0xFFFF).astype(np.uint16)
            np.testing.assert_array_equal(got, want.view(np.uint16), err_msg=f"{slot=} {half=}")
            exact = (NF4_CODE[codes] * scale).astype(dtype).astype(np.float32)
            value = want.astype(np.float32)
            ulp = np.exp2(
                np.floor(np.log2(np.maximum(np.abs(exact), np.abs(value)) + 1e-30)) - bits
            )
            assert np.all(np.abs(value - exact) <= ulp)


def _reference(lhs, w: NF4Tensor, backward: bool):
    w16 = dequantize_prepared(prepare_weight(w, lhs.dtype))
    want = jnp.dot(lhs, w16 if backward else w16.T, preferred_element_type=jnp.float32)
    return np.asarray(want, np.float32)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize(
    "m, n, k, config",
    [
        (64, 128, 128, MgpuNF4Config(block_m=64)),  # one tile, one step
        # One CTA per tile (2 fwd, 3 bwd); ragged M, N and K; 3 K steps through 2 slots; the
        # 128-token tile kept (a launch this small would shrink it).
        (100, 130, 320, MgpuNF4Config(block_m=128, persistent=False, fill_sms=False)),
        (128, 128, 128, MgpuNF4Config()),  # the default's 256-token tile shrunk to 2 of 64
        (40, 384, 192, MgpuNF4Config(block_m=64, slots=3)),  # 3 N steps; fwd 3 N tiles
        # 2 CTAs looping over 9 tiles (5 and 4) of 3 steps through one ring.
        (150, 384, 320, MgpuNF4Config(block_m=64, slots=2, max_ctas=2)),
        # Token tiles fastest in groups of 2 (the last group ragged: 3 token tiles).
        (150, 384, 320, MgpuNF4Config(block_m=64, slots=2, max_ctas=2, group_m=2)),
    ],
    ids=["single", "ragged", "fill-sms", "three-steps", "persistent", "grouped-order"],
)
def test_matches_reference(rng, m, n, k, config, backward):
    """``y = x·Wᵀ`` and ``dx = dy·W`` in the interpreter against a float32 dot with the
    weights the layout decodes to (only the output rounding differs)."""
    w = _weight(rng, n, k)
    lhs = jnp.asarray(rng.standard_normal((m, n if backward else k)), jnp.bfloat16)
    params = interpret_params.InterpretGPUParams()
    op = nf4_matmul_t_mgpu if backward else nf4_matmul_mgpu
    got = np.asarray(op(lhs, w, config=config, interpret=params).astype(jnp.float32))
    want = _reference(lhs, w, backward)
    assert got.shape == want.shape
    assert rel_l2(got, want) < 3e-3, rel_l2(got, want)
    assert np.max(np.abs(got - want)) <= 2**-7 * np.max(np.abs(want))


@pytest.mark.parametrize(
    "m, r, config, backward",
    [
        # M < 128: the token tile still holds v's rows.
        (40, 48, MgpuNF4Config(block_m=128), False),
        # 2 low-rank steps, 2 persistent CTAs over several tiles.
        (300, 80, MgpuNF4Config(block_m=128, slots=3, max_ctas=2), True),
    ],
    ids=["one-step-fwd", "two-steps-persistent-bwd"],
)
def test_low_rank_term(rng, m, r, config, backward):
    """``x·Wᵀ + u·vᵀ`` (``dy·W + u·vᵀ``) summed in one float32 accumulator: the low-rank steps
    ride in the same ring after each tile's W steps."""
    n, k = 200, 192
    w = _weight(rng, n, k)
    out = k if backward else n
    lhs = jnp.asarray(rng.standard_normal((m, n if backward else k)), jnp.bfloat16)
    u = jnp.asarray(rng.standard_normal((m, r)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((out, r)), jnp.bfloat16)
    params = interpret_params.InterpretGPUParams()
    op = nf4_matmul_t_mgpu if backward else nf4_matmul_mgpu
    got = np.asarray(op(lhs, w, low_rank=(u, v), config=config, interpret=params), np.float32)
    want = _reference(lhs, w, backward) + np.asarray(
        jnp.dot(u, v.T, preferred_element_type=jnp.float32)
    )
    assert rel_l2(got, want) < 3e-3, rel_l2(got, want)


def test_stacked_weights(rng):
    """Weights stacked along N (q/k/v) give each member's product from one call, in both
    orientations, with the padding rows between members contributing nothing. One (ragged)
    token tile; forward, 2 persistent CTAs take the stack's 4 row tiles, two each, from
    different members."""
    ws = [_weight(rng, n, 128) for n in (136, 64, 128)]
    stack = stack_prepared([prepare_weight(w) for w in ws])
    assert stack.members == ((0, 136), (256, 64), (384, 128))
    assert stack.shape == (512, 128)
    params = interpret_params.InterpretGPUParams()
    m, config = 48, MgpuNF4Config(max_ctas=2)
    x = jnp.asarray(rng.standard_normal((m, 128)), jnp.bfloat16)
    y = np.asarray(nf4_matmul_mgpu(x, stack, config=config, interpret=params), np.float32)
    dys = [jnp.asarray(rng.standard_normal((m, w.shape[0])), jnp.bfloat16) for w in ws]
    dy = jnp.zeros((m, stack.shape[0]), jnp.bfloat16)
    dx_want = 0
    for (offset, n), w, dy_i in zip(stack.members, ws, dys, strict=True):
        assert rel_l2(y[:, offset : offset + n], _reference(x, w, False)) < 3e-3
        dy = dy.at[:, offset : offset + n].set(dy_i)
        dx_want = dx_want + _reference(dy_i, w, True)
    dx = np.asarray(nf4_matmul_t_mgpu(dy, stack, config=config, interpret=params), np.float32)
    assert rel_l2(dx, dx_want) < 3e-3
    for i, w in enumerate(ws):  # a member sliced back out is the member prepared alone
        member = stacked_member(stack, i)
        assert member.shape == w.shape and member.members == ((0, w.shape[0]),)
        np.testing.assert_array_equal(
            dequantize_prepared(member), dequantize_prepared(prepare_weight(w))
        )
    with pytest.raises(ValueError, match="one K and dtype"):
        stack_prepared([prepare_weight(ws[0]), prepare_weight(_weight(rng, 64, 192))])


def test_prepared_weight_f16_and_batch_axes(rng):
    """A weight prepared once for f16 serves both orientations with leading batch axes."""
    w = _weight(rng, 128, 192, double_quant=False)
    p = prepare_weight(w, jnp.float16)
    params = interpret_params.InterpretGPUParams()
    x = jnp.asarray(rng.standard_normal((2, 24, 192)), jnp.float16)  # 48 rows: one token tile
    dy = jnp.asarray(rng.standard_normal((2, 24, 128)), jnp.float16)
    for lhs, backward, op in ((x, False, nf4_matmul_mgpu), (dy, True, nf4_matmul_t_mgpu)):
        got = op(lhs, p, interpret=params)
        assert got.shape == (2, 24, 128 if not backward else 192) and got.dtype == jnp.float16
        want = _reference(lhs.reshape(48, -1), w, backward).reshape(got.shape)
        assert rel_l2(np.asarray(got, np.float32), want) < 3e-3


def test_token_tile_fills_the_sms():
    """Small M on a narrow output: fewer, longer CTAs would leave most SMs idle, so the token
    tile shrinks (not below 128 with a low-rank term); training-sized M keeps the config's."""
    cfg, sms = MgpuNF4Config(), nf4_mgpu._sm_count()
    assert nf4_mgpu._token_tile(256, cfg, out_tiles=32) == 64  # 32 tiles -> 128 of 64 tokens
    assert nf4_mgpu._token_tile(256, cfg, low_rank=True, out_tiles=32) == 128
    assert nf4_mgpu._token_tile(192, cfg, out_tiles=32) == 64
    assert nf4_mgpu._token_tile(1024, cfg, out_tiles=32) == 256  # 128 tiles: enough
    assert nf4_mgpu._token_tile(4096, cfg, out_tiles=8) == 256  # k/v at M = 4096: 128 tiles
    assert nf4_mgpu._token_tile(256, cfg, out_tiles=sms) == 256
    assert nf4_mgpu._token_tile(256, MgpuNF4Config(fill_sms=False), out_tiles=32) == 256
    assert nf4_mgpu._token_tile(256, cfg) == 256  # no launch size given: the config's


def test_refusals(rng):
    w = _weight(rng, 64, 128)
    x = jnp.zeros((8, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="must end in K=128"):
        nf4_matmul_mgpu(x[:, :64], w)
    with pytest.raises(ValueError, match="must end in N=64"):
        nf4_matmul_t_mgpu(x, w)
    with pytest.raises(ValueError, match="bf16 or f16"):
        nf4_matmul_mgpu(x.astype(jnp.float32), w)
    with pytest.raises(ValueError, match="split for float16"):
        nf4_matmul_mgpu(x, prepare_weight(w, jnp.float16))
    with pytest.raises(ValueError, match="K % 64 == 0"):
        nf4_matmul_mgpu(x[:, :96], _weight(rng, 64, 96))
    with pytest.raises(ValueError, match="shared memory"):
        nf4_matmul_mgpu(jnp.zeros((256, 128), jnp.bfloat16), w, config=MgpuNF4Config(slots=3))
    with pytest.raises(ValueError, match="bf16 or f16 activations"):
        prepare_weight(w, jnp.float32)
    with pytest.raises(ValueError, match="block_m must be"):
        MgpuNF4Config(block_m=96)
    with pytest.raises(ValueError, match="group_m must be >= 1"):
        MgpuNF4Config(group_m=0)
    u, v = jnp.zeros((8, 16), jnp.bfloat16), jnp.zeros((64, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"v \[64, R\]"):
        nf4_matmul_mgpu(x, w, low_rank=(u, v[:32]))
    with pytest.raises(ValueError, match="must be x's dtype bfloat16"):
        nf4_matmul_mgpu(x, w, low_rank=(u, v.astype(jnp.float32)))
    with pytest.raises(ValueError, match="block_m >= 128"):
        nf4_matmul_mgpu(x, w, low_rank=(u, v), config=MgpuNF4Config(block_m=64))


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize(
    "config, dtype",
    [
        (MgpuNF4Config(), jnp.bfloat16),
        (MgpuNF4Config(persistent=False), jnp.bfloat16),
        (MgpuNF4Config(block_m=128, slots=4), jnp.float16),
    ],
    ids=["default", "per-tile", "f16-m128"],
)
def test_lowers_for_hopper(config, dtype, backward):
    """The compiled kernels lower to a Mosaic GPU custom call for ``cuda`` (the inline PTX is
    assembled by ptxas on the GPU only)."""
    if not hasattr(plgpu, "inline_mgpu"):
        pytest.skip("this jax has no plgpu.inline_mgpu (the quad decode needs it)")
    m, n, k = 6144, 384, 640  # enough token tiles that no config shrinks its tile
    lhs = jax.ShapeDtypeStruct((m, n if backward else k), dtype)
    w = MgpuNF4Weight(
        jax.ShapeDtypeStruct((n // 2, k // 2), jnp.uint16),
        jax.ShapeDtypeStruct((k // 64, n // 16, 16), jnp.uint32),
        (n, k),
        jnp.dtype(dtype).name,
    )
    op = nf4_matmul_t_mgpu if backward else nf4_matmul_mgpu
    u = jax.ShapeDtypeStruct((m, 48), dtype)
    v = jax.ShapeDtypeStruct((k if backward else n, 48), dtype)
    for args in ((lhs, w), (lhs, w, (u, v))):
        fn = jax.jit(lambda lhs, w, low_rank=None: op(lhs, w, low_rank=low_rank, config=config))
        text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text
