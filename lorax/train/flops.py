"""FLOP accounting for throughput and MFU: the numbers we claim, counted in one place.

LoRA training on a frozen base costs per token: the forward (2 FLOPs per weight), the
input-gradient backward (2 per weight; no weight gradient for the frozen base), and, when
layers are rematerialised, the forward again (2 per weight). Attention adds its own S-dependent
term; the rank-r adapters add a little. Embedding lookups are free.
"""

from __future__ import annotations

from typing import Any

import jax

# Dense bf16 matrix peak by device kind (vendor datasheets, dense, no sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L4": 121e12}


def train_flops_per_token(
    config: Any,
    seq_len: int,
    *,
    remat: str = "none",
    lora_rank: int = 0,
    lora_targets: tuple[str, ...] = (),
) -> float:
    """Model FLOPs per trained token (fwd + input-grad bwd, + recompute with remat). An MoE
    layer counts the experts a token is routed to (and its router and gates), not all of
    them."""
    stacks = [(len(stack.layers), stack.config) for stack in config.layer_stacks()]
    linear = sum(
        layers
        * (
            sum(
                c.active_projection_copies(p) * c.projection_shape(p)[0] * c.projection_shape(p)[1]
                for p in c.projections()
            )
            + c.gate_parameters()
        )
        for layers, c in stacks
    )
    head = config.vocab_size * config.hidden_size
    passes = 6 if remat in ("full", "offload") else 4
    # Causal attention: QK^T and PV are 2 matmuls of 2*D FLOPs per head per attended key;
    # forward 4*Hq*D per token per key; backward 2.5x the forward (recomputed scores, dq, dk,
    # dv).
    attn_fwd = sum(
        4.0 * config.num_heads * config.head_dim * mean_attended_keys(seq_len, window)
        for window in config.layer_windows
    )
    attn = attn_fwd * (1 + 2.5 + (1 if remat in ("full", "offload") else 0))
    lora = 0.0
    if lora_rank:
        adapted = sum(
            layers * c.active_projection_copies(p) * sum(c.projection_shape(p))
            for layers, c in stacks
            for p in lora_targets
            if p in c.projections()
        )
        # forward 2 matmuls, backward 4 (grad of both inputs and both factors)
        lora = 6.0 * 2 * lora_rank * adapted / 2
    return passes * linear + 4.0 * head + attn + lora


def mean_attended_keys(seq_len: int, window: int = 0) -> float:
    """Keys a query attends to, averaged over a causal row: S/2, or about ``w - w²/2S`` with
    a sliding window ``w < S`` (the first ``w`` queries see fewer)."""
    if not window or window >= seq_len:
        return seq_len / 2
    return window - window * window / (2 * seq_len)


def device_peak_flops(device: Any = None) -> float | None:
    """The bf16 peak of ``device`` (default: the first), or None when unknown (e.g. CPU)."""
    device = device or jax.local_devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, peak in PEAK_BF16_FLOPS.items():
        if name in kind:
            return peak
    return None


def peak_memory_bytes(device: Any = None) -> int | None:
    """Peak bytes in use on ``device`` since start, where the backend reports it."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats:
        return None
    return stats.get("peak_bytes_in_use")
