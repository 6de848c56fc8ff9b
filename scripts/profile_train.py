"""Where a QLoRA training step's device time goes, by HLO op and by category.

Builds the end-to-end benchmark's workload (scripts/bench_train.py: Llama-3.1-8B architecture
or another of its ``--model``s, random NF4 weights, LoRA r=16 on every projection, AdamW),
warms the jitted step up, traces ``--steps`` steps with ``jax.profiler``, and reads the trace
back with ``jax.profiler.ProfileData``: every GPU kernel carries the HLO op it implements, and the
compiled module's text says what that op is (a cuBLAS GEMM, cuDNN attention, a Pallas kernel,
an elementwise fusion and which primitives it fuses, a host copy). The tables give milliseconds
per step, so the categories add up to the step time the benchmark reports (less idle gaps).
XLA's command buffers are off (``--command-buffers`` keeps them), so that every kernel shows
under its own op rather than inside a replayed buffer.

    python scripts/profile_train.py --case 2x2048:selective --json $OUT/profile.json
    python scripts/profile_train.py --case 1x8192:mlp:8,selective --forward mlp_chunk_tokens=4096

CPU smoke run (host ops instead of GPU kernels): ``--layers 2 --tiny``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import os
import re
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

TINY = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
)


def build_step(
    shape: str,
    remat: str,
    forward: dict,
    layers: int | None,
    tiny: bool,
    on_host: bool = False,
    prepare: str | None = None,
    model_name: str = "llama31-8b",
):
    import jax
    import numpy as np
    from bench_train import build_model, prepare_model

    import lorax
    from lorax.model import ForwardOptions
    from lorax.train import make_optimizer
    from lorax.train.step import StepConfig, init_train_state, make_train_step

    b, s = (int(x) for x in shape.split("x"))
    model = build_model(layers, TINY if tiny else None, name=model_name)
    if on_host:
        model = lorax.embeddings_to_host(model)
    if prepare:
        model = prepare_model(model, prepare)
    lora = lorax.init_lora(model, rank=16, alpha=16, targets="all-linear", key=jax.random.key(1))
    opt = make_optimizer("adamw", 1e-4, max_grad_norm=None)
    state = init_train_state(lora, opt, key=jax.random.key(2))
    options = ForwardOptions(remat=remat, **forward)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, b, s), np.int32)
    batch = {"input_ids": jax.device_put(ids), "labels": jax.device_put(ids)}
    # The library's own jitted step, lowered: its compiled module (and HLO text) in hand.
    step = make_train_step(model, opt, StepConfig(forward=options))
    compiled = step.lower(state, batch).compile()
    return (lambda st, bt: compiled(st, bt, model)), compiled, state, batch


# One HLO instruction line: name, result shape (a tuple in parentheses), opcode, operands.
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\((.*?)\)")


def hlo_index(hlo_text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Instruction name -> its HLO line, and computation name -> the opcodes it contains."""
    instructions: dict[str, str] = {}
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        head = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and "=" not in line.split("{")[0]:
            current = head.group(1)
            computations[current] = []
            continue
        m = INSTRUCTION.match(line)
        if m:
            instructions[m.group(1)] = line.strip()
            if current is not None:
                computations[current].append(m.group(3))
    return instructions, computations


_ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4}


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string, tuples summed (``(bf16[2,3]{1,0}, f32[4]{0})`` -> 28)."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape):
        if dtype in _ELEMENT_BYTES:
            total += _ELEMENT_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _result_shape(text: str) -> str:
    m = INSTRUCTION.match(text)
    return m.group(2) if m else ""


def fusion_bytes(op: str, instructions: dict[str, str]) -> int | None:
    """What one run of fusion ``op`` reads and writes: its operands' and result's bytes.

    An upper bound where a fusion reads only part of an operand (a dynamic slice of a stacked
    scan buffer); None for anything but a fusion.
    """
    m = INSTRUCTION.match(instructions.get(op, ""))
    if not m or m.group(3) != "fusion":
        return None
    operands = re.findall(r"%([\w.\-]+)", m.group(4))
    return shape_bytes(m.group(2)) + sum(
        shape_bytes(_result_shape(instructions.get(name, ""))) for name in operands
    )


