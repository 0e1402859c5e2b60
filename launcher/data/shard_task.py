"""One preparation task: read a chunk of the corpus, tokenize it in batches, write its shards.

The same function runs in a local worker process and in a Ray Data task on any node of a cluster;
it needs only its `ShardJob` (plain values, absolute paths) and writes only files named after its
shard number, so tasks never share a file. Memory is bounded by one batch of documents.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from launcher.data.corpus import Chunk, Fields, iter_documents
from launcher.data.store import ShardWriter
from launcher.data.token_labels import SentenceEncoder, iter_sentences
from launcher.errors import UserError

BATCH_BYTES = 1 << 20  # text tokenized per call: large enough for the tokenizer's threads, small in memory
PARALLELISM_ENV = "TOKENIZERS_PARALLELISM"
PIECE_CHARS = 1 << 16  # longer documents are tokenized in pieces cut before a space (same tokens, less memory)


@dataclass(frozen=True)
class ShardJob:
    """Everything one task needs; `split` None means each document's split is drawn by `in_eval`."""

    chunk: Chunk
    shard: int
    out_dir: str
    tokenizer_file: str
    fields: Fields
    pack: bool  # pre-training: documents without special tokens, each followed by `separator`
    seq_len: int  # fine-tuning: documents truncated to this many tokens, special tokens included
    separator: int | None
    dtype: str
    split: str | None
    eval_fraction: float
    seed: int
    limits: dict[str, int] = field(default_factory=dict)  # at most this many documents per split
    threads: bool = False  # let the tokenizer use every core (one task on the machine)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ShardJob:
        data = json.loads(text)
        data["chunk"] = Chunk(**data["chunk"])
        data["fields"] = Fields(**{**data["fields"], "labels": tuple(data["fields"]["labels"])})
        return cls(**data)


def in_eval(text: str, seed: int, fraction: float) -> bool:
    """A document's split as a pure function of its text: equal documents share a split, in any order."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def caps_reached(remaining: dict[str, int], split: str | None) -> bool:
    """Every split that a job of this `split` feeds has a cap, and nothing of it is left."""
    return all(remaining.get(name) == 0 for name in ([split] if split else ["train", "eval"]))


def split_documents(
    chunk: Chunk, fields: Fields, split: str | None, seed: int, eval_fraction: float
) -> Iterator[tuple[str, str, Any]]:
    """(split, text, label) of the chunk's documents, in order; `split` None draws each one's by `in_eval`.

    The label is a class id (classification), None (pre-training) or, with `fields.tags` set
    (token_classification), the sentence's (words, tag ids), its text the words joined by spaces."""
    documents = iter_sentences(chunk, fields) if fields.tags is not None else iter_documents(chunk, fields)
    for text, label in documents:
        yield split or ("eval" if in_eval(text, seed, eval_fraction) else "train"), text, label


def _pieces(text: str) -> list[str]:
    """Cut a long text right before spaces that follow a non-space: BERT's and byte-level BPE's
    pre-tokenizers split there too, so the pieces tokenize to the same tokens as the whole."""
    pieces, start = [], 0
    while len(text) - start > PIECE_CHARS:
        cut = text.find(" ", start + PIECE_CHARS)
        while cut > 0 and text[cut - 1].isspace():
            cut = text.find(" ", cut + 1)
        if cut < 0:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


