"""Config reading and checkpoint loading, including every bad input we promise to name."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model

import lorax
from convert.hf import CheckpointError
from convert.safetensors_io import SafetensorsFile, save_file


def _edit_config(path, **changes):
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


def _rewrite_weights(path, edit):
    f = SafetensorsFile(os.path.join(path, "model.safetensors"))
    tensors = {k: np.array(f[k]) for k in f}
    edit(tensors)
    save_file(os.path.join(path, "model.safetensors"), tensors, {"format": "pt"})


def test_config_is_hashable_and_frozen(tmp_path):
    _, path = make_hf_model(tmp_path, "mistral", sliding_window=8)
    cfg = lorax.load(path, dtype="float32").config
    again = lorax.ModelConfig.from_json_file(os.path.join(path, "config.json"))
    assert cfg == again and hash(cfg) == hash(again)
    assert cfg.layer_windows == (8, 8)
    with pytest.raises(AttributeError):
        cfg.hidden_size = 3


def test_legacy_rope_scaling_field_is_read():
    cfg = lorax.ModelConfig.from_hf_dict(
        dict(
            model_type="llama",
            vocab_size=10,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            rope_theta=5e5,
            rope_scaling={"type": "linear", "factor": 4.0},
        )
    )
    assert cfg.rope == lorax.RopeConfig(theta=5e5, type="linear", factor=4.0)


# Hub ``config.json``s as transformers 4 wrote them (gemma-2-2b, gemma-3-4b's text model,
# Phi-3.5-mini, Phi-4-mini and Qwen3-0.6B, shrunk): no ``layer_types``, Gemma 3's RoPE as
# ``rope_theta`` + ``rope_scaling`` + ``rope_local_base_freq``, and the fields their config
# classes default left out.
HUB_STYLE_CONFIGS = {
    "gemma2": dict(
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=256,
        sliding_window=4096,
        rope_theta=10000.0,
    ),
    "gemma3_text": dict(
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        query_pre_attn_scalar=256,
        rope_local_base_freq=10000,
        rope_scaling={"factor": 8.0, "rope_type": "linear"},
        rope_theta=1000000,
        sliding_window=512,
        sliding_window_pattern=6,
    ),
    # Phi-3.5-mini: longrope under its older spelling, the pre-training length at the top.
    "phi3": dict(
        attention_bias=False,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0, 1.05, 1.2, 1.7],
            "long_factor": [1.0, 2.5, 8.0, 32.0],
        },
        rope_theta=10000.0,
        sliding_window=262144,
    ),
    # Phi-4-mini: the same with three quarters of each head rotating.
    "phi4-mini": dict(
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        partial_rotary_factor=0.75,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0, 1.1, 1.5],
            "long_factor": [1.0, 4.0, 16.0],
        },
        tie_word_embeddings=True,
    ),
    "qwen3": dict(
        attention_bias=False,
        max_window_layers=28,
        rope_scaling=None,
        rope_theta=1000000,
        sliding_window=None,
        tie_word_embeddings=True,
        use_sliding_window=False,
    ),
}


@pytest.mark.parametrize("name", list(HUB_STYLE_CONFIGS))
def test_hub_style_configs_read_as_transformers_reads_them(name):
    """Our defaults for what a hub config leaves out are transformers' (layer pattern, RoPE per
    layer type, softcaps, tied embeddings): reading the file directly gives the config we read
    from transformers' own parse of it (special-token defaults aside: they change no logits)."""
    import transformers

    model_type = "phi3" if name.startswith("phi") else name
    hf = dict(
        model_type=model_type,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=7,
        num_attention_heads=4,
        num_key_value_heads=1,
        # Phi-3 has no head_dim field (transformers checks longrope's factors against
        # hidden_size / heads).
        **({} if model_type == "phi3" else {"head_dim": 16}),
        **{"max_position_embeddings": 512, "rms_norm_eps": 1e-6, **HUB_STYLE_CONFIGS[name]},
    )
    ours = lorax.ModelConfig.from_hf_dict(hf)
    theirs = lorax.ModelConfig.from_hf_dict(transformers.AutoConfig.for_model(**hf).to_dict())
    tokens = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    assert ours == dataclasses.replace(theirs, **tokens)
    expected_windows = {
        "gemma2": (4096, 0, 4096, 0, 4096, 0, 4096),
        "gemma3_text": (512,) * 5 + (0, 512),
        "qwen3": (0,) * 7,
        "phi3": (262144,) * 7,
        "phi4-mini": (0,) * 7,
    }[name]
    assert ours.layer_windows == expected_windows
    if model_type == "phi3":
        assert ours.rope.type == "longrope" and ours.rope.factor == 32.0
        assert ours.rope.rotary_dim(ours.head_dim) == (6 if name == "phi4-mini" else 8)
    if model_type == "gemma3_text":
        assert ours.rope == lorax.RopeConfig(theta=1e6, type="linear", factor=8.0)
        assert ours.sliding_rope == lorax.RopeConfig(theta=1e4)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(model_type="gpt2"), "model_type='gpt2'"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(model_type="gemma3"), "image-text model"),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
        (dict(rope_parameters={"rope_type": "mrope", "rope_theta": 1e4}), "'mrope'"),
        (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "short_factor"),
        (dict(num_key_value_heads=3), "num_key_value_heads=3"),
    ],
)
def test_unsupported_config_names_field_and_value(tmp_path, changes, message):
    _, path = make_hf_model(tmp_path, "llama")
    _edit_config(path, **changes)
    with pytest.raises(lorax.ConfigError, match=message.replace("(", r"\(")):
        lorax.load(path)


