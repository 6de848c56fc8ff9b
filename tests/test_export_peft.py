"""PEFT adapter export/import: PEFT runs our adapters, we run PEFT's, bad adapters are named."""

from __future__ import annotations

import dataclasses
import json
import os
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model, random_lora, rel_err, rel_l2, torch_logits
from test_model_parity import CASES

import lorax
from convert import peft as peft_io
from convert.names import module_name
from convert.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError
from convert.safetensors_io import SafetensorsFile, save_file

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

forward = jax.jit(lorax.forward)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLP_NAMES = ALL[4:]


def _lorax_logits(model, lora, ids) -> np.ndarray:
    return np.asarray(forward(model, lora, jnp.asarray(ids)))


def _assert_same_lora(a: lorax.LoraWeights, b: lorax.LoraWeights) -> None:
    assert a.config == b.config
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)


PHI3 = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # its fused projections


def _make(tmp_path, case: str):
    """A tiny HF model for ``case``: a model type, or a case of test_model_parity."""
    model_type, overrides = CASES.get(case, (case, {}))
    return make_hf_model(tmp_path, model_type, **overrides)


@pytest.mark.parametrize(
    "case, kw",
    [
        ("llama", dict(rank=4, alpha=8, targets=ALL)),
        (
            "qwen2",
            dict(rank=3, alpha=5, targets=("q_proj", "v_proj", "down_proj"), use_rslora=True),
        ),
        ("qwen3-bias-window", dict(rank=4, alpha=8, targets=ALL)),
        ("gemma2", dict(rank=4, alpha=8, targets=ALL)),
        ("gemma3-two-ropes", dict(rank=2, alpha=3, targets=("k_proj", "o_proj", "up_proj"))),
        ("phi3-longrope-partial", dict(rank=4, alpha=8, targets=PHI3)),
        ("phi3-window", dict(rank=2, alpha=3, targets=("qkv_proj", "down_proj"))),
    ],
)
def test_peft_runs_our_adapter_like_lorax(tmp_path, rng, case, kw):
    _, path = _make(tmp_path, case)
    model = lorax.load(path, dtype="float32")
    lora = random_lora(model, rng, **kw)
    out = tmp_path / "adapter"
    lorax.save_adapter(model, lora, out)

    assert sorted(os.listdir(out)) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    assert peft_model.peft_config["default"].target_modules == set(lora.config.targets)
    ids = rng.integers(0, model.config.vocab_size, size=(2, 12))
    expected = _lorax_logits(model, lora, ids)
    assert rel_err(torch_logits(peft_model, ids), expected) < 1e-4
    with peft_model.disable_adapter():  # the adapter must matter, or the above proves nothing
        assert rel_err(torch_logits(peft_model, ids), expected) > 1e-2

    _assert_same_lora(lorax.load_adapter(model, out), lora)


def test_adapter_config_records_base_and_plain_lora(tmp_path, rng, base):
    lora = random_lora(
        base, rng, rank=2, alpha=3.5, targets=("q_proj", "k_proj", "v_proj", "o_proj")
    )
    lorax.save_adapter(base, lora, tmp_path / "a", base_model_name_or_path="org/base")
    with open(tmp_path / "a" / ADAPTER_CONFIG) as f:
        cfg = json.load(f)
    assert cfg["base_model_name_or_path"] == "org/base"
    assert (cfg["r"], cfg["lora_alpha"]) == (2, 3.5)
    assert (cfg["peft_type"], cfg["task_type"]) == ("LORA", "CAUSAL_LM")
    assert cfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    parsed = peft.LoraConfig.from_pretrained(str(tmp_path / "a"))
    assert (parsed.r, parsed.lora_alpha, parsed.use_dora, parsed.bias) == (2, 3.5, False, "none")


def _peft_saved_adapter(tmp_path, torch_model, rng, **lora_kw) -> str:
    """An adapter written by PEFT itself, with random B, as a PEFT or Unsloth run leaves it."""
    peft_model = peft.get_peft_model(torch_model, peft.LoraConfig(task_type="CAUSAL_LM", **lora_kw))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.from_numpy(rng.normal(size=tuple(p.shape)).astype(np.float32)))
    out = os.path.join(str(tmp_path), "peft-adapter")
    peft_model.save_pretrained(out)
    return out, peft_model.eval()


@pytest.mark.parametrize(
    "case", ["mistral", "qwen3-qk-norm", "gemma2", "gemma3-two-ropes", "phi3-window"]
)
def test_reads_adapter_written_by_peft(tmp_path, rng, case):
    torch_model, path = _make(tmp_path, case)
    targets = ("qkv_proj", "o_proj") if case.startswith("phi3") else ("k_proj", "o_proj", "up_proj")
    out, peft_model = _peft_saved_adapter(
        tmp_path, torch_model, rng, r=4, lora_alpha=16, use_rslora=True, lora_dropout=0.05,
        target_modules=list(targets),
    )  # fmt: skip
    model = lorax.load(path, dtype="float32")
    lora = lorax.load_adapter(model, out)
    assert lora.config == lorax.LoraConfig(4, 16.0, targets, dropout=0.05, use_rslora=True)
    ids = rng.integers(0, model.config.vocab_size, size=(2, 10))
    # Over all logits, not the worst one: a random model can have a position where float32's
    # rounding is amplified (seed 1809431739, phi3-window: one position at 1.9e-4 of the
    # largest logit, the others at 1e-5 or less; rel. L2 4.5e-5; so at cd8e139 too).
    assert rel_l2(_lorax_logits(model, lora, ids), torch_logits(peft_model, ids)) < 1e-4


