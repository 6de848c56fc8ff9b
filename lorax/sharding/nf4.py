"""NF4 quantization straight into the sharded layout, bit-identical to ``quantize_nf4``.

Choice: **shard boundaries aligned to quantization blocks, quantized on the device that keeps
the piece.** With the split of :mod:`lorax.sharding.rules` every device's piece of a matrix
is a whole number of 64-element absmax blocks, and the first NF4 stage (per-block absmax,
4-bit codes, nibble packing) only ever looks inside one block, so quantizing each piece on its
own gives exactly the packed bytes and float32 absmax of quantizing the whole matrix. Each
process therefore reads only its devices' flat element ranges of each layer from the
checkpoint, and each device quantizes its own range.

The second stage (double quantization) is not block-local: ``offset`` is the mean of *all*
absmax values of a matrix. It runs as one jitted XLA computation over the global, sharded
float32 absmax (``numel / 64`` floats per matrix, 1/8 of the packed bytes), using the very
function ``quantize_nf4`` uses; XLA's collectives move the few values the sums need and the
float operations are the same as on one device, so codes, nested absmax and offset are
bit-identical too (``tests/test_sharding.py`` checks all four fields).

A replicated leaf (too small or not block-aligned) takes the same path with one piece: the
whole matrix.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lorax.sharding.place import assemble
from pallas_kernels import nf4 as nf4_format
from pallas_kernels.nf4 import NF4Tensor, quantize_nf4

Reader = Callable[[int, int, int], np.ndarray]
"""``read(layer, start, stop)``: elements ``[start, stop)`` of one layer's flattened matrix."""


def quantize_nf4_sharded(
    read: Reader,
    *,
    num_layers: int,
    shape: tuple[int, ...],
    dtype: object,
    double_quant: bool,
    shardings: NF4Tensor,
    blocksize: int = 64,
) -> NF4Tensor:
    """A stacked ``[num_layers]`` NF4Tensor laid out as ``shardings`` (from ``nf4_shardings``).

    Equals ``stack([quantize_nf4(jnp.asarray(w_l, dtype), blocksize, double_quant)])`` over
    the layers' matrices ``w_l``, bit for bit, but each process reads only the pieces its
    devices hold. Layer by layer, each device's piece is cast to ``dtype`` and quantized by
    one SPMD program over the flat, sharded matrix (blockwise work: no collectives, one
    compile per matrix shape for any number of devices), so the unquantized weights on a
    device never exceed one layer's piece.
    """
    numel = int(np.prod(shape))
    packed_spec = shardings.packed.spec
    # The flat axis of one layer is split like the last axis of the stacked fields.
    flat_axis = packed_spec[-1] if len(packed_spec) == 2 else None
    mesh = shardings.packed.mesh
    flat = NamedSharding(mesh, P(flat_axis))
    packed_layers, absmax_layers = [], []
    for layer in range(num_layers):

        def piece(index: tuple[slice, ...], device: jax.Device, layer: int = layer) -> jax.Array:
            start, stop, _ = index[0].indices(numel)
            if start % blocksize or (stop % blocksize and stop != numel):
                raise AssertionError(f"NF4 piece [{start}, {stop}) is not block-aligned")
            with jax.default_device(device):
                # The same cast as the whole-tensor loader (jnp.asarray(numpy, dtype)).
                return jnp.asarray(read(layer, start, stop), dtype=dtype)

        weights = assemble((numel,), flat, piece)
        packed, absmax = _quantize_blocks(weights, blocksize=blocksize, sharding=flat)
        del weights
        packed_layers.append(packed)
        absmax_layers.append(absmax)
    fields = (shardings.packed, shardings.absmax, shardings.nested_absmax, shardings.offset)
    packed, absmax, nested, offset = _finish(
        packed_layers, absmax_layers, double_quant=double_quant, shardings=fields
    )
    return NF4Tensor(packed, absmax, nested, offset, shape=shape, dtype=dtype, blocksize=blocksize)


@functools.partial(jax.jit, static_argnames=("blocksize", "sharding"))
def _quantize_blocks(
    weights: jax.Array, *, blocksize: int, sharding: NamedSharding
) -> tuple[jax.Array, jax.Array]:
    """Packed nibbles and float32 absmax of a flat matrix: quantize_nf4's first stage."""
    t = quantize_nf4(weights, blocksize=blocksize, double_quant=False)
    constrain = functools.partial(jax.lax.with_sharding_constraint, shardings=sharding)
    return constrain(t.packed), constrain(t.absmax)


@functools.partial(jax.jit, static_argnames=("double_quant", "shardings"))
def _finish(
    packed_layers: list[jax.Array],
    absmax_layers: list[jax.Array],
    *,
    double_quant: bool,
    shardings: tuple,
) -> tuple:
    """Stacks the layers and, with ``double_quant``, runs quantize_nf4's second stage on the
    global ``[L, nblocks]`` float32 absmax. Returns (packed, absmax, nested_absmax, offset)."""
    packed, absmax = jnp.stack(packed_layers), jnp.stack(absmax_layers)
    nested = offset = None
    if double_quant:
        # quantize_nf4's own second stage (private to pallas_kernels.nf4): reusing it rather
        # than a copy keeps the NF4 format defined in one place.
        absmax, nested, offset = jax.vmap(nf4_format.double_quantize_absmax)(absmax)
    out = (packed, absmax, nested, offset)
    return tuple(
        None if x is None else jax.lax.with_sharding_constraint(x, s)
        for x, s in zip(out, shardings, strict=True)
    )
