"""Per-device memory accounting: what each device holds, and an activation estimate.

Parameter, adapter and optimizer bytes are exact: they are read off each leaf's sharding
(the index each device holds), so they work for placed arrays and for ``ShapeDtypeStruct``s
with a sharding alike, i.e. before anything is allocated ("does a 70B model fit on 8
devices?").

Activations are an *estimate* from the model shape and the remat policy, counting what the
backward pass keeps per token and layer (in the compute dtype) plus the working set of one
layer, the chunked LM-head loss and the decoded/gathered weights of one layer. It ignores
allocator slack and XLA's scratch space, and assumes a flash-style attention (the CPU
reference attention also materialises ``[B, H, S, S]`` scores).
``scripts/check_sharding_gpu.py`` prints it beside the measured peak of a real step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lorax import remat as remat_lib
from lorax.model import HOST_MEMORY_KINDS
from lorax.sharding.mesh import describe
from lorax.sharding.rules import LAYERS_KEYS
from lorax.train.step import auto_chunk_size
from pallas_kernels.nf4 import NF4Tensor
from pallas_kernels.nf4_matmul_mgpu import MgpuNF4Weight


def per_device_bytes(tree: Any) -> int:
    """Device-memory bytes the most loaded device holds of ``tree``'s leaves (arrays or
    ShapeDtypeStructs; a leaf without a sharding counts whole, as on one device; leaves in
    host memory count nothing)."""
    counts: dict[Any, int] = {}
    for x in jax.tree_util.tree_leaves(tree):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            continue  # an RNG key: a few bytes, and its dtype has no itemsize
        sharding = getattr(x, "sharding", None)
        if getattr(sharding, "memory_kind", None) in HOST_MEMORY_KINDS:
            continue  # kept in host memory (e.g. lorax.model.embeddings_to_host)
        itemsize = jnp.dtype(x.dtype).itemsize
        if sharding is None:
            counts[None] = counts.get(None, 0) + math.prod(x.shape) * itemsize
            continue
        for device, index in sharding.devices_indices_map(tuple(x.shape)).items():
            size = math.prod(len(range(*s.indices(n))) for s, n in zip(index, x.shape, strict=True))
            counts[device] = counts.get(device, 0) + size * itemsize
    unsharded = counts.pop(None, 0)
    return unsharded + max(counts.values(), default=0)


def total_bytes(tree: Any) -> int:
    """Bytes of ``tree``'s leaves counted once (the unsharded size)."""
    return sum(
        math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
        for x in jax.tree_util.tree_leaves(tree)
        if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
    )


def _layer_weight_bytes(params: Any) -> tuple[int, int]:
    """(bytes of one layer's stored weights, elements of its largest projection decoded to
    16 bits: weights prepared for the Mosaic GPU kernel are never decoded, so count none),
    of the larger layers where the model has two stacks (``ModelConfig.layer_stacks``)."""
    per_stack = [_stack_weight_bytes(params[key]) for key in LAYERS_KEYS if key in params]
    return max(per_stack, default=(0, 0))


def _stack_weight_bytes(stack: Any) -> tuple[int, int]:
    stored = 0
    largest = 0
    for proj in jax.tree_util.tree_leaves(
        stack, is_leaf=lambda x: isinstance(x, NF4Tensor | MgpuNF4Weight)
    ):
        if isinstance(proj, MgpuNF4Weight):
            stored += total_bytes(proj) // max(proj.quads.shape[0], 1)
            continue
        layers = proj.packed.shape[0] if isinstance(proj, NF4Tensor) else proj.shape[0]
        stored += total_bytes(proj) // max(layers, 1)
        if isinstance(proj, NF4Tensor):
            largest = max(largest, proj.numel)
        elif len(proj.shape) == 3:
            largest = max(largest, math.prod(proj.shape[1:]))
    return stored, largest


