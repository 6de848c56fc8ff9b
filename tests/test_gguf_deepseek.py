"""DeepSeek V2/V3 as llama.cpp's ``deepseek2`` GGUF, checked against llama.cpp itself.

* llama.cpp computes our f32 file as lorax computes the model with LoRA on every projection
  (latent attention, dense layer, shared and routed experts), for V3's sigmoid routing with
  groups, selection bias, scaling and renormalization, V2's softmax routing with two shared
  experts, and YaRN with RoPE turning halves; the file holds what llama.cpp's converter
  writes (the keys, ``kv_b_proj`` split into ``attn_k_b``/``attn_v_b``).
* llama-quantize on our f32 file gives every tensor the type our export does, with the same
  bytes (the fallbacks of rows too short for a block included).
* What deepseek2 computes otherwise is refused with the reason, and leaves no file.
* lorax reads the files back: the f32 file is the merged model (a model that turns RoPE
  halves reads back as one that turns pairs, with its rotary rows as the file has them) and
  writes the same file again; llama.cpp computes our quantized files as lorax computes them
  read back; files lorax cannot read as llama.cpp computes them are refused by key or tensor.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_gguf import (
    QUANTIZED_ENGINE_TOLERANCE,
    _cpp_logits,
    _ids,
    _llama_quantize,
    _lora,
    _lorax_logits,
    _merged_experts,
    _model,
    _rel,
    _rewrite,
    _same_as_llama_quantize,
    llama_cpp,  # noqa: F401 (fixture)
    out,  # noqa: F401 (fixture)
)
from test_model_parity import DEEPSEEK_V2, DEEPSEEK_V3

import lorax
from convert.gguf import GGUFError, GGUFFile
from convert.gguf.format import TensorType as T
from convert.gguf.format import ValueType, array, boolean, f32, string, u32
from convert.gguf.layout import ARCHES, rope_rows, to_gguf_rope_rows
from convert.gguf.metadata import model_metadata
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
    if routing.groups_kept < routing.groups:
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
    # YaRN's case: the rotary rows' order, and the attention scale YaRN's keys imply.
    facts = [{"rope_interleave": True}, {"query_pre_attn_scalar": None}]
    if c.rope.type != "yarn":
        facts = [{"routed_scaling_factor": 1.0}]
    changed = {}
    for fact in facts:
        other = lorax.Model(model.params, dataclasses.replace(c, **fact), None)
        changed[str(fact)] = _rel(cpp, _lorax_logits(other, lora, ids))
    print(f"{name} f32: llama.cpp vs lorax {error:.1e} over {len(ids)} tokens; {changed}")
    assert error < 1e-4
    assert (cpp.argmax(-1) == ours.argmax(-1)).all()
    assert all(value > 1e-2 for value in changed.values()), changed


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
            r"27 layers \(vocabulary 320\) for DeepSeek-V2-Lite, without a query latent.*"
            r"q_lora_rank=24",
        ),
        (
            "deepseek-v3",
            dict(num_layers=48, layer_windows=(0,) * 48, vocab_size=128256),
            r"48 layers \(vocabulary 128256\) for DeepSeek-V2-Lite",
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
    wide, a query latent in a model llama.cpp takes for V2-Lite by its shape (26 or 27 layers,
    or 48 with a vocabulary of 128256), YaRN that scales the rotation:
    errors that say why, and leave no file."""
    model, _, _ = deepseek(name)
    changed = lorax.Model(model.params, dataclasses.replace(model.config, **change), None)
    with pytest.raises(GGUFError, match=match):
        lorax.export_gguf(changed, None, tmp_path / "x.gguf", quant="f16")
    assert os.listdir(tmp_path) == []


