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

# Intermediates the forward names: cheap to keep (rank-r or one [B, S, H*D] tensor per layer)
# and expensive to recompute (attention is the one op whose recompute costs O(S^2)).
SELECTIVE_SAVES = ("attention_out", "query")

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
        return cp.save_only_these_names(*SELECTIVE_SAVES)
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
