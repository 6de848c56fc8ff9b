"""ptxas's register report for the Mosaic GPU attention kernels, on a machine without a GPU.

Whether a kernel's live set fits its warpgroups' registers decided more of issue 5 than any
schedule (BENCHMARKS.md §3, "Register pressure"). On the GPU, ``MOSAIC_GPU_DUMP_PTXAS=1`` prints
ptxas's report when a kernel compiles; this script gets the same report on a CPU machine, a few
seconds per kernel, so register work does not spend device time.

How: each kernel is lowered for CUDA on the CPU, and its serialized Mosaic GPU module goes to
``MosaicGpuCompile``, the C entry point of jax's CUDA plugin that the GPU runtime itself calls
(MLIR passes, LLVM's NVPTX backend, ptxas). The only thing that pipeline asks the driver for is
the compute capability, which ``scripts/fake_libcuda.c`` answers (9.0: compiled for sm_90a,
as on the H200). The compile then fails where it would load the module; by then ptxas has run.
The reports match the H200's byte for byte (the dK/dV kernel of that time at 1x8192, 240/24:
176 B spill stores and 352 B loads, as ``scripts/results/h200-2026-11-30-s4/call5_new.log``;
the fused kernels' 352 / 1128 and 824 / 2124 B, as ``h200-2026-11-30-s9/run94/f3_32k.log``).

Setup (once; a separate environment, as this one has jax's CUDA plugin; ~1 GB):

    python3.12 -m venv /tmp/ptxas-venv && . /tmp/ptxas-venv/bin/activate
    pip install jax==0.11.2 jaxlib==0.11.2 jax-cuda12-plugin==0.11.2 jax-cuda12-pjrt==0.11.2 \\
        nvidia-cuda-nvcc-cu12   # ptxas, where no CUDA toolkit is installed
    # and gcc on PATH (builds the fake driver into a temporary folder)

Usage (from the repository root, in that environment):

    python scripts/ptxas_report.py [--shape 1x8192] [--kernels fwd,dkdv,dq]
        [--config bwd_registers=232,40 ...] [--window W] [--softcap C] [--segments]
        [--keep DIR] [--sass]

Prints one row per kernel: registers, stack frame, spill stores and loads (bytes per thread,
as ptxas counts them: static code, not traffic), how many times ptxas had to fence the
in-flight wgmmas ("warpgroup.arrive is injected", C7519) and whether it serialized them
("wgmma.mma_async instructions are serialized", C7513). ``--keep DIR`` keeps each kernel's
PTX and full ptxas log.

Spill bytes say nothing of where the spills sit. ``--sass`` (needs ``nvdisasm``: the
``nvidia-cuda-nvdisasm`` wheel, or a CUDA toolkit, on PATH) disassembles each kernel and prints
its innermost loops that hold wgmmas: instructions, wgmmas, local loads and stores, and the
``exp2`` issued while one of the loop's own wgmmas is in flight. A spill outside those loops
costs a few cycles per CTA; one inside costs it at every step.
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # not "no CUDA driver found" for each kernel
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KERNELS = ("fwd", "dkdv", "dq", "fused_bwd")
_FAKE_DRIVER_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_libcuda.c")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_FUNCTION = re.compile(r"Function properties for (\S+)")
_REGISTERS = re.compile(r"Used (\d+) registers")
# ptxas's wgmma warnings: C7519 "warpgroup.arrive is injected" (it fenced in-flight wgmmas to
# reuse their registers), C7513 "wgmma.mma_async instructions are serialized" (a wgmma's input
# registers were written inside its pipeline stage) or C7512 (serialized "due to insufficient
# register resources"). Each runs the products one at a time.
_WGMMA_WARNING = re.compile(r"\((C7519|C7513|C7512)\).* in (?:the )?function '(\S+)'")


@dataclasses.dataclass(frozen=True)
class KernelReport:
    """One kernel's line of ptxas's ``-v`` report."""

    name: str
    registers: int
    stack: int
    spill_stores: int
    spill_loads: int
    wgmma_fences: int
    wgmma_serialized: int


def parse_report(lines: list[str]) -> list[KernelReport]:
    """The kernels in a ptxas ``-v`` log, in its order (a kernel's wgmma warnings are those
    that name it)."""
    reports, warnings, name, stack = [], collections.Counter(), None, (0, 0, 0)
    for line in lines:
        if m := _WGMMA_WARNING.search(line):
            warnings[m.groups()[::-1]] += 1
        elif m := _FUNCTION.search(line):
            name = m.group(1)
        elif m := _STACK.search(line):
            stack = tuple(int(x) for x in m.groups())
        elif (m := _REGISTERS.search(line)) and name is not None:
            counts = warnings[name, "C7519"], warnings[name, "C7513"] + warnings[name, "C7512"]
            reports.append(KernelReport(name, int(m.group(1)), *stack, *counts))
            name, stack = None, (0, 0, 0)
    return reports


@dataclasses.dataclass(frozen=True)
class LoopReport:
    """An innermost loop of a kernel's SASS that issues wgmmas. ``exp2_under_wgmma``: the
    ``MUFU.EX2`` that issue while one of the loop's own wgmmas is in flight (after an
    ``HGMMA``, before the next wait): the softmax work a warpgroup hides under its own
    products (the other warpgroup's are not visible here)."""

    first_line: int
    instructions: int
    wgmmas: int
    local_loads: int
    local_stores: int
    exp2_under_wgmma: int


def _exp2_under_wgmma(body: list[str]) -> int:
    in_flight, count = False, 0
    for line in body:
        if "HGMMA" in line:
            in_flight = True
        elif "WARPGROUP.DEPBAR" in line:
            in_flight = False
        elif in_flight and "MUFU.EX2" in line:
            count += 1
    return count


_LABEL = re.compile(r"^\.(L_x_\d+):")
_BRANCH = re.compile(r"@!?U?P\d \s*BRA `\(\.(L_x_\d+)\)")  # a predicated (loop) branch


def wgmma_loops(sass: str) -> list[LoopReport]:
    """The innermost loops that issue ``HGMMA``s, in code order: the ranges of predicated
    backward branches that hold no other such range. (A barrier wait that must retry jumps out
    of line and back by an unconditional branch, which is not a loop here.)"""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line.strip()))}
    spans = []
    for i, line in enumerate(lines):
        if (m := _BRANCH.search(line)) and labels.get(m.group(1), i) < i:
            spans.append((labels[m.group(1)], i))
    wgmma_spans = [(a, b) for a, b in spans if any("HGMMA" in x for x in lines[a : b + 1])]
    innermost = [
        (a, b) for a, b in wgmma_spans
        if not any((c, d) != (a, b) and a <= c and d <= b for c, d in wgmma_spans)
    ]  # fmt: skip

    def count(body: list[str], pattern: str) -> int:
        return sum(bool(re.search(pattern, x)) for x in body)

    return [
        LoopReport(
            a,
            count(lines[a : b + 1], r"/\*[0-9a-f]+\*/"),
            count(lines[a : b + 1], r"\bHGMMA\b"),
            count(lines[a : b + 1], r"\bLDL\b"),
            count(lines[a : b + 1], r"\bSTL\b"),
            _exp2_under_wgmma(lines[a : b + 1]),
        )  # fmt: skip
        for a, b in sorted(set(innermost))
    ]


