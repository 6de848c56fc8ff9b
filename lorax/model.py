"""The decoder forward pass: a pure function of (config, base, LoRA, inputs).

Layers are stacked (every per-layer parameter has a leading layer axis) and the forward is a
``jax.lax.scan`` over them, so compile time does not grow with depth and a remat policy
applies per layer. Per-layer differences (attention windows) are scanned-over data.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp

from convert.families import LATENT_NORM_EPS
from convert.names import ROUTER, SHARED_EXPERT_GATE
from lorax import remat as remat_lib
from lorax.config import LayerStack, ModelConfig, rope_frequencies
from lorax.lora import LoraWeights, lora_linears
from lorax.moe import Routing, gate_shared_expert, moe_mlp, router_statistics
from pallas_kernels.flash_attention import flash_attention, mosaic_supports, resolve_impl
from pallas_kernels.flash_attention_mgpu import MgpuAttentionConfig
from pallas_kernels.nf4_matmul import NF4MatmulConfig

Array = jax.Array
# params[stack][PREPARED][group_key(names)] (stack: "layers", "dense_layers"): a group's frozen
# weights stacked in the Mosaic GPU kernel's layout (lorax.prepare_kernel_weights).
PREPARED = "prepared"


def group_key(names: tuple[str, ...]) -> str:
    """The key of a projection group's prepared weight: its names joined by ``+``."""
    return "+".join(names)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded model: static ``config``, the frozen ``params`` pytree, and its tokenizer.

    ``params`` layout (HF names, layers stacked on a leading axis)::

        embed_tokens [V, D]
        layers: input_layernorm [L, D], post_attention_layernorm [L, D],
                (Gemma) pre_feedforward_layernorm, post_feedforward_layernorm [L, D],
                (Qwen 3, Gemma 3) q_norm, k_norm [L, head_dim],
                {q,k,v,o,gate,up,down}_proj: {"weight": [L, out, in] | NF4Tensor, "bias"?: [L, out]}
                (Mixtral, Qwen 2/3 MoE; in place of gate/up/down) router: {"weight": [L, E, D]},
                experts_gate_up_proj: {"weight": [L, E, 2, F, D] | NF4Tensor (batch [L, E, 2])},
                experts_down_proj: {"weight": [L, E, D, F] | NF4Tensor (batch [L, E])}
                (Qwen 2 MoE, DeepSeek: beside them, gate/up/down_proj are the shared
                 expert's) shared_expert_gate: {"weight": [L, 1, D]} (Qwen 2 MoE),
                router_bias [L, E] float32 (DeepSeek V3)
                (DeepSeek, latent attention: in place of q/k/v) q_proj or q_a_proj and
                q_b_proj, kv_a_proj_with_mqa, kv_b_proj; q_a_layernorm, kv_a_layernorm
        dense_layers: (an MoE model's dense-MLP layers, ``ModelConfig.layer_stacks``) the
                same for those layers, with a dense gate/up/down_proj
        norm [D]
        lm_head: {"weight": [V, D]}          (absent when embeddings are tied)

    After :func:`lorax.prepare_kernel_weights`, ``layers[PREPARED]`` maps each projection
    group (``group_key``) to its NF4 weights stacked in the Mosaic GPU kernel's layout, and
    those projections keep only their biases.
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


def rms_norm(x: Array, weight: Array, eps: float, style: str = "llama") -> Array:
    """RMSNorm over the last axis, rounded where HF's implementation of ``style`` rounds.

    ``"llama"``: normed in float32, cast to x's dtype, then scaled by ``weight``. ``"gemma"``:
    scaled by ``1 + weight`` in float32, then cast (Gemma stores the scale minus one).
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if style == "gemma":
        return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight * normed.astype(x.dtype)


def _activation(name: str, x: Array) -> Array:
    if name == "gelu_pytorch_tanh":
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.silu(x)


def rope_cos_sin(
    config: ModelConfig, positions: Array, dtype: Any, window: int = 0
) -> tuple[Array, Array]:
    """cos/sin tables ``[B, S, rotary_dim]`` for the given positions (HF's half-split layout),
    for the layers whose attention window is ``window`` (their RoPE may differ: Gemma 3).

    They are computed in float32 and rounded to ``dtype``, as transformers' rotary embeddings
    return them cast to the activations' dtype; where the family rotates in float32
    (``config.rope_in_float32``: DeepSeek V2, whose ``freqs_cis`` stay complex64) they stay
    float32, and ``apply_rope`` then turns in float32.
    """
    rope = config.layer_rope(window)

    def frequencies(seq_len: int) -> tuple[Any, float]:
        return rope_frequencies(rope, config.rope_head_dim, seq_len, config.max_position_embeddings)

    inv_freq, attention_factor = frequencies(positions.shape[-1])
    inv_freq = jnp.asarray(inv_freq)
    if rope.type == "longrope":
        # Long factors once any position passes the pre-training length (HF: max(position)+1).
        original = rope.original_max_position_embeddings
        beyond = jnp.max(positions) + 1 > original
        inv_freq = jnp.where(beyond, frequencies(original + 1)[0], frequencies(original)[0])
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    table_dtype = jnp.float32 if config.rope_in_float32 else dtype
    cos = (jnp.cos(angles) * attention_factor).astype(table_dtype)
    sin = (jnp.sin(angles) * attention_factor).astype(table_dtype)
    return cos, sin


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates ``x [B, S, H, D]`` by the position angles (rotate-half convention); with
    partial rotary (``cos`` narrower than D) only the leading dims rotate.

    The rotation runs in the wider of ``x``'s and the tables' dtypes and is rounded once to
    ``x``'s: tables in the activations' dtype turn in it (transformers' Llama-style
    ``apply_rotary_pos_emb``), float32 tables turn 16-bit activations in float32 (DeepSeek
    V2's ``apply_rotary_emb``: ``xq.float()`` times complex64 ``freqs_cis``, ``type_as(xq)``).
    """
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return jnp.concatenate([apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]], axis=-1)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


HOST_MEMORY_KINDS = ("pinned_host", "unpinned_host")


def embeddings_to_host(model: Model) -> Model:
    """``model`` with its embedding table in pinned host memory instead of device memory.

    A LoRA step only reads the rows of its tokens from the (frozen) table: a few MiB of a table
    that is 1 GiB for Llama 3 8B. With the table in host memory, :func:`embed` gathers those
    rows on the host and copies them over (measured on an H200: 3.4 ms for 8192 rows of a
    128256 x 4096 bf16 table, ``scripts/check_host_embedding.py``), and the device holds
    none of it: the cheapest gigabyte a low-memory configuration can give back. XLA logs
    that it runs the gather as host compute; that is the intent.

    Raises ``ValueError`` for tied embeddings: the LM head then multiplies by the whole table
    every step, which must stay on the device.
    """
    if model.config.tie_word_embeddings:
        raise ValueError(
            "embeddings_to_host: this model ties its embeddings to the LM head, which reads "
            "the whole table every step; it must stay in device memory"
        )
    table = model.params["embed_tokens"]
    on_host = jax.device_put(table, table.sharding.with_memory_kind("pinned_host"))
    return dataclasses.replace(model, params={**model.params, "embed_tokens": on_host})


def _in_host_memory(x: Array) -> bool:
    space = getattr(jax.typeof(x), "memory_space", None)
    return space is not None and space == jax.memory.Space.Host


def embed(table: Array, input_ids: Array) -> Array:
    """Rows of ``table [V, D]`` for ``input_ids``, wherever the table lives.

    On the device, ``jnp.take``. In host memory (:func:`embeddings_to_host`), the ids go to
    the host, one gather runs there and only the rows come back. The ids are clamped first
    (an operand of a host gather must itself be in host memory, so the bounds arithmetic
    happens before the copy), where ``jnp.take`` would return NaN rows for ids out of range.
    """
    if not _in_host_memory(table):
        return jnp.take(table, input_ids, axis=0)
    ids = jnp.clip(input_ids, 0, table.shape[0] - 1)
    ids = jax.device_put(ids, jax.memory.Space.Host)
    dnums = jax.lax.GatherDimensionNumbers(
        offset_dims=(ids.ndim,), collapsed_slice_dims=(0,), start_index_map=(0,)
    )
    rows = jax.lax.gather(
        table,
        ids[..., None],
        dnums,
        (1, table.shape[1]),
        mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )
    return jax.device_put(rows, jax.memory.Space.Device)


@dataclasses.dataclass(frozen=True)
class ForwardOptions:
    """Static knobs of the forward pass (kernel choices, remat); the defaults pick for you.

    ``attention_impl=None`` takes the fastest implementation that supports the call: on a GPU
    cuDNN's fused attention where its features suffice (no packed segments, no softcap; it is
    3-4x faster than the Triton Pallas kernels in the backward pass, see BENCHMARKS.md); for
    packed rows (segment ids) or a softcap (Gemma 2) on Hopper GPUs the Mosaic GPU kernels
    (``pallas_kernels.flash_attention.mosaic_supports``: head dim up to 128; windows too);
    otherwise the Triton Pallas kernels (Gemma's head dim 256); the jnp reference on CPU. With
    ``activation_sharding`` set, each device runs the Pallas kernels on its own batch rows.
    ``"pallas"``, ``"cudnn"``, ``"mosaic"`` (causal, with or without window, softcap and
    segment ids; forward+backward 1.20x / 1.04x / 1.01x cuDNN's at 2K / 8K / 32K) and
    ``"reference"`` force one. ``attention_bwd_dq`` picks the Mosaic backward's dQ design
    (``pallas_kernels.flash_attention_mgpu.MgpuAttentionConfig.bwd_dq``; None: ``"auto"``,
    which for plain causal attention at head dim 128 from S = 8192 fuses dQ into the dK/dV
    kernel, not bitwise reproducible run to run; ``"kernel"`` is, at every length).
    ``matmul_impl``
    likewise for the NF4/LoRA matmul, and ``matmul_variant`` picks among its GPU implementations
    (``pallas_kernels.NF4MatmulConfig.variant``, e.g. ``"mosaic"``; None: ``"auto"``).

    ``remat`` is a policy name or a per-layer schedule (see :mod:`lorax.remat`).
    ``offload_layer_inputs`` keeps every layer's input (the residual stream, which any remat
    policy saves) in pinned host memory: ``[tokens, hidden]`` per layer off the device, for
    the price of overlapped host copies (it is what ``offload`` does beyond ``full``).
    ``mlp_chunk_tokens`` runs each MLP over that many tokens at a time, each chunk
    rematerialised on its own: the MLP's ``[tokens, intermediate]`` temporaries (the largest
    activations of the step, ~3.5x the hidden width each) then stop growing with the sequence,
    which is what bounds the longest trainable context. Each chunk decodes the NF4 weights
    again, so use it for long sequences (tens of thousands of tokens), not short ones. It
    buys memory, not speed: under ``mlp:20,selective`` at 1x8192 on an H200 (Llama-3.1-8B,
    BENCHMARKS.md §1) 4096-token chunks gave 0.11 GiB less peak for a 6% slower step, so the
    fastest setting within a budget leaves it off.

    ``layer_weights_sharding`` / ``activation_sharding`` (``jax.sharding.NamedSharding``, set
    by ``lorax.sharding.forward_constraints`` on a multi-device mesh) make a scanned layer
    FSDP-shaped: its frozen weights are gathered as they are stored (4-bit bytes, not decoded
    16-bit values) before use, and the hidden states stay split by batch rows.
    """

    remat: str = "none"
    offload_layer_inputs: bool = False
    matmul_impl: str | None = None
    matmul_variant: str | None = None
    attention_impl: str | None = None
    attention_bwd_dq: str | None = None
    mlp_chunk_tokens: int | None = None
    layer_weights_sharding: Any = None
    activation_sharding: Any = None

    def __post_init__(self) -> None:
        remat_lib.validate(self.remat, self.offload_layer_inputs)
        if self.matmul_variant is not None:
            NF4MatmulConfig(variant=self.matmul_variant)  # raises naming the choices
        _mosaic_config(self)  # likewise for attention_bwd_dq
        if self.mlp_chunk_tokens is not None and self.mlp_chunk_tokens <= 0:
            raise ValueError(f"mlp_chunk_tokens must be positive, got {self.mlp_chunk_tokens}")


def _mosaic_config(options: ForwardOptions) -> MgpuAttentionConfig | None:
    if options.attention_bwd_dq is None:
        return None
    return MgpuAttentionConfig(bwd_dq=options.attention_bwd_dq)


def _matmul_config(options: ForwardOptions) -> NF4MatmulConfig | None:
    if options.matmul_variant is None:
        return None
    return NF4MatmulConfig(variant=options.matmul_variant)


def _attention_impl(
    requested: str | None,
    segment_ids: Array | None,
    q: Array,
    window: int | None,
    softcap: float | None = None,
) -> str | None:
    """The attention implementation for one call (see ``ForwardOptions.attention_impl``)."""
    if requested is not None or jax.default_backend() != "gpu":
        return requested
    if segment_ids is None and softcap is None:
        return "cudnn"
    if mosaic_supports(q, sliding_window=window, softcap=softcap):
        return "mosaic"
    return None  # the Triton kernels


def _per_batch_shard(attend: Any, sharding: Any) -> Any:
    """``attend(q, k, v, segment_ids)`` run by each device on its own batch rows.

    Why: a Pallas kernel is a custom call XLA's partitioner cannot see into. With the batch
    split over the mesh it gathers every device's rows around the Triton kernels, so each
    device runs the whole batch's attention (twice the time on 2 H200s), and it fails to
    lower the Mosaic GPU kernels (BENCHMARKS.md §3). ``jax.shard_map`` over ``sharding`` (the
    activations' batch split) gives each device its rows instead; attention never mixes rows,
    so nothing is exchanged. cuDNN's attention has partitioning rules of its own.
    """
    spec = sharding.spec
    return jax.shard_map(attend, mesh=sharding.mesh, in_specs=spec, out_specs=spec, check_vma=False)


# The attention implementations that are Pallas kernels (opaque to XLA's partitioner).
_KERNEL_IMPLS = ("pallas", "mosaic")


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
    router_stats: bool = False,
) -> tuple[Array, dict[str, Array] | None]:
    """The layer's output, and (``router_stats``, MoE layers) its router's statistics for the
    load-balancing loss (``lorax.moe.router_statistics``; padding, segment id 0, left out)."""
    b, s, _ = h.shape
    projections = config.projections()
    keys = (
        dict(zip(projections, jax.random.split(dropout_key, len(projections)), strict=True))
        if dropout_key is not None
        else {}
    )
    # The MLP's groups are the dense MLP's (a shared expert's with experts beside it), or
    # the experts' (which ``moe`` runs itself).
    qkv_group, out_group, gate_up_group, down_group = config.projection_groups()[:4]

    def linears(names: tuple[str, ...], x: Array, key_salt: Array | None = None) -> list[Array]:
        # Projections of the same x go through the matmul layer together (one GEMM each way).
        salted = [keys.get(name) for name in names]
        if key_salt is not None:
            salted = [None if k is None else jax.random.fold_in(k, key_salt) for k in salted]
        stacked = layer.get(PREPARED, {}).get(group_key(names))
        projections = [
            (None if stacked is not None else layer[name]["weight"], layer[name].get("bias"),
             adapters.get(name))
            for name in names
        ]  # fmt: skip
        return lora_linears(
            x,
            projections,
            lora_cfg.scale if lora_cfg is not None else 0.0,
            dropout=lora_cfg.dropout if lora_cfg is not None else 0.0,
            dropout_keys=salted,
            impl=options.matmul_impl,
            config=_matmul_config(options),
            stacked_weight=stacked,
        )

    def norm(x: Array, name: str, eps: float = config.rms_norm_eps) -> Array:
        return rms_norm(x, layer[name], eps, config.norm_style)

    def split(outputs: list[Array], *sizes: int) -> list[Array]:
        # A fused projection (Phi-3's qkv_proj, gate_up_proj): its parts are row blocks.
        if len(outputs) > 1:
            return outputs
        return jnp.split(outputs[0], list(itertools.accumulate(sizes[:-1])), axis=-1)

    x = norm(h, "input_layernorm")
    if config.mla:
        q, k, v = _latent_attention_inputs(config, x, linears, norm, cos, sin)
    else:
        q, k, v = split(linears(qkv_group, x), config.q_size, config.kv_size, config.kv_size)
        q = q.reshape(b, s, config.num_heads, config.head_dim)
        k = k.reshape(b, s, config.num_kv_heads, config.head_dim)
        v = v.reshape(b, s, config.num_kv_heads, config.head_dim)
        if config.qk_norm:
            q, k = norm(q, "q_norm"), norm(k, "k_norm")
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q, k, v = remat_lib.name(q, "query"), remat_lib.name(k, "key"), remat_lib.name(v, "value")

    def attention_impl(window: int) -> str | None:
        return _attention_impl(
            options.attention_impl, segment_ids, q, window or None, config.attn_logit_softcap
        )

    def attend(window: int) -> Array:
        impl = attention_impl(window)

        def call(q: Array, k: Array, v: Array, segment_ids: Array | None) -> Array:
            return flash_attention(
                q,
                k,
                v,
                causal=True,
                sliding_window=window or None,
                softcap=config.attn_logit_softcap,
                segment_ids=segment_ids,
                scale=config.attention_scale,
                impl=impl,
                mosaic_config=_mosaic_config(options),
            )

        if options.activation_sharding is not None and resolve_impl(impl, None)[0] in _KERNEL_IMPLS:
            call = _per_batch_shard(call, options.activation_sharding)
        return call(q, k, v, segment_ids)

    # Attention kernels take the window as a static size, so layers with different windows
    # (full vs sliding) select among the few distinct sizes with a switch on scanned data.
    windows = distinct_windows(config)
    if len(windows) == 1:
        attn = attend(windows[0])
    else:
        attn = jax.lax.switch(window_index, [lambda w=w: attend(w) for w in windows])
    if resolve_impl(attention_impl(windows[0]), None)[0] == "reference":
        # A kernel's output is already kept by the kernel-residual policy (with its lse);
        # naming it too would stack the same values twice in the scan's residuals (measured:
        # +1.9 GiB at 1x8192 with the Mosaic kernels). Only plain XLA attention needs the name.
        attn = remat_lib.name(attn, "attention_out")
    if attn.shape[-1] != config.attention_output_size // config.num_heads:
        attn = attn[..., : config.v_head_dim]  # latent attention's values, padded (below)
    (attn_out,) = linears(out_group, attn.reshape(b, s, config.attention_output_size))
    if config.sandwich_norms:
        attn_out = norm(attn_out, "post_attention_layernorm")
    h = h + attn_out
    h = remat_lib.name(h, "attention_residual")

    mlp_norm = "pre_feedforward_layernorm" if config.sandwich_norms else "post_attention_layernorm"
    x = norm(h, mlp_norm)

    def moe(x: Array, chunk_index: Array | None = None) -> Array:
        return moe_mlp(
            x,
            layer,
            adapters,
            num_experts=config.num_experts,
            experts_per_token=config.experts_per_token,
            activation=lambda z: _activation(config.activation, z),
            lora_scale=lora_cfg.scale if lora_cfg is not None else 0.0,
            routing=config.routing(),
            round_weights=config.round_expert_weights,
            # The jnp reference is XLA's grouped matmul; otherwise the fastest that applies.
            impl="xla" if options.matmul_impl == "reference" else None,
        )

    def mlp(x: Array, chunk_index: Array | None = None) -> Array:
        # Chunks fold their index into the dropout keys so they draw different masks.
        f = config.mlp_width
        gate, up = split(linears(gate_up_group, x, chunk_index), f, f)
        gate, up = remat_lib.name(gate, "mlp_gate"), remat_lib.name(up, "mlp_up")
        (down,) = linears(down_group, _activation(config.activation, gate) * up, chunk_index)
        if config.sandwich_norms:
            down = norm(down, "post_feedforward_layernorm")
        return down

    def moe_and_shared_expert(x: Array, chunk_index: Array | None = None) -> Array:
        # The routed experts' output plus the shared expert's (gated: Qwen 2 MoE), the sum
        # rounded to the compute dtype as transformers adds them.
        shared = mlp(x, chunk_index)
        if config.shared_expert_gate:
            shared = gate_shared_expert(x, layer[SHARED_EXPERT_GATE]["weight"], shared)
        return moe(x, chunk_index) + shared

    stats = None
    if router_stats and config.moe:
        mask = None if segment_ids is None else segment_ids > 0
        stats = router_statistics(x, layer[ROUTER]["weight"], config.experts_per_token, mask)
    block = moe_and_shared_expert if config.shared_expert else moe if config.moe else mlp
    out = h + _chunked_over_tokens(block, x, options.mlp_chunk_tokens)
    return out, stats


def _latent_attention_inputs(
    config: ModelConfig, x: Array, linears: Any, norm: Any, cos: Array, sin: Array
) -> tuple[Array, Array, Array]:
    """Multi-head latent attention's (DeepSeek V2/V3) queries, keys and values ``[B, S, H, *]``
    from the normed hidden states ``x``, as transformers computes them.

    Each token's key/value latent (``kv_lora_rank`` wide, normed) is expanded per head into
    the key's position-free part and the value (``kv_b_proj``); the key's rotary part is one
    slice per token, turned by RoPE and shared by every head. Queries come from x directly
    (``q_proj``) or through their own normed latent (``q_a_proj``, ``q_b_proj``). The values
    are zero-padded to the query/key head width, so one attention kernel call takes all three
    (the output's padding columns are zero and are dropped before ``o_proj``).
    """
    b, s, _ = x.shape
    h, nope, rope = config.num_heads, config.qk_nope_head_dim, config.qk_rope_head_dim
    first, kv_a = linears(config.projection_groups()[0], x)

    def latent_norm(x: Array, name: str) -> Array:
        return norm(x, name, LATENT_NORM_EPS)

    if config.q_lora_rank is not None:
        (first,) = linears(("q_b_proj",), latent_norm(first, "q_a_layernorm"))
    q = first.reshape(b, s, h, config.head_dim)
    latent, k_rot = jnp.split(kv_a, [config.kv_lora_rank], axis=-1)
    (kv,) = linears(("kv_b_proj",), latent_norm(latent, "kv_a_layernorm"))
    k_pass, v = jnp.split(kv.reshape(b, s, h, nope + config.v_head_dim), [nope], axis=-1)
    q_pass, q_rot = jnp.split(q, [nope], axis=-1)
    q_rot, k_rot = latent_rope(config, q_rot, k_rot[:, :, None, :], cos, sin)
    q = jnp.concatenate([q_pass, q_rot], axis=-1)
    k = jnp.concatenate([k_pass, jnp.broadcast_to(k_rot, (b, s, h, rope))], axis=-1)
    v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, config.head_dim - config.v_head_dim)))
    return q, k, v


