"""Causal GQA flash-attention backward as Mosaic GPU kernels (Hopper: TMA + wgmma).

WORK IN PROGRESS (branch ``wip/mgpu-attention-bwd``): checked against the jnp reference in
Mosaic GPU interpret mode on the CPU only; not yet compiled or timed on an H200. Why this
design: jax's own Mosaic GPU attention backward (non-causal only) reached 92% of cuDNN's
forward+backward at 1x8192 and 106% at 2x2048 on the H200 (BENCHMARKS.md §3, planning probe)
with 64x64 tiles and two compute warpgroups; these kernels keep that shape and add what lorax
needs: causal block skipping, the GQA reduction inside the dK/dV kernel, bf16, and the scale.

Two kernels, each a CTA of two compute warpgroups plus one memory warpgroup that streams
tiles through a ring of shared-memory slots with TMA (``slots`` deep; a slot is refilled once
both compute warpgroups have arrived on its ``consumed`` barrier):

* dK/dV, grid ``(kv_heads, kv_tiles / 2, batch)``: warpgroup ``w`` owns K/V rows
  ``[kv_base, kv_base + block)`` in shared memory and float32 dK/dV accumulators in registers.
  The stream is every query tile that can see the CTA's rows, for each of the ``G`` query heads
  of the KV head in turn: the GQA sum happens in the accumulators. Per tile::

      sT = K·Qᵀ   pT = exp2(sT·c − lse₂)   dV += pT·dO   dpT = V·dOᵀ   dsT = pT ⊙ (dpT − Δ)
      dK += dsT·Q                           (c = scale·log2 e, lse₂ = lse·log2 e)

* dQ, grid ``(q_heads, q_tiles / 2, batch)``: warpgroup ``w`` owns a query tile (Q, dO, lse,
  Δ) and streams the K/V tiles up to the diagonal::

      s = Q·Kᵀ   p = exp2(s·c − lse₂)   dp = dO·Vᵀ   ds = p ⊙ (dp − Δ)   dQ += ds·K

Causality costs nothing beyond the diagonal: each CTA streams only the tiles that intersect
its causal triangle, and only the (at most two) tiles per stream that straddle the diagonal
pay for the mask (``iota`` compare and select); a tile that is entirely above the diagonal for
one of the two warpgroups is computed under the mask (all zeros) so both consume every slot.

Requirements (checked): S a multiple of ``2 * block`` (callers pad), head_dim 64 or 128
(a 128-byte swizzle row is 64 bf16), bf16 or f16, causal (no window, softcap or segments:
the Triton kernels in :mod:`pallas_kernels.flash_attention_kernels` keep those).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

__all__ = ["MgpuBackwardConfig", "flash_backward_mgpu"]

_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class MgpuBackwardConfig:
    """Tile sizes of both kernels. ``block`` is the query and the key tile (64: the probe's
    best); ``slots`` is the depth of the TMA ring; ``compute_registers`` per compute thread."""

    block: int = 64
    slots: int = 2
    compute_registers: int = 232
    memory_registers: int = 40

    def __post_init__(self) -> None:
        if self.block % 64:
            raise ValueError(f"block must be a multiple of 64 (wgmma M), got {self.block}")
        if self.slots < 2:
            raise ValueError(f"slots must be at least 2, got {self.slots}")


_COMPUTE_WGS = 2


def _smem_tile(shape: tuple[int, ...], dtype: Any) -> Any:
    """A shared-memory buffer laid out for TMA and wgmma (8x64 tiles, 128-byte swizzle)."""
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def _matmul(
    lhs: Any,
    rhs: Any,
    shape: tuple[int, int],
    acc: Array | None = None,
    interpret: Any = None,
    *,
    rhs_transposed: bool = False,
) -> Array:
    """``acc + lhs @ rhs`` (or ``rhs``ᵀ) on the tensor cores; ``lhs`` registers or smem.

    On the GPU the running ``acc`` is the wgmma accumulator itself (``run_state``) and a
    transposed operand is a transposed view of shared memory. The Mosaic GPU interpreter has
    neither ``run_state`` nor transposed views, so there the same product is a plain dot of the
    tiles read into registers (what is checked on the CPU is the pipeline, the indexing and
    the math; the wgmma operand forms are the GPU's).
    """
    if interpret is not None:
        a = lhs if isinstance(lhs, jax.Array) else lhs[...]
        b = rhs[...].T if rhs_transposed else rhs[...]
        out = jnp.dot(a, b, preferred_element_type=jnp.float32)
        return out if acc is None else acc + out
    if rhs_transposed:
        rhs = plgpu.transpose_ref(rhs, (1, 0))

    def product(ref: Any) -> Array:
        plgpu.wgmma(ref, lhs, rhs)
        return ref[...]

    if acc is None:
        return pl.run_scoped(product, plgpu.ACC(shape, jnp.float32))
    return pl.run_state(lambda ref: plgpu.wgmma(ref, lhs, rhs))(plgpu.ACC.init(acc))


def _layout(x: Array, layout: Any, interpret: Any) -> Array:
    """Pins ``x``'s register layout for the GPU lowering (the interpreter has no layouts)."""
    return x if interpret is not None else plgpu.layout_cast(x, layout)


def _load_stats(ref: Any, layout: Any, interpret: Any) -> Array:
    """A per-row float32 vector from shared memory in the layout its broadcast needs.

    ``plgpu.load`` with an explicit layout is what the GPU lowering wants; the Mosaic GPU
    interpreter has no rule for it, so there the same values come from a plain read.
    """
    if interpret is None:
        return plgpu.load(ref, (), layout=layout)
    return ref[...]


def _zeros(shape: tuple[int, int], interpret: Any) -> Array:
    return _layout(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA, interpret)


def _causal_mask(
    shape: tuple[int, int], row0: Array, col0: Array, rows_are_q: bool, interpret: Any
) -> Array:
    """True where the (query, key) pair of a tile element is visible (key <= query)."""
    if interpret is None:
        iota = lambda dim: plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)
    else:
        iota = lambda dim: lax.broadcasted_iota(jnp.int32, shape, dim)
    rows, cols = iota(0) + row0, iota(1) + col0
    return rows >= cols if rows_are_q else cols >= rows


