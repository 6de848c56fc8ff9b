"""Causal-LM cross-entropy that never materialises the full ``[tokens, vocab]`` logits.

With a 128k vocabulary, the logits of 8k tokens are 4 GiB in f32 and autodiff keeps
them (plus the softmax cotangent) alive across the backward pass: more than the whole
LoRA model state. :func:`chunked_cross_entropy` instead projects ``chunk_size`` tokens
at a time through the LM head inside a ``lax.scan``, under a ``jax.custom_vjp`` that
decides what the backward pass needs. Peak memory is then ``O(chunk_size * vocab)``,
whichever of its two modes is used:

* ``lm_head_grad=True`` (the general case): the backward pass recomputes each chunk's
  logits, since the LM head gradient needs the softmax of every chunk against the
  hidden states and storing it is what we set out to avoid. The residuals are the
  inputs plus one f32 log-sum-exp per token; the cost is three vocab-sized matmuls per
  chunk (logits, recomputed logits, then the hidden gradient; the LM head gradient is a
  fourth when it is wanted).
* ``lm_head_grad=False`` (LoRA: the head is frozen): the hidden-state gradient is the
  only one needed, and the loss is a scalar, so the gradient for a unit cotangent is
  computed in the forward pass while each chunk's softmax is at hand and the backward
  pass merely scales it. That saves the recomputation, a third of the loss's FLOPs
  (``2 * T * D * V``; 8.6 TFLOP, ~2% of a step, for Llama-3 8B at 8k tokens), and the
  residual is the ``[T, D]`` hidden gradient in place of the ``[T, D]`` hidden states.
  Evaluating the loss without differentiating it still does only the logits matmul.

Every function here returns a *sum* of per-token losses and the number of target
tokens; dividing is the caller's job (:func:`mean_loss`). That keeps gradient
accumulation exact: summing ``(loss_sum, count)`` over k micro-batches and dividing
once gives the same loss, and the same gradient, as one batch k times larger.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import Array

from lorax.model import softcap_logits

IGNORE_INDEX = -100
"""Label value that contributes no loss (Hugging Face / PyTorch convention)."""

_CHUNK_ALIGN = 16
"""Chunks are rounded up to a multiple of this, to keep matmul tiles well shaped."""


def shift_labels(labels: Array, segment_ids: Array | None = None) -> Array:
    """Align next-token targets with the positions that predict them.

    Position ``t`` is trained to predict ``labels[..., t + 1]``. The last position has
    no successor, and in packed rows a position whose successor belongs to another
    segment (another document) must not be trained to predict it; both become
    :data:`IGNORE_INDEX`.

    Args:
      labels: ``[..., S]`` integer labels, :data:`IGNORE_INDEX` where masked.
      segment_ids: optional ``[..., S]`` document ids of packed rows.

    Returns:
      ``[..., S]`` int32 targets, one per position.
    """
    labels = jnp.asarray(labels, jnp.int32)
    ignore = jnp.full_like(labels[..., :1], IGNORE_INDEX)
    shifted = jnp.concatenate([labels[..., 1:], ignore], axis=-1)
    if segment_ids is None:
        return shifted
    same_segment = segment_ids[..., 1:] == segment_ids[..., :-1]
    keep = jnp.concatenate([same_segment, jnp.zeros_like(same_segment[..., :1])], axis=-1)
    return jnp.where(keep, shifted, IGNORE_INDEX)


def mean_loss(loss_sum: Array, count: Array) -> Array:
    """Mean loss per target token; 0 (not NaN) when there are no targets."""
    count = jnp.asarray(count, jnp.float32)
    return jnp.asarray(loss_sum, jnp.float32) / jnp.maximum(count, 1.0)


def cross_entropy_reference(
    hidden: Array,
    lm_head: Array,
    labels: Array,
    *,
    chunk_size: int = 2048,
    softcap: float | None = None,
    z_loss: float = 0.0,
) -> tuple[Array, Array]:
    """Dense cross-entropy: the specification :func:`chunked_cross_entropy` is tested against.

    Materialises all ``[T, V]`` logits and relies on autodiff. ``chunk_size`` is
    accepted (and ignored) so the two functions are interchangeable.
    """
    del chunk_size
    hidden, labels = _flatten(hidden, labels)
    valid = labels != IGNORE_INDEX
    logits = _logits(hidden, lm_head, softcap)
    per_token, _ = _token_losses(logits, labels, z_loss)
    return jnp.sum(jnp.where(valid, per_token, 0.0)), jnp.sum(valid, dtype=jnp.int32)


def chunked_cross_entropy(
    hidden: Array,
    lm_head: Array,
    labels: Array,
    *,
    chunk_size: int = 2048,
    softcap: float | None = None,
    z_loss: float = 0.0,
    lm_head_grad: bool = True,
) -> tuple[Array, Array]:
    """Summed next-token cross-entropy, computed ``chunk_size`` tokens at a time.

    Args:
      hidden: ``[T, D]`` final (already normalised) hidden states, bf16 or f32; cast to
        ``lm_head``'s dtype for the matmul. Extra leading axes (``[B, S, D]``) are
        flattened.
      lm_head: ``[V, D]`` output projection in Hugging Face layout (the tied embedding
        when embeddings are tied).
      labels: ``[T]`` int targets, already shifted (see :func:`shift_labels`);
        :data:`IGNORE_INDEX` marks positions without a target.
      chunk_size: upper bound on tokens per chunk; peak memory is about
        ``chunk_size * V * 4`` bytes for each of the few live f32 chunk buffers.
      softcap: if set, logits become ``softcap * tanh(logits / softcap)`` (Gemma 2's
        ``final_logit_softcapping``).
      z_loss: weight of the auxiliary ``logsumexp(logits) ** 2`` term per target token
        (PaLM's z-loss), which keeps the softmax normaliser near 1.
      lm_head_grad: whether ``lm_head`` gets its true gradient. ``False`` is for a
        frozen head (LoRA): the hidden-state gradient is then computed during the
        forward pass of a differentiated call, which spares the backward pass from
        recomputing the logits (two vocab-sized matmuls per chunk instead of three),
        and ``lm_head`` gets a **zero** gradient, so it must not be a trained
        parameter. Without differentiation both modes compute the same thing.

    Returns:
      ``(loss_sum, count)``: the f32 sum over target tokens of cross-entropy plus
      z-loss, and the int32 number of target tokens. Differentiable w.r.t. ``hidden``
      and (unless ``lm_head_grad=False``) ``lm_head``; when only ``hidden`` needs a
      gradient with ``lm_head_grad=True``, the ``lm_head`` gradient is dead code and XLA
      removes it, but the logits are still computed twice.
    """
    hidden, labels = _flatten(hidden, labels)
    num_tokens = hidden.shape[0]
    num_chunks, chunk = _plan_chunks(num_tokens, chunk_size)
    pad = num_chunks * chunk - num_tokens
    if pad:
        hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
        labels = jnp.pad(labels, (0, pad), constant_values=IGNORE_INDEX)
    # Chunk i holds tokens i, i + N, i + 2N, ... (a strided split): when the tokens are
    # sharded across devices, every chunk then spans all shards and the scan over
    # chunks stays data-parallel. The loss is a sum, so token order is irrelevant.
    loss_fn = _chunked_loss_sum if lm_head_grad else _chunked_loss_sum_frozen_head
    loss_sum = loss_fn(
        hidden.reshape(chunk, num_chunks, -1).swapaxes(0, 1),
        lm_head,
        labels.reshape(chunk, num_chunks).swapaxes(0, 1),
        softcap,
        float(z_loss),
    )
    return loss_sum, jnp.sum(labels != IGNORE_INDEX, dtype=jnp.int32)


# --------------------------------------------------------------------------- internals


def _flatten(hidden: Array, labels: Array) -> tuple[Array, Array]:
    hidden = jnp.asarray(hidden)
    labels = jnp.asarray(labels, jnp.int32)
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {hidden.shape} and labels {labels.shape} disagree on tokens")
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)


def _plan_chunks(num_tokens: int, chunk_size: int) -> tuple[int, int]:
    """Split ``num_tokens`` into equal chunks of at most ``chunk_size`` (rounded up to
    :data:`_CHUNK_ALIGN`), so padding is a few rows rather than up to a whole chunk."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    num_tokens = max(num_tokens, 1)
    num_chunks = math.ceil(num_tokens / chunk_size)
    chunk = math.ceil(num_tokens / num_chunks)
    if num_chunks > 1:
        chunk = min(chunk_size, _CHUNK_ALIGN * math.ceil(chunk / _CHUNK_ALIGN))
    return num_chunks, chunk


def _logits(hidden: Array, lm_head: Array, softcap: float | None) -> Array:
    """``hidden @ lm_head.T`` accumulated and returned in f32, optionally soft-capped.

    The operands meet in ``lm_head``'s dtype: casting a few thousand hidden rows is cheap,
    while promoting a bf16 ``[V, D]`` head to f32 would copy it at 4 bytes per entry.
    """
    logits = jax.lax.dot_general(
        hidden.astype(lm_head.dtype),
        lm_head,
        (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.float32,
    )
    return softcap_logits(logits, softcap)


def _token_losses(logits: Array, labels: Array, z_loss: float) -> tuple[Array, Array]:
    """Per-token ``lse - logit[label] + z_loss * lse**2`` and ``lse`` (f32, unmasked)."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    safe_labels = jnp.where(labels == IGNORE_INDEX, 0, labels)
    target = jnp.take_along_axis(logits, safe_labels[:, None], axis=-1)[:, 0]
    loss = lse - target
    if z_loss:
        loss = loss + z_loss * jnp.square(lse)
    return loss, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_loss_sum(
    hidden: Array, lm_head: Array, labels: Array, softcap: float | None, z_loss: float
) -> Array:
    loss_sum, _ = _chunked_forward(hidden, lm_head, labels, softcap, z_loss)
    return loss_sum


def _chunked_forward(
    hidden: Array, lm_head: Array, labels: Array, softcap: float | None, z_loss: float
) -> tuple[Array, Array]:
    """Scan over ``[N, C, D]`` chunks; returns the loss sum and the ``[N, C]`` lse."""

    def step(total: Array, chunk: tuple[Array, Array]) -> tuple[Array, Array]:
        h, y = chunk
        loss, lse = _token_losses(_logits(h, lm_head, softcap), y, z_loss)
        return total + jnp.sum(jnp.where(y != IGNORE_INDEX, loss, 0.0)), lse

    return jax.lax.scan(step, jnp.zeros((), jnp.float32), (hidden, labels))


def _chunked_fwd(
    hidden: Array, lm_head: Array, labels: Array, softcap: float | None, z_loss: float
) -> tuple[Array, tuple[Array, Array, Array, Array]]:
    loss_sum, lse = _chunked_forward(hidden, lm_head, labels, softcap, z_loss)
    return loss_sum, (hidden, lm_head, labels, lse)


def _logits_cotangent(
    z: Array, labels: Array, lse: Array, g: Array | float, softcap: float | None, z_loss: float
) -> Array:
    """f32 ``d (g * masked loss sum) / d x`` for one chunk of pre-cap logits ``x``.

    For logits ``z`` (after the soft-cap) of a target token with label ``y``::

        d/dz [lse - z_y + a * lse**2] = (1 + 2 a lse) softmax(z) - onehot(y)

    and the soft-cap ``z = c tanh(x / c)`` contributes ``dz/dx = 1 - (z / c)**2``.
    Both custom VJPs use this one formula, so their gradients cannot drift apart.
    """
    valid = labels != IGNORE_INDEX
    row_scale = jnp.where(valid, g * (1.0 + 2.0 * z_loss * lse), 0.0)
    probs = jnp.exp(z - lse[:, None])
    # IGNORE_INDEX is negative, so masked rows match no column.
    is_target = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1) == labels[:, None]
    d_z = probs * row_scale[:, None] - jnp.where(is_target, g, 0.0)
    if softcap is not None:
        d_z = d_z * (1.0 - jnp.square(z / softcap))
    return d_z


def _hidden_cotangent(d_z: Array, lm_head: Array) -> Array:
    """``d_z @ lm_head`` (f32); ``d_z`` meets the head in its dtype, as in :func:`_logits`."""
    return jnp.dot(d_z.astype(lm_head.dtype), lm_head, preferred_element_type=jnp.float32)


def _chunked_bwd(
    softcap: float | None,
    z_loss: float,
    residuals: tuple[Array, Array, Array, Array],
    g: Array,
) -> tuple[Array, Array, None]:
    """Recompute each chunk's logits and push ``d loss_sum`` back to hidden and lm_head.

    ``g`` is folded into the f32 logit cotangent before its cast to the matmul dtype.
    The lm_head gradient is accumulated in f32 across chunks.
    """
    hidden, lm_head, labels, lse = residuals
    dtype = lm_head.dtype

    def step(d_w: Array, chunk: tuple[Array, Array, Array]) -> tuple[Array, Array]:
        h, y, chunk_lse = chunk
        h = h.astype(dtype)
        z = _logits(h, lm_head, softcap)
        d_z = _logits_cotangent(z, y, chunk_lse, g, softcap, z_loss).astype(dtype)
        d_h = _hidden_cotangent(d_z, lm_head)
        d_w = d_w + jax.lax.dot_general(
            d_z, h, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        return d_w, d_h.astype(hidden.dtype)

    d_w0 = jnp.zeros(lm_head.shape, jnp.float32)
    d_w, d_hidden = jax.lax.scan(step, d_w0, (hidden, labels, lse))
    return d_hidden, d_w.astype(lm_head.dtype), None


_chunked_loss_sum.defvjp(_chunked_fwd, _chunked_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_loss_sum_frozen_head(
    hidden: Array, lm_head: Array, labels: Array, softcap: float | None, z_loss: float
) -> Array:
    # Undifferentiated calls (evaluation) take this path: logits only, no hidden gradient.
    loss_sum, _ = _chunked_forward(hidden, lm_head, labels, softcap, z_loss)
    return loss_sum


def _frozen_head_fwd(
    hidden: Array, lm_head: Array, labels: Array, softcap: float | None, z_loss: float
) -> tuple[Array, Array]:
    """Loss sum, and ``d loss_sum / d hidden`` for a unit cotangent as the residual.

    The loss is a scalar, so its gradient for any cotangent ``g`` is ``g`` times this
    one: computing it next to the logits, whose softmax is at hand, spares the backward
    pass from recomputing them. It is kept in ``hidden.dtype``: it replaces the hidden
    states as the residual, at the same size (an f32 copy would double it for bf16
    activations, which at long context is what limits memory).
    """

    def step(total: Array, chunk: tuple[Array, Array]) -> tuple[Array, Array]:
        h, y = chunk
        z = _logits(h, lm_head, softcap)
        loss, lse = _token_losses(z, y, z_loss)
        total = total + jnp.sum(jnp.where(y != IGNORE_INDEX, loss, 0.0))
        d_h = _hidden_cotangent(_logits_cotangent(z, y, lse, 1.0, softcap, z_loss), lm_head)
        return total, d_h.astype(hidden.dtype)

    return jax.lax.scan(step, jnp.zeros((), jnp.float32), (hidden, labels))


def _frozen_head_bwd(
    softcap: float | None, z_loss: float, d_hidden: Array, g: Array
) -> tuple[Array, None, None]:
    """Scale the stored unit-cotangent gradient by ``g`` (in f32, then cast back).

    The ``None`` for ``lm_head`` is a symbolic zero: JAX hands out zeros if anyone asks
    for that gradient, which is why the head must be frozen in this mode.
    """
    del softcap, z_loss
    return (g * d_hidden.astype(jnp.float32)).astype(d_hidden.dtype), None, None


_chunked_loss_sum_frozen_head.defvjp(_frozen_head_fwd, _frozen_head_bwd)
