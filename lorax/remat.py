"""Rematerialisation policies, chosen by name and applied per scanned layer.

The forward names the intermediates worth saving (``checkpoint_name``); a policy says which
of them a layer keeps for the backward pass, which it recomputes, and which it parks in host
memory. Everything else about the model is unaware of remat.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.flash_attention import save_forward_residuals

# Intermediates the forward names. "selective" keeps the attention inputs and output (with
# GQA, q + k + v + out are ~2.5 x [B, S, D] per layer) so the backward recomputes only the
# norms and the MLP, never the O(S^2) attention or the q/k/v projections.
SELECTIVE_SAVES = ("query", "key", "value", "attention_out")

POLICIES = ("none", "full", "selective", "offload")


def name(x: Any, tag: str) -> Any:
    """Tags an intermediate so a policy can refer to it."""
    return checkpoint_name(x, tag)


def policy(kind: str) -> Callable[..., Any] | None:
    """The ``jax.checkpoint`` policy for ``kind`` (None means no remat at all)."""
    cp = jax.checkpoint_policies
    if kind == "none":
        return None
    if kind == "full":
        return cp.nothing_saveable
    if kind == "selective":
        # Names cannot reach inside the attention kernel's custom_vjp: its own residuals
        # (output and logsumexp) are kept by a primitive-level policy beside the names.
        return cp.save_from_both_policies(
            cp.save_only_these_names(*SELECTIVE_SAVES), save_forward_residuals
        )
    if kind == "offload":
        # The layer's input (the residual stream, scan's carry) is what a fully
        # rematerialised layer saves; keep it in pinned host memory instead of HBM.
        return cp.save_and_offload_only_these_names(
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=["layer_input"],
            offload_src="device",
            offload_dst="pinned_host",
        )
    raise ValueError(f"unknown remat policy {kind!r}; choose one of {POLICIES}")


def apply(body: Callable[..., Any], kind: str) -> Callable[..., Any]:
    """Wraps a scan body ``(carry, xs) -> (carry, ys)`` with the named policy."""
    pol = policy(kind)
    if kind == "none":
        return body
    if kind == "offload":
        inner = body

        def body(carry: Any, xs: Any) -> Any:  # noqa: F811 - tag the carry, then run
            return inner(name(carry, "layer_input"), xs)

    return jax.checkpoint(body, policy=pol, prevent_cse=False)