def describe_kernel(kernel: str) -> tuple[str, str]:
    """(category, kernel) from the GPU kernel's name alone, for ops the HLO text does not name
    (the runtime renames some custom calls, e.g. inside command buffers)."""
    name = kernel.lower()
    if any(k in name for k in ("nvjet", "gemm", "xmma", "cutlass", "cublas")):
        return "matmul (cuBLAS)", kernel
    if any(k in name for k in ("sdpa", "fmha", "flash", "cudnn")):
        return "attention (cuDNN)", kernel
    return "other", kernel


# An MoE layer's routing (sorting rows by expert, gathering them, scattering them back), as an
# op or as the root of a fusion (embedding lookups and label picks are gathers too).
ROUTING_OPS = frozenset(("sort", "gather", "scatter"))


def describe(op: str, instructions: dict, computations: dict, kernel: str = "") -> tuple[str, str]:
    """(category, short description) of one HLO op from its instruction text."""
    text = instructions.get(op, "")
    if not text:
        return describe_kernel(kernel)
    m = INSTRUCTION.match(text)
    shape, opcode = (m.group(2), m.group(3)) if m else ("", "")
    shape = shape.strip("(").split(", ")[0]
    called = re.search(r"calls=%?([\w.\-]+)", text)
    body = collections.Counter(computations.get(called.group(1), []) if called else [])
    summary = ",".join(k for k, _ in body.most_common(6))
    target = re.search(r'custom_call_target="([^"]+)"', text)
    target = target.group(1) if target else ""
    if opcode == "custom-call":
        if "cublas" in target:
            return "matmul (cuBLAS)", shape
        if "cudnn" in target or "fmha" in target or op.startswith("dot_product_attention"):
            return "attention (cuDNN)", shape
        if "triton" in target or "mosaic" in target:
            return "Pallas kernel", shape
        return "other custom calls", f"{target} {shape}"
    if opcode in ("copy-start", "copy-done") or "S(5)" in text:
        return "host offload copies", shape
    if opcode in ("all-reduce", "all-gather", "reduce-scatter", "collective-permute"):
        return "collectives", shape
    if opcode == "fusion" and "kind=kCustom" in text and "dot" in body:
        return "matmul (XLA Triton GEMM fusions)", f"{shape} [{summary}]"
    if "dequantize_nf4" in text:  # its op name (metadata): the codebook lookup is a gather
        return "NF4 decode", f"{shape} [{summary}]"
    root = computations.get(called.group(1), [opcode])[-1] if called else opcode
    if opcode in ROUTING_OPS or root in ROUTING_OPS:  # the fusion's output is routed rows
        return "sorts, gathers, scatters", f"{shape} [root {root}: {summary}]"
    if "dynamic-update-slice" in body or opcode in ("copy", "dynamic-update-slice"):
        return "copies / slices", f"{shape} [{summary}]"
    if "reduce" in body or opcode == "reduce":
        return "reduction fusions", f"{shape} [{summary}]"
    return "elementwise fusions", f"{shape} [{summary}]"


def device_events(trace_dir: str) -> tuple[list[tuple[str, str, float]], str]:
    """(hlo_op, kernel name, microseconds) of every device-side event, and the plane read."""
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not files:
        raise RuntimeError(f"no .xplane.pb under {trace_dir}")
    data = ProfileData.from_file(files[-1])
    events = []
    planes = [p for p in data.planes if p.name.startswith("/device:")]
    for plane in planes or [p for p in data.planes if p.name == "/host:CPU"]:
        for line in plane.lines:
            for ev in line.events:
                stats = dict(ev.stats)
                op = stats.get("hlo_op")
                if op is None and not planes:
                    continue  # host threads: only XLA's own ops
                events.append((str(op or "-"), ev.name, ev.duration_ns / 1e3))
    return events, ",".join(p.name for p in planes) or "/host:CPU"


