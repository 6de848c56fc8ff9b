"""Learning-rate schedules and optimizers, including bitsandbytes-style 8-bit AdamW.

:func:`adamw_8bit` keeps Adam's two moments block-wise quantised to one byte each, as
bitsandbytes' ``Adam8bit`` does (Dettmers et al., "8-bit Optimizers via Block-wise
Quantization", 2022): the first moment with the signed dynamic code, the second with
the unsigned one, blocks of 256 values sharing one f32 ``absmax``. State is ~2 bytes
per parameter instead of 8. Every step dequantises, updates the moments in f32,
computes the Adam update from the f32 moments and re-quantises with nearest rounding.
All state is plain arrays in NamedTuples, so it jits, shards and checkpoints like any
other optax state.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import Array

ScheduleKind = Literal["constant", "linear", "cosine"]
OptimizerName = Literal["adamw", "adamw_8bit"]

BLOCK_SIZE = 256
"""Values per quantisation block (bitsandbytes' blockwise optimizers use 256)."""

MIN_8BIT_SIZE = 4096
"""Leaves with fewer elements keep f32 moments (bitsandbytes' ``min_8bit_size``)."""


# --------------------------------------------------------------------------- schedules


def make_schedule(
    kind: ScheduleKind,
    peak_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> optax.Schedule:
    """Linear warmup from 0 to ``peak_lr``, then constant, linear or cosine decay.

    Follows the Hugging Face convention: ``lr(0) = 0``, ``lr(warmup_steps) = peak_lr``
    and, for the decaying kinds, ``lr(total_steps) = min_lr_ratio * peak_lr``, held
    there afterwards. Step ``s`` is the optimizer's update count (0 for the first update).
    """
    if kind not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown schedule kind {kind!r}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps})")
    end_lr = peak_lr * min_lr_ratio
    decay_steps = total_steps - warmup_steps
    if kind == "constant" or decay_steps == 0:
        decay = optax.constant_schedule(peak_lr if kind == "constant" else end_lr)
    elif kind == "linear":
        decay = optax.linear_schedule(peak_lr, end_lr, decay_steps)
    else:
        decay = optax.cosine_decay_schedule(peak_lr, decay_steps, alpha=min_lr_ratio)
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak_lr, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


# --------------------------------------------------------------------------- optimizers


def make_optimizer(
    name: OptimizerName,
    learning_rate: float | optax.Schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """Global-norm gradient clipping (when ``max_grad_norm`` is set) followed by AdamW."""
    if name == "adamw":
        opt = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    elif name == "adamw_8bit":
        opt = adamw_8bit(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {name!r}; expected 'adamw' or 'adamw_8bit'")
    if max_grad_norm is None:
        return opt
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), opt)


