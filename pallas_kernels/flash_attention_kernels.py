"""FlashAttention-2 forward and backward as Pallas kernels (Triton lowering on GPU).

Three ``pallas_call`` s, all on the ``[B, S, H, D]`` layout the model produces (no transposes):

* forward, grid ``(q_blocks, B, Hq)``: one program owns a ``[block_q, D]`` query tile and
  streams K/V tiles of its KV head, keeping the running max / sum / accumulator of the online
  softmax in registers. It writes the output and the per-row log-sum-exp (base 2) — the only
  residuals the backward needs besides q, k, v.
* dK/dV, grid ``(kv_blocks, B, Hkv)``: one program owns a ``[block_k, D]`` K/V tile and loops
  over the ``G = Hq // Hkv`` query heads of its group and, per head, over the query tiles that
  can see it, recomputing the probabilities from q, k and the saved log-sum-exp. GQA gradients
  are therefore summed over the group *inside* the kernel, in float32 registers: no
  ``[B, S, Hq, D]`` per-query-head dK/dV is written and reduced afterwards.
* dQ, grid ``(q_blocks, B, Hq)``: like the forward, but accumulating ``dS @ K``.

``delta = rowsum(dO * O)`` is computed by XLA (a memory-bound fused reduction) before the
backward kernels. No kernel ever holds more than a ``[block_q, block_k]`` tile of scores.

K/V are never repeated for GQA: the BlockSpec index maps send query head ``h`` to KV head
``h // G``, the Hugging Face grouping.

Masking is by block. For each tile the kernels compute, from block indices alone, the range of
partner blocks that can contain a visible entry (so causal costs about half of full attention
and a window of ``w`` costs about ``S * w``), and inside it the sub-range whose tiles are fully
visible. Fully visible tiles skip the mask arithmetic; only the boundary tiles (the diagonal,
the window edge, key padding) and, with ``segment_ids``, every tile pay for it.

Numerics: scores are accumulated in float32 and the softmax runs in base 2 (``exp2`` with
``log2(e)`` folded into the score scale, as in FlashAttention-2). Masked scores are ``-inf``
while the running max starts at a large *finite* negative value, so a row that has seen no
visible key yet gets ``exp2(-inf - finite) = 0`` instead of ``inf - inf = NaN``. A row that sees
no key at all ends with sum 0: its output is 0 and its log-sum-exp is ``+inf``, which makes the
backward's recomputed probabilities exactly 0 for it.

The kernels assume inputs already padded by the caller: sequence length a multiple of every
block size and head_dim a power of two (Triton tiles must be powers of two). The true sequence
length is static (``KernelSpec.seq_len``) and masks padded keys where causality does not.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.experimental import pallas as pl

from pallas_kernels._backend import triton_compiler_params

__all__ = [
    "BlockSizes",
    "KernelSpec",
    "flash_backward",
    "flash_forward",
]

LOG2E = math.log2(math.e)
# Initial running max: finite so that `m_prev - m_new` is never `-inf - (-inf)`.
_MAX_INIT = -0.7 * float(np.finfo(np.float32).max)
_MIN_BLOCK = 16  # smallest tile Triton's tensor-core dot accepts


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and Triton launch parameters (all static; hashable so jit caches on them).

    Attributes:
      block_q, block_k: forward query / key tile.
      block_q_dkv, block_k_dkv: dK/dV kernel; ``block_k_dkv`` is the K/V tile each program
        owns (its dK/dV accumulators live in registers), ``block_q_dkv`` the streamed q tile.
      block_q_dq, block_k_dq: dQ kernel; ``block_q_dq`` is owned, ``block_k_dq`` streamed.
      num_warps, num_stages: Triton launch parameters of the forward kernel.
      num_warps_bwd, num_stages_bwd: the same for both backward kernels.

    Every block is a power of two >= 16. Sequences shorter than a block use a smaller block
    (see :meth:`fit`), so the defaults are safe for any length.
    """

    block_q: int = 128
    block_k: int = 128
    block_q_dkv: int = 64
    block_k_dkv: int = 128
    block_q_dq: int = 128
    block_k_dq: int = 64
    num_warps: int = 8
    num_stages: int = 2
    num_warps_bwd: int = 8
    num_stages_bwd: int = 2

    def __post_init__(self) -> None:
        for name in self.block_fields():
            value = getattr(self, name)
            if not (_is_pow2(value) and value >= _MIN_BLOCK):
                raise ValueError(f"BlockSizes.{name} must be a power of two >= 16; got {value}")

    @staticmethod
    def block_fields() -> tuple[str, ...]:
        return (
            "block_q",
            "block_k",
            "block_q_dkv",
            "block_k_dkv",
            "block_q_dq",
            "block_k_dq",
        )

    @classmethod
    def for_head_dim(cls, head_dim: int) -> BlockSizes:
        """Defaults by head_dim.

        D <= 128 uses the FlashAttention-2/Triton-tutorial shape (128x128 forward tiles; the
        backward owns 128 rows and streams 64) — the forward configuration measured at
        265-395 TFLOP/s for jax's Triton ``mha`` on the H200. D = 256 (Gemma) halves the tiles so
        the float32 accumulators (``block x 256`` each, two of them in dK/dV) fit in registers.
        ``scripts/bench_attention.py --sweep`` is where these get re-tuned.
        """
        if head_dim <= 64:
            return cls(num_warps=4, num_warps_bwd=4)
        if head_dim <= 128:
            return cls()
        return cls(
            block_q=64,
            block_k=64,
            block_q_dkv=32,
            block_k_dkv=64,
            block_q_dq=64,
            block_k_dq=32,
            num_warps=4,
            num_stages=2,
            num_warps_bwd=8,
            num_stages_bwd=2,
        )

    def fit(self, seq_len: int) -> BlockSizes:
        """Shrinks blocks longer than the (power-of-two-rounded) sequence."""
        cap = max(_MIN_BLOCK, pl.next_power_of_2(seq_len))
        return dataclasses.replace(
            self, **{name: min(getattr(self, name), cap) for name in self.block_fields()}
        )

    @property
    def max_block(self) -> int:
        """The padding granule: all blocks are powers of two, so each divides the largest."""
        return max(getattr(self, name) for name in self.block_fields())


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Everything static about one attention call (a jit/custom_vjp static argument)."""

    causal: bool
    sliding_window: int | None  # None, or 1 <= w < seq_len (a wider window is a no-op)
    softcap: float | None
    scale: float
    seq_len: int  # true length; arrays are padded to a multiple of block_sizes.max_block
    block_sizes: BlockSizes
    interpret: bool


# --------------------------------------------------------------------------------------------
# In-kernel helpers (operate on tiles; traced once per kernel).
# --------------------------------------------------------------------------------------------


def _dot(a: Array, b: Array, *, trans_a: bool = False, trans_b: bool = False) -> Array:
    """2-D matmul with float32 accumulation; transposes are folded into the dot itself."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _logits(qk: Array, spec: KernelSpec) -> tuple[Array, Array | None]:
    """Raw ``q @ k.T`` -> (base-2 logits, tanh term for the softcap chain rule or None)."""
    if spec.softcap is None:
        return qk * (spec.scale * LOG2E), None
    t = jnp.tanh(qk * (spec.scale / spec.softcap))
    return t * (spec.softcap * LOG2E), t


