"""``y = x·Wᵀ`` and ``dx = dy·W`` for an NF4 W as one Mosaic GPU kernel (Hopper: TMA + wgmma),
W decoded in registers straight into the tensor cores in both orientations (issue #4).

Why. XLA's decode-then-dot writes a 16-bit W and reads it back (4.5 bytes of traffic per
weight against the 0.5 NF4 needs) in a separate memory-bound pass. Here W never exists in 16
bits outside the registers of the warpgroup that multiplies it: a wgmma's A operand may live in
registers, so the decoded W is the A operand of ``yᵀ = W·xᵀ`` (forward) or of ``dxᵀ = Wᵀ·dyᵀ``
(backward), and a token tile of x (dy) is the shared-memory B operand.

The layout (:func:`prepare_weight`, run once per weight and kept: the *quad layout*). The
register A operand of a 16x16 step gives thread ``r = lane // 4``, ``q = lane % 4`` the rows
``{r, r+8}`` and columns ``{2q, 2q+1, 2q+8, 2q+9}``. bitsandbytes packs two neighbouring
*columns* of W per byte, which serves the forward but not the backward, whose operand is
``Wᵀ``: each thread needs pairs of neighbouring *rows*. So W (padded to multiples of 128) is
cut into 16x16 blocks and each becomes an 8x8 block of 16-bit *quads*: quad ``(a, b)`` holds
the four codes ``W[a, b]``, ``W[a+8, b]``, ``W[a, b+8]``, ``W[a+8, b+8]`` (nibble slots 0-3,
:data:`SLOTS`). A forward thread's eight codes are then exactly quads ``(r, 2q)``, ``(r,
2q+1)``, and a backward thread's are quads ``(2q, r)``, ``(2q+1, r)``: one thread's share of an
8x8 16-bit matrix as ``ldmatrix`` delivers it, plain forward and ``.trans`` backward. A warp
reads four 16x16 blocks per ``ldmatrix.x4`` in either orientation, 0.5 bytes of shared memory
per weight; the quad contents are forced by the two orientations, only the slot order is a
choice. The orientations differ in which blocks a warp reads: forward, warp ``w`` of compute
warpgroup ``wg`` owns the 16 W rows ``nb = 4·wg + w`` of the CTA's 128-row tile and reads their
8 blocks along K; backward it owns the 16 K rows ``kb = 4·wg + w`` (16 rows of ``dxᵀ``) and
reads their 8 blocks along N. ``ldmatrix`` takes one address per matrix row, so this is only
an address computation (:func:`_quad_row_offset`). Each 128x128 W tile is one ``[64, 64]``
uint16 TMA box in both orientations; the rows of an 8x8 block would sit 128 bytes apart there,
all in the same shared-memory banks, so the 16-byte chunk ``c`` of quad row ``R`` is stored at
chunk ``c ^ (R % 8)`` (the 128-byte swizzle, applied once in global memory by the repack).

Scales. One float32 absmax per 64 weights of a row, stored pre-split for the multiply
``fma.rn(v, s_hi, mul.rn(v, s_lo))`` (``s_hi = dtype(s)``, ``s_lo = dtype(s - s_hi)``: the
scale's float32 precision kept, one rounding of the product) as ``dtype`` pairs of
neighbouring rows: per absmax block and 16-row block, 16 uint32 words, word ``4·q + 2·h +
part`` the ``part`` (0: ``s_hi``, 1: ``s_lo``) of rows ``16·nb + 8·h + 2q`` (low half) and
``+1`` (high half). A backward thread's operand column pair is such a row pair, so its four
scale registers per block are one 16-byte shared load; a forward thread needs one row's scale
twice in a pair, one ``prmt`` each. The split ties a prepared weight to x's dtype.

The decode (:func:`_quad_asm`, inline PTX). Mosaic GPU has no gather, and a select tree costs
~22 instructions per weight (on the H200 that held an earlier kernel to 45-51% of the bf16
dot). The byte permute ``prmt.b32`` is a 4-lane lookup into an 8-byte table held in two
32-bit operands, so two of them and a blend by the code's bit 3 look up one byte of the
16-entry table of ``dtype`` bit patterns for 4 codes at once. One 32-bit register (two quads,
8 codes) becomes four operand registers in 33 instructions (4.1 per weight): 12 ``prmt``
lookups for the low and high bytes, 8 ``prmt`` pairing the same slot of the two quads, and
``mul`` + ``fma`` per pair. A weight is the NF4 value rounded to ``dtype`` times the split
scale rounded once: within one ulp of :func:`~pallas_kernels.nf4.dequantize_nf4` (~17% of
them differ), ``y`` ~2.9e-3 rel. L2 from the float32 product where bf16 output rounding
alone gives ~1.7e-3.

Kernel shape (:func:`_quad_call`). Per CTA two compute warpgroups, each with a ``[64,
block_m]`` float32 accumulator of ``yᵀ`` (``dxᵀ``) rows, and a memory warpgroup that streams,
per 128-wide reduction step, the two 64-wide halves of the token tile (the B operands), the W
tile and its scales into a ring of ``slots``. Each step a compute warpgroup decodes operand
half 0, issues its wgmma, decodes half 1 while that runs, issues the second, and waits for
both before the next step (the two warpgroups interleave, one decoding while the other's
wgmmas run); keeping one wgmma in flight across steps measured 2-5% slower on the H200. Per
step a thread decodes 64 weights (~270 instructions) for ``2·128·128·block_m`` flops: at
``block_m = 256`` the decode needs ~0.27 of the tensor cores' time per step, hidden behind the
other warpgroup's wgmmas (``block_m = 128`` doubles the ratio and measured 64-74% of the bf16
dot). The result leaves through a transposed shared-memory view straight into ``y`` (``dx``).
``persistent`` (default): one CTA per SM loops over output tiles, its memory warpgroup
streaming them back to back through one ring and each tile's store left in flight until the
next tile's epilogue, which hides the fill and the epilogue (1-14% faster, most where the
reduction is short: ``dy·W`` of a 1024-row W). Output tiles run with the output columns
fastest, so CTAs in flight share token tiles in L2.

Measured on the H200 (BENCHMARKS.md §2, the four Llama-8B projection shapes at M = 4096,
8192, 16384, W prepared once), against cuBLAS with a bf16 result: 86-95% of the bf16 dot of
the same shape in both orientations. Against XLA's decode-then-dot it is 1.04-1.19x on the
attention shapes (K = 4096, N = 4096 or 1024) at M = 4096 and 0.88-0.99x everywhere else.
All of these run at the board's 700 W cap, where what counts is energy per flop. The kernel
decodes each weight once per token tile, where XLA decodes it once per call, so the larger
M, the more XLA's single memory-bound decode pass wins (``scripts/probe_power_nf4.py``).

LoRA and projection groups. ``low_rank = (u, v)`` adds ``u·vᵀ`` in the same accumulator as
``R / 64`` more reduction steps per tile, their dense operands streamed through the same ring
(:func:`_quad_call`): LoRA's up-projection ``s·(x·Aᵀ)·Bᵀ`` forward and ``s·(dy·B)·A``
backward, summed before the one rounding. Weights of the same K stack along N
(:func:`stack_prepared`: the layout is tiled by 128 rows, so stacking is a concatenation), so
the projections that share an input (q/k/v, gate/up) are one call per direction. On the H200
(``check_nf4_lora_group_mgpu.py``) the grouped results match the float32 reference to
2.7-2.9e-3 (rel. L2; the XLA path 2.3-2.9e-3). With LoRA, fwd+bwd, they run at 0.95-1.13x the
default XLA path per group (BENCHMARKS.md §2).

Shapes. K must be a multiple of 64 (whole absmax blocks per row; :func:`check_supported`
raises otherwise). N and K are padded to multiples of 128 by the repack (code 7, the code of
0.0, and zero scales), M to the token tile ``min(block_m, M rounded up to 64)`` by the wrapper
(smaller where the launch would leave most SMs idle: :func:`_token_tile`).
x must be bf16 or f16; blocksize 64; one matrix (no layer axis).

Interpreter (CPU tests): ``ldmatrix``, inline PTX, register layouts and transposed views do
not exist there, so :func:`_operand` decodes each ring slot in jnp (:func:`_tile_values`, the
same roundings) and slices the warpgroup's operand, and the epilogue transposes with ``.T``.
The register-level addressing is checked separately on the CPU by simulating ``ldmatrix`` over
:func:`_quad_row_offset` and running :func:`_quad_asm` in a PTX emulator
(tests/test_nf4_matmul_mgpu.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.nf4 import NF4_CODE, NF4Tensor, dequantize_absmax, dequantize_nf4
from pallas_kernels.nf4_matmul_kernels import QBLOCK, nf4_lookup

__all__ = [
    "MgpuNF4Config",
    "MgpuNF4Weight",
    "check_supported",
    "dequantize_prepared",
    "nf4_matmul_mgpu",
    "nf4_matmul_mgpu_reference",
    "nf4_matmul_t_mgpu",
    "nf4_matmul_t_mgpu_reference",
    "prepare_weight",
    "stack_prepared",
    "stacked_member",
]

_QBLOCK = QBLOCK  # the NF4 blocksize this kernel handles (as the Pallas kernels)
_SMEM_BYTES = 227 * 1024  # H100/H200 per-block shared memory limit
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
TILE = 128  # W rows and columns per CTA tile and pipeline step
_HALF = 64  # one wgmma's reduction width; one absmax block
_ROWS = 64  # operand rows per compute warpgroup
_COMPUTE_WGS = 2
_BLOCKS = TILE // 16  # 16x16 W blocks per tile side
KERNEL_NAME = "lorax_mgpu_nf4_matmul"
KERNEL_NAME_T = "lorax_mgpu_nf4_matmul_t"

# Nibble slot s (bits 4s..4s+3) of quad (a, b) holds W[a + 8·SLOTS[s][0], b + 8·SLOTS[s][1]] of
# its 16x16 block: (row half, column half) per slot.
SLOTS = ((0, 0), (1, 0), (0, 1), (1, 1))


@dataclasses.dataclass(frozen=True)
class MgpuNF4Config:
    """Launch parameters of the quad-layout kernel (both orientations).

    ``block_m``: tokens per CTA, the wgmma N (64, 128, 192 or 256; smaller M uses M rounded
    up to 64); each decoded weight feeds ``2·block_m`` flops. ``slots``: ring depth of the
    token/W/scale stream. ``persistent``: one CTA per SM looping over output tiles (module
    docstring), else one CTA per tile; ``max_ctas`` caps the persistent grid (0: the SM
    count; tests use a few to run many tiles per CTA). ``group_m``: output tiles run in
    groups of that many token tiles, token tiles fastest within a group, so the CTAs in flight
    share W tiles as well as token tiles in L2 (1: output columns fastest, W streamed once
    per token tile, the default; 4 and 8 measured 1-9% slower on the H200, also for the
    stacked gate/up W of 58 MB, more than L2: BENCHMARKS.md §2). ``compute_registers``,
    ``memory_registers``: per-thread register budgets of the two compute warpgroups and the
    memory warpgroup (2·128·232 + 128·40 = 64K registers). ``fill_sms``: at small M on a
    narrow output, shrink the token tile (down to 64, or 128 with a low-rank term) while the
    launch would have fewer tiles than half the SMs (:func:`_token_tile`); off, the tile is
    ``block_m`` or M rounded up to 64, whichever is smaller.
    """

    block_m: int = 256
    slots: int = 2
    persistent: bool = True
    max_ctas: int = 0
    group_m: int = 1
    compute_registers: int = 232
    memory_registers: int = 40
    fill_sms: bool = True

    def __post_init__(self) -> None:
        if self.block_m not in (64, 128, 192, 256):
            raise ValueError(f"block_m must be 64, 128, 192 or 256, got {self.block_m}")
        if self.slots < 2:
            raise ValueError(f"slots must be >= 2, got {self.slots}")
        if self.group_m < 1:
            raise ValueError(f"group_m must be >= 1, got {self.group_m}")

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
    meta_fields=["shape", "dtype", "members"],
)
@dataclasses.dataclass(frozen=True)
class MgpuNF4Weight:
    """An NF4 ``W [N, K]`` in the quad layout (module docstring; :func:`prepare_weight`), or
    several weights of the same K stacked along N (:func:`stack_prepared`).

    Attributes:
      quads: uint16 ``[Np/2, Kp/2]`` (N, K padded to multiples of 128): quad ``(a, b)`` of 16x16
        block ``(nb, kb)`` at row ``8·nb + a``, column ``8·(kb - kb % 8) + 8·((kb % 8) ^ a) + b``.
        Leading axes (a model's layer axis) are allowed outside the kernel (``lax.scan``
        slices them off); the kernel takes one matrix.
      scales: uint32 ``[Kp/64, Np/16, 16]``: word ``4q + 2h + part`` of ``[blk, nb]`` packs
        the ``dtype`` split ``part`` of absmax ``blk`` of rows ``16·nb + 8h + 2q`` (low 16
        bits) and ``+1`` (high); zero in the padding.
      shape: the logical ``(N, K)``; for a stack, N runs to the last member's last row.
      dtype: the name of the dtype the scales are split in (x's dtype).
      members: ``(row offset, rows)`` of each stacked weight (offsets multiples of 128; the
        rows between members decode to zeros); ``((0, N),)`` for one weight.
    """

    quads: Array
    scales: Array
    shape: tuple[int, int]
    dtype: str
    members: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        members = self.members or ((0, self.shape[0]),)
        object.__setattr__(self, "members", tuple((int(o), int(n)) for o, n in members))


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
        lax.bitcast_convert_type(p, jnp.uint16).astype(jnp.uint32) for p in _split(scales, dtype)
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
    values = lax.bitcast_convert_type(bits, jnp.dtype(dtype))
    return values[0], values[1]


@functools.partial(jax.jit, static_argnames=("dtype",))
def prepare_weight(w: NF4Tensor, dtype: Any = jnp.bfloat16) -> MgpuNF4Weight:
    """Rewrites a bitsandbytes-layout NF4 ``W [N, K]`` in the quad layout, scales split for
    activations of ``dtype`` (plain XLA: ~1.1 bytes of traffic per weight).

    Call it once per weight and keep the result (a frozen base weight is reused by every
    step); :func:`nf4_matmul_mgpu` also accepts the NF4Tensor and calls it each time.
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
    return MgpuNF4Weight(quads, _scale_words(scales, dtype), (n, k), dtype.name)


def stack_prepared(ws: Sequence[MgpuNF4Weight]) -> MgpuNF4Weight:
    """Prepared weights of the same K and dtype stacked along N, each from a 128-row boundary,
    so that one kernel call computes the products of all of them (the model's q/k/v and
    gate/up): the quad layout is tiled by 128 rows, so stacking is a concatenation. Keep the
    result, as for :func:`prepare_weight` (the concatenation copies every byte)."""
    if not ws:
        raise ValueError("stack_prepared needs at least one weight")
    k, dtype = ws[0].shape[1], ws[0].dtype
    for i, w in enumerate(ws):
        if w.shape[1] != k or w.dtype != dtype:
            raise ValueError(
                f"stacked weights need one K and dtype: weight {i} is {w.shape} {w.dtype}, "
                f"weight 0 is {ws[0].shape} {dtype}"
            )
    members, start = [], 0
    for w in ws:
        members += [(start + offset, n) for offset, n in w.members]
        start += 2 * w.quads.shape[-2]
    n = members[-1][0] + members[-1][1]
    return MgpuNF4Weight(
        jnp.concatenate([w.quads for w in ws], axis=-2),
        jnp.concatenate([w.scales for w in ws], axis=-2),
        (n, k),
        dtype,
        tuple(members),
    )


def stacked_member(w: MgpuNF4Weight, index: int) -> MgpuNF4Weight:
    """Member ``index`` of a :func:`stack_prepared` weight as a weight of its own (a copy:
    for calls that cannot take the stack, such as per-member LoRA dropout)."""
    offset, n = w.members[index]
    rows = _round_up(n, TILE)
    return MgpuNF4Weight(
        w.quads[..., offset // 2 : (offset + rows) // 2, :],
        w.scales[..., offset // 16 : (offset + rows) // 16, :],
        (n, w.shape[1]),
        w.dtype,
    )


def _tile_values(quads: Array, words: Array, dtype: Any) -> Array:
    """Quads ``[R, C]`` and their scale words ``[C/32, R/8, 16]`` decoded in jnp to ``[2R, 2C]``
    with the kernel's roundings (:func:`_prmt_emulated`): one ring slot (``[64, 64]`` and
    ``[2, 8, 16]``, the interpreter branch of :func:`_operand`) or a whole weight."""
    codes = _codes_from_quads(_swizzle_chunks(quads))
    s_hi, s_lo = (jnp.repeat(s, _HALF, axis=1) for s in _scales_from_words(words, dtype))
    return _prmt_emulated(codes, s_hi, s_lo, dtype)


def dequantize_prepared(w: MgpuNF4Weight) -> Array:
    """``W [N, K]`` in ``w.dtype`` as the kernel decodes it (each weight within one ulp of
    :func:`~pallas_kernels.nf4.dequantize_nf4`: the NF4 value and the product are rounded)."""
    n, k = w.shape
    return _tile_values(w.quads, w.scales, w.dtype)[:n, :k]


# ---------------------------------------------------------------------------- helpers


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _check_nf4(w: NF4Tensor) -> tuple[int, int]:
    if not isinstance(w, NF4Tensor):
        raise TypeError(f"w must be an NF4Tensor or MgpuNF4Weight, got {type(w).__name__}")
    if len(w.shape) != 2 or w.packed.ndim != 1:
        raise ValueError(
            f"nf4_matmul_mgpu takes one 2-D NF4 matrix [N, K] (no layer axis); got shape "
            f"{w.shape} with packed {w.packed.shape}"
        )
    n, k = w.shape
    if w.blocksize != _QBLOCK:
        raise ValueError(
            f"the Mosaic GPU NF4 kernel handles blocksize {_QBLOCK}, not {w.blocksize}"
        )
    if k % _QBLOCK:
        raise ValueError(
            f"the Mosaic GPU NF4 kernel needs K % {_QBLOCK} == 0 (whole absmax blocks per row of "
            f"W); W has shape [N, K] = [{n}, {k}]. Use another nf4_lora_matmul variant."
        )
    return n, k


def _smem_tile(shape: tuple[int, ...], dtype: Any) -> Any:
    """A shared-memory buffer laid out for TMA and wgmma: rows swizzled by their byte width."""
    row_bytes = min(128, shape[-1] * jnp.dtype(dtype).itemsize)
    row = row_bytes // jnp.dtype(dtype).itemsize
    transforms = (plgpu.TilingTransform((8, row)), plgpu.SwizzleTransform(row_bytes))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def _nf4_bits(dtype: Any) -> np.ndarray:
    """The 16 NF4 values rounded to ``dtype`` (bf16/f16), as uint16 bit patterns."""
    return np.asarray(NF4_CODE, np.float32).astype(jnp.dtype(dtype)).view(np.uint16)


def _byte_tables(dtype: Any) -> tuple[list[int], list[int]]:
    """``prmt`` tables of the low and high bytes of :func:`_nf4_bits`: four 32-bit words each,
    word ``w`` holding the bytes of codes ``4w .. 4w+3`` (code ``4w`` in its least significant
    byte), so words 0-1 are the 8-byte table of codes 0-7 and words 2-3 that of codes 8-15."""
    bits = _nf4_bits(dtype).astype(np.uint32)
    tables = []
    for byte in ((bits & 0xFF), (bits >> 8)):
        words = byte.reshape(4, 4) << np.array([0, 8, 16, 24], np.uint32)
        tables.append([int(w) for w in np.bitwise_or.reduce(words, axis=1)])
    return tables[0], tables[1]


def _rounded(x: Array, dtype: Any) -> Array:
    """``x`` rounded to ``dtype``, as float32 values.

    The optimization barrier keeps the round trip: XLA (on the GPU, with its default
    ``xla_allow_excess_precision``) may otherwise fold ``f32(dtype(x))`` into ``x``. That
    made ``s - f32(s_hi)`` zero, so ``s_lo`` vanished: rel. L2 3.2e-3 on the H200 instead of
    the emulated 2.9e-3."""
    return lax.optimization_barrier(x.astype(dtype)).astype(jnp.float32)


def _split(scale: Array, dtype: Any) -> tuple[Array, Array]:
    """``(s_hi, s_lo)`` in ``dtype`` with ``s_hi + s_lo`` ~ ``scale`` to 16 bits (float32 math)."""
    hi = _rounded(scale, dtype)
    return hi.astype(dtype), (scale - hi).astype(dtype)


def _fma_round(a: Array, b: Array, dtype: Any) -> Array:
    """``dtype(a + b)`` for float32 ``a, b`` with one rounding of the exact sum, as ``fma.rn``.

    The float32 sum is rounded to odd (its last bit set when inexact, the TwoSum error telling
    which neighbour), which float32's 13 or 16 extra bits then round to ``dtype`` correctly.
    """
    s = a + b
    bb = s - a
    err = (a - (s - bb)) + (b - bb)
    bits = lax.bitcast_convert_type(s, jnp.int32)
    away = (err > 0) == (s > 0)  # the exact sum is farther from zero than s
    fix = jnp.where(away, 1, -1).astype(jnp.int32)
    bits = jnp.where((err != 0) & ((bits & 1) == 0), bits + fix, bits)
    return lax.bitcast_convert_type(bits, jnp.float32).astype(dtype)


def _prmt_emulated(codes: Array, s_hi: Array, s_lo: Array, dtype: Any) -> Array:
    """What :func:`_quad_asm` computes for each code, in jnp (interpreter branches): the NF4
    value rounded to ``dtype``, times the split scale with ``fma.rn``'s single rounding (the
    products of ``dtype`` operands are exact in float32, ``mul.rn`` rounds once)."""
    value = _rounded(nf4_lookup(codes), dtype)
    s_hi, s_lo = s_hi.astype(jnp.float32), s_lo.astype(jnp.float32)
    return _fma_round(value * s_hi, _rounded(value * s_lo, dtype), dtype)


def _accumulate(acc: Array, terms: Sequence[tuple[Callable[[], Array] | Any, Any]],
                interpret: Any) -> Array:  # fmt: skip
    """``acc + Σ lhs @ rhsᵀ`` in float32 on the tensor cores; ``rhs`` a ``[n, k]`` smem tile.

    ``lhs`` is a thunk producing a register operand or a ``[64, k]`` smem tile. The wgmmas are
    issued in order into one accumulator and awaited once; each thunk is evaluated just before
    its wgmma is issued, so the decode of a later term runs while the earlier terms' wgmmas
    are in flight.
    """
    if interpret is not None:  # Interpreter: no run_state / wgmma / transposed views; dots.
        for lhs, rhs in terms:
            lhs = lhs() if callable(lhs) else lhs[...]
            acc = acc + jnp.dot(lhs, rhs[...].T, preferred_element_type=jnp.float32)
        return acc

    def issue(refs: tuple[Any]) -> None:
        (ref,) = refs
        for lhs, rhs in terms:
            plgpu.wgmma(ref, lhs() if callable(lhs) else lhs, plgpu.transpose_ref(rhs, (1, 0)))

    (acc,) = pl.run_state(issue)((plgpu.ACC.init(acc),))
    return acc


def _wait_all(bars: Sequence[Any], slot: Array) -> None:
    """Waits until every TMA copy into ring slot ``slot`` has landed."""
    for bar in bars:
        plgpu.barrier_wait(bar.at[slot])


def _feed(load: Callable[[Array, Array], None], free: Any, steps: int | Array,
          slots: int) -> None:  # fmt: skip
    """The memory warpgroup's loop: fill the ring, then refill each slot once it is released.

    Step ``i + slots`` is loaded into step ``i``'s slot after both compute warpgroups arrived on
    ``free`` for it. Every release is waited on, the last ``slots`` included, so each phase of
    ``free`` is observed before the shared memory goes out of scope. ``steps`` may be traced.
    """
    for i in range(min(slots, steps) if isinstance(steps, int) else slots):
        fill = functools.partial(load, jnp.int32(i), jnp.int32(i))
        if isinstance(steps, int):
            fill()
        else:
            pl.when(i < steps)(fill)

    @pl.loop(0, steps)
    def _refill(step: Array) -> None:
        slot = lax.rem(step, slots)
        plgpu.barrier_wait(free.at[slot])

        @pl.when(step + slots < steps)
        def _load() -> None:
            load(step + slots, slot)


def _launch(kernel: Callable[..., None], args: tuple[Array, ...], scratch: tuple[Any, ...],
            n_loads: int, slots: int, grid: tuple[int, ...], grid_names: tuple[str, ...],
            out_shape: tuple[int, int], dtype: Any, name: str, interpret: Any,
            ) -> Array:  # fmt: skip
    """Runs ``kernel(*in_refs, out_ref, (scratch, (load_barriers, free)))`` on a ``grid`` of
    CTAs of two compute warpgroups and one memory warpgroup (``n_loads`` TMA barriers per ring
    slot, and the ``free`` barrier both compute warpgroups arrive on)."""
    barriers = (
        tuple(plgpu.Barrier(num_barriers=slots) for _ in range(n_loads)),
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=slots),  # slot free
    )

    def entry(*refs: Any) -> None:
        pl.run_scoped(
            lambda *scoped: kernel(*refs, scoped), scratch, barriers, collective_axes="wg"
        )

    mesh = plgpu.Mesh(
        grid=grid,
        grid_names=grid_names,  # the last grid axis varies fastest
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        kernel_name=name,
    )
    return pl.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(out_shape, dtype),
        mesh=mesh,
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret if interpret is not None else False,
        name=name,
    )(*args)


def _write_out(acc: Array, tile: Any, out_ref: Any, m0: Array, c0: Array, interpret: Any,
               pending: bool) -> None:  # fmt: skip
    """Writes a ``[64, bm]`` accumulator (cast) as ``out[m0:m0+bm, c0:c0+64] = accᵀ`` through
    the ``[bm, 64]`` shared ``tile`` (the ``WGMMA_TRANSPOSED`` register layout and a transposed
    view; the interpreter has neither: ``.T``) and one TMA store. ``pending``: first wait
    until the previous store has read the tile, and leave this one in flight (the caller
    waits before its shared memory goes out of scope)."""
    if pending:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    if interpret is None:
        plgpu.transpose_ref(tile, (1, 0))[...] = plgpu.layout_cast(
            acc, plgpu.Layout.WGMMA_TRANSPOSED
        )
    else:  # Interpreter: no transposed views.
        tile[...] = acc.T
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(tile, out_ref.at[pl.ds(m0, acc.shape[1]), pl.ds(c0, _ROWS)])
    if not pending:
        plgpu.wait_smem_to_gmem(0)


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
    block in absmax block ``half``, of which a ``prmt`` per word keeps row ``r``'s (``r+8``'s) half.
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
      by 16 for quad ``t`` (``prmt`` reads its selector from the low 16 bits; bit 3 of a
      selector nibble would mean "replicate the sign", hence the 3-bit index): two 8-entry
      byte lookups (the tables of :func:`_byte_tables` as immediates) and a blend by the
      code's bit 3 give the low bytes ``lo_s = [lo(s0) .. lo(s3)]`` of the four values, and
      ``hi_s``, ``lo_t``, ``hi_t`` (12 ``prmt``);
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
    """An MLIR i32 value with the integer operators :func:`_quad_row_offset` uses (a Python int
    on either side becomes a constant)."""

    def __init__(self, value: Any):
        self.value = value

    def _apply(self, name: str, other: Any, swap: bool) -> _I32:
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith

        if isinstance(other, _I32):
            other = other.value
        else:
            other = arith.constant(ir.IntegerType.get_signless(32), int(other))
        a, b = (other, self.value) if swap else (self.value, other)
        return _I32(getattr(arith, name)(a, b))


