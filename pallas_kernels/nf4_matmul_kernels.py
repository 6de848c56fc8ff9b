"""Pallas kernels behind :func:`pallas_kernels.nf4_matmul.nf4_lora_matmul`.

Three ``pl.pallas_call`` kernels over bitsandbytes-layout NF4 weights (``W [N, K]`` flattened
row-major, element ``2i`` in the high nibble of byte ``i``, one absmax per 64 consecutive
elements):

* :func:`fused_matmul_nt`: ``y = x·Wᵀ`` (+ the LoRA term and bias in the epilogue). Each
  program owns a ``[block_m, block_n]`` tile of y and walks K, decoding one
  ``[block_n, block_k]`` tile of W per step in registers right before the dot. W never
  exists in 16 bits in HBM; it is read as 4.5 bits/weight once per program row.
* :func:`fused_matmul_nn`: ``dx = dy·W`` (+ the LoRA term), the backward orientation: each
  program owns a ``[block_m, block_k]`` tile of dx and walks N.
* :func:`dequantize_pallas`: memory-bound decode of the whole W into ``[N, K]`` 16-bit, for
  the ``dequant_then_dot`` variant that hands the dense W to XLA's dot (cuBLAS).

Decoding a tile, and why it looks the way it does:

* Code → value without a register gather (neither Triton nor Mosaic GPU can index a table
  held in registers), two ways, chosen by ``NF4MatmulConfig.lookup``:
  ``"select"``: a 4-level select tree over the code's bits (15 selects between compile-time
  constants), pure ALU, see :func:`nf4_lookup`;
  ``"table"``: a pointer gather from a 16-entry float32 table passed as a kernel input
  (64 bytes, so every lookup hits L1). Compiled for sm_90 the decode is ~29 instructions
  per weight with the tree and ~11 with the table; which one is faster once memory and
  tensor-core time overlap is for ``scripts/bench_nf4_matmul.py`` to say. Both are exact.
* Nibble order: ``jnp.stack([hi, lo], -1).reshape(...)`` interleaves the two nibbles of each
  byte back into element order; in Triton this is ``tt.join`` + ``tt.reshape`` (what
  ``tl.interleave`` does), a register shuffle, not a memory round trip.
* The value is ``code_value * absmax`` in float32, rounded once to the compute dtype, which
  is bit-for-bit what the jnp reference (``dequantize_nf4``) produces.
* absmax: the fused kernels take float32 scales, decoded per call from double-quantized
  uint8 codes by a small XLA fusion in the wrapper (``numel/64`` floats). The dequant kernel
  can instead decode them itself (``NF4MatmulConfig.absmax_decode="kernel"``): a gather from
  the 256-entry dynamic code book, times the program's one nested scale, plus the offset.
  That reads 1 byte per block instead of 4 and saves a launch; the benchmark weighs it. The
  compiler may contract the multiply-add into an FMA, so a scale can differ from
  ``dequantize_absmax``'s by one float32 ulp (as XLA:GPU's own fusion may).

Lowering: the kernels use the blocked-tensor style (``jnp.dot`` on loaded tiles), which the
Pallas Triton backend implements and Mosaic GPU's ``pallas_call`` lowering does not (it has no
``dot_general``; its matmuls are ``plgpu.wgmma`` on shared-memory refs), so they pass Triton
``compiler_params`` explicitly (see :mod:`pallas_kernels._backend`). In interpret mode they run
anywhere. Tensor shapes inside a Triton kernel must be powers of two, which is why the
wrappers pick power-of-two tiles and pad (rarely: only shapes no tile divides) instead of
masking.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _backend
from pallas_kernels.nf4 import DYNAMIC_CODE, NF4_CODE

Array = jax.Array

__all__ = [
    "QBLOCK",
    "NF4MatmulConfig",
    "dequantize_pallas",
    "fused_matmul_nn",
    "fused_matmul_nt",
    "nf4_lookup",
]

QBLOCK = 64
"""Elements per absmax block the kernels handle (bitsandbytes' and lorax's blocksize)."""

_MIN_DOT = 16  # Triton's tl.dot needs every dimension >= 16.

_NT = (((1,), (1,)), ((), ()))  # a[m, k] · b[n, k]ᵀ
_NN = (((1,), (0,)), ((), ()))  # a[m, k] · b[k, n]


# What NF4MatmulConfig.variant may say ("auto" picks among the others by shape).
VARIANT_CHOICES = ("auto", "fused", "dequant_then_dot", "xla", "mosaic")


@dataclasses.dataclass(frozen=True)
class NF4MatmulConfig:
    """Variant choice, tile sizes and launch parameters (frozen: hashable, a static argument).

    ``variant``: ``"auto"`` (see ``fused_max_m``), ``"fused"``, ``"dequant_then_dot"``,
    ``"xla"`` or ``"mosaic"`` (:mod:`pallas_kernels.nf4_matmul` describes each).
    ``fused_max_m``: under ``"auto"``, the fused kernel runs when the flattened row count M is
    at most this, ``xla`` (XLA's decode, then cuBLAS) above it. Default 0: never. Measured on
    the H200 (BENCHMARKS.md §2, decode-sized M, per-layer device time), the fused kernel was
    the slowest NF4 path at every M from 1 to 1024 on the Llama-8B shapes: 0.18-0.84x of
    ``xla`` at M = 1-64 and 0.19-0.54x at M = 256, forward; 0.29-0.50x forward+backward at
    M = 256-1024. Its Triton lowering does not overlap the decode with the tensor cores, and
    at small M it reads W no faster than XLA's decode pass writes and rereads it.
    ``lookup``: ``"select"`` or ``"table"``, how a 4-bit code becomes its value (module doc).
    ``absmax_decode``: ``"wrapper"`` or ``"kernel"``, where the dequant kernel gets the
    float32 scales of a double-quantized W (module doc; the fused kernels always use the
    wrapper's).

    Forward ``y = x·Wᵀ`` (fused): ``block_m × block_n`` output tiles, K walked in ``block_k``
    steps (a multiple of 64 so absmax blocks never straddle a step); ``group_m`` row-tiles
    are launched together so the W tiles they share come from L2. ``num_warps`` and
    ``num_stages`` go to Triton (``num_stages`` pipelines the K loop's loads).

    Backward ``dx = dy·W`` (fused): ``bwd_block_m × bwd_block_k`` output tiles, N walked in
    ``bwd_block_n`` steps.

    Dequantize (``dequant_then_dot``): each program decodes ``dequant_rows`` absmax blocks
    (``64 × dequant_rows`` weights).

    Tiles are upper bounds: the wrappers shrink a tile to the largest power of two that
    divides the dimension (no padding copy), down to a floor (16 for rows/N, 64 for K), and
    pad only below that. When M fits one row tile (decode-sized calls), the fused kernels
    also halve their N (forward) or K (backward) tile, down to 32 / 64, until the launch has
    ``min_programs`` programs (two per H100/H200 SM), so that small calls fill the GPU.

    Defaults: 128×128×64 tiles with 8 warps compile for sm_90 to wgmma with no register
    spills (4 warps spill: 255 registers); 64 rows × 64 weights per dequant program with 4
    warps use 38 registers (256 rows used 160).
    """

    variant: str = "auto"
    fused_max_m: int = 0
    lookup: str = "select"
    absmax_decode: str = "wrapper"
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 4
    bwd_block_m: int = 128
    bwd_block_n: int = 64
    bwd_block_k: int = 128
    bwd_num_warps: int = 8
    bwd_num_stages: int = 4
    dequant_rows: int = 64
    dequant_num_warps: int = 4
    min_programs: int = 264

    def __post_init__(self) -> None:
        if self.variant not in VARIANT_CHOICES:
            raise ValueError(f"variant must be one of {VARIANT_CHOICES}; got {self.variant!r}")
        for name in ("block_m", "block_n", "bwd_block_m", "bwd_block_n"):
            _check_pow2(name, getattr(self, name), _MIN_DOT)
        for name in ("block_k", "bwd_block_k"):
            _check_pow2(name, getattr(self, name), QBLOCK)
        _check_pow2("dequant_rows", self.dequant_rows, 1)
        if self.lookup not in ("select", "table"):
            raise ValueError(f"lookup must be 'select' or 'table'; got {self.lookup!r}")
        if self.absmax_decode not in ("wrapper", "kernel"):
            raise ValueError(
                f"absmax_decode must be 'wrapper' or 'kernel'; got {self.absmax_decode!r}"
            )
        if self.group_m < 1:
            raise ValueError(f"group_m must be >= 1; got {self.group_m}")


def _check_pow2(name: str, value: int, minimum: int) -> None:
    if value < minimum or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {minimum}; got {value}")


# --------------------------------------------------------------------------------------
# Tile decoding (shared by all kernels; plain jnp on loaded tiles)
# --------------------------------------------------------------------------------------


def nf4_lookup(codes: Array) -> Array:
    """Maps NF4 codes (unsigned ints in ``[0, 16)``) to their float32 values, without a gather.

    A 4-level select tree: level ``b`` halves the candidate list by testing bit ``b``. The
    first level selects between two compile-time constants, so the tree is 15 selects plus
    4 bit tests per element, all exact.
    """
    values: list[Any] = [np.float32(v) for v in np.asarray(NF4_CODE, np.float32)]
    for bit in range(4):
        on = (codes & (1 << bit)) != 0
        values = [jnp.where(on, hi, lo) for lo, hi in zip(values[0::2], values[1::2], strict=True)]
    return values[0]


def dequant_tile(packed: Array, absmax: Array, dtype: Any, table_ref: Any = None) -> Array:
    """Decodes a ``[rows, cols/2]`` uint8 tile into ``[rows, cols]`` of ``dtype``.

    ``absmax`` is ``[rows, cols/64]`` float32 (one scale per 64 consecutive elements of a
    row). Nibbles are interleaved back into element order (high nibble first, as
    bitsandbytes packs them) before the lookup, so the float work happens once per element.
    With ``table_ref`` (a ``[16]`` float32 ref holding the NF4 code book) codes are looked up
    by a pointer gather; without, by :func:`nf4_lookup`'s select tree.
    """
    rows, half = packed.shape
    cols = 2 * half
    codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(rows, cols)
    if table_ref is not None:
        codes = codes.astype(jnp.int32)
    values = nf4_lookup(codes) if table_ref is None else table_ref[codes]
    nblocks = cols // QBLOCK
    if nblocks == 1:
        values = values * absmax
    else:
        values = (values.reshape(rows, nblocks, QBLOCK) * absmax[:, :, None]).reshape(rows, cols)
    return values.astype(dtype)


# --------------------------------------------------------------------------------------
# Tiling helpers
# --------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _fit(dim: int, preferred: int, minimum: int) -> int:
    """Largest power of two in ``[minimum, preferred]`` dividing ``dim``; else a padded tile."""
    block = preferred
    while block >= minimum:
        if dim % block == 0:
            return block
        block //= 2
    return min(preferred, max(minimum, _next_pow2(dim)))


def _row_block(m: int, preferred: int) -> int:
    """Row tile for M: ``preferred``, or the next power of two >= M (>= 16) for small M."""
    return min(preferred, max(_MIN_DOT, _next_pow2(m)))


def _pad(a: Array, shape: tuple[int, ...]) -> Array:
    """Zero-pads ``a`` at the end of each axis up to ``shape`` (no-op, no copy, if equal)."""
    if a.shape == shape:
        return a
    return jnp.pad(a, [(0, t - s) for s, t in zip(a.shape, shape, strict=True)])


def _grouped(pid: Array, num_rows: int, num_cols: int, group: int) -> tuple[Array, Array]:
    """Maps a 1-D program id to a (row-tile, col-tile) pair in grouped order.

    Consecutive programs sweep ``group`` row tiles down one column tile before moving right,
    so while a column band of W is being read, ``group`` programs reuse it from L2. Integer
    ``lax.div``/``lax.rem`` (all operands non-negative) keep the index maps cheap to lower.
    """
    group = min(group, num_rows)
    width = group * num_cols
    start = lax.div(pid, jnp.int32(width)) * group
    size = jnp.minimum(jnp.int32(num_rows) - start, jnp.int32(group))
    rem = lax.rem(pid, jnp.int32(width))
    return start + lax.rem(rem, size), lax.div(rem, size)


def _lora_rank_pad(r: int) -> int:
    return max(_MIN_DOT, _next_pow2(r))


def _table_operand(config: NF4MatmulConfig) -> list[tuple[Array, pl.BlockSpec]]:
    """The ``[16]`` code book as a kernel input when ``config.lookup == "table"``."""
    if config.lookup != "table":
        return []
    table = jnp.asarray(np.asarray(NF4_CODE, np.float32))
    return [(table, pl.BlockSpec((16,), lambda *_: (0,)))]


def _split_table(has_table: bool, refs: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...]]:
    return (refs[0], refs[1:]) if has_table else (None, refs)


def _compiler_params(interpret: bool, num_warps: int, num_stages: int) -> Any:
    if interpret:  # interpret mode needs no GPU backend (and must work without Triton)
        return None
    return _backend.triton_compiler_params(num_warps=num_warps, num_stages=num_stages)


# --------------------------------------------------------------------------------------
# y = x·Wᵀ  (forward)
# --------------------------------------------------------------------------------------


def _nt_kernel(
    *refs: Any,
    block_k: int,
    num_k: int,
    scale: float,
    has_table: bool,
    has_lora: bool,
    has_bias: bool,
) -> None:
    table_ref, refs = _split_table(has_table, refs)
    x_ref, packed_ref, absmax_ref, *in_refs, out_ref = refs
    xa_ref, b_ref = in_refs[:2] if has_lora else (None, None)
    bias_ref = in_refs[-1] if has_bias else None
    block_m, block_n = out_ref.shape

    def step(k: Array, acc: Array) -> Array:
        x = x_ref[:, pl.ds(pl.multiple_of(k * block_k, block_k), block_k)]
        half = block_k // 2
        packed = packed_ref[:, pl.ds(pl.multiple_of(k * half, half), half)]
        nblk = block_k // QBLOCK
        absmax = absmax_ref[:, pl.ds(k * nblk, nblk)]
        w = dequant_tile(packed, absmax, x.dtype, table_ref)
        return acc + lax.dot_general(x, w, _NT, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, num_k, step, jnp.zeros((block_m, block_n), jnp.float32))
    if has_lora:
        lora = lax.dot_general(xa_ref[...], b_ref[...], _NT, preferred_element_type=jnp.float32)
        acc = acc + scale * lora
    if has_bias:
        acc = acc + bias_ref[...]
    out_ref[...] = acc.astype(out_ref.dtype)


def fused_matmul_nt(
    x: Array,
    packed: Array,
    absmax: Array,
    xa: Array | None,
    b: Array | None,
    bias: Array | None,
    *,
    scale: float,
    config: NF4MatmulConfig,
    interpret: bool,
) -> Array:
    """``x·Wᵀ + scale·xa·bᵀ + bias`` with f32 accumulation, in ``x.dtype``.

    Args:
      x: ``[M, K]`` activations (the compute dtype: W is decoded to it).
      packed: ``[N, K/2]`` uint8, W's bitsandbytes bytes viewed row by row (needs K % 64 == 0).
      absmax: ``[N, K/64]`` float32 scales.
      xa: ``[M, r]`` the LoRA down-projection ``x·Aᵀ`` (x.dtype), or None.
      b: ``[N, r]`` LoRA B (x.dtype), or None.
      bias: ``[N]`` or None.
    """
    m, k = x.shape
    n = packed.shape[0]
    if k % QBLOCK or packed.shape != (n, k // 2) or absmax.shape != (n, k // QBLOCK):
        raise ValueError(
            f"fused NF4 matmul needs K % {QBLOCK} == 0 and packed [N, K/2], absmax [N, K/64];"
            f" got x {x.shape}, packed {packed.shape}, absmax {absmax.shape}"
        )
    bm = _row_block(m, config.block_m)
    bn = _fit(n, config.block_n, _MIN_DOT)
    if m <= bm:  # one row tile: narrow the N tile until the launch fills the GPU
        while bn > 32 and n % (bn // 2) == 0 and -(-n // bn) < config.min_programs:
            bn //= 2
    bk = _fit(k, config.block_k, QBLOCK)  # always divides: k % 64 == 0
    mp, np_ = _round_up(m, bm), _round_up(n, bn)
    num_m, num_n = mp // bm, np_ // bn

    def rows(i: Array, j: Array) -> tuple[Array, Any]:
        return i, 0

    def cols(i: Array, j: Array) -> tuple[Array, Any]:
        return j, 0

    def spec(shape: tuple[int, ...], which: Callable[..., Any]) -> pl.BlockSpec:
        return pl.BlockSpec(shape, lambda pid: which(*_grouped(pid, num_m, num_n, config.group_m)))

    table = _table_operand(config)
    operands = [t for t, _ in table] + [
        _pad(x, (mp, k)),
        _pad(packed, (np_, k // 2)),
        _pad(absmax.astype(jnp.float32), (np_, k // QBLOCK)),
    ]
    in_specs = [s for _, s in table] + [
        spec((bm, k), rows),
        spec((bn, k // 2), cols),
        spec((bn, k // QBLOCK), cols),
    ]
    has_lora = xa is not None
    if has_lora:
        assert b is not None
        rp = _lora_rank_pad(xa.shape[1])
        operands += [_pad(xa.astype(x.dtype), (mp, rp)), _pad(b.astype(x.dtype), (np_, rp))]
        in_specs += [spec((bm, rp), rows), spec((bn, rp), cols)]
    has_bias = bias is not None
    if has_bias:
        operands.append(_pad(bias.astype(jnp.float32).reshape(1, n), (1, np_)))
        in_specs.append(spec((1, bn), lambda i, j: (0, j)))
    kernel = functools.partial(
        _nt_kernel,
        block_k=bk,
        num_k=k // bk,
        scale=float(scale),
        has_table=bool(table),
        has_lora=has_lora,
        has_bias=has_bias,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, np_), x.dtype),
        grid=(num_m * num_n,),
        in_specs=in_specs,
        out_specs=spec((bm, bn), lambda i, j: (i, j)),
        compiler_params=_compiler_params(interpret, config.num_warps, config.num_stages),
        interpret=interpret,
        name="nf4_fused_matmul_nt",
    )(*operands)
    return out if (mp, np_) == (m, n) else out[:m, :n]


# --------------------------------------------------------------------------------------
# dx = dy·W  (backward)
# --------------------------------------------------------------------------------------


def _nn_kernel(
    *refs: Any,
    block_n: int,
    num_n: int,
    scale: float,
    has_table: bool,
    has_lora: bool,
) -> None:
    table_ref, refs = _split_table(has_table, refs)
    dy_ref, packed_ref, absmax_ref, *in_refs, out_ref = refs
    block_m, block_k = out_ref.shape

    def step(j: Array, acc: Array) -> Array:
        n0 = pl.multiple_of(j * block_n, block_n)
        dy = dy_ref[:, pl.ds(n0, block_n)]
        packed = packed_ref[pl.ds(n0, block_n), :]
        w = dequant_tile(packed, absmax_ref[pl.ds(n0, block_n), :], dy.dtype, table_ref)
        return acc + lax.dot_general(dy, w, _NN, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, num_n, step, jnp.zeros((block_m, block_k), jnp.float32))
    if has_lora:
        dyb_ref, a_ref = in_refs
        lora = lax.dot_general(dyb_ref[...], a_ref[...], _NN, preferred_element_type=jnp.float32)
        acc = acc + scale * lora
    out_ref[...] = acc.astype(out_ref.dtype)


def fused_matmul_nn(
    dy: Array,
    packed: Array,
    absmax: Array,
    dyb: Array | None,
    a: Array | None,
    *,
    scale: float,
    config: NF4MatmulConfig,
    interpret: bool,
) -> Array:
    """``dy·W + scale·dyb·a`` with f32 accumulation, in ``dy.dtype``.

    Args:
      dy: ``[M, N]`` output cotangent (the compute dtype).
      packed, absmax: W as in :func:`fused_matmul_nt`.
      dyb: ``[M, r]`` ``dy·B`` (dy.dtype), or None.
      a: ``[r, K]`` LoRA A (dy.dtype), or None.
    """
    m, n = dy.shape
    k = 2 * packed.shape[1]
    if packed.shape[0] != n or absmax.shape != (n, k // QBLOCK) or k % QBLOCK:
        raise ValueError(
            f"fused NF4 matmul (dy·W) needs packed [N, K/2], absmax [N, K/64] with K % 64 == 0;"
            f" got dy {dy.shape}, packed {packed.shape}, absmax {absmax.shape}"
        )
    bm = _row_block(m, config.bwd_block_m)
    bn = _fit(n, config.bwd_block_n, _MIN_DOT)
    bk = _fit(k, config.bwd_block_k, QBLOCK)
    if m <= bm:  # one row tile: narrow the K tile until the launch fills the GPU
        while bk > QBLOCK and k % (bk // 2) == 0 and k // bk < config.min_programs:
            bk //= 2
    mp, np_ = _round_up(m, bm), _round_up(n, bn)
    num_m, num_k = mp // bm, k // bk

    def spec(shape: tuple[int, ...], which: Callable[..., Any]) -> pl.BlockSpec:
        return pl.BlockSpec(shape, lambda pid: which(*_grouped(pid, num_m, num_k, config.group_m)))

    table = _table_operand(config)
    operands = [t for t, _ in table] + [
        _pad(dy, (mp, np_)),
        _pad(packed, (np_, k // 2)),
        _pad(absmax.astype(jnp.float32), (np_, k // QBLOCK)),
    ]
    in_specs = [s for _, s in table] + [
        spec((bm, np_), lambda i, j: (i, 0)),
        spec((np_, bk // 2), lambda i, j: (0, j)),
        spec((np_, bk // QBLOCK), lambda i, j: (0, j)),
    ]
    has_lora = dyb is not None
    if has_lora:
        assert a is not None
        rp = _lora_rank_pad(dyb.shape[1])
        operands += [_pad(dyb.astype(dy.dtype), (mp, rp)), _pad(a.astype(dy.dtype), (rp, k))]
        in_specs += [spec((bm, rp), lambda i, j: (i, 0)), spec((rp, bk), lambda i, j: (0, j))]
    kernel = functools.partial(
        _nn_kernel,
        block_n=bn,
        num_n=np_ // bn,
        scale=float(scale),
        has_table=bool(table),
        has_lora=has_lora,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, k), dy.dtype),
        grid=(num_m * num_k,),
        in_specs=in_specs,
        out_specs=spec((bm, bk), lambda i, j: (i, j)),
        compiler_params=_compiler_params(interpret, config.bwd_num_warps, config.bwd_num_stages),
        interpret=interpret,
        name="nf4_fused_matmul_nn",
    )(*operands)
    return out if mp == m else out[:m]


# --------------------------------------------------------------------------------------
# W = dequantize(packed, absmax)  (dequant_then_dot)
# --------------------------------------------------------------------------------------


def _dequant_kernel(*refs: Any, has_table: bool, nested_rows: int | None) -> None:
    table_ref, refs = _split_table(has_table, refs)
    if nested_rows is None:
        packed_ref, absmax_ref, out_ref = refs
        absmax = absmax_ref[...]
    else:  # double-quantized: absmax = code_book[code] * nested[block // 256] + offset
        dynamic_ref, nested_ref, offset_ref, packed_ref, codes_ref, out_ref = refs
        nested = nested_ref[pl.program_id(0) // nested_rows]  # one nested block per program
        absmax = dynamic_ref[codes_ref[...].astype(jnp.int32)] * nested + offset_ref[0]
    out_ref[...] = dequant_tile(packed_ref[...], absmax, out_ref.dtype, table_ref)


def dequantize_pallas(
    packed: Array,
    absmax: Array,
    shape: tuple[int, ...],
    dtype: Any,
    *,
    config: NF4MatmulConfig,
    interpret: bool,
    nested: tuple[Array, Array, int] | None = None,
) -> Array:
    """Decodes flat NF4 bytes into a dense array of ``shape`` and ``dtype``.

    Works on the flat element order, one absmax block (64 weights, 32 bytes) per row of a
    ``[nblocks, 64]`` view, so any shape works (blocks may straddle rows of W). Copies only
    when the element count is not a multiple of ``64 × rows-per-program``.

    ``absmax`` is float32 scales, or, with ``nested = (nested_absmax, offset,
    nested_blocksize)``, the uint8 double-quantization codes, decoded in the kernel.
    """
    numel = int(np.prod(shape))
    nblocks = absmax.shape[0]
    if packed.ndim != 1 or absmax.ndim != 1 or nblocks != -(-numel // QBLOCK):
        raise ValueError(
            f"expected flat packed/absmax for {numel} elements in blocks of {QBLOCK}; "
            f"got packed {packed.shape}, absmax {absmax.shape}"
        )
    rows = _fit(nblocks, config.dequant_rows, min(_MIN_DOT, config.dequant_rows))
    nested_rows = None
    if nested is not None:
        nested_absmax, offset, nested_blocksize = nested
        if nested_blocksize % rows:
            raise ValueError(f"{rows} blocks per program must divide {nested_blocksize}")
        nested_rows = nested_blocksize // rows
    nb_pad = _round_up(nblocks, rows)
    packed2d = _pad(packed, (nb_pad * QBLOCK // 2,)).reshape(nb_pad, QBLOCK // 2)
    table = _table_operand(config)
    operands = [t for t, _ in table]
    in_specs = [s for _, s in table]
    if nested is None:
        absmax2d = _pad(absmax.astype(jnp.float32), (nb_pad,)).reshape(nb_pad, 1)
    else:
        absmax2d = _pad(absmax, (nb_pad,)).reshape(nb_pad, 1)
        extra = [
            jnp.asarray(np.asarray(DYNAMIC_CODE, np.float32)),
            nested_absmax.astype(jnp.float32),
            jnp.reshape(offset, (1,)).astype(jnp.float32),
        ]
        operands += extra
        in_specs += [pl.BlockSpec(a.shape, lambda i: (0,)) for a in extra]
    out = pl.pallas_call(
        functools.partial(_dequant_kernel, has_table=bool(table), nested_rows=nested_rows),
        out_shape=jax.ShapeDtypeStruct((nb_pad, QBLOCK), dtype),
        grid=(nb_pad // rows,),
        in_specs=[
            *in_specs,
            pl.BlockSpec((rows, QBLOCK // 2), lambda i: (i, 0)),
            pl.BlockSpec((rows, 1), lambda i: (i, 0)),
        ],
        out_specs=pl.BlockSpec((rows, QBLOCK), lambda i: (i, 0)),
        compiler_params=_compiler_params(interpret, config.dequant_num_warps, 1),
        interpret=interpret,
        name="nf4_dequantize",
    )(*operands, packed2d, absmax2d)
    flat = out.reshape(-1)
    if flat.shape[0] != numel:
        flat = flat[:numel]
    return flat.reshape(shape)
