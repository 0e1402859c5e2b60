"""Token embeddings from co-occurrence statistics (`embedding_init.method: cooccurrence`).

Counts how often two tokens occur within `WINDOW` positions of each other inside a training document,
turns the counts into positive pointwise mutual information (PPMI) and keeps the top singular
directions of that matrix as the word vectors (LSA-style; Levy & Goldberg, 2014, show skip-gram with
negative sampling factorises a shifted PMI matrix). One pass over the corpus and one truncated SVD: a
few seconds where masked-LM needs hours on a CPU to give similar words similar vectors. The vectors
then start the pre-training stage's token embeddings; the rest of the network starts as usual.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from launcher.data.store import TokenStore
from launcher.jobspec.models import StageSpec

WINDOW = 5  # tokens on each side that count as co-occurring
MAX_TOKENS = 100_000_000  # the statistics read at most this many training tokens (the first ones)
CHUNK_TOKENS = 4_000_000  # tokens counted at a time (memory: ~16 bytes a pair, 2 * WINDOW pairs a token)
# The randomized SVD's accuracy. PPMI's spectrum decays slowly, so torch's defaults (10 extra directions, 4
# power iterations) found only ~76% of the top-128 subspace of the demo's matrix, and another seed a different
# 76% (overlap 0.65): the vectors, and what fine-tuning gets from them, changed from run to run. With these,
# 0.9994 of the exact subspace (torch.linalg.eigh) and 0.998 between seeds; the demo's whole pass (6,000-token
# vocabulary, 1.5 M tokens) took 5.5 s.
SVD_OVERSAMPLE = 100
SVD_POWER_ITERATIONS = 16


def document_chunks(
    stores: Iterable[TokenStore], max_tokens: int = MAX_TOKENS
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, document id of each token) in chunks of whole documents, at most `max_tokens` in all."""
    budget = max_tokens
    for store in stores:
        lengths = store.doc_lengths()
        ends = np.cumsum(lengths)
        start, doc = 0, 0
        while doc < len(lengths) and budget > 0:
            last = int(np.searchsorted(ends, start + min(CHUNK_TOKENS, budget), side="right"))
            if last == doc:  # one document longer than the chunk: a chunk of its own
                last = doc + 1
            stop = min(int(ends[last - 1]), start + budget)
            tokens = store.tokens(start, stop)
            docs = np.repeat(np.arange(doc, last), lengths[doc:last])[: stop - start]
            yield tokens, docs
            budget -= stop - start
            start, doc = int(ends[last - 1]), last


def cooccurrence_counts(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]], vocab_size: int, skip_ids: Iterable[int], window: int = WINDOW
) -> torch.Tensor:
    """Symmetric sparse (vocab x vocab) counts of token pairs at most `window` apart in one document."""
    skip = np.zeros(vocab_size, dtype=bool)
    skip[[i for i in skip_ids if 0 <= i < vocab_size]] = True
    total = torch.sparse_coo_tensor(
        torch.zeros(2, 0, dtype=torch.long), torch.zeros(0), (vocab_size, vocab_size), check_invariants=True
    )
    for tokens, docs in chunks:
        keys = []
        for offset in range(1, window + 1):
            a, b = tokens[:-offset], tokens[offset:]
            keep = (docs[:-offset] == docs[offset:]) & ~skip[a] & ~skip[b]
            a, b = a[keep], b[keep]
            keys += [a * vocab_size + b, b * vocab_size + a]
        if not keys:
            continue
        unique, counts = np.unique(np.concatenate(keys), return_counts=True)
        index = torch.from_numpy(np.stack([unique // vocab_size, unique % vocab_size]))
        total = total + torch.sparse_coo_tensor(
            index, torch.from_numpy(counts.astype(np.float32)), total.shape, check_invariants=True
        )
    return total.coalesce()


def ppmi(counts: torch.Tensor) -> torch.Tensor:
    """max(0, log(p(a, b) / (p(a) p(b)))) of sparse symmetric counts, sparse."""
    index, values = counts.indices(), counts.values().double()
    row = torch.zeros(counts.shape[0], dtype=torch.float64).index_add_(0, index[0], values)
    total = float(values.sum())
    pmi = torch.log(values * total / (row[index[0]] * row[index[1]]))
    keep = pmi > 0
    return torch.sparse_coo_tensor(index[:, keep], pmi[keep].float(), counts.shape, check_invariants=True).coalesce()


def cooccurrence_vectors(
    stores: Iterable[TokenStore], vocab_size: int, dim: int, skip_ids: Iterable[int], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(vectors, seen): `dim`-wide vectors from the PPMI matrix's truncated SVD, and which tokens had counts."""
    matrix = ppmi(cooccurrence_counts(document_chunks(stores), vocab_size, skip_ids))
    seen = torch.zeros(vocab_size, dtype=torch.bool)
    seen[matrix.indices()[0]] = True
    rank = min(dim, vocab_size)
    with torch.random.fork_rng(), warnings.catch_warnings():  # every rank the same; caller RNG untouched
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        torch.manual_seed(seed)
        u, s, _ = torch.svd_lowrank(
            matrix.to_sparse_csr(), q=min(rank + SVD_OVERSAMPLE, vocab_size), niter=SVD_POWER_ITERATIONS
        )
    vectors = torch.zeros(vocab_size, dim)
    vectors[:, :rank] = u[:, :rank] * s[:rank].sqrt()
    return vectors, seen


def set_embeddings(embedding: torch.nn.Embedding, vectors: torch.Tensor, seen: torch.Tensor, std: float) -> int:
    """Overwrite the rows of tokens that had counts with `vectors` scaled to `std`; returns how many."""
    rows = vectors[seen]
    scale = std / max(float(rows.std()), 1e-12) if rows.numel() > 1 else 0.0
    with torch.no_grad():
        weight = embedding.weight
        weight[: len(seen)][seen] = (rows * scale).to(weight.dtype)
    assert math.isfinite(float(weight.detach().sum())), "co-occurrence vectors are finite"
    return int(seen.sum())


def init_from_corpus(
    model: torch.nn.Module, stage: StageSpec, data_dir: Path, skip_ids: Iterable[int], seed: int
) -> str:
    """Set `model`'s input embeddings from the stage's prepared training split; returns a line saying so."""
    started = time.perf_counter()
    sources = range(len(TokenStore.source_weights(data_dir))) if stage.data.sources else [None]
    stores = [TokenStore.read(data_dir, "train", source) for source in sources]
    embedding = model.get_input_embeddings()
    vectors, seen = cooccurrence_vectors(stores, embedding.num_embeddings, embedding.embedding_dim, skip_ids, seed)
    rows = set_embeddings(embedding, vectors, seen, stage.embedding_init.std)
    read = min(sum(store.num_tokens for store in stores), MAX_TOKENS)
    return (
        f"token embeddings of {rows} tokens set from co-occurrence statistics (PPMI, window {WINDOW}, SVD) of "
        f"{read:,} training tokens, std {stage.embedding_init.std:g}, in {time.perf_counter() - started:.1f} s"
    )
