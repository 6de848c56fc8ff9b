"""Where lorax's parameters live in a GGUF: architectures, tensor names, stored transforms.

Tensor names come from ``gguf``'s table (llama.cpp's ``blk.N.attn_q`` ...), keyed by the
pytree paths ``convert.names`` defines, so both sides of the map have one source. Gemma's
sandwich norms take llama.cpp's Gemma names: HF's ``post_attention_layernorm`` (the norm of
the attention output) is ``post_attention_norm``, ``pre_feedforward_layernorm`` (the MLP's
input norm) is ``ffn_norm``, and ``post_feedforward_layernorm`` is ``post_ffw_norm``.

Gemma's RMSNorms scale by ``1 + weight``; llama.cpp's Gemma architectures multiply by the
stored weight, so llama.cpp's converter stores every Gemma norm weight plus one (the
per-head query/key norms of Gemma 3 included), and we subtract it again on the way in.

llama.cpp's ``llama`` architecture applies "normal" rope, rotating adjacent pairs
``(x[2i], x[2i+1])`` of each head, while HF's Llama rotates the halves ``(x[i], x[i+d/2])``.
The two are the same computation once the rows of the query and key projections (and their
biases) are reordered within each head, which llama.cpp's converter does on the way in and
we undo on the way out. ``qwen2``, ``qwen3``, ``gemma2``, ``gemma3`` and ``phi3`` use NEOX
rope, which is HF's halves: no reordering.

Phi-3's fused projections keep their HF layout: ``qkv_proj`` (query rows, then key, then value)
is ``attn_qkv``, and ``gate_up_proj`` (gate rows, then up) is ``ffn_up``, which llama.cpp's
``phi3`` splits in halves for SwiGLU, activating the first. Its LongRoPE factors are two
one-dimensional tensors, ``rope_factors_short`` and ``rope_factors_long``.

Mixtral is llama.cpp's ``llama`` architecture with routed experts (llama.cpp's converter
writes it so): per block, the router as ``ffn_gate_inp`` ``[experts, hidden]`` (float32, as
the converter stores it and llama-quantize leaves it) and each expert projection's parts as
3-D tensors, numpy shape ``[experts, out, in]`` with each expert's HF ``[out, in]`` matrix as
is: ``ffn_gate_exps`` (HF's ``w1``, the first half of lorax's ``experts_gate_up_proj``),
``ffn_up_exps`` (``w3``, its second half) and ``ffn_down_exps`` (``w2``). llama.cpp routes as
Mixtral does: a softmax over the router's logits, the top ``expert_used_count`` weights
renormalized to sum to one.

Qwen 3 MoE is llama.cpp's ``qwen3moe``: Qwen 3's attention (per-head query/key norms, NEOX
rope, no biases) with the same router and expert tensors as Mixtral's, gate and up being each
expert's ``gate_proj`` and ``up_proj``. Its experts have a width of their own, the
``expert_feed_forward_length`` key (HF's ``moe_intermediate_size``), where Mixtral's are
``feed_forward_length`` wide. Its graph renormalizes the chosen weights too, always: no key
turns that off, so a model with ``norm_topk_prob`` false has no qwen3moe file.

Qwen 2 MoE is llama.cpp's ``qwen2moe``: Qwen 2's attention (q/k/v biases, NEOX rope) with the
same router and expert tensors as Qwen 3 MoE's, and beside them a shared expert: the layer's
``gate_proj``/``up_proj``/``down_proj`` (lorax's names for it) are ``ffn_gate_shexp``/
``ffn_up_shexp``/``ffn_down_shexp``, of their own width (``expert_shared_feed_forward_length``),
and its gate (HF's ``shared_expert_gate``, ``[1, hidden]``) is ``ffn_gate_inp_shexp``, which
llama.cpp loads as ``[hidden]`` or ``[1, hidden]`` (its converter has written both); lorax
writes it float32 as ``[hidden]``. Its graph routes the other way round from qwen3moe's: it
never renormalizes the chosen weights (Qwen1.5-MoE's and Qwen2-57B-A14B's ``norm_topk_prob``
false), so a model that does has no qwen2moe file.

DeepSeek V2/V3 is llama.cpp's ``deepseek2``, which computes latent attention with the
"absorbed" weights its converter writes: ``q_proj`` (or ``q_a_proj``, ``q_a_layernorm`` and
``q_b_proj``) as ``attn_q`` (``attn_q_a``, ``attn_q_a_norm``, ``attn_q_b``),
``kv_a_proj_with_mqa`` and ``kv_a_layernorm`` as ``attn_kv_a_mqa`` and ``attn_kv_a_norm``, and
``kv_b_proj`` (per head, the key's position-free rows then the value's, ``[H·(nope+v),
kv_lora]``) split per head into ``attn_k_b`` (numpy ``[H, kv_lora, nope]``, each head's key
rows transposed) and ``attn_v_b`` (``[H, v, kv_lora]``). Its rope turns adjacent pairs, which
is DeepSeek's own (``rope_interleave``); a model that turns halves has the rotary rows of each
query head and of the shared rotary key reordered, as Llama's are. Routing is recorded in
keys (see ``metadata``), the V3 selection bias is the float32 vector ``exp_probs_b.bias``, the
shared experts (ungated) are ``ffn_*_shexp`` and the leading dense layers' MLP is
``ffn_gate``/``ffn_up``/``ffn_down``, each tensor under its model layer's ``blk`` number.
Read back, ``kv_b_proj`` is put together again from its parts (``kv_b_from_parts``) and the
rotary rows stay as the file has them: a deepseek2 file is a model that turns pairs
(``rope_interleave``; see ``metadata``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from gguf import MODEL_TENSOR, TENSOR_NAMES

from convert.gguf.format import GGUFError
from convert.names import (
    DENSE_LAYERS,
    EXPERT_PROJECTIONS,
    LAYERS,
    ROUTER,
    ROUTER_BIAS,
    SHARED_EXPERT_GATE,
    TensorSpec,
    tensor_specs,
)


@dataclasses.dataclass(frozen=True)
class Arch:
    """A llama.cpp architecture lorax reads and writes."""

    name: str  # general.architecture
    model_type: str  # the HF model_type a file of this architecture loads as
    interleaved_rope: bool  # Q/K rows reordered for llama.cpp's adjacent-pair rope
    # Gemma: sandwich norms under llama.cpp's Gemma names, norm weights stored plus one.
    gemma: bool = False
    # llama.cpp's default sliding-window layout: layer i slides iff i % period < period - 1.
    # None: llama.cpp computes no sliding window for this architecture.
    swa_period: int | None = None
    # The layer count llama.cpp takes for the 27B size, whose attention scores it scales by
    # (hidden_size / num_heads) ** -0.5 instead of head_dim ** -0.5.
    wide_scale_layers: int | None = None
    # The HF model_type a file of this architecture with routed experts (``expert_count``)
    # loads as; None: lorax writes and reads no experts for this architecture.
    moe_model_type: str | None = None
    # The experts' width is ``expert_feed_forward_length``; else llama.cpp makes them
    # ``feed_forward_length`` wide (Mixtral's, as ``llama``).
    expert_width_key: bool = False
    # Where llama.cpp computes no sliding window (swa_period None), a model's window is
    # recorded (for lorax to read back) with a warning that llama.cpp attends over the whole
    # context, as for Mistral's and Phi-3's released windows; False: refused instead, where
    # no released model of the family has one (Qwen 3 MoE) and llama.cpp's converter writes
    # none.
    records_window: bool = True
    # llama.cpp's graph renormalizes the chosen experts' weights to sum to one (a constant
    # of the graph, not a key): Mixtral (as llama) and qwen3moe do, qwen2moe does not.
    # None: the graph reads it from ``expert_weights_norm`` (deepseek2).
    renormalizes: bool | None = True
    # The layer's gate/up/down_proj are a shared expert beside the routed ones, under
    # llama.cpp's ``*_shexp`` names: "gated", with its sigmoid gate ``ffn_gate_inp_shexp`` and
    # a width of its own (qwen2moe); "counted", ungated and ``expert_shared_count`` experts
    # wide (deepseek2). None: no shared expert.
    shared_expert: str | None = None
    # llama.cpp's head: True, always the token embedding (gemma2 loads no output.weight);
    # False, always output.weight (qwen2moe fails to load a file without it); None: either.
    tied_head: bool | None = None
    # llama.cpp sizes the query projection and attn_output hidden_size wide, so a model must
    # have num_heads * head_dim == hidden_size (phi3, qwen2moe).
    hidden_wide_query: bool = False
    # The projections llama.cpp loads biases for (a file with others does not load); None:
    # any of lorax's (llama's are all optional; qwen2's are Qwen 2's q/k/v by model type).
    biases: tuple[str, ...] | None = None
    # DeepSeek's latent attention, its routing keys and selection bias, and leading
    # dense-MLP layers (deepseek2; see the module docstring).
    deepseek: bool = False
    # Other HF model types the architecture computes as they are, each with its own family
    # traits (deepseek2: DeepSeek V2, whose RoPE turns in float32, beside V3).
    also_computes: tuple[str, ...] = ()

    def family_type(self, moe: bool, model_type: str | None = None) -> str:
        """The HF model_type a model of this architecture computes as: ``model_type`` where
        the architecture computes it as it is (``also_computes``), else with routed experts
        its ``moe_model_type``, where it has one."""
        if model_type in self.also_computes:
            return model_type
        return self.moe_model_type if moe and self.moe_model_type else self.model_type


ARCHES = {
    a.name: a
    for a in (
        Arch("llama", "llama", True, moe_model_type="mixtral"),
        Arch("qwen2", "qwen2", False),
        Arch("qwen3", "qwen3", False, biases=()),
        Arch(
            "gemma2",
            "gemma2",
            False,
            gemma=True,
            swa_period=2,
            wide_scale_layers=46,
            tied_head=True,
            biases=(),
        ),
        Arch(
            "gemma3",
            "gemma3_text",
            False,
            gemma=True,
            swa_period=6,
            wide_scale_layers=62,
            biases=(),
        ),
        Arch("phi3", "phi3", False, hidden_wide_query=True, biases=()),
        Arch(
            "qwen3moe",
            "qwen3_moe",
            False,
            moe_model_type="qwen3_moe",
            expert_width_key=True,
            records_window=False,
            biases=(),
        ),
        Arch(
            "qwen2moe",
            "qwen2_moe",
            False,
            moe_model_type="qwen2_moe",
            expert_width_key=True,
            records_window=False,
            renormalizes=False,
            shared_expert="gated",
            tied_head=False,
            hidden_wide_query=True,
            biases=("q_proj", "k_proj", "v_proj"),
        ),
        Arch(
            "deepseek2",
            "deepseek_v3",
            False,
            moe_model_type="deepseek_v3",
            expert_width_key=True,
            records_window=False,
            renormalizes=None,
            shared_expert="counted",
            biases=(),
            deepseek=True,
            also_computes=("deepseek_v2",),
        ),
    )
}
# Mistral and Mixtral are computed as llama by llama.cpp (its converter writes arch "llama");
# Gemma 3's language model is llama.cpp's "gemma3".
EXPORT_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "qwen3_moe": "qwen3moe",
    "qwen2_moe": "qwen2moe",
    "deepseek_v2": "deepseek2",
    "deepseek_v3": "deepseek2",
}


def arch_for_export(model_type: str) -> Arch:
    if model_type not in EXPORT_ARCH:
        raise GGUFError(
            f"cannot export model_type={model_type!r} to GGUF; supported: {list(EXPORT_ARCH)}"
        )
    return ARCHES[EXPORT_ARCH[model_type]]


def arch_named(name: str, source: str) -> Arch:
    """The architecture of a file lorax reads."""
    if name not in ARCHES:
        raise GGUFError(f"{source}: unsupported architecture {name!r}; lorax reads {list(ARCHES)}")
    return ARCHES[name]


_PROJECTIONS = {
    "q_proj": MODEL_TENSOR.ATTN_Q,
    "k_proj": MODEL_TENSOR.ATTN_K,
    "v_proj": MODEL_TENSOR.ATTN_V,
    "o_proj": MODEL_TENSOR.ATTN_OUT,
    "gate_proj": MODEL_TENSOR.FFN_GATE,
    "up_proj": MODEL_TENSOR.FFN_UP,
    "down_proj": MODEL_TENSOR.FFN_DOWN,
    # Phi-3's fused projections (see the module docstring).
    "qkv_proj": MODEL_TENSOR.ATTN_QKV,
    "gate_up_proj": MODEL_TENSOR.FFN_UP,
    ROUTER: MODEL_TENSOR.FFN_GATE_INP,
    # DeepSeek's latent attention (see the module docstring).
    "q_a_proj": MODEL_TENSOR.ATTN_Q_A,
    "q_b_proj": MODEL_TENSOR.ATTN_Q_B,
    "kv_a_proj_with_mqa": MODEL_TENSOR.ATTN_KV_A_MQA,
}
# DeepSeek's kv_b_proj in its two parts (``FileTensor.part``): the keys' and the values'.
_KV_B_PARTS = (MODEL_TENSOR.ATTN_K_B, MODEL_TENSOR.ATTN_V_B)
KV_B_PROJ = "kv_b_proj"
# An expert projection's parts, in row order (``EXPERT_CHECKPOINTS``' parts), each one 3-D
# tensor over the experts (see the module docstring).
_EXPERT_PARTS = {
    "experts_gate_up_proj": (MODEL_TENSOR.FFN_GATE_EXP, MODEL_TENSOR.FFN_UP_EXP),
    "experts_down_proj": (MODEL_TENSOR.FFN_DOWN_EXP,),
}
_SINGLE = {
    ("embed_tokens",): MODEL_TENSOR.TOKEN_EMBD,
    ("norm",): MODEL_TENSOR.OUTPUT_NORM,
    ("lm_head", "weight"): MODEL_TENSOR.OUTPUT,
    ("layers", "input_layernorm"): MODEL_TENSOR.ATTN_NORM,
    ("layers", "post_attention_layernorm"): MODEL_TENSOR.FFN_NORM,
    ("layers", "q_norm"): MODEL_TENSOR.ATTN_Q_NORM,
    ("layers", "k_norm"): MODEL_TENSOR.ATTN_K_NORM,
    ("layers", "q_a_layernorm"): MODEL_TENSOR.ATTN_Q_A_NORM,
    ("layers", "kv_a_layernorm"): MODEL_TENSOR.ATTN_KV_A_NORM,
}
# Parameters llama.cpp names with the suffix ".bias" though lorax's path has none.
_BIASES = {("layers", ROUTER_BIAS): MODEL_TENSOR.FFN_EXP_PROBS_B}
# Gemma's four per-layer norms (see the module docstring).
_GEMMA = {
    **_SINGLE,
    ("layers", "post_attention_layernorm"): MODEL_TENSOR.ATTN_POST_NORM,
    ("layers", "pre_feedforward_layernorm"): MODEL_TENSOR.FFN_NORM,
    ("layers", "post_feedforward_layernorm"): MODEL_TENSOR.FFN_POST_NORM,
}
# A shared expert's projections and gate (see the module docstring).
_SHARED_EXPERT = {
    "gate_proj": MODEL_TENSOR.FFN_GATE_SHEXP,
    "up_proj": MODEL_TENSOR.FFN_UP_SHEXP,
    "down_proj": MODEL_TENSOR.FFN_DOWN_SHEXP,
    SHARED_EXPERT_GATE: MODEL_TENSOR.FFN_GATE_INP_SHEXP,
}
ROPE_FREQS = TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight"
ROPE_FACTORS_SHORT = TENSOR_NAMES[MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight"
ROPE_FACTORS_LONG = TENSOR_NAMES[MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight"


@dataclasses.dataclass(frozen=True)
class FileTensor:
    """One tensor of the file (once per layer of its stack for per-layer ones) and what it
    holds of the parameter at ``spec.path``: all of it, or one part of it (``part``): for an
    expert projection one part of every expert, ``value[layer][:, part]``; for DeepSeek's
    ``kv_b_proj`` its keys' (0) or values' (1) rows, per head (``kv_b_part``)."""

    spec: TensorSpec  # for an expert part, the spec of its expert 0
    # numpy order: [experts, out, in] for an expert part; [hidden] for a shared expert's gate;
    # [heads, kv_lora, nope] and [heads, v, kv_lora] for kv_b_proj's parts
    shape: tuple[int, ...]
    part: int | None = None

    @property
    def experts(self) -> bool:
        return bool(self.spec.index)

    @property
    def kv_b_half(self) -> int | None:
        """For one of ``kv_b_proj``'s parts, which (0: the keys', 1: the values')."""
        return None if self.experts else self.part


