"""What is live at a training step's peak device memory, by buffer and by source line.

The allocator's peak (``bench_train.py``'s "peak GiB") says how much; this says what. It
compiles the benchmark's training step (no step is run), has XLA dump its buffer live ranges,
and prints XLA's own account of the peak program point: the largest live buffers with their
shapes, and the breakdown of the peak by the JAX operation that made each buffer.

    python scripts/peak_memory_report.py --shape 1x8192 --remat selective:12,mlp \\
        --embeddings-on-host --top 25

Use it to decide where a remat schedule's next gigabyte comes from: whether the peak sits in
the forward's loss, in the first backward segment, or in a recompute.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

STEP_MODULE = "jit_step"  # the name jax.jit gives make_train_step's program
VALUE_LINE = re.compile(r"value: <\d+ (\S+)(?: \(phi\))? @\d+> \(size=\d+,offset=\d+\): (\S+)")
COMPUTATION_HEADER = re.compile(r"^(?:ENTRY )?%?(\S+) \(.*\{$")
INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?(\S+) = ")
OP_NAME = re.compile(r'op_name="([^"]+)"')
CALLS = re.compile(r"calls=%?([\w.\-]+)")
HOST_MEMORY_SPACE = ":S(5)"  # how XLA's layouts mark pinned host memory


@dataclasses.dataclass(frozen=True)
class PeakBuffer:
    """One buffer live at XLA's peak program point."""

    name: str  # the HLO value, e.g. "fusion.12{}"
    nbytes: int
    shape: str  # with its layout, e.g. "bf16[8192,4096]{1,0}"; "" when not found
    origin: str  # the JAX operation that made it (op_name metadata); "" when not found

    @property
    def on_host(self) -> bool:
        return HOST_MEMORY_SPACE in self.shape


def dump_options(dump_dir: str, module: str = STEP_MODULE) -> dict[str, str]:
    """``compile(compiler_options=...)`` that make XLA dump ``module``'s buffer live ranges."""
    return {"xla_dump_to": dump_dir, "xla_dump_hlo_module_re": module}


def _dump_file(dump_dir: str, module: str, suffix: str) -> str | None:
    paths = sorted(glob.glob(os.path.join(dump_dir, f"*{module}*{suffix}")))
    return paths[-1] if paths else None


def peak_report(dump_dir: str, module: str = STEP_MODULE) -> tuple[list[PeakBuffer], str]:
    """(the buffers live at the peak, largest first; XLA's breakdown of the peak by JAX
    operation) from a dump written with :func:`dump_options`."""
    path = _dump_file(dump_dir, module, "live-range.txt")
    if path is None:
        found = sorted(os.listdir(dump_dir))[:10] if os.path.isdir(dump_dir) else []
        raise FileNotFoundError(
            f"no '*{module}*live-range.txt' in {dump_dir} (found {found}); compile with "
            "compiler_options=dump_options(...), on an XLA that writes live-range dumps"
        )
    with open(path) as f:
        report = f.read()
    shapes, origins = _shapes_by_value(dump_dir, module), _op_names(dump_dir, module)
    buffers = []
    peak = re.search(r"Live ranges at \d+ \(peak\):\n(.*?)(?=\n  \S|\Z)", report, re.S)
    for line in peak.group(1).splitlines() if peak else []:
        m = re.match(r"\s+(\S+): (\d+) bytes", line)
        if m:
            name = m.group(1)
            base = name.split("{")[0]
            shape = shapes.get(name) or shapes.get(base, "")  # "x{}" is listed as "x"
            buffers.append(PeakBuffer(name, int(m.group(2)), shape, origins.get(base, "")))
    buffers.sort(key=lambda b: -b.nbytes)
    trace = re.search(r"(  Stack trace breakdown for peak usage:.*)", report, re.S)
    return buffers, trace.group(1) if trace else ""


def _shapes_by_value(dump_dir: str, module: str) -> dict[str, str]:
    """HLO value name -> shape, from the buffer-assignment dump."""
    path = _dump_file(dump_dir, module, "buffer-assignment.txt")
    out: dict[str, str] = {}
    if path:
        with open(path) as f:
            for m in VALUE_LINE.finditer(f.read()):
                out.setdefault(m.group(1), m.group(2))
    return out


