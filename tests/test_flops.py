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


def test_moe_counts_the_routed_experts_only():
    """Mixtral: a token multiplies k of E experts' weights (and the router), so its linear
    FLOPs equal a dense model whose MLP is k experts wide, plus the router."""
    moe = ModelConfig("mixtral", 256, 64, 96, 2, 4, 2, 16, num_experts=8, experts_per_token=2)
    dense = ModelConfig("mistral", 256, 64, 2 * 96, 2, 4, 2, 16)
    router = 4 * 2 * 8 * 64  # 4 passes (no remat) x 2 layers x E x D
    assert train_flops_per_token(moe, 64) == pytest.approx(
        train_flops_per_token(dense, 64) + router
    )
    lora = {"lora_rank": 4, "lora_targets": ("experts_gate_up_proj", "experts_down_proj")}
    extra = train_flops_per_token(moe, 64, **lora) - train_flops_per_token(moe, 64)
    # 6·r FLOPs per factor element a token touches (forward 2, backward 4), per layer: per
    # routed expert (k = 2), gate_up's factors span D + 2F and down's F + D.
    expected = 6.0 * 4 * 2 * 2 * ((64 + 2 * 96) + (96 + 64))
    assert extra == pytest.approx(expected)
