"""Batches of fixed shapes: packed rows, or length buckets, with a resumable position.

Every batch is a dict of int32 numpy arrays of shape ``[batch_size, seq_len]``:

``input_ids``
    token ids; ``pad_id`` after the last example of a row.
``labels``
    targets, *not* shifted (the loss shifts); ``IGNORE_INDEX`` on padding, on masked prompt
    tokens, and on the first token of every example.
``segment_ids``
    ``1..k`` for the ``k`` examples in a row, ``0`` on padding. Attention must not cross
    segments; ``segment_ids > 0`` is the padding mask.
``positions``
    position of each token within its own example (restarts at 0 per segment; 0 on padding),
    so packed examples see the same RoPE positions as they would alone.

**Packing** (the default) places examples into rows of exactly ``max_length`` tokens with
*first-fit-decreasing*: longest first, each into the first row with room. It fills rows to
within a few percent of optimal, and there is one batch shape, so ``jit`` compiles once. The
rows are planned once; each epoch shuffles their order.

**Bucketing** (``packing=False``) puts one example per row and pads each batch to the smallest
bucket length that fits its longest example. Buckets default to powers of two up to
``max_length``, so ``jit`` compiles at most ``log2(max_length)`` shapes.
``group_by_length=True`` batches examples of similar length together to cut padding further.

**Order and resumption.** Epoch ``e`` is a permutation drawn from ``np.random.default_rng((seed,
e))``, so any epoch is reproducible without replaying earlier ones and a position ``(epoch,
index)`` names one batch exactly. A final partial batch is completed with empty rows (all
padding) so that it has the same shape as the rest, or dropped with ``drop_last=True``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from lorax.data.formats import IGNORE_INDEX
from lorax.data.tokenized import TokenizedData

Batch = dict[str, np.ndarray]
BATCH_KEYS = ("input_ids", "labels", "segment_ids", "positions")

# With group_by_length, examples are sorted by length within windows of this many batches:
# large enough to group similar lengths, small enough that batches still mix the data.
_GROUP_WINDOW_BATCHES = 64


def first_fit_decreasing(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Pack items of the given lengths into bins of ``capacity``; returns item indices per bin.

    Items are placed longest first (ties by index, so the result is deterministic), each into
    the lowest-numbered bin with room. The lowest such bin is found in ``O(log n)`` with a max
    segment tree over the bins' free space, so packing a million examples takes seconds, not
    the hours of the quadratic scan.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"every length must be in [1, {capacity}]")
    n = len(lengths)
    if n == 0:
        return []
    size = 1 << (n - 1).bit_length()  # leaves: one potential bin per item
    free = [0] * size + [capacity] * n + [0] * (size - n)
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    bins: list[list[int]] = []
    for item in np.argsort(-lengths, kind="stable").tolist():
        need = int(lengths[item])
        node = 1
        while node < size:  # descend towards the leftmost leaf with enough room
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        index = node - size
        if index == len(bins):
            bins.append([])
        bins[index].append(item)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def bucket_lengths(max_length: int, min_length: int = 16) -> tuple[int, ...]:
    """Powers of two from ``min_length`` below ``max_length``, then ``max_length`` itself."""
    buckets = []
    length = 1 << max(min_length - 1, 0).bit_length()
    while length < max_length:
        buckets.append(length)
        length *= 2
    return (*buckets, max_length)


class DataLoader:
    """Iterates a ``TokenizedData`` as fixed-shape numpy batches, from a resumable position.

    ``for batch in loader`` yields the rest of the current epoch and leaves the position at
    the start of the next, so ``for epoch in ...: for batch in loader`` trains several epochs;
    ``loader.forever()`` never stops. The position belongs to the loader, not to an iterator:
    it advances as each batch is handed out, ``state_dict()`` saves it, and a loader built on
    the same data and options continues with exactly the same batches after
    ``load_state_dict()``. ``loader.batch(epoch, index)`` reads any batch without moving it.

    Args:
      data: tokenized examples, each at most ``max_length`` tokens.
      batch_size: rows per batch.
      max_length: row length when packing; the largest bucket otherwise.
      pad_id: token id used for padding (its label is always IGNORE_INDEX).
      packing: pack several examples per row (first-fit-decreasing) instead of bucketing.
      shuffle: permute rows every epoch (seeded by ``seed`` and the epoch number).
      seed: shuffling seed.
      buckets: bucket lengths when not packing; default ``bucket_lengths(max_length)``.
      group_by_length: when not packing, batch examples of similar length together.
      drop_last: drop the final partial batch instead of completing it with empty rows.
    """

    def __init__(
        self,
        data: TokenizedData,
        *,
        batch_size: int,
        max_length: int,
        pad_id: int,
        packing: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        buckets: Sequence[int] | None = None,
        group_by_length: bool = False,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        lengths = data.lengths
        if len(lengths) and lengths.max() > max_length:
            raise ValueError(f"an example has {lengths.max()} tokens > max_length={max_length}")
        self.data = data
        self.batch_size = batch_size
        self.max_length = max_length
        self.pad_id = int(pad_id)
        self.packing = packing
        self.shuffle = shuffle
        self.seed = seed
        self.group_by_length = group_by_length and not packing
        self.drop_last = drop_last
        # Row r holds examples _row_items[_row_offsets[r]:_row_offsets[r + 1]], flat for the
        # same reason TokenizedData is: no per-row Python object for a million examples.
        if packing:
            self.buckets: tuple[int, ...] = (max_length,)
            bins = first_fit_decreasing(lengths, max_length)
            self._row_items = np.fromiter((i for b in bins for i in b), np.int64, len(data))
            sizes = np.fromiter(map(len, bins), np.int64, len(bins))
        else:
            self.buckets = tuple(sorted(set(buckets or bucket_lengths(max_length))))
            if self.buckets[-1] < max_length:
                raise ValueError(f"largest bucket {self.buckets[-1]} < max_length={max_length}")
            self._row_items = np.arange(len(data), dtype=np.int64)
            sizes = np.ones(len(data), dtype=np.int64)
        self._row_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._row_lengths = (
            np.add.reduceat(lengths[self._row_items], self._row_offsets[:-1])
            if len(sizes)
            else np.zeros(0, dtype=np.int64)
        )
        full, rest = divmod(self.num_rows, batch_size)
        self._num_batches = full + (1 if rest and not drop_last else 0)
        self._epoch = 0
        self._index = 0
        self._plan_cache: tuple[int, list[np.ndarray]] | None = None

    # -- shape and size --------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches per epoch."""
        return self._num_batches

    @property
    def num_rows(self) -> int:
        """Rows per epoch: packed rows, or examples when not packing."""
        return len(self._row_lengths)

    def row(self, r: int) -> np.ndarray:
        """Indices (into ``data``) of the examples in row ``r``, in order."""
        return self._row_items[self._row_offsets[r] : self._row_offsets[r + 1]]

    @property
    def batch_shapes(self) -> list[tuple[int, int]]:
        """Every ``[batch_size, seq_len]`` a batch can have: the shapes ``jit`` compiles."""
        return [(self.batch_size, length) for length in self.buckets]

    @property
    def stats(self) -> dict[str, Any]:
        """Tokenization counts, plus rows, batches, and ``fill``: the share of the token slots
        of an epoch's batches that hold real tokens (the rest is padding compute)."""
        plan = self._plan(0)
        tokens = sum(int(self._row_lengths[b].sum()) for b in plan)
        slots = sum(self.batch_size * self._seq_len(self._row_lengths[b]) for b in plan)
        return {
            **self.data.stats.as_dict(),
            "rows": self.num_rows,
            "batches_per_epoch": len(self),
            "fill": tokens / slots if slots else 0.0,
        }

    # -- position --------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def index(self) -> int:
        """Batches of the current epoch already handed out."""
        return self._index

    def state_dict(self) -> dict[str, int]:
        """The position as a small JSON-able dict, plus what it is only valid for."""
        return {
            "epoch": self._epoch,
            "index": self._index,
            "seed": self.seed,
            "batches_per_epoch": len(self),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved position. Refuses a position saved for a different seed or
        a different number of batches per epoch: the data or options have changed, so the
        "same" position would name other batches."""
        for key, mine in (("seed", self.seed), ("batches_per_epoch", len(self))):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"data loader state was saved with {key}={state[key]}, this loader has "
                    f"{key}={mine}: the dataset or its options changed"
                )
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= len(self):
            raise ValueError(f"invalid data loader position epoch={epoch}, index={index}")
        self._epoch, self._index = epoch, index
        if index == len(self):
            self._epoch, self._index = epoch + 1, 0

    # -- iteration -------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        epoch = self._epoch
        while self._epoch == epoch and len(self):
            batch = self.batch(self._epoch, self._index)
            self._index += 1
            if self._index == len(self):
                self._epoch, self._index = self._epoch + 1, 0
            yield batch

    def forever(self) -> Iterator[Batch]:
        """Batches across epochs without end, from the current position."""
        if not len(self):
            raise ValueError("the dataset has no batches")
        while True:
            yield from self

    def batch(self, epoch: int, index: int) -> Batch:
        """Batch ``index`` of epoch ``epoch``: a pure function of the position."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range for {len(self)} batches")
        batch_rows = self._plan(epoch)[index]
        seq_len = self._seq_len(self._row_lengths[batch_rows])
        return self._collate([self.row(r) for r in batch_rows.tolist()], seq_len)

    def _plan(self, epoch: int) -> list[np.ndarray]:
        """Row indices of each batch of ``epoch``; computed once per epoch."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = np.random.default_rng((self.seed, epoch))
        n, size = self.num_rows, self.batch_size
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.group_by_length:
            window = size * _GROUP_WINDOW_BATCHES
            for start in range(0, n, window):
                chunk = order[start : start + window]
                order[start : start + window] = chunk[
                    np.argsort(-self._row_lengths[chunk], kind="stable")
                ]
        batches = [order[i : i + size] for i in range(0, n, size)]
        if self.drop_last and batches and len(batches[-1]) < size:
            batches.pop()
        if self.group_by_length and self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._plan_cache = (epoch, batches)
        return batches

    def _seq_len(self, row_lengths: np.ndarray) -> int:
        longest = int(row_lengths.max()) if len(row_lengths) else 0
        return next(b for b in self.buckets if b >= longest)

    def _collate(self, rows: Sequence[np.ndarray], seq_len: int) -> Batch:
        shape = (self.batch_size, seq_len)
        input_ids = np.full(shape, self.pad_id, dtype=np.int32)
        labels = np.full(shape, IGNORE_INDEX, dtype=np.int32)
        segment_ids = np.zeros(shape, dtype=np.int32)
        positions = np.zeros(shape, dtype=np.int32)
        offsets = self.data.offsets
        for r, row in enumerate(rows):
            col = 0
            for segment, example in enumerate(row.tolist(), start=1):
                a, b = int(offsets[example]), int(offsets[example + 1])
                end = col + b - a
                input_ids[r, col:end] = self.data.input_ids[a:b]
                labels[r, col:end] = self.data.labels[a:b]
                segment_ids[r, col:end] = segment
                positions[r, col:end] = np.arange(b - a, dtype=np.int32)
                col = end
        return {
            "input_ids": input_ids,
            "labels": labels,
            "segment_ids": segment_ids,
            "positions": positions,
        }
