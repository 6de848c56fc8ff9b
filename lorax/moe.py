"""A routed mixture-of-experts MLP (Mixtral, Qwen 2/3 MoE, DeepSeek V2/V3): route each token
(``Routing``: softmax or sigmoid scores, group-limited choice, correction bias), group rows by
expert, multiply; and the gate of a shared expert beside the routed ones (Qwen 2 MoE).

Each token's hidden state goes to the ``experts_per_token`` of ``num_experts`` SwiGLU experts
most probable under a linear router's softmax; their outputs are summed, weighted by those
probabilities (renormalized to sum to one: Mixtral, and Qwen with ``norm_topk_prob``).
As in transformers, the router's logits come out of a matmul in the compute dtype and the
softmax runs in float32.

DeepSeek V2 and V3 (and GLM-4 MoE) route otherwise: float32 logits, sigmoid scores, a bias that
moves the choice, group-limited choice, a scaling factor. :class:`Routing` names those choices
and :func:`select_experts` runs them; :func:`route` is its default, Mixtral's and Qwen's.

The computation is exact and does only the routed work: the ``tokens x k`` (token, expert)
pairs are sorted by expert so that each expert's rows are one contiguous group, and every
projection is one grouped matmul over them (:func:`pallas_kernels.expert_matmul.
expert_lora_matmul`, which also carries the LoRA terms and keeps no decoded expert weights
for the backward). Nothing is dropped: there is no capacity limit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from convert.names import ROUTER, ROUTER_BIAS
from lorax import remat as remat_lib
from pallas_kernels.expert_matmul import expert_lora_matmul

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Routing:
    """How a family's router turns a token into ``experts_per_token`` (expert, weight) pairs:
    the static choices that tell Mixtral / Qwen MoE, DeepSeek V2 and DeepSeek V3 (GLM-4 MoE)
    apart. The defaults are Mixtral's and Qwen's routing (:func:`route`).

    ``scoring``: each expert's score is the ``"softmax"`` over the router's logits (Mixtral,
    Qwen, DeepSeek V2) or each logit's own ``"sigmoid"`` (DeepSeek V3).

    ``correction_bias``: a per-expert bias (DeepSeek V3's ``e_score_correction_bias``, a frozen
    float32 ``[E]``) is added to the scores that choose the experts, and only to those: it
    balances the load by moving choices, while the weights stay the unbiased scores.

    ``groups`` / ``groups_kept``: group-limited choice (``n_group`` / ``topk_group``). The
    experts are split into ``groups`` equal consecutive groups, each token keeps the
    ``groups_kept`` groups that score best and chooses its experts within them only (so that a
    token's experts sit on few devices). A group scores as its best expert (``"max"``: DeepSeek
    V2's ``group_limited_greedy``) or as the sum of its best two (``"top2_sum"``: V3).
    ``groups=1`` is plain top-k.

    ``normalize``: the chosen weights are divided by their sum (``norm_topk_prob``; Mixtral
    always), plus ``normalize_eps`` (V3 adds 1e-20, which only matters where every chosen
    sigmoid has underflowed). ``scaling``: then multiplied by ``routed_scaling_factor``.

    ``float32_logits``: the logits are one float32 matmul of float32-cast tokens and router
    (DeepSeek V2/V3, whose routers transformers keeps in float32 in a bf16 model, and whose
    modules cast the hidden states up). Otherwise they are rounded to the tokens' dtype before
    the float32 softmax, as Mixtral's and Qwen's bf16 ``nn.Linear`` rounds them.
    """

    experts_per_token: int
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    correction_bias: bool = False
    groups: int = 1
    groups_kept: int = 1
    group_score: Literal["max", "top2_sum"] = "max"
    normalize: bool = True
    normalize_eps: float = 0.0
    scaling: float = 1.0
    float32_logits: bool = False

    def __post_init__(self) -> None:
        if self.experts_per_token < 1:
            raise ValueError(f"experts_per_token={self.experts_per_token} must be at least 1")
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring={self.scoring!r} must be 'softmax' or 'sigmoid'")
        if self.group_score not in ("max", "top2_sum"):
            raise ValueError(f"group_score={self.group_score!r} must be 'max' or 'top2_sum'")
        if not 1 <= self.groups_kept <= self.groups:
            raise ValueError(f"groups_kept={self.groups_kept} must be in [1, groups={self.groups}]")

    def check(self, num_experts: int) -> None:
        """Refuses a routing these ``num_experts`` cannot run: groups that do not split them
        evenly, groups of one under ``"top2_sum"``, or kept groups holding fewer than
        ``experts_per_token`` experts (a token would have to choose a masked expert)."""
        if num_experts % self.groups:
            raise ValueError(f"{num_experts} experts do not split into {self.groups} groups")
        size = num_experts // self.groups
        if self.groups > 1 and self.group_score == "top2_sum" and size < 2:
            raise ValueError("a group scored by its best two experts needs two experts")
        if self.groups_kept * size < self.experts_per_token:
            raise ValueError(
                f"{self.groups_kept} kept groups of {size} experts cannot hold "
                f"experts_per_token={self.experts_per_token}"
            )


def router_logits(x: Array, router: Array, float32_logits: bool = False) -> Array:
    """The router's logits ``[T, E]`` (float32) for tokens ``x [T, D]`` and ``router [E, D]``.

    ``float32_logits``: one float32 matmul at full precision (a GPU's default float32 matmul
    may round its inputs to TF32; PyTorch's does not, and the logits decide the routing).
    Otherwise the logits are rounded to ``x``'s dtype first (:class:`Routing`).
    """
    if float32_logits:
        return jnp.einsum(
            "td,ed->te",
            x.astype(jnp.float32),
            router.astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
    logits = jnp.einsum(
        "td,ed->te", x, router.astype(x.dtype), preferred_element_type=jnp.float32
    ).astype(x.dtype)
    return logits.astype(jnp.float32)


def _kept_groups(choice: Array, routing: Routing) -> Array:
    """Which experts ``[T, E]`` (bool) lie in the ``groups_kept`` best-scoring groups of each
    token, for the choice scores ``choice [T, E]``. Built by comparison, not a scatter: no
    gradient flows here, but a scatter would still be one more op in the program."""
    tokens, experts = choice.shape
    grouped = choice.reshape(tokens, routing.groups, experts // routing.groups)
    if routing.group_score == "top2_sum":
        group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
    else:
        group_scores = jnp.max(grouped, axis=-1)
    _, kept = jax.lax.top_k(group_scores, routing.groups_kept)
    keep = jnp.any(kept[:, :, None] == jnp.arange(routing.groups), axis=1)  # [T, groups]
    return jnp.repeat(keep, experts // routing.groups, axis=1)


def select_experts(
    x: Array, router: Array, routing: Routing, correction_bias: Array | None = None
) -> tuple[Array, Array, Array]:
    """``(weights [T, k] f32, experts [T, k] int32, scores [T, E] f32)`` for tokens ``x [T, D]``
    under ``routing`` (:class:`Routing`), the router ``router [E, D]`` and, where
    ``routing.correction_bias``, the bias ``correction_bias [E]``.

    ``scores`` are the unbiased softmax or sigmoid scores (what a load-balancing loss reads);
    ``weights`` the chosen experts' scores, normalized and scaled as ``routing`` says. They are
    differentiable in ``x`` and ``router``; the choice (bias, groups, top-k) is not, as in
    transformers: the bias moves choices and never weights.

    ``experts`` come best first by the choice score. Ties: ``lax.top_k`` puts equal values in
    index order, lowest first, for the kept groups and for the experts alike. ``torch.topk``
    (``sorted=False``, as transformers calls it) leaves the order of equal values to its kernel
    (its CPU one chose indices 63 and 10 of four equal values at 3, 10, 40, 63), so where equal
    scores straddle the k-th place the chosen set can differ from transformers'. Softmax and
    sigmoid scores of distinct float32 logits rarely tie, except sigmoid scores saturated at
    1.0 (logits past ~17). Under V3 a tie of biased scores can change the weights too, since
    the weights are the unbiased scores; under softmax scoring tied experts weigh the same.

    Masked (unkept) experts are excluded with -inf, as V3 does. DeepSeek V2 in transformers
    masks them to 0 instead; the two choose differently only where a kept expert's
    probability underflows to exactly 0, and such an expert weighs 0 either way.
    """
    num_experts = router.shape[0]
    routing.check(num_experts)
    if routing.correction_bias != (correction_bias is not None):
        raise ValueError(
            f"routing.correction_bias={routing.correction_bias} but a bias was "
            f"{'given' if correction_bias is not None else 'not given'}"
        )
    logits = router_logits(x, router, routing.float32_logits)
    if routing.scoring == "sigmoid":
        scores = jax.nn.sigmoid(logits)
    else:
        scores = jax.nn.softmax(logits, axis=-1)
    # Only the choice reads the bias and the groups, and it is integer-valued: no gradient
    # goes through it (as in transformers). stop_gradient says so; JAX would drop it anyway.
    choice = jax.lax.stop_gradient(scores)
    if correction_bias is not None:
        choice = choice + correction_bias.astype(jnp.float32)
    if routing.groups > 1:
        choice = jnp.where(_kept_groups(choice, routing), choice, -jnp.inf)
    _, experts = jax.lax.top_k(choice, routing.experts_per_token)
    # The chosen scores, read by a gather marked as one of distinct places (a token's k experts
    # are distinct): its gradient is then a scatter no place receives twice, which lets XLA
    # skip atomic adds, and which a test can tell from one that adds in no fixed order.
    tokens = jnp.arange(scores.shape[0])[:, None]
    weights = scores.at[tokens, experts].get(unique_indices=True)
    if routing.normalize:
        total = jnp.sum(weights, axis=-1, keepdims=True)
        if routing.normalize_eps:
            total = total + routing.normalize_eps
        weights = weights / total
    if routing.scaling != 1.0:
        weights = weights * routing.scaling
    return weights, experts, scores


def route(
    x: Array, router: Array, experts_per_token: int, normalize: bool = True
) -> tuple[Array, Array, Array]:
    """``(weights [T, k] f32, experts [T, k] int32, probs [T, E] f32)`` for tokens ``x [T, D]``
    under Mixtral's and Qwen's routing (softmax top-k, the default :class:`Routing`).

    ``weights`` are the chosen experts' probabilities, renormalized to sum to one per token
    when ``normalize``; ``probs``, the router's whole softmax, is what a load-balancing loss
    reads.
    """
    return select_experts(x, router, Routing(experts_per_token, normalize=normalize))


def router_statistics(
    x: Array, router: Array, experts_per_token: int, mask: Array | None = None
) -> dict[str, Array]:
    """What a load-balancing loss needs from one layer, summed over its tokens ``x [..., D]``
    (``mask``: which count, e.g. not padding): each expert's top-k assignments (a count: no
    gradient), its router probability, and the number of tokens."""
    tokens = x.reshape(-1, x.shape[-1])
    _, experts, probs = route(tokens, router, experts_per_token)  # Mixtral's and Qwen's routing
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
    routing: Routing | None = None,
) -> Array:
    """One layer's MoE MLP for ``x [..., D]``.

    ``layer`` holds the frozen ``router`` and ``experts_gate_up_proj`` / ``experts_down_proj``
    weights (``convert.names``); ``adapters`` their LoRA factors, where targeted.
    ``normalize_weights``: the chosen experts' weights sum to one (``route``); ``routing``, in
    its place, a family's whole routing (DeepSeek's; the correction bias, where it has one, is
    the layer's ``router_bias``);
    ``round_weights``: they are rounded to ``x``'s dtype before they scale the outputs
    (Qwen's MoE), as transformers does. ``impl`` and ``lora_products``: how the grouped
    matmuls run (``expert_lora_matmul``; None: the fastest that applies).
    """
    shape = x.shape
    tokens = x.reshape(-1, shape[-1])
    k = experts_per_token
    if routing is None:
        routing = Routing(k, normalize=normalize_weights)
    bias = layer[ROUTER_BIAS] if routing.correction_bias else None
    weights, experts, _ = select_experts(tokens, layer[ROUTER]["weight"], routing, bias)
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
