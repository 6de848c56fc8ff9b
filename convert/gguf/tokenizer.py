"""Hugging Face tokenizers ↔ GGUF tokenizer metadata.

A GGUF carries its tokenizer as metadata: the model kind (``gpt2``: byte-level BPE, as in
Llama 3, Qwen2, SmolLM; ``llama``: SentencePiece-style BPE with byte fallback, as in Llama 2
and Mistral), the tokens with their types, the merges (or, for ``llama``, scores that rank
the merges), the special token ids, and the name of the pre-tokenizer, i.e. of the regex
that splits text before BPE. llama.cpp hard-codes one splitting per name, so export must
recognise which one a tokenizer uses (``PRE_TOKENIZERS`` lists the ones we know, as
``tokenizers`` spells them) and import must install the same one.

Import builds the tokenizer directly with the ``tokenizers`` library. transformers can
build one from a GGUF too, but it re-reads the file and takes minutes on a large
vocabulary, and it does not know every llama.cpp pre-tokenizer (SmolLM's, for one).
"""

from __future__ import annotations

import json
import re
import warnings
from typing import Any

from gguf import TokenType

from convert.gguf.format import KV, GGUFError, ValueType, array, boolean, string, u32
from convert.gguf.reader import GGUFFile

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(use_regex: bool) -> dict[str, Any]:
    return {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": use_regex,
    }


def _split_then_bytes(regex: str) -> dict[str, Any]:
    split = {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
    return {"type": "Sequence", "pretokenizers": [split, _byte_level(False)]}


# llama.cpp's pre-tokenizer name -> the same splitting as a ``tokenizers`` pre-tokenizer.
PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "gpt-2": _byte_level(True),
    "llama-bpe": _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": _split_then_bytes(_QWEN2_SPLIT),
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, _byte_level(True)],
    },
}
# Names llama.cpp gives the same splitting (it treats each group identically).
PRE_ALIASES = {
    "llama3": "llama-bpe",
    "llama-v3": "llama-bpe",
    "falcon3": "llama-bpe",
    "pixtral": "llama-bpe",
    "deepseek-r1-qwen": "qwen2",
    "phi-2": "gpt-2",
}
# llama.cpp's BPE skips the merges for a word that is a whole token for these (as HF's
# ``ignore_merges``) and adds BOS by default.
_LLAMA3_LIKE = ("llama-bpe",)
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPM_SPACE = "\u2581"


# ------------------------------------------------------------------------------ export


