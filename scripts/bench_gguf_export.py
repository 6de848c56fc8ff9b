"""Time a GGUF export of a Llama-3.1-8B-shaped QLoRA model (random weights, LoRA merged).

The K-quant encoders run in jnp, so on a GPU the quantization is device work; the rest is
streaming bytes to disk. Prints seconds per scheme and the file size.

    python scripts/bench_gguf_export.py --quants q4_k_m,q8_0 --dir /tmp
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quants", default="q4_k_m")
    p.add_argument("--dir", default="/tmp")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args()

    import jax
    from bench_train import build_model

    import lorax

    t0 = time.perf_counter()
    model = build_model(a.layers)
    lora = lorax.init_lora(model, rank=16, alpha=16, key=jax.random.key(1))
    lora = lorax.LoraWeights(
        jax.tree_util.tree_map(lambda x: x + 1e-3, lora.params), lora.config
    )  # a nonzero B, so the merge is real work
    jax.block_until_ready(jax.tree_util.tree_leaves(model.params))
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; model built in "
        f"{time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    rows = []
    for quant in a.quants.split(","):
        path = os.path.join(a.dir, f"llama8b-{quant}.gguf")
        t0 = time.perf_counter()
        lorax.export_gguf(model, lora, path, quant=quant)
        seconds = time.perf_counter() - t0
        size = os.path.getsize(path) / 2**30
        rows.append({"quant": quant, "seconds": seconds, "gib": size})
        print(f"{quant:>8}: {seconds:6.1f} s  {size:.2f} GiB", flush=True)
        os.remove(path)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