def disassemble(ptx: str, workdir: str, name: str) -> str:
    """The SASS of a PTX module (ptxas and nvdisasm from PATH)."""
    tools = {tool: shutil.which(tool) for tool in ("ptxas", "nvdisasm")}
    if missing := [tool for tool, path in tools.items() if path is None]:
        raise RuntimeError(f"--sass needs {missing} on PATH (pip install nvidia-cuda-nvdisasm)")
    ptx_path, cubin = (os.path.join(workdir, f"{name}.{ext}") for ext in ("ptx", "cubin"))
    with open(ptx_path, "w") as f:
        f.write(ptx)
    subprocess.run([tools["ptxas"], "-arch=sm_90a", ptx_path, "-o", cubin], check=True)
    done = subprocess.run([tools["nvdisasm"], "-c", cubin], check=True, capture_output=True)
    return done.stdout.decode()


def _kernel_of(function: str) -> str | None:
    """``lorax_mgpu_attention_dkdv_mosaic_gpu_kernel`` -> ``dkdv`` (None if not one of ours)."""
    m = re.fullmatch(r"lorax_mgpu_attention_(\w+?)_mosaic_gpu_kernel", function)
    return m.group(1) if m and m.group(1) in KERNELS else None


def _fake_driver(folder: str) -> str:
    path = os.path.join(folder, "libcuda.so.1")
    build = ["gcc", "-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-o", path]
    subprocess.run([*build, _FAKE_DRIVER_SOURCE], check=True)
    return path


