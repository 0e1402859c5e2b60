"""Data: streaming preparation into shards (round trip, formats, cache, interruption, bad input) and the
sample order (a seeded bijection: every sample once per epoch, O(1) per step)."""

from __future__ import annotations

import bz2
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from itertools import chain
from pathlib import Path

import numpy as np
import pytest

from launcher.data import prepare as prepare_module
from launcher.data.sampler import IndexPermutation, StepSampler
from launcher.data.shard_task import PIECE_CHARS, _pieces, in_eval
from launcher.data.store import BlockDataset, MixtureDataset, TokenStore, token_dtype
from launcher.data.tokenizer import load_tokenizer, train_tokenizer
from launcher.errors import UserError
from launcher.jobspec import layout
from launcher.jobspec.load import load_spec
from tests.conftest import ROOT, TINY, run_cli


def demo_texts(demo_data: Path, count: int) -> list[str]:
    with (demo_data / "unlabeled.jsonl").open() as stream:
        return [json.loads(line)["text"] for _, line in zip(range(count), stream, strict=False)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def pretrain_spec(tmp_path: Path, train: str | list[str], *overrides: str):
    files = [train] if isinstance(train, str) else train
    return load_spec(
        TINY,
        [f"output_dir={tmp_path / 'runs'}", f"stages.0.data.train={json.dumps(files)}",
         "stages.0.data.max_train_samples=null", "stages.0.data.max_eval_samples=null", *overrides],
    )  # fmt: skip


@pytest.fixture
def small_chunks(monkeypatch) -> None:
    """Chunks of 64 KB, so a 1 MB corpus becomes several shards (and several worker tasks)."""
    monkeypatch.setattr(prepare_module, "MIN_CHUNK_BYTES", 64 << 10)
    monkeypatch.setattr(prepare_module, "CHUNK_BYTES", 64 << 10)


def test_shards_decode_to_the_token_stream_across_shard_boundaries(tmp_path, demo_data, small_chunks) -> None:
    texts = demo_texts(demo_data, 8000)
    spec = pretrain_spec(tmp_path, str(write_jsonl(tmp_path / "corpus.jsonl", texts)))
    info = prepare_module.prepare_job(spec, log=False, only="pretrain")["pretrain"]
    data = layout.data_dir(spec, "pretrain")
    store = TokenStore.read(data, "train")
    assert len(store.shards) >= 4, "a 1 MB corpus in 64 KB chunks gives several shards"
    assert store.dtype == np.uint16, "a 1,000-token vocabulary fits in two bytes"
    tok = load_tokenizer(layout.tokenizer_dir(spec, "pretrain"))
    train = [t for t in texts if not in_eval(t, spec.seed, spec.stages[0].data.eval_fraction)]
    assert 0 < len(texts) - len(train) < 0.1 * len(texts), "about eval_fraction (5%) held out"
    ids = tok(train, add_special_tokens=False)["input_ids"]
    expected = [t for doc in ids for t in [*doc, tok.sep_token_id]]
    assert store.tokens(0, store.num_tokens).tolist() == expected
    assert info.num_train_tokens == len(expected)
    # mlm blocks: [CLS] + the next 31 stream tokens, crossing shard boundaries without loss
    blocks = BlockDataset(store, 32, prefix=tok.cls_token_id)
    assert info.num_train_samples == len(blocks)
    assert all(blocks[i]["input_ids"][0] == tok.cls_token_id for i in range(len(blocks)))
    joined = np.concatenate([blocks[i]["input_ids"][1:] for i in range(len(blocks))])
    assert joined.tolist() == expected
    # documents are indexed too: document 7 of the split is the 8th training text
    assert store.doc(7).tolist() == [*ids[7], tok.sep_token_id]
    # worker processes (above) and one task at a time in this process write the same shards
    shutil.copytree(data / "tokenizer", tmp_path / "tok")  # the same vocabulary (training may break ties anew)
    serial = pretrain_spec(
        tmp_path / "serial", str(tmp_path / "corpus.jsonl"), f"stages.0.tokenizer.source={tmp_path / 'tok'}"
    )
    prepare_module.prepare_job(
        serial, log=False, only="pretrain", run_jobs=lambda jobs: list(prepare_module._serial(jobs))
    )
    again = TokenStore.read(layout.data_dir(serial, "pretrain"), "train")
    assert again.tokens(0, again.num_tokens).tolist() == expected


def test_compressed_csv_and_parquet_read_the_same_documents(tmp_path, demo_data, small_chunks) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts = demo_texts(demo_data, 3000)
    plain = write_jsonl(tmp_path / "c.jsonl", texts)
    raw = plain.read_bytes()
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    (tmp_path / "c.txt.bz2").write_bytes(bz2.compress("".join(t + "\n" for t in texts).encode()))
    pq.write_table(pa.table({"text": texts}), tmp_path / "c.parquet", row_group_size=500)
    import csv

    with (tmp_path / "c.csv").open("w", newline="") as stream:
        csv.writer(stream).writerows([["text"], *([t] for t in texts)])
    train_tokenizer(texts, "bert", 1000, True, tmp_path / "tok")  # one vocabulary for all (ties may break anew)
    streams = {}
    for name in ("c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.txt.bz2", "c.parquet", "c.csv"):
        spec = pretrain_spec(
            tmp_path / f"out-{name}", str(tmp_path / name), f"stages.0.tokenizer.source={tmp_path / 'tok'}"
        )
        prepare_module.prepare_job(spec, log=False, only="pretrain")
        store = TokenStore.read(layout.data_dir(spec, "pretrain"), "train")
        streams[name] = store.tokens(0, store.num_tokens).tolist()
    assert all(stream == streams["c.jsonl"] for stream in streams.values())


def test_prepare_is_cached_and_invalidated_by_source_settings_and_tokenizer(tmp_path, demo_data) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", demo_texts(demo_data, 2000))
    spec = pretrain_spec(tmp_path, str(corpus))
    meta = layout.data_dir(spec, "pretrain") / "meta.json"
    prepare_module.prepare_job(spec, log=False)
    first = meta.stat().st_mtime_ns
    prepare_module.prepare_job(spec, log=False)
    assert meta.stat().st_mtime_ns == first, "nothing changed: a cache hit"
    os.utime(corpus, ns=(time.time_ns(), time.time_ns() + 10**9))
    prepare_module.prepare_job(spec, log=False)
    second = meta.stat().st_mtime_ns
    assert second != first, "a changed source file prepares again"
    prepare_module.prepare_job(pretrain_spec(tmp_path, str(corpus), "stages.0.data.seq_len=16"), log=False)
    assert meta.stat().st_mtime_ns != second, "a changed setting prepares again"
    # a later stage that reuses this tokenizer follows it when it changes
    finetune = layout.data_dir(spec, "finetune") / "meta.json"
    prepare_module.prepare_job(spec, log=False)
    third = finetune.stat().st_mtime_ns
    prepare_module.prepare_job(pretrain_spec(tmp_path, str(corpus), "stages.0.tokenizer.vocab_size=900"), log=False)
    assert finetune.stat().st_mtime_ns != third


@pytest.mark.slow  # among the quick tier's slowest (prepares or runs, or 100,000 Python draws)
def test_killed_prepare_leaves_the_previous_data_usable(tmp_path, demo_data) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", demo_texts(demo_data, 2000))
    args = ["prepare", TINY, f"output_dir={tmp_path / 'runs'}", f"stages.0.data.train={corpus}", "stages.1.max_steps=1",
            "stages.0.data.max_train_samples=null", "stages.0.data.max_eval_samples=null"]  # fmt: skip
    assert run_cli(*args).returncode == 0
    data = tmp_path / "runs" / "tiny" / "pretrain" / "data"
    before = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()}
    big = write_jsonl(tmp_path / "big.jsonl", demo_texts(demo_data, 40000) * 6)  # ~35 MB: seconds to prepare
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", *args[:3], f"stages.0.data.train={big}", *args[4:]], cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(data.parent.glob(".data-*/train.*.tokens.bin")):  # killed while writing shards
            assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before it could be killed"
            time.sleep(0.05)
        workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        proc.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in workers):
            assert time.monotonic() < deadline, f"workers die with prepare: {[(p, _state(p)) for p in workers]}"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    after = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()}
    assert after == before, "the previous data is untouched"
    assert run_cli(*args).returncode == 0, "and still valid: the next run uses it"
    assert not list(data.parent.glob(".data-*")), "the killed run's temporary folder is cleaned up"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.slow  # among the quick tier's slowest (prepares or runs, or 100,000 Python draws)
