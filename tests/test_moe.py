"""Mixture of experts (Mixtral, Qwen 2/3 MoE): the grouped expert matmul against its
definition, the router's load-balancing loss against transformers', and the MoE models'
bookkeeping."""

from __future__ import annotations

import functools

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model, rel_err, rel_l2, torch_logits
from test_model_parity import CASES

import lorax
from convert.names import SHARED_EXPERT_GATE
from lorax.config import ConfigError, ModelConfig
from lorax.model import ForwardOptions
from lorax.train.step import StepConfig, loss_sum
from pallas_kernels.expert_matmul import expert_lora_matmul, expert_lora_matmul_reference
from pallas_kernels.nf4 import dequantize_nf4, quantize_nf4

# Each MoE family's tiny config (test_model_parity's cases), by model_type.
MOE = {
    "mixtral": CASES["mixtral"][1],
    "qwen3_moe": CASES["qwen3-moe"][1],
    "qwen2_moe": CASES["qwen2-moe"][1],
}


def _expert_case(rng, dtype, nf4: bool, parts: int):
    experts, n, k, r = 4, 48, 64, 4
    # An empty group; groups longer than one chunk of the "chunked" LoRA layout (64 rows).
    sizes = rng.multinomial(150, [0.5, 0.0, 0.3, 0.2]).astype(np.int32)
    m = int(sizes.sum()) + 3  # three rows past the groups: no expert's
    w = rng.normal(size=(experts, parts, n // parts, k)).astype(np.float32) * 0.1
    if nf4:
        weight = jax.vmap(jax.vmap(quantize_nf4))(jnp.asarray(w))
        if parts == 1:
            weight = jax.tree.map(lambda a: a[:, 0], weight)
    else:
        weight = jnp.asarray(w if parts > 1 else w[:, 0], dtype)
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    a = jnp.asarray(rng.normal(size=(experts, r, k)) * 0.1, jnp.float32)
    b = jnp.asarray(rng.normal(size=(experts, n, r)) * 0.1, jnp.float32)
    ids = np.repeat(np.arange(experts), sizes)
    ids = jnp.asarray(np.concatenate([ids, np.zeros(3, int)]))
    valid = jnp.asarray(np.arange(m) < sizes.sum())[:, None]
    return x, weight, jnp.asarray(sizes), a, b, ids, valid


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize(
    "parts, lora", [(1, "dense"), (2, "dense"), (1, "chunked"), (2, "chunked"), (1, None)]
)
def test_expert_matmul_matches_its_definition(rng, dtype, nf4, parts, lora):
    """Forward and every gradient against the row-by-row definition, on fresh random groups
    (one empty, rows past the groups), NF4 or dense experts, one matrix per expert or two
    parts (Mixtral's gate and up), without LoRA or with it, its products run either way."""
    x, w, sizes, a, b, ids, valid = _expert_case(rng, dtype, nf4, parts)
    if not lora:
        a = b = None
    scale = 0.75

    def ours(x, a, b):
        return expert_lora_matmul(x, w, sizes, a, b, scale, lora_products=lora)

    # In float32 on the same values: a bf16 reference would sum dA/dB over a group's rows in
    # bf16 (its per-row gathers' transposes), less exactly than the op under test.
    f32 = functools.partial(jax.tree.map, lambda v: v.astype(jnp.float32))
    w32 = w if nf4 else f32(w)

    def reference(x, a, b):
        y = expert_lora_matmul_reference(f32(x), w32, ids, f32(a), f32(b), scale)
        return jnp.where(valid, y, 0)

    y, vjp = jax.vjp(ours, x, a, b)
    y_ref, vjp_ref = jax.vjp(reference, x, a, b)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    assert rel_l2(y, y_ref) < tol
    assert np.all(np.asarray(y)[~np.asarray(valid[:, 0])] == 0)
    dy = jnp.asarray(rng.normal(size=y.shape), dtype)
    for got, want in zip(vjp(dy), vjp_ref(dy.astype(y_ref.dtype)), strict=True):
        if want is not None:
            assert rel_l2(got, want) < tol


def test_expert_matmul_refuses_what_it_cannot_run(rng):
    x, w, sizes, a, b, _, _ = _expert_case(rng, jnp.float32, False, 1)
    with pytest.raises(ValueError, match="cannot run here"):
        expert_lora_matmul(x, w, sizes, a, b, impl="mosaic")  # no Hopper GPU here
    with pytest.raises(ValueError, match="group_sizes must be int"):
        expert_lora_matmul(x, w, sizes[:2], a, b)
    with pytest.raises(ValueError, match="LoRA factors"):
        expert_lora_matmul(x, w, sizes, a[:, :, :8], b)
    with pytest.raises(ValueError, match="lora_products must be one of"):
        expert_lora_matmul(x, w, sizes, a, b, lora_products="grouped")


def test_chunked_layout_gives_each_expert_whole_chunks(rng):
    """Every row sits in exactly one chunk slot, of a chunk of its own expert, and finds
    itself there; rows past the groups sit nowhere; the chunk count bounds any sizes."""
    from pallas_kernels.expert_matmul import _chunk_rows

    for _ in range(5):
        sizes = rng.multinomial(int(rng.integers(1, 300)), rng.dirichlet(np.ones(6)))
        rows = int(sizes.sum()) + int(rng.integers(0, 3))
        c = _chunk_rows(jnp.asarray(sizes, jnp.int32), rows, chunk=8)
        index, expert, position = map(np.asarray, (c.index, c.expert, c.position))
        own = np.repeat(np.arange(6), sizes)
        held = index[index < rows]
        assert sorted(held) == list(range(sizes.sum()))
        chunk_of = np.nonzero(index < rows)[0]
        assert np.all(expert[chunk_of] == own[held])
        assert np.all(index.reshape(-1)[position[: sizes.sum()]] == np.arange(sizes.sum()))
        assert np.all(position[sizes.sum() :] == index.size)


def test_moe_rounds_the_chosen_weights_only_where_asked(rng):
    """Qwen's MoE rounds the chosen weights to the compute dtype before they scale the experts'
    outputs (transformers casts them to the router logits' dtype); Mixtral scales in float32.
    With every expert the same, each token's output is Σ_k bf16(v · w_k) for its one expert
    output v: each way equals its formula, and the two differ."""
    from lorax.moe import moe_mlp, route

    e, d, f, k = 4, 32, 16, 3
    bf16 = jnp.bfloat16
    one = rng.normal(size=(d, d)).astype(np.float32) * 0.2
    layer = {
        "router": {"weight": jnp.asarray(rng.normal(size=(e, d)), bf16)},
        "experts_gate_up_proj": {
            "weight": jnp.asarray(
                np.broadcast_to(rng.normal(size=(2, f, d)) * 0.3, (e, 2, f, d)), bf16
            )  # fmt: skip
        },
        "experts_down_proj": {
            "weight": jnp.asarray(np.broadcast_to(rng.normal(size=(d, f)) * 0.3, (e, d, f)), bf16)
        },
    }
    x = jnp.asarray(rng.normal(size=(64, d)) @ one, bf16)
    kw = dict(num_experts=e, activation=jax.nn.silu, lora_scale=0.0)
    v = moe_mlp(x, layer, {}, experts_per_token=1, **kw).astype(jnp.float32)  # weight 1
    weights, _, _ = route(x, layer["router"]["weight"], k)
    outs = {}
    for rounded in (True, False):
        w = weights.astype(bf16).astype(jnp.float32) if rounded else weights
        expected = jnp.sum((v[:, None, :] * w[..., None]).astype(bf16), axis=1)
        outs[rounded] = moe_mlp(x, layer, {}, experts_per_token=k, round_weights=rounded, **kw)
        np.testing.assert_array_equal(np.asarray(outs[rounded]), np.asarray(expected))
    assert np.mean(np.asarray(outs[True]) != np.asarray(outs[False])) > 0.05


# MoE models with dense-MLP layers among the routed ones (two layer stacks).
DENSE_LAYER_CASES = ("qwen3-moe-dense-layers", "qwen2-moe-sparse-step")


def _aux_case(tmp_path, coef: float | None, case: str = "mixtral"):
    model_type, overrides = (case, MOE[case]) if case in MOE else CASES[case]
    if coef is not None:
        overrides = dict(overrides, output_router_logits=True, router_aux_loss_coef=coef)
    torch_model, path = make_hf_model(tmp_path, model_type, **overrides)
    return torch_model, lorax.load(path, dtype="float32")


@pytest.mark.parametrize("case", [*MOE, "qwen2-moe-sparse-step", "deepseek-v3", "deepseek-v2"])
def test_moe_loss_and_lora_gradients_match_peft(tmp_path, rng, case):
    """With output_router_logits, transformers trains on CE + coef · load-balancing loss; so
    does lorax, with the same value and LoRA gradients, padding (segment 0) left out of the
    routers' statistics as transformers leaves out masked tokens. LoRA on every projection:
    the experts (PEFT's target_parameters) and, on Qwen 2 MoE, the shared expert's
    gate/up/down_proj (PEFT's target_modules, matched by name), and with dense-MLP layers
    their gate/up/down_proj (which route nothing: the loss averages over routed layers).
    DeepSeek (no load-balancing loss in transformers): latent attention's projections and the
    experts (PEFT reads the shared experts' and dense layers' gate/up/down_proj there as the
    experts', so those are left out; they run the dense-MLP path Qwen 2 MoE's cases check)."""
    import peft
    import torch

    coef = None if case.startswith("deepseek") else 0.5
    torch_model, model = _aux_case(tmp_path, coef=coef, case=case)
    assert model.config.router_aux_loss_coef == coef
    targets = model.config.projections()
    if case.startswith("deepseek"):
        # PEFT (0.21, on transformers 5) reads gate/up/down_proj on DeepSeek as the experts'
        # transformers-4 names, so it cannot adapt the shared experts' and dense layers' own
        # (Qwen 2 MoE's shared-expert case above checks that path of lorax).
        targets = [t for t in targets if t not in ("gate_proj", "up_proj", "down_proj")]
    lora = lorax.init_lora(model, rank=4, alpha=8, targets=targets, key=jax.random.key(3))
    lora = lorax.LoraWeights(
        jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.1, p.dtype), lora.params),
        lora.config,
    )
    ids = rng.integers(0, model.config.vocab_size, size=(2, 16))
    mask = np.ones((2, 16), np.int64)
    mask[1, 11:] = 0  # right padding
    labels = np.where(mask > 0, ids, -100)
    batch = {
        "input_ids": jnp.asarray(ids),
        "labels": jnp.asarray(labels),
        "segment_ids": jnp.asarray(mask, jnp.int32),
        "positions": jnp.asarray(np.broadcast_to(np.arange(16), (2, 16))),
    }

    def mean_loss(lora):
        total, count = loss_sum(lora, model, batch, StepConfig())
        return total / count

    value, grads = jax.value_and_grad(mean_loss)(lora)

    from peft.tuners.lora.layer import ParamWrapper

    from convert.names import EXPERT_HF_PARAMETERS, module_name, projection_module
    from convert.peft import expert_factors_from_peft, expert_factors_to_peft

    experts = [t for t in lora.config.targets if t in EXPERT_HF_PARAMETERS]
    peft_model = peft.get_peft_model(
        torch_model,
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=[t for t in lora.config.targets if t not in experts],
            target_parameters=[module_name(t) for t in experts],
        ),
    )
    layers = peft_model.base_model.model.model.layers

    def modules(i, layer):
        """(projection, its PEFT module, its LoRA factors' place) of model layer i."""
        stack, j = model.config.stack_position(i)
        wrappers = {m.parameter_name: m for m in layer.mlp.modules() if isinstance(m, ParamWrapper)}
        for proj in lora.config.targets:
            if proj not in stack.config.projections():
                continue
            if proj in experts:
                module = wrappers[EXPERT_HF_PARAMETERS[proj]]
            else:
                module = layer.get_submodule(projection_module(proj, stack.config))
            yield proj, module, (stack.key, j)

    with torch.no_grad():
        for i, layer in enumerate(layers):
            for proj, module, (key, j) in modules(i, layer):
                ab = lora.params[key][proj]
                a, b = ab["lora_a"][j], ab["lora_b"][j]
                if proj in experts:
                    a, b = expert_factors_to_peft(a, b)
                module.lora_A["default"].weight.copy_(torch.from_numpy(np.array(a)))
                module.lora_B["default"].weight.copy_(torch.from_numpy(np.array(b)))
    out = peft_model(
        torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), labels=torch.as_tensor(labels)
    )
    out.loss.backward()
    if coef is not None:
        assert float(out.aux_loss.detach()) > 1.0  # the term is there (≈ k = 2 when balanced)
    assert float(value) == pytest.approx(float(out.loss), rel=1e-5)
    for i, layer in enumerate(layers):
        for proj, module, (key, j) in modules(i, layer):
            ref_a = module.lora_A["default"].weight.grad.numpy()
            ref_b = module.lora_B["default"].weight.grad.numpy()
            if proj in experts:
                ref_a, ref_b = expert_factors_from_peft(ref_a, ref_b, model.config.num_experts)
            ab = grads.params[key][proj]
            assert rel_l2(ab["lora_a"][j], ref_a) < 1e-4, (proj, i)
            assert rel_l2(ab["lora_b"][j], ref_b) < 1e-4, (proj, i)