def _compile_in_this_process(module_path: str, driver: str) -> None:
    """The child's job: ptxas's report on stdout (the call then fails to load the kernel)."""
    import ctypes

    ctypes.CDLL(driver, mode=ctypes.RTLD_GLOBAL)  # before the plugin looks for a driver
    import jax.experimental.mosaic.gpu  # noqa: F401  (points the compiler at CUDA's tools)

    try:
        from jax_plugins import xla_cuda12 as plugin
    except ImportError:
        from jax_plugins import xla_cuda13 as plugin
    compile_module = ctypes.CDLL(plugin._get_library_path()).MosaicGpuCompile
    compile_module.argtypes = [ctypes.c_char_p, ctypes.c_int]
    compile_module.restype = ctypes.c_void_p
    with open(module_path, "rb") as f:
        module = f.read()
    sys.stdout.flush()
    compile_module(module, len(module))


def lowered_modules(fn, *args) -> list[bytes]:
    """The serialized Mosaic GPU modules of the kernels ``fn(*args)`` launches, lowered for
    CUDA here on the CPU.

    Read from ``jax.experimental.mosaic.gpu.core.KNOWN_KERNELS``, where jax 0.11.2 keeps each
    module it lowers (keyed by its hash): an internal of that version, hence the check.
    """
    import jax
    from jax.experimental.mosaic.gpu import core

    known = getattr(core, "KNOWN_KERNELS", None)
    if not isinstance(known, dict):
        raise RuntimeError(f"jax {jax.__version__} keeps no KNOWN_KERNELS; written for 0.11.2")
    before = set(known)
    jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    return [module for key, module in known.items() if key not in before]


def ptxas_report(module: bytes, workdir: str, name: str, driver: str) -> tuple[list[str], str]:
    """ptxas's ``-v`` lines and the PTX of one module (compiled in a child process that loads
    the fake ``driver``)."""
    module_path = os.path.join(workdir, f"{name}.mlirbc")
    with open(module_path, "wb") as f:
        f.write(module)
    env = dict(os.environ, MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_PTXAS="1")
    child = [sys.executable, os.path.abspath(__file__), "--compile-module", module_path, driver]
    done = subprocess.run(child, env=env, capture_output=True, text=True, timeout=900)
    lines = done.stdout.splitlines()
    report = [line for line in lines if line.startswith("ptxas") or _STACK.search(line)]
    if not parse_report(report):
        raise RuntimeError(f"no ptxas report for {name}:\n{done.stderr[-3000:]}")
    ptx = [line for line in lines if line not in report]
    return report, "\n".join(ptx) + "\n"


