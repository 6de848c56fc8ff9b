"""Causal GQA flash attention, forward and backward, as Mosaic GPU kernels (Hopper: TMA + wgmma).

Why these kernels exist: the Triton-lowered kernels in :mod:`pallas_kernels.flash_attention_kernels`
reach only a third of cuDNN's forward+backward speed on the H200, and jax's own Mosaic GPU
attention has no causal backward. The design follows jax's (FlashAttention-3 style: 64-row
tiles per warpgroup, two compute warpgroups and one memory warpgroup per CTA) and adds what
lorax needs: causal tile skipping in all kernels, GQA with K/V never repeated (the GQA sum of
dK/dV inside the kernel), bf16, the score scale, sliding windows, the softcap (which cuDNN
lacks) and packed segment ids (which cuDNN cannot mask). On the H200 (BENCHMARKS.md §3) the
forward is 1.03-1.12x cuDNN's up to 32K; forward+backward is 1.20x / 1.04x / 1.01-1.02x
cuDNN's at 2x2048 / 1x8192 / 1x32768 (the two-kernel backward at 2K, the fused one from 8K;
1.00x with a 4096 window at 8K); with packed rows of ~1K-token examples 3.9-43x the Triton
kernels, with a softcap 3.6-3.8x.

Segment ids (optional, ``[B, S]`` int32): each warpgroup loads its own rows' ids once; the
streamed tiles' ids ride with K (forward, dQ) or with each query tile (dK/dV) through the
rings, and every tile is masked where the ids differ. Each CTA also reads its row of
:func:`segment_spans` and streams only the tiles its rows' segments reach: the forward and dQ
start at the first key any of its queries may see, dK/dV stop at the last query any of its
keys may be seen by. Packed rows of short examples so cost what their examples do, not the
whole causal triangle.

A sliding window bounds the same tile ranges from the other side (:class:`_Scores`): the
forward and dQ start at the first key the CTA's first row may see, dK/dV stop at the last query
that may see its last key, and only the tiles across the window's edge pay for its mask, so
windowed attention costs what its visible pairs do. The softcap (Gemma 2) applies
``cap·tanh(scale·s/cap)`` to every score tile, and its derivative ``1 − tanh²`` to dS.

Every CTA has two compute warpgroups and one memory warpgroup that streams tiles through a
ring of shared-memory slots with TMA (``_feed_ring``; a slot is refilled once both compute
warpgroups have arrived on its ``free`` barrier). Independent tile products are issued
together before one wait (``_products``). Softmax runs in base 2: the logits are
``s·c`` with ``c = scale·log2 e`` (folded into the multiply-add that feeds ``exp2``; the
forward's row maxima are taken on ``s``) and ``lse₂ = lse·log2 e``.

* Forward, grid ``q_heads x q_tiles / 2 x batch``: warpgroup ``w`` owns 64 query rows and
  streams the K/V tiles up to its diagonal with the online softmax; the two warpgroups take
  turns on the tensor cores (one's softmax overlaps the other's matmuls). Saves ``out`` and
  ``lse₂`` only.
* dK/dV, grid ``kv_heads x kv_tiles / 2 x batch``: warpgroup ``w`` owns 64 K/V rows and
  float32 dK/dV accumulators in registers, and streams every query tile that can see them, for
  each of the ``G`` query heads of its KV head in turn (the GQA sum happens in the
  accumulators). Per tile::

      sT = K·Qᵀ  dpT = V·dOᵀ        pT = exp2(sT·c − lse₂)   dsT = pT ⊙ (dpT − Δ)
      dV += pT·dO  dK += dsT·Q

  (−lse₂/c and −Δ are the products' initial accumulators, to keep the registers in budget).

* dQ, grid ``q_heads x q_tiles / 2 x batch``: warpgroups own query tiles and stream K/V up to
  the diagonal, recomputing ``s`` and ``dp``: seven tile products per tile pair where the
  textbook has five, but no atomics. Four designs that fused dQ into the dK/dV kernel (dQ
  partials reduce-added into float32 global memory by TMA) were slower on the H200 or, one,
  deadlocked there (its registers exceeded the launch budget); the FlashAttention-3 split lost
  because its live set does not fit the registers: ptxas spills ~0.5 KB per thread and
  serialises its wgmmas (BENCHMARKS.md §3).
* Fused, ``bwd_dq="fused"`` (the default for plain causal attention at head dim 128 from
  S = 8192, :func:`_bwd_dq`): the warpgroups split the roles instead of the keys
  (:func:`_fused_call`): five tile products, no spilled loads in its hot loops, no wgmma
  fences. dQ's partials are reduce-added in no fixed order, so dQ is not bitwise
  reproducible run to run (``bwd_dq="kernel"`` is). On the H200 its backward is 9% faster
  than the two kernels' at 1x32768 and 5% at 1x8192, 5% behind at 2x2048. Nsight Compute
  put it at the same tensor-pipe cycles as cuDNN's backward, busy 58% of the time against
  cuDNN's 65% (before two changes on warpgroup 1's path gained 3% and 4%: dS stored under
  dK's product, dS as a bfloat16 product). Moving its dQ product to warpgroup 0 or to the
  memory warpgroup, splitting it by columns (within warpgroup 1 or between both),
  or giving Q a deeper ring of its own, was slower (BENCHMARKS.md §3).

The backward kernels do not take turns on the tensor cores: measured, the forward's
turn-taking made both of them 3-12% slower (BENCHMARKS.md §3).

Causality costs nothing beyond the diagonal: each CTA streams only the tiles that intersect its
causal triangle, and only the (at most two) tiles per stream that straddle the diagonal pay
for the mask. Every grid launches its heaviest CTAs first, across heads where a head has too
few CTAs to fill the GPU (``_grid``).

Requirements (checked by :func:`check_supported`): S a multiple of 128 (callers pad), head_dim
64 or 128, bf16 or f16, causal.
In the Mosaic GPU interpreter (CPU tests) transposed shared-memory views and ``run_state`` do
not exist, so the helpers below have an interpreter branch that computes
the same values with plain reads (marked where used).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

__all__ = [
    "MgpuAttentionConfig",
    "check_supported",
    "flash_attention_mgpu",
    "flash_backward_mgpu",
    "flash_forward_mgpu",
    "segment_spans",
]

_LOG2E = math.log2(math.e)
_COMPUTE_WGS = 2
_ROWS = 64  # rows per warpgroup tile: the wgmma M
_REGISTER_FILE = 65536  # 32-bit registers per SM: the most one CTA's threads can hold
# What each of a CTA's 3·128 threads gets at launch (ptxas compiles for it; a multiple of 8).
# setmaxnreg only moves registers between the CTA's warpgroups, so their counts may sum to at
# most 3 x this: an increase beyond what the others gave back blocks forever (a deadlock on
# the H200 at 232 + 256 + 24 = 512, BENCHMARKS.md §3).
_LAUNCH_REGISTERS = _REGISTER_FILE // (128 * (_COMPUTE_WGS + 1)) // 8 * 8
HEAD_DIMS = (64, 128)  # the head dims and dtypes the kernels take
DTYPES = (jnp.bfloat16, jnp.float16)
# Register layouts of per-row and per-column vectors of a wgmma tile (what broadcasts to it).
_ROW_STAT = plgpu.Layout.WGMMA.reduce(1)
_COL_STAT = plgpu.Layout.WGMMA.reduce(0)
FORWARD_KERNEL_NAME = "lorax_mgpu_attention_fwd"
LAUNCH_ORDERS = ("auto", "heads", "tiles")
# How the backward gets dQ: its own kernel (seven tile products per tile pair, no atomics), or
# inside the dK/dV kernel (five; its partials reduce-added by TMA: _fused_call).
BWD_DQ = ("auto", "kernel", "fused")
# "auto" fuses dQ from this sequence length for plain causal attention at head dim 128 (what was
# timed: _bwd_dq): on the H200 the fused backward was 5% faster than the two kernels at 1x8192
# and 9% at 1x32768, 5% slower at 2x2048, and 33% slower on packed ~1K-token examples at
# 1x8192 (BENCHMARKS.md §3, "dS in bfloat16").
_FUSED_MIN_SEQ_LEN = 8192
_SMS = 132  # SMs of the H100 SXM / H200, the GPUs the kernels are tuned on (sizes ``_grid``'s rule)
_HEADS_FIRST_MIN_CTAS = 3 * _SMS // 4  # "auto" launches heads first from this many CTAs per head


@dataclasses.dataclass(frozen=True)
class MgpuAttentionConfig:
    """Tile sizes and launch parameters of the Mosaic GPU attention kernels.

    ``fwd_block_kv``/``fwd_slots``: the forward's K/V tile and ring depth. ``bwd_slots``: the
    backward's ring depth (Q/dO tiles are 64x64 in the dK/dV kernel; K/V tiles are
    ``dq_block_kv`` wide in the dQ kernel). ``fwd_registers``/``bwd_registers``: registers per
    thread ``(compute, memory)`` of the forward's and the backward kernels' warpgroups, with
    ``2·compute + memory`` at most 3 x 168 (ptxas compiles the launch for 168 and ``setmaxnreg``
    only moves them between the warpgroups at run time). The backward takes the most its compute
    warpgroups can have: at 232 ptxas spilled 132 bytes per thread in the dK/dV kernel, at 240
    40 bytes, and the backward ran ~1% faster (BENCHMARKS.md §3, registers; at 240 it now
    spills 20 bytes); the forward spills nothing at 232. ``launch_order``: ``"heads"``,
    ``"tiles"`` or ``"auto"``, which picks per kernel launch (:func:`_grid`). ``bwd_dq``: one
    of :data:`BWD_DQ`: the separate dQ kernel (``"kernel"``, bitwise reproducible), dQ fused
    into the dK/dV kernel (``"fused"``, :func:`_fused_call`, with ``fused_registers`` for its
    P, dS and memory warpgroups), or ``"auto"``, which fuses for plain causal attention at
    head dim 128 from S = 8192 (:func:`_bwd_dq`).
    """

    fwd_block_kv: int = 128
    fwd_slots: int = 2
    bwd_slots: int = 2
    dq_block_kv: int = 128
    fwd_registers: tuple[int, int] = (232, 40)
    bwd_registers: tuple[int, int] = (240, 24)
    launch_order: str = "auto"
    bwd_dq: str = "auto"
    fused_registers: tuple[int, int, int] = (232, 248, 24)

    def __post_init__(self) -> None:
        for name in ("fwd_block_kv", "dq_block_kv"):
            if getattr(self, name) not in (64, 128):
                raise ValueError(f"{name} must be 64 or 128, got {getattr(self, name)}")
        if self.launch_order not in LAUNCH_ORDERS:
            order = self.launch_order
            raise ValueError(f"launch_order must be one of {LAUNCH_ORDERS}, got {order!r}")
        if self.bwd_dq not in BWD_DQ:
            raise ValueError(f"bwd_dq must be one of {BWD_DQ}, got {self.bwd_dq!r}")
        if min(self.fwd_slots, self.bwd_slots) < 2:
            raise ValueError(f"ring depths must be >= 2, got {self.fwd_slots}/{self.bwd_slots}")
        for name in ("fwd_registers", "bwd_registers"):
            compute, memory = getattr(self, name)
            if memory > compute:
                raise ValueError(f"{name}={getattr(self, name)}: the memory warpgroup needs fewer")
            _check_registers(name, (compute, compute, memory))
        _check_registers("fused_registers", self.fused_registers)

    @property
    def seq_multiple(self) -> int:
        """S must be a multiple of this (one CTA's query rows and the forward's K/V tile)."""
        return max(_COMPUTE_WGS * _ROWS, self.fwd_block_kv)


def _check_registers(name: str, per_warpgroup: tuple[int, ...]) -> None:
    """setmaxnreg's rules: multiples of 8 in [24, 256], in sum at most the CTA's launch budget."""
    budget = len(per_warpgroup) * _LAUNCH_REGISTERS
    if sum(per_warpgroup) > budget or not all(24 <= r <= 256 and r % 8 == 0 for r in per_warpgroup):
        raise ValueError(
            f"{name}: registers per warpgroup {per_warpgroup} must be multiples of 8 in "
            f"[24, 256] summing to at most {budget}"
        )


def check_supported(q: Array, k: Array, v: Array, config: MgpuAttentionConfig,
                    segment_ids: Array | None = None, *, sliding_window: int | None = None,
                    softcap: float | None = None, scale: float = 1.0) -> None:  # fmt: skip
    """Raises ``ValueError`` naming the first requirement the arguments miss."""
    b, s, hq, d = q.shape
    if k.shape != v.shape or k.ndim != 4 or k.shape[:2] != (b, s) or k.shape[3] != d:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: need [B,S,Hq,D], [B,S,Hkv,D]")
    if hq % k.shape[2]:
        raise ValueError(f"{hq} query heads are not a multiple of {k.shape[2]} KV heads")
    if s % config.seq_multiple:
        raise ValueError(f"S={s} must be a multiple of {config.seq_multiple} (pad it)")
    if d not in HEAD_DIMS:
        raise ValueError(f"head_dim {d}: the Mosaic GPU kernels handle {HEAD_DIMS}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: need one of bf16, f16")
    if segment_ids is not None and (
        segment_ids.shape != (b, s) or not jnp.issubdtype(segment_ids.dtype, jnp.integer)
    ):
        raise ValueError(
            f"segment_ids {segment_ids.shape} {segment_ids.dtype}: need integers of shape {(b, s)}"
        )
    if sliding_window is not None and (int(sliding_window) != sliding_window or sliding_window < 1):
        raise ValueError(f"sliding_window must be a positive integer or None, got {sliding_window}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")
    if not scale > 0:  # the base-2 logits are scaled after the row maxima are taken
        raise ValueError(f"scale must be positive, got {scale}")


def _segments(segment_ids: Array | None) -> tuple[Array, Array] | None:
    """The segments as the kernels take them: int32 ids and their :func:`segment_spans` per
    CTA block of rows (or None)."""
    if segment_ids is None:
        return None
    return segment_ids.astype(jnp.int32), segment_spans(segment_ids, _COMPUTE_WGS * _ROWS)


# ----------------------------------------------------------------------------------- helpers


@dataclasses.dataclass(frozen=True)
class _T:
    """A shared-memory tile used transposed as a matmul operand."""

    ref: Any


def _operand(x: Any, interpret: Any) -> Any:
    if isinstance(x, _T):
        # Interpreter: no transposed views, so transpose the values read.
        return plgpu.transpose_ref(x.ref, (1, 0)) if interpret is None else x.ref[...].T
    return x if interpret is None or isinstance(x, jax.Array) else x[...]


def _products(
    terms: Sequence[tuple[Array, Any, Any]],
    interpret: Any,
    after_issue: Callable[[], None] | None = None,
) -> list[Array]:
    """``[acc + lhs @ rhs for acc, lhs, rhs in terms]`` in float32 on the tensor cores.

    All products are issued before any is awaited (one wgmma wait for the lot), and
    ``after_issue`` runs while they are in flight. ``lhs`` is registers or shared memory,
    ``rhs`` shared memory; either may be ``_T(ref)``.
    """
    if interpret is not None:  # Interpreter: no run_state / wgmma; plain dots.
        if after_issue is not None:
            after_issue()
        dot = lambda a, b: jnp.dot(
            _operand(a, interpret), _operand(b, interpret), preferred_element_type=jnp.float32
        )
        return [acc + dot(a, b) for acc, a, b in terms]

    def issue(refs: tuple[Any, ...]) -> None:
        for ref, (_, a, b) in zip(refs, terms, strict=True):
            plgpu.wgmma(ref, _operand(a, None), _operand(b, None))
        if after_issue is not None:
            after_issue()

    return list(pl.run_state(issue)(tuple(plgpu.ACC.init(acc) for acc, _, _ in terms)))


def _scale_by_probabilities(p: Array, dp: Array) -> Array:
    """``p ⊙ dp`` in ``p``'s 16-bit dtype, the dS tile of the fused backward.

    With bfloat16 ``p`` the product is taken in bfloat16 pairs (``dp`` rounded first): half
    the instructions of widening ``p`` to float32 and narrowing the product, on the critical
    warpgroup's path between two of its products (BENCHMARKS.md §3, "dS in bfloat16"). It
    rounds twice instead of once: on the H200 the rel. L2 of dQ and dK against float32 rose
    from 3.3e-3 to 3.7e-3 at 1x8192. float16 stays in float32: ``dp`` may exceed its range.
    """
    if p.dtype == jnp.bfloat16:
        return p * dp.astype(p.dtype)
    return (p.astype(jnp.float32) * dp).astype(p.dtype)


def _full(shape: tuple[int, ...], value: float, layout: Any, interpret: Any) -> Array:
    """A float32 constant pinned to a register layout (the interpreter has no layouts)."""
    x = jnp.full(shape, value, jnp.float32)
    return x if interpret is not None else plgpu.layout_cast(x, layout)


def _zeros(shape: tuple[int, int], interpret: Any) -> Array:
    return _full(shape, 0.0, plgpu.Layout.WGMMA, interpret)


def _load_stats(ref: Any, layout: Any, interpret: Any) -> Array:
    """A per-row float32 vector from shared memory in the layout its broadcast needs."""
    # Interpreter: no rule for plgpu.load, so a plain read.
    return plgpu.load(ref, (), layout=layout) if interpret is None else ref[...]


@dataclasses.dataclass(frozen=True)
class _Scores:
    """How a raw ``q·kᵀ`` tile becomes base-2 logits, and which of its pairs are visible.

    ``window``: a query at ``i`` sees the keys ``j`` with ``i − window < j ≤ i`` (HF's
    meaning; None: all ``j ≤ i``). ``softcap``: logits are ``cap·tanh(scale·s/cap)`` before the
    mask (Gemma 2). Static: one kernel per distinct value.
    """

    scale: float
    window: int | None = None
    softcap: float | None = None

    @property
    def to_log2(self) -> float:
        """The factor from :meth:`exponent`'s values to base-2 logits (positive)."""
        return (self.scale if self.softcap is None else self.softcap) * _LOG2E

    def exponent(self, raw: Array) -> tuple[Array, Array | None]:
        """``(x, t)``: the base-2 logits of a raw score tile are ``x·to_log2``; ``t`` is the
        softcap's tanh (None without one).

        Why unscaled: the factor then folds into the one fused multiply-add that feeds
        ``exp2`` (``x·to_log2 − m``), and the forward takes its row maxima on ``x`` and
        scales only those, instead of scaling every score of the tile.
        """
        if self.softcap is None:
            return raw, None
        # With approximate math (the kernels' compiler parameters) this is tanh.approx.f32,
        # about 2⁻¹¹ relative error, as FlashAttention's softcap uses: an exact tanh from exp2
        # and a division was measured 1.16-1.19x slower forward+backward (BENCHMARKS.md §3).
        t = jnp.tanh(raw * (self.scale / self.softcap))
        return t, t

    def keys_by_queries_init(self, lse: Array, shape: tuple[int, int], interpret: Any) -> Array:
        """The first accumulator of an ``sT`` tile (keys on rows, queries on columns) with the
        queries' lse₂: ``-lse₂/to_log2`` without a softcap, so that lse₂ is not live beside
        the tile (32 registers fewer at the backward's peak, which ptxas otherwise spills:
        BENCHMARKS.md §3, registers); zeros with one, whose logits come out of tanh."""
        if self.softcap is None:
            return lax.broadcast_in_dim(lse * (-1.0 / self.to_log2), shape, [1])
        return _zeros(shape, interpret)

    def keys_by_queries_probabilities(self, x: Array, lse: Array) -> Array:
        """``pT`` from :meth:`exponent`'s ``x`` of a tile begun by :meth:`keys_by_queries_init`."""
        if self.softcap is None:
            return jnp.exp2(x * self.to_log2)
        return jnp.exp2(x * self.to_log2 - lax.broadcast_in_dim(lse, x.shape, [1]))

    def through_softcap(self, p: Array, t: Array | None) -> Array:
        """``p`` times the softcap's derivative ``1 − tanh²`` (the chain rule into ``scale·s``)."""
        return p if t is None else p * (1.0 - t * t)

    def visible(self, shape: tuple[int, int], row0: Array, col0: Array, rows_are_q: bool,
                interpret: Any) -> Array:  # fmt: skip
        """True where the (query, key) pair of a tile element is visible (causal and window)."""
        if interpret is None:
            iota = lambda dim: plgpu.broadcasted_iota(
                jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA
            )
        else:
            iota = lambda dim: lax.broadcasted_iota(jnp.int32, shape, dim)
        rows, cols = iota(0) + row0, iota(1) + col0
        query, key = (rows, cols) if rows_are_q else (cols, rows)
        seen = query >= key
        if self.window is not None:
            seen = seen & (query - key < self.window)
        return seen

    def first_key(self, query: Array) -> Array | int:
        """The first key that ``query`` (and so any later query) may see."""
        return 0 if self.window is None else jnp.maximum(query - (self.window - 1), 0)

    def last_query(self, key: Array, seq_len: int) -> Array | int:
        """The last query that may see ``key`` (and so any earlier key)."""
        if self.window is None:
            return seq_len - 1
        return jnp.minimum(key + self.window - 1, seq_len - 1)


