"""Max-context table: the longest batch-1 sequence a QLoRA training step fits in N GiB.

Issue #7 item 5, beside `scripts/bench_torch.py --max-context` (Unsloth). Workload as in
scripts/bench_train.py: Llama-3.1-8B architecture, random NF4 base (double quant), LoRA r=16
alpha=16 on all 7 projections (f32), AdamW, chunked cross-entropy, batch 1, labels = inputs.
The policy is the lowest-memory one by default (`--remat offload`: each layer's input goes to
pinned host memory); `--forward key=value,...` passes more ForwardOptions fields through
(e.g. `mlp_chunk_tokens=4096`), `--loss-chunk` sets the LM-head chunk. Caps are GiB
(2**30 bytes), the unit of bench_torch.py's --caps.

Method (every stage watches --deadline-s; whatever is known at the end is printed):

1. Compile-only memory model. Worker processes build the model, LoRA and AdamW state
   abstractly (jax.eval_shape over bench_train.build_model: no weights exist), lower the
   library's train step (make_train_step's own jit, lowered) for a ShapeDtypeStruct batch
   and compile it. XLA's `compiled.memory_analysis()` gives the device estimate
   argument + output - alias + temp + generated code; the host_* fields (where the offload
   policy parks activations) are recorded beside it. Calibrate at --calib-seqs, fit
   peak(S) = a + b*S, predict each cap's S (a multiple of --granularity), compile there and
   refine (secant over all compiled points, bisection if it stalls) until S fits and
   S + granularity does not. The 8B and the 70B searches run in two workers side by side
   (--serial-compile: one). The compile workers add --compile-xla-flags (default
   --xla_gpu_autotune_level=0: autotuning GEMMs of hundreds of thousands of rows costs
   minutes and does not change buffer sizes beyond a GEMM workspace).
2. Reality check by running, each in a fresh process with default XLA flags: one uncapped
   process trains at --run-calib-seqs (allocator peak vs compile estimate: the ratio says how
   far to trust the compile-only rows; step seconds fit c*S + d*S^2, attention being
   quadratic), then, smallest cap first while the predicted time fits the deadline, 2 steps at
   the compile-found max S in a process whose device is capped with
   XLA_PYTHON_CLIENT_MEM_FRACTION = cap / device memory, preallocation on: XLA's pool is the
   cap, like a smaller card (the CUDA context and library handles live outside it, as they do
   outside torch's set_per_process_memory_fraction). An OOM lowers the row: one retry at the
   S whose estimate times the measured ratio fits. Rows say how they were verified ("run",
   "compile").
3. Llama-3.1-70B architecture (80 layers, hidden 8192, intermediate 28672, 64/8 heads, vocab
   128256): compile-only, whether a step fits in --cap-70b GiB (48) and up to which S, and the
   fixed cost (NF4 weights, embedding + LM head, LoRA, AdamW moments).

On the H200 (one device call: ~8 minutes with the default --deadline-s 480; with
mlp_chunk_tokens the same):

    python scripts/bench_max_context.py --json $OUT/max_context.json
    python scripts/bench_max_context.py --forward mlp_chunk_tokens=4096 \\
        --json $OUT/max_context_mlpchunk.json

Unsloth's rows (`bench_torch.py --max-context --json torch_maxctx.json`) go beside lorax's
with --torch-json, at run time or afterwards from the saved JSON:

    python scripts/bench_max_context.py --render max_context.json --torch-json torch_maxctx.json

CPU smoke test (tiny models, caps in MiB, every stage including one run process; < 1 minute on
an idle 2-core machine):

    python scripts/bench_max_context.py --tiny --json /tmp/max_context_tiny.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from _common import fit_line

START = time.perf_counter()
SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)
for _p in (REPO, SCRIPTS):
    if _p not in sys.path:
        sys.path.insert(0, _p)

GIB = 2**30
MIB = 2**20

# Llama-3.1-70B on top of bench_train.LLAMA31_8B (same vocab, norms, rope theta).
LLAMA31_70B = dict(
    hidden_size=8192,
    intermediate_size=28672,
    num_layers=80,
    num_heads=64,
    num_kv_heads=8,
    head_dim=128,
)
# --tiny: CPU-sized stand-ins with the same structure (GQA, NF4 blocks of 64).
TINY_8B = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=704,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
)
TINY_70B = dict(TINY_8B, hidden_size=384, intermediate_size=1024, num_layers=3, num_heads=6)
MODELS = {"8b": "Llama-3.1-8B", "70b": "Llama-3.1-70B"}
TINY_MODELS = {"8b": "tiny 8B stand-in", "70b": "tiny 70B stand-in"}
# XLA:CPU compiles the tiny step 3-4x faster with these (only used with --tiny).
TINY_XLA_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
    "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE"
)
LORA_RANK, LORA_ALPHA = 16, 16


LOG_LOCK = threading.Lock()


def log(msg: str) -> None:
    """A progress line, stamped with seconds since start (whole lines from any thread)."""
    with LOG_LOCK:
        sys.stdout.write(f"[{time.perf_counter() - START:6.1f}s] {msg}\n")
        sys.stdout.flush()


def emit(tag: str, payload: dict) -> None:
    print(f"{tag} " + json.dumps(payload), flush=True)


def short_error(e: BaseException | str, limit: int = 600) -> str:
    text = str(e).strip().replace("\n", " | ")
    return text if len(text) <= limit else text[: limit // 2] + " ... " + text[-limit // 2 :]


def is_oom(text: str) -> bool:
    t = text.lower()
    return "resource_exhausted" in t or "out of memory" in t or "oom" in t.split()


# ============================================================================ worker side


def model_overrides(name: str, tiny: bool) -> dict:
    if name == "8b":
        return dict(TINY_8B) if tiny else {}
    if name == "70b":
        return dict(TINY_70B) if tiny else dict(LLAMA31_70B)
    raise ValueError(f"unknown model {name!r}")


def forward_options(remat: str, spec: str | None) -> Any:
    """ForwardOptions(remat=..., **--forward): unknown fields raise TypeError here."""
    from bench_train import parse_forward

    from lorax.model import ForwardOptions

    return ForwardOptions(remat=remat, **parse_forward(spec))


def step_config(a: argparse.Namespace) -> Any:
    from lorax.train.step import StepConfig

    return StepConfig(
        loss_chunk_size=a.loss_chunk or None, forward=forward_options(a.remat, a.forward)
    )


def setup_jax(a: argparse.Namespace) -> None:
    import jax

    if a.cache_dir:  # best effort: without the cache every process compiles for itself
        for name, value in (
            ("jax_compilation_cache_dir", a.cache_dir),
            ("jax_persistent_cache_min_compile_time_secs", 0.0),
            ("jax_persistent_cache_min_entry_size_bytes", 0),
        ):
            with contextlib.suppress(Exception):
                jax.config.update(name, value)


def build_state(a: argparse.Namespace, name: str, abstract: bool) -> tuple[Any, Any, Any]:
    """(model, train state, optimizer); with abstract=True ShapeDtypeStructs only."""
    import jax
    from bench_train import build_model

    import lorax
    from lorax.train import make_optimizer
    from lorax.train.step import init_train_state

    optimizer = make_optimizer("adamw", 1e-4, max_grad_norm=None)

    def make_model() -> Any:
        return build_model(a.layers, model_overrides(name, a.tiny))

    def make_state(model: Any) -> Any:
        lora = lorax.init_lora(
            model, rank=LORA_RANK, alpha=LORA_ALPHA, targets="all-linear", key=jax.random.key(1)
        )
        return init_train_state(lora, optimizer, key=jax.random.key(2))

    if abstract:
        model = jax.eval_shape(make_model)
        # init_lora reads only the config; the abstract model is a closed-over constant.
        state = jax.eval_shape(lambda: make_state(model))
    else:
        model = make_model()
        state = make_state(model)
        jax.block_until_ready((model, state))
    return model, state, optimizer


def nbytes(tree: Any) -> int:
    import jax
    import numpy as np

    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        with contextlib.suppress(AttributeError, TypeError):  # PRNG keys and the like
            total += math.prod(x.shape) * np.dtype(x.dtype).itemsize
    return total


def fixed_costs(model: Any, state: Any) -> dict:
    """Bytes that do not depend on S: frozen base, adapters, optimizer state."""
    params = model.params
    layers = params["layers"]
    norms = {k: v for k, v in layers.items() if not isinstance(v, dict)}
    projections = {k: v for k, v in layers.items() if isinstance(v, dict)}
    out = {
        "nf4_weights": nbytes(projections),
        "embed_lm_head": nbytes(params["embed_tokens"]) + nbytes(params.get("lm_head", {})),
        "norms": nbytes(norms) + nbytes(params["norm"]),
        "lora": nbytes(state.lora),
        "optimizer": nbytes(state.opt_state),
    }
    out["total"] = sum(out.values())
    out["config"] = {k: getattr(model.config, k) for k in ("hidden_size", "num_layers")}
    return out


def batch_of(seq: int, vocab: int | None = None) -> dict:
    """[accum=1, B=1, S] ids with labels = inputs: abstract, or random ids when vocab given."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    if vocab is None:
        ids: Any = jax.ShapeDtypeStruct((1, 1, seq), jnp.int32)
        return {"input_ids": ids, "labels": ids}
    host = np.random.default_rng(seq).integers(0, vocab, size=(1, 1, seq)).astype(np.int32)
    ids = jax.device_put(host)
    return {"input_ids": ids, "labels": ids}


