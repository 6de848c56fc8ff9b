"""The one map between lorax's stacked parameter paths and Hugging Face tensor names.

Loaders, exporters and the PEFT adapter format all derive their names from here, so a new
family or renamed tensor is a change in one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

# Where the stacked decoder layers sit in the parameter pytrees (``ModelConfig.layer_stacks``):
# every layer, or an MoE model's routed layers when some layers have a dense MLP instead,
# which then sit under DENSE_LAYERS.
LAYERS = "layers"
DENSE_LAYERS = "dense_layers"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# Phi-3 stores q/k/v as one projection and gate/up as another (PEFT targets these names too):
# each fused projection's output rows are its parts' rows, concatenated in this order.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
FUSED_ATTENTION = ("qkv_proj", "o_proj")
FUSED_MLP = ("gate_up_proj", "down_proj")
# Multi-head latent attention (DeepSeek V2/V3): queries from x (q_proj) or through a rank
# q_lora_rank latent (q_a_proj, then q_b_proj); a latent of each token and its shared RoPE key
# (kv_a_proj_with_mqa), expanded into each head's key and value (kv_b_proj).
MLA = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLA_NORMS = ("q_a_layernorm", "kv_a_layernorm")  # RMSNorms of the two latents
# Every projection name of every family, in an order each family's own order is a part of.
ALL_PROJECTIONS = ("qkv_proj", "q_proj", "q_a_proj", "q_b_proj", "k_proj", "v_proj",
                   "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_up_proj", *MLP)  # fmt: skip
QK_NORMS = ("q_norm", "k_norm")  # per-head RMSNorms of queries and keys (Qwen 3, Gemma 3)
# A mixture-of-experts MLP (Mixtral, Qwen 2/3 MoE): a router and per-expert projections, each
# stacked on an expert axis after the layer axis. Each lorax name is a LoRA target too; PEFT
# adapts it as the 3-D parameter ``mlp.experts.<HF name>`` (``target_parameters``).
ROUTER = "router"  # HF: <module>.gate, [experts, hidden], never quantized
# A shared expert's gate (Qwen 2 MoE): its output's scale is sigmoid(x · gate). HF:
# <module>.shared_expert_gate, [1, hidden], frozen like the router and never quantized. The
# shared expert's own projections are the layer's gate/up/down_proj (LoRA targets, by PEFT's
# suffix match on those names too).
SHARED_EXPERT_GATE = "shared_expert_gate"
# DeepSeek V3's per-expert bias added to the router's scores when choosing experts, never to
# the weights. HF: <module>.gate.e_score_correction_bias, [experts], float32; frozen.
ROUTER_BIAS = "router_bias"
EXPERT_PROJECTIONS = ("experts_gate_up_proj", "experts_down_proj")
EXPERT_HF_PARAMETERS = {"experts_gate_up_proj": "gate_up_proj", "experts_down_proj": "down_proj"}


@dataclasses.dataclass(frozen=True)
class ExpertCheckpoint:
    """How a family's checkpoints name an MoE layer's router and per-expert matrices
    (transformers >= 5 still saves these, though it computes with 3-D parameters).

    ``module`` holds the router (``gate``) and ``experts.<e>.<part>``; ``parts`` are each
    expert projection's matrices in row order (gate/up's rows: gate's, then up's), each
    quantized on its own. ``shared_expert``: the submodule of ``module`` holding a shared
    expert's gate/up/down_proj, where the family has one (its gate is
    ``<module>.shared_expert_gate``).
    """

    module: str
    parts: dict[str, tuple[str, ...]]
    shared_expert: str | None = None


_QWEN_EXPERT_PARTS = {
    "experts_gate_up_proj": ("gate_proj", "up_proj"),
    "experts_down_proj": ("down_proj",),
}
EXPERT_CHECKPOINTS = {
    "mixtral": ExpertCheckpoint(
        "block_sparse_moe", {"experts_gate_up_proj": ("w1", "w3"), "experts_down_proj": ("w2",)}
    ),
    "qwen3_moe": ExpertCheckpoint("mlp", _QWEN_EXPERT_PARTS),
    "qwen2_moe": ExpertCheckpoint("mlp", _QWEN_EXPERT_PARTS, shared_expert="shared_expert"),
    "deepseek_v2": ExpertCheckpoint("mlp", _QWEN_EXPERT_PARTS, shared_expert="shared_experts"),
    "deepseek_v3": ExpertCheckpoint("mlp", _QWEN_EXPERT_PARTS, shared_expert="shared_experts"),
}
# The Llama MLP projections each expert projection computes (for scripts written with those).
EXPERT_MLP = {"experts_gate_up_proj": ("gate_proj", "up_proj"), "experts_down_proj": ("down_proj",)}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One parameter: its path in the pytree, its HF name template and its HF shape.

    ``hf_name`` contains ``{i}`` for per-layer tensors: one per model layer in ``layers``,
    which lorax stacks on axis 0 in that order (the path's first key names the stack).
    """

    path: tuple[str, ...]
    hf_name: str
    shape: tuple[int, ...]
    layers: tuple[int, ...] = ()
    quantizable: bool = False
    # Where this tensor sits in the value at ``path`` when several tensors share it (an MoE
    # layer's experts): ``value[layer][index]``, of a value shaped ``(L, *stack, *shape)``.
    index: tuple[int, ...] = ()
    stack: tuple[int, ...] = ()
    # The dtype lorax keeps this tensor in whatever the model's (None: the model's).
    dtype: str | None = None

    @property
    def per_layer(self) -> bool:
        return bool(self.layers)

    def hf_names(self) -> list[str]:
        if not self.per_layer:
            return [self.hf_name]
        return [self.hf_name.format(i=i) for i in self.layers]


