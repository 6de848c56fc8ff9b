"""DeepSeek V2/V3 (multi-head latent attention, dense first layers, grouped routing with
shared experts): its config read as transformers reads it, its logits and gradients (in
test_model_parity and test_moe), and its merged export computed by transformers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model, random_lora, rel_err, rel_l2, torch_logits
from test_model_parity import CASES

import lorax
from lorax.config import ConfigError, ModelConfig
from lorax.train.step import StepConfig, loss_sum

DEEPSEEK_CASES = ("deepseek-v3", "deepseek-v3-yarn-halves", "deepseek-v2")


@pytest.mark.parametrize("case", DEEPSEEK_CASES)
def test_deepseek_logits_match_transformers_closely(tmp_path, rng, case):
    """Closer than the families' shared bound: a latent norm with rms_norm_eps in place of
    transformers' fixed 1e-6 is off by ~2e-5 here."""
    model_type, overrides = CASES[case]
    torch_model, path = make_hf_model(tmp_path, model_type, **overrides)
    model = lorax.load(path, dtype="float32")
    ids = rng.integers(0, model.config.vocab_size, size=(2, 40))
    ours = jax.jit(lorax.forward)(model, None, jnp.asarray(ids))
    assert rel_err(ours, torch_logits(torch_model, ids)) < 5e-6


_V2_YARN = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "mscale": 1.0,
            "mscale_all_dim": 0.8, "original_max_position_embeddings": 64}  # fmt: skip


@pytest.mark.parametrize("rope_parameters", [None, _V2_YARN], ids=["default", "yarn"])
def test_deepseek_v2_turns_rope_in_float32_as_transformers_does(
    tmp_path, rng, monkeypatch, rope_parameters
):
    """transformers' DeepSeek V2 turns RoPE's pairs in float32 (its complex64 ``freqs_cis``,
    YaRN's attention factor in them) and rounds once to the activations' dtype
    (``apply_rotary_emb``); its other families (V3 too) turn in the activations' dtype.
    In a bf16 forward, lorax's rotated query and key slices of transformers' own inputs are
    transformers' (bit for bit on this CPU; fewer than 0.1% one ulp off allowed for other
    compilers' fusions). Rounding the tables to bf16 and rotating in bf16 instead leaves
    25-39% of them off, which the test checks too (it can tell the two apart)."""
    import torch
    import transformers
    from transformers.models.deepseek_v2 import modeling_deepseek_v2

    from lorax.model import latent_rope, rope_cos_sin

    model_type, overrides = CASES["deepseek-v2"]
    if rope_parameters is not None:
        overrides = dict(overrides, rope_parameters=rope_parameters)
    _, path = make_hf_model(tmp_path, model_type, **overrides)
    # Loaded in bf16 as users load it: ``.bfloat16()`` would round the rotary embedding's
    # inv_freq buffer too, which transformers keeps float32.
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, attn_implementation="eager"
    )
    calls = []
    rotate = modeling_deepseek_v2.apply_rotary_emb

    def recorded(xq, xk, freqs_cis):
        out = rotate(xq, xk, freqs_cis)
        calls.append(((xq, xk), out))
        return out

    monkeypatch.setattr(modeling_deepseek_v2, "apply_rotary_emb", recorded)
    ids = rng.integers(0, torch_model.config.vocab_size, size=(2, 40))
    torch_logits(torch_model, ids)
    config = lorax.load(path, dtype="bfloat16").config
    assert config.rope_in_float32 and len(calls) == config.num_layers

    @jax.jit
    def ours(q, k):
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        return latent_rope(config, q, k, *rope_cos_sin(config, positions, jnp.bfloat16))

    @jax.jit
    def in_bf16(q, k):  # the control: tables rounded to bf16, turned in bf16
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        tables = rope_cos_sin(config, positions, jnp.bfloat16)
        return latent_rope(config, q, k, *(t.astype(jnp.bfloat16) for t in tables))

    def in_lorax_layout(t):  # transformers' [B, H, S, D], pairs side by side
        t = t.transpose(1, 2).float().numpy()
        return np.concatenate([t[..., 0::2], t[..., 1::2]], axis=-1)

    for inputs, theirs in calls:
        inputs = [jnp.asarray(t.transpose(1, 2).float().numpy(), jnp.bfloat16) for t in inputs]
        for got, control, want in zip(ours(*inputs), in_bf16(*inputs), theirs, strict=True):
            assert got.dtype == jnp.bfloat16
            got, control = np.asarray(got, np.float32), np.asarray(control, np.float32)
            want = in_lorax_layout(want)
            assert np.mean(got != want) < 1e-3  # measured: none differ
            assert np.all(np.abs(got - want) <= np.abs(want) * 2.0**-7)  # one bf16 ulp
            assert np.mean(control != want) > 0.1  # measured: 25-39%