def _rewrite(adapter_dir, edit_tensors=None, **config_changes) -> None:
    """Edits an adapter on disk: ``edit_tensors(dict)`` and/or top-level config fields."""
    if edit_tensors is not None:
        path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
        f = SafetensorsFile(path)
        tensors = {k: np.array(f[k]) for k in f}
        edit_tensors(tensors)
        save_file(path, tensors, {"format": "pt"})
    if config_changes:
        path = os.path.join(adapter_dir, ADAPTER_CONFIG)
        with open(path) as fh:
            cfg = json.load(fh)
        cfg.update(config_changes)
        with open(path, "w") as fh:
            json.dump(cfg, fh)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> lorax.Model:
    """One tiny llama shared by the tests below, which only read it."""
    _, path = make_hf_model(tmp_path_factory.mktemp("base"), "llama")
    return lorax.load(path, dtype="float32")


@pytest.fixture(scope="module")
def lora(base) -> lorax.LoraWeights:
    return random_lora(
        base, np.random.default_rng(0), rank=4, alpha=8, targets=("q_proj", "down_proj")
    )


@pytest.fixture
def adapter(tmp_path, base, lora) -> str:
    """A fresh copy of ``lora`` saved for ``base``, for a test to edit."""
    out = str(tmp_path / "adapter")
    lorax.save_adapter(base, lora, out)
    return out


def _other_base(base, **changes):
    """A stand-in model with another architecture: exporters read only config and tokenizer."""
    config = dataclasses.replace(base.config, layer_windows=(), **changes)
    return types.SimpleNamespace(config=config, tokenizer=None)


def _adapter_for(tmp_path, model) -> str:
    out = str(tmp_path / "other-adapter")
    other = random_lora(
        model, np.random.default_rng(1), rank=4, alpha=8, targets=("q_proj", "down_proj")
    )
    lorax.save_adapter(model, other, out)
    return out


def test_reads_keys_with_adapter_name_or_without_prefix(base, lora, adapter):
    def rename(tensors):
        for k in list(tensors):
            new = k.replace(".weight", ".default.weight").replace("base_model.model.", "")
            tensors[new] = tensors.pop(k)

    _rewrite(adapter, rename, target_modules="all-linear")
    _assert_same_lora(lorax.load_adapter(base, adapter), lora)


def test_reads_half_precision_adapters_into_float32(base, lora, adapter):
    _rewrite(adapter, lambda t: t.update({k: v.astype(np.float16) for k, v in t.items()}))
    loaded = lorax.load_adapter(base, adapter)
    for proj, ab in loaded.params["layers"].items():
        assert ab["lora_a"].dtype == jnp.float32
        np.testing.assert_array_equal(
            ab["lora_b"], lora.params["layers"][proj]["lora_b"].astype(jnp.float16)
        )


def test_adapter_for_another_base_is_named(tmp_path, base):
    out = _adapter_for(tmp_path, _other_base(base, intermediate_size=80))
    name = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    with pytest.raises(AdapterError, match=rf"{ADAPTER_WEIGHTS}.*{name}.*\[4, 80\].*\[4, 96\]"):
        lorax.load_adapter(base, out)


def test_adapter_with_more_layers_is_named(tmp_path, base):
    out = _adapter_for(tmp_path, _other_base(base, num_layers=3))
    with pytest.raises(AdapterError, match="layer 2 but the base model has 2 layers"):
        lorax.load_adapter(base, out)


def test_adapter_with_fewer_layers_is_named(tmp_path, base):
    out = _adapter_for(tmp_path, _other_base(base, num_layers=1))
    with pytest.raises(AdapterError, match=r"missing LoRA tensor.*layers\.1\.self_attn\.q_proj"):
        lorax.load_adapter(base, out)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
        (dict(alpha_pattern={"q_proj": 8}), "alpha_pattern"),
        (dict(layers_to_transform=[0]), "layers_to_transform"),
        (dict(use_dora=True), "DoRA"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(bias="lora_only"), "bias='lora_only'"),
        (dict(target_modules=["q_proj", "down_proj", "lm_head"]), r"\['lm_head'\]"),
        (dict(target_modules=["q_proj", "down_proj", "v_proj"]), "target_modules lists"),
        (dict(peft_type="IA3"), "peft_type='IA3'"),
        (dict(r=0), "r=0"),
        (dict(r=8), r"shape \[4, 64\].*\[8, 64\]"),
        (dict(init_lora_weights="pissa_niter_4"), "rewrites the base weights"),
        (dict(target_parameters=["lm_head.weight"]), r"target_parameters includes \['lm_head"),
        (dict(target_parameters=["mlp.experts.down_proj"]), "not a mixture-of-experts model"),
    ],
)
def test_unsupported_adapter_config_is_named(base, adapter, changes, message):
    _rewrite(adapter, **changes)
    with pytest.raises(AdapterError, match=message):
        lorax.load_adapter(base, adapter)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.update({"base_model.model.lm_head.lora_A.weight": np.ones((4, 64))}),
            "lm_head",
        ),
        (
            lambda t: t.update(
                {"base_model.model.model.layers.0.mlp.q_proj.lora_A.weight": np.ones((4, 64))}
            ),
            "unknown module",
        ),
        (
            lambda t: t.pop("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"),
            r"missing.*layers\.1\.mlp\.down_proj\.lora_B",
        ),
    ],
)
def test_unexpected_or_missing_adapter_tensor_is_named(base, adapter, edit, message):
    _rewrite(adapter, edit)
    with pytest.raises(AdapterError, match=message):
        lorax.load_adapter(base, adapter)