def module_name(projection: str, model_type: str | None = None, shared_expert: bool = True) -> str:
    """HF's module path of a projection inside a decoder layer of ``model_type``
    (``self_attn.q_proj``; a shared expert's: ``mlp.shared_expert.gate_proj``); for an
    expert projection, transformers' in-memory 3-D parameter (``mlp.experts.gate_up_proj``).
    ``shared_expert=False``: a layer of the family without one (a dense-MLP layer of an MoE
    model)."""
    if projection in EXPERT_HF_PARAMETERS:
        return f"mlp.experts.{EXPERT_HF_PARAMETERS[projection]}"
    if projection in ATTENTION + FUSED_ATTENTION + MLA:
        return f"self_attn.{projection}"
    return f"{mlp_module(model_type if shared_expert else None)}.{projection}"


def mlp_module(model_type: str | None = None) -> str:
    """Where a decoder layer of ``model_type`` keeps its dense MLP projections: ``mlp``, or a
    shared expert's submodule of it (``EXPERT_CHECKPOINTS``)."""
    checkpoint = EXPERT_CHECKPOINTS.get(model_type) if model_type else None
    if checkpoint is None or checkpoint.shared_expert is None:
        return "mlp"
    return f"{checkpoint.module}.{checkpoint.shared_expert}"


def projection_module(projection: str, config: Any) -> str:
    """``module_name`` for the layers of ``config`` (a layer stack's: ``layer_stacks``)."""
    return module_name(projection, config.model_type, config.shared_expert)


def layer_prefix(i: int | str = "{i}", decoder: str = "model.") -> str:
    """A decoder layer's HF path; ``decoder`` is where the decoder sits (a layout's)."""
    return f"{decoder}layers.{i}"


