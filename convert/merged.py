"""Merged export: the base model with its LoRA folded in, as a Hugging Face model directory.

Every adapted projection becomes ``W' = W + scale·B·A``, computed in float32 from the
(dequantized) base weight and rounded once to the output dtype, so the merged model is as
close to the adapted one as the output dtype allows. ``dtype="nf4"`` re-quantizes merged
projections to bitsandbytes' serialized 4-bit form (``transformers`` loads it with
``load_in_4bit`` semantics and no quantization step); projections without an adapter keep
their NF4 bytes untouched.

A model read from an image-text checkpoint (Gemma 3's 4B-27B) is written as its language
model alone, a causal LM (``Gemma3ForCausalLM``), with a warning: lorax never loads the
vision tower, so it has none to write. Its PEFT adapter (``save_adapter``) on the original
checkpoint is the way to keep the images.

A mixture of experts (Mixtral, Qwen 2/3 MoE) is written as its checkpoint stores it
(``convert.names.EXPERT_CHECKPOINTS``, the names transformers' ``save_pretrained`` writes): the
router, and each expert's matrices on their own (Mixtral's ``w1``/``w3``, Qwen's
``gate_proj``/``up_proj``, are the gate and up rows of lorax's fused ``experts_gate_up_proj``;
``w2``/``down_proj`` its ``experts_down_proj``), each merged with its expert's LoRA
(``W_e + scale·B_e·A_e``, B's rows split the same way). Qwen 2 MoE's shared expert is merged
as any dense projection (``mlp.shared_expert.*``), its gate written as it is. ``"nf4"`` is
refused for an MoE: transformers' bitsandbytes integration quantizes only ``nn.Linear``
modules, and an MoE's experts are 3-D parameters it keeps in 16 bits.

An MoE model with dense-MLP layers (Qwen MoE's ``mlp_only_layers`` / ``decoder_sparse_step``)
holds them as a second layer stack (``ModelConfig.layer_stacks``), with its own LoRA entries:
each layer is written under its index in the model with its stack's tensors (a dense layer's
``mlp.gate_proj``, no router or experts) merged with its stack's adapters, and ``config.json``
lists the dense layers in ``mlp_only_layers``.

Tensors are produced one at a time, layer by layer in HF's order, and written into shards of
at most ``max_shard_size``, so host memory peaks near one shard beyond the loaded model. The
directory is written beside the destination and renamed into place only when complete.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convert.bnb import bnb_quantization_config, nf4_to_bnb_tensors
from convert.export_common import (
    DEFAULT_MAX_SHARD_SIZE,
    ShardWriter,
    check_destination,
    misplaced_projection_message,
    staged_directory,
    unknown_stacks_message,
    write_json,
)
from convert.hf_config import ARCHITECTURES, generation_config_dict, hf_config_dict
from convert.names import CAUSAL_LM, LAYERS, TensorSpec, tensor_specs
from pallas_kernels.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

OUTPUT_DTYPES = ("bfloat16", "float16", "float32", "nf4")
_STORE_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


def save_merged(
    model: Any,
    lora: Any,
    directory: str | os.PathLike[str],
    dtype: str = "bfloat16",
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    allow_overwrite: bool = False,
) -> None:
    """Writes ``model`` with ``lora`` merged in as an HF directory ``from_pretrained`` loads.

    ``dtype`` is the dtype of the stored weights: ``"bfloat16"``, ``"float16"``,
    ``"float32"``, or ``"nf4"`` (bitsandbytes 4-bit projections, everything else in the
    model's compute dtype, and a ``quantization_config`` in ``config.json``). ``lora`` may
    be None to export the base model alone. The directory gets ``config.json``,
    ``generation_config.json``, the tokenizer's files when the model has a tokenizer, and
    ``model.safetensors`` (or shards of at most ``max_shard_size`` bytes, e.g. ``"2GB"``,
    with ``model.safetensors.index.json``). An existing non-empty directory is replaced,
    atomically, only with ``allow_overwrite``.
    """
    from lorax.kernel_weights import require_unprepared  # here: lorax imports convert

    require_unprepared(model, "save_merged")
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of {OUTPUT_DTYPES}, got {dtype!r}")
    if dtype == "nf4" and model.config.moe:
        raise ValueError(
            f"save_merged(dtype='nf4') is not supported for {model.config.model_type}: "
            "transformers' bitsandbytes integration quantizes only nn.Linear modules, and a "
            "mixture of experts' experts (nearly all of its weights) are 3-D parameters it "
            "would keep in 16 bits; export 'bfloat16', 'float16' or 'float32' instead"
        )
    check_destination(directory, allow_overwrite)  # refuse before the expensive part
    plan = _Plan.make(model, lora, dtype)
    config = model.config
    if config.checkpoint_layout != CAUSAL_LM:
        warnings.warn(
            f"save_merged: {os.fspath(directory)} gets the language model alone, as "
            f"{ARCHITECTURES[config.model_type]} (model_type {config.model_type!r}): lorax "
            "read it from an image-text checkpoint and left the vision tower out, "
            "so the export cannot take images; to keep them, apply the PEFT adapter "
            "(save_adapter) to the original checkpoint",
            stacklevel=2,
        )
    hf_config = hf_config_dict(config, plan.store.name)
    if plan.quantize:
        hf_config["quantization_config"] = bnb_quantization_config(
            compute_dtype=plan.store.name, double_quant=plan.double_quant
        )

    with staged_directory(directory, allow_overwrite=allow_overwrite) as staging:
        writer = ShardWriter(staging, max_shard_size)
        for spec, layer, position in _in_hf_order(tensor_specs(config), config.num_layers):
            writer.add(plan.tensors(spec, layer, position))
        writer.close()
        write_json(os.path.join(staging, "config.json"), hf_config)
        write_json(os.path.join(staging, "generation_config.json"), generation_config_dict(config))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(staging)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What every tensor of one export needs: the weights, the adapters and the formats."""

    params: Mapping[str, Any]
    adapters: Mapping[str, Mapping[str, Mapping[str, jax.Array]]]  # stack -> projection -> A, B
    scale: float
    store: np.dtype  # dtype of every stored tensor that is not 4-bit
    quantize: bool  # projections as bnb 4-bit
    double_quant: bool

    @classmethod
    def make(cls, model: Any, lora: Any, dtype: str) -> _Plan:
        quantize = dtype == "nf4"
        store = jnp.dtype(model.dtype) if quantize else jnp.dtype(_STORE_DTYPES[dtype])
        adapters, scale = stack_adapters(model.config, lora)
        return cls(model.params, adapters, scale, store, quantize, _double_quant(model.params))

    def tensors(self, spec: TensorSpec, layer: int, position: int) -> dict[str, np.ndarray]:
        """One HF tensor (or the group of tensors of a bnb 4-bit weight), ready to write: of
        the model's layer ``layer``, at ``position`` on its stack's axis (a per-layer spec)."""
        name = spec.hf_name.format(i=layer) if spec.per_layer else spec.hf_name
        value = _param(self.params, spec.path)
        if spec.per_layer:  # this layer's matrix (an expert's, of an MoE's stacked experts)
            value = jax.tree.map(lambda x: x[(position, *spec.index)], value)
        projection = _is_projection_weight(spec)
        adapter = self.adapters.get(spec.path[0], {}).get(spec.path[1]) if projection else None
        if self.quantize and projection and adapter is None and isinstance(value, NF4Tensor):
            return _bnb_tensors(name, value)  # untouched: keep its exact bytes
        a = b = None
        if adapter is not None:
            a, b = matrix_factors(adapter, position, spec)
        # A tensor kept in a dtype of its own (a float32 router) is stored in it, as
        # transformers stores it.
        store = jnp.dtype(spec.dtype) if spec.dtype is not None else self.store
        merged = merge_lora_weight(value, a, b, self.scale, store)
        if not bool(jnp.isfinite(merged).all()):
            raise ValueError(
                f"tensor {name!r} is not finite in {store.name} (overflow?); export in a "
                "wider dtype such as bfloat16 or float32"
            )
        if self.quantize and projection:
            return _bnb_tensors(name, quantize_nf4(merged, double_quant=self.double_quant))
        return {name: np.asarray(merged)}


def stack_adapters(config: Any, lora: Any) -> tuple[dict[str, dict[str, Any]], float]:
    """The LoRA entries by layer stack and projection (checked against each stack's
    projections and shapes, ``ModelConfig.layer_stacks``) and their scale."""
    if lora is None:
        return {}, 0.0
    unknown = unknown_stacks_message(config, lora.params)
    if unknown is not None:
        raise ValueError(unknown)
    adapters = {}
    for stack in config.layer_stacks():
        entries = lora.params.get(stack.key, {})
        for proj, ab in entries.items():
            misplaced = misplaced_projection_message(config, stack, proj)
            if misplaced is not None:
                raise ValueError(misplaced)
            _check_adapter_shapes(stack.config, proj, ab)
        adapters[stack.key] = dict(entries)
    return adapters, float(lora.config.scale)


def lora_adapters(config: Any, lora: Any) -> tuple[dict[str, Any], float]:
    """The LoRA entries by projection (checked against the base's projections and shapes)
    and their scale, of a model whose layers are all alike (one layer stack: for several,
    :func:`stack_adapters`)."""
    if len(config.layer_stacks()) > 1:
        raise ValueError(
            f"this {config.model_type} has layers of two structures (dense-MLP layers "
            f"{list(config.dense_mlp_layers)}), each with its own LoRA entries; read them by "
            "layer stack (stack_adapters)"
        )
    adapters, scale = stack_adapters(config, lora)
    return adapters.get(LAYERS, {}), scale


def _check_adapter_shapes(config: Any, proj: str, ab: Mapping[str, Any]) -> None:
    """A LoRA entry's factors must have the shapes of ``proj`` in the layers of ``config``
    (one stack's)."""
    out_dim, in_dim = config.projection_shape(proj)
    lead = config.adapter_batch_shape(proj)
    a_shape, b_shape = tuple(ab["lora_a"].shape), tuple(ab["lora_b"].shape)
    rank = a_shape[len(lead)] if len(a_shape) == len(lead) + 2 else -1
    expected_a, expected_b = (*lead, rank, in_dim), (*lead, out_dim, rank)
    if a_shape != expected_a or b_shape != expected_b:
        dims = ", ".join(map(str, lead))
        raise ValueError(
            f"LoRA {proj} has lora_a {list(a_shape)} and lora_b {list(b_shape)}; the model "
            f"needs [{dims}, r, {in_dim}] and [{dims}, {out_dim}, r]"
        )


def matrix_factors(
    adapter: Mapping[str, jax.Array], layer: int, spec: TensorSpec
) -> tuple[jax.Array, jax.Array]:
    """The LoRA factors ``(A, B)`` of the one checkpoint matrix ``spec`` names in ``layer``
    (the layer's position on its stack's axis, which is its index in a uniform model).

    An expert's matrix (``spec.index = (expert, *part)``) takes its expert's pair. Parts of
    one projection (Mixtral's w1 and w3, the gate and up rows of ``experts_gate_up_proj``)
    share A, and each takes its block of B's rows: ``(W + s·B·A)[rows] = W[rows] +
    s·B[rows]·A``.
    """
    a, b = adapter["lora_a"][layer], adapter["lora_b"][layer]
    if not spec.index:
        return a, b
    a, b = a[spec.index[0]], b[spec.index[0]]
    if len(spec.index) > 1:
        rows = spec.shape[0]
        b = b[spec.index[1] * rows : (spec.index[1] + 1) * rows]
    return a, b


def _double_quant(params: Any) -> bool:
    """Re-quantize in the base's NF4 format, or with QLoRA's double quantization if dense."""
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, NF4Tensor)):
        if isinstance(leaf, NF4Tensor):
            return leaf.double_quant
    return True


