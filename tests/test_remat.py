"""Remat policies, per-layer schedules and token-chunked MLPs change memory, never results."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_l2

import lorax
from lorax import demo
from lorax import remat as remat_lib
from lorax.model import ForwardOptions, _chunked_over_tokens, forward


@pytest.fixture(scope="module")
def tiny():
    model = demo.tiny_model(seed=2)
    lora = lorax.init_lora(model, rank=4, alpha=8, key=jax.random.key(5))
    # Nonzero B, or every LoRA-A gradient is zero and the comparison tests nothing.
    params = jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(6), x.shape, x.dtype), lora.params
    )
    return model, lorax.LoraWeights(params, lora.config)


def _loss_and_grads(model, lora, ids, options, dropout_key=None):
    def loss(params):
        logits = forward(
            model,
            lorax.LoraWeights(params, lora.config),
            ids,
            options=options,
            dropout_key=dropout_key,
        )
        return jnp.mean(
            jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0]
        )

    return jax.jit(jax.value_and_grad(loss))(lora.params)


@pytest.fixture(scope="module")
def reference(tiny):
    model, lora = tiny
    ids = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 12)))
    return ids, *_loss_and_grads(model, lora, ids, ForwardOptions())


@pytest.mark.parametrize(
    "options",
    [
        ForwardOptions(remat="mlp"),
        ForwardOptions(remat="offload"),
        # Every policy once, as segments of one schedule.
        ForwardOptions(remat="mlp:1,full:1,offload:1,selective"),
        ForwardOptions(remat="none", mlp_chunk_tokens=7),  # 2x12 tokens: ragged last chunk
        ForwardOptions(remat="offload", mlp_chunk_tokens=8),
        ForwardOptions(remat="mlp:1,selective:1,full", offload_layer_inputs=True),
    ],
    ids=lambda o: f"{o.remat}-chunk{o.mlp_chunk_tokens}{'-host' if o.offload_layer_inputs else ''}",
)
def test_policies_match_no_remat(tiny, reference, options):
    model, lora = tiny
    ids, loss0, grads0 = reference
    loss1, grads1 = _loss_and_grads(model, lora, ids, options)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    for g1, g0 in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads0), strict=True):
        assert float(jnp.abs(g0).max()) > 0
        assert rel_l2(g1, g0) < 1e-5


def test_token_chunks_cover_every_token_once_with_their_index():
    """Padding rows are dropped, every chunk sees its own index (what dropout keys fold in)."""
    x = jnp.arange(2 * 7 * 3, dtype=jnp.float32).reshape(2, 7, 3)

    def per_token(x, chunk_index=None):
        return jnp.concatenate([2 * x, jnp.broadcast_to(chunk_index, x.shape[:-1] + (1,))], -1)

    out = _chunked_over_tokens(per_token, x, 4)  # 14 tokens -> 4 chunks, 2 padding rows
    np.testing.assert_array_equal(out[..., :3], 2 * x)
    np.testing.assert_array_equal(out[..., 3].reshape(-1), np.arange(14) // 4)


def test_schedule_parsing():
    assert remat_lib.schedule("selective", 4) == [("selective", 4)]
    assert remat_lib.schedule("mlp:3,selective", 4) == [("mlp", 3), ("selective", 1)]
    assert remat_lib.schedule("mlp:1,full:2,offload:1", 4) == [
        ("mlp", 1),
        ("full", 2),
        ("offload", 1),
    ]
    with pytest.raises(ValueError, match="unknown remat policy"):
        remat_lib.schedule("fast", 4)
    with pytest.raises(ValueError, match="needs ':LAYERS'"):
        remat_lib.schedule("mlp,selective", 4)
    with pytest.raises(ValueError, match="does not cover"):
        remat_lib.schedule("mlp:5,selective", 4)
    with pytest.raises(ValueError, match="does not cover"):
        remat_lib.schedule("mlp:1,selective:2", 4)
    with pytest.raises(ValueError, match="positive integers"):
        ForwardOptions(remat="mlp:x,selective")
    with pytest.raises(ValueError, match="mlp_chunk_tokens"):
        ForwardOptions(mlp_chunk_tokens=0)


def test_mlp_policy_saves_the_mlp_and_recomputes_no_matmul(tiny):
    """Under "mlp" the backward re-runs no projection: it has as many full-width dot products
    (outputs of >= tokens x hidden elements; the rank-r LoRA products are cheap and may be
    recomputed) as without remat; "selective" re-runs the gate and up projections."""
    model, lora = tiny
    tokens = 8
    ids = jnp.zeros((1, tokens), jnp.int32)

    def dots(remat: str) -> int:
        def loss(params):
            lora_ = lorax.LoraWeights(params, lora.config)
            return forward(model, lora_, ids, options=ForwardOptions(remat=remat)).sum()

        hlo = jax.jit(jax.grad(loss)).lower(lora.params).compile().as_text()
        shapes = re.findall(r"= \w+\[([\d,]*)\][^ ]* dot\(", hlo)
        sizes = [math.prod(int(d) for d in s.split(",") if d) for s in shapes]
        return sum(n >= tokens * model.config.hidden_size for n in sizes)

    assert dots("mlp") == dots("none") < dots("selective") < dots("full")


def test_offload_layer_inputs_moves_each_scan_segments_carry_to_host(tiny):
    """One device-to-host transfer per scanned segment (of its stacked layer inputs), none
    without the option; ``offload`` is ``full`` plus this option."""
    model, lora = tiny
    ids = jnp.zeros((1, 8), jnp.int32)

    def host_puts(options: ForwardOptions) -> int:
        def loss(params):
            return forward(model, lorax.LoraWeights(params, lora.config), ids, options=options)

        jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: loss(p).sum()))(lora.params))
        return len(re.findall(r"device_put\[[^\]]*MemorySpace\.Host", jaxpr))

    assert host_puts(ForwardOptions(remat="mlp")) == 0
    assert host_puts(ForwardOptions(remat="mlp", offload_layer_inputs=True)) == 1
    assert host_puts(ForwardOptions(remat="mlp:2,selective", offload_layer_inputs=True)) == 2
    assert host_puts(ForwardOptions(remat="offload")) == 1
    with pytest.raises(ValueError, match="needs a remat policy"):
        ForwardOptions(remat="mlp:2,none", offload_layer_inputs=True)


@pytest.mark.parametrize("remat", ["selective", "mlp"])
def test_kernel_attention_output_is_kept_once(tiny, remat):
    """With an attention kernel, its output is a kernel residual (``save_forward_residuals``);
    naming it as well would stack the same ``[B, S, Hq, D]`` values twice in the scan's
    residuals (1.9 GiB at 1x8192 on Llama-3.1-8B, measured). Plain XLA attention has no kernel
    residual, so there the name is what keeps it."""
    model, lora = tiny
    cfg = model.config
    ids = jnp.zeros((2, 12), jnp.int32)

    def stacked_head_residuals(attention_impl):
        options = ForwardOptions(remat=remat, attention_impl=attention_impl)
        jaxpr = jax.make_jaxpr(
            lambda p: jax.grad(
                lambda p: (
                    forward(model, lorax.LoraWeights(p, lora.config), ids, options=options)
                    .astype(jnp.float32)
                    .sum()
                )
            )(p)
        )(lora.params)
        # [layers, B, S (padded for the kernel), Hq, D]
        return sum(
            v.aval.ndim == 5 and v.aval.shape[-2:] == (cfg.num_heads, cfg.head_dim)
            for eqn in jaxpr.jaxpr.eqns
            if eqn.primitive.name == "scan"
            for v in eqn.outvars
        )

    # Kernel: the queries and the kernel's output. Reference: the queries and the named output.
    assert stacked_head_residuals("pallas") == 2
    assert stacked_head_residuals("reference") == 2