class _Encoder:
    def __init__(self, job: ShardJob) -> None:
        from tokenizers import Tokenizer

        self.job = job
        self.tok = Tokenizer.from_file(job.tokenizer_file)  # encode_batch_fast: no character offsets (unused)
        self.tok.no_padding()
        self.sentences = SentenceEncoder(self.tok, job.seq_len, job.fields) if job.fields.tags is not None else None
        if job.pack:
            self.tok.no_truncation()
        else:
            self.tok.enable_truncation(max_length=job.seq_len)
        self.dtype = np.dtype(job.dtype)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(tokens back to back, tokens per document); packed documents end with the separator."""
        if not self.job.pack:
            # 100 characters is WordPiece's longest word, so the kept head still fills seq_len tokens.
            head = self.job.seq_len * 100
            ids = [e.ids for e in self.tok.encode_batch_fast([t[:head] for t in texts], add_special_tokens=True)]
            lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            return np.fromiter(chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum())), lengths
        pieces, owners = [], []
        for i, text in enumerate(texts):
            for piece in _pieces(text) if len(text) > PIECE_CHARS else (text,):
                pieces.append(piece)
                owners.append(i)
        ids = [e.ids for e in self.tok.encode_batch_fast(pieces, add_special_tokens=False)]
        separator = [self.job.separator]

        def with_separators() -> Iterator[list[int]]:
            for j, piece_ids in enumerate(ids):
                yield piece_ids
                if j + 1 == len(ids) or owners[j + 1] != owners[j]:
                    yield separator

        piece_lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        lengths = np.bincount(owners, weights=piece_lengths, minlength=len(texts)).astype(np.int64) + 1
        total = int(lengths.sum())
        return np.fromiter(chain.from_iterable(with_separators()), dtype=self.dtype, count=total), lengths


@contextmanager
def tokenizer_threads(enabled: bool) -> Iterator[None]:
    """The `tokenizers` library reads this variable at each parallel call; restored afterwards."""
    before = os.environ.get(PARALLELISM_ENV)
    os.environ[PARALLELISM_ENV] = "true" if enabled else "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PARALLELISM_ENV, None)
        else:
            os.environ[PARALLELISM_ENV] = before


def run_shard_job(job: ShardJob) -> dict:
    """Tokenize the job's chunk into `<split>.<shard>` files; returns the shards written (or the user error)."""
    try:
        with tokenizer_threads(job.threads):
            splits = _write(job)
        return {
            "shard": job.shard,
            "path": job.chunk.path,
            "splits": splits,
            "process": f"{socket.gethostname()}:{os.getpid()}",
        }
    except UserError as exc:
        return {"shard": job.shard, "path": job.chunk.path, "error": str(exc)}


def _write(job: ShardJob) -> dict[str, dict]:
    encoder = _Encoder(job)
    out = Path(job.out_dir)
    writers: dict[str, ShardWriter] = {}
    pending: dict[str, tuple[list[str], list[Any], list[int]]] = {}
    remaining = dict(job.limits)

    def flush(split: str) -> None:
        texts, labels, _ = pending.pop(split)
        if split not in writers:
            writers[split] = ShardWriter(
                out, f"{split}.{job.shard:05d}", encoder.dtype, job.fields.label is not None,
                token_labelled=encoder.sentences is not None,
            )  # fmt: skip
        if encoder.sentences is not None:
            tokens, lengths, token_labels = encoder.sentences.encode(labels, encoder.dtype)
            writers[split].add(tokens, lengths, token_labels=token_labels)
            return
        tokens, lengths = encoder.encode(texts)
        writers[split].add(tokens, lengths, None if job.fields.label is None else [int(x) for x in labels])  # type: ignore[arg-type]

    for split, text, label in split_documents(job.chunk, job.fields, job.split, job.seed, job.eval_fraction):
        if split in remaining:
            if remaining[split] == 0:
                if caps_reached(remaining, job.split):
                    break
                continue
            remaining[split] -= 1
        texts, labels, size = pending.setdefault(split, ([], [], [0]))
        texts.append(text)
        labels.append(label)
        size[0] += len(text)
        if size[0] >= BATCH_BYTES or len(texts) >= 4096:
            flush(split)
    for split in list(pending):
        flush(split)
    return {split: asdict(writer.close()) for split, writer in writers.items()}


def ray_task(row: dict) -> dict:
    """Ray Data's `map` over jobs: one row in (the job as JSON), one row out (what it wrote, as JSON)."""
    return {"result": json.dumps(run_shard_job(ShardJob.from_json(row["job"])))}
