"""What ``quant=`` means: the schemes, which tensor gets which type, and the encoders.

One table, ``SCHEMES``, names every export choice with the file type llama.cpp records for
it and its default tensor type. ``tensor_type`` then picks each tensor's type the way
llama.cpp's ``llama-quantize`` does for the llama family (its per-tensor rules in
``llama-quant.cpp``): 1-D tensors (a shared expert's gate ``ffn_gate_inp_shexp`` among them)
and MoE routers (``ffn_gate_inp``) stay float32; the output matrix (or the tied embedding)
gets Q6_K in the quantized schemes; Q4_K_M/Q5_K_M give Q6_K to the ``attn_v`` and
``ffn_down`` of a fixed subset of layers (a fused ``attn_qkv`` counts as ``attn_v``; every
tensor whose name holds ``ffn_down`` counts as its layer's ``ffn_down``: ``ffn_down_exps``
and a shared expert's ``ffn_down_shexp`` each get the layer's type); a model of
exactly 8 experts (Mixtral 8x7B, 8x22B) gets Q8_0 for ``attn_v`` and ``attn_k`` and, in
Q4_K_M, Q5_K for ``attn_output``; and a tensor whose rows cannot hold whole blocks of its
type falls back to the type llama.cpp falls back to. A file we write therefore has the same
tensor types as one ``llama-quantize`` makes from the same float model. Expert tensors are
quantized row by row like the others (each expert's matrix is whole rows), and llama.cpp's
expert matmul (``mul_mat_id``) takes every type here, so no scheme is refused for them.

``encode`` turns float rows into a type's bytes: float types by casting, the legacy block
types (Q4_0 ... Q8_0) with the ``gguf`` package's numpy quantizers (llama.cpp's own Python
port of its reference code), the K-quants with ``kquants``.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType
from gguf import quants as gguf_quants

from convert.gguf import kquants
from convert.gguf.format import GGUFError, block_size

T = GGMLQuantizationType
F = LlamaFileType


@dataclasses.dataclass(frozen=True)
class Scheme:
    """One ``quant=`` choice: the file type llama.cpp records and the default tensor type."""

    name: str
    file_type: LlamaFileType
    default: GGMLQuantizationType
    # Q4_K_M / Q5_K_M: the "medium" mixes that spend more bits on attn_v and ffn_down.
    medium_mix: bool = False

    @property
    def quantized(self) -> bool:
        return self.default not in FLOAT_TYPES


FLOAT_TYPES = (T.F32, T.F16, T.BF16)

SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("f32", F.ALL_F32, T.F32),
        Scheme("f16", F.MOSTLY_F16, T.F16),
        Scheme("bf16", F.MOSTLY_BF16, T.BF16),
        Scheme("q8_0", F.MOSTLY_Q8_0, T.Q8_0),
        Scheme("q4_0", F.MOSTLY_Q4_0, T.Q4_0),
        Scheme("q4_1", F.MOSTLY_Q4_1, T.Q4_1),
        Scheme("q5_0", F.MOSTLY_Q5_0, T.Q5_0),
        Scheme("q5_1", F.MOSTLY_Q5_1, T.Q5_1),
        Scheme("q4_k_m", F.MOSTLY_Q4_K_M, T.Q4_K, medium_mix=True),
        Scheme("q5_k_m", F.MOSTLY_Q5_K_M, T.Q5_K, medium_mix=True),
        Scheme("q6_k", F.MOSTLY_Q6_K, T.Q6_K),
    )
}

# llama.cpp's substitute when a row length is not a multiple of a K-quant's 256.
K_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


def scheme(name: str) -> Scheme:
    key = name.lower()
    if key not in SCHEMES:
        raise ValueError(f"quant must be one of {list(SCHEMES)}, got {name!r}")
    return SCHEMES[key]


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the type rules read about the model besides the tensor itself."""

    arch: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tied_embeddings: bool  # no output.weight: the token embedding is also the output
    num_experts: int = 0  # llama.cpp's n_expert (0: no mixture of experts)


