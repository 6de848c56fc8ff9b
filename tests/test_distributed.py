"""Multi-host training on one machine: two processes joined by ``jax.distributed`` over
loopback (2 CPU devices each, mesh data=2 x fsdp=2) train the same steps as one process on
one device, and write an orbax checkpoint that restores exactly on one device."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from sharding_helpers import (
    DISTRIBUTED_RUN,
    cpu_devices_env,
    loader,
    train_config,
    write_checkpoint,
)

import lorax
from lorax.distributed import DistributedConfig
from lorax.train.checkpoint import CheckpointStore
from lorax.train.trainer import Trainer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# Same tolerance as tests/test_sharding.py: only the order of the reductions differs.
LOSS_RTOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], devices: int, log: str) -> tuple[subprocess.Popen, str]:
    """A worker process with its output in a file (a pipe could fill up and block it)."""
    env = {**cpu_devices_env(devices), "PYTHONPATH": REPO}
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-u", os.path.join(HERE, "distributed_worker.py"), *args],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    return proc, log


def _finish(workers: list[tuple[subprocess.Popen, str]], timeout: float = 600) -> list[dict]:
    """Waits for all; if one fails (the others would wait for it) or time runs out, stops all."""
    deadline = time.monotonic() + timeout
    procs = [p for p, _ in workers]
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            break
        time.sleep(0.1)
    reports = []
    for proc, log in workers:
        with open(log) as f:
            output = f.read()
        lines = [ln for ln in output.splitlines() if ln.startswith("LOSSES ")]
        assert proc.returncode == 0 and lines, f"{log} ({proc.returncode}):\n{output[-4000:]}"
        reports.append(json.loads(lines[-1][len("LOSSES ") :]))
    return reports


def test_two_processes_match_one_process_and_checkpoint_restores_on_one_device(tmp_path):
    hf_dir = write_checkpoint(str(tmp_path / "hf"))
    out = str(tmp_path / "two_processes")
    port = str(_free_port())
    # Both processes of the distributed run, and the one-process, one-device reference.
    workers = [
        _start([hf_dir, out, port, str(i)], 2, str(tmp_path / f"worker{i}.log")) for i in range(2)
    ]
    workers.append(_start([hf_dir, str(tmp_path / "one")], 1, str(tmp_path / "reference.log")))
    *reports, reference = _finish(workers)

    assert reference["process_count"] == 1 and reference["mesh"] == {"data": 1, "fsdp": 1}
    expected = [reference["losses"][str(s)] for s in range(1, DISTRIBUTED_RUN["max_steps"] + 1)]
    for report in reports:
        assert report["process_count"] == 2
        assert report["mesh"] == {"data": 2, "fsdp": 2}
        got = [report["losses"][str(step)] for step in range(1, len(expected) + 1)]
        np.testing.assert_allclose(got, expected, rtol=LOSS_RTOL)

    # Process 0 alone wrote the metrics; orbax wrote one checkpoint from both processes, and
    # it restores bit for bit into a one-device layout (here, in this pytest process).
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
    model = lorax.load(hf_dir, quantize="nf4", dtype="float32")
    lora = lorax.init_lora(model, rank=4, alpha=8, key=jax.random.key(0))
    like = Trainer(model, lora, loader(), train_config(str(tmp_path / "like"))).state
    store = CheckpointStore(os.path.join(out, "checkpoints"))
    assert store.latest_step() == DISTRIBUTED_RUN["max_steps"]
    restored, meta = store.restore_latest(like)
    assert int(restored.step) == DISTRIBUTED_RUN["max_steps"]
    assert meta["data"]["index"] == DISTRIBUTED_RUN["max_steps"]
    saved = np.load(os.path.join(out, "final_lora.npz"))
    for path, leaf in jax.tree_util.tree_leaves_with_path(restored.lora.params):
        assert len(leaf.sharding.device_set) == 1
        np.testing.assert_array_equal(np.asarray(leaf), saved[jax.tree_util.keystr(path)])


def test_distributed_config_validates_its_input():
    assert DistributedConfig.from_env({}) is None
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4"}
    env["JAX_PROCESS_ID"] = "3"
    assert DistributedConfig.from_env(env) == DistributedConfig("10.0.0.1:1234", 4, 3)
    with pytest.raises(ValueError, match="HOST:PORT"):
        DistributedConfig("10.0.0.1", 2, 0)
    with pytest.raises(ValueError, match="needs --num-processes"):
        DistributedConfig("10.0.0.1:1234")
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\)"):
        DistributedConfig("10.0.0.1:1234", 2, 2)


def test_cli_rejects_half_a_multi_host_setup(tmp_path, capsys):
    from lorax.cli import main

    code = main(["train", "--output-dir", str(tmp_path), "--num-processes", "2"])
    assert code == 2
    assert "need --coordinator HOST:PORT" in capsys.readouterr().err
    code = main(["train", "--output-dir", str(tmp_path), "--coordinator", "nohost"])
    assert code == 2
    assert "coordinator must be HOST:PORT" in capsys.readouterr().err
    code = main(["train", "--output-dir", str(tmp_path), "--mesh", "data=2,tensor=4"])
    assert code == 2
    assert "expected comma-separated AXIS=SIZE" in capsys.readouterr().err
