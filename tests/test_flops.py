"""FLOP accounting (what MFU and tokens/s claims divide by)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lorax.config import ModelConfig
from lorax.train.flops import mean_attended_keys, train_flops_per_token


@pytest.mark.parametrize("seq_len, window", [(64, 0), (64, 16), (64, 64), (64, 100), (33, 7)])
def test_mean_attended_keys_counts_a_causal_window(seq_len, window):
    i = np.arange(seq_len)[:, None]
    j = np.arange(seq_len)[None, :]
    visible = (j <= i) & ((i - j < window) if window else True)
    # The closed forms drop O(1/S) terms (a row's own key): within one key of the count.
    assert abs(mean_attended_keys(seq_len, window) - visible.sum(1).mean()) <= 1.0


def test_windowed_layers_count_fewer_attention_flops():
    config = ModelConfig("gemma2", 256, 64, 128, 4, 4, 2, 16, layer_windows=(0, 0, 0, 0))
    windowed = dataclasses.replace(config, layer_windows=(512, 0, 512, 0))
    full, half = (train_flops_per_token(c, 8192) for c in (config, windowed))
    per_layer_attention = 4.0 * 4 * 16 * 3.5  # 4·H·D per key, fwd + 2.5x bwd
    expected = 2 * per_layer_attention * (4096 - mean_attended_keys(8192, 512))
    assert full - half == pytest.approx(expected)
