"""lorax.sharding: mesh and rules (in this process), and sharded loading, training and
checkpoint resume on 8 CPU devices (in one subprocess, tests/sharding_worker.py, so this
session keeps its single device).

Tolerance: a sharded step computes the same sums as the single-device step in a different
order (per-device partial sums, then all-reduces), so losses agree to float32 rounding; we
assert ``rtol=1e-5`` and see ~1e-7. Loading and checkpoint restore are exact (bit for bit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from sharding_helpers import TINY_HF, cpu_devices_env, llama31_8b_config

from lorax import sharding
from lorax.config import ModelConfig
from lorax.sharding import MeshSpec, parse_mesh, split_axis
from pallas_kernels.nf4 import quantize_nf4

HERE = os.path.dirname(os.path.abspath(__file__))
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Runs tests/sharding_worker.py once with 8 CPU devices; its JSON report."""
    work = tmp_path_factory.mktemp("sharding")
    env = {
        **cpu_devices_env(8),
        # The 1-device resume compiles the same step as the 1-device run: reuse it.
        "JAX_COMPILATION_CACHE_DIR": str(work / "compile_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "sharding_worker.py"), str(work)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("REPORT ") :])
    print("worker timings (s):", result["timings"])
    return result


# ------------------------------------------------------------------------- in this process


def test_mesh_spec_resolves_and_rejects_bad_sizes():
    assert MeshSpec().resolve(8) == (1, 8)
    assert MeshSpec().resolve(8, num_processes=2) == (2, 4)  # data across processes
    assert MeshSpec(data=2).resolve(8) == (2, 4)
    assert MeshSpec(fsdp=2).resolve(8) == (4, 2)
    assert parse_mesh("data=2, fsdp=-1") == MeshSpec(2, -1)
    assert parse_mesh(None) == parse_mesh("auto") == MeshSpec()
    with pytest.raises(ValueError, match="data=3 does not divide the 8 devices"):
        MeshSpec(data=3).resolve(8)
    with pytest.raises(ValueError, match=r"data=2 x fsdp=3 = 6 devices, but there are 8"):
        MeshSpec(2, 3).resolve(8)
    for bad in ("tensor=2", "data=x", "data=2,data=2", "fsdp"):
        with pytest.raises(ValueError, match="mesh"):
            parse_mesh(bad)
    with pytest.raises(ValueError, match="positive or -1"):
        MeshSpec(data=0)


def test_make_mesh_on_one_device_is_a_1x1_auto_mesh():
    mesh = sharding.make_mesh()
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="data=2 x fsdp=1 = 2 devices, but there are 1"):
        sharding.make_mesh("data=2,fsdp=1")


def test_split_axis_rules():
    big = dict(nbytes=1 << 30, fsdp=4, min_bytes=1 << 20)
    # Stacked leaves never split the layer axis; base leaves take the first divisible axis,
    # trainable ones the largest (lora_a [L, r, in] splits `in`, never the rank).
    assert split_axis((32, 1024, 4096), stacked=True, largest=False, **big) == 1
    assert split_axis((32, 16, 4096), stacked=True, largest=True, **big) == 2
    assert split_axis((32, 4096, 16), stacked=True, largest=True, **big) == 1
    assert split_axis((128256, 4096), stacked=False, largest=False, **big) == 0
    assert split_axis((32, 4096), stacked=True, largest=False, **big) == 1
    # Replicated: 1-D stacked leaves, scalars, no divisible axis, small leaves, fsdp=1.
    assert split_axis((32,), stacked=True, largest=False, **big) is None
    assert split_axis((), stacked=False, largest=False, **big) is None
    assert split_axis((32, 30, 6), stacked=True, largest=False, **big) is None
    small = {**big, "nbytes": 1000}
    assert split_axis((32, 1024, 4096), stacked=True, largest=False, **small) is None
    one = {**big, "fsdp": 1}
    assert split_axis((32, 1024, 4096), stacked=True, largest=False, **one) is None


@pytest.mark.parametrize(
    "shape, fsdp, expected",
    [
        ((64, 64), 4, (True, False)),  # 64 blocks: split; 1 nested block: replicated
        ((512, 512), 4, (True, True)),  # 4096 blocks = 16 nested blocks: both split
        ((10, 100), 4, (False, False)),  # 1000 elements: not whole blocks per piece
        ((64, 64), 1, (False, False)),
    ],
)
def test_nf4_split_needs_whole_blocks_per_piece(shape, fsdp, expected):
    t = jax.eval_shape(lambda: quantize_nf4(jax.numpy.zeros(shape), double_quant=True))
    assert sharding.nf4_split(t, fsdp=fsdp, min_bytes=0) == expected


def test_safetensors_read_flat_reads_just_a_range(tmp_path):
    from convert.safetensors_io import SafetensorsFile, save_file

    x = np.arange(60, dtype=np.float32).reshape(6, 10)
    save_file(tmp_path / "t.safetensors", {"x": x})
    f = SafetensorsFile(tmp_path / "t.safetensors")
    np.testing.assert_array_equal(f.read_flat("x", 13, 37), x.reshape(-1)[13:37])
    assert f.read_flat("x", 5, 5).shape == (0,)
    with pytest.raises(ValueError, match=r"has 60 elements; cannot read \[50, 61\)"):
        f.read_flat("x", 50, 61)


def test_steps_on_a_mesh_fill_in_its_forward_constraints():
    """A step made with shardings but a default ``StepConfig`` still gets the activations'
    batch split (what lets the model run its attention kernels per device); fields a config
    sets are kept."""
    from jax.sharding import NamedSharding, PartitionSpec

    from lorax.model import ForwardOptions
    from lorax.train.step import StepConfig, StepShardings, _on_mesh

    mesh = sharding.make_mesh("data=1,fsdp=1")
    rows = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))
    mine = NamedSharding(mesh, PartitionSpec())
    shardings = StepShardings(None, None, None, None, None, forward={"activation_sharding": rows})
    assert _on_mesh(StepConfig(), shardings).forward.activation_sharding is rows
    assert _on_mesh(StepConfig(), None) == StepConfig()
    kept = StepConfig(forward=ForwardOptions(remat="full", activation_sharding=mine))
    assert _on_mesh(kept, shardings) == kept
    assert sharding.forward_constraints(mesh) == {}  # one device: none needed