def _same_segment(rows: Array, cols: Array, shape: tuple[int, int]) -> Array:
    """True where a tile element's row and column positions lie in the same packed segment."""
    return lax.broadcast_in_dim(rows, shape, [0]) == lax.broadcast_in_dim(cols, shape, [1])


def _segment_tile(shape: tuple[int, ...]) -> Any:
    """Shared memory for segment ids (one tile's rows per leading index)."""
    return plgpu.SMEM(shape, jnp.int32)


def segment_spans(segment_ids: Array, block: int) -> Array:
    """``[B, S/block, 2]`` int32: per block of ``block`` rows, the first key any of its rows may
    see (the least first position of its rows' segments) and the last query any of them may be
    seen by (the greatest last position). Each CTA reads its row straight from global memory.

    What lets the kernels skip the tiles that lie wholly across segments: a CTA streams only
    the tiles between its rows' span and the causal diagonal. Found by a stable sort of each
    row's ids (``O(S log S)``), so ids need not come as contiguous runs.
    """

    def first_last(ids: Array) -> tuple[Array, Array]:
        n = ids.shape[0]
        index = jnp.arange(n, dtype=jnp.int32)
        order = jnp.argsort(ids, stable=True).astype(jnp.int32)
        ranked = ids[order]
        change = ranked[1:] != ranked[:-1]
        starts = jnp.concatenate([jnp.ones(1, bool), change])
        ends = jnp.concatenate([change, jnp.ones(1, bool)])
        first = order[lax.cummax(jnp.where(starts, index, 0))]  # positions ascend in a run
        last = order[lax.cummin(jnp.where(ends, index, n - 1), reverse=True)]
        unsort = lambda x: jnp.zeros(n, jnp.int32).at[order].set(x)
        return unsort(first), unsort(last)

    first, last = jax.vmap(first_last)(segment_ids.astype(jnp.int32))
    b, n = segment_ids.shape
    lo = first.reshape(b, n // block, block).min(axis=-1)
    hi = last.reshape(b, n // block, block).max(axis=-1)
    return jnp.stack([lo, hi], axis=-1)


def _own_segment_ids(seg_ref: Any, smem: Any, bars: Any, batch: Array, row0: Array, wg: Array,
                     interpret: Any) -> Array:  # fmt: skip
    """This warpgroup's 64 rows' segment ids, as the per-row vector of a wgmma tile."""
    plgpu.copy_gmem_to_smem(seg_ref.at[batch, pl.ds(row0, _ROWS)], smem.at[wg], bars.at[wg])
    plgpu.barrier_wait(bars.at[wg])
    return _load_stats(smem.at[wg], _ROW_STAT, interpret)


def _span(spans_ref: Any, batch: Array, tile: Array, which: int, interpret: Any) -> Array:
    """Entry ``which`` (0: first key, 1: last query) of this CTA's row of the span table."""
    if interpret is None:
        return spans_ref[batch, tile, which]  # one scalar load from global memory
    # Interpreter: a scalar read of global memory at traced indices can stall it; read the
    # table and index the value.
    return spans_ref[...][batch, tile, which]


def _smem_tile(shape: tuple[int, ...], dtype: Any) -> Any:
    """A shared-memory buffer laid out for TMA and wgmma (128-byte swizzled rows)."""
    row = 128 // jnp.dtype(dtype).itemsize
    transforms = (plgpu.TilingTransform((8, row)), plgpu.SwizzleTransform(128))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def _feed_ring(streams: Sequence[tuple[Callable[[Array, Array], None], Any]], steps: Array,
               slots: int) -> None:  # fmt: skip
    """The memory warpgroup's loop: for each step, each ``(load, free)`` stream loads a slot.

    The first ``slots`` steps load at once; the load for step ``i + slots`` waits until both
    compute warpgroups have arrived on that stream's ``free`` barrier for step ``i``'s slot.
    The last steps' releases are observed too, so every phase of every barrier is seen before
    the shared memory goes out of scope.
    """
    for i in range(slots):

        @pl.when(i < steps)
        def _prologue(i: int = i) -> None:
            for load, _ in streams:
                load(jnp.int32(i), jnp.int32(i))

    @pl.loop(0, steps)
    def _stream(step: Array) -> None:
        slot = lax.rem(step, slots)
        for load, free in streams:
            plgpu.barrier_wait(free.at[slot])

            @pl.when(step + slots < steps)
            def _load(load: Callable[[Array, Array], None] = load) -> None:
                load(step + slots, slot)


@dataclasses.dataclass(frozen=True)
class _QueryStream:
    """The query tiles a backward CTA of ``2·64`` keys streams, in step order: for each of its
    KV head's ``groups`` query heads in turn, the 64-row tiles from the CTA's diagonal to the
    last query any of its keys may be seen by (both backward kernels that own keys use it)."""

    kv_head: Array
    groups: int
    first: Array  # the first query tile that sees any of the CTA's keys
    per_head: Array  # tiles per query head
    clear_end: Array  # per head, the tiles before this offset from ``first`` need no window mask

    @classmethod
    def of_cta(cls, spec: _Scores, seq_len: int, groups: int, kv_head: Array, cta_base: Array,
               last_query: Array | None) -> _QueryStream:  # fmt: skip
        """``last_query``: the last query the CTA's rows' segments reach (None: no segments)."""
        first = cta_base // _ROWS
        end = spec.last_query(cta_base + _COMPUTE_WGS * _ROWS - 1, seq_len) // _ROWS + 1
        if last_query is not None:
            end = jnp.minimum(end, last_query // _ROWS + 1)
        # From this query tile on, some of its rows are past the window of the CTA's first key.
        window_edge = end
        if spec.window is not None:
            window_edge = jnp.clip((cta_base + spec.window) // _ROWS, first + _COMPUTE_WGS, end)
        return cls(kv_head, groups, first, end - first, window_edge - first)

    @property
    def steps(self) -> Array:
        return self.groups * self.per_head

    def coords(self, step: Array, group: int | None = None) -> tuple[Array, Array]:
        """Step ``step``'s query head and first row; ``group``: the step's query head within
        the KV head's, where the caller knows it statically (no integer division then)."""
        if group is None:
            group, tile = step // self.per_head, step % self.per_head
        else:
            tile = step - group * self.per_head
        return self.kv_head * self.groups + group, (self.first + tile) * _ROWS

    def loop(self, body: Callable[[Array, Any, bool, int], Any], carry: Any) -> Any:
        """``body(step, carry, masked, group)`` over every step (``group``: the step's query
        head within the KV head's, static). Per head, the first two query tiles straddle the
        CTA's diagonal (or lie wholly above a later warpgroup's keys), those from the window's
        edge on straddle it: those run ``masked``; the rest are fully visible."""
        for g in range(self.groups):
            masked = lambda i, c, g=g: body(i, c, True, g)
            start = g * self.per_head
            edge = start + jnp.minimum(self.per_head, _COMPUTE_WGS)
            clear_end = start + self.clear_end
            carry = lax.fori_loop(start, edge, masked, carry)
            carry = lax.fori_loop(edge, clear_end, lambda i, c, g=g: body(i, c, False, g), carry)
            carry = lax.fori_loop(clear_end, start + self.per_head, masked, carry)
        return carry

    @staticmethod
    def ring(q: Array, do: Array, slots: int) -> tuple[list[Any], list[Any]]:
        """The ring's shared memory, per slot a Q and a dO tile and the tile's lse₂ and Δ, and
        its barriers: one per stream, loaded, and ``free`` (both compute warpgroups are done
        with the slot), in the order :meth:`feed` takes them."""
        d = q.shape[-1]
        scratch = [
            _smem_tile((slots, _ROWS, d), q.dtype),
            _smem_tile((slots, _ROWS, d), do.dtype),
            plgpu.SMEM((slots, _ROWS), jnp.float32),
            plgpu.SMEM((slots, _ROWS), jnp.float32),
        ]
        barriers = [
            *(plgpu.Barrier(num_barriers=slots) for _ in range(4)),  # Q, dO, lse, delta
            plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=slots),  # slot free
        ]
        return scratch, barriers

    def feed(self, srcs: Sequence[Any], rings: Sequence[Any], bars: Sequence[Any], free: Any,
             batch: Array, slots: int) -> None:  # fmt: skip
        """The memory warpgroup's loop: each step's Q and dO tiles (``srcs[:2]``, ``[B, S, H,
        D]``) and per-query vectors (``srcs[2:]``: lse₂ and Δ ``[B, H, S]``, segment ids
        ``[B, S]``) into ring slots."""

        def load(step: Array, slot: Array) -> None:
            head, q0 = self.coords(step)
            rows = pl.ds(q0, _ROWS)
            for i, (src, ring, bar) in enumerate(zip(srcs, rings, bars, strict=True)):
                index = (batch, rows, head) if i < 2 else (batch, head, rows)
                index = (batch, rows) if len(src.shape) == 2 else index
                plgpu.copy_gmem_to_smem(src.at[index], ring.at[slot], bar.at[slot])

        _feed_ring([(load, free)], self.steps, slots)


def _take_turn(turn: Any) -> None:
    """Rendezvous of the two compute warpgroups on the tensor-core ``turn`` barrier.

    With the later warpgroup one rendezvous behind (it takes one extra turn before its first
    step, the earlier one after its last), a warpgroup's elementwise work between its two
    product groups runs while the other's products occupy the tensor cores (FlashAttention-3's
    ping-pong schedule).
    """
    plgpu.barrier_arrive(turn)
    plgpu.barrier_wait(turn)


def _grid(config: MgpuAttentionConfig, tiles: tuple[str, int], heads: tuple[str, int],
          batch: int) -> dict[str, int]:  # fmt: skip
    """A kernel's grid, in launch order: CTAs start in its row-major order (Mosaic GPU makes
    the last axis ``blockIdx.x``, which CUDA dispatches fastest).

    Every kernel numbers its tiles heaviest first. Heads first runs the CTAs of one head
    heavy-to-light, then the next head's, so with few CTAs per head the last heads' heavy CTAs
    start when most SMs are done (``scripts/simulate_launch_order.py``: 63% of an ideal
    schedule for the dK/dV kernel at 2x2048, 81% at 1x8192). Tiles first starts the heaviest
    CTAs of all heads first and measured 6-15% faster forward+backward at 32-64 CTAs per head
    (tiles x batch). From 128 CTAs per head, where both orders fill the GPU, heads first was
    1-5% faster in every kernel: its concurrent CTAs share one head's K/V. ``"auto"`` goes
    heads first from ``_HEADS_FIRST_MIN_CTAS`` (BENCHMARKS.md §3, "Launch order, measured").
    """
    order = config.launch_order
    if order == "auto":
        order = "heads" if tiles[1] * batch >= _HEADS_FIRST_MIN_CTAS else "tiles"
    axes = [tiles, heads] if order == "tiles" else [heads, tiles]
    return dict([*axes, ("batch", batch)])


def _launch(body: Callable[..., None], out_type: Any, grid: dict[str, int], name: str,
            interpret: Any) -> Callable[..., Any]:  # fmt: skip
    """A CTA of two compute warpgroups and one memory warpgroup per grid point."""
    mesh = plgpu.Mesh(
        grid=tuple(grid.values()),
        grid_names=tuple(grid),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        kernel_name=name,
    )
    return pl.kernel(
        body,
        out_type=out_type,
        mesh=mesh,
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret if interpret is not None else False,
        name=name,
    )


# ----------------------------------------------------------------------------------- forward


def _forward_call(q: Array, k: Array, v: Array, seg: tuple[Array, Array] | None, spec: _Scores,
                  config: MgpuAttentionConfig, interpret: Any) -> tuple[Array, Array]:  # fmt: skip
    """``(out, lse₂)`` with ``lse₂ [B, Hq, S]`` the base-2 log-sum-exp of the logits.

    ``seg``: :func:`_segments` (keys of another segment are masked, tiles outside the spans
    skipped) or None.
    """
    b, s, hq, d = q.shape
    groups = hq // k.shape[2]
    bq, bkv, slots = _ROWS, config.fwd_block_kv, config.fwd_slots
    num_tiles = s // (_COMPUTE_WGS * bq)
    segmented = seg is not None
    # Rows whose visible keys so far all lie in skipped or masked tiles (another segment, or
    # before the window of the later warpgroup's rows) have m = -inf.
    may_see_nothing = segmented or spec.window is not None

    def kernel(q_ref, k_ref, v_ref, *refs):
        seg_refs, (out_ref, lse_ref, scoped) = (refs[:2], refs[2:]) if segmented else ((), refs)
        (q_smem, k_ring, v_ring, lse_smem, *seg_smem), bars = scoped
        q_bar, k_bar, v_bar, k_free, v_free, turn, *seg_bars = bars
        batch, head = lax.axis_index("batch"), lax.axis_index("heads")
        tile = num_tiles - 1 - lax.axis_index("q_tiles")  # the longest rows first
        wg = lax.axis_index("wg")
        cta_base = tile * (_COMPUTE_WGS * bq)
        cta_steps = pl.cdiv(cta_base + _COMPUTE_WGS * bq, bkv)
        first = spec.first_key(cta_base) // bkv  # the first K/V tile any of the CTA's rows see
        if segmented:
            seg_ref, spans_ref = seg_refs
            first = jnp.maximum(first, _span(spans_ref, batch, tile, 0, interpret) // bkv)

        take_turn = functools.partial(_take_turn, turn)

        @pl.when(wg < _COMPUTE_WGS)
        def _compute() -> None:
            plgpu.set_max_registers(config.fwd_registers[0], action="increase")
            q_base = cta_base + wg * bq
            rows = (batch, pl.ds(q_base, bq), head)
            plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[wg], q_bar.at[wg])
            if segmented:
                k_seg_ring, k_seg_bar = seg_smem[1], seg_bars[1]
                q_seg = _own_segment_ids(
                    seg_ref, seg_smem[0], seg_bars[0], batch, q_base, wg, interpret
                )
            plgpu.barrier_wait(q_bar.at[wg])
            steps = pl.cdiv(q_base + bq, bkv)  # K/V tiles this warpgroup's rows can see
            full = q_base // bkv  # ... of which below the diagonal
            clear = first  # ... and from here on inside every row's window
            if spec.window is not None:
                last_row_first_key = jnp.maximum(q_base + bq - spec.window, 0)
                clear = jnp.clip(pl.cdiv(last_row_first_key, bkv), first, full)

            def step(j: Array, carry: tuple[Array, Array, Array], masked: bool) -> Any:
                acc, m, denom = carry
                slot = lax.rem(j - first, slots)
                plgpu.barrier_wait(k_bar.at[slot])
                (scores,) = _products(
                    [(_zeros((bq, bkv), interpret), q_smem.at[wg], _T(k_ring.at[slot]))],
                    interpret,
                    after_issue=take_turn,  # the other warpgroup's PV runs meanwhile
                )
                if segmented:
                    plgpu.barrier_wait(k_seg_bar.at[slot])
                    k_seg = _load_stats(k_seg_ring.at[slot], _COL_STAT, interpret)
                plgpu.barrier_arrive(k_free.at[slot])
                scores, _ = spec.exponent(scores)
                if masked:
                    visible = spec.visible((bq, bkv), q_base, j * bkv, True, interpret)
                    scores = jnp.where(visible, scores, -jnp.inf)
                if segmented:
                    scores = jnp.where(_same_segment(q_seg, k_seg, scores.shape), scores, -jnp.inf)
                m_new = jnp.maximum(m, scores.max(axis=1) * spec.to_log2)
                # A row that has seen no key yet has m = -inf: shift it by 0 instead, so that
                # exp2 gives 0 there, not NaN.
                m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new) if may_see_nothing else m_new
                alpha = jnp.exp2(m - m_shift)
                m_bcast = lax.broadcast_in_dim(m_shift, scores.shape, [0])
                p = jnp.exp2(scores * spec.to_log2 - m_bcast)
                denom = denom * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p16 = p.astype(q.dtype)
                acc, denom, m_new, p16 = lax.optimization_barrier((acc, denom, m_new, p16))
                plgpu.barrier_arrive(turn)  # softmax done
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_wait(turn)  # the tensor cores are ours
                (acc,) = _products([(acc, p16, v_ring.at[slot])], interpret)
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, denom

            def skip(j: Array, _: None) -> None:
                # Tiles wholly above this warpgroup's diagonal but not the CTA's: release the
                # slots and keep the turn-taking in step with the other warpgroup.
                # Every warpgroup observes every phase of the load barriers.
                slot = lax.rem(j - first, slots)
                plgpu.barrier_wait(k_bar.at[slot])
                if segmented:
                    plgpu.barrier_wait(k_seg_bar.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                take_turn()
                take_turn()

            carry = (
                _zeros((bq, d), interpret),
                _full((bq,), -jnp.inf, _ROW_STAT, interpret),
                _full((bq,), 0.0, _ROW_STAT, interpret),
            )
            pl.when(wg == 1)(take_turn)  # warpgroup 0 starts on the tensor cores
            carry = lax.fori_loop(first, clear, lambda j, x: step(j, x, True), carry)
            carry = lax.fori_loop(clear, full, lambda j, x: step(j, x, False), carry)
            acc, m, denom = lax.fori_loop(full, steps, lambda j, x: step(j, x, True), carry)
            lax.fori_loop(steps, cta_steps, skip, None)
            pl.when(wg == 0)(take_turn)
            q_smem.at[wg][...] = (acc / lax.broadcast_in_dim(denom, acc.shape, [0])).astype(q.dtype)
            lse_smem.at[wg][...] = m + jnp.log(denom) * _LOG2E
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem.at[wg], out_ref.at[rows])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, pl.ds(q_base, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == _COMPUTE_WGS)
        def _memory() -> None:
            plgpu.set_max_registers(config.fwd_registers[1], action="decrease")
            kv_head = head // groups

            def loader(src: Any, ring: Any, bar: Any) -> Callable[[Array, Array], None]:
                def load(step: Array, slot: Array) -> None:
                    j = first + step
                    tile_rows = (batch, pl.ds(j * bkv, bkv), kv_head)
                    plgpu.copy_gmem_to_smem(src.at[tile_rows], ring.at[slot], bar.at[slot])
                    if segmented and src is k_ref:  # the keys' segment ids ride with K
                        plgpu.copy_gmem_to_smem(
                            seg_ref.at[batch, pl.ds(j * bkv, bkv)],
                            seg_smem[1].at[slot],
                            seg_bars[1].at[slot],
                        )

                return load

            k_stream = (loader(k_ref, k_ring, k_bar), k_free)
            v_stream = (loader(v_ref, v_ring, v_bar), v_free)
            _feed_ring([k_stream, v_stream], cta_steps - first, slots)

    scratch = [
        _smem_tile((_COMPUTE_WGS, bq, d), q.dtype),
        _smem_tile((slots, bkv, d), k.dtype),
        _smem_tile((slots, bkv, d), v.dtype),
        plgpu.SMEM((_COMPUTE_WGS, bq), jnp.float32),
    ]
    barriers = [
        plgpu.Barrier(num_barriers=_COMPUTE_WGS),  # Q
        plgpu.Barrier(num_barriers=slots),  # K loaded
        plgpu.Barrier(num_barriers=slots),  # V loaded
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=slots),  # K free
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=slots),  # V free
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS),  # tensor-core turn
    ]
    if segmented:  # the queries' and (with K) the keys' segment ids
        scratch += [_segment_tile((_COMPUTE_WGS, bq)), _segment_tile((slots, bkv))]
        barriers += [plgpu.Barrier(num_barriers=_COMPUTE_WGS), plgpu.Barrier(num_barriers=slots)]

    def entry(*refs: Any) -> None:
        pl.run_scoped(
            lambda *scoped: kernel(*refs, scoped), tuple(scratch), tuple(barriers),
            collective_axes="wg",
        )  # fmt: skip

    out_type = (
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((b, hq, s), jnp.float32),
    )
    grid = _grid(config, ("q_tiles", num_tiles), ("heads", hq), b)
    operands = (q, k, v) + (tuple(seg) if segmented else ())
    return _launch(entry, out_type, grid, FORWARD_KERNEL_NAME, interpret)(*operands)


