"""Tests for lorax.data: readers, record formats, response-only masks, packing, resumption.

The tokenizers are real byte-level BPE tokenizers trained here in a few milliseconds, wrapped
in ``transformers.PreTrainedTokenizerFast`` and given the real Llama-3 and ChatML (Qwen2 /
SmolLM2) chat templates, so masks are checked against what those templates actually render.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lorax.data import (
    BATCH_KEYS,
    IGNORE_INDEX,
    DataError,
    DataLoader,
    Encoder,
    Record,
    TokenizedData,
    bucket_lengths,
    build_dataset,
    demo_data_path,
    detect_format,
    first_fit_decreasing,
    iter_records,
    tokenize_records,
)

# Meta-Llama-3-Instruct's template, verbatim.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# Qwen2-Instruct's ChatML template (SmolLM2 differs only in the default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_EOT = "<|eot_id|>"
CHATML_EOT = "<|im_end|>"
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
]

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5"},
    {"role": "user", "content": "And the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris.\nAnything else?"},
]


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_json() -> str:
    """A tiny byte-level BPE tokenizer trained on the demo data, serialized."""
    texts = []
    for line in demo_data_path().read_text().splitlines():
        texts.extend(m["content"] for m in json.loads(line)["messages"])
    texts += ["user assistant system Paris Anything else?"] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


@pytest.fixture(scope="module")
def llama3_tokenizer(bpe_json: str) -> PreTrainedTokenizerFast:
    """Llama-3 style: BOS added to plain text by the post-processor, EOS = <|eot_id|>."""
    tok = Tokenizer.from_str(bpe_json)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=LLAMA3_EOT)
    hf.chat_template = LLAMA3_TEMPLATE
    return hf


@pytest.fixture(scope="module")
def chatml_tokenizer(bpe_json: str) -> PreTrainedTokenizerFast:
    """Qwen2 style: no BOS, EOS = <|im_end|>, pad = <|endoftext|>."""
    hf = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(bpe_json),
        eos_token=CHATML_EOT,
        pad_token="<|endoftext|>",
    )
    hf.chat_template = CHATML_TEMPLATE
    return hf


@pytest.fixture(scope="module")
def plain_tokenizer(bpe_json: str) -> PreTrainedTokenizerFast:
    """No chat template at all (a base model's tokenizer)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(bpe_json), eos_token="<|end_of_text|>"
    )


@pytest.fixture(params=["llama3", "chatml"])
def templated(request: pytest.FixtureRequest) -> tuple[PreTrainedTokenizerFast, str]:
    """Each real template with its end-of-turn marker."""
    tokenizer = request.getfixturevalue(f"{request.param}_tokenizer")
    return tokenizer, LLAMA3_EOT if request.param == "llama3" else CHATML_EOT


# -- helpers ---------------------------------------------------------------------------------


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def encode(tokenizer: PreTrainedTokenizerFast, data: dict[str, Any], **kwargs: Any):
    return Encoder(tokenizer, **kwargs)(Record(data, "test:1"))


