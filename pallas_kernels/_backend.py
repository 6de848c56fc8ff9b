"""Kernel-vs-reference selection and GPU-backend plumbing shared by every Pallas kernel.

Every op in ``pallas_kernels`` has a Pallas kernel and a plain-jnp reference with the same
signature. Two keyword arguments pick between them, with the same meaning everywhere:

``impl``
    ``None`` (default): the kernel where it can compile (a GPU), the reference elsewhere.
    ``"pallas"``: always the kernel. On a machine with no GPU that means interpret mode,
    the only way Pallas runs there (slow; for tests and debugging).
    ``"reference"``: always the plain-jnp reference (XLA), e.g. to rule a kernel out when
    chasing a numerical difference, or on a platform the kernels do not support.

``interpret``
    ``None`` (default): compile the kernel on GPU (see ``impl``).
    ``True``: run the kernel in Pallas interpret mode (CPU tests). Implies the kernel.
    ``False``: compile the kernel even off-GPU (fails there: useful to assert no fallback).

The decision is made at trace time from ``jax.default_backend()``; it is a pure function of
the arguments and the platform, with no module-level switches, so two calls with the same
arguments always pick the same path and ``jit`` caches stay valid.

GPU backend. Pallas lowers a ``pl.pallas_call`` on GPU either through Mosaic GPU (the
default in both 0.10.2 and 0.11.x, via ``jax_pallas_use_mosaic_gpu``) or through Triton
(still present, deprecated in 0.11). The backend is chosen by the type of ``compiler_params``:
passing ``jax.experimental.pallas.triton.CompilerParams`` selects Triton in every version we
support (0.10.2 and 0.11.x), whatever ``jax_pallas_use_mosaic_gpu`` says. Our kernels are
written in the "blocked tensor" style (``jnp.dot`` on loaded tiles, ``jnp.stack`` to
interleave nibbles), which only the Triton lowering implements; Mosaic GPU's ``pallas_call``
lowering has no ``dot_general`` (matmuls there go through ``plgpu.wgmma`` on shared-memory
refs) and no ``stack``/``concatenate``. So :func:`triton_compiler_params` is what every kernel
here passes; jax 0.11 emits a ``DeprecationWarning`` ("jax-pallas-triton") when it lowers one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax

__all__ = [
    "IMPLS",
    "Impl",
    "KernelChoice",
    "choose",
    "mosaic_interpret_params",
    "on_gpu",
    "triton_available",
    "triton_compiler_params",
    "triton_custom_call_target",
]

Impl = Literal["pallas", "reference"]
IMPLS: tuple[str, ...] = ("pallas", "reference")


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """What :func:`choose` decided: run the kernel (compiled or interpreted) or the reference."""

    use_kernel: bool
    interpret: bool
    reason: str


def on_gpu() -> bool:
    """True when the default JAX backend is a GPU (CUDA or ROCm)."""
    return jax.default_backend() == "gpu"


def on_hopper() -> bool:
    """True when the first device is an NVIDIA Hopper GPU (sm_90): the Mosaic GPU kernels'
    wgmma and TMA need one."""
    device = jax.devices()[0]
    return device.platform == "gpu" and getattr(device, "compute_capability", "") == "9.0"


def choose(impl: str | None, interpret: bool | None) -> KernelChoice:
    """Resolves the ``impl`` / ``interpret`` pair (see the module docstring) into a choice.

    Raises ``ValueError`` for an unknown ``impl`` and for the contradictory
    ``impl="reference", interpret=True`` (interpret mode is a way to run a kernel).
    """
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"impl must be None, 'pallas' or 'reference'; got {impl!r}")
    if interpret is not None and not isinstance(interpret, bool):
        raise ValueError(f"interpret must be None, True or False; got {interpret!r}")
    if impl == "reference":
        if interpret:
            raise ValueError("impl='reference' runs no kernel, so interpret=True is meaningless")
        return KernelChoice(False, False, "impl='reference'")
    if interpret is True:
        return KernelChoice(True, True, "interpret=True")
    if interpret is False:
        return KernelChoice(True, False, "interpret=False (compiled kernel requested)")
    gpu = on_gpu()
    if impl == "pallas":
        if gpu:
            return KernelChoice(True, False, "impl='pallas' on GPU")
        return KernelChoice(True, True, f"impl='pallas' on {jax.default_backend()}: interpret")
    if gpu:
        return KernelChoice(True, False, "default on GPU: compiled kernel")
    return KernelChoice(False, False, f"default on {jax.default_backend()}: reference")


def mosaic_interpret_params(interpret: bool) -> Any:
    """What a Mosaic GPU kernel's ``interpret`` argument takes: the Mosaic GPU interpreter's
    parameters (CPU tests) when ``interpret``, else None (compile for the GPU)."""
    if not interpret:
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def _triton_module() -> Any | None:
    try:
        from jax.experimental.pallas import triton as pltriton
    except ImportError:  # jaxlib built without the Triton bindings, or Triton removed
        return None
    return pltriton


def triton_available() -> bool:
    """Whether this jax still ships the Pallas Triton backend (it is deprecated in 0.11)."""
    mod = _triton_module()
    if mod is not None and hasattr(mod, "CompilerParams"):
        return True
    from jax.experimental import pallas as pl

    return hasattr(pl, "TritonCompilerParams")


def triton_compiler_params(*, num_warps: int | None = None, num_stages: int | None = None) -> Any:
    """``compiler_params`` that make ``pl.pallas_call`` lower through Triton on GPU.

    Feature-detected rather than version-parsed: ``jax.experimental.pallas.triton.
    CompilerParams`` (present in 0.10.2 and 0.11.x), else the older
    ``pl.TritonCompilerParams``. Raises ``RuntimeError`` with the remedy if neither exists (a
    jax whose Triton backend is gone); callers can then pass ``impl="reference"``.
    """
    mod = _triton_module()
    cls = getattr(mod, "CompilerParams", None) if mod is not None else None
    if cls is None:
        from jax.experimental import pallas as pl

        cls = getattr(pl, "TritonCompilerParams", None)
    if cls is None:
        raise RuntimeError(
            f"jax {jax.__version__} has no Pallas Triton backend "
            "(jax.experimental.pallas.triton.CompilerParams is missing); these kernels need "
            "it. Pass impl='reference' to use the plain-jnp implementation instead."
        )
    return cls(num_warps=num_warps, num_stages=num_stages)


def triton_custom_call_target() -> str:
    """The custom-call target name Pallas Triton kernels lower to (for export checks)."""
    mod = _triton_module()
    return getattr(mod, "CUSTOM_CALL_TARGET_NAME", "__gpu$xla.gpu.triton")
