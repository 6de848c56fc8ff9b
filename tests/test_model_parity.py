"""Logits parity with transformers' PyTorch implementation on tiny random configs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import bnb_dequantize, make_hf_model, rel_err, torch_logits

import lorax

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
    "rope_theta": 500000.0,
}

GEMMA3_TEXT = dict(
    head_dim=16,
    sliding_window=8,
    layer_types=["sliding_attention", "full_attention"],
    rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    },
)

# Qwen 3 MoE: 4 experts narrower than intermediate_size (which no layer then uses), 2 per
# token, their weights renormalized as Qwen3-30B-A3B's are.
QWEN3_MOE = dict(
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True
)

# Qwen 2 MoE: Qwen 2's q/k/v biases, 4 experts narrower than intermediate_size (which no layer
# then uses), 2 per token, their weights not renormalized (as Qwen1.5-MoE-A2.7B's and
# Qwen2-57B-A14B's), and beside them a shared expert of its own width, sigmoid-gated.
QWEN2_MOE = dict(
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
    shared_expert_intermediate_size=80,
)  # fmt: skip

# DeepSeek V3 (DeepSeek-V3, Kimi's Moonlight): latent attention with a query latent,
# interleaved RoPE, values narrower than the query/key heads; a dense first layer, then
# sigmoid routing with a correction bias among the best 2 of 4 groups, weights renormalized
# and scaled, beside an unscaled shared expert.
DEEPSEEK_V3 = dict(
    num_hidden_layers=3, num_key_value_heads=4, first_k_dense_replace=1, n_routed_experts=8,
    num_experts_per_tok=2, n_group=4, topk_group=2, moe_intermediate_size=32,
    n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=24,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
)  # fmt: skip
# DeepSeek V2 (DeepSeek-V2-Lite's form): queries straight from x, softmax routing chosen
# within groups by their best expert, two shared experts.
DEEPSEEK_V2 = dict(
    num_hidden_layers=3, num_key_value_heads=4, first_k_dense_replace=1, n_routed_experts=8,
    num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4, topk_group=2,
    moe_intermediate_size=32, n_shared_experts=2, routed_scaling_factor=1.5, q_lora_rank=None,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
)  # fmt: skip

CASES = {
    "llama-llama3-rope": ("llama", dict(rope_parameters=LLAMA3_ROPE)),
    "llama-headdim-mqa-bias-tied": (
        "llama",
        dict(head_dim=24, num_key_value_heads=1, attention_bias=True, tie_word_embeddings=True),
    ),
    "llama-linear-rope-mlp-bias": (
        "llama",
        dict(
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
            mlp_bias=True,
        ),
    ),
    "llama-dynamic-rope": (
        "llama",
        dict(
            max_position_embeddings=24,
            rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        ),
    ),
    "llama-yarn-rope": (
        "llama",
        dict(
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "rope_theta": 10000.0,
                "original_max_position_embeddings": 32,
            }
        ),
    ),
    "mistral-window": ("mistral", dict(sliding_window=8)),
    "qwen2-bias": ("qwen2", dict(num_key_value_heads=4)),
    "qwen3-qk-norm": ("qwen3", dict(head_dim=24)),
    "qwen3-bias-window": (
        "qwen3",
        dict(attention_bias=True, use_sliding_window=True, sliding_window=8, max_window_layers=1),
    ),
    # Gemma 2: softcaps, sandwich norms, GeGLU, scaled embeddings, alternating windows, and a
    # query scale other than head_dim's. Caps small enough to bend these tiny models' scores
    # and logits (at Gemma 2's 50 and 30 they would be nearly linear here).
    "gemma2": (
        "gemma2",
        dict(
            head_dim=16,
            sliding_window=8,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "gemma2-untied-no-softcap": (
        "gemma2",
        dict(
            head_dim=16,
            sliding_window=8,
            tie_word_embeddings=False,
            attn_logit_softcapping=None,
            final_logit_softcapping=None,
        ),
    ),
    # Phi-3: fused qkv_proj and gate_up_proj, a window on every layer.
    "phi3-window": ("phi3", dict(sliding_window=8, pad_token_id=0)),
    # Phi-3.5 / Phi-4-mini: longrope (past its pre-training length of 16 here) and partial
    # rotary.
    "phi3-longrope-partial": (
        "phi3",
        dict(
            pad_token_id=0,
            max_position_embeddings=64,
            original_max_position_embeddings=16,
            partial_rotary_factor=0.5,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0, 1.1, 1.3, 1.7],
                "long_factor": [1.0, 2.0, 4.0, 9.0],
                "original_max_position_embeddings": 16,
                "partial_rotary_factor": 0.5,
            },
        ),
    ),
    # Mixtral: 4 experts, 2 per token, a window on every layer.
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8)),
    "mixtral-top3-of-5": ("mixtral", dict(num_local_experts=5, num_experts_per_tok=3)),
    # Qwen 3 MoE (Qwen3-30B-A3B's form): q/k norms, experts narrower than intermediate_size,
    # chosen weights renormalized (norm_topk_prob) or not, and a window on every layer.
    "qwen3-moe": ("qwen3_moe", QWEN3_MOE),
    "qwen3-moe-unnormalized-window": (
        "qwen3_moe",
        dict(
            QWEN3_MOE,
            norm_topk_prob=False,
            num_experts=5,
            num_experts_per_tok=3,
            use_sliding_window=True,
            sliding_window=8,
        ),
    ),
    "qwen2-moe": ("qwen2_moe", QWEN2_MOE),
    # ... renormalized (norm_topk_prob), top-3 of 5, without biases, and a window on every
    # other layer from the first (transformers' layer_types for use_sliding_window).
    "qwen2-moe-normalized-window-unbiased": (
        "qwen2_moe",
        dict(
            QWEN2_MOE,
            norm_topk_prob=True,
            num_experts=5,
            num_experts_per_tok=3,
            qkv_bias=False,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=2,
        ),
    ),
    # Qwen MoE with dense-MLP layers among the routed ones (mlp_only_layers, and
    # decoder_sparse_step: a layer routes when its number from 1 is a multiple): two layer
    # stacks, scanned in turns. Qwen 2 MoE's dense layers have no shared expert.
    "qwen3-moe-dense-layers": (
        "qwen3_moe",
        dict(QWEN3_MOE, num_hidden_layers=4, mlp_only_layers=[0, 2]),
    ),
    "qwen2-moe-sparse-step": (
        "qwen2_moe",
        dict(QWEN2_MOE, num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3]),
    ),
    "deepseek-v3": ("deepseek_v3", DEEPSEEK_V3),
    # ... with YaRN (its softmax scale grows by mscale_all_dim's factor) and RoPE's pairs
    # split in halves (rope_interleave false), greedy routing.
    "deepseek-v3-yarn-halves": (
        "deepseek_v3",
        dict(
            DEEPSEEK_V3,
            rope_interleave=False,
            n_group=1,
            topk_group=1,
            norm_topk_prob=False,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "rope_theta": 10000.0,
                "original_max_position_embeddings": 16,
                "mscale": 1.0,
                "mscale_all_dim": 0.8,
            },
        ),
    ),  # fmt: skip
    "deepseek-v2": ("deepseek_v2", DEEPSEEK_V2),
    # Gemma 3: q/k norms, and the full layers' RoPE (scaled) apart from the sliding layers'.
    "gemma3-two-ropes": ("gemma3_text", GEMMA3_TEXT),
    # Gemma 3's image-text model (4B-27B): the same language model beside a vision tower,
    # run on text (Gemma3ForConditionalGeneration's logits).
    "gemma3-image-text": ("gemma3", GEMMA3_TEXT),
    # ... with an untied head, which the image-text model keeps as language_model.lm_head.
    "gemma3-image-text-untied": ("gemma3", dict(GEMMA3_TEXT, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_f32(tmp_path, rng, case):
    model_type, overrides = CASES[case]
    torch_model, path = make_hf_model(tmp_path, model_type, **overrides)
    model = lorax.load(path, dtype="float32")
    ids = rng.integers(0, model.config.vocab_size, size=(2, 40))
    ours = jax.jit(lorax.forward)(model, None, jnp.asarray(ids))
    assert rel_err(ours, torch_logits(torch_model, ids)) < 1e-4


@pytest.mark.parametrize("case", ["llama-llama3-rope", "gemma2", "gemma3-two-ropes"])
def test_logits_match_transformers_bf16(tmp_path, rng, case):
    model_type, overrides = CASES[case]
    torch_model, path = make_hf_model(tmp_path, model_type, **overrides)
    model = lorax.load(path, dtype="bfloat16")
    ids = rng.integers(0, model.config.vocab_size, size=(2, 32))
    ours = jax.jit(lorax.forward)(model, None, jnp.asarray(ids))
    ref = torch_logits(torch_model.bfloat16(), ids)
    # bf16 has an 8-bit mantissa: per-op rounding (~4e-3) compounds over 2 layers.
    assert rel_err(ours, ref) < 3e-2
    assert np.mean(np.argmax(ours, -1) == np.argmax(ref, -1)) > 0.9


def test_gemma3_image_text_model_on_text_as_its_users_call_it(tmp_path, rng):
    """Text-only users of Gemma3ForConditionalGeneration pass the processor's outputs:
    token_type_ids (all 0: no image tokens, so no bidirectional blocks) and a mask of ones.
    Its masks are then the text model's: causal, and the window on sliding layers."""
    import torch

    model_type, overrides = CASES["gemma3-image-text"]
    torch_model, path = make_hf_model(tmp_path, model_type, **overrides)
    model = lorax.load(path, dtype="float32")
    assert model.config.checkpoint_layout == "image_text"
    ids = rng.integers(0, model.config.vocab_size, size=(2, 40))  # 5 windows long
    ours = jax.jit(lorax.forward)(model, None, jnp.asarray(ids))
    zeros, ones = torch.zeros(ids.shape, dtype=torch.long), torch.ones(ids.shape, dtype=torch.long)
    theirs = torch_logits(torch_model, ids, token_type_ids=zeros, attention_mask=ones)
    assert rel_err(ours, theirs) < 1e-4