def trained_runs(tokenizer: PreTrainedTokenizerFast, labels: np.ndarray) -> list[str]:
    """Decoded text of each maximal run of positions that carry a label."""
    runs, current = [], []
    for label in [*labels.tolist(), IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def segments(batch: dict[str, np.ndarray]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input_ids, labels) of every segment of a batch, row by row."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in range(1, int(seg.max(initial=0)) + 1):
            where = seg == s
            out.append(
                (tuple(batch["input_ids"][r, where].tolist()), tuple(batch["labels"][r, where]))
            )
    return out


def naive_ffd(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing by linear scan: the reference for the segment-tree version."""
    bins: list[list[int]] = []
    free: list[int] = []
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, room in enumerate(free):
            if room >= lengths[item]:
                bins[b].append(item)
                free[b] -= lengths[item]
                break
        else:
            bins.append([item])
            free.append(capacity - lengths[item])
    return bins


# -- sources ---------------------------------------------------------------------------------


def test_jsonl_reader_names_lines_and_skips_blank_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, "", {"text": "two"}])
    records = list(iter_records(path))
    assert [r.data for r in records] == [{"text": "one"}, {"text": "two"}]
    assert [r.origin for r in records] == [f"{path}:1", f"{path}:3"]


def test_jsonl_bad_line_is_named(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"text": "b"}, '{"text": "c"'])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        list(iter_records(path))
    path = write_jsonl(tmp_path / "list.jsonl", [{"text": "a"}, ["not", "an", "object"]])
    with pytest.raises(ValueError, match=r"list\.jsonl:2: expected a JSON object"):
        list(iter_records(path))


def test_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    assert [r.origin for r in iter_records(path)] == [f"{path}: record 1", f"{path}: record 2"]


def test_parquet_and_arrow_readers_keep_nested_messages(tmp_path: Path) -> None:
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}]
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "d.parquet")
    with (
        pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink,
        pa.ipc.new_file(sink, table.schema) as w,
    ):
        w.write_table(table)
    with (
        pa.OSFile(str(tmp_path / "s.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as w,
    ):
        w.write_table(table)  # the stream format is what `datasets` caches
    for name in ("d.parquet", "d.arrow", "s.arrow"):
        records = list(iter_records(tmp_path / name))
        assert [r.data for r in records] == rows
        assert records[1].origin == f"{tmp_path / name}: row 2"
    assert [r.data for r in iter_records(table)] == rows  # an in-memory table too


def test_parquet_wrong_type_names_row(tmp_path: Path, chatml_tokenizer) -> None:
    pq.write_table(pa.Table.from_pylist([{"text": "fine"}, {"text": None}]), tmp_path / "t.pq")
    with pytest.raises(DataError, match=r"t\.pq: row 2: expected 'text' to be a string"):
        build_dataset(tmp_path / "t.pq", chatml_tokenizer, max_length=32, batch_size=1)


def test_csv_reader_multiline_fields_json_cells_and_bad_rows(tmp_path: Path, chatml_tokenizer):
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["instruction", "output"])
        writer.writerow(["Say hi\non two lines", "hi"])  # quoted field spans lines 2-3
        writer.writerow(["Say bye", "bye"])
    records = list(iter_records(path))
    assert [r.origin for r in records] == [f"{path}:2", f"{path}:4"]
    assert records[0].data == {"instruction": "Say hi\non two lines", "output": "hi"}

    chat = tmp_path / "chat.csv"
    with chat.open("w", newline="") as f:
        csv.writer(f).writerows([["messages"], [json.dumps(CONVERSATION)]])
    loader = build_dataset(chat, chatml_tokenizer, max_length=128, batch_size=1)
    assert loader.stats["examples"] == 1

    bad = tmp_path / "bad.csv"
    bad.write_text("instruction,output\na,b\nc,d,e\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: expected 2 fields"):
        list(iter_records(bad))


def test_directory_glob_and_lists(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    (tmp_path / "notes.txt").write_text("ignored")
    texts = lambda src: [r.data["text"] for r in iter_records(src)]
    assert texts(tmp_path) == ["a", "b"]
    assert texts(str(tmp_path / "*.jsonl")) == ["a", "b"]
    assert texts([tmp_path / "b.jsonl", {"text": "c"}]) == ["b", "c"]
    with pytest.raises(DataError, match="no such file"):
        list(iter_records(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="unsupported file type"):
        list(iter_records(tmp_path / "notes.txt"))


def test_hf_datasets_source() -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}])
    records = list(iter_records(ds))
    assert [r.data["text"] for r in records] == ["a", "b"]
    assert records[1].origin.endswith("row 2")


def test_malformed_records_name_file_and_line(tmp_path: Path, chatml_tokenizer) -> None:
    def build(lines: list[Any]) -> None:
        path = write_jsonl(tmp_path / "d.jsonl", lines)
        build_dataset(path, chatml_tokenizer, max_length=64, batch_size=1)

    good = {"instruction": "Say hi", "output": "hi"}
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'output'"):
        build([good, {"instruction": "Say hi"}])
    bad_content = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}
    with pytest.raises(DataError, match=r"d\.jsonl:3: message 2: expected 'content' to be"):
        build([good, good, bad_content])
    with pytest.raises(DataError, match=r"d\.jsonl:1: expected 'messages' to be a list"):
        build([{"messages": 5}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: conversation turn 2: unknown speaker"):
        build([{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: cannot tell the record's format"):
        build([good, {"prompt": "x", "completion": "y"}])


# -- formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"text": "x"}, "text"),
        ({"instruction": "x", "output": "y"}, "instruction"),
        ({"messages": []}, "chat"),
        ({"conversations": [], "text": "x"}, "sharegpt"),
        ({"prompt": "x"}, None),
    ],
)
def test_detect_format(record: dict[str, Any], fmt: str | None) -> None:
    assert detect_format(record) == fmt


def test_text_format_trains_on_everything_but_the_first_token(llama3_tokenizer) -> None:
    ids, labels = encode(llama3_tokenizer, {"text": "the capital of France is Paris"})
    assert ids.dtype == np.int32 and labels.dtype == np.int32
    assert ids[0] == llama3_tokenizer.bos_token_id and ids[-1] == llama3_tokenizer.eos_token_id
    assert labels[0] == IGNORE_INDEX and (labels[1:] == ids[1:]).all()
    assert llama3_tokenizer.decode(ids[1:-1]) == "the capital of France is Paris"


def test_instruction_format_renders_with_the_chat_template(templated) -> None:
    tokenizer, eot = templated
    record = {"system": "Be brief.", "instruction": "Add.", "input": "2 + 3", "output": "5"}
    ids, labels = encode(tokenizer, record)
    expected = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Add.\n\n2 + 3"},
            {"role": "assistant", "content": "5"},
        ],
        tokenize=False,
    )
    assert tokenizer.decode(ids) == expected
    assert trained_runs(tokenizer, labels) == [f"5{eot}"]


def test_sharegpt_matches_chat(templated) -> None:
    tokenizer, _ = templated
    speakers = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"from": speakers[m["role"]], "value": m["content"]} for m in CONVERSATION]
    a = encode(tokenizer, {"conversations": sharegpt})
    b = encode(tokenizer, {"messages": CONVERSATION})
    assert (a.input_ids == b.input_ids).all() and (a.labels == b.labels).all()


def test_response_only_mask_is_exactly_assistant_content_and_end_of_turn(templated) -> None:
    tokenizer, eot = templated
    ids, labels = encode(tokenizer, {"messages": CONVERSATION})
    assistant = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert trained_runs(tokenizer, labels) == [content + eot for content in assistant]
    trained = labels != IGNORE_INDEX
    assert (labels[trained] == ids[trained]).all()
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)


def test_response_mask_follows_what_the_template_renders(llama3_tokenizer) -> None:
    # Llama-3's template trims message content; the mask covers what was rendered.
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Paris \n"}]
    _, labels = encode(llama3_tokenizer, {"messages": messages})
    assert trained_runs(llama3_tokenizer, labels) == [f"Paris{LLAMA3_EOT}"]


def test_train_on_all_tokens_of_a_conversation(templated) -> None:
    tokenizer, _ = templated
    ids, labels = encode(tokenizer, {"messages": CONVERSATION}, train_on_responses_only=False)
    assert labels[0] == IGNORE_INDEX and (labels[1:] == ids[1:]).all()


def test_format_override(chatml_tokenizer) -> None:
    record = {"messages": CONVERSATION, "text": "plain"}
    ids, _ = encode(chatml_tokenizer, record, format="text")
    assert chatml_tokenizer.decode(ids) == f"plain{CHATML_EOT}"
    with pytest.raises(DataError, match=r"test:1: missing field 'instruction'"):
        encode(chatml_tokenizer, record, format="instruction")
    with pytest.raises(ValueError, match="format must be"):
        Encoder(chatml_tokenizer, format="alpaca")  # type: ignore[arg-type]


def test_missing_chat_template_is_an_error_unless_the_fallback_is_chosen(plain_tokenizer):
    with pytest.raises(DataError, match="has no chat template.*chat_template='simple'"):
        encode(plain_tokenizer, {"messages": CONVERSATION})
    ids, labels = encode(plain_tokenizer, {"messages": CONVERSATION}, chat_template="simple")
    eos = plain_tokenizer.eos_token
    assistant = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert trained_runs(plain_tokenizer, labels) == [c + eos for c in assistant]
    assert plain_tokenizer.decode(ids).startswith(f"<|system|>\nYou answer briefly.{eos}\n")


def test_template_that_is_not_prefix_consistent_is_reported(chatml_tokenizer) -> None:
    # Renders the number of messages first, so no rendering of a prefix is a prefix.
    template = "{{ messages | length }}{% for m in messages %}|{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError, match="test:1: the chat template is not prefix-consistent"):
        encode(chatml_tokenizer, {"messages": CONVERSATION}, chat_template=template)
    ids, _ = encode(
        chatml_tokenizer,
        {"messages": CONVERSATION},
        chat_template=template,
        train_on_responses_only=False,
    )
    assert chatml_tokenizer.decode(ids).startswith("5|You answer briefly.")


def test_mask_without_offsets_matches_mask_with_offsets(templated) -> None:
    tokenizer, _ = templated
    encoder = Encoder(tokenizer)
    record = Record({"messages": CONVERSATION}, "test:1")
    text = encoder._render(record, CONVERSATION, add_generation_prompt=False)
    spans = encoder._assistant_spans(record, CONVERSATION, text)
    with_offsets = encoder._tokenize_spans(record, text, spans)
    by_prefix = encoder._tokenize_spans_by_prefix(record, text, spans)
    for a, b in zip(with_offsets, by_prefix, strict=True):
        assert (a == b).all()


def test_truncation_and_dropping_are_counted(chatml_tokenizer) -> None:
    records = [
        Record({"messages": CONVERSATION}, "r:1"),
        Record({"text": "short"}, "r:2"),
        Record({"messages": [{"role": "user", "content": "no answer"}]}, "r:3"),
    ]
    with pytest.warns(UserWarning) as caught:
        data = tokenize_records(records, Encoder(chatml_tokenizer), max_length=40)
    messages = " ".join(str(w.message) for w in caught)
    assert "1 of 3 records (33.3%) were longer than max_length=40" in messages
    assert "1 of 3 records (33.3%) had no token to train on" in messages
    assert (data.stats.records, data.stats.examples) == (3, 2)
    assert (data.stats.truncated, data.stats.dropped) == (1, 1)
    assert data.lengths.max() == 40 and data.stats.tokens == data.lengths.sum()


# -- packing and batching --------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_data(chatml_tokenizer) -> TokenizedData:
    return tokenize_records(
        iter_records(demo_data_path()), Encoder(chatml_tokenizer), max_length=96
    )


def make_loader(data: TokenizedData, **kwargs: Any) -> DataLoader:
    options: dict[str, Any] = {"batch_size": 4, "max_length": 96, "pad_id": 0} | kwargs
    return DataLoader(data, **options)


def epoch(loader: DataLoader) -> list[dict[str, np.ndarray]]:
    return list(loader)


def test_demo_dataset_is_sized_for_a_tiny_model(demo_data: TokenizedData) -> None:
    assert 200 <= demo_data.stats.records <= 400
    assert demo_data.stats.truncated == demo_data.stats.dropped == 0
    assert demo_data.stats.examples == demo_data.stats.records


def test_first_fit_decreasing_matches_the_linear_scan_reference() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, size=500).tolist()
    bins = first_fit_decreasing(lengths, 64)
    assert bins == naive_ffd(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert max(sum(lengths[i] for i in b) for b in bins) <= 64
    assert len(bins) <= 11 / 9 * np.ceil(sum(lengths) / 64) + 1  # FFD's worst-case bound
    assert first_fit_decreasing([], 8) == []
    with pytest.raises(ValueError):
        first_fit_decreasing([9], 8)


def test_packed_batches_hold_every_example_once(demo_data: TokenizedData) -> None:
    loader = make_loader(demo_data, pad_id=7)
    batches = epoch(loader)
    assert len(batches) == len(loader) and loader.batch_shapes == [(4, 96)]
    for batch in batches:
        assert set(batch) == set(BATCH_KEYS)
        for value in batch.values():
            assert value.shape == (4, 96) and value.dtype == np.int32
        for r in range(4):
            seg, pos = batch["segment_ids"][r], batch["positions"][r]
            pad = seg == 0
            n = int((~pad).sum())
            assert not pad[:n].any(), "padding only after the last segment"
            assert (batch["input_ids"][r][pad] == 7).all()
            assert (batch["labels"][r][pad] == IGNORE_INDEX).all() and (pos[pad] == 0).all()
            assert (np.diff(seg[:n]) >= 0).all() and set(seg[:n]) == set(range(1, seg.max() + 1))
            for s in range(1, seg.max() + 1):
                assert (pos[seg == s] == np.arange((seg == s).sum())).all()
                assert batch["labels"][r][seg == s][0] == IGNORE_INDEX
    got = sorted(s for b in batches for s in segments(b))
    want = sorted(
        (tuple(e.input_ids.tolist()), tuple(e.labels.tolist()))
        for e in (demo_data[i] for i in range(len(demo_data)))
    )
    assert got == want
    assert loader.stats["rows"] <= 11 / 9 * np.ceil(demo_data.stats.tokens / 96) + 1
    assert loader.stats["fill"] > make_loader(demo_data, packing=False).stats["fill"]


def test_bucketing_pads_each_batch_to_the_smallest_fitting_bucket(demo_data) -> None:
    assert bucket_lengths(96) == (16, 32, 64, 96)
    assert bucket_lengths(64, min_length=8) == (8, 16, 32, 64)
    assert bucket_lengths(10) == (10,)
    for group in (False, True):
        loader = make_loader(demo_data, packing=False, group_by_length=group)
        batches = epoch(loader)
        assert len(batches) == -(-len(demo_data) // 4)
        shapes = {b["input_ids"].shape for b in batches}
        assert shapes <= set(loader.batch_shapes) and len(shapes) > 1
        for b in batches:
            longest = int((b["segment_ids"] > 0).sum(axis=1).max())
            assert b["input_ids"].shape[1] == min(x for x in loader.buckets if x >= longest)
            assert b["segment_ids"].max() == 1
        assert sorted(s for b in batches for s in segments(b)) == sorted(
            (tuple(demo_data[i].input_ids.tolist()), tuple(demo_data[i].labels.tolist()))
            for i in range(len(demo_data))
        )
    grouped = make_loader(demo_data, packing=False, group_by_length=True).stats["fill"]
    assert grouped > make_loader(demo_data, packing=False).stats["fill"]


def test_last_partial_batch_is_completed_or_dropped(demo_data) -> None:
    full, rest = divmod(len(demo_data), 4)
    assert rest, "the test needs a partial batch"
    padded = make_loader(demo_data, packing=False, shuffle=False)
    last = epoch(padded)[-1]
    assert (last["segment_ids"][rest:] == 0).all() and last["segment_ids"][:rest].any(axis=1).all()
    assert len(make_loader(demo_data, packing=False, drop_last=True)) == full


def test_shuffle_is_deterministic_by_seed_and_epoch(demo_data) -> None:
    def ids(loader: DataLoader, e: int) -> list[np.ndarray]:
        return [loader.batch(e, i)["input_ids"] for i in range(len(loader))]

    for packing in (True, False):
        a, b = make_loader(demo_data, packing=packing), make_loader(demo_data, packing=packing)
        other_seed = make_loader(demo_data, packing=packing, seed=1)
        assert all((x == y).all() for x, y in zip(ids(a, 0), ids(b, 0), strict=True))
        assert all((x == y).all() for x, y in zip(ids(a, 3), ids(b, 3), strict=True))
        assert not all((x == y).all() for x, y in zip(ids(a, 0), ids(a, 1), strict=True))
        assert not all((x == y).all() for x, y in zip(ids(a, 0), ids(other_seed, 0), strict=True))
        iterated = [batch["input_ids"] for batch in epoch(a)]
        assert all((x == y).all() for x, y in zip(iterated, ids(b, 0), strict=True))
    unshuffled = make_loader(demo_data, packing=False, shuffle=False).batch(5, 0)
    assert segments(unshuffled)[0][0] == tuple(demo_data[0].input_ids.tolist())


@pytest.mark.parametrize("packing", [True, False])
def test_resuming_from_a_saved_position_yields_the_same_batches(demo_data, packing) -> None:
    loader = make_loader(demo_data, packing=packing, group_by_length=not packing)
    stop = len(loader) + 3  # past an epoch boundary
    stream = loader.forever()
    for _ in range(stop):
        next(stream)
    state = json.loads(json.dumps(loader.state_dict()))
    assert (state["epoch"], state["index"]) == (1, 3)
    expected = [next(stream) for _ in range(len(loader))]  # the rest of epoch 1 and into 2

    resumed = make_loader(demo_data, packing=packing, group_by_length=not packing)
    resumed.load_state_dict(state)
    stream = resumed.forever()
    for want in expected:
        got = next(stream)
        assert all((got[k] == want[k]).all() for k in BATCH_KEYS)

    end_of_epoch = make_loader(demo_data, packing=packing)
    end_of_epoch.load_state_dict({"epoch": 0, "index": len(end_of_epoch)})
    assert (end_of_epoch.epoch, end_of_epoch.index) == (1, 0)
    with pytest.raises(ValueError, match="seed"):
        make_loader(demo_data, packing=packing, seed=5).load_state_dict(state)


def test_epoch_iteration_advances_the_position(demo_data) -> None:
    loader = make_loader(demo_data)
    first = epoch(loader)
    assert (loader.epoch, loader.index) == (1, 0)
    second = epoch(loader)
    assert len(first) == len(second) == len(loader)
    for _ in loader:  # stop part-way: the position stays where the loop left it
        break
    assert (loader.epoch, loader.index) == (2, 1)
    assert (next(iter(loader))["input_ids"] == loader.batch(2, 1)["input_ids"]).all()


def test_build_dataset_end_to_end(llama3_tokenizer, chatml_tokenizer) -> None:
    loader = build_dataset(demo_data_path(), chatml_tokenizer, max_length=128, batch_size=8, seed=3)
    assert loader.pad_id == chatml_tokenizer.pad_token_id and loader.seed == 3
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (8, 128) and set(batch) == set(BATCH_KEYS)
    assert loader.stats["trained_tokens"] < loader.stats["tokens"]  # prompts are masked

    with pytest.warns(UserWarning, match="were truncated"):
        loader = build_dataset(
            demo_data_path(), llama3_tokenizer, max_length=64, batch_size=2, packing=False
        )
    assert loader.pad_id == llama3_tokenizer.eos_token_id  # no pad token: EOS pads
    assert {b["input_ids"].shape for b in loader} <= {(2, n) for n in (16, 32, 64)}
    with pytest.raises(DataError, match="no usable examples"):
        build_dataset([], chatml_tokenizer, max_length=64, batch_size=2)
