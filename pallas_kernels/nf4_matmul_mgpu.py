"""``y = x·Wᵀ`` and ``dx = dy·W`` for an NF4 W as Mosaic GPU kernels (Hopper: TMA + wgmma).

Why this kernel exists (issue #4). The Triton-lowered ``fused`` kernel in
:mod:`pallas_kernels.nf4_matmul_kernels` only wins at decode-sized M; at training-sized M the
fastest path is still XLA's decode-then-dot, which writes a 16-bit W and reads it back (4.5
bytes of traffic per weight against the 0.5 NF4 needs) in a separate memory-bound pass. Here
the decode happens inside a Hopper tensor-core matmul, so W never exists in 16 bits outside
the registers of the warpgroup that multiplies it.

The shape of the computation: the transposed product ``yᵀ[N, M] = W[N, K] · xᵀ[K, M]``. A
wgmma's A operand may live in registers, its B operand must be in shared memory; putting the
decoded W in A (64 rows per warpgroup, the wgmma M) and a token tile of x in B (up to 256
tokens, the wgmma N) means each decoded weight feeds ``2·block_m`` flops. That ratio is what
decides the kernel's speed: the decode is ALU work (per weight 15 selects, see below, which the
lowered module shows as 480 two-wide selects per thread and step, plus 4 bit tests, the scale
and the conversion: ~22 instructions), and an H200 SM issues 128 such lane-instructions per
cycle against ~4,100 dense bf16 tensor flops. At ``block_m = 256`` (512 flops per weight) the
decode needs ~0.17 SM-cycles per weight and the tensor cores ~0.125, so the kernel is ALU-bound
at best near 3/4 of the tensor peak; at ``block_m = 128`` the bound halves and at 64 it is a
fifth. The two compute warpgroups of a CTA interleave (one decodes while the other's wgmma
runs), and inside a warpgroup the second half-tile is decoded while the first half's wgmma is in
flight. Memory, by contrast, is easy: per 128-wide K step a CTA reads ``2·block_m·128`` bytes of
x and ``128·64`` bytes of W (+1 KiB of scales) for ``2·128·block_m·128`` flops, over 110 flops
per byte at ``block_m = 256`` (a bf16 GEMM with the same tile has ~85).

Layout of one CTA (grid ``(M / block_m, N / 128)``, N tiles fastest so that CTAs in flight
share x tiles in L2): warpgroups 0 and 1 each own 64 W rows and a ``[64, block_m]`` float32
accumulator; warpgroup 2 streams, per K step of 128, five TMA copies into a ring of ``slots``
shared-memory slots: the two 64-column halves of the x tile (``[block_m, 64]`` bf16, 128-byte
swizzle; as B operands they are used through a transposed view), the CTA's packed W tile
(``[128, 64]`` uint8, 64-byte swizzle) and the two halves' scales (``[2, 64]`` float32). A
slot is refilled once both compute warpgroups have arrived on its ``free`` barrier. The
epilogue writes ``yᵀ`` straight into ``y``: the accumulator is cast to bf16, moved to the
``WGMMA_TRANSPOSED`` register layout and stored through a transposed view of a ``[block_m,
64]`` shared tile, which one TMA copies to ``y[m0:m0+block_m, n0:n0+64]`` (with
``transposed_store=False`` the kernel writes ``yᵀ`` and XLA transposes it: a fallback in case
the transposed store does not lower, costing ``4·M·N`` extra bytes).

Nibbles to registers. bitsandbytes packs elements ``2i`` (high nibble) and ``2i+1`` (low) of a
row in one byte, so a byte's two nibbles are neighbours in K, which no register layout of the
wgmma A operand can split into two operands cheaply. :func:`prepare_weight` therefore repacks
W once per call (or once per model, if the caller keeps its result): within every 128-wide K
tile of a row, byte ``j`` (``0 <= j < 64``) holds element ``j`` in its high nibble and
element ``64 + j`` in its low nibble. A ``[64, 64]`` packed tile loaded into registers in the
layout of a bf16 ``[64, 64]`` wgmma operand (``plgpu.Layout.WGMMA``: each thread holds pairs of
consecutive bytes) then gives both halves of the K tile in that same layout: the high nibbles
are K columns 0-63 and the low nibbles K columns 64-127, decoded element-wise into two bf16
A operands for two K=64 wgmmas against the two x half-tiles. Each half is exactly one absmax
block per row (blocksize 64), so its scale is one float32 per row: the repack stores the
decoded absmax (double quantization resolved with :func:`~pallas_kernels.nf4.dequantize_absmax`)
as ``scales[K/64, N/64, 64]``, which the kernel loads as a per-row vector
(``Layout.WGMMA.reduce(1)``) and broadcasts along the 64 columns. The NF4 lookup has no gather
in Mosaic GPU: :func:`~pallas_kernels.nf4_matmul_kernels.nf4_lookup`'s select tree (4 bit
tests, 15 selects between float32 constants) gives the code's value; times the scale in
float32, rounded once to x's dtype, it is bit-identical to
:func:`~pallas_kernels.nf4.dequantize_nf4`.

The cheaper decode, the default (``MgpuNF4Config(decode="prmt")``). On the H200 the select
decode was the bound, as counted above: ``block_m = 256`` at 45-51% of the bf16 cuBLAS dot,
128 at ~26%. With ``prmt`` the same kernel runs at 88-93% of the bf16 dot at ``block_m = 256``
and M = 4096 (1.01-1.04x XLA's decode-then-dot; 63-70% at 128), BENCHMARKS.md §2. The PTX byte
permute ``prmt.b32`` is a 4-lane lookup into an 8-byte table held in two 32-bit operands, so
two of them and a third ``prmt`` that picks per byte by the code's bit 3 look up one byte of
the 16-entry table for 4 codes at once. Each 16-bit register of the packed tile (2 bytes, 4
codes: 2 of each K half) costs 15 instructions (:func:`_prmt_asm`, inline PTX through
``plgpu.inline_mgpu``): 3 to form the selectors, 6 ``prmt`` for the low and the high bytes of
the 4 values as ``dtype`` bit patterns, 2 ``prmt`` to interleave them into one ``dtype`` pair
per K half, and ``fma.rn(v, s_hi, mul.rn(v, s_lo))`` per pair, ``v·s`` with the float32 scale
split into two ``dtype`` parts (2 packed instructions per 2 weights). That is 3.75
instructions per weight, ~4.2 with the per-step scale split (counted in the lowered module:
16 such asm blocks per thread and K step, plus 4 scales × ~6 conversions), against ~22. Its
rounding: the NF4 value is rounded to ``dtype`` and the product rounded once more, so ~17%
of the weights differ from :func:`~pallas_kernels.nf4.dequantize_nf4`'s by one ulp (never
more) and ``y`` measures a rel. L2 error of ~2.8-2.9e-3 against the reference where the
select decode's is ~1.7e-3 (bf16 output rounding; interpreter, K = 384 to 4096; the plain
``mul.rn`` by a bf16-rounded scale, 0.5 instruction per weight cheaper, measures ~3.3e-3).
Both K halves are decoded before the first of the step's two wgmmas (the lookups serve both).

Cost of the repack (:func:`prepare_weight`, a few fused elementwise XLA ops): it
reads the 0.5 bytes per weight of ``packed`` (plus the 8-bit absmax) and writes 0.5 bytes per
weight of repacked nibbles and 4/64 of float32 scales: ~1.1 bytes per weight, e.g. 65 MB and
~20 µs of H200 bandwidth for a 4096x14336 projection (0.9 ms of matmul at M = 4096), against
the 2.5 bytes per weight of a bf16 decode. A caller that reuses W across calls (inference, or
the frozen base weights of a LoRA run) can call it once and pass the :class:`MgpuNF4Weight`.

Shapes. K must be a multiple of 64 (whole absmax blocks per row; otherwise blocks straddle
rows and :func:`check_supported` raises, so the caller falls back to another implementation).
Everything else is padded: N to a multiple of 128 and K to a multiple of 128 by the repack
(zero scales and zero codes), M to a multiple of the effective token tile by the wrapper (a
copy of x only when M is ragged). The token tile is ``min(block_m, M rounded up to 64)``.
x must be bf16 or f16 (the decode targets x's dtype); blocksize 64; one matrix (no layer axis).

The backward orientation (:func:`nf4_matmul_t_mgpu`, ``dx[M, K] = dy[M, N] · W[N, K]``, the
input gradient; same :class:`MgpuNF4Weight`, no second copy of W). The shape of the problem:
as a wgmma ``dxᵀ[K, M] = Wᵀ[K, N] · dyᵀ[N, M]``, the register A operand would be ``Wᵀ`` in the
WGMMA layout, i.e. each thread holding ``W[n, k], W[n+1, k]`` pairs, two bytes in different
rows of the packed tile. Mosaic GPU has no transposed 8-bit register layout or load, and the
one cheap relayout it has (``WGMMA`` to ``WGMMA_TRANSPOSED``, a shuffle and a ``prmt`` per
register) keeps each warp on the same 16 rows, so it is not a transpose of the tile; a
transposed register operand would need byte gathers from shared memory (32 ``ld.shared.u8``
plus ~16 ``prmt`` per thread and 64×64 block). So the kernel decodes W in its natural
orientation (the forward's ``plgpu.load`` of a ``[64 N, 64]`` packed block in the WGMMA
layout), stores the ``[64 N, 64 K]`` bf16 block to shared memory (16 ``st.shared.b32`` per
thread, 8 KiB) and gives it to the wgmma as a transposed shared-memory A operand (the
hardware's transpose bit). Grid ``(M / block_m, Kp / 128)``: CTA ``(m, kt)`` owns the 128-wide
K tile ``kt``, i.e. one column of 64 packed bytes per W row, and compute warpgroup ``wg`` owns
that tile's K half ``wg`` (the high nibbles for 0, the low for 1: a byte's two nibbles are two
output rows here) with a ``[64, block_m]`` float32 accumulator of ``dxᵀ``. Per step of 128 N
rows: TMA copies of the two ``[block_m, 64]`` halves of the dy tile (the B operands, exactly
the forward's x halves), the packed ``[128, 64]`` W tile and the ``[2, 2, 64]`` scales (K half ×
N block; in this orientation the scale is still one float32 per W row n, as the 64-wide K half
is one absmax block); each compute warpgroup decodes its nibble of the two 64-row N blocks
and issues two wgmmas, the second block decoded while the first wgmma runs. dx leaves in
64-token pieces through the (then free) decode tiles, by the forward's transposed store.

Its costs, per CTA step at ``block_m = 256`` (H200 SM: ~4,100 bf16 tensor flops, 128
lane-instructions and 128 shared-memory bytes per cycle): 2·128·128·256 = 8.4 Mflop = 2,048
tensor cycles. ALU: each warpgroup decodes only its nibble of 128×64 bytes, 8,192 weights, 64
per thread; the ``prmt`` decode pairs two registers of the tile into one 16-bit word for the
forward's :func:`_prmt_asm` (``(a << s & 0xF0F0) | (b >> (4 - s) & 0x0F0F)``, 3 more
instructions per 4 weights: ~4.25 per weight, 4.75 with the stores) -> ~300 instructions per
thread and step, ~600 cycles for the CTA's two warpgroups against 2,048 tensor cycles (the
forward: ~4.2 per weight, ~540 cycles). Each decoded weight still feeds ``2·block_m`` = 512
flops. Shared memory: TMA writes 64 KiB of dy + 8 KiB of W, the decode reads 16 KiB of packed
W and writes 32 KiB of bf16 W, the wgmmas read those 32 KiB (A) and 2 × 64 KiB of dy (B):
~280 KiB per 2,048 cycles, ~137 B/cycle, against the forward's ~105 and the bf16 dot's
(128×256 tile, A and B from shared memory: ~125). Without the decode's 48 KiB (~23 B/cycle)
it would be ~113, like the dot's: the staged A operand costs what the dot's own A costs. By
this count shared memory, not the ALU, is the bound, at ~93% of the tensor peak (128/137),
about the dot's own margin; the alternative (byte gathers into a transposed register
operand) trades the 64 KiB of staging for ~3 more ALU instructions per weight and 32 byte
loads per thread and 64×64 block. Shared memory allocated: 179 KiB at ``block_m = 256``, 2
slots (dy 128, W 16, scales 2, decode/dx tiles 32). Global traffic is the forward's.
Measured on the H200 (M = 4096, the four Llama-8B shapes, BENCHMARKS.md §2): 68-80% of the
bf16 dot when each step waited for its wgmmas before decoding the next block, 72-82% with
``overlap_backward`` (one wgmma in flight across every decode), 0.84-0.90x XLA's
decode-then-dot: short of both the count above and of XLA. The staging's 64 KiB per step is
the part of the shared-memory traffic the forward does not have.

Interpreter (CPU tests): transposed shared-memory views, register layouts, ``plgpu.load`` with
a layout, ``run_state``, wgmma and inline PTX do not exist there, so the few helpers that use
them have an interpreter branch computing the same values with plain reads and dots, or (the
``prmt`` decode) the same roundings in jnp (marked where used). ``overlap_backward`` changes
only when the wgmmas are awaited and the ring slots released, so the interpreter runs the
per-step schedule; the overlapped one is covered by the Hopper lowering test and the GPU check.
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
from pallas_kernels.nf4_matmul_kernels import nf4_lookup

__all__ = [
    "MgpuNF4Config",
    "MgpuNF4Weight",
    "check_supported",
    "nf4_matmul_mgpu",
    "nf4_matmul_mgpu_reference",
    "nf4_matmul_t_mgpu",
    "nf4_matmul_t_mgpu_reference",
    "prepare_weight",
]

_COMPUTE_WGS = 2
_ROWS = 64  # W rows per compute warpgroup: the wgmma M
BLOCK_N = _COMPUTE_WGS * _ROWS  # W rows per CTA
BLOCK_K = 128  # K per pipeline step: two 64-wide halves, one absmax block each
_QBLOCK = 64  # the NF4 blocksize this kernel handles
_HALF = BLOCK_K // 2
_SMEM_BYTES = 227 * 1024  # H100/H200 per-block shared memory limit
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
KERNEL_NAME = "lorax_mgpu_nf4_matmul"
KERNEL_NAME_T = "lorax_mgpu_nf4_matmul_t"
_DECODES = ("select", "prmt")


@dataclasses.dataclass(frozen=True)
class MgpuNF4Config:
    """Tile sizes and launch parameters of the Mosaic GPU NF4 matmul (both orientations:
    :func:`nf4_matmul_mgpu` and :func:`nf4_matmul_t_mgpu`, where ``block_m`` and ``slots`` mean
    the same and the reduction runs over N instead of K).

    ``block_m``: tokens per CTA, the wgmma N (64, 128, 192 or 256; smaller M uses M rounded up
    to 64). Larger amortizes the decode over more flops (module docstring) but holds a
    ``[64, block_m]`` float32 accumulator per thread group (128 registers per thread at 256).
    ``slots``: ring depth of the x/W/scale stream (the default pair is the most decode
    amortization that fits shared memory; measured best at M = 4096, BENCHMARKS.md §2).
    ``transposed_store``: write ``y`` directly through a transposed shared-memory view
    (default), or write ``yᵀ`` and let XLA transpose it (fallback).
    ``compute_registers``/``memory_registers``: registers per thread for the compute and
    memory warpgroups (2·128·232 + 128·40 = 64K, the register file). Block N (128 W rows, two
    warpgroups of 64) and block K (128) are fixed by the design.
    ``decode``: ``"prmt"`` (byte-permute lookups and packed ``dtype`` math, ~4 instructions per
    weight, weights within one ulp; module docstring; needs ``plgpu.inline_mgpu``; 2x faster on
    the H200) or ``"select"`` (the select tree in float32, ~22 instructions per weight, exactly
    :func:`~pallas_kernels.nf4.dequantize_nf4`'s weights).
    ``overlap_backward``: in the backward kernel, keep one wgmma in flight across the decode
    of the next 64-row block, the step boundary included (``wgmma_wait(1)`` instead of waiting
    for each step's wgmmas before decoding the next step's first block; the ring slot is then
    released half a step later). Measured on the H200 at M = 4096 (BENCHMARKS.md §2): 2-9%
    faster at every Llama-8B shape than waiting per step (72-82% of the bf16 dot vs 68-80%).
    """

    block_m: int = 256
    slots: int = 2
    transposed_store: bool = True
    compute_registers: int = 232
    memory_registers: int = 40
    decode: str = "prmt"
    overlap_backward: bool = True

    def __post_init__(self) -> None:
        if self.decode not in _DECODES:
            raise ValueError(f"decode must be one of {_DECODES}, got {self.decode!r}")
        if self.block_m not in (64, 128, 192, 256):
            raise ValueError(f"block_m must be 64, 128, 192 or 256, got {self.block_m}")
        if self.slots < 2:
            raise ValueError(f"slots must be >= 2, got {self.slots}")

    def smem_bytes(self, block_m: int | None = None, *, transposed: bool = False) -> int:
        """Shared memory the kernel (``transposed``: the backward's) allocates with token tile
        ``block_m`` (default the config's)."""
        bm = self.block_m if block_m is None else block_m
        buffers = [self.slots * bm * _HALF * 2] * 2  # x (dy) halves
        buffers += [self.slots * BLOCK_N * _HALF]  # W
        if transposed:
            buffers += [self.slots * 4 * _ROWS * 4]  # scales
            buffers += [_COMPUTE_WGS * 2 * _ROWS * _ROWS * 2, 1024]  # decoded W / dx, barriers
        else:
            buffers += [self.slots * BLOCK_N * 4] * 2  # scales
            buffers += [_COMPUTE_WGS * bm * _ROWS * 2, 1024]  # output tiles, barriers
        return sum(_round_up(b, 1024) for b in buffers)  # allocations are 1 KiB aligned


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["packed", "scales"],
    meta_fields=["shape"],
)
@dataclasses.dataclass(frozen=True)
class MgpuNF4Weight:
    """An NF4 ``W [N, K]`` repacked for :func:`nf4_matmul_mgpu` (see :func:`prepare_weight`).

    Attributes:
      packed: uint8 ``[Np, Kp/2]`` (N, K padded to multiples of 128): in each 128-wide K tile
        of a row, byte ``j`` holds element ``j`` (high nibble) and ``64 + j`` (low nibble).
      scales: float32 ``[Kp/64, Np/64, 64]``: ``scales[b, r // 64, r % 64]`` is the absmax of
        row ``r``'s block ``b`` (zero in the padding).
      shape: the logical ``(N, K)``.
    """

    packed: Array
    scales: Array
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))


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


