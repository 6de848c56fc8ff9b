"""Chunked cross-entropy: parity with the dense reference, accumulation, memory."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorax.train.loss import (
    IGNORE_INDEX,
    chunked_cross_entropy,
    cross_entropy_reference,
    mean_loss,
    shift_labels,
)


def _inputs(tokens: int, dim: int, vocab: int, *, seed: int = 0, masked: float = 0.2):
    """Random f32 hidden states and lm_head, labels with a fraction ``masked`` ignored.

    Drawn with numpy: eager jax.random would compile a kernel per shape, slowing tests.
    """
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(tokens, dim)).astype(np.float32)
    lm_head = (rng.normal(size=(vocab, dim)) * 4 / np.sqrt(dim)).astype(np.float32)
    labels = rng.integers(0, vocab, size=tokens, dtype=np.int32)
    labels[rng.uniform(size=tokens) < masked] = IGNORE_INDEX
    return jnp.asarray(hidden), jnp.asarray(lm_head), jnp.asarray(labels)


def _loss_and_grads(fn, hidden, lm_head, labels, **kw):
    """(loss_sum, count, (d hidden, d lm_head)); the count rides along as aux."""

    def loss(h, w, y):
        return fn(h, w, y, **kw)

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (loss_sum, count), grads = value_and_grad(hidden, lm_head, labels)
    return loss_sum, count, grads


def _assert_close(actual, expected, rtol):
    """Elementwise, relative to the largest magnitude (gradients have many ~0 entries)."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    scale = max(float(np.abs(expected).max()), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


CASES = {
    "ragged_tail": dict(tokens=300, chunk_size=64),
    "single_chunk": dict(tokens=50, chunk_size=64),
    "softcap_zloss": dict(tokens=300, chunk_size=64, softcap=5.0, z_loss=1e-3),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_reference_f32(case):
    case = dict(case)
    hidden, lm_head, labels = _inputs(case.pop("tokens"), 32, 500)
    got = _loss_and_grads(chunked_cross_entropy, hidden, lm_head, labels, **case)
    want = _loss_and_grads(cross_entropy_reference, hidden, lm_head, labels, **case)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    assert int(got[1]) == int(want[1]) == int(jnp.sum(labels != IGNORE_INDEX))
    for g, w in zip(got[2], want[2], strict=True):
        _assert_close(g, w, rtol=1e-5)


def test_masked_chunks_contribute_nothing():
    """Only 3 targets among 256 tokens (8 exact chunks): most chunks are fully masked."""
    hidden, lm_head, labels = _inputs(256, 32, 500, masked=1.0)
    labels = labels.at[jnp.array([3, 150, 255])].set(jnp.array([7, 8, 9]))
    kw = dict(chunk_size=32, softcap=5.0, z_loss=1e-3)
    got = _loss_and_grads(chunked_cross_entropy, hidden, lm_head, labels, **kw)
    want = _loss_and_grads(cross_entropy_reference, hidden, lm_head, labels, **kw)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    assert int(got[1]) == 3
    for g, w in zip(got[2], want[2], strict=True):
        _assert_close(g, w, rtol=1e-5)
    untargeted = np.setdiff1d(np.arange(256), [3, 150, 255])
    assert not np.any(np.asarray(got[2][0])[untargeted])


@pytest.mark.parametrize("lm_head_grad", [True, False])
def test_all_masked_is_zero_not_nan(lm_head_grad):
    hidden, lm_head, labels = _inputs(100, 16, 50, masked=1.0)
    loss_sum, count, (d_h, d_w) = _loss_and_grads(
        chunked_cross_entropy, hidden, lm_head, labels, chunk_size=32, lm_head_grad=lm_head_grad
    )
    assert float(loss_sum) == 0.0 and int(count) == 0
    assert float(mean_loss(loss_sum, count)) == 0.0
    assert not np.any(np.asarray(d_h)) and not np.any(np.asarray(d_w))


def test_bf16_inputs_close_to_f32_reference():
    hidden, lm_head, labels = _inputs(300, 64, 500)
    kw = dict(chunk_size=64, softcap=5.0, z_loss=1e-3)
    h16, w16 = hidden.astype(jnp.bfloat16), lm_head.astype(jnp.bfloat16)
    got = _loss_and_grads(chunked_cross_entropy, h16, w16, labels, **kw)
    assert got[2][0].dtype == jnp.bfloat16 and got[2][1].dtype == jnp.bfloat16
    # Same bf16-rounded inputs, computed densely in f32: only the bf16 rounding of the
    # gradient matmul operands and of the outputs separates the two (measured: 0.35% of
    # the largest entry; jax autodiff of the dense bf16 loss is off by 0.25%).
    want = _loss_and_grads(
        cross_entropy_reference, h16.astype(jnp.float32), w16.astype(jnp.float32), labels, **kw
    )
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(got[2], want[2], strict=True):
        _assert_close(g, w, rtol=1e-2)
    # f32 activations meet a bf16 head in bf16 (no f32 copy of the head); each gradient
    # keeps its input's dtype.
    mixed = _loss_and_grads(chunked_cross_entropy, hidden, w16, labels, **kw)
    np.testing.assert_allclose(mixed[0], got[0], rtol=1e-6)
    assert mixed[2][0].dtype == jnp.float32 and mixed[2][1].dtype == jnp.bfloat16


DTYPES = {
    "f32": (jnp.float32, jnp.float32),
    "bf16": (jnp.bfloat16, jnp.bfloat16),
    "f32_hidden_bf16_head": (jnp.float32, jnp.bfloat16),
}

# 300 tokens: chunk_size 64 pads 20 rows, 16 pads 4, 512 is a single unpadded chunk.
# ``scale`` is the cotangent of loss_sum: "mean" divides by the (traced) target count.
FROZEN_CASES = {
    "padded": dict(chunk_size=64, scale="mean"),
    "small_chunks_softcap": dict(chunk_size=16, softcap=5.0, scale=3.0),
    "single_chunk_zloss": dict(chunk_size=512, z_loss=1e-3, scale="mean"),
    "padded_softcap_zloss": dict(chunk_size=64, softcap=5.0, z_loss=1e-3, scale=-2.5),
}


def _objective_grads(fn, hidden, lm_head, labels, scale, **kw):
    """(objective, (d hidden, d lm_head)) for ``scale * loss_sum`` or the mean loss."""

    def objective(h, w):
        loss_sum, count = fn(h, w, labels, **kw)
        return mean_loss(loss_sum, count) if scale == "mean" else scale * loss_sum

    return jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))(hidden, lm_head)


