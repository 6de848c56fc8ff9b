"""Shared fixtures: tiny random HF models written to disk, and their PyTorch reference."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Test-only XLA:CPU compile settings. Most of the suite's time is XLA compiling, not running:
# the Mosaic GPU interpreter alone compiles one program per simulated warpgroup and grid
# point (~2 s each with XLA's defaults). Without the newer fusion emitters and with LLVM at -O0
# those compiles take ~0.6 s, and the whole suite takes about half the time on 2 cores.
# The programs compute the same operations; only codegen differs. Set
# LORAX_TEST_FAST_COMPILE=0 to test with XLA's defaults; a flag already in XLA_FLAGS wins.
FAST_COMPILE_FLAGS = ("--xla_cpu_use_fusion_emitters=false", "--xla_backend_optimization_level=0")


def _with_fast_compile_flags(current: str) -> str:
    """``current`` plus the fast-compile flags this jaxlib knows (XLA aborts on unknown flags,
    so they are tried once in a subprocess)."""
    names = {flag.split("=")[0] for flag in current.split()}
    extra = [flag for flag in FAST_COMPILE_FLAGS if flag.split("=")[0] not in names]
    if not extra:
        return current
    candidate = " ".join([current, *extra]).strip()
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices('cpu')"],
        env={**os.environ, "XLA_FLAGS": candidate, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        warnings.warn(
            f"this jaxlib rejects the test compile flags {extra} ({probe.stderr.strip()[-200:]}); "
            "testing with XLA's default compile settings (slower)",
            stacklevel=1,
        )
        return current
    return candidate


if os.environ.get("LORAX_TEST_FAST_COMPILE", "1") != "0":
    os.environ["XLA_FLAGS"] = _with_fast_compile_flags(os.environ.get("XLA_FLAGS", ""))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import lorax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def bnb_dequantize(functional, packed, state):
    """bitsandbytes' ``dequantize_4bit`` of ``packed``, read in NF4's flat element order and
    reshaped to the weight's shape: the reference decode for tests.

    Why flat: bitsandbytes 0.49-0.50.2's native CPU kernel decodes a 2-D weight row by row
    and misreads the absmax of blocks that straddle rows (a [64, 96] weight round-trips at
    22% error instead of 9%). Blocks are defined on the flat order, and a 1-D state takes
    that kernel's one-row path, which is right. Odd shapes go to bnb's generic path either
    way.
    """
    import copy

    import torch

    flat = copy.copy(state)
    flat.shape = torch.Size([int(np.prod(state.shape))])
    return functional.dequantize_4bit(packed, flat).reshape(state.shape)


def perturb_(model, seed: int = 0) -> None:
    """Gives every parameter random values so no test passes on trivial 1s and 0s.

    Norm scales land near 1: Gemma's norms scale by ``1 + weight``, so theirs near 0.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    norm_center = 0.0 if model.config.model_type.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(norm_center + 0.2 * noise)
            else:
                p.copy_(0.08 * noise)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek V3's router bias
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=g))


# A tiny SigLIP for Gemma 3's image-text model: 2x2 patches of 14 pixels, pooled to 4 tokens.
TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
)


def make_hf_model(tmp_path, model_type: str = "llama", seed: int = 0, **overrides):
    """Builds a tiny transformers model, perturbs it, saves it; returns (torch_model, dir).

    ``"gemma3"`` is Gemma 3's image-text model (Gemma3ForConditionalGeneration): the
    overrides (but ``tie_word_embeddings``, a top-level field there) shape its text_config,
    beside a tiny vision tower.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    if model_type == "gemma3":
        tied = overrides.pop("tie_word_embeddings", True)
        text = transformers.Gemma3TextConfig(**{**TINY, **overrides})
        config = transformers.Gemma3Config(
            text_config=text, vision_config=TINY_VISION, mm_tokens_per_image=4
        )
        config.tie_word_embeddings = tied
        return _save_hf_model(tmp_path, config, model_type, seed)
    config_cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "gemma2": transformers.Gemma2Config,
        "gemma3_text": transformers.Gemma3TextConfig,
        "phi3": transformers.Phi3Config,
        "mixtral": transformers.MixtralConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig,
        "qwen2_moe": transformers.Qwen2MoeConfig,
        "deepseek_v2": transformers.DeepseekV2Config,
        "deepseek_v3": transformers.DeepseekV3Config,
    }[model_type]
    config = config_cls(**{**TINY, **overrides})
    return _save_hf_model(tmp_path, config, model_type, seed)


def _save_hf_model(tmp_path, config, model_type: str, seed: int):
    import transformers

    config._attn_implementation = "eager"
    # Gemma3Config's causal LM is Gemma3ForConditionalGeneration (transformers' auto map).
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.float().eval()
    perturb_(model, seed)
    path = os.path.join(str(tmp_path), f"{model_type}-{seed}")
    model.save_pretrained(path)
    return model, path


def torch_logits(model, input_ids: np.ndarray, **kw) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(input_ids), dtype=torch.long), **kw)
    return out.logits.float().numpy()


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def rel_l2(a, b) -> float:
    """||a - b|| / ||b||: the relative error of a whole tensor (insensitive to where the
    largest entry happens to sit, unlike ``rel_err``)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture
def rng():
    """A fresh generator per test; the seed is printed so a failure can be replayed by running
    the test again with ``LORAX_TEST_SEED=<seed>``."""
    replay = os.environ.get("LORAX_TEST_SEED")
    seed = int(replay) if replay else int(np.random.SeedSequence().entropy % 2**32)
    print(f"rng seed: {seed}")
    return np.random.default_rng(seed)


def random_lora(model, rng, rank, alpha, targets, **kw) -> lorax.LoraWeights:
    """Adapters with random A and B (B nonzero, unlike PEFT's init, so they change outputs).

    Built in numpy rather than with ``init_lora``: the tests need values, not the init, and
    this keeps them free of per-shape compiles.
    """
    config = lorax.LoraConfig(rank, float(alpha), tuple(targets), **kw)
    params = {}
    for stack in model.config.layer_stacks():
        layers = params.setdefault(stack.key, {})
        for proj in config.targets:
            if proj not in stack.config.projections():
                continue
            out_dim, in_dim = stack.config.projection_shape(proj)
            lead = stack.config.adapter_batch_shape(proj)
            shape_a = (*lead, rank, in_dim)
            shape_b = (*lead, out_dim, rank)
            layers[proj] = {
                "lora_a": jnp.asarray(rng.uniform(-1, 1, shape_a) / np.sqrt(in_dim), jnp.float32),
                "lora_b": jnp.asarray(0.2 * rng.normal(size=shape_b), jnp.float32),
            }
    return lorax.LoraWeights(params, config)
