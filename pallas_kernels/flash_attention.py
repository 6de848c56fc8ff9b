"""Causal / sliding-window / softcapped / packed grouped-query attention for training.

``flash_attention`` is the one entry point the model calls. It chooses between

* ``"pallas"``: FlashAttention-2 Pallas kernels (``flash_attention_kernels``), lowered through
  Triton on GPU, or run by the Pallas interpreter (``interpret=True``, how CPU tests run them).
  The forward saves only the output and the per-row log-sum-exp; the backward
  (``jax.custom_vjp``) recomputes probabilities tile by tile, so no ``S x S`` array exists at
  any point, and fully masked tiles are skipped by loop bounds.
* ``"reference"``: :func:`attention_reference`, plain jnp that materialises the scores (the CPU
  path and the tests' ground truth).
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` for the options cuDNN
  has natively (causal, sliding window, GQA; no softcap, no segment ids) — a GPU-only
  comparison/fallback, not selected automatically.
* ``"mosaic"``: the Mosaic GPU kernels of :mod:`pallas_kernels.flash_attention_mgpu` (Hopper
  TMA + wgmma; causal GQA with optional sliding window, softcap and segment ids, head_dim up to
  128 (padded to 64 or 128), bf16/f16; S padded to a multiple of 128). Its forward is at least
  cuDNN's speed on the H200, its backward not yet (BENCHMARKS.md §3); :func:`mosaic_supports`
  says whether a call can take it, and the model takes it for packed rows (which cuDNN cannot
  mask). ``interpret=True`` runs it in the Mosaic GPU interpreter (CPU tests).

Selection follows the package-wide rules of ``pallas_kernels._backend.choose``: ``impl=None``
means the compiled Pallas kernels on a GPU backend and the reference elsewhere;
``interpret=True`` forces the Pallas kernels in interpret mode; ``impl`` forces a path
(``impl="pallas"`` on a non-GPU backend runs interpreted). The kernels lower through Triton on
GPU (``_backend.triton_compiler_params``), never Mosaic GPU, on jax 0.10.x and 0.11.x alike.

Layouts are the model's: ``q [B, S, Hq, D]``, ``k, v [B, S, Hkv, D]`` with ``Hq % Hkv == 0``;
query head ``h`` uses KV head ``h // (Hq // Hkv)`` and K/V are never repeated in memory.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import Array

from pallas_kernels import _backend
from pallas_kernels import flash_attention_mgpu as mgpu
from pallas_kernels.flash_attention_kernels import (
    BlockSizes,
    KernelSpec,
    flash_backward,
    flash_forward,
)
from pallas_kernels.flash_attention_reference import (
    attention_logsumexp,
    attention_mask,
    attention_reference,
    validate_attention_args,
)

__all__ = [
    "BlockSizes",
    "Impl",
    "attention_logsumexp",
    "attention_mask",
    "attention_reference",
    "flash_attention",
    "mosaic_supports",
    "resolve_impl",
    "save_forward_residuals",
]

Impl = Literal["pallas", "reference", "cudnn", "mosaic"]
# Segment id given to padding rows/keys added to reach a multiple of the block size. Only padded
# queries see padded keys, and their outputs are sliced off.
_PAD_SEGMENT = -1
_FWD_KERNEL = "flash_attention_fwd"  # the forward pallas_call's name (flash_attention_kernels)
# jax.nn.dot_product_attention(implementation="cudnn")'s forward inside its custom_vjp: its
# outputs are the attention output and the softmax statistics its backward needs.
_CUDNN_FWD_PRIMITIVES = ("dot_product_attention_fwd_wrapper", "dot_product_attention_fwd")


def resolve_impl(impl: str | None, interpret: bool | None) -> tuple[Impl, bool]:
    """``(impl, interpret)`` after the package-wide rules of ``pallas_kernels._backend.choose``
    (kernel on GPU, reference elsewhere, ``interpret=True`` forces the interpreted kernel),
    plus this op's extra ``impl="cudnn"``."""
    if impl not in (None, "pallas", "reference", "cudnn", "mosaic"):
        raise ValueError(
            f"impl must be None, 'pallas', 'reference', 'cudnn' or 'mosaic'; got {impl!r}"
        )
    if impl == "cudnn":
        if interpret:
            raise ValueError("impl='cudnn' runs no Pallas kernel; interpret=True is meaningless")
        return "cudnn", False
    if impl == "mosaic":  # like "pallas": compiled on a GPU, interpreted elsewhere
        return "mosaic", (not _backend.on_gpu()) if interpret is None else interpret
    choice = _backend.choose(impl, interpret)
    return ("pallas" if choice.use_kernel else "reference"), choice.interpret