@jax.jit
def prepare_weight(w: NF4Tensor) -> MgpuNF4Weight:
    """Repacks a bitsandbytes-layout NF4 ``W [N, K]`` for :func:`nf4_matmul_mgpu` (plain XLA).

    Pads N and K to multiples of 128, regroups the nibbles of each 128-wide K tile so that a
    byte holds elements ``j`` and ``64 + j``, and decodes the (possibly double-quantized)
    absmax to float32, transposed to ``[K/64, N/64, 64]``. About 1.1 bytes of traffic per
    weight (module docstring); call it once and keep the result when W is reused.
    """
    n, k = _check_nf4(w)
    np_, kp = _round_up(n, BLOCK_N), _round_up(k, BLOCK_K)
    codes = jnp.stack([w.packed >> 4, w.packed & 0xF], axis=-1).reshape(n, k)
    codes = jnp.pad(codes, ((0, np_ - n), (0, kp - k)), constant_values=7)  # 7: the code of 0.0
    tiles = codes.reshape(np_, kp // BLOCK_K, 2, _HALF)
    packed = (tiles[:, :, 0] << 4) | tiles[:, :, 1]
    scales = dequantize_absmax(w).reshape(n, k // _QBLOCK)
    scales = jnp.pad(scales, ((0, np_ - n), (0, (kp - k) // _QBLOCK)))
    scales = scales.T.reshape(kp // _QBLOCK, np_ // _ROWS, _ROWS)
    return MgpuNF4Weight(packed.reshape(np_, kp // 2).astype(jnp.uint8), scales, (n, k))


def check_supported(x: Any, w: NF4Tensor | MgpuNF4Weight, config: MgpuNF4Config, *,
                    transposed: bool = False) -> None:  # fmt: skip
    """Raises ``ValueError`` naming the first requirement ``x · Wᵀ`` (or, ``transposed``, the
    backward's ``dy · W``) misses (module docstring)."""
    n, k = w.shape if isinstance(w, MgpuNF4Weight) else _check_nf4(w)
    name, dim = ("dy", ("N", n)) if transposed else ("x", ("K", k))
    if x.ndim < 1 or x.shape[-1] != dim[1]:
        raise ValueError(
            f"{name} {tuple(x.shape)} must end in {dim[0]}={dim[1]} (W is [N, K] = [{n}, {k}])"
        )
    if jnp.dtype(x.dtype) not in _DTYPES:
        raise ValueError(f"x dtype {x.dtype}: the Mosaic GPU NF4 kernel needs bf16 or f16")
    m = 1
    for d in x.shape[:-1]:
        m *= int(d)
    if m == 0:
        raise ValueError(f"x {tuple(x.shape)} has no rows")
    bm = _token_tile(m, config)
    if config.smem_bytes(bm, transposed=transposed) > _SMEM_BYTES:
        raise ValueError(
            f"config {config} needs {config.smem_bytes(bm, transposed=transposed)} bytes of "
            f"shared memory at block_m {bm} (limit {_SMEM_BYTES}); use fewer slots or a "
            "smaller block_m"
        )


def _token_tile(m: int, config: MgpuNF4Config) -> int:
    return min(config.block_m, _round_up(m, _ROWS))


# ----------------------------------------------------------------------------------- helpers


def _smem_tile(shape: tuple[int, ...], dtype: Any) -> Any:
    """A shared-memory buffer laid out for TMA and wgmma: rows swizzled by their byte width."""
    row_bytes = min(128, shape[-1] * jnp.dtype(dtype).itemsize)
    row = row_bytes // jnp.dtype(dtype).itemsize
    transforms = (plgpu.TilingTransform((8, row)), plgpu.SwizzleTransform(row_bytes))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def _read(ref: Any, layout: Any, interpret: Any) -> Array:
    """``ref``'s contents in registers, in ``layout`` (the interpreter has no layouts)."""
    return plgpu.load(ref, (), layout=layout) if interpret is None else ref[...]


def _decode_half(packed: Array, high: bool, scale: Array, dtype: Any) -> Array:
    """One K half of a repacked ``[64, 64]`` uint8 tile as a ``[64, 64]`` ``dtype`` operand.

    ``high``: the high nibbles (K columns 0-63 of the tile) or the low ones (64-127).
    ``scale``: the ``[64]`` float32 absmax of each row's block. Element-wise, so the result
    keeps ``packed``'s register layout (the bf16 wgmma operand layout on the GPU).
    """
    byte = packed.astype(jnp.int32)
    codes = byte >> 4 if high else byte & 0xF
    values = nf4_lookup(codes) * lax.broadcast_in_dim(scale, packed.shape, [0])
    return values.astype(dtype)


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


def _prmt_asm(dtype: Any) -> str:
    """PTX of the decode of one 16-bit register (2 bytes, 4 codes) into two ``dtype`` pairs.

    ``$2``: the register, zero-extended. Its nibbles are, from the least significant, ``[l0,
    h0, l1, h1]`` (byte ``i`` = ``h_i << 4 | l_i``; ``h`` are K columns 0-63 of the tile, ``l``
    64-127). ``$3, $4`` / ``$5, $6``: the first / second K half's scale split in two ``dtype``
    pairs, ``(s_hi, s_hi)`` and ``(s_lo, s_lo)`` with ``s_hi = dtype(s)``, ``s_lo = dtype(s -
    s_hi)``. Outputs ``$0 = [v(h0), v(h1)]·s_first``, ``$1 = [v(l0), v(l1)]·s_second``, 15
    instructions for 4 weights:

    - ``idx = x & 0x7777``: each nibble's 3-bit index into an 8-entry byte table (bit 3 of a
      ``prmt`` selector means "replicate the sign", so it must be cleared);
    - ``sel = ((x >> 1) & 0x4444) | 0x3210`` (``shr``, ``lop3``): selector ``k + 4·bit3(nibble
      k)``, which picks byte ``k`` of the codes-0-7 lookup or of the codes-8-15 lookup;
    - per byte of a ``dtype`` value (low, high): two 8-entry lookups (``prmt`` with the table
      as immediates) and the ``sel`` blend, giving ``blo = [lo(l0), lo(h0), lo(l1), lo(h1)]``
      and ``bhi`` likewise (6 ``prmt``);
    - two ``prmt`` interleave ``blo`` and ``bhi`` into the pairs ``[v(h0), v(h1)]`` (bytes 1,
      5, 3, 7 of ``blo:bhi``: selector ``0x7351``) and ``[v(l0), v(l1)]`` (``0x6240``);
    - per pair ``fma.rn(v, s_hi, mul.rn(v, s_lo))``: ``v·s`` with the scale's float32
      precision kept (``s_hi + s_lo`` carries 16 of its bits; ``mul`` alone would round the
      scale to ``dtype`` first, a third rounding that measures ~3.3e-3 rel. L2 instead of
      ~2.8e-3 on y) and one rounding of the sum.
    """
    lo, hi = _byte_tables(dtype)
    kind = "bf16x2" if jnp.dtype(dtype) == jnp.bfloat16 else "f16x2"
    return f"""
    {{
    .reg .b32 idx, sel, t, pl, ql, ph, qh, blo, bhi, vh, vl, ch, cl;
    and.b32 idx, $2, 0x7777;
    shr.u32 t, $2, 1;
    lop3.b32 sel, t, 0x4444, 0x3210, 0xea;
    prmt.b32 pl, {lo[0]}, {lo[1]}, idx;
    prmt.b32 ql, {lo[2]}, {lo[3]}, idx;
    prmt.b32 blo, pl, ql, sel;
    prmt.b32 ph, {hi[0]}, {hi[1]}, idx;
    prmt.b32 qh, {hi[2]}, {hi[3]}, idx;
    prmt.b32 bhi, ph, qh, sel;
    prmt.b32 vh, blo, bhi, 0x7351;
    prmt.b32 vl, blo, bhi, 0x6240;
    mul.rn.{kind} ch, vh, $4;
    mul.rn.{kind} cl, vl, $6;
    fma.rn.{kind} $0, vh, $3, ch;
    fma.rn.{kind} $1, vl, $5, cl;
    }}
    """


def _split(scale: Array, dtype: Any) -> tuple[Array, Array]:
    """``(s_hi, s_lo)`` in ``dtype`` with ``s_hi + s_lo`` ~ ``scale`` to 16 bits (float32 math)."""
    hi = scale.astype(dtype)
    return hi, (scale - hi.astype(jnp.float32)).astype(dtype)


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


def _decode_prmt(packed: Array, scale_first: Array, scale_second: Array, dtype: Any,
                 interpret: Any) -> tuple[Array, Array]:  # fmt: skip
    """Both K halves of a repacked ``[64, 64]`` uint8 tile, decoded by byte permutes.

    ``decode="prmt"`` (see :class:`MgpuNF4Config`): the code's value is looked up as a
    ``dtype`` bit pattern and multiplied by the float32 scale in packed ``dtype`` arithmetic
    (:func:`_prmt_asm`, 15 instructions per 4 weights). Two roundings (the NF4 value to
    ``dtype``, the product) against :func:`_decode_half`'s one, so a weight can differ from
    :func:`~pallas_kernels.nf4.dequantize_nf4` by one ulp of ``dtype``. The interpreter branch
    computes the same values: the products of ``dtype`` operands are exact in float32, the
    ``mul.rn`` rounds once, and :func:`_fma_round` is ``fma.rn``'s single rounding.
    """
    shape = packed.shape
    split = [_split(s, dtype) for s in (scale_first, scale_second)]
    s_full = [lax.broadcast_in_dim(part, shape, [0]) for pair in split for part in pair]
    if interpret is not None:  # Interpreter: no inline PTX; the same roundings in jnp.
        byte = packed.astype(jnp.int32)
        return (
            _prmt_emulated(byte >> 4, *s_full[:2], dtype),
            _prmt_emulated(byte & 0xF, *s_full[2:], dtype),
        )
    return _prmt_decoder(dtype)(packed, *s_full)


def _prmt_emulated(codes: Array, s_hi: Array, s_lo: Array, dtype: Any) -> Array:
    """What :func:`_prmt_asm` computes for each code, in jnp (interpreter branches): the NF4
    value rounded to ``dtype``, times the split scale with ``fma.rn``'s single rounding (the
    products of ``dtype`` operands are exact in float32, ``mul.rn`` rounds once)."""
    value = nf4_lookup(codes).astype(dtype).astype(jnp.float32)
    s_hi, s_lo = s_hi.astype(jnp.float32), s_lo.astype(jnp.float32)
    low = (value * s_lo).astype(dtype).astype(jnp.float32)
    return _fma_round(value * s_hi, low, dtype)


def _decode_nibbles(packed: Array, shift: Array, scale: Array, dtype: Any, decode: str,
                    interpret: Any) -> Array:  # fmt: skip
    """One nibble of every byte of a repacked ``[64, 64]`` uint8 tile as a ``[64, 64]`` operand.

    The backward's decode (:func:`nf4_matmul_t_mgpu`): ``shift`` (a traced int32, 4 for the
    high nibbles, 0 for the low ones) picks the K half, ``scale`` is the ``[64]`` float32 absmax
    per row. ``decode="select"`` is :func:`_decode_half`'s exact select tree. ``"prmt"`` feeds
    the forward's :func:`_prmt_asm` a 16-bit word merged from two registers of the tile (2
    shifts and a ``lop3``): the wanted nibbles of register ``a`` in the high-nibble slots, those
    of ``b`` in the low ones, so its two outputs are ``a``'s and ``b``'s decoded pairs (17
    instructions per 4 weights instead of 15; :func:`_prmt_half_decoder`). Same values as
    :func:`_decode_prmt` (interpreter: :func:`_prmt_emulated`).
    """
    if decode == "select":
        codes = (packed.astype(jnp.int32) >> shift) & 0xF
        values = nf4_lookup(codes) * lax.broadcast_in_dim(scale, packed.shape, [0])
        return values.astype(dtype)
    s_full = [lax.broadcast_in_dim(part, packed.shape, [0]) for part in _split(scale, dtype)]
    if interpret is not None:  # Interpreter: no inline PTX; the same roundings in jnp.
        return _prmt_emulated((packed.astype(jnp.int32) >> shift) & 0xF, *s_full, dtype)
    return _prmt_half_decoder(dtype)(packed, *s_full)


@functools.cache
def _prmt_decoder(dtype: Any) -> Callable[..., tuple[Array, Array]]:
    """The ``plgpu.inline_mgpu`` function running :func:`_prmt_asm` on every register."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    asm = _prmt_asm(dtype)
    out_type = plgpu.ShapeDtypeStruct((_ROWS, _HALF), dtype, layout=plgpu.Layout.WGMMA)
    wgmma = plgpu.Layout.WGMMA

    @plgpu.inline_mgpu(arg_types=(wgmma,) * 5, return_type=(out_type, out_type))
    def decode(ctx: Any, packed: Any, *scales: Any) -> tuple[Any, Any]:
        del ctx
        i16, i32 = ir.IntegerType.get_signless(16), ir.IntegerType.get_signless(32)
        like = scales[0]
        pair = ir.VectorType(like.registers.flat[0].type)
        result = llvm.StructType.get_literal([i32, i32])
        first, second = np.empty_like(like.registers), np.empty_like(like.registers)
        for idx, reg in np.ndenumerate(packed.registers):  # vector<2xi8>: 2 bytes, 4 codes
            word = arith.extui(i32, mgpu_utils.bitcast(reg, i16))
            s_regs = [mgpu_utils.bitcast(s.registers[idx], i32) for s in scales]
            out = llvm.inline_asm(result, [word, *s_regs], asm, "=r,=r,r,r,r,r,r")
            for regs, i in ((first, 0), (second, 1)):
                regs[idx] = mgpu_utils.bitcast(llvm.extractvalue(i32, out, [i]), pair)
        return tuple(
            type(like)(_registers=r, _layout=like.layout, _is_signed=None) for r in (first, second)
        )

    return decode


@functools.cache
def _prmt_half_decoder(dtype: Any) -> Callable[..., Array]:
    """The ``plgpu.inline_mgpu`` function of :func:`_decode_nibbles`'s ``"prmt"`` decode.

    The nibble half is the warpgroup's (compute warpgroup 0: high nibbles, 1: low), read from
    the thread index. Registers are taken in pairs ``(a, b)``; the word given to
    :func:`_prmt_asm` is ``(a << s & 0xF0F0) | (b >> (4 - s) & 0x0F0F)`` with ``s = 4·wg``, so
    its ``h`` nibbles are ``a``'s wanted ones and its ``l`` nibbles ``b``'s.
    """
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    asm = _prmt_asm(dtype)
    out_type = plgpu.ShapeDtypeStruct((_ROWS, _HALF), dtype, layout=plgpu.Layout.WGMMA)
    wgmma = plgpu.Layout.WGMMA

    @plgpu.inline_mgpu(arg_types=(wgmma,) * 3, return_type=out_type)
    def decode(ctx: Any, packed: Any, s_hi: Any, s_lo: Any) -> Any:
        del ctx
        i16, i32 = ir.IntegerType.get_signless(16), ir.IntegerType.get_signless(32)
        const = lambda v: arith.constant(i32, v)  # noqa: E731
        shift = arith.muli(mgpu_utils.warpgroup_idx(sync=True), const(4))
        shift_b = arith.subi(const(4), shift)
        pair = ir.VectorType(s_hi.registers.flat[0].type)
        result = llvm.StructType.get_literal([i32, i32])
        regs = list(np.ndindex(packed.registers.shape))
        assert len(regs) % 2 == 0, packed.registers.shape
        out = np.empty_like(s_hi.registers)
        for a, b in zip(regs[0::2], regs[1::2], strict=True):
            ra, rb = (
                arith.extui(i32, mgpu_utils.bitcast(packed.registers[i], i16)) for i in (a, b)
            )
            word = arith.ori(
                arith.andi(arith.shli(ra, shift), const(0xF0F0)),
                arith.andi(arith.shrui(rb, shift_b), const(0x0F0F)),
            )
            s_regs = [mgpu_utils.bitcast(s.registers[i], i32) for i in (a, b) for s in (s_hi, s_lo)]
            res = llvm.inline_asm(result, [word, *s_regs], asm, "=r,=r,r,r,r,r,r")
            for i, idx in enumerate((a, b)):
                out[idx] = mgpu_utils.bitcast(llvm.extractvalue(i32, res, [i]), pair)
        return type(s_hi)(_registers=out, _layout=s_hi.layout, _is_signed=None)

    return decode


def _accumulate(acc: Array, terms: Sequence[tuple[Callable[[], Array], Any]], interpret: Any,
                ) -> Array:  # fmt: skip
    """``acc + Σ lhs() @ rhsᵀ`` in float32 on the tensor cores; ``rhs`` a ``[n, k]`` smem tile.

    The wgmmas are issued in order into one accumulator and awaited once; each ``lhs`` thunk
    (register operand) is evaluated just before its wgmma is issued, so the decode of a later
    term runs while the earlier terms' wgmmas are in flight.
    """
    if interpret is not None:  # Interpreter: no run_state / wgmma / transposed views; dots.
        for lhs, rhs in terms:
            acc = acc + jnp.dot(lhs(), rhs[...].T, preferred_element_type=jnp.float32)
        return acc

    def issue(refs: tuple[Any]) -> None:
        (ref,) = refs
        for lhs, rhs in terms:
            plgpu.wgmma(ref, lhs(), plgpu.transpose_ref(rhs, (1, 0)))

    (acc,) = pl.run_state(issue)((plgpu.ACC.init(acc),))
    return acc


def _wait_all(bars: Sequence[Any], slot: Array) -> None:
    """Waits until every TMA copy into ring slot ``slot`` has landed."""
    for bar in bars:
        plgpu.barrier_wait(bar.at[slot])


def _write_out(acc: Array, tiles: Sequence[Any], out_ref: Any, m0: Array, c0: Array,
               transposed: bool, interpret: Any, pending: bool = False) -> None:  # fmt: skip
    """Writes a ``[64, bm]`` accumulator (cast) as ``out[m0:m0+bm, c0:c0+64] = accᵀ`` or, without
    ``transposed``, ``out[c0:c0+64, m0:m0+bm] = acc``, through the shared ``tiles``.

    One tile holding ``bm`` tokens: one TMA store. Two ``[64, 64]`` tiles: ``bm / 64`` pieces of
    64 tokens, alternating between them (a tile is rewritten once the store that read it two
    pieces ago is done). ``transposed``: each piece goes to the ``WGMMA_TRANSPOSED`` register
    layout and through a transposed view of its tile (the interpreter has neither: ``.T``).
    ``pending`` (one tile only): first wait until the previous store has read the tile, and
    leave this one in flight (the caller waits before its shared memory goes out of scope).
    """
    bm = acc.shape[1]
    if pending:
        assert len(tiles) == 1, "pending stores need a single output tile"
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    chunk = bm if len(tiles) == 1 else _ROWS
    for c in range(bm // chunk):
        piece = acc if chunk == bm else acc[:, c * chunk : (c + 1) * chunk]
        tile = tiles[c % len(tiles)]
        if c >= len(tiles):
            plgpu.wait_smem_to_gmem(len(tiles) - 1, wait_read_only=True)
        tokens, cols = pl.ds(m0 + c * chunk if c else m0, chunk), pl.ds(c0, _ROWS)
        if transposed:
            if interpret is None:
                plgpu.transpose_ref(tile, (1, 0))[...] = plgpu.layout_cast(
                    piece, plgpu.Layout.WGMMA_TRANSPOSED
                )
            else:  # Interpreter: no transposed views.
                tile[...] = piece.T
            dst = out_ref.at[tokens, cols]
        else:
            tile[...] = piece
            dst = out_ref.at[cols, tokens]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(tile, dst)
    if not pending:
        plgpu.wait_smem_to_gmem(0)


def _feed(load: Callable[[Array, Array], None], free: Any, steps: int | Array,
          slots: int) -> None:  # fmt: skip
    """The memory warpgroup's loop: fill the ring, then refill each slot once it is released.

    Step ``i + slots`` is loaded into step ``i``'s slot after both compute warpgroups arrived on
    ``free`` for it. Every release is waited on, the last ``slots`` included, so each phase of
    ``free`` is observed before the shared memory goes out of scope. ``steps`` may be traced.
    """
    for i in range(min(slots, steps) if isinstance(steps, int) else slots):
        fill = functools.partial(load, jnp.int32(i), jnp.int32(i))
        fill() if isinstance(steps, int) else pl.when(i < steps)(fill)

    @pl.loop(0, steps)
    def _refill(step: Array) -> None:
        slot = lax.rem(step, slots)
        plgpu.barrier_wait(free.at[slot])

        @pl.when(step + slots < steps)
        def _load() -> None:
            load(step + slots, slot)


# ------------------------------------------------------------------------------------ kernel


def _nf4_matmul_call(x: Array, packed: Array, scales: Array, block_m: int,
                     config: MgpuNF4Config, interpret: Any) -> Array:  # fmt: skip
    """``y [Mp, Np]`` (or ``yᵀ [Np, Mp]`` without ``transposed_store``) for padded operands."""
    mp, kp = x.shape
    np_ = packed.shape[0]
    bm, slots, dtype = block_m, config.slots, x.dtype
    steps = kp // BLOCK_K
    transposed = config.transposed_store

    def kernel(x_ref, w_ref, s_ref, out_ref, scoped):
        (x_lo, x_hi, w_ring, s_lo, s_hi, out_smem), (load_bars, free) = scoped
        m_tile, n_tile = lax.axis_index("m_tiles"), lax.axis_index("n_tiles")
        wg = lax.axis_index("wg")
        m0, n0 = m_tile * bm, n_tile * BLOCK_N

        @pl.when(wg < _COMPUTE_WGS)
        def _compute() -> None:
            plgpu.set_max_registers(config.compute_registers, action="increase")
            own_rows = pl.ds(wg * _ROWS, _ROWS)
            row_layout = plgpu.Layout.WGMMA.reduce(1)

            def step(i: Array, acc: Array) -> Array:
                slot = lax.rem(i, slots)
                _wait_all(load_bars, slot)
                w_tile = w_ring.at[slot].at[own_rows]

                def scale(scales_ring: Any) -> Array:
                    return _read(scales_ring.at[slot].at[wg], row_layout, interpret)

                def operand(high: bool, scales_ring: Any) -> Callable[[], Array]:
                    def decode() -> Array:
                        packed_regs = _read(w_tile, plgpu.Layout.WGMMA, interpret)
                        return _decode_half(packed_regs, high, scale(scales_ring), dtype)

                    return decode

                if config.decode == "select":
                    lhs = (operand(True, s_lo), operand(False, s_hi))
                else:  # "prmt" decodes both halves at once, before the first wgmma.
                    both: list[tuple[Array, Array]] = []

                    def half(i: int) -> Callable[[], Array]:
                        def decode() -> Array:
                            if not both:
                                packed_regs = _read(w_tile, plgpu.Layout.WGMMA, interpret)
                                both.append(
                                    _decode_prmt(
                                        packed_regs, scale(s_lo), scale(s_hi), dtype, interpret
                                    )
                                )
                            return both[0][i]

                        return decode

                    lhs = (half(0), half(1))
                acc = _accumulate(
                    acc, [(lhs[0], x_lo.at[slot]), (lhs[1], x_hi.at[slot])], interpret
                )
                plgpu.barrier_arrive(free.at[slot])
                return acc

            zeros = jnp.zeros((_ROWS, bm), jnp.float32)
            if interpret is None:
                zeros = plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)
            acc = lax.fori_loop(0, steps, step, zeros).astype(dtype)
            _write_out(acc, [out_smem.at[wg]], out_ref, m0, n0 + wg * _ROWS, transposed,
                       interpret)  # fmt: skip

        @pl.when(wg == _COMPUTE_WGS)
        def _memory() -> None:
            plgpu.set_max_registers(config.memory_registers, action="decrease")
            x_bar_lo, x_bar_hi, w_bar, s_bar_lo, s_bar_hi = load_bars
            tokens = pl.ds(m0, bm)
            w_rows = pl.ds(n0, BLOCK_N)
            s_rows = pl.ds(n_tile * _COMPUTE_WGS, _COMPUTE_WGS)

            def load(i: Array, slot: Array) -> None:
                k0 = i * BLOCK_K
                copies = (
                    (x_ref.at[tokens, pl.ds(k0, _HALF)], x_lo, x_bar_lo),
                    (x_ref.at[tokens, pl.ds(k0 + _HALF, _HALF)], x_hi, x_bar_hi),
                    (w_ref.at[w_rows, pl.ds(i * _HALF, _HALF)], w_ring, w_bar),
                    (s_ref.at[2 * i, s_rows], s_lo, s_bar_lo),
                    (s_ref.at[2 * i + 1, s_rows], s_hi, s_bar_hi),
                )
                for src, ring, bar in copies:
                    plgpu.copy_gmem_to_smem(src, ring.at[slot], bar.at[slot])

            _feed(load, free, steps, slots)

    out_tile = (bm, _ROWS) if transposed else (_ROWS, bm)
    scratch = (
        _smem_tile((slots, bm, _HALF), dtype),  # x, K columns 0-63 of the step
        _smem_tile((slots, bm, _HALF), dtype),  # x, K columns 64-127
        _smem_tile((slots, BLOCK_N, _HALF), jnp.uint8),  # repacked W
        plgpu.SMEM((slots, _COMPUTE_WGS, _ROWS), jnp.float32),  # scales, first half
        plgpu.SMEM((slots, _COMPUTE_WGS, _ROWS), jnp.float32),  # scales, second half
        _smem_tile((_COMPUTE_WGS, *out_tile), dtype),  # the output tiles on their way out
    )
    out_shape = (mp, np_) if transposed else (np_, mp)
    return _launch(kernel, (x, packed, scales), scratch, 5, slots, (mp // bm, np_ // BLOCK_N),
                   ("m_tiles", "n_tiles"), out_shape, dtype, KERNEL_NAME, interpret)  # fmt: skip


def _nf4_matmul_t_call(dy: Array, packed: Array, scales: Array, block_m: int,
                       config: MgpuNF4Config, interpret: Any) -> Array:  # fmt: skip
    """``dx [Mp, Kp]`` (or ``dxᵀ [Kp, Mp]`` without ``transposed_store``) for padded operands.

    The backward orientation (:func:`nf4_matmul_t_mgpu`): CTA ``(m, kt)`` owns tokens ``m0 ..
    m0 + bm`` and the 128-wide K tile ``kt`` (64 packed bytes per W row); compute warpgroup
    ``wg`` owns K rows ``kt·128 + wg·64 .. +64`` (the tile's high nibbles for ``wg = 0``, the
    low for 1) and a ``[64, bm]`` float32 accumulator of ``dxᵀ``. Per step of 128 N rows the
    memory warpgroup streams the two 64-column halves of the dy tile, the packed ``[128, 64]``
    W tile (the forward's W copy with rows and columns swapped in meaning) and the ``[2, 2,
    64]`` scales of the two K halves × two N blocks; each compute warpgroup decodes its nibble
    of each 64-row N block into a ``[64 N, 64 K]`` register tile, stores it to its own shared
    tile and issues ``wgmma(acc, tileᵀ, dy_halfᵀ)`` (a transposed shared-memory A operand);
    the second block is decoded while the first block's wgmma runs (:func:`_accumulate`).
    """
    mp, np_ = dy.shape
    kp = 2 * packed.shape[1]
    bm, slots, dtype = block_m, config.slots, dy.dtype
    steps = np_ // BLOCK_N
    transposed = config.transposed_store

    def kernel(dy_ref, w_ref, s_ref, out_ref, scoped):
        (dy_lo, dy_hi, w_ring, s_ring, tiles), (load_bars, free) = scoped
        m_tile, k_tile = lax.axis_index("m_tiles"), lax.axis_index("k_tiles")
        wg = lax.axis_index("wg")
        m0, k0 = m_tile * bm, k_tile * BLOCK_K

        @pl.when(wg < _COMPUTE_WGS)
        def _compute() -> None:
            plgpu.set_max_registers(config.compute_registers, action="increase")
            row_layout = plgpu.Layout.WGMMA.reduce(1)
            shift = 4 - 4 * wg  # warpgroup 0: high nibbles (K columns 0-63 of the tile)

            def decode_block(slot: Array, j: int) -> Array:
                """W's 64-row N block ``j`` of the step in ``slot``: this warpgroup's nibble,
                decoded and scaled, ``[64 N, 64 K]`` in registers."""
                rows = w_ring.at[slot].at[pl.ds(j * _ROWS, _ROWS)]
                packed_regs = _read(rows, plgpu.Layout.WGMMA, interpret)
                scale = _read(s_ring.at[slot].at[wg].at[j], row_layout, interpret)
                return _decode_nibbles(packed_regs, shift, scale, dtype, config.decode, interpret)

            def stage(j: int, w_nk: Array) -> Any:
                """Stores block ``j`` to this warpgroup's tile ``j``; returns its ``Wᵀ`` view."""
                tile = tiles.at[wg * 2 + j]  # a dynamic index (wgmma operand)
                tile[...] = w_nk
                plgpu.commit_smem()
                return plgpu.transpose_ref(tile, (1, 0))

            dy_halves = (dy_lo, dy_hi)
            out_tiles = [tiles.at[wg * 2], tiles.at[wg * 2 + 1]]
            out_cols = k0 + wg * _ROWS

            if config.overlap_backward and interpret is None:
                # One wgmma stays in flight while the next block decodes. After issuing block
                # j of step i, wgmma_wait(1) leaves only it running: block 1 - j's previous
                # wgmma (the last reader of the tile decoded next) is done, and after block 0
                # so is the previous step's block 1, the last reader of its ring slot.
                def pipelined(acc_ref: Any) -> None:
                    @pl.loop(0, steps)
                    def _step(i: Array) -> None:
                        slot = lax.rem(i, slots)
                        _wait_all(load_bars, slot)
                        for j in (0, 1):
                            operand = stage(j, decode_block(slot, j))
                            rhs = plgpu.transpose_ref(dy_halves[j].at[slot], (1, 0))
                            plgpu.wgmma(acc_ref, operand, rhs)
                            plgpu.wgmma_wait(1)
                            if j == 0:

                                @pl.when(i > 0)
                                def _release_previous() -> None:
                                    plgpu.barrier_arrive(free.at[lax.rem(i + slots - 1, slots)])

                    acc = acc_ref[...].astype(dtype)  # waits for the last wgmma
                    plgpu.barrier_arrive(free.at[lax.rem(steps - 1, slots)])
                    _write_out(acc, out_tiles, out_ref, m0, out_cols, transposed, interpret)

                pl.run_scoped(pipelined, plgpu.ACC((_ROWS, bm), jnp.float32))
                return

            def step(i: Array, acc: Array) -> Array:
                slot = lax.rem(i, slots)
                _wait_all(load_bars, slot)

                def operand(j: int) -> Callable[[], Any]:
                    def decode() -> Any:
                        w_nk = decode_block(slot, j)
                        if interpret is not None:  # Interpreter: no transposed views.
                            return w_nk.T
                        return stage(j, w_nk)

                    return decode

                acc = _accumulate(
                    acc, [(operand(0), dy_lo.at[slot]), (operand(1), dy_hi.at[slot])], interpret
                )
                plgpu.barrier_arrive(free.at[slot])
                return acc

            zeros = jnp.zeros((_ROWS, bm), jnp.float32)
            if interpret is None:
                zeros = plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)
            acc = lax.fori_loop(0, steps, step, zeros).astype(dtype)
            # The decode tiles are free (the last wgmmas were awaited): dx leaves through them
            # in 64-token pieces.
            _write_out(acc, out_tiles, out_ref, m0, out_cols, transposed, interpret)

        @pl.when(wg == _COMPUTE_WGS)
        def _memory() -> None:
            plgpu.set_max_registers(config.memory_registers, action="decrease")
            dy_bar_lo, dy_bar_hi, w_bar, s_bar = load_bars
            tokens = pl.ds(m0, bm)
            w_cols = pl.ds(k_tile * _HALF, _HALF)
            s_blocks = pl.ds(k_tile * 2, 2)

            def load(i: Array, slot: Array) -> None:
                n0 = i * BLOCK_N
                copies = (
                    (dy_ref.at[tokens, pl.ds(n0, _ROWS)], dy_lo, dy_bar_lo),
                    (dy_ref.at[tokens, pl.ds(n0 + _ROWS, _ROWS)], dy_hi, dy_bar_hi),
                    (w_ref.at[pl.ds(n0, BLOCK_N), w_cols], w_ring, w_bar),
                    (s_ref.at[s_blocks, pl.ds(i * 2, 2)], s_ring, s_bar),
                )
                for src, ring, bar in copies:
                    plgpu.copy_gmem_to_smem(src, ring.at[slot], bar.at[slot])

            _feed(load, free, steps, slots)

    scratch = (
        _smem_tile((slots, bm, _ROWS), dtype),  # dy, N rows 0-63 of the step
        _smem_tile((slots, bm, _ROWS), dtype),  # dy, N rows 64-127
        _smem_tile((slots, BLOCK_N, _HALF), jnp.uint8),  # repacked W
        plgpu.SMEM((slots, 2, 2, _ROWS), jnp.float32),  # scales [K half, N block, row]
        _smem_tile((_COMPUTE_WGS * 2, _ROWS, _ROWS), dtype),  # decoded W blocks, then dx
    )
    out_shape = (mp, kp) if transposed else (kp, mp)
    return _launch(kernel, (dy, packed, scales), scratch, 4, slots, (mp // bm, kp // BLOCK_K),
                   ("m_tiles", "k_tiles"), out_shape, dtype, KERNEL_NAME_T, interpret)  # fmt: skip


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


@functools.partial(jax.jit, static_argnames=("config", "interpret", "transposed"))
def _matmul(lhs: Array, w: MgpuNF4Weight, config: MgpuNF4Config, interpret: Any,
            transposed: bool) -> Array:  # fmt: skip
    """``lhs·Wᵀ`` (``lhs [..., K]``) or, ``transposed``, ``lhs·W`` (``lhs [..., N]``): pads the
    rows to the token tile and the reduction to W's padded extent, runs the kernel, slices."""
    n, k = w.shape
    np_, kp2 = w.packed.shape
    red, red_padded, out = (n, np_, k) if transposed else (k, 2 * kp2, n)
    lead = lhs.shape[:-1]
    lhs2 = lhs.reshape(-1, red)
    m = lhs2.shape[0]
    bm = _token_tile(m, config)
    mp = _round_up(m, bm)
    if (mp, red_padded) != (m, red):
        lhs2 = jnp.pad(lhs2, ((0, mp - m), (0, red_padded - red)))
    call = _nf4_matmul_t_call if transposed else _nf4_matmul_call
    y = call(lhs2, w.packed, w.scales, bm, config, interpret)
    if not config.transposed_store:
        y = y.T
    return y[:m, :out].reshape(*lead, out)


# ------------------------------------------------------------------------------- public API


def nf4_matmul_mgpu(x: Array, w: NF4Tensor | MgpuNF4Weight, *,
                    config: MgpuNF4Config = MgpuNF4Config(), interpret: Any = None,
                    ) -> Array:  # fmt: skip
    """``x · Wᵀ`` for ``x [..., K]`` (bf16/f16) and an NF4 ``W [N, K]``; returns ``[..., N]``.

    Float32 accumulation, one rounding to ``x.dtype``. ``w``: an :class:`NF4Tensor` (repacked
    by :func:`prepare_weight` on every call, ~1.1 bytes of traffic per weight) or the
    :class:`MgpuNF4Weight` it returns. ``interpret``: a Mosaic GPU interpreter parameter
    object (``plgpu.InterpretGPUParams()``, CPU tests), or None to compile for the GPU.
    Unsupported arguments raise ``ValueError`` (see :func:`check_supported`).
    """
    check_supported(x, w, config)
    if not isinstance(w, MgpuNF4Weight):
        w = prepare_weight(w)
    return _matmul(x, w, config, interpret, transposed=False)


def nf4_matmul_t_mgpu(dy: Array, w: NF4Tensor | MgpuNF4Weight, *,
                      config: MgpuNF4Config = MgpuNF4Config(), interpret: Any = None,
                      ) -> Array:  # fmt: skip
    """``dy · W`` for ``dy [..., N]`` (bf16/f16) and an NF4 ``W [N, K]``; returns ``[..., K]``.

    The other orientation of :func:`nf4_matmul_mgpu` (the input gradient of ``y = x·Wᵀ``), on
    the same :class:`MgpuNF4Weight` (module docstring, "The backward orientation"). Float32
    accumulation, one rounding to ``dy.dtype``; arguments as :func:`nf4_matmul_mgpu`'s
    (``config.transposed_store=False`` writes ``dxᵀ`` and lets XLA transpose it).
    """
    check_supported(dy, w, config, transposed=True)
    if not isinstance(w, MgpuNF4Weight):
        w = prepare_weight(w)
    return _matmul(dy, w, config, interpret, transposed=True)


def nf4_matmul_t_mgpu_reference(dy: Array, w: NF4Tensor) -> Array:
    """The plain-jnp reference of :func:`nf4_matmul_t_mgpu`: ``dy · dequantize_nf4(W)``."""
    dx = jnp.dot(dy, dequantize_nf4(w, dy.dtype), preferred_element_type=jnp.float32)
    return dx.astype(dy.dtype)


def nf4_matmul_mgpu_reference(x: Array, w: NF4Tensor) -> Array:
    """The plain-jnp reference: decode W to ``x.dtype``, then a float32-accumulated dot."""
    y = jnp.dot(x, dequantize_nf4(w, x.dtype).T, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)