def test_router_aux_loss_changes_the_loss_by_its_coefficient(tmp_path, rng):
    """The same model without output_router_logits trains on CE alone: the two losses differ
    by exactly coef · aux, with aux near k = 2 for a random router."""
    import dataclasses

    _, model = _aux_case(tmp_path, coef=0.25)
    plain = dataclasses.replace(
        model, config=dataclasses.replace(model.config, router_aux_loss_coef=None)
    )
    ids = jnp.asarray(rng.integers(0, model.config.vocab_size, size=(2, 12)))
    batch = {"input_ids": ids, "labels": ids}
    with_aux, count = loss_sum(None, model, batch, StepConfig())
    without, _ = loss_sum(None, plain, batch, StepConfig())
    aux = float(with_aux - without) / (0.25 * float(count))
    assert 1.9 < aux < 3.0
    # A remat schedule scans the layers in segments: their statistics add up the same.
    segmented = StepConfig(forward=ForwardOptions(remat="full:1,none"))
    assert float(loss_sum(None, model, batch, segmented)[0]) == pytest.approx(float(with_aux))


@pytest.mark.parametrize("model_type", list(MOE))
def test_moe_bookkeeping(tmp_path, model_type):
    torch_model, path = make_hf_model(tmp_path, model_type, **MOE[model_type])
    model = lorax.load(path, dtype="float32")
    assert model.config.num_parameters() == sum(p.numel() for p in torch_model.parameters())
    layers, c = model.params["layers"], model.config
    dims, width = (c.num_layers, c.num_experts), torch_model.model.layers[0].mlp.experts.down_proj
    assert c.expert_width == width.shape[-1]
    assert layers["experts_gate_up_proj"]["weight"].shape == (*dims, 2, c.expert_width,
                                                              c.hidden_size)  # fmt: skip
    assert layers["experts_down_proj"]["weight"].shape == (*dims, c.hidden_size, c.expert_width)
    assert layers["router"]["weight"].shape == (*dims, c.hidden_size)
    if c.shared_expert:  # Qwen 2 MoE: a shared expert of its own width, and its gate
        shared = torch_model.model.layers[0].mlp.shared_expert
        assert c.mlp_width == shared.down_proj.in_features != c.intermediate_size
        assert layers["down_proj"]["weight"].shape == (c.num_layers, c.hidden_size, c.mlp_width)
        assert layers["shared_expert_gate"]["weight"].shape == (c.num_layers, 1, c.hidden_size)
    with pytest.raises(ValueError, match="dropout on the expert projections"):
        lorax.init_lora(model, rank=4, alpha=8, dropout=0.1)
    assert lorax.init_lora(model, 4, 8, targets="attention", dropout=0.1).config.dropout == 0.1


