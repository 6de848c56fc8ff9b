"""One process of a two-process run for tests/test_distributed.py (jax.distributed over
loopback, 2 CPU devices per process, mesh data=2 x fsdp=2), or the single-process reference.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
        python tests/distributed_worker.py HF_DIR OUT_DIR PORT PROCESS_ID
    python tests/distributed_worker.py HF_DIR OUT_DIR          # one process, one device

Loads HF_DIR straight into the sharded layout, trains a few steps with the Trainer (orbax
writes the final checkpoint from all processes), and prints ``LOSSES {...}``; process 0
also saves the final adapters as ``OUT_DIR/final_lora.npz`` for the restore check.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from sharding_helpers import DISTRIBUTED_RUN, loader, train_config  # noqa: E402

import lorax  # noqa: E402
from lorax import distributed, sharding  # noqa: E402
from lorax.train.trainer import Trainer  # noqa: E402


def main(hf_dir: str, out: str, port: int | None, process_id: int | None) -> None:
    if port is not None:
        config = distributed.DistributedConfig(f"127.0.0.1:{port}", 2, process_id)
        distributed.initialize(config)
    mesh = sharding.make_mesh()  # default: data = processes, fsdp = local devices
    rules = sharding.ShardingRules(base_min_bytes=0, trainable_min_bytes=0)
    model = lorax.load(hf_dir, quantize="nf4", dtype="float32", mesh=mesh, sharding_rules=rules)
    lora = lorax.init_lora(model, rank=4, alpha=8, key=jax.random.key(0))
    cfg = train_config(out, **DISTRIBUTED_RUN)
    trainer = Trainer(model, lora, loader(), cfg, mesh=mesh, sharding_rules=rules)
    trainer.train()
    final = sharding.to_host(trainer.state.lora.params)  # a collective: every process calls it
    if distributed.is_primary():
        flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(final)}
        np.savez(os.path.join(out, "final_lora.npz"), **flat)
    report = {
        "mesh": dict(mesh.shape),
        "process_count": jax.process_count(),
        "losses": {r["step"]: r["loss"] for r in trainer.history},
    }
    print("LOSSES " + json.dumps(report), flush=True)


if __name__ == "__main__":
    port, process_id = (int(a) for a in sys.argv[3:5]) if len(sys.argv) > 3 else (None, None)
    main(sys.argv[1], sys.argv[2], port, process_id)