def _file_params(model, lora):
    """What the f32 file of ``model`` with ``lora`` holds, as lorax's parameter tree: each
    projection with its adapter merged in float32 (each expert's own), everything else as it
    is, and where RoPE turns halves the rotary rows in llama.cpp's pairs."""
    c = model.config
    expected = dict(model.params)
    for stack in c.layer_stacks():
        adapters = lora.params[stack.key]
        layers = dict(model.params[stack.key])
        for name in adapters:
            weight = layers[name]["weight"]
            positions = range(len(stack.layers))
            if name.startswith("experts_"):
                merged = [
                    _merged_experts(model, lora, name, p).reshape(weight.shape[1:])
                    for p in positions
                ]
            else:
                merged = [_merged(model, lora, stack.key, name, p) for p in positions]
                rows = rope_rows(ARCHES["deepseek2"], c, (stack.key, name, "weight"))
                if rows is not None:
                    merged = [to_gguf_rope_rows(m, rows) for m in merged]
            layers[name] = {"weight": np.stack(merged)}
        expected[stack.key] = layers
    return expected


@pytest.mark.parametrize("name", list(CASES))
def test_deepseek_round_trips(deepseek, out, name):  # noqa: F811
    """GGUF -> lorax: the same config (a model that turns RoPE halves reads back as one that
    turns pairs, rope_interleave, with its query and rotary key rows in pair order, which
    computes the same), every parameter the merged original exactly (kv_b_proj put back
    together from attn_k_b/attn_v_b, each expert's matrices, router, selection bias, the
    dense layer); the same logits; written again, the same file."""
    model, lora, path = deepseek(name)
    c = model.config
    back = lorax.load(str(path), dtype="float32")
    changed = {} if c.rope_interleave else {"rope_interleave": True}
    assert (name == "deepseek-v3-yarn-halves") == bool(changed)
    assert back.config == dataclasses.replace(c, **changed)
    expected = _file_params(model, lora)
    assert jax.tree.structure(back.params) == jax.tree.structure(expected)
    for (where, read), value in zip(
        jax.tree_util.tree_leaves_with_path(back.params), jax.tree.leaves(expected), strict=True
    ):
        np.testing.assert_array_equal(read, value, err_msg=jax.tree_util.keystr(where))
    ids = _ids(model)
    error = _rel(_lorax_logits(back, None, ids), _lorax_logits(model, lora, ids))
    print(f"{name}: round trip {error:.1e}")
    assert error < 1e-5
    again = out / f"{name}-again.gguf"
    lorax.export_gguf(back, None, again, quant="f32", name="tiny")
    a, b = GGUFFile(path), GGUFFile(again)
    assert a.metadata.keys() == b.metadata.keys()
    for key in a.metadata:
        if key.startswith("deepseek2."):
            assert a.get(key) == b.get(key), key
    assert list(a.tensors) == list(b.tensors)
    for tensor in a.tensors:
        np.testing.assert_array_equal(a.raw(tensor), b.raw(tensor), err_msg=tensor)


def test_nf4_deepseek_gguf_reads_as_its_checkpoint(deepseek, out):  # noqa: F811
    """quantize="nf4" (bfloat16) on a DeepSeek V3 GGUF gives what loading its HF checkpoint
    does, leaf for leaf: the projections NF4 (kv_b_proj once put back together, each expert
    on its own), the router and selection bias float32, the rest bfloat16."""
    model, _, _ = deepseek("deepseek-v3")
    path = out / "deepseek-v3-base.gguf"
    lorax.export_gguf(model, None, path, quant="f32", name="tiny")
    from_gguf = lorax.load(str(path), quantize="nf4")
    from_hf = lorax.load(model.tokenizer.name_or_path, quantize="nf4")
    layers = from_gguf.params["layers"]
    assert isinstance(layers["kv_b_proj"]["weight"], lorax.NF4Tensor)
    assert layers["router"]["weight"].dtype == layers["router_bias"].dtype == jnp.float32
    assert from_gguf.params["dense_layers"]["input_layernorm"].dtype == jnp.bfloat16
    assert jax.tree.structure(from_gguf.params) == jax.tree.structure(from_hf.params)
    for a, b in zip(
        jax.tree.leaves(from_gguf.params), jax.tree.leaves(from_hf.params), strict=True
    ):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name, quant", [("deepseek-v3", "q4_k_m"), ("deepseek-v2", "q8_0")])
