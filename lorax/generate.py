"""Sampling text from a model (for demos and sanity checks; not a serving engine).

Decoding runs the pure forward over a fixed-size token buffer, so one compiled program
serves every step; it recomputes the prefix each step (no KV cache), which is fine for the
short samples a fine-tuning run prints before and after training.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax.lora import LoraWeights
from lorax.model import Model, forward


@jax.jit
def _next_logits(model: Model, lora: LoraWeights | None, tokens, length):
    logits = forward(model, lora, tokens)
    return logits[0, length - 1]


def generate(
    model: Model,
    lora: LoraWeights | None,
    prompt_ids: list[int],
    max_new_tokens: int = 32,
    *,
    temperature: float = 0.0,
    key: jax.Array | None = None,
    stop_ids: tuple[int, ...] = (),
) -> list[int]:
    """Continues ``prompt_ids``; greedy when ``temperature == 0``. Returns the new ids."""
    if not prompt_ids:
        raise ValueError("generate needs a non-empty prompt")
    total = len(prompt_ids) + max_new_tokens
    width = -(-total // 64) * 64
    tokens = np.zeros((1, width), np.int32)
    tokens[0, : len(prompt_ids)] = prompt_ids
    key = jax.random.key(0) if key is None else key
    out: list[int] = []
    length = len(prompt_ids)
    for _ in range(max_new_tokens):
        logits = _next_logits(model, lora, jnp.asarray(tokens), length)
        if temperature > 0:
            key, sub = jax.random.split(key)
            token = int(jax.random.categorical(sub, logits / temperature))
        else:
            token = int(jnp.argmax(logits))
        out.append(token)
        if token in stop_ids:
            break
        tokens[0, length] = token
        length += 1
    return out


def generate_text(model: Model, lora: LoraWeights | None, prompt: str, **kwargs: Any) -> str:
    """Chat-formats ``prompt`` with the tokenizer's template (when it has one) and decodes."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError("generate_text needs a model with a tokenizer")
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
    else:
        ids = tok(prompt)["input_ids"]
    stops = tuple(i for i in (tok.eos_token_id,) if i is not None)
    new = generate(model, lora, list(ids), stop_ids=stops, **kwargs)
    return tok.decode(new, skip_special_tokens=True)
