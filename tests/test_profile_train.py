"""``scripts/profile_train.py`` attributes a step's GPU time to HLO ops; its HLO reading is
checked here on a program compiled on the CPU (the trace itself needs a GPU)."""

import jax
import jax.numpy as jnp
from script_modules import load_script


def test_fusion_bytes_counts_operands_and_result():
    script = load_script("profile_train")
    assert script.shape_bytes("(bf16[2,3]{1,0}, f32[4]{0})") == 2 * 6 + 4 * 4
    assert script.shape_bytes("pred[]") == 1

    def f(x, y):
        return jnp.tanh(x) * y + 1.0

    x = jnp.ones((64, 128), jnp.float32)
    y = jnp.ones((64, 128), jnp.bfloat16)
    hlo = jax.jit(f).lower(x, y).compile().as_text()
    instructions, _ = script.hlo_index(hlo)
    fusions = [name for name, text in instructions.items() if " fusion(" in text]
    assert fusions, hlo
    # The one elementwise fusion reads x (f32) and y (bf16) and writes an f32 result.
    assert max(script.fusion_bytes(name, instructions) for name in fusions) == 64 * 128 * 10
    assert script.fusion_bytes("no-such-op", instructions) is None


def test_kernel_names_classify_unnamed_ops():
    script = load_script("profile_train")
    assert script.describe_kernel("nvjet_sm90_tst_256x128_64x4")[0] == "matmul (cuBLAS)"
    assert script.describe_kernel("cudnn_generated_fort_native_sdpa_sm90")[0] == "attention (cuDNN)"
    assert script.describe_kernel("memcpy128")[0] == "other"
