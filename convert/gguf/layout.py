"""Where lorax's parameters live in a GGUF: architectures, tensor names, rope row order.

Tensor names come from ``gguf``'s table (llama.cpp's ``blk.N.attn_q`` ...), keyed by the
pytree paths ``convert.names`` defines, so both sides of the map have one source.

llama.cpp's ``llama`` architecture applies "normal" rope, rotating adjacent pairs
``(x[2i], x[2i+1])`` of each head, while HF's Llama rotates the halves ``(x[i], x[i+d/2])``.
The two are the same computation once the rows of the query and key projections (and their
biases) are reordered within each head, which llama.cpp's converter does on the way in and
we undo on the way out. ``qwen2`` uses NEOX rope, which is HF's halves: no reordering.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gguf import MODEL_TENSOR, TENSOR_NAMES

from convert.gguf.format import GGUFError


@dataclasses.dataclass(frozen=True)
class Arch:
    """A llama.cpp architecture lorax reads and writes."""

    name: str  # general.architecture
    model_type: str  # the HF model_type a file of this architecture loads as
    interleaved_rope: bool  # Q/K rows reordered for llama.cpp's adjacent-pair rope


ARCHES = {a.name: a for a in (Arch("llama", "llama", True), Arch("qwen2", "qwen2", False))}
# Mistral is computed as llama by llama.cpp (its converter writes arch "llama").
EXPORT_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


def arch_for_export(model_type: str) -> Arch:
    if model_type not in EXPORT_ARCH:
        raise GGUFError(
            f"cannot export model_type={model_type!r} to GGUF; supported: {list(EXPORT_ARCH)}"
        )
    return ARCHES[EXPORT_ARCH[model_type]]


def arch_named(name: str, source: str) -> Arch:
    if name not in ARCHES:
        raise GGUFError(f"{source}: unsupported architecture {name!r}; lorax reads {list(ARCHES)}")
    return ARCHES[name]


_PROJECTIONS = {
    "q_proj": MODEL_TENSOR.ATTN_Q,
    "k_proj": MODEL_TENSOR.ATTN_K,
    "v_proj": MODEL_TENSOR.ATTN_V,
    "o_proj": MODEL_TENSOR.ATTN_OUT,
    "gate_proj": MODEL_TENSOR.FFN_GATE,
    "up_proj": MODEL_TENSOR.FFN_UP,
    "down_proj": MODEL_TENSOR.FFN_DOWN,
}
_SINGLE = {
    ("embed_tokens",): MODEL_TENSOR.TOKEN_EMBD,
    ("norm",): MODEL_TENSOR.OUTPUT_NORM,
    ("lm_head", "weight"): MODEL_TENSOR.OUTPUT,
    ("layers", "input_layernorm"): MODEL_TENSOR.ATTN_NORM,
    ("layers", "post_attention_layernorm"): MODEL_TENSOR.FFN_NORM,
}
ROPE_FREQS = TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight"


def gguf_name(path: tuple[str, ...], layer: int | None = None) -> str:
    """The GGUF name of the parameter at pytree ``path`` (``layer`` for per-layer ones)."""
    if path in _SINGLE:
        base, suffix = _SINGLE[path], "weight"
    elif len(path) == 3 and path[0] == "layers" and path[1] in _PROJECTIONS:
        base, suffix = _PROJECTIONS[path[1]], path[2]
    else:
        raise KeyError(f"no GGUF name for parameter {'/'.join(path)}")
    return f"{TENSOR_NAMES[base].format(bid=layer)}.{suffix}"


def rope_heads(arch: Arch, config: Any, path: tuple[str, ...]) -> int | None:
    """Heads whose rows are reordered for ``arch``'s rope (None: store as is)."""
    if not arch.interleaved_rope or len(path) != 3:
        return None
    return {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}.get(path[1])


def to_gguf_rope_rows(w: Any, heads: int) -> Any:
    """HF's half-split rows → llama.cpp's interleaved pairs, per head (weight or bias)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def from_gguf_rope_rows(w: Any, heads: int) -> Any:
    """The inverse of ``to_gguf_rope_rows``."""
    return (
        w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )
