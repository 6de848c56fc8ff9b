"""DeepSeek V2/V3 routing (lorax.moe.select_experts) against transformers' routers on tiny
random configs: the chosen experts, their weights and the weights' gradients; the default
routing still Mixtral's and Qwen's bit for bit; and a gradient that adds in a fixed order."""

from __future__ import annotations

import dataclasses

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from lorax.moe import Routing, route, select_experts

TOKENS, HIDDEN = 96, 32
# Proportions of the released checkpoints, scaled down: V3 routes 8 of 256 experts in 8
# groups keeping 4; V2 6 of 160 in 8 groups keeping 3.
SMALL = dict(
    hidden_size=HIDDEN,
    n_routed_experts=32,
    num_experts_per_tok=6,
    n_group=8,
    topk_group=3,
    num_hidden_layers=1,
    num_attention_heads=4,
    vocab_size=64,
    intermediate_size=64,
    moe_intermediate_size=16,
)


def _v3(norm: bool):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(**SMALL, norm_topk_prob=norm, routed_scaling_factor=2.5)


def _v2(method: str, norm: bool):
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        **SMALL, topk_method=method, norm_topk_prob=norm, routed_scaling_factor=16.0
    )


def _routing(config) -> Routing:
    """The routing a DeepSeek config asks for, read as transformers reads it."""
    common = dict(
        experts_per_token=config.num_experts_per_tok,
        scaling=config.routed_scaling_factor,
        float32_logits=True,
    )
    if config.model_type == "deepseek_v3":
        return Routing(
            **common,
            scoring="sigmoid",
            correction_bias=True,
            groups=config.n_group,
            groups_kept=config.topk_group,
            group_score="top2_sum",
            normalize=config.norm_topk_prob,
            normalize_eps=1e-20,
        )
    # transformers' V2 router never normalizes: it reads no norm_topk_prob (DeepSeek's own
    # V2 code did, in place of the scaling; the released V2 checkpoints leave it off).
    grouped = config.topk_method == "group_limited_greedy"
    return Routing(
        **common,
        groups=config.n_group if grouped else 1,
        groups_kept=config.topk_group if grouped else 1,
        group_score="max",
        normalize=False,
    )


