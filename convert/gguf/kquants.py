"""K-quant encoders (Q4_K, Q5_K, Q6_K): ggml's reference algorithm, vectorized in jnp.

ggml quantizes 256-value super-blocks. Q4_K and Q5_K cut one into 8 sub-blocks of 32
values, each stored as ``x ≈ d·sc·q - dmin·m`` with a 6-bit scale ``sc`` and min ``m`` and
4- or 5-bit ``q``; each sub-block's (scale, min) comes from a small search that minimises a
weighted squared error over a grid of candidate scales. Q6_K cuts it into 16 symmetric
sub-blocks of 16 values with an 8-bit scale each, also searched. This module implements the
algorithm of ggml's reference quantizers (``quantize_row_q{4,5,6}_K_ref``; llama.cpp uses
them whenever no importance matrix is given) for a whole tensor at once: super-blocks are
the rows of a ``[blocks, 256]`` array and each search is vectorized over its candidates, so
it runs as a few fused kernels on an accelerator instead of a loop per block.

The output is the reference's bytes, not only its quality, because its float32 arithmetic
is kept step for step: sums over a sub-block accumulate sequentially in its order (a tree
reduction rounds differently); round-half-to-even stands in for ggml's ``nearest_int``;
divisions stay divisions (``_divide``; XLA turns division by a broadcast value into
multiplication by its rounded reciprocal); and products that C adds to are kept from being
fused into FMAs (``_rounded``). The candidates' errors are compared exactly as in C, so the
same one wins. Against ggml's reference compiled as its source is written (no FMA
contraction) this is bit-exact; a build that contracts (GCC's default with -march=native)
differs in a few blocks per thousand, by one step of one sub-block.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QK_K = 256
# ggml treats a sub-block whose largest magnitude is below this as all zeros.
GROUP_MAX_EPS = 1e-15
f32 = jnp.float32


def quantize_k(rows: jax.Array | np.ndarray, tensor_type: GGMLQuantizationType) -> np.ndarray:
    """Encodes ``rows [n, k]`` (k a multiple of 256) as ``uint8 [n, k/256·block bytes]``."""
    encoder = _ENCODERS[tensor_type]
    block_bytes = GGML_QUANT_SIZES[tensor_type][1]
    rows = jnp.asarray(rows, f32)
    if rows.ndim != 2 or rows.shape[1] % QK_K:
        raise ValueError(
            f"{tensor_type.name} needs rows of a multiple of {QK_K}, got {tuple(rows.shape)}"
        )
    blocks = rows.reshape(-1, QK_K)
    n = blocks.shape[0]
    chunk = _chunk_blocks()
    out = np.empty((n, block_bytes), np.uint8)
    for start in range(0, n, chunk):
        part = blocks[start : start + chunk]
        size = part.shape[0]
        # Pad to a power of two, at least _MIN_BLOCKS: each shape compiles once, and small
        # tensors (norm-sized, tests) share one.
        padded = min(chunk, max(_MIN_BLOCKS, 1 << (size - 1).bit_length()))
        part = jnp.pad(part, ((0, padded - size), (0, 0)))
        fields = encoder(part, f32(1.0))
        out[start : start + size] = _assemble(fields)[:size]
    return out.reshape(rows.shape[0], -1)


_MIN_BLOCKS = 1 << 10


def _chunk_blocks() -> int:
    """Super-blocks per call. The search's working set is ~10x its input (4 MB per 1k
    blocks): big chunks amortise dispatch on an accelerator, smaller ones bound host RAM."""
    return 1 << 18 if jax.default_backend() != "cpu" else 1 << 14


def _assemble(fields: tuple[jax.Array, ...]) -> np.ndarray:
    """Concatenates per-block fields into bytes; uint16 fields (float16 bits) little-endian."""
    parts = []
    for field in fields:
        a = np.asarray(field)
        a = a.reshape(a.shape[0], -1)
        if a.dtype == np.uint16:
            a = a.astype("<u2").view(np.uint8)
        parts.append(a)
    return np.concatenate(parts, axis=1)


# --------------------------------------------------------------------------- helpers
#
# Sub-block arrays are element-major, ``[n, blocks·sub-blocks]``: the sequential sums and
# the min/max run over axis 0, so each step of a sum is one contiguous, long vector (XLA's
# CPU code is several times slower on a short minor axis).


def _seq_sum(*terms: jax.Array) -> jax.Array | tuple[jax.Array, ...]:
    """Sums over axis 0, first to last, as the reference's ``for`` loops round them.

    A ``scan`` keeps the program small (an unrolled chain of adds compiles slowly), and
    several sums over the same axis share one scan.
    """
    t = jnp.stack(terms, axis=1) if len(terms) > 1 else terms[0]
    total = jax.lax.scan(lambda acc, v: (acc + v, None), t[0], t[1:])[0]
    return tuple(total) if len(terms) > 1 else total


def _rounded(one: jax.Array, *products: jax.Array) -> tuple[jax.Array, ...]:
    """``products`` each rounded to float32 before anything adds to them.

    C evaluates ``a*b + c`` as two rounded operations, but XLA fuses it into one FMA, which
    changes last bits and, through them, which candidate wins. Multiplying by a 1 that is
    only known at run time keeps the product a separate rounded value (an FMA of it with 1
    rounds like the plain add); an optimization barrier does not.
    """
    return tuple(p * one for p in products)


def _divide(a: jax.Array, b: jax.Array | float) -> jax.Array:
    """``a / b`` rounded as IEEE division, also when ``b`` is a scalar or broadcast.

    XLA rewrites ``a / broadcast(b)`` into ``a * broadcast(1 / b)``, which differs in the
    last bit about half the time. Selecting ``b`` into ``a``'s shape through a data-
    dependent predicate (``a == a`` is false for NaN) leaves nothing to hoist.
    """
    return a / jnp.where(a == a, b, a)


def _round_clip(x: jax.Array, lo: int, hi: int) -> jax.Array:
    return jnp.clip(jnp.rint(x), lo, hi).astype(jnp.int32)


def _nearest_int(x: jax.Array) -> jax.Array:
    return jnp.clip(jnp.rint(x), -(2**31), 2**31 - 1).astype(jnp.int32)


def _wrap(x: jax.Array, signed: bool = False) -> jax.Array:
    """An int32 stored into a C ``uint8_t``/``int8_t``: wraps modulo 256."""
    return ((x & 0xFF) ^ 0x80) - 0x80 if signed else x & 0xFF


def _first_peak(x: jax.Array, axis: int) -> jax.Array:
    """The first value of largest magnitude along ``axis``, with its sign (C's strict ``>``)."""
    index = jnp.argmax(jnp.abs(x), axis=axis, keepdims=True)
    positions = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim + axis if axis < 0 else axis)
    return jnp.sum(jnp.where(positions == index, x, 0.0), axis=axis)  # one non-zero term