def _feed_ring(load: Any, steps: Array, slots: int, consumed: Any) -> None:
    """The memory warpgroup's loop: ``load(step, slot)`` for ``steps`` steps through a ring.

    The first ``slots`` loads go out at once; each later one waits until both compute
    warpgroups have released its slot. At the end the last slots' releases are observed too,
    so every phase of every barrier is seen before the shared memory goes out of scope.
    """
    for i in range(slots):

        @pl.when(i < steps)
        def _prologue(i: int = i) -> None:
            load(jnp.int32(i), jnp.int32(i))

    @pl.loop(slots, steps)
    def _stream(step: Array) -> None:
        slot = lax.rem(step, slots)
        plgpu.barrier_wait(consumed.at[slot])
        load(step, slot)

    @pl.loop(jnp.maximum(steps - slots, 0), steps)
    def _drain(step: Array) -> None:
        plgpu.barrier_wait(consumed.at[lax.rem(step, slots)])


def _dkdv_call(q, k, v, do, lse2, delta, scale: float, config: MgpuBackwardConfig, interpret):
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    groups = hq // hkv
    blk, slots = config.block, config.slots
    num_q_tiles = s // blk
    c = scale * _LOG2E

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, scoped):
        (k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring), bars = scoped
        k_bar, v_bar, q_bar, do_bar, lse_bar, delta_bar, consumed = bars
        batch, kv_head, tile = (lax.axis_index(n) for n in ("batch", "kv_heads", "kv_tiles"))
        wg = lax.axis_index("wg")
        cta_base = tile * (_COMPUTE_WGS * blk)
        first = cta_base // blk  # the first query tile that sees any of the CTA's keys
        per_head = num_q_tiles - first
        steps = groups * per_head

        def coords(step: Array) -> tuple[Array, Array]:
            head = kv_head * groups + step // per_head
            return head, (first + step % per_head) * blk

        @pl.when(wg < _COMPUTE_WGS)
        def _compute() -> None:
            plgpu.set_max_registers(config.compute_registers, action="increase")
            kv_base = cta_base + wg * blk
            rows = (batch, pl.ds(kv_base, blk), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[wg], k_bar.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[wg], v_bar.at[wg])
            plgpu.barrier_wait(k_bar.at[wg])
            plgpu.barrier_wait(v_bar.at[wg])

            def body(step: Array, carry: tuple[Array, Array], masked: bool) -> Any:
                dk, dv = carry
                slot = lax.rem(step, slots)
                _, q0 = coords(step)
                for bar in (q_bar, do_bar, lse_bar, delta_bar):
                    plgpu.barrier_wait(bar.at[slot])
                s_t = _matmul(
                    k_smem.at[wg], q_ring.at[slot], (blk, blk), None, interpret, rhs_transposed=True
                )
                lse = _load_stats(lse_ring.at[slot], plgpu.Layout.WGMMA.reduce(0), interpret)
                p_t = jnp.exp2(s_t * c - lax.broadcast_in_dim(lse, (blk, blk), [1]))
                if masked:
                    p_t = jnp.where(
                        _causal_mask((blk, blk), kv_base, q0, False, interpret), p_t, 0.0
                    )
                dv = _matmul(p_t.astype(q.dtype), do_ring.at[slot], (blk, d), dv, interpret)
                dp_t = _matmul(
                    v_smem.at[wg],
                    do_ring.at[slot],
                    (blk, blk),
                    None,
                    interpret,
                    rhs_transposed=True,
                )
                dlt = _load_stats(delta_ring.at[slot], plgpu.Layout.WGMMA.reduce(0), interpret)
                ds_t = p_t * (dp_t - lax.broadcast_in_dim(dlt, (blk, blk), [1]))
                dk = _matmul(ds_t.astype(q.dtype), q_ring.at[slot], (blk, d), dk, interpret)
                plgpu.barrier_arrive(consumed.at[slot])
                return dk, dv

            # Per head: the first COMPUTE_WGS query tiles straddle the CTA's diagonal (or lie
            # wholly above it for the later warpgroup); the rest are fully visible.
            carry = (_zeros((blk, d), interpret), _zeros((blk, d), interpret))
            for g in range(groups):
                start = g * per_head
                edge = start + jnp.minimum(per_head, _COMPUTE_WGS)
                carry = lax.fori_loop(start, edge, lambda i, c_: body(i, c_, True), carry)
                carry = lax.fori_loop(
                    edge, start + per_head, lambda i, c_: body(i, c_, False), carry
                )
            dk, dv = carry
            k_smem.at[wg][...] = (dk * scale).astype(k.dtype)
            v_smem.at[wg][...] = dv.astype(v.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[rows])
            plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == _COMPUTE_WGS)
        def _memory() -> None:
            plgpu.set_max_registers(config.memory_registers, action="decrease")

            def load(step: Array, slot: Array) -> None:
                head, q0 = coords(step)
                tile_rows = (batch, pl.ds(q0, blk), head)
                plgpu.copy_gmem_to_smem(q_ref.at[tile_rows], q_ring.at[slot], q_bar.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[tile_rows], do_ring.at[slot], do_bar.at[slot])
                stats = (batch, head, pl.ds(q0, blk))
                plgpu.copy_gmem_to_smem(lse_ref.at[stats], lse_ring.at[slot], lse_bar.at[slot])
                plgpu.copy_gmem_to_smem(
                    delta_ref.at[stats], delta_ring.at[slot], delta_bar.at[slot]
                )

            _feed_ring(load, steps, slots, consumed)

    def entry(*refs: Any) -> None:
        pl.run_scoped(
            lambda *scoped: kernel(*refs, scoped),
            (
                _smem_tile((_COMPUTE_WGS, blk, d), k.dtype),
                _smem_tile((_COMPUTE_WGS, blk, d), v.dtype),
                _smem_tile((slots, blk, d), q.dtype),
                _smem_tile((slots, blk, d), do.dtype),
                plgpu.SMEM((slots, blk), jnp.float32),
                plgpu.SMEM((slots, blk), jnp.float32),
            ),
            (
                *(plgpu.Barrier(num_barriers=_COMPUTE_WGS) for _ in range(2)),  # K, V
                *(plgpu.Barrier(num_barriers=slots) for _ in range(4)),  # Q, dO, lse, delta
                plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=slots),
            ),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        grid=(hkv, s // (_COMPUTE_WGS * blk), b),
        grid_names=("kv_heads", "kv_tiles", "batch"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **({"interpret": interpret} if interpret is not None else {}),
    )(q, k, v, do, lse2, delta)


def _dq_call(q, k, v, do, lse2, delta, scale: float, config: MgpuBackwardConfig, interpret):
    b, s, hq, d = q.shape
    groups = hq // k.shape[2]
    blk, slots = config.block, config.slots
    c = scale * _LOG2E

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, scoped):
        (q_smem, do_smem, lse_smem, delta_smem, k_ring, v_ring), bars = scoped
        (q_bar, do_bar, lse_bar, delta_bar), k_bar, v_bar, consumed = bars
        batch, head, tile = (lax.axis_index(n) for n in ("batch", "heads", "q_tiles"))
        kv_head = head // groups
        wg = lax.axis_index("wg")
        cta_base = tile * (_COMPUTE_WGS * blk)
        steps = (cta_base + _COMPUTE_WGS * blk) // blk  # K/V tiles up to the CTA's diagonal

        @pl.when(wg < _COMPUTE_WGS)
        def _compute() -> None:
            plgpu.set_max_registers(config.compute_registers, action="increase")
            q_base = cta_base + wg * blk
            rows = (batch, pl.ds(q_base, blk), head)
            stats = (batch, head, pl.ds(q_base, blk))
            own = ((q_ref, rows, q_smem, q_bar), (do_ref, rows, do_smem, do_bar))
            own += ((lse_ref, stats, lse_smem, lse_bar), (delta_ref, stats, delta_smem, delta_bar))
            for src, index, dst, bar in own:
                plgpu.copy_gmem_to_smem(src.at[index], dst.at[wg], bar.at[wg])
            for _, _, _, bar in own:
                plgpu.barrier_wait(bar.at[wg])
            lse = _load_stats(lse_smem.at[wg], plgpu.Layout.WGMMA.reduce(1), interpret)
            dlt = _load_stats(delta_smem.at[wg], plgpu.Layout.WGMMA.reduce(1), interpret)

            def body(step: Array, dq: Array, masked: bool) -> Array:
                slot = lax.rem(step, slots)
                plgpu.barrier_wait(k_bar.at[slot])
                s_ = _matmul(
                    q_smem.at[wg], k_ring.at[slot], (blk, blk), None, interpret, rhs_transposed=True
                )
                p = jnp.exp2(s_ * c - lax.broadcast_in_dim(lse, (blk, blk), [0]))
                if masked:
                    p = jnp.where(
                        _causal_mask((blk, blk), q_base, step * blk, True, interpret), p, 0.0
                    )
                plgpu.barrier_wait(v_bar.at[slot])
                dp = _matmul(
                    do_smem.at[wg],
                    v_ring.at[slot],
                    (blk, blk),
                    None,
                    interpret,
                    rhs_transposed=True,
                )
                ds = p * (dp - lax.broadcast_in_dim(dlt, (blk, blk), [0]))
                dq = _matmul(ds.astype(q.dtype), k_ring.at[slot], (blk, d), dq, interpret)
                plgpu.barrier_arrive(consumed.at[slot])
                return dq

            edge = steps - _COMPUTE_WGS  # the last tiles straddle (or pass) the diagonal
            dq = lax.fori_loop(0, edge, lambda i, a: body(i, a, False), _zeros((blk, d), interpret))
            dq = lax.fori_loop(edge, steps, lambda i, a: body(i, a, True), dq)
            q_smem.at[wg][...] = (dq * scale).astype(q.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == _COMPUTE_WGS)
        def _memory() -> None:
            plgpu.set_max_registers(config.memory_registers, action="decrease")

            def load(step: Array, slot: Array) -> None:
                tile_rows = (batch, pl.ds(step * blk, blk), kv_head)
                plgpu.copy_gmem_to_smem(k_ref.at[tile_rows], k_ring.at[slot], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[tile_rows], v_ring.at[slot], v_bar.at[slot])

            _feed_ring(load, steps, slots, consumed)

    def entry(*refs: Any) -> None:
        pl.run_scoped(
            lambda *scoped: kernel(*refs, scoped),
            (
                _smem_tile((_COMPUTE_WGS, blk, d), q.dtype),
                _smem_tile((_COMPUTE_WGS, blk, d), do.dtype),
                plgpu.SMEM((_COMPUTE_WGS, blk), jnp.float32),
                plgpu.SMEM((_COMPUTE_WGS, blk), jnp.float32),
                _smem_tile((slots, blk, d), k.dtype),
                _smem_tile((slots, blk, d), v.dtype),
            ),
            (
                tuple(plgpu.Barrier(num_barriers=_COMPUTE_WGS) for _ in range(4)),
                plgpu.Barrier(num_barriers=slots),
                plgpu.Barrier(num_barriers=slots),
                plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=slots),
            ),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(hq, s // (_COMPUTE_WGS * blk), b),
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **({"interpret": interpret} if interpret is not None else {}),
    )(q, k, v, do, lse2, delta)


