"""Merged export: transformers loads what we write and computes what lorax computes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import make_hf_model, random_lora, rel_err, rel_l2, torch_logits
from test_model_parity import CASES

import lorax
from convert import export_common
from convert.export_common import INDEX_FILE, ShardWriter, parse_size
from convert.hf import ShardedCheckpoint
from convert.hf_config import ARCHITECTURES, HFConfigError, hf_config_dict
from convert.merged import lora_adapters
from convert.names import EXPERT_CHECKPOINTS
from convert.safetensors_io import SafetensorsFile

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

forward = jax.jit(lorax.forward)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _hf_model(path, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", **kw
    ).eval()


def _logits(model, lora, ids) -> np.ndarray:
    return np.asarray(forward(model, lora, jnp.asarray(ids)))


def _layer(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def _exact_merge(model, lora, proj, i) -> np.ndarray:
    """W + scale·B·A for one layer in float64, the reference for the export's float32 sum."""
    w = model.params["layers"][proj]["weight"]
    w = lorax.dequantize_nf4(_layer(w, i)) if isinstance(w, lorax.NF4Tensor) else w[i]
    ab = lora.params["layers"][proj]
    a, b = (np.asarray(ab[k][i], np.float64) for k in ("lora_a", "lora_b"))
    return np.asarray(w, np.float64) + lora.config.scale * (b @ a)


@pytest.mark.parametrize("max_shard_size", ["5GB", 40_000])
def test_float32_merged_matches_lorax_with_adapter(tmp_path, rng, max_shard_size):
    # Tied embeddings and qwen2's biases; once in one file, once in many small shards.
    torch_model, path = make_hf_model(tmp_path, "qwen2", tie_word_embeddings=True)
    model = lorax.load(path, dtype="float32")
    lora = random_lora(model, rng, 4, 8, ATTENTION + MLP, use_rslora=True)
    out = str(tmp_path / "merged")
    lorax.save_merged(model, lora, out, dtype="float32", max_shard_size=max_shard_size)

    ckpt = ShardedCheckpoint(out)
    assert "lm_head.weight" not in ckpt
    assert lorax.ModelConfig.from_json_file(os.path.join(out, "config.json")) == model.config
    ids = rng.integers(0, model.config.vocab_size, size=(2, 12))
    expected = _logits(model, lora, ids)
    assert rel_err(torch_logits(_hf_model(out), ids), expected) < 1e-4
    assert rel_err(torch_logits(torch_model, ids), expected) > 1e-2  # the merge mattered
    if max_shard_size == "5GB":
        assert sorted(os.listdir(out)) == [
            "config.json",
            "generation_config.json",
            "model.safetensors",
        ]
        return
    with open(os.path.join(out, INDEX_FILE)) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(os.listdir(out)) == sorted(
        [*shards, INDEX_FILE, "config.json", "generation_config.json"]
    )
    for shard in shards:
        f = SafetensorsFile(os.path.join(out, shard))
        assert sum(f[k].nbytes for k in f) <= max_shard_size or len(f) == 1
    assert index["metadata"]["total_size"] == sum(ckpt[k].nbytes for k in ckpt)


def test_bfloat16_merge_rounds_once_from_float32(tmp_path, rng):
    _, path = make_hf_model(tmp_path, "llama", attention_bias=True, mlp_bias=True)
    model = lorax.load(path, dtype="float32")
    lora = random_lora(model, rng, 4, 8, ATTENTION)
    out = str(tmp_path / "merged")
    lorax.save_merged(model, lora, out)  # bfloat16 by default

    stored = ShardedCheckpoint(out)
    got = stored["model.layers.1.self_attn.k_proj.weight"]
    assert got.dtype == ml_dtypes.bfloat16
    exact = _exact_merge(model, lora, "k_proj", 1)
    want = exact.astype(np.float32).astype(ml_dtypes.bfloat16)
    # One rounding from the float32 sum W + s·B·A. That sum carries a few float32 ulps of its
    # operands' size as error, so it lies within ``tol`` of the exact value; rounding is monotone,
    # so the stored value lies between the roundings of exact ± tol. Away from a rounding midpoint
    # that interval holds one bfloat16 value; where W and s·B·A cancel it can hold several.
    w = np.asarray(model.params["layers"]["k_proj"]["weight"][1], np.float64)
    tol = 8 * np.finfo(np.float32).eps * (np.abs(w) + np.abs(exact - w))

    def bf16(x):
        return x.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)

    stored64 = got.astype(np.float64)
    inside = (bf16(exact - tol) <= stored64) & (stored64 <= bf16(exact + tol))
    assert inside.all(), np.argwhere(~inside)
    differ = stored64 != want.astype(np.float64)
    assert differ.mean() < 0.01
    for name, value in [
        ("model.layers.0.mlp.up_proj.weight", model.params["layers"]["up_proj"]["weight"][0]),
        ("model.layers.1.mlp.up_proj.bias", model.params["layers"]["up_proj"]["bias"][1]),
        ("lm_head.weight", model.params["lm_head"]["weight"]),
    ]:
        np.testing.assert_array_equal(stored[name], np.asarray(value).astype(ml_dtypes.bfloat16))

    hf = _hf_model(out)
    assert hf.dtype == torch.bfloat16
    ids = rng.integers(0, model.config.vocab_size, size=(2, 12))
    assert rel_err(torch_logits(hf, ids), _logits(model, lora, ids)) < 3e-2


