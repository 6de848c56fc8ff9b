"""NF4 format: bit-exact with bitsandbytes, pytree behaviour, and bnb's serialized form."""

from __future__ import annotations

import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import bnb_dequantize

from convert.bnb import (
    bnb_4bit_prefixes,
    bnb_quantization_config,
    nf4_from_bnb_tensors,
    nf4_to_bnb_tensors,
)
from pallas_kernels import nf4
from pallas_kernels.nf4 import (
    DYNAMIC_CODE,
    NF4_CODE,
    NF4Tensor,
    dequantize_absmax,
    dequantize_nf4,
    dequantize_nf4_rows,
    quantize_nf4,
    stack,
)

SHAPES = [(7, 13), (64,), (3, 100), (128, 256), (1000, 33)]
DTYPES = ["float32", "float16", "bfloat16"]
PREFIX = "model.layers.0.mlp.up_proj"


@pytest.fixture(scope="module")
def bnb():
    """bitsandbytes.functional, with torch.compile off for the module's duration.

    bnb's ``dequantize_4bit`` for an odd last dimension goes through ``torch.compile``, which
    takes 10-50 s per shape on CPU; eager mode computes the same float32 products.
    """
    functional = pytest.importorskip(
        "bitsandbytes.functional", reason="bitsandbytes is the NF4 reference (the test extra)"
    )
    import torch._dynamo

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch._dynamo.config, "disable", True)
        yield functional


def make_weight(shape: tuple[int, ...], dtype: str, *, salt: str = "") -> np.ndarray:
    """Fresh seeded Gaussian weights with a zero row and an outlier, in ``dtype`` (as f32)."""
    rng = np.random.default_rng(zlib.crc32(f"{shape}{dtype}{salt}".encode()))
    w = rng.standard_normal(shape) * rng.uniform(0.005, 2.0)
    if w.ndim == 2 and shape[0] >= 3:
        w[1] = 0.0
        w[2, shape[1] // 2] *= 40.0
    return np.array(jnp.asarray(w, dtype).astype(jnp.float32))


def bnb_quantize(bnb, w: np.ndarray, dtype: str, double_quant: bool):
    import torch

    """bnb's (packed, QuantState) for ``w`` cast to ``dtype``."""
    wt = torch.from_numpy(w).to(getattr(torch, dtype))
    return bnb.quantize_4bit(wt, blocksize=64, quant_type="nf4", compress_statistics=double_quant)


def bnb_tensors(packed, state) -> dict[str, np.ndarray]:
    """What ``Linear4bit`` saves for ``PREFIX``: the packed weight plus the packed state."""
    out = {f"{PREFIX}.weight": packed.numpy()}
    for key, value in state.as_dict(packed=True).items():
        out[f"{PREFIX}.weight.{key}"] = value.numpy()
    return out


def as_f32(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.float32))


def test_code_tables_are_bnbs(bnb):
    assert np.array_equal(NF4_CODE, bnb.get_4bit_type("nf4", device="cpu").numpy())
    assert np.array_equal(DYNAMIC_CODE, bnb.create_dynamic_map(signed=True).numpy())
    assert NF4_CODE.dtype == DYNAMIC_CODE.dtype == np.float32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [*SHAPES, (3, 30)])