def test_deepseek_config_reads_what_transformers_reads():
    """A config.json without DeepSeek's fields gets DeepseekV3Config's defaults (DeepSeek-V3's
    shape); the attention scale follows YaRN's mscale_all_dim."""
    import transformers

    hf = dict(model_type="deepseek_v3", vocab_size=64, hidden_size=64, intermediate_size=96,
              num_hidden_layers=4, num_attention_heads=4)  # fmt: skip
    c = ModelConfig.from_hf_dict(hf)
    theirs = transformers.DeepseekV3Config(**hf)
    assert (c.num_experts, c.experts_per_token, c.expert_width) == (
        theirs.n_routed_experts, theirs.num_experts_per_tok, theirs.moe_intermediate_size
    )  # fmt: skip
    assert c.dense_mlp_layers == tuple(range(theirs.first_k_dense_replace))
    assert (c.q_lora_rank, c.kv_lora_rank, c.v_head_dim) == (
        theirs.q_lora_rank, theirs.kv_lora_rank, theirs.v_head_dim
    )  # fmt: skip
    assert c.head_dim == theirs.qk_nope_head_dim + theirs.qk_rope_head_dim
    assert (c.expert_groups, c.expert_groups_kept) == (theirs.n_group, theirs.topk_group)
    assert c.routed_scaling_factor == theirs.routed_scaling_factor and c.router_bias
    assert c.rope_interleave and c.float32_router and c.num_kv_heads == c.num_heads
    yarn = {"rope_type": "yarn", "factor": 40.0, "rope_theta": 10000.0, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096}  # fmt: skip
    scaled = ModelConfig.from_hf_dict({**hf, "rope_parameters": yarn})
    module = transformers.models.deepseek_v3.modeling_deepseek_v3
    scale = module.yarn_apply_mscale(yarn, c.head_dim**-0.5)
    assert scaled.attention_scale == pytest.approx(scale, rel=1e-12)
    assert c.attention_scale == pytest.approx(c.head_dim**-0.5, rel=1e-12)


_V2 = dict(model_type="deepseek_v2", vocab_size=64, hidden_size=64, intermediate_size=96,
           num_hidden_layers=2, num_attention_heads=4, n_routed_experts=8,
           num_experts_per_tok=2)  # fmt: skip


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(norm_topk_prob=True), "norm_topk_prob=true is ambiguous"),
        (dict(topk_method="noaux_tc"), "topk_method='noaux_tc'"),
        (dict(output_router_logits=True), "no load-balancing"),
        (dict(moe_layer_freq=2), "moe_layer_freq=2"),
        (dict(first_k_dense_replace=2), "first_k_dense_replace=2"),
        (dict(n_shared_experts=0), "n_shared_experts=0"),
        (dict(topk_method="group_limited_greedy", n_group=3, topk_group=1), "split into 3"),
    ],
)
def test_deepseek_config_refuses_what_lorax_cannot_compute(changes, match):
    ModelConfig.from_hf_dict(_V2)  # fine as it is
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf_dict({**_V2, **changes})