def _op_names(dump_dir: str, module: str) -> dict[str, str]:
    """HLO instruction name -> the JAX operation it came from (``op_name`` metadata).

    A fusion often carries no ``op_name`` of its own; it gets the last one in the computation
    it calls, which names the JAX operation whose result the fusion writes.
    """
    path = _dump_file(dump_dir, module, "after_optimizations.txt")
    if path is None:
        return {}
    with open(path) as f:
        text = f.read()
    direct: dict[str, str] = {}
    calls: dict[str, str] = {}
    last_in_computation: dict[str, str] = {}
    computation = None
    for line in text.splitlines():
        header = COMPUTATION_HEADER.match(line)
        if header:
            computation = header.group(1)
            continue
        m = INSTRUCTION.match(line)
        if not m:
            continue
        op = OP_NAME.search(line)
        if op:
            direct.setdefault(m.group(1), op.group(1))
            if computation:
                last_in_computation[computation] = op.group(1)
        called = CALLS.search(line)
        if called:
            calls[m.group(1)] = called.group(1)
    out = dict(direct)
    for name, callee in calls.items():
        if name not in out and callee in last_in_computation:
            out[name] = last_in_computation[callee]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="1x8192", help="BxS")
    p.add_argument("--remat", default="selective:12,mlp")
    p.add_argument("--forward", default=None, help="ForwardOptions fields, key=value,...")
    p.add_argument("--chunk", type=int, default=0, help="loss chunk in tokens (0: auto)")
    p.add_argument("--layers", type=int, default=None, help="fewer layers (smoke runs)")
    p.add_argument("--embeddings-on-host", action="store_true")
    p.add_argument("--top", type=int, default=25, help="largest live buffers to list")
    p.add_argument("--min-pct", type=float, default=0.5, help="hide breakdown rows below this %%")
    p.add_argument("--dump-dir", default=None, help="keep XLA's dump here (default: temporary)")
    a = p.parse_args()

    dump_dir = a.dump_dir or tempfile.mkdtemp(prefix="lorax_peak_")

    import jax
    import numpy as np
    from bench_train import build_model, parse_forward

    import lorax
    from lorax.model import ForwardOptions
    from lorax.train import make_optimizer
    from lorax.train.step import StepConfig, init_train_state, make_train_step

    b, s = (int(x) for x in a.shape.split("x"))
    model = build_model(a.layers)
    if a.embeddings_on_host:
        model = lorax.embeddings_to_host(model)
    lora = lorax.init_lora(model, rank=16, alpha=16, targets="all-linear", key=jax.random.key(1))
    opt = make_optimizer("adamw", 1e-4, max_grad_norm=None)
    state = init_train_state(lora, opt, key=jax.random.key(2))
    forward = ForwardOptions(remat=a.remat, **parse_forward(a.forward))
    step = make_train_step(model, opt, StepConfig(loss_chunk_size=a.chunk or None, forward=forward))
    ids = np.zeros((1, b, s), np.int32)
    batch = {"input_ids": jax.device_put(ids), "labels": jax.device_put(ids)}
    compiled = step.lower(state, batch).compile(compiler_options=dump_options(dump_dir))
    stats = compiled.memory_analysis()
    gib = 2.0**30
    print(f"{a.shape} remat={a.remat} forward={a.forward or '-'} host-emb={a.embeddings_on_host}")
    if stats is not None:
        print(
            f"XLA memory analysis (GiB): arguments {stats.argument_size_in_bytes / gib:.3f}, "
            f"outputs {stats.output_size_in_bytes / gib:.3f}, "
            f"aliased {stats.alias_size_in_bytes / gib:.3f}, "
            f"temporaries {stats.temp_size_in_bytes / gib:.3f}"
        )

    buffers, trace = peak_report(dump_dir)
    device = sum(b.nbytes for b in buffers if not b.on_host)
    host = sum(b.nbytes for b in buffers if b.on_host)
    print(
        f"\nlive at XLA's peak program point: {device / gib:.3f} GiB of device memory "
        f"({host / gib:.3f} GiB more in host memory) in {len(buffers)} buffers"
    )
    print(f"{'MiB':>10}  {'cumulative GiB':>14}  buffer  shape  (JAX operation)")
    running = 0
    for b in buffers[: a.top]:
        running += b.nbytes
        print(f"{b.nbytes / 2**20:10.1f}  {running / gib:14.3f}  {b.name}  {b.shape}  {b.origin}")
    print()
    for line in trace.splitlines():
        share = re.search(r"\((\d+(?:\.\d+)?)%", line)
        if share is None or float(share.group(1)) >= a.min_pct:
            print(line)
    if a.dump_dir is None:
        print(f"\n(XLA dump in {dump_dir})")


if __name__ == "__main__":
    main()