def activation_bytes(
    config: Any,
    *,
    tokens: int,
    remat: str,
    offload_layer_inputs: bool = False,
    compute_bytes: int,
    lora_rank: int = 0,
    lora_targets: int = 0,
    loss_chunk_size: int | None = None,
) -> int:
    """Estimated peak bytes of activations for ``tokens`` tokens per device per micro-batch.

    Per layer the backward keeps (values per token, before the remat policy drops some):
    the residual stream and its norm twice (4·D), q, k, v and the attention output
    (2·Q + 2·KV), the MLP's gate, up and their product (3·I), and the rank-r LoRA inputs.
    ``full`` keeps only the layer input (D), ``selective`` that plus q, k, v and the attention
    output, ``mlp`` also the post-attention residual and gate/up, ``offload`` nothing on the
    device; every policy but ``none`` also rebuilds one whole layer during the backward.
    ``offload_layer_inputs`` moves the layer input (D) of every policy to the host.
    """
    d, i = config.hidden_size, config.intermediate_size
    q = config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    lse = config.num_heads * 4  # attention's float32 logsumexp per token
    full_layer = (4 * d + 2 * q + 2 * kv + 3 * i + lora_rank * lora_targets) * compute_bytes + lse
    kept = {
        "none": full_layer,
        "full": d * compute_bytes,
        "selective": (d + 2 * q + 2 * kv) * compute_bytes + lse,
        "mlp": (2 * d + 2 * q + 2 * kv + 2 * i) * compute_bytes + lse,
        "offload": 0,
    }
    kept_layer_input = ("full", "selective", "mlp")  # the policies that count D for it
    per_token = 0
    for kind, layers in remat_lib.schedule(remat, config.num_layers):
        on_host = d * compute_bytes if offload_layer_inputs and kind in kept_layer_input else 0
        per_token += (kept[kind] - on_host) * layers
    if remat != "none":
        per_token += full_layer  # one layer recomputed at a time in the backward
    chunk = loss_chunk_size or auto_chunk_size(config.vocab_size)
    # Final hidden states (compute dtype) and their float32 gradient; per loss chunk the
    # float32 logits, their softmax and its gradient.
    loss = tokens * d * (compute_bytes + 4) + 3 * min(chunk, tokens) * config.vocab_size * 4
    return tokens * per_token + loss


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes per device (the most loaded one) by component; ``base_total`` is the whole base."""

    devices: int
    mesh: str
    base: int
    base_total: int
    lora: int
    optimizer: int
    gradients: int
    weights_workspace: int
    activations: int
    tokens_per_device: int
    remat: str

    @property
    def total(self) -> int:
        return (
            self.base
            + self.lora
            + self.optimizer
            + self.gradients
            + self.weights_workspace
            + self.activations
        )

    def table(self) -> str:
        """A small fixed-width table for logs."""
        rows = [
            ("base params", self.base, f"of {format_bytes(self.base_total)} in all"),
            ("LoRA params", self.lora, ""),
            ("optimizer state", self.optimizer, ""),
            ("LoRA gradients", self.gradients, "estimate"),
            ("weights workspace", self.weights_workspace, "estimate: one layer gathered+decoded"),
            (
                "activations",
                self.activations,
                f"estimate: remat={self.remat}, {self.tokens_per_device} tokens/device",
            ),
            ("total", self.total, ""),
        ]
        lines = [f"memory per device ({self.mesh})"]
        for name, value, note in rows:
            lines.append(f"  {name:<18} {format_bytes(value):>10}  {note}".rstrip())
        return "\n".join(lines)


def format_bytes(n: int) -> str:
    """``1.50 GiB``, ``12.0 MiB``, ``3.2 KiB``, ``17 B``."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def memory_report(
    model: Any,
    state: Any,
    *,
    tokens_per_device: int,
    remat: str = "none",
    offload_layer_inputs: bool = False,
    loss_chunk_size: int | None = None,
    mesh: Mesh | None = None,
) -> MemoryReport:
    """Accounting for ``model`` (a ``Model``) and ``state`` (a ``TrainState``) as laid out.

    Both may hold arrays or sharded ``ShapeDtypeStruct``s (``jax.eval_shape`` output with
    shardings attached), so a run can be sized before it is allocated.
    """
    config = model.config
    lora = state.lora
    base = per_device_bytes(model.params)
    devices = _device_count(model.params)
    stored_layer, largest = _layer_weight_bytes(model.params)
    compute_bytes = jnp.dtype(model.params["embed_tokens"].dtype).itemsize
    # One layer's weights gathered (when sharded) and its largest projection decoded, in the
    # forward and again in the backward.
    layers = [model.params[key] for key in LAYERS_KEYS if key in model.params]
    gathered = stored_layer if per_device_bytes(layers) < total_bytes(layers) else 0
    workspace = 2 * (gathered + largest * compute_bytes)
    lora_bytes = per_device_bytes(lora.params)
    return MemoryReport(
        devices=devices,
        mesh=describe(mesh) if mesh is not None else "1 device",
        base=base,
        base_total=total_bytes(model.params),
        lora=lora_bytes,
        optimizer=per_device_bytes(state.opt_state),
        gradients=2 * lora_bytes,  # the accumulated gradients and this micro-batch's
        weights_workspace=workspace,
        activations=activation_bytes(
            config,
            tokens=tokens_per_device,
            remat=remat,
            offload_layer_inputs=offload_layer_inputs,
            compute_bytes=compute_bytes,
            lora_rank=lora.config.rank,
            lora_targets=len(lora.config.targets),
            loss_chunk_size=loss_chunk_size,
        ),
        tokens_per_device=tokens_per_device,
        remat=remat,
    )


def _device_count(tree: Any) -> int:
    for x in jax.tree_util.tree_leaves(tree):
        sharding = getattr(x, "sharding", None)
        if sharding is not None:
            return len(sharding.device_set)
    return 1