def test_llama_cpp_computes_quantized_deepseek(llama_cpp, deepseek, out, name, quant):  # noqa: F811
    """llama.cpp computes our quantized file (float16 KV cache) as lorax computes the same
    file read back, with the criteria of ``test_llama_cpp_computes_quantized_mixtral``: where
    the rounding of activations before each matmul moves a router's scores across a choice
    (here also across a group's), a position's logits move far. Measured over the 129
    positions (both types for both models): 97-98% within 8e-2, medians 1.3-1.6e-2, maxima
    0.12-0.17 (V2) and 0.45-0.48 (V3, whose sigmoid scores with groups flip more). So at 90%
    of the positions and in the median within the quantized engine tolerance; one
    type per model keeps the time down."""
    model, lora, _ = deepseek(name)
    path = out / f"{name}-read-{quant}.gguf"
    lorax.export_gguf(model, lora, path, quant=quant, name="tiny")
    ids = _ids(model)
    from_file = _lorax_logits(lorax.load(str(path), dtype="float32"), None, ids)
    cpp = _cpp_logits(llama_cpp, path, ids)
    per_position = np.abs(cpp - from_file).max(-1) / np.abs(from_file).max()
    tolerance = QUANTIZED_ENGINE_TOLERANCE
    within = float((per_position < tolerance).mean())
    print(
        f"{name} {quant}: llama.cpp vs lorax(file) max {per_position.max():.1e}, median "
        f"{np.median(per_position):.1e}, {within:.1%} of positions within {tolerance:.1e}"
    )
    assert within >= 0.9
    assert np.median(per_position) < tolerance


A = "deepseek2"
SELECTION_BIASES = ("blk.1.exp_probs_b.bias", "blk.2.exp_probs_b.bias")
UNREADABLE = [  # (case, keys set (None: left out), tensors left out, error)
    (
        "deepseek-v3",
        {},
        SELECTION_BIASES,
        r"gating_func=2 \(sigmoid, DeepSeek V3\) without the experts' selection bias: "
        r"missing tensor 'blk.1.exp_probs_b.bias'",
    ),
    (
        "deepseek-v3",
        {f"{A}.expert_gating_func": u32(1)},
        (),
        r"\(softmax, DeepSeek V2\) with a selection bias \('blk.1.exp_probs_b.bias'\)",
    ),
    (
        "deepseek-v3",
        {f"{A}.expert_gating_func": u32(3)},
        (),
        r"gating_func=3: lorax reads deepseek2 experts gated by softmax \(1",
    ),
    (
        "deepseek-v2",
        {f"{A}.expert_group_count": u32(4), f"{A}.expert_group_used_count": u32(2)},
        (),
        r"used_count=2: llama.cpp keeps the groups with the best top-2 sums",
    ),
    ("deepseek-v2", {f"{A}.expert_weights_norm": boolean(True)}, (), "norm=true with softmax"),
    ("deepseek-v2", {f"{A}.expert_shared_count": u32(0)}, (), "expert_shared_count=0"),
    (
        "deepseek-v3",
        {f"{A}.attention.layer_norm_rms_epsilon": f32(1e-5)},
        (),
        r"epsilon=1e-05: llama.cpp norms the attention latents with it",
    ),
    ("deepseek-v3", {f"{A}.attention.key_length_mla": None}, (), r"missing \(a file written"),
    ("deepseek-v3", {f"{A}.attention.q_lora_rank": None}, (), "'deepseek2.attention.q_lora_rank"),
    ("deepseek-v3", {f"{A}.block_count": u32(27)}, (), r"q_lora_rank=24, but .* 27 layers"),
    (
        "deepseek-v3",
        {f"{A}.attention.head_count_kv": u32(4)},
        (),
        "head_count_kv=4; llama.cpp's deepseek2 architecture computes latent attention as one",
    ),
    (
        "deepseek-v3",
        {f"{A}.expert_used_count": array(ValueType.UINT32, [2, 2, 3])},
        (),
        r"per-layer deepseek2.expert_used_count = \[2, 2, 3\] is not supported",
    ),
    (
        "deepseek-v3",
        {f"{A}.rope.scaling.type": string("linear"), f"{A}.rope.scaling.factor": f32(2.0)},
        (),
        "linear RoPE scaling: llama.cpp's deepseek2 architecture computes DeepSeek's YaRN",
    ),
    (
        "deepseek-v3-yarn-halves",
        {f"{A}.rope.scaling.yarn_log_multiplier": None},
        (),
        r"yarn_log_multiplier=0.0: lorax reads DeepSeek's YaRN as mscale = mscale_all_dim",
    ),
    (
        "deepseek-v2",
        {
            f"{A}.expert_gating_func": None,
            f"{A}.block_count": u32(47),
            f"{A}.vocab_size": u32(154880),
        },
        (),
        r"no deepseek2.expert_gating_func: llama.cpp gates a file of this shape \(47 layers, "
        r"vocabulary 154880\) by sigmoid as GLM 4.7 Lite",
    ),
    (
        "deepseek-v3-yarn-halves",
        {f"{A}.rope.scaling.attn_factor": f32(1.25)},
        (),
        "attn_factor=1.25: llama.cpp's deepseek2 architecture would scale the rotation",
    ),
]


