"""The functional training step, for ``Trainer`` and for users' own ``jit`` loops.

Usage in a custom loop::

    optimizer = lorax.train.make_optimizer("adamw", 2e-4)
    state = lorax.train.init_train_state(lora, optimizer, key=jax.random.key(0))
    step = lorax.train.make_train_step(model, optimizer, StepConfig())   # jitted, donates state
    for batch in batches:            # dict of [accum, B, S] arrays (accum may be 1)
        state, metrics = step(state, batch)

The loss of a step is the sum of per-token losses over *all* micro-batches divided by the
number of target tokens in all of them, so accumulating k micro-batches gives exactly the
update of one batch k times larger.

On a device mesh the step is the same function, jitted with the ``StepShardings`` of its
inputs and outputs (``lorax.sharding.step_shardings`` builds them): XLA partitions it and
inserts the collectives (weight gathers, gradient reductions); there are none by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lorax.lora import LoraWeights
from lorax.model import ForwardOptions, Model, hidden_states
from lorax.moe import load_balancing_loss
from lorax.train.loss import chunked_cross_entropy, shift_labels

Array = jax.Array
Batch = Mapping[str, Array]


# XLA's dynamic-slice fusion (GPU) clones a kernel custom call whose result is both used and
# written into a scan's stacked residuals: the Mosaic attention forward then ran twice per layer
# (XLA 0.11.2; the StableHLO holds it once; ``scripts/probe_attention_recompute.py``). Off, the
# Llama-3.1-8B QLoRA step on Mosaic attention at 1x8192 ran 11,906 -> 12,489 tok/s on an H200
# (BENCHMARKS.md §3, "XLA ran the attention forward twice in the training step"). The option
# is a no-op on other backends.
DEFAULT_COMPILER_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("xla_gpu_enable_dynamic_slice_fusion", False),
)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static knobs of the step (hashable: part of what ``jit`` specialises on)."""

    # Tokens per LM-head chunk; None sizes chunks to ~128M logits (512 MiB in f32) each.
    loss_chunk_size: int | None = None
    z_loss: float = 0.0
    forward: ForwardOptions = ForwardOptions()
    # "skip": a step whose loss or gradients are not finite leaves the state unchanged (the
    # metrics say so); the trainer may then stop instead.
    skip_nonfinite: bool = True
    # XLA options the step is compiled with, ``((name, value), ...)`` (``DebugOptions``
    # fields; ``()`` is XLA's own). See ``DEFAULT_COMPILER_OPTIONS`` for the default's reason.
    # Also measured on an H200 (Llama-3.1-8B QLoRA 1x8192, BENCHMARKS.md §1):
    # ``("xla_gpu_enable_latency_hiding_scheduler", False)`` lowers an unsharded step's peak
    # by 0.24 GiB at the same speed, but slows host-offloading policies by 2.4% (their copies
    # are what that scheduler overlaps); ``("xla_gpu_enable_cublaslt", True)`` measured no
    # faster.
    compiler_options: tuple[tuple[str, Any], ...] = DEFAULT_COMPILER_OPTIONS


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Where the step's inputs and outputs live on a mesh (pytrees of ``NamedSharding``).

    ``state`` matches a ``TrainState`` (the output state is laid out like the input, so a
    donated state keeps its layout step after step), ``model`` matches the ``Model``,
    ``batch`` is the ``[accum, B, S]`` batch arrays' and ``eval_batch`` the ``[B, S]`` ones',
    and ``replicated`` is for the metrics. ``forward``: the ``ForwardOptions`` fields a step
    on this mesh needs (``lorax.sharding.forward_constraints``); the steps fill in those a
    config leaves unset.
    """

    state: Any
    model: Any
    batch: Any
    eval_batch: Any
    replicated: Any
    forward: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _on_mesh(config: StepConfig, shardings: StepShardings | None) -> StepConfig:
    """``config`` with the mesh's forward constraints filled in where it leaves them unset.

    Why: without the activations' batch split the model cannot run its attention kernels per
    device, and XLA's partitioner then gathers every device's rows around them (or fails to
    lower the Mosaic GPU kernels at all).
    """
    if shardings is None:
        return config
    unset = {k: v for k, v in shardings.forward.items() if getattr(config.forward, k) is None}
    if not unset:
        return config
    return dataclasses.replace(config, forward=dataclasses.replace(config.forward, **unset))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a step changes: adapters, optimizer state, step count and RNG."""

    lora: LoraWeights
    opt_state: Any
    step: Array
    key: Array