def adamw_8bit(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    block_size: int = BLOCK_SIZE,
    min_8bit_size: int = MIN_8BIT_SIZE,
) -> optax.GradientTransformation:
    """AdamW with 8-bit block-wise quantised moments; a drop-in for ``optax.adamw``.

    Weight decay is decoupled (``p <- p - lr * (adam_update + weight_decay * p)``), the
    same as ``optax.adamw`` and bitsandbytes' ``AdamW8bit``. ``mask`` selects the leaves
    that are decayed, as in optax.
    """
    return optax.chain(
        scale_by_adam_8bit(b1, b2, eps, block_size=block_size, min_8bit_size=min_8bit_size),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


class QuantizedArray(NamedTuple):
    """An f32 array stored as one byte per value plus one f32 scale per block.

    ``value[i] ≈ code[codes[i]] * absmax[i // block_size]`` over the flattened array,
    where ``code`` is a 256-entry table in ``[-1, 1]`` (see :func:`dynamic_code`).
    ``codes`` keeps the original shape so it shards like the parameter it belongs to.
    """

    codes: Array  # uint8, shape of the original array
    absmax: Array  # f32 [ceil(size / block_size)]


Moment = Array | QuantizedArray
"""One leaf's moment: 8-bit for large leaves, f32 for small ones."""


class ScaleByAdam8bitState(NamedTuple):
    """State of :func:`scale_by_adam_8bit`.

    ``mu`` and ``nu`` mirror the parameter tree; each leaf position holds a
    :class:`QuantizedArray` (large leaves) or an f32 array (leaves smaller than
    ``min_8bit_size``).
    """

    count: Array  # int32 []
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    block_size: int = BLOCK_SIZE,
    min_8bit_size: int = MIN_8BIT_SIZE,
) -> optax.GradientTransformation:
    """``optax.scale_by_adam`` whose moments live in 8 bits between steps.

    The update of a step is computed from the f32 moments *before* they are
    re-quantised, so quantisation error enters only through the stored history, as in
    bitsandbytes. Updates come back in the gradient's dtype.
    """
    signed = dynamic_code(signed=True)
    unsigned = dynamic_code(signed=False)

    def init_moment(param: Array, code: np.ndarray) -> Moment:
        shape = jnp.shape(param)
        if math.prod(shape) < min_8bit_size:
            return jnp.zeros(shape, jnp.float32)
        return zeros_blockwise(shape, code, block_size)

    def load(moment: Moment, code: np.ndarray) -> Array:
        if isinstance(moment, QuantizedArray):
            return dequantize_blockwise(moment, code, block_size)
        return moment

    def store(value: Array, like: Moment, code: np.ndarray) -> Moment:
        """Re-encode ``value`` the way the previous moment ``like`` was stored."""
        if isinstance(like, QuantizedArray):
            return quantize_blockwise(value, code, block_size)
        return value

    def init_fn(params: optax.Params) -> ScaleByAdam8bitState:
        return ScaleByAdam8bitState(
            count=jnp.zeros((), jnp.int32),
            mu=jax.tree.map(lambda p: init_moment(p, signed), params),
            nu=jax.tree.map(lambda p: init_moment(p, unsigned), params),
        )

    def update_fn(
        updates: optax.Updates, state: ScaleByAdam8bitState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ScaleByAdam8bitState]:
        del params
        count = optax.safe_int32_increment(state.count)
        step = count.astype(jnp.float32)
        bias_correction1 = 1.0 - b1**step
        bias_correction2 = 1.0 - b2**step

        def leaf(grad: Array, mu: Moment, nu: Moment) -> tuple[Array, Moment, Moment]:
            g = grad.astype(jnp.float32)
            m = b1 * load(mu, signed) + (1.0 - b1) * g
            v = b2 * load(nu, unsigned) + (1.0 - b2) * jnp.square(g)
            update = (m / bias_correction1) / (jnp.sqrt(v / bias_correction2) + eps)
            return update.astype(grad.dtype), store(m, mu, signed), store(v, nu, unsigned)

        # ``updates`` is a tree prefix of ``mu``/``nu`` (whose leaf positions may hold a
        # QuantizedArray), so flattening up to it pairs each gradient with its moments.
        grads, treedef = jax.tree.flatten(updates)
        mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
        new = [leaf(g, m, v) for g, m, v in zip(grads, mus, nus, strict=True)]
        new_updates, mu, nu = (treedef.unflatten([x[i] for x in new]) for i in range(3))
        return new_updates, ScaleByAdam8bitState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def optimizer_state_bytes(state: Any) -> int:
    """Bytes held by the arrays of an optimizer state (or any pytree of arrays/shapes)."""
    return sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))


# --------------------------------------------------------------------------- quantisation


