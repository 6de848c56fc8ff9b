"""Peak memory of the LM loss + gradient: chunked cross-entropy vs dense logits.

Usage (defaults: Llama-3 vocab 128256, 8192 tokens, D=4096, bf16, chunk 2048)::

    python scripts/bench_loss_memory.py                  # XLA analysis + measured peaks
    python scripts/bench_loss_memory.py --no-measure     # XLA analysis only (compile, no run)
    python scripts/bench_loss_memory.py --json out.json

For each loss (``chunked`` = ``lorax.train.chunked_cross_entropy``, ``dense`` =
``cross_entropy_reference``, which materialises the f32 ``[tokens, vocab]`` logits) and each
set of gradients (``hidden``: frozen LM head, the LoRA case; ``hidden+head``: tied embeddings
or full fine-tuning), the jitted ``grad`` of the summed loss is compiled and reported:

  ``xla temp``   ``compiled.memory_analysis().temp_size_in_bytes``: XLA's scratch buffers,
                 i.e. everything beyond arguments and outputs. This is the number the
                 chunking shrinks.
  ``xla peak``   temp + arguments + outputs - aliased: XLA's static peak estimate.
  ``measured``   with ``--measure`` (default), the function runs once in a fresh child
                 process. On CPU: peak RSS during the call minus RSS before it (the kernel's
                 high-water mark, reset through /proc/self/clear_refs, else a 2 ms poll). On
                 GPU: the device's ``peak_bytes_in_use`` minus ``bytes_in_use`` before.
  ``run s``      wall time of that call (CPU numbers are for memory, not speed).

One full-size row is ~26 TFLOP (fwd + recompute + two gradient GEMMs); on a few CPU cores
that is minutes per row. ``--dim`` shrinks it: the logits, and so the difference between
the two losses, do not depend on D.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lorax.train.loss import chunked_cross_entropy, cross_entropy_reference  # noqa: E402

LOSSES = {"chunked": chunked_cross_entropy, "dense": cross_entropy_reference}
GRADS = {"hidden": (0,), "hidden+head": (0, 1)}
MiB = 2**20


def grad_fn(loss: str, grads: str, chunk_size: int) -> Callable:
    fn = LOSSES[loss]

    def loss_sum(hidden, lm_head, labels):
        return fn(hidden, lm_head, labels, chunk_size=chunk_size)[0]

    return jax.jit(jax.grad(loss_sum, argnums=GRADS[grads]))


def abstract_inputs(args: argparse.Namespace) -> tuple[jax.ShapeDtypeStruct, ...]:
    dtype = jnp.dtype(args.dtype)
    return (
        jax.ShapeDtypeStruct((args.tokens, args.dim), dtype),
        jax.ShapeDtypeStruct((args.vocab, args.dim), dtype),
        jax.ShapeDtypeStruct((args.tokens,), jnp.int32),
    )


def concrete_inputs(args: argparse.Namespace) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((args.tokens, args.dim), np.float32)
    lm_head = rng.standard_normal((args.vocab, args.dim), np.float32) / np.sqrt(args.dim)
    labels = rng.integers(0, args.vocab, args.tokens, dtype=np.int32)
    labels[rng.uniform(size=args.tokens) < 0.1] = -100
    out = (
        jnp.asarray(hidden, args.dtype),
        jnp.asarray(lm_head, args.dtype),
        jnp.asarray(labels),
    )
    del hidden, lm_head
    return jax.block_until_ready(out)


def analyse(loss: str, grads: str, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    compiled = grad_fn(loss, grads, args.chunk_size).lower(*abstract_inputs(args)).compile()
    stats = compiled.memory_analysis()
    temp = stats.temp_size_in_bytes
    peak = (
        temp + stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
    )
    return {"xla_temp": temp, "xla_peak": peak, "compile_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------- measuring


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _high_water_mark() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_here(loss: str, grads: str, args: argparse.Namespace) -> dict:
    """Run once in this (fresh) process and report the memory the call itself added."""
    inputs = concrete_inputs(args)
    compiled = grad_fn(loss, grads, args.chunk_size).lower(*inputs).compile()
    device = jax.devices()[0]
    if device.platform != "cpu":
        before = device.memory_stats()["bytes_in_use"]
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        seconds = time.perf_counter() - t0
        delta = device.memory_stats()["peak_bytes_in_use"] - before
        return {"measured": delta, "run_s": seconds, "how": "device peak_bytes_in_use"}

    before = _rss()
    exact = _reset_high_water_mark()
    peak, done = [before], threading.Event()

    def poll() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], _rss())

    poller = None if exact else threading.Thread(target=poll, daemon=True)
    if poller:
        poller.start()
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*inputs))
    seconds = time.perf_counter() - t0
    done.set()
    high = _high_water_mark() if exact else max(peak[0], _rss())
    del out
    how = "RSS high-water mark" if exact else "RSS polled every 2 ms"
    return {"measured": high - before, "run_s": seconds, "how": how}


def measure_in_child(loss: str, grads: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", loss, grads]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--loss", choices=sorted(LOSSES), nargs="*", default=list(LOSSES))
    parser.add_argument("--grads", choices=sorted(GRADS), nargs="*", default=list(GRADS))
    parser.add_argument("--measure", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(measure_here(*args.child, args)))
        return

    device = jax.devices()[0]
    logits_bytes = args.tokens * args.vocab * 4
    print(
        f"# {datetime.datetime.now().isoformat(timespec='seconds')}  jax {jax.__version__}  "
        f"{device.platform}: {device.device_kind}  host: {platform.node()}"
    )
    print(
        f"# tokens={args.tokens} vocab={args.vocab} dim={args.dim} dtype={args.dtype} "
        f"chunk={args.chunk_size}; one f32 [tokens, vocab] array = {logits_bytes / MiB:.0f} MiB"
    )
    header = f"{'loss':8} {'grads':12} {'xla temp':>10} {'xla peak':>10} {'measured':>10}"
    print(f"{header} {'run s':>7}   (memory in MiB)")
    rows = []
    for loss in args.loss:
        for grads in args.grads:
            row = {"loss": loss, "grads": grads, **analyse(loss, grads, args)}
            if args.measure:
                row.update(measure_in_child(loss, grads, args))
            rows.append(row)
            measured = f"{row['measured'] / MiB:10.0f}" if "measured" in row else f"{'-':>10}"
            seconds = f"{row['run_s']:7.1f}" if "run_s" in row else f"{'-':>7}"
            print(
                f"{loss:8} {grads:12} {row['xla_temp'] / MiB:10.0f} "
                f"{row['xla_peak'] / MiB:10.0f} {measured} {seconds}"
                + (f"   error: {row['error']}" if "error" in row else ""),
                flush=True,
            )
    if rows and "how" in rows[0]:
        print(f"# measured = {rows[0]['how']} during one call, minus the level before it")
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k not in ("child", "json")}
        meta |= {"jax": jax.__version__, "device": device.device_kind, "host": platform.node()}
        with open(args.json, "w") as f:
            json.dump({"config": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
