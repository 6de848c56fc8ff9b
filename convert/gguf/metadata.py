"""Model hyper-parameters ↔ GGUF metadata, as llama.cpp writes and reads them.

Export writes the keys llama.cpp's converter writes for the model's architecture, typed as
llama.cpp reads them. Import inverts that into a Hugging Face style ``config.json`` dict
(lorax turns it into a ``ModelConfig``; this package never imports lorax).

What a family computes beyond Llama is mostly fixed by the architecture in llama.cpp rather
than recorded: Qwen 3's and Gemma 3's query/key norms are tensors; Gemma's embedding scale
(sqrt(hidden_size)), GeGLU and sandwich norms are implied by the name. Gemma's attention
scale is implied too: llama.cpp scales scores by ``head_dim ** -0.5``, or by
``(hidden_size / num_heads) ** -0.5`` for the layer count of the 27B models (46 for Gemma 2,
62 for Gemma 3), which is what those models' ``query_pre_attn_scalar`` says; a model whose
scalar says otherwise cannot be written. Keys carry Gemma 2's two softcaps (always applied:
50 and 30 where the keys are absent), Gemma 3's final-logit softcap (applied only when its
key is present) and the sliding window. llama.cpp lays sliding layers out by a period (layer
i slides iff ``i % p < p - 1``: 2 for Gemma 2, 6 for Gemma 3), which we record in
``attention.sliding_window_pattern`` only where a model departs from the default. Gemma 3's
sliding layers have their own RoPE base, ``rope.freq_base_swa``, and no scaling; its full
layers take ``rope.freq_base`` and the (linear) scaling keys.

RoPE scaling is where the formats differ most. Linear and YaRN scaling are metadata keys.
Llama 3's scaling is not: llama.cpp's converter stores it as ``rope_freqs.weight``, one
divisor per frequency, which import turns back into Llama 3's four parameters. Dynamic NTK
scaling has no llama.cpp counterpart; it only acts beyond the training context, so within
that context the file computes the same model, and export says so in a warning.

Phi-3 (llama.cpp's ``phi3``): LongRoPE's two factor lists are the tensors
``rope_factors_short``/``rope_factors_long``, its pre-training length is
``rope.scaling.original_context_length`` and its cos/sin scale ``rope.scaling.attn_factor``
(no ``rope.scaling.type``: llama.cpp's default linear scaling by 1 leaves the angles alone).
Where HF picks the long factors once a position passes the pre-training length, llama.cpp
picks them for the whole context once the context size (``n_ctx``) passes it: the file
computes the model for contexts up to that length, and beyond it for sequences that pass it.
Partial rotary is ``rope.dimension_count`` (the rotated leading dims of each head); llama.cpp
rotates them with NEOX's halves, as HF does. Phi-3's one sliding window is recorded in
``attention.sliding_window`` (0: none), which llama.cpp reads and then ignores: it attends
over the whole context, and export says so in a warning.

Mixtral is llama.cpp's ``llama`` with ``expert_count`` and ``expert_used_count``, which fix
its routing (softmax, top-k weights renormalized, as Mixtral); import reads a ``llama`` file
with experts as a Mixtral. Its window is Mistral's case: recorded, ignored by llama.cpp, a
warning. The router's load-balancing loss weight is for training only and is not recorded.

Qwen 3 MoE is llama.cpp's ``qwen3moe``, which adds ``expert_feed_forward_length`` (the experts'
width; llama.cpp takes ``feed_forward_length / expert_used_count`` without it) and routes as
Mixtral, renormalizing the chosen weights whatever the file says (its graph passes a
constant, not ``expert_weights_norm``): a model with ``norm_topk_prob`` false is refused, and
import reads ``norm_topk_prob`` true. llama.cpp loads no qwen3moe file without
``expert_count`` and ``expert_used_count``, and neither does import. Its graph has no sliding
window and no released Qwen 3 MoE uses one, so a windowed model is refused rather than
recorded.

Qwen 2 MoE is llama.cpp's ``qwen2moe``: Qwen 3 MoE's keys plus
``expert_shared_feed_forward_length`` (the shared expert's width; llama.cpp takes
``feed_forward_length`` without it, and so does import). Its graph never renormalizes the
chosen weights (again a constant, not ``expert_weights_norm``), so a model with
``norm_topk_prob`` true is refused and import reads it false. Beyond the keys, llama.cpp's
qwen2moe loads no file without ``output.weight`` and sizes the query ``hidden_size`` wide:
a model with tied embeddings, or with ``num_heads * head_dim != hidden_size``, is refused.
Its q/k/v biases are optional there, so import reads ``qkv_bias`` from their presence. Like
qwen3moe it has no sliding window and loads no file without ``expert_count``.

DeepSeek V2/V3 is llama.cpp's ``deepseek2``, written as its converter writes it. Latent
attention is recorded as the multi-query attention llama.cpp computes it as: one key/value
head (``head_count_kv`` 1) of ``kv_lora_rank + qk_rope_head_dim`` (keys) and
``kv_lora_rank`` (values), the heads' real sizes as ``key_length_mla``/``value_length_mla``,
the ranks as ``q_lora_rank`` (0: no query latent) and ``kv_lora_rank``, the rotary slice as
``rope.dimension_count``. The routing is keys: ``expert_gating_func`` (softmax 1, sigmoid
2), ``expert_weights_norm``, ``expert_weights_scale`` (``routed_scaling_factor``),
``expert_group_count``/``expert_group_used_count``, whose groups llama.cpp scores by their
top-2 sum (V3's, not V2's best expert), and ``expert_shared_count`` experts of
``expert_feed_forward_length`` make the shared experts; ``leading_dense_block_count`` layers
have a dense MLP ``feed_forward_length`` wide. llama.cpp norms the latents with
``rms_norm_eps`` where DeepSeek's modules use 1e-6, and decides by the shape that a model
of 26 or 27 layers (or 48 with a vocabulary of 128256) has no query latent (DeepSeek-V2-Lite's),
so models that depart from either are refused. The group keys are written only where fewer
groups are kept than there are (llama.cpp asserts it; keeping all is no grouping). YaRN: the
file holds ``rope.scaling.yarn_log_multiplier`` (0.1 ·
``mscale_all_dim``, which llama.cpp divides back out) from which llama.cpp's graph scales
attention by ``(1 + 0.1 · mscale_all_dim · ln factor)²`` as transformers does, leaving the
rotation unscaled; a model whose YaRN scales the rotation too (``mscale`` ≠
``mscale_all_dim``) is refused.

Import inverts that into DeepSeek's config.json: the gating picks the model, softmax (1, or
the key absent, as llama.cpp reads the first V2 conversions) DeepSeek V2 (``topk_method``
"greedy", or "group_limited_greedy" where groups are recorded) and sigmoid (2) V3
("noaux_tc"), whose selection bias lorax's V3 always has: a sigmoid file without
``exp_probs_b.bias`` and a softmax file with it are refused, as are softmax files whose
groups keep fewer than all (llama.cpp's top-2 sums are not V2's best expert) or whose weights
are renormalized (V2 never does). ``num_key_value_heads`` is the head count (the file's one
key/value head is the absorbed form), ``qk_rope_head_dim`` is ``rope.dimension_count``,
``qk_nope_head_dim`` ``key_length_mla`` minus it, ``v_head_dim`` ``value_length_mla``,
``q_lora_rank`` 0 none, ``first_k_dense_replace`` ``leading_dense_block_count``,
``moe_intermediate_size`` ``expert_feed_forward_length``, ``n_shared_experts``
``expert_shared_count``, ``routed_scaling_factor`` ``expert_weights_scale`` (1 where it is
absent or 0, which llama.cpp does not scale by),
``norm_topk_prob`` ``expert_weights_norm``, ``n_group``/``topk_group`` the group keys (1/1
without them), ``intermediate_size`` (the dense layers') ``feed_forward_length``. YaRN reads
back as ``mscale = mscale_all_dim = yarn_log_multiplier / 0.1``; a YaRN file without that
multiplier or with ``rope.scaling.attn_factor``, and other RoPE scalings, are refused. The
file turns RoPE in adjacent pairs, so it reads as ``rope_interleave`` true: a model that
turned halves was written with its rotary rows reordered into pairs, and reads back as the
interleaved model with those rows, which computes the same (its config differs in that one
field, and writing it again gives the same file). The latents' epsilon must be 1e-6 and the
absorbed sizes (``head_count_kv`` 1, ``key_length`` ``kv_lora_rank + rope``,
``value_length`` ``kv_lora_rank``) must agree with the others; a file without
``key_length_mla`` (older conversions, holding ``attn_kv_b``) is refused.

The MoE families' files (llama's Mixtral, qwen3moe, qwen2moe) are refused where they set the
keys llama.cpp would route them by otherwise than lorax's models: a gating function other
than the softmax, a weight scale, or expert groups that keep fewer than all.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from gguf import GGML_QUANT_VERSION

from convert.families import FAMILIES, LATENT_NORM_EPS, departures
from convert.gguf.format import KV, GGUFError, ValueType, array, boolean, f32, string, u32
from convert.gguf.layout import (
    ARCHES,
    ROPE_FACTORS_LONG,
    ROPE_FACTORS_SHORT,
    ROPE_FREQS,
    Arch,
    arch_named,
    gguf_name,
)
from convert.gguf.reader import GGUFFile
from convert.names import LAYERS, ROUTER_BIAS
from convert.rope import (
    default_inv_freq,
    llama3_rope_factors,
    longrope_default_attention_factor,
)


def model_metadata(config: Any, arch: Arch, file_type: int, name: str) -> dict[str, KV]:
    """The ``general.*`` and ``{arch}.*`` keys describing ``config``."""
    a = arch.name
    kv: dict[str, KV] = {
        "general.architecture": string(a),
        "general.type": string("model"),
        "general.name": string(name),
        "general.file_type": u32(file_type),
        "general.quantization_version": u32(GGML_QUANT_VERSION),
        f"{a}.vocab_size": u32(config.vocab_size),
        f"{a}.context_length": u32(config.max_position_embeddings),
        f"{a}.embedding_length": u32(config.hidden_size),
        f"{a}.block_count": u32(config.num_layers),
        f"{a}.feed_forward_length": u32(config.intermediate_size),
        f"{a}.attention.head_count": u32(config.num_heads),
        f"{a}.attention.head_count_kv": u32(config.num_kv_heads),
        f"{a}.attention.key_length": u32(config.head_dim),
        f"{a}.attention.value_length": u32(config.head_dim),
        f"{a}.attention.layer_norm_rms_epsilon": f32(config.rms_norm_eps),
        f"{a}.rope.dimension_count": u32(_rotary_dim(config, arch)),
        f"{a}.rope.freq_base": f32(config.rope.theta),
    }
    _check_family(config, arch)
    kv.update(_rope_scaling(config, arch))
    kv.update(_sliding_window(config, arch))
    kv.update(_softcaps(config, arch))
    kv.update(_experts(config, arch))
    if arch.deepseek:
        kv.update(_deepseek(config, arch))
    return kv


# llama.cpp's expert_gating_func values (its LLAMA_EXPERT_GATING_FUNC_TYPE_*).
_GATING_FUNCS = {"softmax": 1, "sigmoid": 2}


def _read_as_lite(layers: int, vocab: int | None) -> bool:
    """Whether llama.cpp's deepseek2 takes a model of this shape for a "lite" one (DeepSeek-
    V2-Lite, GigaChat3, Kanana-2: 26 or 27 layers, or 48 with a vocabulary of 128256), which
    has no query latent: it then reads no q_lora_rank and loads attn_q."""
    return layers in (26, 27) or (layers == 48 and vocab == 128256)


def _deepseek(config: Any, arch: Arch) -> dict[str, KV]:
    """deepseek2's keys for latent attention, routing, shared experts and dense layers (see
    the module docstring); they replace the base keys' per-head sizes."""
    a = arch.name
    _check_deepseek(config, arch)
    routing = config.routing()
    rope, latent = config.qk_rope_head_dim, config.kv_lora_rank
    kv = {
        f"{a}.attention.head_count_kv": u32(1),
        f"{a}.attention.key_length": u32(latent + rope),
        f"{a}.attention.value_length": u32(latent),
        f"{a}.attention.key_length_mla": u32(config.head_dim),
        f"{a}.attention.value_length_mla": u32(config.v_head_dim),
        f"{a}.attention.q_lora_rank": u32(config.q_lora_rank or 0),
        f"{a}.attention.kv_lora_rank": u32(latent),
        f"{a}.rope.dimension_count": u32(rope),
        f"{a}.leading_dense_block_count": u32(len(config.dense_mlp_layers)),
        f"{a}.expert_shared_count": u32(config.mlp_width // config.expert_width),
        f"{a}.expert_gating_func": u32(_GATING_FUNCS[routing.scoring]),
        f"{a}.expert_weights_norm": boolean(routing.normalize),
        f"{a}.expert_weights_scale": f32(routing.scaling),
    }
    if routing.groups_kept < routing.groups:
        # Only then: llama.cpp asserts that fewer groups are kept than there are (keeping
        # them all is no grouping, and reads back as n_group = topk_group = 1).
        kv[f"{a}.expert_group_count"] = u32(routing.groups)
        kv[f"{a}.expert_group_used_count"] = u32(routing.groups_kept)
    if config.rope.type == "yarn":
        # llama.cpp divides it by 0.1 again (its converter's legacy factor).
        kv[f"{a}.rope.scaling.yarn_log_multiplier"] = f32(0.1 * config.rope.mscale_all_dim)
    return kv


def _check_deepseek(config: Any, arch: Arch) -> None:
    """Refuses a DeepSeek model llama.cpp's deepseek2 computes otherwise (module docstring)."""
    a = arch.name
    routing = config.routing()
    if routing.scoring not in _GATING_FUNCS:
        raise GGUFError(f"llama.cpp's {a} architecture has no {routing.scoring!r} expert scoring")
    grouped = routing.groups > 1 and routing.groups_kept < routing.groups
    if grouped and routing.group_score != "top2_sum":
        raise GGUFError(
            f"llama.cpp's {a} architecture keeps the expert groups with the best top-2 "
            f"sums (DeepSeek V3's); this model scores groups by {routing.group_score!r} "
            f"(DeepSeek V2's topk_method='group_limited_greedy', n_group={routing.groups}, "
            f"topk_group={routing.groups_kept})"
        )
    if config.rms_norm_eps != LATENT_NORM_EPS:
        raise GGUFError(
            f"llama.cpp's {a} architecture norms the attention latents with rms_norm_eps; "
            f"this model's latent norms use {LATENT_NORM_EPS} and its rms_norm_eps is "
            f"{config.rms_norm_eps}"
        )
    if _read_as_lite(config.num_layers, config.vocab_size) and config.q_lora_rank is not None:
        raise GGUFError(
            f"llama.cpp's {a} architecture takes a model of {config.num_layers} layers "
            f"(vocabulary {config.vocab_size}) for DeepSeek-V2-Lite, without a query latent; "
            f"this model has q_lora_rank={config.q_lora_rank}"
        )
    leading = tuple(range(len(config.dense_mlp_layers)))
    if config.dense_mlp_layers != leading:
        raise GGUFError(
            f"llama.cpp's {a} architecture gives the leading layers a dense MLP; this model's "
            f"dense-MLP layers are {list(config.dense_mlp_layers)}"
        )
    if config.mlp_width % config.expert_width:
        raise GGUFError(
            f"llama.cpp's {a} architecture makes the shared experts a whole number of experts "
            f"wide ({config.expert_width} each); this model's are {config.mlp_width} wide"
        )
    rope = config.rope
    if rope.type not in ("default", "yarn"):
        raise GGUFError(f"llama.cpp's {a} architecture has no {rope.type!r} RoPE scaling")
    if rope.type == "yarn" and not (
        rope.mscale_all_dim and math.isclose(yarn_attention_factor(rope), 1.0, rel_tol=1e-7)
    ):
        raise GGUFError(
            f"llama.cpp's {a} architecture scales YaRN's attention by mscale_all_dim and leaves "
            f"the rotation unscaled; this model has mscale={rope.mscale}, "
            f"mscale_all_dim={rope.mscale_all_dim}, attention_factor={rope.attention_factor}"
        )


def _experts(config: Any, arch: Arch) -> dict[str, KV]:
    """A mixture of experts' size, top-k, (``expert_width_key``) width and (``shared_expert``)
    shared expert's width; llama.cpp routes by architecture (a softmax, its top-k weights
    renormalized or not: ``Arch.renormalizes``)."""
    if not config.moe:
        return {}
    a = arch.name
    kv = {
        f"{a}.expert_count": u32(config.num_experts),
        f"{a}.expert_used_count": u32(config.experts_per_token),
    }
    if arch.expert_width_key:
        kv[f"{a}.expert_feed_forward_length"] = u32(config.expert_width)
    if arch.shared_expert == "gated":
        kv[f"{a}.expert_shared_feed_forward_length"] = u32(config.mlp_width)
    return kv


# Graphs that rotate part of each head (the others assert rope.dimension_count == head size).
_PARTIAL_ROTARY = ("phi3",)


def _check_family(config: Any, arch: Arch) -> None:
    """Refuses a config whose computation ``arch`` does not express in llama.cpp."""
    a = arch.name
    wrong = departures(config, arch.family_type(config.moe, config.model_type))
    if not math.isclose(config.attention_scale, _attention_scale(arch, config), rel_tol=1e-6):
        wrong["query_pre_attn_scalar"] = config.query_pre_attn_scalar
    if wrong:
        raise GGUFError(
            f"llama.cpp's {a} architecture cannot compute this {config.model_type} model: "
            f"{wrong} differ from what it implies ({_scale_rule(arch)})"
        )
    if config.moe:
        _check_experts(config, arch)
    if arch.biases is not None and set(config.bias_projections) - set(arch.biases):
        loads = f"biases only on {list(arch.biases)}" if arch.biases else "no projection biases"
        raise GGUFError(
            f"llama.cpp's {a} architecture has {loads}; this model has biases on "
            f"{list(config.bias_projections)}"
        )
    if arch.hidden_wide_query and config.q_size != config.hidden_size:
        raise GGUFError(
            f"llama.cpp's {a} architecture needs num_heads * head_dim == hidden_size; this "
            f"model's query size is {config.num_heads} * {config.head_dim} = {config.q_size}, "
            f"its hidden size {config.hidden_size}"
        )
    _check_head(config, arch)


def _check_head(config: Any, arch: Arch) -> None:
    """Refuses a head ``arch`` does not load: tied where llama.cpp needs ``output.weight``,
    separate where it reads only the token embedding (``Arch.tied_head``)."""
    if arch.tied_head is None or config.tie_word_embeddings == arch.tied_head:
        return
    if arch.tied_head:
        raise GGUFError(
            f"llama.cpp's {arch.name} architecture always ties the output head to the token "
            "embedding; this model has a separate lm_head"
        )
    raise GGUFError(
        f"llama.cpp's {arch.name} architecture loads no file without a separate output head "
        "(output.weight); this model ties lm_head to the token embedding "
        "(tie_word_embeddings=True)"
    )


def _check_experts(config: Any, arch: Arch) -> None:
    """Refuses experts ``arch`` routes or sizes otherwise: each architecture renormalizes the
    chosen weights or not whatever the file says (``Arch.renormalizes``), and ``llama``'s
    experts are feed_forward_length wide; every layer routes. (A shared expert is a family
    trait: ``departures`` has checked it.)"""
    a = arch.name
    if config.dense_mlp_layers and not arch.deepseek:
        raise GGUFError(
            f"llama.cpp's {a} architecture routes every layer to the experts; this model's "
            f"layers {list(config.dense_mlp_layers)} have a dense MLP instead (HF's "
            "mlp_only_layers / decoder_sparse_step)"
        )
    if arch.renormalizes is not None and config.normalize_expert_weights != arch.renormalizes:
        does = "always renormalizes" if arch.renormalizes else "never renormalizes"
        raise GGUFError(
            f"llama.cpp's {a} architecture {does} the chosen experts' weights to sum to one; "
            f"this model has normalize_expert_weights={config.normalize_expert_weights} "
            f"(HF's norm_topk_prob={str(config.normalize_expert_weights).lower()})"
        )
    if not arch.expert_width_key and config.expert_width != config.intermediate_size:
        raise GGUFError(
            f"llama.cpp's {a} architecture makes each expert feed_forward_length "
            f"(intermediate_size={config.intermediate_size}) wide; this model's experts are "
            f"{config.expert_width} wide (expert_intermediate_size)"
        )


def _rotary_dim(config: Any, arch: Arch) -> int:
    """``rope.dimension_count``: the leading dims of each head that rotate."""
    a = arch.name
    ropes = [r for r in (config.rope, config.sliding_rope) if r is not None]
    dims = {r.rotary_dim(config.head_dim) for r in ropes}
    if dims == {config.head_dim}:
        return config.head_dim
    if a not in _PARTIAL_ROTARY:
        raise GGUFError(
            f"llama.cpp's {a} architecture rotates whole heads (it requires "
            f"rope.dimension_count == head_dim); this model rotates {sorted(dims)} of "
            f"{config.head_dim} dims (partial_rotary_factor "
            f"{[r.partial_rotary_factor for r in ropes]})"
        )
    (rotary,) = dims  # phi3 has one RoPE
    if rotary <= 0 or rotary % 2:
        raise GGUFError(
            f"llama.cpp rotates pairs of dims; this model rotates {rotary} of {config.head_dim} "
            f"(partial_rotary_factor {config.rope.partial_rotary_factor})"
        )
    return rotary


def _attention_scale(arch: Arch, config: Any) -> float:
    """The factor llama.cpp's ``arch`` multiplies attention scores by."""
    if arch.wide_scale_layers is not None and config.num_layers == arch.wide_scale_layers:
        return (config.hidden_size // config.num_heads) ** -0.5
    if arch.deepseek and config.rope.type == "yarn":  # module docstring
        return _mscale(config.rope.factor, config.rope.mscale_all_dim or 0.0) ** 2 * (
            config.head_dim**-0.5
        )
    return config.head_dim**-0.5


def _scale_rule(arch: Arch) -> str:
    rule = "attention scores scaled by head_dim ** -0.5"
    if arch.wide_scale_layers is not None:
        rule += (
            f", or (hidden_size // num_heads) ** -0.5 with {arch.wide_scale_layers} layers, "
            "i.e. query_pre_attn_scalar set to that"
        )
    if arch.gemma:
        rule += ", embeddings scaled by sqrt(hidden_size), Gemma RMSNorms, GeGLU"
    if arch.deepseek:
        rule += ", times YaRN's (1 + 0.1 * mscale_all_dim * ln factor) ** 2"
    return rule


def _softcaps(config: Any, arch: Arch) -> dict[str, KV]:
    a = arch.name
    attn, final = config.attn_logit_softcap, config.final_logit_softcap
    if a == "gemma2":
        # llama.cpp's gemma2 always caps both (at 50 and 30 when the keys are absent).
        if attn is None or final is None:
            raise GGUFError(
                "llama.cpp's gemma2 architecture always applies the attention and final "
                f"logit softcaps; this model has attn_logit_softcap={attn}, "
                f"final_logit_softcap={final}"
            )
        return {
            f"{a}.attn_logit_softcapping": f32(attn),
            f"{a}.final_logit_softcapping": f32(final),
        }
    # gemma3 caps the final logits when the key is present; no other cap exists there.
    if attn is not None or (final is not None and a != "gemma3"):
        raise GGUFError(
            f"llama.cpp's {a} architecture applies no {'attention' if attn else 'final'} "
            f"logit softcap; this model has attn_logit_softcap={attn}, "
            f"final_logit_softcap={final}"
        )
    return {} if final is None else {f"{a}.final_logit_softcapping": f32(final)}


def _rope_scaling(config: Any, arch: Arch) -> dict[str, KV]:
    a = arch.name
    if a == "gemma3":
        return _gemma3_ropes(config, arch)
    if config.sliding_rope is not None:
        raise GGUFError(f"llama.cpp's {a} architecture has one RoPE for all layers")
    return _one_rope_scaling(config, arch)


def _gemma3_ropes(config: Any, arch: Arch) -> dict[str, KV]:
    """Full layers: ``rope.freq_base`` and the scaling keys; sliding layers: their own base
    (llama.cpp's gemma3 applies no scaling to them)."""
    a = arch.name
    full, sliding = config.rope, config.sliding_rope or config.rope
    if full.type not in ("default", "linear"):
        raise GGUFError(
            f"llama.cpp's gemma3 architecture scales its full-attention layers' RoPE "
            f"linearly or not at all; this model's is {full.type!r}"
        )
    if sliding.type != "default":
        raise GGUFError(
            "llama.cpp's gemma3 architecture applies no RoPE scaling to its sliding-window "
            f"layers; this model's is {sliding.type!r}"
        )
    kv = _one_rope_scaling(config, arch)
    kv[f"{a}.rope.freq_base_swa"] = f32(sliding.theta)
    return kv


def _one_rope_scaling(config: Any, arch: Arch) -> dict[str, KV]:
    a = arch.name
    rope = config.rope
    if rope.type == "longrope":
        if a != "phi3":
            raise GGUFError(
                f"llama.cpp's {a} architecture has no LongRoPE factor tensors; only its phi3 "
                "architecture computes longrope scaling"
            )
        longrope_factors(config)  # checked here, written as tensors by export
        # No scaling type: llama.cpp's default (linear, factor 1) leaves the angles alone.
        return {
            f"{a}.rope.scaling.original_context_length": u32(rope.original_max_position_embeddings),
            f"{a}.rope.scaling.attn_factor": f32(longrope_attention_factor(rope)),
        }
    if rope.type == "linear":
        return {
            f"{a}.rope.scaling.type": string("linear"),
            f"{a}.rope.scaling.factor": f32(rope.factor),
        }
    if rope.type == "yarn":
        if not rope.truncate:
            raise GGUFError("YaRN with truncate=False has no llama.cpp counterpart")
        kv = {
            f"{a}.rope.scaling.type": string("yarn"),
            f"{a}.rope.scaling.factor": f32(rope.factor),
            f"{a}.rope.scaling.original_context_length": u32(rope.original_max_position_embeddings),
            f"{a}.rope.scaling.yarn_beta_fast": f32(rope.beta_fast),
            f"{a}.rope.scaling.yarn_beta_slow": f32(rope.beta_slow),
        }
        # llama.cpp scales attention by YaRN's default mscale, times this factor; deepseek2
        # scales it otherwise (its own keys).
        extra = yarn_attention_factor(rope) / _mscale(rope.factor)
        if not arch.deepseek and not math.isclose(extra, 1.0, rel_tol=1e-7):
            kv[f"{a}.rope.scaling.attn_factor"] = f32(extra)
        return kv
    if rope.type == "dynamic":
        warnings.warn(
            "llama.cpp has no dynamic-NTK RoPE scaling: the GGUF computes the same model up to "
            f"{config.max_position_embeddings} tokens and does not extend beyond it",
            stacklevel=4,
        )
    if rope.type == "llama3" and a != "llama":
        raise GGUFError(
            f"llama.cpp's {a} architecture has no rope_freqs tensor for Llama 3 RoPE scaling"
        )
    return {}  # "default"; "llama3" travels as the rope_freqs tensor


def _sliding_window(config: Any, arch: Arch) -> dict[str, KV]:
    a = arch.name
    windows = [int(w) for w in config.layer_windows]
    sizes = sorted(set(windows) - {0})
    if len(sizes) > 1:
        raise GGUFError(f"layers use several sliding windows {sizes}; GGUF records one")
    if sizes and not arch.records_window:
        raise GGUFError(
            f"llama.cpp's {a} architecture has no sliding-window attention; this model has "
            f"sliding_window={sizes[0]} on layers {[i for i, w in enumerate(windows) if w]}"
        )
    if arch.swa_period is not None:
        return _periodic_window(windows, sizes, arch)
    if a == "phi3" and sizes and 0 in windows:
        raise GGUFError(
            "llama.cpp's phi3 architecture records one window for every layer; this model "
            f"slides on layers {[i for i, w in enumerate(windows) if w]} only"
        )
    if not sizes:
        # llama.cpp's converter writes phi3's window always, 0 for none.
        return {f"{a}.attention.sliding_window": u32(0)} if a == "phi3" else {}
    if sizes[0] < config.max_position_embeddings:
        warnings.warn(
            f"llama.cpp's {a} architecture has no sliding-window attention: it attends over "
            f"the whole context, so outputs differ from this model beyond {sizes[0]} tokens",
            stacklevel=3,
        )
    if a == "phi3":  # read and then ignored by llama.cpp; every layer slides
        return {f"{a}.attention.sliding_window": u32(sizes[0])}
    # Recorded so the model reads back as it was; llama.cpp ignores it for this architecture.
    return {
        f"{a}.attention.sliding_window": u32(sizes[0]),
        f"{a}.attention.sliding_window_pattern": array(ValueType.BOOL, [w != 0 for w in windows]),
    }


def swa_layout(period: int, layers: int) -> list[bool]:
    """Which layers slide under llama.cpp's ``set_swa_pattern(period)``."""
    return [i % period < period - 1 for i in range(layers)]


def _periodic_window(windows: list[int], sizes: list[int], arch: Arch) -> dict[str, KV]:
    """The window and, where it is not the architecture's default, the period."""
    a = arch.name
    sliding = [w != 0 for w in windows]
    # A period longer than the model slides every layer; 1 slides none.
    candidates = [arch.swa_period, *range(1, len(windows) + 2)]
    period = next((p for p in candidates if swa_layout(p, len(windows)) == sliding), None)
    if period is None:
        raise GGUFError(
            f"llama.cpp's {a} architecture slides the window on layers i with "
            f"i % p < p - 1 for one period p; this model's sliding layers are "
            f"{[i for i, s in enumerate(sliding) if s]}"
        )
    if a == "gemma2" and not sizes:
        # Its cache for sliding and full layers asserts (aborts) without a sliding layer.
        raise GGUFError("llama.cpp's gemma2 architecture needs at least one sliding-window layer")
    kv: dict[str, KV] = {}
    if sizes:
        kv[f"{a}.attention.sliding_window"] = u32(sizes[0])
    if period != arch.swa_period:
        kv[f"{a}.attention.sliding_window_pattern"] = u32(period)
    return kv


# ------------------------------------------------------------------------------- RoPE


def longrope_attention_factor(rope: Any) -> float:
    """The cos/sin scale of LongRoPE (as transformers computes it): the configured one, else
    ``sqrt(1 + ln(factor) / ln(original context))`` for a factor above 1."""
    if rope.attention_factor is not None:
        return float(rope.attention_factor)
    return longrope_default_attention_factor(rope.factor, rope.original_max_position_embeddings)


def longrope_factors(config: Any) -> tuple[np.ndarray, np.ndarray]:
    """LongRoPE's (short, long) divisors as the float32 tensors llama.cpp reads, one per
    rotated frequency."""
    rope = config.rope
    half = rope.rotary_dim(config.head_dim) // 2
    short, long = (np.asarray(f, np.float32) for f in (rope.short_factor, rope.long_factor))
    if short.shape != (half,) or long.shape != (half,):
        raise GGUFError(
            f"longrope needs one short and one long factor per rotated frequency ({half}); "
            f"this model has {short.size} and {long.size}"
        )
    return short, long


def _mscale(factor: float, m: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def yarn_attention_factor(rope: Any) -> float:
    """The attention scale HF's YaRN applies to cos/sin (as transformers computes it)."""
    if rope.attention_factor is not None:
        return float(rope.attention_factor)
    if rope.mscale and rope.mscale_all_dim:
        return _mscale(rope.factor, rope.mscale) / _mscale(rope.factor, rope.mscale_all_dim)
    return _mscale(rope.factor)


def _llama3_from_factors(factors: np.ndarray, theta: float, head_dim: int, source: str) -> dict:
    """Llama 3 parameters that reproduce ``factors`` (the inverse of the map above).

    Llama 3 divides the low frequencies by ``factor`` (the largest divisor), keeps the high
    ones, and in the band between interpolates with ``smooth``, a linear function of the
    frequency that is 0 and 1 at the band's ends. The band's divisors give that line; with
    fewer than two of them any line through them whose ends fall in the gaps between
    neighbouring frequencies gives the same divisors, and we take the middle of each gap.
    A line is many parameter sets (``original_max_position_embeddings`` is free), so we pick
    the one whose original context is the line's own scale, which is the true one for the
    released Llama 3 models.
    """
    f = factors.astype(np.float64)
    u = default_inv_freq(theta, head_dim) / (2 * math.pi)  # 1 / wavelength, decreasing
    factor = float(f.max())
    tol = 1e-5 * factor
    high, low = f <= 1 + tol, f >= factor - tol  # high- and low-frequency ends
    band = ~high & ~low
    if factor <= 1 + tol or not low.any():
        raise GGUFError(f"{source}: {ROPE_FREQS} does not describe Llama 3 RoPE scaling")
    smooth = (1 / f[band] - 1 / factor) / (1 - 1 / factor)
    u_low = u[low].max()  # the band ends between u_low and the band / the high end
    u_high = u[high].min() if high.any() else 4 * u.max()
    if band.sum() >= 2:
        a, b = np.polyfit(u[band], smooth, 1)
    elif band.sum() == 1:
        # A line through (u_m, s) that is 0 at u0 > u_low and 1 before u_high.
        u_m, s = float(u[band][0]), float(smooth[0])
        u0 = (max(u_low, (u_m - s * u_high) / (1 - s)) + u_m) / 2
        a = s / (u_m - u0)
        b = -a * u0
    else:
        u0, u1 = u_low ** (2 / 3) * u_high ** (1 / 3), u_low ** (1 / 3) * u_high ** (2 / 3)
        a = 1 / (u1 - u0)
        b = -a * u0
    # smooth = old/(hi - lo)·u - lo/(hi - lo): any ``old`` works with lo = -b·old/a.
    old = int(round(-a / b))
    lo = float(-b * old / a)
    params = dict(
        factor=factor,
        low_freq_factor=lo,
        high_freq_factor=float(lo + old / a),
        original_max_position_embeddings=old,
    )
    # Tidy values that were round numbers before float32 storage (8.0, 1.0, 4.0).
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if math.isclose(params[key], round(params[key]), rel_tol=1e-5):
            params[key] = float(round(params[key]))
    if not 0 < params["low_freq_factor"] < params["high_freq_factor"]:
        raise GGUFError(f"{source}: {ROPE_FREQS} does not describe Llama 3 RoPE scaling")
    again = llama3_rope_factors(theta, head_dim, **params)
    if not np.allclose(again, factors, rtol=1e-4, atol=1e-6):
        raise GGUFError(f"{source}: {ROPE_FREQS} does not describe Llama 3 RoPE scaling")
    return params


# ----------------------------------------------------------------------------- import


def _f32(value: Any) -> float:
    """A FLOAT32 key as the decimal it was written from (1e-05, not 9.999999747378752e-06):
    the shortest decimal that rounds to the same float32."""
    return float(str(np.float32(value)))


def config_from_gguf(f: GGUFFile) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for the model in ``f``."""
    arch = arch_named(f.architecture, f.path)
    a = arch.name

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        value = f.require(f"{a}.{name}") if required else f.get(f"{a}.{name}", default)
        if isinstance(value, np.ndarray):  # some files give per-layer values
            if value.size == 0 or (value != value.flat[0]).any():
                raise GGUFError(
                    f"{f.path}: per-layer {a}.{name} = {value.tolist()} is not "
                    "supported (lorax needs one value for all layers)"
                )
            value = value.flat[0].item()
        return value

    hidden = int(key("embedding_length", required=True))
    heads = int(key("attention.head_count", required=True))
    layers = int(key("block_count", required=True))
    tokens = f.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size") or (len(tokens) if tokens is not None else None)
    if vocab is None and "token_embd.weight" in f:
        vocab = f.tensors["token_embd.weight"].shape[0]
    latent: dict[str, Any] = {}
    if arch.deepseek:
        latent = _latent_attention_from_gguf(f, a, key, layers, vocab)
        # What DeepSeek's config classes set head_dim to (RoPE's width; module docstring).
        head_dim = rotary = latent["qk_rope_head_dim"]
    else:
        head_dim = int(key("attention.key_length", hidden // heads))
        if int(key("attention.value_length", head_dim)) != head_dim:
            raise GGUFError(
                f"{f.path}: {a}.attention.value_length={key('attention.value_length')} differs "
                f"from the head size {head_dim}; lorax supports no distinct value heads"
            )
        rotary = int(key("rope.dimension_count", head_dim))
    if rotary != head_dim and (a not in _PARTIAL_ROTARY or not 0 < rotary < head_dim):
        raise GGUFError(
            f"{f.path}: {a}.rope.dimension_count={rotary} differs from the head size "
            f"{head_dim}; lorax reads partial rotary only for {list(_PARTIAL_ROTARY)}"
        )
    # llama.cpp refuses a file of an MoE family's own architecture (qwen3moe) without experts.
    experts = int(key("expert_count", 0, required=FAMILIES[arch.model_type].moe))
    if experts and arch.moe_model_type is None:
        raise GGUFError(
            f"{f.path}: {a}.expert_count={experts}: lorax reads routed experts only for "
            f"{[x.name for x in ARCHES.values() if x.moe_model_type]}"
        )
    hf: dict[str, Any] = {
        "model_type": arch.family_type(experts > 0),
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length", required=True),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "gelu_pytorch_tanh" if arch.gemma else "silu",
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "max_position_embeddings": int(key("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in f,
        "bos_token_id": f.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": f.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": f.get("tokenizer.ggml.padding_token_id"),
    }
    if arch.deepseek:
        hf.update(latent, num_key_value_heads=heads, attention_bias=False)
        hf.update(_deepseek_experts_from_gguf(f, arch, key, layers, vocab))
    elif experts:
        hf.update(_experts_from_gguf(f, arch, experts, key))
    if arch.name == "llama":
        hf["attention_bias"] = "blk.0.attn_q.bias" in f
        hf["mlp_bias"] = "blk.0.ffn_gate.bias" in f
    elif arch.name == "qwen2moe":  # Qwen 2 MoE's one switch for its q/k/v biases
        hf["qkv_bias"] = "blk.0.attn_q.bias" in f
    elif arch.name not in ("qwen2", "phi3") and not arch.deepseek:
        # qwen2's biases are implied; phi3 and deepseek2 load none (attention_bias false).
        hf["attention_bias"] = "blk.0.attn_q.bias" in f
    hf.update(_rope_from_gguf(f, a, head_dim, _f32(key("rope.freq_base", 10000.0))))
    if arch.deepseek and "rope_scaling" in hf:
        hf["rope_scaling"] = _deepseek_yarn_from_gguf(f, a, key, hf["rope_scaling"])
    if rotary != head_dim:
        hf["partial_rotary_factor"] = _partial_rotary_factor(rotary, head_dim)
    if a == "phi3":
        hf.update(_longrope_from_gguf(f, a, hf["max_position_embeddings"], rotary))
        window = int(f.get(f"{a}.attention.sliding_window", 0))
        hf["sliding_window"] = window or None  # every layer, as HF's Phi-3 reads it
    elif arch.swa_period is not None:
        hf.update(_periodic_window_from_gguf(f, arch, layers))
    else:
        hf.update(_window_from_gguf(f, arch, layers, hf["model_type"]))
    if arch.gemma:
        hf.update(_gemma_from_gguf(f, arch, hf))
    elif _own_swa_base(f, a, hf["rope_theta"]):
        raise GGUFError(f"{f.path}: {a} with a separate sliding-window RoPE base is not supported")
    return hf


def _experts_from_gguf(
    f: GGUFFile, arch: Arch, experts: int, key: Callable[..., Any]
) -> dict[str, Any]:
    """The MoE fields of config.json: the count (under the key the family's config.json
    spells it with), top-k, the weighting the architecture computes (module docstring), and
    the widths, with llama.cpp's defaults where a key is absent: the experts'
    feed_forward_length / expert_used_count, the shared expert's feed_forward_length."""
    _check_expert_weighting(f, arch.name)
    used = int(key("expert_used_count", required=True))
    n_ff = int(key("feed_forward_length", required=True))
    hf: dict[str, Any] = {
        "num_local_experts" if arch.moe_model_type == "mixtral" else "num_experts": experts,
        "num_experts_per_tok": used,
        "norm_topk_prob": arch.renormalizes,
    }
    if arch.expert_width_key:
        hf["moe_intermediate_size"] = int(key("expert_feed_forward_length", n_ff // used))
    if arch.shared_expert == "gated":
        hf["shared_expert_intermediate_size"] = int(key("expert_shared_feed_forward_length", n_ff))
    return hf


def _latent_attention_from_gguf(
    f: GGUFFile, a: str, key: Callable[..., Any], layers: int, vocab: int | None
) -> dict[str, Any]:
    """DeepSeek's latent attention from deepseek2's keys (module docstring), in config.json's
    names: the heads' real sizes, the ranks and the rotary slice. The multi-query sizes
    llama.cpp computes with must be the ones these imply, and the latents' epsilon lorax's."""
    if f"{a}.attention.key_length_mla" not in f.metadata:
        raise GGUFError(
            f"{f.path}: required metadata key '{a}.attention.key_length_mla' is missing (a "
            "file written before llama.cpp split kv_b_proj into attn_k_b/attn_v_b holds "
            "attn_kv_b instead, which lorax does not read)"
        )
    rope = int(key("rope.dimension_count", required=True))
    key_length = int(key("attention.key_length_mla", required=True))
    kv_lora = int(key("attention.kv_lora_rank", required=True))
    if not 0 < rope < key_length:
        raise GGUFError(
            f"{f.path}: {a}.rope.dimension_count={rope} must be positive and below the "
            f"query/key head's {a}.attention.key_length_mla={key_length}"
        )
    absorbed = {
        "attention.head_count_kv": 1,
        "attention.key_length": kv_lora + rope,
        "attention.value_length": kv_lora,
    }
    for name, expected in absorbed.items():
        value = int(key(name, required=True))
        if value != expected:
            raise GGUFError(
                f"{f.path}: {a}.{name}={value}; llama.cpp's {a} architecture computes latent "
                "attention as one key/value head, kv_lora_rank + rope.dimension_count wide for "
                f"keys and kv_lora_rank for values: {expected} here (kv_lora_rank {kv_lora}, "
                f"rope.dimension_count {rope})"
            )
    if _read_as_lite(layers, vocab):  # llama.cpp reads no q_lora_rank
        q_lora = int(key("attention.q_lora_rank", 0))
        if q_lora:
            raise GGUFError(
                f"{f.path}: {a}.attention.q_lora_rank={q_lora}, but llama.cpp's {a} "
                f"architecture takes a model of {layers} layers (vocabulary {vocab}) for "
                "DeepSeek-V2-Lite, without a query latent"
            )
    else:
        q_lora = int(key("attention.q_lora_rank", required=True))
    eps = _f32(key("attention.layer_norm_rms_epsilon", required=True))
    if eps != LATENT_NORM_EPS:
        raise GGUFError(
            f"{f.path}: {a}.attention.layer_norm_rms_epsilon={eps}: llama.cpp norms the "
            f"attention latents with it, lorax's DeepSeek (as transformers') with "
            f"{LATENT_NORM_EPS}, so it reads only files where the two agree"
        )
    return {
        "q_lora_rank": q_lora or None,
        "kv_lora_rank": kv_lora,
        "qk_nope_head_dim": key_length - rope,
        "qk_rope_head_dim": rope,
        "v_head_dim": int(key("attention.value_length_mla", required=True)),
    }


# expert_gating_func: llama.cpp reads a deepseek2 file without it (the first DeepSeek V2
# conversions) as softmax, but one shaped as GLM 4.7 Lite (47 or 48 layers, a vocabulary of
# 154880) as sigmoid.
_GATING_NONE = 0


def _deepseek_experts_from_gguf(
    f: GGUFFile, arch: Arch, key: Callable[..., Any], layers: int, vocab: int | None
) -> dict[str, Any]:
    """DeepSeek's model_type, experts, shared experts, dense layers and routing from
    deepseek2's keys (module docstring), with llama.cpp's defaults where a key is absent:
    softmax gating is DeepSeek V2's, sigmoid (with the selection bias) V3's; what neither
    computes as llama.cpp does is refused."""
    a = arch.name
    gating = int(key("expert_gating_func", _GATING_NONE))
    if gating == _GATING_NONE and layers in (47, 48) and vocab == 154880:
        raise GGUFError(
            f"{f.path}: no {a}.expert_gating_func: llama.cpp gates a file of this shape "
            f"({layers} layers, vocabulary {vocab}) by sigmoid as GLM 4.7 Lite, which lorax "
            "does not read"
        )
    gating = gating or _GATING_FUNCS["softmax"]
    if gating not in _GATING_FUNCS.values():
        raise GGUFError(
            f"{f.path}: {a}.expert_gating_func={gating}: lorax reads deepseek2 experts gated "
            "by softmax (1, DeepSeek V2) or sigmoid (2, DeepSeek V3)"
        )
    v3 = gating == _GATING_FUNCS["sigmoid"]
    leading = int(key("leading_dense_block_count", 0))
    biases = [gguf_name(arch, (LAYERS, ROUTER_BIAS), i) for i in range(layers)]
    if v3 and leading < layers and biases[leading] not in f:
        raise GGUFError(
            f"{f.path}: {a}.expert_gating_func=2 (sigmoid, DeepSeek V3) without the experts' "
            f"selection bias: missing tensor {biases[leading]!r} (llama.cpp computes none; "
            "lorax reads a deepseek_v3 only with its bias)"
        )
    present = [name for name in biases if name in f]
    if not v3 and present:
        raise GGUFError(
            f"{f.path}: {a}.expert_gating_func={gating} (softmax, DeepSeek V2) with a selection "
            f"bias ({present[0]!r}), which lorax's deepseek_v2 does not have"
        )
    groups = int(key("expert_group_count", 1)) or 1
    kept = int(key("expert_group_used_count", required=True)) if groups > 1 else 1
    if not v3 and kept < groups:
        raise GGUFError(
            f"{f.path}: {a}.expert_group_count={groups}, expert_group_used_count={kept}: "
            "llama.cpp keeps the groups with the best top-2 sums (DeepSeek V3's), lorax's "
            "deepseek_v2 (softmax gating) those with the best expert"
        )
    normalize = bool(key("expert_weights_norm", False))
    if not v3 and normalize:
        raise GGUFError(
            f"{f.path}: {a}.expert_weights_norm=true with softmax gating: lorax's deepseek_v2 "
            "never renormalizes the chosen experts' weights (as transformers' DeepseekV2)"
        )
    shared = int(key("expert_shared_count", required=True))
    if shared < 1:
        raise GGUFError(
            f"{f.path}: {a}.expert_shared_count={shared}: lorax computes DeepSeek with one or "
            "more shared experts"
        )
    hf: dict[str, Any] = {
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        "n_routed_experts": int(key("expert_count", required=True)),
        "num_experts_per_tok": int(key("expert_used_count", required=True)),
        "moe_intermediate_size": int(key("expert_feed_forward_length", required=True)),
        "n_shared_experts": shared,
        "first_k_dense_replace": leading,
        # llama.cpp scales by neither 0 (the key absent) nor 1.
        "routed_scaling_factor": _f32(key("expert_weights_scale", 0.0)) or 1.0,
        "n_group": groups,
        "topk_group": kept,
        "norm_topk_prob": normalize,
    }
    if v3:
        # llama.cpp turns adjacent pairs, DeepSeek's own layout (module docstring).
        hf |= {"topk_method": "noaux_tc", "rope_interleave": True}
    else:
        hf["topk_method"] = "group_limited_greedy" if groups > 1 else "greedy"
    return hf


def _deepseek_yarn_from_gguf(
    f: GGUFFile, a: str, key: Callable[..., Any], scaling: dict[str, Any]
) -> dict[str, Any]:
    """The RoPE scaling read from the file, completed as DeepSeek's YaRN: ``mscale`` and
    ``mscale_all_dim`` both ``yarn_log_multiplier / 0.1`` (module docstring); other scalings
    are refused."""
    if scaling["rope_type"] != "yarn":
        raise GGUFError(
            f"{f.path}: {scaling['rope_type']} RoPE scaling: llama.cpp's {a} architecture "
            "computes DeepSeek's YaRN, and lorax reads no other scaling for it"
        )
    if "attention_factor" in scaling:
        raise GGUFError(
            f"{f.path}: {a}.rope.scaling.attn_factor={f.get(f'{a}.rope.scaling.attn_factor')}:"
            f" llama.cpp's {a} architecture would scale the rotation by it; lorax reads "
            "deepseek2's YaRN as mscale == mscale_all_dim, which leaves the rotation unscaled"
        )
    multiplier = _f32(key("rope.scaling.yarn_log_multiplier", 0.0))
    if not multiplier > 0:
        raise GGUFError(
            f"{f.path}: {a}.rope.scaling.yarn_log_multiplier={multiplier}: lorax reads "
            "DeepSeek's YaRN as mscale = mscale_all_dim = yarn_log_multiplier / 0.1, which "
            "needs one above 0"
        )
    mscale = _f32(multiplier / 0.1)
    return {**scaling, "mscale": mscale, "mscale_all_dim": mscale}


def _partial_rotary_factor(rotary: int, head_dim: int) -> float:
    """The factor f for which lorax (and HF) rotate ``int(head_dim * f) == rotary`` dims."""
    factor = rotary / head_dim
    while int(head_dim * factor) < rotary:  # a product rounded down below the integer
        factor = float(np.nextafter(factor, 1.0))
    return factor


def _longrope_from_gguf(f: GGUFFile, a: str, context: int, rotary: int) -> dict[str, Any]:
    """Phi-3's LongRoPE: both factor tensors, the pre-training length and the cos/sin scale
    (kept only where it is not the one implied by the two lengths)."""
    present = [name for name in (ROPE_FACTORS_SHORT, ROPE_FACTORS_LONG) if name in f]
    if not present:
        return {}
    if len(present) == 1:
        raise GGUFError(f"{f.path}: {present[0]} without its short/long counterpart")
    if f.get(f"{a}.rope.scaling.type", "none") not in ("none", "linear") or f.get(
        f"{a}.rope.scaling.factor", 1.0
    ) not in (0, 1):
        raise GGUFError(f"{f.path}: LongRoPE factors combined with other RoPE scaling")
    short, long = (f.tensor(name).reshape(-1) for name in (ROPE_FACTORS_SHORT, ROPE_FACTORS_LONG))
    if short.shape != (rotary // 2,) or long.shape != (rotary // 2,):
        raise GGUFError(
            f"{f.path}: LongRoPE factors of {short.size} and {long.size} entries for "
            f"{rotary // 2} rotated frequencies"
        )
    original = int(f.require(f"{a}.rope.scaling.original_context_length"))
    params: dict[str, Any] = {
        "rope_type": "longrope",
        "short_factor": [_f32(x) for x in short],
        "long_factor": [_f32(x) for x in long],
        "original_max_position_embeddings": original,
    }
    scale = float(f.get(f"{a}.rope.scaling.attn_factor", 1.0))
    implied = longrope_default_attention_factor(context / original, original)
    if not math.isclose(scale, implied, rel_tol=1e-6):
        params["attention_factor"] = _f32(scale)
    return {"rope_scaling": params, "original_max_position_embeddings": original}


def _own_swa_base(f: GGUFFile, a: str, theta: float) -> bool:
    """Whether the file gives sliding-window layers a RoPE base of their own."""
    base = f.get(f"{a}.rope.freq_base_swa")
    return base is not None and _f32(base) != theta


def _gemma_from_gguf(f: GGUFFile, arch: Arch, hf: dict[str, Any]) -> dict[str, Any]:
    """Gemma's fields, as llama.cpp computes the file (see the module docstring)."""
    a = arch.name
    layers, hidden, heads = hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]
    wide = layers == arch.wide_scale_layers
    out: dict[str, Any] = {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": hidden // heads if wide else hf["head_dim"],
    }
    if a == "gemma2":
        # llama.cpp's defaults where the keys are absent.
        out["attn_logit_softcapping"] = _f32(f.get(f"{a}.attn_logit_softcapping", 50.0))
        out["final_logit_softcapping"] = _f32(f.get(f"{a}.final_logit_softcapping", 30.0))
        if _own_swa_base(f, a, hf["rope_theta"]):
            raise GGUFError(f"{f.path}: gemma2 with a separate sliding-window RoPE base")
        return out
    # gemma3: the full layers' RoPE as read; the sliding layers' plain, with their own base.
    full = {"rope_theta": hf.pop("rope_theta"), "rope_type": "default"}
    full.update(hf.pop("rope_scaling", {}))
    if full["rope_type"] not in ("default", "linear"):
        raise GGUFError(f"{f.path}: gemma3 with {full['rope_type']} RoPE scaling")
    sliding = {"rope_type": "default", "rope_theta": _f32(f.get(f"{a}.rope.freq_base_swa", 1e4))}
    out["rope_parameters"] = {"full_attention": full, "sliding_attention": sliding}
    out["attn_logit_softcapping"] = None
    final = f.get(f"{a}.final_logit_softcapping")
    out["final_logit_softcapping"] = None if final is None else _f32(final)
    return out


def _periodic_window_from_gguf(f: GGUFFile, arch: Arch, layers: int) -> dict[str, Any]:
    """Gemma's sliding layers: a window and llama.cpp's period (or a per-layer pattern)."""
    a = arch.name
    # llama.cpp: gemma2 defaults to a 4096 window; gemma3 slides nothing without the key.
    window = int(f.get(f"{a}.attention.sliding_window", 4096 if a == "gemma2" else 0))
    pattern = f.get(f"{a}.attention.sliding_window_pattern", arch.swa_period)
    if isinstance(pattern, (int, np.integer)):
        sliding = swa_layout(int(pattern), layers)
    else:
        sliding = [bool(x) for x in pattern]
        if len(sliding) != layers:
            raise GGUFError(
                f"{f.path}: {a}.attention.sliding_window_pattern has {len(sliding)} "
                f"entries for {layers} layers"
            )
    if not window:
        sliding = [False] * layers
    return {
        "sliding_window": window or None,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
    }


def _rope_from_gguf(f: GGUFFile, a: str, head_dim: int, theta: float) -> dict[str, Any]:
    scaling_type = f.get(f"{a}.rope.scaling.type", "none")
    # Older files give only the linear factor, under its old key.
    factor = f.get(f"{a}.rope.scaling.factor", f.get(f"{a}.rope.scale_linear"))
    params: dict[str, Any] = {}
    if scaling_type == "linear" or (scaling_type == "none" and factor not in (None, 0, 1)):
        params = {"rope_type": "linear", "factor": _f32(factor)}
    elif scaling_type == "yarn":
        factor = _f32(factor)
        params = {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": int(
                f.get(
                    f"{a}.rope.scaling.original_context_length", f.get(f"{a}.context_length", 2048)
                )
            ),
            "beta_fast": _f32(f.get(f"{a}.rope.scaling.yarn_beta_fast", 32.0)),
            "beta_slow": _f32(f.get(f"{a}.rope.scaling.yarn_beta_slow", 1.0)),
        }
        extra = f.get(f"{a}.rope.scaling.attn_factor")
        if extra is not None and not math.isclose(extra, 1.0, rel_tol=1e-6):
            params["attention_factor"] = _f32(_f32(extra) * _mscale(factor))
    elif scaling_type not in ("none", "linear"):
        raise GGUFError(f"{f.path}: unsupported RoPE scaling type {scaling_type!r}")
    if ROPE_FREQS in f:
        if params:
            raise GGUFError(f"{f.path}: both {ROPE_FREQS} and {scaling_type} RoPE scaling")
        factors = f.tensor(ROPE_FREQS)
        if not np.allclose(factors, 1.0):
            params = {
                "rope_type": "llama3",
                **_llama3_from_factors(factors, theta, head_dim, f.path),
            }
    out: dict[str, Any] = {"rope_theta": theta}
    if params:
        out["rope_scaling"] = params
    return out


# llama.cpp's expert-weighting keys that deepseek2 routes by (``_deepseek_experts_from_gguf``)
# and other architectures may set: a gating function other than the softmax (1; sigmoid is
# 2), a factor on the chosen weights (0 or 1: none) and expert groups (llama.cpp reads
# ``expert_group_count`` for every architecture and then keeps the groups with the best top-2
# sums). lorax's Mixtral and Qwen MoE route by softmax over all experts, unscaled.
_SOFTMAX_GATING = _GATING_FUNCS["softmax"]


def _check_expert_weighting(f: GGUFFile, a: str) -> None:
    """Refuses routing keys a Mixtral/Qwen MoE file (llama, qwen3moe, qwen2moe) would be
    computed with by llama.cpp, but lorax's model of it does not compute."""
    gating = f.get(f"{a}.expert_gating_func")
    if gating is not None and int(gating) != _SOFTMAX_GATING:
        raise GGUFError(
            f"{f.path}: {a}.expert_gating_func={gating}: lorax routes experts by softmax "
            f"({_SOFTMAX_GATING}) only"
        )
    scale = f.get(f"{a}.expert_weights_scale")
    if scale is not None and float(scale) not in (0.0, 1.0):
        raise GGUFError(
            f"{f.path}: {a}.expert_weights_scale={float(scale)}: llama.cpp scales the chosen "
            "experts' weights by it, which no model lorax reads does"
        )
    groups = int(f.get(f"{a}.expert_group_count", 1))
    kept = int(f.get(f"{a}.expert_group_used_count", groups))
    if groups > 1 and kept < groups:
        raise GGUFError(
            f"{f.path}: {a}.expert_group_count={groups}, expert_group_used_count={kept}: "
            f"llama.cpp chooses experts within the best {kept} groups, which lorax's {a} "
            "experts do not"
        )


def _window_from_gguf(f: GGUFFile, arch: Arch, layers: int, model_type: str) -> dict[str, Any]:
    a = arch.name
    window = f.get(f"{a}.attention.sliding_window")
    if not window:
        return {}
    if not arch.records_window:
        raise GGUFError(
            f"{f.path}: {a}.attention.sliding_window={window}, but llama.cpp's {a} "
            "architecture has no sliding-window attention (lorax reads no window for it)"
        )
    pattern = f.get(f"{a}.attention.sliding_window_pattern")
    sliding = [bool(x) for x in pattern] if pattern is not None else [True] * layers
    if len(sliding) != layers:
        raise GGUFError(
            f"{f.path}: {a}.attention.sliding_window_pattern has {len(sliding)} "
            f"entries for {layers} layers"
        )
    if model_type == "mixtral":  # one window on every layer, as Mistral's
        return {"sliding_window": int(window)}
    if a == "llama":  # a llama-architecture file with a window is a Mistral
        return {"model_type": "mistral", "sliding_window": int(window)}
    return {
        "use_sliding_window": True,
        "sliding_window": int(window),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
    }
