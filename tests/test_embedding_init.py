"""`embedding_init.method: cooccurrence`: counts within documents, PPMI + SVD vectors, and a run starting from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from launcher.data.store import ShardWriter, TokenStore
from launcher.tasks import embedding_init
from launcher.tasks.embedding_init import cooccurrence_counts, cooccurrence_vectors, document_chunks, set_embeddings
from tests.conftest import TINY, assert_ok, run_cli


def make_store(directory, shards: list[list[list[int]]]) -> TokenStore:
    """A train split of `shards`, each a list of documents (token lists)."""
    infos = []
    for k, docs in enumerate(shards):
        writer = ShardWriter(directory, f"s{k}", np.dtype(np.uint16), labelled=False)
        writer.add(np.concatenate([np.asarray(d) for d in docs]), np.asarray([len(d) for d in docs]))
        infos.append(writer.close())
    return TokenStore(directory, infos, np.dtype(np.uint16))


def test_counts_pairs_within_a_document_only_and_skips_special_tokens(tmp_path) -> None:
    store = make_store(tmp_path, [[[5, 6, 7], [7, 8]], [[9, 0, 9]]])  # 0 is special
    counts = cooccurrence_counts(document_chunks([store]), vocab_size=10, skip_ids=[0], window=2).to_dense()
    expected = torch.zeros(10, 10)
    for a, b in [(5, 6), (6, 7), (5, 7), (7, 8), (9, 9)]:  # (9, 9): two apart across the skipped 0
        expected[a, b] += 1
        expected[b, a] += 1
    assert torch.equal(counts, expected)
    assert counts[7, 7] == 0 and counts[8, 9] == 0, "no pair crosses a document or shard boundary"


def test_counts_do_not_depend_on_chunking_and_respect_the_token_budget(tmp_path, monkeypatch) -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(4, 40, size=int(n)).tolist() for n in rng.integers(1, 30, size=60)]
    store = make_store(tmp_path, [docs[:25], docs[25:]])
    whole = cooccurrence_counts(document_chunks([store]), 40, skip_ids=[]).to_dense()
    monkeypatch.setattr(embedding_init, "CHUNK_TOKENS", 7)  # smaller than some documents
    assert torch.equal(cooccurrence_counts(document_chunks([store]), 40, skip_ids=[]).to_dense(), whole)
    read = sum(len(tokens) for tokens, _ in document_chunks([store], max_tokens=100))
    assert read == 100


def test_tokens_used_alike_get_close_vectors(tmp_path) -> None:
    # Two kinds of documents: 10 or 11 among the context words 40-43; 20 or 21 among 44-47. Within a kind,
    # the two tokens are interchangeable; across kinds they share no context.
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(400):
        for word, context in (([10, 11], 40), ([20, 21], 44)):
            doc = [context + int(c) for c in rng.integers(4, size=6)]
            doc.insert(3, int(rng.choice(word)))
            docs.append(doc)
    store = make_store(tmp_path, [docs])
    vectors, seen = cooccurrence_vectors([store], vocab_size=48, dim=8, skip_ids=[0, 1, 2, 3], seed=0)
    assert seen[[10, 11, 20, 21, 40, 47]].all() and not seen[[0, 12, 30]].any()
    unit = torch.nn.functional.normalize(vectors, dim=1)
    assert float(unit[10] @ unit[11]) > 0.9 and float(unit[20] @ unit[21]) > 0.9
    assert float(unit[10] @ unit[20]) < 0.5
    again, _ = cooccurrence_vectors([store], vocab_size=48, dim=8, skip_ids=[0, 1, 2, 3], seed=0)
    assert torch.equal(vectors, again), "the same vectors on every rank"


def test_vectors_span_the_exact_top_subspace_whatever_the_seed(tmp_path) -> None:
    # Zipf-distributed tokens in random documents: a PPMI matrix whose spectrum decays slowly, like a
    # corpus's. The randomized SVD must find the top singular directions of the exact decomposition, not a
    # seed-dependent approximation of them (torch's default 10 extra directions and 4 power iterations
    # found ~3/4 of the demo's top-128 subspace, a different 3/4 for each seed).
    rng = np.random.default_rng(0)
    vocab, dim = 600, 48
    weights = 1.0 / np.arange(1, vocab - 3) ** 0.8
    docs = [
        (4 + rng.choice(vocab - 4, size=int(n), p=weights / weights.sum())).tolist()
        for n in rng.integers(5, 40, size=800)
    ]
    store = make_store(tmp_path, [docs])
    matrix = embedding_init.ppmi(cooccurrence_counts(document_chunks([store]), vocab, skip_ids=[0, 1, 2, 3]))
    values, vectors = torch.linalg.eigh(matrix.to_dense().double())
    exact = vectors[:, values.abs().argsort(descending=True)[:dim]].float()

    def subspace(seed: int) -> torch.Tensor:
        found, _ = cooccurrence_vectors([store], vocab_size=vocab, dim=dim, skip_ids=[0, 1, 2, 3], seed=seed)
        return torch.linalg.qr(found)[0]

    def overlap(a: torch.Tensor, b: torch.Tensor) -> float:  # mean squared cosine of the principal angles
        return float((a.T @ b).pow(2).sum()) / dim

    zero, one = subspace(0), subspace(1)
    assert overlap(zero, exact) > 0.99 and overlap(one, exact) > 0.99
    assert overlap(zero, one) > 0.99


def test_set_embeddings_scales_seen_rows_and_keeps_the_rest() -> None:
    embedding = torch.nn.Embedding(12, 4)  # wider than the vocabulary the vectors cover
    before = embedding.weight.detach().clone()
    vectors, seen = torch.randn(10, 4) * 7, torch.zeros(10, dtype=torch.bool)
    seen[2:8] = True
    assert set_embeddings(embedding, vectors, seen, std=0.3) == 6
    weight = embedding.weight.detach()
    assert abs(float(weight[2:8].std()) - 0.3) < 1e-5
    assert torch.allclose(weight[2:8] / weight[2:8].std(), vectors[2:8] / vectors[2:8].std(), atol=1e-5)
    assert torch.equal(weight[:2], before[:2]) and torch.equal(weight[8:], before[8:])


@pytest.mark.slow
def test_a_run_starts_its_embeddings_from_the_corpus_statistics(tmp_path) -> None:
    overrides = ["stages.0.embedding_init.method=cooccurrence", "stages.0.max_steps=1", "stages.0.eval_every=0"]
    result = run_cli("run", str(TINY), "--local", "--stage", "pretrain", f"output_dir={tmp_path}", *overrides)
    assert_ok(result)
    assert "token embeddings of " in result.stdout and "set from co-occurrence statistics" in result.stdout
    stage = tmp_path / "tiny" / "pretrain"
    store = TokenStore.read(stage / "data", "train")
    specials = transformers.AutoTokenizer.from_pretrained(stage / "model").all_special_ids
    vectors, seen = cooccurrence_vectors([store], 1000, 32, specials, seed=0)
    expected = torch.nn.Embedding(1000, 32)
    set_embeddings(expected, vectors, seen, std=0.3)
    with safe_open(stage / "model" / "model.safetensors", "pt") as weights:
        exported = weights.get_tensor("bert.embeddings.word_embeddings.weight")
    # One warm-up step at lr 5e-4 moves each weight by at most that much.
    assert torch.allclose(exported[seen], expected.weight.detach()[seen], atol=1e-3)