@pytest.mark.parametrize("case", DENSE_LAYER_CASES)
def test_dense_mlp_layers_bookkeeping(tmp_path, case):
    """An MoE model whose listed layers have a dense MLP: the layers split into two stacks as
    transformers builds them, each of its own shapes; parameters and FLOPs counted per stack;
    LoRA targets the union of the stacks' projections; GGUF (llama.cpp routes every layer)
    refuses it by name."""
    from convert.gguf import GGUFError, export_gguf
    from lorax.train.flops import mean_attended_keys, train_flops_per_token

    model_type, overrides = CASES[case]
    torch_model, path = make_hf_model(tmp_path, model_type, **overrides)
    model = lorax.load(path, dtype="float32")
    c = model.config
    assert c.num_parameters() == sum(p.numel() for p in torch_model.parameters())
    dense = tuple(i for i, layer in enumerate(torch_model.model.layers)
                  if not hasattr(layer.mlp, "experts"))  # fmt: skip
    assert c.dense_mlp_layers == dense and 0 < len(dense) < c.num_layers
    routed, dense_stack = c.layer_stacks()
    assert (routed.key, dense_stack.key) == ("layers", "dense_layers")
    assert dense_stack.layers == dense and set(routed.layers) | set(dense) == set(range(4))
    width = torch_model.model.layers[dense[0]].mlp.down_proj.in_features
    assert width == c.intermediate_size
    assert model.params["dense_layers"]["down_proj"]["weight"].shape == (len(dense), 64, width)
    assert "router" not in model.params["dense_layers"]
    assert model.params["layers"]["router"]["weight"].shape[0] == len(routed.layers)
    lora = lorax.init_lora(model, 2, 4)
    assert {"gate_proj", "experts_gate_up_proj"} <= set(lora.config.targets)
    assert set(lora.params["dense_layers"]) == set(dense_stack.config.projections())
    assert set(lora.params["layers"]) == set(routed.config.projections())
    # FLOPs per token: 2 per weight a token multiplies (k of E experts' in a routed layer),
    # forward and backward (x2), counted from transformers' modules.
    active = sum(
        p.numel() * (c.experts_per_token / c.num_experts if ".experts." in name else 1)
        for name, p in torch_model.model.layers.named_parameters()
        if p.dim() >= 2
    )
    attention = sum(4.0 * c.num_heads * c.head_dim * mean_attended_keys(64, w) * 3.5
                    for w in c.layer_windows)  # fmt: skip
    expected = 4 * active + 4 * c.vocab_size * c.hidden_size + attention
    assert train_flops_per_token(c, 64) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(GGUFError, match=r"routes every layer.*mlp_only_layers"):
        export_gguf(model, None, str(tmp_path / "m.gguf"))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize(
    "fields",
    [dict(mlp_only_layers=[1]), dict(decoder_sparse_step=2),
     dict(decoder_sparse_step=3, mlp_only_layers=[2, 4]), dict(decoder_sparse_step=1)],
)  # fmt: skip
def test_dense_mlp_layers_are_those_transformers_builds(model_type, fields):
    """The layers read as dense are those transformers builds without experts, from
    mlp_only_layers and decoder_sparse_step together."""
    import torch
    import transformers

    hf = dict(_QWEN3_MOE_HF if model_type == "qwen3_moe" else _QWEN2_MOE_HF,
              num_hidden_layers=6, **fields)  # fmt: skip
    config = transformers.AutoConfig.for_model(**hf)
    with torch.device("meta"):
        layers = transformers.AutoModelForCausalLM.from_config(config).model.layers
    dense = tuple(i for i, layer in enumerate(layers) if not hasattr(layer.mlp, "experts"))
    assert ModelConfig.from_hf_dict(hf).dense_mlp_layers == dense
    assert bool(dense) == (fields != dict(decoder_sparse_step=1))


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(decoder_sparse_step=0), "decoder_sparse_step=0"),
        (dict(mlp_only_layers=[1, 7]), r"names \[7\]"),
        (dict(mlp_only_layers=[0, 1]), "every layer is dense"),
    ],
)
def test_dense_mlp_layers_config_refusals(changes, match):
    hf = dict(model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=48,
              num_hidden_layers=2, num_attention_heads=4, num_experts=4,
              num_experts_per_tok=2)  # fmt: skip
    ModelConfig.from_hf_dict(hf)  # the same config with every layer routed is fine
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf_dict({**hf, **changes})


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("router_jitter_noise", 0.01, "router_jitter_noise"),
        ("num_experts_per_tok", 5, "num_experts_per_tok=5"),
    ],
)
def test_mixtral_config_refuses_what_lorax_cannot_compute(field, value, match):
    hf = dict(model_type="mixtral", vocab_size=64, hidden_size=32, intermediate_size=48,
              num_hidden_layers=2, num_attention_heads=4, num_local_experts=4)  # fmt: skip
    hf[field] = value
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf_dict(hf)


