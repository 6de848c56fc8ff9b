"""The decoder forward pass: a pure function of (config, base, LoRA, inputs).

Layers are stacked (every per-layer parameter has a leading layer axis) and the forward is a
``jax.lax.scan`` over them, so compile time does not grow with depth and a remat policy
applies per layer. Per-layer differences (attention windows) are scanned-over data.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lorax import remat as remat_lib
from lorax.config import ModelConfig, rope_frequencies
from lorax.lora import LoraWeights, lora_linear
from pallas_kernels.flash_attention import flash_attention

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded model: static ``config``, the frozen ``params`` pytree, and its tokenizer.

    ``params`` layout (HF names, layers stacked on a leading axis)::

        embed_tokens [V, D]
        layers: input_layernorm [L, D], post_attention_layernorm [L, D],
                {q,k,v,o,gate,up,down}_proj: {"weight": [L, out, in] | NF4Tensor, "bias"?: [L, out]}
        norm [D]
        lm_head: {"weight": [V, D]}          (absent when embeddings are tied)
    """

    params: dict[str, Any]
    config: ModelConfig = dataclasses.field(metadata=dict(static=True))
    tokenizer: Any = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def dtype(self) -> Any:
        """The compute dtype: the dtype the dense parameters were loaded in."""
        return self.params["embed_tokens"].dtype

    def lm_head(self) -> Array:
        """The output projection ``[V, D]`` (the embedding matrix when tied)."""
        if self.config.tie_word_embeddings:
            return self.params["embed_tokens"]
        return self.params["lm_head"]["weight"]


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """RMSNorm computed in float32 and cast back before the scale, as HF's Llama does."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def rope_cos_sin(config: ModelConfig, positions: Array, dtype: Any) -> tuple[Array, Array]:
    """cos/sin tables ``[B, S, head_dim]`` for the given positions (HF's half-split layout)."""
    inv_freq, attention_factor = rope_frequencies(
        config.rope, config.head_dim, positions.shape[-1], config.max_position_embeddings
    )
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    cos = (jnp.cos(angles) * attention_factor).astype(dtype)
    sin = (jnp.sin(angles) * attention_factor).astype(dtype)
    return cos, sin


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates ``x [B, S, H, D]`` by the position angles (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


@dataclasses.dataclass(frozen=True)
class ForwardOptions:
    """Static knobs of the forward pass (kernel choices, remat); the defaults pick for you.

    ``attention_impl=None`` takes the fastest implementation that supports the call: on a GPU
    cuDNN's fused attention where its features suffice (no packed segments, no softcap; it is
    3-4x faster than our Pallas kernel in the backward pass, see BENCHMARKS.md), otherwise
    the Pallas flash-attention kernel; the jnp reference on CPU. ``"pallas"``, ``"cudnn"`` and
    ``"reference"`` force one. ``matmul_impl`` likewise for the NF4/LoRA matmul.
    """

    remat: str = "none"
    matmul_impl: str | None = None
    attention_impl: str | None = None


def _attention_impl(requested: str | None, segment_ids: Array | None) -> str | None:
    if requested is None and segment_ids is None and jax.default_backend() == "gpu":
        return "cudnn"
    return requested


def distinct_windows(config: ModelConfig) -> list[int]:
    """The distinct attention windows of the layers (0 = full attention), sorted."""
    return sorted(set(config.layer_windows))


def _decoder_layer(
    config: ModelConfig,
    lora_cfg: Any,
    options: ForwardOptions,
    h: Array,
    layer: dict[str, Any],
    adapters: dict[str, Any],
    window_index: Array,
    cos: Array,
    sin: Array,
    segment_ids: Array | None,
    dropout_key: Array | None,
) -> Array:
    b, s, _ = h.shape
    keys = iter(jax.random.split(dropout_key, 7)) if dropout_key is not None else None

    def linear(name: str, x: Array) -> Array:
        proj = layer[name]
        adapter = adapters.get(name)
        return lora_linear(
            x,
            proj["weight"],
            proj.get("bias"),
            adapter,
            lora_cfg.scale if adapter is not None else 0.0,
            dropout=lora_cfg.dropout if adapter is not None else 0.0,
            dropout_key=next(keys) if keys is not None else None,
            impl=options.matmul_impl,
        )

    x = rms_norm(h, layer["input_layernorm"], config.rms_norm_eps)
    q = linear("q_proj", x).reshape(b, s, config.num_heads, config.head_dim)
    k = linear("k_proj", x).reshape(b, s, config.num_kv_heads, config.head_dim)
    v = linear("v_proj", x).reshape(b, s, config.num_kv_heads, config.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q, k, v = remat_lib.name(q, "query"), remat_lib.name(k, "key"), remat_lib.name(v, "value")

    def attend(window: int) -> Array:
        return flash_attention(
            q,
            k,
            v,
            causal=True,
            sliding_window=window or None,
            segment_ids=segment_ids,
            scale=config.head_dim**-0.5,
            impl=_attention_impl(options.attention_impl, segment_ids),
        )

    # Attention kernels take the window as a static size, so layers with different windows
    # (full vs sliding) select among the few distinct sizes with a switch on scanned data.
    windows = distinct_windows(config)
    if len(windows) == 1:
        attn = attend(windows[0])
    else:
        attn = jax.lax.switch(window_index, [lambda w=w: attend(w) for w in windows])
    attn = remat_lib.name(attn, "attention_out")
    h = h + linear("o_proj", attn.reshape(b, s, config.q_size))

    x = rms_norm(h, layer["post_attention_layernorm"], config.rms_norm_eps)
    gated = jax.nn.silu(linear("gate_proj", x)) * linear("up_proj", x)
    return h + linear("down_proj", gated)


def hidden_states(
    model: Model,
    lora: LoraWeights | None,
    input_ids: Array,
    *,
    positions: Array | None = None,
    segment_ids: Array | None = None,
    dropout_key: Array | None = None,
    options: ForwardOptions = ForwardOptions(),
) -> Array:
    """The final normed hidden states ``[B, S, D]`` (what the LM head and the loss consume)."""
    config = model.config
    params = model.params
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    b, s = input_ids.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    dtype = model.dtype
    h = jnp.take(params["embed_tokens"], input_ids, axis=0)
    cos, sin = rope_cos_sin(config, positions, dtype)

    adapters = lora.params["layers"] if lora is not None else {}
    lora_cfg = lora.config if lora is not None else None
    windows = distinct_windows(config)
    window_index = jnp.asarray([windows.index(w) for w in config.layer_windows], jnp.int32)
    layer_keys = (
        jax.random.split(dropout_key, config.num_layers) if dropout_key is not None else None
    )

    def body(carry: Array, xs: tuple) -> tuple[Array, None]:
        layer, layer_adapters, window_index, key = xs
        out = _decoder_layer(
            config,
            lora_cfg,
            options,
            carry,
            layer,
            layer_adapters,
            window_index,
            cos,
            sin,
            segment_ids,
            key,
        )
        return out, None

    body = remat_lib.apply(body, options.remat)
    h, _ = jax.lax.scan(body, h, (params["layers"], adapters, window_index, layer_keys))
    return rms_norm(h, params["norm"], config.rms_norm_eps)


def forward(
    model: Model,
    lora: LoraWeights | None,
    input_ids: Array,
    *,
    positions: Array | None = None,
    segment_ids: Array | None = None,
    dropout_key: Array | None = None,
    options: ForwardOptions = ForwardOptions(),
) -> Array:
    """Logits ``[B, S, V]`` in float32. Pure and jit-able; ``lora=None`` is the base model.

    ``positions`` default to ``0..S-1``; for packed rows pass per-segment positions and
    ``segment_ids`` (no attention across segments). ``dropout_key`` enables LoRA dropout.
    """
    h = hidden_states(
        model,
        lora,
        input_ids,
        positions=positions,
        segment_ids=segment_ids,
        dropout_key=dropout_key,
        options=options,
    )
    return jnp.einsum("bsd,vd->bsv", h, model.lm_head(), preferred_element_type=jnp.float32)