for _method, _arith_op in (("add", "addi"), ("mul", "muli"), ("and", "andi"), ("xor", "xori"),
                           ("rshift", "shrui"), ("lshift", "shli")):  # fmt: skip
    setattr(_I32, f"__{_method}__", functools.partialmethod(_I32._apply, _arith_op, swap=False))
    setattr(_I32, f"__r{_method}__", functools.partialmethod(_I32._apply, _arith_op, swap=True))


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


def _quad_call(lhs: Array, quads: Array, words: Array, block_m: int, config: MgpuNF4Config,
               backward: bool, interpret: Any,
               low_rank: tuple[Array, Array] | None = None) -> Array:  # fmt: skip
    """``y [Mp, Np]`` (``lhs = x [Mp, Kp]``) or, ``backward``, ``dx [Mp, Kp]`` (``lhs = dy [Mp,
    Np]``) for padded operands (module docstring, "Kernel shape"), plus ``u·vᵀ`` for
    ``low_rank = (u [Mp, R], v [out columns, R])`` (R a multiple of 64, ``block_m >= 128``).

    Output tile ``t`` is ``(t // out_tiles, t % out_tiles)`` in (token, output column) tiles
    (with ``config.group_m > 1``, token tiles fastest within groups of that many). One CTA
    per tile, or (``config.persistent``) one per SM, CTA ``c`` taking tiles ``c, c + G,
    ...``: its memory warpgroup streams them back to back through the one ring, and each
    tile's output store is left in flight until the next tile's epilogue reuses the tile.

    The low-rank term extends each tile's reduction by ``R / 64`` dense steps through the same
    ring: a step's ``u`` tile ``[block_m, 64]`` takes the slot of the token columns 0-63 and
    its 128 rows of ``v`` the first half of the slot of columns 64-127 (hence ``block_m >=
    128``); each compute warpgroup multiplies its 64 rows of ``v`` from shared memory. The
    W and scale barriers of those slots see no copy, and the steps do not wait on them.
    """
    mp, red = lhs.shape
    np_, kp = 2 * quads.shape[0], 2 * quads.shape[1]
    out_cols = kp if backward else np_
    bm, slots, dtype = block_m, config.slots, lhs.dtype
    w_steps = red // TILE
    lr_steps = 0 if low_rank is None else low_rank[0].shape[1] // _HALF
    steps = w_steps + lr_steps
    m_tiles, out_tiles = mp // bm, out_cols // TILE
    tiles = m_tiles * out_tiles
    ctas = min(tiles, config.max_ctas or _sm_count()) if config.persistent else tiles
    args = (lhs, quads, words) if low_rank is None else (lhs, quads, words, *low_rank)

    def kernel(lhs_ref, q_ref, s_ref, *refs):
        *lr_refs, out_ref, scoped = refs
        (lhs_lo, lhs_hi, q_ring, s_ring, out_smem), (load_bars, free) = scoped
        cta, wg = lax.axis_index("ctas"), lax.axis_index("wg")
        own_tiles = (tiles - cta + ctas - 1) // ctas if config.persistent else 1
        halves = (lhs_lo, lhs_hi)

        def coords(t: Any) -> tuple[Array, Array]:
            tile = cta + t * ctas
            if config.group_m <= 1:
                return tile // out_tiles, tile % out_tiles
            # Groups of group_m token tiles, token tiles fastest within a group.
            per_group = config.group_m * out_tiles
            first = tile // per_group * config.group_m
            size = jnp.minimum(m_tiles - first, config.group_m)
            within = tile % per_group
            return first + within % size, within // size

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

            def low_rank_step(g: Array, acc: Array) -> Array:
                slot = lax.rem(g, slots)
                _wait_all(load_bars[:2], slot)
                v_rows = lhs_hi.at[slot, pl.ds(pl.multiple_of(wg * _ROWS, _ROWS), _ROWS)]
                acc = _accumulate(acc, [(v_rows, lhs_lo.at[slot])], interpret)
                plgpu.barrier_arrive(free.at[slot])
                return acc

            def tile(t: Array, carry: Any) -> Any:
                m_tile, o_tile = coords(t)
                zeros = jnp.zeros((_ROWS, bm), jnp.float32)
                if interpret is None:
                    zeros = plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)
                acc = lax.fori_loop(t * steps, t * steps + w_steps, step, zeros)
                if lr_steps:
                    acc = lax.fori_loop(t * steps + w_steps, (t + 1) * steps, low_rank_step, acc)
                acc = acc.astype(dtype)
                _write_out(acc, out_smem.at[wg], out_ref, m_tile * bm, o_tile * TILE + wg * _ROWS,
                           interpret, config.persistent)  # fmt: skip
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
                tokens = pl.ds(m_tile * bm, bm)
                if lr_steps:
                    pl.when(i >= w_steps)(lambda: load_low_rank(i - w_steps, slot, tokens, o_tile))
                    pl.when(i < w_steps)(lambda: load_w(i, slot, tokens, o_tile))
                else:
                    load_w(i, slot, tokens, o_tile)

            def load_low_rank(j: Array, slot: Array, tokens: Any, o_tile: Array) -> None:
                u_ref, v_ref = lr_refs
                cols = pl.ds(j * _HALF, _HALF)
                plgpu.copy_gmem_to_smem(u_ref.at[tokens, cols], lhs_lo.at[slot], bar_lo.at[slot])
                plgpu.copy_gmem_to_smem(
                    v_ref.at[pl.ds(o_tile * TILE, TILE), cols],
                    lhs_hi.at[slot, pl.ds(0, TILE)],
                    bar_hi.at[slot],
                )

            def load_w(i: Array, slot: Array, tokens: Any, o_tile: Array) -> None:
                r0 = i * TILE
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
    return _launch(kernel, args, scratch, 4, slots, (ctas,), ("ctas",), (mp, out_cols), dtype,
                   name, interpret)  # fmt: skip