@dataclasses.dataclass(frozen=True)
class CheckpointLayout:
    """Where a checkpoint keeps the language model's tensors, and what else it holds.

    ``tensor_specs`` names tensors as a causal LM's checkpoint does (``model.…`` and
    ``lm_head.…``), the names lorax writes; a layout says how another kind of checkpoint
    spells them. ``spellings`` lists (decoder prefix, head prefix) pairs, each replacing
    ``model.`` and ``lm_head.``; a checkpoint uses one of them throughout. ``modules`` is
    where transformers' in-memory model keeps the decoder's modules (PEFT's keys and
    ``target_modules`` are module names); ``foreign`` are the prefixes of the parts lorax
    does not compute, whose tensors loading skips.
    """

    spellings: tuple[tuple[str, str], ...]
    modules: str
    foreign: tuple[str, ...] = ()

    def rename(self, name: str, spelling: tuple[str, str]) -> str:
        """A causal-LM tensor name (``tensor_specs``') in ``spelling``."""
        for canonical, prefix in zip(("model.", "lm_head."), spelling, strict=True):
            if name.startswith(canonical):
                return prefix + name[len(canonical) :]
        raise ValueError(f"{name!r} is not under 'model.' or 'lm_head.'")

    def foreign_part(self, name: str) -> str | None:
        """The prefix of the part lorax does not compute that ``name`` is under, if any."""
        return next((prefix for prefix in self.foreign if name.startswith(prefix)), None)


CAUSAL_LM = "causal_lm"
IMAGE_TEXT = "image_text"
LAYOUTS = {
    CAUSAL_LM: CheckpointLayout(spellings=(("model.", "lm_head."),), modules="model."),
    # Gemma 3's image-text model (Gemma3ForConditionalGeneration): the language model under
    # ``language_model``, beside a SigLIP vision tower and the projector of its outputs into
    # the embedding space. Files spell it ``language_model.model.`` (what save_pretrained
    # writes, transformers 4 and 5 alike, and the hub's checkpoints); transformers >= 4.52
    # names the modules ``model.language_model.`` and reads either (its llava conversion
    # mapping), as does PEFT for adapters. The head is tied in every released size.
    IMAGE_TEXT: CheckpointLayout(
        spellings=(
            ("language_model.model.", "language_model.lm_head."),
            ("model.language_model.", "lm_head."),
        ),
        modules="model.language_model.",
        foreign=(
            "vision_tower.",
            "multi_modal_projector.",
            "model.vision_tower.",
            "model.multi_modal_projector.",
        ),
    ),
}


def tensor_specs(config: Any) -> Iterator[TensorSpec]:
    """Every tensor of a checkpoint of ``config``'s architecture (HF's order within a layer may
    differ; loaders look tensors up by name)."""
    d, v = config.hidden_size, config.vocab_size
    yield TensorSpec(("embed_tokens",), "model.embed_tokens.weight", (v, d))
    for stack in config.layer_stacks():
        yield from _layer_specs(stack.config, stack.key, stack.layers)
    yield TensorSpec(("norm",), "model.norm.weight", (d,))
    if not config.tie_word_embeddings:
        yield TensorSpec(("lm_head", "weight"), "lm_head.weight", (v, d))


def _layer_specs(config: Any, key: str, layers: tuple[int, ...]) -> Iterator[TensorSpec]:
    """The tensors of the decoder layers ``layers``, stacked under ``key``, all of
    ``config``'s (uniform) structure."""
    d = config.hidden_size
    for norm in config.layer_norm_names():
        yield TensorSpec((key, norm), f"{layer_prefix()}.{norm}.weight", (d,), layers)
    if config.qk_norm:
        for norm in QK_NORMS:
            name = f"{layer_prefix()}.self_attn.{norm}.weight"
            yield TensorSpec((key, norm), name, (config.head_dim,), layers)
    for norm, width in config.latent_norms().items():
        name = f"{layer_prefix()}.self_attn.{norm}.weight"
        yield TensorSpec((key, norm), name, (width,), layers)
    for proj in config.projections():
        if proj in EXPERT_PROJECTIONS:
            yield from _expert_specs(config, proj, key, layers)
            continue
        out_dim, in_dim = config.projection_shape(proj)
        base = f"{layer_prefix()}.{projection_module(proj, config)}"
        yield TensorSpec((key, proj, "weight"), f"{base}.weight", (out_dim, in_dim), layers, True)
        if proj in config.bias_projections:
            yield TensorSpec((key, proj, "bias"), f"{base}.bias", (out_dim,), layers)
    if config.shared_expert_gate:
        module = EXPERT_CHECKPOINTS[config.model_type].module
        name = f"{layer_prefix()}.{module}.{SHARED_EXPERT_GATE}.weight"
        yield TensorSpec((key, SHARED_EXPERT_GATE, "weight"), name, (1, d), layers)


