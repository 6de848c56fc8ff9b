"""Record -> ``Example`` (token ids + labels): format detection, chat templates, loss masks.

Four record formats are understood, detected per record from its keys (first match wins) or
forced with ``format=``:

==============  ===============================================================  ==========
format          fields                                                           rendered by
==============  ===============================================================  ==========
``chat``        ``messages``: ``[{"role": ..., "content": ...}, ...]``           template
``sharegpt``    ``conversations``: ``[{"from": ..., "value": ...}, ...]``        template
``instruction`` ``instruction``, optional ``input``, ``output``, opt. ``system``  template
``text``        ``text``                                                         tokenizer
==============  ===============================================================  ==========

ShareGPT speakers map ``human``->``user``, ``gpt``->``assistant``, ``system``->``system``
(case-insensitive; ``user``/``assistant`` are accepted as themselves). An
instruction record becomes ``[system?, user: instruction + "\\n\\n" + input, assistant:
output]``. Every conversation is rendered with the tokenizer's own chat template, so training
sees exactly the text the model will see at inference; a tokenizer without a template is an
error unless the caller opts into ``chat_template="simple"`` (``SIMPLE_CHAT_TEMPLATE``).

Train-on-responses-only masking works for any template that is *prefix-consistent*: rendering
``messages[:i]`` with a generation prompt is a prefix of rendering ``messages[:i+1]``, which
is a prefix of the whole conversation. Then assistant turn ``i`` is exactly the text between
those two renderings -- its content plus whatever end-of-turn marker the template closes it
with (``<|eot_id|>``, ``<|im_end|>``, ``</s>`` ...). No per-template marker strings are needed.
The property is checked on every record; a template that violates it (e.g. one that drops
reasoning from earlier turns) is reported instead of producing a silently wrong mask.
Whitespace the template emits after the end-of-turn marker (ChatML's ``"\\n"``) is template
glue the model never generates, and is not trained on.

Labels are *not* shifted: ``labels[t]`` is the target for the logits at ``t - 1``, and the
loss does the shift. ``labels[0]`` is always ``IGNORE_INDEX``: the first token of an example
has no context inside the example, and when examples are packed into one row it would
otherwise be "predicted" from the previous, unrelated example.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from lorax.data.sources import Record

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label value the loss skips (the PyTorch/HF convention, so datasets interoperate)."""

Format = Literal["auto", "text", "instruction", "chat", "sharegpt"]
FORMATS: tuple[str, ...] = ("chat", "sharegpt", "instruction", "text")  # auto-detect order
_FORMAT_KEYS = {
    "chat": "messages",
    "sharegpt": "conversations",
    "instruction": "instruction",
    "text": "text",
}

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}

SIMPLE_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}{{ eos_token }}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
"""Opt-in fallback for tokenizers without a chat template (``chat_template="simple"``).

Zephyr-style: each turn is ``<|role|>\\n{content}{eos_token}\\n``, and the generation prompt
is ``<|assistant|>\\n``. The role markers are plain text for any tokenizer, and every turn
ends with the tokenizer's own EOS, so a model trained on it stops generating by itself.
"""

BUILTIN_CHAT_TEMPLATES = {"simple": SIMPLE_CHAT_TEMPLATE}


class Example(NamedTuple):
    """One tokenized example, before truncation or packing."""

    input_ids: np.ndarray  # int32 [n]
    labels: np.ndarray  # int32 [n]: token id where the loss applies, IGNORE_INDEX elsewhere


def detect_format(data: Mapping[str, Any]) -> str | None:
    """The format of a raw record by its keys (see the module table), or None."""
    for fmt in FORMATS:
        if _FORMAT_KEYS[fmt] in data:
            return fmt
    return None


