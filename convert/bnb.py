"""bitsandbytes' serialized 4-bit form <-> :class:`~pallas_kernels.nf4.NF4Tensor`.

A ``*-bnb-4bit`` Hugging Face checkpoint stores each quantized linear ``X`` as the tensors
bitsandbytes' ``Linear4bit`` writes (``QuantState.as_dict(packed=True)`` under
``X.weight.``)::

    X.weight                                  uint8 [ceil(numel / 2), 1]  packed nibbles
    X.weight.absmax                           uint8 [nblocks] codes (float32 if not nested)
    X.weight.quant_map                        float32 [16]   the NF4 code table
    X.weight.nested_absmax                    float32 [ceil(nblocks / 256)]   (nested only)
    X.weight.nested_quant_map                 float32 [256]  the dynamic map  (nested only)
    X.weight.quant_state.bitsandbytes__nf4    uint8 bytes of a JSON object:
        {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [out, in],
         "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": <float>}

The NF4 layout is identical to ours, so conversion only moves arrays and parses the JSON;
``nested_offset`` is the float32 offset printed as a Python float, so it round-trips exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from pallas_kernels.nf4 import DYNAMIC_CODE, NF4_CODE, NF4Tensor

__all__ = [
    "BNB_WEIGHT_SUFFIXES",
    "bnb_4bit_prefixes",
    "bnb_quantization_config",
    "nf4_from_bnb_tensors",
    "nf4_to_bnb_tensors",
]

_STATE_KEY = "quant_state.bitsandbytes__"
# Suffixes, after "X.weight", of every tensor bnb writes for one 4-bit linear.
BNB_WEIGHT_SUFFIXES: tuple[str, ...] = (
    "",
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    f".{_STATE_KEY}nf4",
)
_DTYPE_NAMES = ("float32", "float16", "bfloat16")


def bnb_4bit_prefixes(names: Iterable[str]) -> list[str]:
    """Module names ``X`` that hold a bnb 4-bit weight, given a checkpoint's tensor names."""
    marker = f".weight.{_STATE_KEY}"
    return sorted(name[: name.index(marker)] for name in names if marker in name)