def test_missing_tensor_is_named(tmp_path):
    _, path = make_hf_model(tmp_path, "llama")
    _rewrite_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        lorax.load(path)


def test_unexpected_tensor_is_named(tmp_path):
    _, path = make_hf_model(tmp_path, "llama")
    _rewrite_weights(path, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.ones(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.2\.mlp\.up_proj"):
        lorax.load(path)


def test_misshaped_tensor_names_file_tensor_and_shapes(tmp_path):
    _, path = make_hf_model(tmp_path, "llama")
    bad = "model.layers.0.self_attn.k_proj.weight"
    _rewrite_weights(path, lambda t: t.update({bad: t[bad][:-1]}))
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors.*k_proj.*\[31, 64\].*\[32, 64\]"
    ):
        lorax.load(path)


def test_truncated_file_is_reported(tmp_path):
    _, path = make_hf_model(tmp_path, "llama")
    weights = os.path.join(path, "model.safetensors")
    size = os.path.getsize(weights)
    with open(weights, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(
        CheckpointError, match=r"truncated.*model\.safetensors|model\.safetensors.*truncated"
    ):
        lorax.load(path)


def test_bin_only_checkpoint_is_rejected_with_a_hint(tmp_path):
    _, path = make_hf_model(tmp_path, "llama")
    os.remove(os.path.join(path, "model.safetensors"))
    open(os.path.join(path, "pytorch_model.bin"), "wb").close()
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*safe_serialization"):
        lorax.load(path)


def test_sharded_checkpoint_loads_like_single(tmp_path):
    torch_model, path = make_hf_model(tmp_path, "llama")
    sharded = os.path.join(tmp_path, "sharded")
    torch_model.save_pretrained(sharded, max_shard_size="40KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    a = lorax.load(path, dtype="float32")
    b = lorax.load(sharded, dtype="float32")
    ids = jnp.arange(16)[None]
    np.testing.assert_array_equal(lorax.forward(a, None, ids), lorax.forward(b, None, ids))
    # A shard that the index names but is gone.
    index = json.load(open(os.path.join(sharded, "model.safetensors.index.json")))
    os.remove(os.path.join(sharded, sorted(set(index["weight_map"].values()))[-1]))
    with pytest.raises(CheckpointError, match="missing"):
        lorax.load(sharded)


def test_f16_and_bf16_checkpoints_load(tmp_path):
    import torch

    torch_model, path = make_hf_model(tmp_path, "llama")
    for dtype in (torch.float16, torch.bfloat16):
        out = os.path.join(tmp_path, str(dtype))
        torch_model.to(dtype).save_pretrained(out)
        model = lorax.load(out, dtype="float32")
        ref = torch_model.model.embed_tokens.weight.float().detach().numpy()
        np.testing.assert_array_equal(np.asarray(model.params["embed_tokens"]), ref)
        shutil.rmtree(out)


def test_nf4_loading_quantizes_projections_only(tmp_path):
    _, path = make_hf_model(tmp_path, "llama")
    model = lorax.load(path, quantize="nf4", dtype="bfloat16")
    layers = model.params["layers"]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        w = layers[proj]["weight"]
        assert isinstance(w, lorax.NF4Tensor)
        assert w.shape == model.config.projection_shape(proj)
        assert w.packed.shape[0] == model.config.num_layers
    assert model.params["embed_tokens"].dtype == jnp.bfloat16
    assert model.params["lm_head"]["weight"].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="quantize"):
        lorax.load(path, quantize="int8")


def test_tokenizer_is_loaded_when_present(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    _, path = make_hf_model(tmp_path, "llama")
    assert lorax.load(path).tokenizer is None
    vocab = {f"t{i}": i for i in range(100)} | {"<unk>": 100}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    model = lorax.load(path)
    assert model.tokenizer("t1 t7")["input_ids"] == [1, 7]