def _near_ties(x, router, bias, routing: Routing, within: float = 1e-5) -> np.ndarray:
    """Which tokens ``[T]`` (bool) choose within ``within`` of a tie, computed in float64: at the
    last kept group's score or at the k-th expert's. There, a float32 rounding either side
    could break the tie the other way (and torch.topk orders equal values as it likes)."""
    logits = np.asarray(x, np.float64) @ np.asarray(router, np.float64).T
    if routing.scoring == "sigmoid":
        scores = 1 / (1 + np.exp(-logits))
    else:
        scores = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores /= scores.sum(axis=1, keepdims=True)
    choice = scores + (0 if bias is None else np.asarray(bias, np.float64))
    margin = np.full(len(choice), np.inf)
    if routing.groups > 1:
        grouped = -np.sort(-choice.reshape(len(choice), routing.groups, -1), axis=2)
        group = grouped[..., :2].sum(-1) if routing.group_score == "top2_sum" else grouped[..., 0]
        ranked = -np.sort(-group, axis=1)
        margin = ranked[:, routing.groups_kept - 1] - ranked[:, routing.groups_kept]
        kept = group >= ranked[:, routing.groups_kept - 1 : routing.groups_kept]
        choice = np.where(np.repeat(kept, choice.shape[1] // routing.groups, axis=1), choice, -1)
    ranked = -np.sort(-choice, axis=1)
    k = routing.experts_per_token
    return np.minimum(margin, ranked[:, k - 1] - ranked[:, k]) < within


def _case(rng, config, x_dtype=jnp.float32):
    """transformers' router for ``config`` with random weights (and, for V3, a random nonzero
    correction bias), and random tokens, as (torch module, x, router, bias) with x in
    ``x_dtype`` on both sides. Tokens near a tie (``_near_ties``) are drawn again."""
    import torch
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    v3 = config.model_type == "deepseek_v3"
    module = (DeepseekV3TopkRouter if v3 else DeepseekV2TopkRouter)(config)
    experts = config.n_routed_experts
    router = rng.normal(size=(experts, HIDDEN)).astype(np.float32) / np.sqrt(HIDDEN)
    # Of the size the load balancing gives it: large enough to move many choices.
    bias = rng.normal(size=experts).astype(np.float32) * 0.2 if v3 else None
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(router))
        if v3:
            module.e_score_correction_bias.copy_(torch.from_numpy(bias))
    x = jnp.asarray(rng.normal(size=(2 * TOKENS, HIDDEN)), x_dtype)
    x = x[~_near_ties(x.astype(jnp.float32), router, bias, _routing(config))][:TOKENS]
    assert x.shape[0] == TOKENS
    return module, x, jnp.asarray(router), None if bias is None else jnp.asarray(bias)


def _torch(x):
    import torch

    return torch.from_numpy(np.array(x.astype(jnp.float32))).to(
        torch.bfloat16 if x.dtype == jnp.bfloat16 else torch.float32
    )


def _by_expert(weights, experts):
    """Each token's (experts, weights), ordered by expert: transformers returns them in
    torch.topk's unsorted order, lorax best first."""
    weights, experts = np.asarray(weights, np.float64), np.asarray(experts)
    order = np.argsort(experts, axis=1)
    return np.take_along_axis(experts, order, 1), np.take_along_axis(weights, order, 1)


def _assert_same_routing(ours, theirs, report: str):
    (e, w), (te, tw) = _by_expert(*ours), _by_expert(*theirs)
    np.testing.assert_array_equal(e, te)
    err = float(np.max(np.abs(w - tw)))
    print(f"{report}: max |dw| {err:.2e}, rel {rel_err(w, tw):.2e}")
    assert rel_err(w, tw) < 1e-6


def _differs(ours, theirs) -> bool:
    return not np.array_equal(_by_expert(*ours)[0], _by_expert(*theirs)[0])


@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("norm", [True, False])
def test_v3_routing_matches_transformers(rng, norm, x_dtype):
    """Sigmoid scores, a random correction bias, 3 of 8 groups kept by their top-2 sums,
    normalized or not, scaled by 2.5: the same experts per token as DeepseekV3TopkRouter and
    the same weights (float32); for bf16 tokens too, which both cast up before the logits.
    The case exercises bias and groups: without either, some token would choose otherwise."""
    import torch

    config = _v3(norm)
    module, x, router, bias = _case(rng, config, x_dtype)
    routing = _routing(config)
    with torch.no_grad():
        logits, tw, te = module(_torch(x))
    theirs = (tw.numpy(), te.numpy())
    weights, experts, scores = select_experts(x, router, routing, bias)
    assert weights.dtype == scores.dtype == jnp.float32 and experts.dtype == jnp.int32
    _assert_same_routing((weights, experts), theirs, f"v3 norm={norm} {x_dtype.__name__}")
    assert rel_err(scores, torch.sigmoid(logits).numpy()) < 1e-6
    if norm:
        np.testing.assert_allclose(np.sum(weights, axis=1), 2.5, rtol=1e-6)

    no_groups = dataclasses.replace(routing, groups=1, groups_kept=1)
    assert _differs(select_experts(x, router, no_groups, bias)[:2], theirs)
    assert _differs(select_experts(x, router, routing, jnp.zeros_like(bias))[:2], theirs)


@pytest.mark.parametrize("corner", ["negative", "underflow"])
def test_v3_corners_match_transformers(rng, corner):
    """Two corners where V3's details decide. "negative": a bias below -1 makes every biased
    score negative, so a masked expert must still lose to them (masked by -inf, not 0).
    "underflow": logits from -50 to -46, so the chosen sigmoids sum to 1e-21..6e-20 and the
    1e-20 in the normalizing denominator takes 14-90% off the weights (the bias, far larger,
    makes the choice)."""
    import torch

    config = _v3(True)
    module, x, router, bias = _case(rng, config)
    if corner == "negative":
        bias = bias - 2.0
    else:
        # Along one axis, so that each logit is one product, rounded alike on both sides (a
        # logit's rounding error is the sigmoid's relative error here).
        u = np.eye(HIDDEN)[rng.integers(HIDDEN)]
        spread = 1 + 0.01 * rng.normal(size=(config.n_routed_experts, 1))
        router = jnp.asarray(u * spread, jnp.float32)
        x = jnp.asarray(-rng.uniform(46, 50, size=(TOKENS, 1)) * u, jnp.float32)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(np.array(router)))
        module.e_score_correction_bias.copy_(torch.from_numpy(np.array(bias)))
        _, tw, te = module(_torch(x))
    weights, experts, scores = select_experts(x, router, _routing(config), bias)
    _assert_same_routing((weights, experts), (tw.numpy(), te.numpy()), f"v3 {corner}")
    if corner == "negative":
        assert np.max(np.asarray(scores + bias)) < 0
    else:
        assert np.max(np.sum(np.asarray(weights), axis=1)) < 2.4  # 2.5 without the 1e-20


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_v2_routing_matches_transformers(rng, method, norm):
    """Softmax scores, plain top-k or 3 of 8 groups kept by their best expert, scaled by 16:
    the same experts and weights as DeepseekV2TopkRouter. It reads no norm_topk_prob (its
    weights are the same with it on), so neither does lorax's V2 routing."""
    import torch

    config = _v2(method, norm)
    module, x, router, _ = _case(rng, config)
    with torch.no_grad():
        logits, tw, te = module(_torch(x))
    theirs = (tw.numpy(), te.numpy())
    routing = _routing(config)
    weights, experts, scores = select_experts(x, router, routing)
    _assert_same_routing((weights, experts), theirs, f"v2 {method} norm={norm}")
    assert rel_err(scores, torch.softmax(logits, dim=-1).numpy()) < 1e-6
    if norm:  # transformers ignores it: the weights do not sum to the scaling factor
        assert np.max(np.abs(np.sum(tw.numpy(), axis=1) - 16.0)) > 1.0
    if method == "group_limited_greedy":
        no_groups = dataclasses.replace(routing, groups=1, groups_kept=1)
        assert _differs(select_experts(x, router, no_groups)[:2], theirs)