# ------------------------------------------------------------------------------- public API


def _token_tile(m: int, config: MgpuNF4Config, low_rank: bool = False,
                out_tiles: int | None = None) -> int:  # fmt: skip
    """Tokens per CTA: the config's, or M rounded up to 64 when smaller (to at least 128 with
    a low-rank term, whose 128 rows of ``v`` share a token-tile slot).

    Given the launch's ``out_tiles`` (128-wide output column tiles), the tile also shrinks
    (256 or 192 -> 128 -> 64) while the launch would have fewer tiles than half the SMs. That
    only happens at small M on a narrow output (e.g. M = 256 on a 4096-wide W: 32 tiles): each
    CTA then streams a whole row of W tiles, so the launch is bound by how few SMs stream,
    and more CTAs beat decoding each weight for more tokens. On the H200, 64-token tiles ran
    1.55x (14336x4096) and 2.2x (4096x4096) faster than one 256-token tile at M = 256
    (BENCHMARKS.md §2). At training-sized M no shape qualifies (4096x1024 at M = 4096 has 128).
    """
    floor = TILE if low_rank else _ROWS
    bm = max(min(config.block_m, _round_up(m, _ROWS)), floor)
    if out_tiles is not None and config.fill_sms:
        while bm > floor and -(-m // bm) * out_tiles < _sm_count() / 2:
            bm = max(floor, {256: 128, 192: 128, 128: 64}[bm])
    return bm


def check_supported(lhs: Any, w: NF4Tensor | MgpuNF4Weight, config: MgpuNF4Config, *,
                    backward: bool = False, low_rank: tuple[Any, Any] | None = None,
                    ) -> None:  # fmt: skip
    """Raises ``ValueError`` naming the first requirement ``x·Wᵀ`` (``backward``: ``dy·W``)
    misses: the reduction width, bf16/f16 activations matching a prepared weight's dtype,
    K % 64 == 0 (whole absmax blocks per row), the low-rank operands' shapes and dtypes, and
    the shared memory of the token tile."""
    n, k = w.shape if isinstance(w, MgpuNF4Weight) else _check_nf4(w)
    name, dim = ("dy", ("N", n)) if backward else ("x", ("K", k))
    if lhs.ndim < 1 or lhs.shape[-1] != dim[1]:
        raise ValueError(
            f"{name} {tuple(lhs.shape)} must end in {dim[0]}={dim[1]} (W is [N, K] = [{n}, {k}])"
        )
    if jnp.dtype(lhs.dtype) not in _DTYPES:
        raise ValueError(f"{name} dtype {lhs.dtype}: the quad NF4 kernel needs bf16 or f16")
    if isinstance(w, MgpuNF4Weight) and jnp.dtype(lhs.dtype) != jnp.dtype(w.dtype):
        raise ValueError(
            f"{name} is {jnp.dtype(lhs.dtype).name} but the weight's scales were split for "
            f"{w.dtype}; call prepare_weight(w, dtype={jnp.dtype(lhs.dtype).name})"
        )
    m = int(np.prod(lhs.shape[:-1]))
    if m == 0:
        raise ValueError(f"{name} {tuple(lhs.shape)} has no rows")
    if low_rank is not None:
        u, v = low_rank
        out = k if backward else n
        if u.shape[:-1] != lhs.shape[:-1] or v.ndim != 2 or v.shape != (out, u.shape[-1]):
            raise ValueError(
                f"low_rank (u, v) must be u [..., R] with {name}'s leading dims "
                f"{tuple(lhs.shape[:-1])} and v [{out}, R]; got u {tuple(u.shape)}, "
                f"v {tuple(v.shape)}"
            )
        if u.dtype != lhs.dtype or v.dtype != lhs.dtype:
            raise ValueError(
                f"low_rank operands must be {name}'s dtype {jnp.dtype(lhs.dtype).name}; got u "
                f"{u.dtype}, v {v.dtype}"
            )
        if config.block_m < TILE:
            raise ValueError(f"a low-rank term needs block_m >= {TILE}, got {config.block_m}")
    bm = _token_tile(m, config, low_rank is not None)
    if config.smem_bytes(bm) > _SMEM_BYTES:
        raise ValueError(
            f"config {config} needs {config.smem_bytes(bm)} bytes of shared memory at block_m "
            f"{bm} (limit {_SMEM_BYTES}); use fewer slots or a smaller block_m"
        )


@functools.partial(jax.jit, static_argnames=("config", "interpret", "backward"))
def _matmul(lhs: Array, w: MgpuNF4Weight, low_rank: tuple[Array, Array] | None,
            config: MgpuNF4Config, interpret: Any, backward: bool) -> Array:  # fmt: skip
    """Pads the rows to the token tile, the reduction to W's padded extent and the low-rank
    width to a multiple of 64, runs the kernel, slices."""
    n, k = w.shape
    np_, kp = 2 * w.quads.shape[0], 2 * w.quads.shape[1]
    red, red_padded, out, out_padded = (n, np_, k, kp) if backward else (k, kp, n, np_)
    lead = lhs.shape[:-1]
    lhs2 = lhs.reshape(-1, red)
    m = lhs2.shape[0]
    bm = _token_tile(m, config, low_rank is not None, out_tiles=out_padded // TILE)
    mp = _round_up(m, bm)
    lhs2 = jnp.pad(lhs2, ((0, mp - m), (0, red_padded - red)))
    if low_rank is not None:
        u, v = low_rank
        r = u.shape[-1]
        rp = _round_up(r, _HALF)
        low_rank = (
            jnp.pad(u.reshape(m, r), ((0, mp - m), (0, rp - r))),
            jnp.pad(v, ((0, out_padded - out), (0, rp - r))),
        )
    y = _quad_call(lhs2, w.quads, w.scales, bm, config, backward, interpret, low_rank)
    return y[:m, :out].reshape(*lead, out)


def _prepared(lhs: Array, w: NF4Tensor | MgpuNF4Weight) -> MgpuNF4Weight:
    return w if isinstance(w, MgpuNF4Weight) else prepare_weight(w, jnp.dtype(lhs.dtype))


def nf4_matmul_mgpu(x: Array, w: NF4Tensor | MgpuNF4Weight, *,
                    low_rank: tuple[Array, Array] | None = None,
                    config: MgpuNF4Config = MgpuNF4Config(), interpret: Any = None,
                    ) -> Array:  # fmt: skip
    """``x · Wᵀ (+ u · vᵀ)`` for ``x [..., K]`` (bf16/f16) and an NF4 ``W [N, K]``; returns
    ``[..., N]``.

    Float32 accumulation, one rounding to ``x.dtype``; the weights as :func:`dequantize_prepared`
    gives them. ``w``: a :class:`MgpuNF4Weight` (or an NF4Tensor, rewritten on every call).
    ``low_rank = (u [..., R], v [N, R])`` in x's dtype: a term summed in the same accumulator
    (LoRA's ``s·(x·Aᵀ)·Bᵀ`` as ``u = s·x·Aᵀ``, ``v = B``) for ``R / 64`` (rounded up) more
    reduction steps per output tile. ``interpret``: a Mosaic GPU interpreter parameter object
    (CPU tests), or None for the GPU.
    """
    check_supported(x, w, config, low_rank=low_rank)
    return _matmul(x, _prepared(x, w), low_rank, config, interpret, backward=False)


def nf4_matmul_t_mgpu(dy: Array, w: NF4Tensor | MgpuNF4Weight, *,
                      low_rank: tuple[Array, Array] | None = None,
                      config: MgpuNF4Config = MgpuNF4Config(), interpret: Any = None,
                      ) -> Array:  # fmt: skip
    """``dy · W (+ u · vᵀ)`` for ``dy [..., N]`` (bf16/f16) and an NF4 ``W [N, K]``; returns
    ``[..., K]``: the input gradient of :func:`nf4_matmul_mgpu`, on the same weight.
    ``low_rank = (u [..., R], v [K, R])``: LoRA's ``s·(dy·B)·A`` as ``u = s·dy·B``, ``v = Aᵀ``."""
    check_supported(dy, w, config, backward=True, low_rank=low_rank)
    return _matmul(dy, _prepared(dy, w), low_rank, config, interpret, backward=True)


def nf4_matmul_mgpu_reference(x: Array, w: NF4Tensor) -> Array:
    """The plain-jnp reference: decode W to ``x.dtype``, then a float32-accumulated dot."""
    y = jnp.dot(x, dequantize_nf4(w, x.dtype).T, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def nf4_matmul_t_mgpu_reference(dy: Array, w: NF4Tensor) -> Array:
    """The plain-jnp reference of :func:`nf4_matmul_t_mgpu`: ``dy · dequantize_nf4(W)``."""
    dx = jnp.dot(dy, dequantize_nf4(w, dy.dtype), preferred_element_type=jnp.float32)
    return dx.astype(dy.dtype)
