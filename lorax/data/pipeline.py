"""``build_dataset``: source + tokenizer -> a ``DataLoader`` of training batches."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from lorax.data.formats import Encoder, Format
from lorax.data.packing import DataLoader
from lorax.data.sources import DataError, Source, iter_records
from lorax.data.tokenized import tokenize_records

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def build_dataset(
    source: Source,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    batch_size: int,
    packing: bool = True,
    format: Format = "auto",
    train_on_responses_only: bool = True,
    chat_template: str | None = None,
    seed: int = 0,
    shuffle: bool = True,
    buckets: Sequence[int] | None = None,
    group_by_length: bool = False,
    drop_last: bool = False,
    pad_id: int | None = None,
    add_eos_to_text: bool = True,
) -> DataLoader:
    """Read, tokenize and batch a fine-tuning dataset.

    Every record is read (``lorax.data.sources``), rendered and tokenized with its loss mask
    (``lorax.data.formats``), truncated to ``max_length`` and batched (``lorax.data.packing``).
    Tokenization happens here, once, so problems surface before training starts: a malformed
    record raises ``DataError`` (a ``ValueError``) naming its file and line or row, and
    truncated or dropped records are counted in one warning each (``loader.stats``).

    Args:
      source: a JSONL/JSON, Parquet, Arrow or CSV file, a directory or glob of them, a
        ``datasets.Dataset``, a list of dicts, or a list of any of these.
      tokenizer: the model's Hugging Face tokenizer (its chat template renders conversations).
      max_length: tokens per example (longer ones are truncated) and per packed row.
      batch_size: rows per batch.
      packing: pack several examples per row of ``max_length`` tokens (one batch shape);
        otherwise one example per row, padded to a bucket length.
      format: ``"auto"`` detects each record's format from its keys; or force one of
        ``"chat"``, ``"sharegpt"``, ``"instruction"``, ``"text"``.
      train_on_responses_only: conversations train on assistant turns only.
      chat_template: a Jinja template overriding the tokenizer's, or ``"simple"`` for
        lorax's fallback when the tokenizer has none.
      seed: shuffling seed; epoch ``e`` is shuffled with ``(seed, e)``.
      shuffle: shuffle rows every epoch.
      buckets: bucket lengths when not packing (default: powers of two up to max_length).
      group_by_length: when not packing, batch examples of similar length together.
      drop_last: drop an epoch's final partial batch instead of padding it with empty rows.
      pad_id: padding token id; default the tokenizer's pad, else EOS, else 0. Padded
        positions never carry a label, so the choice does not affect the loss.
      add_eos_to_text: end every plain-text record with the tokenizer's EOS token.

    Returns:
      a ``DataLoader``: ``len()`` batches per epoch, iteration yields dicts of int32 arrays
      ``input_ids``, ``labels``, ``segment_ids``, ``positions``, each ``[batch_size, seq_len]``;
      ``state_dict()``/``load_state_dict()`` save and restore its position.
    """
    encoder = Encoder(
        tokenizer,
        format=format,
        train_on_responses_only=train_on_responses_only,
        chat_template=chat_template,
        add_eos_to_text=add_eos_to_text,
    )
    data = tokenize_records(iter_records(source), encoder, max_length=max_length, stacklevel=3)
    if len(data) == 0:
        raise DataError(
            f"no usable examples in the data source ({data.stats.records} records read, "
            f"{data.stats.dropped} had nothing to train on)"
        )
    return DataLoader(
        data,
        batch_size=batch_size,
        max_length=max_length,
        pad_id=default_pad_id(tokenizer) if pad_id is None else pad_id,
        packing=packing,
        shuffle=shuffle,
        seed=seed,
        buckets=buckets,
        group_by_length=group_by_length,
        drop_last=drop_last,
    )


def default_pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (always a valid embedding row)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def demo_data_path() -> Path:
    """The bundled demo dataset: a few hundred short chat records (arithmetic, capitals,
    unit conversions, word games) that a tiny model visibly learns in minutes on a CPU."""
    return Path(str(resources.files("lorax") / "assets" / "demo_data.jsonl"))
