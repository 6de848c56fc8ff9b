"""The one map between lorax's stacked parameter paths and Hugging Face tensor names.

Loaders, exporters and the PEFT adapter format all derive their names from here, so a new
family or renamed tensor is a change in one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# Phi-3 stores q/k/v as one projection and gate/up as another (PEFT targets these names too):
# each fused projection's output rows are its parts' rows, concatenated in this order.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
FUSED_ATTENTION = ("qkv_proj", "o_proj")
FUSED_MLP = ("gate_up_proj", "down_proj")
# Every projection name of every family, in an order each family's own order is a part of.
ALL_PROJECTIONS = ("qkv_proj", *ATTENTION, "gate_up_proj", *MLP)
QK_NORMS = ("q_norm", "k_norm")  # per-head RMSNorms of queries and keys (Qwen 3, Gemma 3)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One parameter: its path in the pytree, its HF name template and its HF shape.

    ``hf_name`` contains ``{i}`` for per-layer tensors, which lorax stacks on axis 0.
    """

    path: tuple[str, ...]
    hf_name: str
    shape: tuple[int, ...]
    per_layer: bool
    quantizable: bool = False

    def hf_names(self, num_layers: int) -> list[str]:
        if not self.per_layer:
            return [self.hf_name]
        return [self.hf_name.format(i=i) for i in range(num_layers)]


def module_name(projection: str) -> str:
    """HF's module path of a projection inside a decoder layer (``self_attn.q_proj``)."""
    return f"{'self_attn' if projection in ATTENTION + FUSED_ATTENTION else 'mlp'}.{projection}"


def layer_prefix(i: int | str = "{i}") -> str:
    return f"model.layers.{i}"


def tensor_specs(config: Any) -> Iterator[TensorSpec]:
    """Every tensor of a checkpoint of ``config``'s architecture (HF's order within a layer may
    differ; loaders look tensors up by name)."""
    d, v = config.hidden_size, config.vocab_size
    yield TensorSpec(("embed_tokens",), "model.embed_tokens.weight", (v, d), False)
    for norm in config.layer_norm_names():
        yield TensorSpec(("layers", norm), f"{layer_prefix()}.{norm}.weight", (d,), True)
    if config.qk_norm:
        for norm in QK_NORMS:
            name = f"{layer_prefix()}.self_attn.{norm}.weight"
            yield TensorSpec(("layers", norm), name, (config.head_dim,), True)
    for proj in config.projections():
        out_dim, in_dim = config.projection_shape(proj)
        base = f"{layer_prefix()}.{module_name(proj)}"
        yield TensorSpec(
            ("layers", proj, "weight"), f"{base}.weight", (out_dim, in_dim), True, True
        )
        if proj in config.bias_projections:
            yield TensorSpec(("layers", proj, "bias"), f"{base}.bias", (out_dim,), True)
    yield TensorSpec(("norm",), "model.norm.weight", (d,), False)
    if not config.tie_word_embeddings:
        yield TensorSpec(("lm_head", "weight"), "lm_head.weight", (v, d), False)


# Tensors some checkpoints carry that hold no parameters (recomputed buffers).
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


def peft_lora_name(i: int, projection: str, which: str) -> str:
    """PEFT's key for a LoRA matrix in ``adapter_model.safetensors`` (``which``: A or B)."""
    return f"base_model.model.{layer_prefix(i)}.{module_name(projection)}.lora_{which}.weight"
