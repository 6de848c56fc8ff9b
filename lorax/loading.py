"""``lorax.load``: a model directory (or file) in, a ``Model`` out."""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
from jax.sharding import Mesh

from convert.gguf import load_gguf
from convert.hf import load_params, load_tokenizer, read_config
from lorax import sharding
from lorax.config import ModelConfig
from lorax.model import Model

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


def resolve_dtype(dtype: Any) -> Any:
    """Accepts a name ("bfloat16") or a dtype; rejects anything else by name."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in DTYPES.values()]:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return jnp.dtype(dtype).type


def load(
    path: str | os.PathLike[str],
    quantize: str | None = None,
    dtype: Any = "bfloat16",
    *,
    double_quant: bool = True,
    mesh: Mesh | None = None,
    sharding_rules: sharding.ShardingRules = sharding.DEFAULT_RULES,
) -> Model:
    """Loads an HF model directory or a ``.gguf`` file into a ``Model``.

    ``quantize="nf4"`` stores every decoder projection as bitsandbytes-exact NF4
    (``double_quant`` compresses the block scales too); ``dtype`` is the compute dtype and the
    dtype of everything not quantized. A GGUF's tensors (any llama.cpp type) are dequantized
    first, so NF4 re-quantizes them.

    With a ``mesh`` (``lorax.sharding.make_mesh``) the parameters come back laid out on it by
    ``sharding_rules``. An HF directory is read
    straight into that layout, each process reading only its devices' pieces, so a model
    larger than one device loads; a GGUF file is loaded whole, then split.
    """
    path = os.fspath(path)
    compute = resolve_dtype(dtype)
    if path.lower().endswith(".gguf") and os.path.isfile(path):
        config, params, tokenizer = load_gguf(
            path,
            ModelConfig.from_hf_dict,
            quantize=quantize,
            dtype=compute,
            double_quant=double_quant,
        )
        model = Model(params, config, tokenizer)
        return model if mesh is None else sharding.shard_model(model, mesh, sharding_rules)
    hf = read_config(path)
    config = ModelConfig.from_hf_dict(hf, source=os.path.join(path, "config.json"))
    if mesh is None:
        params = load_params(
            path, config, quantize=quantize, dtype=compute, double_quant=double_quant, hf_config=hf
        )
    else:
        params = sharding.load_params_sharded(
            path,
            config,
            mesh,
            quantize=quantize,
            dtype=compute,
            double_quant=double_quant,
            hf_config=hf,
            rules=sharding_rules,
        )
    return Model(params, config, load_tokenizer(path))
