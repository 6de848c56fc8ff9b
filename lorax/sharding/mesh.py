"""The device mesh: two named axes, ``data`` and ``fsdp``.

``fsdp`` splits the frozen base, the adapters and the optimizer state into 1/n pieces (each
device holds one piece; XLA gathers a layer's weights when the layer runs), and the batch;
``data`` only splits the batch (every ``data`` group holds a full copy of the sharded state).
A typical layout puts ``fsdp`` inside a host (fast links carry the weight gathers) and
``data`` across hosts (only gradients of the small adapters cross the slower network), which
is the default: ``data = processes``, ``fsdp = local devices``.

There is no ``tensor`` axis. Tensor parallelism pays when a layer's matmuls are too big for
one device or its activations dominate memory; for LoRA on <=70B models the frozen NF4 layer
is small (an 8B layer is ~110 MiB), and FSDP already divides the weights, so a tensor axis
would add per-matmul collectives for no memory a ``fsdp`` axis does not already save.

The mesh's axes are ``AxisType.Auto``: the model code is sharding-agnostic and XLA's
partitioner propagates the input shardings through it (``Explicit`` axes would demand
sharding annotations inside ``lorax.model``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh

DATA = "data"
FSDP = "fsdp"
AXES = (DATA, FSDP)
# Batch rows are split over both axes: every device gets a distinct slice of the batch.
BATCH_AXES = (DATA, FSDP)


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Axis sizes of the mesh; ``-1`` (at most one) is inferred from the device count.

    ``MeshSpec()`` means the default layout: ``data`` = number of processes, ``fsdp`` = the
    remaining factor (the local devices of each process).
    """

    data: int = -1
    fsdp: int = -1

    def __post_init__(self) -> None:
        for name in AXES:
            size = getattr(self, name)
            if size == 0 or size < -1:
                raise ValueError(f"mesh axis {name} must be positive or -1 (infer), got {size}")

    def resolve(self, num_devices: int, num_processes: int = 1) -> tuple[int, int]:
        """Concrete ``(data, fsdp)`` for ``num_devices``; raises a ValueError naming the sizes
        when they do not multiply to the device count."""
        data, fsdp = self.data, self.fsdp
        if data == -1 and fsdp == -1:
            data = num_processes if num_devices % num_processes == 0 else 1
        if data == -1:
            data = _infer(num_devices, fsdp, "data", "fsdp")
        elif fsdp == -1:
            fsdp = _infer(num_devices, data, "fsdp", "data")
        if data * fsdp != num_devices:
            raise ValueError(
                f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but there are "
                f"{num_devices}; the axis sizes must multiply to the device count"
            )
        return data, fsdp


def _infer(num_devices: int, other: int, name: str, other_name: str) -> int:
    if num_devices % other:
        raise ValueError(
            f"mesh {other_name}={other} does not divide the {num_devices} devices, so "
            f"{name} cannot be inferred"
        )
    return num_devices // other


def parse_mesh(text: str | None) -> MeshSpec:
    """``"data=2,fsdp=4"`` (either may be omitted or ``-1``) -> ``MeshSpec``; None -> default."""
    if text is None or not text.strip() or text.strip() == "auto":
        return MeshSpec()
    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in AXES or name in sizes:
            raise ValueError(
                f"mesh {text!r}: expected comma-separated AXIS=SIZE with AXIS in {AXES}, "
                "each at most once (e.g. 'data=2,fsdp=4')"
            )
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"mesh {text!r}: size of {name} is not an integer") from None
    return MeshSpec(**sizes)


def make_mesh(spec: MeshSpec | str | None = None, *, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: every device of every process).

    Devices are laid out by ``jax.make_mesh`` (topology-aware on GPUs/TPUs), so with the
    default spec each ``data`` row is one process's devices.
    """
    if not isinstance(spec, MeshSpec):
        spec = parse_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    processes = len({d.process_index for d in devices})
    data, fsdp = spec.resolve(len(devices), processes)
    return jax.make_mesh(
        (data, fsdp), AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices
    )


def describe(mesh: Mesh) -> str:
    """``"data=2 x fsdp=4 (8 cpu devices, 1 process)"``: for logs and the memory table."""
    shape = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
    devices = mesh.devices.flat
    platform = next(iter(devices)).platform
    processes = len({d.process_index for d in mesh.devices.flat})
    count = math.prod(mesh.devices.shape)
    plural = "es" if processes != 1 else ""
    return f"{shape} ({count} {platform} devices, {processes} process{plural})"
