"""`launcher predict`: the export over new files, equal to `transformers.pipeline`, locally and on Ray Data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, assert_ok, run_cli

ROWS = 200


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny job's fine-tuned export (a few steps: the predictions only need to be the model's)."""
    out = tmp_path_factory.mktemp("predict")
    assert_ok(run_cli("run", str(TINY), "--local", f"output_dir={out}", "stages.1.max_steps=6"))
    return out


def _reviews(folder: Path) -> tuple[Path, list[str]]:
    """The first ROWS test reviews as jsonl, with an id column the output must keep."""
    with (ROOT / "data" / "demo" / "test.csv").open() as stream:
        rows = [row for _, row in zip(range(ROWS), csv.DictReader(stream), strict=False)]
    path = folder / "reviews.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": row["text"]}) + "\n" for i, row in enumerate(rows)))
    return path, [row["text"] for row in rows]


def _pipeline_scores(model_dir: Path, texts: list[str], max_length: int | None) -> list[dict[str, float]]:
    """What a user gets from `pipeline`, truncating as predict does (to the stage's seq_len, or the tokenizer's)."""
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(model_dir), top_k=None, device="cpu")
    kwargs = {"truncation": True} | ({"max_length": max_length} if max_length else {})
    return [{item["label"]: item["score"] for item in answer} for answer in classify(texts, batch_size=32, **kwargs)]


def _check_against_pipeline(rows: list[dict], model_dir: Path, texts: list[str], max_length: int | None) -> None:
    assert [int(row["id"]) for row in rows] == list(range(ROWS)), "one row per input, in the input's order"
    expected = _pipeline_scores(model_dir, texts, max_length)
    for row, scores in zip(rows, expected, strict=True):
        assert row["predicted_label"] == max(scores, key=scores.get)
        for label, score in scores.items():
            assert abs(float(row[f"score_{label}"]) - score) < 1e-5, (row, scores)
        assert abs(float(row["predicted_score"]) - max(scores.values())) < 1e-5


@pytest.mark.slow
def test_predict_local_equals_the_pipeline(trained: Path, tmp_path: Path) -> None:
    path, texts = _reviews(tmp_path)
    out = tmp_path / "out"
    result = run_cli("predict", str(TINY), f"output_dir={trained}", "--stage", "finetune", "--input", str(path),
                     "--output", str(out), "--local", "--batch-size", "16")  # fmt: skip
    assert_ok(result)
    rows = [json.loads(line) for line in (out / "reviews.jsonl").read_text().splitlines()]
    _check_against_pipeline(rows, trained / "tiny" / "finetune" / "model", texts, 32)  # the stage's seq_len
    assert not list(out.glob("*.partial"))
    # An export folder works alone too, and csv comes back as csv.
    as_csv = tmp_path / "reviews.csv"
    with as_csv.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["id", "text"])
        writer.writerows(enumerate(texts))
    export = trained / "tiny" / "finetune" / "model"
    assert_ok(run_cli("predict", str(export), "--input", str(as_csv), "--output", str(tmp_path / "csv")))
    with (tmp_path / "csv" / "reviews.csv").open() as stream:
        _check_against_pipeline(list(csv.DictReader(stream)), export, texts, 64)  # max_position_embeddings


@pytest.mark.slow
@pytest.mark.ray
def test_predict_on_ray_data_keeps_order_and_equals_local(trained: Path, tmp_path: Path) -> None:
    """Two model actors on a private Ray: the same rows, in the input's order, as the pipeline gives."""
    path, texts = _reviews(tmp_path)
    out = tmp_path / "ray"
    result = run_cli("predict", str(TINY), f"output_dir={trained}", "cluster.num_workers=2", "--stage", "finetune",
                     "--input", str(path), "--output", str(out), env={"RAY_ADDRESS": ""})  # fmt: skip
    assert_ok(result)
    assert "on 2 Ray actor(s)" in result.stdout
    rows = [json.loads(line) for line in (out / "reviews.jsonl").read_text().splitlines()]
    _check_against_pipeline(rows, trained / "tiny" / "finetune" / "model", texts, 32)


@pytest.mark.slow  # CLI subprocesses (torch imports): kept out of the quick tier
def test_predict_user_errors_are_one_line(tmp_path: Path) -> None:
    """A missing text field names the file and line; a folder that is not an export, an unknown stage and a
    stage that has not run are refused before anything loads."""
    from tests.conftest import ROOT as root

    minilm = next(p for p in (root / "data" / "models").glob("*") if (p / "config.json").is_file()) if (
        root / "data" / "models").is_dir() else None  # fmt: skip
    cases = [
        (["predict", str(tmp_path), "--input", "x.jsonl", "--output", str(tmp_path / "o")],
         "not an exported model (no config.json)"),
        (["predict", str(TINY), "--stage", "nope", "--input", "x.jsonl", "--output", "o"], "--stage: no stage 'nope'"),
        (["predict", str(TINY), f"output_dir={tmp_path}", "--stage", "finetune", "--input", "x.jsonl", "--output",
          "o"], "--stage: finetune has no export"),
    ]  # fmt: skip
    if minilm is not None:  # a pretrained encoder without a classification head
        cases.append((["predict", str(minilm), "--input", "x.jsonl", "--output", "o"], "sequence-classification"))
    for args, message in cases:
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.slow
def test_predict_names_the_line_without_text(trained: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"review": "no text field"}\n')
    out = tmp_path / "out"
    result = run_cli("predict", str(trained / "tiny" / "finetune" / "model"), "--input", str(path), "--output",
                     str(out))  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: {path}: line 3: no text in field 'text'"
    assert not (out / "bad.jsonl").exists() and not list(out.glob("*.partial")), "nothing half-written"