def test_quantize_matches_bnb_exactly(bnb, shape, dtype):
    """Without double quant everything is bit-exact: packed bytes, absmax, dequantized values."""
    w = make_weight(shape, dtype)
    if shape == (3, 30):
        w[2] = 0.0  # the partial last block (elements 64..89) is all zero: bnb stores 1e-38
    packed, state = bnb_quantize(bnb, w, dtype, double_quant=False)
    t = quantize_nf4(jnp.asarray(w, dtype), blocksize=64, double_quant=False)

    assert (t.shape, t.dtype, t.batch_shape, t.double_quant) == (shape, jnp.dtype(dtype), (), False)
    np.testing.assert_array_equal(np.asarray(t.packed), packed.numpy().reshape(-1))
    ours, theirs = np.asarray(t.absmax), state.absmax.numpy()
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    deq = dequantize_nf4(t)
    assert deq.shape == shape and deq.dtype == jnp.dtype(dtype)
    reference = bnb_dequantize(bnb, packed, state).float().numpy().reshape(shape)
    np.testing.assert_array_equal(as_f32(deq), reference)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_double_quant_matches_bnb(bnb, shape, dtype):
    """Packed bytes are exact; nested codes are exact nearest, which bnb's CPU lookup is not.

    bnb on CPU picks a nested code a step (rarely two, in the dense region near zero) away
    from the nearest in a small fraction of places; the offset (a float32 mean) may differ by
    an ulp because torch sums in a different order.
    """
    w = make_weight(shape, dtype, salt="dq")
    packed, state = bnb_quantize(bnb, w, dtype, double_quant=True)
    t = quantize_nf4(jnp.asarray(w, dtype), blocksize=64, double_quant=True)

    np.testing.assert_array_equal(np.asarray(t.packed), packed.numpy().reshape(-1))
    offset = np.asarray(t.offset)
    np.testing.assert_allclose(offset, state.offset.item(), rtol=1e-6)
    ulps = 4 * np.spacing(offset)  # an ulp in the offset moves every |absmax - offset|
    nested = np.asarray(t.nested_absmax)
    np.testing.assert_allclose(nested, state.state2.absmax.numpy(), rtol=1e-6, atol=ulps)

    # Our codes are the exact nearest to (absmax - offset) / nested_absmax. (A single block
    # has absmax == offset: a 0/0 coded 0, see test_all_equal_absmax_gives_code_zero_like_bnb.)
    raw = np.asarray(quantize_nf4(jnp.asarray(w, dtype), double_quant=False).absmax)
    nested = np.repeat(nested, 256)[: raw.size]
    ours = np.asarray(t.absmax)
    if (nested == 0).all():
        np.testing.assert_array_equal(ours, 0)
    else:
        x = (raw - offset) * (np.float32(1) / nested)
        distance = np.abs(x[:, None] - DYNAMIC_CODE[None, :])
        np.testing.assert_array_equal(distance[np.arange(x.size), ours], distance.min(axis=1))

    theirs = state.absmax.numpy()
    differ = ours != theirs
    assert differ.mean() < 0.05, f"{differ.sum()} of {differ.size} nested codes differ"
    assert np.abs(DYNAMIC_CODE[ours] - DYNAMIC_CODE[theirs]).max() <= 0.03

    # Given bnb's own codes, our decode is bit-exact with bnb's (absmax and weights).
    from_bnb = nf4_from_bnb_tensors(PREFIX, bnb_tensors(packed, state), source="bnb")
    reference = bnb_dequantize(bnb, packed, state).float().numpy().reshape(shape)
    np.testing.assert_array_equal(as_f32(dequantize_nf4(from_bnb)), reference)


def test_nf4_midpoint_ties_round_down_like_bnb(bnb):
    """A scaled value exactly on a midpoint takes the lower code (torch.bucketize, CUDA)."""
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)
    w = np.zeros(64, np.float32)
    w[0] = 1.0  # absmax 1, so every element scales to itself
    w[1:16] = midpoints
    w[16:31] = np.nextafter(midpoints, np.float32(2))
    packed, _ = bnb_quantize(bnb, w, "float32", double_quant=False)
    t = quantize_nf4(jnp.asarray(w), double_quant=False)
    np.testing.assert_array_equal(np.asarray(t.packed), packed.numpy().reshape(-1))
    codes = np.stack([np.asarray(t.packed) >> 4, np.asarray(t.packed) & 15], -1).reshape(-1)
    np.testing.assert_array_equal(codes[1:16], np.arange(15))
    np.testing.assert_array_equal(codes[16:31], np.arange(1, 16))


def _cuda_dquantize(code: np.ndarray, x: np.ndarray) -> np.ndarray:
    """bnb's CUDA ``dQuantize<0>`` (csrc) transliterated, vectorized over ``x``."""
    pivot = np.full(x.shape, 127)
    lower_pivot, upper_pivot = np.zeros_like(pivot), np.full_like(pivot, 255)
    lower, upper = np.full(x.shape, np.float32(-1)), np.full(x.shape, np.float32(1))
    val = code[pivot]
    step = 64
    while step:
        right = x > val
        lower_pivot, lower = np.where(right, pivot, lower_pivot), np.where(right, val, lower)
        upper_pivot, upper = np.where(right, upper_pivot, pivot), np.where(right, upper, val)
        pivot = np.where(right, pivot + step, pivot - step)
        val = code[pivot]
        step //= 2
    upper = np.where(upper_pivot == 255, code[upper_pivot], upper)
    lower = np.where(lower_pivot == 0, code[lower_pivot], lower)
    half = np.float32(0.5)
    go_up = np.where(x > (upper + val) * half, upper_pivot, pivot)
    go_down = np.where(x < (lower + val) * half, lower_pivot, pivot)
    return np.where(x > val, go_up, go_down)


def test_nested_rounding_matches_cuda_dquantize():
    midpoints = (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) / np.float32(2)
    xs = np.concatenate(
        [
            np.random.default_rng(0).uniform(-1, 1, 4096).astype(np.float32),
            DYNAMIC_CODE,
            midpoints,  # exact ties
            np.nextafter(midpoints, np.float32(2)),
            np.nextafter(midpoints, np.float32(-2)),
            np.float32([-1.0, 1.0, -0.0]),
        ]
    )
    expected = _cuda_dquantize(DYNAMIC_CODE, xs)
    ours = jax.jit(nf4._nearest_dynamic_code)(jnp.asarray(xs))
    np.testing.assert_array_equal(np.asarray(ours), expected)


