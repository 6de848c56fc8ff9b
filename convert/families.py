"""What each Hugging Face ``model_type`` computes beyond Llama's decoder layer, by type alone.

One table for the facts a ``config.json`` does not spell out because the architecture fixes
them: the config reader builds a ``ModelConfig`` from it, and the writers (``config.json``,
GGUF) refuse a config that departs from what its ``model_type`` (or llama.cpp architecture)
implies, instead of writing a file that computes something else.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


@dataclasses.dataclass(frozen=True)
class Family:
    """A ``model_type``'s fixed traits, in ``ModelConfig``'s field names."""

    activation: str = "silu"  # the MLP's (HF's ACT2FN name): SwiGLU, or Gemma's GeGLU
    norm_style: str = "llama"  # "gemma": RMSNorm scales by 1 + weight, in float32
    sandwich_norms: bool = False  # each sub-layer's output normed before the residual add
    qk_norm: bool = False  # an RMSNorm over each head's query and key before RoPE
    fused_projections: bool = False  # q/k/v and gate/up stored as one projection each
    scaled_embeddings: bool = False  # embeddings times sqrt(hidden_size)
    moe: bool = False  # the MLP is a routed mixture of experts (num_local_experts of them)
    # The router's chosen weights are rounded to the compute dtype before they scale the
    # experts' outputs (Qwen's MoE); Mixtral scales in float32.
    round_expert_weights: bool = False
    # Beside the routed experts, one dense SwiGLU MLP every token goes through, scaled by
    # sigmoid(x · shared_expert_gate) (Qwen 2 MoE): its projections are the layer's
    # gate/up/down_proj, shared_expert_intermediate_size wide.
    shared_expert: bool = False
    # The shared expert's output is scaled by sigmoid(x · shared_expert_gate) (Qwen 2 MoE);
    # DeepSeek's shared experts are added unscaled.
    shared_expert_gate: bool = False
    # Multi-head latent attention (DeepSeek V2/V3): keys and values are expanded per head from
    # a low-rank latent of each token (kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj), queries
    # from one too where q_lora_rank is set, and RoPE turns a separate slice of each head.
    mla: bool = False
    # RoPE turns queries and keys in float32 by float32 cos/sin, rounded once to the compute
    # dtype (DeepSeek V2: transformers rotates its complex pairs in float32). The others round
    # cos/sin to the compute dtype and turn in it.
    rope_in_float32: bool = False

    def embedding_multiplier(self, hidden_size: int) -> float:
        return math.sqrt(hidden_size) if self.scaled_embeddings else 1.0


_GEMMA = Family("gelu_pytorch_tanh", "gemma", sandwich_norms=True, scaled_embeddings=True)

_DEEPSEEK = Family(moe=True, shared_expert=True, mla=True)
# The epsilon of latent attention's RMSNorms (q_a_layernorm, kv_a_layernorm): transformers'
# and DeepSeek's modules keep the default whatever rms_norm_eps says.
LATENT_NORM_EPS = 1e-6

# Yi and DeepSeek's dense models ship as ``llama``; ``gemma3_text`` is Gemma 3's language model.
FAMILIES = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(),
    "qwen3": Family(qk_norm=True),
    "gemma2": _GEMMA,
    "gemma3_text": dataclasses.replace(_GEMMA, qk_norm=True),
    "phi3": Family(fused_projections=True),
    "mixtral": Family(moe=True),
    "qwen3_moe": Family(qk_norm=True, moe=True, round_expert_weights=True),
    "qwen2_moe": Family(
        moe=True, round_expert_weights=True, shared_expert=True, shared_expert_gate=True
    ),
    "deepseek_v2": dataclasses.replace(_DEEPSEEK, rope_in_float32=True),
    "deepseek_v3": _DEEPSEEK,
}


def departures(config: Any, model_type: str | None = None) -> dict[str, Any]:
    """``config``'s fixed traits that differ from ``model_type``'s (default: its own), by
    field name, with ``config``'s values."""
    family = FAMILIES[model_type or config.model_type]
    wrong = {
        field.name: getattr(config, field.name)
        for field in dataclasses.fields(Family)
        # scaled_embeddings is checked by value below; a config's shared_expert_gate is its
        # family's wherever it has a shared expert (which is checked).
        if field.name not in ("scaled_embeddings", "shared_expert_gate")
        and getattr(config, field.name) != getattr(family, field.name)
    }
    if not math.isclose(
        config.embedding_multiplier, family.embedding_multiplier(config.hidden_size), rel_tol=1e-6
    ):
        wrong["embedding_multiplier"] = config.embedding_multiplier
    return wrong
