"""token_classification: label alignment, entity metrics against seqeval, bad input, a tiny run and its export."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from launcher.data.corpus import Fields
from launcher.data.token_labels import SentenceEncoder, is_byte_level
from launcher.errors import UserError
from launcher.tasks.base import EvalSums
from launcher.tasks.token_classification import TokenClassification
from tests.conftest import ROOT, assert_ok, on_ray, run_cli
from tests.ray_head import RayHead

JOB = "jobs/ner.yaml"
SAMPLE = ROOT / "tests" / "fixtures" / "ner_sample.conll"
CONLL_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
X = -100  # ignored by the loss


def tag_fields(label_all_subtokens: bool = False) -> Fields:
    return Fields(labels=tuple(CONLL_TAGS), tokens="tokens", tags="tags", label_all_subtokens=label_all_subtokens)


def ids(*tags: str) -> list[int]:
    return [CONLL_TAGS.index(tag) for tag in tags]


def wordpiece():
    """A hand-made BERT-style vocabulary: [CLS] ... [SEP], lowercased, `##` continuations."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "angela", "mer", "##kel", "met", "york", "##ers"]
    tok = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tok, vocab


def byte_level_bpe():
    """A hand-made byte-level BPE (GPT-2 style: a word's leading space is the `Ġ` of its first token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = ["<|endoftext|>", "P", "a", "r", "i", "s", "b", "g", "Ġ", "Pa", "ri", "ris", "Ġi", "Ġis", "Ġb"]
    merges = [("P", "a"), ("r", "i"), ("ri", "s"), ("Ġ", "i"), ("Ġi", "s"), ("Ġ", "b")]
    tok = Tokenizer(models.BPE({token: i for i, token in enumerate(vocab)}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok, vocab


def encode(tok, words: list[str], tags: list[int], fields: Fields) -> tuple[list[int], list[int]]:
    tokens, lengths, labels = SentenceEncoder(tok, 32, fields).encode([(words, tags)], np.dtype(np.uint16))
    assert lengths.tolist() == [len(tokens)]
    return tokens.tolist(), labels.tolist()


def test_wordpiece_labels_the_first_subtoken_of_each_word() -> None:
    tok, vocab = wordpiece()
    words, tags = ["Angela", "Merkel", "met", "Yorkers"], ids("B-PER", "I-PER", "O", "B-MISC")
    tokens, labels = encode(tok, words, tags, tag_fields())
    # [CLS] angela mer ##kel met york ##ers [SEP], worked by hand
    assert [vocab[t] for t in tokens] == ["[CLS]", "angela", "mer", "##kel", "met", "york", "##ers", "[SEP]"]
    assert labels == [X, *ids("B-PER", "I-PER"), X, *ids("O", "B-MISC"), X, X]
    _, every = encode(tok, words, tags, tag_fields(label_all_subtokens=True))
    # every sub-token labelled: a B- word's later pieces continue it as I-
    assert every == [X, *ids("B-PER", "I-PER", "I-PER", "O", "B-MISC", "I-MISC"), X]


def test_byte_level_bpe_gives_every_word_but_the_first_its_space() -> None:
    tok, vocab = byte_level_bpe()
    assert is_byte_level(tok) and not is_byte_level(wordpiece()[0])
    words, tags = ["Paris", "is", "big"], ids("B-LOC", "O", "O")
    tokens, labels = encode(tok, words, tags, tag_fields())
    # Paris -> Pa ris; " is" -> Ġis; " big" -> Ġb i g (the running text's tokens, worked by hand)
    assert [vocab[t] for t in tokens] == ["Pa", "ris", "Ġis", "Ġb", "i", "g"]
    assert tokens == tok.encode("Paris is big").ids
    assert labels == [*ids("B-LOC"), X, *ids("O", "O"), X, X]


def task_for(labels: list[str]) -> TokenClassification:
    stage = SimpleNamespace(data=SimpleNamespace(labels=labels, group_by_length=False))
    return TokenClassification(stage, SimpleNamespace(pad_token_id=0))


def test_entity_metrics_equal_seqeval() -> None:
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    gold = [
        ["B-PER", "I-PER", "O", "B-LOC", "O"],
        ["B-ORG", "O", "B-MISC", "I-MISC", "I-MISC"],
        ["O", "B-LOC", "I-LOC", "O"],
        ["B-PER", "O", "B-ORG", "I-ORG"],
    ]
    predicted = [
        ["B-PER", "I-PER", "O", "B-ORG", "O"],  # a person right, a location typed wrong
        ["B-ORG", "O", "B-MISC", "I-MISC", "O"],  # the MISC span cut short
        ["O", "I-LOC", "I-LOC", "O"],  # an I- after O: seqeval starts an entity there (and it matches)
        ["B-PER", "B-PER", "B-ORG", "I-ORG"],  # one extra person
    ]
    task = task_for(CONLL_TAGS)
    sums = [task.empty_sums()] * 2  # two "ranks": each evaluates two sentences, one batch each
    for rank in range(2):
        rows = range(2 * rank, 2 * rank + 2)
        length = 1 + max(len(gold[r]) for r in rows) + 1  # [CLS] ... [SEP] and padding
        labels = torch.full((2, length), X)
        logits = torch.zeros((2, length, len(CONLL_TAGS)))
        for i, r in enumerate(rows):
            labels[i, 1 : 1 + len(gold[r])] = torch.tensor(ids(*gold[r]))
            logits[i, 1 : 1 + len(predicted[r])] = torch.nn.functional.one_hot(
                torch.tensor(ids(*predicted[r])), len(CONLL_TAGS)
            ).float()
        outputs = SimpleNamespace(logits=logits, loss=torch.tensor(0.5))
        sums[rank] = sums[rank] + task.eval_sums(outputs, {"labels": labels})
    total = EvalSums().with_values([a + b for a, b in zip(sums[0].values(), sums[1].values(), strict=True)])
    metrics = task.eval_metrics(total)
    assert metrics["f1"] == pytest.approx(f1_score(gold, predicted))
    assert metrics["precision"] == pytest.approx(precision_score(gold, predicted))
    assert metrics["recall"] == pytest.approx(recall_score(gold, predicted))
    report = classification_report(gold, predicted, output_dict=True, zero_division=0)
    for kind in ("PER", "ORG", "LOC", "MISC"):
        assert metrics[f"f1/{kind}"] == pytest.approx(report[kind]["f1-score"]), kind
        assert metrics[f"precision/{kind}"] == pytest.approx(report[kind]["precision"]), kind
        assert metrics[f"recall/{kind}"] == pytest.approx(report[kind]["recall"]), kind
    words = sum(len(row) for row in gold)
    right = sum(g == p for gs, ps in zip(gold, predicted, strict=True) for g, p in zip(gs, ps, strict=True))
    assert metrics["accuracy"] == pytest.approx(right / words)
    assert 0 < metrics["f1"] < 1


def test_a_tag_set_without_entities_scores_token_accuracy() -> None:
    task = task_for(["NOUN", "VERB", "DET"])
    assert task.metric_name == "accuracy" and task.empty_sums().counts == ()


# --- bad input: one line, exit 2, nothing half-written ---------------------------------------------------------


def ner_stage_args(train: Path, out: Path) -> list[str]:
    return [
        f"output_dir={out}",
        f"stages.0.data.train={train}",
        f"stages.0.data.eval={SAMPLE}",
        f"stages.0.data.labels={json.dumps(CONLL_TAGS)}",
    ]


def prepare_first_stage(train: Path, out: Path) -> None:
    from launcher.data.prepare import prepare_stage
    from launcher.jobspec.load import load_spec

    spec = load_spec(ROOT / JOB, ner_stage_args(train, out))
    prepare_stage(spec, 0)


BAD = {
    "lengths.jsonl": (
        '{"tokens": ["Paris", "is", "big"], "tags": ["B-LOC", "O", "O"]}\n'
        '{"tokens": ["Rome", "is", "old"], "tags": ["B-LOC", "O"]}\n',
        "lengths.jsonl: line 2",
        "field 'tokens' has 3 words but field 'tags' has 2 tags",
    ),
    "unknown.conll": ("Paris B-LOC\nis O\n\nACME B-COMPANY\n", "unknown.conll: line 4", "tag 'B-COMPANY' is not in"),
    "iob1.conll": ("-DOCSTART- O\n\nin O\nNew I-LOC\nYork I-LOC\n", "iob1.conll: line 4", "tag 'I-LOC' follows 'O'"),
    "mixed.jsonl": (
        '{"tokens": ["New", "York"], "tags": ["B-ORG", "I-LOC"]}\n',
        "mixed.jsonl: line 1",
        "tag 'I-LOC' follows 'B-ORG'",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_named_and_nothing_is_written(name: str, tmp_path: Path) -> None:
    text, place, what = BAD[name]
    bad = tmp_path / name
    bad.write_text(text)
    with pytest.raises(UserError) as caught:
        prepare_first_stage(bad, tmp_path / "runs")
    message = str(caught.value)
    assert place in message and what in message and "\n" not in message
    stage_dir = tmp_path / "runs" / "ner" / "ner-minilm"
    assert not (stage_dir / "data").exists() and not list(stage_dir.glob(".data-*")), "nothing half-written"


def test_bad_input_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "lengths.jsonl"
    bad.write_text(BAD["lengths.jsonl"][0])
    result = run_cli("prepare", JOB, *ner_stage_args(bad, tmp_path / "runs"))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "lengths.jsonl: line 2" in lines[0] and "data.tags_field" in lines[0]


def test_conll_reads_the_last_column_and_skips_docstart(tmp_path: Path) -> None:
    from launcher.data.corpus import Chunk
    from launcher.data.token_labels import iter_sentences

    path = tmp_path / "three.conll"
    path.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n \nPeter NNP B-NP B-PER\n")
    sentences = [label for _, label in iter_sentences(Chunk(str(path), "conll"), tag_fields())]
    assert sentences == [(["EU", "rejects"], ids("B-ORG", "O")), (["Peter"], ids("B-PER"))]
    fixture = list(iter_sentences(Chunk(str(SAMPLE), "conll"), tag_fields()))
    assert 30 <= len(fixture) <= 60, "the hand-checked sample parses and passes the IOB2 check"


# --- a tiny run of the shipped job ------------------------------------------------------------------------------


def tiny_overrides(out: Path) -> list[str]:
    """jobs/ner.yaml shrunk: the hand-checked sample as train and eval, a few steps per stage."""
    args = [f"output_dir={out}", "cluster.num_workers=0"]
    for stage in (0, 2, 3):
        args += [
            f"stages.{stage}.data.train={SAMPLE}",
            f"stages.{stage}.data.eval={SAMPLE}",
            f"stages.{stage}.data.labels={json.dumps(CONLL_TAGS)}",
            f"stages.{stage}.data.seq_len=48",
            f"stages.{stage}.batch.global_batch_size=16",
            f"stages.{stage}.batch.micro_batch_size=16",
            f"stages.{stage}.max_steps=3",
            f"stages.{stage}.checkpoint_every=0",  # one checkpoint, at the end
        ]
    args += [
        "stages.1.max_steps=2",
        "stages.1.data.seq_len=32",
        "stages.1.data.max_train_samples=300",
        "stages.1.data.max_eval_samples=20",
        "stages.1.tokenizer.vocab_size=800",
        "stages.1.batch.global_batch_size=16",
        "stages.1.batch.micro_batch_size=16",
        "stages.1.eval_every=0",
        "stages.1.schedule.warmup_steps=0",
    ]
    for stage in (1, 3):
        args += [f"stages.{stage}.model.hidden_size=32", f"stages.{stage}.model.intermediate_size=64"]
    return args


@pytest.fixture(scope="module")
def tiny_ner(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    result = run_cli("run", JOB, "--local", *tiny_overrides(out))
    assert_ok(result)
    yield out / "ner"
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.slow
def test_tiny_ner_run_trains_and_reports_entity_f1(tiny_ner: Path) -> None:
    for stage in ("ner-minilm", "ner-pretrained", "ner-scratch"):
        summary = json.loads((tiny_ner / stage / "summary.json").read_text())
        assert summary["steps"] == 3
        assert {"loss", "accuracy", "precision", "recall", "f1", "f1/PER", "f1/LOC"} <= set(summary["eval"])
        assert 0.0 <= summary["eval"]["f1"] <= 1.0 and 0.0 < summary["eval"]["accuracy"] <= 1.0


@pytest.mark.slow
def test_tiny_ner_export_loads_in_the_pipeline_with_the_label_names(tiny_ner: Path) -> None:
    from transformers import AutoConfig, pipeline

    for stage in ("ner-minilm", "ner-scratch"):
        export = tiny_ner / stage / "model"
        config = AutoConfig.from_pretrained(export)
        assert config.id2label == dict(enumerate(CONLL_TAGS))
        assert config.label2id == {tag: i for i, tag in enumerate(CONLL_TAGS)}
        tagger = pipeline("token-classification", model=str(export), aggregation_strategy="simple", ignore_labels=[])
        answer = tagger("Angela Merkel met Emmanuel Macron in Berlin.")
        assert answer, "every word gets a group when no label is ignored"
        assert {group["entity_group"] for group in answer} <= {"O", "PER", "ORG", "LOC", "MISC"}


def test_prepared_tags_are_cached_and_label_all_subtokens_prepares_again(tmp_path: Path) -> None:
    from launcher.data.prepare import prepare_stage, read_meta
    from launcher.data.store import TaggedDataset, TokenStore
    from launcher.jobspec.load import load_spec

    out = tmp_path / "runs"
    first = load_spec(ROOT / JOB, ner_stage_args(SAMPLE, out))
    prepare_stage(first, 0)
    data = out / "ner" / "ner-minilm" / "data"
    key = read_meta(first, first.stages[0])["fingerprint"]
    before = [TaggedDataset(TokenStore.read(data, "eval"))[i]["labels"] for i in range(3)]
    prepare_stage(load_spec(ROOT / JOB, ner_stage_args(SAMPLE, out)), 0)
    assert read_meta(first, first.stages[0])["fingerprint"] == key, "unchanged inputs: reused"
    every = load_spec(ROOT / JOB, [*ner_stage_args(SAMPLE, out), "stages.0.data.label_all_subtokens=true"])
    prepare_stage(every, 0)
    assert read_meta(every, every.stages[0])["fingerprint"] != key
    after = [TaggedDataset(TokenStore.read(data, "eval"))[i]["labels"] for i in range(3)]
    for old, new in zip(before, after, strict=True):
        assert len(old) == len(new) and (new != X).sum() >= (old != X).sum()
        assert (old[old != X] == new[old != X]).all(), "first sub-tokens keep their tags"
    assert sum((new != X).sum() for new in after) > sum((old != X).sum() for old in before), "later pieces labelled"


# The tiny shared job with its fine-tuning stage made an NER stage on the hand-checked sample; the stop
# falls inside that stage (pre-training ends at step 2), with eval and checkpoints not aligned with it.
# One global batch for every run: --local accumulates 2 micro-batches where 2 Ray workers take one each.
NER_ARGS = [
    "jobs/debug/tiny.yaml", "--local", "stages.0.model.dropout=0.1", "stages.0.max_steps=2",
    "stages.1.task=token_classification", f"stages.1.data.train={SAMPLE}", f"stages.1.data.eval={SAMPLE}",
    f"stages.1.data.labels={json.dumps(CONLL_TAGS)}", "stages.1.max_steps=7", "stages.1.eval_every=2",
    "stages.1.checkpoint_every=4",
    "stages.0.batch.micro_batch_size=4", "stages.0.batch.grad_accum_steps=null", "stages.0.batch.global_batch_size=8",
    "stages.1.batch.grad_accum_steps=null", "stages.1.batch.global_batch_size=16",
]  # fmt: skip


@pytest.fixture(scope="module")
def ner_runs(tmp_path_factory) -> Iterator[tuple[Path, Path]]:
    """One preparation (its tokenizer is trained once: training is not deterministic across processes) and the
    uninterrupted --local run, shared by the resume and the 2-worker comparisons below."""
    root = tmp_path_factory.mktemp("ner")
    prepared, straight = root / "prepared", root / "straight"
    assert_ok(run_cli("prepare", *NER_ARGS, f"output_dir={prepared}"))
    shutil.copytree(prepared, straight)
    assert_ok(run_cli("run", *NER_ARGS, f"output_dir={straight}"))
    yield prepared, straight / "tiny" / "finetune"
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_stopped_and_resumed_ner_run_matches_uninterrupted(ner_runs: tuple[Path, Path], tmp_path: Path) -> None:
    from launcher.coordinator.driver import EXIT_STOPPED
    from launcher.hooks import STOP_AFTER_STEP_ENV
    from tests.conftest import read_jsonl

    prepared, straight = ner_runs
    resumed = tmp_path / "resumed"
    shutil.copytree(prepared, resumed)
    stopped = run_cli("run", *NER_ARGS, f"output_dir={resumed}", env={STOP_AFTER_STEP_ENV: "3"})
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(resumed / "tiny" / "finetune" / "metrics.jsonl")][-1] == 3
    assert_ok(run_cli("run", *NER_ARGS, f"output_dir={resumed}"))
    expected = read_jsonl(straight / "metrics.jsonl")
    got = read_jsonl(resumed / "tiny" / "finetune" / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(1, 8))
    for want, have in zip(expected, got, strict=True):
        for key in ("train/loss", "train/lr", "eval/loss", "eval/f1", "eval/accuracy"):
            if key in want:
                assert abs(want[key] - have[key]) <= 1e-6, (want["step"], key, want[key], have[key])
    assert "eval/f1" in expected[-1]
    summary = json.loads((resumed / "tiny" / "finetune" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 7


@pytest.mark.slow
@pytest.mark.ray
def test_two_ray_workers_take_the_local_runs_steps(
    ner_runs: tuple[Path, Path], ray_cluster: RayHead, tmp_path: Path
) -> None:
    """Eval sums (entity counts per type) all-reduced over 2 ranks give the figures of one process."""
    from tests.conftest import read_jsonl

    prepared, straight = ner_runs
    ray = tmp_path / "ray"
    shutil.copytree(prepared, ray)
    workers = [arg for arg in NER_ARGS if arg != "--local"]
    assert_ok(run_cli("run", *workers, "cluster.num_workers=2", f"output_dir={ray}", env=on_ray(ray_cluster)))
    expected = read_jsonl(straight / "metrics.jsonl")
    got = read_jsonl(ray / "tiny" / "finetune" / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(1, 8))
    for want, have in zip(expected, got, strict=True):
        for key in ("train/loss", "eval/loss"):
            if key in want:
                assert have[key] == pytest.approx(want[key], abs=1e-4), (want["step"], key)
    for key in ("eval/f1", "eval/precision", "eval/recall", "eval/accuracy", "eval/f1/PER"):
        assert got[-1][key] == pytest.approx(expected[-1][key], abs=1e-6), key


def test_a_tagger_of_another_tag_set_is_refused_as_the_start(tmp_path: Path) -> None:
    """A token-classification export of 3 tags cannot start a stage of 21: one line naming data.labels."""
    from safetensors.numpy import save_file

    from launcher.coordinator.start_check import check_start
    from launcher.jobspec.load import load_spec

    start = tmp_path / "tagger"
    start.mkdir()
    save_file({"classifier.weight": np.zeros((3, 4), dtype=np.float32)}, str(start / "model.safetensors"))
    config = {"model_type": "bert", "architectures": ["BertForTokenClassification"], "vocab_size": 40000,
              "max_position_embeddings": 512, "id2label": {"0": "O", "1": "B-PER", "2": "I-PER"}}  # fmt: skip
    (start / "config.json").write_text(json.dumps(config))
    spec = load_spec(ROOT / JOB, [f"stages.0.init_from={start}"])
    with pytest.raises(UserError, match=r"^stages.0.data.labels: 21 labels, but the model in .* is a classifier of 3"):
        check_start(spec, 0, vocab_size=30522)
    config["id2label"] = {str(i): tag for i, tag in enumerate(spec.stages[0].data.labels)}
    (start / "config.json").write_text(json.dumps(config))
    check_start(spec, 0, vocab_size=30522)  # the same tag count: its head is kept