def _tile_mask(
    spec: KernelSpec,
    q_start: Array,
    k_start: Array,
    block_q: int,
    block_k: int,
    q_seg: Array | None,
    kv_seg: Array | None,
    kv_padded: bool,
) -> Array:
    """``[block_q, block_k]`` visibility of a tile whose corners are (q_start, k_start)."""
    rows = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
    cols = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    mask = None

    def conj(m: Array | None, extra: Array) -> Array:
        return extra if m is None else jnp.logical_and(m, extra)

    if spec.causal:
        mask = conj(mask, cols <= rows)
    elif kv_padded:  # causal already hides keys >= seq_len from every real query
        mask = conj(mask, cols < spec.seq_len)
    if spec.sliding_window is not None:
        mask = conj(mask, cols > rows - spec.sliding_window)
    if q_seg is not None:
        assert kv_seg is not None
        mask = conj(mask, q_seg[:, None] == kv_seg[None, :])
    assert mask is not None, "masked tile without any mask"
    return mask


def _cdiv(a: Array | int, b: int) -> Array:
    return lax.div(a + (b - 1), b)


def _clip(x: Array | int, lo: Array | int, hi: Array | int) -> Array:
    return jnp.minimum(jnp.maximum(x, lo), hi)


def _kv_range(
    spec: KernelSpec,
    q_start: Array,
    block_q: int,
    block_k: int,
    num_kv_blocks: int,
    *,
    has_segments: bool,
    kv_padded: bool,
) -> tuple[Array, Array, Array, Array]:
    """KV blocks a query tile must visit: ``lo <= full_lo <= full_hi <= hi``.

    Blocks in ``[lo, hi)`` may hold a visible key; those in ``[full_lo, full_hi)`` are visible to
    every row of the tile and need no mask.
    """
    lo: Array | int = 0
    hi: Array | int = num_kv_blocks
    if spec.causal:  # keys <= last row of the tile
        hi = jnp.minimum(hi, _cdiv(q_start + block_q, block_k))
    if spec.sliding_window is not None:  # keys > first row - w
        lo = lax.div(jnp.maximum(q_start - spec.sliding_window + 1, 0), block_k)
    full_lo: Array | int = lo
    full_hi: Array | int = hi
    if has_segments:
        full_hi = lo
    else:
        if spec.causal:  # every key of the block <= first row
            full_hi = jnp.minimum(full_hi, lax.div(q_start + 1, block_k))
        elif kv_padded:
            full_hi = min(num_kv_blocks, spec.seq_len // block_k)
        if spec.sliding_window is not None:  # every key of the block > last row - w
            edge = jnp.maximum(q_start + block_q - spec.sliding_window, 0)
            full_lo = jnp.maximum(full_lo, _cdiv(edge, block_k))
    full_lo = _clip(full_lo, lo, hi)
    full_hi = _clip(full_hi, full_lo, hi)
    return tuple(jnp.asarray(x, jnp.int32) for x in (lo, full_lo, full_hi, hi))  # type: ignore[return-value]


def _q_range(
    spec: KernelSpec,
    k_start: Array,
    block_q: int,
    block_k: int,
    num_q_blocks: int,
    *,
    has_segments: bool,
    kv_padded: bool,
) -> tuple[Array, Array, Array, Array]:
    """Query blocks a KV tile must visit (the transpose of :func:`_kv_range`)."""
    lo: Array | int = 0
    hi: Array | int = num_q_blocks
    if spec.causal:  # rows >= first key of the tile
        lo = lax.div(k_start, block_q)
    if spec.sliding_window is not None:  # rows < last key + w
        last_row = k_start + block_k + spec.sliding_window - 2
        hi = jnp.minimum(hi, lax.div(last_row, block_q) + 1)
    full_lo: Array | int = lo
    full_hi: Array | int = hi
    if has_segments:
        full_hi = lo
    else:
        if spec.causal:  # every row of the block >= last key
            full_lo = jnp.maximum(full_lo, _cdiv(k_start + block_k - 1, block_q))
        elif kv_padded:  # a tile holding padded keys is masked for every query block
            # Arithmetic, not a scalar jnp.where: the Triton lowering types the weak literal
            # operands of a scalar select_n like its boolean predicate (i1).
            holds_padding = (k_start + block_k > spec.seq_len).astype(jnp.int32)
            full_hi = full_hi - holds_padding * (full_hi - lo)
        if spec.sliding_window is not None:  # every row of the block < first key + w
            full_hi = jnp.minimum(full_hi, lax.div(k_start + spec.sliding_window, block_q))
    full_lo = _clip(full_lo, lo, hi)
    full_hi = _clip(full_hi, full_lo, hi)
    return tuple(jnp.asarray(x, jnp.int32) for x in (lo, full_lo, full_hi, hi))  # type: ignore[return-value]


def _visit(
    bounds: tuple[Array, Array, Array, Array],
    body: Callable[..., Any],
    carry: Any,
    *,
    needs_mask: bool,
    has_segments: bool,
) -> Any:
    """Runs ``body(i, carry, masked=...)`` over masked edge blocks and unmasked interior ones."""
    lo, full_lo, full_hi, hi = bounds
    if has_segments:  # every tile may mix segments
        return lax.fori_loop(lo, hi, functools.partial(body, masked=True), carry)
    if not needs_mask:
        return lax.fori_loop(lo, hi, functools.partial(body, masked=False), carry)
    carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def _needs_positional_mask(spec: KernelSpec, kv_padded: bool) -> bool:
    return spec.causal or spec.sliding_window is not None or kv_padded


def _q_block_index(spec: KernelSpec, i: Array, num_q_blocks: int) -> Array:
    """Grid index -> query block. Causal tiles near the end do the most work; launching them
    first (axis 0 varies fastest on the GPU) keeps the tail of the launch short."""
    return num_q_blocks - 1 - i if spec.causal else i


# --------------------------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------------------------


def _forward_kernel(
    *refs: Any,
    spec: KernelSpec,
    block_q: int,
    block_k: int,
    num_q_blocks: int,
    has_segments: bool,
    kv_padded: bool,
) -> None:
    if has_segments:
        q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref = refs
        q_seg_ref = kv_seg_ref = None
    q_start = _q_block_index(spec, pl.program_id(0), num_q_blocks) * block_q
    num_kv_blocks = k_ref.shape[0] // block_k
    q = q_ref[...]
    q_seg = None if q_seg_ref is None else q_seg_ref[...]

    def body(j: Array, carry: tuple[Array, Array, Array], *, masked: bool):
        acc, m_prev, l_prev = carry
        k_start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        s, _ = _logits(_dot(q, k, trans_b=True), spec)
        if masked:
            kv_seg = None if kv_seg_ref is None else kv_seg_ref[pl.ds(k_start, block_k)]
            mask = _tile_mask(spec, q_start, k_start, block_q, block_k, q_seg, kv_seg, kv_padded)
            s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp2(m_prev - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l_new = l_prev * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l_new

    carry = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((block_q,), _MAX_INIT, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    bounds = _kv_range(
        spec,
        q_start,
        block_q,
        block_k,
        num_kv_blocks,
        has_segments=has_segments,
        kv_padded=kv_padded,
    )
    acc, row_max, row_sum = _visit(
        bounds,
        body,
        carry,
        needs_mask=_needs_positional_mask(spec, kv_padded),
        has_segments=has_segments,
    )
    empty = row_sum == 0.0  # the row saw no key: output 0, lse +inf (=> zero probabilities in bwd)
    row_sum = jnp.where(empty, 1.0, row_sum)
    o_ref[...] = (acc / row_sum[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, row_max + jnp.log2(row_sum))


def _dkdv_kernel(
    *refs: Any,
    spec: KernelSpec,
    block_q: int,
    block_k: int,
    groups: int,
    has_segments: bool,
    kv_padded: bool,
) -> None:
    if has_segments:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, dk_ref, dv_ref) = (
            refs
        )
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
        q_seg_ref = kv_seg_ref = None
    k_start = pl.program_id(0) * block_k
    num_q_blocks = q_ref.shape[0] // block_q
    k = k_ref[...]
    v = v_ref[...]
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]
    bounds = _q_range(
        spec,
        k_start,
        block_q,
        block_k,
        num_q_blocks,
        has_segments=has_segments,
        kv_padded=kv_padded,
    )

    def head(g: Array | int, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        def body(i: Array, carry: tuple[Array, Array], *, masked: bool):
            dk, dv = carry
            q_start = pl.multiple_of(i * block_q, block_q)
            rows = pl.ds(q_start, block_q)
            q = q_ref[rows, g, :]
            do = do_ref[rows, g, :]
            lse = lse_ref[g, rows]
            delta = delta_ref[g, rows]
            s, t = _logits(_dot(q, k, trans_b=True), spec)
            if masked:
                q_seg = None if q_seg_ref is None else q_seg_ref[rows]
                mask = _tile_mask(
                    spec, q_start, k_start, block_q, block_k, q_seg, kv_seg, kv_padded
                )
                s = jnp.where(mask, s, -jnp.inf)
            p = jnp.exp2(s - lse[:, None])
            dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
            dp = _dot(do, v, trans_b=True)
            ds = p * (dp - delta[:, None])
            if t is not None:
                ds = ds * (1.0 - t * t)
            dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
            return dk, dv

        return _visit(
            bounds,
            body,
            carry,
            needs_mask=_needs_positional_mask(spec, kv_padded),
            has_segments=has_segments,
        )

    zeros = jnp.zeros(k.shape, jnp.float32)
    if groups == 1:
        dk, dv = head(0, (zeros, zeros))
    else:
        dk, dv = lax.fori_loop(0, groups, head, (zeros, zeros))
    dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(
    *refs: Any,
    spec: KernelSpec,
    block_q: int,
    block_k: int,
    num_q_blocks: int,
    has_segments: bool,
    kv_padded: bool,
) -> None:
    if has_segments:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, dq_ref) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
        q_seg_ref = kv_seg_ref = None
    q_start = _q_block_index(spec, pl.program_id(0), num_q_blocks) * block_q
    num_kv_blocks = k_ref.shape[0] // block_k
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_seg = None if q_seg_ref is None else q_seg_ref[...]

    def body(j: Array, dq: Array, *, masked: bool) -> Array:
        k_start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        s, t = _logits(_dot(q, k, trans_b=True), spec)
        if masked:
            kv_seg = None if kv_seg_ref is None else kv_seg_ref[pl.ds(k_start, block_k)]
            mask = _tile_mask(spec, q_start, k_start, block_q, block_k, q_seg, kv_seg, kv_padded)
            s = jnp.where(mask, s, -jnp.inf)
        p = jnp.exp2(s - lse[:, None])
        ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        return dq + _dot(ds.astype(k.dtype), k)

    bounds = _kv_range(
        spec,
        q_start,
        block_q,
        block_k,
        num_kv_blocks,
        has_segments=has_segments,
        kv_padded=kv_padded,
    )
    dq = _visit(
        bounds,
        body,
        jnp.zeros(q.shape, jnp.float32),
        needs_mask=_needs_positional_mask(spec, kv_padded),
        has_segments=has_segments,
    )
    dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)


# --------------------------------------------------------------------------------------------
# pallas_call wrappers.
# --------------------------------------------------------------------------------------------


def _call(
    kernel: Callable[..., None],
    *,
    spec: KernelSpec,
    grid: tuple[int, ...],
    in_specs: Sequence[pl.BlockSpec],
    out_specs: Sequence[pl.BlockSpec],
    out_shape: Sequence[jax.ShapeDtypeStruct],
    num_warps: int,
    num_stages: int,
    name: str,
) -> Callable[..., Any]:
    """``pl.pallas_call`` routed to the Triton lowering on GPU.

    On jax 0.10.x and 0.11.x the GPU lowering picks Mosaic GPU unless the compiler params are
    Triton's; these kernels use Triton-style pointer loads of dynamic slices and in-register
    ``dot_general``, which only the Triton lowering implements, so compiled calls must carry
    ``triton_compiler_params`` (feature-detected in ``_backend``). Interpret mode ignores them.
    """
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=list(in_specs),
        out_specs=list(out_specs),
        out_shape=list(out_shape),
        interpret=spec.interpret,
        compiler_params=(
            None
            if spec.interpret
            else triton_compiler_params(num_warps=num_warps, num_stages=num_stages)
        ),
        name=name,
    )


