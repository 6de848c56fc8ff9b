"""DeepSeek V2/V3 as llama.cpp's ``deepseek2`` GGUF, checked against llama.cpp itself.

* llama.cpp computes our f32 file as lorax computes the model with LoRA on every projection
  (latent attention, dense layer, shared and routed experts), for V3's sigmoid routing with
  groups, selection bias, scaling and renormalization, V2's softmax routing with two shared
  experts, and YaRN with RoPE turning halves; the file holds what llama.cpp's converter
  writes (the keys, ``kv_b_proj`` split into ``attn_k_b``/``attn_v_b``).
* llama-quantize on our f32 file gives every tensor the type our export does, with the same
  bytes (the fallbacks of rows too short for a block included).
* What deepseek2 computes otherwise is refused with the reason, and leaves no file.
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest
from test_gguf import (
    _cpp_logits,
    _ids,
    _llama_quantize,
    _lora,
    _lorax_logits,
    _model,
    _rel,
    _same_as_llama_quantize,
    llama_cpp,  # noqa: F401 (fixture)
    out,  # noqa: F401 (fixture)
)
from test_model_parity import DEEPSEEK_V2, DEEPSEEK_V3

import lorax
from convert.gguf import GGUFError, GGUFFile
from convert.gguf.format import TensorType as T
from convert.merged import merge_lora_weight

# llama.cpp norms the latents with rms_norm_eps, DeepSeek with 1e-6 (the released models' own).
EPS = dict(rms_norm_eps=1e-6)
CASES = {  # name -> (model_type, overrides)
    # A query latent, 4 groups of 2 experts (2 kept by their top-2 sums), the selection bias,
    # renormalized weights scaled by 2.5, one shared expert, layer 0 dense.
    "deepseek-v3": ("deepseek_v3", dict(DEEPSEEK_V3, **EPS)),
    # Queries from x, softmax over all 8 experts (top 3, not renormalized, scaled by 1.5),
    # two shared experts.
    "deepseek-v2": (
        "deepseek_v2",
        dict(DEEPSEEK_V2, **EPS, topk_method="greedy", n_group=1, topk_group=1),
    ),
    # YaRN (attention scaled by mscale_all_dim's factor squared) and RoPE turning halves,
    # whose rotary rows the file reorders into llama.cpp's pairs.
    "deepseek-v3-yarn-halves": (
        "deepseek_v3",
        dict(
            DEEPSEEK_V3,
            **EPS,
            rope_interleave=False,
            max_position_embeddings=64,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "rope_theta": 10000.0,
                "original_max_position_embeddings": 16,
                "mscale": 0.8,
                "mscale_all_dim": 0.8,
            },
        ),
    ),
}


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory, out):  # noqa: F811
    """``get(name)`` -> (model, lora on every projection, path of its f32 GGUF)."""
    cache = {}

    def get(name):
        if name not in cache:
            model_type, overrides = CASES[name]
            model = _model(tmp_path_factory, model_type, **overrides)
            lora = _lora(model)
            path = out / f"{name}-f32.gguf"
            lorax.export_gguf(model, lora, path, quant="f32", name="tiny")
            cache[name] = model, lora, path
        return cache[name]

    return get


def _merged(model, lora, stack, projection, position):
    """A projection's matrix at ``position`` of ``stack`` with its adapter merged."""
    adapter = lora.params[stack][projection]
    return np.asarray(
        merge_lora_weight(
            model.params[stack][projection]["weight"][position],
            adapter["lora_a"][position],
            adapter["lora_b"][position],
            lora.config.scale,
            jnp.float32,
        )
    )


