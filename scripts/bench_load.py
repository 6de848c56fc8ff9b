"""Time and peak host RSS to load + NF4-quantize a ~1B-parameter random Llama on the CPU.

Writes a Llama-3.2-1B-shaped checkpoint (random bf16 weights, our safetensors writer) once,
then loads it in a fresh subprocess (so RSS is the loader's alone) and prints a table.

    python scripts/bench_load.py [--dir /tmp/llama1b] [--quantize nf4|none]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

CONFIG = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    hidden_act="silu",
    rope_parameters={
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    },
)


def write_checkpoint(directory: str) -> None:
    import ml_dtypes

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from convert.names import tensor_specs
    from convert.safetensors_io import save_file
    from lorax.config import ModelConfig

    config = ModelConfig.from_hf_dict(CONFIG)
    rng = np.random.default_rng(0)
    tensors = {}
    for spec in tensor_specs(config):
        for name in spec.hf_names():
            a = rng.standard_normal(spec.shape, dtype=np.float32) * 0.02
            tensors[name] = a.astype(ml_dtypes.bfloat16)
    os.makedirs(directory, exist_ok=True)
    save_file(os.path.join(directory, "model.safetensors"), tensors, {"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(CONFIG, f)


def measure(directory: str, quantize: str | None) -> dict:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    import lorax
    from convert.hf import params_nbytes

    t0 = time.perf_counter()
    model = lorax.load(directory, quantize=quantize, dtype="bfloat16")
    jax.block_until_ready(jax.tree_util.tree_leaves(model.params))
    seconds = time.perf_counter() - t0
    return {
        "params_b": model.config.num_parameters() / 1e9,
        "quantize": quantize or "none",
        "load_s": seconds,
        "result_gib": params_nbytes(model.params) / 2**30,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/lorax-llama1b")
    p.add_argument("--quantize", default="nf4", choices=["nf4", "none"])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    q = None if a.quantize == "none" else a.quantize
    if a.child:
        print(json.dumps(measure(a.dir, q)))
        return
    if not os.path.exists(os.path.join(a.dir, "model.safetensors")):
        t0 = time.perf_counter()
        write_checkpoint(a.dir)
        print(f"wrote {a.dir} in {time.perf_counter() - t0:.0f}s")
    size = os.path.getsize(os.path.join(a.dir, "model.safetensors")) / 2**30
    out = subprocess.run(
        [sys.executable, __file__, "--dir", a.dir, "--quantize", a.quantize, "--child"],
        capture_output=True,
        text=True,
        check=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print("| params | checkpoint | quantize | load s | result GiB | peak RSS GiB |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {r['params_b']:.2f}B | {size:.2f} GiB bf16 | {r['quantize']} | {r['load_s']:.1f} "
        f"| {r['result_gib']:.2f} | {r['peak_rss_gib']:.2f} |"
    )


if __name__ == "__main__":
    main()
