"""``y = x·W_eᵀ + scale·(x·A_eᵀ)·B_eᵀ`` for rows grouped by expert: an MoE layer's projection.

A mixture-of-experts layer (Mixtral, Qwen 2/3 MoE) sends each token to a few of its experts.
Sorted by expert, the rows of one projection form consecutive groups, one per expert, and each group
multiplies its own frozen W_e (NF4 or dense) and LoRA factors A_e, B_e. The op is XLA's
grouped matmul (``lax.ragged_dot_general``) under the same contract as
:func:`pallas_kernels.nf4_lora_matmul`:

- the compute dtype is ``x.dtype``; W (decoded), A and B are cast to it and every product
  accumulates in float32; the rank-r intermediates are rounded to the compute dtype;
- gradients flow to x, A and B only, through a ``jax.custom_vjp`` whose residuals are x and
  the rank-r ``x·A_eᵀ``: the backward decodes W again instead of keeping a 16-bit copy of
  every expert (a whole Mixtral-8x7B layer's experts are 2.8 GB in bf16)::

      dx = dy·W_e + scale·(dy·B_e)·A_e    dA_e = scale·(dy·B_e)ᵀ·x    dB_e = scale·dyᵀ·(x·A_eᵀ)

  where each product runs over group e's rows only.

Implementations (``impl``): ``"xla"``, ``lax.ragged_dot_general``, which XLA's GPU backend
(jax 0.11.2) rewrites into a dense dot over zero-padded groups, E times the FLOPs: 91-101
TFLOP/s of useful work at Mixtral's shapes on an H200, where the bf16 dot of the same FLOPs
runs at 684-711 (BENCHMARKS.md §8); on a CPU it is the only one. ``"mosaic"``: jax's own
Mosaic GPU grouped-matmul kernel (``jax.experimental.pallas.ops.gpu.ragged_dot_mgpu``) for the
two large products (``x·W_eᵀ`` and ``dy·W_e``), reading W in its stored ``[E, N, K]``
orientation both ways: 552-612 TFLOP/s, 78-88% of that dot, at Mixtral's shapes with
:class:`MosaicRaggedConfig`'s tiles; 41-55% at Qwen 3 MoE's many small groups with
``MANY_EXPERTS_TILES`` (``default_tiles``). ``None`` picks ``"mosaic"`` on a Hopper GPU where
it applies (16-bit x, N and K multiples of 128), else ``"xla"``.

The rank-r LoRA products never run as a grouped matmul (XLA's GPU one would pad every group
to all rows). ``lora_products`` picks how they run instead: ``"dense"``, ordinary dots over
all experts' factors side by side (``[M, K] x [K, E·r]``, see ``_spread``): E times a rank-r
product per row, which is nothing beside the base GEMMs for Mixtral's 8 experts but more than
they cost for Qwen 3 MoE's 128; or ``"chunked"``, each expert's rows gathered into whole
chunks of ``CHUNK_ROWS`` (zero-padded), so that every chunk multiplies its own expert's
factors in one batched dot and the gradients of A and B are sums over chunks (see
``_chunk_rows``): rank-r work per row, plus the gathers. ``None`` picks by the expert count
(``MANY_EXPERTS``): at Qwen3-30B-A3B's shapes (128 experts, r=16, 8192 tokens) one MoE layer's
forward+backward took 15.0 ms with "dense", 8.2 ms with "chunked" and 5.6 ms without LoRA on
an H200, at Mixtral-8x7B's (8 experts) 25.1, 26.4 and 22.2 ms (BENCHMARKS.md §8).

Layouts (lorax's base pytree, per layer): W is ``[E, N, K]`` dense, or ``[E, P, N/P, K]``
when the checkpoint stores the projection as P matrices per expert (Mixtral's gate and up,
``w1`` and ``w3``), or an :class:`~pallas_kernels.nf4.NF4Tensor` of batch ``(E,)`` or
``(E, P)``, each matrix quantized on its own (as bitsandbytes quantizes each checkpoint
matrix). A is ``[E, r, K]`` and B ``[E, N, r]``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _backend
from pallas_kernels.nf4 import NF4Tensor, dequantize_nf4

Array = jax.Array
IMPLS = ("xla", "mosaic")
# Above this many experts the products are planned for many small groups: the LoRA products
# run "chunked" (the module docstring) and the Mosaic kernel takes ``MANY_EXPERTS_TILES``.
# Mixtral's 8 are below it, Qwen 3 MoE's 128 above.
MANY_EXPERTS = 16
CHUNK_ROWS = 64  # rows per chunk of one expert in the "chunked" layout


@dataclasses.dataclass(frozen=True)
class MosaicRaggedConfig:
    """Tiles of jax's Mosaic GPU grouped matmul (its ``ragged_dot`` arguments).

    The defaults won a sweep at Mixtral-8x7B's expert shapes on an H200 (``scripts/
    bench_moe.py``, BENCHMARKS.md §8): 582-611 TFLOP/s, 82-88% of the dense bf16 dot, where
    jax's example tiles (4 steps, ``grid_block_n=1``) ran at 454-465. ``grid_block_n`` is
    lowered to the largest of 4, 2, 1 that divides the output's column tiles.
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    max_concurrent_steps: int = 5
    grid_block_n: int = 4


