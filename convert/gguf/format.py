"""The GGUF container's facts, shared by the reader and the writer so they cannot disagree.

A GGUF file is: the magic ``GGUF``, a version, the tensor and key/value counts, the typed
key/value metadata, one info record per tensor (name, dims innermost-first, type, offset),
padding to ``general.alignment``, then the tensor data, each tensor aligned. Everything is
little-endian. Value and tensor type codes are the ``gguf`` package's enums (llama.cpp's
``gguf-py``), so the numbers have one source.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

MAGIC = b"GGUF"
VERSION = 3
# Version 1 counted with 32-bit integers and predates every file in circulation.
READABLE_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
# ggml's GGML_MAX_NAME is 64 bytes including the terminating NUL; GGML_MAX_DIMS is 4.
MAX_NAME_BYTES = 63
MAX_DIMS = 4

TensorType = GGMLQuantizationType
ValueType = GGUFValueType

# Fixed-width value types: their little-endian struct code (numpy reads the same codes).
SCALAR_FORMATS: dict[ValueType, str] = {
    ValueType.UINT8: "<B",
    ValueType.INT8: "<b",
    ValueType.UINT16: "<H",
    ValueType.INT16: "<h",
    ValueType.UINT32: "<I",
    ValueType.INT32: "<i",
    ValueType.FLOAT32: "<f",
    ValueType.BOOL: "<?",
    ValueType.UINT64: "<Q",
    ValueType.INT64: "<q",
    ValueType.FLOAT64: "<d",
}


class GGUFError(ValueError):
    """A GGUF file that is truncated, corrupt, or not one we can read or write.

    The message names the file and, where one is at fault, the tensor or key.
    """


@dataclasses.dataclass(frozen=True)
class KV:
    """One typed metadata value. ``item_type`` is the element type of an ARRAY.

    llama.cpp checks the stored type of every key it reads (``context_length`` must be a
    UINT32, ``rope.freq_base`` a FLOAT32, ...), so values carry their type explicitly
    instead of having it guessed from the Python value.
    """

    type: ValueType
    value: Any
    item_type: ValueType | None = None


def u32(value: int) -> KV:
    return KV(ValueType.UINT32, int(value))


def i32(value: int) -> KV:
    return KV(ValueType.INT32, int(value))


def f32(value: float) -> KV:
    return KV(ValueType.FLOAT32, float(value))


def boolean(value: bool) -> KV:
    return KV(ValueType.BOOL, bool(value))


def string(value: str) -> KV:
    return KV(ValueType.STRING, str(value))


def array(item_type: ValueType, values: Sequence[Any] | np.ndarray) -> KV:
    if item_type == ValueType.STRING:
        return KV(ValueType.ARRAY, [str(v) for v in values], item_type)
    return KV(ValueType.ARRAY, np.asarray(values, SCALAR_FORMATS[item_type]), item_type)


def block_size(tensor_type: TensorType) -> int:
    """Elements per quantization block (1 for float types)."""
    return GGML_QUANT_SIZES[tensor_type][0]


def row_nbytes(tensor_type: TensorType, row_length: int) -> int:
    """Bytes of one row of ``row_length`` elements; the row must hold whole blocks."""
    block, type_size = GGML_QUANT_SIZES[tensor_type]
    if row_length % block:
        raise GGUFError(
            f"a {tensor_type.name} row must be a multiple of {block} elements, got {row_length}"
        )
    return row_length // block * type_size


def tensor_nbytes(tensor_type: TensorType, shape: Sequence[int]) -> int:
    """Bytes of a tensor of row-major ``shape`` (rows of ``shape[-1]`` elements)."""
    rows = math.prod(shape[:-1])
    return rows * row_nbytes(tensor_type, shape[-1])


def align(offset: int, alignment: int) -> int:
    return offset + (-offset % alignment)
