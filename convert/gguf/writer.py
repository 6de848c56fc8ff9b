"""Writing GGUF files: header first, then tensor data streamed one tensor at a time.

Every tensor's type and shape are known before any data exists, so its byte size and offset
are too: the writer emits the complete header and tensor-info table first, then asks each
tensor for its encoded bytes, writes them and drops them. Peak memory is one encoded tensor
(plus whatever the caller's producer holds), never the whole model. The file is written
under a temporary name and renamed into place only when complete, so a failure (including a
producer raising halfway through) leaves no partial output.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import BinaryIO

import numpy as np

from convert.gguf.format import (
    ALIGNMENT_KEY,
    DEFAULT_ALIGNMENT,
    KV,
    MAGIC,
    MAX_DIMS,
    MAX_NAME_BYTES,
    SCALAR_FORMATS,
    VERSION,
    GGUFError,
    TensorType,
    ValueType,
    align,
    tensor_nbytes,
    u32,
)
from convert.safetensors_io import atomic_path


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """A tensor to write: its name, row-major shape and type, and how to make its bytes.

    ``produce`` is called once, when the writer reaches this tensor, and must return the
    encoded data (any array whose bytes are the tensor, e.g. uint8 blocks or float16).
    GGUF records dimensions innermost-first; ``shape`` here is numpy's order.
    """

    name: str
    shape: tuple[int, ...]
    type: TensorType
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.type, self.shape)


def write_gguf(
    path: str | os.PathLike[str],
    metadata: Mapping[str, KV],
    tensors: Sequence[TensorPlan],
    *,
    alignment: int = DEFAULT_ALIGNMENT,
) -> None:
    """Writes a GGUF v3 file atomically: all of it under ``path``, or nothing."""
    path = os.fspath(path)
    metadata = dict(metadata)
    if alignment != DEFAULT_ALIGNMENT:
        metadata[ALIGNMENT_KEY] = u32(alignment)
    _check_tensors(path, tensors)
    with atomic_path(path) as f:
        f.write(MAGIC)
        f.write(struct.pack("<IQQ", VERSION, len(tensors), len(metadata)))
        for key, kv in metadata.items():
            f.write(_string(key))
            f.write(_value(key, kv))
        offset = 0
        for t in tensors:
            f.write(_string(t.name))
            f.write(struct.pack("<I", len(t.shape)))
            f.write(struct.pack(f"<{len(t.shape)}Q", *reversed(t.shape)))
            f.write(struct.pack("<IQ", int(t.type), offset))
            offset = align(offset + t.nbytes, alignment)
        _pad(f, alignment)
        for t in tensors:
            data = np.ascontiguousarray(t.produce())
            data = data.astype(data.dtype.newbyteorder("<"), copy=False).reshape(-1)
            if data.nbytes != t.nbytes:
                raise GGUFError(
                    f"{path}: tensor {t.name!r} ({t.type.name}{list(t.shape)}) should encode "
                    f"to {t.nbytes} bytes, its producer gave {data.nbytes}"
                )
            f.write(data.view(np.uint8))
            _pad(f, alignment)


def _check_tensors(path: str, tensors: Iterable[TensorPlan]) -> None:
    seen: set[str] = set()
    for t in tensors:
        if t.name in seen:
            raise GGUFError(f"{path}: tensor {t.name!r} is listed twice")
        seen.add(t.name)
        if len(t.name.encode()) > MAX_NAME_BYTES:
            raise GGUFError(f"{path}: tensor name {t.name!r} exceeds {MAX_NAME_BYTES} bytes")
        if not 1 <= len(t.shape) <= MAX_DIMS or min(t.shape) < 1:
            raise GGUFError(f"{path}: tensor {t.name!r} has unsupported shape {list(t.shape)}")
        try:
            t.nbytes  # noqa: B018 - validates that rows hold whole blocks
        except GGUFError as e:
            raise GGUFError(f"{path}: tensor {t.name!r}: {e}") from None


def _pad(f: BinaryIO, alignment: int) -> None:
    f.write(b"\0" * (-f.tell() % alignment))


def _string(s: str) -> bytes:
    # surrogateescape round-trips token bytes that are not valid UTF-8 (see the reader).
    raw = s.encode("utf-8", "surrogateescape")
    return struct.pack("<Q", len(raw)) + raw


def _value(key: str, kv: KV) -> bytes:
    head = struct.pack("<I", int(kv.type))
    if kv.type == ValueType.STRING:
        return head + _string(kv.value)
    if kv.type in SCALAR_FORMATS:
        return head + np.asarray(kv.value, SCALAR_FORMATS[kv.type]).tobytes()
    if kv.type == ValueType.ARRAY and kv.item_type is not None:
        head += struct.pack("<IQ", int(kv.item_type), len(kv.value))
        if kv.item_type == ValueType.STRING:
            return head + b"".join(_string(s) for s in kv.value)
        if kv.item_type in SCALAR_FORMATS:
            return head + np.asarray(kv.value, SCALAR_FORMATS[kv.item_type]).tobytes()
    raise GGUFError(f"metadata key {key!r}: cannot write a value of type {kv!r:.80}")
