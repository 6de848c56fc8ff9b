"""The data pipeline: files or datasets -> token ids with loss masks -> fixed-shape batches.

``build_dataset`` is the entry point::

    loader = lorax.data.build_dataset("train.jsonl", tokenizer, max_length=2048, batch_size=8)
    for batch in loader:          # one epoch: dicts of int32 [8, 2048] numpy arrays
        ...                       # input_ids, labels, segment_ids, positions
    state = loader.state_dict()   # {"epoch": 1, "index": 0, ...}: save with the checkpoint

The stages are usable on their own: ``iter_records`` (sources.py) reads files and datasets,
``Encoder`` (formats.py) renders and tokenizes one record with its loss mask,
``tokenize_records`` (tokenized.py) builds the flat ``TokenizedData``, and ``DataLoader``
(packing.py) packs or buckets it into batches.
"""

from lorax.data.formats import (
    BUILTIN_CHAT_TEMPLATES,
    IGNORE_INDEX,
    SIMPLE_CHAT_TEMPLATE,
    Encoder,
    Example,
    Format,
    detect_format,
    to_messages,
)
from lorax.data.packing import (
    BATCH_KEYS,
    Batch,
    DataLoader,
    bucket_lengths,
    first_fit_decreasing,
)
from lorax.data.pipeline import build_dataset, default_pad_id, demo_data_path
from lorax.data.sources import DataError, Record, Source, iter_records
from lorax.data.tokenized import TokenizedData, TokenizeStats, tokenize_records

__all__ = [
    "BATCH_KEYS",
    "BUILTIN_CHAT_TEMPLATES",
    "IGNORE_INDEX",
    "SIMPLE_CHAT_TEMPLATE",
    "Batch",
    "DataError",
    "DataLoader",
    "Encoder",
    "Example",
    "Format",
    "Record",
    "Source",
    "TokenizeStats",
    "TokenizedData",
    "bucket_lengths",
    "build_dataset",
    "default_pad_id",
    "demo_data_path",
    "detect_format",
    "first_fit_decreasing",
    "iter_records",
    "to_messages",
    "tokenize_records",
]
