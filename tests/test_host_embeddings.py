"""The embedding table in pinned host memory (``lorax.embeddings_to_host``).

The CPU backend has the same memory kinds and memory-space typing as a GPU (pinned_host vs
device), so the placement, the host gather and its copy back are exercised here; the H200
numbers are in BENCHMARKS.md (``scripts/check_host_embedding.py``, ``bench_train.py
--embeddings-on-host``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorax
from lorax import demo
from lorax.model import embed
from lorax.sharding.memory import per_device_bytes
from lorax.train.step import StepConfig, init_train_state, make_train_step
from lorax.train.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def tiny():
    """The demo model with its (tied) embeddings untied into a separate LM head."""
    tied = demo.tiny_model(seed=2)
    head = {"weight": jnp.copy(tied.params["embed_tokens"][::-1])}
    config = dataclasses.replace(tied.config, tie_word_embeddings=False)
    return lorax.Model({**tied.params, "lm_head": head}, config, tied.tokenizer)


def test_table_moves_to_host_and_leaves_device_accounting(tiny):
    moved = lorax.embeddings_to_host(tiny)
    table = moved.params["embed_tokens"]
    assert table.sharding.memory_kind == "pinned_host"
    np.testing.assert_array_equal(np.asarray(table), np.asarray(tiny.params["embed_tokens"]))
    assert per_device_bytes(tiny.params) - per_device_bytes(moved.params) == table.nbytes
    assert tiny.params["embed_tokens"].sharding.memory_kind == "device"  # input untouched


def test_forward_and_gradients_are_unchanged(tiny, rng):
    """Only where the rows are read from changes: bit-identical logits, and training steps
    equal to float32 rounding (XLA may fuse the two step programs differently; a wrong row
    or a lost gradient would be off by far more)."""
    moved = lorax.embeddings_to_host(tiny)
    lora = lorax.init_lora(tiny, rank=4, alpha=8, key=jax.random.key(1))
    lora = lorax.LoraWeights(jax.tree.map(lambda x: x + 0.02, lora.params), lora.config)
    ids = rng.integers(0, tiny.config.vocab_size, size=(2, 24)).astype(np.int32)
    logits = [jax.jit(lorax.forward)(m, lora, ids) for m in (tiny, moved)]
    np.testing.assert_array_equal(np.asarray(logits[0]), np.asarray(logits[1]))

    opt = optax.adamw(1e-2)
    batch = {"input_ids": ids[None], "labels": ids[None]}
    results = []
    for model in (tiny, moved):
        step = make_train_step(model, opt, StepConfig(loss_chunk_size=16))
        state = init_train_state(lora, opt, key=jax.random.key(0))
        for _ in range(2):
            state, metrics = step(state, batch)
        results.append((float(metrics["loss"]), jax.tree.leaves(state.lora)))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)


def test_host_gather_clamps_out_of_range_ids(rng):
    table = jnp.asarray(rng.standard_normal((10, 4)), jnp.float32)
    host = jax.device_put(table, table.sharding.with_memory_kind("pinned_host"))
    ids = jnp.asarray([[0, 9, 3, -2, 15]], jnp.int32)
    rows = jax.jit(embed)(host, ids)
    assert rows.sharding.memory_kind == "device"
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(table)[[[0, 9, 3, 0, 9]]])


def test_tied_embeddings_are_refused():
    tied = demo.tiny_model(seed=2)
    with pytest.raises(ValueError, match="ties its embeddings"):
        lorax.embeddings_to_host(tied)


def test_trainer_option(tiny, tmp_path):
    cfg = TrainConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        batch_size=2,
        seq_len=32,
        save_every=0,
        progress=False,
        memory_report=False,
        embeddings_on_host=True,
    )
    data = str(lorax.data.demo_data_path())
    trainer = Trainer(tiny, lorax.init_lora(tiny, rank=4, alpha=8), data, cfg)
    assert trainer.model.params["embed_tokens"].sharding.memory_kind == "pinned_host"
    trainer.train()
    assert all(np.isfinite(r["loss"]) for r in trainer.history)