@pytest.mark.parametrize("case", ["deepseek-v3-yarn-halves", "deepseek-v2"])
def test_deepseek_merged_model_computes_lorax_logits_in_transformers(tmp_path, rng, case):
    """The merged export (LoRA on latent attention, the shared experts, the dense layer and the
    experts) loads in transformers from its own config.json and computes lorax's adapted
    logits; the config reads back as the same lorax config."""
    import torch
    import transformers

    model_type, overrides = CASES[case]
    _, path = make_hf_model(tmp_path, model_type, **overrides)
    model = lorax.load(path, dtype="float32")
    lora = random_lora(model, rng, 4, 8, model.config.projections())
    ids = rng.integers(0, model.config.vocab_size, size=(2, 24))
    ours = jax.jit(lorax.forward)(model, lora, jnp.asarray(ids))
    out = str(tmp_path / "merged")
    lorax.save_merged(model, lora, out, dtype="float32")
    assert lorax.load(out, dtype="float32").config == model.config
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager"
    )
    assert rel_err(ours, torch_logits(merged, ids)) < 1e-5
    no_lora = jax.jit(lorax.forward)(model, None, jnp.asarray(ids))
    assert rel_err(no_lora, ours) > 1e-2  # the adapters change the logits


@pytest.mark.parametrize("case", ["deepseek-v3", "deepseek-v2"])
def test_peft_runs_our_deepseek_adapter_like_lorax(tmp_path, rng, case):
    """LoRA on latent attention's projections and the experts, saved as a PEFT adapter: PEFT
    computes lorax's logits with it and lorax reads it back as written. The shared experts'
    and dense layers' gate/up/down_proj are refused by name (PEFT would read those names as
    the experts')."""
    import peft
    import transformers

    from convert.peft import AdapterError

    model_type, overrides = CASES[case]
    _, path = make_hf_model(tmp_path, model_type, **overrides)
    model = lorax.load(path, dtype="float32")
    mlp = ("gate_proj", "up_proj", "down_proj")
    targets = [p for p in model.config.projections() if p not in mlp]
    lora = random_lora(model, rng, 4, 8, targets)
    out = tmp_path / "adapter"
    lorax.save_adapter(model, lora, out)
    base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    ids = rng.integers(0, model.config.vocab_size, size=(2, 16))
    expected = jax.jit(lorax.forward)(model, lora, jnp.asarray(ids))
    assert rel_err(torch_logits(peft_model, ids), expected) < 1e-5
    with peft_model.disable_adapter():  # the adapter must matter
        assert rel_err(torch_logits(peft_model, ids), expected) > 1e-2
    back = lorax.load_adapter(model, out)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back.params,
                                     lora.params))  # fmt: skip
    with pytest.raises(AdapterError, match=r"dense-MLP layers \[0\] and shared experts cannot"):
        lorax.save_adapter(model, random_lora(model, rng, 4, 8, ["gate_proj"]), tmp_path / "b")


def test_loads_a_checkpoint_with_multi_token_prediction_layers(tmp_path):
    """DeepSeek-V3's files carry num_nextn_predict_layers layers after the decoder's (its
    multi-token-prediction module), which transformers skips on load: lorax does too, and
    still refuses them in a file whose config does not declare them."""
    import json
    import os

    from safetensors.numpy import load_file, save_file

    from convert.hf import CheckpointError

    model_type, overrides = CASES["deepseek-v3"]
    _, path = make_hf_model(tmp_path, model_type, **overrides)
    want = lorax.load(path, dtype="float32")
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    n = want.config.num_layers
    tensors[f"model.layers.{n}.eh_proj.weight"] = np.ones((64, 128), np.float32)
    tensors[f"model.layers.{n}.self_attn.kv_b_proj.weight"] = np.ones((80, 16), np.float32)
    save_file(tensors, weights, metadata={"format": "pt"})
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        hf = json.load(f)
    assert hf.pop("num_nextn_predict_layers") == 1  # what transformers writes, as the hub
    got = lorax.load(path, dtype="float32")
    with open(config_path, "w") as f:
        json.dump(hf, f)
    with pytest.raises(CheckpointError, match=f"unexpected tensor.*model.layers.{n}"):
        lorax.load(path, dtype="float32")
    with open(config_path, "w") as f:
        json.dump({**hf, "num_mtp_layers": 1}, f)  # the name transformers maps to it
    assert lorax.load(path, dtype="float32").config == got.config
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), got.params,
                                     want.params))  # fmt: skip


