"""A routed mixture-of-experts MLP (Mixtral, Qwen 2/3 MoE): route each token, group rows by
expert, multiply; and the gate of a shared expert beside the routed ones (Qwen 2 MoE).

Each token's hidden state goes to the ``experts_per_token`` of ``num_experts`` SwiGLU experts
most probable under a linear router's softmax; their outputs are summed, weighted by those
probabilities (renormalized to sum to one: Mixtral, and Qwen with ``norm_topk_prob``).
As in transformers, the router's logits come out of a matmul in the compute dtype and the
softmax runs in float32.

The computation is exact and does only the routed work: the ``tokens x k`` (token, expert)
pairs are sorted by expert so that each expert's rows are one contiguous group, and every
projection is one grouped matmul over them (:func:`pallas_kernels.expert_matmul.
expert_lora_matmul`, which also carries the LoRA terms and keeps no decoded expert weights
for the backward). Nothing is dropped: there is no capacity limit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from convert.names import ROUTER
from lorax import remat as remat_lib
from pallas_kernels.expert_matmul import expert_lora_matmul

Array = jax.Array


def route(
    x: Array, router: Array, experts_per_token: int, normalize: bool = True
) -> tuple[Array, Array, Array]:
    """``(weights [T, k] f32, experts [T, k] int32, probs [T, E] f32)`` for tokens ``x [T, D]``.

    ``weights`` are the chosen experts' probabilities, renormalized to sum to one per token
    when ``normalize``; ``probs``, the router's whole softmax, is what a load-balancing loss
    reads.
    """
    logits = jnp.einsum(
        "td,ed->te", x, router.astype(x.dtype), preferred_element_type=jnp.float32
    ).astype(x.dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    _, experts = jax.lax.top_k(probs, experts_per_token)
    # The chosen probabilities, read by a gather marked as one of distinct places (a token's
    # k experts are distinct): its gradient is then a scatter no place receives twice, which
    # lets XLA skip atomic adds, and which a test can tell from one that adds in no fixed order.
    tokens = jnp.arange(probs.shape[0])[:, None]
    weights = probs.at[tokens, experts].get(unique_indices=True)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts, probs


def router_statistics(
    x: Array, router: Array, experts_per_token: int, mask: Array | None = None
) -> dict[str, Array]:
    """What a load-balancing loss needs from one layer, summed over its tokens ``x [..., D]``
    (``mask``: which count, e.g. not padding): each expert's top-k assignments (a count: no
    gradient), its router probability, and the number of tokens."""
    tokens = x.reshape(-1, x.shape[-1])
    _, experts, probs = route(tokens, router, experts_per_token)
    weight = (jnp.ones(tokens.shape[0], jnp.float32) if mask is None else mask.reshape(-1)).astype(
        jnp.float32
    )
    chosen = jax.nn.one_hot(experts, router.shape[0], dtype=jnp.float32).sum(axis=1)
    return {
        "assignments": jax.lax.stop_gradient(weight @ chosen),
        "probability": weight @ probs,
        "tokens": jnp.sum(weight),
    }


def load_balancing_loss(stats: dict[str, Array]) -> Array:
    """Switch Transformer's auxiliary loss over statistics summed across layers (and tokens),
    as transformers computes Mixtral's: ``E · Σ_e f_e · P_e``, with ``f_e`` expert e's share of
    the top-k assignments per token and ``P_e`` its mean router probability. 1·k at perfect
    balance; it grows as the router favours a few experts."""
    tokens = jnp.maximum(stats["tokens"], 1.0)
    experts = stats["probability"].shape[-1]
    return experts * jnp.sum((stats["assignments"] / tokens) * (stats["probability"] / tokens))


def moe_mlp(
    x: Array,
    layer: dict[str, Any],
    adapters: dict[str, Any],
    *,
    num_experts: int,
    experts_per_token: int,
    activation: Callable[[Array], Array],
    lora_scale: float,
    normalize_weights: bool = True,
    round_weights: bool = False,
    impl: str | None = None,
    lora_products: str | None = None,
) -> Array:
    """One layer's MoE MLP for ``x [..., D]``.

    ``layer`` holds the frozen ``router`` and ``experts_gate_up_proj`` / ``experts_down_proj``
    weights (``convert.names``); ``adapters`` their LoRA factors, where targeted.
    ``normalize_weights``: the chosen experts' weights sum to one (``route``);
    ``round_weights``: they are rounded to ``x``'s dtype before they scale the outputs
    (Qwen's MoE), as transformers does. ``impl`` and ``lora_products``: how the grouped
    matmuls run (``expert_lora_matmul``; None: the fastest that applies).
    """
    shape = x.shape
    tokens = x.reshape(-1, shape[-1])
    k = experts_per_token
    weights, experts, _ = route(tokens, layer[ROUTER]["weight"], k, normalize_weights)
    if round_weights:
        weights = weights.astype(x.dtype).astype(jnp.float32)
    # Sort the (token, choice) pairs by expert; a stable sort keeps each expert's rows in
    # token order, as transformers visits them.
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    rows = _permute(jnp.repeat(tokens, k, axis=0), order)

    def project(name: str, rows: Array) -> Array:
        adapter = adapters.get(name)
        a, b = (adapter["lora_a"], adapter["lora_b"]) if adapter is not None else (None, None)
        weight = layer[name]["weight"]
        return expert_lora_matmul(
            rows, weight, group_sizes, a, b, lora_scale, impl=impl, lora_products=lora_products
        )

    gate, up = jnp.split(project("experts_gate_up_proj", rows), 2, axis=-1)
    gate, up = remat_lib.name(gate, "mlp_gate"), remat_lib.name(up, "mlp_up")
    down = project("experts_down_proj", activation(gate) * up)
    per_choice = _permute(down, jnp.argsort(order)).reshape(tokens.shape[0], k, shape[-1])
    # Each expert's output is weighted in float32 and rounded, as transformers does; the k are
    # then summed in one reduction, where transformers adds them into the output one expert at
    # a time (in expert order, rounding each time): in bf16 the two can differ in a last bit.
    weighted = (per_choice.astype(jnp.float32) * weights[..., None]).astype(x.dtype)
    return jnp.sum(weighted, axis=1).reshape(shape)


def _permute(v: Array, order: Array) -> Array:
    """``v[order]`` for a permutation ``order``, said to be one: its gradient is then a scatter
    of distinct rows, exact and deterministic. Gathering a token's row k times
    (``tokens[order // k]``) had a gradient that adds k rows per token by atomic adds in no
    fixed order (an H200 ran Qwen 3 MoE's layer step, k = 8, to different bits each time).

    Measured against the alternative of a custom VJP that differentiates as the inverse
    gather (BENCHMARKS.md §8, runs 124-127): that one ran the MoE layer alone 0.1-0.5 ms
    faster at 8192 tokens, but a whole Qwen3-30B-A3B step at 7,695 tokens/s against this
    one's 8,224. One run each, on different machine leases, so not settled; this one stays.
    """
    return v.at[order].get(unique_indices=True)


def gate_shared_expert(x: Array, gate: Array, shared: Array) -> Array:
    """A shared expert's output ``shared [..., D]`` scaled per token by ``sigmoid(x · gateᵀ)``
    (``gate [1, D]``, frozen), for the layer input ``x [..., D]``.

    Rounded where transformers' Qwen 2 MoE rounds: the gate's logit comes out of a matmul in
    the compute dtype, its sigmoid and the product are taken in that dtype.
    """
    logit = jnp.einsum(
        "...d,od->...o", x, gate.astype(x.dtype), preferred_element_type=jnp.float32
    ).astype(x.dtype)
    return jax.nn.sigmoid(logit) * shared
