"""Tokenized data on disk: one flat int32 token stream, document offsets, optional labels.

Pre-training samples are fixed-length blocks cut from the stream (documents separated by a
separator token, no token lost or duplicated; only the last block may be short). Fine-tuning
samples are whole documents, padded per batch by the collator. Arrays are memory-mapped, so every
rank reads only the samples it is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def pack_stream(docs: list[list[int]], separator: int) -> np.ndarray:
    """Concatenate documents, each followed by `separator`, into one token stream."""
    total = sum(len(doc) + 1 for doc in docs)
    stream = np.empty(total, dtype=np.int32)
    position = 0
    for doc in docs:
        stream[position : position + len(doc)] = doc
        stream[position + len(doc)] = separator
        position += len(doc) + 1
    return stream


def pack_blocks(stream: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Cut the stream into consecutive blocks of `seq_len` tokens; the last one keeps the remainder."""
    return [stream[start : start + seq_len] for start in range(0, len(stream), seq_len)]


@dataclass
class TokenStore:
    """A split (train or eval) as written by `prepare`."""

    tokens: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray | None

    @classmethod
    def write(cls, directory: Path, split: str, docs: list[list[int]], labels: list[int] | None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        lengths = np.fromiter((len(doc) for doc in docs), dtype=np.int64, count=len(docs))
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.fromiter((t for doc in docs for t in doc), dtype=np.int32, count=int(offsets[-1]))
        np.save(directory / f"{split}.tokens.npy", tokens)
        np.save(directory / f"{split}.offsets.npy", offsets)
        if labels is not None:
            np.save(directory / f"{split}.labels.npy", np.asarray(labels, dtype=np.int64))

    @classmethod
    def read(cls, directory: Path, split: str) -> TokenStore:
        labels_path = directory / f"{split}.labels.npy"
        return cls(
            tokens=np.load(directory / f"{split}.tokens.npy", mmap_mode="r"),
            offsets=np.load(directory / f"{split}.offsets.npy"),
            labels=np.load(labels_path) if labels_path.exists() else None,
        )

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    def doc(self, index: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[index] : self.offsets[index + 1]])


class BlockDataset:
    """Pre-training view: sample i is block i of the packed stream (the stream is stored packed).

    With a `prefix` token (BERT's [CLS] for mlm), every block is that token followed by the next
    `seq_len - 1` stream tokens, so the model sees [CLS] at position 0 in pre-training exactly as
    a fine-tuned sequence classifier will (RoBERTa's full-sentences packing); the stream itself is
    still covered once, in order.
    """

    def __init__(self, store: TokenStore, seq_len: int, prefix: int | None = None) -> None:
        self.stream = store.tokens
        self.prefix = prefix
        self.span = seq_len if prefix is None else seq_len - 1
        assert self.span > 0, "seq_len must leave room for the prefix token"

    def __len__(self) -> int:
        return math.ceil(len(self.stream) / self.span)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        start = index * self.span
        block = np.asarray(self.stream[start : start + self.span], dtype=np.int64)
        if self.prefix is not None:
            block = np.concatenate([np.array([self.prefix], dtype=np.int64), block])
        return {"input_ids": block}


def block_prefix(task: str, tokenizer) -> int | None:  # noqa: ANN001
    """The token each pre-training block starts with: [CLS] for masked LM, none for causal LM."""
    return tokenizer.cls_token_id if task == "mlm" else None


class DocumentDataset:
    """Fine-tuning view: sample i is document i (already truncated) with its label."""

    def __init__(self, store: TokenStore) -> None:
        assert store.labels is not None, "classification data was prepared without labels"
        self.store = store

    def __len__(self) -> int:
        return self.store.num_docs

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        assert self.store.labels is not None
        return {"input_ids": self.store.doc(index).astype(np.int64), "label": np.int64(self.store.labels[index])}