_QWEN3_MOE_HF = dict(model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=48,
                     num_hidden_layers=2, num_attention_heads=4, num_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=16)  # fmt: skip


def test_qwen3_moe_config_reads_both_spellings_and_transformers_defaults():
    """The hub's files say num_experts, transformers >= 5 writes num_local_experts; a config
    without the MoE fields gets transformers' defaults (128 experts, top-8, width 768, no
    renormalization)."""
    hub = ModelConfig.from_hf_dict(_QWEN3_MOE_HF)
    spelled = dict(_QWEN3_MOE_HF, num_local_experts=4)
    del spelled["num_experts"]
    assert ModelConfig.from_hf_dict(spelled) == hub
    assert (hub.num_experts, hub.experts_per_token, hub.expert_width) == (4, 2, 16)
    bare = {k: v for k, v in _QWEN3_MOE_HF.items() if "expert" not in k and "moe_" not in k}
    c = ModelConfig.from_hf_dict(bare)
    assert (c.num_experts, c.experts_per_token, c.expert_width) == (128, 8, 768)
    assert not c.normalize_expert_weights and c.round_expert_weights and c.qk_norm


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(num_local_experts=8), "num_experts=4 and num_local_experts=8 disagree"),
        (dict(num_experts_per_tok=5), "num_experts_per_tok=5"),
    ],
)
def test_qwen3_moe_config_refuses_what_lorax_cannot_compute(changes, match):
    """Contradictions are refused by name, never computed as something else."""
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf_dict({**_QWEN3_MOE_HF, **changes})