def file_tensors(config: Any) -> list[FileTensor]:
    """The tensors a GGUF of ``config`` holds besides RoPE factor tensors, in
    ``tensor_specs`` order: one per spec, except that the specs of one expert projection's
    part (one per expert) are one tensor, and latent attention's ``kv_b_proj`` is two."""
    tensors = []
    for spec in tensor_specs(config):
        if config.mla and spec.path[1:] == (KV_B_PROJ, "weight"):
            h, nope, v = config.num_heads, config.qk_nope_head_dim, config.v_head_dim
            tensors.append(FileTensor(spec, (h, config.kv_lora_rank, nope), 0))
            tensors.append(FileTensor(spec, (h, v, config.kv_lora_rank), 1))
        elif not spec.index:
            tensors.append(FileTensor(spec, _file_shape(spec)))
        elif spec.index[0] == 0:  # expert 0 stands for its part's tensor
            part = spec.index[1] if len(spec.index) > 1 else None
            tensors.append(FileTensor(spec, (spec.stack[0], *spec.shape), part))
    return tensors


def placed_tensors(config: Any) -> list[tuple[FileTensor, int | None, int | None]]:
    """``(tensor, layer, position)`` in file order: the model-wide tensors, then each model
    layer's (``blk.{layer}``), whose values sit at ``position`` on their layer stack's axis."""
    tensors = file_tensors(config)
    placed: list[tuple[FileTensor, int | None, int | None]] = [
        (t, None, None) for t in tensors if not t.spec.per_layer
    ]
    for layer in range(config.num_layers):
        here = [t for t in tensors if layer in t.spec.layers]
        placed += [(t, layer, t.spec.layers.index(layer)) for t in here]
    return placed