def _check_keys(f, c):
    a = "deepseek2"
    routing = c.routing()
    expected = {
        "attention.head_count": c.num_heads,
        "attention.head_count_kv": 1,
        "attention.key_length": c.kv_lora_rank + c.qk_rope_head_dim,
        "attention.value_length": c.kv_lora_rank,
        "attention.key_length_mla": c.qk_nope_head_dim + c.qk_rope_head_dim,
        "attention.value_length_mla": c.v_head_dim,
        "attention.q_lora_rank": c.q_lora_rank or 0,
        "attention.kv_lora_rank": c.kv_lora_rank,
        "rope.dimension_count": c.qk_rope_head_dim,
        "leading_dense_block_count": 1,
        "feed_forward_length": c.intermediate_size,
        "expert_feed_forward_length": c.expert_width,
        "expert_count": c.num_experts,
        "expert_used_count": c.experts_per_token,
        "expert_shared_count": c.mlp_width // c.expert_width,
        "expert_gating_func": {"softmax": 1, "sigmoid": 2}[routing.scoring],
        "expert_weights_norm": routing.normalize,
    }
    for key, value in expected.items():
        assert f.get(f"{a}.{key}") == value, key
    assert np.isclose(f.get(f"{a}.expert_weights_scale"), routing.scaling)
    if routing.groups > 1:
        assert f.get(f"{a}.expert_group_count") == routing.groups
        assert f.get(f"{a}.expert_group_used_count") == routing.groups_kept
    else:
        assert f"{a}.expert_group_count" not in f.metadata
    if c.rope.type == "yarn":
        assert f.get(f"{a}.rope.scaling.type") == "yarn"
        assert np.isclose(f.get(f"{a}.rope.scaling.yarn_log_multiplier"), 0.08)
        assert f"{a}.rope.scaling.attn_factor" not in f.metadata