# The tiles for many small groups (Qwen3-30B-A3B: 128 experts, ~512 rows each at 8192 tokens,
# K or N 768). The kernel runs one more row tile per group boundary, so half-height tiles waste
# less there, and wider ones keep each tile's work up. A sweep at those shapes on an H200
# (BENCHMARKS.md §8): 41-55% of the dense dot where the defaults ran 38-50% (the three
# orientations measured).
MANY_EXPERTS_TILES = MosaicRaggedConfig(block_m=64, block_n=256, max_concurrent_steps=4)


def default_tiles(num_experts: int, n: int, k: int) -> MosaicRaggedConfig:
    """The Mosaic kernel's tiles for ``num_experts`` groups of ``[N, K]`` matrices: the wide
    ones only where both output widths (N forward, K for dx) are multiples of theirs."""
    wide = MANY_EXPERTS_TILES
    fits = n % wide.block_n == 0 and k % wide.block_n == 0
    return wide if num_experts > MANY_EXPERTS and fits else MosaicRaggedConfig()


# Contract the rows' last axis with each expert matrix's last axis (x·W_eᵀ), or with its
# first (dy·W_e); the rows are ragged, the experts are the group axis.
_NT = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
)
_NN = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [1]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
)


def expert_weight_shape(w: Any) -> tuple[int, int, int]:
    """``(E, N, K)`` of an expert projection's weight in any of the module's layouts."""
    if isinstance(w, NF4Tensor):
        batch, (n, k) = w.batch_shape, w.shape
    else:
        batch, (n, k) = tuple(w.shape[:-2]), tuple(w.shape[-2:])
    if len(batch) not in (1, 2):
        raise ValueError(
            f"an expert weight is [E, N, K] or [E, P, N/P, K] (NF4: batch (E,) or (E, P)), "
            f"got batch {batch} of {n}x{k} matrices"
        )
    parts = batch[1] if len(batch) == 2 else 1
    return batch[0], parts * n, k


def expert_weights(w: Any, dtype: Any) -> Array:
    """The experts' matrices ``[E, N, K]`` in ``dtype`` (NF4 decoded, parts concatenated)."""
    e, n, k = expert_weight_shape(w)
    dense = dequantize_nf4(w, dtype) if isinstance(w, NF4Tensor) else w.astype(dtype)
    return dense.reshape(e, n, k)


