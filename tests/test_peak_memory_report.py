"""``scripts/peak_memory_report.py`` reads XLA's dump of what is live at a program's peak.

The script's 8B run needs a GPU; its parsing is checked here on a small program compiled on
the CPU whose peak holds buffers of known size, shape and origin.
"""

import jax
import jax.numpy as jnp
import pytest
from script_modules import load_script


def step(x, w):
    # Named like make_train_step's program (jit_step), which the dump is filtered to. The
    # scan over four [256, 1024] f32 weights keeps every tanh output for the backward pass.
    def layer(h, w):
        return jnp.tanh(h @ w), None

    return jax.lax.scan(layer, x, w)[0].sum()


def test_peak_report_lists_the_live_buffers(tmp_path):
    script = load_script("peak_memory_report")
    x = jnp.ones((512, 256), jnp.float32)
    w = jnp.ones((4, 256, 256), jnp.float32)
    grad = jax.jit(jax.grad(step, argnums=1))
    grad.lower(x, w).compile(compiler_options=script.dump_options(str(tmp_path)))

    buffers, breakdown = script.peak_report(str(tmp_path))

    assert buffers == sorted(buffers, key=lambda b: -b.nbytes)
    by_shape = {b.shape.split("{")[0]: b for b in buffers}
    # The parameters are live throughout; the stacked activations of the 4 layers
    # ([4, 512, 256] f32, 2 MiB) are live from the forward scan into the backward one.
    assert by_shape["f32[4,256,256]"].nbytes == 4 * 256 * 256 * 4
    assert by_shape["f32[512,256]"].nbytes == 512 * 256 * 4
    assert any(b.nbytes == 4 * 512 * 256 * 4 and b.shape.startswith("f32[4,512,256]")
               for b in buffers)  # fmt: skip
    assert not any(b.on_host for b in buffers)
    # Every buffer an XLA op made says which JAX operation made it.
    made = [b for b in buffers if "jit(step)" in b.origin]
    assert made, [(b.name, b.origin) for b in buffers]
    assert "Stack trace breakdown for peak usage" in breakdown


def test_peak_report_names_a_missing_dump(tmp_path):
    with pytest.raises(FileNotFoundError, match="live-range"):
        load_script("peak_memory_report").peak_report(str(tmp_path))
