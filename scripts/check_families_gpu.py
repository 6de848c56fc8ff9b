"""Qwen 3, Gemma 2, Gemma 3, Phi-3, Mixtral, Qwen 2/3 MoE and DeepSeek V2/V3 on the GPU at
their real layer widths: parity and step time.

The CPU tests check each family's logits against transformers on tiny configs, with the jnp
references. This runs what a GPU user gets instead: real head dims (Gemma's 256), real
vocabularies, windows shorter than the sequence, and the kernels the model picks there
(``lorax.model._attention_impl``: cuDNN, the Mosaic GPU kernels or the Triton ones, by head
dim, softcap and packing). Per family, two decoder layers (one sliding, one full), random
perturbed weights saved by transformers and read by ``lorax.load``:

1. float32, jnp references, against transformers' float32 eager model on the same GPU
   (rel. L2 of the logits: the parity tests at full size);
2. bfloat16 with the default kernels against the same float32 logits (rel. L2, top-1
   agreement), unpacked;
3. QLoRA (NF4 base, r=16 adapters with nonzero B): loss and LoRA gradients of the default
   GPU path against the references' (both bfloat16), unpacked and packed (segment ids);
4. the time of that jitted loss+gradient (median of 10 after compiling), default vs
   references, both under ``remat="full"`` (what lets the references fit at 1x8192).

Usage: ``python scripts/check_families_gpu.py [--families qwen3,gemma2,gemma3]
[--seq-len 8192]``. Prints one table; each family runs in a process of its own. ``--tiny``
shrinks the layers (a smoke run on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

# Set before jax starts: transformers' model shares the GPU with jax's arrays.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

LAYERS = 2
# Made-up LongRoPE factors (48 frequencies: a 96-dim rotary part), with the pre-training
# length cut to 2048 so that 1x4096 rows take the long ones.
PHI_LONGROPE = dict(
    rope_type="longrope",
    rope_theta=10000.0,
    short_factor=[1.0 + 0.01 * i for i in range(48)],
    long_factor=[1.0 + 1.5 * i for i in range(48)],
    original_max_position_embeddings=2048,
)
TINY = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=512)  # fmt: skip
FAMILIES = {
    # Qwen3-8B's layer.
    "qwen3": dict(
        model_type="qwen3",
        hidden_size=4096,
        intermediate_size=12288,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        rope_theta=1e6,
        use_sliding_window=True,  # layer 1 slides: a window in the mix
        sliding_window=2048,
        max_window_layers=1,
        tie_word_embeddings=False,
    ),
    # Gemma-2-9B's layer (softcaps 50 / 30, window 4096).
    "gemma2": dict(
        model_type="gemma2",
        hidden_size=3584,
        intermediate_size=14336,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        vocab_size=256000,
        sliding_window=4096,
        query_pre_attn_scalar=256,
    ),
    # Gemma-3-4B's layer (two RoPEs: linear x8 on the full layers; window 1024).
    "gemma3": dict(
        model_type="gemma3_text",
        hidden_size=2560,
        intermediate_size=10240,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        vocab_size=262208,
        sliding_window=1024,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        query_pre_attn_scalar=256,
    ),
    # Phi-3.5-mini's layer (fused qkv_proj / gate_up_proj, head dim 96, longrope). Its
    # pre-training length is cut to 2048 here so that 1x4096 rows take the long factors.
    "phi3": dict(
        model_type="phi3",
        hidden_size=3072,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
        sliding_window=2048,
        pad_token_id=0,
        original_max_position_embeddings=2048,
        rope_parameters=PHI_LONGROPE,
    ),
    # Phi-4-mini's layer: three quarters of each 128-dim head rotate; tied embeddings.
    "phi4mini": dict(
        model_type="phi3",
        hidden_size=3072,
        intermediate_size=8192,
        num_attention_heads=24,
        num_key_value_heads=8,
        vocab_size=200064,
        sliding_window=2048,
        pad_token_id=0,
        tie_word_embeddings=True,
        original_max_position_embeddings=2048,
        partial_rotary_factor=0.75,
        rope_parameters={**PHI_LONGROPE, "partial_rotary_factor": 0.75},
    ),
    # Mixtral-8x7B's layer: 8 SwiGLU experts, 2 per token; no window.
    "mixtral": dict(
        model_type="mixtral",
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        rope_theta=1e6,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=None,
    ),
}
# Qwen3-30B-A3B's layer: 128 experts of width 768, 8 per token, renormalized; q/k norms.
FAMILIES["qwen3-moe"] = dict(
    model_type="qwen3_moe",
    hidden_size=2048,
    intermediate_size=6144,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    vocab_size=151936,
    rope_theta=1e6,
    num_experts=128,
    num_experts_per_tok=8,
    moe_intermediate_size=768,
    norm_topk_prob=True,
)
# Qwen1.5-MoE-A2.7B's layer: 60 experts of width 1408, 4 per token, not renormalized, and a
# shared expert of width 5632 behind a sigmoid gate; q/k/v biases.
FAMILIES["qwen2-moe"] = dict(
    model_type="qwen2_moe",
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=151936,
    rope_theta=1e6,
    num_experts=60,
    num_experts_per_tok=4,
    moe_intermediate_size=1408,
    shared_expert_intermediate_size=5632,
    norm_topk_prob=False,
)
# The same with every expert used (k = E): the router's weights are then its whole softmax, a
# continuous function, where top-2 switches experts when two logits cross. Separates what bf16
# rounding does to a route from what it does to the arithmetic.
FAMILIES["mixtral-all8"] = dict(FAMILIES["mixtral"], num_experts_per_tok=8)
# DeepSeek-V2-Lite's layers (layer 0 dense, layer 1 routed): latent attention (512-wide key/
# value latent, queries from x, head dims 192 for q/k and 128 for v), YaRN with its softmax
# scale; 64 experts of width 1408, 6 per token by softmax, 2 shared experts.
FAMILIES["deepseek-v2-lite"] = dict(
    model_type="deepseek_v2",
    hidden_size=2048,
    intermediate_size=10944,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=102400,
    q_lora_rank=None,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    n_routed_experts=64,
    num_experts_per_tok=6,
    moe_intermediate_size=1408,
    n_shared_experts=2,
    first_k_dense_replace=1,
    topk_method="greedy",
    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, mscale=0.707,
                         mscale_all_dim=0.707, original_max_position_embeddings=4096,
                         beta_fast=32, beta_slow=1),
)  # fmt: skip
# Moonlight-16B-A3B's (DeepSeek V3's architecture): the same widths, sigmoid routing with a
# correction bias, weights renormalized and scaled by 2.446.
FAMILIES["moonlight"] = dict(
    {k: v for k, v in FAMILIES["deepseek-v2-lite"].items() if k not in ("topk_method",)},
    model_type="deepseek_v3",
    intermediate_size=11264,
    vocab_size=163840,
    n_group=1,
    topk_group=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.446,
    rope_parameters=dict(rope_type="default", rope_theta=50000.0),
)
# --tiny's latent attention and experts.
TINY_DEEPSEEK = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
                     qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
                     num_experts_per_tok=2, moe_intermediate_size=32)  # fmt: skip


DEVICE = "cuda"


def write_hf_model(directory: str, hf: dict) -> object:
    """A transformers float32 model of ``hf`` on the GPU, perturbed like the tests' (norm
    scales near 1, other weights N(0, 0.02)), saved to ``directory``."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        **hf, num_hidden_layers=LAYERS, max_position_embeddings=131072, rms_norm_eps=1e-6
    )
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.float().to(DEVICE).eval()
    center = 0.0 if hf["model_type"].startswith("gemma") else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            p.copy_(center + 0.2 * noise if name.endswith("norm.weight") else 0.02 * noise)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek V3's router bias
                buffer.copy_(0.02 * torch.randn_like(buffer))
    model.save_pretrained(directory)
    return model


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def tree_rel_l2(a, b) -> float:
    import jax

    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    num = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
              for x, y in zip(la, lb, strict=True))  # fmt: skip
    den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in lb)
    return (num / den) ** 0.5