def _check(x: Array, w: Any, group_sizes: Array, a: Any, b: Any) -> None:
    e, n, k = expert_weight_shape(w)
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, K={k}] for experts of shape {(e, n, k)}, got {x.shape}")
    if group_sizes.shape != (e,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        got = f"{group_sizes.dtype}{list(group_sizes.shape)}"
        raise ValueError(f"group_sizes must be int[{e}], got {got}")
    if (a is None) != (b is None):
        raise ValueError("pass both LoRA factors a and b, or neither")
    if a is not None:
        r = a.shape[-2]
        if a.shape != (e, r, k) or b.shape != (e, n, r):
            raise ValueError(
                f"LoRA factors must be a [E={e}, r, K={k}] and b [E={e}, N={n}, r], "
                f"got a {a.shape} and b {b.shape}"
            )


def mosaic_applies(dtype: Any, n: int, k: int) -> str | None:
    """Why the Mosaic GPU kernel cannot take ``[M, K] x [E, N, K]`` both ways, or None."""
    if not _backend.on_hopper():
        return "not on a Hopper GPU"
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return f"x is {jnp.dtype(dtype)} (the kernel takes bfloat16 or float16)"
    if n % 128 or k % 128:  # each is the output width of one orientation (block_n tiles)
        return f"N={n} and K={k} must be multiples of 128"
    return None


def resolve_impl(impl: str | None, dtype: Any, n: int, k: int) -> str:
    """The implementation a call gets (see the module docstring)."""
    if impl not in (None, *IMPLS):
        raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}")
    why = mosaic_applies(dtype, n, k)
    if impl == "mosaic" and why is not None:
        raise ValueError(f"impl='mosaic' cannot run here: {why}")
    return impl or ("xla" if why is not None else "mosaic")


def resolve_lora_products(lora_products: str | None, num_experts: int) -> str:
    """How a call's rank-r LoRA products run (see the module docstring)."""
    if lora_products not in (None, *LORA_PRODUCTS):
        raise ValueError(
            f"lora_products must be one of {LORA_PRODUCTS} or None, got {lora_products!r}"
        )
    return lora_products or ("dense" if num_experts <= MANY_EXPERTS else "chunked")


