"""Multi-device scenarios for tests/test_sharding.py, run in a subprocess with 8 CPU devices.

The device count is fixed when JAX starts, so these run outside the pytest process (which
keeps its single device). Everything is done in one process to pay JAX's start-up and the
step compiles once; the result is one JSON line, ``REPORT {...}``, that the tests read.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py DIR
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from sharding_helpers import (  # noqa: E402
    RUN,
    llama31_8b_config,
    loader,
    train_config,
    write_checkpoint,
)

import lorax  # noqa: E402
from lorax import sharding  # noqa: E402
from lorax.train.checkpoint import CheckpointStore  # noqa: E402
from lorax.train.step import make_train_step  # noqa: E402
from lorax.train.trainer import Trainer  # noqa: E402

RULES = sharding.ShardingRules(base_min_bytes=0, trainable_min_bytes=0)
# The MoE checkpoints loaded whole and onto the mesh (test_sharding's MoE families).
MOE_CHECKPOINTS = {
    "mixtral": dict(
        model_type="mixtral",
        architectures=["MixtralForCausalLM"],
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        architectures=["Qwen3MoeForCausalLM"],
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
    ),
    "qwen2_moe": dict(
        model_type="qwen2_moe",
        architectures=["Qwen2MoeForCausalLM"],
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
    ),
}
SAVE_AT = RUN["save_every"]


def host(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def leaves_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and np.array_equal(host(x), host(y), equal_nan=True)
        for x, y in zip(la, lb, strict=True)
    )


def train(model, mesh, out: str) -> Trainer:
    lora = lorax.init_lora(model, rank=4, alpha=8, key=jax.random.key(0))
    trainer = Trainer(model, lora, loader(), train_config(out), mesh=mesh, sharding_rules=RULES)
    trainer.train()
    return trainer


def losses(trainer: Trainer) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in trainer.history}


def resume_copy(src: str, dst: str) -> str:
    """A copy of a run directory whose latest checkpoint is step SAVE_AT."""
    shutil.copytree(src, dst)
    for step in os.listdir(os.path.join(dst, "checkpoints")):
        if step.isdigit() and int(step) > SAVE_AT:
            shutil.rmtree(os.path.join(dst, "checkpoints", step))
    return dst


def kernel_attention_under_mesh(ckpt: str, mesh) -> dict:
    """Logits and LoRA gradients with the Pallas attention kernels (interpreted here) under
    ``mesh``'s batch split, against one device with the reference attention, on packed rows."""
    from lorax.model import ForwardOptions, forward

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (8, 32)).astype(np.int32)
    segment_ids = np.repeat(np.arange(1, 5), 8)[None].repeat(8, 0).astype(np.int32)
    positions = np.tile(np.arange(8), 4)[None].repeat(8, 0).astype(np.int32)
    weights = rng.standard_normal((8, 32, 256)).astype(np.float32)

    def loss_and_grad(model, lora, options, place):
        def loss(lora):
            logits = forward(
                model, lora, place(ids), positions=place(positions),
                segment_ids=place(segment_ids), options=options,
            )  # fmt: skip
            return jax.numpy.sum(logits * place(weights)), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(lora)

    whole = lorax.load(ckpt, quantize="nf4", dtype="float32")
    lora = lorax.init_lora(whole, rank=4, alpha=8, key=jax.random.key(3))
    lora = jax.tree.map(lambda x: x + 0.01, lora)  # nonzero B: gradients reach every factor
    (_, want_logits), want_grad = loss_and_grad(whole, lora, ForwardOptions(), lambda x: x)
    split = lorax.load(ckpt, quantize="nf4", dtype="float32", mesh=mesh, sharding_rules=RULES)
    options = ForwardOptions(attention_impl="pallas", **sharding.forward_constraints(mesh))
    rows = sharding.batch_sharding(mesh, micro_batched=False)
    place = lambda x: jax.device_put(x, rows)
    (_, logits), grad = loss_and_grad(split, lora, options, place)
    jaxpr = str(jax.make_jaxpr(lambda m: forward(m, None, place(ids), options=options))(split))
    return {
        "shard_map_around_kernel": "shard_map" in jaxpr and "pallas_call" in jaxpr,
        "logits_sharding": str(logits.sharding.spec),
        "logits_max_diff": float(np.max(np.abs(host(logits) - host(want_logits)))),
        "grad_max_rel_diff": max(
            float(np.max(np.abs(host(g) - host(w))) / np.max(np.abs(host(w))))
            for g, w in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad), strict=True)
        ),
    }


