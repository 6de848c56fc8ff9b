"""Static model configuration, read from a Hugging Face ``config.json``.

``ModelConfig`` is a frozen, hashable dataclass: it is the static half of a model, so
``jax.jit`` keys its cache on it and compiles once per (config, shape). Every field that
changes the computation lives here; everything else in ``config.json`` is ignored, and every
option we cannot honour is rejected by name instead of silently computing something else.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from convert.families import FAMILIES
from convert.names import (
    ALL_PROJECTIONS,
    ATTENTION,
    CAUSAL_LM,
    DENSE_LAYERS,
    EXPERT_PROJECTIONS,
    FUSED,
    FUSED_ATTENTION,
    FUSED_MLP,
    IMAGE_TEXT,
    LAYERS,
    LAYOUTS,
    MLP,
)
from convert.rope import llama3_rope_factors, longrope_default_attention_factor

# The HF ``model_type``s lorax computes (what each fixes: ``convert.families``).
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
GEMMA_MODEL_TYPES = ("gemma2", "gemma3_text")
# Image-text ``model_type``s whose language model lorax computes: the ``model_type`` of the
# language model (their ``text_config``'s), which the loaded ``ModelConfig`` takes.
IMAGE_TEXT_MODEL_TYPES = {"gemma3": "gemma3_text"}
# What the config classes of some families fill in for fields a config.json omits (transformers'
# ``Gemma3TextConfig``): hub image-text configs omit most of their ``text_config``'s fields
# (gemma-3-4b-it's names only the sizes, the window and the RoPE scaling).
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma3_text": dict(
        vocab_size=262_208,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        max_position_embeddings=131_072,
        rms_norm_eps=1e-6,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    ),
}
# Fields an image-text model's config.json keeps at its top level, which transformers reads
# from there rather than from text_config: tying the head (``Gemma3Config``'s default: tied)
# and the special tokens (gemma-3-4b-it's top-level eos_token_id is [1, 106]).
IMAGE_TEXT_TOP_LEVEL = {"tie_word_embeddings": True}
IMAGE_TEXT_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# The MLP activations (HF's ``ACT2FN`` names): SwiGLU's and Gemma's GeGLU (tanh approximation).
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
NORM_STYLES = ("llama", "gemma")

# The projections of one decoder layer, in HF's names (PEFT's target names too).
ATTENTION_PROJECTIONS = ATTENTION
MLP_PROJECTIONS = MLP
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
# The projections a decoder layer computes from the same input, as the forward calls them:
# each group is one matmul-layer call (one GEMM per direction).
PROJECTION_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"),
                     ("down_proj",))  # fmt: skip
# The same with q/k/v and gate/up stored fused (Phi-3): one projection per group.
FUSED_PROJECTIONS = FUSED_ATTENTION + FUSED_MLP
FUSED_PROJECTION_GROUPS = tuple((name,) for name in FUSED_PROJECTIONS)
# A mixture-of-experts layer's per-expert gate/up and down (Mixtral, Qwen 2/3 MoE, DeepSeek),
# after a shared expert's gate/up and down where it has one (Llama's MLP names and groups).
EXPERT_GROUPS = tuple((name,) for name in EXPERT_PROJECTIONS)

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
# Latent attention's biases (attention_bias): on the projections of x (q_a, kv_a) and o.
MLA_BIAS = ("q_a_proj", "kv_a_proj_with_mqa", "o_proj")
# Qwen 2's attention biases (and Qwen 2 MoE's, with qkv_bias): q, k and v, not o.
QKV_BIAS = ("q_proj", "k_proj", "v_proj")
# Families whose config classes have no attention_bias field: one in a config.json is ignored.
_NO_ATTENTION_BIAS = ("mistral", "mixtral", "phi3", "qwen2_moe")


class ConfigError(ValueError):
    """A ``config.json`` field we cannot honour; the message names the field and its value."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, covering HF's ``rope_scaling``/``rope_parameters`` types."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    # longrope (Phi-3): per-frequency divisors for rows up to original_max_position_embeddings
    # (short) and beyond (long).
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    # The share of each head's dims that rotate; the rest pass through (Phi-4-mini: 0.75).
    partial_rotary_factor: float = 1.0

    def rotary_dim(self, head_dim: int) -> int:
        """How many of a head's leading dims rotate."""
        return int(head_dim * self.partial_rotary_factor)


