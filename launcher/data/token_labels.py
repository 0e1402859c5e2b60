"""Word-level tags (token_classification): read sentences, check them, align the tags to sub-tokens.

Two layouts, the conventions of HF datasets and of the CoNLL shared tasks:
  - jsonl: one sentence per line, `{"tokens": [...], "tags": [...]}` (field names from `data.tokens_field`
    and `data.tags_field`), tags as names from `data.labels`;
  - CoNLL column files (`.conll`): one word per line, its tag in the last column (columns split on
    whitespace), blank lines between sentences, `-DOCSTART-` lines skipped.

Checks, each a one-line `UserError` naming the file and line: a sentence whose words and tags differ
in number, a tag outside `data.labels`, and, when the tag set is IOB2 (every tag `O`, `B-X` or `I-X`),
an `I-X` that follows `O` or another type (reported, never silently turned into `B-X`).

Alignment (HF `run_ner.py`): a word's tag goes on its first sub-token, the rest get -100 (ignored by
the loss and the metrics); with `label_all_subtokens` every sub-token carries it (B-X continued as I-X).
Byte-level BPE vocabularies (gpt2, llama) see every word but the first with its leading space, as the
words stood in the running text.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from launcher.data.corpus import Chunk, Fields, _decode, _line_number, _lines, _where
from launcher.errors import UserError

IGNORE_INDEX = -100  # the label torch's cross-entropy skips
DOCSTART = "-DOCSTART-"

Sentence = tuple[list[str], list[int]]  # words, tag ids


def is_iob2(labels: Sequence[str]) -> bool:
    """Whether the tag set is IOB2: every tag `O`, `B-X` or `I-X` (and so worth the IOB2 check)."""
    return bool(labels) and all(tag == "O" or (tag[:2] in ("B-", "I-") and len(tag) > 2) for tag in labels)


def continuation_ids(labels: Sequence[str]) -> list[int]:
    """For each tag id, the tag a later sub-token of the same word gets with `label_all_subtokens`:
    I-X for B-X (when I-X is in the set), the tag itself otherwise."""
    index = {tag: i for i, tag in enumerate(labels)}
    return [index.get(f"I-{tag[2:]}", i) if tag.startswith("B-") else i for i, tag in enumerate(labels)]


def check_tags(tags: Sequence[str], fields: Fields, where: Callable[[int], str]) -> list[int]:
    """Tag ids of one sentence; `where(i)` names the place of word i, computed only for an error."""
    index = {tag: i for i, tag in enumerate(fields.labels)}
    ids = []
    iob2 = is_iob2(fields.labels)
    for i, tag in enumerate(tags):
        name = "" if tag is None else str(tag)
        if name not in index:
            raise UserError(f"{where(i)}: tag {name!r} is not in data.labels {list(fields.labels)}")
        if iob2 and name.startswith("I-"):
            before = str(tags[i - 1]) if i > 0 else "O"
            if before == "O" or before[2:] != name[2:]:
                what = "the sentence start" if i == 0 else repr(before)
                raise UserError(
                    f"{where(i)}: tag {name!r} follows {what}; IOB2 starts an entity with B-{name[2:]} "
                    "(convert IOB1 data to IOB2 first)"
                )
        ids.append(index[name])
    return ids


def iter_sentences(chunk: Chunk, fields: Fields) -> Iterator[tuple[str, Sentence]]:
    """(text, (words, tag ids)) of every non-empty sentence in the chunk, in order; text is the words
    joined by spaces (what the eval split's hash and the vocabulary see)."""
    sentences = _conll_sentences(chunk, fields) if chunk.fmt == "conll" else _json_sentences(chunk, fields)
    for words, tags in sentences:
        yield " ".join(words), (words, tags)


def _json_sentences(chunk: Chunk, fields: Fields) -> Iterator[Sentence]:
    if chunk.fmt != "json":
        raise UserError(
            f"{chunk.path}: token_classification reads jsonl (data.tokens_field, data.tags_field) or CoNLL "
            "column files (.conll)"
        )
    path = Path(chunk.path)
    assert fields.tokens is not None and fields.tags is not None
    for offset, number, raw in _lines(chunk, fields.max_document_bytes):
        if not raw.strip():
            continue

        def where(offset: int = offset, number: int | None = number) -> str:
            return _where(path, number or _line_number(path, offset), offset)

        try:
            record = json.loads(_decode(path, raw, offset, number))
        except ValueError as exc:
            raise UserError(f"{where()}: not a JSON object ({exc.args[0][:100]})") from None
        if not isinstance(record, dict):
            raise UserError(f"{where()}: not a JSON object")
        values: list[list[Any]] = []
        for name, setting in ((fields.tokens, "data.tokens_field"), (fields.tags, "data.tags_field")):
            if name not in record:
                raise UserError(f"{where()}: no field {name!r} ({setting})")
            if not isinstance(record[name], list):
                raise UserError(f"{where()}: field {name!r} ({setting}) is not a list")
            values.append(record[name])
        words, tags = values
        if len(words) != len(tags):
            raise UserError(
                f"{where()}: field {fields.tokens!r} has {len(words)} words but field {fields.tags!r} has "
                f"{len(tags)} tags (data.tokens_field, data.tags_field: one tag per word)"
            )
        if not words:
            continue
        ids = check_tags(tags, fields, lambda i, where=where: f"{where()}: word {i + 1}")
        yield [str(word) for word in words], ids


def _conll_sentences(chunk: Chunk, fields: Fields) -> Iterator[Sentence]:
    path = Path(chunk.path)
    words: list[str] = []
    tags: list[str] = []
    lines: list[int] = []

    def sentence() -> Sentence:
        ids = check_tags(tags, fields, lambda i: f"{path}: line {lines[i]}")
        return list(words), ids

    for offset, number, raw in _lines(chunk, fields.max_document_bytes):
        line = _decode(path, raw, offset, number)
        columns = line.split()
        if not columns or columns[0] == DOCSTART:
            if words:
                yield sentence()
                words.clear(), tags.clear(), lines.clear()
            continue
        assert number is not None, "a CoNLL file is read whole, from its first line"
        if len(columns) < 2:
            raise UserError(f"{path}: line {number}: {line.strip()!r} has no tag column (a word, then its tag last)")
        words.append(columns[0])
        tags.append(columns[-1])
        lines.append(number)
    if words:
        yield sentence()


def is_byte_level(tokenizer: Any) -> bool:
    """Whether a `tokenizers.Tokenizer` pre-tokenizes byte-level (gpt2, llama families): a word's
    leading space is then part of its first sub-token."""
    found = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "ByteLevel":
                found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(tokenizer.to_str()).get("pre_tokenizer"))
    return bool(found)