def _file_shape(spec: TensorSpec) -> tuple[int, ...]:
    """The numpy shape a file stores the parameter of ``spec`` in: its own, but for a shared
    expert's gate, one vector (llama.cpp's ``{hidden}``; lorax's, HF's ``[1, hidden]``)."""
    if spec.path[1:2] == (SHARED_EXPERT_GATE,):
        return spec.shape[-1:]
    return spec.shape


def kv_b_part(weight: Any, part: int, config: Any) -> Any:
    """One part of DeepSeek's ``kv_b_proj`` ``[H·(nope+v), kv_lora]`` as llama.cpp's
    ``deepseek2`` reads it: 0, the keys' rows of each head transposed, ``[H, kv_lora, nope]``;
    1, the values' rows of each head, ``[H, v, kv_lora]``."""
    nope = config.qk_nope_head_dim
    per_head = weight.reshape(config.num_heads, nope + config.v_head_dim, -1)
    return per_head[:, :nope].swapaxes(1, 2) if part == 0 else per_head[:, nope:]


def kv_b_from_parts(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The inverse of ``kv_b_part``: ``kv_b_proj`` ``[H·(nope+v), kv_lora]`` from its keys'
    part ``[H, kv_lora, nope]`` and its values' ``[H, v, kv_lora]``."""
    per_head = np.concatenate([keys.swapaxes(1, 2), values], axis=1)
    return per_head.reshape(-1, per_head.shape[-1])


def gguf_name(
    arch: Arch, path: tuple[str, ...], layer: int | None = None, part: int | None = None
) -> str:
    """The GGUF name of the parameter at pytree ``path`` (``layer`` for per-layer ones, its
    model layer; ``part`` for one part of it, as ``FileTensor.part``)."""
    single = _GEMMA if arch.gemma else _SINGLE
    stack = path[0]
    # Each layer stack's parameters have the names of a uniform model's (the dense layers'
    # gate/up/down_proj as a dense MLP's), numbered by model layer.
    key = (LAYERS, *path[1:]) if stack == DENSE_LAYERS else path
    if len(path) == 3 and path[1] in EXPERT_PROJECTIONS:
        base, suffix = _EXPERT_PARTS[path[1]][part or 0], path[2]
    elif key in single:
        base, suffix = single[key], "weight"
    elif key in _BIASES:
        base, suffix = _BIASES[key], "bias"
    elif arch.deepseek and path[1:] == (KV_B_PROJ, "weight") and part is not None:
        base, suffix = _KV_B_PARTS[part], path[2]
    elif arch.shared_expert and stack == LAYERS and len(path) == 3 and path[1] in _SHARED_EXPERT:
        base, suffix = _SHARED_EXPERT[path[1]], path[2]
    elif len(path) == 3 and key[0] == LAYERS and path[1] in _PROJECTIONS:
        base, suffix = _PROJECTIONS[path[1]], path[2]
    else:
        raise KeyError(f"no GGUF name for parameter {'/'.join(path)}")
    return f"{TENSOR_NAMES[base].format(bid=layer)}.{suffix}"


def is_norm(path: tuple[str, ...]) -> bool:
    """Whether the parameter at ``path`` is an RMSNorm weight."""
    return path[-1] == "norm" or path[-1].endswith(("layernorm", "_norm"))


def norm_offset(arch: Arch, path: tuple[str, ...]) -> float:
    """What the file stores minus lorax's value: 1 for Gemma's norm weights, else 0."""
    return 1.0 if arch.gemma and is_norm(path) else 0.0


@dataclasses.dataclass(frozen=True)
class RopeRows:
    """Rows of a projection that llama.cpp's adjacent-pair rope needs reordered: in each of
    ``heads`` blocks of rows, all but the first ``skip`` (the rows that do not rotate)."""

    heads: int
    skip: int = 0


def rope_rows(arch: Arch, config: Any, path: tuple[str, ...]) -> RopeRows | None:
    """The rows of the parameter at ``path`` reordered for ``arch``'s rope (None: store as
    is): Llama's query and key heads; where DeepSeek's model turns halves, the rotary rows of
    each query head and the rotary key that follows the key/value latent."""
    if len(path) != 3:
        return None
    if arch.interleaved_rope:
        heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}.get(path[1])
        return None if heads is None else RopeRows(heads)
    if arch.deepseek and not config.rope_interleave:
        query = RopeRows(config.num_heads, config.qk_nope_head_dim)
        key = RopeRows(1, config.kv_lora_rank)
        return {"q_proj": query, "q_b_proj": query, "kv_a_proj_with_mqa": key}.get(path[1])
    return None


