"""Reading and writing safetensors files, one tensor at a time.

We parse the format ourselves (an 8-byte header length, a JSON header, raw little-endian
data) because loading must be lazy and strict: tensors are memory-mapped one by one so peak
host memory stays near one copy of the result, and a truncated or corrupt file is reported
with the file, the tensor and the byte counts instead of a crash deep inside a reader.
Writes are atomic: a file appears under its final name only once it is complete.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file that is truncated, corrupt, or not what the caller expected."""


class SafetensorsFile(Mapping[str, np.ndarray]):
    """A lazily read safetensors file: ``f[name]`` reads one tensor from disk."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = str(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{self.path}: truncated: {size} bytes, no header")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise SafetensorsError(
                    f"{self.path}: corrupt or truncated header: declares {n} header bytes, "
                    f"file has {size} bytes"
                )
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SafetensorsError(f"{self.path}: header is not valid JSON ({e})") from e
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: header is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except KeyError as e:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} has unsupported or missing header field {e}"
                ) from e
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if end - begin != expected:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} {info['dtype']}{list(shape)} needs "
                    f"{expected} bytes, header gives {end - begin}"
                )
            if self._data_start + end > size:
                raise SafetensorsError(
                    f"{self.path}: truncated: tensor {name!r} ends at byte "
                    f"{self._data_start + end}, file has {size} bytes"
                )
            self._entries[name] = (dtype, shape, begin, end)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._entries:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        dtype, shape, begin, _ = self._entries[name]
        if int(np.prod(shape, dtype=np.int64)) == 0:
            return np.zeros(shape, dtype)
        # A plain read, not a memory map: mapped pages would stay resident (and count as the
        # process's memory) for the life of the map, while this buffer is freed as soon as
        # the caller has converted the tensor.
        count = int(np.prod(shape, dtype=np.int64))
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            data = np.fromfile(f, dtype=dtype, count=count)
        if data.size != count:
            raise SafetensorsError(f"{self.path}: tensor {name!r} is cut short")
        return data.reshape(shape)

    def read_flat(self, name: str, start: int, stop: int) -> np.ndarray:
        """Elements ``[start, stop)`` of tensor ``name`` flattened row-major, as a 1-D array.

        One contiguous read of just those bytes, so a sharded loader can take its slice of a
        tensor (whole rows, or a block-aligned flat range) without reading the rest.
        """
        if name not in self._entries:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        dtype, shape, begin, _ = self._entries[name]
        numel = int(np.prod(shape, dtype=np.int64))
        if not 0 <= start <= stop <= numel:
            raise ValueError(
                f"{self.path}: tensor {name!r} has {numel} elements; cannot read [{start}, {stop})"
            )
        count = stop - start
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin + start * dtype.itemsize)
            data = np.fromfile(f, dtype=dtype, count=count)
        if data.size != count:
            raise SafetensorsError(f"{self.path}: tensor {name!r} is cut short")
        return data

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]


@contextmanager
def atomic_path(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[BinaryIO]:
    """Opens a temp file beside ``path`` and renames it into place only on success."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _encode_header(
    items: Iterable[tuple[str, np.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[int]]:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    sizes = []
    for name, dtype, shape in items:
        if dtype not in _CODES:
            raise SafetensorsError(f"tensor {name!r}: dtype {dtype} cannot be stored")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {
            "dtype": _CODES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
        sizes.append(nbytes)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw, sizes


def save_file(
    path: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes ``tensors`` atomically (a reader never sees a partial file)."""
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    head, _ = _encode_header(((k, a.dtype, a.shape) for k, a in arrays.items()), metadata)
    with atomic_path(path) as f:
        f.write(head)
        for a in arrays.values():
            f.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
