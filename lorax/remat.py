"""Rematerialisation policies, chosen by name and applied per scanned layer.

The forward names the intermediates worth saving (``checkpoint_name``); a policy says which
of them a layer keeps for the backward pass, which it recomputes, and which it parks in host
memory. Everything else about the model is unaware of remat.

A *schedule* gives different layers different policies: ``"selective:12,mlp"`` runs the first
12 layers under ``selective`` and the rest under ``mlp``. That spends a memory budget exactly:
each ``mlp`` layer trades ``B·S·(2·intermediate + hidden)`` saved bf16 values for not
recomputing its two largest matmuls, so a budget that holds only some of those layers still
gets the speed-up on those. Put the ``mlp`` layers last: measured on an H200 (Llama-3.1-8B,
1x8192, BENCHMARKS.md §1), ``selective:13,mlp`` peaks 0.23 GiB below ``mlp:19,selective`` at
the same speed (``scripts/peak_memory_report.py`` shows what is live at the peak).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.ad_checkpoint import Offloadable, checkpoint_name

from pallas_kernels.flash_attention import save_forward_residuals

# Intermediates the forward names. "selective" keeps the attention inputs and output (with
# GQA, q + k + v + out are ~2.5 x [B, S, D] per layer) so the backward recomputes only the
# norms and the MLP, never the O(S^2) attention or the q/k/v projections.
SELECTIVE_SAVES = ("query", "key", "value", "attention_out")
# "mlp" also keeps the residual stream after attention and the gate/up projections: then the
# backward recomputes only elementwise work (norms, rope, SiLU·up), no matmul at all. The
# decoded NF4 weights are never saved; they are cheap to decode again and as big as the model.
MLP_SAVES = (*SELECTIVE_SAVES, "attention_residual", "mlp_gate", "mlp_up")

POLICIES = ("none", "full", "selective", "mlp", "offload")
# The scan carry entering each layer (the residual stream): every remat policy keeps it, as
# the point the layer is recomputed from; ``offload`` and ``offload_inputs`` keep it on the host.
LAYER_INPUT = "layer_input"


def name(x: Any, tag: str) -> Any:
    """Tags an intermediate so a policy can refer to it."""
    return checkpoint_name(x, tag)


def policy(kind: str, offload_inputs: bool = False) -> Callable[..., Any] | None:
    """The ``jax.checkpoint`` policy for ``kind`` (None means no remat at all).

    ``offload_inputs`` keeps each layer's input in pinned host memory instead of device memory
    (``offload`` is ``full`` with it): one ``[tokens, hidden]`` array per layer crosses the host
    link each way. Measured on an H200 at 1x8192 under ``mlp:19,selective`` (BENCHMARKS.md §1):
    1.94 GiB freed for 5.6% of the step time, more than the extra ``mlp`` layers that memory
    holds win back; it pays where memory, not speed, is the limit.
    """
    cp = jax.checkpoint_policies
    if kind == "none":
        if offload_inputs:
            raise ValueError("offloading layer inputs needs a remat policy; 'none' saves all")
        return None
    if kind == "offload":
        kind, offload_inputs = "full", True
    if kind == "full":
        keep = cp.nothing_saveable
    elif kind in ("selective", "mlp"):
        # Names cannot reach inside the attention kernel's custom_vjp: its own residuals
        # (output and logsumexp) are kept by a primitive-level policy beside the names.
        saves = SELECTIVE_SAVES if kind == "selective" else MLP_SAVES
        keep = cp.save_from_both_policies(cp.save_only_these_names(*saves), save_forward_residuals)
    else:
        raise ValueError(f"unknown remat policy {kind!r}; choose one of {POLICIES}")
    if not offload_inputs:
        return keep
    offload = cp.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=[LAYER_INPUT],
        offload_src="device",
        offload_dst="pinned_host",
    )

    def keep_or_offload(prim: Any, *args: Any, **params: Any) -> Any:
        decision = offload(prim, *args, **params)
        return decision if isinstance(decision, Offloadable) else keep(prim, *args, **params)

    return keep_or_offload


def schedule(spec: str, num_layers: int) -> list[tuple[str, int]]:
    """Parses ``"POLICY[:COUNT],...,POLICY"`` into ``[(policy, layers), ...]`` covering all layers.

    Every segment but the last needs a count; the last takes the remaining layers (a count
    there must match them). A plain policy name is one segment over every layer.
    """
    parts = [p.strip() for p in spec.split(",")]
    segments: list[tuple[str, int]] = []
    used = 0
    for i, part in enumerate(parts):
        kind, _, count = part.partition(":")
        if kind not in POLICIES:
            raise ValueError(f"unknown remat policy {kind!r} in {spec!r}; choose from {POLICIES}")
        last = i == len(parts) - 1
        if not count and not last:
            raise ValueError(f"remat schedule {spec!r}: segment {part!r} needs ':LAYERS'")
        n = int(count) if count else num_layers - used
        if n <= 0 or used + n > num_layers or (last and used + n != num_layers):
            raise ValueError(
                f"remat schedule {spec!r} does not cover the model's {num_layers} layers "
                f"(segments must be positive and sum to {num_layers})"
            )
        segments.append((kind, n))
        used += n
    return segments


def validate(spec: str, offload_inputs: bool = False) -> None:
    """Raises ValueError when ``spec`` is not a policy name or a schedule of them, or when
    ``offload_inputs`` is asked of a schedule with ``none`` layers (they save everything)."""
    parts = spec.split(",")
    counts = [p.partition(":")[2] for p in parts]
    if any(c and not c.isdigit() for c in counts):
        raise ValueError(f"remat schedule {spec!r}: layer counts must be positive integers")
    total = sum(int(c) for c in counts if c) + (0 if counts[-1] else 1)
    segments = schedule(spec, max(total, 1))
    if offload_inputs and any(kind == "none" for kind, _ in segments):
        raise ValueError(
            f"offload_layer_inputs needs a remat policy on every layer; remat={spec!r} has "
            "'none' layers, which save everything on the device"
        )


def apply(body: Callable[..., Any], kind: str, offload_inputs: bool = False) -> Callable[..., Any]:
    """Wraps a scan body ``(carry, xs) -> (carry, ys)`` with the named policy."""
    pol = policy(kind, offload_inputs)
    if kind == "none":
        return body
    if kind == "offload" or offload_inputs:
        inner = body

        def body(carry: Any, xs: Any) -> Any:  # noqa: F811 - tag the carry, then run
            return inner(name(carry, LAYER_INPUT), xs)

    return jax.checkpoint(body, policy=pol, prevent_cse=False)