def to_gguf_rope_rows(w: Any, rows: RopeRows) -> Any:
    """HF's half-split rows → llama.cpp's interleaved pairs, per head (weight or bias)."""
    return _reorder_rope_rows(w, rows, from_halves=True)


def from_gguf_rope_rows(w: Any, rows: RopeRows) -> Any:
    """The inverse of ``to_gguf_rope_rows``."""
    return _reorder_rope_rows(w, rows, from_halves=False)


def _reorder_rope_rows(w: Any, rows: RopeRows, from_halves: bool) -> Any:
    """Within each head's rotary rows, ``(2, d/2) → (d/2, 2)`` (``from_halves``: row ``i`` of
    the second half goes next to row ``i`` of the first) or back; leading rows stay."""
    blocks = w.reshape(rows.heads, w.shape[0] // rows.heads, *w.shape[1:])
    rotary = blocks[:, rows.skip :]
    half = rotary.shape[1] // 2
    split = (2, half) if from_halves else (half, 2)
    rotary = rotary.reshape(rows.heads, *split, *w.shape[1:]).swapaxes(1, 2)
    rotary = rotary.reshape(rows.heads, 2 * half, *w.shape[1:])
    if rows.skip:
        lib = jnp if isinstance(w, jax.Array) else np
        rotary = lib.concatenate([blocks[:, : rows.skip], rotary], axis=1)
    return rotary.reshape(w.shape)