# ---------------------------------------------------------------------------------- backward


def _dkdv_call(q, k, v, do, lse2, delta, seg, spec: _Scores, config: MgpuAttentionConfig,
               interpret):  # fmt: skip
    """dK and dV: each CTA owns ``2·64`` keys and streams every query tile that sees them."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    groups = hq // hkv
    blk, slots = _ROWS, config.bwd_slots
    segmented = seg is not None

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        seg_refs, (dk_ref, dv_ref, scoped) = (refs[:2], refs[2:]) if segmented else ((), refs)
        (k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, *seg_smem), bars = scoped
        k_bar, v_bar, q_bar, do_bar, lse_bar, delta_bar, free, *seg_bars = bars
        batch, kv_head, tile = (lax.axis_index(n) for n in ("batch", "kv_heads", "kv_tiles"))
        wg = lax.axis_index("wg")
        cta_base = tile * (_COMPUTE_WGS * blk)
        last_query = None
        if segmented:
            seg_ref, spans_ref = seg_refs
            last_query = _span(spans_ref, batch, tile, 1, interpret)
        stream = _QueryStream.of_cta(spec, s, groups, kv_head, cta_base, last_query)

        @pl.when(wg < _COMPUTE_WGS)
        def _compute() -> None:
            plgpu.set_max_registers(config.bwd_registers[0], action="increase")
            kv_base = cta_base + wg * blk
            rows = (batch, pl.ds(kv_base, blk), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[wg], k_bar.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[wg], v_bar.at[wg])
            if segmented:
                q_seg_ring = seg_smem[1]
                kv_seg = _own_segment_ids(
                    seg_ref, seg_smem[0], seg_bars[0], batch, kv_base, wg, interpret
                )
            plgpu.barrier_wait(k_bar.at[wg])
            plgpu.barrier_wait(v_bar.at[wg])

            def body(step: Array, carry: tuple[Array, Array], masked: bool, group: int) -> Any:
                dk, dv = carry
                slot = lax.rem(step, slots)
                _, q0 = stream.coords(step, group)
                for bar in (q_bar, do_bar, lse_bar, delta_bar, *seg_bars[1:]):
                    plgpu.barrier_wait(bar.at[slot])
                # The per-query lse₂ and Δ start the accumulators (as -Δ for the same reason
                # as lse₂: :meth:`_Scores.keys_by_queries_init`).
                lse = _load_stats(lse_ring.at[slot], _COL_STAT, interpret)
                cols = lambda x: lax.broadcast_in_dim(x, (blk, blk), [1])
                s_init = spec.keys_by_queries_init(lse, (blk, blk), interpret)
                dlt = _load_stats(delta_ring.at[slot], _COL_STAT, interpret)
                s_t, dp_t = _products(
                    [
                        (s_init, k_smem.at[wg], _T(q_ring.at[slot])),
                        (cols(-dlt), v_smem.at[wg], _T(do_ring.at[slot])),
                    ],
                    interpret,
                )  # sT (minus lse₂/to_log2 without a softcap), dpT − Δ
                x_t, tanh_t = spec.exponent(s_t)
                p_t = spec.keys_by_queries_probabilities(x_t, lse)
                if masked:
                    visible = spec.visible((blk, blk), kv_base, q0, False, interpret)
                    p_t = jnp.where(visible, p_t, 0.0)
                if segmented:
                    q_seg = _load_stats(q_seg_ring.at[slot], _COL_STAT, interpret)
                    p_t = jnp.where(_same_segment(kv_seg, q_seg, (blk, blk)), p_t, 0.0)
                ds_t = (spec.through_softcap(p_t, tanh_t) * dp_t).astype(q.dtype)
                p_t = p_t.astype(q.dtype)
                dv, dk = _products(
                    [(dv, p_t, do_ring.at[slot]), (dk, ds_t, q_ring.at[slot])], interpret
                )
                plgpu.barrier_arrive(free.at[slot])
                return dk, dv

            dk, dv = stream.loop(body, (_zeros((blk, d), interpret), _zeros((blk, d), interpret)))
            # Out through this warpgroup's K and V tiles (every product reading them is done).
            k_smem.at[wg][...] = (dk * spec.scale).astype(k.dtype)
            v_smem.at[wg][...] = dv.astype(v.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[rows])
            plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == _COMPUTE_WGS)
        def _memory() -> None:
            plgpu.set_max_registers(config.bwd_registers[1], action="decrease")

            stream.feed(
                (q_ref, do_ref, lse_ref, delta_ref, *seg_refs[:1]),
                (q_ring, do_ring, lse_ring, delta_ring, *seg_smem[1:]),
                (q_bar, do_bar, lse_bar, delta_bar, *seg_bars[1:]),
                free, batch, slots,
            )  # fmt: skip

    ring_scratch, ring_barriers = _QueryStream.ring(q, do, slots)
    scratch = [
        _smem_tile((_COMPUTE_WGS, blk, d), k.dtype),
        _smem_tile((_COMPUTE_WGS, blk, d), v.dtype),
        *ring_scratch,
    ]
    barriers = [
        plgpu.Barrier(num_barriers=_COMPUTE_WGS),  # K
        plgpu.Barrier(num_barriers=_COMPUTE_WGS),  # V
        *ring_barriers,
    ]
    if segmented:  # the keys' and (with each query tile) the queries' segment ids
        scratch += [_segment_tile((_COMPUTE_WGS, blk)), _segment_tile((slots, blk))]
        barriers += [plgpu.Barrier(num_barriers=_COMPUTE_WGS), plgpu.Barrier(num_barriers=slots)]

    def entry(*refs: Any) -> None:
        pl.run_scoped(
            lambda *scoped: kernel(*refs, scoped), tuple(scratch), tuple(barriers),
            collective_axes="wg",
        )  # fmt: skip

    out_type = (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype))
    grid = _grid(config, ("kv_tiles", s // (_COMPUTE_WGS * blk)), ("kv_heads", hkv), b)
    operands = (q, k, v, do, lse2, delta) + (tuple(seg) if segmented else ())
    return _launch(entry, out_type, grid, "lorax_mgpu_attention_dkdv", interpret)(*operands)


def _dq_call(q, k, v, do, lse2, delta, seg, spec: _Scores, config: MgpuAttentionConfig,
             interpret):  # fmt: skip
    """dQ: each CTA owns ``2·64`` queries and streams K/V up to its diagonal."""
    b, s, hq, d = q.shape
    groups = hq // k.shape[2]
    blk, bkv, slots = _ROWS, config.dq_block_kv, config.bwd_slots
    num_tiles = s // (_COMPUTE_WGS * blk)
    segmented = seg is not None

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        seg_refs, (dq_ref, scoped) = (refs[:2], refs[2:]) if segmented else ((), refs)
        (q_smem, do_smem, lse_smem, delta_smem, k_ring, v_ring, *seg_smem), bars = scoped
        (q_bar, do_bar, lse_bar, delta_bar), k_bar, v_bar, free, *seg_bars = bars
        batch, head = lax.axis_index("batch"), lax.axis_index("heads")
        tile = num_tiles - 1 - lax.axis_index("q_tiles")  # the longest rows first
        kv_head = head // groups
        wg = lax.axis_index("wg")
        cta_base = tile * (_COMPUTE_WGS * blk)
        steps = (cta_base + _COMPUTE_WGS * blk) // bkv  # K/V tiles up to the CTA's diagonal
        first = spec.first_key(cta_base) // bkv  # ... from the first any of its rows can see
        if segmented:
            seg_ref, spans_ref = seg_refs
            first = jnp.maximum(first, _span(spans_ref, batch, tile, 0, interpret) // bkv)

        @pl.when(wg < _COMPUTE_WGS)
        def _compute() -> None:
            plgpu.set_max_registers(config.bwd_registers[0], action="increase")
            q_base = cta_base + wg * blk
            rows = (batch, pl.ds(q_base, blk), head)
            stats = (batch, head, pl.ds(q_base, blk))
            own = ((q_ref, rows, q_smem, q_bar), (do_ref, rows, do_smem, do_bar))
            own += ((lse_ref, stats, lse_smem, lse_bar), (delta_ref, stats, delta_smem, delta_bar))
            if segmented:
                own += ((seg_ref, (batch, pl.ds(q_base, blk)), seg_smem[0], seg_bars[0]),)
            for src, index, dst, bar in own:
                plgpu.copy_gmem_to_smem(src.at[index], dst.at[wg], bar.at[wg])
            for _, _, _, bar in own:
                plgpu.barrier_wait(bar.at[wg])
            lse = _load_stats(lse_smem.at[wg], _ROW_STAT, interpret)
            dlt = _load_stats(delta_smem.at[wg], _ROW_STAT, interpret)
            if segmented:
                q_seg = _load_stats(seg_smem[0].at[wg], _ROW_STAT, interpret)

            def body(step: Array, dq: Array, masked: bool) -> Array:
                slot = lax.rem(step - first, slots)
                plgpu.barrier_wait(k_bar.at[slot])
                plgpu.barrier_wait(v_bar.at[slot])
                if segmented:
                    plgpu.barrier_wait(seg_bars[1].at[slot])
                zeros = _zeros((blk, bkv), interpret)
                s_, dp = _products(
                    [
                        (zeros, q_smem.at[wg], _T(k_ring.at[slot])),
                        (zeros, do_smem.at[wg], _T(v_ring.at[slot])),
                    ],
                    interpret,
                )
                x, tanh = spec.exponent(s_)
                p = jnp.exp2(x * spec.to_log2 - lax.broadcast_in_dim(lse, (blk, bkv), [0]))
                if masked:
                    visible = spec.visible((blk, bkv), q_base, step * bkv, True, interpret)
                    p = jnp.where(visible, p, 0.0)
                if segmented:
                    k_seg = _load_stats(seg_smem[1].at[slot], _COL_STAT, interpret)
                    p = jnp.where(_same_segment(q_seg, k_seg, (blk, bkv)), p, 0.0)
                dp = dp - lax.broadcast_in_dim(dlt, (blk, bkv), [0])
                ds = (spec.through_softcap(p, tanh) * dp).astype(q.dtype)
                (dq,) = _products([(dq, ds, k_ring.at[slot])], interpret)
                plgpu.barrier_arrive(free.at[slot])
                return dq

            edge = steps - _COMPUTE_WGS * blk // bkv  # the last tiles straddle the diagonal
            clear = first  # the tiles before this one straddle the window's edge
            if spec.window is not None:
                last_row_first_key = jnp.maximum(q_base + blk - spec.window, 0)
                clear = jnp.clip(pl.cdiv(last_row_first_key, bkv), first, edge)
            masked_body = lambda i, a: body(i, a, True)
            dq = _zeros((blk, d), interpret)
            dq = lax.fori_loop(first, clear, masked_body, dq)
            dq = lax.fori_loop(clear, edge, lambda i, a: body(i, a, False), dq)
            dq = lax.fori_loop(edge, steps, masked_body, dq)
            q_smem.at[wg][...] = (dq * spec.scale).astype(q.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == _COMPUTE_WGS)
        def _memory() -> None:
            plgpu.set_max_registers(config.bwd_registers[1], action="decrease")

            def load(step: Array, slot: Array) -> None:
                kv0 = (first + step) * bkv
                tile_rows = (batch, pl.ds(kv0, bkv), kv_head)
                plgpu.copy_gmem_to_smem(k_ref.at[tile_rows], k_ring.at[slot], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[tile_rows], v_ring.at[slot], v_bar.at[slot])
                if segmented:
                    plgpu.copy_gmem_to_smem(
                        seg_ref.at[batch, pl.ds(kv0, bkv)], seg_smem[1].at[slot],
                        seg_bars[1].at[slot],
                    )  # fmt: skip

            _feed_ring([(load, free)], steps - first, slots)

    scratch = [
        _smem_tile((_COMPUTE_WGS, blk, d), q.dtype),
        _smem_tile((_COMPUTE_WGS, blk, d), do.dtype),
        plgpu.SMEM((_COMPUTE_WGS, blk), jnp.float32),
        plgpu.SMEM((_COMPUTE_WGS, blk), jnp.float32),
        _smem_tile((slots, bkv, d), k.dtype),
        _smem_tile((slots, bkv, d), v.dtype),
    ]
    barriers = [
        tuple(plgpu.Barrier(num_barriers=_COMPUTE_WGS) for _ in range(4)),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=slots),
    ]
    if segmented:  # the queries' and (with K/V) the keys' segment ids
        scratch += [_segment_tile((_COMPUTE_WGS, blk)), _segment_tile((slots, bkv))]
        barriers += [plgpu.Barrier(num_barriers=_COMPUTE_WGS), plgpu.Barrier(num_barriers=slots)]

    def entry(*refs: Any) -> None:
        pl.run_scoped(
            lambda *scoped: kernel(*refs, scoped), tuple(scratch), tuple(barriers),
            collective_axes="wg",
        )  # fmt: skip

    out_type = jax.ShapeDtypeStruct(q.shape, q.dtype)
    grid = _grid(config, ("q_tiles", num_tiles), ("heads", hq), b)
    operands = (q, k, v, do, lse2, delta) + (tuple(seg) if segmented else ())
    return _launch(entry, out_type, grid, "lorax_mgpu_attention_dq", interpret)(*operands)


def _fused_call(q, k, v, do, lse2, delta, seg, spec: _Scores, config: MgpuAttentionConfig,
                interpret, dq_acc):  # fmt: skip
    """dK, dV and dQ in one kernel: five tile products per tile pair instead of seven.

    Why the roles are split: the designs that gave each warpgroup 64 keys and all five products
    (FlashAttention-3's) keep both float32 accumulators, both score tiles and the dQ partial
    live at once, which spills under Mosaic GPU (BENCHMARKS.md §3, registers). Here each CTA
    owns 128 keys and each warpgroup one accumulator over all of them:

    * warpgroup 0 (P): ``sT = K·Qᵀ``, ``pT = exp2(sT·c − lse₂)``, hands ``pT`` to warpgroup 1
      through a double-buffered shared tile, ``dV += pT·dO``;
    * warpgroup 1 (dS): ``dpT = V·dOᵀ − Δ``, ``dsT = pT ⊙ dpT`` (in bf16 pairs:
      :func:`_scale_by_probabilities`), ``dK += dsT·Q``, then the query tile's dQ partial
      ``dS·K`` (``dsT`` through shared memory, read transposed, and stored while dK's product
      runs: 3% faster than before it at 1x32768), added into the float32 ``dq_acc`` in global
      memory by a TMA reduce-add from a shared-memory stage. (``red.global.add`` straight
      from the registers, no stage, ran the kernel 1.5x slower on the H200: BENCHMARKS.md §3.)

    The partial sums arrive in no fixed order, so dQ is not bitwise reproducible run to run.
    In the interpreter (no TMA reductions) ``dq_acc`` has a leading plane per CTA row of keys,
    summed by the caller.
    """
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    groups = hq // hkv
    blk, slots = _ROWS, config.bwd_slots
    keys = _COMPUTE_WGS * _ROWS  # keys per CTA
    segmented = seg is not None
    staged = interpret is None  # Interpreter: a plain store (no TMA reductions), no stage

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        seg_refs, refs = (refs[:2], refs[2:]) if segmented else ((), refs)
        dq_ref, dk_ref, dv_ref, scoped = refs
        (k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, p_tiles, ds_tile, *rest), bars = (
            scoped
        )
        dq_stage, seg_smem = (rest[0], rest[1:]) if staged else (None, rest)
        kv_bars, q_bar, do_bar, lse_bar, delta_bar, free, p_ready, p_free, done, *seg_bars = bars
        batch, kv_head, tile = (lax.axis_index(n) for n in ("batch", "kv_heads", "kv_tiles"))
        wg = lax.axis_index("wg")
        cta_base = tile * keys
        last_query = None
        if segmented:
            seg_ref, spans_ref = seg_refs
            last_query = _span(spans_ref, batch, tile, 1, interpret)
        stream = _QueryStream.of_cta(spec, s, groups, kv_head, cta_base, last_query)
        steps = stream.steps
        rows = (batch, pl.ds(cta_base, keys), kv_head)
        cols = lambda x: lax.broadcast_in_dim(x, (keys, blk), [1])

        def own_keys(src: Any, dst: Any, bar: Any) -> None:
            plgpu.copy_gmem_to_smem(src.at[rows], dst, bar)

        def finish(acc: Array, scale: float, dst_smem: Any, dst_ref: Any) -> None:
            # Both warpgroups' products that read K and V are done before either is overwritten.
            plgpu.barrier_arrive(done)
            plgpu.barrier_wait(done)
            dst_smem[...] = (acc * scale).astype(k.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(dst_smem, dst_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 0)
        def _probabilities() -> None:
            plgpu.set_max_registers(config.fused_registers[0], action="increase")
            own_keys(k_ref, k_smem, kv_bars.at[0])
            if segmented:  # the CTA's keys' ids, as the per-row vector of its score tiles
                plgpu.copy_gmem_to_smem(seg_ref.at[batch, pl.ds(cta_base, keys)], seg_smem[0],
                                        seg_bars[0])  # fmt: skip
                plgpu.barrier_wait(seg_bars[0])
                kv_seg = _load_stats(seg_smem[0], _ROW_STAT, interpret)
            plgpu.barrier_wait(kv_bars.at[0])

            def body(step: Array, dv: Array, masked: bool, group: int) -> Array:
                slot, buf = lax.rem(step, slots), lax.rem(step, 2)
                _, q0 = stream.coords(step, group)
                for bar in (q_bar, lse_bar, *seg_bars[1:]):
                    plgpu.barrier_wait(bar.at[slot])
                lse = _load_stats(lse_ring.at[slot], _COL_STAT, interpret)
                s_init = spec.keys_by_queries_init(lse, (keys, blk), interpret)
                (s_t,) = _products([(s_init, k_smem, _T(q_ring.at[slot]))], interpret)
                x_t, tanh_t = spec.exponent(s_t)
                p_t = spec.keys_by_queries_probabilities(x_t, lse)
                if masked:
                    p_t = jnp.where(spec.visible((keys, blk), cta_base, q0, False, interpret),
                                    p_t, 0.0)  # fmt: skip
                if segmented:
                    q_seg = _load_stats(seg_smem[1].at[slot], _COL_STAT, interpret)
                    p_t = jnp.where(_same_segment(kv_seg, q_seg, (keys, blk)), p_t, 0.0)
                pl.when(step >= 2)(lambda: plgpu.barrier_wait(p_free.at[buf]))
                # What dS needs of P (through the softcap's derivative), for warpgroup 1.
                p_tiles.at[buf][...] = spec.through_softcap(p_t, tanh_t).astype(q.dtype)
                plgpu.barrier_arrive(p_ready.at[buf])
                plgpu.barrier_wait(do_bar.at[slot])
                (dv,) = _products([(dv, p_t.astype(q.dtype), do_ring.at[slot])], interpret)
                plgpu.barrier_arrive(free.at[slot])
                return dv

            dv = stream.loop(body, _zeros((keys, d), interpret))
            for last in range(2):  # observe warpgroup 1's releases of the last two P tiles
                pl.when(steps > last)(lambda last=last: plgpu.barrier_wait(
                    p_free.at[lax.rem(steps - 1 - last, 2)]))  # fmt: skip
            finish(dv, 1.0, v_smem, dv_ref)

        @pl.when(wg == 1)
        def _score_gradients() -> None:
            plgpu.set_max_registers(config.fused_registers[1], action="increase")
            own_keys(v_ref, v_smem, kv_bars.at[1])
            plgpu.barrier_wait(kv_bars.at[1])
            plgpu.barrier_wait(kv_bars.at[0])  # K: the dQ product's right operand

            def body(step: Array, dk: Array, masked: bool, group: int) -> Array:
                # No masks here (P is zero where a pair is hidden), but the same per-head loops
                # as warpgroup 0's: as one loop over all steps ptxas spilled 23 values a step.
                del masked
                slot, buf = lax.rem(step, slots), lax.rem(step, 2)
                head, q0 = stream.coords(step, group)
                plgpu.barrier_wait(do_bar.at[slot])
                plgpu.barrier_wait(delta_bar.at[slot])
                dlt = _load_stats(delta_ring.at[slot], _COL_STAT, interpret)
                (dp_t,) = _products([(cols(-dlt), v_smem, _T(do_ring.at[slot]))], interpret)
                plgpu.barrier_wait(p_ready.at[buf])
                p_t = p_tiles.at[buf][...]
                plgpu.barrier_arrive(p_free.at[buf])
                ds_t = _scale_by_probabilities(p_t, dp_t)
                plgpu.barrier_wait(q_bar.at[slot])

                def stage_ds() -> None:  # for the dQ product, while dK's product runs
                    ds_tile[...] = ds_t
                    plgpu.commit_smem()

                (dk,) = _products([(dk, ds_t, q_ring.at[slot])], interpret, after_issue=stage_ds)
                plgpu.barrier_arrive(free.at[slot])
                (dq,) = _products([(_zeros((blk, d), interpret), _T(ds_tile), k_smem)], interpret)
                dq_rows = (batch, pl.ds(q0, blk), head)
                if not staged:  # Interpreter: a plane per CTA row, summed outside
                    dq_ref.at[(tile, *dq_rows)][...] = dq
                    return dk
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last partial has left
                dq_stage[...] = dq
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(dq_stage, dq_ref.at[dq_rows], reduction_op="add")
                return dk

            dk = stream.loop(body, _zeros((keys, d), interpret))
            finish(dk, spec.scale, k_smem, dk_ref)

        @pl.when(wg == _COMPUTE_WGS)
        def _memory() -> None:
            plgpu.set_max_registers(config.fused_registers[2], action="decrease")

            stream.feed(
                (q_ref, do_ref, lse_ref, delta_ref, *seg_refs[:1]),
                (q_ring, do_ring, lse_ring, delta_ring, *seg_smem[1:]),
                (q_bar, do_bar, lse_bar, delta_bar, *seg_bars[1:]),
                free, batch, slots,
            )  # fmt: skip

    ring_scratch, ring_barriers = _QueryStream.ring(q, do, slots)
    scratch = [
        _smem_tile((keys, d), k.dtype),
        _smem_tile((keys, d), v.dtype),
        *ring_scratch,
        _smem_tile((2, keys, blk), q.dtype),  # P, double-buffered: warpgroup 0 -> 1
        _smem_tile((keys, blk), q.dtype),  # dSᵀ: the dQ product's left operand, transposed
    ]
    if staged:
        scratch.append(_smem_tile((blk, d), jnp.float32))  # dQ partials on their way out
    barriers = [
        plgpu.Barrier(num_barriers=2),  # K, V
        *ring_barriers,
        plgpu.Barrier(num_barriers=2),  # P tile ready
        plgpu.Barrier(num_barriers=2),  # P tile free
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS),  # both done with K and V
    ]
    if segmented:  # the keys' and (with each query tile) the queries' segment ids
        scratch += [plgpu.SMEM((keys,), jnp.int32), _segment_tile((slots, blk))]
        barriers += [plgpu.Barrier(), plgpu.Barrier(num_barriers=slots)]

    def entry(*refs: Any) -> None:
        pl.run_scoped(
            lambda *scoped: kernel(*refs, scoped), tuple(scratch), tuple(barriers),
            collective_axes="wg",
        )  # fmt: skip

    out_type = (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype))
    operands = (q, k, v, do, lse2, delta) + (tuple(seg) if segmented else ()) + (dq_acc,)
    grid = _grid(config, ("kv_tiles", s // keys), ("kv_heads", hkv), b)
    return _launch(entry, out_type, grid, "lorax_mgpu_attention_fused_bwd", interpret)(*operands)


def _bwd_dq(config: MgpuAttentionConfig, q_shape: tuple[int, ...], spec: _Scores,
            segmented: bool) -> str:  # fmt: skip
    """The backward's dQ design, ``"kernel"`` or ``"fused"``, once ``"auto"`` is resolved.

    What decides is how many query tiles a CTA of keys streams per head, its reach: the fused
    kernel's five products win once a CTA has many steps to spread its setup over, the two
    kernels' (bitwise reproducible dQ) below that. "auto" fuses only where that was timed:
    plain causal attention (a window narrows the reach; packed rows do too, by the examples'
    length, which the trace cannot see) at head dim 128. With the softcap, a window and
    segments together ptxas spills ~12 KB per thread in the fused kernel.
    """
    if config.bwd_dq != "auto":
        return config.bwd_dq
    _, seq_len, _, head_dim = q_shape
    plain = spec.window is None and spec.softcap is None and not segmented
    timed = plain and head_dim == 128
    return "fused" if timed and seq_len >= _FUSED_MIN_SEQ_LEN else "kernel"


@functools.partial(jax.jit, static_argnums=(7, 8, 9))
def _backward(q, k, v, out, lse2, d_out, seg, spec: _Scores, config: MgpuAttentionConfig,
              interpret):  # fmt: skip
    """``(dq, dk, dv)`` from the forward's ``out`` and base-2 ``lse₂``."""
    delta = jnp.einsum(
        "bshd,bshd->bhs", out.astype(jnp.float32), d_out.astype(jnp.float32)
    )  # rowsum(dO ⊙ O): a memory-bound XLA reduction
    args = (q, k, v, d_out.astype(q.dtype), lse2.astype(jnp.float32), delta, seg)
    if _bwd_dq(config, q.shape, spec, seg is not None) == "kernel":
        dk, dv = _dkdv_call(*args, spec, config, interpret)
        return _dq_call(*args, spec, config, interpret), dk, dv
    # Interpreter: no reductions into global memory; a plane per CTA row of keys, summed here.
    planes = () if interpret is None else (q.shape[1] // (_COMPUTE_WGS * _ROWS),)
    dq_acc = jax.new_ref(jnp.zeros((*planes, *q.shape), jnp.float32), memory_space=plgpu.GMEM)
    dk, dv = _fused_call(*args, spec, config, interpret, dq_acc)
    dq = dq_acc[...].sum(axis=0) if planes else dq_acc[...]
    return (dq * spec.scale).astype(q.dtype), dk, dv


# ------------------------------------------------------------------------------- public API


def _prepare(q: Array, k: Array, v: Array, config: MgpuAttentionConfig,
             segment_ids: Array | None, scale: float, sliding_window: int | None,
             softcap: float | None) -> tuple[tuple[Array, Array] | None, _Scores]:  # fmt: skip
    """Checks the arguments; the kernels' segments and static score spec (a window as wide as
    S masks nothing and is dropped, so it costs nothing)."""
    check_supported(
        q, k, v, config, segment_ids, sliding_window=sliding_window, softcap=softcap, scale=scale
    )
    if sliding_window is not None and sliding_window >= q.shape[1]:
        sliding_window = None
    spec = _Scores(float(scale), sliding_window, None if softcap is None else float(softcap))
    return _segments(segment_ids), spec


def flash_forward_mgpu(q: Array, k: Array, v: Array, *, scale: float,
                       config: MgpuAttentionConfig = MgpuAttentionConfig(),
                       interpret: Any = None, segment_ids: Array | None = None,
                       sliding_window: int | None = None,
                       softcap: float | None = None) -> tuple[Array, Array]:  # fmt: skip
    """``(out, lse)`` of causal attention; ``lse [B, Hq, S]`` natural-log, float32.

    ``q [B, S, Hq, D]``, ``k, v [B, S, Hkv, D]``. ``segment_ids [B, S]`` (int): packed rows,
    no attention across segments. ``sliding_window``/``softcap``: see :class:`_Scores`.
    ``interpret``: a Mosaic GPU interpreter parameter object (CPU tests), or None to compile
    for the GPU.
    """
    seg, spec = _prepare(q, k, v, config, segment_ids, scale, sliding_window, softcap)
    out, lse2 = _forward_call(q, k, v, seg, spec, config, interpret)
    return out, lse2 / _LOG2E


def flash_backward_mgpu(q: Array, k: Array, v: Array, out: Array, lse: Array, d_out: Array, *,
                        scale: float, config: MgpuAttentionConfig = MgpuAttentionConfig(),
                        interpret: Any = None, segment_ids: Array | None = None,
                        sliding_window: int | None = None, softcap: float | None = None,
                        ) -> tuple[Array, Array, Array]:  # fmt: skip
    """``(dq, dk, dv)`` of causal attention from the forward's ``out`` and natural-log ``lse``."""
    seg, spec = _prepare(q, k, v, config, segment_ids, scale, sliding_window, softcap)
    lse2 = lse.astype(jnp.float32) * _LOG2E
    return _backward(q, k, v, out, lse2, d_out, seg, spec, config, interpret)


def flash_attention_mgpu(q: Array, k: Array, v: Array, scale: float,
                         config: MgpuAttentionConfig = MgpuAttentionConfig(),
                         interpret: Any = None, segment_ids: Array | None = None, *,
                         sliding_window: int | None = None,
                         softcap: float | None = None) -> Array:  # fmt: skip
    """Causal GQA attention on the Mosaic GPU kernels, differentiable w.r.t. q, k, v.

    Saves only ``out`` and ``lse₂`` for the backward (no S×S array anywhere). Arguments as
    :func:`flash_forward_mgpu`; unsupported shapes raise (see :func:`check_supported`).
    """
    seg, spec = _prepare(q, k, v, config, segment_ids, scale, sliding_window, softcap)
    return _attention(q, k, v, seg, spec, config, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, seg, spec: _Scores, config: MgpuAttentionConfig, interpret) -> Array:
    return _forward_call(q, k, v, seg, spec, config, interpret)[0]


def _vjp_forward(q, k, v, seg, spec, config, interpret):
    out, lse2 = _forward_call(q, k, v, seg, spec, config, interpret)
    return out, (q, k, v, seg, out, lse2)


def _vjp_backward(spec, config, interpret, residuals, d_out):
    q, k, v, seg, out, lse2 = residuals
    dq, dk, dv = _backward(q, k, v, out, lse2, d_out, seg, spec, config, interpret)
    return dq, dk, dv, None  # segment ids: integers, no cotangent


_attention.defvjp(_vjp_forward, _vjp_backward)