def test_missing_or_corrupt_files_are_named(base, adapter):
    weights = os.path.join(adapter, ADAPTER_WEIGHTS)
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 10)
    with pytest.raises(AdapterError, match=rf"{ADAPTER_WEIGHTS}: truncated"):
        lorax.load_adapter(base, adapter)

    os.replace(weights, os.path.join(adapter, "adapter_model.bin"))
    with pytest.raises(AdapterError, match="adapter_model.bin, a PyTorch pickle"):
        lorax.load_adapter(base, adapter)

    with open(os.path.join(adapter, ADAPTER_CONFIG), "w") as f:
        f.write("{not json")
    with pytest.raises(AdapterError, match=rf"{ADAPTER_CONFIG}: not valid JSON"):
        lorax.load_adapter(base, adapter)

    os.remove(os.path.join(adapter, ADAPTER_CONFIG))
    with pytest.raises(AdapterError, match="not a PEFT adapter directory"):
        lorax.load_adapter(base, adapter)


def test_save_refuses_to_overwrite_and_replaces_when_asked(base, lora, adapter):
    with pytest.raises(FileExistsError, match="allow_overwrite=True"):
        lorax.save_adapter(base, lora, adapter)
    other = random_lora(
        base,
        np.random.default_rng(2),
        rank=2,
        alpha=2,
        targets=("gate_proj", "up_proj", "down_proj"),
    )
    open(os.path.join(adapter, "stale.txt"), "w").close()
    lorax.save_adapter(base, other, adapter, allow_overwrite=True)
    assert sorted(os.listdir(adapter)) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    _assert_same_lora(lorax.load_adapter(base, adapter), other)


def test_failed_save_leaves_nothing_behind(tmp_path, base, lora, adapter, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(peft_io, "write_json", fail)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(OSError, match="disk full"):
        lorax.save_adapter(base, lora, tmp_path / "fresh")
    with pytest.raises(OSError, match="disk full"):
        lorax.save_adapter(base, lora, adapter, allow_overwrite=True)
    assert sorted(os.listdir(tmp_path)) == before  # no "fresh", no temp directories
    _assert_same_lora(lorax.load_adapter(base, adapter), lora)  # the old adapter is intact


def test_lora_for_another_model_is_refused_on_save(tmp_path, base, lora):
    small = _other_base(base, hidden_size=32)
    with pytest.raises(AdapterError, match=r"q_proj\.lora_a has shape \[2, 4, 64\]"):
        lorax.save_adapter(small, lora, tmp_path / "x")
    assert not os.path.exists(tmp_path / "x")


# ------------------------------------------ Mixture of experts: Mixtral, Qwen 3 MoE, Qwen 2 MoE
# PEFT adapts the experts' 3-D parameters through target_parameters: one lora_A [E·r, in] /
# lora_B [out, r·E] pair per layer and parameter, keyed by the (nested) wrapper module.

GATE_UP, DOWN = "mlp.experts.gate_up_proj", "mlp.experts.down_proj"
# Each MoE family's tiny model (test_model_parity's cases): transformers keeps every family's
# experts as the same 3-D parameters, so PEFT's keys are the same; the widths differ (Qwen's
# experts are narrower than intermediate_size). Qwen 2 MoE's gate/up/down_proj are its shared
# expert's (mlp.shared_expert.*), which PEFT's target_modules match by name.
MOE_CASES = ("mixtral", "qwen3-moe", "qwen2-moe")
# Qwen MoE with dense-MLP layers among the routed ones: two layer stacks. Qwen 3 MoE's
# gate/up/down_proj are the dense layers' alone (routed layers: layers 1, 3); Qwen 2 MoE's are
# the shared expert's in its routed layer (1) and the MLP's in its dense ones (0, 2, 3), of
# another width.
STACK_CASES = ("qwen3-moe-dense-layers", "qwen2-moe-sparse-step")


def _peft_lora_config(lora: lorax.LoraWeights):
    """PEFT's LoraConfig for ``lora``'s targets: modules by name, experts by parameter."""
    experts = {"experts_gate_up_proj": GATE_UP, "experts_down_proj": DOWN}
    return peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.config.rank,
        lora_alpha=lora.config.alpha,
        target_modules=[t for t in lora.config.targets if t not in experts],
        target_parameters=[experts[t] for t in lora.config.targets if t in experts],
    )