def to_messages(record: Record, fmt: str) -> list[dict[str, Any]]:
    """A chat, ShareGPT or instruction record as a validated list of chat messages."""
    data = record.data
    if fmt == "chat":
        return _chat_messages(record, _field(record, "messages", list))
    if fmt == "sharegpt":
        turns = _field(record, "conversations", list)
        messages = []
        for i, turn in enumerate(turns, start=1):
            if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
                raise record.error(f"conversation turn {i}: expected {{'from': str, 'value': str}}")
            speaker = turn.get("from")
            role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
            if role is None:
                raise record.error(
                    f"conversation turn {i}: unknown speaker {speaker!r}; "
                    f"expected one of {sorted(SHAREGPT_ROLES)}"
                )
            messages.append({"role": role, "content": turn["value"]})
        return _chat_messages(record, messages)
    if fmt == "instruction":
        instruction = _field(record, "instruction", str)
        output = _field(record, "output", str)
        extra = data.get("input")
        if extra is not None and not isinstance(extra, str):
            raise record.error(f"expected 'input' to be a string, got {type(extra).__name__}")
        system = data.get("system")
        if system is not None and not isinstance(system, str):
            raise record.error(f"expected 'system' to be a string, got {type(system).__name__}")
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "system", "content": system}] if system else []
        return messages + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": output},
        ]
    raise ValueError(f"format {fmt!r} has no messages")


_TYPE_NAMES = {str: "a string", list: "a list"}


def _field(record: Record, key: str, kind: type) -> Any:
    """``record.data[key]``, checked to be of ``kind``. Lists may arrive JSON-encoded (CSV
    cells, string columns of Parquet files) and are decoded."""
    if key not in record.data:
        raise record.error(
            f"missing field {key!r} ({_TYPE_NAMES[kind]}); record has fields "
            f"{sorted(map(str, record.data))}"
        )
    value = record.data[key]
    if kind is list and isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise record.error(f"field {key!r} holds invalid JSON ({e.msg})") from e
    if kind is list and isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, kind):
        raise record.error(
            f"expected {key!r} to be {_TYPE_NAMES[kind]}, got {type(value).__name__}"
        )
    return value


