"""Benchmark ``pallas_kernels.nf4_lora_matmul`` variants against XLA on Llama-3.1-8B shapes.

Usage (GPU, one call, about 5-6 minutes including compiles)::

    python scripts/bench_nf4_matmul.py --json out/bench_nf4_matmul.json

CPU smoke test (interpret mode, tiny shapes; checks the script, not speed)::

    python scripts/bench_nf4_matmul.py --quick --interpret --tiny

Variants (LoRA r=16 on, bf16 activations, f32 LoRA weights, double-quantized NF4 W):
  ``bf16_dot``       ``x·Wᵀ`` with a dense bf16 W of the same shape, f32 accumulation: the
                     ceiling (its fwd+bwd is ``x·Wᵀ`` plus ``dx = dy·W``; no LoRA).
  ``lora16``         the op on a dense bf16 W (the 16-bit LoRA path: XLA dots + LoRA).
  ``reference``      the op with ``impl="reference"`` under jit: plain-jnp ``dequantize_nf4``
                     (table-gather decode by XLA), then XLA dots (the CPU path, same VJP).
  ``fused``          fused Pallas kernels, select-tree decode (``variant="fused"``).
  ``fused[table]``   the same with the table-gather decode (``lookup="table"``).
  ``dequant``        Pallas decode kernel + XLA dot (``variant="dequant_then_dot"``).
  ``dequant[table]`` the same with the table-gather decode.
  ``mosaic``         the Mosaic GPU kernel (``nf4_matmul_mgpu``) on W prepared once in its quad
                     layout (``prepare_weight``, as ``lorax.prepare_kernel_weights`` keeps it).
  ``mosaic+prep``    the same on the NF4Tensor (``variant="mosaic"``: the rewrite every call).
Extras (at the middle M): the Pallas variants on a W whose absmax is stored in float32, so
the difference to the main rows is the per-call decode of the double-quantized absmax (an
upper bound on what decoding it inside the kernels could save), and the dequant variant
decoding it inside its kernel (``absmax_decode="kernel"``), the other way to pay for it;
alternative fused tiles (two largest shapes); small-M rows on the widest shape (the fused vs
dequant crossover that ``NF4MatmulConfig.fused_max_m`` should be set from); and the decode
alone (Pallas vs XLA, two largest shapes) as bandwidth.

Order: correctness at full size first (each variant's forward and gradients dx, dA, dB against
``nf4_lora_matmul_reference``, the autodiff definition, on the same inputs; relative error =
max |diff| / max |definition|, bf16 rounding puts it near 1e-2), then timings at the middle M
for every shape, then the extras, then the other Ms. ``--budget-s`` bounds the run: rows that
would start after it are listed as skipped.

Timing: compile + 2 warm-up calls, then the median over ``--reps`` of (``n`` back-to-back calls,
blocking on the last) / n, with n chosen so a rep lasts about 50 ms: device time, dispatch
hidden by JAX's asynchronous dispatch. TFLOP/s counts 2·M·N·K per executed GEMM: 1 for fwd,
2 for fwd+bwd (``y = x·Wᵀ`` and ``dx = dy·W``; W is frozen, so no dW GEMM runs). The rank-16
LoRA dots are not counted. fwd+bwd is ``jax.vjp`` applied to a fixed random ``dy`` (what
``value_and_grad`` w.r.t. x, A, B runs, minus the loss reduction). ``%ceil`` is the bf16_dot
time of the same row over the variant's; ``×ref`` is the reference's time over the variant's.
``compile s`` is the first call (compile + run) of that jitted function at that shape.
At decode-sized M a call's device time (tens of µs) is below the host's dispatch time per
call, so back-to-back calls measure dispatch: ``--scan-mb MB`` times instead a ``lax.scan``
over a stack of distinct weights (as many as make MB of NF4, several times the 50 MB L2)
and reports per-layer time, as the model's layer scan runs it.
``W GB/s`` is the bytes of W as the variant stores it (NF4: packed codes + absmax codes +
nested scales; prepared: quads + split scales; dense: 2 per weight) over the time: at
decode-sized M (``--ms 1,16,64,256 --modes fwd``) the work is bound by reading W, and the
H200's copy rate (~4.3 TB/s) is the ceiling.

Every variant runs inside try/except: a failure prints its first lines and the rest go on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import pipelined_ms  # noqa: E402
from jax import lax  # noqa: E402

from lorax.sharding.memory import total_bytes  # noqa: E402
from pallas_kernels.nf4 import NF4Tensor  # noqa: E402
from pallas_kernels.nf4_matmul import (  # noqa: E402
    NF4MatmulConfig,
    nf4_dequantize,
    nf4_lora_matmul,
    nf4_lora_matmul_reference,
)
from pallas_kernels.nf4_matmul_mgpu import prepare_weight  # noqa: E402

Array = jax.Array
LLAMA_SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # (K, N)
LLAMA_MS = [4096, 8192, 16384]
SMALL_MS = [256, 1024]  # crossover rows, on the widest shape
TINY_SHAPES = [(256, 128), (128, 192)]
TINY_MS = [64, 96, 128]
TINY_SMALL_MS = [16]
RANK = 16
SCALE = 1.0  # alpha / r with alpha = r = 16
_NT = (((1,), (1,)), ((), ()))

MAIN = ["bf16_dot", "lora16", "reference", "fused", "fused[table]", "dequant", "dequant[table]"]
MAIN += ["mosaic", "mosaic+prep"]
PALLAS = ["fused", "fused[table]", "dequant", "dequant[table]", "mosaic", "mosaic+prep"]
F32_ABSMAX = ["fused[f32 absmax]", "dequant[f32 absmax]"]
ABSMAX_IN_KERNEL = ["dequant[dq in kernel]", "dequant[table,dq in kernel]"]
ALT_FUSED = {
    "fused[bm64,w4]": dict(block_m=64, num_warps=4, bwd_block_m=64, bwd_num_warps=4),
    "fused[bk128,s3]": dict(block_k=128, num_stages=3, bwd_block_n=32, bwd_num_stages=3),
}
TINY_CONFIG = dict(
    block_m=32, block_n=32, block_k=64, bwd_block_m=32, bwd_block_n=32, bwd_block_k=64,
    dequant_rows=32,
)  # fmt: skip


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def random_nf4(key: Array, n: int, k: int, double_quant: bool) -> NF4Tensor:
    """A random NF4Tensor of a ``[n, k]`` bf16 weight, built on device (uniform codes).

    Speed does not depend on the values; building the fields directly avoids quantizing a
    58M-element weight, and every variant is compared with the reference on the same tensor.
    """
    numel = n * k
    nblocks = -(-numel // 64)
    k1, k2, k3 = jax.random.split(key, 3)
    packed = jax.random.randint(k1, ((numel + 1) // 2,), 0, 256, jnp.int32).astype(jnp.uint8)
    if double_quant:
        codes = jax.random.randint(k2, (nblocks,), 0, 256, jnp.int32).astype(jnp.uint8)
        nested = jax.random.uniform(k3, (-(-nblocks // 256),), jnp.float32, 0.02, 0.05)
        return NF4Tensor(packed, codes, nested, jnp.float32(0.04), (n, k), jnp.bfloat16)
    absmax = jax.random.uniform(k2, (nblocks,), jnp.float32, 0.02, 0.08)
    return NF4Tensor(packed, absmax, None, None, (n, k), jnp.bfloat16)


class Inputs:
    """Activations, cotangent, LoRA factors and the kinds of W for one (M, K, N).

    With ``layers > 0`` every W is a stack of that many distinct weights (leading axis), which
    the timed functions scan over as the model scans its layers (``over_layers``).
    """

    def __init__(self, m: int, k: int, n: int, weights: dict[str, Any], layers: int = 0) -> None:
        key = jax.random.fold_in(jax.random.key(0), m)
        kx, kdy, ka, kb = jax.random.split(key, 4)
        self.x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
        self.dy = jax.random.normal(kdy, (m, n), jnp.float32).astype(jnp.bfloat16)
        self.a = jax.random.uniform(ka, (RANK, k), jnp.float32, -1.0, 1.0) / math.sqrt(k)
        self.b = 0.01 * jax.random.normal(kb, (n, RANK), jnp.float32)
        self.shape, self.layers = (n, k), layers
        if weights.get("nk") != (n, k, layers):  # one shape's weights alive at a time
            weights.clear()
            weights["nk"] = (n, k, layers)
        self.weights = weights

    def _build(self, which: str) -> Any:
        n, k = self.shape
        if which == "prepared":  # from the NF4 weights, so both rows time the same values
            make = prepare_weight
            source = self.weight("dq")
        else:
            make = {
                "dq": lambda key: random_nf4(key, n, k, True),
                "f32absmax": lambda key: random_nf4(key, n, k, False),
                "bf16": lambda key: (0.02 * jax.random.normal(key, (n, k))).astype(jnp.bfloat16),
            }[which]
            salt = ("dq", "f32absmax", "bf16").index(which)
            source = jax.random.split(jax.random.fold_in(jax.random.key(1), n * 100003 + k), 3)
            source = source[salt]
            if self.layers:
                source = jax.random.split(source, self.layers)
        return jax.block_until_ready((jax.vmap(make) if self.layers else make)(source))

    def weight(self, which: str) -> Any:
        if which not in self.weights:  # built on first use, untimed
            self.weights[which] = self._build(which)
        return self.weights[which]

    def args(self, which: str) -> tuple[Any, ...]:
        return (self.x, self.weight(which), self.a, self.b, self.dy)


def layers_for(n: int, k: int, scan_mb: float) -> int:
    """How many distinct weights make ``scan_mb`` MB of NF4 (at least 2): 0 when off. A stack
    several times the 50 MB L2 makes every layer read its W from device memory."""
    if scan_mb <= 0:
        return 0
    return max(2, math.ceil(scan_mb * 1e6 / (n * k * (0.5 + 1 / 64))))


def over_layers(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` applied to each weight of a stack in a ``lax.scan`` (one dispatch for all); the
    outputs are summed into a float32 scalar so none is dead code (a small reduction per layer,
    the same for every variant)."""

    def run(x, ws, a, b, dy):
        def body(acc, w):
            out = fn(x, w, a, b, dy)
            return acc + sum(jnp.sum(t, dtype=jnp.float32) for t in jax.tree.leaves(out)), None

        return lax.scan(body, jnp.float32(0), ws)[0]

    return jax.jit(run)


