"""Scale-out: a ``(data, fsdp)`` device mesh, sharding rules, sharded loading, accounting.

One process or many, one device or many, training is the same jitted step with input and
output shardings; XLA's partitioner inserts every collective. Typical use::

    mesh = lorax.sharding.make_mesh("data=2,fsdp=4")          # or make_mesh() for the default
    model = lorax.load(path, quantize="nf4", mesh=mesh)        # each device reads its piece
    trainer = lorax.Trainer(model, lora, data, cfg, mesh=mesh) # places state and batches

Modules: :mod:`~lorax.sharding.mesh` (the mesh), :mod:`~lorax.sharding.rules` (which axis of
which leaf is split), :mod:`~lorax.sharding.place` (putting values on the mesh, multi-process
safe), :mod:`~lorax.sharding.nf4` and :mod:`~lorax.sharding.load` (loading straight into the
layout), :mod:`~lorax.sharding.memory` (per-device bytes).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lorax.sharding.load import abstract_base_params, load_params_sharded
from lorax.sharding.memory import (
    MemoryReport,
    activation_bytes,
    memory_report,
    per_device_bytes,
    total_bytes,
)
from lorax.sharding.mesh import (
    AXES,
    BATCH_AXES,
    DATA,
    FSDP,
    MeshSpec,
    describe,
    make_mesh,
    parse_mesh,
)
from lorax.sharding.place import assemble, place, place_batch, place_tree, shard_model, to_host
from lorax.sharding.rules import (
    DEFAULT_RULES,
    ShardingRules,
    base_shardings,
    batch_divisor,
    batch_sharding,
    nf4_split,
    replicated,
    split_axis,
    trainable_shardings,
)
from lorax.train.step import StepShardings


def forward_constraints(mesh: Mesh) -> dict[str, Any]:
    """``ForwardOptions`` fields that make each scanned layer FSDP-shaped on ``mesh``.

    Without them XLA's partitioner is free to decode an NF4 weight shard first and all-gather
    the 16-bit (or float32) result: 4-8x the bytes of gathering the stored 4-bit form. With
    them each layer's frozen weights are gathered as stored, right before the layer runs, and
    the hidden states keep their batch split. Empty on a single device.
    """
    if mesh.size == 1:
        return {}
    return {
        "layer_weights_sharding": replicated(mesh),
        "activation_sharding": NamedSharding(mesh, PartitionSpec(BATCH_AXES)),
    }


def step_shardings(
    model: Any, state: Any, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES
) -> StepShardings:
    """In/out shardings of the train and eval steps for ``model`` (already on ``mesh``: loaded
    with ``mesh=`` or placed by ``shard_model``) and ``state`` laid out by the rules."""
    model_shardings = jax.tree.map(lambda x: x.sharding, model)
    for s in jax.tree_util.tree_leaves(model_shardings):
        if not (isinstance(s, NamedSharding) and s.mesh == mesh):
            raise ValueError(
                "the model's parameters are not on this mesh; load it with "
                "lorax.load(..., mesh=mesh) or place it with lorax.sharding.shard_model"
            )
    return StepShardings(
        state=trainable_shardings(state, mesh, rules),
        model=model_shardings,
        batch=batch_sharding(mesh),
        eval_batch=batch_sharding(mesh, micro_batched=False),
        replicated=replicated(mesh),
        forward=forward_constraints(mesh),
    )


__all__ = [
    "AXES",
    "BATCH_AXES",
    "DATA",
    "DEFAULT_RULES",
    "FSDP",
    "MemoryReport",
    "MeshSpec",
    "ShardingRules",
    "StepShardings",
    "abstract_base_params",
    "activation_bytes",
    "assemble",
    "base_shardings",
    "batch_divisor",
    "batch_sharding",
    "describe",
    "forward_constraints",
    "load_params_sharded",
    "make_mesh",
    "memory_report",
    "nf4_split",
    "parse_mesh",
    "per_device_bytes",
    "place",
    "place_batch",
    "place_tree",
    "replicated",
    "shard_model",
    "split_axis",
    "step_shardings",
    "to_host",
    "total_bytes",
    "trainable_shardings",
]
