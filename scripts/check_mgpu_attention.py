"""Correctness and speed of the Mosaic GPU causal attention kernels on a GPU (issue 5).

For each shape (32 query / 8 KV heads, d = 128, bf16, causal; optionally windowed, softcapped
or packed) and each kernel config: the Mosaic forward's output and log-sum-exp and the
backward's dq, dk, dv against float32 jnp attention (where the S×S reference fits); then
pipelined timings (median, dispatch hidden) of the forward, the backward alone and
forward+backward, against cuDNN (where it has the options). Causal FLOPs: forward 2·B·Hq·S²·D,
backward 2.5x, forward+backward 3.5x; the per-kernel lines of the backward count the tile
products the kernels really run (dK/dV 4, dQ 3 per tile pair, against the textbook's 5). Each
variant runs in try/except, so one failure is reported and the rest go on (a kernel that
hangs is not caught: run one variant per process under ``timeout``, as
scripts/gpu_runs/gpu_run17.sh did).

    python scripts/check_mgpu_attention.py [--shapes 2x2048,1x8192,1x32768] [--variants ...]
        [--window W] [--softcap C] [--segments MEAN_LEN] [--forward-only]

With ``MOSAIC_GPU_DUMP_PTXAS=1`` ptxas reports each kernel's registers and spills.
"""

from __future__ import annotations

import argparse
import math
import traceback

import jax
import jax.numpy as jnp
from _common import attention_inputs, packed_rows, pipelined_ms

from pallas_kernels import flash_attention_mgpu as mgpu  # the kernels one by one, for timing
from pallas_kernels.flash_attention import attention_logsumexp, attention_reference
from pallas_kernels.flash_attention_mgpu import (
    MgpuAttentionConfig,
    flash_attention_mgpu,
    flash_backward_mgpu,
    flash_forward_mgpu,
)

VARIANTS = {
    "default": MgpuAttentionConfig(),
    "dq kv64": MgpuAttentionConfig(dq_block_kv=64, bwd_dq="kernel"),
    # Registers (compute, memory warpgroups): the backward's before 240/24 became its default,
    # and 240/24 in the forward too.
    "bwd r232": MgpuAttentionConfig(bwd_registers=(232, 40), bwd_dq="kernel"),
    "r240": MgpuAttentionConfig(fwd_registers=(240, 24)),
    # Launch order, forced either way (the default picks per shape: flash_attention_mgpu._grid).
    "heads first": MgpuAttentionConfig(launch_order="heads"),
    "tiles first": MgpuAttentionConfig(launch_order="tiles"),
    # dQ's design forced either way (the default picks by reach: flash_attention_mgpu._bwd_dq):
    # the dQ kernel (seven tile products), or dQ inside the dK/dV kernel (five); registers of
    # the fused kernel's (P, dS, memory) warpgroups.
    "kernel": MgpuAttentionConfig(bwd_dq="kernel"),
    "fused": MgpuAttentionConfig(bwd_dq="fused"),
    "fused r240": MgpuAttentionConfig(bwd_dq="fused", fused_registers=(240, 240, 24)),
}


