"""Grouped (per-expert) matmuls on the GPU: which implementation an MoE layer should use.

An MoE projection multiplies rows sorted by expert, each group by its own expert's weight.
XLA's ``ragged_dot`` is the portable op, but how the GPU runs it depends on the lowering: XLA's
default rewrites it into a dense dot over zero-padded groups (E times the FLOPs); jax can lower
it through a Pallas Triton kernel (``jax_ragged_dot_use_gpu_pallas_triton_lowering``); newer
XLAs can hand it to cuDNN (``--xla_gpu_experimental_use_ragged_dot_fusion``); and jax ships a
Mosaic GPU grouped-matmul kernel (``jax.experimental.pallas.ops.gpu.ragged_dot_mgpu``). This
times each on the expert projections of Mixtral-8x7B (``--model mixtral``: E = 8 experts of
width 14336, top-2) or Qwen3-30B-A3B (``qwen3``: 128 experts of width 768, top-8), both
orientations the training step needs (``x·W_eᵀ`` forward, ``dy·W_e`` for dx), against the bf16
cuBLAS dot of the same FLOPs (one dense matrix: the ceiling), and checks each against a
float32 reference computed one group at a time.

Then ``--layer``: one whole MoE MLP (router, sort, gate/up, SwiGLU, down, combine), NF4 experts
and r=16 LoRA on both expert projections, forward+backward, as lorax runs it, once per way of
running the LoRA products (``--lora-products dense,chunked``; see
``pallas_kernels.expert_matmul``), and once without LoRA.

Usage: ``python scripts/bench_moe.py [--model mixtral|qwen3|tiny] [--tokens 4096,8192]
[--impls xla,triton,mosaic,cudnn] [--layer | --layer-only] [--lora-products dense,chunked]
[--no-sweep | --sweep qwen3] [--child-timeout S]``; ``--no-sweep`` times lorax's own call (its
tiles as it lowers them), a child's rows and progress stream as they are measured. Each
implementation runs in a child process of its own (``cudnn`` is XLA's lowering with that flag
set before jax starts; a jax whose XLA lacks the flag reports that instead of rows; ``triton``
sets jax's config flag). ``mosaic`` sweeps a few tile configs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class MoEShape:
    """A model's MoE MLP: hidden size, expert width, experts, experts per token."""

    d: int
    f: int
    experts: int
    top_k: int

    def projections(self) -> tuple[tuple[str, int, int], ...]:
        """(name, K, N) of the two expert projections, HF [out, in] = [N, K]."""
        return (("gate_up", self.d, 2 * self.f), ("down", self.f, self.d))


MODELS = {
    "mixtral": MoEShape(4096, 14336, 8, 2),  # Mixtral-8x7B
    "qwen3": MoEShape(2048, 768, 128, 8),  # Qwen3-30B-A3B
    "tiny": MoEShape(256, 128, 32, 4),  # a smoke run on a CPU
}
CUDNN_FLAG = "--xla_gpu_experimental_use_ragged_dot_fusion=true"
ROW = "ROW "
PROGRESS = "PROGRESS "
STARTED = time.perf_counter()


def group_sizes(shape: MoEShape, tokens: int, seed: int = 0):
    """Expert group sizes of a random top-k routing of ``tokens`` tokens (about balanced)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(tokens, shape.experts))
    top = np.argsort(-logits, axis=1)[:, : shape.top_k].reshape(-1)
    return np.bincount(top, minlength=shape.experts).astype(np.int32)


# ``--sweep qwen3``: tiles for many small groups (Qwen3-30B-A3B: ~512 rows per expert at 8192
# tokens, K or N 768). The kernel runs cdiv(M, block_m) + E - 1 row tiles (a tile per group
# boundary), so smaller block_m wastes less at E = 128; shared memory bounds the rest.
QWEN3_SWEEP = (
    dict(),
    dict(block_m=64),
    dict(block_m=64, block_n=256, max_concurrent_steps=4),
    dict(block_m=64, block_k=128, max_concurrent_steps=4),
    dict(block_m=64, max_concurrent_steps=6),
    dict(grid_block_n=1),
)
MOSAIC_CONFIGS = (
    dict(),  # MosaicRaggedConfig's defaults: the winner of the sweep below (run 116)
    # Run 116's sweep at 8192 tokens (% of the dense dot): 4 steps in flight, grid_block_n=1
    # (jax's example tiles, the defaults then) 65-67%; 5 steps, grid_block_n=4 82-88%;
    # block_m=64, block_n=256 74-77%; block_n=256 with 3 steps 19-23%.
    dict(max_concurrent_steps=4, grid_block_n=1),
)


def mosaic_ragged(lhs, w, sizes, *, transpose_rhs: bool, config: dict | None):
    """jax's Mosaic grouped matmul as lorax calls it (``expert_matmul._weight_product``: the
    same lowering of ``grid_block_n`` to a divisor of the column tiles), with ``config``'s
    tiles, or lorax's own for this many experts (None)."""
    from pallas_kernels import expert_matmul as em

    e, n, k = w.shape
    tiles = em.default_tiles(e, n, k) if config is None else em.MosaicRaggedConfig(**config)
    plan = em._Plan("mosaic", tiles, "dense")
    return em._weight_product(plan, lhs, w, sizes, em._NT if transpose_rhs else em._NN)


