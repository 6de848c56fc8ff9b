"""End-to-end QLoRA training throughput on one GPU: Llama-3.1-8B architecture (or an MoE one,
``--model``), random weights.

Workload (the same as scripts/bench_torch.py and ../shared/reference/h200-baselines.md):
NF4 base (double-quantized), LoRA r=16 alpha=16 on all 7 projections (f32 adapters), AdamW
lr 1e-4, causal-LM loss on random tokens with labels = inputs. Each (shape, remat) case runs
in its own process so peak device memory is that case's alone. tokens/s is B*S over the
median step time of >= 8 timed steps after warm-up; MFU counts the FLOPs of
lorax.train.flops.train_flops_per_token against the bf16 dense peak.

    python scripts/bench_train.py --shapes 2x2048,1x8192 --remat none,offload --json out.json
    python scripts/bench_train.py --cases 2x2048@mlp@auto 1x8192@selective:12,mlp@auto

A case is SHAPE@REMAT@ATTENTION (REMAT may be a per-layer schedule, see lorax.remat);
--forward passes further ForwardOptions fields (e.g. mlp_chunk_tokens=4096) to every case.
--packed L makes every row a packed one (examples of mean length L, their segment ids and
positions in the batch, as the trainer's default packing gives), so attention must mask
across examples: cuDNN cannot, and ``auto`` picks what the model picks for such rows.
--sliding-window W gives every layer a sliding window of W keys (as Mistral's layers have);
TFLOP/s and MFU still count full causal attention then, so compare tokens/s.
--model picks the architecture: ``llama31-8b`` (default), or the routed mixtures of experts
``qwen3-30b-a3b`` (128 experts of width 768, 8 per token) and ``mixtral-8x7b`` (8 of 14336, 2
per token), whose FLOPs count the routed experts only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

START = time.perf_counter()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

LLAMA31_8B = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rms_norm_eps=1e-5,
    max_position_embeddings=8192,
)


# The MoE architectures (their config.json's computation-relevant fields, lorax's names).
MOE_MODELS = {
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6,
        max_position_embeddings=40960, qk_norm=True, round_expert_weights=True,
        num_experts=128, experts_per_token=8, expert_intermediate_size=768,
        normalize_expert_weights=True,
    ),
    "qwen15-moe-a27b": dict(
        model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632,
        num_layers=24, num_heads=16, num_kv_heads=16, head_dim=128, rms_norm_eps=1e-6,
        max_position_embeddings=8192, bias_projections=("q_proj", "k_proj", "v_proj"),
        round_expert_weights=True, num_experts=60, experts_per_token=4,
        expert_intermediate_size=1408, normalize_expert_weights=False,
        shared_expert_intermediate_size=5632,
    ),
    # DeepSeek-V2-Lite: latent attention (192/128-wide heads from a 512-wide latent), a dense
    # first layer, 64 experts top-6 beside 2 shared ones (RoPE plain: YaRN costs the same).
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        num_layers=27, num_heads=16, num_kv_heads=16, head_dim=192, rms_norm_eps=1e-6,
        max_position_embeddings=163840, kv_lora_rank=512, qk_rope_head_dim=64, v_head_dim=128,
        rope_interleave=True, num_experts=64, experts_per_token=6, expert_intermediate_size=1408,
        shared_expert_intermediate_size=2816, normalize_expert_weights=False,
        float32_router=True, dense_mlp_layers=(0,),
    ),
    "mixtral-8x7b": dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        max_position_embeddings=32768, num_experts=8, experts_per_token=2,
    ),
}  # fmt: skip
MODELS = ("llama31-8b", *MOE_MODELS)


def llama31_8b_config(**overrides: Any):
    """The benchmarked architecture as a ``lorax.config.ModelConfig`` (fields overridable)."""
    from lorax.config import ModelConfig, RopeConfig

    return ModelConfig(rope=RopeConfig(theta=500000.0), **{**LLAMA31_8B, **overrides})


def model_config(name: str, **overrides: Any):
    """``--model``'s architecture as a ``ModelConfig`` (fields overridable)."""
    from lorax.config import ModelConfig, RopeConfig

    if name == "llama31-8b":
        return llama31_8b_config(**overrides)
    return ModelConfig(rope=RopeConfig(theta=1e6), **{**MOE_MODELS[name], **overrides})


