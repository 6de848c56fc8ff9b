"""SM clock and board power while the NF4 kernel, XLA's decode-then-dot and cuBLAS run (issue 4).

The Mosaic GPU NF4 kernel (``pallas_kernels.nf4_matmul_mgpu``) reaches 86-95% of the bf16
cuBLAS dot, and less on the longer calls (BENCHMARKS.md §2). One explanation is power: the
kernel decodes every weight in registers, extra ALU and register-file work per flop, so at
the board's power cap it may run at a lower clock than cuBLAS does. This script runs each
candidate back to back for ``--seconds`` while ``nvidia-smi`` samples the SM clock, power
draw and temperature every 50 ms, and prints the medians of each phase next to its
achieved TFLOP/s (from the same loop's wall time), so clock-for-clock efficiency can be
read off: TFLOP/s per GHz.

    python scripts/probe_power_nf4.py [--m 16384] [--shape 4096x14336] [--seconds 3]

Needs a GPU with ``nvidia-smi`` (prints nothing useful elsewhere).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

QUERY = "clocks.sm,power.draw,temperature.gpu"


class Sampler:
    """``nvidia-smi`` in the background; ``window(t0, t1)`` gives the samples taken in it."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float, float]] = []
        self.proc = subprocess.Popen(
            ["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "-lms", "50"],
            stdout=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:
                clock, power, temp = (float(p) for p in parts[:3])
            except ValueError:
                continue
            self.samples.append((time.monotonic(), clock, power, temp))

    def window(self, t0: float, t1: float) -> list[tuple[float, float, float]]:
        return [s[1:] for s in self.samples if t0 <= s[0] <= t1]

    def close(self) -> None:
        self.proc.terminate()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=16384)
    p.add_argument("--shape", default="4096x14336", help="KxN of W [N, K]")
    p.add_argument("--seconds", type=float, default=3.0)
    a = p.parse_args()

    import jax
    import jax.numpy as jnp
    from _common import nf4_matmul_inputs

    from pallas_kernels.nf4 import dequantize_nf4
    from pallas_kernels.nf4_matmul_mgpu import nf4_matmul_mgpu, prepare_weight

    k, n = (int(v) for v in a.shape.split("x"))
    x, w16, w = nf4_matmul_inputs(a.m, k, k, n)
    prepared = jax.block_until_ready(prepare_weight(w))
    bf16 = jnp.bfloat16
    phases = {
        "cuBLAS bf16 dot": (
            jax.jit(lambda x, w: jnp.dot(x, w.T, preferred_element_type=bf16)),
            w16,
        ),
        "XLA decode+dot": (
            jax.jit(
                lambda x, w: jnp.dot(x, dequantize_nf4(w, x.dtype).T, preferred_element_type=bf16)
            ),
            w,
        ),
        "Mosaic NF4 kernel": (jax.jit(nf4_matmul_mgpu), prepared),
    }
    flops = 2 * a.m * n * k
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, M={a.m} K={k} N={n}")
    print(f"{'phase':<20} {'TFLOP/s':>8} {'SM MHz':>7} {'W':>6} {'°C':>4} {'TFLOP/s per GHz':>16}")
    sampler = Sampler()
    try:
        time.sleep(1.0)
        for name, (fn, weight) in phases.items():
            jax.block_until_ready(fn(x, weight))  # compile
            time.sleep(1.0)  # let the clock settle between phases
            calls, t0 = 0, time.monotonic()
            out = None
            while time.monotonic() - t0 < a.seconds:
                for _ in range(20):
                    out = fn(x, weight)
                calls += 20
                jax.block_until_ready(out)
            t1 = time.monotonic()
            tflops = flops * calls / (t1 - t0) / 1e12
            window = sampler.window(t0 + 0.5, t1)  # skip the ramp
            if not window:
                print(f"{name:<20} {tflops:8.1f}   (no nvidia-smi samples)")
                continue
            clock, power, temp = (statistics.median(s[i] for s in window) for i in range(3))
            print(
                f"{name:<20} {tflops:8.1f} {clock:7.0f} {power:6.0f} {temp:4.0f} "
                f"{tflops / (clock / 1e3):16.1f}",
                flush=True,
            )
    finally:
        sampler.close()


if __name__ == "__main__":
    main()
