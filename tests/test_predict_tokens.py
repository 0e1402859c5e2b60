"""`launcher predict` with a token-classification export: word tags and entity spans, the spans equal to
transformers' `pipeline("token-classification", aggregation_strategy=...)` on the same sentences, locally and on
Ray Data, in the input's order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import assert_ok, on_ray, run_cli
from tests.test_token_classification import JOB, SAMPLE, tiny_overrides


@pytest.fixture(scope="module")
def tagged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """jobs/ner.yaml's MiniLM stage, shrunk (3 steps): the predictions only need to be the model's."""
    out = tmp_path_factory.mktemp("tagger")
    assert_ok(run_cli("run", JOB, "--local", "--stage", "ner-minilm", *tiny_overrides(out)))
    return out


def _sentences(folder: Path) -> tuple[Path, list[str]]:
    """The hand-checked CoNLL sample's sentences as text (words joined by spaces), with an id column."""
    sentences, words = [], []
    for line in [*SAMPLE.read_text().splitlines(), ""]:
        if line.strip() and not line.startswith("-DOCSTART-"):
            words.append(line.split()[0])
        elif words:
            sentences.append(" ".join(words))
            words = []
    path = folder / "sentences.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": text}) + "\n" for i, text in enumerate(sentences)))
    return path, sentences


def _check(rows: list[dict], model_dir: Path, texts: list[str], aggregation: str, max_length: int | None) -> None:
    from transformers import pipeline

    assert [int(row["id"]) for row in rows] == list(range(len(texts))), "one row per input, in the input's order"
    tagger = pipeline("token-classification", model=str(model_dir), aggregation_strategy=aggregation, device="cpu")
    if max_length:  # the pipeline truncates at the tokenizer's limit: the stage's seq_len, as predict does
        tagger.tokenizer.model_max_length = max_length
    expected = tagger(texts)
    found = 0
    for row, answer, text in zip(rows, expected, texts, strict=True):
        entities = json.loads(row["predicted_entities"])
        assert [(e["entity_group"], e["word"], e["start"], e["end"]) for e in entities] == [
            (e["entity_group"], e["word"], e["start"], e["end"]) for e in answer
        ], (text, entities, answer)
        assert all(abs(e["score"] - float(a["score"])) < 1e-5 for e, a in zip(entities, answer, strict=True))
        tags = json.loads(row["predicted_tags"])
        # a tag per word (as the tokenizer splits words: `20,000` is three), covering the text
        assert "".join(word for word, _ in tags) == text.replace(" ", "") and all(tag for _, tag in tags)
        found += len(entities)
    assert found > 0, "the comparison covers some entities"


@pytest.mark.slow
def test_token_predict_local_equals_the_pipeline(tagged: Path, tmp_path: Path) -> None:
    path, texts = _sentences(tmp_path)
    export = tagged / "ner" / "ner-minilm" / "model"
    for aggregation in ("first", "simple"):
        out = tmp_path / aggregation
        assert_ok(run_cli("predict", str(export), "--input", str(path), "--output", str(out), "--local",
                          "--batch-size", "8", "--aggregation", aggregation))  # fmt: skip
        rows = [json.loads(line) for line in (out / "sentences.jsonl").read_text().splitlines()]
        _check(rows, export, texts, aggregation, None)


@pytest.mark.slow
@pytest.mark.ray
def test_token_predict_on_ray_data_keeps_order_and_equals_the_pipeline(ray_cluster, tagged: Path, tmp_path) -> None:
    path, texts = _sentences(tmp_path)
    out = tmp_path / "ray"
    result = run_cli("predict", JOB, *tiny_overrides(tagged), "cluster.num_workers=2", "--stage", "ner-minilm",
                     "--input", str(path), "--output", str(out), env=on_ray(ray_cluster))  # fmt: skip
    assert_ok(result)
    assert "on 2 Ray actor(s)" in result.stdout
    rows = [json.loads(line) for line in (out / "sentences.jsonl").read_text().splitlines()]
    _check(rows, tagged / "ner" / "ner-minilm" / "model", texts, "first", 48)  # the stage's seq_len
