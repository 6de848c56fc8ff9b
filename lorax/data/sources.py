"""Readers that turn files and in-memory datasets into a stream of ``Record``s.

Every record carries its *origin* ("train.jsonl:12", "train.parquet: row 7") so that an error
found anywhere later in the pipeline (a missing field, a wrong type, a template that fails)
can name the exact place in the user's data. Errors are ``DataError``, a ``ValueError``.

Supported sources:

* JSON Lines: ``.jsonl``, ``.ndjson``; ``.json`` holding either JSON Lines or one top-level
  array of objects.
* Parquet (``.parquet``, ``.pq``) and Arrow IPC (``.arrow``, ``.feather``, ``.ipc``; both the
  file and the stream format, the latter being what ``datasets`` caches), read with pyarrow.
* CSV (``.csv``) and TSV (``.tsv``) with a header row, read with the standard library.
* A directory (every supported file in it, sorted by name), a glob pattern, or a list of any
  of these.
* A ``datasets.Dataset`` or ``IterableDataset``, a ``pyarrow.Table`` or a
  ``pandas.DataFrame`` (recognised without importing those packages), or a sequence of dicts.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

JSONL_EXTENSIONS = (".jsonl", ".ndjson", ".json")
PARQUET_EXTENSIONS = (".parquet", ".pq")
ARROW_EXTENSIONS = (".arrow", ".feather", ".ipc")
CSV_EXTENSIONS = (".csv", ".tsv")
SUPPORTED_EXTENSIONS = JSONL_EXTENSIONS + PARQUET_EXTENSIONS + ARROW_EXTENSIONS + CSV_EXTENSIONS

# Rows are pulled out of Arrow in slices of this many so a large Parquet file never becomes
# one big list of Python dicts.
_ARROW_SLICE_ROWS = 4096


class DataError(ValueError):
    """A record or file the pipeline cannot use; the message starts with where it is."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One raw example as read from a source, before any formatting or tokenization."""

    data: Mapping[str, Any]
    origin: str  # "path:line" (1-based) for line-oriented files, "path: row N" otherwise

    def error(self, message: str) -> DataError:
        """An error about this record, prefixed with where it came from."""
        return DataError(f"{self.origin}: {message}")


Source = str | os.PathLike[str] | Sequence[Any] | Any
"""A path, directory, glob pattern, ``datasets.Dataset``, list of dicts, or list of those."""


def iter_records(source: Source) -> Iterator[Record]:
    """Yield every record of ``source`` in a deterministic order (see the module docstring)."""
    if isinstance(source, str | os.PathLike):
        for path in _expand_path(source):
            yield from _read_file(path)
    elif _is_hf_dataset(source):
        yield from _read_hf_dataset(source)
    elif _is_instance(source, "pyarrow", "Table"):
        yield from _table_records(source, "<pyarrow Table>")
    elif _is_instance(source, "pandas", "DataFrame"):
        for row, obj in enumerate(source.to_dict("records"), start=1):
            yield Record(obj, f"<pandas DataFrame>: row {row}")
    elif isinstance(source, Mapping):
        raise DataError(
            "a single mapping is not a data source; pass a list of records, a path, or a "
            f"datasets.Dataset (got a mapping with keys {sorted(map(str, source))[:8]})"
        )
    elif isinstance(source, Sequence | Iterable) and not isinstance(source, bytes):
        for i, item in enumerate(source):
            if isinstance(item, Mapping):
                yield Record(item, f"records[{i}]")
            elif isinstance(item, str | os.PathLike) or _is_hf_dataset(item):
                yield from iter_records(item)
            else:
                raise DataError(
                    f"records[{i}]: expected a dict (one record), a path or a dataset, "
                    f"got {type(item).__name__}"
                )
    else:
        raise DataError(f"unsupported data source of type {type(source).__name__}")


