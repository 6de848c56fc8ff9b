"""An Unsloth-shaped facade, so Unsloth scripts move over nearly unchanged.

It only calls the public functions (``lorax.load``, ``lorax.init_lora``); it holds no state
of its own beyond what it returns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import jax

from convert.names import EXPERT_MLP, FUSED
from lorax import remat as remat_lib
from lorax.loading import load
from lorax.lora import LoraWeights, init_lora
from lorax.model import Model

# Unsloth's names for gradient checkpointing -> lorax's remat policies.
_CHECKPOINTING = {False: "none", True: "full", "unsloth": "offload", None: "none"}


@dataclasses.dataclass(frozen=True)
class PeftModel:
    """What ``get_peft_model`` returns: the frozen base, its adapters and the remat policy."""

    base: Model
    lora: LoraWeights
    remat: str = "none"

    @property
    def config(self):
        return self.base.config

    @property
    def tokenizer(self):
        return self.base.tokenizer


class FastLanguageModel:
    """``from_pretrained`` -> ``(model, tokenizer)``; ``get_peft_model`` -> ``PeftModel``."""

    @staticmethod
    def from_pretrained(
        model_name: str,
        max_seq_length: int | None = None,
        dtype: Any = None,
        load_in_4bit: bool = True,
        **unsupported: Any,
    ) -> tuple[Model, Any]:
        _reject(unsupported, "from_pretrained", allowed={"token", "device_map"})
        model = load(
            model_name, quantize="nf4" if load_in_4bit else None, dtype=dtype or "bfloat16"
        )
        return model, model.tokenizer

    @staticmethod
    def get_peft_model(
        model: Model,
        r: int = 16,
        target_modules: str | Iterable[str] = "all-linear",
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        use_gradient_checkpointing: bool | str | None = "unsloth",
        random_state: int = 3407,
        use_rslora: bool = False,
        **unsupported: Any,
    ) -> PeftModel:
        if bias != "none":
            raise ValueError(f"get_peft_model: bias={bias!r} is not supported (only 'none')")
        _reject(unsupported, "get_peft_model", allowed={"max_seq_length", "loftq_config"})
        if unsupported.get("loftq_config"):
            raise ValueError("get_peft_model: loftq_config is not supported")
        remat = _CHECKPOINTING.get(use_gradient_checkpointing, use_gradient_checkpointing)
        try:
            remat_lib.validate(remat if isinstance(remat, str) else repr(remat))
        except ValueError as e:
            raise ValueError(
                f"get_peft_model: use_gradient_checkpointing={use_gradient_checkpointing!r}; "
                f"use True, False, 'unsloth', one of {remat_lib.POLICIES} or a schedule such "
                f"as 'selective:12,mlp' ({e})"
            ) from None
        lora = init_lora(
            model,
            rank=r,
            alpha=lora_alpha,
            targets=_llama_targets(model, target_modules),
            key=jax.random.key(random_state),
            dropout=lora_dropout,
            use_rslora=use_rslora,
        )
        return PeftModel(model, lora, remat)


def _llama_targets(model: Model, targets: str | Iterable[str]) -> str | tuple[str, ...]:
    """Unsloth's Llama names on a model that computes them otherwise: fused (Phi-3: q/k/v ->
    qkv_proj, gate/up -> gate_up_proj) or as experts (Mixtral: gate/up ->
    experts_gate_up_proj, down -> experts_down_proj). Unsloth loads Phi-3 with the
    projections split, so its scripts list them; here each fused or expert projection is one
    module (PEFT's too), so all of its parts must be asked for together. A model with a shared
    expert (Qwen 2 MoE) has the Llama MLP names as its own (the shared expert's), which is
    what they name there, as in PEFT."""
    config = model.config
    if isinstance(targets, str) or not (config.fused_projections or config.moe):
        return targets
    if config.shared_expert:
        return tuple(targets)
    known_parts = EXPERT_MLP if config.moe else FUSED
    names = tuple(targets)
    mapped = []
    for name in config.projections():
        parts = known_parts.get(name, (name,))
        asked = [p for p in parts if p in names]
        if asked and len(asked) < len(parts) and name not in names:
            raise ValueError(
                f"get_peft_model: {model.config.model_type} computes {list(parts)} as one "
                f"projection, {name}; target all of them or none, not {asked}"
            )
        if asked or name in names:
            mapped.append(name)
    leftover = sorted(
        set(names) - set(mapped) - {p for n in mapped for p in known_parts.get(n, ())}
    )
    return tuple(mapped) + tuple(leftover)  # init_lora names what is left unknown


def _reject(kwargs: dict[str, Any], where: str, allowed: set[str]) -> None:
    bad = sorted(set(kwargs) - allowed)
    if bad:
        raise TypeError(f"{where}: unsupported argument(s) {bad}")