def _check_tensors(f, model, lora):
    """Layer 0 dense, layer 1 routed with shared experts; ``kv_b_proj`` split per head, each
    head's key rows transposed, computed here head by head from the merged matrix."""
    c = model.config
    assert "blk.0.ffn_gate.weight" in f and "blk.0.ffn_gate_exps.weight" not in f
    assert f.tensors["blk.0.ffn_down.weight"].shape == (c.hidden_size, c.intermediate_size)
    assert "blk.1.ffn_gate_exps.weight" in f and "blk.1.ffn_gate.weight" not in f
    np.testing.assert_allclose(
        f.tensor("blk.1.ffn_up_shexp.weight"),
        _merged(model, lora, "layers", "up_proj", 0),
        rtol=1e-6,
        atol=1e-7,
    )
    np.testing.assert_allclose(
        f.tensor("blk.0.ffn_up.weight"),
        _merged(model, lora, "dense_layers", "up_proj", 0),
        rtol=1e-6,
        atol=1e-7,
    )
    assert not any(name.endswith("attn_kv_b.weight") for name in f.tensors)
    nope, v = c.qk_nope_head_dim, c.v_head_dim
    for layer, (stack, position) in enumerate([("dense_layers", 0), ("layers", 0), ("layers", 1)]):
        kv_b = _merged(model, lora, stack, "kv_b_proj", position)
        k_b, v_b = (
            f.tensor(f"blk.{layer}.attn_k_b.weight"),
            f.tensor(f"blk.{layer}.attn_v_b.weight"),
        )
        assert k_b.shape == (c.num_heads, c.kv_lora_rank, nope)
        assert v_b.shape == (c.num_heads, v, c.kv_lora_rank)
        for h in range(c.num_heads):
            rows = kv_b[h * (nope + v) : (h + 1) * (nope + v)]
            np.testing.assert_allclose(k_b[h], rows[:nope].T, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(v_b[h], rows[nope:], rtol=1e-6, atol=1e-7)
    bias = "blk.1.exp_probs_b.bias"
    if c.router_bias:
        assert f.tensors[bias].type == T.F32 and f.tensors[bias].shape == (c.num_experts,)
        np.testing.assert_array_equal(
            f.tensor(bias), np.asarray(model.params["layers"]["router_bias"][0])
        )
    else:
        assert bias not in f


@pytest.mark.parametrize("name", list(CASES))
def test_llama_cpp_computes_deepseek(llama_cpp, deepseek, name):  # noqa: F811
    """llama.cpp's deepseek2 runs our f32 file (float32 KV cache) as lorax computes the model
    with its LoRA; each check below that the keys matter is the same model computed with
    one fact changed, far from llama.cpp's logits."""
    model, lora, path = deepseek(name)
    c = model.config
    f = GGUFFile(path)
    assert f.architecture == "deepseek2"
    _check_keys(f, c)
    _check_tensors(f, model, lora)
    ids = _ids(model)
    cpp = _cpp_logits(llama_cpp, path, ids, type_k=0, type_v=0)
    ours = _lorax_logits(model, lora, ids)
    error = _rel(cpp, ours)
    changes = {"routed_scaling_factor": 1.0}
    if c.rope.type == "yarn":
        changes = {"rope_interleave": True, "query_pre_attn_scalar": None}
    other = lorax.Model(model.params, dataclasses.replace(c, **changes), None)
    changed = _rel(cpp, _lorax_logits(other, lora, ids))
    print(
        f"{name} f32: llama.cpp vs lorax {error:.1e} over {len(ids)} tokens; "
        f"with {changes} {changed:.1e}"
    )
    assert error < 1e-4
    assert (cpp.argmax(-1) == ours.argmax(-1)).all()
    assert changed > 1e-2


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-v2"])
def test_deepseek_quantizes_like_llama_cpp(llama_cpp, deepseek, out, name):  # noqa: F811
    """llama-quantize on our f32 file gives every tensor our export's type and bytes: the
    router and selection bias stay float32, 64-wide rows fall back from the K-quants to
    Q5_0/Q8_0 (Q4_K_M's ffn_down bump), and the key halves of ``kv_b_proj``, rows 8 wide,
    to F16."""
    model, lora, f32_path = deepseek(name)
    for quant in ("q4_k_m", "q8_0"):
        cpp_path = out / f"{name}-cpp-{quant}.gguf"
        ours_path = out / f"{name}-ours-{quant}.gguf"
        _llama_quantize(llama_cpp, f32_path, cpp_path, quant)
        lorax.export_gguf(model, lora, ours_path, quant=quant, name="tiny")
        cpp, ours = GGUFFile(cpp_path), GGUFFile(ours_path)
        _same_as_llama_quantize(cpp, ours, quant)
        assert ours.tensors["blk.1.ffn_gate_inp.weight"].type == T.F32
        assert ours.tensors["blk.0.attn_k_b.weight"].type == T.F16


@pytest.mark.parametrize(
    "name, change, match",
    [
        ("deepseek-v3", dict(rms_norm_eps=1e-5), r"norms the attention latents.*1e-05"),
        (
            "deepseek-v2",
            dict(expert_groups=4, expert_groups_kept=2, expert_group_score="max"),
            r"best top-2 sums.*'max'.*group_limited_greedy",
        ),
        ("deepseek-v3", dict(shared_expert_intermediate_size=48), "whole number of experts"),
        (
            "deepseek-v3",
            dict(num_layers=27, layer_windows=(0,) * 27),
            r"27 layers for DeepSeek-V2-Lite, without a query latent.*q_lora_rank=24",
        ),
        (
            "deepseek-v3-yarn-halves",
            dict(
                rope=lorax.RopeConfig(
                    type="yarn",
                    factor=4.0,
                    original_max_position_embeddings=16,
                    mscale=1.0,
                    mscale_all_dim=0.8,
                )
            ),
            "leaves the rotation unscaled",
        ),
    ],
)
def test_what_deepseek2_cannot_compute_is_refused(deepseek, tmp_path, name, change, match):
    """V2's groups scored by their best expert (llama.cpp scores by the top-2 sum), latent
    norms with another epsilon than rms_norm_eps, shared experts that are not whole experts
    wide, a query latent in a model of V2-Lite's layer count, YaRN that scales the rotation:
    errors that say why, and leave no file."""
    model, _, _ = deepseek(name)
    changed = lorax.Model(model.params, dataclasses.replace(model.config, **change), None)
    with pytest.raises(GGUFError, match=match):
        lorax.export_gguf(changed, None, tmp_path / "x.gguf", quant="f16")
    assert os.listdir(tmp_path) == []


def test_lorax_does_not_read_deepseek2_files_yet(deepseek):
    _, _, path = deepseek("deepseek-v3")
    with pytest.raises(GGUFError, match=r"'deepseek2' \(lorax exports it, but does not read it"):
        lorax.load(str(path))
