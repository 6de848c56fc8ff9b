"""NF4 blockwise 4-bit quantization, byte-compatible with bitsandbytes.

This module is the one place the NF4 format is defined: the two code tables, the
:class:`NF4Tensor` container, and plain-jnp ``quantize_nf4`` / ``dequantize_nf4`` that
reproduce ``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")`` /
``dequantize_4bit``. Being bit-exact with bitsandbytes (bnb) is what lets a QLoRA run here
be compared number for number with a PyTorch baseline, and lets a ``*-bnb-4bit`` checkpoint
be loaded and written back without loss (``convert.bnb`` does the serialized form).

Format (per matrix, flattened row-major, ``n`` elements, blocks of ``blocksize`` = 64):

* ``absmax[b] = max |w|`` over block ``b`` (float32; the last block may be partial).
* Each element is scaled into [-1, 1] by its block's absmax and replaced by the index of the
  nearest :data:`NF4_CODE` value; two 4-bit indices share a byte, element ``2i`` in the HIGH
  nibble. An odd ``n`` is padded with one scaled 0.0 (index 7).
* Dequantization is ``float32(NF4_CODE[q] * absmax)`` rounded once to the original dtype.
* Double quantization ("compress_statistics") stores absmax in 8 bits:
  ``offset = mean(absmax)``; ``absmax - offset`` is blockwise-quantized in blocks of 256 with
  the signed dynamic map :data:`DYNAMIC_CODE` (nested absmax in float32), and decoded as
  ``float32(float32(DYNAMIC_CODE[c] * nested_absmax) + offset)``.

Exact bnb rounding, as read from bitsandbytes 0.50 (``backends/default/ops.py``, which is what
``quantize_4bit`` runs on CPU, and ``csrc`` for CUDA) and checked against it in
``tests/test_nf4.py``:

* Inputs are upcast to float32 first; absmax and scaling are float32.
* Full blocks are scaled as ``w * (1 / absmax)`` (a float32 reciprocal, then a multiply, like
  the CUDA kernel). The last partial block, on bnb's CPU path, is scaled as ``w / absmax``
  (a true division, which can differ by one ulp) and its stored absmax is clamped to at least
  ``1e-38``, so an all-zero tail block stores ``absmax = 1e-38``. Both are reproduced.
* An all-zero full block stores ``absmax = 0`` and index 7 (the code for 0.0).
* The NF4 index is the number of float32 midpoints ``(code[i] + code[i+1]) / 2`` strictly
  below the scaled value (``torch.bucketize``, and CUDA's ``dQuantizeNF4`` compares against
  the same midpoints): exact nearest, ties go to the lower index. No clamping is needed since
  anything beyond +-1 maps to the end codes anyway.
* Nested (8-bit) codes follow bnb's CUDA kernel: ``x * (1 / nested_absmax)``, then exact
  nearest in :data:`DYNAMIC_CODE` with float32 midpoints; an exact tie goes to the EVEN index
  (the pivot CUDA's binary search always ends on), and an all-equal nested block
  (``nested_absmax == 0``, a 0/0) gets index 0, as both CUDA and CPU bnb produce.
* bnb's CPU path quantizes the nested absmax with a division and an approximate lookup
  (``BinSearch`` ``Direct2`` plus one neighbour check) that misses the nearest index for
  values close to a midpoint: about 0.15% of codes for ordinary weights (more when an
  outlier squeezes most values into the dense region near zero), usually by one step,
  occasionally by two there. We keep CUDA's exact nearest rounding, so against bnb on CPU
  those few nested codes differ; the packed nibbles and the float32 absmax do not.
* ``offset`` is bnb's ``absmax.mean()`` in float32, whose summation order is torch's. We sum
  pairwise in explicit halving steps instead, which is accurate and gives the same bits on
  every backend (XLA does not reassociate float adds), so it may differ from torch's mean by
  an ulp. Everything downstream uses the stored offset, so the format stays self-consistent.

Decoding a double-quantized absmax rounds ``code * nested_absmax`` before adding the offset,
as bnb does; XLA would otherwise contract the two into an FMA (see ``_unfused``). Subnormal
weights are not reproduced bit-exactly (XLA flushes denormals to zero).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DYNAMIC_CODE",
    "NESTED_BLOCKSIZE",
    "NF4_BLOCKSIZES",
    "NF4_CODE",
    "NF4Tensor",
    "dequantize_absmax",
    "dequantize_nf4",
    "double_quantize_absmax",
    "quantize_nf4",
    "stack",
]


def _constant(values: Any) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32)
    array.setflags(write=False)
    return array


# The 16 NF4 values (quantiles of N(0, 1) rescaled to [-1, 1], QLoRA paper), sorted, exactly as
# bitsandbytes' ``get_4bit_type("nf4")`` lists them before rounding to float32.
NF4_CODE: np.ndarray = _constant(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)

# Positive half of bnb's ``create_dynamic_map(signed=True)``: for decade i = 0..6, the 2**i
# midpoints of ``linspace(0.1, 1, 2**i + 1)`` scaled by 10**(i - 6), all computed by torch in
# float32 (so they are listed here rather than recomputed: numpy's linspace rounds differently).
_DYNAMIC_POSITIVE = _constant(
    # 1e-6
    [5.5000004e-07]
    # 1e-5
    + [3.2500002e-06, 7.75e-06]
    # 1e-4
    + [2.1249998e-05, 4.375e-05, 6.625e-05, 8.875e-05]
    # 1e-3
    + [1.5625001e-04, 2.6875004e-04, 3.8125002e-04, 4.9375003e-04, 6.062501e-04, 7.1875006e-04]
    + [8.3125e-04, 9.437501e-04]
    # 1e-2
    + [1.2812499e-03, 1.84375e-03, 2.40625e-03, 2.96875e-03, 3.5312497e-03, 4.09375e-03]
    + [4.6562497e-03, 5.2187503e-03, 5.78125e-03, 6.34375e-03, 6.90625e-03, 7.46875e-03]
    + [8.03125e-03, 8.59375e-03, 9.156249e-03, 9.71875e-03]
    # 1e-1
    + [1.140625e-02, 1.421875e-02, 1.703125e-02, 1.9843752e-02, 2.265625e-02, 2.546875e-02]
    + [2.8281251e-02, 3.109375e-02, 3.390625e-02, 3.6718752e-02, 3.953125e-02, 4.2343747e-02]
    + [4.515625e-02, 4.796875e-02, 5.078125e-02, 5.359375e-02, 5.640625e-02, 5.9218753e-02]
    + [6.203125e-02, 6.484375e-02, 6.7656256e-02, 7.0468746e-02, 7.328125e-02, 7.609375e-02]
    + [7.890625e-02, 8.171876e-02, 8.453125e-02, 8.734375e-02, 9.015625e-02, 9.2968754e-02]
    + [9.578126e-02, 9.859375e-02]
    # 1e0
    + [1.07031256e-01, 1.2109375e-01, 1.3515624e-01, 1.4921875e-01, 1.6328125e-01]
    + [1.7734376e-01, 1.9140625e-01, 2.0546874e-01, 2.1953125e-01, 2.3359375e-01]
    + [2.4765624e-01, 2.6171875e-01, 2.7578127e-01, 2.8984374e-01, 3.0390626e-01]
    + [3.1796873e-01, 3.3203125e-01, 3.4609374e-01, 3.6015624e-01, 3.7421876e-01]
    + [3.8828123e-01, 4.0234375e-01, 4.1640624e-01, 4.3046874e-01, 4.4453126e-01]
    + [4.5859373e-01, 4.7265625e-01, 4.867187e-01, 5.0078124e-01, 5.148437e-01]
    + [5.289062e-01, 5.4296875e-01, 5.570313e-01, 5.710938e-01, 5.8515626e-01]
    + [5.992187e-01, 6.1328125e-01, 6.273438e-01, 6.414063e-01, 6.5546876e-01]
    + [6.695312e-01, 6.8359375e-01, 6.976563e-01, 7.117188e-01, 7.2578126e-01]
    + [7.398437e-01, 7.5390625e-01, 7.679688e-01, 7.8203124e-01, 7.9609376e-01]
    + [8.101562e-01, 8.2421875e-01, 8.382813e-01, 8.5234374e-01, 8.6640626e-01]
    + [8.804687e-01, 8.9453125e-01, 9.085938e-01, 9.2265624e-01, 9.3671876e-01]
    + [9.507812e-01, 9.6484375e-01, 9.789063e-01, 9.9296874e-01]
)

# bnb's signed dynamic 8-bit map (``create_dynamic_map(signed=True)``), used for the nested
# absmax: the negated positive half, 0, the positive half, and 1.0 (there is no -1.0).
DYNAMIC_CODE: np.ndarray = _constant(
    np.concatenate([-_DYNAMIC_POSITIVE[::-1], [0.0], _DYNAMIC_POSITIVE, [1.0]])
)

# Block sizes bitsandbytes accepts for 4-bit quantization, and the fixed nested block size
# ``quantize_4bit`` uses for double quantization.
NF4_BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256

_NF4_MIDPOINTS = _constant((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2))
_DYNAMIC_MIDPOINTS = _constant((DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) / np.float32(2))
# torch's CPU path clamps a partial last block's absmax to this (float32 rounds it to a
# subnormal); we store it with a select so that XLA's denormal flushing cannot touch it.
_TAIL_ABSMAX_FLOOR = np.float32(1e-38)
_SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["packed", "absmax", "nested_absmax", "offset"],
    meta_fields=["shape", "dtype", "blocksize", "nested_blocksize"],
)
@dataclasses.dataclass(frozen=True)
class NF4Tensor:
    """A bitsandbytes-layout NF4 weight, optionally with leading batch (e.g. layer) axes.

    The array fields are pytree leaves; ``shape``, ``dtype`` and the block sizes are static
    aux data, so ``jit`` specializes on them and ``lax.scan`` over a :func:`stack`-ed tensor
    hands each step a per-layer ``NF4Tensor``. Every array field carries the same leading
    batch axes (:attr:`batch_shape`); ``shape`` is the logical per-matrix shape, e.g. HF's
    ``(out_features, in_features)``.

    Attributes:
      packed: uint8 ``[..., ceil(numel / 2)]``, two indices per byte, element ``2i`` in the
        high nibble (bnb's order), the matrix flattened row-major.
      absmax: float32 ``[..., nblocks]``, or uint8 :data:`DYNAMIC_CODE` indices when
        double-quantized.
      nested_absmax: float32 ``[..., ceil(nblocks / nested_blocksize)]``, or None.
      offset: float32 ``[...]``, the mean subtracted before nested quantization, or None.
      shape: logical shape of one matrix (excludes batch axes).
      dtype: the original dtype, which :func:`dequantize_nf4` returns by default.
      blocksize: elements per absmax block (64 in QLoRA).
      nested_blocksize: absmax values per nested block (bnb always uses 256).
    """

    packed: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array | None
    offset: jax.Array | None
    shape: tuple[int, ...]
    dtype: Any
    blocksize: int = 64
    nested_blocksize: int = NESTED_BLOCKSIZE

    def __post_init__(self) -> None:
        # Normalize the static fields so equal formats compare (and hash) equal as pytree aux
        # data. Array fields are left alone: JAX rebuilds pytrees with placeholder leaves.
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "blocksize", int(self.blocksize))
        object.__setattr__(self, "nested_blocksize", int(self.nested_blocksize))

    @property
    def double_quant(self) -> bool:
        """Whether absmax is itself 8-bit quantized (bnb's ``compress_statistics``)."""
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        """Elements in one matrix."""
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        """absmax blocks per matrix (the last may be partial)."""
        return _cdiv(self.numel, self.blocksize)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The leading axes shared by every array field (``()`` for a single matrix)."""
        return tuple(self.packed.shape[:-1])


def _check_layout(t: NF4Tensor) -> None:
    """Raises ValueError if the array shapes/dtypes do not describe ``t.shape`` (trace time)."""
    batch = t.batch_shape
    expected = {
        "packed": ((*batch, _cdiv(t.numel, 2)), jnp.uint8),
        "absmax": ((*batch, t.nblocks), jnp.uint8 if t.double_quant else jnp.float32),
    }
    if t.double_quant:
        expected["nested_absmax"] = ((*batch, _cdiv(t.nblocks, t.nested_blocksize)), jnp.float32)
        expected["offset"] = (batch, jnp.float32)
    elif t.offset is not None:
        raise ValueError("NF4Tensor has an offset but no nested_absmax")
    for name, (shape, dtype) in expected.items():
        array = getattr(t, name)
        if array is None or tuple(array.shape) != shape or array.dtype != dtype:
            got = None if array is None else f"{array.dtype}{list(array.shape)}"
            raise ValueError(
                f"NF4Tensor of shape {t.shape} (blocksize {t.blocksize}, batch {batch}): "
                f"{name} should be {jnp.dtype(dtype)}{list(shape)}, got {got}"
            )


def stack(tensors: Sequence[NF4Tensor], axis: int = 0) -> NF4Tensor:
    """Stacks same-format NF4 tensors along a new batch axis: the leading one (e.g. the layer
    axis) by default, or ``axis`` (counted among the batch axes)."""
    if not tensors:
        raise ValueError("stack needs at least one NF4Tensor")
    first = tensors[0]
    key = (first.shape, first.dtype, first.blocksize, first.nested_blocksize, first.double_quant)
    for i, t in enumerate(tensors):
        if not isinstance(t, NF4Tensor):
            raise TypeError(f"stack: item {i} is a {type(t).__name__}, not an NF4Tensor")
        other = (t.shape, t.dtype, t.blocksize, t.nested_blocksize, t.double_quant)
        if other != key or t.batch_shape != first.batch_shape:
            raise ValueError(
                "stack: NF4Tensors differ in (shape, dtype, blocksize, nested_blocksize, "
                f"double_quant) or batch shape: item 0 is {key} batch {first.batch_shape}, "
                f"item {i} is {other} batch {t.batch_shape}"
            )
    if not 0 <= axis <= len(first.batch_shape):
        raise ValueError(f"stack: axis {axis} is outside batch shape {first.batch_shape}")
    return jax.tree.map(lambda *xs: jnp.stack(xs, axis=axis), *tensors)


def quantize_nf4(w: jax.Array, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantizes one matrix to NF4 exactly as bitsandbytes' ``quantize_4bit`` does.

    Args:
      w: float32/float16/bfloat16 array of any shape (ndim >= 1), treated as one matrix
        flattened row-major (HF's ``(out, in)`` for a linear weight).
      blocksize: elements per absmax block; one of :data:`NF4_BLOCKSIZES`.
      double_quant: also 8-bit quantize absmax (bnb's ``compress_statistics``; QLoRA's
        "double quantization").

    Returns:
      An ``NF4Tensor`` with no batch axes whose packed bytes and float32 absmax equal bnb's
      (see the module docstring for the rounding rules and the nested-code caveat). To
      quantize a stacked ``[L, ...]`` weight, ``jax.vmap(quantize_nf4)`` it or :func:`stack`
      per-layer results; both give the same tensor.
    """
    w = jnp.asarray(w)
    if w.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"quantize_nf4 supports float32/float16/bfloat16, got {w.dtype}")
    if w.ndim < 1 or w.size == 0:
        raise ValueError(f"quantize_nf4 needs a non-empty array with ndim >= 1, got {w.shape}")
    if blocksize not in NF4_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {NF4_BLOCKSIZES} (bnb's), got {blocksize}")
    # bnb upcasts to float32 first; doing it here lets every shape and dtype with the same
    # element count share one compiled quantizer.
    arrays = _quantize_flat(
        w.reshape(-1).astype(jnp.float32), blocksize=blocksize, double_quant=double_quant
    )
    return NF4Tensor(*arrays, shape=w.shape, dtype=w.dtype, blocksize=blocksize)


@functools.partial(jax.jit, static_argnames=("blocksize", "double_quant"))
def _quantize_flat(
    x: jax.Array, *, blocksize: int, double_quant: bool
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    """(packed, absmax, nested_absmax, offset) for a flat float32 ``x``."""
    codes, absmax = _quantize_blocks(x, blocksize)
    # Two indices per byte, the even element in the high nibble. For an odd count the pad
    # position is a scaled 0.0 (index 7), as bnb pads.
    pairs = codes[: 2 * _cdiv(x.shape[0], 2)].reshape(-1, 2)
    packed = (pairs[:, 0] << 4) | pairs[:, 1]
    if not double_quant:
        return packed, absmax, None, None
    return packed, *double_quantize_absmax(absmax)


def _quantize_blocks(x: jax.Array, blocksize: int) -> tuple[jax.Array, jax.Array]:
    """Returns uint8 NF4 indices for the zero-padded blocks of ``x`` and the float32 absmax."""
    n = x.shape[0]
    nblocks = _cdiv(n, blocksize)
    blocks = jnp.pad(x, (0, nblocks * blocksize - n)).reshape(nblocks, blocksize)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    # A zero block scales to zeros (index 7) whatever the divisor; 1 avoids a 0/0.
    divisor = jnp.where(absmax == 0, 1.0, absmax)
    scaled = blocks * (1.0 / divisor)[:, None]
    if n % blocksize:
        scaled = scaled.at[-1].set(blocks[-1] / divisor[-1])
        absmax = absmax.at[-1].set(jnp.where(absmax[-1] == 0, _TAIL_ABSMAX_FLOOR, absmax[-1]))
    # Index = number of midpoints strictly below the value; 15 fused compares, no gather.
    codes = jnp.zeros(scaled.shape, jnp.uint8)
    for midpoint in _NF4_MIDPOINTS:
        codes += (scaled > midpoint).astype(jnp.uint8)
    return codes.reshape(-1), absmax


def double_quantize_absmax(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """bnb's nested quantization of absmax: (uint8 codes, float32 nested absmax, offset)."""
    n = absmax.shape[0]
    offset = _pairwise_sum(absmax) / n
    centered = absmax - offset
    nblocks = _cdiv(n, NESTED_BLOCKSIZE)
    blocks = jnp.pad(centered, (0, nblocks * NESTED_BLOCKSIZE - n))
    blocks = blocks.reshape(nblocks, NESTED_BLOCKSIZE)
    nested_absmax = jnp.max(jnp.abs(blocks), axis=1)
    divisor = jnp.where(nested_absmax == 0, 1.0, nested_absmax)
    scaled = blocks * (1.0 / divisor)[:, None]
    codes = _nearest_dynamic_code(scaled)
    codes = jnp.where(nested_absmax[:, None] == 0, 0, codes).astype(jnp.uint8)
    return codes.reshape(-1)[:n], nested_absmax, offset


def _nearest_dynamic_code(x: jax.Array) -> jax.Array:
    """Index of the nearest DYNAMIC_CODE value; an exact midpoint tie goes to the even index.

    A branch-free binary search over the 255 float32 midpoints (8 probes) counts those below
    ``x``; CUDA's ``dQuantize`` picks the same index, ties included.
    """
    midpoints = jnp.asarray(_DYNAMIC_MIDPOINTS)
    below = jnp.zeros(x.shape, jnp.int32)
    step = (midpoints.shape[0] + 1) // 2
    while step:
        below = jnp.where(x > midpoints[below + step - 1], below + step, below)
        step //= 2
    tie = x == midpoints[jnp.minimum(below, midpoints.shape[0] - 1)]
    return below + (tie & (below % 2 == 1))


def _pairwise_sum(x: jax.Array) -> jax.Array:
    """Sums a 1-D float32 array by explicit halving (same bits on every backend)."""
    size = 1 << (x.shape[0] - 1).bit_length()
    x = jnp.pad(x, (0, size - x.shape[0]))
    while x.shape[0] > 1:
        half = x.shape[0] // 2
        x = x[:half] + x[half:]
    return x[0]


@jax.jit
def dequantize_absmax(t: NF4Tensor) -> jax.Array:
    """The per-block float32 scales ``[..., nblocks]``, decoding double quantization."""
    _check_layout(t)
    if not t.double_quant:
        return t.absmax.astype(jnp.float32)
    batch, n, size = t.batch_shape, t.nblocks, t.nested_blocksize
    nblocks = t.nested_absmax.shape[-1]
    values = jnp.asarray(DYNAMIC_CODE)[t.absmax]
    values = _pad_last(values, nblocks * size).reshape(*batch, nblocks, size)
    scaled = _unfused(values * t.nested_absmax[..., None]).reshape(*batch, nblocks * size)
    return scaled[..., :n] + t.offset[..., None]


def _unfused(product: jax.Array) -> jax.Array:
    """``product``, rounded to float32 before whatever add follows it.

    bnb rounds ``code * nested_absmax`` and then adds the offset; XLA (CPU and GPU) would
    contract the two into one FMA, moving about a quarter of the absmax values by an ulp.
    A select that maps NaN to 0 is not an identity, so LLVM cannot look through it.
    """
    return jnp.where(product == product, product, 0.0)


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize_nf4(t: NF4Tensor, dtype: Any = None) -> jax.Array:
    """Decodes ``t`` to ``(*t.batch_shape, *t.shape)`` in ``dtype`` (default ``t.dtype``).

    The plain-jnp reference: ``float32(NF4_CODE[q] * absmax)`` rounded once to ``dtype``,
    bit-identical to bnb's ``dequantize_4bit`` for ``t.dtype``. Pure and jit-able.
    """
    _check_layout(t)
    dtype = t.dtype if dtype is None else jnp.dtype(dtype)
    values = _decode(t.packed, dequantize_absmax(t), t.numel, t.blocksize, dtype)
    return values.reshape(*t.batch_shape, *t.shape)


def dequantize_nf4_rows(ts: Sequence[NF4Tensor], dtype: Any) -> jax.Array:
    """``concatenate([dequantize_nf4(t, dtype) for t in ts])``, decoded as one matrix.

    Why: a group of projections sharing an input (q/k/v, gate/up) multiplies one stacked
    ``[ΣN, K]`` operand. Decoding each member and concatenating writes every 16-bit weight
    twice (measured on an H200: the concatenation alone was ~1% of a Llama-8B training step);
    the members' bytes and float32 scales are 4.5 bits per weight, so they are stacked
    instead and decoded once. Members are single ``[N, K]`` matrices with the same K and
    whole absmax blocks (``N·K`` a multiple of the blocksize, always so for K % 64 == 0);
    otherwise the members are decoded one by one. Bit-identical either way.
    """
    ts = list(ts)
    one_matrix = all(
        not t.batch_shape
        and len(t.shape) == 2
        and t.shape[1] == ts[0].shape[1]
        and t.blocksize == ts[0].blocksize
        and t.numel % t.blocksize == 0
        for t in ts
    )
    if len(ts) == 1 or not one_matrix:
        parts = [dequantize_nf4(t, dtype) for t in ts]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
    for t in ts:
        _check_layout(t)
    rows = sum(t.shape[0] for t in ts)
    packed = jnp.concatenate([t.packed for t in ts])
    absmax = jnp.concatenate([dequantize_absmax(t) for t in ts])
    values = _decode(packed, absmax, rows * ts[0].shape[1], ts[0].blocksize, jnp.dtype(dtype))
    return values.reshape(rows, ts[0].shape[1])


def _decode(packed: jax.Array, absmax: jax.Array, numel: int, blocksize: int, dtype: Any):
    """Flat ``[..., numel]`` values from packed codes and float32 per-block scales."""
    batch = packed.shape[:-1]
    nblocks = absmax.shape[-1]
    codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(*batch, -1)
    codes = _pad_last(codes[..., :numel], nblocks * blocksize)
    values = jnp.asarray(NF4_CODE)[codes].reshape(*batch, nblocks, blocksize)
    values = values * absmax[..., None]
    return values.reshape(*batch, nblocks * blocksize)[..., :numel].astype(dtype)


def _pad_last(x: jax.Array, size: int) -> jax.Array:
    """Zero-pads the last axis of ``x`` to ``size``."""
    widths = [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])]
    return jnp.pad(x, widths)