def tokenizer_metadata(tokenizer: Any, vocab_size: int) -> dict[str, KV]:
    """The ``tokenizer.*`` keys for an HF fast tokenizer, padded to the model's vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFError(
            f"GGUF export needs a fast (tokenizers-backed) tokenizer, got "
            f"{type(tokenizer).__name__}"
        )
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise GGUFError(f"GGUF export supports BPE tokenizers; this one is {model.get('type')}")
    byte_level = bool(
        _find(spec.get("pre_tokenizer"), "ByteLevel") or _find(spec.get("decoder"), "ByteLevel")
    )
    if not byte_level and not model.get("byte_fallback"):
        raise GGUFError(
            "GGUF export supports byte-level BPE and SentencePiece-style BPE with "
            "byte fallback; this tokenizer is neither"
        )

    vocab = backend.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise GGUFError(
            f"the tokenizer has token id {max(vocab.values())}, beyond the model's "
            f"vocab_size {vocab_size}"
        )
    by_id = {i: t for t, i in vocab.items()}
    added = backend.get_added_tokens_decoder()
    unk = model.get("unk_token")
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None or token == _padding_name(i):
            tokens.append(_padding_name(i))
            types.append(TokenType.UNUSED)
        elif token == unk:
            tokens.append(token)
            types.append(TokenType.UNKNOWN)
        elif i in added:
            tokens.append(token)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        elif not byte_level and _BYTE_TOKEN.fullmatch(token):
            tokens.append(token)
            types.append(TokenType.BYTE)
        else:
            tokens.append(token)
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    kv: dict[str, KV] = {
        "tokenizer.ggml.model": string("gpt2" if byte_level else "llama"),
        "tokenizer.ggml.tokens": array(ValueType.STRING, tokens),
        "tokenizer.ggml.token_type": array(ValueType.INT32, [int(t) for t in types]),
    }
    if byte_level:
        kv["tokenizer.ggml.pre"] = string(_pre_name(spec.get("pre_tokenizer")))
        kv["tokenizer.ggml.merges"] = array(ValueType.STRING, merges)
    else:
        kv["tokenizer.ggml.scores"] = array(ValueType.FLOAT32, _merge_scores(tokens, merges))
        kv["tokenizer.ggml.add_space_prefix"] = boolean(_adds_space_prefix(spec))
    for key, token_id in _special_ids(tokenizer).items():
        kv[f"tokenizer.ggml.{key}"] = u32(token_id)
    add_bos, add_eos = _adds_bos_eos(tokenizer)
    kv["tokenizer.ggml.add_bos_token"] = boolean(add_bos)
    kv["tokenizer.ggml.add_eos_token"] = boolean(add_eos)
    kv.update(_chat_templates(getattr(tokenizer, "chat_template", None)))
    return kv


def _padding_name(token_id: int) -> str:
    """llama.cpp's name for an embedding row no token uses (vocabularies padded to a multiple
    of 64 or 128); a tokenizer read back from a GGUF keeps these names."""
    return f"[PAD{token_id}]"


def _find(node: Any, type_name: str) -> dict[str, Any] | None:
    """The first component of type ``type_name`` in a tokenizer.json (sub)spec."""
    if isinstance(node, dict):
        if node.get("type") == type_name:
            return node
        node = list(node.values())
    if isinstance(node, list):
        for child in node:
            if (found := _find(child, type_name)) is not None:
                return found
    return None


def _canonical(node: Any) -> Any:
    """A pre-tokenizer spec without what does not change the split (offsets, 1-item lists)."""
    if isinstance(node, dict):
        if node.get("type") == "Sequence" and len(node.get("pretokenizers", [])) == 1:
            return _canonical(node["pretokenizers"][0])
        return {k: _canonical(v) for k, v in node.items() if k != "trim_offsets"}
    if isinstance(node, list):
        return [_canonical(v) for v in node]
    return node


def _pre_name(pre_tokenizer: Any) -> str:
    wanted = _canonical(pre_tokenizer)
    for name, spec in PRE_TOKENIZERS.items():
        if _canonical(spec) == wanted:
            return name
    warnings.warn(
        "the tokenizer's pre-tokenizer matches none llama.cpp knows under a name lorax "
        f"recognises ({list(PRE_TOKENIZERS)}); writing 'default', with which llama.cpp may "
        "split text differently",
        stacklevel=3,
    )
    return "default"


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece-style scores: llama.cpp merges the highest-scoring pair first, so a
    token made by merge number r scores -r; tokens no merge makes score 0."""
    scores = [0.0] * len(tokens)
    index = {t: i for i, t in enumerate(tokens)}
    for rank, merge in enumerate(merges):
        token_id = index.get(merge.replace(" ", "", 1))
        if token_id is not None and scores[token_id] == 0.0:
            scores[token_id] = -float(rank + 1)
    return scores


def _adds_space_prefix(spec: dict[str, Any]) -> bool:
    """Whether a SentencePiece-style tokenizer prefixes text with "▁" (llama.cpp's flag)."""
    meta = _find(spec.get("pre_tokenizer"), "Metaspace") or _find(
        spec.get("normalizer"), "Metaspace"
    )
    if meta is not None:
        default = "always" if meta.get("add_prefix_space", True) else "never"
        return meta.get("prepend_scheme", default) != "never"
    prepend = _find(spec.get("normalizer"), "Prepend")
    return prepend is not None and prepend.get("prepend") == _SPM_SPACE


def _special_ids(tokenizer: Any) -> dict[str, int]:
    names = {
        "bos_token_id": "bos_token_id",
        "eos_token_id": "eos_token_id",
        "unk_token_id": "unknown_token_id",
        "pad_token_id": "padding_token_id",
    }
    out = {}
    for attr, key in names.items():
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            out[key] = value
    return out


