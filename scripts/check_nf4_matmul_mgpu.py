"""Correctness and speed of the Mosaic GPU NF4 matmul (``pallas_kernels.nf4_matmul_mgpu``, issue 4).

For each Llama-8B projection shape ``K×N`` and token count M: the kernel's ``y = x·Wᵀ`` (bf16
x, double-quantized NF4 W, float32 accumulation) against the float32-accumulated dot of x with
the jnp-decoded W (relative L2 error ~2.9e-3: the kernel's weights are within one ulp of the
reference's), and against the dot with the kernel's own decoded weights
(``dequantize_prepared``; only the bf16 output rounding is left, ~1.6e-3, so a wrong nibble or
scale part shows), then pipelined timings (median, dispatch hidden,
``_common.pipelined_ms``) in TFLOP/s of 2·M·N·K and as % of

  (a) ``bf16 dot``:  ``jnp.dot`` with a dense bf16 W of the same shape (cuBLAS, the ceiling;
      bf16 out of a float32 accumulator, as the kernel writes: ``--f32-out-dot`` adds the
      float32-result-then-cast dot these rows used before, which costs an extra output pass),
  (b) ``xla deq+dot``: ``dequantize_nf4`` by XLA, then the same dot (what ``variant="xla"`` runs),

for each kernel config twice: ``mgpu+prep`` takes the NF4Tensor (the rewrite into the quad
layout, ``prepare_weight``, runs every call) and ``mgpu`` a weight prepared once (kernel only).

``--direction fwd,bwd`` (default both) also times the backward orientation ``dx = dy·W``
(``nf4_matmul_t_mgpu``, dy ``[M, N]`` bf16, N the reduction) on the same prepared weight,
against (a) ``dy @ W`` with a dense bf16 W and (b) XLA's decode-then-``dy @ W``; its rows say
``bwd``.

Each config runs in its own subprocess with a timeout (``--timeout``, default 150 s): a config
that fails to lower prints its error's first lines, one that hangs (a kernel deadlock) is killed
(after ``--stall-s``, default 60 s, without output), and the sweep goes on; no subprocess starts
or runs past ``--budget-s`` (default 540 s, under a 10-minute call). The default config is the
kernel's default (``m256s2``: 256-token tiles, 2 ring slots, one persistent CTA per SM).

    python scripts/check_nf4_matmul_mgpu.py [--ms 4096,8192] [--shapes 4096x4096,4096x1024,...]
        [--configs m256s2,m256s2-tile] [--direction fwd,bwd] [--timeout 150]
        [--stall-s 60] [--budget-s 540]

CPU smoke test of the script itself (the kernel in the Mosaic GPU interpreter)::

    JAX_PLATFORMS=cpu python scripts/check_nf4_matmul_mgpu.py --interpret --ms 64 \
        --shapes 128x128 --configs m64s4 --direction bwd --stall-s 200
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

# Named configs (keyword arguments of MgpuNF4Config), the default first.
CONFIGS = {
    "m256s2": dict(block_m=256, slots=2),  # persistent: one CTA per SM
    "m256s2-tile": dict(block_m=256, slots=2, persistent=False),  # one CTA per output tile
    "m192s3": dict(block_m=192, slots=3),
    "m128s4": dict(block_m=128, slots=4),  # half the flops per decoded weight
    "m64s4": dict(block_m=64, slots=4),  # least amortization: the decode cost
    "m64s8": dict(block_m=64, slots=8),  # decode-sized M: 8 tiles of W in flight per CTA
    # Output tiles in groups of 4 / 8 token tiles (token tiles fastest): W tiles shared in L2.
    "m256s2g4": dict(block_m=256, slots=2, group_m=4),
    "m256s2g8": dict(block_m=256, slots=2, group_m=8),
    # The most registers the compute warpgroups can take (2·128·240 + 128·24 <= 64K).
    "m256s2r240": dict(block_m=256, slots=2, compute_registers=240, memory_registers=24),
}
SHAPES = "4096x4096,4096x1024,4096x14336,14336x4096"  # K x N (q/o, k/v, gate/up, down)
# Also useful: 4096x6144 (q/k/v stacked) and 4096x28672 (gate/up stacked: a 58 MB W, > L2).
DEFAULT_CONFIGS = "m256s2"


def _row(label: str, flops: float, ms: float, base_ms: float | None, extra: str = "") -> str:
    pct = f"{100 * base_ms / ms:6.1f}%" if base_ms else "    - "
    return f"  {label:<22} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s {pct} {extra}"


def _shapes(args) -> list[tuple[str, int, int, int]]:
    """``(direction, M, K, N)`` for every direction, M and shape asked for."""
    out = []
    for direction in (d for d in args.direction.split(",") if d):
        for m in (int(v) for v in args.ms.split(",") if v):
            for shape in (s for s in args.shapes.split(",") if s):
                k, n = (int(v) for v in shape.split("x"))
                out.append((direction, m, k, n))
    return out


def _label(direction: str, m: int, k: int, n: int) -> str:
    return f"{direction} M={m} K={k} N={n}"


def _baseline_worker(args) -> None:
    """(a) and (b) for every shape; their ms go to ``args.out`` for the % columns."""
    import jax
    import jax.numpy as jnp
    from _common import nf4_matmul_inputs, pipelined_ms

    from pallas_kernels.nf4 import dequantize_nf4

    print(f"== baselines on {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)

    # y = x·Wᵀ, dx = dy·W: bf16 out of cuBLAS's float32 accumulator, as the kernel and the
    # model's dots write it. A float32 result cast afterwards is not fused into the GEMM: an
    # extra pass over the output, which inflated (a) and (b) before 2026-11-29 (10th session).
    def oriented(direction, out_dtype):
        def dot(x, w):
            w = w.T if direction == "fwd" else w
            return jnp.dot(x, w, preferred_element_type=out_dtype).astype(x.dtype)

        return dot

    result = {}
    for direction, m, k, n in _shapes(args):
        dot = jax.jit(oriented(direction, jnp.bfloat16))
        dot_f32_out = jax.jit(oriented(direction, jnp.float32))
        deq = jax.jit(lambda x, w, dot=dot: dot(x, dequantize_nf4(w, x.dtype)))
        x, w16, w = nf4_matmul_inputs(m, n if direction == "bwd" else k, k, n)
        flops = 2 * m * n * k
        t_dot = pipelined_ms(dot, x, w16)
        t_deq = pipelined_ms(deq, x, w)
        result[_label(direction, m, k, n)] = {"dot": t_dot, "deq": t_deq}
        print(_label(direction, m, k, n), flush=True)
        print(_row("(a) bf16 dot", flops, t_dot, t_dot), flush=True)
        print(_row("(b) xla deq+dot", flops, t_deq, t_dot), flush=True)
        if args.f32_out_dot:
            t = pipelined_ms(dot_f32_out, x, w16)
            print(_row("    f32 out, then cast", flops, t, t_dot), flush=True)
        del x, w16, w
    with open(args.out, "w") as f:
        json.dump(result, f)


def _config_worker(args) -> None:
    """One config: error and timings on every shape, each shape in try/except."""
    import jax
    import jax.numpy as jnp
    from _common import nf4_matmul_inputs, pipelined_ms

    from pallas_kernels.nf4 import dequantize_nf4
    from pallas_kernels.nf4_matmul_mgpu import (
        MgpuNF4Config,
        dequantize_prepared,
        nf4_matmul_mgpu,
        nf4_matmul_t_mgpu,
        prepare_weight,
    )

    base = {}
    if args.base and os.path.exists(args.base):
        with open(args.base) as f:
            base = json.load(f)
    config = MgpuNF4Config(**CONFIGS[args.worker])
    ops = {"fwd": nf4_matmul_mgpu, "bwd": nf4_matmul_t_mgpu}
    interpret = None
    if args.interpret:  # CPU smoke test of this script
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        interpret = InterpretGPUParams()
    print(f"== config {args.worker}: {config}", flush=True)
    f32 = jnp.float32

    def oriented(x, w16, forward):
        return jnp.dot(x, w16.T if forward else w16, preferred_element_type=f32)

    references = {  # (the NF4 reference's weights, the kernel's own decoded weights)
        d: (
            jax.jit(lambda x, w, t=d == "fwd": oriented(x, dequantize_nf4(w, x.dtype), t)),
            jax.jit(lambda x, p, t=d == "fwd": oriented(x, dequantize_prepared(p), t)),
        )
        for d in ("fwd", "bwd")
    }
    fns, failed = {}, set()
    for direction, m, k, n in _shapes(args):
        if direction in failed:
            continue
        if direction not in fns:
            kernel = functools.partial(ops[direction], config=config, interpret=interpret)
            fns[direction] = (jax.jit(kernel), jax.jit(kernel))
        with_prep, prepared_fn = fns[direction]
        reference = references[direction]
        key = _label(direction, m, k, n)
        t_dot = base.get(key, {}).get("dot")
        t_deq = base.get(key, {}).get("deq")
        flops = 2 * m * n * k
        tag = f"{args.worker}{' bwd' if direction == 'bwd' else ''}"
        try:
            x, _, w = nf4_matmul_inputs(m, n if direction == "bwd" else k, k, n)
            t0 = time.perf_counter()
            prepared = jax.block_until_ready(prepare_weight(w))
            y = jax.block_until_ready(prepared_fn(x, prepared))
            compile_s = time.perf_counter() - t0
            err, own = (
                float(jnp.linalg.norm(y.astype(f32) - want) / jnp.linalg.norm(want))
                for want in (reference[0](x, w), reference[1](x, prepared))
            )
            # Against its own decoded weights only the bf16 output rounding remains (~1.6e-3);
            # a wrong nibble, slot or scale part (even a lost s_lo) shows as more.
            status = "ok" if err < 1e-2 and own < 2.2e-3 else "WRONG"
            print(f"{key}  rel.L2 {err:.2e} (own weights {own:.2e}) {status}  "
                  f"first call {compile_s:.1f} s", flush=True)  # fmt: skip
            t_kernel = pipelined_ms(prepared_fn, x, prepared)
            t_prep = pipelined_ms(with_prep, x, w)
            vs_deq = f"{t_deq / t_kernel:5.2f}x faster than (b)" if t_deq else ""
            print(_row(f"mgpu {tag}", flops, t_kernel, t_dot, vs_deq), flush=True)
            print(_row(f"mgpu+prep {tag}", flops, t_prep, t_dot), flush=True)
            if args.low_rank:
                _time_low_rank(args.low_rank, prepared_fn, x, prepared, direction, flops, t_kernel,
                               reference[1](x, prepared))  # fmt: skip
        except Exception as e:  # noqa: BLE001 - report and go on
            lines = f"{type(e).__name__}: {e}".splitlines()
            print(f"{key}  {args.worker}: FAILED " + "\n    ".join(lines[:12]),
                  flush=True)  # fmt: skip
            traceback.print_exc(limit=2)
            if "lower" in str(e).lower() or "NotImplemented" in type(e).__name__:
                failed.add(direction)  # a lowering failure will repeat on every shape


def _time_low_rank(r: int, kernel, x, prepared, direction: str, flops: float, t_kernel: float,
                   base_want) -> None:  # fmt: skip
    """The kernel with a width-``r`` low-rank term ``u·vᵀ`` (random bf16 ``u [M, r]``, ``v
    [out, r]``): its error against the float32 sum and its time over the plain kernel's."""
    import jax
    import jax.numpy as jnp
    from _common import pipelined_ms

    n, k = prepared.shape
    ku, kv = jax.random.split(jax.random.key(2))
    u = jax.random.normal(ku, (x.shape[0], r), jnp.bfloat16)
    v = 0.05 * jax.random.normal(kv, (k if direction == "bwd" else n, r), jnp.bfloat16)
    want = base_want + jnp.dot(u, v.T, preferred_element_type=jnp.float32)

    def with_low_rank(x, prepared, low_rank):
        return kernel(x, prepared, low_rank=low_rank)

    y = with_low_rank(x, prepared, (u, v)).astype(jnp.float32)
    err = float(jnp.linalg.norm(y - want) / jnp.linalg.norm(want))
    t = pipelined_ms(with_low_rank, x, prepared, (u, v))
    label = f"mgpu+lowrank{r}"
    print(_row(label, flops, t, None, f"{100 * (t / t_kernel - 1):+5.1f}% time, rel.L2 {err:.2e}"
               f" {'ok' if err < 2.2e-3 else 'WRONG'}"), flush=True)  # fmt: skip