def main() -> None:
    from bench_train import MODELS, add_prepare_argument, parse_forward  # no jax at import

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--case", default="2x2048:selective", help="SHAPE:REMAT (remat may be a schedule)"
    )
    p.add_argument("--model", default="llama31-8b", choices=MODELS, help="bench_train's")
    p.add_argument("--forward", default=None, help="extra ForwardOptions, key=value,...")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--tiny", action="store_true", help="tiny widths (CPU smoke run)")
    p.add_argument("--json", default=None)
    p.add_argument("--hlo", default=None, help="also write the optimized HLO text here")
    p.add_argument(
        "--embeddings-on-host", action="store_true", help="lorax.embeddings_to_host, as bench_train"
    )
    add_prepare_argument(p)
    p.add_argument("--compile-only", action="store_true", help="memory analysis, no trace")
    p.add_argument(
        "--command-buffers",
        action="store_true",
        help="keep XLA's GPU command buffers (the trace then shows buffers, not kernels)",
    )
    a = p.parse_args()
    if not a.command_buffers and "xla_gpu_enable_command_buffer" not in os.environ.get(
        "XLA_FLAGS", ""
    ):
        # Command buffers replay captured kernels under one op name: the per-op table would
        # be a single "command_buffer" row. Off (before jax starts), every kernel is its op.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="
        ).strip()

    import jax

    shape, remat = a.case.split(":", 1)
    forward = parse_forward(a.forward)
    step, compiled, state, batch = build_step(
        shape,
        remat,
        forward,
        a.layers,
        a.tiny,
        a.embeddings_on_host,
        a.prepare_kernel_weights,
        a.model,
    )
    hlo_text = compiled.as_text()
    memory = compiled.memory_analysis()
    if a.hlo and hlo_text:
        with open(a.hlo, "w") as f:
            f.write(hlo_text)
    if a.compile_only:
        print(f"{a.case} {a.forward or ''}: {memory}")
        return
    for _ in range(a.warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)

    trace_dir = tempfile.mkdtemp(prefix="lorax-profile-")
    t0 = time.perf_counter()
    jax.profiler.start_trace(trace_dir)
    for _ in range(a.steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    jax.profiler.stop_trace()
    wall_ms = (time.perf_counter() - t0) * 1e3 / a.steps

    events, plane = device_events(trace_dir)
    instructions, computations = hlo_index(hlo_text)
    by_op: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.Counter()
    kernel_of: dict[str, str] = {}
    for op, kernel, us in events:
        by_op[op] += us / a.steps
        calls[op] += 1
        kernel_of.setdefault(op, kernel)
    by_cat: dict[str, float] = collections.defaultdict(float)
    rows = []
    for op, us in sorted(by_op.items(), key=lambda kv: -kv[1]):
        cat, desc = describe(op, instructions, computations, kernel_of[op])
        by_cat[cat] += us
        rows.append(
            dict(
                op=op,
                category=cat,
                ms_per_step=us / 1e3,
                calls_per_step=calls[op] / a.steps,
                kernel=kernel_of[op][:80],
                what=desc[:160],
                bytes_per_run=fusion_bytes(op, instructions),
            )
        )
    busy = sum(by_cat.values())
    temp = getattr(memory, "temp_size_in_bytes", 0) / 2**30
    args = getattr(memory, "argument_size_in_bytes", 0) / 2**30
    print(f"compiled: arguments {args:.2f} GiB, temporaries {temp:.2f} GiB")
    print(
        f"\n{a.case} {a.forward or ''}: {wall_ms:.1f} ms/step wall (traced), "
        f"{busy / 1e3:.1f} ms/step device-busy, plane {plane}"
    )
    print("\n| category | ms/step | share of busy |\n|---|---:|---:|")
    for cat, us in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"| {cat} | {us / 1e3:.2f} | {us / busy:.1%} |")
    print(
        "\n| op | category | ms/step | calls/step | TB/s (fusions) | what |"
        "\n|---|---|---:|---:|---:|---|"
    )
    for r in rows[: a.top]:
        rate = (
            f"{r['bytes_per_run'] * r['calls_per_step'] / (r['ms_per_step'] * 1e-3) / 1e12:.2f}"
            if r["bytes_per_run"] and r["ms_per_step"]
            else "-"
        )
        print(
            f"| {r['op']} | {r['category']} | {r['ms_per_step']:.2f} | "
            f"{r['calls_per_step']:.0f} | {rate} | {r['what']} |"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                dict(
                    case=a.case,
                    forward=a.forward,
                    device=jax.devices()[0].device_kind,
                    jax=jax.__version__,
                    wall_ms_per_step=wall_ms,
                    busy_ms_per_step=busy / 1e3,
                    categories={k: v / 1e3 for k, v in by_cat.items()},
                    ops=rows,
                    argument_gib=args,
                    temp_gib=temp,
                ),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