def test_activation_estimate_orders_remat_policies():
    config = llama31_8b_config()

    def estimate(remat: str, tokens: int = 4096) -> int:
        return sharding.activation_bytes(config, tokens=tokens, remat=remat, compute_bytes=2)

    assert estimate("offload") < estimate("full") < estimate("selective") < estimate("mlp")
    assert estimate("mlp") < estimate("none")
    # Linear in tokens once they exceed one loss chunk (whose buffers are a constant).
    slope = estimate("selective", 8192) - estimate("selective", 4096)
    assert estimate("selective", 12288) - estimate("selective", 8192) == slope
    assert estimate("selective", 4096) > slope  # plus the loss chunk's constant
    # selective keeps D + 2Q + 2KV bf16 values per token and layer, plus one recomputed
    # layer and the final hidden states: ~4 GiB per 4096 tokens
    assert 3.5 < slope / 2**30 < 5.5


def test_format_of_memory_table():
    report = sharding.MemoryReport(
        devices=8,
        mesh="data=2 x fsdp=4",
        base=3 << 30,
        base_total=12 << 30,
        lora=5 << 20,
        optimizer=10 << 20,
        gradients=10 << 20,
        weights_workspace=300 << 20,
        activations=2 << 30,
        tokens_per_device=4096,
        remat="selective",
    )
    table = report.table()
    assert "base params" in table and "3.00 GiB" in table and "of 12.00 GiB in all" in table
    assert "remat=selective, 4096 tokens/device" in table
    assert report.total == (5 << 30) + (325 << 20)


# ------------------------------------------------------------------ 8 devices (subprocess)


def test_worker_ran_on_eight_devices(report):
    assert report["devices"] == 8