def _expert_specs(
    config: Any, projection: str, key: str, layers: tuple[int, ...]
) -> Iterator[TensorSpec]:
    """One spec per checkpoint matrix of an expert projection, in (expert, part) order; the
    layer's router comes first, with the gate/up projection."""
    checkpoint = EXPERT_CHECKPOINTS[config.model_type]
    base = f"{layer_prefix()}.{checkpoint.module}"
    experts, parts = config.num_experts, checkpoint.parts[projection]
    if projection == EXPERT_PROJECTIONS[0]:
        shape = (experts, config.hidden_size)
        # A float32 router (DeepSeek's: transformers keeps it in float32 in a 16-bit model).
        dtype = "float32" if config.float32_router else None
        yield TensorSpec((key, ROUTER, "weight"), f"{base}.gate.weight", shape, layers, dtype=dtype)
        if config.router_bias:
            name = f"{base}.gate.e_score_correction_bias"
            yield TensorSpec((key, ROUTER_BIAS), name, (experts,), layers, dtype="float32")
    out_dim, in_dim = config.projection_shape(projection)
    shape = (out_dim // len(parts), in_dim)
    stack = (experts, len(parts)) if len(parts) > 1 else (experts,)
    for e in range(experts):
        for p, part in enumerate(parts):
            yield TensorSpec(
                (key, projection, "weight"),
                f"{base}.experts.{e}.{part}.weight",
                shape,
                layers,
                True,
                index=(e, p) if len(parts) > 1 else (e,),
                stack=stack,
            )


# Tensors some checkpoints carry that hold no parameters (recomputed buffers).
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


def peft_lora_name(
    i: int,
    projection: str,
    which: str,
    expert_targets: tuple[str, ...] = (),
    decoder: str = "model.",
    layer_config: Any = None,
) -> str:
    """PEFT's key for a LoRA matrix in ``adapter_model.safetensors`` (``which``: A or B).

    An expert projection's key names the module, not the parameter: PEFT wraps
    ``mlp.experts`` once per targeted parameter (``expert_targets``, the adapter's expert
    projections), in the order the module registers them (``EXPERT_PROJECTIONS``' order),
    each wrapper around the previous one. So the last targeted sits at ``mlp.experts`` and
    each earlier one a ``base_layer.`` deeper, whatever order the config lists them in.
    ``decoder`` is where the decoder's modules sit (``CheckpointLayout.modules``);
    ``layer_config``, the config of layer ``i``'s stack, where it keeps each projection
    (``projection_module``; None: Llama's places).
    """
    if projection in EXPERT_PROJECTIONS:
        ordered = [p for p in EXPERT_PROJECTIONS if p in expert_targets]
        if projection not in ordered:
            raise ValueError(f"{projection!r} is not among the expert targets {expert_targets}")
        depth = len(ordered) - 1 - ordered.index(projection)
        module = "mlp.experts" + ".base_layer" * depth
    else:
        module = (
            module_name(projection)
            if layer_config is None
            else projection_module(projection, layer_config)
        )
    return f"base_model.model.{layer_prefix(i, decoder)}.{module}.lora_{which}.weight"
