"""``lorax export``: a trained adapter out as GGUF, a merged HF model and a PEFT adapter."""

from __future__ import annotations

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

import lorax
from lorax import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}


def _lorax(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorax.cli", *args], env=ENV, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    done = _lorax(
        "train",
        "--model",
        "tiny",
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "64",
        "--learning-rate",
        "1e-2",
        "--no-progress",
        "--max-new-tokens",
        "0",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out / "adapter"


def test_export_merged_peft_and_gguf(trained, tmp_path):
    model = demo.tiny_model()
    lora = lorax.load_adapter(model, trained)
    assert np.any(np.asarray(lora.params["layers"]["q_proj"]["lora_b"]))  # it trained
    ids = jnp.arange(3, 40)[None]
    expected = lorax.forward(model, lora, ids)

    merged = tmp_path / "merged"
    done = _lorax("export", "--adapter", str(trained), "--merged", "float32", str(merged))
    assert done.returncode == 0, done.stderr[-2000:]
    assert rel_err(lorax.forward(lorax.load(merged, dtype="float32"), None, ids), expected) < 1e-5

    peft_dir = tmp_path / "peft"
    done = _lorax("export", "--adapter", str(trained), "--peft", str(peft_dir))
    assert done.returncode == 0, done.stderr[-2000:]
    again = lorax.load_adapter(model, peft_dir)
    np.testing.assert_array_equal(
        again.params["layers"]["v_proj"]["lora_a"], lora.params["layers"]["v_proj"]["lora_a"]
    )

    gguf = tmp_path / "model.gguf"
    done = _lorax("export", "--adapter", str(trained), "--gguf", "f32", str(gguf))
    assert done.returncode == 0, done.stderr[-2000:]
    from_gguf = lorax.load(str(gguf), dtype="float32")
    assert rel_err(lorax.forward(from_gguf, None, ids), expected) < 1e-5


def test_export_refuses_bad_input_clearly(trained, tmp_path):
    done = _lorax(
        "export", "--adapter", str(tmp_path / "nope"), "--gguf", "f16", str(tmp_path / "x.gguf")
    )
    assert done.returncode != 0 and "nope" in done.stderr
    assert not (tmp_path / "x.gguf").exists()
    done = _lorax("export", "--adapter", str(trained), "--gguf", "q3_k", str(tmp_path / "y.gguf"))
    assert done.returncode != 0 and "q3_k" in done.stderr
    assert not (tmp_path / "y.gguf").exists()


# Mixtral (GGUF's llama) and Qwen 2 MoE (a shared expert, GGUF's qwen2moe). Qwen 3 MoE takes the
# same command-line path (a case costs CI 36 s); its exports are tested in test_export_* and
# test_gguf.
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_cli_trains_and_exports_an_moe(tmp_path, family):
    """The whole command-line path on a mixture of experts: ``lorax train`` on a Mixtral or
    Qwen 2 MoE directory (loaded onto the CLI's mesh), LoRA on its experts (and
    Qwen 2 MoE's shared expert), then a merged export that computes the adapted model and a
    GGUF that reads back as the same family (Qwen 2 MoE's with its shared expert)."""
    import json

    import transformers

    tokenizer = demo.demo_tokenizer()
    common = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
        max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    if family == "mixtral":
        config = transformers.MixtralConfig(num_local_experts=4, **common)
    else:
        config = transformers.Qwen2MoeConfig(
            num_experts=4, moe_intermediate_size=48, shared_expert_intermediate_size=80, **common
        )
    base = tmp_path / family
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    out = tmp_path / "run"
    done = _lorax(
        "train", "--model", str(base), "--output-dir", str(out), "--max-steps", "2",
        "--batch-size", "2", "--seq-len", "64", "--learning-rate", "1e-2", "--no-progress",
        "--max-new-tokens", "0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    adapter = out / "adapter"
    settings = json.loads((adapter / "adapter_config.json").read_text())
    assert settings["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

    model = lorax.load(str(base), dtype="float32")
    lora = lorax.load_adapter(model, adapter)
    assert np.any(np.asarray(lora.params["layers"]["experts_down_proj"]["lora_b"]))  # trained
    if family == "qwen2_moe":  # the shared expert's projections, by their Llama names
        assert np.any(np.asarray(lora.params["layers"]["down_proj"]["lora_b"]))
    ids = jnp.arange(3, 40)[None]
    merged = tmp_path / "merged"
    done = _lorax("export", "--adapter", str(adapter), "--merged", "float32", str(merged))
    assert done.returncode == 0, done.stderr[-2000:]
    expected = lorax.forward(model, lora, ids)
    assert rel_err(lorax.forward(lorax.load(merged, dtype="float32"), None, ids), expected) < 1e-5

    gguf = tmp_path / "model.gguf"
    done = _lorax("export", "--adapter", str(adapter), "--gguf", "q8_0", str(gguf))
    assert done.returncode == 0, done.stderr[-2000:]
    back = lorax.load(str(gguf), dtype="float32").config
    assert (back.model_type, back.num_experts) == (family, 4)
    assert back.shared_expert_intermediate_size == (80 if family == "qwen2_moe" else None)


def test_train_presets_leave_out_what_peft_would_misread():
    """``lorax train`` saves a PEFT adapter, and PEFT reads DeepSeek's dense layers' and
    shared experts' gate/up/down_proj as the experts': the presets leave them out (the run
    says so), named targets are taken as given (and refused before training), and a model
    PEFT reads whole keeps every projection."""
    from lorax.cli import _targets
    from lorax.config import ModelConfig

    deepseek = ModelConfig.from_hf_dict(
        dict(model_type="deepseek_v3", vocab_size=64, hidden_size=64, intermediate_size=96,
             num_hidden_layers=2, num_attention_heads=4, n_routed_experts=4,
             num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
             n_group=1, topk_group=1)
    )  # fmt: skip
    mlp = ["gate_proj", "up_proj", "down_proj"]
    targets, left_out = _targets("all-linear", deepseek)
    assert left_out == mlp and not set(mlp) & set(targets)
    assert {"kv_b_proj", "experts_gate_up_proj", "experts_down_proj"} <= set(targets)
    assert _targets("mlp", deepseek) == (["experts_gate_up_proj", "experts_down_proj"], mlp)
    assert _targets("q_a_proj, gate_proj", deepseek) == (["q_a_proj", "gate_proj"], [])
    llama = ModelConfig.from_hf_dict(
        dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=96,
             num_hidden_layers=2, num_attention_heads=4)
    )  # fmt: skip
    assert _targets("all-linear", llama) == (list(llama.projections()), [])