def test_packed_segments_equal_separate_sequences(tmp_path, rng):
    _, path = make_hf_model(tmp_path, "mistral", sliding_window=6)
    model = lorax.load(path, dtype="float32")
    lengths = (11, 7, 14)
    seqs = [rng.integers(0, model.config.vocab_size, size=n) for n in lengths]
    ids = np.concatenate(seqs)[None]
    segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
    positions = np.concatenate([np.arange(n) for n in lengths])[None]
    packed = lorax.forward(
        model,
        None,
        jnp.asarray(ids),
        positions=jnp.asarray(positions),
        segment_ids=jnp.asarray(segment_ids),
    )
    start = 0
    for seq in seqs:
        alone = lorax.forward(model, None, jnp.asarray(seq[None]))
        np.testing.assert_allclose(packed[0, start : start + len(seq)], alone[0], atol=1e-5)
        start += len(seq)


def test_nf4_model_matches_transformers_with_bnb_weights(tmp_path, rng):
    """The NF4 path end to end: lorax's quantized forward == HF with bnb-dequantized weights."""
    bnb_f = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes checks NF4")
    import torch

    torch_model, path = make_hf_model(tmp_path, "llama")
    model = lorax.load(path, quantize="nf4", dtype="float32")
    with torch.no_grad():
        for name, module in torch_model.named_modules():
            if name.endswith("_proj"):
                q, state = bnb_f.quantize_4bit(
                    module.weight.data, blocksize=64, quant_type="nf4", compress_statistics=True
                )
                module.weight.copy_(bnb_dequantize(bnb_f, q, state))
    ids = rng.integers(0, model.config.vocab_size, size=(1, 24))
    ours = lorax.forward(model, None, jnp.asarray(ids))
    assert isinstance(model.params["layers"]["q_proj"]["weight"], lorax.NF4Tensor)
    # bnb's CPU double-quant rounding is one step off in ~0.2% of blocks (see nf4.py).
    assert rel_err(ours, torch_logits(torch_model, ids)) < 2e-3


def test_longrope_switches_factors_where_transformers_does(tmp_path, rng):
    """Short factors while every position is within the pre-training length, long ones once
    any passes it (HF decides by max(position) + 1, so a packed row of short examples keeps
    the short factors)."""
    model_type, overrides = CASES["phi3-longrope-partial"]
    torch_model, path = make_hf_model(tmp_path, model_type, **overrides)
    model = lorax.load(path, dtype="float32")
    forward = jax.jit(lorax.forward)
    for length in (12, 16, 17):
        ids = rng.integers(0, model.config.vocab_size, size=(1, length))
        ours = forward(model, None, jnp.asarray(ids))
        assert rel_err(ours, torch_logits(torch_model, ids)) < 1e-4, length