# --------------------------------------------------------------------------------------
# Variants: name -> (fwd, fwd_bwd, which W), each a jitted fn of (x, w, a, b, dy)
# --------------------------------------------------------------------------------------


def _op_fns(op: Callable[..., Array]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    def fwd(x, w, a, b, dy):
        del dy
        return op(x, w, a, b)

    def fwd_bwd(x, w, a, b, dy):
        y, vjp = jax.vjp(lambda x, a, b: op(x, w, a, b), x, a, b)
        return y, vjp(dy)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def _ceiling_fns() -> tuple[Callable[..., Any], Callable[..., Any]]:
    def dot(x, w):
        # bf16 out of cuBLAS's float32 accumulator, as the kernels write: a float32 result
        # cast afterwards costs an extra output pass (and its vjp runs dx in mixed precision).
        return lax.dot_general(x, w, _NT, preferred_element_type=x.dtype)

    def fwd(x, w, a, b, dy):
        del a, b, dy
        return dot(x, w)

    def fwd_bwd(x, w, a, b, dy):
        del a, b
        y, vjp = jax.vjp(lambda x: dot(x, lax.stop_gradient(w)), x)
        return y, vjp(dy)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def build_variants(interpret: bool, base: dict[str, Any]) -> dict[str, tuple[Any, Any, str]]:
    kernel_kw: dict[str, Any] = dict(interpret=interpret)  # False: compiled, even off-GPU

    def op_with(**cfg: Any) -> Callable[..., Array]:
        config = NF4MatmulConfig(**{**base, **cfg})

        def op(x, w, a, b):
            return nf4_lora_matmul(x, w, a, b, SCALE, config=config, **kernel_kw)

        return op

    def oracle(x, w, a, b):
        return nf4_lora_matmul_reference(x, w, a, b, SCALE)

    def reference(x, w, a, b):
        return nf4_lora_matmul(x, w, a, b, SCALE, impl="reference")

    fused = dict(variant="fused")
    dequant = dict(variant="dequant_then_dot")
    table = dict(lookup="table")
    variants = {
        "bf16_dot": (*_ceiling_fns(), "bf16"),
        "oracle": (*_op_fns(oracle), "dq"),  # for the checks; not timed
        "lora16": (*_op_fns(reference), "bf16"),
        "reference": (*_op_fns(reference), "dq"),
        "fused": (*_op_fns(op_with(**fused)), "dq"),
        "fused[table]": (*_op_fns(op_with(**fused, **table)), "dq"),
        "dequant": (*_op_fns(op_with(**dequant)), "dq"),
        "dequant[table]": (*_op_fns(op_with(**dequant, **table)), "dq"),
        "mosaic": (*_op_fns(op_with()), "prepared"),  # a prepared W always runs on it
        "mosaic+prep": (*_op_fns(op_with(variant="mosaic")), "dq"),
        "fused[f32 absmax]": (*_op_fns(op_with(**fused)), "f32absmax"),
        "dequant[f32 absmax]": (*_op_fns(op_with(**dequant)), "f32absmax"),
        "dequant[dq in kernel]": (*_op_fns(op_with(**dequant, absmax_decode="kernel")), "dq"),
        "dequant[table,dq in kernel]": (
            *_op_fns(op_with(**dequant, **table, absmax_decode="kernel")),
            "dq",
        ),
    }
    for name, cfg in ALT_FUSED.items():
        variants[name] = (*_op_fns(op_with(**fused, **cfg)), "dq")
    return variants


# --------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------

_FIRST_CALL_S: dict[tuple[Any, ...], float] = {}


def _call(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """Calls and blocks; remembers how long the first call at these shapes took (compile)."""
    key = (id(fn), tuple((a.shape, a.dtype) for a in jax.tree.leaves(args)))
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    _FIRST_CALL_S.setdefault(key, time.perf_counter() - t0)
    return out


def time_fn(fn: Callable[..., Any], args: tuple[Any, ...], reps: int, max_calls: int) -> dict:
    key = (id(fn), tuple((a.shape, a.dtype) for a in jax.tree.leaves(args)))
    for _ in range(3):  # compile (if not yet) + 2 warm-up calls
        _call(fn, args)
    ms = pipelined_ms(fn, *args, warmup=0, reps=reps, min_calls=3, max_calls=max_calls)
    return dict(seconds=ms / 1e3, compile_s=_FIRST_CALL_S[key])


def rel_err(got: Any, want: Any) -> float:
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _short(e: BaseException, lines: int = 4) -> str:
    text = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
    return " | ".join(t.strip() for t in text[:lines])[:400]


class Bench:
    def __init__(self, args: argparse.Namespace, variants: dict[str, Any]) -> None:
        self.args = args
        self.variants = variants
        self.start = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.checks: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        self.weights: dict[str, Any] = {}
        self.scanned: dict[Callable[..., Any], Callable[..., Any]] = {}
        self.reps = 1 if args.interpret else (3 if args.quick else args.reps)
        self.max_calls = 1 if args.interpret else args.max_calls
        self.json_header: dict[str, Any] = {}

    def save(self, final: bool = False) -> None:
        """Writes everything so far to ``--json`` (after every row: a killed run keeps its rows)."""
        if not self.args.json:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.args.json)), exist_ok=True)
        doc = dict(
            self.json_header,
            complete=final,
            seconds=time.perf_counter() - self.start,
            checks=self.checks,
            rows=self.rows,
            skipped=self.skipped,
        )
        with open(self.args.json + ".tmp", "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(self.args.json + ".tmp", self.args.json)
        if final:
            print(f"wrote {self.args.json}")

    def over_budget(self, label: str) -> bool:
        if time.perf_counter() - self.start > self.args.budget_s:
            self.skipped.append(label)
            return True
        return False

    def inputs(self, m: int, k: int, n: int) -> Inputs | None:
        try:
            return Inputs(m, k, n, self.weights, layers_for(n, k, self.args.scan_mb))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory
            print(f"inputs K×N {k}×{n} M {m} FAILED: {_short(e)}", flush=True)
            return None

    def check(self, names: list[str], inp: Inputs, k: int, n: int) -> None:
        """Forward and gradients of each variant vs the autodiff definition on the same W."""
        if inp.layers:
            print("  (checks run without --scan-mb: on one weight, every output compared)")
            return
        ref_fwd, ref_bwd, _ = self.variants["oracle"]
        refs: dict[str, Any] = {}
        for name in names:
            m = int(inp.x.shape[0])
            if self.over_budget(f"check {name} K×N {k}×{n} M {m}"):
                continue
            fwd, fwd_bwd, which = self.variants[name]
            row: dict[str, Any] = dict(check=name, K=k, N=n, M=m)
            try:
                args = inp.args(which)
                # A prepared W is the NF4 one in another layout: the same definition applies.
                ref_which = "dq" if which == "prepared" else which
                if ref_which not in refs:
                    ref_args = inp.args(ref_which)
                    refs[ref_which] = (_call(ref_fwd, ref_args), _call(ref_bwd, ref_args))
                want_y, (_, want_grads) = refs[ref_which]
                y, (y2, grads) = _call(fwd, args), _call(fwd_bwd, args)
                row.update(y=rel_err(y, want_y), y_bwd=rel_err(y2, want_y))
                for g, v, r in zip("xab", grads, want_grads, strict=True):
                    row[f"d{g}"] = rel_err(v, r)
                row["ok"] = bool(max(row[c] for c in ("y", "y_bwd", "dx", "da", "db")) < 5e-2)
            except Exception as e:  # noqa: BLE001 - report and go on
                row["error"] = _short(e)
            self.checks.append(row)
            self.save()
            errs = " ".join(
                f"{c}={row[c]:.1e}" for c in ("y", "y_bwd", "dx", "da", "db") if c in row
            )
            status = row.get("error") or ("ok" if row["ok"] else "CHECK: over 5e-2")
            print(f"  check {name:<20} K×N {k}×{n} M {m}: {errs}  {status}", flush=True)

    def time_rows(self, names: list[str], inp: Inputs, k: int, n: int) -> None:
        m = int(inp.x.shape[0])
        for mode in self.args.modes.split(","):
            for name in names:
                if self.over_budget(f"K×N {k}×{n} M {m} {mode} {name}"):
                    continue
                fwd, fwd_bwd, which = self.variants[name]
                row: dict[str, Any] = dict(K=k, N=n, M=m, mode=mode, variant=name)
                try:
                    fn = fwd if mode == "fwd" else fwd_bwd
                    args = inp.args(which)
                    per_call = max(inp.layers, 1)
                    if inp.layers:
                        fn = self.scanned.setdefault(fn, over_layers(fn))
                        row["layers"] = inp.layers
                    r = time_fn(fn, args, self.reps, self.max_calls)
                    seconds = r["seconds"] / per_call  # per layer
                    flops = 2 * m * n * k * (1 if mode == "fwd" else 2)
                    reads = total_bytes(args[1]) / per_call * (1 if mode == "fwd" else 2)
                    row.update(
                        ms=seconds * 1e3,
                        tflops=flops / seconds / 1e12,
                        w_gbps=reads / seconds / 1e9,
                        compile_s=r["compile_s"],
                    )
                    ceil = self.lookup(k, n, m, mode, "bf16_dot")
                    ref = self.lookup(k, n, m, mode, "reference")
                    row["pct_ceiling"] = 100 * ceil / seconds if ceil else None
                    row["x_ref"] = ref / seconds if ref else None
                    line = (
                        f"{row['ms']:>9.3f} {row['tflops']:>8.1f} {row['w_gbps']:>8.0f} "
                        f"{_fmt(row['pct_ceiling'], '.0f'):>6} {_fmt(row['x_ref'], '.2f'):>6} "
                        f"{row['compile_s']:>9.1f}"
                    )
                except Exception as e:  # noqa: BLE001 - report and go on
                    row["error"] = _short(e)
                    line = f"FAILED: {row['error']}"
                self.rows.append(row)
                self.save()
                layers = f"  ({inp.layers} layers)" if inp.layers else ""
                print(f"{k:>5}×{n:<6} {m:>6} {mode:<8} {name:<20} {line}{layers}", flush=True)

    def lookup(self, k: int, n: int, m: int, mode: str, variant: str) -> float | None:
        for r in self.rows:
            if (r["K"], r["N"], r.get("M"), r["mode"], r["variant"]) == (k, n, m, mode, variant):
                return r["ms"] / 1e3 if "ms" in r else None
        return None

    def decode_rows(self, shapes: list[tuple[int, int]], base: dict[str, Any]) -> None:
        interp = dict(interpret=self.args.interpret)
        decoders = {
            "xla": lambda w: nf4_dequantize(w, jnp.bfloat16, impl="reference"),
            "pallas[select]": lambda w: nf4_dequantize(
                w, jnp.bfloat16, config=NF4MatmulConfig(**base), **interp
            ),
            "pallas[table]": lambda w: nf4_dequantize(
                w, jnp.bfloat16, config=NF4MatmulConfig(**base, lookup="table"), **interp
            ),
            "pallas[table,dq in kernel]": lambda w: nf4_dequantize(
                w,
                jnp.bfloat16,
                config=NF4MatmulConfig(**base, lookup="table", absmax_decode="kernel"),
                **interp,
            ),
        }
        jitted = {name: jax.jit(fn) for name, fn in decoders.items()}
        for k, n in shapes:
            for dq in (True, False):
                w = random_nf4(jax.random.key(2), n, k, dq)
                for name, fn in jitted.items():
                    if not dq and "dq in kernel" in name:
                        continue  # nothing to decode
                    label = f"decode {k}×{n} {'dq' if dq else 'f32 absmax'} {name}"
                    if self.over_budget(label):
                        continue
                    row: dict[str, Any] = dict(K=k, N=n, mode="decode", variant=name, dq=dq)
                    try:
                        r = time_fn(fn, (w,), self.reps, self.max_calls)
                        nbytes = n * k // 2 + (n * k // 64) * (1 if dq else 4) + n * k * 2
                        row.update(
                            ms=r["seconds"] * 1e3,
                            gbps=nbytes / r["seconds"] / 1e9,
                            compile_s=r["compile_s"],
                        )
                        line = f"{row['ms']:>9.3f} ms {row['gbps']:>7.0f} GB/s"
                    except Exception as e:  # noqa: BLE001
                        row["error"] = _short(e)
                        line = f"FAILED: {row['error']}"
                    self.rows.append(row)
                    self.save()
                    print(f"  {label:<52} {line}", flush=True)


HEADER = (
    f"{'K×N':>12} {'M':>6} {'mode':<8} {'variant':<20} {'ms':>9} {'TFLOP/s':>8} {'W GB/s':>8} "
    f"{'%ceil':>6} {'×ref':>6} {'compile s':>9}"
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 shapes, 1 M, fewer checks/extras")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    p.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU)")
    p.add_argument("--json", metavar="PATH", help="write all rows as JSON (after every row)")
    p.add_argument("--ms", help="comma-separated M values (default 4096,8192,16384)")
    p.add_argument("--variants", help="comma-separated subset of the main variants to time")
    p.add_argument(
        "--scan-mb",
        type=float,
        default=0.0,
        help="time each call as a scan over distinct weights making this many MB of NF4 "
        "(per-layer device time: dispatch amortized, W read from device memory, not L2); "
        "0: one weight per call (default)",
    )
    p.add_argument("--modes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both (default both)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--max-calls", type=int, default=50)
    p.add_argument("--budget-s", type=float, default=330.0, help="default 330")
    p.add_argument("--no-extras", action="store_true")
    args = p.parse_args()

    dev = jax.devices()[0]
    print(
        f"jax {jax.__version__} (jaxlib {_jaxlib_version()}), "
        f"python {platform.python_version()}, backend {jax.default_backend()}, "
        f"device {dev.device_kind} ({dev.platform}), {len(jax.devices())} device(s)"
    )
    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}, argv {sys.argv[1:]}")
    if args.interpret:
        print("interpret mode: Pallas kernels are interpreted (times are meaningless)")

    shapes = TINY_SHAPES if args.tiny else LLAMA_SHAPES
    ms = TINY_MS if args.tiny else LLAMA_MS
    small_ms = TINY_SMALL_MS if args.tiny else SMALL_MS
    if args.quick:
        shapes, ms, small_ms = shapes[-2:], ms[1:2], small_ms[:1]
    if args.ms:
        ms = [int(v) for v in args.ms.split(",")]
    ms = [ms[len(ms) // 2]] + [m for i, m in enumerate(ms) if i != len(ms) // 2]
    base = TINY_CONFIG if args.tiny else {}
    main_names = MAIN
    if args.variants:
        keep = set(args.variants.split(",")) | {"bf16_dot", "reference"}
        main_names = [v for v in MAIN if v in keep]
    pallas = [v for v in main_names if v in PALLAS]
    extras = [] if args.no_extras else [*F32_ABSMAX, *ABSMAX_IN_KERNEL]
    if args.quick:
        extras = extras[:1] + extras[2:3]  # fused[f32 absmax], dequant[dq in kernel]
    big = sorted(shapes, key=lambda s: s[0] * s[1])[-2:]
    bench = Bench(args, build_variants(args.interpret, base))
    header = dict(
        jax=jax.__version__,
        device=dev.device_kind,
        backend=jax.default_backend(),
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        argv=sys.argv[1:],
        default_config=str(NF4MatmulConfig(**base)),
    )
    bench.json_header = header
    print(f"default config: {header['default_config']}")
    print(
        f"shapes K×N {shapes}, M {ms} (first one first, then extras), LoRA r={RANK}, "
        f"bf16 x, f32 LoRA weights, reps {bench.reps}, budget {args.budget_s:.0f} s"
    )
    print("flops: 2·M·N·K per GEMM; fwd = 1 GEMM, fwd+bwd = 2 (y and dx); LoRA not counted")

    for i, m in enumerate(ms):
        print(f"\n== M={m}: " + ("correctness at full size, then timings ==" if i == 0 else "=="))
        for k, n in shapes:
            if bench.over_budget(f"K×N {k}×{n} M {m} (all)") or not (inp := bench.inputs(m, k, n)):
                continue
            if i == 0:
                checked = [] if args.quick else ["lora16", "reference"]
                bench.check([*checked, *pallas, *extras], inp, k, n)
            print(HEADER)
            bench.time_rows(main_names, inp, k, n)
            del inp
        if i == 0 and not args.no_extras:
            print(f"\n== extras at M={m}: f32-stored / in-kernel absmax decode, alt tiles ==")
            for k, n in shapes:
                if bench.over_budget(f"extras K×N {k}×{n}") or not (inp := bench.inputs(m, k, n)):
                    continue
                alt = [] if args.quick or (k, n) not in big else list(ALT_FUSED)
                bench.check(alt, inp, k, n)
                print(HEADER)
                bench.time_rows([*extras, *alt], inp, k, n)
                del inp
            k, n = max(shapes, key=lambda s: s[1])
            print(f"\n== small M on K×N {k}×{n} (fused vs dequant crossover) ==")
            print(HEADER)
            for small in small_ms:
                if inp := bench.inputs(small, k, n):
                    bench.time_rows(["bf16_dot", "reference", *pallas], inp, k, n)
            print("\n== decode alone (bytes = packed + absmax read + bf16 W written) ==")
            bench.decode_rows(big[-1:] if args.quick else big, base)

    total = time.perf_counter() - bench.start
    if bench.skipped:
        print(
            f"\nskipped (budget {args.budget_s:.0f} s reached): {len(bench.skipped)} rows, from "
            + "; ".join(bench.skipped[:4])
        )
    failures = [r for r in bench.rows + bench.checks if "error" in r]
    bad = [c for c in bench.checks if c.get("ok") is False]
    print(
        f"\ndone in {total:.0f} s: {len(bench.rows)} timing rows, {len(bench.checks)} checks, "
        f"{len(failures)} failures, {len(bad)} checks over tolerance"
    )
    bench.save(final=True)
    return 0


def _jaxlib_version() -> str:
    try:
        import jaxlib.version

        return jaxlib.version.__version__
    except Exception:  # noqa: BLE001
        return "?"


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


if __name__ == "__main__":
    sys.exit(main())