def _reference(q, k, v, options):
    """Causal GQA attention in float32: output and natural-log logsumexp [B, Hq, S]."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    out = attention_reference(q, k, v, causal=True, **options)
    return out, attention_logsumexp(q, k, causal=True, **options)


def _rel(a, b) -> float:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _fwd_bwd(attend):
    def run(q, k, v, do):
        out, vjp = jax.vjp(attend, q, k, v)
        return out, *vjp(do)

    return jax.jit(run)


def _try(label: str, fn) -> None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"  {label}: FAILED {type(e).__name__}: {str(e)[:1500]}", flush=True)
        traceback.print_exc(limit=3)


def check_shape(b: int, s: int, variants: list[str], cudnn: bool = True, hq: int = 32, hkv: int = 8,
                d: int = 128, window: int | None = None, softcap: float | None = None,
                segments: int = 0, forward_only: bool = False) -> None:  # fmt: skip
    scale = d**-0.5
    q, k, v, do = attention_inputs(b, s, (hq, hkv, d))
    segment_ids = jnp.asarray(packed_rows(b, s, segments)[0]) if segments else None
    options = dict(scale=scale, sliding_window=window, softcap=softcap, segment_ids=segment_ids)
    # FLOPs counted over the causal half (the windowed and packed rows do less of it).
    fwd_flops = 2 * b * hq * s * s * d
    rate = lambda flops, ms: f"{flops / ms / 1e9:6.0f} TFLOP/s ({ms:.3f} ms)"
    print(f"== {b}x{s} window={window} softcap={softcap} segments={segments or None}", flush=True)
    if cudnn and softcap is None and not segments:
        attend = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, scale=scale, implementation="cudnn",
            local_window_size=None if window is None else (window - 1, 0),
        )  # fmt: skip
        t_fwd = pipelined_ms(jax.jit(attend), q, k, v)
        line = f"  cuDNN    fwd {rate(fwd_flops, t_fwd)}"
        if not forward_only:
            t_fb = pipelined_ms(_fwd_bwd(attend), q, k, v, do)
            line += f"  bwd {rate(2.5 * fwd_flops, t_fb - t_fwd)}"
            line += f"  fwd+bwd {rate(3.5 * fwd_flops, t_fb)}"
        print(line, flush=True)

    if forward_only:
        _forward_only(q, k, v, variants, options, lambda ms: rate(fwd_flops, ms))
        return
    want = None
    if b * hq * s * s * 4 <= 2**33:  # the f32 score matrix fits a few times over (16 GiB did not)
        (out_ref, lse_ref), vjp = jax.vjp(lambda *x: _reference(*x, options), q, k, v)
        want = (out_ref, lse_ref, *vjp((do.astype(jnp.float32), jnp.zeros_like(lse_ref))))

    for name in variants:
        config = VARIANTS[name]

        def run(config=config, name=name) -> None:
            fwd = jax.jit(lambda q, k, v: flash_forward_mgpu(q, k, v, config=config, **options))
            bwd = jax.jit(lambda *a: flash_backward_mgpu(*a, config=config, **options))
            out, lse = fwd(q, k, v)
            grads = bwd(q, k, v, out, lse, do)
            errs = ""
            if want is not None:
                grad_errs = [_rel(g, w) for g, w in zip(grads, want[2:], strict=True)]
                lse_err = float(jnp.max(jnp.abs(lse - want[1])))
                errs = f"  rel.err out {_rel(out, want[0]):.1e} lse-abs {lse_err:.1e} dq/dk/dv "
                errs += "/".join(f"{e:.1e}" for e in grad_errs)
            t_f = pipelined_ms(fwd, q, k, v)
            t_b = pipelined_ms(bwd, q, k, v, out, lse, do)
            attend = lambda q, k, v: flash_attention_mgpu(
                q, k, v, scale, config, None, segment_ids, sliding_window=window, softcap=softcap
            )
            t_fb = pipelined_ms(_fwd_bwd(attend), q, k, v, do)
            print(f"  {name:<16} fwd {rate(fwd_flops, t_f)}  bwd {rate(2.5 * fwd_flops, t_b)}"
                  f"  fwd+bwd {rate(3.5 * fwd_flops, t_fb)}{errs}", flush=True)  # fmt: skip
            # Where the backward's time goes, kernel by kernel.
            seg, spec = mgpu._prepare(q, k, v, config, segment_ids, scale, window, softcap)
            lse2 = lse * math.log2(math.e)
            f32 = jnp.float32
            delta_of = jax.jit(lambda o, g: jnp.einsum("bshd,bshd->bhs", o.astype(f32), g))
            delta = delta_of(out, do)  # rowsum(dO ⊙ O), as the backward computes it
            delta_ms = pipelined_ms(delta_of, out, do)
            args = (q, k, v, do, lse2, delta)
            if mgpu._bwd_dq(config, q.shape, spec, seg is not None) == "fused":  # 5 products

                def fused_kernel(*a):
                    dq_acc = jax.new_ref(jnp.zeros(q.shape, f32), memory_space=mgpu.plgpu.GMEM)
                    return *mgpu._fused_call(*a, seg, spec, config, None, dq_acc), dq_acc[...]

                t_fused = pipelined_ms(jax.jit(fused_kernel), *args)
                print(f"  {'':<16} fused kernel with its dQ buffer {rate(2.5 * fwd_flops, t_fused)}"
                      f"  Δ reduction {delta_ms:.3f} ms", flush=True)  # fmt: skip
                return
            dkdv = jax.jit(lambda *a: mgpu._dkdv_call(*a, seg, spec, config, None))
            dq = jax.jit(lambda *a: mgpu._dq_call(*a, seg, spec, config, None))
            # Tile products actually run: dK/dV 4 and dQ 3 per tile pair (forward: 2).
            print(f"  {'':<16} dK/dV kernel {rate(2 * fwd_flops, pipelined_ms(dkdv, *args))}"
                  f"  dQ kernel {rate(1.5 * fwd_flops, pipelined_ms(dq, *args))}"
                  "  (real tensor work)", flush=True)  # fmt: skip
            # The rest of the backward: the Δ reduction, and the two kernels back to back.
            both = jax.jit(lambda *a: (dkdv(*a), dq(*a)))
            print(f"  {'':<16} Δ reduction {delta_ms:.3f} ms"
                  f"  both kernels {pipelined_ms(both, *args):.3f} ms", flush=True)  # fmt: skip

        _try(name, run)


def _forward_only(q, k, v, variants: list[str], options: dict, rate) -> None:
    """The forward alone, variant by variant: its time, and its output and log-sum-exp against
    the first variant's (a schedule change must not change the numbers beyond rounding)."""
    first = None
    for name in variants:
        config = VARIANTS[name]

        def run(config=config, name=name) -> None:
            nonlocal first
            fwd = jax.jit(lambda q, k, v: flash_forward_mgpu(q, k, v, config=config, **options))
            out, lse = fwd(q, k, v)
            diff = ""
            if first is None:
                first = (name, out, lse)
            else:
                out_diff = float(jnp.max(jnp.abs(out.astype(jnp.float32) - first[1])))
                lse_diff = float(jnp.max(jnp.abs(lse - first[2])))
                diff = f"  max|diff| vs {first[0]}: out {out_diff:.1e} lse {lse_diff:.1e}"
            print(f"  {name:<16} fwd {rate(pipelined_ms(fwd, q, k, v))}{diff}", flush=True)

        _try(name, run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="2x2048,1x8192,1x32768")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list")
    parser.add_argument("--no-cudnn", action="store_true", help="skip the cuDNN baseline")
    parser.add_argument("--window", type=int, help="sliding window (HF's meaning)")
    parser.add_argument("--softcap", type=float, help="score softcap (Gemma 2: 50)")
    parser.add_argument("--segments", type=int, default=0,
                        help="packed rows of examples of about this many tokens")  # fmt: skip
    parser.add_argument("--forward-only", action="store_true",
                        help="the forward alone, outputs against the first variant's")  # fmt: skip
    args = parser.parse_args()
    for shape in args.shapes.split(","):
        b, s = (int(x) for x in shape.split("x"))
        check_shape(b, s, [v for v in args.variants.split(",") if v], cudnn=not args.no_cudnn,
                    window=args.window, softcap=args.softcap, segments=args.segments,
                    forward_only=args.forward_only)  # fmt: skip


if __name__ == "__main__":
    main()