def _in_hf_order(
    specs: Iterator[TensorSpec], num_layers: int
) -> Iterator[tuple[TensorSpec, int, int]]:
    """(spec, layer, position) in HF's on-disk order: each layer's tensors together, layer by
    layer, a layer's from the stack that holds it (``position``: its index in the stack).

    Non-layer tensors get layer and position -1.
    """
    block: list[TensorSpec] = []
    for spec in [*specs, None]:
        if spec is not None and spec.per_layer:
            block.append(spec)
            continue
        # Each stack's position of each model layer (a spec's path starts with its stack).
        positions: dict[str, dict[int, int]] = {}
        for s in block:
            if s.path[0] not in positions:
                positions[s.path[0]] = {i: j for j, i in enumerate(s.layers)}
        for i in range(num_layers):
            for s in block:
                j = positions[s.path[0]].get(i)
                if j is not None:
                    yield s, i, j
        block = []
        if spec is not None:
            yield spec, -1, -1


def _is_projection_weight(spec: TensorSpec) -> bool:
    return spec.quantizable and spec.path[-1] == "weight"


def _param(params: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        params = params[key]
    return params


def _bnb_tensors(name: str, weight: NF4Tensor) -> dict[str, np.ndarray]:
    """bitsandbytes' serialized tensors for the weight named ``name`` (``X.weight``)."""
    return nf4_to_bnb_tensors(name.removesuffix(".weight"), weight)


@functools.partial(jax.jit, static_argnames="store")
def merge_lora_weight(
    value: Any, lora_a: jax.Array | None, lora_b: jax.Array | None, scale: float, store: Any
) -> jax.Array:
    """``W + scale·B·A`` for one layer, in float32, rounded once to ``store``.

    An NF4 base weight is dequantized as bitsandbytes does (to its original dtype) before
    the float32 sum, so the result is what merging into a ``load_in_4bit`` model gives.
    """
    if isinstance(value, NF4Tensor):
        value = dequantize_nf4(value)
    if lora_a is None:
        return value.astype(store)
    delta = jnp.matmul(
        lora_b.astype(jnp.float32),
        lora_a.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return (value.astype(jnp.float32) + scale * delta).astype(store)