STAT_FIELDS = ("argument", "output", "alias", "temp", "generated_code")


def memory_stats(compiled: Any) -> dict:
    """memory_analysis() as a dict plus the device and host estimates (bytes)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return {}
    if isinstance(m, list | tuple):
        m = m[0] if m else None
    if m is None:
        return {}
    out: dict[str, Any] = {}
    for prefix in ("", "host_"):
        for f in STAT_FIELDS:
            v = getattr(m, f"{prefix}{f}_size_in_bytes", None)
            if v is not None:
                out[prefix + f] = int(v)
    peak = getattr(m, "peak_memory_in_bytes", None)
    if peak:
        out["xla_peak"] = int(peak)

    def total(p: str) -> int:
        g = out.get
        return (
            g(p + "argument", 0)
            + g(p + "output", 0)
            - g(p + "alias", 0)
            + g(p + "temp", 0)
            + g(p + "generated_code", 0)
        )

    out["device_bytes"], out["host_bytes"] = total(""), total("host_")
    return out


def device_info() -> dict:
    import jax

    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    return {
        "device": getattr(dev, "device_kind", str(dev)),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "bytes_limit": (stats or {}).get("bytes_limit"),
    }


def worker_compile(a: argparse.Namespace) -> None:
    """Answers {"model": M, "seq": S} lines on stdin with COMPILE lines (estimates only)."""
    setup_jax(a)
    from lorax.train.step import make_train_step

    cache: dict[str, tuple[Any, Any, Any, Any, dict]] = {}
    emit("READY", dict(device_info(), startup_s=time.perf_counter() - START))
    for line in sys.stdin:
        if not line.strip() or line.strip() == "quit":
            break
        req = json.loads(line)
        name, seq = req["model"], int(req["seq"])
        res: dict[str, Any] = {"model": name, "seq": seq, "ok": False, "oom": False}
        try:
            if name not in cache:
                t0 = time.perf_counter()
                model, state, opt = build_state(a, name, abstract=True)
                fn = make_train_step(model, opt, step_config(a))
                cache[name] = (model, state, opt, fn, fixed_costs(model, state))
                res["build_s"] = time.perf_counter() - t0
            model, state, _, fn, fixed = cache[name]
            res["fixed"] = fixed
            t0 = time.perf_counter()
            lowered = fn.lower(state, batch_of(seq))
            t1 = time.perf_counter()
            compiled = lowered.compile()
            res["lower_s"], res["compile_s"] = t1 - t0, time.perf_counter() - t1
            stats = memory_stats(compiled)
            del compiled, lowered
            if "device_bytes" not in stats:
                raise RuntimeError("compiled.memory_analysis() gave nothing on this backend")
            res.update(stats, ok=True)
        except Exception as e:  # a failed compile is a result (e.g. autotuning OOM)
            res.update(oom=is_oom(str(e)), error=short_error(e))
        emit("COMPILE", res)


def worker_run(a: argparse.Namespace) -> None:
    """Builds the real model (random NF4) and trains --probe-steps steps at each of --seqs
    (ascending) in this process; RUN lines carry ok/OOM, the allocator peak since start and
    the step time. Stops at the first failure (the state may be donated)."""
    setup_jax(a)
    from lorax.train.flops import peak_memory_bytes
    from lorax.train.step import make_train_step

    try:
        model, state, opt = build_state(a, a.model, abstract=False)
        fn = make_train_step(model, opt, step_config(a))
    except Exception as e:  # e.g. the weights alone exceed the cap
        emit("READY", dict(device_info(), ok=False, oom=is_oom(str(e)), error=short_error(e)))
        return
    emit(
        "READY",
        dict(
            device_info(),
            ok=True,
            startup_s=time.perf_counter() - START,
            peak_after_build=peak_memory_bytes(),
        ),
    )
    for seq in sorted(int(s) for s in a.seqs.split(",")):
        res: dict[str, Any] = {"seq": seq, "ok": False, "oom": False}
        try:
            batch = batch_of(seq, model.config.vocab_size)
            t0 = time.perf_counter()
            compiled = fn.lower(state, batch).compile()
            res["compile_s"] = time.perf_counter() - t0
            res.update(memory_stats(compiled))
            times, loss = [], None
            for _ in range(a.probe_steps):
                t0 = time.perf_counter()
                state, metrics = compiled(state, batch, model)
                loss = float(metrics["loss"])  # waits for the step
                times.append(time.perf_counter() - t0)
            res.update(ok=True, step_s=times[-1], step_times=times, loss=loss)
        except Exception as e:
            res.update(oom=is_oom(str(e)), error=short_error(e))
        res["peak_bytes"] = peak_memory_bytes()
        emit("RUN", res)
        if not res["ok"]:
            break


# ============================================================================ parent side


class Child:
    """A worker process in its own session; tagged JSON lines ("TAG {...}") are parsed, the
    rest is kept (the last lines explain failures) and echoed with --verbose."""

    def __init__(self, cmd: list[str], env: dict, label: str, verbose: bool):
        self.label, self.verbose = label, verbose
        self.tail: list[str] = []
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=env,
            start_new_session=True,
        )
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.q.put(line)
        self.q.put(None)

    def next_tagged(self, tags: tuple[str, ...], deadline: float) -> tuple[str, dict] | None:
        """The next tagged line, or None if the process ended or the deadline passed."""
        while True:
            left = deadline - time.time()
            if left <= 0:
                return None
            try:
                line = self.q.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:
                return None
            tag = line.split(" ", 1)[0]
            if tag in tags:
                return tag, json.loads(line[len(tag) + 1 :])
            self.tail = (self.tail + [line.rstrip()])[-20:]
            if self.verbose:
                print(f"    [{self.label}] {line.rstrip()}", flush=True)

    def send(self, text: str) -> bool:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def close(self, timeout: float = 20.0) -> int | None:
        """Asks politely (stdin closed), then kills this child's process group."""
        with contextlib.suppress(Exception):
            self.send("quit")
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def why(self) -> str:
        return " | ".join(self.tail[-3:])[-600:]