def test_all_equal_absmax_gives_code_zero_like_bnb(bnb):
    """Constant |w|: absmax - offset is all zero, a 0/0 that bnb (CPU and CUDA) codes as 0."""
    w = np.ones((7, 13), np.float32)
    packed, state = bnb_quantize(bnb, w, "float32", double_quant=True)
    t = quantize_nf4(jnp.asarray(w), double_quant=True)
    np.testing.assert_array_equal(np.asarray(t.absmax), state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(t.nested_absmax), state.state2.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(dequantize_nf4(t)), w)


def test_bnb_tensors_round_trip_byte_exact(bnb):
    """bnb's saved tensors -> NF4Tensor -> bnb's tensors: same names, order, dtypes, bytes."""
    w = make_weight((96, 80), "bfloat16")
    for double_quant in (False, True):
        packed, state = bnb_quantize(bnb, w, "bfloat16", double_quant)
        saved = bnb_tensors(packed, state)
        t = nf4_from_bnb_tensors(PREFIX, saved, source="model.safetensors")
        assert t.double_quant == double_quant and t.shape == (96, 80)
        written = nf4_to_bnb_tensors(PREFIX, t)
        assert list(written) == list(saved)
        for name, array in saved.items():
            assert written[name].dtype == array.dtype, name
            assert written[name].shape == array.shape, name
            assert written[name].tobytes() == array.tobytes(), name


def test_our_tensors_load_in_bnb(bnb):
    """What we write is read back by bnb's QuantState.from_dict to the same weights."""
    import torch

    w = make_weight((7, 13), "float16")
    for double_quant in (False, True):
        t = quantize_nf4(jnp.asarray(w, jnp.float16), double_quant=double_quant)
        written = nf4_to_bnb_tensors(PREFIX, t)
        weight = written.pop(f"{PREFIX}.weight")
        state = bnb.QuantState.from_dict(
            {k.removeprefix(f"{PREFIX}.weight."): torch.tensor(v) for k, v in written.items()},
            device=torch.device("cpu"),
        )
        assert state.dtype == torch.float16 and tuple(state.shape) == (7, 13)
        theirs = bnb_dequantize(bnb, torch.tensor(weight), state)
        np.testing.assert_array_equal(theirs.float().numpy(), as_f32(dequantize_nf4(t)))
        back = nf4_from_bnb_tensors(PREFIX, nf4_to_bnb_tensors(PREFIX, t), source="x")
        assert jax.tree.structure(back) == jax.tree.structure(t)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(t), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nonstandard_nested_map_is_decoded_losslessly(bnb):
    """A nested map that is not bnb's dynamic map is applied on load, as bnb would."""
    import torch

    w = make_weight((64, 64), "float32")
    packed, state = bnb_quantize(bnb, w, "float32", double_quant=True)
    state.state2.code = state.state2.code.clone()
    state.state2.code[0] = -1.0
    state.absmax[0] = 0  # make sure the changed entry is used
    t = nf4_from_bnb_tensors(PREFIX, bnb_tensors(packed, state), source="x")
    assert not t.double_quant
    reference = bnb_dequantize(bnb, packed, state)
    np.testing.assert_array_equal(np.asarray(dequantize_nf4(t)), reference.numpy())
    assert reference.dtype == torch.float32


def _saved(bnb, quant_type: str = "nf4") -> dict[str, np.ndarray]:
    import torch

    w = torch.from_numpy(make_weight((8, 64), "float32"))
    packed, state = bnb.quantize_4bit(
        w, blocksize=64, quant_type=quant_type, compress_statistics=True
    )
    return bnb_tensors(packed, state)


def test_missing_tensor_error_names_file_and_tensor(bnb):
    saved = _saved(bnb)
    del saved[f"{PREFIX}.weight.nested_absmax"]
    with pytest.raises(
        ValueError, match=r"shard-2\.safetensors.*up_proj\.weight\.nested_absmax.*missing"
    ):
        nf4_from_bnb_tensors(PREFIX, saved, source="shard-2.safetensors")


def test_fp4_is_rejected(bnb):
    with pytest.raises(ValueError, match=r"f\.safetensors.*fp4.*only nf4"):
        nf4_from_bnb_tensors(PREFIX, _saved(bnb, "fp4"), source="f.safetensors")


def test_wrong_quant_type_in_state_is_rejected(bnb):
    saved = _saved(bnb)
    key = f"{PREFIX}.weight.quant_state.bitsandbytes__nf4"
    state = json.loads(saved[key].tobytes())
    state["quant_type"] = "int4"
    saved[key] = np.frombuffer(json.dumps(state).encode(), np.uint8)
    with pytest.raises(ValueError, match=r"f\.safetensors.*quant_type 'int4'"):
        nf4_from_bnb_tensors(PREFIX, saved, source="f.safetensors")


