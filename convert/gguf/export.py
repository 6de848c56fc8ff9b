"""``export_gguf``: a lorax model, its LoRA merged in, as a GGUF file llama.cpp runs.

Each tensor is produced when the writer reaches it: its base weight is sliced from the
stacked pytree (NF4 dequantized), the adapter merged in float32 (``W + scale·B·A``, the
same merge as ``save_merged``; a Phi-3 fused projection is one weight with one adapter), the
query/key rows reordered for llama.cpp's rope (``llama``), one added to Gemma's norm weights
(llama.cpp's Gemma scales by the stored weight), and the result encoded in the type
llama.cpp's quantizer would pick for it. An expert projection (Mixtral, Qwen 2/3 MoE) is
written per part, each tensor all of a layer's experts: every expert's adapter is merged into
its own matrix, and a gate/up part takes its rows of the merged ``[2·F, D]`` (gate the first
F, up the rest). Qwen 2 MoE's shared expert is merged as any dense projection, and its gate
written as it is (frozen, never adapted). DeepSeek's layers come from two layer stacks (the
dense first layers and the routed ones), each tensor under its model layer's number with its
own stack's adapters, and its merged ``kv_b_proj`` is written as its two per-head parts. Only
the tensor being written exists outside the model, so an export needs little memory beyond the
model itself.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convert.gguf.format import KV, GGUFError, TensorType, string
from convert.gguf.layout import (
    ROPE_FACTORS_LONG,
    ROPE_FACTORS_SHORT,
    ROPE_FREQS,
    Arch,
    FileTensor,
    RopeRows,
    arch_for_export,
    gguf_name,
    kv_b_part,
    norm_offset,
    placed_tensors,
    rope_rows,
    to_gguf_rope_rows,
)
from convert.gguf.metadata import longrope_factors, model_metadata
from convert.gguf.quants import ModelShape, Scheme, encode, scheme, tensor_type
from convert.gguf.tokenizer import tokenizer_metadata
from convert.gguf.writer import TensorPlan, write_gguf
from convert.merged import merge_lora_weight, stack_adapters
from convert.rope import llama3_rope_factors


def export_gguf(
    model: Any,
    lora: Any,
    path: str | os.PathLike[str],
    quant: str = "f16",
    *,
    name: str | None = None,
) -> None:
    """Writes ``model`` with ``lora`` merged in (``lora`` may be None) as a GGUF v3 file.

    ``quant`` is one of ``convert.gguf.quants.SCHEMES``: ``f32``, ``f16``, ``bf16``,
    ``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``, ``q4_k_m``, ``q5_k_m``, ``q6_k``. The
    quantized schemes give each tensor the type ``llama-quantize`` would. ``name`` is
    ``general.name`` (default: the tokenizer's source, else the model type). The file is
    written atomically: on any error no file (and no partial file) is left at ``path``.
    """
    from lorax.kernel_weights import require_unprepared  # here: lorax imports convert

    require_unprepared(model, "export_gguf")
    chosen = scheme(quant)
    config = model.config
    arch = arch_for_export(config.model_type)
    name = name or _default_name(model)
    metadata = model_metadata(config, arch, chosen.file_type, name)  # refuses what llama.cpp can't
    adapters, lora_scale = stack_adapters(config, lora)
    metadata.update(_tokenizer_keys(model.tokenizer, config.vocab_size))
    _check_loadable_name(name, metadata)
    plans = list(_plans(model, adapters, lora_scale, arch, chosen))
    write_gguf(path, metadata, plans)


def _default_name(model: Any) -> str:
    source = getattr(model.tokenizer, "name_or_path", None)
    return os.path.basename(os.path.normpath(source)) if source else model.config.model_type


# llama.cpp's vocabulary loader marks Phi-3's special tokens by model name: for a
# ``general.name`` containing one of these it looks up each of these tokens, and fails to load
# a file whose vocabulary lacks one.
_PHI3_NAMES = ("phi-3", "phi3")
_PHI3_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def _check_loadable_name(name: str, metadata: Mapping[str, KV]) -> None:
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is None or not any(n in name.lower() for n in _PHI3_NAMES):
        return
    missing = [t for t in _PHI3_TOKENS if t not in set(tokens.value)]
    if missing:
        raise GGUFError(
            f"llama.cpp would not load this file: for a model named {name!r} (containing "
            f"'phi-3' or 'phi3') it looks up the tokens {list(_PHI3_TOKENS)}, and this "
            f"vocabulary lacks {missing}; pass another name="
        )


def _tokenizer_keys(tokenizer: Any, vocab_size: int) -> dict[str, KV]:
    if tokenizer is None:
        warnings.warn(
            "the model has no tokenizer: the GGUF gets none, and llama.cpp can only "
            "run it on token ids",
            stacklevel=3,
        )
        return {"tokenizer.ggml.model": string("none")}
    return tokenizer_metadata(tokenizer, vocab_size)


def _plans(
    model: Any, adapters: Mapping[str, Any], lora_scale: float, arch: Arch, s: Scheme
) -> Iterator[TensorPlan]:
    config = model.config
    shape = ModelShape(
        arch.name,
        config.num_layers,
        config.num_heads,
        config.num_kv_heads,
        config.tie_word_embeddings,
        config.num_experts,
    )
    for tensor, layer, position in placed_tensors(config):
        spec = tensor.spec
        name = gguf_name(arch, spec.path, layer, tensor.part)
        ttype = tensor_type(s, name, tensor.shape, shape)
        produce = functools.partial(
            _encode_param,
            model.params,
            tensor,
            position,
            adapters.get(spec.path[0], {}),
            lora_scale,
            rope_rows(arch, config, spec.path),
            norm_offset(arch, spec.path),
            ttype,
            name,
            config,
        )
        yield TensorPlan(name, tensor.shape, ttype, produce)
    if config.rope.type == "llama3":
        rope = config.rope
        factors = llama3_rope_factors(
            rope.theta,
            config.head_dim,
            rope.factor,
            rope.low_freq_factor,
            rope.high_freq_factor,
            rope.original_max_position_embeddings,
        )
        yield TensorPlan(ROPE_FREQS, factors.shape, TensorType.F32, lambda: factors)
    if config.rope.type == "longrope":  # Phi-3: llama.cpp's phi3 reads both lists
        short, long = longrope_factors(config)
        yield TensorPlan(ROPE_FACTORS_SHORT, short.shape, TensorType.F32, lambda: short)
        yield TensorPlan(ROPE_FACTORS_LONG, long.shape, TensorType.F32, lambda: long)


def _encode_param(
    params: Mapping[str, Any],
    tensor: FileTensor,
    position: int | None,
    adapters: Mapping[str, Any],
    lora_scale: float,
    rows: RopeRows | None,
    offset: float,
    ttype: TensorType,
    name: str,
    config: Any,
) -> np.ndarray:
    """The bytes of one tensor: for a per-layer one, the layer at ``position`` on its
    stack's axis, with that stack's ``adapters`` merged."""
    spec = tensor.spec
    value: Any = params
    for key in spec.path:
        value = value[key]
    a = b = None
    if position is not None:
        value = jax.tree.map(lambda x: x[position], value)
        adapter = adapters.get(spec.path[1]) if spec.path[-1] == "weight" else None
        if adapter is not None:
            a, b = adapter["lora_a"][position], adapter["lora_b"][position]
    if tensor.experts and tensor.part is not None:
        value, b = _expert_part(value, b, tensor.part, spec.shape[0])
    weight = merge_lora_weight(value, a, b, lora_scale, jnp.float32)
    if not bool(jnp.isfinite(weight).all()):
        raise GGUFError(f"tensor {name!r} has non-finite values; refusing to export it")
    if rows is not None:
        weight = to_gguf_rope_rows(weight, rows)
    if tensor.kv_b_half is not None:
        weight = kv_b_part(weight, tensor.kv_b_half, config)
    if offset:
        weight = weight + offset
    return encode(weight.reshape(-1, weight.shape[-1]), ttype)


def _expert_part(value: Any, lora_b: Any, part: int, rows: int) -> tuple[Any, Any]:
    """One part of a layer's expert projection, ``value [E, parts, rows, in]`` (dense or
    NF4), and of its adapters' B ``[E, parts·rows, r]``: the part's matrix of every expert,
    and the B rows that adapt it (an expert's output rows are its parts', in order)."""
    value = jax.tree.map(lambda x: x[:, part], value)
    if lora_b is not None:
        lora_b = lora_b[:, part * rows : (part + 1) * rows]
    return value, lora_b