def _run_child(argv: list[str], timeout: float, stall: float) -> None:
    """Runs this script on ``argv`` in its own process group, relaying its output; kills the
    group after ``timeout`` seconds, or after ``stall`` seconds without a line of output (a
    deadlocked kernel never returns, so a hang costs ``stall`` seconds, not the whole call)."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)  # fmt: skip
    start = last = time.monotonic()

    def pump() -> None:
        nonlocal last
        for line in proc.stdout:
            last = time.monotonic()
            print(line, end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    why = None
    while proc.poll() is None:
        now = time.monotonic()
        if now - start > timeout:
            why = f"TIMEOUT after {timeout:.0f} s"
        elif now - last > stall:
            why = f"no output for {stall:.0f} s (a deadlock?)"
        if why:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.5)
    reader.join(timeout=5)
    label = " ".join(argv[:2])
    if why:
        print(f"  [{label}] killed: {why}", flush=True)
    elif proc.returncode:
        print(f"  [{label}] exited with status {proc.returncode}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", default="4096,8192", help="comma list of token counts M")
    parser.add_argument("--shapes", default=SHAPES, help="comma list of KxN")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma list of {list(CONFIGS)}")
    parser.add_argument("--direction", default="fwd,bwd", help="fwd (x·Wᵀ), bwd (dy·W) or both")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per subprocess")
    parser.add_argument("--stall-s", type=float, default=60.0, help="kill a silent subprocess")
    parser.add_argument("--budget-s", type=float, default=540.0, help="seconds for the whole run")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument(
        "--f32-out-dot",
        action="store_true",
        help="also time (a) with a float32 result cast to bf16 (the pre-fix baseline)",
    )
    parser.add_argument(
        "--low-rank",
        type=int,
        default=0,
        help="also time the kernel with a low-rank term of this width (LoRA's Σr)",
    )
    parser.add_argument("--interpret", action="store_true", help="CPU smoke test (interpreter)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "baseline":
        return _baseline_worker(args)
    if args.worker:
        return _config_worker(args)

    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    bad = [d for d in args.direction.split(",") if d and d not in ("fwd", "bwd")]
    if bad:
        parser.error(f"unknown directions {bad}; known: fwd, bwd")
    common = ["--ms", args.ms, "--shapes", args.shapes, "--direction", args.direction]
    common += ["--low-rank", str(args.low_rank)] + (["--interpret"] if args.interpret else [])
    common += ["--f32-out-dot"] if args.f32_out_dot else []
    deadline = time.monotonic() + args.budget_s
    runs = [] if args.no_baselines else [["--worker", "baseline"]]
    runs += [["--worker", name] for name in names]
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base.json")
        for run in runs:
            left = deadline - time.monotonic()
            if left < 20:
                print(
                    f"  [{' '.join(run)}] skipped: --budget-s {args.budget_s:.0f} spent", flush=True
                )
                continue
            extra = ["--out", base] if run[1] == "baseline" else ["--base", base]
            _run_child([*run, *extra, *common], min(args.timeout, left), args.stall_s)


if __name__ == "__main__":
    main()