@pytest.mark.parametrize(
    "config", [_v3(True), _v3(False), _v2("greedy", False), _v2("group_limited_greedy", False)],
    ids=["v3-norm", "v3", "v2-greedy", "v2-grouped"],
)  # fmt: skip
def test_routing_gradient_matches_torch(rng, config):
    """The gradient of Σ_t Σ_chosen w · c[t, e] (c random) in the router weight and in the
    tokens, against torch autograd through transformers' router: the weights carry the
    gradient, the bias and the choice do not."""
    import torch

    module, x, router, bias = _case(rng, config)
    c = rng.normal(size=(TOKENS, config.n_routed_experts)).astype(np.float32)
    tokens = jnp.arange(TOKENS)[:, None]

    def f(router, x):
        weights, experts, _ = select_experts(x, router, _routing(config), bias)
        return jnp.sum(weights * jnp.asarray(c)[tokens, experts])

    d_router, d_x = jax.grad(f, argnums=(0, 1))(router, x)
    xt = _torch(x).requires_grad_(True)
    _, tw, te = module(xt)
    (tw * torch.from_numpy(c).gather(1, te)).sum().backward()
    for name, got, want in (("router", d_router, module.weight.grad), ("x", d_x, xt.grad)):
        err = rel_err(got, want.numpy())
        print(f"{config.model_type} d{name}: rel {err:.2e}")
        assert err < 1e-5
    if bias is not None:
        assert module.e_score_correction_bias.grad is None


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
def test_default_routing_is_mixtral_and_qwen_bitwise(rng, dtype, normalize):
    """``route`` and the default Routing give what route gave before Routing existed (restated
    here: bf16-rounded logits, float32 softmax, top-k, gather, renormalize), bit for bit, and
    so does their gradient."""
    experts, k = 8, 2

    def before(x, router):
        logits = jnp.einsum(
            "td,ed->te", x, router.astype(x.dtype), preferred_element_type=jnp.float32
        ).astype(x.dtype)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        _, chosen = jax.lax.top_k(probs, k)
        weights = probs.at[jnp.arange(probs.shape[0])[:, None], chosen].get(unique_indices=True)
        if normalize:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        return weights, chosen, probs

    x = jnp.asarray(rng.normal(size=(TOKENS, HIDDEN)), dtype)
    router = jnp.asarray(rng.normal(size=(experts, HIDDEN)), dtype)
    want = before(x, router)
    default = select_experts(x, router, Routing(k, normalize=normalize))
    for got in (route(x, router, k, normalize), default):
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = jnp.asarray(rng.normal(size=(TOKENS, k)), jnp.float32)
    grad = lambda fn: jax.grad(lambda r, x: jnp.sum(fn(x, r)[0] * c), argnums=(0, 1))(router, x)
    for a, b in zip(grad(lambda x, r: route(x, r, k, normalize)), grad(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _equations(jaxpr):
    yield from jaxpr.eqns
    for sub in jax.extend.core.subjaxprs(jaxpr):
        yield from _equations(sub)


@pytest.mark.parametrize(
    "config", [_v3(True), _v2("group_limited_greedy", False)], ids=["v3", "v2-grouped"]
)
def test_routing_gradient_sums_in_a_fixed_order(rng, config):
    """No scatter in the routing's gradient adds two values into one place (a GPU runs those
    with atomic adds in no fixed order; tests/test_moe.py checks the whole MoE layer the same
    way). Read from the gradient's program of the group-limited, biased routing."""
    _, x, router, bias = _case(rng, config)

    def f(router, x):
        weights, _, scores = select_experts(x, router, _routing(config), bias)
        return jnp.sum(weights**2) + jnp.sum(scores**2)

    eqns = list(_equations(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(router, x).jaxpr))
    assert any(e.primitive.name == "gather" for e in eqns), "no routing gather: nothing read"
    adding = [e for e in eqns if e.primitive.name.startswith("scatter")
              and e.primitive.name != "scatter"
              and jnp.issubdtype(e.outvars[0].aval.dtype, jnp.floating)]  # fmt: skip
    assert adding, "the chosen weights' gradient is a scatter-add"
    assert all(e.params["unique_indices"] for e in adding), [str(e)[:300] for e in adding]


@pytest.mark.parametrize(
    "fields, experts, match",
    [
        (dict(groups=3), 32, "do not split"),
        (dict(groups=16, group_score="top2_sum"), 16, "best two"),
        (dict(groups=8, groups_kept=1), 32, "cannot hold"),
    ],
)
def test_routing_refuses_what_it_cannot_run(fields, experts, match):
    """Groups that do not split the experts, a top-2 group of one, too few kept experts."""
    routing = Routing(6, **fields)
    x, router = jnp.ones((4, HIDDEN)), jnp.ones((experts, HIDDEN))
    with pytest.raises(ValueError, match=match):
        select_experts(x, router, routing)


def test_routing_refuses_a_bias_it_does_not_read_and_too_many_groups():
    x, router = jnp.ones((4, HIDDEN)), jnp.ones((8, HIDDEN))
    with pytest.raises(ValueError, match="bias was given"):
        select_experts(x, router, Routing(2), jnp.zeros(8))
    with pytest.raises(ValueError, match="bias was not given"):
        select_experts(x, router, Routing(2, correction_bias=True))
    with pytest.raises(ValueError, match="groups_kept"):
        Routing(6, groups=2, groups_kept=3)
