"""Sharded loading and per-device memory accounting on the devices that exist (one H200).

    python scripts/check_sharding_gpu.py           # GPU: Llama-3.1-8B architecture, QLoRA
    python scripts/check_sharding_gpu.py --tiny    # any machine: a tiny config (CPU smoke run)

Three checks, on a ``lorax.sharding.make_mesh()`` mesh over all devices (1x1 on one GPU);
prints a table and exits with status 1 if any check fails:

1. **load**: writes a synthetic HF checkpoint with the model's layer shapes (``--load-layers``
   layers and a ``--load-vocab`` vocabulary, to keep the file ~1.4 GB) and loads it with
   ``lorax.load(..., quantize="nf4", mesh=mesh)``. Every leaf must carry the sharding the
   rules give it, every NF4 projection must equal ``quantize_nf4`` of the whole tensor bit for
   bit (layer 0 of each), and the accounting must equal the bytes of the device buffers.
2. **accounting**: builds the full model's random NF4 base on device (with
   ``scripts/bench_train.py``'s ``build_model``) and places it with ``shard_model``; the
   per-device bytes predicted *before* allocating (``abstract_base_params`` +
   ``base_shardings``) must equal the bytes actually held.
3. **step**: one QLoRA train step (LoRA r=16 on all projections, AdamW) with the step
   shardings; the loss must be finite, and on a GPU the measured peak memory must be within
   ``--peak-tolerance`` of ``memory_report``'s total (an estimate: see lorax/sharding/memory.py).
   ``--steps N`` then times N more steps (tokens/s); ``--packed L`` packs the rows (examples of
   mean length L, with segment ids and positions); ``--attention auto,pallas`` runs the step
   once per attention implementation (the peak is checked for the first only).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "scripts")]

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    expected: str
    measured: str
    ok: bool


def hf_config(config, num_layers: int, vocab_size: int) -> dict:
    """config.json for a checkpoint with ``config``'s layer shapes, ``num_layers`` layers and
    ``vocab_size`` tokens."""
    return dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        vocab_size=vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope.theta,
        hidden_act="silu",
        tie_word_embeddings=False,
    )


def write_checkpoint(directory: str, hf: dict) -> None:
    """Random bf16 weights (a tiled random block per tensor: fast for 8B-sized tensors)."""
    import ml_dtypes
    import numpy as np

    from convert.names import tensor_specs
    from convert.safetensors_io import save_file
    from lorax.config import ModelConfig

    rng = np.random.default_rng(0)
    # An odd period, so equal blocks do not line up with the 64-element NF4 blocks.
    pattern = (0.02 * rng.standard_normal(1_000_003, dtype=np.float32)).astype(ml_dtypes.bfloat16)
    tensors = {}
    for spec in tensor_specs(ModelConfig.from_hf_dict(hf)):
        for name in spec.hf_names():
            shift = int(rng.integers(len(pattern)))
            flat = np.resize(np.roll(pattern, shift), math.prod(spec.shape))
            tensors[name] = flat.reshape(spec.shape)
    save_file(os.path.join(directory, "model.safetensors"), tensors)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f)


def scratch_dir() -> str | None:
    """RAM-backed /dev/shm when it has room (the checkpoint is written and read once)."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and shutil.disk_usage(shm).free > 8 * 2**30:
        return shm
    return None


def device_bytes(tree, device) -> int:
    """Bytes of ``tree``'s buffers that live on ``device``."""
    import jax

    return sum(
        s.data.nbytes
        for x in jax.tree_util.tree_leaves(tree)
        for s in x.addressable_shards
        if s.device == device
    )


def gib(n: int) -> str:
    from lorax.sharding.memory import format_bytes

    return format_bytes(n)