def latent_rope(
    config: ModelConfig, q: Array, k: Array, cos: Array, sin: Array
) -> tuple[Array, Array]:
    """Latent attention's rotary slices of queries and keys ``[B, S, H, qk_rope_head_dim]``
    (``rope_cos_sin``'s tables), turned by RoPE.

    With ``rope_interleave`` (DeepSeek's layout) the pairs (0, 1), (2, 3), ... turn together:
    each pair's members are first put half a slice apart, in queries and keys alike (an exact
    permutation, which leaves their dot products as they are; transformers keeps the pairs
    side by side in V2 and puts them half a slice apart in V3).
    """
    if config.rope_interleave:
        q, k = (jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1) for x in (q, k))
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def _scans(
    config: ModelConfig, segments: list[tuple[str, int]]
) -> list[tuple[str, LayerStack, int, int]]:
    """The forward's scans, in layer order: ``(remat policy, stack, first, stop)``, each over
    the stack's layers ``first:stop`` (positions in ``stack.layers``), which are consecutive
    layers of the model under one policy segment (``lorax.remat.schedule``)."""
    owner = {i: (stack, j) for stack in config.layer_stacks() for j, i in enumerate(stack.layers)}
    scans: list[tuple[str, LayerStack, int, int]] = []
    start = 0
    for kind, count in segments:
        for i in range(start, start + count):
            stack, j = owner[i]
            if i > start and scans[-1][1] is stack:
                scans[-1] = (kind, stack, scans[-1][2], j + 1)
            else:
                scans.append((kind, stack, j, j + 1))
        start += count
    return scans


