"""Frozen NF4 weights rewritten once for the Mosaic GPU NF4 kernel.

Why. The kernel (``pallas_kernels.nf4_matmul_mgpu``) reads W in its own "quad layout", which
serves both the forward ``x·Wᵀ`` and the backward ``dy·W`` from registers. Given the
bitsandbytes layout it rewrites W on every call (~1.1 bytes of traffic per weight, twice per
training step), and projections that share an input would run as separate calls. A frozen
base weight never changes, so :func:`prepare_kernel_weights` does the rewrite once, stacking
each group of projections that share an input (q/k/v, gate/up) along N: the forward then
runs one kernel call per group and direction, with the LoRA terms summed in the kernel's own
float32 accumulator (``pallas_kernels.nf4_lora_matmul_group``).

When it pays. The kernel decodes W once per 256-token tile where XLA's default path decodes
it once per call and then runs cuBLAS, so the kernel wins at short steps and loses at long
ones: on the H200 a Llama-3.1-8B QLoRA step ran +13-15% faster prepared at 1x1024 and +4-5%
at 2x1024 and 1x2048, but 1-3% slower from 4096 tokens up (BENCHMARKS.md §2).
:func:`kernel_groups_for` turns that into the ``lorax train --kernel-weights auto`` rule.

What it costs. The quad layout keeps each absmax as a pair of 16-bit halves (4 bytes per 64
weights, where double quantization needs ~1): ~4.5 bits per weight instead of ~4.13, e.g.
0.37 GB more for an 8B model. The NF4Tensors are dropped from the returned model, so its
frozen weights are in no format an exporter reads: keep the loaded model (or its checkpoint)
for :mod:`convert`'s merged and GGUF exports; adapters export as usual. The sharding rules
do not name the prepared arrays, so on a multi-device mesh they are replicated, not split.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from convert.names import EXPERT_PROJECTIONS
from lorax.config import PROJECTION_GROUPS
from lorax.model import PREPARED, Model, group_key
from pallas_kernels import _backend
from pallas_kernels.nf4 import NF4Tensor
from pallas_kernels.nf4_matmul_kernels import QBLOCK
from pallas_kernels.nf4_matmul_mgpu import MgpuNF4Weight, prepare_weight, stack_prepared

__all__ = [
    "AUTO_MAX_TOKENS",
    "GROUP_KEYS",
    "group_keys",
    "is_prepared",
    "kernel_groups_for",
    "prepare_kernel_weights",
    "require_unprepared",
]

# The keys of the projection groups a Llama-family model can have prepared (``groups=``
# takes these; :func:`group_keys` gives any model's).
GROUP_KEYS = tuple(group_key(names) for names in PROJECTION_GROUPS)


def group_keys(model: Model) -> tuple[str, ...]:
    """The keys of ``model``'s projection groups (Phi-3's fused projections: one each; those
    of any layer stack). An MoE layer's expert projections are not among them: they run on
    the grouped matmul (``pallas_kernels.expert_matmul``), not this kernel."""
    keys = {
        group_key(names): None
        for stack in model.config.layer_stacks()
        for names in stack.config.projection_groups()
        if not set(names) & set(EXPERT_PROJECTIONS)
    }
    return tuple(keys)


# ``kernel_groups_for(..., "auto", tokens)`` prepares every group for steps of at most this
# many tokens (B·S). Llama-3.1-8B QLoRA step on the H200 (BENCHMARKS.md §2), prepared against
# the default: +19.4% tok/s at 1x512, +13-15% at 1x1024, +4-5% at 2x1024 and 1x2048; -0.7% at
# 1x4096, -1.1% at 2x2048, -3.4% at 1x8192.
# The kernel decodes W once per 256-token tile: at short steps that is cheaper than XLA's
# separate decode pass, at long ones it is not.
AUTO_MAX_TOKENS = 2048


def prepare_kernel_weights(model: Model, groups: str | Sequence[str] | None = None) -> Model:
    """``model`` with its NF4 projection groups' weights stacked in the Mosaic GPU kernel's
    layout (scales split for the model's compute dtype, bf16 or f16).

    ``groups``: which groups, one key or several (:data:`GROUP_KEYS`:
    ``"q_proj+k_proj+v_proj"``, ``"o_proj"``, ``"gate_proj+up_proj"``, ``"down_proj"``); all
    of them by default. The others keep their loaded weights and the default matmul path, so
    a model can take the kernel only where it is the faster path (BENCHMARKS.md §2: the
    attention projections at M = 4096).

    The forward pass then runs the prepared groups on the kernel wherever the matmul layer
    picks kernels (on a GPU by default, ``ForwardOptions(matmul_variant=None or "mosaic")``),
    and on the same decoded weights in the jnp reference elsewhere. Dense projections are
    left as they are. Raises ``ValueError`` if the model is already prepared, for an unknown
    group, or if a weight is one the kernel cannot take (K % 64 != 0, an NF4 blocksize other
    than 64).
    """
    require_unprepared(model, "prepare_kernel_weights")
    if isinstance(groups, str):
        groups = (groups,)
    known = group_keys(model)
    wanted = known if groups is None else tuple(groups)
    unknown = [g for g in wanted if g not in known]
    if unknown:
        raise ValueError(f"unknown projection groups {unknown}; known: {list(known)}")
    params = dict(model.params)
    for stack in model.config.layer_stacks():
        layers = dict(params[stack.key])
        prepared = {}
        for names in stack.config.projection_groups():
            if group_key(names) not in wanted:
                continue
            weights = [layers[name]["weight"] for name in names]
            if not all(isinstance(w, NF4Tensor) for w in weights):
                continue
            prepared[group_key(names)] = _prepare_group(tuple(weights), model.dtype)
            for name in names:
                layers[name] = {k: v for k, v in layers[name].items() if k != "weight"}
        layers[PREPARED] = prepared
        params[stack.key] = layers
    return dataclasses.replace(model, params=params)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _prepare_group(weights: tuple[NF4Tensor, ...], dtype: Any) -> MgpuNF4Weight:
    """The group's weights, stacked over layers as they came, one layer at a time."""
    return jax.lax.map(lambda ws: stack_prepared([prepare_weight(w, dtype) for w in ws]), weights)


def is_prepared(model: Model) -> bool:
    """Whether :func:`prepare_kernel_weights` has rewritten the model's frozen weights."""
    return any(PREPARED in model.params.get(s.key, {}) for s in model.config.layer_stacks())


def require_unprepared(model: Model, what: str) -> None:
    """Raises a ``ValueError`` naming ``what`` needs the loaded (bitsandbytes-layout) weights."""
    if is_prepared(model):
        raise ValueError(
            f"{what} needs the model's loaded weights, but they were rewritten for the Mosaic "
            "GPU kernel by prepare_kernel_weights; pass the model as loaded"
        )


def kernel_groups_for(model: Model, setting: str, tokens_per_step: int) -> tuple[str, ...]:
    """The groups :func:`prepare_kernel_weights` should take for a ``kernel_weights`` setting
    (the ``lorax train`` option): ``"none"``; ``"all"``; a comma-separated list of
    :data:`GROUP_KEYS`; or ``"auto"``: all groups where the kernel measured faster end to
    end, i.e. steps of at most :data:`AUTO_MAX_TOKENS` tokens on one Hopper GPU (the kernel's
    wgmma needs sm_90; on a multi-device mesh the prepared arrays would be replicated) for a
    model whose NF4 projections the kernel takes (bf16/f16 compute, blocksize 64,
    K % 64 == 0), else none. An empty tuple means leave the model as loaded.
    """
    if setting == "none" or is_prepared(model):
        return ()
    known = group_keys(model)
    if setting == "all":
        return known
    if setting != "auto":
        groups = tuple(g.strip() for g in setting.split(",") if g.strip())
        unknown = [g for g in groups if g not in known]
        if unknown or not groups:
            raise ValueError(
                f"kernel_weights must be none, all, auto or a comma list of {list(known)}; "
                f"got {setting!r}"
            )
        return groups
    one_hopper = _backend.on_hopper() and len(jax.devices()) == 1
    if one_hopper and tokens_per_step <= AUTO_MAX_TOKENS and _kernel_takes(model):
        return known
    return ()


def _kernel_takes(model: Model) -> bool:
    """Whether the model has NF4 projections and the kernel takes every one of them: a 16-bit
    compute dtype, NF4 blocksize 64, and whole absmax blocks per row (K % 64 == 0), the
    conditions under which :func:`prepare_kernel_weights` would raise. ``"auto"`` leaves
    other models as loaded rather than stop a run."""
    if jnp.dtype(model.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return False
    weights = [
        model.params[stack.key].get(name, {}).get("weight")
        for stack in model.config.layer_stacks()
        for name in stack.config.projections()
        if name not in EXPERT_PROJECTIONS
    ]
    nf4 = [w for w in weights if isinstance(w, NF4Tensor)]
    return bool(nf4) and all(w.blocksize == QBLOCK and w.shape[-1] % QBLOCK == 0 for w in nf4)