def test_bad_inputs_exit_2_naming_the_place_and_overwrite_nothing(tmp_path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [f"document number {i} with some words" for i in range(400)])
    base = ["prepare", TINY, f"output_dir={tmp_path / 'runs'}", "stages.1.max_steps=1"]
    assert run_cli(*base, f"stages.0.data.train={good}").returncode == 0
    meta = tmp_path / "runs" / "tiny" / "pretrain" / "data" / "meta.json"
    before = meta.read_bytes()
    lines = good.read_bytes().splitlines(keepends=True)
    cases = {
        "utf8.jsonl": (b"".join(lines[:3]) + b'{"text": "bad \xff"}\n', r"utf8.jsonl: line 4 \(byte offset \d+\): not"),
        "utf8.txt.gz": (gzip.compress(b"fine\nbad \xc3\x28\n"), r"utf8.txt.gz: line 2 \(byte offset 9 of the de"),
        "notjson.jsonl": (lines[0] + b"{not json\n", r"notjson.jsonl: line 2 \(byte offset \d+\): not a"),
        "nofield.jsonl": (lines[0] + b'{"body": "x"}\n', r"nofield.jsonl: line 2 .*: no field 'text'"),
        "huge.txt": (b"short\n" + b"x " * (1 << 20) + b"\n", r"huge.txt: line 2 .*a document longer than 65536 bytes"),
        "huge.csv": (b"text\nshort\n" + b"x " * (1 << 20) + b"\n", r"huge.csv: line 3 .*a line longer than 65536"),
        "bad.csv": (b"text\nshort\nbad \xff\n", r"bad.csv: line 3 \(byte offset 15\): not valid UTF-8"),
    }  # fmt: skip
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        result = run_cli(*base, f"stages.0.data.train={tmp_path / name}", "stages.0.data.max_document_bytes=65536")
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        assert re.search(message, result.stderr), (name, result.stderr)
        assert meta.read_bytes() == before, f"{name}: the earlier prepared data is kept"
    (tmp_path / "empty.txt").write_text("\n  \n")
    result = run_cli(*base, f'stages.0.data.train=["{good}", "{tmp_path / "empty.txt"}"]')
    assert result.returncode == 0 and "empty.txt holds no non-blank text; skipped" in result.stderr
    result = run_cli(*base, f"stages.0.data.train={tmp_path / 'empty.txt'}")
    assert result.returncode == 2 and "stages.0.data.train: the corpus is empty" in result.stderr


