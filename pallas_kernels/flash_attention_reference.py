"""Plain-jnp reference for :func:`pallas_kernels.flash_attention.flash_attention`.

This is the definition of what the Pallas kernels compute, the CPU path of the model, and
the ground truth of the tests. It materialises the ``[B, Hkv, G, S, S]`` float32 scores, so it
is meant for short sequences; it never repeats K/V across the query heads of a group (the
queries are reshaped to ``[B, S, Hkv, G, D]`` instead), which keeps its memory at one score
tensor plus inputs.

Semantics shared with the kernels (and with Hugging Face):

* ``scale`` multiplies ``q @ k.T``; it defaults to ``D ** -0.5``.
* ``softcap=c`` (Gemma 2) maps the scaled scores to ``c * tanh(s / c)`` *before* masking.
* ``causal``: query ``i`` sees keys ``j <= i``.
* ``sliding_window=w``: query ``i`` sees keys ``i - w < j <= i`` (requires ``causal``).
* ``segment_ids [B, S]``: query ``i`` sees key ``j`` only if their segment ids are equal.
* A query that sees no key at all gets a zero output (and zero gradients), never NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array

__all__ = [
    "attention_logsumexp",
    "attention_mask",
    "attention_reference",
    "validate_attention_args",
]


def validate_attention_args(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool,
    sliding_window: int | None,
    softcap: float | None,
    segment_ids: Array | None,
) -> None:
    """Raises ``ValueError`` for shapes/options the attention functions do not support."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"expected q, k, v of rank 4 [B, S, H, D]; got {q.shape}, {k.shape}, {v.shape}"
        )
    batch, seq_len, num_q_heads, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {k.shape} and {v.shape}")
    if k.shape[0] != batch or k.shape[1] != seq_len or k.shape[3] != head_dim:
        raise ValueError(
            f"k/v {k.shape} must match q {q.shape} in batch, sequence and head_dim "
            "(self-attention only)"
        )
    num_kv_heads = k.shape[2]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})"
        )
    if sliding_window is not None:
        if not causal:
            raise ValueError("sliding_window requires causal=True (HF: i - w < j <= i)")
        if int(sliding_window) < 1:
            raise ValueError(f"sliding_window must be >= 1; got {sliding_window}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0; got {softcap}")
    if segment_ids is not None and segment_ids.shape != (batch, seq_len):
        raise ValueError(
            f"segment_ids must be [B, S] = {(batch, seq_len)}; got {segment_ids.shape}"
        )


def attention_mask(
    seq_len: int,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
    segment_ids: Array | None = None,
) -> Array | None:
    """Boolean ``[B or 1, S, S]`` mask (``True`` = may attend), or ``None`` if unmasked."""
    rows = jnp.arange(seq_len, dtype=jnp.int32)[:, None]
    cols = jnp.arange(seq_len, dtype=jnp.int32)[None, :]
    mask = None
    if causal:
        mask = cols <= rows
    if sliding_window is not None:
        in_window = cols > rows - sliding_window
        mask = in_window if mask is None else mask & in_window
    if mask is not None:
        mask = mask[None]
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = same if mask is None else mask & same
    return mask


def _scores(
    q: Array,
    k: Array,
    *,
    causal: bool,
    sliding_window: int | None,
    softcap: float | None,
    segment_ids: Array | None,
    scale: float | None,
) -> Array:
    """Scaled, softcapped, masked float32 scores ``[B, Hkv, G, Sq, Sk]`` (masked: -inf)."""
    batch, seq_len, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    groups = num_q_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else float(scale)
    qg = q.reshape(batch, seq_len, num_kv_heads, groups, head_dim)
    scores = jnp.einsum(
        "bqhgd,bkhd->bhgqk",
        qg,
        k,
        preferred_element_type=jnp.float32,
        precision=jax.lax.Precision.HIGHEST,
    )
    scores = scores * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    mask = attention_mask(
        seq_len, causal=causal, sliding_window=sliding_window, segment_ids=segment_ids
    )
    if mask is not None:
        scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    return scores


def attention_reference(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    segment_ids: Array | None = None,
    scale: float | None = None,
) -> Array:
    """Multi-/grouped-query attention in plain jnp; same contract as ``flash_attention``.

    Args:
      q: ``[B, S, Hq, D]`` queries.
      k, v: ``[B, S, Hkv, D]`` keys/values; ``Hq % Hkv == 0`` and query head ``h`` uses KV
        head ``h // (Hq // Hkv)`` (the Hugging Face grouping).
      causal, sliding_window, softcap, segment_ids, scale: see the module docstring.

    Returns:
      ``[B, S, Hq, D]`` in ``q.dtype``. Scores, softmax and the value product are float32.
    """
    validate_attention_args(
        q,
        k,
        v,
        causal=causal,
        sliding_window=sliding_window,
        softcap=softcap,
        segment_ids=segment_ids,
    )
    scores = _scores(
        q,
        k,
        causal=causal,
        sliding_window=sliding_window,
        softcap=softcap,
        segment_ids=segment_ids,
        scale=scale,
    )
    # A fully masked row has max -inf; shift by 0 instead so exp() gives exact zeros.
    row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.exp(scores - row_max)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum(
        "bhgqk,bkhd->bqhgd", probs, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    return out.reshape(q.shape).astype(q.dtype)


def attention_logsumexp(
    q: Array,
    k: Array,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    segment_ids: Array | None = None,
    scale: float | None = None,
) -> Array:
    """The per-row natural-log log-sum-exp of the scores, ``[B, Hq, S]`` float32: what a
    flash-attention forward saves for its backward (``-inf`` for a row that sees no key)."""
    scores = _scores(
        q,
        k,
        causal=causal,
        sliding_window=sliding_window,
        softcap=softcap,
        segment_ids=segment_ids,
        scale=scale,
    )
    lse = jax.nn.logsumexp(scores, axis=-1)  # [B, Hkv, G, S]
    return lse.reshape(q.shape[0], q.shape[2], q.shape[1])