@dataclasses.dataclass(frozen=True)
class LayerStack:
    """Decoder layers of one structure: their parameters are stacked on a leading axis under
    ``params[key]`` (and the LoRA pytree's), in the order of ``layers``, the model's indices
    of them; ``config`` is the architecture of these layers alone."""

    key: str
    layers: tuple[int, ...]
    config: ModelConfig


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture of a decoder-only model: Llama's, and what other families change.

    The fields after ``layer_windows`` are the departures from Llama. Gemma 2/3: ``norm_style``
    ``"gemma"`` (RMSNorm scales by ``1 + weight`` in float32), ``sandwich_norms`` (each
    sub-layer's output is normed too, before the residual add), ``embedding_multiplier``
    (``sqrt(hidden_size)``), ``query_pre_attn_scalar``, the two softcaps and GeGLU. Qwen 3 and
    Gemma 3: ``qk_norm`` (an RMSNorm over each head's query and key before RoPE). Gemma 3:
    ``sliding_rope``, the RoPE of its sliding-window layers. Phi-3: ``fused_projections``.
    Mixtral, Qwen 2/3 MoE: the routed experts' fields; Qwen 2 MoE: a shared expert beside them.
    DeepSeek V2/V3: latent attention (``kv_lora_rank`` ...), its routing (``router_scoring``
    ...), shared experts and dense first layers (``dense_mlp_layers``, a second layer stack).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 2048
    # Projections that carry a bias (llama's attention_bias covers q, k, v and o; qwen2's
    # covers q, k and v; llama's mlp_bias covers gate, up and down).
    bias_projections: tuple[str, ...] = ()
    # Per layer: the attention window (a query at i sees keys j with i - w < j <= i), or 0 for
    # full causal attention. Data scanned over with the layers, not a Python branch.
    layer_windows: tuple[int, ...] = ()
    tie_word_embeddings: bool = False
    activation: str = "silu"
    norm_style: str = "llama"
    sandwich_norms: bool = False
    qk_norm: bool = False
    embedding_multiplier: float = 1.0
    # Attention scores are scaled by query_pre_attn_scalar ** -0.5 (None: head_dim ** -0.5).
    query_pre_attn_scalar: float | None = None
    # Scores (logits) become c * tanh(s / c) when set.
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # The RoPE of the sliding-window layers, where it differs from ``rope`` (Gemma 3).
    sliding_rope: RopeConfig | None = None
    # q/k/v stored as one ``qkv_proj`` and gate/up as one ``gate_up_proj`` (Phi-3).
    fused_projections: bool = False
    # A routed mixture of experts replaces the MLP when num_experts > 0 (Mixtral, Qwen 2/3 MoE):
    # each token goes through the experts_per_token most probable under the router's softmax,
    # weighted by their probabilities, renormalized to sum to one when
    # normalize_expert_weights (Qwen's norm_topk_prob; Mixtral always). Each expert is a
    # SwiGLU MLP of width expert_intermediate_size (None: intermediate_size, Mixtral's).
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int | None = None
    normalize_expert_weights: bool = True
    round_expert_weights: bool = False
    # Beside the routed experts, a shared expert when set (Qwen 2 MoE): a SwiGLU MLP of this
    # width (the layer's gate/up/down_proj) that every token goes through, its output scaled
    # by sigmoid(x · shared_expert_gate) and added to the experts'. intermediate_size is then
    # no layer's width (as for Qwen 3 MoE).
    shared_expert_intermediate_size: int | None = None
    # The layers of an MoE model whose MLP is a dense SwiGLU of intermediate_size instead
    # (Qwen MoE's mlp_only_layers / decoder_sparse_step): no router, no experts, no shared
    # expert. They are stacked apart from the routed layers (``layer_stacks``).
    dense_mlp_layers: tuple[int, ...] = ()
    # How the router chooses and weighs experts beyond Mixtral's softmax top-k
    # (``lorax.moe.Routing``, DeepSeek's): "sigmoid" scores, a per-expert bias added to the
    # scores when choosing (router_bias), experts chosen within the expert_groups_kept best of
    # expert_groups groups (scored by "max" or "top2_sum" of their experts), weights times
    # routed_scaling_factor, router logits in float32.
    router_scoring: str = "softmax"
    router_bias: bool = False
    expert_groups: int = 1
    expert_groups_kept: int = 1
    expert_group_score: str = "max"
    routed_scaling_factor: float = 1.0
    float32_router: bool = False
    # Multi-head latent attention (DeepSeek V2/V3), when kv_lora_rank is set: head_dim is a
    # query/key head's width, whose last qk_rope_head_dim dims RoPE turns (one key slice shared
    # by the heads); values are v_head_dim wide; queries go through a q_lora_rank latent when
    # that is set. rope_interleave: the rotary dims pair up as (0, 1), (2, 3), ... (DeepSeek's
    # layout) rather than (i, i + half).
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    # The router's load-balancing loss is added to the training loss with this weight
    # (transformers does when config.json sets output_router_logits); None: not added.
    router_aux_loss_coef: float | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # How the checkpoint this was read from lays its tensors out (``convert.names.LAYOUTS``):
    # a causal LM's, or an image-text model's whose language model this is (Gemma 3's 4B-27B).
    # The computation is the same; the PEFT format names modules by it and a merged export
    # says what it leaves out.
    checkpoint_layout: str = CAUSAL_LM

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (0,) * self.num_layers)
        if len(self.layer_windows) != self.num_layers:
            raise ConfigError(
                f"layer_windows has {len(self.layer_windows)} entries for "
                f"num_hidden_layers={self.num_layers}"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r}; supported: {ACTIVATIONS}")
        if self.norm_style not in NORM_STYLES:
            raise ConfigError(f"norm_style={self.norm_style!r}; supported: {NORM_STYLES}")
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok={self.experts_per_token} must be in "
                f"[1, num_local_experts={self.num_experts}]"
            )
        if self.num_experts and self.fused_projections:
            raise ConfigError("a mixture-of-experts model with fused projections is not supported")
        if self.shared_expert and not (self.num_experts and self.mlp_width > 0):
            raise ConfigError(
                f"shared_expert_intermediate_size={self.shared_expert_intermediate_size} needs "
                f"a positive width and routed experts (num_experts={self.num_experts})"
            )
        if self.mla and not (
            0 < self.qk_rope_head_dim <= self.head_dim
            and self.qk_rope_head_dim % 2 == 0
            and 0 < self.v_head_dim <= self.head_dim
        ):
            # (Values are padded to the query/key head for one attention call.)
            raise ConfigError(
                f"latent attention needs an even qk_rope_head_dim within the query/key head "
                f"({self.qk_rope_head_dim} of qk_nope_head_dim + qk_rope_head_dim = "
                f"{self.head_dim}) and 0 < v_head_dim <= {self.head_dim} ({self.v_head_dim})"
            )
        if self.moe:
            try:
                self.routing().check(self.num_experts)
            except ValueError as e:
                raise ConfigError(
                    f"routing {self.experts_per_token} of {self.num_experts} experts "
                    f"(n_routed_experts / num_experts_per_tok) in {self.expert_groups} groups, "
                    f"{self.expert_groups_kept} kept (n_group / topk_group): {e}"
                ) from None
        if self.dense_mlp_layers:
            dense = self.dense_mlp_layers
            if not self.moe:
                raise ConfigError(f"dense_mlp_layers={dense} needs routed experts (num_experts=0)")
            if (
                list(dense) != sorted(set(dense))
                or not 0 <= dense[0] <= dense[-1] < self.num_layers
            ):
                raise ConfigError(
                    f"dense_mlp_layers={dense} must be distinct ascending layer indices below "
                    f"num_hidden_layers={self.num_layers}"
                )
            if len(dense) == self.num_layers:
                raise ConfigError(
                    f"dense_mlp_layers={dense}: every layer is dense, so no layer routes to the "
                    f"{self.num_experts} experts"
                )
        if self.checkpoint_layout not in LAYOUTS:
            raise ConfigError(
                f"checkpoint_layout={self.checkpoint_layout!r}; supported: {tuple(LAYOUTS)}"
            )

    def layer_stacks(self) -> tuple[LayerStack, ...]:
        """The model's layers grouped by structure, each group one stack of parameters.

        One stack (``"layers"``, every layer, this config) unless some layers of an MoE model
        have a dense MLP: those then form a second stack (``"dense_layers"``) whose config is
        a dense model's. Each stack's config describes its own layers only (its
        ``num_layers`` counts them), so code written for a uniform stack runs on each.
        """
        if not self.dense_mlp_layers:
            return (LayerStack(LAYERS, tuple(range(self.num_layers)), self),)
        return _layer_stacks(self)

    def _split_stacks(self) -> tuple[LayerStack, ...]:
        dense = self.dense_mlp_layers
        routed = tuple(i for i in range(self.num_layers) if i not in dense)

        def view(layers: tuple[int, ...], **changes: Any) -> ModelConfig:
            windows = tuple(self.layer_windows[i] for i in layers)
            return dataclasses.replace(
                self, num_layers=len(layers), layer_windows=windows, dense_mlp_layers=(),
                **changes,
            )  # fmt: skip

        dense_config = view(
            dense,
            num_experts=0,
            experts_per_token=0,
            expert_intermediate_size=None,
            shared_expert_intermediate_size=None,
            router_aux_loss_coef=None,
        )
        return (
            LayerStack(LAYERS, routed, view(routed)),
            LayerStack(DENSE_LAYERS, dense, dense_config),
        )

    def stack_position(self, layer: int) -> tuple[LayerStack, int]:
        """The stack holding model layer ``layer``, and the layer's position in it."""
        for stack in self.layer_stacks():
            if layer in stack.layers:
                return stack, stack.layers.index(layer)
        raise IndexError(f"layer {layer} of a {self.num_layers}-layer model")

    def routing(self) -> Any:
        """The router's static choices, as ``lorax.moe.Routing``."""
        from lorax.moe import Routing

        return Routing(
            self.experts_per_token,
            scoring=self.router_scoring,
            correction_bias=self.router_bias,
            groups=self.expert_groups,
            groups_kept=self.expert_groups_kept,
            group_score=self.expert_group_score,
            normalize=self.normalize_expert_weights,
            # Sigmoid weights can all underflow to zero (DeepSeek V3 adds 1e-20 to their sum);
            # a softmax's cannot.
            normalize_eps=1e-20 if self.router_scoring == "sigmoid" else 0.0,
            scaling=self.routed_scaling_factor,
            float32_logits=self.float32_router,
        )

    @property
    def moe(self) -> bool:
        """Whether the MLP is a routed mixture of experts."""
        return self.num_experts > 0

    @property
    def expert_width(self) -> int:
        """Each expert's hidden width (its gate/up output, its down input)."""
        return self.expert_intermediate_size or self.intermediate_size

    @property
    def shared_expert(self) -> bool:
        """Whether an MoE layer has a shared expert beside its routed ones (Qwen 2 MoE)."""
        return self.shared_expert_intermediate_size is not None

    @property
    def mlp_width(self) -> int:
        """The width of the layer's gate/up/down_proj: the shared expert's beside routed
        experts, else intermediate_size."""
        shared = self.shared_expert_intermediate_size
        return self.intermediate_size if shared is None else shared

    @property
    def shared_expert_gate(self) -> bool:
        """Whether the shared expert's output is scaled by a sigmoid gate (Qwen 2 MoE's;
        DeepSeek adds its shared experts unscaled)."""
        return self.shared_expert and FAMILIES[self.model_type].shared_expert_gate

    @property
    def rope_in_float32(self) -> bool:
        """Whether RoPE turns queries and keys in float32 whatever the compute dtype, rounding
        once to it (DeepSeek V2, as transformers does; ``convert.families``)."""
        return FAMILIES[self.model_type].rope_in_float32

    def gate_parameters(self) -> int:
        """Per layer, the weights that only weigh outputs, never LoRA targets nor quantized:
        the router's [experts, D] (and its correction bias [experts]) and the shared
        expert's gate [1, D]."""
        gates = (self.num_experts + int(self.shared_expert_gate)) * self.hidden_size
        return gates + (self.num_experts if self.router_bias else 0)

    @property
    def attention_scale(self) -> float:
        """The factor attention scores are multiplied by before the softmax."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_norm_names(self) -> tuple[str, ...]:
        """The ``[hidden]`` RMSNorm weights of one decoder layer, in HF's names.

        Llama's ``post_attention_layernorm`` is the MLP's input norm; with sandwich norms
        (Gemma) it norms the attention output, and ``pre_feedforward_layernorm`` is the
        MLP's input norm.
        """
        names = ("input_layernorm", "post_attention_layernorm")
        if self.sandwich_norms:
            names += ("pre_feedforward_layernorm", "post_feedforward_layernorm")
        return names

    def layer_rope(self, window: int) -> RopeConfig:
        """The RoPE of a layer with attention ``window`` (0: full attention)."""
        return self.sliding_rope if window and self.sliding_rope is not None else self.rope

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def attention_output_size(self) -> int:
        """The width of the heads' concatenated outputs (o_proj's input)."""
        return self.num_heads * (self.v_head_dim if self.mla else self.head_dim)

    @property
    def mla(self) -> bool:
        """Whether attention is multi-head latent attention (DeepSeek V2/V3)."""
        return self.kv_lora_rank is not None

    @property
    def qk_nope_head_dim(self) -> int:
        """Latent attention: the dims of each query/key head that RoPE leaves alone."""
        return self.head_dim - self.qk_rope_head_dim

    @property
    def rope_head_dim(self) -> int:
        """The per-head width RoPE's frequencies are laid out over (latent attention's rotary
        slice, else the head)."""
        return self.qk_rope_head_dim if self.mla else self.head_dim

    def latent_norms(self) -> dict[str, int]:
        """Latent attention's RMSNorms over its latents, by HF name, with their widths."""
        if not self.mla:
            return {}
        norms = {"q_a_layernorm": self.q_lora_rank, "kv_a_layernorm": self.kv_lora_rank}
        return {name: width for name, width in norms.items() if width is not None}

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def projections(self) -> tuple[str, ...]:
        """The projections of one decoder layer, in HF's names and order (an MoE layer's
        expert projections: ``convert.names.EXPERT_PROJECTIONS``; a shared expert's are
        Llama's MLP names); with several layer stacks, those of any layer."""
        if self.dense_mlp_layers:
            return self._any_stack(ModelConfig.projections)
        return self.attention_projections() + self.mlp_projections()

    def projection_groups(self) -> tuple[tuple[str, ...], ...]:
        """The forward's matmul-layer calls, by the projections each computes from one input:
        q/k/v (or qkv, or latent attention's projections of x), o, gate/up (or gate_up, or
        the experts'), down; with a shared expert, its gate/up and down, then the experts';
        latent attention's expansions of its latents (q_b, kv_b) last."""
        if self.mla:
            first = "q_proj" if self.q_lora_rank is None else "q_a_proj"
            attention = ((first, "kv_a_proj_with_mqa"), ("o_proj",))
        else:
            attention = (FUSED_PROJECTION_GROUPS if self.fused_projections else PROJECTION_GROUPS)[
                :2
            ]
        if self.moe:
            mlp = (PROJECTION_GROUPS[2:] if self.shared_expert else ()) + EXPERT_GROUPS
        else:
            mlp = (FUSED_PROJECTION_GROUPS if self.fused_projections else PROJECTION_GROUPS)[2:]
        latent = ()
        if self.mla:
            latent = ((("q_b_proj",),) if self.q_lora_rank is not None else ()) + (("kv_b_proj",),)
        return attention + mlp + latent

    def attention_projections(self) -> tuple[str, ...]:
        if self.mla:
            queries = ("q_proj",) if self.q_lora_rank is None else ("q_a_proj", "q_b_proj")
            return (*queries, "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
        return FUSED_ATTENTION if self.fused_projections else ATTENTION_PROJECTIONS

    def mlp_projections(self) -> tuple[str, ...]:
        if self.dense_mlp_layers:
            return self._any_stack(ModelConfig.mlp_projections)
        if self.moe:
            return (MLP_PROJECTIONS if self.shared_expert else ()) + EXPERT_PROJECTIONS
        return FUSED_MLP if self.fused_projections else MLP_PROJECTIONS

    def _any_stack(self, names: Any) -> tuple[str, ...]:
        """The projections ``names(stack config)`` gives for any stack, in canonical order."""
        found = {p for stack in self.layer_stacks() for p in names(stack.config)}
        return tuple(p for p in (*ALL_PROJECTIONS, *EXPERT_PROJECTIONS) if p in found)

    def projection_shape(self, name: str) -> tuple[int, int]:
        """The HF ``[out, in]`` shape of one layer's projection ``name`` (of one expert's, for
        an expert projection)."""
        d, f = self.hidden_size, self.mlp_width
        shapes = {
            "q_proj": (self.q_size, d),
            "k_proj": (self.kv_size, d),
            "v_proj": (self.kv_size, d),
            "o_proj": (d, self.attention_output_size),
            "gate_proj": (f, d),
            "up_proj": (f, d),
            "down_proj": (d, f),
            "experts_gate_up_proj": (2 * self.expert_width, d),
            "experts_down_proj": (d, self.expert_width),
        }
        if self.mla:
            q_rank, kv_rank, h = self.q_lora_rank or 0, self.kv_lora_rank or 0, self.num_heads
            shapes |= {
                "q_a_proj": (q_rank, d),
                "q_b_proj": (self.q_size, q_rank),
                "kv_a_proj_with_mqa": (kv_rank + self.qk_rope_head_dim, d),
                "kv_b_proj": (h * (self.qk_nope_head_dim + self.v_head_dim), kv_rank),
            }
        if name in FUSED:
            return (sum(shapes[part][0] for part in FUSED[name]), d)
        return shapes[name]

    def projection_copies(self, name: str) -> int:
        """How many matrices of ``name``'s shape a layer holds (its experts, or one)."""
        return self.num_experts if name in EXPERT_PROJECTIONS else 1

    def adapter_batch_shape(self, name: str) -> tuple[int, ...]:
        """The leading axes of ``name``'s LoRA factors: the layers, then the experts for an
        expert projection (one A/B pair per expert)."""
        return (self.num_layers, *((self.num_experts,) if name in EXPERT_PROJECTIONS else ()))

    def active_projection_copies(self, name: str) -> int:
        """How many matrices of ``name``'s shape each token multiplies (its routed experts)."""
        return self.experts_per_token if name in EXPERT_PROJECTIONS else 1

    def num_parameters(self) -> int:
        """Parameters in the model (embeddings, projections with every expert, routers and
        gates, biases, norms, head)."""
        layers = sum(len(s.layers) * s.config.layer_parameters() for s in self.layer_stacks())
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.vocab_size * self.hidden_size + layers + self.hidden_size + head

    def layer_parameters(self) -> int:
        """Parameters in one decoder layer (of a uniform stack: ``layer_stacks``)."""
        linear = sum(
            self.projection_copies(p) * int(np.prod(self.projection_shape(p)))
            for p in self.projections()
        )
        linear += self.gate_parameters()
        biases = sum(self.projection_shape(p)[0] for p in self.bias_projections)
        norms = len(self.layer_norm_names()) * self.hidden_size + sum(self.latent_norms().values())
        return linear + biases + norms + (2 * self.head_dim if self.qk_norm else 0)

    # ------------------------------------------------------------------ reading HF configs

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], *, source: str = "config.json") -> ModelConfig:
        """Builds the config from a parsed HF ``config.json``; rejects what we cannot compute.

        Fields a family's config class has defaults for (transformers fills them in when it
        reads the file) get the same defaults here, so hub configs that omit them load.
        An image-text model (``IMAGE_TEXT_MODEL_TYPES``: Gemma 3's 4B-27B) gives the config
        of its language model, read from its ``text_config`` (``checkpoint_layout`` says so).
        """
        layout = CAUSAL_LM
        if hf.get("model_type") in IMAGE_TEXT_MODEL_TYPES:
            hf, layout = language_model_dict(hf, source), IMAGE_TEXT
            source = f"{source} (text_config)"
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: unsupported model_type={model_type!r}; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}, and the language model of "
                f"{', '.join(IMAGE_TEXT_MODEL_TYPES)}"
            )
        hf = {**HF_DEFAULTS.get(model_type, {}), **hf}
        gemma = model_type in GEMMA_MODEL_TYPES
        family = FAMILIES[model_type]

        def need(key: str) -> Any:
            if key not in hf or hf[key] is None:
                raise ConfigError(f"{source}: required field {key!r} is missing")
            return hf[key]

        # Gemma's modules read ``hidden_activation``; the others ``hidden_act``.
        act_key = "hidden_activation" if gemma else "hidden_act"
        act = hf.get(act_key) or family.activation
        if act != family.activation:
            raise ConfigError(
                f"{source}: unsupported {act_key}={act!r} for {model_type}; "
                f"supported: {family.activation!r}"
            )
        if hf.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(f"{source}: unsupported pretraining_tp={hf['pretraining_tp']!r}")
        if hf.get("use_bidirectional_attention"):
            raise ConfigError(
                f"{source}: use_bidirectional_attention=True (an embedding model) is not a "
                "causal language model"
            )

        hidden = int(need("hidden_size"))
        num_heads = int(need("num_attention_heads"))
        num_kv = int(hf.get("num_key_value_heads") or num_heads)
        num_layers = int(need("num_hidden_layers"))
        head_dim = int(hf.get("head_dim") or (256 if gemma else hidden // num_heads))
        mla_fields = _mla_fields(hf, source) if family.mla else {}
        if family.mla:
            # The config classes set head_dim (RoPE's width) and num_key_value_heads (every
            # head gets its own key and value from the latent) themselves.
            head_dim, num_kv = mla_fields.pop("head_dim"), num_heads

        bias: tuple[str, ...] = ()
        if model_type == "qwen2" or (model_type == "qwen2_moe" and hf.get("qkv_bias", True)):
            bias = QKV_BIAS  # Qwen 2 MoE's switch for them: qkv_bias (no o_proj bias)
        elif family.mla and hf.get("attention_bias"):
            bias = MLA_BIAS if mla_fields["q_lora_rank"] is not None else MLA_BIAS[1:]
        elif model_type not in _NO_ATTENTION_BIAS and hf.get("attention_bias"):
            bias = ATTENTION_PROJECTIONS
        if model_type == "llama" and hf.get("mlp_bias"):
            bias = bias + MLP_PROJECTIONS

        rope, sliding_rope = _ropes_from_hf(hf, model_type, source)
        if model_type != "phi3" and rope.partial_rotary_factor != 1.0:
            # transformers' other families rotate whole heads whatever this field says.
            raise ConfigError(
                f"{source}: unsupported partial_rotary_factor={rope.partial_rotary_factor!r} "
                f"for {model_type} (only phi3 rotates part of each head)"
            )
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(eos)
        moe_fields = _moe_fields(hf, model_type, source) if family.moe else {}
        if family.mla and rope.type != "default" and rope.mscale_all_dim and rope.factor > 1:
            # DeepSeek's softmax scale grows with YaRN's context factor: times mscale².
            scale = 0.1 * rope.mscale_all_dim * math.log(rope.factor) + 1.0
            mla_fields["query_pre_attn_scalar"] = head_dim / scale**4
        gemma_fields: dict[str, Any] = {}
        if gemma:
            softcap_defaults = (50.0, 30.0) if model_type == "gemma2" else (None, None)
            gemma_fields = dict(
                query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
                attn_logit_softcap=_optional_float(
                    hf.get("attn_logit_softcapping", softcap_defaults[0])
                ),
                final_logit_softcap=_optional_float(
                    hf.get("final_logit_softcapping", softcap_defaults[1])
                ),
            )
        return cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=rope,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            bias_projections=bias,
            layer_windows=_layer_windows_from_hf(hf, model_type, num_layers, source),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            activation=family.activation,
            norm_style=family.norm_style,
            sandwich_norms=family.sandwich_norms,
            qk_norm=family.qk_norm,
            round_expert_weights=family.round_expert_weights,
            fused_projections=family.fused_projections,
            embedding_multiplier=family.embedding_multiplier(hidden),
            sliding_rope=sliding_rope,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"),
            checkpoint_layout=layout,
            **gemma_fields,
            **moe_fields,
            **mla_fields,
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> ModelConfig:
        with open(path, encoding="utf-8") as f:
            try:
                hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from e
        return cls.from_hf_dict(hf, source=str(path))


@functools.cache
def _layer_stacks(config: ModelConfig) -> tuple[LayerStack, ...]:
    """``config``'s two layer stacks, built once per config (the views are configs too, and
    every walk over a model's layers asks for them)."""
    return config._split_stacks()


def language_model_dict(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The config.json dict of an image-text model's language model: its ``text_config``,
    with the fields transformers reads from the top level (``IMAGE_TEXT_TOP_LEVEL``, and the
    token ids where the top level sets them)."""
    wrapper = hf["model_type"]
    text = hf.get("text_config")
    if not isinstance(text, Mapping):
        raise ConfigError(
            f"{source}: model_type={wrapper!r} (an image-text model) needs a 'text_config' "
            f"object for its language model, got {text!r}"
        )
    expected = IMAGE_TEXT_MODEL_TYPES[wrapper]
    if text.get("model_type", expected) != expected:
        raise ConfigError(
            f"{source}: text_config.model_type={text['model_type']!r}; a {wrapper!r} model's "
            f"language model is {expected!r}"
        )
    merged = {**text, "model_type": expected}
    for key, default in IMAGE_TEXT_TOP_LEVEL.items():
        merged[key] = hf.get(key, default)
    for key in IMAGE_TEXT_TOKEN_IDS:
        if hf.get(key) is not None:
            merged[key] = hf[key]
    return merged


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


# The keys a Qwen MoE config.json may count its experts by, and transformers' defaults for the
# MoE fields it may omit (Qwen3MoeConfig's, Qwen2MoeConfig's: Qwen1.5-MoE-A2.7B's shape).
_EXPERT_COUNT_KEYS = {
    "qwen3_moe": ("num_experts", "num_local_experts"),
    "qwen2_moe": ("num_experts",),
}
_QWEN_MOE_DEFAULTS = {
    "qwen3_moe": dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768),
    "qwen2_moe": dict(
        num_experts=60,
        num_experts_per_tok=4,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
    ),
}


def _moe_fields(hf: Mapping[str, Any], model_type: str, source: str) -> dict[str, Any]:
    """The experts' count, top-k, width and weighting, and the load-balancing loss
    (transformers' defaults for ``model_type``)."""
    if hf.get("router_jitter_noise"):
        # transformers scales the MoE input by uniform noise in training mode only; lorax
        # would train a different function.
        raise ConfigError(
            f"{source}: router_jitter_noise={hf['router_jitter_noise']!r} is not supported "
            "(only 0.0, Mixtral's value)"
        )
    aux_loss = (
        float(hf.get("router_aux_loss_coef", 0.001)) if hf.get("output_router_logits") else None
    )
    if model_type == "mixtral":
        return dict(
            num_experts=int(hf.get("num_local_experts", 8)),
            experts_per_token=int(hf.get("num_experts_per_tok", 2)),
            router_aux_loss_coef=aux_loss,
        )
    if FAMILIES[model_type].mla:
        return _deepseek_moe_fields(hf, model_type, source, aux_loss)
    # Qwen's MoE: Qwen 3's hub files say num_experts, transformers >= 5 writes
    # num_local_experts (its attribute map); Qwen 2 MoE's config reads num_experts alone.
    keys = _EXPERT_COUNT_KEYS[model_type]
    counts = {hf[k] for k in keys if hf.get(k) is not None}
    if len(counts) > 1:
        raise ConfigError(
            f"{source}: num_experts={hf['num_experts']!r} and "
            f"num_local_experts={hf['num_local_experts']!r} disagree"
        )
    dense_layers = _dense_mlp_layers(hf, source)
    defaults = _QWEN_MOE_DEFAULTS[model_type]

    def field(key: str) -> int:
        return int(hf.get(key, defaults[key]))

    shared = {}
    if FAMILIES[model_type].shared_expert:
        shared["shared_expert_intermediate_size"] = field("shared_expert_intermediate_size")
    return dict(
        num_experts=int(counts.pop() if counts else defaults["num_experts"]),
        experts_per_token=field("num_experts_per_tok"),
        expert_intermediate_size=field("moe_intermediate_size"),
        normalize_expert_weights=bool(hf.get("norm_topk_prob", False)),
        router_aux_loss_coef=aux_loss,
        dense_mlp_layers=dense_layers,
        **shared,
    )


def _deepseek_moe_fields(
    hf: Mapping[str, Any], model_type: str, source: str, aux_loss: float | None
) -> dict[str, Any]:
    """DeepSeek V2/V3's experts, shared experts, dense first layers and routing, with
    transformers' defaults (DeepseekV2Config's, DeepseekV3Config's: DeepSeek-V3's shape)."""
    v3 = model_type == "deepseek_v3"
    defaults = _DEEPSEEK_DEFAULTS[model_type]

    def field(key: str) -> Any:
        value = hf.get(key)
        value = defaults.get(key) if value is None else value
        if value is None:
            raise ConfigError(f"{source}: required field {key!r} is missing")
        return value

    if aux_loss is not None:
        raise ConfigError(
            f"{source}: output_router_logits=true: transformers computes no load-balancing "
            f"loss for {model_type}, so lorax would train on another loss"
        )
    if int(hf.get("moe_layer_freq") or 1) != 1:
        raise ConfigError(
            f"{source}: moe_layer_freq={hf['moe_layer_freq']!r} is not supported (transformers "
            "routes every layer from first_k_dense_replace on)"
        )
    num_layers = int(hf["num_hidden_layers"])
    first_dense = int(field("first_k_dense_replace"))
    if not 0 <= first_dense < num_layers:
        raise ConfigError(
            f"{source}: first_k_dense_replace={first_dense} must leave a routed layer among "
            f"num_hidden_layers={num_layers}"
        )
    width = int(field("moe_intermediate_size"))
    shared = int(field("n_shared_experts") or 0)
    if shared < 1:
        raise ConfigError(f"{source}: n_shared_experts={shared}; lorax computes DeepSeek with 1+")
    if v3:
        routing = dict(
            router_scoring="sigmoid",
            router_bias=True,
            expert_groups=int(field("n_group")),
            expert_groups_kept=int(field("topk_group")),
            expert_group_score="top2_sum",
            normalize_expert_weights=bool(field("norm_topk_prob")),
        )
    else:
        method = field("topk_method")
        if method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(
                f"{source}: topk_method={method!r}; transformers' deepseek_v2 supports "
                "'greedy' and 'group_limited_greedy'"
            )
        if hf.get("norm_topk_prob"):
            # transformers' DeepseekV2 ignores the field (DeepSeek's own code normalizes).
            raise ConfigError(
                f"{source}: norm_topk_prob=true is ambiguous for deepseek_v2 (transformers "
                "ignores it, DeepSeek's code renormalizes); every released V2 has it false"
            )
        grouped = method == "group_limited_greedy"
        routing = dict(
            expert_groups=int(field("n_group")) if grouped else 1,
            expert_groups_kept=int(field("topk_group")) if grouped else 1,
            normalize_expert_weights=False,
        )
    return dict(
        num_experts=int(field("n_routed_experts")),
        experts_per_token=int(field("num_experts_per_tok")),
        expert_intermediate_size=width,
        shared_expert_intermediate_size=shared * width if shared else None,
        dense_mlp_layers=tuple(range(first_dense)),
        routed_scaling_factor=float(field("routed_scaling_factor")),
        float32_router=True,
        **routing,
    )


# transformers' defaults for the DeepSeek fields a config.json may omit.
_DEEPSEEK_DEFAULTS = {
    "deepseek_v2": dict(
        first_k_dense_replace=0, n_routed_experts=64, num_experts_per_tok=None,
        moe_intermediate_size=1407, n_shared_experts=2, routed_scaling_factor=1.0,
        topk_method="greedy", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128,
    ),
    "deepseek_v3": dict(
        first_k_dense_replace=3, n_routed_experts=256, num_experts_per_tok=8,
        moe_intermediate_size=2048, n_shared_experts=1, routed_scaling_factor=2.5,
        n_group=8, topk_group=4, norm_topk_prob=True, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_interleave=True,
    ),
}  # fmt: skip


def _mla_fields(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Latent attention's widths (and ``head_dim``, the query/key head's), with transformers'
    defaults for the family."""
    model_type = hf["model_type"]
    defaults = _DEEPSEEK_DEFAULTS[model_type]

    def width(key: str) -> int | None:
        value = hf.get(key, defaults[key])
        return None if value is None else int(value)

    rope, nope = width("qk_rope_head_dim"), width("qk_nope_head_dim")
    return dict(
        head_dim=nope + rope,
        q_lora_rank=width("q_lora_rank"),
        kv_lora_rank=width("kv_lora_rank"),
        qk_rope_head_dim=rope,
        v_head_dim=width("v_head_dim"),
        # transformers' DeepseekV2 always rotates interleaved pairs (as complex numbers).
        rope_interleave=bool(hf.get("rope_interleave", True))
        if model_type == "deepseek_v3"
        else True,
    )


def _dense_mlp_layers(hf: Mapping[str, Any], source: str) -> tuple[int, ...]:
    """The layers of a Qwen MoE model with a dense MLP, as transformers picks them: those in
    ``mlp_only_layers``, and those whose number (from 1) ``decoder_sparse_step`` does not
    divide."""
    num_layers = int(hf["num_hidden_layers"])
    listed = hf.get("mlp_only_layers") or []
    step = hf.get("decoder_sparse_step")
    step = 1 if step is None else step
    if not isinstance(step, int) or step < 1:
        raise ConfigError(f"{source}: decoder_sparse_step={step!r} must be a positive integer")
    strays = [i for i in listed if not isinstance(i, int) or not 0 <= i < num_layers]
    if strays:
        raise ConfigError(
            f"{source}: mlp_only_layers={list(listed)} names {strays}, not layers of "
            f"num_hidden_layers={num_layers}"
        )
    return tuple(i for i in range(num_layers) if i in listed or (i + 1) % step)


def _ropes_from_hf(
    hf: Mapping[str, Any], model_type: str, source: str
) -> tuple[RopeConfig, RopeConfig | None]:
    """The RoPE of full-attention layers, and of sliding ones where it differs (Gemma 3).

    transformers >= 5 writes Gemma 3's as ``rope_parameters`` per layer type; older files as
    ``rope_theta`` + ``rope_scaling`` for the full layers and ``rope_local_base_freq`` (plain
    RoPE) for the sliding ones.
    """
    if model_type != "gemma3_text":
        return _rope_from_hf(hf, source), None
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        ropes = []
        for layer_type in ("full_attention", "sliding_attention"):
            if not params.get(layer_type):
                raise ConfigError(f"{source}: rope_parameters has no {layer_type!r} entry")
            ropes.append(_rope_from_hf({**hf, "rope_parameters": params[layer_type]}, source))
        return ropes[0], ropes[1]
    full = _rope_from_hf({**hf, "rope_theta": hf.get("rope_theta", 1_000_000.0)}, source)
    return full, RopeConfig(theta=float(hf.get("rope_local_base_freq", 10_000.0)))


def _rope_from_hf(hf: Mapping[str, Any], source: str) -> RopeConfig:
    # transformers >= 5 writes ``rope_parameters`` (theta inside); older files ``rope_scaling``
    # plus a top-level ``rope_theta``.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if hf.get("model_type") == "phi3" and rope_type in ("su", "yarn"):
        rope_type = "longrope"  # Phi-3's older names for it (transformers maps them too)
    partial = params.pop("partial_rotary_factor", None) or hf.get("partial_rotary_factor") or 1.0
    if not 0.0 < float(partial) <= 1.0:
        raise ConfigError(f"{source}: partial_rotary_factor={partial!r} is not in (0, 1]")
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"{source}: unsupported rope_scaling type {rope_type!r}; supported: "
            f"{', '.join(ROPE_TYPES)}"
        )
    known = {f.name for f in dataclasses.fields(RopeConfig)} - {"theta", "type"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"{source}: unsupported rope_scaling field(s) {unknown} for {rope_type}")
    if rope_type == "longrope":
        # Phi-3 keeps the pre-training length at the top level of config.json.
        params.setdefault(
            "original_max_position_embeddings", hf.get("original_max_position_embeddings")
        )
        for key in ("short_factor", "long_factor", "original_max_position_embeddings"):
            if params.get(key) is None:
                raise ConfigError(f"{source}: longrope RoPE scaling needs {key!r}")
        for key in ("short_factor", "long_factor"):
            params[key] = tuple(float(x) for x in params[key])
    if rope_type != "default" and params.get("factor") is None:
        if rope_type in ("yarn", "longrope") and params.get("original_max_position_embeddings"):
            params["factor"] = (
                hf["max_position_embeddings"] / params["original_max_position_embeddings"]
            )
        else:
            raise ConfigError(f"{source}: rope_scaling type {rope_type!r} needs 'factor'")
    if rope_type in ("llama3", "yarn"):
        params.setdefault(
            "original_max_position_embeddings", hf.get("max_position_embeddings", 2048)
        )
    clean = {k: v for k, v in params.items() if v is not None}
    return RopeConfig(
        theta=float(theta), type=rope_type, partial_rotary_factor=float(partial), **clean
    )


def _layer_windows_from_hf(
    hf: Mapping[str, Any], model_type: str, num_layers: int, source: str
) -> tuple[int, ...]:
    window = hf.get("sliding_window")
    if model_type in ("mistral", "mixtral", "phi3"):  # one window on every layer
        return (int(window or 0),) * num_layers
    if model_type == "qwen3_moe":  # every layer, only with use_sliding_window
        window = hf.get("sliding_window", 4096)  # transformers' default
        return (int(window or 0) if hf.get("use_sliding_window") else 0,) * num_layers
    if model_type in ("qwen2", "qwen3", "qwen2_moe", *GEMMA_MODEL_TYPES):
        layer_types = hf.get("layer_types")
        if model_type in ("qwen2_moe", *GEMMA_MODEL_TYPES):
            window = hf.get("sliding_window", 4096)  # transformers' default
        if model_type in GEMMA_MODEL_TYPES:
            if layer_types is None:
                # Gemma 2 alternates (sliding first); Gemma 3 has one full layer in `pattern`.
                pattern = 2 if model_type == "gemma2" else int(hf.get("sliding_window_pattern", 6))
                layer_types = [
                    "sliding_attention" if (i + 1) % pattern else "full_attention"
                    for i in range(num_layers)
                ]
        elif not hf.get("use_sliding_window"):
            if model_type == "qwen2_moe" and "sliding_attention" in (layer_types or ()):
                # Qwen2MoeConfig zeroes the window then, and transformers fails on its layers.
                raise ConfigError(
                    f"{source}: layer_types has sliding_attention layers but "
                    "use_sliding_window is false; set use_sliding_window (and sliding_window) "
                    "or make every layer full_attention"
                )
            return (0,) * num_layers
        elif layer_types is None:
            layer_types = _qwen_default_layer_types(hf, model_type, num_layers)
        if len(layer_types) != num_layers:
            raise ConfigError(
                f"{source}: layer_types has {len(layer_types)} entries for "
                f"num_hidden_layers={num_layers}"
            )
        windows = []
        for t in layer_types:
            if t not in ("sliding_attention", "full_attention"):
                raise ConfigError(f"{source}: unsupported layer_types entry {t!r}")
            windows.append(int(window) if t == "sliding_attention" and window else 0)
        return tuple(windows)
    if window:
        raise ConfigError(f"{source}: sliding_window={window!r} is not supported for {model_type}")
    return (0,) * num_layers


def _qwen_default_layer_types(hf: Mapping[str, Any], model_type: str, num_layers: int) -> list[str]:
    """transformers' layer_types for a Qwen config.json that slides a window and lists none.

    Qwen 2/3 slide every layer from ``max_window_layers`` on. Qwen 2 MoE, as
    ``Qwen2MoeConfig`` spells it since transformers 5 (earlier versions windowed only their
    flash-attention path, from ``max_window_layers`` on): every other layer, the first
    included, below ``max_window_layers`` (default 28). No released Qwen 2 MoE slides.
    """
    if model_type == "qwen2_moe":
        below = int(hf.get("max_window_layers", 28))
        sliding = [i % 2 == 0 and i < below for i in range(num_layers)]
    else:
        first = int(hf.get("max_window_layers", num_layers))
        sliding = [i >= first for i in range(num_layers)]
    return ["sliding_attention" if s else "full_attention" for s in sliding]


# ---------------------------------------------------------------------------------- RoPE


def rope_frequencies(rope: RopeConfig, head_dim: int, seq_len: int, max_pos: int):
    """Inverse frequencies ``[rotary_dim // 2]`` (float32 numpy) and the cos/sin scale.

    Computed on the host once per trace: they depend only on static config. ``seq_len`` is
    read by ``dynamic`` scaling, which (like HF) rescales once sequences outgrow
    ``max_position_embeddings`` (we take the static row length for HF's ``max(position)+1``),
    and by ``longrope``, whose long factors apply beyond ``original_max_position_embeddings``
    (the model passes both lengths and picks by the positions, as HF does).
    """
    head_dim = rope.rotary_dim(head_dim)
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    inv_freq = 1.0 / rope.theta**exponents
    attention_factor = 1.0
    if rope.type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.type == "dynamic":
        n = max(seq_len, max_pos)
        base = rope.theta * ((rope.factor * n / max_pos) - (rope.factor - 1)) ** (
            head_dim / (head_dim - 2)
        )
        inv_freq = 1.0 / base**exponents
    elif rope.type == "llama3":
        inv_freq = inv_freq / llama3_rope_factors(
            rope.theta,
            head_dim,
            rope.factor,
            rope.low_freq_factor,
            rope.high_freq_factor,
            rope.original_max_position_embeddings,
        ).astype(np.float64)
    elif rope.type == "yarn":
        inv_freq, attention_factor = _yarn(rope, head_dim, exponents)
    elif rope.type == "longrope":
        long = seq_len > rope.original_max_position_embeddings
        factors = np.asarray(rope.long_factor if long else rope.short_factor, np.float64)
        if factors.shape != inv_freq.shape:
            raise ConfigError(
                f"longrope {'long' if long else 'short'}_factor has {factors.size} entries for "
                f"a rotary dim of {head_dim} ({inv_freq.size} frequencies)"
            )
        # float32 like HF's: its factors and base powers are float32 tensors.
        base_powers = rope.theta ** exponents.astype(np.float32)
        inv_freq = 1.0 / (factors.astype(np.float32) * base_powers)
        attention_factor = rope.attention_factor
        if attention_factor is None:
            attention_factor = longrope_default_attention_factor(
                rope.factor, rope.original_max_position_embeddings
            )
    return inv_freq.astype(np.float32), attention_factor


def _yarn(rope: RopeConfig, head_dim: int, exponents: np.ndarray):
    factor = rope.factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        old = rope.original_max_position_embeddings
        return head_dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = rope.theta**exponents
    inv_freq = (1 / (factor * pos_freqs)) * (1 - extrapolation) + (1 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)