def test_labels_and_columns_are_checked(tmp_path) -> None:
    from launcher.data.corpus import Chunk, Fields, iter_documents

    csv_path = tmp_path / "labeled.csv"
    csv_path.write_text("text,label\ngood film,fresh\nbad film,meh\n")
    fields = Fields(text="text", label="label", labels=("rotten", "fresh"))
    with pytest.raises(UserError, match=r"labeled.csv: line 3: label 'meh' is not in data.labels"):
        list(iter_documents(Chunk(str(csv_path), "csv"), fields))
    with pytest.raises(UserError, match=r"labeled.csv: no column 'review' \(data.text_field"):
        list(iter_documents(Chunk(str(csv_path), "csv"), Fields(text="review")))
    docs = list(iter_documents(Chunk(str(csv_path), "csv"), Fields("text", "label", ("rotten", "fresh", "meh"))))
    assert docs == [("good film", 1), ("bad film", 2)]


def test_line_files_split_into_byte_ranges_own_each_line_once(tmp_path) -> None:
    from launcher.data.corpus import Fields, iter_documents, plan_chunks

    texts = [f"line {i} " + "w" * (i % 37) for i in range(5000)]
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(texts) + "\n")
    for size in (1000, 4096, 77777):
        chunks = plan_chunks([path], "f", chunk_bytes=size)
        assert len(chunks) == -(-path.stat().st_size // size)
        read = [text for chunk in chunks for text, _ in iter_documents(chunk, Fields())]
        assert read == texts, size


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_long_documents_tokenize_in_pieces_to_the_same_tokens(tmp_path, family, demo_data) -> None:
    texts = demo_texts(demo_data, 2000)
    tok = train_tokenizer(texts, family, 500, True, tmp_path / "tok")
    long_text = " ".join(texts) + "  double  spaces   and\ttabs " + " ".join(texts[:300])
    pieces = _pieces(long_text)
    assert len(pieces) > 2 and "".join(pieces) == long_text and max(map(len, pieces)) < PIECE_CHARS + 1000
    whole = tok(long_text, add_special_tokens=False)["input_ids"]
    assert list(chain.from_iterable(tok(pieces, add_special_tokens=False)["input_ids"])) == whole


def test_token_dtype_is_the_smallest_that_fits() -> None:
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32 and token_dtype(30522) == np.uint16


@pytest.mark.parametrize("n", [1, 2, 3, 17, 64, 1000, 4097])
def test_index_permutation_is_a_seeded_bijection(n) -> None:
    perm = IndexPermutation(n, (7, 0))
    out = perm(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))
    assert np.array_equal(IndexPermutation(n, (7, 0))(np.arange(n)), out), "a pure function of the key"
    if n >= 17:
        assert not np.array_equal(IndexPermutation(n, (7, 1))(np.arange(n)), out), "another epoch, another order"
        assert not np.array_equal(out, np.arange(n)), "shuffled"


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
    # 2 workers and 1 worker with twice the accumulation train on the same samples at every step
    if world == 2:
        single = StepSampler(n, micro, accum * 2, 1, 0, seed=7)
        for step in range(per_epoch + 2):
            both = [i for s in samplers for i in chain.from_iterable(s.micro_batches(step))]
            assert both == list(chain.from_iterable(single.micro_batches(step)))


