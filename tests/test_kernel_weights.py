"""``lorax.prepare_kernel_weights``: frozen NF4 weights stacked once in the Mosaic GPU kernel's
layout; the forward pass and its LoRA gradients are those of the loaded model."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model, random_lora, rel_l2

import lorax
from lorax.model import PREPARED, ForwardOptions, forward


@pytest.fixture(scope="module")
def nf4_model(tmp_path_factory):
    pytest.importorskip("torch")
    # intermediate 128: the kernel takes whole absmax blocks per row (K % 64 == 0).
    _, path = make_hf_model(tmp_path_factory.mktemp("hf"), "llama", intermediate_size=128)
    return lorax.load(path, quantize="nf4", dtype="bfloat16")


def test_prepared_model_matches_loaded(nf4_model, rng):
    model = nf4_model
    # k_proj without an adapter: a group member with no LoRA term.
    targets = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = random_lora(model, rng, rank=4, alpha=8, targets=targets)
    prepared = lorax.prepare_kernel_weights(model)
    layers = prepared.params["layers"]
    assert sorted(layers[PREPARED]) == [
        "down_proj", "gate_proj+up_proj", "o_proj", "q_proj+k_proj+v_proj"
    ]  # fmt: skip
    assert "weight" not in layers["q_proj"] and "weight" in model.params["layers"]["q_proj"]
    qkv = layers[PREPARED]["q_proj+k_proj+v_proj"]
    assert qkv.quads.shape[0] == model.config.num_layers  # stacked over layers, scanned

    ids = jnp.asarray(rng.integers(0, model.config.vocab_size, size=(2, 24)))
    cot = jnp.asarray(rng.standard_normal((2, 24, model.config.vocab_size)), jnp.float32)

    def loss(lora, model, impl):
        logits = forward(model, lora, ids, options=ForwardOptions(matmul_impl=impl))
        return jnp.sum(logits * cot), logits

    (_, want), g_want = jax.value_and_grad(loss, has_aux=True)(lora, model, "reference")
    # bf16 activations through 2 layers; the prepared weights are within an ulp of the loaded
    # ones and the kernel sums base and LoRA terms before one rounding.
    (_, got), g_got = jax.value_and_grad(loss, has_aux=True)(lora, prepared, "reference")
    assert rel_l2(got, want) < 2e-2
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
        assert rel_l2(np.asarray(a, np.float32), np.asarray(b, np.float32)) < 5e-2
    # The kernel path itself (Mosaic GPU interpreter) is checked group by group, values and
    # gradients, in test_nf4_matmul.py: in a model it is the same call per group.


def test_prepare_some_groups(nf4_model, rng):
    """Only the named groups are rewritten; the rest keep their loaded weights, and the forward
    mixes the two paths with the loaded model's values."""
    prepared = lorax.prepare_kernel_weights(nf4_model, groups=["q_proj+k_proj+v_proj", "o_proj"])
    layers = prepared.params["layers"]
    assert sorted(layers[PREPARED]) == ["o_proj", "q_proj+k_proj+v_proj"]
    assert "weight" not in layers["o_proj"] and "weight" in layers["gate_proj"]
    ids = jnp.asarray(rng.integers(0, nf4_model.config.vocab_size, size=(1, 16)))
    options = ForwardOptions(matmul_impl="reference")
    want = forward(nf4_model, None, ids, options=options)
    got = forward(prepared, None, ids, options=options)
    assert rel_l2(got, want) < 2e-2
    with pytest.raises(ValueError, match=r"unknown projection groups \['qkv'\]; known:"):
        lorax.prepare_kernel_weights(nf4_model, groups=["qkv"])
    one = lorax.prepare_kernel_weights(nf4_model, groups="down_proj")
    assert sorted(one.params["layers"][PREPARED]) == ["down_proj"]