@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", FROZEN_CASES.values(), ids=FROZEN_CASES.keys())
def test_frozen_head_matches_reference(case, dtypes):
    """lm_head_grad=False: same loss and hidden gradient, zero head gradient."""
    kw = dict(case)
    scale = kw.pop("scale")
    h_dtype, w_dtype = dtypes
    hidden, lm_head, labels = _inputs(300, 64, 500, seed=3)
    hidden, lm_head = hidden.astype(h_dtype), lm_head.astype(w_dtype)
    value, (d_h, d_w) = _objective_grads(
        chunked_cross_entropy, hidden, lm_head, labels, scale, lm_head_grad=False, **kw
    )
    old_value, (old_d_h, _) = _objective_grads(
        chunked_cross_entropy, hidden, lm_head, labels, scale, **kw
    )
    # The reference sees the operands the chunked matmuls see, computed densely in f32.
    ref_value, (ref_d_h, _) = _objective_grads(
        cross_entropy_reference,
        hidden.astype(w_dtype).astype(jnp.float32),
        lm_head.astype(jnp.float32),
        labels,
        scale,
        **kw,
    )

    assert d_h.dtype == h_dtype and d_h.shape == hidden.shape
    assert d_w.dtype == w_dtype and d_w.shape == lm_head.shape
    assert not np.any(np.asarray(d_w))
    np.testing.assert_allclose(value, old_value, rtol=1e-6)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    # f32: measured 1.5e-6 of the largest entry. bf16: 6e-3 (the old mode: 4e-3), from
    # rounding the unit-cotangent gradient to bf16 before scaling it.
    rtol = 1e-5 if w_dtype == jnp.float32 else 1e-2
    _assert_close(d_h, ref_d_h, rtol=rtol)
    _assert_close(d_h, old_d_h, rtol=rtol)
    # Positions without a target get exactly no gradient.
    assert not np.any(np.asarray(d_h, np.float32)[np.asarray(labels) == IGNORE_INDEX])


