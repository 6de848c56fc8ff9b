"""Tiny checkpoints and datasets for the sharding tests, built with numpy only (no torch, no
tokenizer), so subprocesses with many fake devices start fast."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np

TINY_HF = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    hidden_act="silu",
    tie_word_embeddings=False,
)


def cpu_devices_env(devices: int) -> dict[str, str]:
    """The environment of a subprocess with ``devices`` fake CPU devices, keeping conftest's
    test compile flags."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags.strip()}


def write_checkpoint(directory: str, seed: int = 0, dtype: str = "float32", **overrides) -> str:
    """A random Llama checkpoint (config.json + model.safetensors) in ``directory``."""
    from convert.names import tensor_specs
    from convert.safetensors_io import save_file
    from lorax.config import ModelConfig

    hf = {**TINY_HF, **overrides}
    config = ModelConfig.from_hf_dict(hf)
    rng = np.random.default_rng(seed)
    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    tensors: dict[str, np.ndarray] = {}
    for spec in tensor_specs(config):
        for name in spec.hf_names():
            if name.endswith("norm.weight"):
                value = 1.0 + 0.1 * rng.standard_normal(spec.shape)
            else:
                value = 0.05 * rng.standard_normal(spec.shape)
            tensors[name] = value.astype(np_dtype)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f)
    save_file(os.path.join(directory, "model.safetensors"), tensors)
    return directory


def loader(vocab: int = 256, *, batch_size: int = 8, seq_len: int = 32, seed: int = 0) -> Any:
    """A packed DataLoader over 96 random examples of 5..30 tokens (labels = inputs)."""
    from lorax.data import DataLoader, Example, TokenizedData

    rng = np.random.default_rng(1234)
    examples = []
    for _ in range(96):
        ids = rng.integers(1, vocab, size=int(rng.integers(5, 31))).astype(np.int32)
        labels = ids.copy()
        labels[0] = -100
        examples.append(Example(ids, labels))
    data = TokenizedData.from_examples(examples)
    return DataLoader(data, batch_size=batch_size, max_length=seq_len, pad_id=0, seed=seed)


# Both multi-device tests train the same tiny run, so their numbers are comparable.
RUN = dict(
    max_steps=6,
    batch_size=8,
    seq_len=32,
    learning_rate=1e-2,
    lr_schedule="constant",
    save_every=3,
    keep_checkpoints=3,
    progress=False,
)
DISTRIBUTED_RUN = dict(max_steps=3, save_every=3)


def train_config(output_dir: str, **overrides) -> Any:
    from lorax.train.trainer import TrainConfig

    return TrainConfig(output_dir=output_dir, **{**RUN, **overrides})


def llama31_8b_config() -> Any:
    """The Llama-3.1-8B architecture exactly as scripts/bench_train.py benchmarks it."""
    scripts = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    from bench_train import llama31_8b_config as from_bench

    return from_bench()