def run_impl(shape: MoEShape, impl: str, tokens_list: list[int]) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from _common import pipelined_ms

    from pallas_kernels.expert_matmul import _NN, _NT

    if impl == "triton":
        jax.config.update("jax_ragged_dot_use_gpu_pallas_triton_lowering", True)
    rows = []
    for tokens in tokens_list:
        m = tokens * shape.top_k
        sizes = jnp.asarray(group_sizes(shape, tokens))
        for name, k, n in shape.projections():
            keys = jax.random.split(jax.random.key(0), 3)
            x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
            w = (0.02 * jax.random.normal(keys[1], (shape.experts, n, k))).astype(jnp.bfloat16)
            dy = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
            refs = {}
            for direction, config in itertools.product(
                ("fwd", "dx"), MOSAIC_CONFIGS if impl == "mosaic" else (None,)
            ):
                lhs = x if direction == "fwd" else dy
                ref = refs.get(direction)
                if impl == "mosaic":
                    fn = functools.partial(
                        mosaic_ragged, transpose_rhs=direction == "fwd", config=config
                    )
                    call = jax.jit(lambda lhs, w, s, fn=fn: fn(lhs, w, s))
                else:
                    dims = _NT if direction == "fwd" else _NN
                    call = jax.jit(
                        lambda lhs, w, s, dims=dims: jax.lax.ragged_dot_general(
                            lhs, w, s, dims, preferred_element_type=jnp.bfloat16
                        )
                    )
                reference = functools.partial(
                    grouped_reference, sizes=tuple(int(g) for g in sizes), fwd=direction == "fwd"
                )
                tiles = "(lorax's tiles)" if config is None else json.dumps(config)
                tag = f"mosaic {tiles}" if impl == "mosaic" else impl
                row = dict(impl=tag, tokens=tokens, proj=name, dir=direction)
                progress(f"{name} {direction} {tag}")
                try:
                    out = call(lhs, w, sizes)
                    if ref is None:
                        ref = refs[direction] = reference(lhs, w)
                    err = float(
                        jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref)
                    )
                    ms = pipelined_ms(call, lhs, w, sizes)
                    flops = 2.0 * m * n * k
                    row |= dict(ms=ms, tflops=flops / ms / 1e9, rel_l2=err)
                except Exception as e:  # a lowering this jax lacks: report, go on
                    row |= dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
                emit(row)
                rows.append(row)
    return rows


def grouped_reference(lhs, w, sizes: tuple[int, ...], fwd: bool):
    """The float32 products one group at a time (static sizes: one dot per expert). XLA's
    own ragged dot would pad every group to all rows: 51 GB at Qwen3-30B-A3B's 8192 tokens."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def run(lhs, w):
        outs, start = [], 0
        for e, size in enumerate(sizes):
            rows = lhs[start : start + size].astype(jnp.float32)
            we = w[e].astype(jnp.float32)
            outs.append(rows @ (we.T if fwd else we))
            start += size
        return jnp.concatenate(outs)

    return run(lhs, w)


def progress(message: str) -> None:
    """A child's progress line, relayed with the seconds since it started."""
    print(f"{PROGRESS}{time.perf_counter() - STARTED:.0f} s: {message}", flush=True)


def emit(row: dict) -> None:
    """A child's row, on its own line as it is measured: what a timeout cuts keeps the rest."""
    print(ROW + json.dumps(row), flush=True)