def _assert_peft_runs_it_like_lorax(base, out, model, lora, rng):
    """PEFT loads the adapter in ``out`` onto ``base`` with no missing or unexpected keys, and
    computes lorax's logits with it; lorax reads it back unchanged. Returns the PEFT model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys.*")
        peft_model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    again = peft_model.load_adapter(str(out), adapter_name="again")
    assert (again.missing_keys, again.unexpected_keys) == ([], [])
    peft_model.set_adapter("default")
    ids = rng.integers(0, model.config.vocab_size, size=(2, 12))
    expected = _lorax_logits(model, lora, ids)
    error = rel_l2(torch_logits(peft_model, ids), expected)
    print(f"PEFT vs lorax logits, rel_l2: {error:.2e}")
    assert error < 1e-5
    with peft_model.disable_adapter():  # the adapter must matter, or the above proves nothing
        assert rel_l2(torch_logits(peft_model, ids), expected) > 1e-2
    _assert_same_lora(lorax.load_adapter(model, out), lora)
    return peft_model


ATTENTION_AND_EXPERTS = (*ALL[:4], "experts_gate_up_proj", "experts_down_proj")
MOE_TARGETS = ("all-linear", ("v_proj", "o_proj", "experts_down_proj"), ("experts_gate_up_proj",))


@pytest.mark.parametrize(
    "case, targets",
    [
        *[(case, targets) for case in MOE_CASES for targets in MOE_TARGETS],
        # Every projection PEFT can adapt: Qwen 2 MoE's gate/up/down in both stacks (another
        # module and width in each); Qwen 3 MoE's attention in both and experts in the routed
        # layers (its dense layers' MLP: test_qwen3_moe_dense_mlp_lora_is_refused_for_peft).
        # Then the routed layers alone, the dense ones unadapted.
        ("qwen3-moe-dense-layers", ATTENTION_AND_EXPERTS),
        ("qwen2-moe-sparse-step", "all-linear"),
        ("qwen2-moe-sparse-step", ("experts_gate_up_proj",)),
    ],
)
def test_peft_runs_our_moe_adapter_like_lorax(tmp_path, rng, case, targets):
    torch_model, path = _make(tmp_path, case)
    model = lorax.load(path, dtype="float32")
    targets = model.config.projections() if targets == "all-linear" else targets
    lora = random_lora(model, rng, rank=4, alpha=8, targets=targets)
    out = tmp_path / "adapter"
    lorax.save_adapter(model, lora, out)

    # The very keys PEFT writes for the same LoraConfig (which expert LoRA is base_layer-
    # nested depends on which parameters are targeted).
    theirs = peft.get_peft_model(torch_model, _peft_lora_config(lora))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    assert sorted(SafetensorsFile(str(out / ADAPTER_WEIGHTS))) == sorted(
        SafetensorsFile(str(tmp_path / "theirs" / ADAPTER_WEIGHTS))
    )

    base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    _assert_peft_runs_it_like_lorax(base, out, model, lora, rng)


@pytest.mark.parametrize("case", MOE_CASES + STACK_CASES)
def test_reads_moe_adapter_written_by_peft(tmp_path, rng, case):
    torch_model, path = _make(tmp_path, case)
    # up_proj: Qwen 2 MoE's shared expert's, in its dense-MLP layers the MLP's. (PEFT reads
    # Qwen 3 MoE's as the experts', test_qwen3_moe_dense_mlp_lora_is_refused_for_peft.)
    modules = ["q_proj", "o_proj"] + (["up_proj"] if case.startswith("qwen2-moe") else [])
    out, peft_model = _peft_saved_adapter(
        tmp_path, torch_model, rng, r=4, lora_alpha=16, use_rslora=True,
        target_modules=modules, target_parameters=[DOWN, GATE_UP],
    )  # fmt: skip
    model = lorax.load(path, dtype="float32")
    lora = lorax.load_adapter(model, out)
    targets = (*modules, "experts_gate_up_proj", "experts_down_proj")
    assert lora.config == lorax.LoraConfig(4, 16.0, targets, use_rslora=True)
    ids = rng.integers(0, model.config.vocab_size, size=(2, 10))
    expected = torch_logits(peft_model, ids)
    error = rel_l2(_lorax_logits(model, lora, ids), expected)
    print(f"lorax vs PEFT logits, rel_l2: {error:.2e}")
    assert error < 1e-5
    assert rel_l2(_lorax_logits(model, None, ids), expected) > 1e-2


@pytest.fixture(scope="module", params=MOE_CASES)
def moe(request, tmp_path_factory) -> lorax.Model:
    """One tiny MoE model (4 experts) per family, shared by the tests below, which only read
    it."""
    _, path = _make(tmp_path_factory.mktemp(request.param), request.param)
    return lorax.load(path, dtype="float32")


@pytest.fixture
def moe_adapter(tmp_path, moe) -> str:
    shared = ("down_proj",) if moe.config.shared_expert else ()  # mlp.shared_expert.down_proj
    lora = random_lora(
        moe, np.random.default_rng(3), rank=4, alpha=8,
        targets=("q_proj", *shared, "experts_gate_up_proj", "experts_down_proj"),
    )  # fmt: skip
    out = str(tmp_path / "adapter")
    lorax.save_adapter(moe, lora, out)
    return out, lora


def test_reads_moe_keys_with_adapter_name_or_without_prefix(moe, moe_adapter):
    adapter, lora = moe_adapter

    def rename(tensors):
        for k in list(tensors):
            new = k.replace(".weight", ".default.weight").replace("base_model.model.", "")
            tensors[new] = tensors.pop(k)

    _rewrite(adapter, rename, target_parameters=["gate_up_proj", "down_proj"])
    _assert_same_lora(lorax.load_adapter(moe, adapter), lora)


def test_moe_adapter_for_other_expert_count_is_named(tmp_path, moe):
    other = _other_base(moe, num_experts=5)
    out = str(tmp_path / "five")
    lorax.save_adapter(
        other, random_lora(other, np.random.default_rng(4), 4, 8, ("experts_down_proj",)), out
    )
    name = "base_model.model.model.layers.0.mlp.experts.lora_A.weight"
    width = moe.config.expert_width  # down_proj's input
    with pytest.raises(
        AdapterError,
        match=rf"{ADAPTER_WEIGHTS}.*{name}.*\[20, {width}\].*experts·r = 4·4.*\[16, {width}\]",
    ):
        lorax.load_adapter(moe, out)


_NESTED_A = "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(target_parameters=[GATE_UP]), r"nested 1 wrapper\(s\) deep.*gate_up_proj"),
        (dict(target_parameters=None), "lists no target_parameters"),
        (dict(target_parameters=[GATE_UP, DOWN, "mlp.gate.weight"]), r"\['mlp.gate.weight'\]"),
        (dict(lora_dropout=0.1), "lora_dropout=0.1 with target_parameters"),
        (dict(target_modules=["q_proj", "gate_proj"]), "target_modules lists"),
    ],
)
def test_unsupported_moe_adapter_config_is_named(moe, moe_adapter, changes, message):
    adapter, _ = moe_adapter
    _rewrite(adapter, **changes)
    with pytest.raises(AdapterError, match=message):
        lorax.load_adapter(moe, adapter)


def test_moe_adapter_missing_an_expert_parameter_is_named(moe, moe_adapter):
    adapter, _ = moe_adapter
    _rewrite(adapter, lambda t: [t.pop(k) for k in list(t) if ".base_layer." in k])
    with pytest.raises(AdapterError, match=r"target_parameters lists .*gate_up_proj.* file has"):
        lorax.load_adapter(moe, adapter)


def test_llama_names_on_moe_are_refused(tmp_path, moe):
    """A dense model's MLP LoRA (``mlp.up_proj``) on an MoE: Mixtral and Qwen 3 MoE have no
    up_proj; Qwen 2 MoE's is its shared expert's, another module (PEFT would find none)."""
    other = _other_base(
        moe, model_type="llama", num_experts=0, experts_per_token=0,
        shared_expert_intermediate_size=None,
    )  # fmt: skip
    out = str(tmp_path / "dense")
    lorax.save_adapter(other, random_lora(other, np.random.default_rng(5), 4, 8, ("up_proj",)), out)
    message = rf"\['up_proj'\], which {moe.config.model_type} does not have"
    if moe.config.shared_expert:
        message = r"layers\.0\.mlp\.up_proj\.lora_A\.weight' names an unknown module"
    with pytest.raises(AdapterError, match=message):
        lorax.load_adapter(moe, out)


def test_qwen2_moe_adapter_of_the_shared_experts_gate_is_refused(tmp_path, rng):
    """PEFT's "all-linear" adapts every Linear of Qwen2MoeForCausalLM but the head: the
    projections, and the shared expert's gate, a Linear of one output that lorax keeps frozen
    (as the router, which transformers 5 keeps as a parameter, not a Linear)."""
    torch_model, path = _make(tmp_path, "qwen2-moe")
    out, peft_model = _peft_saved_adapter(
        tmp_path, torch_model, rng, r=2, target_modules="all-linear"
    )
    assert any("shared_expert_gate.lora_A" in n for n, _ in peft_model.named_parameters())
    model = lorax.load(path, dtype="float32")
    with pytest.raises(AdapterError, match=r"includes \['shared_expert_gate'\].*keeps frozen"):
        lorax.load_adapter(model, out)  # PEFT saves the names "all-linear" matched
    _rewrite(out, target_modules=r".*\.(q_proj|shared_expert_gate)")  # as a regex: the tensors
    with pytest.raises(AdapterError, match=r"mlp\.shared_expert_gate\.lora_A.*keeps frozen"):
        lorax.load_adapter(model, out)


def test_save_refuses_dropout_on_moe_experts(tmp_path, moe):
    lora = random_lora(moe, np.random.default_rng(6), 4, 8, ("experts_down_proj",))
    lora = lorax.LoraWeights(lora.params, dataclasses.replace(lora.config, dropout=0.1))
    with pytest.raises(AdapterError, match="PEFT applies no dropout to target_parameters"):
        lorax.save_adapter(moe, lora, tmp_path / "x")
    assert not os.path.exists(tmp_path / "x")


# ------------------------------------------------ Layer stacks: dense-MLP layers of a Qwen MoE


@pytest.fixture(scope="module")
def stacked(tmp_path_factory):
    """The tiny model of a case of STACK_CASES, loaded once for the tests below, which only
    read it."""
    models = {}

    def get(case: str) -> lorax.Model:
        if case not in models:
            _, path = _make(tmp_path_factory.mktemp(case), case)
            models[case] = lorax.load(path, dtype="float32")
        return models[case]

    return get


def _layer_key(i: int, module: str, which: str = "A") -> str:
    return f"base_model.model.model.layers.{i}.{module}.lora_{which}.weight"


def _write_adapter(model, lora, out: str) -> None:
    """``lora`` in PEFT's format as ``save_adapter`` writes it, without its refusal of what
    PEFT would misread (Qwen 3 MoE's dense-MLP targets), which lorax reads as written."""
    os.makedirs(out)
    tensors = peft_io.adapter_tensors(model.config, lora.params)
    save_file(os.path.join(out, ADAPTER_WEIGHTS), tensors, {"format": "pt"})
    with open(os.path.join(out, ADAPTER_CONFIG), "w") as f:
        json.dump(peft_io.adapter_config_dict(lora.config, None), f)


@pytest.mark.parametrize(
    "case, targets, edit, message",
    [
        # Qwen 3 MoE: layers 0 and 2 dense, 1 and 3 routed.
        (
            "qwen3-moe-dense-layers",
            ("up_proj", "experts_down_proj"),
            lambda t: t.update({_layer_key(1, "mlp.up_proj"): t[_layer_key(0, "mlp.up_proj")]}),
            r"layers\.1\.mlp\.up_proj\.lora_A\.weight' adapts up_proj in layer 1, one of "
            r"'layers' \(routed layers \[1, 3\] of qwen3_moe\), which have no up_proj",
        ),
        (
            "qwen3-moe-dense-layers",
            ("up_proj", "experts_down_proj"),
            lambda t: t.update({_layer_key(2, "mlp.experts"): t[_layer_key(1, "mlp.experts")]}),
            r"layers\.2\.mlp\.experts\.lora_A\.weight' adapts experts_down_proj in layer 2, "
            r"one of 'dense_layers' \(dense-MLP layers \[0, 2\]",
        ),
        (
            "qwen3-moe-dense-layers",
            ("up_proj", "experts_down_proj"),
            lambda t: t.pop(_layer_key(2, "mlp.up_proj", "B")),
            r"missing LoRA tensor\(s\) \S*layers\.2\.mlp\.up_proj\.lora_B\.weight; .* every "
            "layer that has it",
        ),
        # Qwen 2 MoE: layer 1 routed (up_proj: its shared expert's, 80 wide), 0, 2, 3 dense
        # (up_proj: the MLP's, 96 wide).
        (
            "qwen2-moe-sparse-step",
            ("up_proj",),
            lambda t: t.update(
                {_layer_key(0, "mlp.shared_expert.up_proj"): t.pop(_layer_key(0, "mlp.up_proj"))}
            ),
            r"layers\.0\.mlp\.shared_expert\.up_proj\.lora_A\.weight' adapts up_proj where "
            r"'layers' \(routed layers \[1\] of qwen2_moe\) keep it, but layer 0 is one of "
            r"'dense_layers' \(dense-MLP layers \[0, 2, 3\] of qwen2_moe\), which keep it at "
            r"mlp\.up_proj",
        ),
        (
            "qwen2-moe-sparse-step",
            ("up_proj",),
            lambda t: t.update(
                {_layer_key(1, "mlp.up_proj"): t.pop(_layer_key(1, "mlp.shared_expert.up_proj"))}
            ),
            r"layers\.1\.mlp\.up_proj\.lora_A\.weight' adapts up_proj where 'dense_layers'.*"
            r"layer 1 is one of 'layers'.*keep it at mlp\.shared_expert\.up_proj",
        ),
        (
            "qwen2-moe-sparse-step",
            ("up_proj",),
            lambda t: t.update(
                {
                    _layer_key(3, "mlp.up_proj", "B"): t[
                        _layer_key(1, "mlp.shared_expert.up_proj", "B")
                    ]
                }
            ),
            r"layers\.3\.mlp\.up_proj\.lora_B\.weight' has shape \[80, 4\], but the base "
            r"model's up_proj needs lora_B \[out, r=4\] = \[96, 4\]",
        ),
    ],
)
def test_stacked_adapter_in_the_wrong_layers_is_named(
    tmp_path, stacked, case, targets, edit, message
):
    """Each layer's LoRA must be where its stack's layers keep the projection, with their
    shapes, and in every layer that has it."""
    model = stacked(case)
    out = str(tmp_path / "adapter")
    lora = random_lora(model, np.random.default_rng(7), 4, 8, targets)
    _write_adapter(model, lora, out)
    _assert_same_lora(lorax.load_adapter(model, out), lora)  # as written: read back
    _rewrite(out, edit)
    with pytest.raises(AdapterError, match=message):
        lorax.load_adapter(model, out)


@pytest.mark.parametrize("case", STACK_CASES)
def test_stacked_adapter_reads_back_as_init_lora_lays_it_out(tmp_path, stacked, case):
    """Every stack's entries, in each stack's layer order, under init_lora's keys (a stack
    without a target keeps an empty entry), so a loaded adapter trains like a fresh one."""
    model = stacked(case)
    every = model.config.projections() if case.startswith("qwen2") else ATTENTION_AND_EXPERTS
    for targets in (every, ("q_proj", "experts_gate_up_proj")):
        lora = random_lora(model, np.random.default_rng(8), 2, 4, targets)
        fresh = lorax.init_lora(model, 2, 4, targets)
        assert jax.tree.structure(lora) == jax.tree.structure(fresh)
        assert jax.tree.map(np.shape, lora.params) == jax.tree.map(np.shape, fresh.params)
        out = tmp_path / "-".join(targets)
        lorax.save_adapter(model, lora, out)
        _assert_same_lora(lorax.load_adapter(model, out), lora)
        # Each PEFT key holds its own model layer's matrices (stack j-th entry = layer i).
        f = SafetensorsFile(str(out / ADAPTER_WEIGHTS))
        for stack in model.config.layer_stacks():
            for j, i in enumerate(stack.layers):
                key = _layer_key(i, "self_attn.q_proj")
                np.testing.assert_array_equal(f[key], lora.params[stack.key]["q_proj"]["lora_a"][j])


@pytest.mark.parametrize(
    "change, message",
    [
        # Qwen 3 MoE's gate_proj is its dense layers' alone.
        (
            lambda p: p["layers"].update(gate_proj=p["dense_layers"]["gate_proj"]),
            r"entry for 'gate_proj' under 'layers' \(routed layers \[1, 3\] of qwen3_moe\), "
            r"which have no gate_proj; it belongs under 'dense_layers' \(dense-MLP layers",
        ),
        (
            lambda p: p["dense_layers"].update(experts_down_proj=p["layers"]["experts_down_proj"]),
            r"'experts_down_proj' under 'dense_layers'.*it belongs under 'layers'",
        ),
        (lambda p: p.update(mlp_layers=p.pop("dense_layers")), r"under \['mlp_layers'\]"),
        (  # the dense layers' q_proj LoRA of one layer, not two
            lambda p: p["dense_layers"].update(
                q_proj=jax.tree.map(lambda x: x[:1], p["dense_layers"]["q_proj"])
            ),
            r"LoRA dense_layers\.q_proj\.lora_a has shape \[1, 4, 64\]; the model needs "
            r"\[layers, \.\.\.\] = \[2, 4, 64\]",
        ),
        (
            lambda p: p["dense_layers"].pop("q_proj"),
            r"LoRA targets \['q_proj', 'gate_proj', 'experts_down_proj'\] but has entries under "
            r"'dense_layers' .* for \['gate_proj'\]; missing \['q_proj'\]",
        ),
    ],
)
def test_stacked_lora_that_does_not_fit_its_stacks_is_refused_on_save(
    tmp_path, stacked, change, message
):
    model = stacked("qwen3-moe-dense-layers")
    lora = random_lora(
        model, np.random.default_rng(9), 4, 8, ("q_proj", "gate_proj", "experts_down_proj")
    )
    params = {key: dict(entries) for key, entries in lora.params.items()}
    change(params)
    with pytest.raises(AdapterError, match=message):
        lorax.save_adapter(model, lorax.LoraWeights(params, lora.config), tmp_path / "x")
    assert not os.path.exists(tmp_path / "x")


def test_qwen3_moe_dense_mlp_lora_is_refused_for_peft(tmp_path, rng, stacked):
    """PEFT on transformers >= 5 reads target_modules gate/up/down_proj of a Qwen 3 MoE as the
    experts' (transformers 4's expert names), so it cannot adapt the dense-MLP layers' and
    would silently apply none of an adapter's: lorax refuses to write one (and reads one)."""
    model = stacked("qwen3-moe-dense-layers")
    lora = random_lora(model, rng, 4, 8, ("q_proj", "up_proj", "experts_down_proj"))
    with pytest.raises(
        AdapterError,
        match=r"LoRA on \['up_proj'\] of qwen3_moe's dense-MLP layers \[0, 2\] cannot be saved "
        r"as a PEFT adapter: .* as the experts'.*save_merged",
    ):
        lorax.save_adapter(model, lora, tmp_path / "x")
    assert not os.path.exists(tmp_path / "x")
    # What PEFT does with these names (when it stops, lorax can write them).
    torch_model, _ = _make(tmp_path, "qwen3-moe-dense-layers")
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj", *MLP_NAMES])
    peft_model = peft.get_peft_model(torch_model, config)
    wrapped = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert not any(n.endswith(MLP_NAMES) for n in wrapped), wrapped
    assert set(peft_model.peft_config["default"].target_parameters) == {"gate_up_proj", "down_proj"}
    # lorax reads dense-MLP LoRA where the keys put it (an adapter PEFT did not write).
    out = str(tmp_path / "adapter")
    _write_adapter(model, lora, out)
    _assert_same_lora(lorax.load_adapter(model, out), lora)


def test_dense_layers_lora_on_a_uniform_model_is_refused_on_save(tmp_path, base, lora):
    params = {**lora.params, "dense_layers": lora.params["layers"]}
    with pytest.raises(AdapterError, match=r"under \['dense_layers'\], which llama has no layer"):
        lorax.save_adapter(base, lorax.LoraWeights(params, lora.config), tmp_path / "x")


# ----------------------------------------------------------------- Gemma 3 image-text
# PEFT names the language model's modules model.language_model.layers.{i}...; a bare
# "q_proj" in target_modules also matches the SigLIP vision tower's attention.

GEMMA3_MM = "gemma3-image-text"


def _language_model_modules(model: lorax.Model, targets) -> set[str]:
    """The modules of Gemma3ForConditionalGeneration a language-model LoRA on ``targets``
    wraps, as PeftModel names them."""
    return {
        f"base_model.model.model.language_model.layers.{i}.{module_name(p)}"
        for i in range(model.config.num_layers)
        for p in targets
    }


@pytest.mark.parametrize(
    "kw",
    [dict(rank=4, alpha=8, targets=ALL), dict(rank=2, alpha=3, targets=("q_proj", "down_proj"))],
)
def test_peft_runs_our_gemma3_image_text_adapter_like_lorax(tmp_path, rng, kw):
    _, path = _make(tmp_path, GEMMA3_MM)
    model = lorax.load(path, dtype="float32")
    lora = random_lora(model, rng, **kw)
    out = tmp_path / "adapter"
    lorax.save_adapter(model, lora, out)

    base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    assert type(base).__name__ == "Gemma3ForConditionalGeneration"
    peft_model = _assert_peft_runs_it_like_lorax(base, out, model, lora, rng)
    wrapped = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == _language_model_modules(model, lora.config.targets)  # no vision tower


def _respell_legacy(tensors):
    """PEFT keys as adapters trained on transformers < 4.52 name them."""
    for k in list(tensors):
        new = k.replace(
            "base_model.model.model.language_model.", "base_model.model.language_model.model."
        )
        tensors[new] = tensors.pop(k)


@pytest.mark.parametrize("spelling", ["modules", "legacy"])
def test_reads_gemma3_image_text_adapter_written_by_peft(tmp_path, rng, spelling):
    """PEFT's own adapter, restricted to the language model by a regex, as Unsloth and PEFT
    users write it; keys of either spelling PEFT reads."""
    torch_model, path = _make(tmp_path, GEMMA3_MM)
    out, peft_model = _peft_saved_adapter(
        tmp_path, torch_model, rng, r=4, lora_alpha=16, use_rslora=True,
        target_modules=r".*language_model.*\.(k_proj|o_proj|up_proj)",
    )  # fmt: skip
    if spelling == "legacy":
        _rewrite(out, _respell_legacy)
        base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
        again = peft.PeftModel.from_pretrained(base, out).eval()  # PEFT reads it too
        ids = rng.integers(0, torch_model.config.text_config.vocab_size, size=(1, 8))
        assert np.array_equal(torch_logits(again, ids), torch_logits(peft_model, ids))
    model = lorax.load(path, dtype="float32")
    lora = lorax.load_adapter(model, out)
    assert lora.config == lorax.LoraConfig(
        4, 16.0, ("k_proj", "o_proj", "up_proj"), use_rslora=True
    )
    ids = rng.integers(0, model.config.vocab_size, size=(2, 10))
    expected = torch_logits(peft_model, ids)
    error = rel_l2(_lorax_logits(model, lora, ids), expected)
    print(f"lorax vs PEFT logits, rel_l2: {error:.2e}")
    assert error < 1e-5
    assert rel_l2(_lorax_logits(model, None, ids), expected) > 1e-2


def test_gemma3_adapter_of_the_vision_tower_is_refused_by_name(tmp_path, rng):
    """A bare target_modules list adapts SigLIP's q_proj too: lorax has no vision tower to
    apply that to, so it refuses the adapter rather than drop part of it."""
    torch_model, path = _make(tmp_path, GEMMA3_MM)
    out, _ = _peft_saved_adapter(tmp_path, torch_model, rng, r=2, target_modules=["q_proj"])
    model = lorax.load(path, dtype="float32")
    with pytest.raises(
        AdapterError,
        match=r"tensor 'base_model\.model\.model\.vision_tower\.encoder\.layers\.0\.self_attn\."
        r"q_proj\.lora_A\.weight' adapts a module under 'model\.vision_tower\.'",
    ):
        lorax.load_adapter(model, out)


def test_adapter_of_the_other_layout_is_refused(tmp_path, rng):
    """Keys name where the base keeps its decoder: a Gemma3ForCausalLM adapter does not fit
    the image-text model (PEFT would find none of its modules), nor the other way round."""
    _, text_path = _make(tmp_path / "text", "gemma3-two-ropes")
    _, mm_path = _make(tmp_path / "mm", GEMMA3_MM)
    text, mm = lorax.load(text_path, dtype="float32"), lorax.load(mm_path, dtype="float32")
    for source, target, decoders in (
        (text, mm, r"\['language_model\.model\.', 'model\.language_model\.'\]"),
        (mm, text, r"\['model\.'\]"),
    ):
        out = str(tmp_path / f"from-{source.config.checkpoint_layout}")
        lorax.save_adapter(source, random_lora(source, rng, 2, 2, ("v_proj",)), out)
        with pytest.raises(AdapterError, match=rf"unknown module; .* under {decoders}"):
            lorax.load_adapter(target, out)


def test_same_lora_matrix_under_two_spellings_is_refused(tmp_path, rng):
    _, path = _make(tmp_path, GEMMA3_MM)
    model = lorax.load(path, dtype="float32")
    out = str(tmp_path / "adapter")
    lorax.save_adapter(model, random_lora(model, rng, 2, 2, ("v_proj",)), out)

    def duplicate(tensors):
        name = "base_model.model.model.language_model.layers.0.self_attn.v_proj.lora_A.weight"
        legacy = name.replace("model.model.language_model.", "model.language_model.model.")
        tensors[legacy] = tensors[name]

    _rewrite(out, duplicate)
    with pytest.raises(AdapterError, match="same LoRA matrix under two names"):
        lorax.load_adapter(model, out)
