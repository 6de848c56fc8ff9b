"""Multi-host start-up: connecting the processes of one run with ``jax.distributed``.

Every process runs the same program. Process 0 hosts the coordinator service; the others
connect to it, and from then on ``jax.devices()`` lists every device of every process and
one jitted step spans them all. This must happen before anything touches a JAX backend.

Two ways to say who is who, as in JAX itself:

* explicitly: ``lorax train --coordinator HOST:PORT --num-processes N --process-id I``;
* JAX's environment: ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID`` read here), or a cluster JAX detects itself (Slurm, Open MPI, TPU pods)
  with ``--distributed``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Who this process is in a multi-process run; ``coordinator=None`` lets JAX detect it
    from the cluster environment."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self) -> None:
        if self.coordinator is not None:
            host, sep, port = self.coordinator.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"coordinator must be HOST:PORT, got {self.coordinator!r}")
            if self.num_processes is None or self.process_id is None:
                raise ValueError("a coordinator needs --num-processes and --process-id too")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        known = self.process_id is not None and self.num_processes is not None
        if known and not 0 <= self.process_id < self.num_processes:
            raise ValueError(
                f"process_id must be in [0, {self.num_processes}), got {self.process_id}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> DistributedConfig | None:
        """The config JAX's variables describe, or None when ``JAX_COORDINATOR_ADDRESS`` is
        unset."""
        address = environ.get("JAX_COORDINATOR_ADDRESS")
        if not address:
            return None

        def number(name: str) -> int | None:
            value = environ.get(name)
            if value is None:
                return None
            if not value.isdigit():
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
            return int(value)

        return cls(address, number("JAX_NUM_PROCESSES"), number("JAX_PROCESS_ID"))


def initialize(config: DistributedConfig) -> None:
    """Connects this process to the others (``jax.distributed.initialize``).

    On CPU the cross-process collectives go over gloo (JAX's default for CPU), so the same
    code runs two processes on one machine over loopback, as the tests do.
    """
    jax.distributed.initialize(
        coordinator_address=config.coordinator,
        num_processes=config.num_processes,
        process_id=config.process_id,
    )


def is_primary() -> bool:
    """True on the process that writes shared files (metrics, plots, adapters)."""
    return jax.process_index() == 0
