"""``y = x·W_eᵀ + scale·(x·A_eᵀ)·B_eᵀ`` for rows grouped by expert: an MoE layer's projection.

A mixture-of-experts layer (Mixtral) sends each token to a few of its experts. Sorted by
expert, the rows of one projection form consecutive groups, one per expert, and each group
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

Layouts (lorax's base pytree, per layer): W is ``[E, N, K]`` dense, or ``[E, P, N/P, K]``
when the checkpoint stores the projection as P matrices per expert (Mixtral's gate and up,
``w1`` and ``w3``), or an :class:`~pallas_kernels.nf4.NF4Tensor` of batch ``(E,)`` or
``(E, P)``, each matrix quantized on its own (as bitsandbytes quantizes each checkpoint
matrix). A is ``[E, r, K]`` and B ``[E, N, r]``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.nf4 import NF4Tensor, dequantize_nf4

Array = jax.Array

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
# Contract over the ragged rows themselves: one [a, b] product per group (the factor grads).
_TN = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[],
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


def expert_lora_matmul(
    x: Array,
    w: Any,
    group_sizes: Array,
    a: Array | None = None,
    b: Array | None = None,
    scale: float = 1.0,
) -> Array:
    """``y [M, N]``: row block e of ``x [M, K]`` (``group_sizes[e]`` rows, in expert order)
    times expert e's ``W_eᵀ``, plus ``scale·(x·A_eᵀ)·B_eᵀ`` when a and b are given.

    Rows past ``sum(group_sizes)`` belong to no expert and come out as zeros.
    """
    _check(x, w, group_sizes, a, b)
    return _expert_matmul(float(scale) if a is not None else 0.0, x, w, group_sizes, a, b)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _expert_matmul(
    scale: float, x: Array, w: Any, group_sizes: Array, a: Array | None, b: Array | None
) -> Array:
    return _expert_matmul_fwd(scale, x, w, group_sizes, a, b)[0]


def _expert_matmul_fwd(
    scale: float, x: Array, w: Any, group_sizes: Array, a: Array | None, b: Array | None
) -> tuple[Array, tuple[Any, ...]]:
    cd = x.dtype
    y = _ragged(x, expert_weights(w, cd), group_sizes, _NT, cd)
    xa = None
    if a is not None:
        xa = _ragged(x, a.astype(cd), group_sizes, _NT, cd)  # [M, r]
        low = _ragged(xa, b.astype(cd), group_sizes, _NT, cd)
        y = (y.astype(jnp.float32) + scale * low.astype(jnp.float32)).astype(cd)
    return y, (x, xa, w, group_sizes, a, b)


def _expert_matmul_bwd(scale: float, res: tuple[Any, ...], dy: Array) -> tuple[Any, ...]:
    x, xa, w, group_sizes, a, b = res
    cd = x.dtype
    dy = dy.astype(cd)
    dx = _ragged(dy, expert_weights(w, cd), group_sizes, _NN, cd)
    da = db = None
    if a is not None:
        dyb = _ragged(dy, b.astype(cd), group_sizes, _NN, cd)  # [M, r]
        low = _ragged(dyb, a.astype(cd), group_sizes, _NN, cd)
        dx = (dx.astype(jnp.float32) + scale * low.astype(jnp.float32)).astype(cd)
        da = (scale * _ragged(dyb, x, group_sizes, _TN, jnp.float32)).astype(a.dtype)
        db = (scale * _ragged(dy, xa, group_sizes, _TN, jnp.float32)).astype(b.dtype)
    return dx, None, None, da, db


_expert_matmul.defvjp(_expert_matmul_fwd, _expert_matmul_bwd)