def expert_lora_matmul(
    x: Array,
    w: Any,
    group_sizes: Array,
    a: Array | None = None,
    b: Array | None = None,
    scale: float = 1.0,
    *,
    impl: str | None = None,
    config: MosaicRaggedConfig | None = None,
    lora_products: str | None = None,
) -> Array:
    """``y [M, N]``: row block e of ``x [M, K]`` (``group_sizes[e]`` rows, in expert order)
    times expert e's ``W_eᵀ``, plus ``scale·(x·A_eᵀ)·B_eᵀ`` when a and b are given.

    The groups must cover the rows (``sum(group_sizes) == M``); with ``impl="xla"`` rows past
    the sum come out as zeros.
    """
    _check(x, w, group_sizes, a, b)
    e, n, k = expert_weight_shape(w)
    plan = _Plan(
        resolve_impl(impl, x.dtype, n, k),
        config or default_tiles(e, n, k),
        resolve_lora_products(lora_products, e),
    )
    return _expert_matmul(plan, float(scale) if a is not None else 0.0, x, w, group_sizes, a, b)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a call runs (static): the weight products' implementation and tiles, and how the
    LoRA products run."""

    impl: str
    config: MosaicRaggedConfig
    lora_products: str


def expert_lora_matmul_reference(
    x: Array,
    w: Any,
    expert_ids: Array,
    a: Array | None = None,
    b: Array | None = None,
    scale: float = 1.0,
) -> Array:
    """The definition, one row at a time: row m times expert ``expert_ids[m]``'s matrices
    (gathered per row, so only for small tests; gradients by autodiff)."""
    cd = x.dtype
    wd = expert_weights(jax.tree.map(lax.stop_gradient, w), cd)[expert_ids]
    y = jnp.einsum("mk,mnk->mn", x, wd, preferred_element_type=jnp.float32).astype(cd)
    if a is None:
        return y
    xa = jnp.einsum("mk,mrk->mr", x, a.astype(cd)[expert_ids], preferred_element_type=jnp.float32)
    low = jnp.einsum(
        "mr,mnr->mn", xa.astype(cd), b.astype(cd)[expert_ids], preferred_element_type=jnp.float32
    )
    return (y.astype(jnp.float32) + scale * low.astype(cd).astype(jnp.float32)).astype(cd)


def _ragged(lhs: Array, rhs: Array, group_sizes: Array, dims: Any, dtype: Any) -> Array:
    return lax.ragged_dot_general(
        lhs, rhs, group_sizes, dims, preferred_element_type=jnp.float32
    ).astype(dtype)


def _weight_product(plan: Any, lhs: Array, w: Array, group_sizes: Array, dims: Any) -> Array:
    """``lhs·W_eᵀ`` (``dims=_NT``) or ``lhs·W_e`` (``_NN``) per group, in ``lhs.dtype``."""
    impl, config = plan.impl, plan.config
    if impl == "xla":
        return _ragged(lhs, w, group_sizes, dims, lhs.dtype)
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    out_columns = w.shape[1] if dims is _NT else w.shape[2]
    tiles = -(-out_columns // config.block_n)
    grid_block_n = next(g for g in (config.grid_block_n, 4, 2, 1) if tiles % g == 0)
    return ragged_dot_mgpu.ragged_dot(
        lhs,
        w,
        group_sizes=group_sizes,
        transpose_rhs=dims is _NT,
        **dataclasses.asdict(dataclasses.replace(config, grid_block_n=grid_block_n)),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _expert_matmul(
    plan: Any,
    scale: float,
    x: Array,
    w: Any,
    group_sizes: Array,
    a: Array | None,
    b: Array | None,
) -> Array:
    return _expert_matmul_fwd(plan, scale, x, w, group_sizes, a, b)[0]


def _expert_matmul_fwd(
    plan: Any,
    scale: float,
    x: Array,
    w: Any,
    group_sizes: Array,
    a: Array | None,
    b: Array | None,
) -> tuple[Array, tuple[Any, ...]]:
    cd = x.dtype
    y = _weight_product(plan, x, expert_weights(w, cd), group_sizes, _NT)
    xa = None
    if a is not None:
        low, xa = _LORA[plan.lora_products].forward(x, a, b, group_sizes, cd)
        y = (y.astype(jnp.float32) + scale * low.astype(jnp.float32)).astype(cd)
    return y, (x, xa, w, group_sizes, a, b)


def _expert_matmul_bwd(plan: Any, scale: float, res: tuple[Any, ...], dy: Array) -> tuple[Any, ...]:
    x, xa, w, group_sizes, a, b = res
    cd = x.dtype
    dy = dy.astype(cd)
    dx = _weight_product(plan, dy, expert_weights(w, cd), group_sizes, _NN)
    da = db = None
    if a is not None:
        low, da, db = _LORA[plan.lora_products].backward(x, xa, dy, a, b, group_sizes, cd)
        dx = (dx.astype(jnp.float32) + scale * low.astype(jnp.float32)).astype(cd)
        da, db = (scale * da).astype(a.dtype), (scale * db).astype(b.dtype)
    return dx, None, None, da, db


# The rank-r LoRA products. Each way computes, in the compute dtype ``cd`` with float32
# accumulation and the same rounding points:
#   forward:  low = (x·A_eᵀ)·B_eᵀ [M, N], and xa = x·A_eᵀ [M, r] (the backward's residual);
#   backward: low = (dy·B_e)·A_e [M, K], dA_e = (dy·B_e)ᵀ·x and dB_e = dyᵀ·xa in float32
#             (unscaled; the caller scales).
_NT2 = (((1,), (1,)), ((), ()))
_NN2 = (((1,), (0,)), ((), ()))
_TN2 = (((0,), (0,)), ((), ()))


def _dot(lhs: Array, rhs: Array, dims: Any) -> Array:
    return lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32)


class _DenseLora:
    """All experts' factors side by side (``[M, K] x [K, E·r]``): one cuBLAS dot each, E
    times a rank-r product's FLOPs. Each row then keeps its own expert's r columns
    (``_own``), or has its r values spread into its expert's slot of E·r zeros (``_spread``),
    so that the other experts' factors see zeros."""

    @staticmethod
    def forward(x, a, b, group_sizes, cd):
        slots = _expert_slots(group_sizes, x.shape[0], cd)
        e, r, _ = a.shape
        xa = _own(_dot(x, a.astype(cd).reshape(e * r, -1), _NT2), slots, cd)  # [M, r]
        return _dot(_spread(xa, slots), _factor_columns(b, cd), _NT2).astype(cd), xa

    @staticmethod
    def backward(x, xa, dy, a, b, group_sizes, cd):
        slots = _expert_slots(group_sizes, x.shape[0], cd)
        e, r, k = a.shape
        dyb = _spread(_own(_dot(dy, _factor_columns(b, cd), _NN2), slots, cd), slots)
        low = _dot(dyb, a.astype(cd).reshape(e * r, k), _NN2).astype(cd)
        da = _dot(dyb, x, _TN2).reshape(e, r, k)
        db = _dot(dy, _spread(xa, slots), _TN2).reshape(-1, e, r).transpose(1, 0, 2)  # [E, N, r]
        return low, da, db