def _f16_bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x.astype(jnp.float16), jnp.uint16)


def _f32_table(values: list[float]) -> jax.Array:
    """Candidate numerators, rounded as C's float arithmetic rounds them (numpy never fuses)."""
    return jnp.asarray(np.asarray(values, np.float32))


# --------------------------------------------------------------- Q4_K / Q5_K (affine)


def _search_scale_min(
    x: jax.Array,
    w: jax.Array,
    one: jax.Array,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """ggml's ``make_qkx2_quants`` on sub-blocks ``x [n, ...]`` with weights ``w``.

    Returns levels in ``[0, nmax]``, the scale and the (positive) min with
    ``x ≈ scale·L - min``. Candidates are tried in the reference's order; one replaces the
    best only if its weighted squared error is strictly smaller, and, as in the reference,
    later candidates grid from the best min found so far rather than from the data's min.
    """
    lo = jnp.minimum(jnp.min(x, 0), 0.0)
    hi = jnp.max(x, 0)
    flat = hi == lo
    sum_w, sum_x = _seq_sum(w, w * x)

    def levels(iscale: jax.Array, mn: jax.Array) -> jax.Array:
        return _round_clip(iscale * (x - mn), 0, nmax).astype(f32)

    span = jnp.where(flat, 1.0, hi - lo)
    iscale = nmax / span
    scale0 = 1.0 / iscale
    q0 = levels(iscale, lo)
    (sq,) = _rounded(one, scale0 * q0)
    diff = sq + lo - x
    error0 = _seq_sum(w * (diff * diff))
    numerators = _f32_table(
        [
            np.float32(rmin) + np.float32(rdelta) * np.float32(i) + np.float32(nmax)
            for i in range(nstep + 1)
        ]
    )

    def trial(i: jax.Array, best: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        error_best, _, mn_best, _ = best
        q = levels(numerators[i] / jnp.where(flat, 1.0, hi - mn_best), mn_best)
        wl = w * q
        sum_l, sum_l2, sum_xl = _seq_sum(wl, wl * q, wl * x)
        p = _rounded(
            one,
            sum_w * sum_l2,
            sum_l * sum_l,
            sum_w * sum_xl,
            sum_x * sum_l,
            sum_l2 * sum_x,
            sum_l * sum_xl,
        )
        det = p[0] - p[1]
        scale = (p[2] - p[3]) / det
        mn = (p[4] - p[5]) / det
        clamped = mn > 0
        scale = jnp.where(clamped, sum_xl / sum_l2, scale)
        mn = jnp.where(clamped, 0.0, mn)
        (sq,) = _rounded(one, scale * q)
        diff = sq + mn - x
        error = _seq_sum(w * (diff * diff))
        better = (det > 0) & (error < error_best)
        return tuple(
            jnp.where(better, new, old)
            for new, old in zip((error, scale, mn, q), best, strict=True)
        )

    _, scale, mn, q = jax.lax.fori_loop(0, nstep + 1, trial, (error0, scale0, lo, q0))
    q = jnp.where(flat, 0, q.astype(jnp.int32))
    return q, jnp.where(flat, 0.0, scale), -jnp.where(flat, lo, mn)


def _affine_superblocks(
    x: jax.Array,
    one: jax.Array,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
) -> tuple[jax.Array, ...]:
    """Q4_K/Q5_K common part: (d bits, dmin bits, packed scales, levels [B, 8, 32])."""
    n_sub = QK_K // 32
    xs = x.reshape(-1, 32).T  # [32, B·8]
    av_x = jnp.sqrt(_seq_sum(xs * xs) / 32)
    weights = av_x + jnp.abs(xs)
    levels, scales, mins = _search_scale_min(xs, weights, one, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(-1, n_sub), mins.reshape(-1, n_sub)

    max_scale = jnp.maximum(jnp.max(scales, -1), 0.0)
    max_min = jnp.maximum(jnp.max(mins, -1), 0.0)
    inv_scale = jnp.where(max_scale > 0, 63.0 / max_scale, 0.0)
    inv_min = jnp.where(max_min > 0, 63.0 / max_min, 0.0)
    ls = jnp.minimum(_wrap(_nearest_int(inv_scale[:, None] * scales)), 63)
    lm = jnp.minimum(_wrap(_nearest_int(inv_min[:, None] * mins)), 63)
    d = _divide(max_scale, 63.0).astype(jnp.float16)
    dmin = _divide(max_min, 63.0).astype(jnp.float16)

    # Re-quantize against the scales as stored (float16 d times 6-bit sc). A sub-block
    # whose stored scale is 0 keeps the search's levels, as in the reference.
    dd = (d.astype(f32)[:, None] * ls.astype(f32)).reshape(-1)
    (dm,) = _rounded(one, (dmin.astype(f32)[:, None] * lm.astype(f32)).reshape(-1))
    requantized = _round_clip(_divide(xs + dm, dd), 0, nmax)
    levels = jnp.where(dd == 0, levels, requantized).T.reshape(-1, n_sub, 32)

    packed_scales = jnp.concatenate(
        [
            ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
            lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
            (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4),
        ],
        axis=-1,
    ).astype(jnp.uint8)
    return _f16_bits(d), _f16_bits(dmin), packed_scales, levels


def _low_nibbles(levels: jax.Array) -> jax.Array:
    """32-value groups in pairs: byte l of pair g = L[2g][l] | L[2g+1][l] << 4."""
    pairs = (levels & 0xF).reshape(levels.shape[0], -1, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(levels.shape[0], -1)


@jax.jit
def _encode_q4_k(x: jax.Array, one: jax.Array) -> tuple[jax.Array, ...]:
    d, dmin, scales, levels = _affine_superblocks(x, one, 15, -1.0, 0.1, 20)
    return d, dmin, scales, _low_nibbles(levels).astype(jnp.uint8)


@jax.jit
def _encode_q5_k(x: jax.Array, one: jax.Array) -> tuple[jax.Array, ...]:
    d, dmin, scales, levels = _affine_superblocks(x, one, 31, -0.5, 0.1, 15)
    # Fifth bits: bit s of byte l is the high bit of sub-block s's value l.
    shifts = jnp.arange(QK_K // 32, dtype=jnp.int32)[None, :, None]
    high = jnp.sum(((levels >> 4) & 1) << shifts, axis=1)
    return d, dmin, scales, high.astype(jnp.uint8), _low_nibbles(levels).astype(jnp.uint8)


# ------------------------------------------------------------------ Q6_K (symmetric)


def _search_symmetric(x: jax.Array, nmax: int) -> tuple[jax.Array, jax.Array]:
    """ggml's ``make_qx_quants`` (weights x², no importance) on ``x [n, ...]``.

    Returns levels in ``[0, 2·nmax)`` and the scale. The acceptance test compares against
    the running best, so candidates are scanned in the reference's order.
    """
    peak = _first_peak(x, 0)
    zero = jnp.abs(peak) < GROUP_MAX_EPS
    peak = jnp.where(zero, 1.0, peak)
    weights = x * x

    def sums(numerator: jax.Array) -> tuple[jax.Array, jax.Array]:
        q = _round_clip((numerator / peak) * x, -nmax, nmax - 1).astype(f32)
        return _seq_sum(weights * x * q, weights * q * q)

    sum_lx, sum_l2 = sums(jnp.float32(-nmax))
    scale0 = jnp.where(sum_l2 != 0, sum_lx / sum_l2, 0.0)
    numerators = _f32_table(
        [-(np.float32(nmax) + np.float32(0.1) * np.float32(i)) for i in range(-9, 10) if i]
    )

    def trial(i: jax.Array, best: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        numerator = numerators[i]
        lx, l2 = sums(numerator)
        better = (l2 > 0) & (lx * lx > best[0] * l2)
        scale = lx / l2
        new = (scale * lx, scale, jnp.broadcast_to(numerator, peak.shape))
        return tuple(jnp.where(better, n, b) for n, b in zip(new, best, strict=True))

    start = (scale0 * sum_lx, scale0, jnp.full_like(peak, -nmax))
    _, scale, numerator = jax.lax.fori_loop(0, len(numerators), trial, start)
    levels = _round_clip((numerator / peak) * x, -nmax, nmax - 1) + nmax
    return jnp.where(zero, 0, levels), jnp.where(zero, 0.0, scale)


@jax.jit
def _encode_q6_k(x: jax.Array, one: jax.Array) -> tuple[jax.Array, ...]:
    del one  # Q6_K adds to no product
    n_sub = QK_K // 16
    xs = x.reshape(-1, 16).T  # [16, B·16]
    levels, scales = _search_symmetric(xs, 32)
    scales = scales.reshape(-1, n_sub)

    max_scale = _first_peak(scales, -1)
    zero = jnp.abs(max_scale) < GROUP_MAX_EPS
    iscale = -128.0 / jnp.where(zero, 1.0, max_scale)
    d = jnp.where(zero, 0.0, 1.0 / iscale).astype(jnp.float16)
    sc = _wrap(jnp.minimum(127, _nearest_int(iscale[:, None] * scales)), signed=True)
    sc = jnp.where(zero[:, None], 0, sc)
    dd = (d.astype(f32)[:, None] * sc.astype(f32)).reshape(-1)
    requantized = _round_clip(_divide(xs, dd), -32, 31) + 32
    levels = jnp.where(dd == 0, levels, requantized).T.reshape(-1, n_sub * 16)
    levels = jnp.where(zero[:, None], 0, levels).reshape(-1, 2, 4, 32)

    # Two halves of 128 values, each four quarters of 32: low nibbles pair quarters (0, 2)
    # and (1, 3); the high 2-bit parts of all four quarters share a byte.
    q = levels
    low = jnp.concatenate(
        [
            (q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
            (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4),
        ],
        axis=-1,
    )
    high = functools.reduce(jnp.bitwise_or, [((q[:, :, k] >> 4) & 3) << (2 * k) for k in range(4)])
    return (
        low.reshape(-1, QK_K // 2).astype(jnp.uint8),
        high.reshape(-1, QK_K // 4).astype(jnp.uint8),
        (sc & 0xFF).astype(jnp.uint8),
        _f16_bits(d),
    )


_ENCODERS: dict[GGMLQuantizationType, Callable[..., tuple[jax.Array, ...]]] = {
    GGMLQuantizationType.Q4_K: _encode_q4_k,
    GGMLQuantizationType.Q5_K: _encode_q5_k,
    GGMLQuantizationType.Q6_K: _encode_q6_k,
}
SUPPORTED = tuple(_ENCODERS)