def main(work: str) -> None:
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - t0 - sum(timings.values()), 2)

    ckpt = write_checkpoint(os.path.join(work, "hf"))
    mesh8 = sharding.make_mesh("data=2,fsdp=4")
    mesh4 = sharding.make_mesh("data=1,fsdp=4", devices=jax.devices()[:4])
    mesh1 = sharding.make_mesh("data=1,fsdp=1", devices=jax.devices()[:1])
    report: dict = {"devices": jax.device_count()}

    # Loading straight into the layout equals loading whole, bit for bit.
    for quantize, dtype in (("nf4", "float32"), (None, "bfloat16")):
        whole = lorax.load(ckpt, quantize=quantize, dtype=dtype)
        split = lorax.load(ckpt, quantize=quantize, dtype=dtype, mesh=mesh8, sharding_rules=RULES)
        report[f"load_equal_{quantize}_{dtype}"] = leaves_equal(split.params, whole.params)
        report[f"load_specs_{quantize}_{dtype}"] = {
            jax.tree_util.keystr(p): str(x.sharding.spec)
            for p, x in jax.tree_util.tree_flatten_with_path(split.params)[0]
        }
    model = lorax.load(ckpt, quantize="nf4", dtype="float32", mesh=mesh8, sharding_rules=RULES)
    # A bitsandbytes 4-bit checkpoint keeps its NF4 bytes; they are split the same way.
    bnb = os.path.join(work, "bnb")
    lorax.save_merged(lorax.load(ckpt, quantize="nf4", dtype="float32"), None, bnb, dtype="nf4")
    whole = lorax.load(bnb, dtype="float32")
    split = lorax.load(bnb, dtype="float32", mesh=mesh8, sharding_rules=RULES)
    report["load_equal_bnb"] = leaves_equal(split.params, whole.params)
    report["load_specs_bnb"] = {
        jax.tree_util.keystr(p): str(x.sharding.spec)
        for p, x in jax.tree_util.tree_flatten_with_path(split.params)[0]
    }
    # A mixture of experts: its expert matrices are read whole, then placed; the same bytes.
    # Mixtral, Qwen 3 MoE (its own checkpoint names, narrower experts) and Qwen 2 MoE (a
    # shared expert and its gate beside them).
    from lorax.model import forward

    ids = jax.numpy.asarray(np.arange(64).reshape(2, 32) % 256)
    for family, fields in MOE_CHECKPOINTS.items():
        moe = write_checkpoint(os.path.join(work, family), **fields)
        for quantize in ("nf4", None):
            whole = lorax.load(moe, quantize=quantize, dtype="float32")
            split = lorax.load(
                moe, quantize=quantize, dtype="float32", mesh=mesh8, sharding_rules=RULES
            )
            key = f"{family}_{quantize}"
            report[f"moe_load_equal_{key}"] = leaves_equal(split.params, whole.params)
            report[f"moe_logits_max_diff_{key}"] = float(
                np.max(np.abs(host(forward(split, None, ids)) - host(forward(whole, None, ids))))
            )
    report["base_device_bytes"] = sharding.per_device_bytes(model.params)
    report["base_device_bytes_measured"] = sum(
        s.data.nbytes
        for x in jax.tree_util.tree_leaves(model.params)
        for s in x.addressable_shards
        if s.device == jax.devices()[0]
    )
    report["base_total_bytes"] = sharding.total_bytes(model.params)
    report["kernel_attention"] = kernel_attention_under_mesh(ckpt, mesh8)

    # Sizing a real model without allocating it: Llama-3.1-8B in NF4 on this mesh, with the
    # default rules (1 MiB thresholds).
    config = llama31_8b_config()
    abstract = sharding.abstract_base_params(config, quantize="nf4", dtype="bfloat16")
    shardings = sharding.base_shardings(abstract, mesh8)
    placed = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )
    report["llama8b"] = {
        "total": sharding.total_bytes(abstract),
        "per_device": sharding.per_device_bytes(placed),
    }
    try:
        lora = lorax.init_lora(model, rank=4, alpha=8)
        bad = train_config(os.path.join(work, "bad"), batch_size=6)
        Trainer(model, lora, loader(batch_size=6), bad)
    except ValueError as e:
        report["indivisible_batch_error"] = str(e)
    lap("load")

    run8 = train(model, mesh8, os.path.join(work, "mesh8"))
    report["losses8"] = losses(run8)
    report["step_forward_fields"] = sorted(run8.shardings.forward)
    memory = run8.memory
    report["memory8"] = {
        "base": memory.base,
        "base_total": memory.base_total,
        "lora": memory.lora,
        "lora_total": sharding.total_bytes(run8.state.lora.params),
        "optimizer": memory.optimizer,
        "optimizer_total": sharding.total_bytes(run8.state.opt_state),
    }
    # FSDP as compiled: the frozen weights travel as stored (NF4 bytes), never decoded.
    step = make_train_step(run8.model, run8.optimizer, run8.step_config, shardings=run8.shardings)
    micro = next(loader().forever())
    accum = run8.config.grad_accum_steps
    batch = {k: np.stack([v] * accum) for k, v in micro.items()}
    hlo = step.lower(run8.state, sharding.place_batch(batch, run8.shardings.batch)).compile()
    report["all_gathers"] = [
        (dtype, [int(d) for d in dims.split(",") if d])
        for dtype, dims in re.findall(
            r"=\s*\(?(\w+)\[([\d,]*)\][^\n]*?\sall-gather(?:-start)?\(", hlo.as_text()
        )
    ]
    lap("train8")

    run1 = train(model, mesh1, os.path.join(work, "mesh1"))
    report["losses1"] = losses(run1)
    lap("train1")

    # The final checkpoint restores bit for bit into any layout.
    store = CheckpointStore(os.path.join(work, "mesh8", "checkpoints"))
    restored = {n: store.restore_latest(t.state)[0] for n, t in (("1", run1), ("8", run8))}
    report["restore_exact"] = {n: leaves_equal(s, run8.state) for n, s in restored.items()}
    report["restored_on"] = {
        n: len(jax.tree_util.tree_leaves(s)[0].sharding.device_set) for n, s in restored.items()
    }
    lap("restore")

    for name, mesh in (("1", mesh1), ("4", mesh4)):
        out = resume_copy(os.path.join(work, "mesh8"), os.path.join(work, f"resume{name}"))
        resumed = train(model, mesh, out)
        report[f"resumed{name}"] = losses(resumed)
        lap(f"resume{name}")
    report["timings"] = timings
    print("REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