def _expand_path(source: str | os.PathLike[str]) -> list[Path]:
    """A path, directory or glob pattern -> the concrete files it names, in sorted order."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUPPORTED_EXTENSIONS)
        if not files:
            raise DataError(f"{path}: directory holds no {'/'.join(SUPPORTED_EXTENSIONS)} files")
        return files
    if path.exists():
        return [path]
    if glob.has_magic(str(source)):
        files = sorted(Path(p) for p in glob.glob(str(source), recursive=True))
        if not files:
            raise DataError(f"{source}: glob pattern matched no files")
        return files
    raise DataError(f"{path}: no such file or directory")


def _read_file(path: Path) -> Iterator[Record]:
    suffix = path.suffix.lower()
    if suffix in JSONL_EXTENSIONS:
        return _read_json(path)
    if suffix in PARQUET_EXTENSIONS:
        return _read_parquet(path)
    if suffix in ARROW_EXTENSIONS:
        return _read_arrow(path)
    if suffix in CSV_EXTENSIONS:
        return _read_csv(path)
    raise DataError(
        f"{path}: unsupported file type {suffix!r}; "
        f"expected one of {', '.join(SUPPORTED_EXTENSIONS)}"
    )


def _read_json(path: Path) -> Iterator[Record]:
    """JSON Lines, or (for ``.json`` files whose first character is ``[``) one JSON array."""
    with path.open(encoding="utf-8") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if path.suffix.lower() == ".json" and head.startswith("["):
            yield from _read_json_array(path, f.read())
            return
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (a trailing newline, a separator) are not records
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})"
                ) from e
            if not isinstance(obj, dict):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}"
                )
            yield Record(obj, f"{path}:{lineno}")


def _read_json_array(path: Path, text: str) -> Iterator[Record]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON array of objects")
    for i, obj in enumerate(items, start=1):
        if not isinstance(obj, dict):
            raise DataError(f"{path}: record {i}: expected a JSON object, got {type(obj).__name__}")
        yield Record(obj, f"{path}: record {i}")


def _read_csv(path: Path) -> Iterator[Record]:
    """CSV/TSV with a header. Origins name the line where the record starts (quoted fields
    may span lines); a row with more or fewer fields than the header is an error, not data."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}:1: malformed CSV header ({e})") from e
        start = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(f"{path}:{start}: malformed CSV ({e})") from e
            origin, start = f"{path}:{start}", reader.line_num + 1
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{origin}: expected {len(header)} fields ({', '.join(header)}), got {len(row)}"
                )
            yield Record(dict(zip(header, row, strict=True)), origin)


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"{path}: cannot read as Parquet ({e})") from e
    row = 0
    for batch in parquet.iter_batches(batch_size=_ARROW_SLICE_ROWS):
        for obj in batch.to_pylist():
            row += 1
            yield Record(obj, f"{path}: row {row}")


def _read_arrow(path: Path) -> Iterator[Record]:
    import pyarrow as pa

    table = None
    errors = []
    for opener in (pa.ipc.open_file, pa.ipc.open_stream):
        try:
            with pa.memory_map(str(path)) as source:
                table = opener(source).read_all()
            break
        except pa.ArrowInvalid as e:
            errors.append(str(e))
    if table is None:
        raise DataError(f"{path}: cannot read as Arrow IPC file or stream ({'; '.join(errors)})")
    yield from _table_records(table, str(path))


def _table_records(table: Any, name: str) -> Iterator[Record]:
    row = 0
    for start in range(0, table.num_rows, _ARROW_SLICE_ROWS):
        for obj in table.slice(start, _ARROW_SLICE_ROWS).to_pylist():
            row += 1
            yield Record(obj, f"{name}: row {row}")


def _is_instance(obj: Any, module_name: str, class_name: str) -> bool:
    """``isinstance(obj, module.Class)`` without importing the module (if it is not imported,
    ``obj`` cannot be one of its objects)."""
    kind = getattr(sys.modules.get(module_name), class_name, None)
    return isinstance(kind, type) and isinstance(obj, kind)


def _is_hf_dataset(obj: Any) -> bool:
    return any(
        _is_instance(obj, "datasets", name)
        for name in ("Dataset", "IterableDataset", "DatasetDict", "IterableDatasetDict")
    )


def _read_hf_dataset(dataset: Any) -> Iterator[Record]:
    if isinstance(dataset, Mapping):  # DatasetDict: which split is ambiguous
        raise DataError(
            f"got a DatasetDict with splits {sorted(dataset)}; pass one split, "
            f"e.g. dataset[{next(iter(dataset), 'train')!r}]"
        )
    name = f"<datasets {type(dataset).__name__}>"
    for row, obj in enumerate(dataset, start=1):
        yield Record(obj, f"{name}: row {row}")