def _expert_slots(group_sizes: Array, rows: int, dtype: Any) -> Array:
    """``[M, E]`` one-hot of each row's expert (all zeros past ``sum(group_sizes)``)."""
    ends = jnp.cumsum(group_sizes)
    expert = jnp.searchsorted(ends, jnp.arange(rows, dtype=ends.dtype), side="right")
    return jax.nn.one_hot(expert, group_sizes.shape[0], dtype=dtype)


def _own(columns: Array, slots: Array, dtype: Any) -> Array:
    """``[M, E·r]`` -> ``[M, r]``: each row's own expert's columns."""
    m, e = slots.shape
    per_expert = columns.reshape(m, e, -1)
    return jnp.einsum("mer,me->mr", per_expert, slots.astype(per_expert.dtype)).astype(dtype)


def _spread(v: Array, slots: Array) -> Array:
    """``[M, r]`` -> ``[M, E·r]``: each row's values in its expert's slot, zeros elsewhere."""
    m, e = slots.shape
    return (slots[:, :, None] * v[:, None, :]).reshape(m, -1)


def _factor_columns(b: Array, dtype: Any) -> Array:
    """B ``[E, N, r]`` as ``[N, E·r]``: expert e's columns at ``e·r:(e+1)·r``."""
    e, n, r = b.shape
    return b.astype(dtype).transpose(1, 0, 2).reshape(n, e * r)


@dataclasses.dataclass(frozen=True)
class _Chunks:
    """Each expert's rows laid out as whole chunks of C rows (see ``_chunk_rows``)."""

    index: Array  # [P, C]: the row each chunk slot holds (M: padding, reads as zeros)
    expert: Array  # [P]: the expert all rows of a chunk belong to
    position: Array  # [M]: each row's slot in the flattened chunks (P·C: none, reads zeros)