def ceiling(shape: MoEShape, tokens_list: list[int]) -> list[dict]:
    """bf16 cuBLAS dots of the same FLOPs: [M, K] x one dense [N, K] matrix (a child of its
    own, as every implementation: a parent holding GPU memory starves the children, whose
    allocations then fail — runs 120-121's down-projection child)."""
    import jax
    import jax.numpy as jnp
    from _common import pipelined_ms

    rows = []
    for tokens in tokens_list:
        m = tokens * shape.top_k
        for name, k, n in shape.projections():
            x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
            w = jax.random.normal(jax.random.key(1), (n, k), jnp.bfloat16)
            dy = jax.random.normal(jax.random.key(2), (m, n), jnp.bfloat16)
            for direction, lhs, spec in (("fwd", x, "mk,nk->mn"), ("dx", dy, "mn,nk->mk")):
                call = jax.jit(lambda a, b, spec=spec: jnp.einsum(spec, a, b))
                ms = pipelined_ms(call, lhs, w)
                row = dict(impl="dense dot", tokens=tokens, proj=name, dir=direction, ms=ms,
                           tflops=2.0 * m * n * k / ms / 1e9)  # fmt: skip
                emit(row)
                rows.append(row)
    return rows


def layer(
    shape: MoEShape, tokens_list: list[int], impl: str, lora_products: list[str]
) -> list[dict]:
    """One MoE MLP as lorax runs it: NF4 experts, LoRA r=16 on both (each way of running its
    products, then none), forward+backward."""
    import jax
    import jax.numpy as jnp
    from _common import pipelined_ms

    from lorax.moe import moe_mlp
    from pallas_kernels.nf4 import quantize_nf4

    d, f, e, k_top = shape.d, shape.f, shape.experts, shape.top_k

    keys = jax.random.split(jax.random.key(0), 8)
    quantize = jax.vmap(jax.vmap(quantize_nf4))
    layer_params = {
        "router": {"weight": 0.02 * jax.random.normal(keys[0], (e, d), jnp.bfloat16)},
        "experts_gate_up_proj": {
            "weight": quantize(0.02 * jax.random.normal(keys[1], (e, 2, f, d), jnp.bfloat16))
        },
        "experts_down_proj": {
            "weight": jax.vmap(quantize_nf4)(0.02 * jax.random.normal(keys[2], (e, d, f)))
        },
    }
    r = 16
    adapters = {
        "experts_gate_up_proj": {
            "lora_a": 0.01 * jax.random.normal(keys[3], (e, r, d)),
            "lora_b": 0.01 * jax.random.normal(keys[4], (e, 2 * f, r)),
        },
        "experts_down_proj": {
            "lora_a": 0.01 * jax.random.normal(keys[5], (e, r, f)),
            "lora_b": 0.01 * jax.random.normal(keys[6], (e, d, r)),
        },
    }
    rows = []
    for tokens, products in itertools.product(tokens_list, [*lora_products, "no LoRA"]):
        x = jax.random.normal(keys[7], (1, tokens, d), jnp.bfloat16)
        used = {} if products == "no LoRA" else adapters

        # The frozen weights are an argument, not a closure: as constants, XLA would fold their
        # NF4 decode into the compile (run 123: Mixtral's took minutes) and time no decode.
        def loss(adapters, x, layer_params, products=products):
            out = moe_mlp(
                x, layer_params, adapters, num_experts=e, experts_per_token=k_top,
                activation=jax.nn.silu, lora_scale=1.0, impl=impl,
                lora_products=None if products == "no LoRA" else products,
            )  # fmt: skip
            return jnp.sum(out.astype(jnp.float32) ** 2)

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        progress(f"layer, LoRA {products}: compiling")
        step = step.lower(used, x, layer_params).compile()
        progress(f"layer, LoRA {products}: compiled, timing")
        ms = pipelined_ms(step, used, x, layer_params)
        # Bitwise the same twice? (An atomic scatter-add in a gradient would not be.)
        first, second = step(used, x, layer_params), step(used, x, layer_params)
        same = all(
            bool(jnp.array_equal(a, b))
            for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True)
        )
        # Base GEMMs: 3 per projection pair forward (gate/up, down) and dx backward: 2x fwd.
        flops = 2.0 * 2 * tokens * k_top * 3 * f * d
        row = dict(impl=f"moe layer fwd+bwd ({impl}, LoRA {products})", tokens=tokens, ms=ms,
                   tflops=flops / ms / 1e9, deterministic=same)  # fmt: skip
        emit(row)
        rows.append(row)
    return rows