def test_bf16_merged_export_keeps_the_router_and_its_bias_in_float32(tmp_path, rng):
    """transformers keeps DeepSeek's routers and V3's correction bias in float32 (they choose
    the experts) in a 16-bit model; lorax loads them so and writes them so: a bf16 merged
    export stores those tensors' float32 bytes exactly."""
    from safetensors.numpy import load_file

    model_type, overrides = CASES["deepseek-v3"]
    _, path = make_hf_model(tmp_path, model_type, **overrides)
    model = lorax.load(path, dtype="bfloat16")
    assert model.params["layers"]["router_bias"].dtype == jnp.float32
    assert model.params["layers"]["router"]["weight"].dtype == jnp.float32
    out = str(tmp_path / "merged")
    lorax.save_merged(model, random_lora(model, rng, 4, 8, ["kv_b_proj"]), out)
    source, merged = load_file(f"{path}/model.safetensors"), load_file(f"{out}/model.safetensors")
    for name in (
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.2.mlp.gate.weight",
    ):
        assert merged[name].dtype == np.float32
        np.testing.assert_array_equal(merged[name], source[name])
    assert str(merged["model.layers.1.self_attn.o_proj.weight"].dtype) == "bfloat16"


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(v_head_dim=24), "0 < v_head_dim <= 16"),
        (dict(topk_method="group_limited_greedy"), "'n_group' is missing"),
        (dict(num_experts_per_tok=None), "'num_experts_per_tok' is missing"),
        (dict(topk_method="group_limited_greedy", n_group=8, topk_group=1),
         r"in 8 groups, 1 kept \(n_group / topk_group\)"),
    ],
)  # fmt: skip
def test_deepseek_config_errors_name_their_fields(changes, match):
    hf = dict(_V2, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, moe_layer_freq=None)
    ModelConfig.from_hf_dict(hf)  # fine as it is (a null moe_layer_freq is its default, 1)
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf_dict({**hf, **changes})


def test_refuses_fp8_checkpoints_and_deepseek_router_statistics(tmp_path):
    """DeepSeek-V3/R1's released files are FP8 (quantization_config fp8): refused by name, not
    read as 16-bit. DeepSeek's routing has no load-balancing loss to collect statistics for."""
    import json
    import os

    from convert.hf import CheckpointError
    from lorax.model import hidden_states

    model_type, overrides = CASES["deepseek-v3"]
    _, path = make_hf_model(tmp_path, model_type, **overrides)
    model = lorax.load(path, dtype="float32")
    with pytest.raises(ValueError, match="routing has no such loss"):
        hidden_states(model, None, jnp.zeros((1, 4), jnp.int32), router_stats=True)
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        hf = json.load(f)
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    with open(config_path, "w") as f:
        json.dump({**hf, "quantization_config": fp8}, f)
    with pytest.raises(CheckpointError, match="quant_method='fp8'.*FP8 files to bf16"):
        lorax.load(path, dtype="float32")


def _torch_lora(base, a, b, scale):
    """``base`` with LoRA written out in torch: ``base(x) + scale · (x·Aᵀ)·Bᵀ``, A and B
    trainable parameters holding lorax's ``lora_a [r, in]`` and ``lora_b [out, r]``."""
    import torch

    class LoraLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base
            self.a = torch.nn.Parameter(torch.tensor(np.array(a)))
            self.b = torch.nn.Parameter(torch.tensor(np.array(b)))

        def forward(self, x):
            return self.base(x) + scale * (x @ self.a.T) @ self.b.T

    return LoraLinear()


