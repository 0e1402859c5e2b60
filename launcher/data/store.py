"""Tokenized data on disk: per split, shards of flat token arrays with a document index.

A shard is what one preparation task wrote: `<split>.<k>.tokens.bin` (raw tokens in the smallest
unsigned dtype that holds the vocabulary), `<split>.<k>.ends.npy` (int64 end of each document in
the shard's stream) and, for classification, `<split>.<k>.labels.npy`; token_classification adds
`<split>.<k>.token_labels.bin` (int16, one label per token, aligned with the tokens, -100 where the
loss ignores a token), memory-mapped like the tokens. `meta.json` lists the
shards in corpus order; a split's stream is their concatenation. Only the shard list (O(shards))
is held in memory; tokens and document ends are memory-mapped when read.

Pre-training samples are fixed-length blocks cut from the split's stream (documents separated by
a separator token, no token lost or duplicated, blocks cross shard boundaries; only the last block
may be short). Fine-tuning samples are whole documents, padded per batch by the collator.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

META_FILE = "meta.json"
TOKEN_LABELS = "token_labels.bin"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


@dataclass(frozen=True)
class ShardInfo:
    """One shard of a split: its file stem, documents and tokens."""

    name: str
    num_docs: int
    num_tokens: int


class ShardWriter:
    """Appends tokenized documents to one shard; nothing but the document ends stays in memory."""

    def __init__(
        self, directory: Path, name: str, dtype: np.dtype, labelled: bool, token_labelled: bool = False
    ) -> None:
        self.directory, self.name, self.dtype = directory, name, dtype
        self.stream: IO[bytes] = (directory / f"{name}.tokens.bin").open("wb")
        self.token_labels: IO[bytes] | None = (
            (directory / f"{name}.{TOKEN_LABELS}").open("wb") if token_labelled else None
        )
        self.lengths: list[np.ndarray] = []
        self.labels: list[int] | None = [] if labelled else None
        self.num_docs = self.num_tokens = 0

    def add(
        self,
        tokens: np.ndarray,
        lengths: np.ndarray,
        labels: list[int] | None = None,
        token_labels: np.ndarray | None = None,
    ) -> None:
        """`tokens`: the documents' tokens back to back; `lengths`: each document's token count;
        `token_labels`: a label per token (token_classification)."""
        tokens.astype(self.dtype, copy=False).tofile(self.stream)
        if self.token_labels is not None:
            assert token_labels is not None and len(token_labels) == len(tokens), "a label per token"
            token_labels.astype(np.int16, copy=False).tofile(self.token_labels)
        self.lengths.append(lengths.astype(np.int64, copy=False))
        if self.labels is not None:
            assert labels is not None and len(labels) == len(lengths), "a label per document"
            self.labels.extend(labels)
        self.num_docs += len(lengths)
        self.num_tokens += len(tokens)

    def close(self) -> ShardInfo:
        self.stream.close()
        if self.token_labels is not None:
            self.token_labels.close()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int64)
        np.save(self.directory / f"{self.name}.ends.npy", np.cumsum(lengths, dtype=np.int64))
        if self.labels is not None:
            np.save(self.directory / f"{self.name}.labels.npy", np.asarray(self.labels, dtype=np.int64))
        return ShardInfo(self.name, self.num_docs, self.num_tokens)


class TokenStore:
    """A split (train or eval) as written by `prepare`: its shards, read lazily."""

    def __init__(self, directory: Path, shards: list[ShardInfo], dtype: np.dtype) -> None:
        self.directory, self.shards, self.dtype = directory, shards, dtype
        self.token_starts = np.zeros(len(shards) + 1, dtype=np.int64)
        np.cumsum([s.num_tokens for s in shards], out=self.token_starts[1:])
        self.doc_starts = np.zeros(len(shards) + 1, dtype=np.int64)
        np.cumsum([s.num_docs for s in shards], out=self.doc_starts[1:])
        self._tokens: dict[int, np.ndarray] = {}
        self._ends: dict[int, np.ndarray] = {}
        self._labels: dict[int, np.ndarray] = {}
        self._token_labels: dict[int, np.ndarray] = {}

    @classmethod
    def read(cls, directory: Path, split: str, source: int | None = None) -> TokenStore:
        """The split's shards; with `source`, only the training shards of that source of a mixture."""
        meta = json.loads((directory / META_FILE).read_text())
        shards = [ShardInfo(**entry) for entry in meta["splits"][split]]
        if source is not None:
            assert split == "train", "sources divide the training split"
            counts = [entry["num_shards"] for entry in meta["sources"]]
            shards = shards[sum(counts[:source]) : sum(counts[: source + 1])]
        return cls(directory, shards, np.dtype(meta["dtype"]))

    @staticmethod
    def source_weights(directory: Path) -> list[float]:
        return [entry["weight"] for entry in json.loads((directory / META_FILE).read_text())["sources"]]

    @property
    def num_tokens(self) -> int:
        return int(self.token_starts[-1])

    @property
    def num_docs(self) -> int:
        return int(self.doc_starts[-1])

    def _shard_tokens(self, k: int) -> np.ndarray:
        if k not in self._tokens:
            shard = self.shards[k]
            self._tokens[k] = np.memmap(
                self.directory / f"{shard.name}.tokens.bin", dtype=self.dtype, mode="r", shape=(shard.num_tokens,)
            ) if shard.num_tokens else np.zeros(0, dtype=self.dtype)  # fmt: skip
        return self._tokens[k]

    def _shard_ends(self, k: int) -> np.ndarray:
        if k not in self._ends:
            self._ends[k] = np.load(self.directory / f"{self.shards[k].name}.ends.npy", mmap_mode="r")
        return self._ends[k]

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split's stream, across shard boundaries, as int64."""
        stop = min(stop, self.num_tokens)
        parts: list[np.ndarray] = []
        k = int(np.searchsorted(self.token_starts, start, side="right")) - 1
        while start < stop:
            base = int(self.token_starts[k])
            take = min(stop, int(self.token_starts[k + 1]))
            parts.append(np.asarray(self._shard_tokens(k)[start - base : take - base], dtype=np.int64))
            start, k = take, k + 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _locate(self, index: int) -> tuple[int, int]:
        assert 0 <= index < self.num_docs, f"document {index} out of range"
        k = int(np.searchsorted(self.doc_starts, index, side="right")) - 1
        return k, index - int(self.doc_starts[k])

    def doc(self, index: int) -> np.ndarray:
        k, local = self._locate(index)
        ends = self._shard_ends(k)
        start = 0 if local == 0 else int(ends[local - 1])
        return np.asarray(self._shard_tokens(k)[start : int(ends[local])], dtype=np.int64)

    def doc_lengths(self) -> np.ndarray:
        """The token count of every document of the split (int64, one per document)."""
        parts = [np.diff(np.asarray(self._shard_ends(k), dtype=np.int64), prepend=0) for k in range(len(self.shards))]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _shard_labels(self, k: int) -> np.ndarray:
        if k not in self._labels:
            self._labels[k] = np.load(self.directory / f"{self.shards[k].name}.labels.npy", mmap_mode="r")
        return self._labels[k]

    def _shard_token_labels(self, k: int) -> np.ndarray:
        if k not in self._token_labels:
            shard = self.shards[k]
            self._token_labels[k] = np.memmap(
                self.directory / f"{shard.name}.{TOKEN_LABELS}", dtype=np.int16, mode="r", shape=(shard.num_tokens,)
            ) if shard.num_tokens else np.zeros(0, dtype=np.int16)  # fmt: skip
        return self._token_labels[k]

    def token_labels(self, index: int) -> np.ndarray:
        """Document `index`'s label per token (token_classification), as int64."""
        k, local = self._locate(index)
        ends = self._shard_ends(k)
        start = 0 if local == 0 else int(ends[local - 1])
        return np.asarray(self._shard_token_labels(k)[start : int(ends[local])], dtype=np.int64)

    @property
    def has_token_labels(self) -> bool:
        return bool(self.shards) and (self.directory / f"{self.shards[0].name}.{TOKEN_LABELS}").exists()

    def label(self, index: int) -> int:
        k, local = self._locate(index)
        return int(self._shard_labels(k)[local])

    @property
    def has_labels(self) -> bool:
        return bool(self.shards) and (self.directory / f"{self.shards[0].name}.labels.npy").exists()

    @property
    def labels(self) -> np.ndarray | None:
        """Every label of the split (classification sets are small), or None without labels."""
        if not self.has_labels:
            return None
        return np.concatenate([self._shard_labels(k) for k in range(len(self.shards))]).astype(np.int64)


