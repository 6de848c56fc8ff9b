"""Hugging Face checkpoint directory -> lorax's stacked base-parameter pytree.

Tensors are read one at a time from memory-mapped safetensors shards, cast, quantized to
NF4 while loading when asked, and written into their stacked slot, so peak host memory
stays near one copy of the result. Every mismatch between the checkpoint and the config is
an error that names the file, the tensor and both shapes.

This module knows parameter layouts, not models: it takes the config object from its caller.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convert.names import (
    IGNORABLE_SUFFIXES,
    LAYOUTS,
    CheckpointLayout,
    TensorSpec,
    layer_prefix,
    tensor_specs,
)
from convert.safetensors_io import SafetensorsError, SafetensorsFile
from pallas_kernels.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4, stack

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class CheckpointError(ValueError):
    """A checkpoint that does not match its config or cannot be read."""


class ShardedCheckpoint(Mapping[str, np.ndarray]):
    """All tensors of a (possibly sharded) safetensors checkpoint, read lazily by name."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_FILE)
        single = os.path.join(directory, SINGLE_FILE)
        if os.path.exists(index_path):
            with open(index_path, encoding="utf-8") as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{index_path}: not a safetensors index ({e})") from e
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            files, weight_map = [SINGLE_FILE], None
        else:
            files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
            if not files:
                bins = [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth"))]
                hint = (
                    f" (found PyTorch pickles {bins}: re-save with "
                    "`model.save_pretrained(dir, safe_serialization=True)`)"
                    if bins
                    else ""
                )
                raise CheckpointError(f"{directory}: no safetensors weights{hint}")
            weight_map = None
        self.files: dict[str, SafetensorsFile] = {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.exists(path):
                raise CheckpointError(f"{index_path}: lists shard {name!r}, which is missing")
            try:
                self.files[name] = SafetensorsFile(path)
            except SafetensorsError as e:
                raise CheckpointError(str(e)) from e
        self._where: dict[str, str] = {}
        for fname, f in self.files.items():
            for tensor in f:
                self._where[tensor] = fname
        if weight_map is not None:
            for tensor, fname in weight_map.items():
                if self._where.get(tensor) != fname:
                    raise CheckpointError(
                        f"{index_path}: maps {tensor!r} to {fname}, which does not contain it"
                    )

    def file_of(self, name: str) -> str:
        return os.path.join(self.directory, self._where[name])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.files[self._where[name]][name]

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:  # by the index: no tensor read
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[self._where[name]].shape(name)

    def read_flat(self, name: str, start: int, stop: int) -> np.ndarray:
        """Elements ``[start, stop)`` of ``name`` flattened row-major (one contiguous read)."""
        return self.files[self._where[name]].read_flat(name, start, stop)


def read_config(directory: str) -> dict[str, Any]:
    """The parsed ``config.json`` of an HF model directory."""
    path = os.path.join(directory, "config.json")
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory")
    if not os.path.exists(path):
        raise CheckpointError(f"{directory}: no config.json")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def is_bnb_4bit(hf_config: Mapping[str, Any]) -> bool:
    q = hf_config.get("quantization_config") or {}
    return q.get("quant_method") == "bitsandbytes" and bool(q.get("load_in_4bit"))


def open_checkpoint(
    directory: str, config: Any, hf_config: Mapping[str, Any] | None = None
) -> tuple[ShardedCheckpoint, list[TensorSpec], bool]:
    """Opens ``directory`` and checks its tensor names against ``config``.

    Returns the lazy checkpoint, the tensor specs in HF order under the checkpoint's names
    (``config.checkpoint_layout``'s spelling that the file uses), and whether the projections
    are stored pre-quantized by bitsandbytes (4-bit). Loaders (this module's and the sharded
    one in ``lorax.sharding``) share this so they accept and reject exactly the same files.
    """
    hf_config = read_config(directory) if hf_config is None else hf_config
    quantization = hf_config.get("quantization_config")
    if quantization and not is_bnb_4bit(hf_config):
        method = quantization.get("quant_method") if isinstance(quantization, Mapping) else None
        raise CheckpointError(
            f"{directory}: config.json's quantization_config (quant_method={method!r}) stores "
            "weights lorax does not read; it reads 16/32-bit checkpoints and bitsandbytes "
            "4-bit ones (convert others first: DeepSeek-V3/R1's FP8 files to bf16)"
        )
    ckpt = ShardedCheckpoint(directory)
    pre_quantized = is_bnb_4bit(hf_config)
    layout = LAYOUTS[config.checkpoint_layout]
    spelling = _spelling(ckpt, layout, config)
    specs = [
        dataclasses.replace(spec, hf_name=layout.rename(spec.hf_name, spelling))
        for spec in tensor_specs(config)
    ]
    # DeepSeek-V3's files carry its multi-token-prediction layers after the decoder's, which
    # transformers skips on load (and computes nothing with): so does lorax.
    # (The hub's files say num_nextn_predict_layers; transformers >= 5 writes num_mtp_layers.)
    skipped = int(hf_config.get("num_nextn_predict_layers") or hf_config.get("num_mtp_layers") or 0)
    extra = tuple(
        layout.rename(f"{layer_prefix(config.num_layers + i)}.", spelling) for i in range(skipped)
    )
    _check_names(ckpt, specs, config, pre_quantized, layout, spelling, extra)
    return ckpt, specs, pre_quantized


def _spelling(ckpt: ShardedCheckpoint, layout: CheckpointLayout, config: Any) -> tuple[str, str]:
    """The one of ``layout``'s spellings that the checkpoint uses, told by where its embedding
    matrix is (every layout's checkpoint has one)."""
    if len(layout.spellings) == 1:
        return layout.spellings[0]
    embedding = "model.embed_tokens.weight"
    found = [s for s in layout.spellings if layout.rename(embedding, s) in ckpt]
    if len(found) != 1:
        names = [layout.rename(embedding, s) for s in layout.spellings]
        what = "none of" if not found else "more than one of"
        raise CheckpointError(
            f"{ckpt.directory}: a {config.model_type} language model in an image-text "
            f"checkpoint has its embeddings at one of {names}; this checkpoint has {what} them"
        )
    return found[0]


def check_shape(ckpt: ShardedCheckpoint, spec: TensorSpec, name: str) -> None:
    """Raises ``CheckpointError`` naming the file when tensor ``name`` is not ``spec.shape``."""
    shape = ckpt.shape(name)
    if tuple(shape) != spec.shape:
        raise CheckpointError(
            f"{ckpt.file_of(name)}: tensor {name!r} has shape {list(shape)}, "
            f"config expects {list(spec.shape)}"
        )


def read_tensor(
    ckpt: ShardedCheckpoint,
    spec: TensorSpec,
    name: str,
    *,
    quantize: str | None,
    dtype: Any,
    double_quant: bool,
    pre_quantized: bool,
) -> Any:
    """One whole tensor as the base pytree stores it: cast to ``dtype`` (or the spec's own),
    NF4 when asked.

    A pre-quantized (bitsandbytes 4-bit) projection is read as the NF4Tensor it holds. A
    tensor lorax keeps in 16 bits that such a checkpoint stores in 4-bit (transformers 4
    quantized every ``nn.Linear``: an MoE router, a shared expert's gate) is decoded.
    """
    if pre_quantized and (spec.quantizable or f"{name}.absmax" in ckpt):
        from convert.bnb import nf4_from_bnb_tensors

        prefix = name[: -len(".weight")]
        nf4 = nf4_from_bnb_tensors(prefix, ckpt, source=ckpt.file_of(name))
        if spec.quantizable:
            return nf4
        if nf4.shape != spec.shape:
            raise CheckpointError(
                f"{ckpt.file_of(name)}: 4-bit tensor {name!r} has shape {list(nf4.shape)}, "
                f"config expects {list(spec.shape)}"
            )
        return dequantize_nf4(nf4, dtype)
    check_shape(ckpt, spec, name)
    array = jnp.asarray(np.asarray(ckpt[name]), dtype=spec.dtype or dtype)
    if quantize == "nf4" and spec.quantizable:
        return quantize_nf4(array, blocksize=64, double_quant=double_quant)
    return array


def check_quantize(quantize: str | None) -> None:
    """Rejects a ``quantize`` option the loaders do not know."""
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")


def load_params(
    directory: str,
    config: Any,
    *,
    quantize: str | None = None,
    dtype: Any = jnp.bfloat16,
    double_quant: bool = True,
    hf_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Reads the checkpoint in ``directory`` into the stacked base pytree.

    ``quantize="nf4"`` quantizes every decoder projection (bitsandbytes-exact NF4, as
    ``load_in_4bit`` does; embeddings, norms and the LM head stay in ``dtype``). A checkpoint
    saved by bitsandbytes in 4-bit keeps its quantized projections as they are.
    """
    check_quantize(quantize)
    ckpt, specs, pre_quantized = open_checkpoint(directory, config, hf_config)

    def read(spec: TensorSpec, name: str) -> Any:
        return read_tensor(
            ckpt,
            spec,
            name,
            quantize=quantize,
            dtype=dtype,
            double_quant=double_quant,
            pre_quantized=pre_quantized,
        )

    def read_layers(spec: TensorSpec) -> Any:
        return stack_layers([read(spec, n) for n in spec.hf_names()])

    params: dict[str, Any] = {}
    for spec in specs:
        if not spec.index:
            value = read_layers(spec) if spec.per_layer else read(spec, spec.hf_name)
            set_path(params, spec.path, value)
    for path, value in read_shared_parameters(specs, read_layers).items():
        set_path(params, path, value)
    return params


def read_shared_parameters(specs: list[TensorSpec], read_layers: Any) -> dict[tuple[str, ...], Any]:
    """The parameters several checkpoint tensors share (``TensorSpec.index``: an MoE layer's
    experts), by path: each member read with ``read_layers(spec)`` (``[L, ...]``), then
    stacked (:func:`stack_members`)."""
    members: dict[tuple[str, ...], tuple[tuple[int, ...], dict[tuple[int, ...], Any]]] = {}
    for spec in specs:
        if spec.index:
            members.setdefault(spec.path, (spec.stack, {}))[1][spec.index] = read_layers(spec)
    return {path: stack_members(parts, stack) for path, (stack, parts) in members.items()}


def stack_layers(values: list[Any], axis: int = 0) -> Any:
    """Per-layer values (arrays or NF4Tensors) stacked on a new leading layer axis (or on a
    new ``axis``)."""
    if isinstance(values[0], NF4Tensor):
        return stack(values, axis=axis)
    return jnp.stack(values, axis=axis)


def stack_members(members: Mapping[tuple[int, ...], Any], shape: tuple[int, ...]) -> Any:
    """The ``[L, ...]`` values of the tensors that share one parameter (``TensorSpec.index``
    -> value) as that parameter, ``[L, *shape, ...]``: an MoE layer's experts, and each
    expert's parts (Mixtral's gate and up)."""

    def build(prefix: tuple[int, ...]) -> Any:
        if len(prefix) == len(shape):
            return members[prefix]
        return stack_layers([build((*prefix, i)) for i in range(shape[len(prefix)])], axis=1)

    return build(())


def set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Stores ``value`` at the nested-dict ``path`` of ``tree``, creating dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


_BNB_SUFFIXES = (
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.bitsandbytes__nf4",
)


def _check_names(
    ckpt: ShardedCheckpoint,
    specs: list[TensorSpec],
    config: Any,
    pre_quantized: bool,
    layout: CheckpointLayout,
    spelling: tuple[str, str],
    skipped: tuple[str, ...] = (),
) -> None:
    expected: dict[str, TensorSpec] = {}
    for spec in specs:
        for name in spec.hf_names():
            expected[name] = spec
    missing = [n for n in expected if n not in ckpt]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        )
        raise CheckpointError(f"{ckpt.directory}: checkpoint is missing tensor(s): {shown}")

    head = layout.rename("lm_head.weight", spelling)

    def accounted(name: str) -> bool:
        if name in expected or name.endswith(IGNORABLE_SUFFIXES) or layout.foreign_part(name):
            return True
        if name.startswith(skipped):
            return True
        if config.tie_word_embeddings and name == head:
            return True  # some tied checkpoints store the shared matrix twice
        if pre_quantized:
            for suffix in _BNB_SUFFIXES:
                if name.endswith(suffix) and name[: -len(suffix)] in expected:
                    return True
        return False

    unexpected = [n for n in ckpt if not accounted(n)]
    if unexpected:
        shown = ", ".join(f"{n} ({ckpt.file_of(n)})" for n in unexpected[:5])
        raise CheckpointError(
            f"{ckpt.directory}: unexpected tensor(s) for a {config.model_type} model with "
            f"{config.num_layers} layers: {shown}"
        )


def load_tokenizer(directory: str) -> Any | None:
    """The HF tokenizer of ``directory`` when its files are there, else None."""
    if not any(os.path.exists(os.path.join(directory, f)) for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def params_nbytes(params: Any) -> int:
    """Device bytes of a parameter pytree (NF4 leaves count their packed bytes)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