def auto_chunk_size(vocab_size: int, logits_per_chunk: int = 2**27) -> int:
    """The largest power of two (64 to 8192) of tokens whose f32 logits fit the budget.

    1024 tokens for a 128K vocabulary. Each chunk runs two vocab-sized GEMMs (logits, and the
    hidden-state gradient), which want many rows: at 1x8192 on an H200, 1024-token chunks
    stepped 0.7% faster than 512 at the same peak memory (the loss's transients sit below
    the backward's). Low-memory configurations pass a smaller ``loss_chunk_size``.
    """
    size = 64
    while size < 8192 and 2 * size * vocab_size <= logits_per_chunk:
        size *= 2
    return size


def init_train_state(
    lora: LoraWeights, optimizer: optax.GradientTransformation, *, key: Array
) -> TrainState:
    """A fresh state. The adapters are copied: steps donate the state's buffers, and the
    caller's ``lora`` must stay usable."""
    lora = jax.tree_util.tree_map(jnp.copy, lora)
    return TrainState(lora, optimizer.init(lora.params), jnp.zeros((), jnp.int32), key)


def loss_sum(
    lora: LoraWeights,
    model: Model,
    batch: Batch,
    config: StepConfig,
    dropout_key: Array | None = None,
) -> tuple[Array, Array]:
    """(sum of per-token losses, number of target tokens) for one micro-batch.

    ``batch`` holds ``input_ids`` and ``labels`` ``[B, S]`` (labels unshifted, -100 =
    ignore) and optionally ``segment_ids``/``positions`` for packed rows. A mixture of
    experts whose config sets ``router_aux_loss_coef`` (``output_router_logits`` in its
    ``config.json``) adds ``coef x`` the routers' load-balancing loss to the mean, as
    transformers does: to the sum, times the number of targets.
    """
    segment_ids = batch.get("segment_ids")
    aux_coef = model.config.router_aux_loss_coef
    h = hidden_states(
        model,
        lora,
        batch["input_ids"],
        positions=batch.get("positions"),
        segment_ids=segment_ids,
        dropout_key=dropout_key,
        options=config.forward,
        router_stats=aux_coef is not None,
    )
    if aux_coef is not None:
        h, router_stats = h
    labels = shift_labels(batch["labels"], segment_ids)
    total, count = chunked_cross_entropy(
        h.reshape(-1, h.shape[-1]),
        model.lm_head(),
        labels.reshape(-1),
        chunk_size=config.loss_chunk_size or auto_chunk_size(model.config.vocab_size),
        softcap=model.config.final_logit_softcap,
        z_loss=config.z_loss,
        # The LM head belongs to the frozen base model (only ``lora`` is differentiated):
        # this lets the loss skip recomputing the logits in the backward pass.
        lm_head_grad=False,
    )
    if aux_coef is not None:
        # transformers adds coef · aux to the mean loss; as a sum, weighted by the targets.
        total = total + aux_coef * load_balancing_loss(router_stats) * count
    return total, count