def _adds_bos_eos(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding adds BOS/EOS, read off the tokenizer's behaviour, not its flags."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
    return add_bos, add_eos


def _chat_templates(template: Any) -> dict[str, KV]:
    if not template:
        return {}
    if isinstance(template, str):
        return {"tokenizer.chat_template": string(template)}
    out = {}
    for name, text in dict(template).items():  # named templates (a dict, or a list of pairs)
        key = "tokenizer.chat_template" if name == "default" else f"tokenizer.chat_template.{name}"
        out[key] = string(text)
    return out


# ------------------------------------------------------------------------------ import


def tokenizer_from_gguf(f: GGUFFile) -> Any | None:
    """An HF ``PreTrainedTokenizerFast`` equivalent to the GGUF's tokenizer, or None."""
    kind = f.get("tokenizer.ggml.model")
    if kind is None or kind in ("none", "no_vocab"):
        return None
    if kind not in ("gpt2", "llama"):
        raise GGUFError(
            f"{f.path}: tokenizer model {kind!r} is not supported; lorax reads "
            "'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE)"
        )
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = list(f.require("tokenizer.ggml.tokens"))
    types = f.get("tokenizer.ggml.token_type")
    types = [int(t) for t in types] if types is not None else [TokenType.NORMAL] * len(tokens)
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    special = {
        key: f.get(f"tokenizer.ggml.{key}")
        for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")
    }
    name_of = {
        k: tokens[v] if v is not None and 0 <= v < len(tokens) else None for k, v in special.items()
    }

    if kind == "gpt2":
        pre = str(f.get("tokenizer.ggml.pre", "gpt-2"))
        pre = PRE_ALIASES.get(pre, pre)
        if pre not in PRE_TOKENIZERS:
            warnings.warn(
                f"{f.path}: pre-tokenizer {pre!r} is unknown to lorax; splitting as "
                "GPT-2 does, which may differ from llama.cpp",
                stacklevel=2,
            )
            pre = "gpt-2"
        merges = [tuple(m.split(" ", 1)) for m in f.require("tokenizer.ggml.merges")]
        backend = Tokenizer(
            models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _LLAMA3_LIKE)
        )
        backend = Tokenizer.from_str(_with_pre_tokenizer(backend.to_str(), PRE_TOKENIZERS[pre]))
        backend.decoder = decoders.ByteLevel()
        add_bos_default = pre in _LLAMA3_LIKE
    else:
        space_prefix = bool(f.get("tokenizer.ggml.add_space_prefix", True))
        merges = f.get("tokenizer.ggml.merges")
        merges = (
            [tuple(m.split(" ", 1)) for m in merges]
            if merges is not None
            else _merges_from_scores(tokens, list(f.require("tokenizer.ggml.scores")))
        )
        backend = Tokenizer(
            models.BPE(
                vocab=vocab,
                merges=merges,
                byte_fallback=True,
                unk_token=name_of["unknown_token_id"],
                fuse_unk=True,
            )
        )
        steps = [normalizers.Prepend(_SPM_SPACE)] if space_prefix else []
        backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", _SPM_SPACE)])
        backend.decoder = decoders.Sequence(
            [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
            + ([decoders.Strip(" ", 1, 0)] if space_prefix else [])
        )
        add_bos_default = True

    backend.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=False)
            if k == TokenType.CONTROL
        ]
    )
    backend.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types, strict=False)
            if k == TokenType.USER_DEFINED
        ]
    )
    add_bos = bool(f.get("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(f.get("tokenizer.ggml.add_eos_token", False))
    bos, eos = name_of["bos_token_id"], name_of["eos_token_id"]
    single = [*([bos] if add_bos and bos else []), "$A", *([eos] if add_eos and eos else [])]
    pair = [
        *single,
        *([bos] if add_bos and bos else []),
        "$B:1",
        *([eos] if add_eos and eos else []),
    ]
    backend.post_processor = processors.TemplateProcessing(
        single=single,
        pair=pair,
        special_tokens=[(t, vocab[t]) for t in {bos, eos} if t is not None and t in single],
    )
    templates = {
        k[len("tokenizer.chat_template.") :]: v
        for k, v in ((k, kv.value) for k, kv in f.metadata.items())
        if k.startswith("tokenizer.chat_template.")
    }
    template = f.get("tokenizer.chat_template")
    if templates:
        templates["default"] = template
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=name_of["unknown_token_id"],
        pad_token=name_of["padding_token_id"],
        chat_template=templates or template,
    )


def _with_pre_tokenizer(backend_json: str, pre_tokenizer: dict[str, Any]) -> str:
    spec = json.loads(backend_json)
    spec["pre_tokenizer"] = pre_tokenizer
    return json.dumps(spec)


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece vocabulary implies: every split of a token into two tokens,
    ordered by the merged token's score (best first), then by the parts' ids."""
    index = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score in zip(tokens, scores, strict=True):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in index and right in index:
                found.append((-score, index[left], index[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]
