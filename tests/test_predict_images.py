"""`launcher predict` with an image-classification export: a table's image paths (relative to the table) or a folder
of images, equal to transformers' `pipeline("image-classification")` on the same files, locally and on Ray Data, in
the input's order; a missing or unreadable image names the table, its line and the file."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import assert_ok, on_ray, read_jsonl, run_cli
from tests.test_images import FASHION, JOB, fashion, write_idx

STAGE = 2  # jobs/vision-mae.yaml's vit-scratch: a small ViT image classifier from scratch
IMAGES = 24


def _overrides(out: Path, idx: Path) -> list[str]:
    """vit-scratch on 64 training and 32 test images, 2 steps: the predictions only need to be the model's."""
    s = f"stages.{STAGE}"
    return [
        f"output_dir={out}", f"{s}.data.train={idx / 'train-images-idx3-ubyte.gz'}",
        f"{s}.data.eval={idx / 't10k-images-idx3-ubyte.gz'}", f"{s}.data.max_train_samples=null", f"{s}.max_steps=2",
        f"{s}.batch.micro_batch_size=16", f"{s}.batch.global_batch_size=16", f"{s}.checkpoint_every=0",
        f"{s}.eval_every=0", f"{s}.schedule.warmup_steps=0",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[str], Path]]:
    """The job's overrides for a tiny trained vit-scratch export, and the export."""
    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST is not installed (`make data`)")
    out = tmp_path_factory.mktemp("image-predict")
    write_idx(out / "idx", "train", *fashion("train", 64))
    write_idx(out / "idx", "t10k", *fashion("t10k", 32))
    overrides = _overrides(out, out / "idx")
    assert_ok(run_cli("run", str(JOB), "--local", "--stage", "vit-scratch", *overrides))
    yield overrides, out / "vision-mae" / "vit-scratch" / "model"
    shutil.rmtree(out, ignore_errors=True)


def _images(folder: Path) -> tuple[Path, list[Path]]:
    """IMAGES test images as PNG files (every third in a subfolder, one given by its absolute path) and a jsonl
    table naming them, with an id column the output must keep; the files in the table's order."""
    from PIL import Image

    files, rows = [], []
    for i, pixels in enumerate(fashion("t10k", IMAGES)[0]):
        name = f"sub/{i:02d}.png" if i % 3 == 0 else f"{i:02d}.png"
        path = folder / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        files.append(path)
        rows.append({"id": i, "image": str(path) if i == 1 else name})
    table = folder / "images" / "table.jsonl"
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return table, files


def _check_against_pipeline(rows: list[dict], model_dir: Path, files: list[Path]) -> None:
    """One row per image, in order, with the label and every score the pipeline gives for the same file."""
    from transformers import pipeline

    classify = pipeline("image-classification", model=str(model_dir), device="cpu")
    expected = classify([str(f) for f in files], top_k=None, batch_size=8)
    assert len(rows) == len(expected) == len(files)
    for row, answer in zip(rows, expected, strict=True):
        scores = {item["label"]: item["score"] for item in answer}
        assert row["predicted_label"] == max(scores, key=scores.get)
        assert abs(float(row["predicted_score"]) - max(scores.values())) < 1e-5
        for label, score in scores.items():
            assert abs(float(row[f"score_{label}"]) - score) < 1e-5, (row, scores)


@pytest.mark.slow
def test_image_predict_local_equals_the_pipeline(classifier: tuple[list[str], Path], tmp_path: Path) -> None:
    _, export = classifier
    table, files = _images(tmp_path)
    out = tmp_path / "out"
    assert_ok(run_cli("predict", str(export), "--input", str(table), "--output", str(out), "--local",
                      "--batch-size", "5"))  # fmt: skip
    rows = read_jsonl(out / "table.jsonl")
    assert [row["id"] for row in rows] == list(range(IMAGES)), "one row per input, in the input's order"
    assert rows[3]["image"] == "sub/03.png", "the input's columns as they were"
    _check_against_pipeline(rows, export, files)
    # The images themselves: a folder, searched recursively, into one predictions.jsonl in sorted path order.
    folder_out = tmp_path / "folder"
    assert_ok(run_cli("predict", str(export), "--input", str(tmp_path / "images"), "--output", str(folder_out),
                      "--local", "--batch-size", "7"))  # fmt: skip
    rows = read_jsonl(folder_out / "predictions.jsonl")
    assert [row["path"] for row in rows] == [str(f) for f in sorted(files)]
    _check_against_pipeline(rows, export, sorted(files))
    assert not list(out.glob("*.partial")) and not list(folder_out.glob("*.partial"))


