"""``lorax export``: a trained adapter out as GGUF, a merged HF model and a PEFT adapter."""

from __future__ import annotations

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

import lorax
from lorax import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}


def _lorax(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorax.cli", *args], env=ENV, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    done = _lorax(
        "train",
        "--model",
        "tiny",
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "64",
        "--learning-rate",
        "1e-2",
        "--no-progress",
        "--max-new-tokens",
        "0",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out / "adapter"


def test_export_merged_peft_and_gguf(trained, tmp_path):
    model = demo.tiny_model()
    lora = lorax.load_adapter(model, trained)
    assert np.any(np.asarray(lora.params["layers"]["q_proj"]["lora_b"]))  # it trained
    ids = jnp.arange(3, 40)[None]
    expected = lorax.forward(model, lora, ids)

    merged = tmp_path / "merged"
    done = _lorax("export", "--adapter", str(trained), "--merged", "float32", str(merged))
    assert done.returncode == 0, done.stderr[-2000:]
    assert rel_err(lorax.forward(lorax.load(merged, dtype="float32"), None, ids), expected) < 1e-5

    peft_dir = tmp_path / "peft"
    done = _lorax("export", "--adapter", str(trained), "--peft", str(peft_dir))
    assert done.returncode == 0, done.stderr[-2000:]
    again = lorax.load_adapter(model, peft_dir)
    np.testing.assert_array_equal(
        again.params["layers"]["v_proj"]["lora_a"], lora.params["layers"]["v_proj"]["lora_a"]
    )

    gguf = tmp_path / "model.gguf"
    done = _lorax("export", "--adapter", str(trained), "--gguf", "f32", str(gguf))
    assert done.returncode == 0, done.stderr[-2000:]
    from_gguf = lorax.load(str(gguf), dtype="float32")
    assert rel_err(lorax.forward(from_gguf, None, ids), expected) < 1e-5


def test_export_refuses_bad_input_clearly(trained, tmp_path):
    done = _lorax(
        "export", "--adapter", str(tmp_path / "nope"), "--gguf", "f16", str(tmp_path / "x.gguf")
    )
    assert done.returncode != 0 and "nope" in done.stderr
    assert not (tmp_path / "x.gguf").exists()
    done = _lorax("export", "--adapter", str(trained), "--gguf", "q3_k", str(tmp_path / "y.gguf"))
    assert done.returncode != 0 and "q3_k" in done.stderr
    assert not (tmp_path / "y.gguf").exists()
