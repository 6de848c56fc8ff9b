"""PEFT adapters in and out of lorax (the format itself lives in ``convert.peft``)."""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp

from convert.peft import read_adapter, save_adapter
from lorax.lora import LoraConfig, LoraWeights

__all__ = ["load_adapter", "save_adapter"]


def load_adapter(
    model: Any, directory: str | os.PathLike[str], *, dtype: Any = jnp.float32
) -> LoraWeights:
    """Reads a PEFT LoRA adapter directory for ``model`` into ``LoraWeights``.

    Works for adapters written by ``save_adapter``, PEFT or Unsloth; every name and shape is
    checked against ``model`` before any array is read. ``dtype`` is the parameters' dtype
    (float32, as training keeps them, by default).
    """
    params, settings = read_adapter(directory, model.config, dtype=dtype)
    return LoraWeights(params, LoraConfig(**settings))