def mosaic_supports(
    q: Array,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> bool:
    """Whether ``impl="mosaic"`` runs this call compiled here: a Hopper GPU, causal attention
    (sliding window, softcap and segment ids allowed), a head dim up to 128 (smaller ones than
    the kernels' 64 and 128 are zero-padded to the next) and a dtype the kernels take. What the
    model's default selection asks."""
    del sliding_window, softcap  # the kernels take both
    return (
        _backend.on_hopper()
        and causal
        and q.shape[-1] <= max(mgpu.HEAD_DIMS)
        and q.dtype in mgpu.DTYPES
    )


def flash_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    segment_ids: Array | None = None,
    scale: float | None = None,
    interpret: bool | None = None,
    impl: str | None = None,
    block_sizes: BlockSizes | None = None,
    mosaic_config: mgpu.MgpuAttentionConfig | None = None,
) -> Array:
    """Multi-/grouped-query attention, differentiable w.r.t. ``q``, ``k``, ``v``.

    Args:
      q: ``[B, S, Hq, D]`` queries (bfloat16, float16 or float32); D in {64, 96, 128, 256}
        (any D works; the kernels pad it to a power of two).
      k, v: ``[B, S, Hkv, D]``, same dtype as ``q``; ``Hq`` a multiple of ``Hkv`` (MQA: 1).
      causal: query ``i`` sees keys ``j <= i``.
      sliding_window: ``w``: query ``i`` sees keys ``i - w < j <= i`` (HF's meaning; static
        int; requires ``causal``).
      softcap: ``c``: scores become ``c * tanh(s / c)`` before masking (Gemma 2).
      segment_ids: ``[B, S]`` int; no attention across segments (packed rows). Segment 0
        (padding) attends only within itself; a row that can see no key yields 0, not NaN.
      scale: score scale, default ``D ** -0.5``.
      interpret: run the Pallas kernels in interpret mode (CPU tests).
      impl: ``"pallas"``, ``"reference"``, ``"cudnn"`` or ``"mosaic"``; ``None`` picks (see
        module doc).
      block_sizes: Pallas tile sizes / launch parameters (default by head_dim).
      mosaic_config: the Mosaic GPU kernels' tiles and designs (default:
        ``MgpuAttentionConfig()``); e.g. ``bwd_dq="kernel"`` for a bitwise reproducible dQ
        at every length.

    Returns:
      ``[B, S, Hq, D]`` in ``q.dtype``; float32 accumulation throughout.

    Any sequence length works: the Pallas path pads to the block size internally. Call it
    under ``jax.jit`` (the model does); eager calls re-trace every time. With the batch split
    over several devices, call the Pallas and Mosaic kernels per device (``jax.shard_map``
    over the batch, as ``lorax.model`` does): XLA's partitioner cannot split a kernel, so it
    gathers the whole batch onto every device around the Triton kernels and fails to lower
    the Mosaic ones (measured on 2 H200s, BENCHMARKS.md §3). cuDNN partitions by itself.
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
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    impl_, interpret_ = resolve_impl(impl, interpret)
    options = dict(
        causal=causal,
        sliding_window=sliding_window,
        softcap=softcap,
        segment_ids=segment_ids,
        scale=scale,
    )
    if impl_ == "reference":
        return attention_reference(q, k, v, **options)
    if impl_ == "cudnn":
        return _cudnn_attention(q, k, v, **options)
    if impl_ == "mosaic":
        return _mosaic_attention(q, k, v, **options, interpret=interpret_, config=mosaic_config)
    return _pallas_attention(q, k, v, **options, interpret=interpret_, block_sizes=block_sizes)


def _pallas_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool,
    sliding_window: int | None,
    softcap: float | None,
    segment_ids: Array | None,
    scale: float | None,
    interpret: bool,
    block_sizes: BlockSizes | None,
) -> Array:
    """Pads to the kernels' granules, runs the custom-vjp kernels, slices the padding off.

    Padding sits outside the ``custom_vjp`` so JAX differentiates the pad/slice itself; it is a
    no-op (no copy) when S is a multiple of the block and D a power of two — the common case.
    """
    _, seq_len, _, head_dim = q.shape
    blocks = (block_sizes or BlockSizes.for_head_dim(head_dim)).fit(seq_len)
    padded_len = -(-seq_len // blocks.max_block) * blocks.max_block
    padded_dim = max(16, 1 << (head_dim - 1).bit_length())
    if sliding_window is not None and sliding_window >= seq_len:
        sliding_window = None  # the window covers every causal key: plain causal, fewer masks
    spec = KernelSpec(
        causal=causal,
        sliding_window=None if sliding_window is None else int(sliding_window),
        softcap=None if softcap is None else float(softcap),
        scale=head_dim**-0.5 if scale is None else float(scale),
        seq_len=seq_len,
        block_sizes=blocks,
        interpret=interpret,
    )
    pad = [(0, 0), (0, padded_len - seq_len), (0, 0), (0, padded_dim - head_dim)]
    if padded_len != seq_len or padded_dim != head_dim:
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    if segment_ids is not None:
        segment_ids = jnp.pad(
            segment_ids.astype(jnp.int32),
            [(0, 0), (0, padded_len - seq_len)],
            constant_values=_PAD_SEGMENT,
        )
    out = _flash(q, k, v, segment_ids, spec)
    return out[:, :seq_len, :, :head_dim]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q: Array, k: Array, v: Array, segment_ids: Array | None, spec: KernelSpec) -> Array:
    segments = None if segment_ids is None else (segment_ids, segment_ids)
    return flash_forward(q, k, v, segments, spec)[0]


def _flash_fwd(
    q: Array, k: Array, v: Array, segment_ids: Array | None, spec: KernelSpec
) -> tuple[Array, tuple[Array | None, ...]]:
    segments = None if segment_ids is None else (segment_ids, segment_ids)
    out, lse = flash_forward(q, k, v, segments, spec)
    return out, (q, k, v, segment_ids, out, lse)


def _flash_bwd(
    spec: KernelSpec, residuals: tuple[Array | None, ...], d_out: Array
) -> tuple[Array, Array, Array, None]:
    q, k, v, segment_ids, out, lse = residuals
    segments = None if segment_ids is None else (segment_ids, segment_ids)
    dq, dk, dv = flash_backward(q, k, v, segments, out, lse, d_out, spec)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def save_forward_residuals(prim: Any, *_: Any, **params: Any) -> bool:
    """``jax.checkpoint`` policy: keep the forward kernel's outputs (``o`` and ``lse``).

    Covers every forward kernel the model may call: the Triton and Mosaic GPU ones and cuDNN's
    (whose second output is its softmax statistics, the same role as ``lse``).

    Under remat, the backward of a ``custom_vjp`` needs its residuals, and name-based
    policies cannot see them (a ``checkpoint_name`` on the attention output does *not* stop
    the forward kernel from running again). Saving the forward ``pallas_call`` 's outputs —
    ``[B, S, Hq, D]`` in the input dtype plus ``[B, Hq, S]`` float32 — does: the backward then
    skips the O(S^2) forward recompute. Combine it with a name policy, e.g.
    ``jax.checkpoint_policies.save_from_both_policies(save_only_these_names(...),
    save_forward_residuals)``. q, k, v follow whatever the other policy does.
    """
    name = getattr(prim, "name", None)
    if name in _CUDNN_FWD_PRIMITIVES:
        return True
    if name == "mpmd_map":  # how a Mosaic GPU kernel (pl.kernel over a mesh) appears
        return params.get("name") == mgpu.FORWARD_KERNEL_NAME
    return name == "pallas_call" and params.get("name") == _FWD_KERNEL


def _cudnn_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool,
    sliding_window: int | None,
    softcap: float | None,
    segment_ids: Array | None,
    scale: float | None,
) -> Array:
    """cuDNN's fused attention through ``jax.nn`` (GQA native; GPU only)."""
    if softcap is not None or segment_ids is not None:
        raise NotImplementedError("impl='cudnn' supports neither softcap nor segment_ids")
    window = None if sliding_window is None else (int(sliding_window) - 1, 0)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        is_causal=causal,
        local_window_size=window,
        implementation="cudnn",
    )