def test_batched_inputs_are_flattened():
    hidden, lm_head, labels = _inputs(96, 16, 50)
    loss = jax.jit(functools.partial(chunked_cross_entropy, chunk_size=32))
    flat = loss(hidden, lm_head, labels)
    batched = loss(hidden.reshape(4, 24, 16), lm_head, labels.reshape(4, 24))
    np.testing.assert_allclose(batched[0], flat[0], rtol=1e-6)
    assert int(batched[1]) == int(flat[1])


def test_accumulation_matches_big_batch():
    """sum of k micro-batch loss sums / total count == big-batch loss, same gradient,
    even when micro-batches have very different numbers of targets."""
    micro, tokens, dim, vocab = 4, 64, 16, 100
    x, lm_head, labels = _inputs(micro * tokens, dim, vocab, seed=1)
    rng = np.random.default_rng(2)
    proj = jnp.asarray(rng.normal(size=(dim, dim)) / np.sqrt(dim), jnp.float32)  # shared weight
    mask_rate = np.repeat([0.0, 0.5, 0.9, 0.2], tokens)
    labels = jnp.where(rng.uniform(size=micro * tokens) < mask_rate, IGNORE_INDEX, labels)

    def loss_sum(params, x, y):
        p, w = params
        return chunked_cross_entropy(x @ p, w, y, chunk_size=16)

    def big_loss(params):
        total, count = loss_sum(params, x, labels)
        return mean_loss(total, count)

    params = (proj, lm_head)
    big_value, big_grads = jax.jit(jax.value_and_grad(big_loss))(params)

    micro_step = jax.jit(jax.value_and_grad(loss_sum, has_aux=True))
    sums, counts, grads = [], [], []
    for xs, ys in zip(x.reshape(micro, tokens, dim), labels.reshape(micro, tokens), strict=True):
        (s, c), g = micro_step(params, xs, ys)
        sums.append(s), counts.append(c), grads.append(g)
    total_count = sum(counts)
    acc_value = mean_loss(sum(sums), total_count)
    acc_grads = jax.tree.map(lambda *g: sum(g) / total_count, *grads)

    np.testing.assert_allclose(acc_value, big_value, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(acc_grads), jax.tree.leaves(big_grads), strict=True):
        _assert_close(g, w, rtol=1e-5)
    # The test can tell: the mean of per-micro-batch means is a different loss.
    mean_of_means = np.mean([float(mean_loss(s, c)) for s, c in zip(sums, counts, strict=True)])
    assert abs(mean_of_means - float(big_value)) > 1e-3


def test_shift_labels():
    labels = jnp.array([[1, 2, 3, 4, 5, 6], [7, 8, IGNORE_INDEX, 9, 10, 11]])
    np.testing.assert_array_equal(
        shift_labels(labels),
        [[2, 3, 4, 5, 6, -100], [8, -100, 9, 10, 11, -100]],
    )
    # Row 0 packs documents 1 and 2 and a padding segment 0; row 1 is one document.
    segments = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(
        shift_labels(labels, segments),
        [[2, 3, -100, 5, -100, -100], [8, -100, 9, 10, 11, -100]],
    )
    assert shift_labels(labels).dtype == jnp.int32


def test_mean_loss_guards_zero_count():
    assert float(mean_loss(jnp.float32(0.0), jnp.int32(0))) == 0.0
    assert float(mean_loss(jnp.float32(6.0), jnp.int32(4))) == 1.5


