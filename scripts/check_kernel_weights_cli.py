"""``lorax train --kernel-weights`` on a real GPU: does ``auto`` prepare where it should, and
does the prepared model train like the model as loaded?

Builds a small Llama checkpoint (random weights, dims the Mosaic kernel takes, the demo BPE
tokenizer) and runs ``lorax train`` on it with NF4 weights:

  1. ``--kernel-weights auto`` at 1x1024 tokens (expected: every group prepared on a Hopper GPU),
  2. ``--kernel-weights none`` at the same shape (the default XLA path),
  3. ``--kernel-weights auto`` at 4x1024 (expected: above ``AUTO_MAX_TOKENS``, not prepared),

and prints what each run prepared and the per-step losses of 1 against 2 (same seed and data:
they differ only by the kernels' bf16 rounding).

    python scripts/check_kernel_weights_cli.py [--steps 30] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_checkpoint(path: str) -> None:
    import torch
    import transformers

    from lorax import demo

    tokenizer = demo.demo_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def train(model: str, out: str, setting: str, batch: int, steps: int) -> tuple[str, list[float]]:
    from lorax import cli

    args = ["train", "--model", model, "--quantize", "nf4", "--dtype", "bfloat16"]
    args += ["--kernel-weights", setting, "--output-dir", out, "--max-steps", str(steps)]
    args += ["--batch-size", str(batch), "--seq-len", "1024", "--max-new-tokens", "8"]
    args += ["--no-progress"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = cli.main(args)
    text = printed.getvalue()
    if status:
        raise SystemExit(f"lorax train {' '.join(args)} exited {status}:\n{text}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    return text, losses


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default=None, help="keep the runs here (default: a temp dir)")
    args = p.parse_args()
    import jax

    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, {dev.device_kind}, compute capability "
          f"{getattr(dev, 'compute_capability', '-')}, {len(jax.devices())} device(s)")  # fmt: skip
    root = args.out or tempfile.mkdtemp(prefix="kernel_weights_cli_")
    model = os.path.join(root, "model")
    make_checkpoint(model)
    runs = {}
    for name, setting, batch in (("auto_1k", "auto", 1), ("none_1k", "none", 1),
                                 ("auto_4k", "auto", 4)):  # fmt: skip
        text, losses = train(model, os.path.join(root, name), setting, batch, args.steps)
        prepared = [line for line in text.splitlines() if line.startswith("kernel weights:")]
        print(f"{name}: {prepared[0] if prepared else 'kernel weights: as loaded'}; "
              f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")  # fmt: skip
        for line in text.splitlines():
            if line.startswith(("sample after", "loss:")):
                print(f"  {line}")
        runs[name] = losses
    a, b = runs["auto_1k"], runs["none_1k"]
    diffs = [abs(x - y) / abs(y) for x, y in zip(a, b, strict=True)]
    print(f"auto_1k vs none_1k: max relative loss difference {max(diffs):.2e} "
          f"(first step {diffs[0]:.2e}, last {diffs[-1]:.2e})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
