"""Data: packing loses and duplicates nothing, sharding covers each epoch, bad inputs are named."""

from __future__ import annotations

from itertools import chain

import numpy as np
import pytest

from launcher.data.corpus import check_utf8, read_documents
from launcher.data.sampler import StepSampler
from launcher.data.store import BlockDataset, TokenStore, pack_blocks, pack_stream
from launcher.data.tokenizer import load_tokenizer, train_tokenizer
from launcher.errors import UserError


def test_pack_blocks_concatenate_back_to_the_stream() -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(5, 100, size=rng.integers(1, 50)).tolist() for _ in range(200)]
    stream = pack_stream(docs, separator=3)
    assert len(stream) == sum(len(d) + 1 for d in docs)
    blocks = pack_blocks(stream, seq_len=16)
    assert all(len(b) == 16 for b in blocks[:-1]) and 0 < len(blocks[-1]) <= 16
    assert np.array_equal(np.concatenate(blocks), stream)
    # the separator follows each document, in order
    expected = [t for d in docs for t in [*d, 3]]
    assert stream.tolist() == expected


def test_block_dataset_on_real_text_is_the_token_stream(tmp_path, demo_data) -> None:
    texts = [line for line in (demo_data / "train.csv").read_text().splitlines()[1:300]]
    tok = train_tokenizer(texts, "bert", 500, True, tmp_path / "tok")
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    stream = pack_stream(ids, tok.sep_token_id)
    TokenStore.write(tmp_path / "data", "train", [stream.tolist()], None)
    blocks = BlockDataset(TokenStore.read(tmp_path / "data", "train"), seq_len=24)
    joined = np.concatenate([blocks[i]["input_ids"] for i in range(len(blocks))])
    assert joined.tolist() == [t for doc in ids for t in [*doc, tok.sep_token_id]]
    # mlm blocks open with [CLS], as fine-tuning inputs do; the rest is still the stream, in order
    mlm = BlockDataset(TokenStore.read(tmp_path / "data", "train"), seq_len=24, prefix=tok.cls_token_id)
    assert all(mlm[i]["input_ids"][0] == tok.cls_token_id for i in range(len(mlm)))
    assert all(len(mlm[i]["input_ids"]) == 24 for i in range(len(mlm) - 1))
    joined = np.concatenate([mlm[i]["input_ids"][1:] for i in range(len(mlm))])
    assert joined.tolist() == [t for doc in ids for t in [*doc, tok.sep_token_id]]
    # and the tokenizer round-trips through save/load
    again = load_tokenizer(tmp_path / "tok")
    assert again(texts[:5])["input_ids"] == tok(texts[:5])["input_ids"]


@pytest.mark.parametrize(
    ("n", "micro", "accum", "world"), [(100, 4, 2, 2), (37, 3, 1, 2), (64, 8, 1, 1), (10, 4, 3, 2)]
)
def test_step_sampler_shards_cover_each_epoch(n, micro, accum, world) -> None:
    samplers = [StepSampler(n, micro, accum, world, rank, seed=7) for rank in range(world)]
    per_epoch = samplers[0].steps_per_epoch
    for epoch in range(2):
        seen: list[int] = []
        for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            per_rank = [list(chain.from_iterable(s.micro_batches(step))) for s in samplers]
            assert all(len(r) == micro * accum for r in per_rank)
            if step < (epoch + 1) * per_epoch - 1:  # before the wrap-around step, ranks are disjoint
                assert len(set(chain.from_iterable(per_rank))) == micro * accum * world
            seen += chain.from_iterable(per_rank)
        assert set(seen) == set(range(n)), "every sample is seen in every epoch"
        assert len(seen) - n < micro * accum * world, "only the last step wraps around"
    # a pure function of the step: a fresh sampler (a resumed run) draws the same batch
    assert StepSampler(n, micro, accum, world, 0, seed=7).micro_batches(3) == samplers[0].micro_batches(3)
    assert StepSampler(n, micro, accum, world, 0, seed=8).micro_batches(0) != samplers[0].micro_batches(0)


def test_non_utf8_names_file_and_byte_offset(tmp_path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good line\nbad \xff byte\n")
    with pytest.raises(UserError, match=r"bad.txt: not valid UTF-8 at byte offset 14"):
        check_utf8(path)
    # offsets are exact across read chunks too
    path.write_bytes(b"a" * 5000 + b"\xc3\x28")
    with pytest.raises(UserError, match="byte offset 5000"):
        check_utf8(path, chunk_bytes=1024)


def test_corpus_errors_name_the_file(tmp_path) -> None:
    csv = tmp_path / "labeled.csv"
    csv.write_text("text,label\ngood film,fresh\nbad film,meh\n")
    with pytest.raises(UserError, match=r"labeled.csv: row 2: label 'meh' is not in data.labels"):
        read_documents([str(csv)], "stages.1.data.train", "text", "label", ["rotten", "fresh"])
    with pytest.raises(UserError, match=r"stages.1.data.train: .*labeled.csv: no column 'review'"):
        read_documents([str(csv)], "stages.1.data.train", "review", "label", ["rotten", "fresh"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(UserError, match=r"stages.0.data.train: the corpus is empty"):
        read_documents([str(empty)], "stages.0.data.train", "text")
    with pytest.raises(UserError, match=r"stages.0.data.train: .*nothing-\*.txt' matches no file"):
        read_documents([str(tmp_path / "nothing-*.txt")], "stages.0.data.train", "text")
    with pytest.raises(UserError, match=r"stages.0.data.train: .*missing.txt: no such file"):
        read_documents([str(tmp_path / "missing.txt")], "stages.0.data.train", "text")
    docs = read_documents([str(csv)], "f", "text", "label", ["rotten", "fresh", "meh"])
    assert docs.texts == ["good film", "bad film"] and docs.labels == [1, 2]
