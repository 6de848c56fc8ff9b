"""The training step, the Trainer and the ``lorax train`` CLI, end to end on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_hf_model, random_lora, rel_l2
from test_model_parity import CASES

import lorax
from lorax import demo
from lorax.train import make_optimizer
from lorax.train.step import StepConfig, init_train_state, make_train_step
from lorax.train.trainer import TrainConfig, Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny():
    return demo.tiny_model(seed=1)


def _batch(rng, b, s, vocab):
    ids = rng.integers(0, vocab, size=(b, s)).astype(np.int32)
    labels = ids.copy()
    labels[rng.random((b, s)) < 0.3] = -100  # uneven target counts per row
    return {"input_ids": ids, "labels": labels}


def test_accumulation_equals_one_big_batch(tiny, rng):
    lora = lorax.init_lora(tiny, rank=4, alpha=8, key=jax.random.key(3))
    lora = lorax.LoraWeights(jax.tree_util.tree_map(lambda x: x + 0.01, lora.params), lora.config)
    # Plain SGD: the update is the gradient itself (Adam's g/sqrt(v) would amplify f32
    # rounding on near-zero gradients into visible differences).
    opt = optax.sgd(0.5)
    big = _batch(rng, 4, 24, tiny.config.vocab_size)
    one = {k: v[None] for k, v in big.items()}
    two = {k: v.reshape(2, 2, 24) for k, v in big.items()}
    step = make_train_step(tiny, opt, StepConfig(loss_chunk_size=16))
    s1, m1 = step(init_train_state(lora, opt, key=jax.random.key(0)), one)
    s2, m2 = step(init_train_state(lora, opt, key=jax.random.key(0)), two)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    # Whole tensors: a parameter that the update nearly cancels (0.01 - 0.5 g ~ 1e-5) shows
    # float32 summation-order differences as a large per-element relative error.
    for a, b in zip(
        jax.tree_util.tree_leaves(s1.lora), jax.tree_util.tree_leaves(s2.lora), strict=True
    ):
        assert rel_l2(a, b) < 1e-6


def test_step_is_cross_entropy_of_the_softcapped_forward_logits(tmp_path, rng):
    """Gemma 2: the step's chunked loss caps the logits with the model's final-logit softcap,
    as ``lorax.forward`` does; its loss and gradients equal a plain cross-entropy of those."""
    model_type, overrides = CASES["gemma2"]  # final_logit_softcapping=3.0 bends these logits
    _, path = make_hf_model(tmp_path, model_type, **overrides)
    model = lorax.load(path, dtype="float32")
    assert model.config.final_logit_softcap == 3.0
    lora = random_lora(model, rng, 4, 8, ("q_proj", "v_proj", "down_proj"))
    batch = _batch(rng, 2, 16, model.config.vocab_size)
    targets = np.concatenate([batch["labels"][:, 1:], np.full((2, 1), -100)], axis=1)
    mask = targets != -100

    def reference(lora):
        logits = lorax.forward(model, lora, jnp.asarray(batch["input_ids"]))
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.asarray(np.where(mask, targets, 0))[..., None], -1)
        return jnp.sum(nll[..., 0] * mask) / mask.sum()

    loss, grads = jax.value_and_grad(reference)(lora)
    # The update is -lr·g; a large lr keeps it clear of the rounding of the adapters' values.
    lr = 1e3
    opt = optax.sgd(lr)
    step = make_train_step(model, opt, StepConfig(loss_chunk_size=16))  # two chunks
    state, metrics = step(
        init_train_state(lora, opt, key=jax.random.key(0)), {k: v[None] for k, v in batch.items()}
    )
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    for new, old, g in zip(
        jax.tree_util.tree_leaves(state.lora.params),
        jax.tree_util.tree_leaves(lora.params),
        jax.tree_util.tree_leaves(grads.params),
        strict=True,
    ):
        assert rel_l2((old - new) / lr, g) < 1e-5


def test_nonfinite_step_is_skipped(tiny, rng):
    lora = lorax.init_lora(tiny, rank=4, alpha=8)
    opt = make_optimizer("adamw", 1e-2)
    state = init_train_state(lora, opt, key=jax.random.key(0))
    before = jax.tree_util.tree_map(np.asarray, state.lora.params)
    poisoned = lorax.Model(
        {**tiny.params, "norm": tiny.params["norm"] * jnp.nan}, tiny.config, tiny.tokenizer
    )
    step = make_train_step(poisoned, opt)
    state, metrics = step(state, {k: v[None] for k, v in _batch(rng, 2, 16, 500).items()})
    assert not bool(metrics["finite"])
    assert int(state.step) == 1
    for a, b in zip(
        jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(state.lora.params), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_trainer_logs_plots_and_checkpoints(tiny, tmp_path):
    cfg = TrainConfig(
        output_dir=str(tmp_path),
        max_steps=6,
        batch_size=2,
        seq_len=64,
        learning_rate=3e-3,
        save_every=3,
        keep_checkpoints=1,
        eval_every=3,
        eval_batches=2,
        progress=False,
    )
    data = str(lorax.data.demo_data_path())
    trainer = Trainer(tiny, lorax.init_lora(tiny, rank=4, alpha=8), data, cfg, eval_dataset=data)
    trainer.train()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in records)
    assert "eval_loss" in records[2] and "eval_loss" in records[5]
    assert os.path.getsize(tmp_path / "loss_curve.png") > 1000
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert steps == [6]  # keep_checkpoints=1


def _cli(out, *extra):
    return [
        sys.executable,
        "-m",
        "lorax.cli",
        "train",
        "--model",
        "tiny",
        "--output-dir",
        str(out),
        "--batch-size",
        "2",
        "--seq-len",
        "64",
        "--learning-rate",
        "3e-3",
        "--no-progress",
        "--max-new-tokens",
        "0",
        *extra,
    ]


def _losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl"))]


def test_sigkill_and_resume_gives_identical_losses(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    args = ["--max-steps", "12", "--save-every", "4"]
    straight = tmp_path / "straight"
    subprocess.run(_cli(straight, *args), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(killed, *args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    ckpts = killed / "checkpoints"
    while time.time() < deadline:
        done = [d for d in os.listdir(ckpts) if d.isdigit()] if ckpts.exists() else []
        if "4" in done and len(_losses(killed)) >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(_losses(killed)) < 12, "the run finished before it could be killed"
    subprocess.run(_cli(killed, *args), check=True, env=env, capture_output=True)
    assert _losses(killed) == _losses(straight)


def test_cli_default_runs_end_to_end(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorax.cli",
            "train",
            "--output-dir",
            str(tmp_path),
            "--max-steps",
            "2",
            "--batch-size",
            "1",
            "--seq-len",
            "64",
            "--max-new-tokens",
            "3",
            "--no-progress",
        ],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    assert "sample before training" in out.stdout and "sample after training" in out.stdout
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_model.safetensors").exists()
    assert json.load(open(adapter / "adapter_config.json"))["peft_type"] == "LORA"


def test_cli_help_documents_every_option():
    out = subprocess.run(
        [sys.executable, "-m", "lorax.cli", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    for field in (
        "--max-steps",
        "--grad-accum-steps",
        "--remat",
        "--optimizer",
        "--config",
        "--model",
        "--data",
        "--rank",
        "--on-nonfinite",
    ):
        assert field in out.stdout


def test_packed_row_gives_the_losses_and_grads_of_separate_sequences(tiny, rng):
    """Packing isolation: no attention and no loss across segments, so a packed row's loss
    sum and LoRA gradients equal the sums over its sequences run one by one."""
    from lorax.train.step import loss_sum

    lora = lorax.init_lora(tiny, rank=4, alpha=8, key=jax.random.key(5))
    lora = lorax.LoraWeights(jax.tree_util.tree_map(lambda x: x + 0.02, lora.params), lora.config)
    config = StepConfig(loss_chunk_size=16)
    grad = jax.jit(jax.value_and_grad(lambda lo, b: loss_sum(lo, tiny, b, config), has_aux=True))
    lengths = (9, 14, 6)
    seqs = [rng.integers(0, tiny.config.vocab_size, size=n).astype(np.int32) for n in lengths]
    packed = {
        "input_ids": np.concatenate(seqs)[None],
        "labels": np.concatenate(seqs)[None],
        "segment_ids": np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(lengths)])[
            None
        ],
        "positions": np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])[None],
    }
    (total, count), g_packed = grad(lora, packed)
    sums, counts, grads = [], [], []
    for seq in seqs:
        (s, n), g = grad(lora, {"input_ids": seq[None], "labels": seq[None]})
        sums.append(float(s))
        counts.append(int(n))
        grads.append(g)
    assert int(count) == sum(counts) == sum(n - 1 for n in lengths)
    np.testing.assert_allclose(float(total), sum(sums), rtol=1e-5)
    g_separate = jax.tree_util.tree_map(lambda *gs: sum(gs), *grads)
    for a, b in zip(
        jax.tree_util.tree_leaves(g_packed), jax.tree_util.tree_leaves(g_separate), strict=True
    ):
        assert rel_l2(a, b) < 1e-5


def test_nonfinite_stop_mode_raises_with_a_clear_message(tmp_path):
    poisoned = demo.tiny_model(seed=2)
    poisoned = lorax.Model(
        {**poisoned.params, "norm": poisoned.params["norm"] * jnp.nan},
        poisoned.config,
        poisoned.tokenizer,
    )
    cfg = TrainConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        batch_size=2,
        seq_len=64,
        on_nonfinite="stop",
        save_every=1,
        progress=False,
    )
    trainer = Trainer(
        poisoned, lorax.init_lora(poisoned, rank=4, alpha=8), str(lorax.data.demo_data_path()), cfg
    )
    with pytest.raises(FloatingPointError, match="step 1: loss or gradients are not finite"):
        trainer.train()
    assert not (tmp_path / "checkpoints").exists() or not any(
        d.isdigit() for d in os.listdir(tmp_path / "checkpoints")
    )


def test_compiler_options_reach_the_compiled_step(tiny, rng):
    lora = lorax.init_lora(tiny, rank=4, alpha=8)
    opt = make_optimizer("adamw", 1e-3)
    batch = {k: v[None] for k, v in _batch(rng, 1, 16, tiny.config.vocab_size).items()}
    # An option XLA does not know must fail the compile: proof the options are passed on.
    bogus = make_train_step(tiny, opt, StepConfig(compiler_options=(("xla_no_such_option", 1),)))
    with pytest.raises(Exception, match="xla_no_such_option"):
        bogus(init_train_state(lora, opt, key=jax.random.key(0)), batch)
    # A real one (ignored off the GPU) compiles and trains.
    cublaslt = StepConfig(compiler_options=(("xla_gpu_enable_cublaslt", True),))
    _, metrics = make_train_step(tiny, opt, cublaslt)(
        init_train_state(lora, opt, key=jax.random.key(0)), batch
    )
    assert bool(metrics["finite"])