def test_length_grouped_batches_cover_the_epoch_with_little_padding() -> None:
    n, micro = 2000, 16
    lengths = np.random.default_rng(0).integers(5, 65, size=n)
    grouped = StepSampler(n, micro, 1, 1, 0, seed=7, lengths=lengths)
    plain = StepSampler(n, micro, 1, 1, 0, seed=7)
    per_epoch = grouped.steps_per_epoch

    def padded_fill(sampler: StepSampler) -> float:  # real tokens over padded tokens of a padded-per-batch epoch
        batches = [sampler.micro_batches(step)[0] for step in range(per_epoch)]
        return sum(lengths[b].sum() for b in batches) / sum(lengths[b].max() * len(b) for b in batches)

    for epoch in range(2):
        steps = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        seen = [i for step in steps for i in grouped.micro_batches(step)[0]]
        assert sorted(seen) == sorted(i for step in steps for i in plain.micro_batches(step)[0]), "the same samples"
    assert padded_fill(plain) < 0.7 < 0.95 < padded_fill(grouped)
    first = [grouped.micro_batches(step)[0] for step in range(3 * 50)]
    assert [max(lengths[b]) for b in first[:50]] != sorted(max(lengths[b]) for b in first[:50]), "batches shuffled"
    fresh = StepSampler(n, micro, 1, 1, 0, seed=7, lengths=lengths)
    assert [fresh.micro_batches(step)[0] for step in (120, 3, 77)] == [first[120], first[3], first[77]], "resumable"
    # 2 workers (1 micro-batch each) and 1 worker accumulating 2 train on the same global batches
    pair = [StepSampler(n, micro, 1, 2, rank, seed=7, lengths=lengths) for rank in range(2)]
    single = StepSampler(n, micro, 2, 1, 0, seed=7, lengths=lengths)
    for step in (0, 49, 50, 62):
        assert [i for s in pair for i in s.micro_batches(step)[0]] == list(chain(*single.micro_batches(step)))


def test_resume_cost_does_not_grow_with_the_step(monkeypatch) -> None:
    """The batch of step k costs the same permutation work at k = 1 as deep into a huge epoch."""
    calls = {"positions": 0}
    original = IndexPermutation._feistel

    def counting(self, x):
        calls["positions"] += len(x)
        return original(self, x)

    monkeypatch.setattr(IndexPermutation, "_feistel", counting)
    sampler = StepSampler(10**12, 16, 1, 1, 0, seed=3)  # a trillion samples: no order is ever materialised
    work = []
    for step in (1, 10**6, 6 * 10**10 - 1):
        calls["positions"] = 0
        batch = sampler.micro_batches(step)[0]
        assert len(batch) == 16 and all(0 <= i < 10**12 for i in batch)
        work.append(calls["positions"])
    assert max(work) <= 16 * 8, f"cycle-walking passes stay few: {work}"


class Numbered:
    """A stand-in source: sample i is (source id, i)."""

    def __init__(self, source: int, size: int) -> None:
        self.source, self.size = source, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[int, int]:
        assert 0 <= index < self.size
        return self.source, index