_QWEN2_MOE_HF = dict(model_type="qwen2_moe", vocab_size=64, hidden_size=32, intermediate_size=48,
                     num_hidden_layers=5, num_attention_heads=4, num_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=16,
                     shared_expert_intermediate_size=40)  # fmt: skip


def test_qwen2_moe_config_reads_what_transformers_reads():
    """A config.json without the MoE fields gets Qwen2MoeConfig's defaults (Qwen1.5-MoE-A2.7B's
    shape: 60 experts, top-4, width 1408, a shared expert 5632 wide, no renormalization);
    q/k/v carry biases unless qkv_bias is false (Qwen 2 MoE has no attention_bias field: one
    is ignored, as transformers ignores it); num_local_experts is no Qwen 2 MoE field."""
    import transformers

    hub = ModelConfig.from_hf_dict(_QWEN2_MOE_HF)
    assert (hub.num_experts, hub.experts_per_token, hub.expert_width, hub.mlp_width) == (
        4, 2, 16, 40
    )  # fmt: skip
    assert hub.bias_projections == ("q_proj", "k_proj", "v_proj")
    assert hub.round_expert_weights and hub.shared_expert and not hub.qk_norm
    assert ModelConfig.from_hf_dict({**_QWEN2_MOE_HF, "num_local_experts": 8}) == hub
    unbiased = ModelConfig.from_hf_dict(
        {**_QWEN2_MOE_HF, "qkv_bias": False, "attention_bias": True}
    )
    assert unbiased.bias_projections == ()
    bare = {k: v for k, v in _QWEN2_MOE_HF.items() if "expert" not in k and "moe_" not in k}
    c, theirs = ModelConfig.from_hf_dict(bare), transformers.Qwen2MoeConfig(**bare)
    assert (c.num_experts, c.experts_per_token, c.expert_width, c.mlp_width) == (
        theirs.num_experts, theirs.num_experts_per_tok, theirs.moe_intermediate_size,
        theirs.shared_expert_intermediate_size,
    )  # fmt: skip
    assert c.normalize_expert_weights is theirs.norm_topk_prob is False