def test_deepseek2_files_lorax_cannot_read_are_refused(deepseek, tmp_path):
    """A deepseek2 file is read as llama.cpp computes it, or refused by key or tensor:
    sigmoid gating (V3) without the selection bias, softmax (V2) with one, other gating
    functions; for softmax, groups kept by their top-2 sums (V2's keep their best expert's)
    and renormalized weights (V2 never renormalizes); no shared expert; latents normed with
    another epsilon than 1e-6; a file without the absorbed attention's key_length_mla (older
    conversions hold attn_kv_b), a missing q_lora_rank, a query latent where llama.cpp takes
    the layer count for V2-Lite's, multi-query sizes other than the absorbed form's, per-layer
    values; RoPE scaling other than YaRN, YaRN without yarn_log_multiplier or with an
    attn_factor, a file without expert_gating_func of the shape llama.cpp gates by sigmoid
    (GLM 4.7 Lite). Otherwise a file without expert_gating_func (the first V2 conversions)
    reads as softmax, V2, and one without expert_weights_scale (or with 0) as unscaled, as
    llama.cpp reads them."""
    for i, (name, keys, drop, match) in enumerate(UNREADABLE):
        bad = _rewrite(deepseek(name)[2], tmp_path / f"bad-{i}.gguf", keys, drop)
        with pytest.raises(GGUFError, match=match):
            lorax.load(str(bad), dtype="float32")
    model, _, v2 = deepseek("deepseek-v2")
    old = _rewrite(v2, tmp_path / "no-gating.gguf", {f"{A}.expert_gating_func": None})
    assert lorax.load(str(old), dtype="float32").config == model.config
    unscaled = dataclasses.replace(model.config, routed_scaling_factor=1.0)
    for i, scale in enumerate((None, f32(0.0))):
        old = _rewrite(v2, tmp_path / f"scale-{i}.gguf", {f"{A}.expert_weights_scale": scale})
        assert lorax.load(str(old), dtype="float32").config == unscaled


def test_keeping_every_expert_group_writes_no_group_keys(deepseek):
    """llama.cpp asserts that fewer expert groups are kept than there are; keeping them all
    is no grouping, so the group keys are left out (and the model reads back ungrouped)."""
    model, _, _ = deepseek("deepseek-v3")
    c = model.config
    assert c.expert_groups_kept < c.expert_groups
    keys = model_metadata(c, ARCHES[A], 0, "tiny")
    assert keys[f"{A}.expert_group_count"].value == c.expert_groups
    every = dataclasses.replace(c, expert_groups_kept=c.expert_groups)
    assert not any("expert_group" in k for k in model_metadata(every, ARCHES[A], 0, "tiny"))