def nf4_from_bnb_tensors(
    prefix: str, tensors: Mapping[str, np.ndarray], *, source: str
) -> NF4Tensor:
    """Reads the bnb 4-bit weight of module ``prefix`` (e.g. ``model.layers.0.mlp.up_proj``).

    Args:
      prefix: the module name; the tensors read are ``f"{prefix}.weight"`` and its
        ``.absmax`` / ``.quant_map`` / ``.nested_*`` / ``.quant_state.bitsandbytes__nf4``.
      tensors: name -> array (numpy or anything ``np.asarray`` takes); only the names above
        are looked up, so a lazy mapping over safetensors shards works.
      source: the file the tensors come from, for error messages.

    Returns:
      A single-matrix ``NF4Tensor`` (no batch axes) holding exactly the checkpoint's data.
      If the nested map is not bnb's standard dynamic map, the absmax is decoded with the
      stored map to float32 (as bnb would decode it) and the tensor is not double-quantized.

    Raises:
      ValueError: naming ``source`` and the tensor, if a tensor is missing or malformed,
        the quant_type is not nf4, or the quant_map is not the NF4 table.
    """
    weight = f"{prefix}.weight"

    def where(name: str) -> str:
        return f"{source}: bnb 4-bit tensor {name!r}"

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"{where(name)} is missing")
        return np.asarray(tensors[name])

    state_name = f"{weight}.{_STATE_KEY}nf4"
    if state_name not in tensors and f"{weight}.{_STATE_KEY}fp4" in tensors:
        raise ValueError(f"{where(weight)} is quantized as fp4; only nf4 is supported")
    try:
        state = json.loads(get(state_name).astype(np.uint8).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where(state_name)} is not a JSON quant state ({e})") from e
    if state.get("quant_type") != "nf4":
        raise ValueError(
            f"{where(state_name)} has quant_type {state.get('quant_type')!r}; only nf4 is supported"
        )
    try:
        shape = tuple(int(d) for d in state["shape"])
        blocksize = int(state["blocksize"])
        dtype_name = state["dtype"]
        nested = "nested_offset" in state
        nested_blocksize = int(state["nested_blocksize"]) if nested else 256
        offset = np.float32(state["nested_offset"]) if nested else None
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where(state_name)} lacks a valid field ({e!r}): {state}") from e
    if dtype_name not in _DTYPE_NAMES:
        raise ValueError(f"{where(state_name)} has dtype {dtype_name!r}, not one of {_DTYPE_NAMES}")

    quant_map = get(f"{weight}.quant_map")
    if quant_map.shape != NF4_CODE.shape or not np.array_equal(quant_map, NF4_CODE):
        raise ValueError(f"{where(weight + '.quant_map')} is not the NF4 code table")

    numel = int(np.prod(shape))
    nblocks = -(-numel // blocksize)
    # quant_storage other than uint8 (e.g. bf16 for FSDP) only reinterprets the same bytes.
    packed = _expect(
        np.ascontiguousarray(get(weight)).reshape(-1).view(np.uint8),
        (-(-numel // 2),),
        where(weight),
    )
    absmax = get(f"{weight}.absmax").reshape(-1)
    if not nested:
        absmax = _expect(absmax.astype(np.float32), (nblocks,), where(f"{weight}.absmax"))
        return _tensor(packed, absmax, None, None, shape, dtype_name, blocksize)

    codes = _expect(absmax, (nblocks,), where(f"{weight}.absmax"))
    if codes.dtype != np.uint8:
        raise ValueError(f"{where(weight + '.absmax')} should be uint8 codes, got {codes.dtype}")
    nested_absmax = get(f"{weight}.nested_absmax").reshape(-1).astype(np.float32)
    nested_blocks = -(-nblocks // nested_blocksize)
    nested_absmax = _expect(nested_absmax, (nested_blocks,), where(f"{weight}.nested_absmax"))
    nested_map = get(f"{weight}.nested_quant_map").reshape(-1).astype(np.float32)
    _expect(nested_map, (256,), where(f"{weight}.nested_quant_map"))
    if np.array_equal(nested_map, DYNAMIC_CODE):
        return _tensor(
            packed, codes, nested_absmax, offset, shape, dtype_name, blocksize, nested_blocksize
        )
    # A non-standard nested map cannot live in an NF4Tensor: decode absmax as bnb would
    # (float32 code * nested absmax, then + offset, each rounded) and keep it in float32.
    padded = np.zeros(nested_blocks * nested_blocksize, np.float32)
    padded[:nblocks] = nested_map[codes]
    scaled = (padded.reshape(nested_blocks, -1) * nested_absmax[:, None]).reshape(-1)
    return _tensor(packed, scaled[:nblocks] + offset, None, None, shape, dtype_name, blocksize)


def _expect(array: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
    if array.shape != shape:
        raise ValueError(f"{where} has {array.size} elements; the quant state implies {shape[0]}")
    return array


def _tensor(
    packed: np.ndarray,
    absmax: np.ndarray,
    nested_absmax: np.ndarray | None,
    offset: np.float32 | None,
    shape: tuple[int, ...],
    dtype_name: str,
    blocksize: int,
    nested_blocksize: int = 256,
) -> NF4Tensor:
    return NF4Tensor(
        packed=jnp.asarray(packed),
        absmax=jnp.asarray(absmax),
        nested_absmax=None if nested_absmax is None else jnp.asarray(nested_absmax),
        offset=None if offset is None else jnp.asarray(offset, jnp.float32),
        shape=shape,
        dtype=jnp.dtype(dtype_name),
        blocksize=blocksize,
        nested_blocksize=nested_blocksize,
    )


def nf4_to_bnb_tensors(prefix: str, t: NF4Tensor) -> dict[str, np.ndarray]:
    """The tensors bnb's ``Linear4bit`` writes for module ``prefix`` holding ``t``.

    Names, dtypes, shapes, order and the JSON bytes equal what
    ``QuantState.as_dict(packed=True)`` (plus the packed weight) gives for the same data,
    so transformers loads the result into a bnb nf4 model with the matching
    :func:`bnb_quantization_config`. ``t`` must be a single matrix (no batch axes).
    """
    if t.batch_shape:
        raise ValueError(
            f"nf4_to_bnb_tensors({prefix!r}) takes one matrix; got batch shape {t.batch_shape} "
            "(index the layer axis first)"
        )
    weight = f"{prefix}.weight"
    out = {
        weight: np.array(t.packed, np.uint8).reshape(-1, 1),
        f"{weight}.absmax": np.array(t.absmax),
        f"{weight}.quant_map": NF4_CODE.copy(),
    }
    state: dict[str, Any] = {
        "quant_type": "nf4",
        "blocksize": t.blocksize,
        "dtype": jnp.dtype(t.dtype).name,
        "shape": list(t.shape),
    }
    if t.double_quant:
        out[f"{weight}.nested_absmax"] = np.array(t.nested_absmax, np.float32)
        out[f"{weight}.nested_quant_map"] = DYNAMIC_CODE.copy()
        state.update(
            nested_blocksize=t.nested_blocksize,
            nested_dtype="float32",
            nested_offset=float(np.float32(t.offset)),
        )
    blob = json.dumps(state).encode("utf-8")
    out[f"{weight}.{_STATE_KEY}nf4"] = np.frombuffer(blob, np.uint8).copy()
    return out


def bnb_quantization_config(
    *,
    compute_dtype: str = "bfloat16",
    double_quant: bool = True,
    skip_modules: Sequence[str] | None = None,
    quant_storage: str = "uint8",
) -> dict[str, Any]:
    """The ``quantization_config`` block transformers writes to config.json for bnb nf4.

    Equal to ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", ...)
    .to_dict()``; ``skip_modules`` lists modules left unquantized (e.g. ``["lm_head"]``).
    """
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": False,
        "_load_in_4bit": True,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": None if skip_modules is None else list(skip_modules),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": quant_storage,
        "load_in_4bit": True,
        "load_in_8bit": False,
    }