def check_family(name: str, hf: dict, seq_len: int, directory: str) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    from _common import median_ms, packed_rows

    import lorax
    from lorax.model import ForwardOptions, _attention_impl
    from lorax.train.step import StepConfig, loss_sum
    from pallas_kernels.flash_attention import resolve_impl

    torch_model = write_hf_model(directory, hf)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, hf["vocab_size"], size=(1, seq_len))
    rows = slice(None, None, 16)  # the logits compared: every 16th position (host memory)
    with torch.no_grad():
        ref = torch_model(torch.as_tensor(ids).to(DEVICE)).logits[:, rows].float().cpu().numpy()
    del torch_model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()

    reference = ForwardOptions(attention_impl="reference", matmul_impl="reference")
    out: dict = {"family": name}
    start = time.perf_counter()

    def record(key: str, value) -> None:
        """One value, printed as it is measured: what a timeout cuts keeps the rest."""
        out[key] = value
        print(f"{PART}{json.dumps([key, value, time.perf_counter() - start])}", flush=True)

    model32 = lorax.load(directory, dtype="float32")
    with jax.default_matmul_precision("highest"):  # float32 dots, not TF32: like torch's
        logits = jax.jit(lambda m, x: lorax.forward(m, None, x, options=reference))(
            model32, jnp.asarray(ids)
        )
    record("f32 ref vs torch", rel_l2(logits[:, rows], ref))
    del model32, logits

    model16 = lorax.load(directory, dtype="bfloat16")
    logits = jax.jit(lambda m, x: lorax.forward(m, None, x))(model16, jnp.asarray(ids))
    sub = np.asarray(logits[:, rows], np.float32)
    record("bf16 kernels vs torch", rel_l2(sub, ref))
    record("top-1 agree", float(np.mean(sub.argmax(-1) == ref.argmax(-1))))
    del model16, logits

    model = lorax.load(directory, quantize="nf4", dtype="bfloat16")
    config = model.config
    lora = lorax.init_lora(model, rank=16, alpha=16, key=jax.random.key(0))
    lora = dataclasses.replace(
        lora,
        params=jax.tree_util.tree_map(
            lambda p: p + 0.01 * jax.random.normal(jax.random.key(1), p.shape, p.dtype),
            lora.params,
        ),
    )
    segment_ids, positions = packed_rows(1, seq_len, mean_len=seq_len // 4)
    probe = jnp.zeros((1, seq_len, config.num_heads, config.head_dim), jnp.bfloat16)
    windows = sorted(set(config.layer_windows))
    for packed in (False, True):
        batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(ids)}
        if packed:
            batch |= {"segment_ids": jnp.asarray(segment_ids), "positions": jnp.asarray(positions)}
        tag = "packed" if packed else "unpacked"
        kernels = [
            resolve_impl(
                _attention_impl(
                    None, batch.get("segment_ids"), probe, w or None, config.attn_logit_softcap
                ),
                None,
            )[0]
            for w in windows
        ]
        record(f"attention ({tag})", "/".join(kernels))
        results = {}
        # Full remat: the references' [heads, S, S] scores then exist for one layer at a time
        # (without it the reference step asked XLA for 74 GiB at 1x8192).
        for impl, options in (
            ("default", ForwardOptions(remat="full")),
            ("reference", dataclasses.replace(reference, remat="full")),
        ):
            step_config = StepConfig(forward=options)

            def loss(lora, model, batch, step_config=step_config):
                total, count = loss_sum(lora, model, batch, step_config)
                return total / count

            grad = jax.jit(jax.value_and_grad(loss))
            value, grads = grad(lora, model, batch)
            results[impl] = (float(value), grads)
            record(f"step ms {impl} ({tag})", median_ms(grad, lora, model, batch))
        record(f"loss default/ref ({tag})", results["default"][0] / results["reference"][0])
        record(f"grad rel L2 ({tag})", tree_rel_l2(results["default"][1], results["reference"][1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--child-timeout", type=float, default=None, help="seconds per family")
    parser.add_argument("--row", action="store_true", help="one family, its row as JSON")
    parser.add_argument("--directory", default=None, help=argparse.SUPPRESS)  # --row's scratch
    args = parser.parse_args()
    names = args.families.split(",")
    if args.row:
        directory = args.directory or tempfile.mkdtemp()
        try:
            run_one(names[0], args.seq_len, args.tiny, directory)
        finally:
            if not args.directory:  # a row run alone cleans up after itself
                shutil.rmtree(directory, ignore_errors=True)
        print(PART + json.dumps([ROW_DONE, True, 0.0]), flush=True)
        return
    # One process per family: transformers keeps state between models in a process (gpu_run110:
    # Gemma 3's logits, built after Gemma 2's in the same process, came out 25% off; alone, on
    # either device, they agree with lorax to 2e-5).
    rows = []
    for name in names:
        # The parent owns the family's scratch directory (RAM-backed where there is one): a
        # child killed by its timeout cannot clean up the model it saved there (GBs of RAM).
        scratch = "/dev/shm" if os.path.isdir("/dev/shm") else None
        directory = tempfile.mkdtemp(dir=scratch)
        argv = [sys.executable, __file__, "--row", "--families", name, "--seq-len",
                str(args.seq_len), "--directory", directory]  # fmt: skip
        try:
            row, code, errors = run_child(argv + ["--tiny"] * args.tiny, args.child_timeout)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        if code or ROW_DONE not in row:
            cut = f", its timeout {args.child_timeout:.0f} s" if args.child_timeout else ""
            print(f"{name}: FAILED (exit {code}{cut}):\n{errors}")
        if len(row) > 1:
            rows.append(row)
            print(row, flush=True)
    if not rows:
        raise SystemExit("every family failed")
    keys = list(dict.fromkeys(k for row in rows for k in row if k != ROW_DONE))
    print("\n| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        cells = [row.get(k, "(cut)") for k in keys]
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in cells]
        print("| " + " | ".join(cells) + " |")


def run_child(argv: list[str], timeout: float | None) -> tuple[dict, int, str]:
    """A family's values as its process prints them (each relayed with its time since the
    family started), the exit code, and the end of its stderr. A timeout kills it and keeps
    what it measured."""
    with tempfile.TemporaryFile("w+") as errors:
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors, text=True)
        timer = threading.Timer(timeout, child.kill) if timeout else None
        if timer:
            timer.start()
        row = {"family": argv[argv.index("--families") + 1]}
        for line in child.stdout:
            if line.startswith(PART):
                key, value, seconds = json.loads(line[len(PART) :])
                row[key] = value
                if key != ROW_DONE:
                    print(f"  {row['family']}: {key} = {value} ({seconds:.0f} s)", flush=True)
        code = child.wait()
        if timer:
            timer.cancel()
        errors.seek(0)
        return row, code, errors.read()[-3000:]


PART = "PART "  # a child's line: [key, value, seconds since its family started]
ROW_DONE = "done"


def run_one(name: str, seq_len: int, tiny: bool, directory: str) -> dict:
    """``check_family`` for one family, its model saved in ``directory`` (the parent's)."""
    global DEVICE
    hf = dict(FAMILIES[name])
    if tiny:
        DEVICE = "cpu"
        window = hf.get("sliding_window")
        hf.update(TINY, sliding_window=window and min(window, seq_len // 4))
        if hf["model_type"].startswith("deepseek"):
            hf.update(TINY_DEEPSEEK)
            hf.pop("head_dim")
        rope = hf.get("rope_parameters", {})
        if rope.get("rope_type") == "longrope":  # one factor per rotating frequency
            freqs = int(TINY["head_dim"] * rope.get("partial_rotary_factor", 1.0)) // 2
            cut = {k: rope[k][:freqs] for k in ("short_factor", "long_factor")}
            hf["rope_parameters"] = {**rope, **cut, "original_max_position_embeddings": 16}
            hf["original_max_position_embeddings"] = 16
    return check_family(name, hf, seq_len, directory)


if __name__ == "__main__":
    main()