def worker_args(a: argparse.Namespace) -> list[str]:
    """Arguments every worker shares with the parent (what the step is)."""
    args = [
        "--remat",
        a.remat,
        "--loss-chunk",
        str(a.loss_chunk),
        "--probe-steps",
        str(a.probe_steps),
    ]
    if a.forward:
        args += ["--forward", a.forward]
    if a.layers:
        args += ["--layers", str(a.layers)]
    if a.tiny:
        args += ["--tiny"]
    if a.cache_dir:
        args += ["--cache-dir", a.cache_dir]
    return args


def base_env(a: argparse.Namespace) -> dict:
    env = dict(os.environ)
    for k in (
        "XLA_PYTHON_CLIENT_MEM_FRACTION",
        "XLA_PYTHON_CLIENT_PREALLOCATE",
        "XLA_PYTHON_CLIENT_ALLOCATOR",
    ):
        env.pop(k, None)
    if a.xla_flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + a.xla_flags).strip()
    return env


class Compiler:
    """Compile-only estimates from one long-lived worker (restarted if it dies), memoised by
    (model, S). Every answer is appended to `log`."""

    def __init__(self, a: argparse.Namespace, deadline: float, log: list[dict], label: str):
        self.a, self.deadline, self.log, self.label = a, deadline, log, label
        self.flags = a.compile_xla_flags  # dropped if the worker cannot start with them
        self.child: Child | None = None
        self.results: dict[tuple[str, int], dict] = {}
        self.info: dict = {}
        self.restarts = 0
        self.guess_s = 10.0 if a.tiny else 30.0  # before the first compile is timed

    def expected_s(self, model: str) -> float:
        times = [r["wall_s"] for r in self.log if r.get("ok") and r["model"] == model]
        if times:
            return max(times[-3:])
        others = [r["wall_s"] for r in self.log if r.get("ok")]
        return 1.5 * max(others[-3:]) if others else self.guess_s

    def has_time(self, model: str, reserve: float = 0.0) -> bool:
        return time.time() + 1.2 * self.expected_s(model) + reserve + 5 < self.deadline

    def _start(self) -> bool:
        env = base_env(self.a)
        # Compile only: allocate on demand (autotuning needs some device memory).
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        if self.flags:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + self.flags).strip()
        cmd = [sys.executable, __file__, "--worker", "compile"] + worker_args(self.a)
        self.child = Child(cmd, env, self.label, self.a.verbose)
        got = self.child.next_tagged(("READY",), self.deadline)
        if got is None:
            log(f"{self.label} worker failed to start: {self.child.why()}")
            self.child.close(5)
            self.child = None
            if self.flags and time.time() < self.deadline:
                log(f"{self.label} worker: retrying without XLA flags {self.flags!r}")
                self.flags = ""
                return self._start()
            return False
        self.info = dict(got[1], xla_flags=env.get("XLA_FLAGS", ""))
        return True

    def compile(self, model: str, seq: int, reserve: float = 0.0) -> dict | None:
        """The estimate at S (memoised); None when the deadline does not allow it."""
        key = (model, seq)
        if key in self.results:
            return self.results[key]
        if not self.has_time(model, reserve):
            return None
        if self.child is None and (self.restarts > 2 or not self._start()):
            return None
        assert self.child is not None
        t0 = time.time()
        self.child.send(json.dumps({"model": model, "seq": seq}))
        got = self.child.next_tagged(("COMPILE",), self.deadline)
        if got is None:
            late = time.time() >= self.deadline
            why = "deadline" if late else f"compile worker died: {self.child.why()}"
            self.child.close(0.5 if late else 5)
            self.child, self.restarts = None, self.restarts + 1
            if late:
                return None
            r = {"model": model, "seq": seq, "ok": False, "oom": is_oom(why), "error": why}
        else:
            r = got[1]
        r["wall_s"] = time.time() - t0
        self.results[key] = r
        self.log.append(r)
        est = (
            f"est {r['device_bytes'] / self.a.unit:8.2f} {self.a.unit_name} device, "
            f"{r['host_bytes'] / self.a.unit:.2f} host"
            if r["ok"]
            else f"FAILED {r.get('error', '')[:200]}"
        )
        log(f"compile {model:>3} S={seq:>7}: {est}  ({r['wall_s']:.1f}s)")
        return r

    def points(self, model: str) -> list[tuple[int, dict]]:
        return sorted((s, r) for (m, s), r in self.results.items() if m == model)

    def close(self, timeout: float = 20.0) -> None:
        if self.child is not None:
            self.child.close(timeout)
            self.child = None


def offload_layers(remat: str, num_layers: int) -> int:
    """Layers under the offload policy (a policy name or a "POLICY:N,..." schedule)."""
    from lorax.remat import schedule

    return sum(n for kind, n in schedule(remat, num_layers) if kind == "offload")


def offload_bytes(seq: int, dims: dict | None, remat: str) -> int:
    """What the offload policy parks in host memory: each such layer's bf16 input
    [S, hidden]."""
    if not dims:
        return 0
    return offload_layers(remat, dims["num_layers"]) * seq * dims["hidden_size"] * 2