def test_kernel_groups_for_settings(nf4_model, monkeypatch):
    """The ``lorax train --kernel-weights`` policy: explicit settings, and "auto" only for short
    steps on one Hopper GPU (a stand-in device here: CI has none)."""
    from lorax import kernel_weights
    from lorax.config import PROJECTION_GROUPS
    from lorax.kernel_weights import AUTO_MAX_TOKENS, GROUP_KEYS, kernel_groups_for

    assert kernel_groups_for(nf4_model, "none", 128) == ()
    assert kernel_groups_for(nf4_model, "all", 10**6) == GROUP_KEYS
    assert kernel_groups_for(nf4_model, "o_proj, down_proj", 128) == ("o_proj", "down_proj")
    with pytest.raises(ValueError, match=r"kernel_weights must be none, all, auto or .*'qkv'"):
        kernel_groups_for(nf4_model, "qkv", 128)
    assert kernel_groups_for(nf4_model, "auto", 128) == ()  # the CPU
    prepared = lorax.prepare_kernel_weights(nf4_model, groups="o_proj")
    assert kernel_groups_for(prepared, "all", 128) == ()  # already done

    class Device:
        platform, compute_capability = "gpu", "9.0"

    monkeypatch.setattr(kernel_weights.jax, "devices", lambda: [Device()])
    assert kernel_groups_for(nf4_model, "auto", AUTO_MAX_TOKENS) == GROUP_KEYS
    assert kernel_groups_for(nf4_model, "auto", AUTO_MAX_TOKENS + 1) == ()
    # Weights the kernel cannot take: "auto" leaves the model as loaded instead of failing.
    as_f32 = {**nf4_model.params, "embed_tokens": nf4_model.params["embed_tokens"].astype("f4")}
    assert kernel_groups_for(dataclasses.replace(nf4_model, params=as_f32), "auto", 128) == ()

    def with_weights(weight):
        layers = {**nf4_model.params["layers"]}
        layers.update({name: {"weight": weight} for names in PROJECTION_GROUPS for name in names})
        return dataclasses.replace(nf4_model, params={**nf4_model.params, "layers": layers})

    k128 = lorax.quantize_nf4(jnp.zeros((64, 128), jnp.float32))
    assert kernel_groups_for(with_weights(k128), "auto", 128) == GROUP_KEYS
    assert kernel_groups_for(with_weights(jnp.zeros((64, 64), jnp.bfloat16)), "auto", 128) == ()
    k96 = lorax.quantize_nf4(jnp.zeros((64, 96), jnp.float32))  # absmax blocks straddle rows
    assert kernel_groups_for(with_weights(k96), "auto", 128) == ()
    monkeypatch.setattr(kernel_weights.jax, "devices", lambda: [Device(), Device()])
    assert kernel_groups_for(nf4_model, "auto", 128) == ()  # a mesh: would be replicated
    Device.compute_capability = "8.0"  # no wgmma before Hopper
    monkeypatch.setattr(kernel_weights.jax, "devices", lambda: [Device()])
    assert kernel_groups_for(nf4_model, "auto", 128) == ()


def test_prepared_model_refusals(nf4_model, tmp_path):
    prepared = lorax.prepare_kernel_weights(nf4_model)
    with pytest.raises(ValueError, match="prepare_kernel_weights needs the model's loaded"):
        lorax.prepare_kernel_weights(prepared)
    with pytest.raises(ValueError, match="save_merged needs the model's loaded weights"):
        lorax.save_merged(prepared, None, tmp_path / "merged")
    with pytest.raises(ValueError, match="export_gguf needs the model's loaded weights"):
        lorax.export_gguf(prepared, None, tmp_path / "m.gguf")
    ids = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="runs on variant 'mosaic'"):
        options = ForwardOptions(matmul_impl="pallas", matmul_variant="xla")
        forward(prepared, None, ids, options=options)


def test_prepared_model_trains(nf4_model, rng):
    """A train step on the prepared model takes the loaded model's loss and gradient step; the
    memory report counts the prepared weights and no decode workspace for them."""
    from lorax import sharding
    from lorax.train import make_optimizer
    from lorax.train.step import StepConfig, init_train_state, make_train_step

    prepared = lorax.prepare_kernel_weights(nf4_model)
    lora = random_lora(nf4_model, rng, rank=4, alpha=8, targets=["q_proj", "up_proj"])
    opt = make_optimizer("adamw", 1e-3)
    ids = rng.integers(0, nf4_model.config.vocab_size, size=(1, 2, 16)).astype(np.int32)
    batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(ids)}
    results = []
    for model in (nf4_model, prepared):
        step = make_train_step(
            model, opt, StepConfig(forward=ForwardOptions(matmul_impl="reference"))
        )
        state, metrics = step(init_train_state(lora, opt, key=jax.random.key(0)), batch)
        results.append((float(metrics["loss"]), state.lora.params))
    (loss, params), (loss_p, params_p) = results
    assert abs(loss - loss_p) < 1e-2 * abs(loss)
    for a, b in zip(jax.tree.leaves(params_p), jax.tree.leaves(params), strict=True):
        assert rel_l2(np.asarray(a), np.asarray(b)) < 1e-2
    state = init_train_state(lora, opt, key=jax.random.key(0))
    loaded = sharding.memory_report(nf4_model, state, tokens_per_device=32)
    report = sharding.memory_report(prepared, state, tokens_per_device=32)
    assert loaded.weights_workspace > 0 and report.weights_workspace == 0  # nothing decoded
    assert report.base > 0


