"""Loading an HF checkpoint straight into the sharded layout.

Every leaf of the base pytree is built as a global array from per-device pieces, and each
process reads from disk only the bytes its own devices keep: whole rows of dense tensors
(the rules split dense base leaves by rows, a contiguous range of the file) and block-aligned
flat ranges of projections that become NF4 (quantized on the device that keeps them, see
:mod:`lorax.sharding.nf4`). So a model larger than one device's memory loads, and no host
holds more than one layer's piece of one tensor at a time.

Exceptions, read whole by each process and then split: pre-quantized bitsandbytes 4-bit
projections (already 4-bit, so small) and leaves the rules replicate (small by definition,
or not block-aligned at toy sizes).

The result equals ``convert.hf.load_params`` (same checks, same errors, same values bit for
bit), only laid out on the mesh.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from convert.hf import (
    ShardedCheckpoint,
    check_quantize,
    check_shape,
    open_checkpoint,
    read_shared_parameters,
    read_tensor,
    set_path,
    stack_layers,
)
from convert.names import TensorSpec, tensor_specs
from lorax.sharding.nf4 import quantize_nf4_sharded
from lorax.sharding.place import Index, assemble, place_tree
from lorax.sharding.rules import DEFAULT_RULES, ShardingRules, base_shardings, nf4_shardings
from pallas_kernels.nf4 import quantize_nf4


def load_params_sharded(
    directory: str,
    config: Any,
    mesh: Mesh,
    *,
    quantize: str | None = None,
    dtype: Any = jnp.bfloat16,
    double_quant: bool = True,
    hf_config: Mapping[str, Any] | None = None,
    rules: ShardingRules = DEFAULT_RULES,
) -> dict[str, Any]:
    """``convert.hf.load_params`` into the layout ``base_shardings(params, mesh, rules)``.

    Dense and NF4 tensors are built piece by piece on the devices that hold them. An MoE
    layer's expert matrices are read (and quantized) one at a time on the default device,
    stacked, then placed: the experts of one projection pass through one device whole
    (~16 GB of NF4 for Mixtral-8x7B's gate/up).
    """
    check_quantize(quantize)
    ckpt, specs, pre_quantized = open_checkpoint(directory, config, hf_config)
    for spec in specs:
        if not (pre_quantized and spec.quantizable):
            for name in spec.hf_names():
                check_shape(ckpt, spec, name)

    def nf4(spec: TensorSpec) -> bool:
        return quantize == "nf4" and spec.quantizable and not pre_quantized

    abstract = abstract_base_params(
        config, quantize=None if pre_quantized else quantize, dtype=dtype, double_quant=double_quant
    )
    shardings = base_shardings(abstract, mesh, rules)

    def read_layers(spec: TensorSpec) -> Any:
        """One tensor's layers read whole (and quantized) as the single-device loader does."""
        return stack_layers(
            [
                read_tensor(
                    ckpt,
                    spec,
                    n,
                    quantize=quantize,
                    dtype=dtype,
                    double_quant=double_quant,
                    pre_quantized=pre_quantized,
                )
                for n in spec.hf_names()
            ]
        )

    params: dict[str, Any] = {}
    for spec in specs:
        if spec.index:
            continue  # an MoE expert matrix: below
        names = spec.hf_names()
        sharding = _get_path(shardings, spec.path)
        if pre_quantized and spec.quantizable:
            value = read_layers(spec)
            value = place_tree(value, nf4_shardings(value, mesh, rules.base_min_bytes))
        elif nf4(spec):
            value = quantize_nf4_sharded(
                functools.partial(_read_layer_flat, ckpt, names),
                num_layers=len(spec.layers),
                shape=spec.shape,
                dtype=dtype,
                double_quant=double_quant,
                shardings=sharding,
            )
        else:
            value = _load_dense(ckpt, spec, names, sharding, spec.dtype or dtype)
        set_path(params, spec.path, value)
    # Expert matrices are read and quantized one at a time on the default device, then each
    # projection's experts are placed together.
    for path, value in read_shared_parameters(specs, read_layers).items():
        set_path(params, path, place_tree(value, _get_path(shardings, path)))
    return params


def abstract_base_params(
    config: Any,
    *,
    quantize: str | None = None,
    dtype: Any = jnp.bfloat16,
    double_quant: bool = True,
) -> dict[str, Any]:
    """The base pytree of ``config`` as ``ShapeDtypeStruct``s (NF4Tensors of them where
    quantized), without reading or allocating anything: for ``base_shardings`` and for
    ``memory_report`` when sizing a run before it starts."""
    check_quantize(quantize)
    abstract: dict[str, Any] = {}
    for spec in tensor_specs(config):
        if any(spec.index):
            continue  # one more member of a parameter already placed (an MoE expert)
        batch = (len(spec.layers), *spec.stack) if spec.per_layer else ()
        leaf = jax.ShapeDtypeStruct((*batch, *spec.shape), spec.dtype or dtype)
        if quantize == "nf4" and spec.quantizable:
            leaf = _abstract_nf4(leaf, len(batch), double_quant)
        set_path(abstract, spec.path, leaf)
    return abstract


def _abstract_nf4(leaf: jax.ShapeDtypeStruct, batch_axes: int, double_quant: bool) -> Any:
    quantize = functools.partial(quantize_nf4, blocksize=64, double_quant=double_quant)
    for _ in range(batch_axes):
        quantize = jax.vmap(quantize)
    return jax.eval_shape(quantize, leaf)


def _get_path(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _read_layer_flat(
    ckpt: ShardedCheckpoint, names: list[str], layer: int, start: int, stop: int
) -> np.ndarray:
    return ckpt.read_flat(names[layer], start, stop)


def _read_rows(ckpt: ShardedCheckpoint, name: str, index: Index) -> np.ndarray:
    """``ckpt[name][index]``, reading only the rows ``index[0]`` selects (one contiguous read)."""
    shape = ckpt.shape(name)
    rows = index[0] if index else slice(None)
    start, stop, step = rows.indices(shape[0])
    row_size = math.prod(shape[1:])
    block = ckpt.read_flat(name, start * row_size, stop * row_size)
    block = block.reshape(stop - start, *shape[1:])
    return block[(slice(None, None, step), *index[1:])]


def _load_dense(
    ckpt: ShardedCheckpoint,
    spec: TensorSpec,
    names: list[str],
    sharding: NamedSharding,
    dtype: Any,
) -> jax.Array:
    shape = (len(names), *spec.shape) if spec.per_layer else spec.shape

    def piece(index: Index, device: jax.Device) -> jax.Array:
        if spec.per_layer:
            layers = range(len(names))[index[0]]
            host = np.stack([_read_rows(ckpt, names[i], index[1:]) for i in layers])
        else:
            host = _read_rows(ckpt, names[0], index)
        with jax.default_device(device):
            # The same cast as the whole-tensor loader (jnp.asarray(numpy, dtype)).
            return jnp.asarray(host, dtype=dtype)

    return assemble(shape, sharding, piece)