def _shapes_in_jaxpr(jaxpr) -> set[tuple[int, ...]]:
    """Every value's shape in a jaxpr, including nested ones (scan bodies, custom_vjp)."""
    shapes = set()
    for eqn in jaxpr.eqns:
        shapes.update(tuple(v.aval.shape) for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    shapes |= _shapes_in_jaxpr(sub)
    return shapes


def test_never_materialises_full_logits():
    tokens, dim, vocab, chunk = 4096, 32, 2048, 256
    full_logits_bytes = tokens * vocab * 4
    args = (
        jax.ShapeDtypeStruct((tokens, dim), jnp.bfloat16),
        jax.ShapeDtypeStruct((vocab, dim), jnp.bfloat16),
        jax.ShapeDtypeStruct((tokens,), jnp.int32),
    )

    def grad_fn(fn, argnums):
        return jax.grad(lambda h, w, y: fn(h, w, y, chunk_size=chunk)[0], argnums)

    # 1. No [T, V] value anywhere in the traced forward + backward.
    shapes = _shapes_in_jaxpr(jax.make_jaxpr(grad_fn(chunked_cross_entropy, (0, 1)))(*args).jaxpr)
    assert (chunk, vocab) in shapes
    assert not any(tokens in s and vocab in s for s in shapes)

    # 2. XLA's buffer assignment agrees: temporaries are a fraction of one [T, V] f32 array,
    #    while the dense version needs more than that.
    chunked = jax.jit(grad_fn(chunked_cross_entropy, (0, 1))).lower(*args).compile()
    dense = jax.jit(grad_fn(cross_entropy_reference, (0, 1))).lower(*args).compile()
    assert chunked.memory_analysis().temp_size_in_bytes < full_logits_bytes / 4
    assert dense.memory_analysis().temp_size_in_bytes > full_logits_bytes

    # 3. With a frozen lm_head its f32 gradient accumulator is dead code, and gone.
    frozen = jax.jit(grad_fn(chunked_cross_entropy, 0)).lower(*args).compile()
    assert f"f32[{vocab},{dim}]" in chunked.as_text()
    assert f"f32[{vocab},{dim}]" not in frozen.as_text()


def _vocab_dots(jaxpr, vocab: int) -> list[tuple[int, ...]]:
    """Output shapes of the dot_generals touching a ``vocab``-sized axis, nested ones too."""
    dots = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes = [tuple(v.aval.shape) for v in (*eqn.invars, *eqn.outvars)]
            if any(vocab in s for s in shapes):
                dots.append(shapes[-1])
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    dots += _vocab_dots(sub, vocab)
    return dots


def test_frozen_head_does_not_recompute_logits():
    """With lm_head_grad=False the gradient costs 2 vocab-sized matmuls per chunk (the
    logits, and the hidden gradient in the same forward scan) instead of 3; evaluation
    still costs 1."""
    tokens, dim, vocab, chunk = 1024, 32, 2048, 256
    args = (
        jax.ShapeDtypeStruct((tokens, dim), jnp.bfloat16),
        jax.ShapeDtypeStruct((vocab, dim), jnp.bfloat16),
        jax.ShapeDtypeStruct((tokens,), jnp.int32),
    )

    def loss(lm_head_grad):
        return lambda h, w, y: chunked_cross_entropy(
            h, w, y, chunk_size=chunk, lm_head_grad=lm_head_grad
        )[0]

    def dots(fn):
        return _vocab_dots(jax.make_jaxpr(fn)(*args).jaxpr, vocab)

    logits, d_hidden, d_head = (chunk, vocab), (chunk, dim), (vocab, dim)
    # The traced jaxpr is not yet dead-code eliminated: the old mode still shows its
    # (unused) head gradient. Per scan body: logits twice, then both gradients.
    assert sorted(dots(jax.grad(loss(True)))) == sorted([logits, logits, d_hidden, d_head])
    assert sorted(dots(jax.grad(loss(False)))) == sorted([logits, d_hidden])
    assert sorted(dots(jax.grad(loss(False), (0, 1)))) == sorted([logits, d_hidden])
    # Undifferentiated, the frozen-head loss takes the primal path: no hidden gradient.
    assert dots(loss(False)) == dots(loss(True)) == [logits]

    # After XLA's dead-code elimination (CPU HLO): 3 matmuls against 2.
    def compiled_dots(lm_head_grad):
        hlo = jax.jit(jax.grad(loss(lm_head_grad))).lower(*args).compile().as_text()
        return sum(" dot(" in line for line in hlo.splitlines())

    assert compiled_dots(True) == 3
    assert compiled_dots(False) == 2