@pytest.mark.parametrize(
    "fields",
    [
        dict(),
        dict(use_sliding_window=False, sliding_window=16, max_window_layers=3),
        dict(use_sliding_window=True, sliding_window=16),  # max_window_layers 28: all even
        dict(use_sliding_window=True, sliding_window=16, max_window_layers=3),
        dict(use_sliding_window=True, sliding_window=16, max_window_layers=0),
        dict(use_sliding_window=True, max_window_layers=5),  # transformers' window: 4096
    ],
)
def test_qwen2_moe_windows_are_transformers_layer_types(fields):
    """Without layer_types in the file, Qwen2MoeConfig slides every other layer, the first
    included, below max_window_layers, and only with use_sliding_window (transformers 5's
    rule, unlike Qwen 2's from max_window_layers on); lorax reads the same layers."""
    import transformers

    theirs = transformers.Qwen2MoeConfig(**_QWEN2_MOE_HF, **fields)
    expected = tuple(theirs.sliding_window if t == "sliding_attention" else 0
                     for t in theirs.layer_types)  # fmt: skip
    assert ModelConfig.from_hf_dict({**_QWEN2_MOE_HF, **fields}).layer_windows == expected
    spelled = {**_QWEN2_MOE_HF, **fields, "layer_types": theirs.layer_types}
    assert ModelConfig.from_hf_dict(spelled).layer_windows == expected


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(num_experts_per_tok=5), "num_experts_per_tok=5"),
        (dict(shared_expert_intermediate_size=0), "shared_expert_intermediate_size=0"),
        (
            dict(layer_types=["sliding_attention"] + ["full_attention"] * 4),
            "layer_types has sliding_attention layers but use_sliding_window is false",
        ),
    ],
)
def test_qwen2_moe_config_refuses_what_lorax_cannot_compute(changes, match):
    """A shared expert of no width, and sliding layers whose window Qwen2MoeConfig zeroes
    (transformers cannot run them) are refused by name, never computed as something else."""
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf_dict({**_QWEN2_MOE_HF, **changes})