def build_model(
    num_layers: int | None = None,
    config_overrides: dict | None = None,
    sliding_window: int = 0,
    name: str = "llama31-8b",
):
    """The random-weight NF4 model of architecture ``name`` (``MODELS``); ``sliding_window``:
    every layer attends within that window (as Mistral's layers do), 0 for full causal
    attention. Every tensor a checkpoint of the architecture holds (``convert.names.
    tensor_specs``, the loaders' own list): projections (each expert's matrices too) NF4,
    norms ones, biases zeros, routers and gates N(0, 0.02) in bf16."""
    import jax
    import jax.numpy as jnp

    from convert.names import tensor_specs
    from lorax.model import Model
    from pallas_kernels.nf4 import quantize_nf4, stack

    fields = dict(config_overrides or {})
    if num_layers:
        fields["num_layers"] = num_layers
    config = model_config(name, **fields)
    if sliding_window:
        config = dataclasses.replace(config, layer_windows=(sliding_window,) * config.num_layers)

    @functools.partial(jax.jit, static_argnums=(1,))
    def random_nf4(k, shape):
        """NF4 matrices of ``shape`` (leading axes: a batch of them, e.g. experts, parts)."""
        w = (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(jnp.bfloat16)
        quantize = functools.partial(quantize_nf4, blocksize=64, double_quant=True)
        for _ in shape[:-2]:
            quantize = jax.vmap(quantize)
        return quantize(w)

    # Under jit the f32 normals stay inside one fusion: no f32 [V, D] temporary inflates the
    # process's peak-memory reading before training starts.
    @functools.partial(jax.jit, static_argnums=(1,))
    def random_dense(k, shape):
        return (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(jnp.bfloat16)

    def value(spec, k):
        shape = (*spec.stack, *spec.shape)
        if spec.quantizable:  # one layer at a time: no bf16 copy of every layer at once
            keys = jax.random.split(k, len(spec.layers))
            return stack([random_nf4(keys[i], shape) for i in range(len(spec.layers))])
        shape = (len(spec.layers), *shape) if spec.per_layer else shape
        if spec.path[-1] == "bias":
            return jnp.zeros(shape, jnp.bfloat16)
        if spec.path[-1].endswith("norm"):  # RMSNorm scales: input_layernorm, q_norm, norm...
            return (jnp.zeros if config.norm_style == "gemma" else jnp.ones)(shape, jnp.bfloat16)
        return random_dense(k, shape)

    # A path holds one tensor, or a stack of them (an MoE layer's experts): one value each.
    specs: dict = {}
    for spec in tensor_specs(config):
        specs.setdefault(spec.path, spec)
    keys = jax.random.split(jax.random.key(0), len(specs))
    params: dict = {}
    for spec, k in zip(specs.values(), keys, strict=True):
        node = params
        for part in spec.path[:-1]:
            node = node.setdefault(part, {})
        node[spec.path[-1]] = value(spec, k)
    return Model(params, config, None)


def run_case(
    shape: str,
    remat: str,
    attention: str,
    steps: int,
    warmup: int,
    chunk: int,
    num_layers: int | None,
    forward: dict | None = None,
    embeddings_on_host: bool = False,
    compiler_options: str = "default",
    prepare_kernel_weights: str | None = None,
    packed: int = 0,
    sliding_window: int = 0,
    model_name: str = "llama31-8b",
) -> dict:
    import jax
    import numpy as np
    from _common import packed_rows

    import lorax
    from lorax.model import ForwardOptions
    from lorax.train import make_optimizer
    from lorax.train.flops import device_peak_flops, peak_memory_bytes, train_flops_per_token
    from lorax.train.step import StepConfig, init_train_state, make_train_step

    b, s = (int(x) for x in shape.split("x"))
    t_import = time.perf_counter() - START
    model = build_model(num_layers, sliding_window=sliding_window, name=model_name)
    if embeddings_on_host:
        model = lorax.embeddings_to_host(model)
    if prepare_kernel_weights:
        model = prepare_model(model, prepare_kernel_weights)
    jax.block_until_ready(jax.tree_util.tree_leaves(model.params))
    t_load = time.perf_counter() - START
    lora = lorax.init_lora(model, rank=16, alpha=16, targets="all-linear", key=jax.random.key(1))
    opt = make_optimizer("adamw", 1e-4, max_grad_norm=None)
    state = init_train_state(lora, opt, key=jax.random.key(2))
    # The state holds its own copy of the adapters (steps donate it); the initial ones would
    # otherwise stay on the device for the whole run (160 MiB at this size) and count in the
    # peak like a training loop that kept them, which a training loop need not do.
    lora_targets = lora.config.targets
    del lora
    step = make_train_step(
        model,
        opt,
        StepConfig(
            loss_chunk_size=chunk or None,
            compiler_options=parse_compiler_options(compiler_options),
            forward=ForwardOptions(
                remat=remat,
                attention_impl=None if attention == "auto" else attention,
                **(forward or {}),
            ),
        ),
    )
    rng = np.random.default_rng(0)
    batches = []
    for i in range(4):
        ids = rng.integers(0, model.config.vocab_size, size=(1, b, s)).astype(np.int32)
        batch = {"input_ids": ids, "labels": ids}
        if packed:
            segment_ids, positions = packed_rows(b, s, packed, seed=i)
            batch.update(segment_ids=segment_ids[None], positions=positions[None])
        batches.append({key: jax.device_put(x) for key, x in batch.items()})
    times, losses = [], []
    first_step_done = None
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batches[i % 4])
        loss = float(metrics["loss"])  # blocks until the step is done
        dt = time.perf_counter() - t0
        if first_step_done is None:
            first_step_done = time.perf_counter() - START
        losses.append(loss)
        if i >= warmup:
            times.append(dt)
    median = statistics.median(times)
    tokens = b * s
    flops = (
        train_flops_per_token(model.config, s, remat=remat, lora_rank=16, lora_targets=lora_targets)
        * tokens
    )
    peak = device_peak_flops()
    mem = peak_memory_bytes()
    return {
        "model": model_name,
        "shape": shape,
        "remat": remat,
        "attention": attention,
        "forward": forward or {},
        "loss_chunk": chunk or "auto",
        "embeddings_on_host": embeddings_on_host,
        "prepare_kernel_weights": prepare_kernel_weights,
        "packed": packed,
        "sliding_window": sliding_window,
        "compiler_options": compiler_options,
        "tokens_per_s": tokens / median,
        "median_step_s": median,
        "min_step_s": min(times),
        "max_step_s": max(times),
        "tflops": flops / median / 1e12,
        "mfu": flops / median / peak if peak else None,
        "peak_mem_gib": mem / 2**30 if mem else None,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "import_s": t_import,
        "load_s": t_load - t_import,
        "start_to_first_step_s": first_step_done,
        "steps_timed": len(times),
    }


def parse_compiler_options(spec: str) -> tuple[tuple[str, Any], ...]:
    """``default`` (the step's, ``lorax.train.step.DEFAULT_COMPILER_OPTIONS``), ``none`` (XLA's
    own) or ``name=value,...`` (XLA ``DebugOptions``)."""
    if spec == "default":
        from lorax.train.step import DEFAULT_COMPILER_OPTIONS

        return DEFAULT_COMPILER_OPTIONS
    if spec == "none":
        return ()
    return tuple(parse_forward(spec, what="--compiler-options").items())


def prepare_model(model: Any, groups: str) -> Any:
    """``lorax.prepare_kernel_weights`` as ``--prepare-kernel-weights [GROUPS]`` asks: "all",
    or comma-separated group keys."""
    import lorax

    return lorax.prepare_kernel_weights(model, None if groups == "all" else groups.split(","))


def add_prepare_argument(p: argparse.ArgumentParser) -> None:
    """``--prepare-kernel-weights [GROUPS]``, the same in every script that builds the bench."""
    p.add_argument(
        "--prepare-kernel-weights",
        nargs="?",
        const="all",
        default=None,
        metavar="GROUPS",
        help="stack the NF4 weights in the Mosaic GPU kernel's layout once "
        "(lorax.prepare_kernel_weights): those projections then run on that kernel; "
        "optionally only some groups, comma-separated (e.g. q_proj+k_proj+v_proj,o_proj)",
    )


def parse_forward(spec: str | None, what: str = "--forward") -> dict[str, Any]:
    """`key=value,...` -> kwargs (ints, floats, true/false, none; anything else a string)."""
    out: dict[str, Any] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"{what} item {item!r} is not key=value")
        value: Any = raw.strip()
        low = value.lower()
        if low in ("none", "null"):
            value = None
        elif low in ("true", "false"):
            value = low == "true"
        else:
            for conv in (int, float):
                try:
                    value = conv(value)
                    break
                except ValueError:
                    pass
        out[key.strip()] = value
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="2x2048,1x8192")
    p.add_argument("--remat", default="none,offload", help="comma list of remat policies")
    p.add_argument("--attention", default="auto", help="comma list: auto, cudnn, pallas")
    p.add_argument("--cases", nargs="+", default=None, help="SHAPE@REMAT@ATTENTION ...")
    p.add_argument("--forward", default=None, help="ForwardOptions fields, key=value,...")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--chunk", type=int, default=0, help="loss chunk in tokens (0: auto)")
    p.add_argument("--layers", type=int, default=None, help="fewer layers (smoke runs)")
    p.add_argument(
        "--mem-fraction", default=None, help="XLA_PYTHON_CLIENT_MEM_FRACTION for each case"
    )
    p.add_argument(
        "--embeddings-on-host",
        action="store_true",
        help="keep the embedding table in pinned host memory (lorax.embeddings_to_host)",
    )
    p.add_argument(
        "--compiler-options",
        default="default",
        help="XLA options of the step: default (the step's), none (XLA's own) or name=value,...",
    )
    add_prepare_argument(p)
    p.add_argument("--packed", type=int, default=0, help="packed rows: mean example length")
    p.add_argument(
        "--sliding-window", type=int, default=0, help="every layer attends within this window"
    )
    p.add_argument("--model", default="llama31-8b", choices=MODELS)
    p.add_argument("--json", default=None)
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    forward = parse_forward(a.forward)
    if a.case:
        shape, remat, attention = a.case.split("@")
        result = run_case(
            shape, remat, attention, a.steps, a.warmup, a.chunk, a.layers, forward,
            embeddings_on_host=a.embeddings_on_host, compiler_options=a.compiler_options,
            prepare_kernel_weights=a.prepare_kernel_weights, packed=a.packed,
            sliding_window=a.sliding_window, model_name=a.model,
        )  # fmt: skip
        print("RESULT " + json.dumps(result), flush=True)
        return
    import jax

    rows = []
    env = dict(os.environ)
    if a.mem_fraction:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = a.mem_fraction
    print(f"jax {jax.__version__}, device {jax.devices()[0].device_kind}", flush=True)
    cases = (
        a.cases
        if a.cases
        else [
            f"{shape}@{remat}@{attn}"
            for shape in a.shapes.split(",")
            for remat in a.remat.split(",")
            for attn in a.attention.split(",")
        ]
    )
    for case in cases:
        shape, remat, attn = case.split("@")
        cmd = [
            sys.executable,
            __file__,
            "--case",
            case,
            "--steps",
            str(a.steps),
            "--warmup",
            str(a.warmup),
            "--chunk",
            str(a.chunk),
        ]
        if a.layers:
            cmd += ["--layers", str(a.layers)]
        if a.forward:
            cmd += ["--forward", a.forward]
        if a.embeddings_on_host:
            cmd += ["--embeddings-on-host"]
        if a.prepare_kernel_weights:
            cmd += ["--prepare-kernel-weights", a.prepare_kernel_weights]
        if a.packed:
            cmd += ["--packed", str(a.packed)]
        if a.sliding_window:
            cmd += ["--sliding-window", str(a.sliding_window)]
        cmd += ["--compiler-options", a.compiler_options, "--model", a.model]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        result = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not result:
            tail = (out.stderr or out.stdout).strip().splitlines()[-12:]
            print(f"{case}: FAILED\n  " + "\n  ".join(tail), flush=True)
            rows.append({"shape": shape, "remat": remat, "attention": attn, "error": tail[-1:]})
            continue
        r = json.loads(result[0][len("RESULT ") :])
        rows.append(r)
        print(
            f"{a.model} {shape:>7} remat={remat:<9} attn={attn:<6} {a.forward or ''} "
            f"{'host-emb ' if a.embeddings_on_host else ''}"
            f"{'prepared=' + a.prepare_kernel_weights + ' ' if a.prepare_kernel_weights else ''}"
            f"{'' if a.compiler_options == 'default' else 'xla=' + a.compiler_options + ' '}"
            f"{r['tokens_per_s']:8.0f} tok/s  "
            f"{r['tflops']:6.1f} TFLOP/s  mfu {r['mfu'] or 0:.3f}  "
            f"peak {r['peak_mem_gib'] or 0:.2f} GiB  first step at "
            f"{r['start_to_first_step_s']:.1f}s  loss {r['first_loss']:.4f}",
            flush=True,
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "device": jax.devices()[0].device_kind,
                    "jax": jax.__version__,
                    "date": datetime.date.today().isoformat(),
                    "rows": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