def _config_value(text: str):
    """``232,40`` -> (232, 40); ``heads`` -> "heads"; ``128`` -> 128."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _attention_calls(args) -> dict[str, tuple]:
    """Per kernel: a function whose lowering launches it, and its abstract arguments."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.flash_attention_mgpu import (
        MgpuAttentionConfig,
        _backward,
        _prepare,
        flash_forward_mgpu,
    )

    batch, seq = (int(x) for x in args.shape.split("x"))
    overrides = dict(item.split("=", 1) for item in args.config)
    config = MgpuAttentionConfig(**{k: _config_value(v) for k, v in overrides.items()})
    q = jax.ShapeDtypeStruct((batch, seq, args.heads, args.head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((batch, seq, args.kv_heads, args.head_dim), jnp.bfloat16)
    lse = jax.ShapeDtypeStruct((batch, args.heads, seq), jnp.float32)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32) if args.segments else None
    options = dict(sliding_window=args.window, softcap=args.softcap)
    scale = args.head_dim**-0.5

    def forward(q, k, v, ids):
        return flash_forward_mgpu(q, k, v, scale=scale, config=config, segment_ids=ids, **options)

    def backward(q, k, v, lse, ids):
        seg, spec = _prepare(q, k, v, config, ids, scale, args.window, args.softcap)
        return _backward(q, k, v, q, lse, q, seg, spec, config, None)

    return {"fwd": (forward, (q, kv, kv, ids)), "bwd": (backward, (q, kv, kv, lse, ids))}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--compile-module"]:
        return _compile_in_this_process(*argv[1:3])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="1x8192", help="BxS")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--kernels", default=",".join(KERNELS), help="of " + ",".join(KERNELS))
    parser.add_argument(
        "--config", action="append", default=[], metavar="FIELD=VALUE",
        help="an MgpuAttentionConfig field, e.g. bwd_registers=232,40 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--softcap", type=float, default=None)
    parser.add_argument("--segments", action="store_true", help="packed rows (segment ids)")
    parser.add_argument("--keep", default=None, help="a folder for each kernel's PTX and log")
    parser.add_argument("--sass", action="store_true", help="per-loop spills (needs nvdisasm)")
    args = parser.parse_args(argv)
    wanted = args.kernels.split(",")
    if unknown := set(wanted) - set(KERNELS):
        parser.error(f"unknown kernels {sorted(unknown)}; known: {KERNELS}")

    calls = _attention_calls(args)
    work = args.keep or tempfile.mkdtemp(prefix="ptxas_report_")
    os.makedirs(work, exist_ok=True)
    driver = _fake_driver(work)
    print(f"{'kernel':<28} {'registers':>9} {'stack B':>8} {'spill st B':>10} "
          f"{'spill ld B':>10} {'wgmma fences':>12} {'serialized':>10}")  # fmt: skip
    for part, names in (("fwd", ("fwd",)), ("bwd", ("dkdv", "dq", "fused_bwd"))):
        if not set(names) & set(wanted):
            continue  # its kernels are not lowered at all
        fn, abstract = calls[part]
        for i, module in enumerate(lowered_modules(fn, *abstract)):
            report, ptx = ptxas_report(module, work, f"{part}{i}", driver)
            kernels = [k for k in parse_report(report) if _kernel_of(k.name) in wanted]
            if not kernels:
                continue
            for kernel in kernels:
                shown = kernel.name.removesuffix("_mosaic_gpu_kernel")
                print(f"{shown:<28} {kernel.registers:>9} {kernel.stack:>8} "
                      f"{kernel.spill_stores:>10} {kernel.spill_loads:>10} "
                      f"{kernel.wgmma_fences:>12} {kernel.wgmma_serialized:>10}")  # fmt: skip
            if args.sass:
                for loop in wgmma_loops(disassemble(ptx, work, f"{part}{i}")):
                    print(f"  loop at SASS line {loop.first_line}: {loop.instructions} "
                          f"instructions, {loop.wgmmas} wgmmas, {loop.local_loads} local loads, "
                          f"{loop.local_stores} local stores, {loop.exp2_under_wgmma} exp2 "
                          "under its own wgmmas")  # fmt: skip
            if args.keep:
                with open(os.path.join(work, f"{part}{i}.ptx"), "w") as f:
                    f.write(ptx)
                with open(os.path.join(work, f"{part}{i}.ptxas"), "w") as f:
                    f.write("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