class BlockDataset:
    """Pre-training view: sample i is block i of the packed stream (the stream is stored packed).

    With a `prefix` token (BERT's [CLS] for mlm), every block is that token followed by the next
    `seq_len - 1` stream tokens, so the model sees [CLS] at position 0 in pre-training exactly as
    a fine-tuned sequence classifier will (RoBERTa's full-sentences packing); the stream itself is
    still covered once, in order.
    """

    def __init__(self, store: TokenStore, seq_len: int, prefix: int | None = None) -> None:
        self.store = store
        self.prefix = prefix
        self.span = seq_len if prefix is None else seq_len - 1
        assert self.span > 0, "seq_len must leave room for the prefix token"

    def __len__(self) -> int:
        return math.ceil(self.store.num_tokens / self.span)

    def for_epoch(self, epoch: int) -> BlockDataset:
        """The samples of `epoch` (the same in every epoch; mixtures differ)."""
        return self

    def __getitem__(self, index: int) -> dict[str, Any]:
        start = index * self.span
        block = self.store.tokens(start, start + self.span)
        if self.prefix is not None:
            block = np.concatenate([np.array([self.prefix], dtype=np.int64), block])
        return {"input_ids": block}


class MixtureDataset:
    """Pre-training samples drawn from several sources in fixed proportions.

    An epoch holds as many samples as the sources together. Virtual sample v of epoch e sits in
    pattern b = v // PATTERN at slot v % PATTERN; the pattern (the same for every b) gives each
    source its weight's share of the PATTERN slots, spread evenly (largest deficit first), so any
    run of samples matches the weights to within a sample per source and pattern. A source's
    k-th sample over the whole run (epochs included) is sample `k mod n` of that source, through a
    fresh seeded permutation on each pass over it. Everything is a pure function of (seed, epoch,
    v): no per-sample table is held, and `StepSampler` shuffles the virtual samples as it would any.
    """

    PATTERN = 1000

    def __init__(self, parts: list[Any], weights: list[float], seed: int) -> None:
        assert parts and len(parts) == len(weights) and all(len(part) for part in parts), "non-empty sources"
        self.parts, self.seed = parts, seed
        self.num_samples = sum(len(part) for part in parts)
        counts = _apportion(weights, self.PATTERN)
        slots = np.zeros(self.PATTERN, dtype=np.int64)
        ranks = np.zeros(self.PATTERN, dtype=np.int64)
        taken = np.zeros(len(parts), dtype=np.int64)
        targets = np.asarray(counts, dtype=np.float64) / self.PATTERN
        for slot in range(self.PATTERN):
            source = int(np.argmax(targets * (slot + 1) - taken))
            slots[slot], ranks[slot] = source, taken[source]
            taken[source] += 1
        self.slot_source, self.slot_rank, self.counts = slots, ranks, np.asarray(counts, dtype=np.int64)
        full, rest = divmod(self.num_samples, self.PATTERN)
        # samples each source gives per epoch: whole patterns plus the epoch's last, partial one
        self.per_epoch = full * self.counts + np.bincount(slots[:rest], minlength=len(parts))

    def __len__(self) -> int:
        return self.num_samples

    def for_epoch(self, epoch: int) -> _MixtureEpoch:
        return _MixtureEpoch(self, epoch)

    def locate(self, epoch: int, index: int) -> tuple[int, int]:
        """(source, sample of that source) behind virtual sample `index` of `epoch`."""
        from launcher.data.sampler import IndexPermutation

        pattern, slot = divmod(index, self.PATTERN)
        source = int(self.slot_source[slot])
        k = epoch * int(self.per_epoch[source]) + pattern * int(self.counts[source]) + int(self.slot_rank[slot])
        size = len(self.parts[source])
        passes, within = divmod(k, size)
        return source, int(IndexPermutation(size, (self.seed, source, passes))(np.array([within]))[0])


