"""``y = x·Wᵀ`` and ``dx = dy·W`` for an NF4 W held in the *quad layout*: one Mosaic GPU kernel
for both orientations, W decoded in registers into the wgmma A operand each time (issue #4).

Why a second layout. :mod:`pallas_kernels.nf4_matmul_mgpu` decodes W in registers for the
forward (92-94% of the bf16 cuBLAS dot at the Llama-8B shapes, BENCHMARKS.md §2), but its
backward decodes W in the forward orientation and stages the bf16 result in shared memory,
because the wgmma register operand of ``dxᵀ = Wᵀ·dyᵀ`` needs ``Wᵀ``: each thread holding pairs
of *neighbouring rows* of W, which no byte of the bitsandbytes packing (two neighbouring
columns) provides. The staging is the part of that kernel's shared-memory traffic the forward
does not have, and it held the backward at 72-82% of the dot. Here W is stored so that one
copy feeds the register operand in both orientations without staging.

The layout. Cut W ``[N, K]`` (padded to multiples of 128) into 16x16 blocks; block ``(nb,
kb)`` becomes an 8x8 block of 16-bit *quads*: quad ``(a, b)`` (``0 <= a, b < 8``) holds the
four codes ``W[a, b]``, ``W[a+8, b]``, ``W[a, b+8]``, ``W[a+8, b+8]`` of the block (nibble
slots 0-3 from the least significant; :data:`SLOTS`). The wgmma register operand of a 16x16
step gives a thread ``r = lane // 4``, ``q = lane % 4`` the rows ``{r, r+8}`` and columns
``{2q, 2q+1, 2q+8, 2q+9}`` of the operand. For the forward the operand is the W block itself,
and those eight codes are exactly quads ``(r, 2q)`` and ``(r, 2q+1)``; for the backward the
operand is the transposed block, and its eight codes are quads ``(2q, r)`` and ``(2q+1, r)``.
Both pairs are one thread's share of an 8x8 16-bit matrix as ``ldmatrix`` delivers it: plain
for the forward, ``.trans`` for the backward. So a warp reads four 16x16 blocks of W per
``ldmatrix.x4`` in either orientation, at the forward's 0.5 bytes of shared memory per weight
(the staging cost ~5). The quad contents are forced by the two orientations; only the slot
order is a choice.

Which blocks a warp reads is where the orientations differ: in the forward warp ``w`` of
compute warpgroup ``wg`` owns the 16 W rows ``nb = 4·wg + w`` of the CTA's 128-row tile and
reads their 8 blocks along K; in the backward it owns the 16 K rows ``kb = 4·wg + w`` (the
16 rows of ``dxᵀ``) and reads their 8 blocks along N. ``ldmatrix`` takes one address per
matrix row, so this is only an address computation (:func:`_quad_row_offset`). Each 128x128
W tile is one ``[64, 64]`` uint16 TMA box in both orientations, and the rows of an 8x8 block,
128 bytes apart in that box, would all hit the same shared-memory banks; :func:`prepare_quad_weight`
therefore stores the 16-byte chunk ``c`` of quad row ``R`` at chunk ``c ^ (R % 8)`` (the
128-byte swizzle, applied once in global memory instead of by the TMA unit).

Scales. One float32 absmax per 64 weights of a row, stored pre-split for the decode's
``fma.rn(v, s_hi, mul.rn(v, s_lo))`` (``s_hi = dtype(s)``, ``s_lo = dtype(s - s_hi)``, the
multiply of :func:`~pallas_kernels.nf4_matmul_mgpu._prmt_asm`, so the weights are the
Mosaic forward's bit for bit) as ``dtype`` pairs of neighbouring rows: per absmax block and
16-row block, 16 uint32 words, ``4·q + 2·h + part`` the ``part`` (0: ``s_hi``, 1: ``s_lo``)
of rows ``16·nb + 8·h + 2q`` (low half) and ``+1`` (high half). A backward thread's pair of
operand columns is exactly such a row pair, so its four scale registers per block are one
16-byte shared load; a forward thread needs one row's scale twice in a pair, one ``prmt``
each. The split ties a prepared weight to x's dtype (bf16 or f16).

The decode (:func:`_quad_asm`): one 32-bit register (two quads, 8 codes) becomes four
operand registers in 33 instructions, 4.1 per weight: per quad 6 ``prmt`` look up the low and
high bytes of 4 codes (the 16-entry table as two 8-byte halves and a blend by bit 3), 8
``prmt`` pair the same slot of the two quads, and per pair ``mul`` + ``fma`` apply the scale.
Per pipeline step a thread decodes 64 weights (~270 instructions) for 2·128·128·block_m flops,
the forward kernel's budget, so the count that put that kernel at 92-94% applies to both
orientations here.

Kernel shape (:func:`_quad_call`), as the Mosaic forward: two compute warpgroups, each with a
``[64, block_m]`` float32 accumulator of ``yᵀ`` (``dxᵀ``) rows, and a memory warpgroup that
streams, per 128-wide reduction step, the two 64-wide halves of the token tile (the B
operands), the W tile and its scales into a ring of ``slots``; the result leaves through a
transposed shared-memory view straight into ``y`` (``dx``). Grid ``(M / block_m, out / 128)``
with the output tiles fastest, so CTAs in flight share token tiles in L2. ``overlap``: one
wgmma stays in flight across the next half-step's decode (``wgmma_wait(1)``), else each
step's two wgmmas are awaited before the next decode.

Interpreter (CPU tests): ``ldmatrix``, inline PTX and register layouts do not exist there, so
:func:`_operand` decodes the whole tile in jnp (:func:`_tile_values`, the same roundings) and
slices the warpgroup's operand. The register-level addressing is checked separately on the
CPU by simulating ``ldmatrix`` over :func:`_quad_row_offset` (tests/test_nf4_quad_mgpu.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.nf4 import NF4Tensor, dequantize_absmax
from pallas_kernels.nf4_matmul_mgpu import (
    _DTYPES,
    _SMEM_BYTES,
    _accumulate,
    _byte_tables,
    _check_nf4,
    _feed,
    _launch,
    _prmt_emulated,
    _round_up,
    _smem_tile,
    _split,
    _wait_all,
    _write_out,
)

__all__ = [
    "QuadConfig",
    "QuadNF4Weight",
    "check_quad_supported",
    "dequantize_quad",
    "nf4_quad_matmul",
    "nf4_quad_matmul_t",
    "prepare_quad_weight",
]

TILE = 128  # W rows and columns per CTA tile and pipeline step
_HALF = 64  # one wgmma's reduction width; one absmax block
_ROWS = 64  # operand rows per compute warpgroup
_COMPUTE_WGS = 2
_BLOCKS = TILE // 16  # 16x16 W blocks per tile side
KERNEL_NAME = "lorax_mgpu_nf4_quad"
KERNEL_NAME_T = "lorax_mgpu_nf4_quad_t"

# Nibble slot s of quad (a, b) holds W[a + 8·ROW_HALF[s], b + 8·COL_HALF[s]] of its 16x16 block.
SLOTS = ((0, 0), (1, 0), (0, 1), (1, 1))  # (row half, column half) per slot


@dataclasses.dataclass(frozen=True)
class QuadConfig:
    """Launch parameters of the quad-layout kernel (both orientations).

    ``block_m``: tokens per CTA, the wgmma N (64, 128, 192 or 256; smaller M uses M rounded
    up to 64); each decoded weight feeds ``2·block_m`` flops. ``slots``: ring depth of the
    token/W/scale stream. ``persistent``: one CTA per SM looping over output tiles (module
    docstring), else one CTA per tile; ``max_ctas`` caps the persistent grid (0: the SM
    count; tests use a few to run many tiles per CTA). ``compute_registers``,
    ``memory_registers``: per-thread register budgets of the two compute warpgroups and the
    memory warpgroup (2·128·232 + 128·40 = 64K registers).
    """

    block_m: int = 256
    slots: int = 2
    persistent: bool = False
    max_ctas: int = 0
    compute_registers: int = 232
    memory_registers: int = 40

    def __post_init__(self) -> None:
        if self.block_m not in (64, 128, 192, 256):
            raise ValueError(f"block_m must be 64, 128, 192 or 256, got {self.block_m}")
        if self.slots < 2:
            raise ValueError(f"slots must be >= 2, got {self.slots}")

    def smem_bytes(self, block_m: int | None = None) -> int:
        """Shared memory allocated at token tile ``block_m`` (default the config's)."""
        bm = self.block_m if block_m is None else block_m
        buffers = [self.slots * bm * _HALF * 2] * 2  # token tile halves
        buffers += [self.slots * TILE * TILE // 2]  # W quads
        buffers += [self.slots * 2 * _BLOCKS * 16 * 4]  # scale words
        buffers += [_COMPUTE_WGS * bm * _ROWS * 2, 1024]  # output tiles, barriers
        return sum(_round_up(b, 1024) for b in buffers)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["quads", "scales"],
    meta_fields=["shape", "dtype"],
)
@dataclasses.dataclass(frozen=True)
class QuadNF4Weight:
    """An NF4 ``W [N, K]`` in the quad layout (module docstring; :func:`prepare_quad_weight`).

    Attributes:
      quads: uint16 ``[Np/2, Kp/2]`` (N, K padded to multiples of 128): quad ``(a, b)`` of 16x16
        block ``(nb, kb)`` at row ``8·nb + a``, column ``8·(kb - kb % 8) + 8·((kb % 8) ^ a) + b``.
      scales: uint32 ``[Kp/64, Np/16, 16]``: word ``4q + 2h + part`` of ``[blk, nb]`` packs
        the ``dtype`` split ``part`` of absmax ``blk`` of rows ``16·nb + 8h + 2q`` (low 16
        bits) and ``+1`` (high); zero in the padding.
      shape: the logical ``(N, K)``.
      dtype: the name of the dtype the scales are split in (x's dtype).
    """

    quads: Array
    scales: Array
    shape: tuple[int, int]
    dtype: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)