def test_prepared_model_with_lora_dropout(nf4_model, rng):
    """LoRA dropout gives each member its own mask, so the members of a prepared group run
    one by one on their slices of the stack: the same logits as the loaded model's."""
    prepared = lorax.prepare_kernel_weights(nf4_model)
    targets = ["q_proj", "k_proj", "gate_proj"]
    lora = random_lora(nf4_model, rng, rank=4, alpha=8, targets=targets, dropout=0.3)
    ids = jnp.asarray(rng.integers(0, nf4_model.config.vocab_size, size=(1, 16)))
    options = ForwardOptions(matmul_impl="reference")
    key = jax.random.key(3)
    want = forward(nf4_model, lora, ids, dropout_key=key, options=options)
    got = forward(prepared, lora, ids, dropout_key=key, options=options)
    assert rel_l2(got, want) < 2e-2
    assert rel_l2(got, forward(prepared, lora, ids, options=options)) > 1e-3  # masks applied


def test_cli_kernel_weights_train_like_the_loaded_model(tmp_path, capsys):
    """``lorax train --kernel-weights all`` prepares the NF4 model and trains it like the model
    as loaded (on the CPU both run the jnp reference; the GPU run is
    scripts/check_kernel_weights_cli.py)."""
    pytest.importorskip("torch")
    from lorax import cli, demo

    tokenizer = demo.demo_tokenizer()
    _, path = make_hf_model(tmp_path, "llama", intermediate_size=128, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(path)
    losses = {}
    for setting in ("none", "all"):
        out = tmp_path / setting
        args = ["train", "--model", path, "--quantize", "nf4", "--dtype", "bfloat16"]
        args += ["--kernel-weights", setting, "--output-dir", str(out), "--max-steps", "4"]
        args += ["--batch-size", "1", "--seq-len", "64", "--max-new-tokens", "0", "--no-progress"]
        assert cli.main(args) == 0
        printed = capsys.readouterr().out
        assert ("kernel weights: q_proj+k_proj+v_proj, o_proj" in printed) == (setting == "all")
        with open(out / "metrics.jsonl") as f:
            losses[setting] = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    assert len(losses["all"]) == len(losses["none"]) == 4
    np.testing.assert_allclose(losses["all"], losses["none"], rtol=2e-2)


def test_prepared_model_with_two_layer_stacks(tmp_path, rng):
    """An MoE model with dense-MLP layers: each stack's projection groups are prepared in its
    own subtree (the dense layers' gate/up and down too), and the forward is the loaded
    model's.

    Every token goes to all 4 experts: the prepared weights are within a bf16 ulp of the
    loaded ones, and with top-2 routing such a difference moves near-tied choices, which put
    3 of 8 seeds past 2e-2 (measured 1.4-2.8e-2). Routed to all, 8 seeds measured 1.3-1.7e-2
    over the 4 layers (as bf16 runs of one model differ); a misplaced stack is off by O(1)."""
    from test_model_parity import CASES

    from lorax.kernel_weights import group_keys

    model_type, overrides = CASES["qwen2-moe-sparse-step"]
    _, path = make_hf_model(
        tmp_path,
        model_type,
        **dict(
            overrides,
            intermediate_size=128,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=128,
            num_experts_per_tok=4,
        ),
    )
    model = lorax.load(path, quantize="nf4", dtype="bfloat16")
    groups = ["q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj", "down_proj"]
    assert list(group_keys(model)) == groups
    prepared = lorax.prepare_kernel_weights(model)
    for stack in model.config.layer_stacks():
        layers = prepared.params[stack.key]
        assert sorted(layers[PREPARED]) == sorted(groups)
        assert layers[PREPARED]["down_proj"].quads.shape[0] == len(stack.layers)
        assert "weight" not in layers["gate_proj"]
    assert lorax.kernel_weights.is_prepared(prepared)
    lora = random_lora(model, rng, rank=4, alpha=8, targets=["q_proj", "gate_proj", "down_proj"])
    ids = jnp.asarray(rng.integers(0, model.config.vocab_size, size=(2, 24)))
    options = ForwardOptions(matmul_impl="reference")
    want = forward(model, lora, ids, options=options)
    got = forward(prepared, lora, ids, options=options)
    assert rel_l2(got, want) < 3e-2
