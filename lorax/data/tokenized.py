"""A tokenized dataset held as three flat arrays, and the loop that builds it.

Fine-tuning sets are small enough to tokenize once, up front: then packing can see every
length (first-fit-decreasing needs them), the number of steps per epoch is known before
training starts, and an epoch can be replayed from any position. Examples are stored
back-to-back in one int32 array rather than as a list of small arrays, which for a million
examples saves ~100 MB of per-object overhead and makes batching a matter of slicing.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable

import numpy as np

from lorax.data.formats import IGNORE_INDEX, Example
from lorax.data.sources import Record


@dataclasses.dataclass(frozen=True)
class TokenizeStats:
    """What happened while tokenizing; ``build_dataset`` warns about the non-zero problems."""

    records: int = 0  # records read from the source
    examples: int = 0  # examples kept
    truncated: int = 0  # kept, but cut to max_length
    dropped: int = 0  # no token left to train on (e.g. no assistant turn, or truncated away)
    tokens: int = 0  # tokens in kept examples, after truncation
    trained_tokens: int = 0  # of which carry a label

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TokenizedData:
    """Examples stored flat: example ``i`` is ``input_ids[offsets[i]:offsets[i + 1]]``."""

    input_ids: np.ndarray  # int32 [total_tokens]
    labels: np.ndarray  # int32 [total_tokens], IGNORE_INDEX where no loss
    offsets: np.ndarray  # int64 [num_examples + 1], offsets[0] == 0
    stats: TokenizeStats = dataclasses.field(default_factory=TokenizeStats)

    @classmethod
    def from_examples(
        cls, examples: Iterable[Example], stats: TokenizeStats | None = None
    ) -> TokenizedData:
        examples = list(examples)
        lengths = np.fromiter((len(e.input_ids) for e in examples), np.int64, len(examples))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

        def flat(field: int) -> np.ndarray:
            parts = [e[field] for e in examples]
            return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)

        return cls(flat(0), flat(1), offsets, stats or TokenizeStats())

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Example:
        a, b = self.offsets[i], self.offsets[i + 1]
        return Example(self.input_ids[a:b], self.labels[a:b])

    @property
    def lengths(self) -> np.ndarray:
        """int64 [num_examples]: tokens per example."""
        return np.diff(self.offsets)


def tokenize_records(
    records: Iterable[Record],
    encode: Callable[[Record], Example],
    *,
    max_length: int,
    warn: bool = True,
    stacklevel: int = 2,
) -> TokenizedData:
    """Encode every record, truncate to ``max_length`` tokens, drop examples with nothing to
    train on, and count each of those events (one summary warning each, not one per record).

    Truncation keeps the *first* ``max_length`` tokens: for a conversation that is the system
    prompt and the earliest turns, which later turns depend on. ``stacklevel`` is that of
    the warnings, as for ``warnings.warn`` (2: the caller of this function).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    kept: list[Example] = []
    counts = dict.fromkeys(("records", "truncated", "dropped", "tokens", "trained_tokens"), 0)
    for record in records:
        counts["records"] += 1
        example = encode(record)
        if len(example.input_ids) > max_length:
            counts["truncated"] += 1
            example = Example(example.input_ids[:max_length], example.labels[:max_length])
        trained = int(np.count_nonzero(example.labels != IGNORE_INDEX))
        if trained == 0:
            counts["dropped"] += 1
            continue
        counts["tokens"] += len(example.input_ids)
        counts["trained_tokens"] += trained
        kept.append(example)
    stats = TokenizeStats(examples=len(kept), **counts)
    if warn:
        _warn_about(stats, max_length, stacklevel + 1)
    return TokenizedData.from_examples(kept, stats)


def _warn_about(stats: TokenizeStats, max_length: int, stacklevel: int) -> None:
    def share(n: int) -> str:
        return f"{n} of {stats.records} records ({100 * n / max(stats.records, 1):.1f}%)"

    if stats.truncated:
        warnings.warn(
            f"{share(stats.truncated)} were longer than max_length={max_length} tokens and "
            "were truncated",
            stacklevel=stacklevel + 1,
        )
    if stats.dropped:
        warnings.warn(
            f"{share(stats.dropped)} had no token to train on (e.g. no assistant turn, or "
            f"none within max_length={max_length}) and were dropped",
            stacklevel=stacklevel + 1,
        )