def _swizzle_chunks(quads: Array) -> Array:
    """Chunk ``c`` of quad row ``R`` to chunk ``c ^ (R % 8)`` within each 64-column tile; its
    own inverse. ``quads`` is ``[R, C]`` uint16 with R, C multiples of 8 and 64."""
    rows, cols = quads.shape
    # [row block, a, tile, chunk bits 2, 1, 0, b]: XOR by a flips the chunk bits a has set
    # (static flips, no index constants: the interpreter branch runs this inside the kernel).
    q7 = quads.reshape(rows // 8, 8, cols // 64, 2, 2, 2, 8)
    rows_a = [
        jnp.flip(q7[:, a], axis=[2 + i for i in range(3) if a >> (2 - i) & 1] or None)
        if a
        else q7[:, a]
        for a in range(8)
    ]
    return jnp.stack(rows_a, axis=1).reshape(rows, cols)


def _quads_from_codes(codes: Array) -> Array:
    """uint16 quads ``[Np/2, Kp/2]`` (unswizzled) of int codes ``[Np, Kp]``."""
    np_, kp = codes.shape
    c6 = codes.astype(jnp.uint32).reshape(np_ // 16, 2, 8, kp // 16, 2, 8)  # nb,hn,a,kb,hk,b
    words = sum(c6[:, hn, :, :, hk, :] << (4 * s) for s, (hn, hk) in enumerate(SLOTS))
    return words.reshape(np_ // 2, kp // 2).astype(jnp.uint16)


def _codes_from_quads(quads: Array) -> Array:
    """The inverse of :func:`_quads_from_codes`: int32 codes ``[Np, Kp]``."""
    r2, c2 = quads.shape
    q4 = quads.astype(jnp.int32).reshape(r2 // 8, 8, c2 // 8, 8)  # nb, a, kb, b
    nib = [(q4 >> (4 * s)) & 0xF for s in range(4)]
    c6 = jnp.stack(
        [jnp.stack([nib[s] for s in (0, 2)], -2), jnp.stack([nib[s] for s in (1, 3)], -2)], 1
    )
    return c6.reshape(2 * r2, 2 * c2)  # c6: nb, hn, a, kb, hk, b


def _scale_words(scales: Array, dtype: Any) -> Array:
    """uint32 ``[Kp/64, Np/16, 16]`` words of float32 absmax ``[Np, Kp/64]`` (class docstring)."""
    np_, blocks = scales.shape
    parts = [
        jax.lax.bitcast_convert_type(p, jnp.uint16).astype(jnp.uint32)
        for p in _split(scales, dtype)
    ]
    pairs = [p.reshape(np_ // 16, 2, 4, 2, blocks) for p in parts]  # nb, h, q, e, blk
    words = [p[:, :, :, 0] | (p[:, :, :, 1] << 16) for p in pairs]  # nb, h, q, blk
    w5 = jnp.stack(words, axis=-1)  # nb, h, q, blk, part
    return w5.transpose(3, 0, 2, 1, 4).reshape(blocks, np_ // 16, 16)


def _scales_from_words(words: Array, dtype: Any) -> tuple[Array, Array]:
    """``(s_hi, s_lo)`` ``[Np, Kp/64]`` in ``dtype`` from :func:`_scale_words`'s layout."""
    blocks, nbs, _ = words.shape
    w5 = words.reshape(blocks, nbs, 4, 2, 2)  # blk, nb, q, h, part
    halves = jnp.stack([w5 & 0xFFFF, w5 >> 16], axis=-1).astype(jnp.uint16)  # ..., part, e
    bits = halves.transpose(4, 1, 3, 2, 5, 0).reshape(2, nbs * 16, blocks)  # part, n, blk
    values = jax.lax.bitcast_convert_type(bits, jnp.dtype(dtype))
    return values[0], values[1]


@functools.partial(jax.jit, static_argnames=("dtype",))
def prepare_quad_weight(w: NF4Tensor, dtype: Any = jnp.bfloat16) -> QuadNF4Weight:
    """Rewrites a bitsandbytes-layout NF4 ``W [N, K]`` in the quad layout, scales split for
    activations of ``dtype`` (plain XLA: ~1.1 bytes of traffic per weight).

    Call it once per weight and keep the result (a frozen base weight is reused by every
    step); :func:`nf4_quad_matmul` also accepts the NF4Tensor and calls it each time.
    """
    n, k = _check_nf4(w)
    dtype = jnp.dtype(dtype)
    if dtype not in _DTYPES:
        raise ValueError(f"the quad layout splits scales for bf16 or f16 activations, not {dtype}")
    np_, kp = _round_up(n, TILE), _round_up(k, TILE)
    codes = jnp.stack([w.packed >> 4, w.packed & 0xF], axis=-1).reshape(n, k)
    codes = jnp.pad(codes, ((0, np_ - n), (0, kp - k)), constant_values=7)  # 7: the code of 0.0
    scales = dequantize_absmax(w).reshape(n, k // _HALF)
    scales = jnp.pad(scales, ((0, np_ - n), (0, (kp - k) // _HALF)))
    quads = _swizzle_chunks(_quads_from_codes(codes))
    return QuadNF4Weight(quads, _scale_words(scales, dtype), (n, k), dtype.name)


def _values(codes: Array, s_hi: Array, s_lo: Array, dtype: Any) -> Array:
    """Decoded weights ``[rows, cols]`` of codes and per-(row, 64-column block) split scales,
    with the kernel's roundings (:func:`~pallas_kernels.nf4_matmul_mgpu._prmt_emulated`)."""
    reps = codes.shape[1] // s_hi.shape[1]
    s_hi, s_lo = (jnp.repeat(s, reps, axis=1) for s in (s_hi, s_lo))
    return _prmt_emulated(codes, s_hi, s_lo, dtype)


def dequantize_quad(w: QuadNF4Weight) -> Array:
    """``W [N, K]`` in ``w.dtype`` as the kernel decodes it (each weight within one ulp of
    :func:`~pallas_kernels.nf4.dequantize_nf4`: the NF4 value and the product are rounded)."""
    codes = _codes_from_quads(_swizzle_chunks(w.quads))
    s_hi, s_lo = _scales_from_words(w.scales, w.dtype)
    n, k = w.shape
    return _values(codes, s_hi, s_lo, w.dtype)[:n, :k]


def _tile_values(quads: Array, words: Array, dtype: Any) -> Array:
    """One ring slot decoded in jnp: ``[128 N, 128 K]`` from its ``[64, 64]`` quads and ``[2, 8,
    16]`` scale words (interpreter branch of :func:`_operand`)."""
    codes = _codes_from_quads(_swizzle_chunks(quads))
    s_hi, s_lo = _scales_from_words(words, dtype)
    return _values(codes, s_hi, s_lo, dtype)


# ------------------------------------------------------------------------ register level


def _quad_row_offset(lane: Any, warp: Any, wg: Any, half: int, backward: bool) -> Any:
    """Byte offset in a ring slot's ``[64, 64]`` uint16 quad tile of the 8x8 quad row whose
    address ``lane`` gives to ``ldmatrix.x4`` for operand ``half`` of warp ``warp`` of compute
    warpgroup ``wg``. Matrix ``j = lane // 8`` is the operand's ``j``-th 16x16 block along the
    reduction: W block ``(4·wg + warp, 4·half + j)`` forward, ``(4·half + j, 4·wg + warp)``
    backward; row ``a = lane % 8``. Pure integer arithmetic (``+ * & ^ >> <<``) so that it runs
    on Python ints (the CPU simulation in the tests) and on MLIR values (:class:`_I32`).
    """
    j, a = lane >> 3, lane & 7
    own = wg * 4 + warp
    nb, kb = (j + 4 * half, own) if backward else (own, j + 4 * half)
    return (nb * 8 + a) * 128 + ((kb ^ a) << 4)


def _scale_offset(lane: Any, warp: Any, wg: Any, half: int, j: int, backward: bool) -> Any:
    """Byte offset in a ring slot's ``[2, 8, 16]`` uint32 scale words of the 16 bytes a thread
    loads for block ``j`` of operand ``half``: backward, the words ``4q .. 4q+3`` of the row
    pairs ``(2q, 2q+1)`` and ``(2q+8, 2q+9)`` of N block ``4·half + j`` in absmax block ``wg``;
    forward (``j`` unused: one load per operand), those of row pair ``r // 2`` of the warp's N
    block in absmax block ``half``, from which :func:`_broadcast_scale` takes rows ``r``, ``r+8``.
    """
    if backward:
        return ((wg * 8 + (j + 4 * half)) * 16 + ((lane & 3) << 2)) << 2
    return ((warp + (wg * 4 + 8 * half)) * 16 + ((lane >> 3) << 2)) << 2


# Operand register (row half h, 8-column block offset dc) each decoded slot goes to, per 16x16
# block j at columns 16j..16j+15: slot (row half, col half) of the W block is the operand's
# (row half, col half) forward and the swap of them backward (the operand is the transpose).
def _slot_targets(backward: bool) -> tuple[tuple[int, int], ...]:
    return tuple((c, r) if backward else (r, c) for r, c in SLOTS)


def _quad_asm(dtype: Any) -> str:
    """PTX of the decode of one register of two quads into four ``dtype`` operand pairs.

    ``$4``: quads ``s`` (low 16 bits) and ``t``, nibbles ``s0..s3, t0..t3`` from the least
    significant. ``$5, $6`` / ``$7, $8``: ``(s_hi, s_lo)`` pairs of the scale of slots 0 and 2 /
    1 and 3 (one row's scale twice, forward; a row pair's, backward). Outputs ``$i = [v(s_i),
    v(t_i)] · scale`` (the pair of slot ``i``), 33 instructions for 8 weights:

    - ``idx = x & 0x77777777`` and ``sel = ((x >> 1) & 0x44444444) | 0x32103210``, shifted
      by 16 for quad ``t`` (``prmt`` reads its selector from the low 16 bits): as in
      :func:`~pallas_kernels.nf4_matmul_mgpu._prmt_asm`, two 8-entry byte lookups and a blend
      by the code's bit 3 give the low bytes ``lo_s = [lo(s0) .. lo(s3)]`` of the four
      values, and ``hi_s``, ``lo_t``, ``hi_t`` (12 ``prmt``);
    - ``u = [lo(s0), lo(t0), lo(s1), lo(t1)]``, ``v`` likewise from the high bytes (selector
      ``0x5140``), then ``[u0, v0, u1, v1]`` is slot 0's pair and ``[u2, v2, u3, v3]`` slot
      1's (``0x5140``, ``0x7362``); the same from bytes 2-3 for slots 2 and 3 (8 ``prmt``);
    - per pair ``fma.rn(v, s_hi, mul.rn(v, s_lo))`` (8).
    """
    lo, hi = _byte_tables(dtype)
    kind = "bf16x2" if jnp.dtype(dtype) == jnp.bfloat16 else "f16x2"

    def lookup(dst: str, table: list[int], idx: str, sel: str) -> str:
        return (
            f"prmt.b32 p, {table[0]}, {table[1]}, {idx};\n"
            f"prmt.b32 q, {table[2]}, {table[3]}, {idx};\n"
            f"prmt.b32 {dst}, p, q, {sel};\n"
        )

    scale = {0: ("$5", "$6"), 1: ("$7", "$8"), 2: ("$5", "$6"), 3: ("$7", "$8")}
    multiply = "".join(
        f"mul.rn.{kind} c{i}, w{i}, {scale[i][1]};\n"
        f"fma.rn.{kind} ${i}, w{i}, {scale[i][0]}, c{i};\n"
        for i in range(4)
    )
    return (
        "{\n.reg .b32 idx, sel, t, idx2, sel2, p, q, los, his, lot, hit, u, v, "
        "w0, w1, w2, w3, c0, c1, c2, c3;\n"
        "and.b32 idx, $4, 0x77777777;\n"
        "shr.u32 t, $4, 1;\n"
        "lop3.b32 sel, t, 0x44444444, 0x32103210, 0xea;\n"
        "shr.u32 idx2, idx, 16;\n"
        "shr.u32 sel2, sel, 16;\n"
        + lookup("los", lo, "idx", "sel")
        + lookup("his", hi, "idx", "sel")
        + lookup("lot", lo, "idx2", "sel2")
        + lookup("hit", hi, "idx2", "sel2")
        + "prmt.b32 u, los, lot, 0x5140;\n"
        "prmt.b32 v, his, hit, 0x5140;\n"
        "prmt.b32 w0, u, v, 0x5140;\n"
        "prmt.b32 w1, u, v, 0x7362;\n"
        "prmt.b32 u, los, lot, 0x7362;\n"
        "prmt.b32 v, his, hit, 0x7362;\n"
        "prmt.b32 w2, u, v, 0x5140;\n"
        "prmt.b32 w3, u, v, 0x7362;\n" + multiply + "}\n"
    )


class _I32:
    """An MLIR i32 value with the integer operators :func:`_quad_row_offset` uses."""

    def __init__(self, value: Any):
        self.value = value

    @staticmethod
    def _raw(other: Any) -> Any:
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith

        if isinstance(other, _I32):
            return other.value
        return arith.constant(ir.IntegerType.get_signless(32), int(other))

    def _op(self, name: str, other: Any, swap: bool = False) -> _I32:
        from jax._src.lib.mlir.dialects import arith

        a, b = self.value, self._raw(other)
        return _I32(getattr(arith, name)(*((b, a) if swap else (a, b))))

    def __add__(self, o: Any) -> _I32:
        return self._op("addi", o)

    def __radd__(self, o: Any) -> _I32:
        return self._op("addi", o, True)

    def __mul__(self, o: Any) -> _I32:
        return self._op("muli", o)

    def __rmul__(self, o: Any) -> _I32:
        return self._op("muli", o, True)

    def __and__(self, o: Any) -> _I32:
        return self._op("andi", o)

    def __xor__(self, o: Any) -> _I32:
        return self._op("xori", o)

    def __rxor__(self, o: Any) -> _I32:
        return self._op("xori", o, True)

    def __rshift__(self, o: Any) -> _I32:
        return self._op("shrui", o)

    def __lshift__(self, o: Any) -> _I32:
        return self._op("shli", o)


@functools.cache
def _operand_fn(dtype: Any, half: int, backward: bool) -> Any:
    """The ``plgpu.inline_mgpu`` function building operand ``half`` of a ring slot in registers:
    ``ldmatrix.x4`` (``.trans`` backward) of four quad blocks, the scale loads, and
    :func:`_quad_asm` per register, placed in the ``[64, 64]`` WGMMA layout."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    asm = _quad_asm(dtype)
    layout = plgpu.Layout.WGMMA
    out_type = plgpu.ShapeDtypeStruct((_ROWS, _HALF), dtype, layout=layout)
    trans = ".trans" if backward else ""
    targets = _slot_targets(backward)

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()), return_type=out_type)
    def operand(ctx: Any, quads: Any, words: Any) -> Any:
        del ctx
        i32 = ir.IntegerType.get_signless(32)
        pair = ir.VectorType.get((2,), mgpu_utils.dtype_to_ir_type(jnp.dtype(dtype)))

        def address(ref: Any, offset: _I32) -> Any:
            base = _I32(llvm.ptrtoint(i32, mgpu_utils.memref_ptr(ref)))
            return (base + offset).value

        def asm_call(n_out: int, text: str, args: list[Any], side_effects: bool) -> list[Any]:
            outs = ",".join(["=r"] * n_out) + "," + ",".join(["r"] * len(args))
            result = i32 if n_out == 1 else llvm.StructType.get_literal([i32] * n_out)
            res = llvm.inline_asm(result, args, text, outs, has_side_effects=side_effects)
            if n_out == 1:
                return [res]
            return [llvm.extractvalue(i32, res, [i]) for i in range(n_out)]

        tid = _I32(mgpu_utils.thread_idx())
        lane, warp = tid & 31, (tid >> 5) & 3
        wg = _I32(mgpu_utils.warpgroup_idx(sync=True))
        row = address(quads, _quad_row_offset(lane, warp, wg, half, backward))
        regs = asm_call(
            4, f"ldmatrix.sync.aligned.m8n8.x4{trans}.shared.b16 {{$0, $1, $2, $3}}, [$4];",
            [row], True,
        )  # fmt: skip
        load4 = "ld.shared.v4.b32 {$0, $1, $2, $3}, [$4];"
        if backward:
            scales = [
                asm_call(
                    4, load4, [address(words, _scale_offset(lane, warp, wg, half, j, True))], True
                )  # fmt: skip
                for j in range(4)
            ]
        else:
            hi_a, lo_a, hi_b, lo_b = asm_call(
                4, load4, [address(words, _scale_offset(lane, warp, wg, half, 0, False))], True
            )
            # Row r's half of each pair word, twice: selector 0x1010 (low) or 0x3232 (high).
            sel = (((lane >> 2) & 1) * 0x2222 + 0x1010).value
            bcast = [
                asm_call(1, "prmt.b32 $0, $1, $1, $2;", [v, sel], False)[0]
                for v in (hi_a, lo_a, hi_b, lo_b)
            ]
            scales = [bcast] * 4
        registers = np.empty(layout.to_mgpu().registers_shape((_ROWS, _HALF)), dtype=object)
        for j in range(4):
            outs = asm_call(4, asm, [regs[j], *scales[j]], False)
            for (h, dc), value in zip(targets, outs, strict=True):
                registers[0, 2 * j + dc, 0, 0, h, 0, 0, 0, 0] = mgpu_utils.bitcast(value, pair)
        return fa.FragmentedArray(_registers=registers, _layout=layout.to_mgpu(), _is_signed=None)

    return operand


def _operand(quads: Any, words: Any, half: int, wg: Array, backward: bool, dtype: Any,
             interpret: Any) -> Array:  # fmt: skip
    """Operand ``half`` (``[64, 64]``, the wgmma A) of compute warpgroup ``wg`` from one ring
    slot: rows ``64·wg ..`` and reduction columns ``64·half ..`` of the W tile (forward) or of
    its transpose (backward)."""
    if interpret is None:
        return _operand_fn(jnp.dtype(dtype), half, backward)(quads, words)
    values = _tile_values(quads[...], words[...], dtype)  # Interpreter: decode in jnp.
    if backward:
        values = values.T
    rows = lax.dynamic_slice_in_dim(values, wg * _ROWS, _ROWS, 0)
    return rows[:, half * _HALF : (half + 1) * _HALF]


# ------------------------------------------------------------------------------------ kernel


def _sm_count() -> int:
    """Streaming multiprocessors of the default device (132 on an H100/H200 SXM, the fallback
    when lowering without a GPU)."""
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def _quad_call(lhs: Array, quads: Array, words: Array, block_m: int, config: QuadConfig,
               backward: bool, interpret: Any) -> Array:  # fmt: skip
    """``y [Mp, Np]`` (``lhs = x [Mp, Kp]``) or, ``backward``, ``dx [Mp, Kp]`` (``lhs = dy [Mp,
    Np]``) for padded operands (module docstring, "Kernel shape").

    Output tile ``t`` is ``(t // out_tiles, t % out_tiles)`` in (token, output column) tiles.
    One CTA per tile, or (``config.persistent``) one per SM, CTA ``c`` taking tiles ``c, c +
    G, ...``: its memory warpgroup streams them back to back through the one ring, and each
    tile's output store is left in flight until the next tile's epilogue reuses the tile.
    """
    mp, red = lhs.shape
    np_, kp = 2 * quads.shape[0], 2 * quads.shape[1]
    out_cols = kp if backward else np_
    bm, slots, dtype = block_m, config.slots, lhs.dtype
    steps = red // TILE
    m_tiles, out_tiles = mp // bm, out_cols // TILE
    tiles = m_tiles * out_tiles
    ctas = min(tiles, config.max_ctas or _sm_count()) if config.persistent else tiles

    def kernel(lhs_ref, q_ref, s_ref, out_ref, scoped):
        (lhs_lo, lhs_hi, q_ring, s_ring, out_smem), (load_bars, free) = scoped
        cta, wg = lax.axis_index("ctas"), lax.axis_index("wg")
        own_tiles = (tiles - cta + ctas - 1) // ctas if config.persistent else 1
        halves = (lhs_lo, lhs_hi)

        def coords(t: Any) -> tuple[Array, Array]:
            tile = cta + t * ctas
            return tile // out_tiles, tile % out_tiles

        @pl.when(wg < _COMPUTE_WGS)
        def _compute() -> None:
            plgpu.set_max_registers(config.compute_registers, action="increase")

            def step(g: Array, acc: Array) -> Array:
                slot = lax.rem(g, slots)
                _wait_all(load_bars, slot)
                terms = [
                    (
                        functools.partial(
                            _operand,
                            q_ring.at[slot],
                            s_ring.at[slot],
                            half,
                            wg,
                            backward,
                            dtype,
                            interpret,
                        ),  # fmt: skip
                        halves[half].at[slot],
                    )
                    for half in (0, 1)
                ]
                acc = _accumulate(acc, terms, interpret)
                plgpu.barrier_arrive(free.at[slot])
                return acc

            def tile(t: Array, carry: Any) -> Any:
                m_tile, o_tile = coords(t)
                zeros = jnp.zeros((_ROWS, bm), jnp.float32)
                if interpret is None:
                    zeros = plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)
                acc = lax.fori_loop(t * steps, (t + 1) * steps, step, zeros).astype(dtype)
                _write_out(acc, [out_smem.at[wg]], out_ref, m_tile * bm,
                           o_tile * TILE + wg * _ROWS, True, interpret,
                           pending=config.persistent)  # fmt: skip
                return carry

            lax.fori_loop(0, own_tiles, tile, None)
            if config.persistent:
                plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == _COMPUTE_WGS)
        def _memory() -> None:
            plgpu.set_max_registers(config.memory_registers, action="decrease")
            bar_lo, bar_hi, q_bar, s_bar = load_bars

            def load(g: Array, slot: Array) -> None:
                m_tile, o_tile = coords(g // steps)
                i = lax.rem(g, steps)
                tokens, r0 = pl.ds(m_tile * bm, bm), i * TILE
                own = pl.ds(o_tile * (TILE // 2), TILE // 2)  # the tile's quad rows or columns
                step_quads = pl.ds(i * (TILE // 2), TILE // 2)
                if backward:  # reduce over N: quad rows of step i, the tile's K columns
                    q_src = q_ref.at[step_quads, own]
                    s_src = s_ref.at[pl.ds(o_tile * 2, 2), pl.ds(i * _BLOCKS, _BLOCKS)]
                else:
                    q_src = q_ref.at[own, step_quads]
                    s_src = s_ref.at[pl.ds(i * 2, 2), pl.ds(o_tile * _BLOCKS, _BLOCKS)]
                copies = (
                    (lhs_ref.at[tokens, pl.ds(r0, _HALF)], lhs_lo, bar_lo),
                    (lhs_ref.at[tokens, pl.ds(r0 + _HALF, _HALF)], lhs_hi, bar_hi),
                    (q_src, q_ring, q_bar),
                    (s_src, s_ring, s_bar),
                )
                for src, ring, bar in copies:
                    plgpu.copy_gmem_to_smem(src, ring.at[slot], bar.at[slot])

            _feed(load, free, own_tiles * steps, slots)

    scratch = (
        _smem_tile((slots, bm, _HALF), dtype),  # token tile, reduction columns 0-63 of the step
        _smem_tile((slots, bm, _HALF), dtype),  # columns 64-127
        plgpu.SMEM((slots, TILE // 2, TILE // 2), jnp.uint16),  # quads (pre-swizzled)
        plgpu.SMEM((slots, 2, _BLOCKS, 16), jnp.uint32),  # scale words
        _smem_tile((_COMPUTE_WGS, bm, _ROWS), dtype),  # the output tiles on their way out
    )
    name = KERNEL_NAME_T if backward else KERNEL_NAME
    return _launch(kernel, (lhs, quads, words), scratch, 4, slots, (ctas,), ("ctas",),
                   (mp, out_cols), dtype, name, interpret)  # fmt: skip


# ------------------------------------------------------------------------------- public API


def _token_tile(m: int, config: QuadConfig) -> int:
    return min(config.block_m, _round_up(m, _ROWS))


def check_quad_supported(lhs: Any, w: NF4Tensor | QuadNF4Weight, config: QuadConfig, *,
                         backward: bool = False) -> None:  # fmt: skip
    """Raises ``ValueError`` naming the first requirement ``x·Wᵀ`` (``backward``: ``dy·W``)
    misses: the reduction width, bf16/f16 activations matching a prepared weight's dtype,
    K % 64 == 0 (whole absmax blocks per row), and the shared memory of the token tile."""
    n, k = w.shape if isinstance(w, QuadNF4Weight) else _check_nf4(w)
    name, dim = ("dy", ("N", n)) if backward else ("x", ("K", k))
    if lhs.ndim < 1 or lhs.shape[-1] != dim[1]:
        raise ValueError(
            f"{name} {tuple(lhs.shape)} must end in {dim[0]}={dim[1]} (W is [N, K] = [{n}, {k}])"
        )
    if jnp.dtype(lhs.dtype) not in _DTYPES:
        raise ValueError(f"{name} dtype {lhs.dtype}: the quad NF4 kernel needs bf16 or f16")
    if isinstance(w, QuadNF4Weight) and jnp.dtype(lhs.dtype) != jnp.dtype(w.dtype):
        raise ValueError(
            f"{name} is {jnp.dtype(lhs.dtype).name} but the weight's scales were split for "
            f"{w.dtype}; call prepare_quad_weight(w, dtype={jnp.dtype(lhs.dtype).name})"
        )
    m = int(np.prod(lhs.shape[:-1]))
    if m == 0:
        raise ValueError(f"{name} {tuple(lhs.shape)} has no rows")
    bm = _token_tile(m, config)
    if config.smem_bytes(bm) > _SMEM_BYTES:
        raise ValueError(
            f"config {config} needs {config.smem_bytes(bm)} bytes of shared memory at block_m "
            f"{bm} (limit {_SMEM_BYTES}); use fewer slots or a smaller block_m"
        )


@functools.partial(jax.jit, static_argnames=("config", "interpret", "backward"))
def _matmul(lhs: Array, w: QuadNF4Weight, config: QuadConfig, interpret: Any,
            backward: bool) -> Array:  # fmt: skip
    """Pads the rows to the token tile and the reduction to W's padded extent, runs the kernel,
    slices."""
    n, k = w.shape
    np_, kp = 2 * w.quads.shape[0], 2 * w.quads.shape[1]
    red, red_padded, out = (n, np_, k) if backward else (k, kp, n)
    lead = lhs.shape[:-1]
    lhs2 = lhs.reshape(-1, red)
    m = lhs2.shape[0]
    bm = _token_tile(m, config)
    mp = _round_up(m, bm)
    if (mp, red_padded) != (m, red):
        lhs2 = jnp.pad(lhs2, ((0, mp - m), (0, red_padded - red)))
    y = _quad_call(lhs2, w.quads, w.scales, bm, config, backward, interpret)
    return y[:m, :out].reshape(*lead, out)


def _prepared(lhs: Array, w: NF4Tensor | QuadNF4Weight) -> QuadNF4Weight:
    return w if isinstance(w, QuadNF4Weight) else prepare_quad_weight(w, jnp.dtype(lhs.dtype))


def nf4_quad_matmul(x: Array, w: NF4Tensor | QuadNF4Weight, *,
                    config: QuadConfig = QuadConfig(), interpret: Any = None) -> Array:  # fmt: skip
    """``x · Wᵀ`` for ``x [..., K]`` (bf16/f16) and an NF4 ``W [N, K]``; returns ``[..., N]``.

    Float32 accumulation, one rounding to ``x.dtype``; the weights as :func:`dequantize_quad`
    gives them. ``w``: a :class:`QuadNF4Weight` (or an NF4Tensor, rewritten on every call).
    ``interpret``: a Mosaic GPU interpreter parameter object (CPU tests), or None for the GPU.
    """
    check_quad_supported(x, w, config)
    return _matmul(x, _prepared(x, w), config, interpret, backward=False)


def nf4_quad_matmul_t(dy: Array, w: NF4Tensor | QuadNF4Weight, *,
                      config: QuadConfig = QuadConfig(), interpret: Any = None,
                      ) -> Array:  # fmt: skip
    """``dy · W`` for ``dy [..., N]`` (bf16/f16) and an NF4 ``W [N, K]``; returns ``[..., K]``:
    the input gradient of :func:`nf4_quad_matmul`, on the same weight."""
    check_quad_supported(dy, w, config, backward=True)
    return _matmul(dy, _prepared(dy, w), config, interpret, backward=True)
