"""``Trainer``: the training loop around the functional step.

It owns what a loop needs beyond the math: batches of micro-batches, the jitted step,
progress and metrics, periodic evaluation, and checkpoints that resume exactly (LoRA params,
optimizer state, step, RNG and data position, written atomically by orbax, last K kept).

It always runs on a device mesh (``lorax.sharding``), one device being the smallest: the base
model, adapters and optimizer state are laid out by the sharding rules and every batch is
split over ``data x fsdp``. With several processes each one builds the same global batch (a
pure function of the seed and the data position) and places only the rows its own devices
hold, so the split is deterministic and a checkpoint's data position means the same batches
on any number of processes or devices. Process 0 alone writes metrics, plots and adapters;
orbax writes checkpoints from all processes together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lorax import remat as remat_lib
from lorax import sharding
from lorax.distributed import is_primary
from lorax.lora import LoraWeights
from lorax.model import ForwardOptions, Model, embeddings_to_host
from lorax.train import checkpoint as ckpt_lib
from lorax.train.flops import device_peak_flops, peak_memory_bytes, train_flops_per_token
from lorax.train.loss import mean_loss
from lorax.train.optim import make_optimizer, make_schedule
from lorax.train.plot import write_loss_curve
from lorax.train.step import (
    StepConfig,
    init_train_state,
    make_eval_step,
    make_train_step,
)

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


def _opt(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run is configured by; the CLI's options are these fields and their help."""

    output_dir: str = dataclasses.field(
        metadata={"help": "where metrics, plots, checkpoints and the adapter go"}
    )
    max_steps: int = _opt(100, "optimizer steps to train for")
    batch_size: int = _opt(4, "rows per micro-batch")
    grad_accum_steps: int = _opt(1, "micro-batches per optimizer step")
    seq_len: int = _opt(512, "tokens per row (packed rows are exactly this long)")
    learning_rate: float = _opt(2e-4, "peak learning rate")
    lr_schedule: str = _opt("linear", "constant | linear | cosine decay after warmup")
    warmup_steps: int = _opt(0, "linear warmup steps")
    min_lr_ratio: float = _opt(0.0, "final learning rate as a fraction of the peak")
    optimizer: str = _opt("adamw", "adamw | adamw_8bit (block-wise 8-bit moments)")
    weight_decay: float = _opt(0.0, "decoupled weight decay")
    max_grad_norm: float | None = _opt(1.0, "clip gradients to this global norm (None: off)")
    loss_chunk_size: int | None = _opt(
        None, "tokens per chunk of the LM-head cross-entropy (default: ~512 MiB of logits)"
    )
    z_loss: float = _opt(0.0, "z-loss coefficient (logsumexp^2 penalty)")
    remat: str = _opt(
        "none",
        "rematerialisation: none | full | selective | mlp | offload, or a per-layer schedule "
        "such as selective:12,mlp",
    )
    offload_layer_inputs: bool = _opt(
        False,
        "keep each layer's input (the residual stream every remat policy saves) in pinned host "
        "memory; frees tokens x hidden per layer for more mlp layers (needs remat != none)",
    )
    packing: bool = _opt(True, "pack several examples per row (else length buckets)")
    train_on_responses_only: bool = _opt(True, "chat data: train on assistant turns only")
    eval_every: int = _opt(0, "evaluate every N steps (0: never)")
    eval_batches: int = _opt(8, "batches per evaluation")
    save_every: int = _opt(50, "checkpoint every N steps (and at the end)")
    keep_checkpoints: int = _opt(3, "checkpoints to keep")
    seed: int = _opt(0, "seed for data order, dropout and init")
    on_nonfinite: str = _opt("skip", "NaN/inf loss or gradients: skip the step | stop")
    resume: bool = _opt(True, "resume from the latest checkpoint in output_dir")
    progress: bool = _opt(True, "show a progress bar")
    mesh: str | None = _opt(
        None,
        "device mesh 'data=D,fsdp=F' (-1 infers one axis; batch_size must divide by D*F); "
        "default: data=processes, fsdp=devices per process",
    )
    memory_report: bool = _opt(True, "print per-device memory accounting before training")
    embeddings_on_host: bool = _opt(
        False,
        "keep the frozen embedding table in pinned host memory and gather each batch's rows "
        "there (frees ~1 GiB of device memory on 8B models; not for tied embeddings)",
    )

    def __post_init__(self) -> None:
        remat_lib.validate(self.remat, self.offload_layer_inputs)
        if self.on_nonfinite not in ("skip", "stop"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'stop', got {self.on_nonfinite!r}")
        for name in ("max_steps", "batch_size", "grad_accum_steps", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        sharding.parse_mesh(self.mesh)  # a malformed mesh fails here, not after loading


class Trainer:
    """Fine-tunes ``lora`` on ``dataset`` against the frozen ``model``.

    ``dataset`` is a ``lorax.data.DataLoader`` or anything ``lorax.data.build_dataset``
    reads (a file path, a list of records, a ``datasets.Dataset``). ``model`` may be the
    facade's ``PeftModel`` (then ``lora`` may be None and its remat policy is used).

    ``mesh`` (default: ``lorax.sharding.make_mesh(config.mesh)``) is where training runs;
    ``sharding_rules`` decide which leaves are split over its ``fsdp`` axis. A model loaded
    with ``lorax.load(..., mesh=mesh)`` is already laid out and is not copied.
    """

    def __init__(
        self,
        model: Any,
        lora: LoraWeights | None,
        dataset: Any,
        config: TrainConfig,
        *,
        eval_dataset: Any = None,
        mesh: Mesh | None = None,
        sharding_rules: sharding.ShardingRules = sharding.DEFAULT_RULES,
    ):
        from lorax.facade import PeftModel

        if isinstance(model, PeftModel):
            lora = lora or model.lora
            if config.remat == "none" and model.remat != "none":
                config = dataclasses.replace(config, remat=model.remat)
            model = model.base
        if lora is None:
            raise ValueError("Trainer needs LoRA weights (lorax.init_lora)")
        self.mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
        self.model: Model = model
        self.config = config
        self.loader = self._loader(dataset, shuffle=True)
        self.eval_loader = self._loader(eval_dataset, shuffle=False) if eval_dataset else None
        ways = sharding.batch_divisor(self.mesh)
        for loader in (self.loader, self.eval_loader):
            if loader is not None and loader.batch_size % ways:
                raise ValueError(
                    f"batch_size={loader.batch_size} must be a multiple of data x fsdp = {ways} "
                    f"(mesh {sharding.describe(self.mesh)}): each device takes 1/{ways} of a batch"
                )
        self.model = sharding.shard_model(model, self.mesh, sharding_rules)
        if config.embeddings_on_host:
            self.model = embeddings_to_host(self.model)
        self.schedule = make_schedule(
            config.lr_schedule,
            config.learning_rate,
            config.max_steps,
            config.warmup_steps,
            config.min_lr_ratio,
        )
        self.optimizer = make_optimizer(
            config.optimizer,
            self.schedule,
            weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm,
        )
        self.step_config = StepConfig(
            loss_chunk_size=config.loss_chunk_size,
            z_loss=config.z_loss,
            # The mesh's forward constraints come with the step shardings (StepShardings.forward).
            forward=ForwardOptions(
                remat=config.remat, offload_layer_inputs=config.offload_layer_inputs
            ),
        )
        state = init_train_state(lora, self.optimizer, key=jax.random.key(config.seed))
        self.state = sharding.place_tree(
            state, sharding.trainable_shardings(state, self.mesh, sharding_rules)
        )
        self.shardings = sharding.step_shardings(self.model, self.state, self.mesh, sharding_rules)
        self.history: list[dict[str, Any]] = []
        self.memory: sharding.MemoryReport | None = None
        os.makedirs(config.output_dir, exist_ok=True)
        self.checkpoints = ckpt_lib.CheckpointStore(
            os.path.join(config.output_dir, "checkpoints"), keep=config.keep_checkpoints
        )

    # ------------------------------------------------------------------------------ data

    def _loader(self, dataset: Any, *, shuffle: bool) -> Any:
        from lorax.data import DataLoader, build_dataset

        if isinstance(dataset, DataLoader):
            return dataset
        if self.model.tokenizer is None:
            raise ValueError("building a dataset needs a model with a tokenizer")
        return build_dataset(
            dataset,
            self.model.tokenizer,
            max_length=self.config.seq_len,
            batch_size=self.config.batch_size,
            packing=self.config.packing,
            train_on_responses_only=self.config.train_on_responses_only,
            seed=self.config.seed,
            shuffle=shuffle,
        )

    def _next_batches(self, batches: Iterator[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """``grad_accum_steps`` micro-batches stacked on a leading axis (padded alike)."""
        micro = [next(batches) for _ in range(self.config.grad_accum_steps)]
        width = max(m["input_ids"].shape[1] for m in micro)
        pads = {"input_ids": self.loader.pad_id, "labels": -100, "segment_ids": 0, "positions": 0}
        stacked = {}
        for key in micro[0]:
            rows = [
                np.pad(
                    m[key], ((0, 0), (0, width - m[key].shape[1])), constant_values=pads.get(key, 0)
                )
                for m in micro
            ]
            stacked[key] = np.stack(rows)
        return stacked

    # ------------------------------------------------------------------------------ loop

    def train(self) -> LoraWeights:
        """Runs to ``max_steps`` (resuming from the latest checkpoint if there is one)."""
        cfg = self.config
        if cfg.resume:
            self._maybe_resume()
        step_fn = make_train_step(
            self.model, self.optimizer, self.step_config, shardings=self.shardings
        )
        eval_fn = make_eval_step(self.model, self.step_config, shardings=self.shardings)
        self.memory = self.memory_report()
        primary = is_primary()
        if cfg.memory_report and primary:
            print(self.memory.table(), flush=True)
        flops_per_token = train_flops_per_token(
            self.model.config,
            cfg.seq_len,
            remat=cfg.remat,
            lora_rank=self.state.lora.config.rank,
            lora_targets=self.state.lora.config.targets,
        )
        # This process's own device: another process's cannot be queried.
        local_device = jax.local_devices()[0]
        peak = device_peak_flops(local_device)
        batches = self.loader.forever()
        start = int(self.state.step)
        bar = _progress(cfg.max_steps, start, enabled=cfg.progress and primary)
        metrics_path = os.path.join(cfg.output_dir, METRICS_FILE)
        last_time = time.perf_counter()
        with _open_if(primary, metrics_path) as metrics_file:
            for step in range(start + 1, cfg.max_steps + 1):
                batch = self._next_batches(batches)
                placed = sharding.place_batch(batch, self.shardings.batch)
                self.state, metrics = step_fn(self.state, placed)
                metrics = jax.device_get(metrics)
                now = time.perf_counter()
                tokens = int((batch["labels"] != -100).sum())
                slots = int(batch["input_ids"].size)
                seconds = now - last_time
                last_time = now
                record = {
                    "step": step,
                    "loss": float(metrics["loss"]),
                    "lr": float(self.schedule(step - 1)),
                    "grad_norm": float(metrics["grad_norm"]),
                    "target_tokens": tokens,
                    "tokens_per_s": slots / seconds,
                    "step_time_s": seconds,
                    "skipped": not bool(metrics["finite"]),
                }
                if peak:
                    record["mfu"] = slots * flops_per_token / seconds / peak
                mem = peak_memory_bytes(local_device)
                if mem is not None:
                    record["peak_mem_gib"] = mem / 2**30
                if record["skipped"] and cfg.on_nonfinite == "stop":
                    raise FloatingPointError(
                        f"step {step}: loss or gradients are not finite (loss="
                        f"{record['loss']}, grad_norm={record['grad_norm']}); the last "
                        "checkpoint is intact. Lower the learning rate or use on_nonfinite='skip'."
                    )
                if cfg.eval_every and self.eval_loader and step % cfg.eval_every == 0:
                    record["eval_loss"] = self.evaluate(eval_fn)
                self.history.append(record)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if cfg.save_every and (step % cfg.save_every == 0 or step == cfg.max_steps):
                    self._save(step)
        bar.close()
        self.checkpoints.wait()
        if primary:
            write_loss_curve(self.logged_metrics(), os.path.join(cfg.output_dir, LOSS_CURVE_FILE))
        return self.state.lora

    def memory_report(self) -> sharding.MemoryReport:
        """Per-device bytes of the base, adapters and optimizer state as laid out, and an
        estimate of the activations of one micro-batch."""
        return sharding.memory_report(
            self.model,
            self.state,
            tokens_per_device=self.loader.batch_size
            * self.loader.max_length
            // sharding.batch_divisor(self.mesh),
            remat=self.config.remat,
            offload_layer_inputs=self.config.offload_layer_inputs,
            loss_chunk_size=self.config.loss_chunk_size,
            mesh=self.mesh,
        )

    def evaluate(self, eval_fn: Any = None) -> float:
        """Mean loss over up to ``eval_batches`` batches of the eval set (from its start)."""
        eval_fn = eval_fn or make_eval_step(self.model, self.step_config, shardings=self.shardings)
        total = count = 0.0
        for i in range(min(self.config.eval_batches, len(self.eval_loader))):
            batch = sharding.place_batch(self.eval_loader.batch(0, i), self.shardings.eval_batch)
            s, n = eval_fn(self.state.lora, batch)
            total += float(s)
            count += float(n)
        return float(mean_loss(jnp.asarray(total), jnp.asarray(count)))

    # ------------------------------------------------------------------------- checkpoints

    def _save(self, step: int) -> None:
        self.checkpoints.save(step, self.state, {"data": self.loader.state_dict()})

    def _maybe_resume(self) -> None:
        restored = self.checkpoints.restore_latest(self.state)
        if restored is None:
            return
        self.state, meta = restored
        self.loader.load_state_dict(meta["data"])
        # Drop metric lines past the checkpoint: those steps are about to be re-run.
        step = int(self.state.step)
        path = os.path.join(self.config.output_dir, METRICS_FILE)
        if is_primary() and os.path.exists(path):
            kept = [r for r in _read_jsonl(path) if r["step"] <= step]
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)

    def logged_metrics(self) -> list[dict[str, Any]]:
        """Every step's metrics of this run so far, resumed segments included."""
        path = os.path.join(self.config.output_dir, METRICS_FILE)
        return _read_jsonl(path) if os.path.exists(path) else self.history


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut by a kill mid-write ends the readable history
    return out


@contextlib.contextmanager
def _open_if(enabled: bool, path: str) -> Iterator[Any]:
    """The metrics file opened for appending on the writing process, None elsewhere."""
    if not enabled:
        yield None
        return
    with open(path, "a", encoding="utf-8") as f:
        yield f


def _progress(total: int, initial: int, *, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        unit="step",
        dynamic_ncols=True,
        smoothing=0.1 if not math.isinf(total) else 0.3,
    )