def _on_ray(head: Any, overrides: list[str], inputs: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`launcher predict` of the job's vit-scratch stage on 2 Ray actors of the shared head."""
    return run_cli("predict", str(JOB), *overrides, "cluster.num_workers=2", "--stage", "vit-scratch", "--input",
                   inputs, "--output", str(out), *extra, env=on_ray(head))  # fmt: skip


@pytest.mark.slow
@pytest.mark.ray
def test_image_predict_on_ray_data_keeps_order_and_equals_the_pipeline(
    ray_cluster, classifier: tuple[list[str], Path], tmp_path: Path
) -> None:
    """Two model actors on the shared Ray head, the job spec's stage: the table's rows in order, as the pipeline."""
    overrides, export = classifier
    table, files = _images(tmp_path)
    out = tmp_path / "ray"
    result = _on_ray(ray_cluster, overrides, str(table), out, "--batch-size", "4")
    assert_ok(result)
    assert "on 2 Ray actor(s)" in result.stdout
    rows = read_jsonl(out / "table.jsonl")
    assert [row["id"] for row in rows] == list(range(IMAGES)), "one row per input, in the input's order"
    _check_against_pipeline(rows, export, files)


def _damage(table: Path, how: str) -> Path:
    """Line 3 of the table names a file that is missing, or one that is not an image; the file as resolved."""
    rows = read_jsonl(table)
    name = "missing.png" if how == "missing" else "broken.png"
    if how == "unreadable":
        (table.parent / name).write_bytes(b"not a png at all")
    rows[2]["image"] = name
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return table.parent / name


@pytest.mark.slow
def test_a_bad_image_exits_2_naming_the_table_line_and_file(classifier: tuple[list[str], Path], tmp_path: Path) -> None:
    _, export = classifier
    table, _ = _images(tmp_path)
    for how, problem in (("missing", "no such image file"), ("unreadable", "not a readable image")):
        bad = _damage(table, how)
        out = tmp_path / how
        result = run_cli("predict", str(export), "--input", str(table), "--output", str(out), "--local")
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"error: {table}: line 3: {problem}: {bad}"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert not (out / "table.jsonl").exists() and not list(out.glob("*.partial")), "nothing half-written"


@pytest.mark.slow
@pytest.mark.ray
def test_a_bad_image_on_ray_names_the_table_line_and_file(
    ray_cluster, classifier: tuple[list[str], Path], tmp_path: Path
) -> None:
    overrides, _ = classifier
    table, _ = _images(tmp_path)
    bad = _damage(table, "unreadable")
    out = tmp_path / "ray"
    result = _on_ray(ray_cluster, overrides, str(table), out)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: {table}: line 3: not a readable image: {bad}" in result.stderr, result.stderr[-3000:]
    assert not (out / "table.jsonl").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_an_image_glob_on_ray_is_one_table_in_path_order(
    ray_cluster, classifier: tuple[list[str], Path], tmp_path: Path
) -> None:
    overrides, export = classifier
    _, files = _images(tmp_path)
    out = tmp_path / "ray"
    pattern = str(tmp_path / "images" / "*.png")  # the top folder's images; sub/ is not in the glob
    result = _on_ray(ray_cluster, overrides, pattern, out)
    assert_ok(result)
    rows = read_jsonl(out / "predictions.jsonl")
    expected = sorted(f for f in files if f.parent == tmp_path / "images")
    assert [row["path"] for row in rows] == [str(f) for f in expected]
    _check_against_pipeline(rows, export, expected)
