"""The Mosaic GPU NF4 matmul (``pallas_kernels.nf4_matmul_mgpu``), run by the Mosaic GPU
interpreter on the CPU, against the jnp reference (``dequantize_nf4`` then a float32 dot).

What this checks: the repack of the bitsandbytes nibbles and the absmax (plain jnp, exactly),
the TMA ring and its barriers (the interpreter fails on a barrier phase that is never
observed; K = 320 and 512 give more steps than ring slots), the padding of ragged M, N and K,
both epilogues (``y`` through a transposed tile, or ``yᵀ``), double-quantized and plain
absmax, f16, leading batch axes, and the refusals; and the same for the backward orientation
``dx = dy · W`` (``nf4_matmul_t_mgpu``) on the same repacked weight, including its dx epilogue
in 64-token pieces. The register layouts, the transposed
shared-memory views and the wgmmas are the GPU's (``scripts/check_nf4_matmul_mgpu.py``), but
the Pallas-to-Mosaic-GPU lowering of all of them runs on the CPU too: ``test_lowers_for_hopper``
lowers the compiled (not interpreted) kernel for the ``cuda`` platform, which catches lowering
errors (unsupported layouts or ops, shared memory overflow) without a GPU; only ptxas and the
run itself are left to the GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_l2
from jax.experimental.pallas import mosaic_gpu as plgpu
from ptx_emulation import run_ptx

from pallas_kernels.nf4 import NF4_CODE, dequantize_absmax, dequantize_nf4, quantize_nf4, stack
from pallas_kernels.nf4_matmul_mgpu import (
    MgpuNF4Config,
    MgpuNF4Weight,
    _decode_prmt,
    _prmt_asm,
    nf4_matmul_mgpu,
    nf4_matmul_mgpu_reference,
    nf4_matmul_t_mgpu,
    nf4_matmul_t_mgpu_reference,
    prepare_weight,
)

interpret_params = pytest.importorskip(
    "jax._src.pallas.mosaic_gpu.interpret.params",
    reason="this jax has no Mosaic GPU interpreter (the kernel then needs a GPU to run)",
)


def _weight(rng, n, k, double_quant):
    w = jnp.asarray(rng.standard_normal((n, k)) * 0.05, jnp.bfloat16)
    return quantize_nf4(w, double_quant=double_quant)


def _check(got, x, w, rel=3e-3, backward=False):
    w16 = dequantize_nf4(w, x.dtype)
    want = np.asarray(
        jnp.dot(x, w16 if backward else w16.T, preferred_element_type=jnp.float32), np.float32
    )
    got = np.asarray(got.astype(jnp.float32))
    assert got.shape == want.shape
    # Same decoded weights, float32 accumulation in another order, one rounding to 16 bits:
    # the error is the output rounding (~2^-9 relative), where a wrong nibble, half or scale
    # is O(1). decode="prmt" rounds each weight twice (rel. L2 ~2.9e-3 on these shapes).
    assert rel_l2(got, want) < rel, rel_l2(got, want)
    assert np.max(np.abs(got - want)) <= 2**-7 * np.max(np.abs(want))


def test_prepare_weight_layout(rng):
    """Byte j of each 128-wide K tile holds elements j (high) and 64 + j (low); scales are the
    decoded absmax, transposed; the padding decodes to zero."""
    n, k = 130, 320
    w = _weight(rng, n, k, double_quant=True)
    p = prepare_weight(w)
    np_, kp = 256, 384
    assert p.packed.shape == (np_, kp // 2) and p.packed.dtype == jnp.uint8
    assert p.scales.shape == (kp // 64, np_ // 64, 64) and p.scales.dtype == jnp.float32
    tiles = np.asarray(p.packed).reshape(np_, kp // 128, 64)
    codes = np.stack([tiles >> 4, tiles & 0xF], axis=2).reshape(np_, kp)
    scales = np.asarray(p.scales).reshape(kp // 64, np_).T  # [Np, Kp/64]
    values = NF4_CODE[codes] * np.repeat(scales, 64, axis=1)
    want = np.zeros((np_, kp), np.float32)
    want[:n, :k] = np.asarray(dequantize_nf4(w, jnp.float32))
    np.testing.assert_array_equal(values, want)
    np.testing.assert_array_equal(scales[:n, : k // 64].ravel(), np.asarray(dequantize_absmax(w)))


@pytest.mark.parametrize(
    "m, n, k, double_quant, config",
    [
        (64, 128, 128, True, MgpuNF4Config(block_m=64, slots=2, decode="select")),
        # Ragged M (2 token tiles), N (3 CTA rows) and K (3 steps through 2 slots).
        (200, 300, 320, False, MgpuNF4Config(block_m=128, slots=2, decode="select")),
        # yᵀ epilogue, 4 steps through 3 slots, token tile 64 for a 130-row x.
        (
            130,
            256,
            512,
            True,
            MgpuNF4Config(block_m=64, slots=3, transposed_store=False, decode="select"),
        ),  # fmt: skip
        # The byte-permute decode (the default): ragged M and N, 3 steps through 2 slots.
        (130, 200, 384, True, MgpuNF4Config(block_m=128, slots=2)),
    ],
    ids=["one-tile", "ragged", "transposed-out", "prmt"],
)
def test_matches_reference(rng, m, n, k, double_quant, config):
    w = _weight(rng, n, k, double_quant)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    got = nf4_matmul_mgpu(x, w, config=config, interpret=interpret_params.InterpretGPUParams())
    assert got.dtype == jnp.bfloat16
    _check(got, x, w, rel=4e-3 if config.decode == "prmt" else 3e-3)


def test_prepared_weight_f16_and_batch_axes(rng):
    """A weight repacked once and reused; f16 activations with leading batch axes; M < 64."""
    w = _weight(rng, 128, 256, double_quant=True)
    prepared = prepare_weight(w)
    x = jnp.asarray(rng.standard_normal((2, 3, 256)), jnp.float16)
    params = interpret_params.InterpretGPUParams()
    config = MgpuNF4Config(block_m=64, slots=2, decode="select")
    got = nf4_matmul_mgpu(x, prepared, config=config, interpret=params)
    assert got.shape == (2, 3, 128) and got.dtype == jnp.float16
    _check(got.reshape(6, 128), x.reshape(6, 256), w)
    want = nf4_matmul_mgpu_reference(x, w)
    assert want.shape == got.shape and rel_l2(got, want) < 3e-3


@pytest.mark.parametrize(
    "m, n, k, double_quant, config",
    [
        (64, 128, 128, True, MgpuNF4Config(block_m=64, slots=2, decode="select")),
        # Ragged M (2 token tiles), N (3 steps through 2 slots) and K (3 CTA columns).
        (200, 300, 320, False, MgpuNF4Config(block_m=128, slots=2, decode="select")),
        # prmt: ragged M, N and K; 2 steps through 3 slots.
        (130, 200, 384, True, MgpuNF4Config(block_m=128, slots=3)),
        # 256 tokens: dx leaves in 4 pieces through the 2 decode tiles; ragged N.
        (256, 130, 128, True, MgpuNF4Config(block_m=256, slots=2)),
        # dxᵀ epilogue, 3 pieces of 64 tokens.
        (192, 256, 256, False, MgpuNF4Config(block_m=192, slots=2, transposed_store=False)),
    ],
    ids=["one-tile", "ragged", "prmt", "m256-pieces", "transposed-out"],
)
def test_t_matches_reference(rng, m, n, k, double_quant, config):
    """The backward orientation ``dy · W`` on the same repacked weight: each compute warpgroup
    decodes one nibble of the tile (its K half) with the N rows' scales."""
    w = _weight(rng, n, k, double_quant)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    got = nf4_matmul_t_mgpu(dy, w, config=config, interpret=interpret_params.InterpretGPUParams())
    assert got.dtype == jnp.bfloat16 and got.shape == (m, k)
    _check(got, dy, w, rel=4e-3 if config.decode == "prmt" else 3e-3, backward=True)