def tensor_type(s: Scheme, name: str, shape: tuple[int, ...], model: ModelShape) -> T:
    """The type llama.cpp's quantizer gives tensor ``name`` of row-major ``shape``."""
    if len(shape) < 2 or not name.endswith(".weight") or "_norm." in name:
        return T.F32
    if ".ffn_gate_inp." in name:  # the converter's float32, which llama-quantize keeps
        return T.F32
    if not s.quantized:
        return s.default
    chosen = s.default
    row = shape[-1]
    layer = _layer_of(name)
    if name == "output.weight" or (model.tied_embeddings and name == "token_embd.weight"):
        if row % block_size(s.default):
            chosen = T.Q8_0
        elif s.default != T.Q8_0:
            chosen = T.Q6_K
    elif name.endswith(("attn_v.weight", "attn_qkv.weight")):
        # llama-quantize counts Phi-3's fused q/k/v as an attn_v (its category_is_attn_v).
        if s.medium_mix and _more_bits(layer, model.num_layers):
            chosen = T.Q6_K
        # 70B-class models share each attn_v across 8 query heads: llama.cpp spends a bit
        # more on it.
        if _is_70b(model) and chosen == T.Q4_K:
            chosen = T.Q5_K
        if model.num_experts == 8:  # "for the 8-expert model, bumping this to Q8_0"
            chosen = T.Q8_0
    elif name.endswith("attn_k.weight") and model.num_experts == 8:
        chosen = T.Q8_0
    elif name.endswith("attn_output.weight") and model.num_experts == 8:
        if s.file_type == F.MOSTLY_Q4_K_M:
            chosen = T.Q5_K
    elif (
        ".ffn_down" in name  # llama.cpp's category: ffn_down, ffn_down_exps, ffn_down_shexp
        and s.medium_mix
        and _more_bits(layer, model.num_layers)
    ):
        chosen = T.Q6_K
    if row % block_size(chosen):
        chosen = K_FALLBACK.get(chosen, chosen)
        if row % block_size(chosen):
            chosen = T.F16
    return chosen


def _more_bits(layer: int, num_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth, and every third between."""
    return (
        layer < num_layers // 8
        or layer >= 7 * num_layers // 8
        or (layer - num_layers // 8) % 3 == 2
    )


def _is_70b(model: ModelShape) -> bool:
    """llama.cpp's size class LLM_TYPE_70B: 80 layers of llama (with grouped KV heads) or
    qwen2; its other architectures here name no 80-layer size."""
    if model.num_layers != 80:
        return False
    return model.arch == "qwen2" or (
        model.arch == "llama" and model.num_heads != model.num_kv_heads
    )


def _layer_of(name: str) -> int:
    match = re.match(r"blk\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


# ------------------------------------------------------------------------ encoding


def encode(rows: jax.Array | np.ndarray, tensor_type: T) -> np.ndarray:
    """``rows [n, k]`` (float) as ``tensor_type``'s bytes, ``uint8 [n, row bytes]``."""
    if tensor_type in kquants.SUPPORTED:
        return kquants.quantize_k(rows, tensor_type)
    data = np.asarray(rows, np.float32)
    if tensor_type == T.F32:
        return data.view(np.uint8)
    if tensor_type == T.F16:
        return data.astype(np.float16).view(np.uint8)
    if tensor_type in _GGUF_ENCODED:
        return gguf_quants.quantize(data, tensor_type)
    raise GGUFError(f"cannot encode tensors as {tensor_type.name}")


# llama.cpp's numpy ports of its reference quantizers (BF16 rounds to nearest even, as ggml).
_GGUF_ENCODED = (T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)
ENCODABLE = (*FLOAT_TYPES, *_GGUF_ENCODED[1:], *kquants.SUPPORTED)