# What transformers must read from an exported config.json as it read the source's: the
# fields that change Qwen 3's, Gemma's and the mixtures of experts' computation beyond Llama's.
FAMILY_FIELDS = (
    "original_max_position_embeddings",
    "layer_types",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "rope_parameters",
    "attention_bias",
    "head_dim",
    "hidden_activation",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "tie_word_embeddings",
    "num_local_experts",
    "num_experts",
    "shared_expert_intermediate_size",
    "qkv_bias",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "norm_topk_prob",
    "decoder_sparse_step",
    "mlp_only_layers",
    "output_router_logits",
    "router_aux_loss_coef",
)


@pytest.mark.parametrize(
    "case, dtype",
    [
        ("qwen3-bias-window", "float32"),
        ("qwen3-qk-norm", "bfloat16"),
        ("gemma2", "float32"),
        ("gemma2-untied-no-softcap", "bfloat16"),
        ("gemma3-two-ropes", "float32"),
        ("gemma3-two-ropes", "bfloat16"),
        ("phi3-window", "bfloat16"),
        ("phi3-longrope-partial", "float32"),
        ("mixtral", "float32"),
        ("mixtral", "bfloat16"),
        ("qwen3-moe", "float32"),
        ("qwen3-moe-unnormalized-window", "bfloat16"),
        ("qwen2-moe", "float32"),
        ("qwen2-moe-normalized-window-unbiased", "bfloat16"),
        # Dense-MLP layers among the routed ones: two layer stacks, merged each with its own
        # LoRA, written under the model's layer indices and listed in mlp_only_layers.
        ("qwen3-moe-dense-layers", "float32"),
        ("qwen2-moe-sparse-step", "float32"),
    ],
)
def test_merged_families_load_in_transformers(tmp_path, rng, case, dtype):
    """Qwen 3, Gemma 2, Gemma 3, Phi-3, Mixtral and Qwen 2/3 MoE merged: transformers builds the
    right class from our config.json, reads the family's fields as it read the source's, and
    computes lorax's logits; ``lorax.load`` gives back the same ``ModelConfig``."""
    model_type, overrides = CASES[case]
    torch_model, path = make_hf_model(tmp_path, model_type, **overrides)
    model = lorax.load(path, dtype="float32")
    lora = random_lora(model, rng, 4, 8, model.config.projections())
    out = str(tmp_path / "merged")
    lorax.save_merged(model, lora, out, dtype=dtype)

    reloaded = lorax.load(out, dtype="float32")
    assert reloaded.config == model.config
    source, exported = (transformers.AutoConfig.from_pretrained(p) for p in (path, out))

    def read(config, field):
        value = getattr(config, field, None)
        if field == "head_dim" and value is None:  # Phi-3's default, as its modules take it
            return config.hidden_size // config.num_attention_heads
        return value

    for field in FAMILY_FIELDS:
        if field == "max_window_layers" and not getattr(source, "use_sliding_window", False):
            continue  # read only with a sliding window
        if field in ("decoder_sparse_step", "mlp_only_layers"):
            continue  # below: the layers they make dense, however the file spells them
        assert read(exported, field) == read(source, field), field
    if model.config.moe:
        assert _dense_mlp_layers(exported) == _dense_mlp_layers(source)
        assert _dense_mlp_layers(source) == list(model.config.dense_mlp_layers)
    # Upcast to float32: transformers and lorax then compute with the same stored weights.
    hf = _hf_model(out, dtype=torch.float32)
    assert type(hf).__name__ == ARCHITECTURES[model_type]
    routed = [hasattr(layer.mlp, "experts") for layer in hf.model.layers]
    if model.config.moe:  # transformers built each layer's MLP as the source's
        assert routed == [i not in model.config.dense_mlp_layers for i in range(len(routed))]
    ids = rng.integers(0, model.config.vocab_size, size=(2, 12))
    merged = _logits(reloaded, None, ids)
    assert rel_err(torch_logits(hf, ids), merged) < 1e-4
    adapted = _logits(model, lora, ids)
    assert rel_err(torch_logits(torch_model, ids), adapted) > 1e-2  # the merge mattered
    if dtype == "float32":
        error = rel_err(torch_logits(hf, ids), adapted)
        print(f"transformers on the merged {case} vs lorax's adapted: {error:.1e}")
        assert rel_err(merged, adapted) < 1e-4
    else:  # only the rounding of the stored weights differs (up to 2e-2 seen over 12 seeds)
        assert ShardedCheckpoint(out)["model.norm.weight"].dtype == ml_dtypes.bfloat16
        if not model.config.moe:
            assert rel_err(merged, adapted) < 5e-2
        else:
            # Rounding can flip a token's top-k experts, a jump on that token (up to 0.3 seen
            # over 8 seeds), not drift: the typical token is bounded (5e-3..7e-3 seen).
            per_token = np.abs(merged - adapted).max(-1) / np.abs(adapted).max()
            assert np.median(per_token) < 2e-2


