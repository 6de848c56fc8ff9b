"""What every exporter needs: all-or-nothing output directories and sharded safetensors.

An export is published only when complete. Files are written into a fresh temp directory
beside the destination (same filesystem, so the final step is a rename), and a failure at
any point removes it: a reader of the destination sees the old contents or the new, never a
mix and never half a file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

from convert.safetensors_io import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes from an int or an HF-style size string (``"5GB"`` = 5·10⁹, ``"2GiB"`` = 2·2³⁰)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"size must be bytes or like '5GB' / '500MiB', got {size!r}")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def write_json(path: str, obj: Any) -> None:
    """JSON the way HF writes it (indented, sorted, trailing newline)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


# ------------------------------------------------------------------------ layer stacks


def describe_stack(config: Any, stack: Any) -> str:
    """Words for a layer stack of ``config`` (``ModelConfig.layer_stacks``) in messages."""
    kind = "routed" if stack.config.moe else "dense-MLP"
    return f"{stack.key!r} ({kind} layers {list(stack.layers)} of {config.model_type})"


def unknown_stacks_message(config: Any, lora_params: Mapping[str, Any]) -> str | None:
    """Why a LoRA pytree does not fit ``config``'s layer stacks (None: it does): a key that
    names none of them, e.g. ``"dense_layers"`` on a model whose layers are all alike."""
    keys = [stack.key for stack in config.layer_stacks()]
    unknown = [key for key in lora_params if key not in keys]
    if not unknown:
        return None
    return (
        f"LoRA has entries under {unknown}, which {config.model_type} has no layer stack of "
        f"(its stacks: {keys})"
    )


def misplaced_projection_message(config: Any, stack: Any, projection: str) -> str | None:
    """Why a LoRA entry of ``projection`` under ``stack`` does not fit (None: it does): a
    projection of the model's other layers (on a model of several stacks a target is adapted
    in the layers that have it: Qwen 3 MoE's gate_proj in the dense-MLP layers, the experts
    in the routed ones), or of no layer of the model."""
    if projection in stack.config.projections():
        return None
    if projection not in config.projections():
        return (
            f"LoRA has an entry for {projection!r}, which is not a projection of "
            f"{config.model_type} (it has {list(config.projections())})"
        )
    owners = [s for s in config.layer_stacks() if projection in s.config.projections()]
    return (
        f"LoRA has an entry for {projection!r} under {describe_stack(config, stack)}, which "
        f"have no {projection}; it belongs under "
        + " and ".join(describe_stack(config, s) for s in owners)
    )


# ------------------------------------------------------------------- atomic directories


def check_destination(directory: str | os.PathLike[str], allow_overwrite: bool) -> str:
    """The destination's absolute path; refuses, before any work, what we would not replace.

    A missing path or an empty directory is free. A non-empty directory is replaced only
    with ``allow_overwrite``; a file never is.
    """
    final = os.path.abspath(os.fspath(directory))
    if os.path.lexists(final):
        if not os.path.isdir(final) or os.path.islink(final):
            raise FileExistsError(f"{final}: exists and is not a directory; not replacing it")
        if os.listdir(final) and not allow_overwrite:
            raise FileExistsError(
                f"{final}: directory exists and is not empty; pass allow_overwrite=True to "
                "replace it"
            )
    return final


@contextmanager
def staged_directory(
    directory: str | os.PathLike[str], *, allow_overwrite: bool = False
) -> Iterator[str]:
    """Yields an empty ``<directory>.tmp-XXXX``; on a clean exit it becomes ``directory``.

    On any exception the temp directory is deleted and ``directory`` is untouched. An
    existing directory (``allow_overwrite``) is first moved aside, then the new one renamed
    in, then the old one deleted: between the two renames the path briefly does not exist,
    but it never holds a mix of old and new files.
    """
    final = check_destination(directory, allow_overwrite)
    parent, name = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f"{name}.tmp-", dir=parent)
    try:
        yield staging
        _fsync_tree(staging)
        _publish(staging, final, allow_overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _publish(staging: str, final: str, allow_overwrite: bool) -> None:
    # Checked again: the destination may have changed while we were writing.
    check_destination(final, allow_overwrite)
    parent, name = os.path.split(final)
    if not os.path.lexists(final):
        os.rename(staging, final)
    elif not os.listdir(final):
        os.rmdir(final)
        os.rename(staging, final)
    else:
        aside = tempfile.mkdtemp(prefix=f"{name}.old-", dir=parent)
        os.rename(final, aside)  # POSIX: a directory may replace an empty directory
        try:
            os.rename(staging, final)
        except BaseException:
            os.rename(aside, final)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(parent)


def _fsync_tree(root: str) -> None:
    for here, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(here, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(here)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the data is already synced
        pass
    finally:
        os.close(fd)


# -------------------------------------------------------------------- sharded safetensors


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_shard_size`` bytes, in order.

    Tensors arrive in groups (a weight and its quantization state) that always share a
    shard; a group larger than the limit gets a shard of its own, as in transformers. Only
    the shard being filled is held in memory. Shards are named once their count is known:
    one shard is ``model.safetensors``; more are ``model-0000k-of-0000n.safetensors`` with
    ``model.safetensors.index.json`` mapping every tensor to its file.
    """

    def __init__(
        self,
        directory: str,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        metadata: Mapping[str, str] | None = None,
    ):
        self.directory = directory
        self.max_shard_size = parse_size(max_shard_size)
        self.metadata = dict(metadata or {"format": "pt"})
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._seen: set[str] = set()
        self._total_bytes = 0

    def add(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Queues one group of tensors; flushes the current shard first if it would overflow."""
        nbytes = sum(int(t.nbytes) for t in tensors.values())
        if self._pending and self._pending_bytes + nbytes > self.max_shard_size:
            self._flush()
        for name, tensor in tensors.items():
            if name in self._seen:
                raise ValueError(f"tensor {name!r} written twice")
            self._seen.add(name)
            self._pending[name] = tensor
        self._pending_bytes += nbytes
        self._total_bytes += nbytes

    def close(self) -> list[str]:
        """Writes the last shard, names all shards and the index; returns the file names."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.rename(self._shard_path(0), os.path.join(self.directory, SINGLE_FILE))
            return [SINGLE_FILE]
        names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        weight_map = {}
        for k, (name, tensors) in enumerate(zip(names, self._shards, strict=True)):
            os.rename(self._shard_path(k), os.path.join(self.directory, name))
            weight_map.update(dict.fromkeys(tensors, name))
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
        write_json(os.path.join(self.directory, INDEX_FILE), index)
        return [*names, INDEX_FILE]

    def _shard_path(self, k: int) -> str:
        return os.path.join(self.directory, f".shard-{k:05d}.safetensors")

    def _flush(self) -> None:
        save_file(self._shard_path(len(self._shards)), self._pending, self.metadata)
        self._shards.append(list(self._pending))
        self._pending = {}
        self._pending_bytes = 0