def _chunked_over_tokens(fn: Any, x: Array, chunk: int | None) -> Array:
    """``fn(x)`` for a per-token ``fn(x, chunk_index=None)``, ``chunk`` tokens at a time.

    Each chunk is its own ``jax.checkpoint`` so the backward pass also holds one chunk's
    temporaries at a time. The tokens are padded up to a multiple of ``chunk`` (the padding
    rows are computed and dropped: ``fn`` is per token, so they cannot affect real rows).
    """
    b, s, d = x.shape
    n = b * s
    if chunk is None or n <= chunk:
        return fn(x)
    num_chunks = -(-n // chunk)
    flat = jnp.pad(x.reshape(n, d), ((0, num_chunks * chunk - n), (0, 0)))
    per_chunk = jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    out = jax.lax.map(
        lambda xs: per_chunk(*xs), (flat.reshape(num_chunks, chunk, d), jnp.arange(num_chunks))
    )
    return out.reshape(num_chunks * chunk, -1)[:n].reshape(b, s, -1)


def hidden_states(
    model: Model,
    lora: LoraWeights | None,
    input_ids: Array,
    *,
    positions: Array | None = None,
    segment_ids: Array | None = None,
    dropout_key: Array | None = None,
    options: ForwardOptions = ForwardOptions(),
    router_stats: bool = False,
) -> Array | tuple[Array, dict[str, Array]]:
    """The final normed hidden states ``[B, S, D]`` (what the LM head and the loss consume).

    With ``router_stats`` (a mixture-of-experts model), also the routers' statistics summed
    over layers and tokens, for ``lorax.moe.load_balancing_loss``.
    """
    if router_stats and not model.config.moe:
        raise ValueError(f"router_stats: {model.config.model_type} has no routed experts")
    if router_stats and model.config.routing() != Routing(
        model.config.experts_per_token, normalize=model.config.normalize_expert_weights
    ):
        # The load-balancing loss is Switch Transformer's over a softmax top-k (Mixtral's,
        # Qwen's); transformers computes none for DeepSeek's routing.
        raise ValueError(f"router_stats: {model.config.model_type}'s routing has no such loss")
    config = model.config
    params = model.params
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    b, s = input_ids.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    dtype = model.dtype
    h = embed(params["embed_tokens"], input_ids)
    if config.embedding_multiplier != 1.0:
        # Rounded to the compute dtype first, as HF's Gemma does (sqrt(3072) -> 55.5 in bf16).
        h = h * jnp.asarray(config.embedding_multiplier, h.dtype)

    lora_cfg = lora.config if lora is not None else None
    layer_keys = (
        jax.random.split(dropout_key, config.num_layers) if dropout_key is not None else None
    )

    def stack_body(stack: LayerStack) -> tuple[Any, Array]:
        """The scan body of ``stack``'s layers, and each layer's window index (into the
        stack's distinct windows, which pick its attention kernel and RoPE table)."""
        stack_config = stack.config
        windows = distinct_windows(stack_config)
        # One cos/sin table, or one per distinct window when the layers' RoPEs differ
        # (Gemma 3), picked per layer by the scanned window index.
        rope_per_window = len({stack_config.layer_rope(w) for w in windows}) > 1
        if rope_per_window:
            tables = [rope_cos_sin(stack_config, positions, dtype, w) for w in windows]
            cos, sin = (jnp.stack(t) for t in zip(*tables, strict=True))
        else:
            cos, sin = rope_cos_sin(stack_config, positions, dtype, windows[0])
        window_index = [windows.index(w) for w in stack_config.layer_windows]

        def body(carry: Array, xs: tuple) -> tuple[Array, dict[str, Array] | None]:
            layer, layer_adapters, window_index, key = xs
            if options.layer_weights_sharding is not None:
                # The adapters too: their A factors are stacked beside the gathered weights
                # in one GEMM operand, and a sharded A would make XLA split (and re-gather,
                # decoded) the weights to match. They are rank-r small; their gradients
                # reduce-scatter.
                layer, layer_adapters = jax.tree.map(
                    lambda p: jax.lax.with_sharding_constraint(p, options.layer_weights_sharding),
                    (layer, layer_adapters),
                )
            if options.activation_sharding is not None:
                carry = jax.lax.with_sharding_constraint(carry, options.activation_sharding)
            layer_cos, layer_sin = (cos, sin)
            if rope_per_window:
                layer_cos, layer_sin = cos[window_index], sin[window_index]
            return _decoder_layer(
                stack_config,
                lora_cfg,
                options,
                carry,
                layer,
                layer_adapters,
                window_index,
                layer_cos,
                layer_sin,
                segment_ids,
                key,
                router_stats,
            )

        return body, jnp.asarray(window_index, jnp.int32)

    per_scan = []
    segments = remat_lib.schedule(options.remat, config.num_layers)
    # One body (and RoPE table) per stack, whichever of its scans use it.
    bodies = {stack.key: stack_body(stack) for stack in config.layer_stacks()}
    for kind, stack, first, stop in _scans(config, segments):
        body, window_index = bodies[stack.key]
        layers = params[stack.key]
        adapters = lora.params.get(stack.key, {}) if lora is not None else {}
        # The scan's layers are consecutive layers of the model.
        keys = (
            None
            if layer_keys is None
            else layer_keys[stack.layers[first] : stack.layers[stop - 1] + 1]
        )

        def part(tree: Any, first: int = first, stop: int = stop) -> Any:
            return jax.tree.map(lambda a: a[first:stop], tree)

        if stop - first == len(stack.layers):
            xs = (layers, adapters, window_index, keys)
        else:
            # The frozen layers are indexed inside the body rather than sliced outside it,
            # so no scan copies its part of the (large) base weights.
            def indexed_body(
                carry: Array, xs: tuple, _body: Any = body, _layers: Any = layers
            ) -> tuple[Array, Any]:
                i, layer_adapters, window_index, key = xs
                layer = jax.tree.map(
                    lambda p, i=i: jax.lax.dynamic_index_in_dim(p, i, keepdims=False), _layers
                )
                return _body(carry, (layer, layer_adapters, window_index, key))

            body = indexed_body
            xs = (jnp.arange(first, stop), part(adapters), part(window_index), keys)
        body = remat_lib.apply(body, kind, options.offload_layer_inputs)
        h, stats = jax.lax.scan(body, h, xs)
        per_scan.append(stats)
    h = rms_norm(h, params["norm"], config.rms_norm_eps, config.norm_style)
    if not router_stats:
        return h
    per_scan = [stats for stats in per_scan if stats is not None]  # dense-MLP layers route none
    totals = jax.tree.map(lambda *per_layer: sum(x.sum(0) for x in per_layer), *per_scan)
    return h, totals


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
    A model with a final-logit softcap (Gemma 2) returns the capped logits.
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
    logits = jnp.einsum("bsd,vd->bsv", h, model.lm_head(), preferred_element_type=jnp.float32)
    return softcap_logits(logits, model.config.final_logit_softcap)


def softcap_logits(logits: Array, softcap: float | None) -> Array:
    """``c * tanh(logits / c)`` (Gemma 2's final-logit softcap); unchanged for None."""
    return logits if softcap is None else softcap * jnp.tanh(logits / softcap)