@pytest.mark.parametrize(
    "change, message",
    [
        # Qwen 3 MoE's gate_proj is its dense layers' alone (0 and 2; 1 and 3 route).
        (
            lambda p: p["layers"].update(gate_proj=p["dense_layers"]["gate_proj"]),
            r"entry for 'gate_proj' under 'layers' \(routed layers \[1, 3\] of qwen3_moe\), "
            r"which have no gate_proj; it belongs under 'dense_layers'",
        ),
        (lambda p: p.update(mlp_layers=p.pop("dense_layers")), r"under \['mlp_layers'\]"),
        (
            lambda p: p["dense_layers"].update(
                gate_proj=jax.tree.map(lambda x: x[:, :, :32], p["dense_layers"]["gate_proj"])
            ),
            r"LoRA gate_proj has lora_a \[2, 4, 32\] and lora_b \[2, 96, 4\]; the model needs "
            r"\[2, r, 64\] and \[2, 96, r\]",
        ),
    ],
)
def test_merged_refuses_lora_that_does_not_fit_its_stacks(tmp_path, rng, change, message):
    model_type, overrides = CASES["qwen3-moe-dense-layers"]
    _, path = make_hf_model(tmp_path, model_type, **overrides)
    model = lorax.load(path, dtype="float32")
    lora = random_lora(model, rng, 4, 8, ("q_proj", "gate_proj", "experts_down_proj"))
    with pytest.raises(ValueError, match=r"two structures \(dense-MLP layers \[0, 2\]\)"):
        lora_adapters(model.config, lora)  # a projection's entries: one stack's only
    params = {key: dict(entries) for key, entries in lora.params.items()}
    change(params)
    out = tmp_path / "merged"
    with pytest.raises(ValueError, match=message):
        lorax.save_merged(model, lorax.LoraWeights(params, lora.config), out, dtype="float32")
    assert not os.path.exists(out)


def _dense_mlp_layers(hf_config) -> list[int]:
    """The layers transformers builds with a dense MLP from an MoE config (Qwen2/3MoeDecoderLayer's
    rule; Mixtral routes every layer)."""
    step = getattr(hf_config, "decoder_sparse_step", None) or 1
    listed = getattr(hf_config, "mlp_only_layers", None) or []
    return [i for i in range(hf_config.num_hidden_layers) if i in listed or (i + 1) % step]


def test_gemma3_image_text_merges_to_its_language_model_with_a_warning(tmp_path, rng):
    """lorax holds no vision tower, so a model read from Gemma 3's image-text checkpoint
    merges to the causal LM of its language model (Gemma3ForCausalLM), saying so: transformers
    computes lorax's adapted logits from it, and lorax reads it back as gemma3_text."""
    model_type, overrides = CASES["gemma3-image-text"]
    _, path = make_hf_model(tmp_path, model_type, **overrides)
    model = lorax.load(path, dtype="float32")
    lora = random_lora(model, rng, 4, 8, model.config.projections())
    out = str(tmp_path / "merged")
    with pytest.warns(UserWarning, match=r"language model alone, as Gemma3ForCausalLM.*images"):
        lorax.save_merged(model, lora, out, dtype="float32")

    assert not any(
        name.startswith(("vision_tower", "multi_modal_projector", "language_model"))
        for name in SafetensorsFile(os.path.join(out, "model.safetensors"))
    )
    exported = transformers.AutoConfig.from_pretrained(out)
    assert (exported.model_type, exported.architectures) == ("gemma3_text", ["Gemma3ForCausalLM"])
    reloaded = lorax.load(out, dtype="float32")
    assert reloaded.config == dataclasses.replace(model.config, checkpoint_layout="causal_lm")
    hf = _hf_model(out, dtype=torch.float32)
    assert type(hf).__name__ == "Gemma3ForCausalLM"
    ids = rng.integers(0, model.config.vocab_size, size=(2, 12))
    adapted = _logits(model, lora, ids)
    error = rel_err(torch_logits(hf, ids), adapted)
    print(f"merged Gemma3ForCausalLM vs lorax's adapted image-text model: {error:.1e}")
    assert error < 1e-4
    assert rel_err(_logits(model, None, ids), adapted) > 1e-2  # the merge mattered