def _chunk_rows(group_sizes: Array, rows: int, chunk: int = CHUNK_ROWS) -> _Chunks:
    """The chunked layout of ``rows`` rows in expert groups: group e padded up to a multiple
    of ``chunk`` rows, so every chunk is one expert's. ``P = ceil(M / C) + E`` chunks bound
    the padded groups for any group sizes (each adds at most one partial chunk)."""
    e = group_sizes.shape[0]
    p = -(-rows // chunk) + e
    sizes = group_sizes.astype(jnp.int32)
    padded = -(-sizes // chunk) * chunk
    starts, padded_starts = jnp.cumsum(sizes) - sizes, jnp.cumsum(padded) - padded

    def locate(i: Array, ends: Array, group_starts: Array) -> tuple[Array, Array, Array]:
        group = jnp.searchsorted(ends, i, side="right")  # e past the last group
        inside = jnp.minimum(group, e - 1)
        return group < e, inside, i - group_starts[inside]

    slot = jnp.arange(p * chunk, dtype=jnp.int32)
    in_group, slot_expert, offset = locate(slot, jnp.cumsum(padded), padded_starts)
    holds_row = in_group & (offset < sizes[slot_expert])
    index = jnp.where(holds_row, starts[slot_expert] + offset, rows)
    row = jnp.arange(rows, dtype=jnp.int32)
    in_group, row_expert, offset = locate(row, jnp.cumsum(sizes), starts)
    position = jnp.where(in_group, padded_starts[row_expert] + offset, p * chunk)
    return _Chunks(index.reshape(p, chunk), slot_expert.reshape(p, chunk)[:, 0], position)


def _take(v: Array, index: Array) -> Array:
    """Rows of ``v`` at ``index`` (any shape); out-of-range indices read zeros."""
    return jnp.take(v, index, axis=0, mode="fill", fill_value=0)


class _ChunkedLora:
    """Every chunk multiplies its own expert's factors (gathered per chunk) in one batched
    dot: rank-r work per row, whatever E. The chunk results go back to the rows by gather;
    the factors' gradients are sums of per-chunk products over each expert's chunks."""

    @staticmethod
    def forward(x, a, b, group_sizes, cd):
        c = _chunk_rows(group_sizes, x.shape[0])
        rank, n = a.shape[1], b.shape[1]
        xa = jnp.einsum(
            "pck,prk->pcr", _take(x, c.index), a.astype(cd)[c.expert],
            preferred_element_type=jnp.float32,
        ).astype(cd)  # fmt: skip
        low = jnp.einsum(
            "pcr,pnr->pcn", xa, b.astype(cd)[c.expert], preferred_element_type=jnp.float32
        ).astype(cd)
        return _take(low.reshape(-1, n), c.position), _take(xa.reshape(-1, rank), c.position)

    @staticmethod
    def backward(x, xa, dy, a, b, group_sizes, cd):
        c = _chunk_rows(group_sizes, x.shape[0])
        e, _, k = a.shape
        x_c, dy_c, xa_c = _take(x, c.index), _take(dy, c.index), _take(xa, c.index)
        dyb = jnp.einsum(
            "pcn,pnr->pcr", dy_c, b.astype(cd)[c.expert], preferred_element_type=jnp.float32
        ).astype(cd)
        low = jnp.einsum(
            "pcr,prk->pck", dyb, a.astype(cd)[c.expert], preferred_element_type=jnp.float32
        ).astype(cd)
        da = jnp.einsum("pcr,pck->prk", dyb, x_c, preferred_element_type=jnp.float32)
        db = jnp.einsum("pcn,pcr->pnr", dy_c, xa_c, preferred_element_type=jnp.float32)
        # Each expert's sum over its chunks as a dot with the chunks' one-hot experts: exact
        # in float32 accumulation and deterministic, where a scatter-add may use atomics.
        owner = jax.nn.one_hot(c.expert, e, dtype=jnp.float32)  # [P, E]
        return (
            _take(low.reshape(-1, k), c.position),
            jnp.einsum("pe,prk->erk", owner, da),
            jnp.einsum("pe,pnr->enr", owner, db),
        )


# How the LoRA products can run, by ``lora_products`` name.
_LORA = {"dense": _DenseLora, "chunked": _ChunkedLora}
LORA_PRODUCTS = tuple(_LORA)


_expert_matmul.defvjp(_expert_matmul_fwd, _expert_matmul_bwd)