@pytest.mark.slow  # among the quick tier's slowest (prepares or runs, or 100,000 Python draws)
def test_mixture_draws_sources_in_their_weights_over_an_epoch() -> None:
    sizes, weights = [5000, 300, 20000], [5.0, 3.0, 2.0]  # shares 50% / 30% / 20% of 25,300 samples an epoch
    mixture = MixtureDataset([Numbered(s, n) for s, n in enumerate(sizes)], weights, seed=3)
    assert len(mixture) == sum(sizes)
    assert np.bincount(mixture.slot_source, minlength=3).tolist() == [500, 300, 200], "the pattern is exact"
    # through the sampler that training uses (shuffled, 2 ranks, wrap-around last step), epoch by epoch
    samplers = [StepSampler(len(mixture), 16, 2, 2, rank, seed=3) for rank in range(2)]
    per_epoch = samplers[0].steps_per_epoch
    drawn: dict[int, list[list[tuple[int, int]]]] = {}
    for epoch in range(4):
        view = mixture.for_epoch(epoch)
        samples = [view[i] for step in range(epoch * per_epoch, (epoch + 1) * per_epoch)
                   for s in samplers for i in chain.from_iterable(s.micro_batches(step))]  # fmt: skip
        shares = np.bincount([source for source, _ in samples], minlength=3) / len(samples)
        assert np.allclose(shares, [0.5, 0.3, 0.2], atol=0.01), shares
        drawn[epoch] = [[i for source, i in samples if source == s] for s in range(3)]
    # the over-drawn source (7,590 draws of 300) cycles through all of its samples, each 25 or 26 times
    counts = np.bincount(drawn[0][1], minlength=300)
    assert counts.min() >= 25 and counts.max() <= 26 + 1  # +1: the wrap-around step repeats a few
    # the under-drawn source (5,060 of 20,000 an epoch) moves on: epochs 0 and 1 draw different samples
    assert len(set(drawn[0][2]) & set(drawn[1][2])) < 0.01 * len(drawn[0][2])
    assert len(set().union(*(drawn[e][2] for e in range(4)))) == 20000, "four epochs cover it all"
    # a pure function of (seed, epoch, index)
    again = MixtureDataset([Numbered(s, n) for s, n in enumerate(sizes)], weights, seed=3)
    assert [again.for_epoch(2)[i] for i in range(0, 25300, 97)] == [
        mixture.for_epoch(2)[i] for i in range(0, 25300, 97)
    ]


@pytest.mark.slow  # among the quick tier's slowest (prepares or runs, or 100,000 Python draws)
def test_sources_prepare_separately_and_train(tmp_path, demo_data) -> None:
    texts = demo_texts(demo_data, 3000)
    first, second = write_jsonl(tmp_path / "a.jsonl", texts[:2000]), write_jsonl(tmp_path / "b.jsonl", texts[2000:])
    sources = f"stages.0.data.sources=[{{path: {first}, weight: 3}}, {{path: [{second}], weight: 1}}]"
    spec = load_spec(TINY, [f"output_dir={tmp_path / 'runs'}", "stages.0.data.train=[]", sources,
                            "stages.0.data.max_train_samples=null", "stages.0.data.max_eval_samples=null"])  # fmt: skip
    info = prepare_module.prepare_job(spec, log=False, only="pretrain")["pretrain"]
    data = layout.data_dir(spec, "pretrain")
    tok = load_tokenizer(data / "tokenizer")
    parts = [TokenStore.read(data, "train", source) for source in (0, 1)]
    for part, source_texts in zip(parts, (texts[:2000], texts[2000:]), strict=True):
        train = [t for t in source_texts if not in_eval(t, spec.seed, spec.stages[0].data.eval_fraction)]
        ids = tok(train, add_special_tokens=False)["input_ids"]
        assert part.tokens(0, part.num_tokens).tolist() == [t for doc in ids for t in [*doc, tok.sep_token_id]]
    from launcher.tasks import build_task

    dataset = build_task(spec.stages[0], tok).dataset(data, "train", spec.seed)
    assert isinstance(dataset, MixtureDataset) and dataset.counts.tolist() == [750, 250]
    assert len(dataset) == info.num_train_samples == sum(len(BlockDataset(p, 32, tok.cls_token_id)) for p in parts)
    result = run_cli("run", TINY, "--local", "--stage", "pretrain", f"output_dir={tmp_path / 'run'}",
                     "stages.0.data.train=[]", sources, "stages.0.data.max_train_samples=null",
                     "stages.0.data.max_eval_samples=null", "stages.0.max_steps=3")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "tiny" / "pretrain" / "summary.json").read_text())["steps"] == 3
