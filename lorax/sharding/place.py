"""Putting values onto a mesh, the same way on one process and on many.

On one process ``jax.device_put`` does it. With several processes a global array cannot be
built from one process's value by ``device_put``; instead every process builds the pieces its
own devices hold (``jax.make_array_from_callback``) from a value that all processes agree on
(the same seed, the same checkpoint, the same data position). These helpers hide the
difference so the Trainer has one code path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from lorax.sharding.rules import DEFAULT_RULES, ShardingRules, base_shardings

Index = tuple[slice, ...]


def place(x: Any, sharding: NamedSharding) -> jax.Array:
    """``x`` (numpy, or a jax array every process holds in full) as a global array.

    A value already laid out as ``sharding`` is returned as is. PRNG key arrays are placed
    through their raw key data.
    """
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = place(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(np.shape(x), sharding, lambda index: x[index])


def place_tree(tree: Any, shardings: Any) -> Any:
    """``place`` over a pytree and a matching pytree of shardings."""
    return jax.tree.map(place, tree, shardings)


def place_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """A host batch (the same global batch on every process) split over the mesh.

    Each process copies only the rows its own devices hold.
    """
    return {k: place(np.asarray(v), sharding) for k, v in batch.items()}


def assemble(
    shape: tuple[int, ...], sharding: NamedSharding, make_piece: Callable[[Index, Any], jax.Array]
) -> jax.Array:
    """A global array from per-device pieces that ``make_piece(index, device)`` builds.

    Each distinct piece is built once per process (on the first of its devices that holds it)
    and copied to the others: a piece replicated over the ``data`` axis is read and computed
    once, not once per device. ``make_piece`` must return an array on ``device``.
    """
    built: dict[tuple[tuple[int, int], ...], jax.Array] = {}
    pieces = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))
        if key in built:
            pieces.append(jax.device_put(built[key], device))
        else:
            built[key] = make_piece(index, device)
            pieces.append(built[key])
    return jax.make_array_from_single_device_arrays(shape, sharding, pieces)


def shard_model(model: Any, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> Any:
    """``model`` with its base parameters laid out on ``mesh`` by the sharding rules.

    For a model already in memory (built, or loaded without a mesh). ``lorax.load(...,
    mesh=mesh)`` reads straight into this layout instead, so no device ever holds more than
    its piece.
    """
    from lorax.model import Model

    params = place_tree(model.params, base_shardings(model.params, mesh, rules))
    return Model(params, model.config, model.tokenizer)


def to_host(tree: Any) -> Any:
    """Every leaf as a full numpy array on every process (for saving, printing, exporting)."""
    leaves = jax.tree_util.tree_leaves(tree)
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