def _shapes(q: Array, k: Array) -> tuple[int, int, int, int, int, int]:
    batch, seq_len, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    return batch, seq_len, num_q_heads, num_kv_heads, num_q_heads // num_kv_heads, head_dim


def flash_forward(
    q: Array,
    k: Array,
    v: Array,
    segment_ids: tuple[Array, Array] | None,
    spec: KernelSpec,
) -> tuple[Array, Array]:
    """Padded ``q [B,S,Hq,D]``, ``k/v [B,S,Hkv,D]`` -> (``o [B,S,Hq,D]``, ``lse [B,Hq,S]`` f32).

    ``segment_ids`` is ``(q_ids, kv_ids)``, both ``[B, S]`` int32 (the public API passes the
    same array twice; tests use distinct ones to produce rows that see no key). ``lse`` is the
    base-2 log-sum-exp of each row's logits (``+inf`` for a row with no key).
    """
    batch, seq_len, num_q_heads, _, groups, head_dim = _shapes(q, k)
    bs = spec.block_sizes
    block_q, block_k = bs.block_q, bs.block_k
    num_q_blocks = seq_len // block_q
    has_segments = segment_ids is not None
    kv_padded = spec.seq_len < seq_len

    def q_block(i: Array) -> Array:
        return _q_block_index(spec, i, num_q_blocks)

    q_spec = pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, q_block(i), h, 0))
    kv_spec = pl.BlockSpec((None, seq_len, None, head_dim), lambda i, b, h: (b, 0, h // groups, 0))
    in_specs = [q_spec, kv_spec, kv_spec]
    args = [q, k, v]
    if has_segments:
        in_specs += [
            pl.BlockSpec((None, block_q), lambda i, b, h: (b, q_block(i))),
            pl.BlockSpec((None, seq_len), lambda i, b, h: (b, 0)),
        ]
        args += list(segment_ids)
    kernel = functools.partial(
        _forward_kernel,
        spec=spec,
        block_q=block_q,
        block_k=block_k,
        num_q_blocks=num_q_blocks,
        has_segments=has_segments,
        kv_padded=kv_padded,
    )
    o, lse = _call(
        kernel,
        spec=spec,
        grid=(num_q_blocks, batch, num_q_heads),
        in_specs=in_specs,
        out_specs=[
            q_spec,
            pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, q_block(i))),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, num_q_heads, seq_len), jnp.float32),
        ],
        num_warps=bs.num_warps,
        num_stages=bs.num_stages,
        name="flash_attention_fwd",
    )(*args)
    return o, lse


