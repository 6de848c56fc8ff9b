"""Which side moves between CPU and GPU: transformers' or lorax's float32 logits of one family.

``check_families_gpu.py`` compares lorax on the GPU with transformers on the GPU. When they
disagree, this says which of the two differs from its own CPU result on the same weights:
transformers' eager model on the GPU and on the CPU, lorax's jnp references on the GPU and on
the CPU backend (``jax.devices("cpu")``), all float32, same inputs. Prints the rel. L2 of each
pair over every ``--stride``-th position.

Usage: ``python scripts/probe_family_devices.py --family gemma3 --seq-len 2048
[--vocab-size 262208]``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import tempfile

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def main() -> None:
    import check_families_gpu as families
    import jax
    import jax.numpy as jnp
    import torch

    import lorax
    from lorax.model import ForwardOptions

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="gemma3")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--stride", type=int, default=8)
    args = parser.parse_args()
    hf = dict(families.FAMILIES[args.family])
    if args.vocab_size:
        hf["vocab_size"] = args.vocab_size
    rows = slice(None, None, args.stride)
    ids = np.random.default_rng(0).integers(0, hf["vocab_size"], size=(1, args.seq_len))
    directory = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        model = families.write_hf_model(directory, hf)
        logits = {}
        with torch.no_grad():
            for device in ("cuda", "cpu"):
                model = model.to(device)
                out = model(torch.as_tensor(ids).to(device)).logits[:, rows]
                logits[f"torch {device}"] = out.float().cpu().numpy()
        del model
        torch.cuda.empty_cache()
        reference = ForwardOptions(attention_impl="reference", matmul_impl="reference")
        for name, device in (("gpu", jax.devices()[0]), ("cpu", jax.devices("cpu")[0])):
            with jax.default_device(device), jax.default_matmul_precision("highest"):
                ours = lorax.load(directory, dtype="float32")
                ours = jax.device_put(ours, device)
                out = jax.jit(lambda m, x: lorax.forward(m, None, x, options=reference))(
                    ours, jnp.asarray(ids)
                )
                logits[f"lorax {name}"] = np.asarray(out[:, rows])
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"{args.family}, seq {args.seq_len}, vocab {hf['vocab_size']}: rel. L2 of each pair")
    for a, b in itertools.combinations(logits, 2):
        err = families.rel_l2(logits[a], logits[b])
        per_position = np.linalg.norm(logits[a] - logits[b], axis=-1) / np.linalg.norm(
            logits[b], axis=-1
        )
        first_bad = int(np.argmax(per_position[0] > 1e-3)) * args.stride
        print(f"  {a:>10} vs {b:<10} {err:.3g}   (first position off by > 1e-3: {first_bad})")


if __name__ == "__main__":
    main()