def align_labels(word_ids: Sequence[int | None], tags: Sequence[int], continuation: Sequence[int] | None) -> list[int]:
    """Per sub-token labels: the word's tag on its first sub-token, -100 on special tokens and, unless
    `continuation` (the tag a later sub-token gets, by tag id) is given, on a word's later sub-tokens."""
    labels, previous = [], None
    for word in word_ids:
        if word is None:
            labels.append(IGNORE_INDEX)
        elif word != previous:
            labels.append(tags[word])
        else:
            labels.append(IGNORE_INDEX if continuation is None else continuation[tags[word]])
        previous = word
    return labels


class SentenceEncoder:
    """Tokenizes word lists (`is_pretokenized`), truncated to `seq_len` with special tokens, and aligns tags."""

    def __init__(self, tokenizer: Any, seq_len: int, fields: Fields) -> None:
        self.tok = tokenizer
        self.tok.no_padding()
        self.tok.enable_truncation(max_length=seq_len)
        self.byte_level = is_byte_level(tokenizer)
        self.continuation = continuation_ids(fields.labels) if fields.label_all_subtokens else None

    def words(self, words: Sequence[str]) -> list[str]:
        """The words as the tokenizer sees them: byte-level BPE gets the space before each word but the first."""
        return [words[0], *(" " + word for word in words[1:])] if self.byte_level and words else list(words)

    def encode(self, sentences: Sequence[Sentence], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens back to back, tokens per sentence, int16 label per token)."""
        encodings = self.tok.encode_batch([self.words(words) for words, _ in sentences], is_pretokenized=True)
        labels = [
            align_labels(encoding.word_ids, tags, self.continuation)
            for encoding, (_, tags) in zip(encodings, sentences, strict=True)
        ]
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        tokens = np.fromiter((t for e in encodings for t in e.ids), dtype=dtype, count=int(lengths.sum()))
        flat = np.fromiter((x for row in labels for x in row), dtype=np.int16, count=int(lengths.sum()))
        return tokens, lengths, flat