def test_t_prepared_weight_f16_and_batch_axes(rng):
    """Backward: one repacked weight serves both orientations; f16, batch axes, M < 64."""
    w = _weight(rng, 128, 256, double_quant=True)
    prepared = prepare_weight(w)
    dy = jnp.asarray(rng.standard_normal((2, 3, 128)), jnp.float16)
    config = MgpuNF4Config(block_m=64, slots=2)
    got = nf4_matmul_t_mgpu(
        dy, prepared, config=config, interpret=interpret_params.InterpretGPUParams()
    )
    assert got.shape == (2, 3, 256) and got.dtype == jnp.float16
    _check(got.reshape(6, 256), dy.reshape(6, 128), w, rel=4e-3, backward=True)
    want = nf4_matmul_t_mgpu_reference(dy, w)
    assert want.shape == got.shape and rel_l2(got, want) < 4e-3


def test_refusals(rng):
    x = jnp.zeros((8, 128), jnp.bfloat16)
    w = _weight(rng, 64, 128, double_quant=False)
    with pytest.raises(ValueError, match="K % 64 == 0"):
        nf4_matmul_mgpu(x[:, :96], _weight(rng, 64, 96, double_quant=False))
    with pytest.raises(ValueError, match="blocksize 64, not 128"):
        nf4_matmul_mgpu(x, quantize_nf4(jnp.ones((64, 128), jnp.float32), blocksize=128))
    with pytest.raises(ValueError, match="bf16 or f16"):
        nf4_matmul_mgpu(x.astype(jnp.float32), w)
    with pytest.raises(ValueError, match="must end in K=128"):
        nf4_matmul_mgpu(x[:, :64], w)
    with pytest.raises(ValueError, match="no layer axis"):
        nf4_matmul_mgpu(x, stack([w, w]))
    with pytest.raises(ValueError, match="shared memory"):
        nf4_matmul_mgpu(jnp.zeros((256, 128), jnp.bfloat16), w,
                        config=MgpuNF4Config(block_m=256, slots=4))  # fmt: skip
    with pytest.raises(ValueError, match="block_m must be"):
        MgpuNF4Config(block_m=96)
    with pytest.raises(ValueError, match="slots must be"):
        MgpuNF4Config(slots=1)
    with pytest.raises(ValueError, match="decode must be"):
        MgpuNF4Config(decode="lut")
    with pytest.raises(TypeError, match="NF4Tensor"):
        nf4_matmul_mgpu(x, jnp.zeros((64, 128), jnp.bfloat16))
    # The backward: dy ends in N, the same refusals otherwise.
    with pytest.raises(ValueError, match="must end in N=64"):
        nf4_matmul_t_mgpu(x, w)
    with pytest.raises(ValueError, match="K % 64 == 0"):
        nf4_matmul_t_mgpu(x[:, :64], _weight(rng, 64, 96, double_quant=False))
    with pytest.raises(ValueError, match="bf16 or f16"):
        nf4_matmul_t_mgpu(x[:, :64].astype(jnp.float32), w)
    with pytest.raises(ValueError, match="shared memory"):
        nf4_matmul_t_mgpu(jnp.zeros((256, 64), jnp.bfloat16), w,
                          config=MgpuNF4Config(block_m=256, slots=3))  # fmt: skip


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_prmt_asm_matches_interpreter_branch(rng, dtype):
    """The PTX of ``decode="prmt"`` (emulated, every 16-bit register value) computes what its
    interpreter branch computes, bit for bit: the byte tables, selectors, the nibble-to-half
    mapping and the split-scale multiply."""
    words = np.arange(1 << 16, dtype=np.uint32)
    packed = np.stack([words & 0xFF, words >> 8], axis=1).astype(np.uint8)  # [rows, 2]
    scales = [np.exp2(rng.uniform(-8, 0, words.size)).astype(np.float32) for _ in range(2)]
    first, second = _decode_prmt(jnp.asarray(packed), *map(jnp.asarray, scales), dtype, True)
    pairs = []
    for s in scales:
        hi = s.astype(dtype)
        lo = (s - hi.astype(np.float32)).astype(dtype)
        pairs += [np.asarray(v).view(np.uint16).astype(np.uint32) * 0x10001 for v in (hi, lo)]
    out0, out1 = run_ptx(_prmt_asm(dtype), [words, *pairs], dtype, n_out=2)
    for got, want in ((out0, first), (out1, second)):
        want = np.asarray(want).view(np.uint16).astype(np.uint32)
        np.testing.assert_array_equal(got, want[:, 0] | (want[:, 1] << 16))
    # And the branch itself: each weight within one ulp of the reference's single rounding of
    # the float32 product (dequantize_nf4); ~17% (bf16) / ~21% (f16) of them differ by one.
    codes = np.stack([packed >> 4, packed & 0xF]).astype(np.int64)
    exact = np.asarray(NF4_CODE, np.float32)[codes] * np.stack(scales)[:, :, None]
    want = exact.astype(dtype).astype(np.float32)
    got = np.stack([np.asarray(first), np.asarray(second)]).astype(np.float32)
    bits = 7 if dtype == jnp.bfloat16 else 10
    ulp = np.exp2(np.floor(np.log2(np.maximum(np.abs(want), np.abs(got)) + 1e-30)) - bits)
    assert np.all(np.abs(got - want) <= ulp)
    assert 0.1 < np.mean(got != want) < 0.3


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize(
    "config, dtype",
    [
        (MgpuNF4Config(decode="select"), jnp.bfloat16),
        (
            MgpuNF4Config(block_m=128, slots=4, transposed_store=False, decode="select"),
            jnp.bfloat16,
        ),
        (MgpuNF4Config(decode="prmt"), jnp.bfloat16),
        (MgpuNF4Config(block_m=128, slots=4, decode="prmt"), jnp.float16),
        (MgpuNF4Config(decode="prmt", overlap_backward=False), jnp.bfloat16),
    ],
    ids=["default", "transposed-out", "prmt", "prmt-f16", "prmt-sync"],
)
def test_lowers_for_hopper(config, dtype, backward):
    """The GPU kernels (no interpreter; ``y = x·Wᵀ`` and, ``backward``, ``dx = dy·W``) lower to
    a Mosaic GPU custom call for ``cuda`` (the inline PTX of ``decode="prmt"`` is only
    assembled by ptxas on the GPU)."""
    if config.decode == "prmt" and not hasattr(plgpu, "inline_mgpu"):
        pytest.skip("this jax has no plgpu.inline_mgpu (needed by decode='prmt')")
    m, n, k = 512, 384, 640
    x = jax.ShapeDtypeStruct((m, n if backward else k), dtype)
    w = MgpuNF4Weight(
        jax.ShapeDtypeStruct((n, k // 2), jnp.uint8),
        jax.ShapeDtypeStruct((k // 64, n // 64, 64), jnp.float32),
        (n, k),
    )
    op = nf4_matmul_t_mgpu if backward else nf4_matmul_mgpu
    fn = jax.jit(lambda x, w: op(x, w, config=config))
    text = fn.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
