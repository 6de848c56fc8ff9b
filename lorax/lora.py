"""LoRA: the trainable pytree and the one linear op every projection goes through.

The LoRA parameters are a pytree separate from the frozen base, with the base's nesting
(``{"layers": {"q_proj": {"lora_a": [L, r, in], "lora_b": [L, out, r]}}}``; an MoE expert
projection has ``[L, E, r, in]`` and ``[L, E, out, r]``, one pair per expert; an MoE model
with dense-MLP layers keeps theirs under ``"dense_layers"``, ``ModelConfig.layer_stacks``)
and PEFT's shapes, init and scaling, so adapters round-trip with ``peft``. The static half (rank,
alpha, targets, ...) travels as pytree metadata, so ``jax.grad`` w.r.t. a ``LoraWeights``
gives a ``LoraWeights`` of gradients and ``jit`` specialises on the config, not the values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from convert.names import EXPERT_PROJECTIONS
from lorax.config import ATTENTION_PROJECTIONS, MLP_PROJECTIONS, PROJECTIONS, ModelConfig
from pallas_kernels.nf4_matmul import NF4MatmulConfig, nf4_lora_matmul, nf4_lora_matmul_group
from pallas_kernels.nf4_matmul_mgpu import MgpuNF4Weight, stacked_member

Array = jax.Array


def target_presets(config: ModelConfig | None = None) -> dict[str, tuple[str, ...]]:
    """The preset target lists for ``config``'s projections (Llama's names without one)."""
    if config is None:
        return {"all-linear": PROJECTIONS, "attention": ATTENTION_PROJECTIONS,
                "mlp": MLP_PROJECTIONS}  # fmt: skip
    return {
        "all-linear": config.projections(),
        "attention": config.attention_projections(),
        "mlp": config.mlp_projections(),
    }


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Static LoRA hyper-parameters (PEFT's meaning for every field)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA (rank-stabilised scaling)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeights:
    """The trainable pytree: ``params`` are arrays, ``config`` is static metadata."""

    params: dict[str, Any]
    config: LoraConfig = dataclasses.field(metadata=dict(static=True))

    def num_parameters(self) -> int:
        return sum(int(x.size) for x in jax.tree_util.tree_leaves(self.params))


def resolve_targets(
    targets: str | Iterable[str], config: ModelConfig | None = None
) -> tuple[str, ...]:
    """Expands a preset name or validates a list of ``config``'s projection names (Llama's
    without a config)."""
    presets = target_presets(config)
    if isinstance(targets, str):
        if targets in presets:
            return presets[targets]
        targets = [targets]
    names = tuple(targets)
    known = presets["all-linear"]
    unknown = [t for t in names if t not in known]
    if unknown or not names:
        fused = ""
        if config is not None and config.fused_projections:
            fused = f" ({config.model_type} stores q/k/v as qkv_proj and gate/up as gate_up_proj)"
        elif config is not None and config.moe:
            fused = (
                f" ({config.model_type}'s MLP is {config.num_experts} experts: gate/up is "
                "experts_gate_up_proj, down is experts_down_proj)"
            )
        raise ValueError(
            f"unknown LoRA target(s) {unknown or names}{fused}; use one of {list(presets)} "
            f"or names from {list(known)}"
        )
    return tuple(p for p in known if p in names)  # canonical order, no duplicates


def init_lora(
    model: Any,
    rank: int,
    alpha: float,
    targets: str | Iterable[str] = "all-linear",
    key: Array | None = None,
    dropout: float = 0.0,
    use_rslora: bool = False,
    dtype: Any = jnp.float32,
) -> LoraWeights:
    """PEFT-initialised adapters: A ~ kaiming-uniform(a=sqrt(5)) = U(±1/sqrt(in)), B = 0.

    With B = 0 the adapted model starts exactly at the base model. Parameters default to
    float32 (PEFT's autocast default): they are tiny, and bf16 updates would round away.
    """
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    config: ModelConfig = model.config
    cfg = LoraConfig(
        rank, float(alpha), resolve_targets(targets, config), float(dropout), use_rslora
    )
    experts = [t for t in cfg.targets if t in EXPERT_PROJECTIONS]
    if experts and dropout:
        raise ValueError(
            f"LoRA dropout on the expert projections {experts} is not supported (PEFT cannot "
            "express it either: it adapts them as weights); target the others, or use 0.0"
        )
    key = jax.random.key(0) if key is None else key
    params: dict[str, Any] = {}
    stacks = config.layer_stacks()
    for stack in stacks:
        # Each target draws from one key, whichever stacks hold it (a stack's layers differ).
        layers = {}
        for name, k in zip(cfg.targets, jax.random.split(key, len(cfg.targets)), strict=True):
            if name not in stack.config.projections():
                continue  # the target is a projection of the model's other layers
            k = jax.random.fold_in(k, stack.layers[0]) if len(stacks) > 1 else k
            out_dim, in_dim = stack.config.projection_shape(name)
            bound = 1.0 / math.sqrt(in_dim)
            lead = stack.config.adapter_batch_shape(name)
            layers[name] = {
                "lora_a": jax.random.uniform(k, (*lead, rank, in_dim), dtype, -bound, bound),
                "lora_b": jnp.zeros((*lead, out_dim, rank), dtype),
            }
        params[stack.key] = layers
    return LoraWeights(params, cfg)


def lora_linear(
    x: Array,
    weight: Any,
    bias: Array | None = None,
    adapter: dict[str, Array] | None = None,
    scale: float = 1.0,
    *,
    dropout: float = 0.0,
    dropout_key: Array | None = None,
    impl: str | None = None,
    config: NF4MatmulConfig | None = None,
) -> Array:
    """``y = x·Wᵀ (+ bias) + scale·(dropout(x)·Aᵀ)·Bᵀ`` for a dense or NF4 ``W [out, in]``.

    The single entry point for every projection: the fused Pallas kernel (GPU) or its jnp
    reference (CPU) sits behind ``pallas_kernels.nf4_lora_matmul`` (``impl`` and ``config``
    are its arguments). With dropout active the LoRA branch sees a different x than the base
    matmul, so it is computed beside the kernel instead of inside it.
    """
    a = b = None
    if adapter is not None:
        a, b = adapter["lora_a"], adapter["lora_b"]
    if a is not None and dropout > 0.0 and dropout_key is not None:
        y = nf4_lora_matmul(x, weight, None, None, 0.0, impl=impl, config=config)
        keep = jax.random.bernoulli(dropout_key, 1.0 - dropout, x.shape)
        x_drop = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
        low = jnp.einsum(
            "...k,rk->...r", x_drop, a.astype(x.dtype), preferred_element_type=jnp.float32
        )
        delta = jnp.einsum(
            "...r,nr->...n",
            low.astype(x.dtype),
            b.astype(x.dtype),
            preferred_element_type=jnp.float32,
        )
        y = (y.astype(jnp.float32) + scale * delta).astype(x.dtype)
    else:
        y = nf4_lora_matmul(x, weight, a, b, scale, impl=impl, config=config)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


def lora_linears(
    x: Array,
    projections: Sequence[tuple[Any, Array | None, dict[str, Array] | None]],
    scale: float = 1.0,
    *,
    dropout: float = 0.0,
    dropout_keys: Sequence[Array | None] | None = None,
    impl: str | None = None,
    config: NF4MatmulConfig | None = None,
    stacked_weight: MgpuNF4Weight | None = None,
) -> list[Array]:
    """:func:`lora_linear` for several ``(weight, bias, adapter)`` projections of the same x.

    The model's q/k/v and gate/up projections come through here, so that the matmul layer can
    run each group as one GEMM per direction (``pallas_kernels.nf4_lora_matmul_group``). With
    LoRA dropout active every adapter sees its own mask, so the members run one by one.
    ``stacked_weight``: the members' weights already stacked in the Mosaic GPU kernel's
    layout (``lorax.prepare_kernel_weights``); the projections' weights are then unused.
    """
    keys = list(dropout_keys) if dropout_keys is not None else [None] * len(projections)
    weights = [w for w, _, _ in projections]
    if dropout > 0.0 and any(k is not None for k in keys):
        if stacked_weight is not None:
            weights = [stacked_member(stacked_weight, i) for i in range(len(projections))]
        return [
            lora_linear(x, w, bias, adapter, scale if adapter is not None else 0.0,
                        dropout=dropout if adapter is not None else 0.0, dropout_key=key,
                        impl=impl, config=config)
            for w, (_, bias, adapter), key in zip(weights, projections, keys, strict=True)
        ]  # fmt: skip
    return list(
        nf4_lora_matmul_group(
            x,
            stacked_weight if stacked_weight is not None else weights,
            [None if ad is None else (ad["lora_a"], ad["lora_b"]) for _, _, ad in projections],
            scale,
            biases=[bias for _, bias, _ in projections],
            impl=impl,
            config=config,
        )
    )