def flash_backward_mgpu(
    q: Array,
    k: Array,
    v: Array,
    out: Array,
    lse: Array,
    d_out: Array,
    *,
    scale: float,
    config: MgpuBackwardConfig = MgpuBackwardConfig(),
    interpret: Any = None,
) -> tuple[Array, Array, Array]:
    """``(dq, dk, dv)`` of causal attention from the forward's ``out`` and ``lse``.

    ``q, out, d_out [B, S, Hq, D]``, ``k, v [B, S, Hkv, D]``, ``lse [B, Hq, S]`` (natural-log
    log-sum-exp of the scaled scores, float32). ``interpret``: a Mosaic GPU interpreter
    parameter object (tests on the CPU), or None to compile for the GPU.
    """
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    if k.shape != v.shape or k.shape[:2] != (b, s) or k.shape[3] != d or hq % hkv:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: need [B,S,Hq,D], [B,S,Hkv,D]")
    if s % (_COMPUTE_WGS * config.block):
        raise ValueError(f"S={s} must be a multiple of {_COMPUTE_WGS * config.block} (pad it)")
    if d not in (64, 128):
        raise ValueError(f"head_dim {d}: the Mosaic GPU backward handles 64 and 128")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"dtype {q.dtype}: the Mosaic GPU backward takes bf16 or f16")
    delta = jnp.einsum(
        "bshd,bshd->bhs", out.astype(jnp.float32), d_out.astype(jnp.float32)
    )  # rowsum(dO ⊙ O): a memory-bound XLA reduction
    lse2 = lse.astype(jnp.float32) * _LOG2E
    d_out = d_out.astype(q.dtype)
    dk, dv = _dkdv_call(q, k, v, d_out, lse2, delta, scale, config, interpret)
    dq = _dq_call(q, k, v, d_out, lse2, delta, scale, config, interpret)
    return dq, dk, dv