def _chat_messages(record: Record, messages: list[Any]) -> list[dict[str, Any]]:
    if not messages:
        raise record.error("conversation has no messages")
    out = []
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, Mapping):
            raise record.error(f"message {i}: expected an object, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                got = type(message[key]).__name__ if key in message else "nothing"
                raise record.error(f"message {i}: expected {key!r} to be a string, got {got}")
        out.append(dict(message))
    return out


class Encoder:
    """Turns ``Record``s into ``Example``s with one tokenizer and one set of options.

    Args:
      tokenizer: a Hugging Face tokenizer. Conversations use its chat template; masking uses
        its character offsets (fast tokenizers), or, without offsets, re-tokenized prefixes.
      format: ``"auto"`` (detect per record) or one of ``"chat"``, ``"sharegpt"``,
        ``"instruction"``, ``"text"`` for every record.
      train_on_responses_only: for conversations, compute the loss on assistant turns only
        (content + end-of-turn marker). ``False`` trains on every token. Text records always
        train on every token.
      chat_template: overrides the tokenizer's template: a Jinja string, or a name in
        ``BUILTIN_CHAT_TEMPLATES`` (``"simple"``).
      add_eos_to_text: append the tokenizer's EOS to text records, so documents have an end.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        format: Format = "auto",
        train_on_responses_only: bool = True,
        chat_template: str | None = None,
        add_eos_to_text: bool = True,
    ) -> None:
        if format != "auto" and format not in FORMATS:
            raise ValueError(f"format must be 'auto' or one of {FORMATS}, got {format!r}")
        self.tokenizer = tokenizer
        self.format = format
        self.train_on_responses_only = train_on_responses_only
        self.chat_template = BUILTIN_CHAT_TEMPLATES.get(chat_template or "", chat_template)
        self.add_eos_to_text = add_eos_to_text

    def __call__(self, record: Record) -> Example:
        fmt = self.format if self.format != "auto" else detect_format(record.data)
        if fmt is None:
            raise record.error(
                "cannot tell the record's format: expected a 'messages' (chat), "
                "'conversations' (ShareGPT), 'instruction' + 'output' (instruction) or 'text' "
                f"field, got fields {sorted(map(str, record.data))}"
            )
        if fmt == "text":
            return self._encode_text(record)
        return self._encode_conversation(record, to_messages(record, fmt))

    # -- text ------------------------------------------------------------------------------

    def _encode_text(self, record: Record) -> Example:
        text = _field(record, "text", str)
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if self.add_eos_to_text and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        input_ids = np.asarray(ids, dtype=np.int32)
        return Example(input_ids, _labels(input_ids, np.ones(len(ids), dtype=bool)))

    # -- conversations ---------------------------------------------------------------------

    def _encode_conversation(self, record: Record, messages: list[dict[str, Any]]) -> Example:
        text = self._render(record, messages, add_generation_prompt=False)
        if not self.train_on_responses_only:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            input_ids = np.asarray(ids, dtype=np.int32)
            return Example(input_ids, _labels(input_ids, np.ones(len(ids), dtype=bool)))
        spans = self._assistant_spans(record, messages, text)
        input_ids, trained = self._tokenize_spans(record, text, spans)
        return Example(input_ids, _labels(input_ids, trained))

    def _render(
        self, record: Record, messages: list[dict[str, Any]], *, add_generation_prompt: bool
    ) -> str:
        if self.chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise record.error(
                "the tokenizer has no chat template, so conversations cannot be rendered; "
                "pass chat_template=<Jinja string>, or chat_template='simple' for lorax's "
                "fallback (see lorax.data.formats.SIMPLE_CHAT_TEMPLATE)"
            )
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                chat_template=self.chat_template,
            )
        except Exception as e:  # Jinja raises its own types, templates raise_exception()
            raise record.error(f"chat template failed: {type(e).__name__}: {e}") from e
        if not isinstance(text, str):
            raise record.error(f"chat template returned {type(text).__name__}, expected str")
        return text

    def _assistant_spans(
        self, record: Record, messages: list[dict[str, Any]], text: str
    ) -> list[tuple[int, int]]:
        """Character spans ``[start, end)`` of every assistant turn in ``text``, found by
        rendering prefixes of the conversation (see the module docstring)."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(record, messages[:i], add_generation_prompt=True)
            turn = self._render(record, messages[: i + 1], add_generation_prompt=False)
            if not turn.startswith(prompt):
                problem = (
                    f"messages[:{i}] + generation prompt is not a prefix of messages[:{i + 1}]"
                )
            elif not text.startswith(turn):
                problem = f"messages[:{i + 1}] is not a prefix of the whole conversation"
            else:
                problem = None
            if problem:
                raise record.error(
                    f"the chat template is not prefix-consistent at message {i + 1} (assistant): "
                    f"rendered, {problem}, so the turn's tokens cannot be located for "
                    "train_on_responses_only. Use a prefix-consistent template or "
                    "train_on_responses_only=False"
                )
            end = len(turn.rstrip())
            if end > len(prompt):
                spans.append((len(prompt), end))
        return spans

    def _tokenize_spans(
        self, record: Record, text: str, spans: Sequence[tuple[int, int]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of ``text`` and a bool mask of the tokens overlapping any span."""
        try:
            encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        except (NotImplementedError, KeyError, ValueError):
            return self._tokenize_spans_by_prefix(record, text, spans)
        input_ids = np.asarray(encoding["input_ids"], dtype=np.int32)
        starts = offsets[:, 0]
        ends = np.maximum(offsets[:, 1], starts + 1)  # zero-width tokens sit at their start
        trained = np.zeros(len(input_ids), dtype=bool)
        for a, b in spans:
            trained |= (starts < b) & (ends > a)
        return input_ids, trained

    def _tokenize_spans_by_prefix(
        self, record: Record, text: str, spans: Sequence[tuple[int, int]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fallback for tokenizers without character offsets: a span starts at the token
        count of the text before it, which requires the tokenization to be prefix-consistent
        at span boundaries -- checked, like the template."""

        def encode(s: str) -> list[int]:
            return list(self.tokenizer(s, add_special_tokens=False)["input_ids"])

        ids = encode(text)
        trained = np.zeros(len(ids), dtype=bool)
        for a, b in spans:
            bounds = []
            for cut in (a, b):
                prefix = encode(text[:cut])
                if ids[: len(prefix)] != prefix:
                    raise record.error(
                        "tokenization is not prefix-consistent at an assistant-turn boundary "
                        f"(character {cut}), so the turn cannot be located without offsets"
                    )
                bounds.append(len(prefix))
            trained[bounds[0] : bounds[1]] = True
        return np.asarray(ids, dtype=np.int32), trained


def _labels(input_ids: np.ndarray, trained: np.ndarray) -> np.ndarray:
    labels = np.where(trained, input_ids, IGNORE_INDEX).astype(np.int32)
    if len(labels):
        labels[0] = IGNORE_INDEX
    return labels
