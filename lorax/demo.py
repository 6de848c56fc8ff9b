"""The embedded default for ``lorax train`` with no model: a real pretrained model when one
is installed, else a tiny randomly initialised Llama with a BPE tokenizer trained on the
bundled demo data (so the command always runs, offline, in minutes on a CPU)."""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp

from lorax.config import ModelConfig, RopeConfig
from lorax.model import Model

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def demo_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE trained on the demo data, with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lorax.data import demo_data_path

    texts = []
    with open(demo_data_path(), encoding="utf-8") as f:
        for line in f:
            texts.extend(m["content"] for m in json.loads(line)["messages"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def tiny_model(tokenizer: Any = None, *, seed: int = 0, dtype: Any = jnp.float32) -> Model:
    """A 4-layer Llama (d=128) with random weights: small enough to train in CPU minutes."""
    tokenizer = tokenizer or demo_tokenizer()
    config = ModelConfig(
        model_type="llama",
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        rms_norm_eps=1e-5,
        rope=RopeConfig(theta=10000.0),
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    keys = iter(jax.random.split(jax.random.key(seed), 16))
    n = config.num_layers

    def normal(shape: tuple[int, ...]) -> jax.Array:
        return (0.02 * jax.random.normal(next(keys), shape)).astype(dtype)

    layers: dict[str, Any] = {
        "input_layernorm": jnp.ones((n, config.hidden_size), dtype),
        "post_attention_layernorm": jnp.ones((n, config.hidden_size), dtype),
    }
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        layers[proj] = {"weight": normal((n, *config.projection_shape(proj)))}
    params = {
        "embed_tokens": normal((config.vocab_size, config.hidden_size)),
        "layers": layers,
        "norm": jnp.ones((config.hidden_size,), dtype),
    }
    return Model(params, config, tokenizer)
