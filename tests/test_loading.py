"""Config reading and checkpoint loading, including every bad input we promise to name."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model, rel_err, torch_logits
from test_model_parity import GEMMA3_TEXT

import lorax
from convert.hf import CheckpointError
from convert.safetensors_io import SafetensorsFile, save_file
from lorax.config import HF_DEFAULTS


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
    if model_type in HF_DEFAULTS:  # we fill Gemma 3's special tokens too
        assert ours == theirs
    else:
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


# gemma-3-4b-it's config.json (transformers 4.50), shrunk: the image-text model's fields at
# the top level, and a text_config naming little beyond the sizes, the window and the RoPE
# scaling, every other field left to Gemma3TextConfig's defaults (8 heads, 4 KV heads,
# head_dim 256, the 262208-token vocabulary, ...).
GEMMA3_4B_IT_STYLE = dict(
    architectures=["Gemma3ForConditionalGeneration"],
    boi_token_index=255999,
    eoi_token_index=256000,
    eos_token_id=[1, 106],
    image_token_index=262144,
    initializer_range=0.02,
    mm_tokens_per_image=256,
    model_type="gemma3",
    text_config=dict(
        hidden_size=64,
        intermediate_size=96,
        model_type="gemma3_text",
        num_hidden_layers=7,
        rope_scaling={"factor": 8.0, "rope_type": "linear"},
        sliding_window=1024,
    ),
    torch_dtype="bfloat16",
    vision_config=dict(
        hidden_size=32,
        image_size=28,
        intermediate_size=48,
        model_type="siglip_vision_model",
        num_attention_heads=2,
        num_hidden_layers=1,
        patch_size=14,
        vision_use_head=False,
    ),
)


def test_gemma3_image_text_config_reads_its_language_model_as_transformers_does():
    """The config of gemma-3-4b-it's language model, read directly, is the one we read from
    transformers' own parse: Gemma3TextConfig's defaults for what text_config leaves out,
    and the head tying and special tokens from the top level."""
    import transformers

    ours = lorax.ModelConfig.from_hf_dict(GEMMA3_4B_IT_STYLE)
    parsed = transformers.AutoConfig.for_model(**GEMMA3_4B_IT_STYLE)
    assert ours == lorax.ModelConfig.from_hf_dict(parsed.to_dict())
    text = parsed.text_config
    assert (ours.model_type, ours.checkpoint_layout) == ("gemma3_text", "image_text")
    assert (
        (ours.vocab_size, ours.num_heads, ours.num_kv_heads, ours.head_dim)
        == (
            text.vocab_size,
            text.num_attention_heads,
            text.num_key_value_heads,
            text.head_dim,
        )
        == (262208, 8, 4, 256)
    )
    assert ours.max_position_embeddings == text.max_position_embeddings == 131072
    assert (
        ours.layer_windows
        == tuple(1024 if t == "sliding_attention" else 0 for t in text.layer_types)
        == (1024,) * 5 + (0, 1024)
    )
    assert ours.rope == lorax.RopeConfig(theta=1e6, type="linear", factor=8.0)
    assert ours.sliding_rope == lorax.RopeConfig(theta=1e4)
    assert ours.tie_word_embeddings is parsed.tie_word_embeddings is True
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (2, (1, 106), 0)


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            dict(text_config=None),
            r"model_type='gemma3' \(an image-text model\) needs a 'text_config'",
        ),
        (
            dict(text_config={**GEMMA3_4B_IT_STYLE["text_config"], "model_type": "gemma2"}),
            r"text_config.model_type='gemma2'; a 'gemma3' model's language model is 'gemma3_text'",
        ),
        (
            dict(text_config={**GEMMA3_4B_IT_STYLE["text_config"], "hidden_activation": "gelu"}),
            r"config.json \(text_config\): unsupported hidden_activation='gelu'",
        ),
    ],
)
def test_bad_gemma3_image_text_config_is_named(changes, message):
    with pytest.raises(lorax.ConfigError, match=message):
        lorax.ModelConfig.from_hf_dict({**GEMMA3_4B_IT_STYLE, **changes})


def _respell_gemma3(tensors):
    """An image-text checkpoint under the module names of transformers >= 4.52, as some tools
    save it (model.language_model., model.vision_tower., lm_head.)."""
    for name in list(tensors):
        if name.startswith("language_model.model."):
            new = "model.language_model." + name.removeprefix("language_model.model.")
        elif name.startswith("language_model.lm_head."):
            new = name.removeprefix("language_model.")
        else:
            new = "model." + name
        tensors[new] = tensors.pop(name)


@pytest.mark.parametrize("tied", [True, False])
def test_gemma3_image_text_checkpoint_loads_under_either_spelling(tmp_path, rng, tied):
    """Both spellings transformers reads give the same model, its language model's weights
    (the vision tower's skipped), logits equal to transformers'."""
    import transformers

    torch_model, path = make_hf_model(tmp_path, "gemma3", tie_word_embeddings=tied, **GEMMA3_TEXT)
    names = set(SafetensorsFile(os.path.join(path, "model.safetensors")))
    assert ("language_model.lm_head.weight" in names) is not tied
    assert any(n.startswith("vision_tower.") for n in names)
    assert any(n.startswith("multi_modal_projector.") for n in names)
    written = lorax.load(path, dtype="float32")
    assert set(written.params) == {"embed_tokens", "layers", "norm"} | (
        set() if tied else {"lm_head"}
    )
    respelled = str(tmp_path / "respelled")
    shutil.copytree(path, respelled)
    _rewrite_weights(respelled, _respell_gemma3)
    model = lorax.load(respelled, dtype="float32")
    assert model.config == written.config
    jax.tree.map(np.testing.assert_array_equal, model.params, written.params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        respelled, attn_implementation="eager"
    ).eval()
    ids = rng.integers(0, model.config.vocab_size, size=(1, 12))
    theirs = torch_logits(reloaded, ids)
    assert np.array_equal(theirs, torch_logits(torch_model, ids))  # transformers reads it alike
    assert rel_err(lorax.forward(model, None, jnp.asarray(ids)), theirs) < 1e-4
    # The sharded loader (the CLI always passes a mesh) reads the same bytes, NF4 too.
    from lorax import sharding

    mesh = sharding.make_mesh("data=1,fsdp=1", devices=jax.devices()[:1])
    for directory, quantize in ((path, None), (respelled, "nf4")):
        whole = lorax.load(directory, dtype="float32", quantize=quantize)
        placed = lorax.load(directory, dtype="float32", quantize=quantize, mesh=mesh)
        assert placed.config == whole.config
        jax.tree.map(np.testing.assert_array_equal, placed.params, whole.params)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.pop("language_model.model.layers.1.mlp.up_proj.weight"),
            r"missing.*language_model\.model\.layers\.1\.mlp\.up_proj\.weight",
        ),
        (
            lambda t: t.update({"language_model.model.layers.2.mlp.up_proj.weight": np.ones(3)}),
            r"unexpected.*language_model\.model\.layers\.2\.mlp\.up_proj",
        ),
        (
            lambda t: t.update({"model.language_model.embed_tokens.weight": np.ones(3)}),
            r"embeddings at one of \['language_model\.model\.embed_tokens\.weight', "
            r"'model\.language_model\.embed_tokens\.weight'\]; this checkpoint has more than one",
        ),
        (
            lambda t: t.pop("language_model.model.embed_tokens.weight"),
            r"this checkpoint has none of them",
        ),
        (
            lambda t: t.update({"audio_tower.proj.weight": np.ones(3)}),
            r"unexpected.*audio_tower\.proj\.weight",
        ),
    ],
)
def test_bad_gemma3_image_text_checkpoint_is_named(tmp_path, edit, message):
    _, path = make_hf_model(tmp_path, "gemma3", **GEMMA3_TEXT)
    _rewrite_weights(path, edit)
    with pytest.raises(CheckpointError, match=message):
        lorax.load(path)


def test_vision_tensors_are_unexpected_in_a_causal_lm_checkpoint(tmp_path):
    """Only an image-text checkpoint's layout skips a vision tower."""
    _, path = make_hf_model(tmp_path, "gemma3_text", head_dim=16)
    _rewrite_weights(path, lambda t: t.update({"vision_tower.post_layernorm.weight": np.ones(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected.*vision_tower\.post_layernorm"):
        lorax.load(path)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(model_type="gpt2"), "model_type='gpt2'"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(model_type="gemma3"), "needs a 'text_config' object for its language model"),
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