# deepseek-v2 passes as well (same errors, ~2e-6); left out for CI time (~8 s more, mostly
# compiling): its shared experts and dense layer run the same lorax path as V3's.
@pytest.mark.parametrize("case", ["deepseek-v3"])
def test_deepseek_lora_gradients_match_torch_autograd(tmp_path, rng, case):
    """LoRA gradients of every DeepSeek projection against torch autograd through
    transformers' own model with LoRA written into it by hand (no PEFT, which cannot adapt
    the shared experts' or dense layers' gate/up/down_proj: test_moe checks the rest against
    PEFT): each nn.Linear becomes base(x) + scale·(x·Aᵀ)·Bᵀ, and each routed expert's 3-D
    weight W + scale·B·A. Layers below first_k_dense_replace adapt their dense MLP (lorax's
    ``dense_layers`` stack), the others their shared experts' (``layers``)."""
    import torch

    model_type, overrides = CASES[case]
    torch_model, path = make_hf_model(tmp_path, model_type, **overrides)
    model = lorax.load(path, dtype="float32")
    lora = random_lora(model, rng, 4, 8, model.config.projections())
    scale = lora.config.scale
    ids = rng.integers(0, model.config.vocab_size, size=(2, 16))
    batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(ids)}

    def mean_loss(lora):
        total, count = loss_sum(lora, model, batch, StepConfig())
        return total / count

    value, grads = jax.jit(jax.value_and_grad(mean_loss))(lora)

    dense = torch_model.config.first_k_dense_replace
    assert dense >= 1 and torch_model.config.n_shared_experts >= 1
    torch_model.requires_grad_(False)
    refs = {}  # (stack, projection, layer in stack) -> (group, module holding a and b)
    for i, layer in enumerate(torch_model.model.layers):
        key, j = ("dense_layers", i) if i < dense else ("layers", i - dense)
        group = "dense MLP" if i < dense else "shared experts"
        mlp = layer.mlp if i < dense else layer.mlp.shared_experts
        for proj, ab in lora.params[key].items():
            a, b = ab["lora_a"][j], ab["lora_b"][j]
            if proj.startswith("experts_"):  # W [E, out, in] + scale · B [E, out, r] · A [E, r, in]
                experts, name = layer.mlp.experts, proj.removeprefix("experts_")
                w = experts._parameters.pop(name)
                holder = torch.nn.Module()
                holder.a = torch.nn.Parameter(torch.tensor(np.array(a)))
                holder.b = torch.nn.Parameter(torch.tensor(np.array(b)))
                setattr(experts, name, w + scale * holder.b @ holder.a)
                refs[key, proj, j] = ("routed experts", holder)
            else:
                parent = mlp if proj in ("gate_proj", "up_proj", "down_proj") else layer.self_attn
                module = _torch_lora(getattr(parent, proj), a, b, scale)
                setattr(parent, proj, module)
                refs[key, proj, j] = (group if parent is mlp else "attention", module)
    assert {group for group, _ in refs.values()} == {
        "attention", "dense MLP", "shared experts", "routed experts"
    }  # fmt: skip
    ids_t = torch.as_tensor(ids)
    out = torch_model(ids_t, labels=ids_t)  # cross-entropy alone: DeepSeek has no aux loss
    out.loss.backward()
    assert float(value) == pytest.approx(float(out.loss.detach()), rel=1e-5)
    worst = {}  # group -> largest (rel_l2, rel_err), for the log
    for (key, proj, j), (group, module) in refs.items():
        for which, ref in (("lora_a", module.a.grad), ("lora_b", module.b.grad)):
            ours, ref = grads.params[key][proj][which][j], ref.numpy()
            assert np.linalg.norm(ref) > 0, (key, proj, j, which)
            errors = np.array([rel_l2(ours, ref), rel_err(ours, ref)])
            worst[group] = np.maximum(worst.get(group, errors), errors)
            assert errors[0] < 2e-5, (key, proj, j, which, errors)  # measured: <= 3e-6
    print("largest relative gradient errors (l2, max-abs):", worst)
