"""Which axis of each leaf is split over ``fsdp``: the sharding rules, as pure functions.

Rules (every leaf not covered is replicated):

* **Small leaves are replicated.** A leaf below ``ShardingRules.base_min_bytes`` (frozen base)
  or ``trainable_min_bytes`` (adapters, optimizer state) costs more in collective latency
  than it saves in memory. Scalars and 1-D leaves of stacked subtrees are always replicated.
* **Never the layer axis.** Leaves under a ``"layers"`` (or ``"dense_layers"``) key carry a
  leading layer axis that ``lax.scan`` slices one layer at a time; splitting it would make
  every step gather the whole stack, so axis 0 of such leaves is never sharded.
* **Base dense leaves: the first divisible axis** (rows of ``embed_tokens [V, D]``, ``out`` of
  a dense ``[L, out, in]`` projection). A row piece is one contiguous byte range of the
  checkpoint, so the sharded loader reads each device's piece with one read.
* **Trainable leaves: the largest divisible axis** (``in`` of ``lora_a [L, r, in]``, ``out``
  of ``lora_b [L, out, r]``, never the rank). Adam moments have their parameter's shape and so
  its sharding; 8-bit moments' codes too (their 1-D block scales are replicated).
* **NF4 leaves** are split along their flattened element axis, all fields consistently:
  device ``i`` of ``n`` holds elements ``[i*numel/n, (i+1)*numel/n)`` of every layer's matrix
  as packed nibbles, and exactly the absmax blocks of those elements. That needs ``numel``
  to be a multiple of ``blocksize * n`` (whole 64-element blocks per piece); the double-quant
  ``nested_absmax`` is split too when ``nblocks`` is a multiple of ``nested_blocksize * n``
  and replicated otherwise (4 bytes per 16384 elements); ``offset`` (one float per layer) is
  replicated. An NF4 leaf that is not block-aligned is replicated whole (no padding: the
  packed format has none to spare), which only happens for toy shapes.
* A leaf with no divisible axis is replicated (no padding), again only at toy sizes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from convert.names import DENSE_LAYERS, LAYERS
from lorax.sharding.mesh import BATCH_AXES, FSDP
from pallas_kernels.nf4 import NF4Tensor

LAYERS_KEYS = (LAYERS, DENSE_LAYERS)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Size thresholds below which a leaf is replicated instead of split over ``fsdp``."""

    base_min_bytes: int = 1 << 20
    trainable_min_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.base_min_bytes < 0 or self.trainable_min_bytes < 0:
            raise ValueError(f"sharding thresholds must be >= 0, got {self}")


DEFAULT_RULES = ShardingRules()


def split_axis(
    shape: Sequence[int],
    nbytes: int,
    *,
    fsdp: int,
    min_bytes: int,
    stacked: bool,
    largest: bool,
) -> int | None:
    """The axis of a dense leaf to split ``fsdp`` ways, or None to replicate it.

    ``stacked`` leaves never split axis 0; ``largest`` picks the largest divisible axis
    (ties: the first), else the first divisible axis.
    """
    if fsdp == 1 or nbytes < min_bytes or len(shape) == 0 or (stacked and len(shape) < 2):
        return None
    candidates = [a for a in range(1 if stacked else 0, len(shape)) if shape[a] % fsdp == 0]
    if not candidates:
        return None
    if largest:
        return max(candidates, key=lambda a: (shape[a], -a))
    return candidates[0]


def nf4_split(t: NF4Tensor, *, fsdp: int, min_bytes: int) -> tuple[bool, bool]:
    """(split packed+absmax?, split nested_absmax?) for an NF4 leaf over ``fsdp`` devices.

    Both need whole quantization blocks per piece (see the module docstring).
    """
    packed_bytes = math.prod(t.packed.shape)
    if fsdp == 1 or packed_bytes < min_bytes or t.numel % (t.blocksize * fsdp):
        return False, False
    nested = t.double_quant and t.nblocks % (t.nested_blocksize * fsdp) == 0
    return True, nested


def _spec(ndim: int, axis: int | None) -> P:
    if axis is None:
        return P()
    return P(*([None] * axis), FSDP)


def _is_stacked(path: Sequence[Any]) -> bool:
    return any(getattr(k, "key", None) in LAYERS_KEYS for k in path)


def _nbytes(x: Any) -> int:
    return math.prod(x.shape) * jax.numpy.dtype(x.dtype).itemsize


def nf4_shardings(t: NF4Tensor, mesh: Mesh, min_bytes: int) -> NF4Tensor:
    """An NF4Tensor whose array fields are the ``NamedSharding`` of each field of ``t``."""
    split, nested = nf4_split(t, fsdp=mesh.shape[FSDP], min_bytes=min_bytes)
    last = len(t.batch_shape)  # the flat axis follows the batch (layer) axes

    def sharding(field: Any, shard: bool) -> NamedSharding | None:
        if field is None:
            return None
        return NamedSharding(mesh, _spec(field.ndim, last if shard else None))

    return NF4Tensor(
        sharding(t.packed, split),
        sharding(t.absmax, split),
        sharding(t.nested_absmax, nested),
        sharding(t.offset, False),
        shape=t.shape,
        dtype=t.dtype,
        blocksize=t.blocksize,
        nested_blocksize=t.nested_blocksize,
    )


def base_shardings(params: Any, mesh: Mesh, rules: ShardingRules = ShardingRules()) -> Any:
    """Shardings for the frozen base pytree (arrays, ShapeDtypeStructs or NF4Tensors of them)."""

    def leaf(path: Sequence[Any], x: Any) -> Any:
        if isinstance(x, NF4Tensor):
            return nf4_shardings(x, mesh, rules.base_min_bytes)
        return _array_sharding(path, x, mesh, min_bytes=rules.base_min_bytes, largest=False)

    return jax.tree_util.tree_map_with_path(
        leaf, params, is_leaf=lambda x: isinstance(x, NF4Tensor)
    )


def trainable_shardings(tree: Any, mesh: Mesh, rules: ShardingRules = ShardingRules()) -> Any:
    """Shardings for adapters, optimizer state or a whole ``TrainState`` (step and RNG key,
    being scalars, are replicated)."""

    def leaf(path: Sequence[Any], x: Any) -> NamedSharding:
        if len(x.shape) == 0:
            return NamedSharding(mesh, P())
        return _array_sharding(path, x, mesh, min_bytes=rules.trainable_min_bytes, largest=True)

    return jax.tree_util.tree_map_with_path(leaf, tree)


def _array_sharding(
    path: Sequence[Any], x: Any, mesh: Mesh, *, min_bytes: int, largest: bool
) -> NamedSharding:
    """One array's sharding: the axis ``split_axis`` picks split over fsdp, or replicated."""
    axis = split_axis(
        x.shape,
        _nbytes(x),
        fsdp=mesh.shape[FSDP],
        min_bytes=min_bytes,
        stacked=_is_stacked(path),
        largest=largest,
    )
    return NamedSharding(mesh, _spec(len(x.shape), axis))


def batch_sharding(mesh: Mesh, *, micro_batched: bool = True) -> NamedSharding:
    """Rows split over ``data x fsdp``: ``[accum, B, S]`` (``micro_batched``) or ``[B, S]``."""
    return NamedSharding(mesh, P(None, BATCH_AXES) if micro_batched else P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
    """How many ways each batch is split: rows per batch must be a multiple of this."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)