def flash_backward(
    q: Array,
    k: Array,
    v: Array,
    segment_ids: tuple[Array, Array] | None,
    o: Array,
    lse: Array,
    do: Array,
    spec: KernelSpec,
) -> tuple[Array, Array, Array]:
    """Gradients ``(dq, dk, dv)`` of padded inputs, from the forward's ``o`` and ``lse``."""
    batch, seq_len, num_q_heads, num_kv_heads, groups, head_dim = _shapes(q, k)
    bs = spec.block_sizes
    has_segments = segment_ids is not None
    kv_padded = spec.seq_len < seq_len
    do = do.astype(q.dtype)
    # delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij: the softmax-backward row correction.
    # An elementwise product + reduction (one XLA fusion), not an einsum: a "bshd,bshd->bhs"
    # dot_general could become a batched GEMV.
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1).transpose(0, 2, 1)

    # dK/dV: each program owns one KV tile of one KV head and loops over its G query heads.
    block_q, block_k = bs.block_q_dkv, bs.block_k_dkv
    group_rows = pl.BlockSpec((None, seq_len, groups, head_dim), lambda j, b, h: (b, 0, h, 0))
    group_stats = pl.BlockSpec((None, groups, seq_len), lambda j, b, h: (b, h, 0))
    kv_tile = pl.BlockSpec((None, block_k, None, head_dim), lambda j, b, h: (b, j, h, 0))
    in_specs = [group_rows, kv_tile, kv_tile, group_rows, group_stats, group_stats]
    args = [q, k, v, do, lse, delta]
    if has_segments:
        in_specs += [
            pl.BlockSpec((None, seq_len), lambda j, b, h: (b, 0)),
            pl.BlockSpec((None, block_k), lambda j, b, h: (b, j)),
        ]
        args += list(segment_ids)
    dk, dv = _call(
        functools.partial(
            _dkdv_kernel,
            spec=spec,
            block_q=block_q,
            block_k=block_k,
            groups=groups,
            has_segments=has_segments,
            kv_padded=kv_padded,
        ),
        spec=spec,
        grid=(seq_len // block_k, batch, num_kv_heads),
        in_specs=in_specs,
        out_specs=[kv_tile, kv_tile],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        num_warps=bs.num_warps_bwd,
        num_stages=bs.num_stages_bwd,
        name="flash_attention_dkdv",
    )(*args)

    # dQ: each program owns one query tile and streams the KV tiles it can see.
    block_q, block_k = bs.block_q_dq, bs.block_k_dq
    num_q_blocks = seq_len // block_q

    def q_block(i: Array) -> Array:
        return _q_block_index(spec, i, num_q_blocks)

    q_tile = pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, q_block(i), h, 0))
    kv_rows = pl.BlockSpec((None, seq_len, None, head_dim), lambda i, b, h: (b, 0, h // groups, 0))
    stats = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, q_block(i)))
    in_specs = [q_tile, kv_rows, kv_rows, q_tile, stats, stats]
    args = [q, k, v, do, lse, delta]
    if has_segments:
        in_specs += [
            pl.BlockSpec((None, block_q), lambda i, b, h: (b, q_block(i))),
            pl.BlockSpec((None, seq_len), lambda i, b, h: (b, 0)),
        ]
        args += list(segment_ids)
    (dq,) = _call(
        functools.partial(
            _dq_kernel,
            spec=spec,
            block_q=block_q,
            block_k=block_k,
            num_q_blocks=num_q_blocks,
            has_segments=has_segments,
            kv_padded=kv_padded,
        ),
        spec=spec,
        grid=(num_q_blocks, batch, num_q_heads),
        in_specs=in_specs,
        out_specs=[q_tile],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)],
        num_warps=bs.num_warps_bwd,
        num_stages=bs.num_stages_bwd,
        name="flash_attention_dq",
    )(*args)
    return dq, dk, dv