def host_need(r: dict, remat: str) -> int:
    """Host bytes of a compile result: XLA's figure, else the offload model's."""
    return r.get("host_bytes") or offload_bytes(r["seq"], r.get("fixed", {}).get("config"), remat)


def secant_seq(points: list[tuple[int, int]], target: float) -> float | None:
    """S where the piecewise-linear memory curve through `points` (S, bytes) meets target:
    between the nearest points on either side of it, else extrapolated from the nearest two."""
    if not points:
        return None
    below = [p for p in points if p[1] <= target]
    above = [p for p in points if p[1] > target]
    if below and above:
        p1, p2 = max(below), min(above)
    elif len(points) >= 2:
        p1, p2 = (points[-2], points[-1]) if below else (points[0], points[1])
    else:
        s, m = points[0]
        return s * target / m if m > 0 else None
    slope = (p2[1] - p1[1]) / (p2[0] - p1[0])
    if slope <= 0:
        return None
    return p1[0] + (target - p1[1]) / slope


def search_cap(
    model: str,
    cap_bytes: float,
    compiler: Compiler,
    a: argparse.Namespace,
    first_guess: float | None,
    reserve: float,
) -> dict:
    """Longest S (multiple of --granularity) whose compile estimate fits cap_bytes (and the
    host limit, if any): first the fitted prediction, then secant steps on all compiled
    points (bisection when one side keeps moving), until S fits and S + granularity does not.
    """
    g, max_s = a.granularity, a.max_s
    host_cap = a.host_cap_gib * GIB if a.host_cap_gib else None

    def fits(r: dict) -> bool:
        return (
            bool(r["ok"])
            and r["device_bytes"] <= cap_bytes
            and (host_cap is None or host_need(r, a.remat) <= host_cap)
        )

    guess, status, sides, n, errored = first_guess, "resolved", [], 0, False
    notes: list[str] = []
    while True:
        pts = compiler.points(model)
        lo = max((s for s, r in pts if fits(r)), default=0)
        hi = min((s for s, r in pts if not fits(r) and s > lo), default=None)
        if hi is not None and hi - lo <= g:
            break
        if hi is None and lo >= max_s:
            status = f"fits at --max-s {max_s}"
            break
        if n >= a.max_compiles_per_cap:
            status = f"unresolved after {n} compiles"
            break
        top = max_s if hi is None else hi - 1
        if guess is None:
            guess = secant_seq([(s, r["device_bytes"]) for s, r in pts if r["ok"]], cap_bytes)
        if guess is None:  # no usable slope: gallop
            guess = 2 * lo if lo else g
        stuck = len(sides) >= 2 and sides[-1] == sides[-2]
        if hi is not None and lo and (stuck or errored):
            guess = (lo + hi) / 2  # secant stuck on one side, or no slope past an error: bisect
        seq = max(int(guess) // g * g, (lo // g + 1) * g)
        seq = min(seq, top // g * g)
        if seq <= lo or (hi is not None and seq >= hi):
            break  # nothing left to probe at this granularity
        r = compiler.compile(model, seq, reserve)
        if r is None:
            status = "deadline"
            break
        errored = not r["ok"] and not r["oom"]
        if errored:
            notes.append(f"compile error at S={seq}")
            if not lo:  # nothing compiles: a bug, not a memory limit
                status = f"compile error at S={seq}: {r.get('error', '')[:300]}"
                break
        sides.append(fits(r))
        guess, n = None, n + 1
    pts = compiler.points(model)
    lo = max((s for s, r in pts if fits(r)), default=0)
    hi = min((s for s, r in pts if not fits(r) and s > lo), default=None)
    at = compiler.results.get((model, lo), {})
    top = compiler.results.get((model, hi), {}) if hi is not None else {}
    if top and not top["ok"] and not top["oom"]:  # bounded by a failure, not by memory
        notes.append(f"S={hi} does not compile: {top.get('error', '')[:200]}")
        status = status if status != "resolved" else "compile error above"
    return {
        "model": model,
        "cap": cap_bytes / a.unit,
        "cap_bytes": cap_bytes,
        "predicted_seq": max(0, int(first_guess) // g * g) if first_guess else None,
        "max_seq_len": lo or None,
        "fails_at": hi,
        "verified": status == "resolved",
        "verified_by": "compile" if lo or status == "resolved" else "–",
        "granularity": g,
        "status": "; ".join([status] + notes),
        "compiles": n,
        "est_peak_bytes": at.get("device_bytes"),
        "host_bytes": at.get("host_bytes"),
    }


def mem_fit(compiler: Compiler, model: str, seqs: list[int]) -> tuple[float, float] | None:
    pts = [(s, r["device_bytes"]) for s, r in compiler.points(model) if r["ok"] and s in seqs]
    if len(pts) < 2:
        return None
    return fit_line([p[0] for p in pts], [p[1] for p in pts])


def phase_8b(a: argparse.Namespace, out: dict, compiler: Compiler, reserve: Callable) -> None:
    """8B: calibrate, fit a + b*S, then search every cap (smallest first)."""
    calib = [int(s) for s in a.calib_seqs.split(",")]
    log(f"{(TINY_MODELS if a.tiny else MODELS)['8b']}: calibrating at S = {calib}")
    for seq in calib:  # calibration before anything else: no reserve
        r = compiler.compile("8b", seq)
        if r is not None and not r["ok"] and not r["oom"]:
            break  # the search reports it
    fit = mem_fit(compiler, "8b", calib)
    out["calibration"]["mem_fit_bytes"] = list(fit) if fit else None
    if fit:
        log(
            f"fit: est bytes = {fit[0] / a.unit:.3f} {a.unit_name} + S x {fit[1] / 1024:.1f} KiB",
        )
    for cap in sorted(a.caps):
        cap_bytes = cap * a.unit
        guess = (cap_bytes - fit[0]) / fit[1] if fit and fit[1] > 0 else None
        row = search_cap("8b", cap_bytes, compiler, a, guess, reserve())
        out["rows"].append(row)
        log(
            f"cap {cap:g} {a.unit_name}: max S {row['max_seq_len']} "
            f"(predicted {row['predicted_seq']}, fails at {row['fails_at']}; {row['status']})",
        )


def phase_70b(a: argparse.Namespace, out: dict, compiler: Compiler, reserve: float) -> None:
    """70B: does a step fit in --cap-70b, and up to which S (compile estimates only)."""
    calib = [int(s) for s in a.calib_seqs_70b.split(",")]
    log(f"{(TINY_MODELS if a.tiny else MODELS)['70b']}: calibrating at S = {calib}")
    for seq in calib:
        r = compiler.compile("70b", seq)
        if r is not None and not r["ok"] and not r["oom"]:
            break
    fit = mem_fit(compiler, "70b", calib)
    cap_bytes = a.cap_70b * a.unit
    guess = (cap_bytes - fit[0]) / fit[1] if fit and fit[1] > 0 else None
    row = search_cap("70b", cap_bytes, compiler, a, guess, reserve)
    fixed = next((r["fixed"] for r in compiler.log if r["model"] == "70b" and "fixed" in r), None)
    row.update(fixed=fixed, mem_fit_bytes=list(fit) if fit else None)
    out["rows_70b"].append(row)
    log(
        f"70B in {a.cap_70b:g} {a.unit_name}: max S {row['max_seq_len']} "
        f"({row['status']}); fixed {fixed['total'] / a.unit if fixed else 0:.2f} {a.unit_name}",
    )


def compile_phase(a: argparse.Namespace, out: dict, c8: Compiler, c70: Compiler | None) -> None:
    """The 8B and 70B searches, each with its own compile worker, side by side unless
    --serial-compile (then 8B first, keeping time for the 70B compiles)."""
    # Time kept for the runs (they verify; the compile rows are the table), at most a quarter.
    run_reserve = 0.0 if a.no_run else min(20.0 if a.tiny else 120.0, a.deadline_s / 4)
    if c70 is None or a.serial_compile:

        def reserve() -> float:
            return run_reserve + (0.0 if c70 is None else 4 * 1.5 * c70.expected_s("70b"))

        phase_8b(a, out, c8, reserve)
        if c70 is not None:
            phase_70b(a, out, c70, run_reserve)
        return
    errors: list[BaseException] = []

    def guarded(fn: Callable, *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)

    threads = [
        threading.Thread(
            target=guarded, args=(phase_8b, a, out, c8, lambda: run_reserve), daemon=True
        ),
        threading.Thread(target=guarded, args=(phase_70b, a, out, c70, run_reserve), daemon=True),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


class TimeModel:
    """Step seconds ~ c*S + d*S^2 (attention is quadratic) from the uncapped run."""

    def __init__(self, runs: list[dict], a: argparse.Namespace):
        pts = sorted((r["seq"], r["step_s"]) for r in runs if r.get("ok"))
        self.ok, self.c, self.d = bool(pts), 0.0, 0.0
        if len(pts) >= 2:
            c, d = fit_line([p[0] for p in pts], [t / s for s, t in pts])
            if c > 0 and d >= 0:
                self.c, self.d = c, d
                return
        if pts:  # one point (or a noisy fit): split it by the FLOP model
            from bench_train import llama31_8b_config

            from lorax.train.flops import train_flops_per_token

            fields = dict(model_overrides("8b", a.tiny))
            if a.layers:
                fields["num_layers"] = a.layers
            cfg = llama31_8b_config(**fields)
            s0, t0 = pts[-1]
            remat = "full" if "offload" in a.remat or "full" in a.remat else a.remat
            f0 = train_flops_per_token(cfg, s0, remat=remat)
            f1 = train_flops_per_token(cfg, 2 * s0, remat=remat)
            d_flops = (f1 - f0) / s0  # FLOPs per token per extra token of context
            c_flops = f0 - d_flops * s0
            rate = s0 * f0 / t0
            self.c, self.d = c_flops / rate, d_flops / rate

    def step_s(self, seq: int) -> float | None:
        return seq * (self.c + self.d * seq) if self.ok else None


def nvidia_total_bytes() -> int | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return int(float(out.stdout.strip().splitlines()[0])) * MIB
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def host_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def run_child(
    a: argparse.Namespace, seqs: list[int], cap_bytes: float | None, state: dict, deadline: float
) -> tuple[dict, list[dict]]:
    """One fresh process (capped when cap_bytes and the device size are known)."""
    env = base_env(a)
    info: dict[str, Any] = {"cap_bytes": cap_bytes, "enforced": False}
    total = state.get("device_total")
    if cap_bytes and total and state.get("backend") == "gpu":
        frac = cap_bytes / total
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{min(frac, 1.0):.6f}"
        info["mem_fraction"] = frac
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "run",
        "--model",
        "8b",
        "--seqs",
        ",".join(map(str, seqs)),
    ] + worker_args(a)
    label = f"run {'uncapped' if not cap_bytes else f'{cap_bytes / a.unit:g}{a.unit_name}'}"
    child = Child(cmd, env, label, a.verbose)
    results: list[dict] = []
    try:
        got = child.next_tagged(("READY",), deadline)
        if got is None:
            info.update(ok=False, error=f"no start: {child.why()}")
            return info, results
        info.update(got[1])
        limit = info.get("bytes_limit")
        if cap_bytes and limit:
            info["enforced"] = limit <= cap_bytes * 1.01
            if "mem_fraction" in info and info["mem_fraction"] < 1.0:
                # Learn the size XLA applies the fraction to, for the next caps.
                state["device_total"] = limit / float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"])
        if not info.get("ok", True):
            return info, results
        for _ in seqs:
            got = child.next_tagged(("RUN",), deadline)
            if got is None:
                late = time.time() >= deadline
                s = seqs[len(results)]
                why = "deadline" if late else f"died: {child.why()}"
                results.append({"seq": s, "ok": False, "oom": not late, "error": why})
                break
            results.append(got[1])
            if not got[1]["ok"]:
                break
    finally:
        child.close(10 if time.time() < deadline else 0.5)  # past the deadline: no grace
    return info, results


def gb(x: float | None, a: argparse.Namespace) -> str:
    return "–" if x is None else f"{x / a.unit:.2f}"


def run_phase(a: argparse.Namespace, out: dict, compiler: Compiler, deadline: float) -> None:
    """Uncapped calibration run, then capped runs at the compile-found max S."""
    state = {"device_total": out.get("device_total_bytes"), "backend": out.get("backend")}
    seqs = [int(s) for s in a.run_calib_seqs.split(",")]
    need = (15.0 if a.tiny else 60.0) * len(seqs)  # start, build, compile, steps (a guess)
    if time.time() + need > deadline:
        log(f"run: no time left for the uncapped runs (~{need:.0f}s)")
        return
    log(f"run: uncapped, S = {seqs}")
    info, res = run_child(a, seqs, None, state, deadline)
    out["run_probes"].append({"kind": "calibration", "info": info, "results": res})
    ratios = []
    for r in res:
        # The compile-only worker's estimate at this S (what the compile rows rest on), else
        # the run's own compile's.
        est = compiler.results.get(("8b", r["seq"]), {}).get("device_bytes")
        est = est or r.get("device_bytes")
        ratio = r["peak_bytes"] / est if r.get("ok") and r.get("peak_bytes") and est else None
        ratios.append(
            {
                "seq": r["seq"],
                "measured_bytes": r.get("peak_bytes"),
                "est_bytes": est,
                "run_est_bytes": r.get("device_bytes"),
                "ratio": ratio,
            }
        )
        log(
            f"run: S={r['seq']:>7}: {'ok' if r['ok'] else 'FAILED ' + r.get('error', '')[:200]}"
            f"  step {r.get('step_s') or 0:.2f}s  measured peak {gb(r.get('peak_bytes'), a)}"
            f"  est {gb(est, a)} (run's compile {gb(r.get('device_bytes'), a)}) {a.unit_name}"
            + (f"  ratio {ratio:.3f}" if ratio else "")
            + f"  (compile {r.get('compile_s') or 0:.1f}s)",
        )
    out["calibration"]["measured_vs_estimate"] = ratios
    tm = TimeModel(res, a)
    out["calibration"]["time_fit"] = [tm.c, tm.d] if tm.ok else None
    if not tm.ok:
        log("run: no successful calibration run, so no capped runs")
        return
    log(f"run: fit: step s = S x ({tm.c:.3e} + {tm.d:.3e} S)")
    startup = info.get("startup_s") or 30.0
    compile_s = max((r.get("compile_s") or 0.0) for r in res)
    calib_seq = max(r["seq"] for r in res)
    known = [r["ratio"] for r in ratios if r["ratio"]]
    ratio = max(known) if known else 1.0
    rows = sorted((r for r in out["rows"] if r["max_seq_len"]), key=lambda r: r["cap"])
    caps = None if a.run_caps == "auto" else {float(c) for c in a.run_caps.split(",")}
    for row in rows:
        if caps is not None and row["cap"] not in caps:
            continue
        seq, tries = row["max_seq_len"], 0
        while seq and tries <= a.run_retries:
            # Autotuning runs the GEMMs, so compiling takes longer at longer S.
            compile_need = compile_s * max(1.0, seq / calib_seq) ** 0.5
            need = startup + compile_need + a.probe_steps * 1.3 * tm.step_s(seq) + 15
            if time.time() + need > deadline:
                log(f"run: cap {row['cap']:g}: S={seq} needs ~{need:.0f}s, skipped")
                row["run_skipped"] = f"S={seq} needs ~{need:.0f}s"
                return  # larger caps only take longer
            info, res = run_child(a, [seq], row["cap_bytes"], state, deadline)
            r = (
                res[0]
                if res
                else {
                    "seq": seq,
                    "ok": False,
                    "oom": bool(info.get("oom")),
                    "error": info.get("error", "no result"),
                }
            )
            out["run_probes"].append(
                {"kind": "cap", "cap": row["cap"], "info": info, "results": res}
            )
            verdict = "ok" if r["ok"] else "OOM" if r.get("oom") else "ERR"
            log(
                f"run: cap {row['cap']:g} {a.unit_name}: S={seq} {verdict}  peak "
                f"{gb(r.get('peak_bytes'), a)}  step {r.get('step_s') or 0:.2f}s  limit "
                f"{gb(info.get('bytes_limit'), a)}{'' if info['enforced'] else ' (no cap)'}"
                f"  {r.get('error', '')[:200]}",
            )
            if r["ok"]:
                how = "run" if info["enforced"] else "run (cap not enforced)"
                if row.get("run_oom_at"):
                    how += f" (OOM at {row['run_oom_at']})"
                est = compiler.results.get(("8b", seq), {}).get("device_bytes")
                row.update(
                    max_seq_len=seq,
                    verified_by=how,
                    est_peak_bytes=est or r.get("device_bytes") or row.get("est_peak_bytes"),
                    peak_mem_bytes=r.get("peak_bytes"),
                    step_s=r.get("step_s"),
                    run_bytes_limit=info.get("bytes_limit"),
                )
                if seq != row.get("compile_max_seq", seq):
                    row["status"] += f"; run ok at {seq}"
                break
            if not r.get("oom"):
                row["status"] += f"; run error at S={seq}"
                break
            row.setdefault("compile_max_seq", row["max_seq_len"])
            row["run_oom_at"] = min(seq, row.get("run_oom_at") or seq)
            row.update(max_seq_len=None, verified=False, verified_by="run OOM")
            # Next try: the largest S whose estimate, scaled by the measured ratio, fits.
            pts = [(s, q["device_bytes"]) for s, q in compiler.points("8b") if q["ok"]]
            guess = secant_seq(pts, row["cap_bytes"] / max(ratio, 1.0))
            nxt = int(guess) // a.granularity * a.granularity if guess else 0
            seq = min(nxt, seq - a.granularity)
            tries += 1


# ============================================================================ output


def load_torch(path: str) -> list[dict]:
    """Rows of bench_torch.py --max-context's JSON ({"mode": "max_context", "rows": [...]})."""
    with open(path) as f:
        data = json.load(f)
    if data.get("mode") != "max_context":
        print(f"warning: {path} is not a --max-context result (mode {data.get('mode')})")
    return [r for r in data.get("rows", []) if "cap_gib" in r]


def fmt_seq(r: dict) -> str:
    """The row's max S: exact when S fits and S + granularity is known not to."""
    ms, oom = r.get("max_seq_len"), r.get("run_oom_at")
    if ms is None:
        hi = oom or (r.get("fails_at") if r.get("verified") else None)
        return f"< {hi}" if hi else "–"
    if oom:  # lowered by a run OOM: exact only if the OOM was one step above
        return f"{ms}" if oom - ms <= r.get("granularity", 0) else f">= {ms}"
    return f"{ms}" if r.get("verified") else f">= {ms}"


def print_tables(out: dict) -> None:
    """The markdown table (lorax beside bench_torch.py's systems, joined on the cap) and the
    70B verdict."""
    unit_name = out["unit"]
    unit = GIB if unit_name == "GiB" else MIB
    torch_rows = out.get("torch_rows") or []
    systems = sorted({r["system"] for r in torch_rows})
    host_total = out.get("host_total_bytes")

    def key(cap_gib: float) -> float:  # the cap in the table's unit
        return round(cap_gib * GIB / unit, 3)

    caps = sorted(
        {key(r["cap_gib"]) for r in out["rows"] if "cap_gib" in r}
        | {key(r["cap_gib"]) for r in torch_rows}
    )

    def g(x: float | None) -> str:
        return "–" if x is None else f"{x / unit:.2f}"

    def host(r: dict) -> str:
        xla, model = r.get("host_bytes"), r.get("offload_model_bytes")
        value, text = (xla, g(xla)) if xla else (model, f"≈{g(model)}" if model else g(xla))
        return text + (" (!)" if value and host_total and value > host_total else "")

    cfg = out["config"]
    extra = "".join(
        f", {name} {cfg[k]}"
        for k, name in (("forward", ""), ("loss_chunk", "loss chunk"))
        if cfg.get(k)
    ).replace(",  ", ", ")
    print(
        f"\n{out['model']}, batch 1, remat={cfg['remat']}{extra}"
        f"; caps in {unit_name} (2**{30 if unit == GIB else 20} bytes); device "
        f"{out.get('device')}; {out.get('date', '')[:10]}, commit {out.get('commit')}"
    )
    head = (
        f"| cap {unit_name} | lorax max S | verified by | est. peak {unit_name} | "
        f"measured peak {unit_name} | host {unit_name} | step s |"
    )
    head += "".join(f" {s} max S | {s} step s |" for s in systems)
    print(head)
    print("|" + "---|" * (7 + 2 * len(systems)))
    for k in caps:
        r = next((x for x in out["rows"] if key(x.get("cap_gib", -1)) == k), None)
        cap = k
        if r is None:
            line = f"| {cap:g} | – | – | – | – | – | – |"
        else:
            step = r.get("step_s")
            pred = r.get("predicted_step_s")
            step_txt = f"{step:.1f}" if step else f"~{pred:.1f}" if pred else "–"
            line = (
                f"| {cap:g} | {fmt_seq(r)} | {r.get('verified_by', '–')} | "
                f"{g(r.get('est_peak_bytes'))} | {g(r.get('peak_mem_bytes'))} | {host(r)} | "
                f"{step_txt} |"
            )
        for s in systems:
            t = next((x for x in torch_rows if x["system"] == s and key(x["cap_gib"]) == k), None)
            if t is None:
                line += " – | – |"
                continue
            ms = t.get("max_seq_len")
            ms_txt = "–" if ms is None else f"{ms}" if t.get("verified") else f">= {ms}"
            step = t.get("step_s_at_max")
            line += f" {ms_txt} | {f'{step:.1f}' if step else '–'} |"
        print(line)
    for m in out.get("calibration", {}).get("measured_vs_estimate") or []:
        if m.get("ratio"):
            print(
                f"- uncapped run at S={m['seq']}: measured peak {g(m['measured_bytes'])} vs "
                f"compile estimate {g(m['est_bytes'])} {unit_name} (ratio {m['ratio']:.3f})"
            )
    adjusted = [r for r in out["rows"] if r.get("ratio_adjusted_seq")]
    if adjusted:
        print(
            "- compile rows with the estimate scaled by the largest measured ratio: "
            + ", ".join(
                f"{r['cap']:g} {unit_name} -> S ~{r['ratio_adjusted_seq']}" for r in adjusted
            )
        )
    print(
        "- verified by: run = the steps ran in a process whose XLA allocator was capped at the "
        "cap; compile = XLA's memory_analysis estimate (argument + output - alias + temp) fits "
        "and S + granularity does not; '>=' = not bracketed in time; '~' step times are "
        "predicted from the uncapped runs. host = pinned host memory for the offloaded "
        "activations (XLA's figure, or ≈ layers x S x hidden x 2 bytes); (!) = more than "
        "this machine's RAM."
    )
    for r in out.get("rows_70b") or []:
        fixed = r.get("fixed") or {}
        parts = ", ".join(
            f"{k} {fixed[k] / unit:.2f}"
            for k in ("nf4_weights", "embed_lm_head", "lora", "optimizer")
            if k in fixed
        )
        fits = "yes" if r.get("max_seq_len") else "no" if r.get("verified") else "unknown"
        print(
            f"\n{out.get('model_70b', MODELS['70b'])} architecture QLoRA step (batch 1) in "
            f"{r['cap']:g} {unit_name}: "
            f"fits = {fits}; max S {fmt_seq(r)} by compile estimate "
            f"({g(r.get('est_peak_bytes'))} {unit_name} device, host {host(r)}; "
            f"{r['status']}). Fixed cost {g(fixed.get('total'))} {unit_name} ({parts})."
        )
    if out.get("status") != "complete":
        print(f"\n(partial: {out.get('status')})")


def read_commit() -> str:
    """HEAD's commit read from .git (no git process), or LORAX_COMMIT, or "unknown"."""
    if os.environ.get("LORAX_COMMIT"):
        return os.environ["LORAX_COMMIT"]
    try:
        gitdir = os.path.join(REPO, ".git")
        with open(os.path.join(gitdir, "HEAD")) as f:
            head = f.read().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head[5:]
        path = os.path.join(gitdir, ref)
        if os.path.exists(path):
            with open(path) as f:
                return f.read().strip()[:12]
        with open(os.path.join(gitdir, "packed-refs")) as f:
            for line in f:
                if line.strip().endswith(" " + ref):
                    return line.split()[0][:12]
    except OSError:
        pass
    return "unknown"


# ============================================================================ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--caps", default=None, help="memory caps (GiB; MiB with --tiny)")
    p.add_argument("--granularity", type=int, default=None, help="resolution of S (1024)")
    p.add_argument("--calib-seqs", default=None, help="compile calibration S (8192,16384,32768)")
    p.add_argument("--remat", default="offload", help="lorax.remat policy (default offload)")
    p.add_argument(
        "--forward", default=None, help="more ForwardOptions fields: key=value,... (passed as-is)"
    )
    p.add_argument("--loss-chunk", type=int, default=0, help="LM-head chunk tokens (0: auto)")
    p.add_argument("--deadline-s", type=float, default=480.0, help="wall-clock budget")
    p.add_argument("--json", default=None, help="write probes and rows here")
    p.add_argument("--torch-json", default=None, help="bench_torch.py --max-context JSON")
    p.add_argument("--render", default=None, help="only print the table of an earlier --json")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny models, MiB caps")
    p.add_argument("--layers", type=int, default=None, help="fewer layers (smoke runs)")
    p.add_argument("--max-s", type=int, default=None, help="never compile above this S")
    p.add_argument("--max-compiles-per-cap", type=int, default=6)
    p.add_argument(
        "--host-cap-gib", type=float, default=0.0, help="also require host bytes <= this (0: no)"
    )
    g = p.add_argument_group("runs")
    g.add_argument("--no-run", action="store_true", help="compile-only (no real steps)")
    g.add_argument("--run-calib-seqs", default=None, help="uncapped run S (8192,16384)")
    g.add_argument(
        "--run-caps",
        default=None,
        help="caps to verify by running (default auto: smallest first while time lasts; "
        "--tiny: the smallest cap only)",
    )
    g.add_argument("--run-retries", type=int, default=1, help="lower S after a run OOM")
    g.add_argument("--probe-steps", type=int, default=2, help="training steps per run")
    g = p.add_argument_group("70B")
    g.add_argument("--skip-70b", action="store_true")
    g.add_argument("--cap-70b", type=float, default=None, help="cap of the 70B question (48)")
    g.add_argument("--calib-seqs-70b", default=None, help="70B calibration S (4096,8192)")
    g = p.add_argument_group("workers")
    g.add_argument("--cache-dir", default=None, help="persistent compile cache ('' = none)")
    g.add_argument("--xla-flags", default=None, help="appended to XLA_FLAGS of all workers")
    g.add_argument(
        "--compile-xla-flags",
        default=None,
        help="appended for the compile-only workers (default --xla_gpu_autotune_level=0: "
        "autotuning long-S GEMMs takes minutes and barely moves buffer sizes; '' keeps it)",
    )
    g.add_argument("--verbose", action="store_true", help="echo the workers' output")
    g.add_argument(
        "--serial-compile", action="store_true", help="one compile worker (8B, then 70B)"
    )
    p.add_argument("--commit", default=None)
    p.add_argument("--worker", choices=["compile", "run"], help=argparse.SUPPRESS)
    p.add_argument("--model", default="8b", help=argparse.SUPPRESS)
    p.add_argument("--seqs", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    t = a.tiny
    a.unit, a.unit_name = (MIB, "MiB") if t else (GIB, "GiB")
    defaults = {
        "caps": "16,18" if t else "12,16,24,40,48,80",
        "granularity": 64 if t else 1024,
        "calib_seqs": "128,256" if t else "8192,16384,32768",
        "run_calib_seqs": "128" if t else "8192,16384",
        "cap_70b": 32.0 if t else 48.0,
        "calib_seqs_70b": "256" if t else "4096,8192",
        "max_s": 8192 if t else 1048576,
        "xla_flags": TINY_XLA_FLAGS if t else "",
        "compile_xla_flags": "" if t else "--xla_gpu_autotune_level=0",
        "cache_dir": os.path.join(tempfile.gettempdir(), "lorax_max_context_cache"),
    }
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.caps = [float(x) for x in a.caps.split(",")]
    if a.run_caps is None:
        a.run_caps = f"{min(a.caps):g}" if t else "auto"
    a.max_s = a.max_s // a.granularity * a.granularity
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.worker == "compile":
        return worker_compile(a)
    if a.worker == "run":
        return worker_run(a)
    if a.render:
        with open(a.render) as f:
            out = json.load(f)
        if a.torch_json:
            out["torch_rows"] = load_torch(a.torch_json)
        print_tables(out)
        return
    from lorax.model import ForwardOptions

    try:  # fail fast on a bad policy or a field this checkout's ForwardOptions lacks
        forward_options(a.remat, a.forward)
    except (TypeError, ValueError) as e:
        fields = [f.name for f in dataclasses.fields(ForwardOptions)]
        raise SystemExit(
            f"--remat {a.remat!r} --forward {a.forward!r}: {e} (ForwardOptions fields: {fields})"
        ) from None
    deadline = time.time() + a.deadline_s - 5  # the rest is for printing
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out: dict[str, Any] = {
        "mode": "max_context",
        "system": "lorax",
        "model": (TINY_MODELS if a.tiny else MODELS)["8b"] + " architecture, NF4",
        "model_70b": (TINY_MODELS if a.tiny else MODELS)["70b"],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": a.commit or read_commit(),
        "unit": a.unit_name,
        "caps": a.caps,
        "config": {
            "remat": a.remat,
            "forward": a.forward or "",
            "loss_chunk": a.loss_chunk,
            "granularity": a.granularity,
            "lora": f"r={LORA_RANK} alpha={LORA_ALPHA} all 7 projections, f32, AdamW",
            "probe_steps": a.probe_steps,
            "layers": a.layers,
        },
        "device_total_bytes": nvidia_total_bytes(),
        "host_total_bytes": host_total_bytes(),
        "calibration": {},
        "compile_probes": [],
        "run_probes": [],
        "rows": [],
        "rows_70b": [],
        "status": "started",
    }
    if a.torch_json:
        out["torch_rows"] = load_torch(a.torch_json)
    if a.cache_dir:
        os.makedirs(a.cache_dir, exist_ok=True)
    compiler = Compiler(a, deadline, out["compile_probes"], "compile 8b")
    c70 = None if a.skip_70b else Compiler(a, deadline, out["compile_probes"], "compile 70b")
    compilers = [c for c in (compiler, c70) if c is not None]
    try:
        compile_phase(a, out, compiler, c70)
        info = next((c.info for c in compilers if c.info), {})
        out.update({k: info.get(k) for k in ("device", "backend", "jax")})
        if not out["device_total_bytes"] and info.get("backend") == "gpu":
            # Without nvidia-smi: XLA's default pool is 75% of the device.
            limit = info.get("bytes_limit")
            out["device_total_bytes"] = limit / 0.75 if limit else None
        for c in compilers:
            c.close()  # the runs get the whole device
        finish_rows(out, a)
        if not a.no_run:
            run_phase(a, out, compiler, deadline)
        finish_rows(out, a)
        late = time.time() > deadline
        partial = [r for r in out["rows"] + out["rows_70b"] if "deadline" in r["status"]]
        out["status"] = "deadline" if late or partial else "complete"
    except BaseException as e:
        out["status"] = f"aborted: {e!r}"[:300]
        raise
    finally:
        for c in compilers:
            c.close(2)
        with contextlib.suppress(Exception):  # rows from an interrupted run still print
            finish_rows(out, a)
        out["elapsed_s"] = time.perf_counter() - START
        if a.json:
            os.makedirs(os.path.dirname(os.path.abspath(a.json)) or ".", exist_ok=True)
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1, default=str)
        print_tables(out)
        if a.json:
            print(f"wrote {a.json} ({out['elapsed_s']:.0f}s)", flush=True)


def finish_rows(out: dict, a: argparse.Namespace) -> None:
    """Predicted step seconds (from the uncapped runs), the offloaded bytes by hand where
    XLA reports no host memory, and bench_torch.py's field names."""
    fit = out["calibration"].get("time_fit")
    dims = {r["model"]: r["fixed"]["config"] for r in out["compile_probes"] if "fixed" in r}
    known = [m["ratio"] for m in out["calibration"].get("measured_vs_estimate") or [] if m["ratio"]]
    pts = sorted(
        (p["seq"], p["device_bytes"])
        for p in out["compile_probes"]
        if p["model"] == "8b" and p.get("ok")
    )
    for r in out["rows"] + out["rows_70b"]:
        s = r.get("max_seq_len")
        if fit and s and r["model"] == "8b":
            r["predicted_step_s"] = s * (fit[0] + fit[1] * s)
        if s and "offload" in a.remat:
            r["offload_model_bytes"] = offload_bytes(s, dims.get(r["model"]), a.remat)
        if known and r["model"] == "8b" and r["verified_by"] == "compile":
            # What the compile curve gives once scaled by the measured/estimated ratio.
            guess = secant_seq(pts, r["cap_bytes"] / max(known))
            if guess:
                r["ratio_adjusted_seq"] = int(guess) // a.granularity * a.granularity
        if r["model"] != "8b":
            continue
        # bench_torch.py-compatible names beside ours
        r["system"], r["cap_gib"] = "lorax", r["cap"] if a.unit == GIB else r["cap"] / 1024
        r["peak_mem_gib_at_max"] = (r.get("peak_mem_bytes") or r.get("est_peak_bytes") or 0) / GIB
        r["step_s_at_max"] = r.get("step_s")


if __name__ == "__main__":
    main()
