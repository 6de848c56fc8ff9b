"""Does XLA run the attention forward kernel again in the backward? (GPU, one QLoRA step).

JAX's jaxpr of the train step holds one forward kernel per scanned layer segment (the remat
policy keeps its outputs: ``save_forward_residuals``), but a profile of the 1x8192 step showed
the Mosaic forward running twice per layer (BENCHMARKS.md §3). This compiles the step of a
2-layer Llama-3.1-8B-shaped model for each ``XLA_FLAGS`` setting given and counts, in the
optimized HLO, the custom calls that return the forward's float32 ``[B, Hq, S]`` statistics.

    python scripts/probe_attention_recompute.py --attention mosaic \
        --flags="|--xla_disable_hlo_passes=rematerialization"
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys


def count(attention: str, remat: str, seq: int) -> str:
    import jax
    import numpy as np
    from bench_train import build_model

    import lorax
    from lorax.model import ForwardOptions
    from lorax.train import make_optimizer
    from lorax.train.step import StepConfig, init_train_state, make_train_step

    model = build_model(2, dict(vocab_size=1024))
    lora = lorax.init_lora(model, rank=16, alpha=16, targets="all-linear", key=jax.random.key(1))
    opt = make_optimizer("adamw", 1e-4, max_grad_norm=None)
    state = init_train_state(lora, opt, key=jax.random.key(2))
    forward = ForwardOptions(remat=remat, attention_impl=attention)
    step = make_train_step(model, opt, StepConfig(forward=forward))
    ids = np.zeros((1, 1, seq), np.int32)
    hlo = step.lower(state, {"input_ids": ids, "labels": ids}).compile().as_text()
    cfg = model.config
    stats = f"f32[1,{cfg.num_heads},{seq}]"
    # The forward returns the statistics; the backward kernels only take them. Each found
    # call is named with the HLO computation it sits in (a while body: a scan over layers).
    calls, computation = [], "?"
    for ln in hlo.splitlines():
        if ln and not ln[0].isspace() and ln.rstrip().endswith("{"):
            computation = ln.split()[1] if ln.startswith("ENTRY") else ln.split()[0]
        elif "custom-call(" in ln and stats in ln.split("custom-call(")[0]:  # in the results
            target = re.search(r'custom_call_target="([^"]+)"', ln)
            calls.append(f"{computation}: {target.group(1) if target else '?'}")
    return f"{len(calls)} forward custom calls: " + "; ".join(calls)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attention", default="mosaic")
    p.add_argument("--remat", default="mlp")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--flags", default="", help="XLA_FLAGS settings separated by |, one per run")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(count(a.attention, a.remat, a.seq), flush=True)
        return
    for flags in a.flags.split("|"):
        env = {**os.environ, "XLA_FLAGS": flags}
        args = [sys.executable, __file__, "--child", "--attention", a.attention,
                "--remat", a.remat, "--seq", str(a.seq)]  # fmt: skip
        out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        last = (out.stdout.strip().splitlines() or out.stderr.strip().splitlines() or ["?"])[-1]
        print(f"{a.attention} remat={a.remat} XLA_FLAGS={flags!r}: {last}", flush=True)


if __name__ == "__main__":
    main()