class _MixtureEpoch:
    def __init__(self, mixture: MixtureDataset, epoch: int) -> None:
        self.mixture, self.epoch = mixture, epoch

    def __len__(self) -> int:
        return len(self.mixture)

    def __getitem__(self, index: int) -> dict[str, Any]:
        source, sample = self.mixture.locate(self.epoch, index)
        return self.mixture.parts[source][sample]


def _apportion(weights: list[float], total: int) -> list[int]:
    """Integer shares of `total` proportional to `weights` (largest remainder), each at least 1."""
    exact = [w * total / sum(weights) for w in weights]
    counts = [max(1, int(x)) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    for i in by_remainder[: max(0, total - sum(counts))]:
        counts[i] += 1
    while sum(counts) > total:
        counts[counts.index(max(counts))] -= 1
    return counts


def block_prefix(task: str, tokenizer) -> int | None:  # noqa: ANN001
    """The token each pre-training block starts with: [CLS] for the encoders (mlm, rtd), none for causal LM."""
    return tokenizer.cls_token_id if task in ("mlm", "rtd") else None


class DocumentDataset:
    """Fine-tuning view: sample i is document i (already truncated) with its label."""

    def __init__(self, store: TokenStore) -> None:
        assert store.has_labels, "classification data was prepared without labels"
        self.store = store

    def __len__(self) -> int:
        return self.store.num_docs

    def for_epoch(self, epoch: int) -> DocumentDataset:
        return self

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.store.doc(index), "label": np.int64(self.store.label(index))}


class TaggedDataset:
    """Token-classification view: sample i is sentence i (already truncated) with a label per token."""

    def __init__(self, store: TokenStore) -> None:
        assert store.has_token_labels, "token_classification data was prepared without token labels"
        self.store = store

    def __len__(self) -> int:
        return self.store.num_docs

    def for_epoch(self, epoch: int) -> TaggedDataset:
        return self

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.store.doc(index), "labels": self.store.token_labels(index)}
