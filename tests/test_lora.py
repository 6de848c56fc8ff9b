"""LoRA: PEFT's init, scaling, forward and gradients, on the same weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model, rel_l2
from test_model_parity import CASES

import lorax
from convert.names import EXPERT_HF_PARAMETERS, module_name
from convert.peft import expert_factors_from_peft, expert_factors_to_peft


def _peft_model(torch_model, lora: lorax.LoraWeights):
    import peft
    import torch

    cfg = lora.config
    peft_model = peft.get_peft_model(
        torch_model,
        peft.LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            target_modules=list(cfg.targets),
            lora_dropout=0.0,
            use_rslora=cfg.use_rslora,
        ),
    )
    layers = peft_model.base_model.model.model.layers
    with torch.no_grad():
        for proj, ab in lora.params["layers"].items():
            for i, layer in enumerate(layers):
                module = layer.get_submodule(module_name(proj))
                module.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(ab["lora_a"][i])))
                module.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(ab["lora_b"][i])))
    return peft_model, layers


@pytest.mark.parametrize(
    "case, use_rslora",
    [
        ("qwen2", False),
        ("qwen2", True),
        # q/k norms, biases and a window; Gemma 2's softcaps, sandwich norms, GeGLU, scaled
        # embeddings and query scale; Gemma 3's q/k norms and two RoPEs (test_model_parity).
        ("qwen3-bias-window", False),
        ("gemma2", True),
        ("gemma3-two-ropes", False),
        # Phi-3: LoRA on the fused qkv_proj and gate_up_proj, as PEFT adapts them.
        ("phi3-window", True),
        ("phi3-longrope-partial", False),
    ],
)
def test_forward_and_grads_match_peft(tmp_path, rng, case, use_rslora):
    torch = pytest.importorskip("torch")
    model_type, overrides = CASES.get(case, (case, {}))
    torch_model, path = make_hf_model(tmp_path, model_type, **overrides)
    model = lorax.load(path, dtype="float32")
    lora = lorax.init_lora(
        model, rank=4, alpha=8, key=jax.random.key(int(rng.integers(1e6))), use_rslora=use_rslora
    )
    # B starts at zero (PEFT's init); give it values so the adapter changes the output.
    params = jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.1, jnp.float32), lora.params
    )
    lora = lorax.LoraWeights(params, lora.config)
    peft_model, layers = _peft_model(torch_model, lora)

    ids = rng.integers(0, model.config.vocab_size, size=(2, 20))
    cotangent = rng.normal(size=(2, 20, model.config.vocab_size)).astype(np.float32)

    def objective(lora):
        return jnp.sum(lorax.forward(model, lora, jnp.asarray(ids)) * cotangent)

    value, grads = jax.value_and_grad(objective)(lora)
    logits = peft_model(torch.as_tensor(ids)).logits
    terms = logits * torch.from_numpy(cotangent)
    ref_value = terms.sum()
    ref_value.backward()

    assert rel_l2(lorax.forward(model, lora, jnp.asarray(ids)), logits.detach().numpy()) < 1e-5
    # The objective is a random-sign sum that can cancel to near zero, so its error is
    # judged against the magnitude of its terms, not against its own value.
    magnitude = float(terms.abs().sum())
    np.testing.assert_allclose(float(value), float(ref_value), rtol=0, atol=1e-6 * magnitude)
    for proj, ab in grads.params["layers"].items():
        for i, layer in enumerate(layers):
            module = layer.get_submodule(module_name(proj))
            ref_a = module.lora_A["default"].weight.grad.numpy()
            ref_b = module.lora_B["default"].weight.grad.numpy()
            assert rel_l2(ab["lora_a"][i], ref_a) < 1e-5, (proj, i)
            assert rel_l2(ab["lora_b"][i], ref_b) < 1e-5, (proj, i)


def test_init_matches_peft_conventions(tmp_path):
    _, path = make_hf_model(tmp_path, "llama")
    model = lorax.load(path, dtype="float32")
    lora = lorax.init_lora(model, rank=8, alpha=16, targets=["q_proj", "down_proj"])
    assert lora.config.targets == ("q_proj", "down_proj")
    assert lora.config.scale == 2.0
    a, b = (
        lora.params["layers"]["down_proj"]["lora_a"],
        lora.params["layers"]["down_proj"]["lora_b"],
    )
    assert a.shape == (2, 8, model.config.intermediate_size)
    assert b.shape == (2, model.config.hidden_size, 8)
    bound = 1 / np.sqrt(model.config.intermediate_size)
    assert np.all(np.abs(a) <= bound) and np.abs(a).max() > 0.9 * bound
    assert not np.any(b)
    rs = lorax.init_lora(model, rank=16, alpha=8, use_rslora=True)
    assert rs.config.scale == pytest.approx(2.0)
    # B = 0: the adapted model starts exactly at the base model.
    ids = jnp.arange(12)[None]
    np.testing.assert_array_equal(lorax.forward(model, lora, ids), lorax.forward(model, None, ids))


def test_init_rejects_bad_arguments(tmp_path):
    _, path = make_hf_model(tmp_path, "llama")
    model = lorax.load(path, dtype="float32")
    with pytest.raises(ValueError, match="unknown LoRA target"):
        lorax.init_lora(model, rank=4, alpha=4, targets=["qkv"])
    with pytest.raises(ValueError, match="rank must be positive"):
        lorax.init_lora(model, rank=0, alpha=4)


def test_facade_builds_adapters(tmp_path):
    _, path = make_hf_model(tmp_path, "llama")
    model, tokenizer = lorax.FastLanguageModel.from_pretrained(path, load_in_4bit=True)
    assert isinstance(model.params["layers"]["gate_proj"]["weight"], lorax.NF4Tensor)
    peft_model = lorax.FastLanguageModel.get_peft_model(
        model, r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8, random_state=1
    )
    assert peft_model.lora.config.targets == ("q_proj", "v_proj")
    assert peft_model.remat == "offload"
    with pytest.raises(ValueError, match="bias"):
        lorax.FastLanguageModel.get_peft_model(model, bias="all")


def test_phi3_targets_its_fused_projections(tmp_path):
    """Phi-3's adapters sit on qkv_proj and gate_up_proj (PEFT's modules). Llama's names are
    an error for init_lora, while the Unsloth facade maps whole groups of them (Unsloth splits
    Phi-3's projections, so its scripts list q/k/v and gate/up) and refuses part of a group."""
    _, path = make_hf_model(tmp_path, "phi3", pad_token_id=0)
    model = lorax.load(path, dtype="float32")
    lora = lorax.init_lora(model, rank=2, alpha=4)
    assert lora.config.targets == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert lora.params["layers"]["qkv_proj"]["lora_b"].shape == (2, 64 + 2 * 32, 2)
    with pytest.raises(ValueError, match="qkv_proj"):
        lorax.init_lora(model, rank=2, alpha=4, targets=["q_proj"])
    facade = lorax.FastLanguageModel.get_peft_model
    llama_names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert facade(model, r=2, target_modules=llama_names).lora.config.targets == (
        lora.config.targets
    )
    assert facade(model, r=2, target_modules=["gate_proj", "up_proj"]).lora.config.targets == (
        "gate_up_proj",
    )
    with pytest.raises(ValueError, match="one projection, qkv_proj"):
        facade(model, r=2, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="unknown LoRA target"):
        facade(model, r=2, target_modules=["qkv_proj", "w1"])


def test_forward_options_choose_the_matmul_variant():
    """``ForwardOptions(matmul_variant=...)`` reaches every projection's NF4 matmul (here the
    Mosaic GPU kernels, traced for the interpreter), and a bad name fails at construction."""
    import dataclasses

    from lorax import demo
    from lorax.config import PROJECTIONS
    from pallas_kernels.nf4 import stack

    model = demo.tiny_model(seed=0, dtype=jnp.bfloat16)
    layers = dict(model.params["layers"])
    for proj in PROJECTIONS:
        w = layers[proj]["weight"].astype(jnp.float32)
        layers[proj] = {"weight": stack([lorax.quantize_nf4(w[i]) for i in range(w.shape[0])])}
    model = dataclasses.replace(model, params={**model.params, "layers": layers})
    ids = jnp.zeros((1, 64), jnp.int32)

    def kernel_calls(**options) -> int:
        opts = lorax.ForwardOptions(matmul_impl="pallas", **options)
        jaxpr = jax.make_jaxpr(lambda: lorax.forward(model, None, ids, options=opts))()
        return str(jaxpr).count("lorax_mgpu_nf4_matmul")

    assert kernel_calls(matmul_variant="mosaic") > 0
    assert kernel_calls() == 0  # "auto" never picks it
    with pytest.raises(ValueError, match="variant must be one of"):
        lorax.ForwardOptions(matmul_variant="cublas")


def test_forward_options_choose_the_attention_backward():
    """``ForwardOptions(attention_bwd_dq=...)`` reaches the Mosaic attention's backward (traced
    for the interpreter: the fused kernel only where forced at this length), and a bad name
    fails at construction."""
    from lorax import demo

    model = demo.tiny_model(seed=0, dtype=jnp.bfloat16)
    lora = lorax.init_lora(model, rank=4, alpha=4, key=jax.random.key(0))
    ids = jnp.zeros((1, 128), jnp.int32)

    def fused_kernels(**options) -> int:
        opts = lorax.ForwardOptions(attention_impl="mosaic", **options)
        loss = lambda lora: lorax.forward(model, lora, ids, options=opts).astype(jnp.float32).sum()
        return str(jax.make_jaxpr(jax.grad(loss))(lora)).count("lorax_mgpu_attention_fused_bwd")

    assert fused_kernels(attention_bwd_dq="fused") > 0
    assert fused_kernels() == 0  # "auto" keeps the two kernels at 128 tokens
    with pytest.raises(ValueError, match="bwd_dq must be one of"):
        lorax.ForwardOptions(attention_bwd_dq="atomic")


def _peft_expert_wrappers(layer) -> dict[str, object]:
    """PEFT's (nested) ParamWrappers of one layer's experts, by lorax projection name."""
    from peft.tuners.lora.layer import ParamWrapper

    by_param = {m.parameter_name: m for m in layer.mlp.modules() if isinstance(m, ParamWrapper)}
    return {name: by_param[hf] for name, hf in EXPERT_HF_PARAMETERS.items() if hf in by_param}


@pytest.mark.parametrize("targets", ["all-linear", ["v_proj", "experts_down_proj"]])
def test_mixtral_experts_forward_and_grads_match_peft(tmp_path, rng, targets):
    """LoRA on Mixtral's experts, as PEFT adapts them (``target_parameters``: one factor pair
    per expert, folded into the 3-D expert weights)."""
    import peft

    torch = pytest.importorskip("torch")
    model_type, overrides = CASES["mixtral"]
    torch_model, path = make_hf_model(tmp_path, model_type, **overrides)
    model = lorax.load(path, dtype="float32")
    lora = lorax.init_lora(model, rank=4, alpha=8, targets=targets, key=jax.random.key(1))
    params = jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.1, jnp.float32), lora.params
    )
    lora = lorax.LoraWeights(params, lora.config)
    cfg = lora.config
    experts = [t for t in cfg.targets if t in EXPERT_HF_PARAMETERS]
    linears = [t for t in cfg.targets if t not in EXPERT_HF_PARAMETERS]
    peft_model = peft.get_peft_model(
        torch_model,
        peft.LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            target_modules=linears,
            target_parameters=[module_name(t) for t in experts],
        ),
    )
    layers = peft_model.base_model.model.model.layers
    with torch.no_grad():
        for i, layer in enumerate(layers):
            wrappers = _peft_expert_wrappers(layer)
            for proj, ab in lora.params["layers"].items():
                if proj in experts:
                    module = wrappers[proj]
                    a, b = expert_factors_to_peft(ab["lora_a"][i], ab["lora_b"][i])
                else:
                    module = layer.get_submodule(module_name(proj))
                    a, b = np.asarray(ab["lora_a"][i]), np.asarray(ab["lora_b"][i])
                module.lora_A["default"].weight.copy_(torch.from_numpy(np.array(a)))
                module.lora_B["default"].weight.copy_(torch.from_numpy(np.array(b)))

    ids = rng.integers(0, model.config.vocab_size, size=(2, 20))
    cotangent = rng.normal(size=(2, 20, model.config.vocab_size)).astype(np.float32)
    ours = lorax.forward(model, lora, jnp.asarray(ids))

    def objective(lora):
        return jnp.sum(lorax.forward(model, lora, jnp.asarray(ids)) * cotangent)

    grads = jax.grad(objective)(lora)
    logits = peft_model(torch.as_tensor(ids)).logits
    (logits * torch.from_numpy(cotangent)).sum().backward()
    assert rel_l2(ours, logits.detach().numpy()) < 1e-5
    assert rel_l2(ours, lorax.forward(model, None, jnp.asarray(ids))) > 1e-2  # LoRA acts
    for i, layer in enumerate(layers):
        wrappers = _peft_expert_wrappers(layer)
        for proj, ab in grads.params["layers"].items():
            if proj in experts:
                module = wrappers[proj]
                ref_a, ref_b = expert_factors_from_peft(
                    module.lora_A["default"].weight.grad, module.lora_B["default"].weight.grad,
                    model.config.num_experts,
                )  # fmt: skip
            else:
                module = layer.get_submodule(module_name(proj))
                ref_a = module.lora_A["default"].weight.grad.numpy()
                ref_b = module.lora_B["default"].weight.grad.numpy()
            assert rel_l2(ab["lora_a"][i], ref_a) < 1e-5, (proj, i)
            assert rel_l2(ab["lora_b"][i], ref_b) < 1e-5, (proj, i)