def test_tokenizer_and_generation_config_are_written(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    _, path = make_hf_model(
        tmp_path, "mistral", sliding_window=8, bos_token_id=1, eos_token_id=[2, 3], pad_token_id=0
    )
    vocab = {f"t{i}": i for i in range(128)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0")
    tokenizer.save_pretrained(path)
    model = lorax.load(path, dtype="float32")
    out = str(tmp_path / "merged")
    lorax.save_merged(model, None, out, dtype="float32")

    assert transformers.AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("t5") == 5
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f) == {"bos_token_id": 1, "eos_token_id": [2, 3], "pad_token_id": 0}
    config = transformers.AutoConfig.from_pretrained(out)
    assert (config.model_type, config.sliding_window) == ("mistral", 8)
    assert lorax.load(out, dtype="float32").config == model.config


# ----------------------------------------------------------------------------------- nf4


@pytest.mark.parametrize("case", ["llama", "qwen3-qk-norm", "gemma2", "gemma3-two-ropes"])
def test_nf4_merged_loads_in_transformers_with_bitsandbytes(tmp_path, rng, case):
    pytest.importorskip("bitsandbytes")
    # Whole 64-weight blocks per row (intermediate 128, not 96; head_dim 16, so 64-wide
    # attention): bitsandbytes 0.49-0.50.2's native CPU kernels, which transformers' Linear4bit
    # runs here, misread rows that blocks straddle (conftest.bnb_dequantize). Ragged rows are
    # checked against bitsandbytes' flat-order decode in test_nf4.py and test_model_parity.py.
    model_type, overrides = CASES.get(case, (case, {}))
    overrides = {**overrides, "intermediate_size": 128, "head_dim": 16}
    _, path = make_hf_model(tmp_path, model_type, **overrides)
    model = lorax.load(path, quantize="nf4", dtype="float32")
    lora = random_lora(model, rng, 4, 8, ATTENTION)
    out = str(tmp_path / "merged-nf4")
    lorax.save_merged(model, lora, out, dtype="nf4")

    with open(os.path.join(out, "config.json")) as f:
        quant = json.load(f)["quantization_config"]
    assert quant["load_in_4bit"] and quant["bnb_4bit_quant_type"] == "nf4"
    reloaded = lorax.load(out, dtype="float32")  # lorax reads bnb's serialized 4-bit form
    assert reloaded.config == model.config
    layers = reloaded.params["layers"]
    # Projections without an adapter keep their NF4 bytes ...
    for proj in MLP:
        jax.tree.map(
            np.testing.assert_array_equal,
            layers[proj]["weight"],
            model.params["layers"][proj]["weight"],
        )
    # ... adapted ones are the float32 merge, re-quantized. Against a float64 reference a
    # block scale may move by an ulp, and a code flip where the two sums straddle a midpoint.
    got = np.asarray(lorax.dequantize_nf4(_layer(layers["v_proj"]["weight"], 1)))
    exact = jnp.asarray(_exact_merge(model, lora, "v_proj", 1), jnp.float32)
    want = np.asarray(lorax.dequantize_nf4(lorax.quantize_nf4(exact)))
    assert np.mean(~np.isclose(got, want, rtol=1e-5, atol=0)) < 1e-3

    hf = _hf_model(out, device_map="cpu")
    assert type(hf.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    # On CPUs with AVX512-BF16, bitsandbytes >= 0.49 repacks 4-bit weights at the first
    # inference call and multiplies in bfloat16 (~1e-2 here); its float path decodes the same
    # bytes and multiplies in float32, which is what this comparison needs.
    for module in hf.modules():
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False
    ids = rng.integers(0, model.config.vocab_size, size=(2, 10))
    merged = _logits(reloaded, None, ids)
    # Same 4-bit weights: transformers + bitsandbytes and lorax agree to float32 rounding.
    assert rel_err(torch_logits(hf, ids), merged) < 1e-4
    # Against lorax's adapted NF4 model only the re-quantization differs: the merged model
    # is far closer to it than the unadapted base is.
    adapted = _logits(model, lora, ids)
    unadapted = _logits(model, jax.tree.map(jnp.zeros_like, lora), ids)  # reuses the compile
    assert rel_err(merged, adapted) < 0.5 * rel_err(unadapted, adapted)


def test_merging_into_nf4_base_dequantizes_like_bitsandbytes(tmp_path, rng):
    _, path = make_hf_model(tmp_path, "llama")
    model = lorax.load(path, quantize="nf4", dtype="float32")
    lora = random_lora(model, rng, 2, 2, ("o_proj",))
    out = str(tmp_path / "merged")
    lorax.save_merged(model, lora, out, dtype="float32")

    stored = ShardedCheckpoint(out)
    np.testing.assert_allclose(
        stored["model.layers.0.self_attn.o_proj.weight"],
        _exact_merge(model, lora, "o_proj", 0),
        rtol=1e-6,
        atol=1e-7,
    )
    base_q = lorax.dequantize_nf4(_layer(model.params["layers"]["q_proj"]["weight"], 1))
    np.testing.assert_array_equal(stored["model.layers.1.self_attn.q_proj.weight"], base_q)


# -------------------------------------------- Mixture of experts: Mixtral, Qwen 2/3 MoE


def _exact_expert_merge(model, lora, proj, i, e) -> np.ndarray:
    """Expert e's ``W + scale·B·A`` in layer i, float64 (gate/up: both parts' rows)."""
    w = model.params["layers"][proj]["weight"]
    w = lorax.dequantize_nf4(_layer(_layer(w, i), e)) if isinstance(w, lorax.NF4Tensor) else w[i, e]
    w = np.asarray(w, np.float64).reshape(-1, w.shape[-1])  # [2, F, D] -> [2F, D]
    ab = lora.params["layers"][proj]
    a, b = (np.asarray(ab[k][i, e], np.float64) for k in ("lora_a", "lora_b"))
    return w + lora.config.scale * (b @ a)


# The NF4 base's per-expert dequantization is the same code for every family: Mixtral alone
# takes it (each NF4 case compiles its own forward, seconds on CPU).
@pytest.mark.parametrize(
    "case, quantize",
    [("mixtral", None), ("mixtral", "nf4"), ("qwen3-moe", None), ("qwen2-moe", None)],
)
def test_moe_merged_writes_each_expert_merged(tmp_path, rng, case, quantize):
    """The merged checkpoint has the very tensor names transformers' save_pretrained wrote
    for the source (per expert: Mixtral's w1/w3/w2, Qwen 3 MoE's gate/up/down_proj, the rows
    of experts_gate_up_proj and experts_down_proj), each expert matrix its own merge;
    transformers computes lorax's adapted logits from them. From an NF4 base too, where each
    expert matrix is dequantized as bitsandbytes does before the float32 sum. Qwen 2 MoE's
    shared expert is merged as a dense projection, and its gate kept as it is."""
    model_type, overrides = CASES[case]
    torch_model, path = make_hf_model(tmp_path, model_type, **overrides)
    model = lorax.load(path, dtype="float32", quantize=quantize)
    targets = ("k_proj", "experts_gate_up_proj", "experts_down_proj")
    shared = model.config.shared_expert
    lora = random_lora(model, rng, 4, 8, targets + (("down_proj",) if shared else ()))
    out = str(tmp_path / "merged")
    lorax.save_merged(model, lora, out, dtype="float32")

    stored = ShardedCheckpoint(out)
    assert sorted(stored) == sorted(ShardedCheckpoint(path))
    checkpoint = EXPERT_CHECKPOINTS[model_type]
    gate_name, up_name = checkpoint.parts["experts_gate_up_proj"]
    (down_name,) = checkpoint.parts["experts_down_proj"]
    f = model.config.expert_width
    for i, e in ((0, 0), (1, 3)):
        gate_up = _exact_expert_merge(model, lora, "experts_gate_up_proj", i, e)
        down = _exact_expert_merge(model, lora, "experts_down_proj", i, e)
        for w, want in ((gate_name, gate_up[:f]), (up_name, gate_up[f:]), (down_name, down)):
            got = stored[f"model.layers.{i}.{checkpoint.module}.experts.{e}.{w}.weight"]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=w)
    np.testing.assert_array_equal(
        stored[f"model.layers.1.{checkpoint.module}.gate.weight"],
        model.params["layers"]["router"]["weight"][1],
    )
    if shared:
        np.testing.assert_allclose(
            stored["model.layers.1.mlp.shared_expert.down_proj.weight"],
            _exact_merge(model, lora, "down_proj", 1),
            rtol=1e-5,
            atol=1e-6,
        )
        np.testing.assert_array_equal(
            stored["model.layers.1.mlp.shared_expert_gate.weight"],
            model.params["layers"]["shared_expert_gate"]["weight"][1],
        )

    hf = _hf_model(out)
    assert type(hf).__name__ == ARCHITECTURES[model_type]
    ids = rng.integers(0, model.config.vocab_size, size=(2, 12))
    expected = _logits(model, lora, ids)
    error = rel_l2(torch_logits(hf, ids), expected)
    print(f"merged {case} (base {quantize or 'float32'}) vs lorax + LoRA, rel_l2: {error:.2e}")
    assert error < 1e-5
    assert rel_l2(_logits(model, None, ids), expected) > 1e-2  # the merge mattered


@pytest.mark.parametrize("case", ["mixtral", "qwen3-moe", "qwen2-moe"])
def test_moe_nf4_merged_is_refused(tmp_path, case):
    model_type, overrides = CASES[case]
    _, path = make_hf_model(tmp_path, model_type, **overrides)
    model = lorax.load(path, dtype="float32", quantize="nf4")
    with pytest.raises(ValueError, match=rf"dtype='nf4'.*{model_type}.*only nn.Linear"):
        lorax.save_merged(model, None, tmp_path / "x", dtype="nf4")
    assert not os.path.exists(tmp_path / "x")


# ------------------------------------------------------------------------ atomic output


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny llama and an adapter, shared by the tests below, which only read them."""
    _, path = make_hf_model(tmp_path_factory.mktemp("small"), "llama")
    model = lorax.load(path, dtype="float32")
    return model, random_lora(model, np.random.default_rng(0), 2, 4, ATTENTION + MLP)


def _digest(directory) -> dict[str, str]:
    return {
        name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
        for name in sorted(os.listdir(directory))
    }


def test_refuses_to_overwrite_and_replaces_whole_when_asked(tmp_path, small):
    model, lora = small
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="allow_overwrite=True"):
        lorax.save_merged(model, lora, out)
    assert os.listdir(out) == ["keep.txt"]
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        lorax.save_merged(model, lora, tmp_path / "a-file", allow_overwrite=True)

    lorax.save_merged(model, lora, out, dtype="float32", allow_overwrite=True)
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    lorax.save_merged(model, None, empty, dtype="float32")  # an empty directory is free
    assert "config.json" in os.listdir(empty)


def test_failure_midway_leaves_no_output_and_keeps_the_old(tmp_path, small, monkeypatch):
    model, lora = small
    old = tmp_path / "old"
    lorax.save_merged(model, None, old, dtype="float32")
    old_files = _digest(old)
    before = sorted(os.listdir(tmp_path))
    real_save = export_common.save_file
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(export_common, "save_file", failing_save)
    for target, overwrite in ((tmp_path / "new", False), (old, True)):
        calls.clear()
        with pytest.raises(OSError, match="disk full"):
            lorax.save_merged(model, lora, target, max_shard_size=30_000, allow_overwrite=overwrite)
        assert len(calls) == 3
    assert sorted(os.listdir(tmp_path)) == before  # no "new", no temp directories
    assert _digest(old) == old_files


def test_float16_overflow_is_an_error_not_infs(tmp_path, small):
    model, lora = small
    layers = dict(lora.params["layers"])
    layers["v_proj"] = {**layers["v_proj"], "lora_b": layers["v_proj"]["lora_b"] * 1e7}
    huge = lorax.LoraWeights({"layers": layers}, lora.config)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.v_proj\.weight.*float16"):
        lorax.save_merged(model, huge, tmp_path / "o", dtype="float16")
    assert not os.path.exists(tmp_path / "o")


def test_lora_for_another_model_is_refused(tmp_path, small):
    model, lora = small
    other = random_lora(
        type("M", (), {"config": dataclasses.replace(model.config, hidden_size=32)}),
        np.random.default_rng(0),
        2,
        4,
        ("q_proj",),
    )
    with pytest.raises(ValueError, match=r"LoRA q_proj has lora_a \[2, 2, 32\]"):
        lorax.save_merged(model, other, tmp_path / "o")
    assert not os.path.exists(tmp_path / "o")


# ------------------------------------------------------------------------ config, shards


def _cfg(**kw) -> lorax.ModelConfig:
    base = dict(
        model_type="llama",
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=4,
    )
    return lorax.ModelConfig(**{**base, **kw})


def _gemma(model_type="gemma2", **kw) -> lorax.ModelConfig:
    """A Gemma config as ``ModelConfig.from_hf_dict`` builds one (Gemma 2's defaults)."""
    gemma = dict(
        model_type=model_type,
        activation="gelu_pytorch_tanh",
        norm_style="gemma",
        sandwich_norms=True,
        qk_norm=model_type == "gemma3_text",
        embedding_multiplier=16**0.5,
        query_pre_attn_scalar=256.0,
        tie_word_embeddings=True,
        layer_windows=(7, 0, 7, 0),
    )
    if model_type == "gemma2":
        gemma.update(attn_logit_softcap=50.0, final_logit_softcap=30.0)
    else:
        gemma.update(rope=lorax.RopeConfig(theta=1e6), sliding_rope=lorax.RopeConfig())
    return _cfg(**{**gemma, **kw})


def _qwen2_moe(**kw) -> lorax.ModelConfig:
    """A Qwen 2 MoE config as ``ModelConfig.from_hf_dict`` builds one: q/k/v biases, experts
    narrower than intermediate_size, their weights rounded to the compute dtype and not
    renormalized, a shared expert of its own width."""
    moe = dict(
        model_type="qwen2_moe",
        bias_projections=("q_proj", "k_proj", "v_proj"),
        round_expert_weights=True,
        num_experts=8,
        experts_per_token=2,
        expert_intermediate_size=12,
        normalize_expert_weights=False,
        shared_expert_intermediate_size=20,
    )
    return _cfg(**{**moe, **kw})


def _qwen3_moe(**kw) -> lorax.ModelConfig:
    """A Qwen 3 MoE config as ``ModelConfig.from_hf_dict`` builds one: q/k norms, experts
    narrower than intermediate_size, their weights rounded to the compute dtype."""
    moe = dict(
        model_type="qwen3_moe",
        qk_norm=True,
        round_expert_weights=True,
        num_experts=8,
        experts_per_token=2,
        expert_intermediate_size=12,
    )
    return _cfg(**{**moe, **kw})


@pytest.mark.parametrize(
    "config",
    [
        _cfg(
            rope=lorax.RopeConfig(
                theta=5e5, type="llama3", factor=8.0, original_max_position_embeddings=64
            ),
            max_position_embeddings=512,
            bias_projections=(
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ),
            eos_token_id=(1, 2),
            bos_token_id=0,
        ),
        _cfg(rope=lorax.RopeConfig(type="linear", factor=2.0), tie_word_embeddings=True),
        _cfg(
            rope=lorax.RopeConfig(type="dynamic", factor=3.0, original_max_position_embeddings=16)
        ),
        _cfg(
            rope=lorax.RopeConfig(
                type="yarn",
                factor=4.0,
                original_max_position_embeddings=32,
                beta_fast=16.0,
                attention_factor=1.5,
                truncate=False,
            ),
            max_position_embeddings=128,
        ),
        _cfg(model_type="mistral", layer_windows=(7, 7, 7, 7)),
        _cfg(model_type="mistral"),
        _cfg(
            model_type="qwen2",
            bias_projections=("q_proj", "k_proj", "v_proj"),
            layer_windows=(0, 0, 5, 5),
        ),
        _cfg(model_type="qwen2", bias_projections=("q_proj", "k_proj", "v_proj")),
        _cfg(model_type="mixtral", num_experts=8, experts_per_token=2, layer_windows=(9,) * 4),
        _cfg(model_type="mixtral", num_experts=5, experts_per_token=3, router_aux_loss_coef=0.02),
        _qwen3_moe(),
        _qwen3_moe(normalize_expert_weights=False, layer_windows=(9,) * 4),
        _qwen3_moe(
            num_experts=5,
            experts_per_token=3,
            expert_intermediate_size=24,  # as wide as intermediate_size
            router_aux_loss_coef=0.02,
            tie_word_embeddings=True,
        ),
        _qwen2_moe(),
        _qwen2_moe(  # every other layer slides; renormalized; no biases; aux loss
            layer_windows=(9, 0, 9, 0),
            normalize_expert_weights=True,
            bias_projections=(),
            router_aux_loss_coef=0.02,
        ),
        _qwen2_moe(layer_windows=(9, 0, 0, 0), tie_word_embeddings=True),  # below layer 1
    ],
)
def test_hf_config_round_trips(config):
    hf = json.loads(json.dumps(hf_config_dict(config, "bfloat16")))
    assert lorax.ModelConfig.from_hf_dict(hf) == config
    # transformers agrees on what it means.
    parsed = transformers.AutoConfig.for_model(**hf)
    assert parsed.num_key_value_heads == config.num_kv_heads and parsed.head_dim == config.head_dim
    assert parsed.rope_parameters["rope_type"] == config.rope.type
    if config.moe:  # Qwen 2 MoE's config has num_experts only (no attribute map)
        count = parsed.num_experts if config.shared_expert else parsed.num_local_experts
        assert (count, parsed.num_experts_per_tok) == (config.num_experts, config.experts_per_token)
        assert parsed.output_router_logits == (config.router_aux_loss_coef is not None)
        if config.router_aux_loss_coef is not None:
            assert parsed.router_aux_loss_coef == config.router_aux_loss_coef
    if config.model_type in ("qwen3_moe", "qwen2_moe"):
        assert (parsed.moe_intermediate_size, parsed.norm_topk_prob) == (
            config.expert_width,
            config.normalize_expert_weights,
        )
    if config.model_type == "qwen3_moe":
        window = max(config.layer_windows) or None
        assert (parsed.use_sliding_window, parsed.sliding_window) == (bool(window), window)
    if config.model_type == "qwen2_moe":
        assert parsed.shared_expert_intermediate_size == config.mlp_width
        assert parsed.qkv_bias == bool(config.bias_projections)
        windows = config.layer_windows
        assert parsed.layer_types == ["sliding_attention" if w else "full_attention"
                                      for w in windows]  # fmt: skip
        assert parsed.sliding_window == max(windows)  # 0 without a window, as it spells it
        # Readers that ignore layer_types take the same layers from max_window_layers.
        legacy = {k: v for k, v in hf.items() if k != "layer_types"}
        assert lorax.ModelConfig.from_hf_dict(legacy) == config


def _rope_type_and_theta(params) -> tuple[str, float]:
    return params["rope_type"], params["rope_theta"]


@pytest.mark.parametrize(
    "config",
    [
        _cfg(
            model_type="qwen3",
            qk_norm=True,
            bias_projections=("q_proj", "k_proj", "v_proj", "o_proj"),
            layer_windows=(0, 5, 5, 5),
            rope=lorax.RopeConfig(theta=1e6, type="linear", factor=4.0),
        ),
        _cfg(model_type="qwen3", qk_norm=True),
        _gemma(query_pre_attn_scalar=144.0, attn_logit_softcap=20.0, eos_token_id=(1, 107)),
        _gemma(  # any window pattern, no softcaps, untied
            layer_windows=(0, 9, 9, 0),
            attn_logit_softcap=None,
            final_logit_softcap=None,
            tie_word_embeddings=False,
        ),
        _gemma(layer_windows=(0, 0, 0, 0)),
        _gemma(
            "gemma3_text",
            layer_windows=(7, 7, 7, 0),
            rope=lorax.RopeConfig(theta=1e6, type="linear", factor=8.0),
        ),
        _gemma(  # a scaled RoPE on the sliding layers too: rope_parameters only
            "gemma3_text",
            rope=lorax.RopeConfig(
                theta=5e5, type="yarn", factor=4.0, original_max_position_embeddings=32
            ),
            sliding_rope=lorax.RopeConfig(theta=1e4, type="linear", factor=2.0),
            attn_logit_softcap=10.0,
            final_logit_softcap=15.0,
            max_position_embeddings=128,
        ),
    ],
)
def test_family_hf_config_round_trips_and_reads_in_transformers(config):
    hf = json.loads(json.dumps(hf_config_dict(config, "bfloat16")))
    assert lorax.ModelConfig.from_hf_dict(hf) == config
    parsed = transformers.AutoConfig.for_model(**hf)
    assert parsed.model_type == config.model_type
    windows = config.layer_windows
    assert parsed.layer_types == ["sliding_attention" if w else "full_attention" for w in windows]
    if any(windows):
        assert parsed.sliding_window == max(windows)
    assert parsed.tie_word_embeddings == config.tie_word_embeddings
    assert parsed.head_dim == config.head_dim
    if config.model_type == "qwen3":
        assert parsed.use_sliding_window == any(windows)
        assert parsed.attention_bias == bool(config.bias_projections)
        assert _rope_type_and_theta(parsed.rope_parameters) == (config.rope.type, config.rope.theta)
        return
    assert parsed.hidden_activation == "gelu_pytorch_tanh"
    assert parsed.query_pre_attn_scalar == config.query_pre_attn_scalar
    assert parsed.attn_logit_softcapping == config.attn_logit_softcap
    assert parsed.final_logit_softcapping == config.final_logit_softcap
    if config.model_type == "gemma2":
        assert _rope_type_and_theta(parsed.rope_parameters) == (config.rope.type, config.rope.theta)
        return
    # Gemma 3: one RoPE per layer type, and the legacy spelling beside it (older readers).
    ropes = parsed.rope_parameters
    for layer_type, rope in (
        ("full_attention", config.rope),
        ("sliding_attention", config.sliding_rope),
    ):
        assert _rope_type_and_theta(ropes[layer_type]) == (rope.type, rope.theta), layer_type
        assert ropes[layer_type].get("factor", 1.0) == rope.factor, layer_type
    assert hf["rope_theta"] == config.rope.theta
    if config.sliding_rope.type == "default":
        assert hf["rope_local_base_freq"] == config.sliding_rope.theta
        # Readers older than layer_types take the layout from sliding_window_pattern.
        legacy = {k: v for k, v in hf.items() if k not in ("rope_parameters", "layer_types")}
        assert lorax.ModelConfig.from_hf_dict(legacy) == config


@pytest.mark.parametrize(
    "config, message",
    [
        (_cfg(layer_windows=(0, 4, 0, 4)), "llama has no sliding-window"),
        (_cfg(model_type="mistral", layer_windows=(0, 4, 4, 4)), "every layer or none"),
        (
            _cfg(
                model_type="qwen2",
                bias_projections=("q_proj", "k_proj", "v_proj"),
                layer_windows=(4, 0, 0, 4),
            ),
            "max_window_layers",
        ),
        (_cfg(model_type="qwen2"), "qwen2 has biases"),
        (_cfg(bias_projections=("q_proj",)), "attention_bias"),
        (
            _cfg(model_type="qwen3", qk_norm=True, bias_projections=("gate_proj",)),
            "no MLP biases",
        ),
        (_cfg(model_type="qwen3"), r"cannot express \['qk_norm'\]"),
        (_cfg(final_logit_softcap=30.0), "softcaps"),
        (_gemma(query_pre_attn_scalar=24.5), "query_pre_attn_scalar"),
        (_gemma(sandwich_norms=False), "sandwich_norms"),
        (_gemma(layer_windows=(7, 0, 9, 0)), "one sliding window size"),
        (_gemma(sliding_rope=lorax.RopeConfig(theta=1e4)), "one RoPE"),
        (_cfg(num_experts=4, experts_per_token=2), r"llama's config.json cannot express \['moe'\]"),
        (_cfg(model_type="mixtral"), r"cannot express \['moe'\]"),
        (
            _cfg(
                model_type="mixtral", num_experts=4, experts_per_token=2, layer_windows=(0, 4) * 2
            ),
            "every layer or none",
        ),
        (
            _cfg(
                model_type="mixtral",
                num_experts=4,
                experts_per_token=2,
                bias_projections=("q_proj",),
            ),
            "no projection biases",
        ),
        # Qwen 3 MoE's experts (their own width, weights not renormalized) as a Mixtral.
        (
            _qwen3_moe(model_type="mixtral", qk_norm=False, round_expert_weights=False),
            r"mixtral's experts are intermediate_size wide.*expert width 12 \(intermediate_size 24",
        ),
        (
            _qwen3_moe(
                model_type="mixtral",
                qk_norm=False,
                round_expert_weights=False,
                expert_intermediate_size=None,
                normalize_expert_weights=False,
            ),
            "normalize=False",
        ),
        (_qwen3_moe(qk_norm=False), r"qwen3_moe's config.json cannot express \['qk_norm'\]"),
        (_qwen3_moe(round_expert_weights=False), r"cannot express \['round_expert_weights'\]"),
        (_qwen3_moe(layer_windows=(0, 4, 4, 4)), "every layer or none"),
        (
            _qwen3_moe(shared_expert_intermediate_size=16),
            r"qwen3_moe's config.json cannot express \['shared_expert'\]",
        ),
        (
            _qwen2_moe(shared_expert_intermediate_size=None),
            r"qwen2_moe's config.json cannot express \['shared_expert'\]",
        ),
        (_qwen2_moe(bias_projections=ATTENTION), r"qkv_bias covers exactly.*'o_proj'"),
        (_qwen2_moe(layer_windows=(0, 4, 0, 4)), "every other layer, the first included"),
        (_qwen2_moe(layer_windows=(4, 4, 4, 4)), "every other layer, the first included"),
    ],
)
def test_hf_config_refuses_what_the_format_cannot_say(config, message):
    with pytest.raises(HFConfigError, match=message):
        hf_config_dict(config, "float32")


def test_parse_size_and_shard_packing(tmp_path):
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(7) == 7
    with pytest.raises(ValueError, match="size must be"):
        parse_size("5 gigs")
    writer = ShardWriter(str(tmp_path), max_shard_size=100)
    for k, n in enumerate([10, 10, 10, 30, 5]):  # float32: 40, 40, 40, 120, 20 bytes
        writer.add({f"t{k}": np.full(n, k, np.float32)})
    files = writer.close()
    assert files[-1] == INDEX_FILE
    with open(tmp_path / INDEX_FILE) as f:
        weight_map = json.load(f)["weight_map"]
    # Greedy in order: [t0, t1] (80), [t2] (t3 would overflow), [t3] alone (over the limit), [t4].
    assert [weight_map[f"t{k}"][6:11] for k in range(5)] == [
        "00001",
        "00001",
        "00002",
        "00003",
        "00004",
    ]
    assert sorted(os.listdir(tmp_path)) == sorted(files)