@functools.cache
def dynamic_code(signed: bool) -> np.ndarray:
    """bitsandbytes' 8-bit dynamic quantisation code: 256 sorted f32 values in [-1, 1].

    A dynamic-exponent float format (Dettmers, 2016): for decades ``10**-6 .. 10**0``
    the fraction bits left after the exponent index a linear grid on ``[0.1, 1]``, so
    small magnitudes keep relative precision, which matters for Adam's second moment.
    Each decade ``e`` contributes the midpoints of ``2**e + 1`` (signed, mirrored about
    0) or ``2**(e + 1) + 1`` (unsigned) evenly spaced points; 0 and 1 are added.
    This is ``bitsandbytes.functional.create_dynamic_map(signed)`` with its defaults
    (7 exponent bits, 8 bits total), equal to it up to f32 rounding (relative 2e-7).
    """
    values = [0.0, 1.0]
    for decade in range(7):
        num_points = 2**decade + 1 if signed else 2 ** (decade + 1) + 1
        edges = np.linspace(0.1, 1.0, num_points, dtype=np.float32)
        midpoints = 10.0 ** (decade - 6) * ((edges[:-1] + edges[1:]) / 2).astype(np.float64)
        values.extend(midpoints)
        if signed:
            values.extend(-midpoints)
    code = np.sort(np.asarray(values, np.float32))
    assert code.shape == (256,), code.shape
    code.setflags(write=False)
    return code


def quantize_blockwise(x: Array, code: np.ndarray, block_size: int = BLOCK_SIZE) -> QuantizedArray:
    """Quantise ``x`` to the nearest entry of ``code`` after scaling each block of
    ``block_size`` values (over the flattened array) by its absolute maximum."""
    blocks = _to_blocks(jnp.asarray(x, jnp.float32), block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    scaled = blocks / jnp.where(absmax > 0, absmax, 1.0)[:, None]
    codes = _nearest_index(scaled, code).astype(jnp.uint8)
    return QuantizedArray(codes=_from_blocks(codes, jnp.shape(x)), absmax=absmax)


def zeros_blockwise(
    shape: tuple[int, ...], code: np.ndarray, block_size: int = BLOCK_SIZE
) -> QuantizedArray:
    """The quantised form of ``zeros(shape)``, built without running the quantiser."""
    zero = int(np.flatnonzero(code == 0)[0])
    num_blocks = -(-math.prod(shape) // block_size)
    return QuantizedArray(
        codes=jnp.full(shape, zero, jnp.uint8), absmax=jnp.zeros((num_blocks,), jnp.float32)
    )


def dequantize_blockwise(
    q: QuantizedArray, code: np.ndarray, block_size: int = BLOCK_SIZE
) -> Array:
    """Inverse of :func:`quantize_blockwise` (up to rounding): f32, shape of ``q.codes``."""
    values = jnp.asarray(code).at[q.codes].get(mode="promise_in_bounds")
    return _from_blocks(_to_blocks(values, block_size) * q.absmax[:, None], q.codes.shape)


def _nearest_index(x: Array, code: np.ndarray) -> Array:
    """Index of the entry of the sorted 256-entry ``code`` nearest to each value of ``x``.

    That index is the number of midpoints between adjacent entries that lie below the
    value, found by an unrolled, branch-free binary search: one small table gather per
    bit, which XLA fuses into a single elementwise pass (``jnp.searchsorted`` compiles
    several times slower here, and its first gather, at a constant index, gets
    constant-folded over the whole array).
    """
    midpoints = (code[:-1] + code[1:]) / 2
    table = jnp.asarray(np.append(midpoints, np.inf).astype(np.float32))
    half = len(code) // 2
    index = jnp.where(x > midpoints[half - 1], half, 0)
    step = half // 2
    while step:
        pivot = table.at[index + step - 1].get(mode="promise_in_bounds")
        index = jnp.where(pivot < x, index + step, index)
        step //= 2
    return index


def _to_blocks(x: Array, block_size: int) -> Array:
    flat = x.reshape(-1)
    pad = -flat.size % block_size
    return jnp.pad(flat, (0, pad)).reshape(-1, block_size)


def _from_blocks(blocks: Array, shape: tuple[int, ...]) -> Array:
    return blocks.reshape(-1)[: math.prod(shape)].reshape(shape)