def accumulated_grads(
    lora: LoraWeights, model: Model, batches: Batch, config: StepConfig, key: Array
) -> tuple[Array, Array, LoraWeights]:
    """Loss sum, target count and summed gradients over the leading micro-batch axis."""
    use_dropout = lora.config.dropout > 0.0
    grad_fn = jax.value_and_grad(
        lambda lo, mb, k: loss_sum(lo, model, mb, config, k if use_dropout else None),
        has_aux=True,
    )
    num_micro = jax.tree_util.tree_leaves(batches)[0].shape[0]
    keys = jax.random.split(key, num_micro)

    def body(carry, xs):
        total, count, grads = carry
        micro, k = xs
        (s, n), g = grad_fn(lora, micro, k)
        grads = jax.tree_util.tree_map(jnp.add, grads, g)
        return (total + s, count + n.astype(jnp.float32), grads), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, lora)
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
    (total, count, grads), _ = jax.lax.scan(body, init, (dict(batches), keys))
    return total, count, grads


def train_step(
    state: TrainState,
    batches: Batch,
    *,
    model: Model,
    optimizer: optax.GradientTransformation,
    config: StepConfig,
) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer update from ``[accum, B, S]`` micro-batches. Pure; jit it (or use
    ``make_train_step``)."""
    key, step_key = jax.random.split(state.key)
    total, count, grads = accumulated_grads(state.lora, model, batches, config, step_key)
    denom = jnp.maximum(count, 1.0)
    loss = total / denom
    grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
    grad_norm = jnp.sqrt(
        sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads.params))
    )
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    updates, opt_state = optimizer.update(grads.params, state.opt_state, state.lora.params)
    params = optax.apply_updates(state.lora.params, updates)
    new = TrainState(LoraWeights(params, state.lora.config), opt_state, state.step + 1, key)
    if config.skip_nonfinite:
        # Keep the old adapters and moments, but advance step and RNG so a skipped batch is
        # not retried forever and resume stays exact.
        kept = jax.tree_util.tree_map(
            lambda n, o: jnp.where(finite, n, o),
            (new.lora, new.opt_state),
            (state.lora, state.opt_state),
        )
        new = TrainState(kept[0], kept[1], new.step, key)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "target_tokens": count,
        "finite": finite,
    }
    return new, metrics


def make_train_step(
    model: Model,
    optimizer: optax.GradientTransformation,
    config: StepConfig = StepConfig(),
    *,
    shardings: StepShardings | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Array]]]:
    """``train_step`` jitted with the state donated (its buffers are reused in place).

    With ``shardings`` the inputs must already be laid out that way (``lorax.sharding``'s
    ``place_*`` helpers) and the new state comes back in the same layout.
    """

    config = _on_mesh(config, shardings)

    def step(state: TrainState, batches: Batch, model: Model):
        return train_step(state, batches, model=model, optimizer=optimizer, config=config)

    options = dict(config.compiler_options)
    if shardings is None:
        jitted = jax.jit(step, donate_argnums=(0,), compiler_options=options)
    else:
        jitted = jax.jit(
            step,
            donate_argnums=(0,),
            in_shardings=(shardings.state, shardings.batch, shardings.model),
            out_shardings=(shardings.state, shardings.replicated),
            compiler_options=options,
        )

    def run(state: TrainState, batches: Batch) -> tuple[TrainState, dict[str, Array]]:
        return jitted(state, batches, model)

    # Ahead-of-time use (memory analysis, HLO inspection) compiles exactly this program.
    run.lower = lambda state, batches: jitted.lower(state, batches, model)  # type: ignore[attr-defined]
    return run


def make_eval_step(
    model: Model, config: StepConfig = StepConfig(), *, shardings: StepShardings | None = None
) -> Callable[..., Any]:
    """Jitted ``(lora, batch) -> (loss_sum, count)`` for one ``[B, S]`` batch."""
    config = _on_mesh(config, shardings)

    def evaluate(lora: LoraWeights, batch: Batch, model: Model):
        return loss_sum(lora, model, batch, config)

    options = dict(config.compiler_options)
    if shardings is None:
        jitted = jax.jit(evaluate, compiler_options=options)
    else:
        jitted = jax.jit(
            evaluate,
            in_shardings=(shardings.state.lora, shardings.eval_batch, shardings.model),
            out_shardings=shardings.replicated,
            compiler_options=options,
        )
    return lambda lora, batch: jitted(lora, batch, model)
