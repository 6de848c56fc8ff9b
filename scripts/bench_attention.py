"""Benchmark ``pallas_kernels.flash_attention`` against cuDNN and XLA attention.

Usage (H200, one call, about 3 minutes including compiles)::

    python scripts/bench_attention.py --sweep --json out/bench_attention.json

CPU smoke test (interpret mode, tiny shapes; checks the script, not speed)::

    python scripts/bench_attention.py --tiny --interpret --sweep

What it measures, on the Llama-3.1-8B attention shape (32 query / 8 KV heads, head_dim 128,
causal, bf16, layout ``[B, S, H, D]``) at B×S in {2×2048, 1×8192, 1×32768}:

``pallas``  ``flash_attention(impl="pallas")``: the Pallas FlashAttention-2 kernels (Triton
            lowering), GQA through the index map;
``mosaic``  ``flash_attention(impl="mosaic")``: the Mosaic GPU kernels (TMA + wgmma, causal
            GQA; ``pallas_kernels.flash_attention_mgpu``);
``cudnn``   ``jax.nn.dot_product_attention(implementation="cudnn")`` (GQA native);
``xla``     ``jax.nn.dot_product_attention(implementation="xla")``, which materialises the
            scores (skipped when they would not fit, e.g. S=32768);
``tokamax`` ``tokamax.dot_product_attention(implementation="mosaic")``: Google's Mosaic GPU
            flash attention (forward and VJP kernels; not in the default ``--impls``: its
            wheel and dependencies are not lorax's, see ``scripts/gpu_runs/gpu_run67.sh``). It takes
            windows and the softcap, not segment ids;

each as forward alone and as forward+backward (``jax.vjp`` plus the vjp applied to a fixed
random cotangent, giving out, dq, dk, dv).

``--segments L`` packs every row with examples of mean length L (``_common.packed_rows``)
and passes their segment ids to ``pallas`` and ``mosaic``; ``cudnn`` and ``xla`` cannot take
them and run unsegmented, as the speed anchor (they are left out of the correctness column,
which then compares against ``pallas``). TFLOP/s still counts the whole causal half (the
Triton kernels do that work; the Mosaic kernels skip the tiles that lie across segments, so
for them it is a causal-equivalent rate).

``--window W`` gives every query a sliding window of W keys (HF's meaning; cuDNN and XLA take
it as ``local_window_size=(W-1, 0)``). ``--softcap C`` caps the scores (Gemma 2): cuDNN and
XLA cannot, and run without it as the speed anchor, as with segments.

TFLOP/s counts only the useful causal half, as ``reference/h200-baselines.md`` does:
forward = 2·B·Hq·S²·D, forward+backward = 3.5× that; with a window, the visible
(query, key) pairs: forward = 4·B·Hq·D·(W·S − W(W−1)/2). Correctness is the relative L2 error of
out (and dq, dk, dv for fwd+bwd) against cuDNN on the same inputs (against XLA where cuDNN is
unavailable); bf16 rounding alone puts it near 3e-3.

Timing: compile, warm-up calls, then the median over ``--reps`` of (``n`` back-to-back calls,
blocking on the last) / n, with n chosen so that a rep lasts about 50 ms ("pipelined" in the
baselines doc: device time, dispatch hidden). ``temp MiB`` is XLA's temp allocation of the
compiled executable (where the backend reports it): the S×S score memory shows up there.

``--sweep`` then times the Pallas kernels over a grid of block sizes / warps / stages at one
shape (forward configs on the forward; backward configs on forward+backward with the default
forward) and prints the best as a ``BlockSizes(...)`` literal. Every variant runs inside
try/except, so one failure is reported and the rest go on; ``--budget-s`` bounds the run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import attention_inputs, packed_rows, pipelined_ms  # noqa: E402

from pallas_kernels.flash_attention import BlockSizes, flash_attention  # noqa: E402

# jax 0.11 warns on every Triton-lowered Pallas kernel ("jax-pallas-triton"); that is expected.
warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")

Array = jax.Array
FULL_SHAPES = [(2, 2048), (1, 8192), (1, 32768)]  # (B, S)
FULL_HEADS = (32, 8, 128)  # (Hq, Hkv, D): Llama-3.1-8B
TINY_SHAPES = [(2, 64), (1, 200)]  # 200: not a multiple of the block (exercises padding)
TINY_HEADS = (4, 2, 64)
IMPLS = ("pallas", "mosaic", "cudnn", "xla")
XLA_SCORE_LIMIT_BYTES = 48 * 2**30  # skip xla when its f32 scores (x3 live) exceed this

# Sweep grids for head_dim <= 128: (block_q, block_k, num_warps, num_stages) for the forward;
# (block_q_dkv, block_k_dkv, block_q_dq, block_k_dq, num_warps, num_stages) for the backward.
SWEEP_FWD = [
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (128, 64, 4, 3),
    (128, 64, 8, 3),
    (128, 64, 4, 4),
    (64, 64, 4, 3),
    (64, 128, 4, 2),
]
SWEEP_BWD = [
    (64, 128, 128, 64, 8, 2),
    (64, 128, 128, 64, 8, 3),
    (32, 128, 128, 32, 4, 3),
    (32, 128, 128, 32, 8, 2),
    (64, 64, 64, 64, 4, 2),
    (64, 64, 64, 64, 4, 3),
    (128, 128, 128, 128, 8, 2),
    (32, 64, 64, 32, 4, 3),
]
TINY_SWEEP_FWD = [(32, 16, 4, 2), (16, 32, 4, 2)]
TINY_SWEEP_BWD = [(16, 32, 32, 16, 4, 2), (32, 32, 32, 32, 4, 2)]


@dataclasses.dataclass
class Row:
    """One measurement (or one failure) of the benchmark table."""

    section: str  # "main" or "sweep"
    impl: str
    mode: str  # "fwd" or "fwd+bwd"
    batch: int
    seq_len: int
    config: str = ""
    ms: float | None = None
    tflops: float | None = None
    compile_s: float | None = None
    temp_mib: float | None = None
    rel_err: dict[str, float] = dataclasses.field(default_factory=dict)
    custom_calls: dict[str, int] = dataclasses.field(default_factory=dict)
    error: str | None = None


def _causal_fwd_flops(
    batch: int, seq_len: int, q_heads: int, head_dim: int, window: int | None = None
) -> float:
    if window is None or window >= seq_len:
        return 2.0 * batch * q_heads * seq_len**2 * head_dim
    pairs = window * seq_len - window * (window - 1) / 2  # query i sees min(i + 1, W) keys
    return 4.0 * batch * q_heads * head_dim * pairs


def _rel_l2(a: Array, b: Array) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))


def _attention_fn(
    impl: str,
    interpret: bool,
    blocks: BlockSizes | None,
    segment_ids: Array | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> Callable[..., Array]:
    if impl == "tokamax":
        import tokamax  # only where its wheel is installed

        return lambda q, k, v: tokamax.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=None if window is None else (window - 1, 0),
            logits_soft_cap=softcap, implementation="mosaic",
        )  # fmt: skip
    if impl in ("mosaic", "pallas"):
        options = dict(causal=True, segment_ids=segment_ids, sliding_window=window, softcap=softcap)
        if impl == "pallas":
            options["block_sizes"] = blocks
        return lambda q, k, v: flash_attention(
            q, k, v, impl=impl, interpret=interpret or None, **options
        )
    local = None if window is None else (window - 1, 0)  # softcap: not available here
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=local, implementation=impl
    )


def _fwd_bwd(attn: Callable[..., Array]) -> Callable[..., tuple[Array, ...]]:
    def run(q: Array, k: Array, v: Array, d_out: Array) -> tuple[Array, ...]:
        out, vjp = jax.vjp(attn, q, k, v)
        return (out, *vjp(d_out))

    return run


def _measure(
    row: Row,
    fn: Callable[..., Any],
    args: tuple,
    flops: float,
    opts: argparse.Namespace,
) -> Any:
    """Compiles and times ``fn`` into ``row``; returns its outputs (None on failure)."""
    try:
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        row.compile_s = time.perf_counter() - start
        with contextlib.suppress(Exception):  # not every backend reports it
            row.temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
        with contextlib.suppress(Exception):  # which kernels ran: the custom calls' targets
            targets = re.findall(r'custom_call_target="([^"]+)"', compiled.as_text())
            row.custom_calls = {t: targets.count(t) for t in sorted(set(targets))}
        seconds = pipelined_ms(compiled, *args, warmup=opts.warmup, reps=opts.reps) / 1e3
        row.ms = seconds * 1e3
        row.tflops = flops / seconds / 1e12
        return compiled(*args)
    except Exception as err:
        row.error = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        if opts.verbose:
            traceback.print_exc()
        return None


def _print_row(row: Row) -> None:
    if row.error:
        print(f"  {row.impl:<7} {row.mode:<8} {row.config:<28} FAILED/SKIPPED: {row.error}")
        return
    errs = " ".join(f"{k}={v:.1e}" for k, v in row.rel_err.items())
    temp = f"{row.temp_mib:9.1f}" if row.temp_mib is not None else "        -"
    calls = " ".join(f"{name[:24]}x{n}" for name, n in row.custom_calls.items())
    print(
        f"  {row.impl:<7} {row.mode:<8} {row.config:<28} {row.ms:9.3f} ms {row.tflops:7.1f} "
        f"TFLOP/s  compile {row.compile_s:5.1f}s  temp MiB {temp}  {errs}"
        + (f"  [{calls}]" if calls else ""),
        flush=True,
    )


def _over_budget(opts: argparse.Namespace) -> bool:
    return time.perf_counter() - opts.t0 > opts.budget_s


def run_main(opts: argparse.Namespace, shapes: list, heads: tuple, rows: list[Row]) -> None:
    q_heads, _, dim = heads
    for batch, seq_len in shapes:
        packed = f", packed rows (mean example {opts.segments})" if opts.segments else ""
        packed += f", window {opts.window}" if opts.window else ""
        packed += f", softcap {opts.softcap}" if opts.softcap else ""
        print(f"\nB={batch} S={seq_len} Hq={heads[0]} Hkv={heads[1]} D={dim} causal bf16{packed}")
        q, k, v, d_out = attention_inputs(batch, seq_len, heads)
        segment_ids = None
        if opts.segments:
            segment_ids = jnp.asarray(packed_rows(batch, seq_len, opts.segments)[0])
        window = opts.window or None
        fwd_flops = _causal_fwd_flops(batch, seq_len, q_heads, dim, window)
        # What only the Pallas and Mosaic kernels take: the others run without it.
        ours_only = bool(opts.segments or opts.softcap)
        scores_bytes = 3 * 4 * batch * q_heads * seq_len**2
        here: list[Row] = []
        outputs: dict[tuple[str, str], Any] = {}
        for impl in opts.impls:
            ours = impl in ("pallas", "mosaic")
            capped = ours or impl == "tokamax"  # the implementations that take a softcap
            attn = _attention_fn(
                impl, opts.interpret, None, segment_ids if ours else None, window,
                (opts.softcap or None) if capped else None,
            )  # fmt: skip
            full = ours or (capped and not opts.segments)
            for mode in ("fwd", "fwd+bwd"):
                config = ("full options" if full else "without them") if ours_only else ""
                row = Row("main", impl, mode, batch, seq_len, config=config)
                here.append(row)
                if _over_budget(opts):
                    row.error = "skipped: --budget-s reached"
                elif impl == "xla" and scores_bytes > XLA_SCORE_LIMIT_BYTES:
                    row.error = f"skipped: S x S scores need ~{scores_bytes / 2**30:.0f} GiB"
                elif mode == "fwd":
                    out = _measure(row, attn, (q, k, v), fwd_flops, opts)
                    outputs[impl, mode] = None if out is None else (out,)
                else:
                    args = (q, k, v, d_out)
                    outputs[impl, mode] = _measure(row, _fwd_bwd(attn), args, 3.5 * fwd_flops, opts)
        # Correctness against cuDNN (XLA where cuDNN did not run), same inputs, same mode;
        # with segments or softcap against the Triton kernels (the other implementation that
        # takes them).
        bases = ("pallas",) if ours_only else ("cudnn", "xla")
        for row in here:
            base_impl = next((i for i in bases if outputs.get((i, row.mode)) is not None), None)
            got = outputs.get((row.impl, row.mode))
            comparable = not ours_only or row.config == "full options"
            if got is not None and comparable and base_impl not in (None, row.impl):
                base = outputs[base_impl, row.mode]
                row.rel_err = {
                    f"{name}_vs_{base_impl}": _rel_l2(g, b)
                    for name, g, b in zip(("out", "dq", "dk", "dv"), got, base, strict=False)
                }
            _print_row(row)
        rows.extend(here)
        del outputs


def _sweep_blocks(head_dim: int, fwd: tuple | None, bwd: tuple | None) -> BlockSizes:
    base = BlockSizes.for_head_dim(head_dim)
    if fwd is not None:
        block_q, block_k, warps, stages = fwd
        base = dataclasses.replace(
            base, block_q=block_q, block_k=block_k, num_warps=warps, num_stages=stages
        )
    if bwd is not None:
        q_dkv, k_dkv, q_dq, k_dq, warps, stages = bwd
        base = dataclasses.replace(
            base,
            block_q_dkv=q_dkv,
            block_k_dkv=k_dkv,
            block_q_dq=q_dq,
            block_k_dq=k_dq,
            num_warps_bwd=warps,
            num_stages_bwd=stages,
        )
    return base


def run_sweep(opts: argparse.Namespace, shape: tuple, heads: tuple, rows: list[Row]) -> None:
    batch, seq_len = shape
    q_heads, _, dim = heads
    print(f"\nSweep: B={batch} S={seq_len} Hq={heads[0]} Hkv={heads[1]} D={dim} causal bf16")
    q, k, v, d_out = attention_inputs(batch, seq_len, heads, seed=1)
    fwd_flops = _causal_fwd_flops(batch, seq_len, q_heads, dim)
    grid_fwd, grid_bwd = (TINY_SWEEP_FWD, TINY_SWEEP_BWD) if opts.tiny else (SWEEP_FWD, SWEEP_BWD)
    best: dict[str, tuple[float, tuple]] = {}
    for mode, grid in (("fwd", grid_fwd), ("fwd+bwd", grid_bwd)):
        for config in grid:
            label = ("fwd q,k,w,s=" if mode == "fwd" else "bwd dkv,dq,w,s=") + ",".join(
                map(str, config)
            )
            row = Row("sweep", "pallas", mode, batch, seq_len, config=label)
            rows.append(row)
            if _over_budget(opts):
                row.error = "skipped: --budget-s reached"
            else:
                if mode == "fwd":
                    blocks = _sweep_blocks(dim, config, None)
                else:
                    blocks = _sweep_blocks(dim, None, config)
                attn = _attention_fn("pallas", opts.interpret, blocks)
                if mode == "fwd":
                    _measure(row, attn, (q, k, v), fwd_flops, opts)
                else:
                    _measure(row, _fwd_bwd(attn), (q, k, v, d_out), 3.5 * fwd_flops, opts)
                if row.ms is not None and row.ms < best.get(mode, (math.inf, ()))[0]:
                    best[mode] = (row.ms, config)
            _print_row(row)
    if "fwd" in best or "fwd+bwd" in best:
        blocks = _sweep_blocks(
            dim, best.get("fwd", (0, None))[1], best.get("fwd+bwd", (0, None))[1]
        )
        print(f"\nBest at B={batch} S={seq_len}: {blocks}")


def _meta(opts: argparse.Namespace) -> dict[str, Any]:
    device = jax.devices()[0]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True)
            return done.stdout.strip() if done.returncode == 0 else ""
        except Exception:
            return ""

    commit = git("rev-parse", "--verify", "-q", "HEAD")
    dirty = bool(git("status", "--porcelain", "--", "pallas_kernels", "scripts"))
    return {
        "script": "scripts/bench_attention.py",
        "argv": sys.argv[1:],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": (commit + ("+dirty" if dirty else "")) if commit else None,
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "device": f"{device.platform}: {getattr(device, 'device_kind', str(device))}",
        "interpret": opts.interpret,
        "flops": "causal fwd = 2*B*Hq*S^2*D; fwd+bwd = 3.5 x fwd",
    }


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode")
    parser.add_argument("--sweep", action="store_true", help="block-size sweep after the table")
    parser.add_argument("--sweep-shape", default=None, help="BxS for the sweep (default 1x8192)")
    parser.add_argument("--shapes", default=None, help="comma list of BxS, e.g. 2x2048,1x8192")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma list of " + str(IMPLS))
    parser.add_argument(
        "--segments", type=int, default=0, help="packed rows: mean example length (0: none)"
    )
    parser.add_argument("--window", type=int, default=0, help="sliding window (0: none)")
    parser.add_argument("--head-dim", type=int, default=0, help="head dim (0: 128, or 64 --tiny)")
    parser.add_argument("--softcap", type=float, default=0.0, help="score softcap (0: none)")
    parser.add_argument("--json", default=None, help="write all rows and metadata here")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=200.0, help="stop starting new rows")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    opts = parser.parse_args(argv)
    opts.t0 = time.perf_counter()
    opts.impls = [i for i in opts.impls.split(",") if i]

    def parse_shapes(text: str) -> list[tuple[int, int]]:
        return [tuple(int(x) for x in s.lower().split("x")) for s in text.split(",") if s]

    heads = TINY_HEADS if opts.tiny else FULL_HEADS
    if opts.head_dim:
        heads = (*heads[:2], opts.head_dim)
    shapes = (
        parse_shapes(opts.shapes) if opts.shapes else (TINY_SHAPES if opts.tiny else FULL_SHAPES)
    )
    sweep_shape = (
        parse_shapes(opts.sweep_shape)[0]
        if opts.sweep_shape
        else (TINY_SHAPES[-1] if opts.tiny else (1, 8192))
    )

    meta = _meta(opts)
    print(" | ".join(f"{k}={v}" for k, v in meta.items() if k not in ("argv", "flops")))
    print(f"FLOPs: {meta['flops']}; default Pallas blocks: {BlockSizes.for_head_dim(heads[2])}")
    rows: list[Row] = []
    try:
        run_main(opts, shapes, heads, rows)
        if opts.sweep:
            run_sweep(opts, sweep_shape, heads, rows)
    finally:
        elapsed = time.perf_counter() - opts.t0
        print(f"\nTotal {elapsed:.0f} s; {sum(r.error is None for r in rows)}/{len(rows)} rows ok")
        if opts.json:
            os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)
            with open(opts.json, "w") as f:
                rows_out = [dataclasses.asdict(r) for r in rows]
                payload = {"meta": meta, "elapsed_s": elapsed, "rows": rows_out}
                json.dump(payload, f, indent=1)
            print(f"wrote {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
