"""Training checkpoints: the whole ``TrainState`` plus JSON metadata, via orbax.

orbax writes each step into a temporary directory and renames it into place when complete,
so a run killed at any moment (even SIGKILL mid-write) leaves the previous checkpoints
intact, and restore only ever sees finished ones. The last ``keep`` steps are kept.

Sharded states are saved as global arrays: with several processes every process calls
``save`` and writes its own shards (orbax's multi-host mode; process 0 the metadata).
``restore_latest`` lays each array out like the corresponding leaf of ``like``, so a
checkpoint written on one mesh resumes on any other (more or fewer devices or processes).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from lorax.lora import LoraWeights
from lorax.train.step import TrainState


def _as_tree(state: TrainState) -> dict[str, Any]:
    # PRNG keys are stored as their raw uint32 data: plain arrays every orbax version reads.
    return {
        "lora": state.lora.params,
        "opt_state": state.opt_state,
        "step": state.step,
        "key": jax.random.key_data(state.key),
    }


def _from_tree(tree: dict[str, Any], like: TrainState) -> TrainState:
    return TrainState(
        LoraWeights(tree["lora"], like.lora.config),
        tree["opt_state"],
        tree["step"],
        jax.random.wrap_key_data(tree["key"]),
    )


class CheckpointStore:
    """Saves and restores ``TrainState`` + metadata under ``directory/<step>/``."""

    def __init__(self, directory: str, *, keep: int = 3):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def save(self, step: int, state: TrainState, metadata: dict[str, Any]) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_as_tree(state)),
                meta=ocp.args.JsonSave(metadata),
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore_latest(self, like: TrainState) -> tuple[TrainState, dict[str, Any]] | None:
        """The newest complete checkpoint restored into ``like``'s structure, or None."""
        step = self._manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _as_tree(like))
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return _from_tree(restored["state"], like), restored["meta"]

    def wait(self) -> None:
        """Blocks until asynchronous saves are on disk."""
        self._manager.wait_until_finished()