def check_load(config, mesh, rules, layers: int, vocab: int, workdir: str) -> list[Check]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import lorax
    from convert.hf import ShardedCheckpoint
    from lorax import sharding
    from pallas_kernels.nf4 import quantize_nf4

    hf = hf_config(config, layers, min(vocab, config.vocab_size))
    t0 = time.perf_counter()
    write_checkpoint(workdir, hf)
    written = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = lorax.load(workdir, quantize="nf4", dtype="bfloat16", mesh=mesh, sharding_rules=rules)
    jax.block_until_ready(jax.tree_util.tree_leaves(model.params))
    loaded = time.perf_counter() - t0
    print(f"load: wrote {layers}-layer checkpoint in {written:.1f}s, loaded in {loaded:.1f}s")

    expected = sharding.base_shardings(model.params, mesh, rules)
    placed = [
        x.sharding.is_equivalent_to(s, x.ndim)
        for x, s in zip(
            jax.tree_util.tree_leaves(model.params),
            jax.tree_util.tree_leaves(expected),
            strict=True,
        )
    ]
    ckpt = ShardedCheckpoint(workdir)
    mismatched = []
    for proj in PROJECTIONS:
        module = "self_attn" if proj in PROJECTIONS[:4] else "mlp"
        name = f"model.layers.0.{module}.{proj}.weight"
        whole = quantize_nf4(jnp.asarray(np.asarray(ckpt[name]), jnp.bfloat16))
        loaded_t = jax.tree.map(lambda x: x[0], model.params["layers"][proj]["weight"])
        same = all(
            np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(
                jax.tree_util.tree_leaves(loaded_t), jax.tree_util.tree_leaves(whole), strict=True
            )
        )
        if not same:
            mismatched.append(proj)
    device = jax.local_devices()[0]
    predicted = sharding.per_device_bytes(model.params)
    held = device_bytes(model.params, device)
    checks = [
        Check(
            "load: leaves on the rules' sharding", str(len(placed)), str(sum(placed)), all(placed)
        ),
        Check(
            "load: NF4 == quantize_nf4(whole), bitwise",
            "0 mismatched",
            f"{len(mismatched)} mismatched {mismatched or ''}".strip(),
            not mismatched,
        ),
        Check("load: accounted == held bytes", gib(predicted), gib(held), predicted == held),
    ]
    del model
    gc.collect()
    return checks


def check_accounting(config, mesh, rules, tiny: bool):
    import jax
    from bench_train import build_model

    from lorax import sharding

    t0 = time.perf_counter()
    abstract = sharding.abstract_base_params(config, quantize="nf4", dtype="bfloat16")
    shardings = sharding.base_shardings(abstract, mesh, rules)
    planned = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )
    predicted = sharding.per_device_bytes(planned)
    model = build_model(config_overrides=TINY if tiny else None)
    model = sharding.shard_model(model, mesh, rules)
    jax.block_until_ready(jax.tree_util.tree_leaves(model.params))
    held = device_bytes(model.params, jax.local_devices()[0])
    total = sharding.total_bytes(model.params)
    print(f"accounting: built and placed the base in {time.perf_counter() - t0:.1f}s")
    check = Check(
        f"base per device (of {gib(total)})", gib(predicted), gib(held), predicted == held
    )
    return model, check