def run_child(impl: str, argv: list[str], env: dict, timeout: float) -> list[dict]:
    """The child's rows, printed as they arrive; a failure or timeout keeps those so far."""
    with tempfile.TemporaryFile("w+") as errors:
        child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
        timer = threading.Timer(timeout, child.kill)
        timer.start()
        rows = []
        for line in child.stdout:
            if line.startswith(PROGRESS):
                print(f"  {impl}, {line[len(PROGRESS) :].rstrip()}", flush=True)
            if line.startswith(ROW):
                row = json.loads(line[len(ROW) :])
                row = dict(row, impl=row["impl"].replace("xla", impl, 1))
                print(row, flush=True)
                rows.append(row)
        code = child.wait()
        timer.cancel()
        if code:
            errors.seek(0)
            print(f"{impl}: FAILED (exit {code}, timeout {timeout} s): {errors.read()[-1500:]}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mixtral", choices=sorted(MODELS))
    parser.add_argument("--tokens", default="4096,8192")
    parser.add_argument("--lora-products", default="dense,chunked")
    parser.add_argument("--no-sweep", action="store_true", help="Mosaic: lorax's tiles only")
    parser.add_argument("--sweep", choices=["qwen3"], default=None, help="Mosaic: these tiles")
    parser.add_argument("--child-timeout", type=float, default=400)
    parser.add_argument("--impls", default="xla,triton,mosaic,cudnn")
    parser.add_argument("--layer", action="store_true")
    parser.add_argument("--layer-only", action="store_true", help="--layer, without the matmuls")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    shape = MODELS[args.model]
    if args.child == "dense":
        ceiling(shape, tokens)
        return
    if args.child:
        impl = "xla" if args.child == "cudnn" else args.child
        global MOSAIC_CONFIGS
        MOSAIC_CONFIGS = (None,) if args.no_sweep else MOSAIC_CONFIGS
        MOSAIC_CONFIGS = QWEN3_SWEEP if args.sweep == "qwen3" else MOSAIC_CONFIGS
        if not args.layer_only:
            run_impl(shape, impl, tokens)
        if args.layer or args.layer_only:
            layer(shape, tokens, impl, args.lora_products.split(","))
        return
    print(f"model {args.model}: {shape}", flush=True)
    # One process per implementation (the dense ceiling too): a lowering flag, a failed
    # compile or the memory a process holds stays in its own; this one never starts jax.
    rows = []
    for impl in ["dense", *args.impls.split(",")]:
        env = dict(os.environ)
        if impl == "cudnn":
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {CUDNN_FLAG}"
        argv = [sys.executable, __file__, "--child", impl, "--tokens", args.tokens,
                "--model", args.model, "--lora-products", args.lora_products]  # fmt: skip
        argv += ["--layer"] * args.layer + ["--layer-only"] * args.layer_only
        argv += ["--no-sweep"] * args.no_sweep
        argv += ["--sweep", args.sweep] if args.sweep else []
        rows += run_child(impl, argv, env, args.child_timeout)
    dense = {(r["tokens"], r.get("proj"), r.get("dir")): r["tflops"] for r in rows
             if r["impl"] == "dense dot"}  # fmt: skip
    # Last column: the error against float32 (a grouped matmul), or whether a layer's step
    # repeats bitwise (a layer).
    print("\n| impl | tokens | proj | dir | ms | TFLOP/s | % of dense | rel L2 / repeats |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['impl']} | {r['tokens']} | {r.get('proj')} | {r.get('dir')} | "
                  f"{r['error']} | | | |")  # fmt: skip
            continue
        share = dense.get((r["tokens"], r.get("proj"), r.get("dir")))
        pct = f"{100 * r['tflops'] / share:.0f}%" if share and r["impl"] != "dense dot" else ""
        repeats = r.get("deterministic", "")
        print(f"| {r['impl']} | {r['tokens']} | {r.get('proj', '')} | {r.get('dir', '')} | "
              f"{r['ms']:.3f} | {r['tflops']:.0f} | {pct} | {r.get('rel_l2', ''):.3g} |"
              if "rel_l2" in r else
              f"| {r['impl']} | {r['tokens']} | {r.get('proj', '')} | {r.get('dir', '')} | "
              f"{r['ms']:.3f} | {r['tflops']:.0f} | {pct} | {repeats} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
