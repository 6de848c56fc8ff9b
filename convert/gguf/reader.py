"""Reading GGUF files strictly: metadata eagerly, tensors lazily from a memory map.

Every count, length and offset in the header is checked against the file's size before it
is used, so a truncated or corrupt file is a ``GGUFError`` naming the file (and the tensor
or key at fault), never a crash, a hang on a huge bogus count, or garbage weights. Tensor
data is only mapped; ``tensor(name)`` dequantizes one tensor to float32 when asked.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
from gguf import quants as gguf_quants

from convert.gguf.format import (
    ALIGNMENT_KEY,
    DEFAULT_ALIGNMENT,
    KV,
    MAGIC,
    MAX_DIMS,
    READABLE_VERSIONS,
    SCALAR_FORMATS,
    GGUFError,
    TensorType,
    ValueType,
    align,
    row_nbytes,
)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: row-major ``shape`` (GGUF's dims reversed), type, bytes."""

    name: str
    shape: tuple[int, ...]
    type: TensorType
    offset: int  # absolute, in the file
    nbytes: int


class GGUFFile:
    """An open GGUF file: ``metadata`` (typed ``KV``s) and ``tensors`` (``TensorInfo``s)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        try:
            self.size = os.path.getsize(self.path)
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot open ({e.strerror})") from e
        if self.size < len(MAGIC):
            raise GGUFError(f"{self.path}: not a GGUF file ({self.size} bytes, no magic)")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        cursor = _Cursor(self._map, self.path)
        magic = cursor.take(len(MAGIC), "magic")
        if magic != MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
        self.version = cursor.scalar("<I", "version")
        if self.version not in READABLE_VERSIONS:
            raise GGUFError(
                f"{self.path}: unsupported GGUF version {self.version}; readable: "
                f"{', '.join(map(str, READABLE_VERSIONS))}"
            )
        n_tensors = cursor.scalar("<Q", "tensor count")
        n_kv = cursor.scalar("<Q", "metadata count")
        # Each entry takes at least 8 bytes, which bounds any honest count by the file size.
        for what, n in (("tensor", n_tensors), ("metadata", n_kv)):
            if n > self.size // 8:
                raise GGUFError(
                    f"{self.path}: corrupt header: {n} {what} entries in a file of "
                    f"{self.size} bytes"
                )
        self.metadata: dict[str, KV] = {}
        for _ in range(n_kv):
            key = cursor.string("metadata key")
            if key in self.metadata:
                raise GGUFError(f"{self.path}: metadata key {key!r} appears twice")
            self.metadata[key] = cursor.value(key)
        self.alignment = self._alignment()
        infos = [self._tensor_info(cursor) for _ in range(n_tensors)]
        data_start = align(cursor.pos, self.alignment)
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, tensor_type, rel_offset in infos:
            self.tensors[name] = self._place(name, shape, tensor_type, rel_offset, data_start)

    # ------------------------------------------------------------------------ metadata

    def get(self, key: str, default: Any = None) -> Any:
        """The plain value of ``key`` (a list of str or a numpy array for arrays)."""
        kv = self.metadata.get(key)
        return default if kv is None else kv.value

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise GGUFError(f"{self.path}: required metadata key {key!r} is missing")
        return self.metadata[key].value

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    # ------------------------------------------------------------------------- tensors

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of ``name`` as ``uint8 [rows, bytes_per_row]`` (a read-only map)."""
        info = self._info(name)
        rows = math.prod(info.shape[:-1])
        data = self._map[info.offset : info.offset + info.nbytes]
        return data.reshape(rows, info.nbytes // rows)

    def tensor(self, name: str) -> np.ndarray:
        """``name`` dequantized to float32, in its row-major shape."""
        info = self._info(name)
        try:
            values = gguf_quants.dequantize(self.raw(name), info.type)
        except NotImplementedError as e:
            raise GGUFError(
                f"{self.path}: tensor {name!r} has type {info.type.name}, which cannot be "
                "dequantized"
            ) from e
        return np.asarray(values, np.float32).reshape(info.shape)

    def _info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: no tensor {name!r}")
        return self.tensors[name]

    # -------------------------------------------------------------------------- parsing

    def _alignment(self) -> int:
        kv = self.metadata.get(ALIGNMENT_KEY)
        if kv is None:
            return DEFAULT_ALIGNMENT
        value = kv.value
        if kv.type != ValueType.UINT32 or value <= 0 or value & (value - 1):
            raise GGUFError(
                f"{self.path}: {ALIGNMENT_KEY} must be a power-of-two UINT32, got {value!r}"
            )
        return int(value)

    def _tensor_info(self, cursor: _Cursor) -> tuple[str, tuple[int, ...], TensorType, int]:
        name = cursor.string("tensor name")
        n_dims = cursor.scalar("<I", f"tensor {name!r} dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(
                f"{self.path}: tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
            )
        dims = [cursor.scalar("<Q", f"tensor {name!r} dims") for _ in range(n_dims)]
        code = cursor.scalar("<I", f"tensor {name!r} type")
        try:
            tensor_type = TensorType(code)
        except ValueError:
            raise GGUFError(f"{self.path}: tensor {name!r} has unknown type code {code}") from None
        offset = cursor.scalar("<Q", f"tensor {name!r} offset")
        return name, tuple(reversed(dims)), tensor_type, offset

    def _place(
        self, name: str, shape: tuple[int, ...], tensor_type: TensorType, rel: int, start: int
    ) -> TensorInfo:
        if name in self.tensors:
            raise GGUFError(f"{self.path}: tensor {name!r} appears twice")
        if min(shape) < 1:
            raise GGUFError(f"{self.path}: tensor {name!r} has corrupt shape {list(shape)}")
        try:
            nbytes = math.prod(shape[:-1]) * row_nbytes(tensor_type, shape[-1])
        except GGUFError as e:
            raise GGUFError(f"{self.path}: tensor {name!r} {list(shape)}: {e}") from None
        if rel % self.alignment:
            raise GGUFError(
                f"{self.path}: tensor {name!r} offset {rel} is not aligned to {self.alignment}"
            )
        end = start + rel + nbytes
        if end > self.size:
            raise GGUFError(
                f"{self.path}: truncated: tensor {name!r} ({tensor_type.name}{list(shape)}) ends "
                f"at byte {end}, the file has {self.size} bytes"
            )
        return TensorInfo(name, shape, tensor_type, start + rel, nbytes)


class _Cursor:
    """Reads the header sequentially, checking every length against the bytes that remain."""

    def __init__(self, data: np.ndarray, path: str):
        self.data = memoryview(data).cast("B")
        self.path = path
        self.pos = 0

    def _need(self, n: int, what: str) -> None:
        if n > len(self.data) - self.pos:
            raise GGUFError(
                f"{self.path}: truncated or corrupt header: {what} needs {n} bytes at offset "
                f"{self.pos}, the file has {len(self.data)} bytes"
            )

    def take(self, n: int, what: str) -> bytes:
        self._need(n, what)
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def scalar(self, fmt: str, what: str) -> Any:
        code = _STRUCT[fmt]
        self._need(code.size, what)
        (value,) = code.unpack_from(self.data, self.pos)
        self.pos += code.size
        return value

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        # Token bytes need not be valid UTF-8; surrogateescape keeps them round-trippable.
        return self.take(n, what).decode("utf-8", "surrogateescape")

    def value(self, key: str) -> KV:
        code = self.scalar("<I", f"type of {key!r}")
        value_type = self._value_type(code, key)
        if value_type == ValueType.STRING:
            return KV(value_type, self.string(f"value of {key!r}"))
        if value_type in SCALAR_FORMATS:
            return KV(value_type, self.scalar(SCALAR_FORMATS[value_type], f"value of {key!r}"))
        item_type = self._value_type(self.scalar("<I", f"item type of {key!r}"), key)
        n = self.scalar("<Q", f"length of {key!r}")
        if item_type == ValueType.STRING:
            if n > (len(self.data) - self.pos) // 8:
                raise GGUFError(
                    f"{self.path}: corrupt array {key!r}: {n} strings cannot fit in the file"
                )
            items = [self.string(f"item of {key!r}") for _ in range(n)]
            return KV(value_type, items, item_type)
        if item_type not in SCALAR_FORMATS:
            raise GGUFError(
                f"{self.path}: metadata {key!r} is an array of {item_type.name}, "
                "which is not supported"
            )
        dtype = np.dtype(SCALAR_FORMATS[item_type])
        if n > (len(self.data) - self.pos) // dtype.itemsize:
            raise GGUFError(f"{self.path}: truncated or corrupt array {key!r} of {n} items")
        raw = self.take(n * dtype.itemsize, f"value of {key!r}")
        return KV(value_type, np.frombuffer(raw, dtype).copy(), item_type)

    def _value_type(self, code: int, key: str) -> ValueType:
        try:
            return ValueType(code)
        except ValueError:
            raise GGUFError(
                f"{self.path}: metadata {key!r} has unknown value type {code}"
            ) from None


_STRUCT = {fmt: struct.Struct(fmt) for fmt in SCALAR_FORMATS.values()}