@pytest.mark.parametrize("model_type", list(MOE))
def test_nf4_moe_matches_transformers_with_bnb_experts(tmp_path, rng, model_type):
    """Every expert matrix quantized on its own, as bitsandbytes quantizes a checkpoint's
    per-expert Linear layers (Mixtral's w1/w3/w2, Qwen's gate/up/down), and Qwen 2 MoE's
    shared expert as any dense projection (its gate, like the router, stays as it is): lorax's
    NF4 forward equals transformers on those dequantized."""
    bnb_f = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes checks NF4")
    import torch
    from conftest import bnb_dequantize

    torch_model, path = make_hf_model(tmp_path, model_type, **MOE[model_type])
    model = lorax.load(path, quantize="nf4", dtype="float32")

    def roundtrip(w):
        q, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        return bnb_dequantize(bnb_f, q, state)

    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            if name.endswith("_proj.weight") or name.endswith("experts.down_proj"):
                matrices = p.data.reshape(-1, *p.shape[-2:]) if p.ndim == 3 else p.data[None]
                p.copy_(torch.stack([roundtrip(m) for m in matrices]).reshape(p.shape))
            elif name.endswith("experts.gate_up_proj"):  # gate and up: separate matrices on disk
                halves = p.data.reshape(p.shape[0] * 2, p.shape[1] // 2, p.shape[2])
                p.copy_(torch.stack([roundtrip(m) for m in halves]).reshape(p.shape))
    ids = rng.integers(0, model.config.vocab_size, size=(1, 24))
    ours = lorax.forward(model, None, jnp.asarray(ids))
    # bnb's CPU double-quant rounding is one step off in ~0.2% of blocks (see nf4.py).
    assert rel_err(ours, torch_logits(torch_model, ids)) < 2e-3


def test_mixtral_targets_and_kernel_groups(tmp_path):
    """LoRA presets and names on Mixtral's expert projections; the Unsloth facade maps Llama's
    MLP names onto them (whole groups only); the Mosaic NF4 kernel's groups leave them out
    (they run on the grouped matmul)."""
    from lorax.kernel_weights import group_keys, kernel_groups_for

    _, path = make_hf_model(tmp_path, "mixtral", **CASES["mixtral"][1])
    model = lorax.load(path, dtype="float32")
    experts = ("experts_gate_up_proj", "experts_down_proj")
    assert lorax.init_lora(model, 2, 4).config.targets == ("q_proj", "k_proj", "v_proj",
                                                           "o_proj", *experts)  # fmt: skip
    assert lorax.init_lora(model, 2, 4, targets="mlp").config.targets == experts
    with pytest.raises(ValueError, match="experts_gate_up_proj"):
        lorax.init_lora(model, 2, 4, targets=["gate_proj"])
    facade = lorax.FastLanguageModel.get_peft_model
    llama_names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert facade(model, r=2, target_modules=llama_names).lora.config.targets[-2:] == experts
    with pytest.raises(ValueError, match="one projection, experts_gate_up_proj"):
        facade(model, r=2, target_modules=["gate_proj"])
    assert group_keys(model) == ("q_proj+k_proj+v_proj", "o_proj")
    assert kernel_groups_for(model, "all", 1024) == group_keys(model)


def test_qwen2_moe_targets_and_kernel_groups(tmp_path):
    """Qwen 2 MoE's gate/up/down_proj are its shared expert's: LoRA targets by those names (in
    the presets beside the experts'), which the Unsloth facade passes on as PEFT reads them
    (never onto the experts), and the Mosaic NF4 kernel's groups (dense projections)."""
    from lorax.kernel_weights import group_keys

    _, path = make_hf_model(tmp_path, "qwen2_moe", **MOE["qwen2_moe"])
    model = lorax.load(path, dtype="float32")
    mlp, experts = ("gate_proj", "up_proj", "down_proj"), ("experts_gate_up_proj",
                                                          "experts_down_proj")  # fmt: skip
    attention = ("q_proj", "k_proj", "v_proj", "o_proj")
    assert lorax.init_lora(model, 2, 4).config.targets == (*attention, *mlp, *experts)
    assert lorax.init_lora(model, 2, 4, targets="mlp").config.targets == (*mlp, *experts)
    facade = lorax.FastLanguageModel.get_peft_model
    assert facade(model, r=2, target_modules=[*attention, *mlp]).lora.config.targets == (
        *attention, *mlp
    )  # fmt: skip
    assert facade(model, r=2, target_modules=["up_proj"]).lora.config.targets == ("up_proj",)
    assert group_keys(model) == ("q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj",
                                 "down_proj")  # fmt: skip


@pytest.mark.parametrize("all_experts", [False, True])
@pytest.mark.parametrize("model_type", list(MOE))
def test_moe_bf16_matches_transformers_where_routes_agree(tmp_path, rng, model_type, all_experts):
    """bf16 against transformers' float32 model. Routing is discontinuous: where a token's
    k-th and (k+1)-th router logits are within bf16's rounding, the two models can send it to
    different experts and its logits jump, and later positions see the jump through attention.
    So with top-2 routing most positions, not all, agree to bf16's precision, with the same
    top-1 token. With every expert used the router's weights are its whole softmax, a
    continuous function: then every position agrees as the dense families' do."""
    overrides = dict(MOE[model_type])
    if all_experts:
        count = overrides.get("num_local_experts") or overrides["num_experts"]
        overrides["num_experts_per_tok"] = count
    torch_model, path = make_hf_model(tmp_path, model_type, **overrides)
    model = lorax.load(path, dtype="bfloat16")
    ids = rng.integers(0, model.config.vocab_size, size=(2, 32))
    ours = np.asarray(jax.jit(lorax.forward)(model, None, jnp.asarray(ids)), np.float64)
    ref = torch_logits(torch_model, ids).astype(np.float64)
    per_position = np.abs(ours - ref).max(-1) / np.abs(ref).max()
    assert np.mean(ours.argmax(-1) == ref.argmax(-1)) > 0.9
    # Mixtral, Qwen 3 MoE: 30 draws each; Qwen 2 MoE: 12 draws (medians <= 0.008, shares of
    # top-2 routing >= 0.98; with all experts every position < 0.014).
    if all_experts:  # medians 0.005-0.009, every position < 3e-2
        assert np.median(per_position) < 1.2e-2
        assert np.max(per_position) < 3e-2
    else:  # medians 0.005-0.007 (Mixtral), 0.006-0.019 (Qwen 3); shares >= 0.67
        assert np.median(per_position) < 2.5e-2
        assert np.mean(per_position < 3e-2) > 0.6


_PROJECTIONS = ("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight")


def _bnb_4bit_checkpoint(tmp_path, path, suffixes) -> tuple[str, dict[str, np.ndarray]]:
    """The HF checkpoint at ``path`` rewritten as transformers 4 saved ``load_in_4bit`` models:
    every tensor named with one of ``suffixes`` stored as bitsandbytes NF4 (double-quantized,
    blocks of 64). Returns the directory and bitsandbytes' own decoding of each such tensor."""
    bnb_f = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes writes the file")
    import json
    import os

    import torch

    from convert.bnb import bnb_quantization_config
    from convert.safetensors_io import SafetensorsFile, save_file

    source = SafetensorsFile(os.path.join(path, "model.safetensors"))
    tensors, decoded = {}, {}
    for name in source:
        value = np.asarray(source[name])
        if name.endswith(suffixes):
            packed, state = bnb_f.quantize_4bit(
                torch.from_numpy(value), blocksize=64, quant_type="nf4", compress_statistics=True
            )
            tensors[name] = packed.numpy()
            for key, v in state.as_dict(packed=True).items():
                tensors[f"{name}.{key}"] = v.numpy()
            decoded[name] = bnb_f.dequantize_4bit(packed, state).numpy()
        else:
            tensors[name] = value
    quantized = tmp_path / "bnb"
    quantized.mkdir()
    save_file(str(quantized / "model.safetensors"), tensors)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = bnb_quantization_config(compute_dtype="float32")
    (quantized / "config.json").write_text(json.dumps(config))
    return str(quantized), decoded


@pytest.mark.parametrize("model_type", list(MOE))
def test_loads_a_bitsandbytes_4bit_moe_checkpoint(tmp_path, rng, model_type):
    """Pre-quantized MoE checkpoints on the hub (e.g. Unsloth's mixtral-8x7b-bnb-4bit and
    Qwen3-30B-A3B-bnb-4bit) were written by transformers 4, whose experts were Linear modules:
    every expert matrix (and the attention projections) stored as bitsandbytes 4-bit. lorax
    reads their bytes as they are, per expert, and computes what it computes after quantizing
    the float weights itself."""
    _, path = make_hf_model(tmp_path, model_type, **MOE[model_type])
    quantized, _ = _bnb_4bit_checkpoint(tmp_path, path, _PROJECTIONS)

    model = lorax.load(quantized, dtype="float32")
    ours = lorax.load(path, quantize="nf4", dtype="float32")
    for name in ("experts_gate_up_proj", "experts_down_proj", "q_proj"):
        stored, made = model.params["layers"][name]["weight"], ours.params["layers"][name]["weight"]
        assert isinstance(stored, lorax.NF4Tensor) and stored.batch_shape == made.batch_shape
        np.testing.assert_array_equal(stored.packed, made.packed)
        # bnb's CPU double-quant rounding is one step of the 8-bit absmax code off in ~0.2% of
        # blocks (see nf4.py): those blocks' weights differ by under 1%.
        assert rel_err(dequantize_nf4(stored), dequantize_nf4(made)) < 1e-2, name
    ids = jnp.asarray(rng.integers(0, model.config.vocab_size, size=(1, 16)))
    got, want = lorax.forward(model, None, ids), lorax.forward(ours, None, ids)
    # Per position: where those small weight differences meet a near-tie of two router logits,
    # the two models route a token differently, so the bound holds for the median position,
    # not every one (a bound on the whole output failed once in ~30 runs; a flip is the likely
    # cause: the stored bytes are asserted equal above).
    errors = np.max(np.abs(np.asarray(got - want)), axis=-1) / np.max(np.abs(np.asarray(want)))
    assert np.median(errors) < 2e-3, errors


def test_decodes_what_a_4bit_checkpoint_quantized_beyond_the_projections(tmp_path):
    """transformers 4 quantized every ``nn.Linear`` of a ``load_in_4bit`` model unless told
    otherwise: an MoE router and Qwen 2 MoE's shared-expert gate can be stored in 4-bit. lorax
    keeps those in 16 bits, so it decodes them: to bitsandbytes' own decoding."""
    _, path = make_hf_model(tmp_path, "qwen2_moe", **MOE["qwen2_moe"])
    gates = (".mlp.gate.weight", ".shared_expert_gate.weight")
    quantized, decoded = _bnb_4bit_checkpoint(tmp_path, path, _PROJECTIONS + gates)
    model = lorax.load(quantized, dtype="float32")
    layers = range(model.config.num_layers)
    for name, path_in_tree in (("gate", "router"), ("shared_expert_gate", SHARED_EXPERT_GATE)):
        got = model.params["layers"][path_in_tree]["weight"]
        assert not isinstance(got, lorax.NF4Tensor), name
        want = np.stack([decoded[f"model.layers.{i}.mlp.{name}.weight"] for i in layers])
        # bnb's CPU double-quant rounding: one absmax code step off in a few blocks (nf4.py).
        assert got.shape == want.shape and rel_err(got, want) < 1e-2, name


@pytest.mark.parametrize("lora_products", [None, "dense", "chunked"])
def test_moe_gradient_sums_in_a_fixed_order(rng, lora_products):
    """No scatter in the MoE layer's gradient adds two values into one place: a GPU runs such a
    scatter with atomic adds in no fixed order, so a step would not repeat bitwise (an H200
    ran Qwen 3 MoE's layer, k = 8, nondeterministically until the routing's gathers said
    which are permutations). Read from the gradient's program, where the CPU cannot show it."""
    from lorax.moe import moe_mlp

    e, d, f, k, r = 6, 32, 16, 3, 2
    layer = {
        "router": {"weight": jnp.asarray(rng.normal(size=(e, d)), jnp.float32)},
        "experts_gate_up_proj": {"weight": jnp.asarray(rng.normal(size=(e, 2 * f, d)))},
        "experts_down_proj": {"weight": jnp.asarray(rng.normal(size=(e, d, f)))},
    }
    adapters = {
        name: {"lora_a": jnp.ones((e, r, layer[name]["weight"].shape[2])),
               "lora_b": jnp.ones((e, layer[name]["weight"].shape[1], r))}
        for name in ("experts_gate_up_proj", "experts_down_proj")
    } if lora_products else {}  # fmt: skip

    def loss(adapters, x):
        out = moe_mlp(
            x, layer, adapters, num_experts=e, experts_per_token=k, activation=jax.nn.silu,
            lora_scale=1.0, lora_products=lora_products,
        )  # fmt: skip
        return jnp.sum(out**2)

    x = jnp.asarray(rng.normal(size=(40, d)), jnp.float32)
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(adapters, x)

    def equations(jaxpr):
        yield from jaxpr.eqns
        for sub in jax.extend.core.subjaxprs(jaxpr):
            yield from equations(sub)

    eqns = list(equations(jaxpr.jaxpr))
    assert any(e.primitive.name == "gather" for e in eqns), "no routing gather: nothing read"
    # Integer sums (the group sizes' count) are exact in any order.
    adding = [e for e in eqns if e.primitive.name.startswith("scatter")
              and e.primitive.name != "scatter"
              and jnp.issubdtype(e.outvars[0].aval.dtype, jnp.floating)]  # fmt: skip
    assert all(e.params["unique_indices"] for e in adding), [str(e)[:300] for e in adding]
