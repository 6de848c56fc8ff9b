"""Rotary-embedding frequency math shared by the model and the file formats.

Llama 3's rope scaling is one fact: the model applies it to its frequencies and GGUF stores
it as a per-frequency divisor tensor (``rope_freqs.weight``); both come from here, as does
LongRoPE's cos/sin scale, which the model applies and GGUF stores as a key.
"""

from __future__ import annotations

import math

import numpy as np


def default_inv_freq(theta: float, head_dim: int) -> np.ndarray:
    """Unscaled inverse frequencies ``[head_dim // 2]`` (float64)."""
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def llama3_rope_factors(
    theta: float,
    head_dim: int,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> np.ndarray:
    """The divisor of each frequency under Llama 3 scaling (GGUF's ``rope_freqs.weight``).

    Long wavelengths are divided by ``factor``, short ones kept, and the band between is
    interpolated linearly in ``old / wavelength``.
    """
    wavelen = 2 * math.pi / default_inv_freq(theta, head_dim)
    old = original_max_position_embeddings
    with np.errstate(divide="ignore", invalid="ignore"):
        smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        medium = 1.0 / ((1 - smooth) / factor + smooth)
    factors = np.where(
        wavelen < old / high_freq_factor,
        1.0,
        np.where(wavelen > old / low_freq_factor, factor, medium),
    )
    return factors.astype(np.float32)


def longrope_default_attention_factor(
    factor: float, original_max_position_embeddings: int
) -> float:
    """LongRoPE's default cos/sin scale (transformers' and llama.cpp's converter's):
    ``sqrt(1 + ln(factor) / ln(original length))`` for a factor above 1, else 1."""
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original_max_position_embeddings))
