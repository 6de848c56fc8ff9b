"""``y = x·Wᵀ + scale·(x·Aᵀ)·Bᵀ (+ bias)`` for an NF4 (QLoRA) or dense (LoRA) frozen W.

The one linear op every LoRA-targeted projection goes through. W is an
:class:`~pallas_kernels.nf4.NF4Tensor` of a Hugging Face weight ``[N=out, K=in]`` or a dense
``[N, K]`` array; A ``[r, K]`` and B ``[N, r]`` are the LoRA factors (both None: plain matmul).

Semantics (kernels and reference alike). The compute dtype is ``x.dtype``: W, A and B are cast
(NF4 decoded) to it, every dot accumulates in float32, and the rank-r intermediates ``x·Aᵀ``
and ``dy·B`` are rounded to the compute dtype, as PEFT does under autocast. The result is
``x.dtype``. The base product and the LoRA product are summed in float32 (+ bias) and rounded
once; :func:`nf4_lora_matmul_reference` and the separate-product XLA path first round each
product to the compute dtype, so that cuBLAS writes 16-bit outputs (PEFT's order too), while
the fused kernel and the grouped XLA path's folded GEMM (:func:`nf4_lora_matmul_group`,
K <= ΣN) sum them in a float32 accumulator: the two agree to one rounding of ``x.dtype``.

Gradients flow to x, A and B only: W (and bias) are frozen base parameters and get zero
cotangents. The backward, a ``jax.custom_vjp``, is ordered so that everything it keeps or
builds besides dx is rank r::

    dx = dy·W + scale·(dy·B)·A        dA = scale·(dy·B)ᵀ·x        dB = scale·dyᵀ·(x·Aᵀ)

and its residuals are x and ``x·Aᵀ`` (plus references to the inputs), never a decoded W.

Implementations (``plan_nf4_lora_matmul`` says which one a call gets, and why):

``fused`` (Pallas, on request)
    One kernel per orientation decodes W tiles in registers inside the matmul loop
    (``x·Wᵀ`` forward, ``dy·W`` backward) with the LoRA up-projection and bias in the
    epilogue. Never writes W in 16 bits; its decode work scales with M / block_m. Triton's
    lowering serialises the decode with the MMA: 26-30% of the bf16 dot at M >= 4096 and
    slower than ``xla`` at every M measured, decode-sized ones included (BENCHMARKS.md §2).
``dequant_then_dot`` (Pallas + XLA)
    A memory-bound Pallas kernel writes the 16-bit W (one layer's worth, transient; decoded
    again in the backward), then XLA's dot (cuBLAS) does the matmul.
``mosaic`` (Mosaic GPU, opt-in)
    :mod:`pallas_kernels.nf4_matmul_mgpu`: one Hopper kernel per orientation decodes W in
    registers straight into the tensor cores (``x·Wᵀ`` forward, ``dy·W`` backward, from the
    same "quad layout" of W), with the LoRA terms as extra reduction steps summed in the same
    float32 accumulator (``[x | s·xA]·[W | B]ᵀ`` forward, ``[dy | s·dyB]·[W; A]`` backward;
    bias added by XLA). On the H200 (BENCHMARKS.md §2, Llama-8B shapes, M = 4096-16384) each
    orientation runs at 86-95% of the bf16 cuBLAS dot with W already in the quad layout: 1.04-1.19x
    ``xla``'s decode-then-dot on the attention shapes (K = 4096, N = 4096 or 1024) at M = 4096,
    0.88-0.99x elsewhere (at the H200's power cap, the per-tile decode costs more energy than XLA's
    one decode pass). Given NF4Tensors it rewrites W into that layout on every call (~1.1 bytes of
    traffic per weight); that wiring measured 6.7% slower than ``xla`` end to end (Llama-8B step,
    §2), so NF4Tensors take it only on request (``config.variant="mosaic"``). Weights prepared once
    (:class:`~pallas_kernels.nf4_matmul_mgpu.MgpuNF4Weight`, stacked per group: see
    ``lorax.prepare_kernel_weights``) always run on it, under ``"auto"`` too. End to end that path
    measured 13-19% faster than the default at 512-1024 tokens per step and 4-5% at 2048, but
    1-3% slower from 4096 up, so preparing is the caller's choice (``lorax train
    --kernel-weights auto`` makes it by that rule). Needs K % 64 == 0 and bf16/f16 x.
``xla``
    The reference's jnp decode, compiled by XLA, then XLA's dot: XLA fuses the decode with
    its neighbours and schedules it among the other layer work. The default for
    training-sized M: end to end it beats ``dequant_then_dot`` by 1-6% (BENCHMARKS.md §1,
    the matmul_impl ablation), though the two are within 5% either way in isolation (§2).
``dense``
    W is already 16-bit: XLA dots (cuBLAS is the ceiling; there is nothing to fuse).
``reference``
    Plain jnp: ``dequantize_nf4`` then XLA dots (the CPU path), under the same custom VJP.

Projections that share x (the model's q/k/v and gate/up) go through
:func:`nf4_lora_matmul_group`: on ``mosaic`` one kernel call per direction for the group's
stacked weights, and on the ``xla``/``reference`` variants with NF4 weights, one
GEMM per direction for the whole group, the LoRA terms folded into dx's reduction and, where
K <= ΣN, into the forward's too (a single ``nf4_lora_matmul`` on those variants is a group of
one, so it gets the folded GEMMs too).

Selection: ``impl`` / ``interpret`` choose kernel vs reference as everywhere in
``pallas_kernels`` (see :mod:`pallas_kernels._backend`: by default the kernels on GPU, the
reference elsewhere). Among kernels, ``config.variant`` picks; ``"auto"`` (default) takes
``xla`` for an NF4Tensor at every M: on the H200 it was the fastest path for NF4Tensors from
M = 1 to 16384 (BENCHMARKS.md §2; ``dequant_then_dot`` within 10% either way, the Triton
``fused`` kernel no faster at any M and up to 5x slower). ``config.fused_max_m`` > 0 sends M
up to it to ``fused`` (``dequant_then_dot`` when K % 64 != 0: the fused kernel reads W row
by row and needs whole absmax blocks per row; the dequant kernel works on the flat element
order). Asking for ``variant="fused"`` with such a K raises. NF4 blocksizes other than 64
are served by the reference under the default selection and raise if a kernel is forced.
``config.lookup`` picks how the kernels turn a 4-bit code into its value (select tree or
table gather; see :mod:`pallas_kernels.nf4_matmul_kernels`). ``scripts/bench_nf4_matmul.py``
measures every combination, the numbers the defaults come from.

Example::

    y = nf4_lora_matmul(x, w_nf4, lora_a, lora_b, alpha / r)           # GPU: Pallas
    y = nf4_lora_matmul(x, w_nf4, lora_a, lora_b, alpha / r, impl="reference")
    plan_nf4_lora_matmul(x, w_nf4).reason   # e.g. "default on GPU: compiled kernel; ..."
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.linalg import block_diag

from pallas_kernels import _backend
from pallas_kernels import nf4_matmul_kernels as _k
from pallas_kernels import nf4_matmul_mgpu as _mgpu
from pallas_kernels.nf4 import (
    NF4Tensor,
    dequantize_absmax,
    dequantize_nf4,
    dequantize_nf4_rows,
)
from pallas_kernels.nf4_matmul_kernels import NF4MatmulConfig
from pallas_kernels.nf4_matmul_mgpu import MgpuNF4Weight

Array = jax.Array

__all__ = [
    "NF4MatmulConfig",
    "NF4MatmulPlan",
    "nf4_dequantize",
    "nf4_lora_matmul",
    "nf4_lora_matmul_group",
    "nf4_lora_matmul_reference",
    "plan_nf4_lora_matmul",
]

_NT = (((1,), (1,)), ((), ()))  # a[m, k] · b[n, k]ᵀ
_NN = (((1,), (0,)), ((), ()))  # a[m, k] · b[k, n]
_TN = (((0,), (0,)), ((), ()))  # a[k, m]ᵀ · b[k, n]

VARIANTS = ("reference", "dense", "fused", "dequant_then_dot", "xla", "mosaic")
# The variants that hand an NF4 W to XLA's dot after a jnp decode: these run as one GEMM per
# group of projections sharing x (see nf4_lora_matmul_group).
_GROUPED_VARIANTS = ("xla", "reference")


@dataclasses.dataclass(frozen=True)
class NF4MatmulPlan:
    """The implementation a call runs: ``variant`` (one of :data:`VARIANTS`), whether the
    kernels run in interpret mode, a human-readable ``reason``, and the config used."""

    variant: str
    interpret: bool
    reason: str
    config: NF4MatmulConfig


def _weight_shape(w: Any) -> tuple[int, int]:
    if isinstance(w, MgpuNF4Weight):
        if w.quads.ndim != 2:
            raise ValueError(
                f"nf4_lora_matmul takes one layer's MgpuNF4Weight; got quads {w.quads.shape}. "
                "Index the stacked layer axis first (lax.scan does)."
            )
        return w.shape
    if isinstance(w, NF4Tensor):
        if len(w.shape) != 2:
            raise ValueError(f"NF4 weight must be 2-D [N, K]; got shape {w.shape}")
        if w.packed.ndim != 1:
            raise ValueError(
                f"nf4_lora_matmul takes one layer's NF4Tensor (packed rank 1); got packed "
                f"{w.packed.shape}. Index the stacked layer axis first (lax.scan does)."
            )
        return w.shape[0], w.shape[1]
    if getattr(w, "ndim", None) != 2:
        raise ValueError(
            f"w must be an NF4Tensor or a 2-D [N, K] array; got {type(w).__name__}"
            f" of shape {getattr(w, 'shape', None)}"
        )
    return w.shape[0], w.shape[1]


def _check_args(x: Any, w: Any, a: Any, b: Any, bias: Any) -> tuple[int, int]:
    return _check_factors(x, *_weight_shape(w), a, b, bias)


def _check_factors(x: Any, n: int, k: int, a: Any, b: Any, bias: Any) -> tuple[int, int]:
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"x {x.shape} must end in K={k} (w is [N, K] = [{n}, {k}])")
    if (a is None) != (b is None):
        raise ValueError("pass both LoRA factors a and b, or neither")
    if a is not None:
        if a.ndim != 2 or a.shape[1] != k:
            raise ValueError(f"a must be [r, K={k}]; got {a.shape}")
        if b.shape != (n, a.shape[0]):
            raise ValueError(f"b must be [N={n}, r={a.shape[0]}]; got {b.shape}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [N={n}]; got {bias.shape}")
    return n, k


def plan_nf4_lora_matmul(
    x: Any,
    w: Any,
    *,
    impl: str | None = None,
    interpret: bool | None = None,
    config: NF4MatmulConfig | None = None,
) -> NF4MatmulPlan:
    """Which implementation ``nf4_lora_matmul(x, w, ..., impl=, interpret=, config=)`` runs.

    ``x`` may be an array or anything with a ``shape`` (e.g. ``jax.ShapeDtypeStruct``). Pure
    function of shapes, arguments and platform; raises the same errors the call would.
    """
    config = NF4MatmulConfig() if config is None else config
    n, k = _weight_shape(w)
    choice = _backend.choose(impl, interpret)
    if not choice.use_kernel:
        return NF4MatmulPlan("reference", False, choice.reason, config)
    if isinstance(w, MgpuNF4Weight):
        if config.variant not in ("auto", "mosaic"):
            raise ValueError(
                f"a prepared MgpuNF4Weight runs on variant 'mosaic' (or the reference), not "
                f"{config.variant!r}"
            )
        _mgpu.check_supported(x, w, _mgpu.MgpuNF4Config())
        return NF4MatmulPlan(
            "mosaic", choice.interpret, f"{choice.reason}; W prepared in the quad layout", config
        )
    if not isinstance(w, NF4Tensor):
        return NF4MatmulPlan("dense", False, "dense W: XLA dot (cuBLAS); no decode to fuse", config)
    forced = impl is not None or interpret is not None
    if w.blocksize != _k.QBLOCK:
        why = f"NF4 blocksize {w.blocksize} (the kernels handle {_k.QBLOCK})"
        if forced or config.variant != "auto":
            raise ValueError(f"no Pallas NF4 kernel for {why}; use impl='reference'")
        return NF4MatmulPlan("reference", False, f"{why}: reference", config)
    m = 1
    for d in x.shape[:-1]:
        m *= int(d)
    fused_ok = k % _k.QBLOCK == 0
    where = f"{choice.reason}; W [N, K] = [{n}, {k}], M = {m}"
    if config.variant == "fused":
        if not fused_ok:
            raise ValueError(
                f"variant='fused' needs K % {_k.QBLOCK} == 0 (whole absmax blocks per row of "
                f"W); W has shape [N, K] = [{n}, {k}]. Use variant='dequant_then_dot' or 'auto'."
            )
        return NF4MatmulPlan("fused", choice.interpret, f"{where}: variant='fused'", config)
    if config.variant == "mosaic":
        # Raises the kernel's own error (K % 64, dtype, shared memory) before tracing it.
        _mgpu.check_supported(x, w, _mgpu.MgpuNF4Config())
        return NF4MatmulPlan("mosaic", choice.interpret, f"{where}: variant='mosaic'", config)
    if config.variant in ("dequant_then_dot", "xla"):
        return NF4MatmulPlan(
            config.variant, choice.interpret, f"{where}: variant={config.variant!r}", config
        )
    if m > config.fused_max_m:
        return NF4MatmulPlan(
            "xla",
            choice.interpret,
            f"{where}: M > fused_max_m={config.fused_max_m}: XLA decode + dot (fastest end "
            "to end, BENCHMARKS.md §1)",
            config,
        )
    if not fused_ok:
        return NF4MatmulPlan(
            "dequant_then_dot",
            choice.interpret,
            f"{where}: K % {_k.QBLOCK} != 0, absmax blocks straddle rows, so not fused",
            config,
        )
    return NF4MatmulPlan(
        "fused", choice.interpret, f"{where}: M <= fused_max_m={config.fused_max_m}", config
    )


def nf4_lora_matmul(
    x: Array,
    w: NF4Tensor | Array,
    a: Array | None = None,
    b: Array | None = None,
    scale: float = 1.0,
    *,
    bias: Array | None = None,
    interpret: bool | None = None,
    impl: str | None = None,
    config: NF4MatmulConfig | None = None,
) -> Array:
    """``x·Wᵀ + scale·(x·Aᵀ)·Bᵀ (+ bias)`` in ``x.dtype`` with float32 accumulation.

    Args:
      x: ``[..., K]`` activations; leading dims are flattened into M rows.
      w: NF4Tensor of a ``[N, K]`` weight (one layer: packed of rank 1), or a dense ``[N, K]``.
      a, b: LoRA ``A [r, K]`` and ``B [N, r]``, or both None for a plain matmul.
      scale: LoRA scaling (alpha / r), a Python number (static).
      bias: optional ``[N]`` added in float32 before the final cast (frozen: no gradient).
      interpret, impl: kernel vs reference, see :mod:`pallas_kernels._backend`.
      config: variant and tile sizes (:class:`NF4MatmulConfig`).

    Returns:
      ``[..., N]`` in ``x.dtype``. Differentiable in x, a and b (custom VJP); W and bias get
      zero cotangents.
    """
    n, k = _check_args(x, w, a, b, bias)
    plan = plan_nf4_lora_matmul(x, w, impl=impl, interpret=interpret, config=config)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return jnp.zeros((*lead, n), x.dtype)
    if isinstance(w, NF4Tensor) and plan.variant in _GROUPED_VARIANTS:
        # A group of one: the same XLA dots, with the LoRA term folded into dx's GEMM.
        (y,) = _group_matmul(float(scale), x2, (w,), (a,), (b,), (bias,))
    elif plan.variant == "mosaic":  # A group of one: the LoRA term in the kernel's reduction.
        if isinstance(w, NF4Tensor):  # rewritten on every call: prepare once to avoid it
            w = _mgpu.prepare_weight(w, x.dtype)
        (y,) = _mosaic_group(float(scale), plan.interpret, x2, w, (a,), (b,), (bias,))
    else:
        y = _lora_matmul(plan, float(scale) if a is not None else 0.0, x2, w, a, b, bias)
    return y.reshape(*lead, n)


def nf4_lora_matmul_group(
    x: Array,
    weights: Sequence[NF4Tensor | Array],
    adapters: Sequence[tuple[Array, Array] | None],
    scale: float = 1.0,
    *,
    biases: Sequence[Array | None] | None = None,
    interpret: bool | None = None,
    impl: str | None = None,
    config: NF4MatmulConfig | None = None,
) -> tuple[Array, ...]:
    """Several projections of the same x (q/k/v, gate/up): one :func:`nf4_lora_matmul` each.

    Same semantics as calling :func:`nf4_lora_matmul` per member with ``adapters[i] = (A, B)``
    or None and ``biases[i]``. Why a group: on the training-sized path (``xla``/``reference``
    variants, NF4 weights) each separate projection reads x again for its base and LoRA
    products, and its backward writes a ``[M, K]`` LoRA term ``(dy·B)·A`` and adds it to dx.
    The group instead decodes its weights as one ``[ΣN, K]`` operand (the members' 4-bit bytes
    are stacked, not their 16-bit values: :func:`~pallas_kernels.nf4.dequantize_nf4_rows`)
    and runs, with ``xa = x·[A_1; ..; A_n]ᵀ`` (rank Σr) and ``B_blk`` the block-diagonal
    ``[ΣN, Σr]`` of the members' B,

        forward   [y_1 .. y_n] = [x | s·xa]·[W_1; ..; W_n | B_blk]ᵀ          (K <= ΣN)
                  [y_1 .. y_n] = x·[W_1; ..; W_n]ᵀ + s·xa_i·B_iᵀ per member  (K > ΣN)
        backward  dx = [dy_1 .. dy_n | s·dy_1·B_1 .. s·dy_n·B_n]·[W_1; ..; W_n; A_1; ..; A_n]
                  [dA_1; ..; dA_n] = s·[dy_1·B_1 .. dy_n·B_n]ᵀ·x

    so x is read once per direction and the LoRA terms ride in the large GEMMs' reductions
    (summed in float32 before a single rounding, where separate projections round each term;
    the forward folds only where copying x into the wider operand costs less than writing
    and re-reading the ``[M, ΣN]`` rank-r product, see :func:`_fold_lora_forward`). ``xa``
    stays a separate dot, saved for the backward, which never recomputes the large GEMM. A
    group of one still gets the folded GEMMs. Dense weights (a concatenation would copy them
    every step) and the Pallas variants (small M) run member by member.

    ``weights`` may also be one :class:`~pallas_kernels.nf4_matmul_mgpu.MgpuNF4Weight` that
    stacks the members (``stack_prepared``; ``lorax.prepare_kernel_weights`` builds them per
    layer): one Mosaic GPU kernel call per direction computes both equations above, the
    LoRA terms in the kernel's reduction (the jnp reference, member by member, off the GPU).
    NF4 weights on ``variant="mosaic"`` are stacked so on every call.
    """
    if isinstance(weights, MgpuNF4Weight):
        return _prepared_group(x, weights, adapters, scale, biases, interpret, impl, config)
    if not weights:
        raise ValueError("nf4_lora_matmul_group needs at least one weight")
    biases = (None,) * len(weights) if biases is None else tuple(biases)
    if not len(weights) == len(adapters) == len(biases):
        raise ValueError(
            f"weights, adapters and biases must pair up; got {len(weights)}, {len(adapters)}"
            f" and {len(biases)}"
        )
    shapes = []
    for w, ab, bias in zip(weights, adapters, biases, strict=True):
        a, b = (None, None) if ab is None else ab
        shapes.append(_check_args(x, w, a, b, bias))
    plans = [
        plan_nf4_lora_matmul(x, w, impl=impl, interpret=interpret, config=config) for w in weights
    ]
    if all(
        isinstance(w, NF4Tensor) and p.variant == "mosaic"
        for w, p in zip(weights, plans, strict=True)
    ):
        # Rewritten into the quad layout on every call; lorax.prepare_kernel_weights does it
        # once for a model.
        stack = _mgpu.stack_prepared([_mgpu.prepare_weight(w, x.dtype) for w in weights])
        return _prepared_group(x, stack, adapters, scale, biases, interpret, impl, config)
    grouped = all(
        isinstance(w, NF4Tensor) and p.variant in _GROUPED_VARIANTS
        for w, p in zip(weights, plans, strict=True)
    )
    if not grouped:
        return tuple(
            nf4_lora_matmul(
                x,
                w,
                *((None, None) if ab is None else ab),
                scale,
                bias=bias,
                interpret=interpret,
                impl=impl,
                config=config,
            )  # fmt: skip
            for w, ab, bias in zip(weights, adapters, biases, strict=True)
        )
    lead = x.shape[:-1]
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return tuple(jnp.zeros((*lead, n), x.dtype) for n, _ in shapes)
    a_s = tuple(None if ab is None else ab[0] for ab in adapters)
    b_s = tuple(None if ab is None else ab[1] for ab in adapters)
    ys = _group_matmul(float(scale), x2, tuple(weights), a_s, b_s, biases)
    return tuple(y.reshape(*lead, n) for y, (n, _) in zip(ys, shapes, strict=True))


def _prepared_group(
    x: Array,
    w: MgpuNF4Weight,
    adapters: Sequence[tuple[Array, Array] | None],
    scale: float,
    biases: Sequence[Array | None] | None,
    interpret: bool | None,
    impl: str | None,
    config: NF4MatmulConfig | None,
) -> tuple[Array, ...]:
    """:func:`nf4_lora_matmul_group` for weights stacked in the quad layout (``w.members``)."""
    count = len(w.members)
    biases = (None,) * count if biases is None else tuple(biases)
    if not count == len(adapters) == len(biases):
        raise ValueError(
            f"the prepared weight stacks {count} members; got {len(adapters)} adapters and "
            f"{len(biases)} biases"
        )
    k = w.shape[1]
    for (_, n), ab, bias in zip(w.members, adapters, biases, strict=True):
        _check_factors(x, n, k, *((None, None) if ab is None else ab), bias)
    plan = plan_nf4_lora_matmul(x, w, impl=impl, interpret=interpret, config=config)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    a_s = tuple(None if ab is None else ab[0] for ab in adapters)
    b_s = tuple(None if ab is None else ab[1] for ab in adapters)
    if x2.shape[0] == 0:
        ys = tuple(jnp.zeros((0, n), x.dtype) for _, n in w.members)
    elif plan.variant == "mosaic":
        ys = _mosaic_group(float(scale), plan.interpret, x2, w, a_s, b_s, biases)
    else:  # The reference, member by member on the weights the kernel decodes.
        dense = _mgpu.dequantize_prepared(w)
        ys = tuple(
            _lora_matmul(plan, float(scale) if a is not None else 0.0, x2,
                         dense[offset : offset + n], a, b, bias)
            for (offset, n), a, b, bias in zip(w.members, a_s, b_s, biases, strict=True)
        )  # fmt: skip
    return tuple(y.reshape(*lead, y.shape[-1]) for y in ys)


def nf4_lora_matmul_reference(
    x: Array,
    w: NF4Tensor | Array,
    a: Array | None = None,
    b: Array | None = None,
    scale: float = 1.0,
    *,
    bias: Array | None = None,
    interpret: bool | None = None,
    impl: str | None = None,
    config: NF4MatmulConfig | None = None,
) -> Array:
    """The definition of :func:`nf4_lora_matmul` in plain jnp (gradients by autodiff).

    Same signature; ``interpret``, ``impl`` and ``config`` are accepted and ignored. W passes
    through ``stop_gradient`` so a dense W gets a zero gradient, as in the op. This is what
    the tests compare against; unlike the op, autodiff keeps the decoded W as a residual.
    """
    del interpret, impl, config
    _check_args(x, w, a, b, bias)
    cd = x.dtype
    w = jax.tree.map(lax.stop_gradient, w)
    wd = dequantize_nf4(w, cd) if isinstance(w, NF4Tensor) else w.astype(cd)
    y = jnp.einsum("...k,nk->...n", x, wd, preferred_element_type=cd).astype(jnp.float32)
    if a is not None:
        xa = jnp.einsum("...k,rk->...r", x, a.astype(cd), preferred_element_type=jnp.float32)
        lora = jnp.einsum("...r,nr->...n", xa.astype(cd), b.astype(cd), preferred_element_type=cd)
        y = y + scale * lora.astype(jnp.float32)
    if bias is not None:
        y = y + lax.stop_gradient(bias).astype(jnp.float32)
    return y.astype(cd)


def nf4_dequantize(
    w: NF4Tensor,
    dtype: Any = None,
    *,
    interpret: bool | None = None,
    impl: str | None = None,
    config: NF4MatmulConfig | None = None,
) -> Array:
    """Decodes an NF4Tensor to a dense ``(*w.batch_shape, *w.shape)`` array.

    The decode half of ``dequant_then_dot`` as a standalone op (kernel/reference selection as
    in :func:`nf4_lora_matmul`); bit-identical to ``dequantize_nf4``. Stacked (e.g. per-layer)
    tensors go through the kernel in one launch when a matrix is a whole number of absmax
    blocks, since their flat layouts then concatenate; otherwise, and for blocksizes other
    than 64, the reference runs (or, if a kernel was forced, ``ValueError``).
    """
    dtype = w.dtype if dtype is None else dtype
    choice = _backend.choose(impl, interpret)
    batch = tuple(w.packed.shape[:-1])
    numel = 1
    for d in w.shape:
        numel *= int(d)
    why = None
    if w.blocksize != _k.QBLOCK:
        why = f"blocksize {w.blocksize} (the kernel handles {_k.QBLOCK})"
    elif batch and numel % _k.QBLOCK:
        why = f"stacked matrices of {numel} elements (not a multiple of {_k.QBLOCK})"
    if not choice.use_kernel or why is not None:
        if choice.use_kernel and (impl is not None or interpret is not None):
            raise ValueError(f"no Pallas NF4 decode for {why}; use impl='reference'")
        return dequantize_nf4(w, dtype)
    config = NF4MatmulConfig() if config is None else config
    if not batch:
        return _decode_kernel(w, dtype, config, choice.interpret)
    count = numel
    for d in batch:
        count *= int(d)
    flat = _k.dequantize_pallas(
        w.packed.reshape(-1),
        _absmax_f32(w).reshape(-1),  # per-layer offsets: decoded here, not in the kernel
        (count,),
        dtype,
        config=config,
        interpret=choice.interpret,
    )
    return flat.reshape(*batch, *w.shape)


# --------------------------------------------------------------------------------------
# The custom VJP
# --------------------------------------------------------------------------------------


def _dot(lhs: Array, rhs: Array, dims: Any) -> Array:
    return lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32)


def _xla_linear(
    lhs: Array,
    w: Array,
    low: Array | None,
    low_w: Array | None,
    dims: Any,
    scale: float,
    bias: Array | None,
) -> Array:
    """``lhs·W + scale·low·low_w (+ bias)`` with XLA dots, in ``lhs.dtype``."""
    y = lax.dot_general(lhs, w, dims, preferred_element_type=lhs.dtype)
    return _add_low_rank(y, low, low_w, dims, scale, bias)


def _add_low_rank(
    y: Array, low: Array | None, low_w: Array | None, dims: Any, scale: float, bias: Array | None
) -> Array:
    """``y + scale·low·low_w (+ bias)`` for a base product ``y`` already in the compute dtype.

    The LoRA product accumulates in float32 and is written in the compute dtype (so cuBLAS
    writes 16-bit outputs), then the two are summed in float32 and rounded once more: PEFT's
    order (it adds the base layer's and the adapter's 16-bit outputs), and half the memory
    traffic of float32 partial products on this elementwise pass, which XLA may also fold
    into the GEMM as its ``beta·C`` input.
    """
    cd = y.dtype
    if low is None and bias is None:
        return y
    y = y.astype(jnp.float32)
    if low is not None:
        y = y + scale * lax.dot_general(low, low_w, dims, preferred_element_type=cd).astype(
            jnp.float32
        )
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(cd)


def _absmax_f32(w: NF4Tensor) -> Array:
    """Per-block float32 scales; decodes double quantization (a small XLA fusion)."""
    if w.nested_absmax is None:
        return w.absmax.astype(jnp.float32)
    return dequantize_absmax(w).astype(jnp.float32)


def _rows(w: NF4Tensor) -> tuple[Array, Array]:
    """W's bytes and scales viewed row by row: ``[N, K/2]`` uint8, ``[N, K/64]`` f32."""
    n, k = w.shape
    return w.packed.reshape(n, k // 2), _absmax_f32(w).reshape(n, k // _k.QBLOCK)


def _decode_kernel(w: NF4Tensor, dtype: Any, config: NF4MatmulConfig, interpret: bool) -> Array:
    """One layer's W decoded by the Pallas kernel (absmax decoded where ``config`` says)."""
    if config.absmax_decode == "kernel" and w.nested_absmax is not None:
        return _k.dequantize_pallas(
            w.packed, w.absmax, tuple(w.shape), dtype, config=config, interpret=interpret,
            nested=(w.nested_absmax, w.offset, w.nested_blocksize),
        )  # fmt: skip
    return _k.dequantize_pallas(
        w.packed, _absmax_f32(w), tuple(w.shape), dtype, config=config, interpret=interpret
    )


def _dense_weight(plan: NF4MatmulPlan, w: Any, dtype: Any) -> Array:
    """W in the compute dtype for the variants that hand a dense W to XLA's dot."""
    if isinstance(w, MgpuNF4Weight):
        return _mgpu.dequantize_prepared(w).astype(dtype)
    if not isinstance(w, NF4Tensor):
        return w.astype(dtype)
    if plan.variant == "dequant_then_dot":
        return _decode_kernel(w, dtype, plan.config, plan.interpret)
    return dequantize_nf4(w, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _lora_matmul(
    plan: NF4MatmulPlan,
    scale: float,
    x: Array,
    w: Any,
    a: Array | None,
    b: Array | None,
    bias: Array | None,
) -> Array:
    return _lora_matmul_fwd(plan, scale, x, w, a, b, bias)[0]


def _lora_matmul_fwd(
    plan: NF4MatmulPlan,
    scale: float,
    x: Array,
    w: Any,
    a: Array | None,
    b: Array | None,
    bias: Array | None,
) -> tuple[Array, tuple[Any, ...]]:
    cd = x.dtype
    xa = None if a is None else _dot(x, a.astype(cd), _NT).astype(cd)
    b_cd = None if b is None else b.astype(cd)
    if plan.variant == "fused":
        packed, absmax = _rows(w)
        y = _k.fused_matmul_nt(
            x, packed, absmax, xa, b_cd, bias,
            scale=scale, config=plan.config, interpret=plan.interpret,
        )  # fmt: skip
    else:
        y = _xla_linear(x, _dense_weight(plan, w, cd), xa, b_cd, _NT, scale, bias)
    return y, (x, xa, w, a, b)


def _lora_matmul_bwd(
    plan: NF4MatmulPlan, scale: float, res: tuple[Any, ...], dy: Array
) -> tuple[Any, ...]:
    x, xa, w, a, b = res
    cd = x.dtype
    dy = dy.astype(cd)
    a_cd = None if a is None else a.astype(cd)
    dyb = None if b is None else _dot(dy, b.astype(cd), _NN).astype(cd)  # [M, r]
    if plan.variant == "fused":
        packed, absmax = _rows(w)
        dx = _k.fused_matmul_nn(
            dy, packed, absmax, dyb, a_cd,
            scale=scale, config=plan.config, interpret=plan.interpret,
        )  # fmt: skip
    else:
        dx = _xla_linear(dy, _dense_weight(plan, w, cd), dyb, a_cd, _NN, scale, None)
    da = db = None
    if a is not None:
        da = (scale * _dot(dyb, x, _TN)).astype(a.dtype)  # [r, K]
        db = (scale * _dot(dy, xa, _TN)).astype(b.dtype)  # [N, r]
    return dx, None, da, db, None


_lora_matmul.defvjp(_lora_matmul_fwd, _lora_matmul_bwd)


# --------------------------------------------------------------------------------------
# The grouped custom VJP (NF4 weights on XLA dots)
# --------------------------------------------------------------------------------------


def _split(y: Array, sizes: Sequence[int]) -> list[Array]:
    """Column blocks of ``y [M, Σ sizes]``."""
    out, start = [], 0
    for size in sizes:
        out.append(y[:, start : start + size])
        start += size
    return out


def _concat(parts: Sequence[Array], axis: int) -> Array:
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def _fold_lora_forward(k: int, n_total: int) -> bool:
    """Whether the forward folds the LoRA up-projections into the base GEMM.

    Folded, ``y = [x | s·xA] · [W | B]ᵀ`` is one GEMM whose float32 accumulator sums both
    terms: the rank-r product is never written as its own ``[M, ΣN]`` array and read back
    (2·M·ΣN·2 bytes), at the price of copying x into the wider operand (2·M·K·2 bytes). So
    fold when K <= ΣN: q/k/v, o and gate/up of every Llama-shaped model, not down (K is the
    intermediate width). With the stacked decode it made a Llama-3.1-8B QLoRA step at 1x8192
    1.2% faster on an H200 (BENCHMARKS.md §1); down was not measured folded.
    """
    return k <= n_total


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _group_matmul(
    scale: float,
    x: Array,
    ws: tuple[NF4Tensor, ...],
    a_s: tuple[Array | None, ...],
    b_s: tuple[Array | None, ...],
    biases: tuple[Array | None, ...],
) -> tuple[Array, ...]:
    return _group_matmul_fwd(scale, x, ws, a_s, b_s, biases)[0]


def _group_matmul_fwd(
    scale: float,
    x: Array,
    ws: tuple[NF4Tensor, ...],
    a_s: tuple[Array | None, ...],
    b_s: tuple[Array | None, ...],
    biases: tuple[Array | None, ...],
) -> tuple[tuple[Array, ...], tuple[Any, ...]]:
    cd = x.dtype
    sizes = [w.shape[0] for w in ws]
    members = [i for i, a in enumerate(a_s) if a is not None]
    xa_all = None
    if members:
        xa_all = _dot(x, _concat([a_s[i].astype(cd) for i in members], 0), _NT).astype(cd)
    if members and _fold_lora_forward(x.shape[1], sum(sizes)):
        # [W | B_blk]: member i's B in the columns of its own rank block (a member without
        # LoRA contributes zero-width columns, i.e. zero rows of B_blk).
        b_blk = block_diag(
            *(
                jnp.zeros((n, 0), cd) if b is None else b.astype(cd)
                for n, b in zip(sizes, b_s, strict=True)
            )
        )
        lhs = _concat([x, (scale * xa_all.astype(jnp.float32)).astype(cd)], 1)
        rhs = _concat([dequantize_nf4_rows(ws, cd), b_blk], 1)
        ys = _split(lax.dot_general(lhs, rhs, _NT, preferred_element_type=cd), sizes)
    else:
        base = lax.dot_general(x, dequantize_nf4_rows(ws, cd), _NT, preferred_element_type=cd)
        lows = iter(_split(xa_all, [a_s[i].shape[0] for i in members]) if members else ())
        ys = []
        for y, b in zip(_split(base, sizes), b_s, strict=True):
            if b is not None:  # PEFT's order: the base and LoRA outputs each in 16 bits
                low = _dot(next(lows), b.astype(cd), _NT).astype(cd).astype(jnp.float32)
                y = y.astype(jnp.float32) + scale * low
            ys.append(y)
    ys = [
        (y if bias is None else y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(cd)
        for y, bias in zip(ys, biases, strict=True)
    ]
    return tuple(ys), (x, xa_all, ws, a_s, b_s)


def _group_matmul_bwd(
    scale: float, res: tuple[Any, ...], dys: tuple[Array, ...]
) -> tuple[Any, ...]:
    x, xa_all, ws, a_s, b_s = res
    cd = x.dtype
    dys = [dy.astype(cd) for dy in dys]
    members = [i for i, a in enumerate(a_s) if a is not None]
    dyb = {i: _dot(dys[i], b_s[i].astype(cd), _NN).astype(cd) for i in members}  # [M, r]
    lhs = _concat([*dys, *((scale * dyb[i]).astype(cd) for i in members)], axis=1)
    rhs = _concat([dequantize_nf4_rows(ws, cd), *(a_s[i].astype(cd) for i in members)], axis=0)
    dx = lax.dot_general(lhs, rhs, _NN, preferred_element_type=cd)
    da, db = _factor_grads(scale, x, xa_all, dys, dyb, a_s, b_s)
    return dx, tuple(None for _ in ws), da, db, tuple(None for _ in ws)


def _factor_grads(
    scale: float,
    x: Array,
    xa_all: Array | None,
    dys: Sequence[Array],
    dyb: dict[int, Array],
    a_s: tuple[Array | None, ...],
    b_s: tuple[Array | None, ...],
) -> tuple[tuple[Array | None, ...], tuple[Array | None, ...]]:
    """The members' ``dA = s·(dy·B)ᵀ·x`` (one ``[Σr, K]`` dot for the group) and ``dB =
    s·dyᵀ·(x·Aᵀ)``, from ``dyb[i] = dy_i·B_i`` and the saved ``xa_all``."""
    members = [i for i, a in enumerate(a_s) if a is not None]
    da: list[Array | None] = [None] * len(a_s)
    db: list[Array | None] = [None] * len(a_s)
    if members:
        da_all = scale * _dot(_concat([dyb[i] for i in members], 1), x, _TN)  # [Σr, K]
        xa = iter(_split(xa_all, [a_s[i].shape[0] for i in members]))
        start = 0
        for i in members:
            r = a_s[i].shape[0]
            da[i] = da_all[start : start + r].astype(a_s[i].dtype)
            db[i] = (scale * _dot(dys[i], next(xa), _TN)).astype(b_s[i].dtype)  # [N, r]
            start += r
    return tuple(da), tuple(db)


_group_matmul.defvjp(_group_matmul_fwd, _group_matmul_bwd)


# --------------------------------------------------------------------------------------
# The grouped custom VJP on the quad-layout Mosaic GPU kernel (prepared weights)
# --------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _mosaic_group(
    scale: float,
    interpret: bool,
    x: Array,
    w: MgpuNF4Weight,
    a_s: tuple[Array | None, ...],
    b_s: tuple[Array | None, ...],
    biases: tuple[Array | None, ...],
) -> tuple[Array, ...]:
    return _mosaic_group_fwd(scale, interpret, x, w, a_s, b_s, biases)[0]


def _mosaic_group_fwd(
    scale: float,
    interpret: bool,
    x: Array,
    w: MgpuNF4Weight,
    a_s: tuple[Array | None, ...],
    b_s: tuple[Array | None, ...],
    biases: tuple[Array | None, ...],
) -> tuple[tuple[Array, ...], tuple[Any, ...]]:
    """``[y_1 .. y_n] = x·Wᵀ + (s·xa)·B_stackᵀ``: one kernel call, the LoRA up-projections as
    the kernel's low-rank term, i.e. in the same float32 accumulator as the base product."""
    cd = x.dtype
    members = [i for i, a in enumerate(a_s) if a is not None]
    xa_all = low_rank = None
    if members:
        xa_all = _dot(x, _concat([a_s[i].astype(cd) for i in members], 0), _NT).astype(cd)
        # B_stack [N, Σr]: member i's B in its own rows and rank columns, zeros elsewhere.
        b_stack = jnp.zeros((w.shape[0], xa_all.shape[1]), cd)
        col = 0
        for i in members:
            offset, n = w.members[i]
            b_stack = b_stack.at[offset : offset + n, col : col + b_s[i].shape[1]].set(
                b_s[i].astype(cd)
            )
            col += b_s[i].shape[1]
        low_rank = ((scale * xa_all.astype(jnp.float32)).astype(cd), b_stack)
    params = _backend.mosaic_interpret_params(interpret)
    y = _mgpu.nf4_matmul_mgpu(x, w, low_rank=low_rank, interpret=params)
    ys = []
    for (offset, n), bias in zip(w.members, biases, strict=True):
        y_i = y[:, offset : offset + n]
        if bias is not None:
            y_i = (y_i.astype(jnp.float32) + bias.astype(jnp.float32)).astype(cd)
        ys.append(y_i)
    return tuple(ys), (x, xa_all, w, a_s, b_s)


def _mosaic_group_bwd(
    scale: float, interpret: bool, res: tuple[Any, ...], dys: tuple[Array, ...]
) -> tuple[Any, ...]:
    """``dx = dy_stack·W + (s·[dy_i·B_i])·[A_i]``: one kernel call with the LoRA terms as its
    low-rank term; ``dA``, ``dB`` as on the XLA path."""
    x, xa_all, w, a_s, b_s = res
    cd = x.dtype
    dys = [dy.astype(cd) for dy in dys]
    pieces, end = [], 0
    for (offset, n), dy in zip(w.members, dys, strict=True):
        if offset > end:  # the rows between members (zeros in W too)
            pieces.append(jnp.zeros((dy.shape[0], offset - end), cd))
        pieces.append(dy)
        end = offset + n
    members = [i for i, a in enumerate(a_s) if a is not None]
    dyb = {i: _dot(dys[i], b_s[i].astype(cd), _NN).astype(cd) for i in members}  # [M, r]
    low_rank = None
    if members:
        u = (scale * _concat([dyb[i] for i in members], 1).astype(jnp.float32)).astype(cd)
        low_rank = (u, _concat([a_s[i].astype(cd) for i in members], 0).T)
    params = _backend.mosaic_interpret_params(interpret)
    dx = _mgpu.nf4_matmul_t_mgpu(_concat(pieces, 1), w, low_rank=low_rank, interpret=params)
    da, db = _factor_grads(scale, x, xa_all, dys, dyb, a_s, b_s)
    return dx, None, da, db, tuple(None for _ in a_s)


_mosaic_group.defvjp(_mosaic_group_fwd, _mosaic_group_bwd)