def _mosaic_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool,
    sliding_window: int | None,
    softcap: float | None,
    segment_ids: Array | None,
    scale: float | None,
    interpret: bool,
    config: mgpu.MgpuAttentionConfig | None,
) -> Array:
    """The Mosaic GPU kernels; pads S to their multiple (zeros at the end: causal masking
    keeps real queries off the padded keys, and the padded queries are sliced off; padded
    segment ids are a segment of their own) and the head dim up to the next one they take
    (zero columns: the scores do not change, and the output's extra columns are sliced off).
    """
    if not causal:
        raise NotImplementedError(
            "impl='mosaic' computes causal attention only; use impl='pallas' (or None) for "
            "non-causal attention"
        )
    config = config or mgpu.MgpuAttentionConfig()
    seq_len, head_dim = q.shape[1], q.shape[3]
    padded_len = -(-seq_len // config.seq_multiple) * config.seq_multiple
    if padded_len != seq_len:
        pad = [(0, 0), (0, padded_len - seq_len), (0, 0), (0, 0)]
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
        if segment_ids is not None:
            segment_ids = jnp.pad(
                segment_ids.astype(jnp.int32), pad[:2], constant_values=_PAD_SEGMENT
            )
    kernel_dim = next((d for d in mgpu.HEAD_DIMS if d >= head_dim), head_dim)
    if kernel_dim != head_dim:  # e.g. Phi-3's 96 runs as 128 (a third more tensor work)
        q, k, v = (jnp.pad(x, [(0, 0)] * 3 + [(0, kernel_dim - head_dim)]) for x in (q, k, v))
    params = _backend.mosaic_interpret_params(interpret)
    scale_ = head_dim**-0.5 if scale is None else float(scale)
    out = mgpu.flash_attention_mgpu(
        q, k, v, scale_, config, params, segment_ids, sliding_window=sliding_window, softcap=softcap
    )
    return out[:, :seq_len, :, :head_dim]