def check_step(model, mesh, rules, batch: int, seq: int, remat: str, tolerance: float | None,
               attention: str = "auto", packed: int = 0, steps: int = 0):  # fmt: skip
    """One train step (loss finite; peak memory against the estimate unless ``tolerance`` is
    None), then ``steps`` timed steps. ``packed``: rows packed with examples of that mean
    length (segment ids and positions, as the trainer packs); ``attention``: the
    ``ForwardOptions.attention_impl`` (``auto``: the model's choice)."""
    import jax
    import numpy as np
    from _common import packed_rows

    import lorax
    from lorax import sharding
    from lorax.model import ForwardOptions
    from lorax.train import make_optimizer
    from lorax.train.flops import peak_memory_bytes
    from lorax.train.step import StepConfig, init_train_state, make_train_step

    lora = lorax.init_lora(model, rank=16, alpha=16, targets="all-linear", key=jax.random.key(1))
    optimizer = make_optimizer("adamw", 1e-4, max_grad_norm=None)
    state = init_train_state(lora, optimizer, key=jax.random.key(2))
    state = sharding.place_tree(state, sharding.trainable_shardings(state, mesh, rules))
    shardings = sharding.step_shardings(model, state, mesh, rules)
    forward = ForwardOptions(remat=remat, attention_impl=None if attention == "auto" else attention)
    step = make_train_step(model, optimizer, StepConfig(forward=forward), shardings=shardings)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, batch, seq))
    ids = ids.astype(np.int32)
    host_batch = {"input_ids": ids, "labels": ids}
    if packed:
        segment_ids, positions = packed_rows(batch, seq, packed)
        host_batch.update(segment_ids=segment_ids[None], positions=positions[None])
    placed = sharding.place_batch(host_batch, shardings.batch)
    report = sharding.memory_report(
        model,
        state,
        tokens_per_device=batch * seq // sharding.batch_divisor(mesh),
        remat=remat,
        mesh=mesh,
    )
    print(report.table())
    t0 = time.perf_counter()
    state, metrics = step(state, placed)
    loss = float(metrics["loss"])
    label = f"step ({attention} attention{', packed' if packed else ''})"
    first_s = time.perf_counter() - t0
    print(f"{label}: first step (compile + run) in {first_s:.1f}s, loss {loss:.4f}")
    checks = [Check(f"{label}: loss is finite", "finite", f"{loss:.4f}", math.isfinite(loss))]
    if steps:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, metrics = step(state, placed)
            float(metrics["loss"])  # blocks until the step is done
            times.append(time.perf_counter() - t0)
        median = sorted(times)[len(times) // 2]
        print(
            f"{label}: {batch * seq / median:,.0f} tok/s (median of {steps} steps, "
            f"{median * 1e3:.0f} ms), loss {float(metrics['loss']):.5f}"
        )
    peak = peak_memory_bytes(jax.local_devices()[0])
    if tolerance is None:
        pass
    elif peak is None:
        checks.append(Check("step: peak vs estimate", gib(report.total), "n/a (no stats)", True))
    else:
        ratio = peak / report.total
        checks.append(
            Check(
                f"step: peak within {tolerance:.0%} of estimate",
                gib(report.total),
                f"{gib(peak)} ({ratio:.2f}x)",
                abs(ratio - 1.0) <= tolerance,
            )
        )
    return checks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke run)")
    p.add_argument("--load-layers", type=int, default=2, help="layers in the load checkpoint")
    p.add_argument("--load-vocab", type=int, default=32768, help="vocab of the load checkpoint")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--remat", default="selective")
    p.add_argument("--peak-tolerance", type=float, default=0.4)
    p.add_argument("--mesh", default=None, help="e.g. data=1,fsdp=-1 (default: make_mesh())")
    p.add_argument("--packed", type=int, default=0, help="packed rows: mean example length")
    p.add_argument(
        "--attention", default="auto", help="comma list of attention_impl (auto: the model's)"
    )
    p.add_argument("--steps", type=int, default=0, help="timed steps after the first")
    a = p.parse_args()
    if a.tiny:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    from bench_train import llama31_8b_config

    from lorax import sharding

    start = time.perf_counter()
    config = llama31_8b_config(**(TINY if a.tiny else {}))
    mesh = sharding.make_mesh(a.mesh)
    # Tiny leaves are all below the default thresholds: split them anyway to exercise fsdp.
    rules = sharding.ShardingRules(0, 0) if a.tiny else sharding.DEFAULT_RULES
    seq = min(a.seq, 64) if a.tiny else a.seq
    ways = sharding.batch_divisor(mesh)
    batch = -(-a.batch // ways) * ways  # a whole number of rows per device
    device = jax.local_devices()[0]
    print(
        f"jax {jax.__version__}, {device.device_kind}, mesh {sharding.describe(mesh)}, "
        f"model {'tiny' if a.tiny else 'Llama-3.1-8B architecture'}, batch {batch}x{seq}"
    )
    checks: list[Check] = []
    with tempfile.TemporaryDirectory(prefix="lorax-sharding-", dir=scratch_dir()) as workdir:
        checks += check_load(config, mesh, rules, a.load_layers, a.load_vocab, workdir)
    model, accounting = check_accounting(config, mesh, rules, a.tiny)
    checks.append(accounting)
    for i, attention in enumerate(a.attention.split(",")):
        # The peak is the process's: only the first step's is its own.
        tolerance = a.peak_tolerance if i == 0 else None
        checks += check_step(
            model, mesh, rules, batch, seq, a.remat, tolerance, attention, a.packed, a.steps
        )

    width = max(len(c.name) for c in checks)
    print(f"\n{'check':<{width}}  {'expected':>22}  {'measured':>30}  ok")
    for c in checks:
        print(f"{c.name:<{width}}  {c.expected:>22}  {c.measured:>30}  {'yes' if c.ok else 'NO'}")
    failed = [c.name for c in checks if not c.ok]
    print(
        f"\n{len(checks) - len(failed)}/{len(checks)} checks passed in "
        f"{time.perf_counter() - start:.1f}s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