def test_wrong_quant_map_and_sizes_are_rejected(bnb):
    saved = _saved(bnb)
    saved[f"{PREFIX}.weight.quant_map"] = saved[f"{PREFIX}.weight.quant_map"] * 2
    with pytest.raises(ValueError, match=r"quant_map.*not the NF4 code table"):
        nf4_from_bnb_tensors(PREFIX, saved, source="f.safetensors")
    saved = _saved(bnb)
    saved[f"{PREFIX}.weight"] = saved[f"{PREFIX}.weight"][:-1]
    with pytest.raises(ValueError, match=r"up_proj\.weight' has 255 elements.*256"):
        nf4_from_bnb_tensors(PREFIX, saved, source="f.safetensors")


def test_quantization_config_matches_transformers():
    transformers = pytest.importorskip("transformers")
    import torch

    expected = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=["lm_head"],
    ).to_dict()
    assert bnb_quantization_config(skip_modules=["lm_head"]) == expected


def test_bnb_4bit_prefixes():
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.q_proj.weight.absmax",
        "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4",
        "model.layers.1.mlp.down_proj.weight.quant_state.bitsandbytes__nf4",
    ]
    assert bnb_4bit_prefixes(names) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ]


def test_pytree_jit_scan_and_vmap():
    """A stacked NF4Tensor scans layer by layer; vmap(quantize) builds the same stack."""
    ws = jnp.asarray(np.random.default_rng(0).standard_normal((3, 7, 13)), jnp.bfloat16)
    layers = [quantize_nf4(w) for w in ws]
    stacked = stack(layers)
    assert stacked.batch_shape == (3,) and stacked.shape == (7, 13)
    assert stacked.numel == 91 and stacked.nblocks == 2 and stacked.double_quant

    _, per_step = jax.lax.scan(lambda c, t: (c, jax.jit(dequantize_nf4)(t)), None, stacked)
    expected = jnp.stack([dequantize_nf4(t) for t in layers])
    assert per_step.dtype == jnp.bfloat16
    np.testing.assert_array_equal(as_f32(per_step), as_f32(expected))
    np.testing.assert_array_equal(as_f32(dequantize_nf4(stacked)), as_f32(expected))
    assert dequantize_absmax(stacked).shape == (3, 2)
    assert dequantize_nf4(stacked, jnp.float32).dtype == jnp.float32

    vmapped = jax.vmap(quantize_nf4)(ws)
    assert jax.tree.structure(vmapped) == jax.tree.structure(stacked)
    for a, b in zip(jax.tree.leaves(vmapped), jax.tree.leaves(stacked), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "rows, k, double_quant",
    [((96, 32, 32), 128, True), ((40, 24), 64, False), ((7, 5), 13, True)],
    ids=["qkv-like", "plain-absmax", "partial-blocks"],
)
def test_rows_decode_equals_decode_then_concatenate(rows, k, double_quant):
    """Projections sharing an input decode as one stacked matrix, bit for bit what decoding
    each and concatenating gives (each member keeps its own nested scales and offset); members
    with partial absmax blocks take the member-by-member path."""
    rng = np.random.default_rng(len(rows) + k)
    ts = [
        quantize_nf4(jnp.asarray(rng.standard_normal((n, k)) * (i + 1), jnp.bfloat16),
                     double_quant=double_quant)
        for i, n in enumerate(rows)
    ]  # fmt: skip
    for dtype in (jnp.bfloat16, jnp.float32):
        got = jax.jit(dequantize_nf4_rows, static_argnums=1)(ts, dtype)
        want = jnp.concatenate([dequantize_nf4(t, dtype) for t in ts])
        assert got.shape == (sum(rows), k) and got.dtype == dtype
        np.testing.assert_array_equal(as_f32(got), as_f32(want))


def test_stack_and_quantize_reject_bad_input():
    a = quantize_nf4(jnp.ones((7, 13)))
    with pytest.raises(ValueError, match="differ"):
        stack([a, quantize_nf4(jnp.ones((13, 7)))])
    plain = quantize_nf4(jnp.ones((7, 13)), double_quant=False)
    with pytest.raises(ValueError, match="differ"):
        stack([a, plain])
    assert stack([plain, plain]).nested_absmax is None
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        quantize_nf4(jnp.ones((4, 64), jnp.int32))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(jnp.ones((4, 64)), blocksize=48)
    broken = NF4Tensor(a.packed[:-1], a.absmax, a.nested_absmax, a.offset, (7, 13), jnp.float32)
    with pytest.raises(ValueError, match=r"packed should be uint8\[46\]"):
        dequantize_nf4(broken)
