"""``ModelConfig`` -> a Hugging Face ``config.json`` dict, for exported model directories.

lorax keeps only the fields that change the computation, not the original ``config.json``,
so exports regenerate it. The dict is written for the widest range of readers: the fields
transformers >= 5 reads (``rope_parameters``, ``dtype``, ``layer_types``) beside their
legacy spellings (``rope_theta``/``rope_scaling``, ``torch_dtype``, ``max_window_layers``)
that older transformers, vLLM and llama.cpp's converter read. Reading it back with
``ModelConfig.from_hf_dict`` gives the same config; a config this format cannot express for
its ``model_type`` is an error, never a silently different model.

This module knows config layouts, not models: it duck-types the config object it is given.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from convert.families import FAMILIES, departures

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
_GEMMA = ("gemma2", "gemma3_text")
DTYPE_NAMES = ("bfloat16", "float16", "float32")

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_QWEN2_BIAS = ("q_proj", "k_proj", "v_proj")


class HFConfigError(ValueError):
    """A ``ModelConfig`` that the HF config format of its ``model_type`` cannot express."""


def hf_config_dict(config: Any, dtype: str) -> dict[str, Any]:
    """A ``config.json`` dict that transformers loads as the architecture ``config`` describes.

    ``dtype`` names the dtype of the stored (non-quantized) tensors; it becomes ``dtype`` and
    ``torch_dtype``.
    """
    if config.model_type not in ARCHITECTURES:
        raise HFConfigError(f"cannot write a config.json for model_type={config.model_type!r}")
    if dtype not in DTYPE_NAMES:
        raise HFConfigError(f"dtype must be one of {DTYPE_NAMES}, got {dtype!r}")
    eos = config.eos_token_id
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[config.model_type]],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": config.activation,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
        "pad_token_id": config.pad_token_id,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    hf.update(_bias_fields(config))
    hf.update(_window_fields(config))
    hf.update(_rope_fields(config))
    hf.update(_family_fields(config))
    return hf


def _family_fields(config: Any) -> dict[str, Any]:
    """What Gemma and a mixture of experts configure beyond Llama's fields, and an error for
    a config that departs from what its ``model_type`` fixes (``convert.families``), which
    the file cannot say."""
    gemma = config.model_type in _GEMMA
    wrong = list(departures(config))
    if FAMILIES[config.model_type].mla:
        # The softmax scale is the RoPE's (YaRN's mscale_all_dim), not a field of its own.
        implied = dataclasses.replace(config, query_pre_attn_scalar=None)
        scalar = _latent_attention_scalar(config)
        if config.query_pre_attn_scalar != scalar:
            wrong.append(f"attention scale (query_pre_attn_scalar {scalar} implied by the RoPE)")
        config = implied
    if not gemma and (
        config.query_pre_attn_scalar is not None
        or config.attn_logit_softcap is not None
        or config.final_logit_softcap is not None
    ):
        wrong.append("attention scale / softcaps")
    if wrong:
        raise HFConfigError(f"{config.model_type}'s config.json cannot express {wrong}")
    if FAMILIES[config.model_type].mla:
        return _deepseek_fields(config)
    if FAMILIES[config.model_type].moe:
        return _moe_fields(config)
    if not gemma:
        return {}
    scalar = config.query_pre_attn_scalar
    if scalar is None or not float(scalar).is_integer():
        raise HFConfigError(
            f"{config.model_type}'s query_pre_attn_scalar is an int; config has {scalar}"
        )
    return {
        "hidden_activation": config.activation,
        "query_pre_attn_scalar": int(scalar),  # transformers >= 5 rejects 256.0
        "attn_logit_softcapping": config.attn_logit_softcap,
        "final_logit_softcapping": config.final_logit_softcap,
    }


def _moe_fields(config: Any) -> dict[str, Any]:
    """The experts' count, top-k, width and weighting, and whether the load-balancing loss
    is trained.

    transformers adds that loss only with ``output_router_logits``, so lorax's
    ``router_aux_loss_coef`` of None (off) writes it false and leaves the weight to
    transformers' default; a weight writes both.
    """
    coef = config.router_aux_loss_coef
    fields: dict[str, Any] = {
        "num_experts_per_tok": config.experts_per_token,
        "output_router_logits": coef is not None,
    }
    if coef is not None:
        fields["router_aux_loss_coef"] = coef
    if config.model_type == "mixtral":
        if config.expert_width != config.intermediate_size or not config.normalize_expert_weights:
            raise HFConfigError(
                "mixtral's experts are intermediate_size wide and renormalize their weights; "
                f"config has expert width {config.expert_width} (intermediate_size "
                f"{config.intermediate_size}), normalize={config.normalize_expert_weights}"
            )
        if config.dense_mlp_layers:
            raise HFConfigError(
                f"mixtral routes every layer; config has dense MLPs in layers "
                f"{list(config.dense_mlp_layers)}"
            )
        return {**fields, "num_local_experts": config.num_experts, "router_jitter_noise": 0.0}
    # Qwen 2/3 MoE, in the hub's spelling (num_experts), dense layers listed by index; Qwen 2
    # MoE's shared expert beside the routed ones (departures() has checked the family has one).
    shared = (
        {"shared_expert_intermediate_size": config.shared_expert_intermediate_size}
        if config.shared_expert
        else {}
    )
    return {
        **fields,
        "num_experts": config.num_experts,
        "moe_intermediate_size": config.expert_width,
        "norm_topk_prob": config.normalize_expert_weights,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(config.dense_mlp_layers),
        **shared,
    }


def generation_config_dict(config: Any) -> dict[str, Any]:
    """A minimal ``generation_config.json``: the special tokens generation stops and pads on."""
    eos = config.eos_token_id
    out = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
        "pad_token_id": config.pad_token_id,
    }
    return {k: v for k, v in out.items() if v is not None}


def _latent_attention_scalar(config: Any) -> float | None:
    """The query_pre_attn_scalar a DeepSeek config reads from its RoPE (lorax.config)."""
    rope = config.rope
    if rope.type == "default" or not rope.mscale_all_dim or rope.factor <= 1:
        return None
    return config.head_dim / (0.1 * rope.mscale_all_dim * math.log(rope.factor) + 1.0) ** 4


def _deepseek_fields(config: Any) -> dict[str, Any]:
    """DeepSeek V2/V3's latent attention, experts and routing, in transformers' names; an
    error for what their config classes cannot say."""
    v3 = config.model_type == "deepseek_v3"
    dense = config.dense_mlp_layers
    wrong = []
    if dense != tuple(range(len(dense))):
        wrong.append(
            f"dense-MLP layers {list(dense)} (only the first layers: first_k_dense_replace)"
        )
    width = config.expert_width
    shared = config.shared_expert_intermediate_size or 0
    if shared % width:
        wrong.append(f"a shared-expert width {shared} not a multiple of the experts' {width}")
    expected = dict(
        router_scoring="sigmoid" if v3 else "softmax",
        router_bias=v3,
        float32_router=True,
        expert_group_score="top2_sum" if v3 else "max",
        round_expert_weights=False,
        rope_interleave=config.rope_interleave if v3 else True,
        num_kv_heads=config.num_heads,
    )
    if not v3:
        expected["normalize_expert_weights"] = False
    wrong += [f"{k}={getattr(config, k)!r}" for k, v in expected.items() if getattr(config, k) != v]
    if any(config.layer_windows):
        wrong.append("sliding windows")
    if wrong:
        raise HFConfigError(f"{config.model_type}'s config.json cannot express {wrong}")
    fields: dict[str, Any] = {
        "q_lora_rank": config.q_lora_rank,
        "kv_lora_rank": config.kv_lora_rank,
        "qk_nope_head_dim": config.qk_nope_head_dim,
        "qk_rope_head_dim": config.qk_rope_head_dim,
        "v_head_dim": config.v_head_dim,
        "head_dim": config.qk_rope_head_dim,  # what the config classes set it to
        "n_routed_experts": config.num_experts,
        "num_experts_per_tok": config.experts_per_token,
        "moe_intermediate_size": width,
        "n_shared_experts": shared // width,
        "first_k_dense_replace": len(dense),
        "routed_scaling_factor": config.routed_scaling_factor,
        "n_group": config.expert_groups,
        "topk_group": config.expert_groups_kept,
    }
    if v3:
        fields |= {"norm_topk_prob": config.normalize_expert_weights,
                   "rope_interleave": config.rope_interleave}  # fmt: skip
    else:
        grouped = config.expert_groups > 1
        fields |= {"topk_method": "group_limited_greedy" if grouped else "greedy",
                   "norm_topk_prob": False}  # fmt: skip
    return fields


def _bias_fields(config: Any) -> dict[str, Any]:
    bias = set(config.bias_projections)
    if FAMILIES[config.model_type].mla:
        covered = {"kv_a_proj_with_mqa", "o_proj"} | ({"q_a_proj"} if config.q_lora_rank else set())
        if bias not in (set(), covered):
            raise HFConfigError(
                f"{config.model_type}'s attention_bias covers {sorted(covered)}; config has "
                f"biases on {sorted(bias)}"
            )
        return {"attention_bias": bool(bias)}
    attention, mlp = bias & set(_ATTENTION), bias & set(_MLP)
    if config.model_type == "qwen2":
        if bias != set(_QWEN2_BIAS):
            raise HFConfigError(
                f"qwen2 has biases on exactly {list(_QWEN2_BIAS)}; config has {sorted(bias)}"
            )
        return {}
    if config.model_type == "qwen2_moe":  # one switch, qkv_bias, for q/k/v's (never o's)
        if bias not in (set(), set(_QWEN2_BIAS)):
            raise HFConfigError(
                f"qwen2_moe's qkv_bias covers exactly {list(_QWEN2_BIAS)}; config has biases "
                f"on {sorted(bias)}"
            )
        return {"qkv_bias": bool(bias)}
    if config.model_type in ("mistral", "mixtral", "phi3"):
        if bias:
            raise HFConfigError(
                f"{config.model_type} has no projection biases; config has {sorted(bias)}"
            )
        return {}
    # One switch for all attention projections (llama: and one for all MLP projections).
    if config.model_type == "llama":
        expressible = attention in (set(), set(_ATTENTION)) and mlp in (set(), set(_MLP))
        switches = "attention_bias/mlp_bias cover all attention/MLP projections"
    else:
        expressible = attention in (set(), set(_ATTENTION)) and not mlp
        switches = "attention_bias covers all attention projections (no MLP biases)"
    if not expressible:
        raise HFConfigError(
            f"{config.model_type}'s {switches}; config has biases on {sorted(bias)}"
        )
    fields = {"attention_bias": bool(attention)}
    if config.model_type == "llama":
        fields["mlp_bias"] = bool(mlp)
    return fields


def _window_fields(config: Any) -> dict[str, Any]:
    windows = tuple(config.layer_windows)
    sizes = sorted(set(windows) - {0})
    if len(sizes) > 1:
        raise HFConfigError(f"{config.model_type} has one sliding window size; config has {sizes}")
    window = sizes[0] if sizes else None
    if config.model_type == "llama":
        if window is not None:
            raise HFConfigError(f"llama has no sliding-window attention; config has {window}")
        return {}
    if config.model_type in ("mistral", "mixtral", "phi3", "qwen3_moe"):
        if window is not None and 0 in windows:
            raise HFConfigError(
                f"{config.model_type} applies its sliding window to every layer or none"
            )
        if config.model_type == "qwen3_moe":
            return {"use_sliding_window": window is not None, "sliding_window": window}
        return {"sliding_window": window}
    layer_types = ["sliding_attention" if w else "full_attention" for w in windows]
    if config.model_type in _GEMMA:  # any pattern, spelled per layer
        fields = {"sliding_window": window, "layer_types": layer_types}
        # Readers older than ``layer_types`` (transformers < 4.53, vLLM) take Gemma 3's layout
        # from a period: layer i slides iff (i + 1) % period != 0.
        period = next(
            (p for p in range(1, len(windows) + 2)
             if [bool((i + 1) % p) for i in range(len(windows))] == [bool(w) for w in windows]),
            None,
        )  # fmt: skip
        if config.model_type == "gemma3_text" and period is not None:
            fields["sliding_window_pattern"] = period
        return fields
    if config.model_type == "qwen2_moe":
        return _qwen2_moe_window_fields(windows, window)
    # qwen2/qwen3: layers from ``max_window_layers`` on slide; ``layer_types`` spells it per
    # layer.
    first = windows.index(window) if window is not None else len(windows)
    if any(w != (window or 0) for w in windows[first:]):
        raise HFConfigError(
            f"{config.model_type} slides the window on every layer from max_window_layers on; "
            f"config has layer windows {list(windows)}"
        )
    return {
        "use_sliding_window": window is not None,
        "sliding_window": window,
        "max_window_layers": first,
        "layer_types": layer_types,
    }


def _qwen2_moe_window_fields(windows: tuple[int, ...], window: int | None) -> dict[str, Any]:
    """Qwen 2 MoE's windows: ``layer_types`` per layer, and the ``max_window_layers`` that
    gives the same layers under ``Qwen2MoeConfig``'s rule for files without them (every other
    layer, the first included, below it; ``lorax.config``'s reader applies the same rule).
    Patterns that rule cannot give are refused, as for qwen2."""
    sliding = [bool(w) for w in windows]
    fields = {
        "use_sliding_window": window is not None,
        "sliding_window": window,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
    }
    if window is None:
        return fields  # max_window_layers is read only with a window
    below = max(i + 1 for i, s in enumerate(sliding) if s)
    if all(sliding[0::2]):
        below = len(windows)  # every other layer throughout: bounded by the layer count
    if sliding != [i % 2 == 0 and i < below for i in range(len(windows))]:
        raise HFConfigError(
            "qwen2_moe slides the window on every other layer, the first included, below "
            f"max_window_layers; config has layer windows {list(windows)}"
        )
    return {**fields, "max_window_layers": below}


def _rope_fields(config: Any) -> dict[str, Any]:
    fields = _one_rope_fields(config.rope, config.max_position_embeddings)
    sliding = config.sliding_rope
    if config.model_type != "gemma3_text":
        if sliding is not None:
            raise HFConfigError(
                f"{config.model_type} has one RoPE for all layers; config has a sliding one"
            )
        return fields
    # Gemma 3: per layer type (transformers >= 5), and the legacy spelling: the full layers'
    # rope_theta/rope_scaling, the sliding layers' plain RoPE base.
    sliding = sliding or config.rope
    fields["rope_parameters"] = {
        "full_attention": fields["rope_parameters"],
        "sliding_attention": _one_rope_fields(sliding, config.max_position_embeddings)[
            "rope_parameters"
        ],
    }
    if sliding.type == "default":
        fields["rope_local_base_freq"] = sliding.theta
    return fields


def _one_rope_fields(rope: Any, max_position_embeddings: int) -> dict[str, Any]:
    scaling: dict[str, Any] = {"rope_type": rope.type}
    original = rope.original_max_position_embeddings
    # longrope's factor is implied by the two lengths (Phi-3's own files leave it out).
    implied = rope.type == "longrope" and rope.factor == max_position_embeddings / original
    if rope.type != "default" and not implied:
        scaling["factor"] = rope.factor
        if rope.original_max_position_embeddings is not None:
            scaling["original_max_position_embeddings"] = rope.original_max_position_embeddings
    if rope.type == "llama3":
        scaling["low_freq_factor"] = rope.low_freq_factor
        scaling["high_freq_factor"] = rope.high_freq_factor
    elif rope.type == "longrope":
        scaling["short_factor"] = list(rope.short_factor)
        scaling["long_factor"] = list(rope.long_factor)
        if rope.attention_factor is not None:
            scaling["attention_factor"] = rope.attention_factor
    elif rope.type == "yarn":
        scaling["beta_fast"] = rope.beta_fast
        scaling["beta_slow"] = rope.beta_slow
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if getattr(rope, key) is not None:
                scaling[key] = getattr(rope, key)
        if not rope.truncate:
            scaling["truncate"] = False
    fields = {
        "rope_theta": rope.theta,
        "rope_parameters": {"rope_theta": rope.theta, **scaling},
        "rope_scaling": scaling if rope.type != "default" else None,
    }
    if rope.partial_rotary_factor != 1.0:
        fields["partial_rotary_factor"] = rope.partial_rotary_factor
        fields["rope_parameters"]["partial_rotary_factor"] = rope.partial_rotary_factor
    if rope.type == "longrope":  # Phi-3 reads the pre-training length at the top level
        fields["original_max_position_embeddings"] = rope.original_max_position_embeddings
    return fields