@pytest.mark.parametrize("case", ["nf4_float32", "None_bfloat16", "bnb"])
def test_sharded_load_equals_whole_load_bit_for_bit(report, case):
    assert report[f"load_equal_{case}"]
    specs = report[f"load_specs_{case}"]
    assert specs["['embed_tokens']"] == "P('fsdp',)"
    assert specs["['lm_head']['weight']"] == "P('fsdp',)"
    if case in ("nf4_float32", "bnb"):
        for field in ("packed", "absmax"):
            assert specs[f"['layers']['q_proj']['weight'].{field}"] == "P(None, 'fsdp')"
        assert specs["['layers']['q_proj']['weight'].offset"] == "P()"
    else:
        assert specs["['layers']['down_proj']['weight']"] == "P(None, 'fsdp')"


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("quantize", ["nf4", "None"])
def test_sharded_moe_load_equals_whole_load(report, family, quantize):
    """A mixture of experts loads onto a mesh (the CLI always passes one): the same bytes as
    loading whole, and the same logits."""
    assert report[f"moe_load_equal_{family}_{quantize}"]
    assert report[f"moe_logits_max_diff_{family}_{quantize}"] < 1e-5


def test_each_device_holds_a_quarter_of_the_base(report):
    per_device, total = report["base_device_bytes"], report["base_total_bytes"]
    assert per_device == report["base_device_bytes_measured"]  # accounting == buffers
    # fsdp=4; only the per-layer offsets and nested absmax (a few floats) are replicated.
    assert total / 4 <= per_device <= 1.01 * total / 4
    plan = report["llama8b"]  # the default rules at real size: everything big is split
    assert plan["total"] / 4 <= plan["per_device"] <= 1.001 * plan["total"] / 4
    assert 5.0 < plan["total"] / 2**30 < 6.0


def test_adapters_and_optimizer_state_are_split_too(report):
    memory = report["memory8"]
    assert memory["base"] == report["base_device_bytes"]
    assert memory["lora"] == memory["lora_total"] // 4
    # Adam's two moments are split like the adapters; its step count is replicated.
    assert memory["optimizer_total"] / 4 <= memory["optimizer"] < memory["optimizer_total"] / 3


def test_sharded_training_matches_single_device(report):
    steps = sorted(report["losses8"], key=int)
    assert len(steps) == 6
    sharded = [report["losses8"][s] for s in steps]
    single = [report["losses1"][s] for s in steps]
    np.testing.assert_allclose(sharded, single, rtol=LOSS_RTOL)
    assert max(abs(a / b - 1) for a, b in zip(sharded, single, strict=True)) < 1e-6


def test_fsdp_gathers_the_stored_nf4_bytes_not_decoded_weights(report):
    """Each scanned layer all-gathers its frozen NF4 weights as stored (uint8) right before
    use; no decoded projection (float, [out, in] or stacked [layers, out, in]) is gathered."""
    gathers = report["all_gathers"]
    assert any(dtype == "u8" for dtype, _ in gathers)
    config = ModelConfig.from_hf_dict(TINY_HF)
    decoded = set()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        out_in = list(config.projection_shape(name))
        decoded |= {tuple(out_in), (config.num_layers, *out_in)}
    floats = [tuple(dims) for dtype, dims in gathers if dtype in ("f32", "bf16", "f16")]
    assert not decoded & set(floats), floats


def test_step_shardings_carry_the_forward_constraints(report):
    assert report["step_forward_fields"] == ["activation_sharding", "layer_weights_sharding"]


def test_kernel_attention_runs_on_each_devices_rows(report):
    """Under a mesh the Pallas attention kernels run inside ``shard_map`` (each device on its
    own batch rows; XLA's partitioner cannot split a kernel's custom call), and the logits and
    LoRA gradients of packed rows equal one device's with the reference attention."""
    result = report["kernel_attention"]
    assert result["shard_map_around_kernel"]
    assert result["logits_sharding"] == "P(('data', 'fsdp'),)"
    assert result["logits_max_diff"] < 1e-4
    assert result["grad_max_rel_diff"] < 1e-4


def test_checkpoint_from_8_devices_restores_exactly_and_resumes_on_1_and_4(report):
    assert report["restore_exact"] == {"1": True, "8": True}
    assert report["restored_on"] == {"1": 1, "8": 8}
    uninterrupted = report["losses8"]
    for devices in ("1", "4"):
        resumed = report[f"resumed{devices}"]
        assert sorted(resumed, key=int) == ["4", "5", "6"]
        np.testing.assert_allclose(
            [resumed[s] for s in ("4", "5", "6")],
            [uninterrupted[s] for s in ("4", "5", "6")],
            rtol=LOSS_RTOL,
        )


def test_trainer_rejects_a_batch_that_does_not_split(report):
    message = report["indivisible_batch_error"]
    assert "batch_size=6 must be a multiple of data x fsdp = 8" in message
