"""The label-efficiency curve's runner (benchmarks/transfer_curve.py) on a tiny budget: real `launcher run`s."""

from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.conftest import ROOT


def curve(cache: Path, *args: str) -> subprocess.CompletedProcess:
    tiny = ["--pretrain-steps", "4", "--max-steps", "3", "--max-eval", "200", "--seeds", "0"]
    command = [sys.executable, "benchmarks/transfer_curve.py", "--cache", str(cache), *tiny, *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_curve_runner_writes_the_csv_and_a_readable_plot_and_replots_from_its_cache(tmp_path) -> None:
    from PIL import Image

    first = curve(tmp_path, "--starts", "random,demo", "--sizes", "40,80")
    assert "pre-training demo (4 steps)" in first.stdout
    with (tmp_path / "curve-test.csv").open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert {(r["start"], r["labels"]) for r in rows} == {(s, n) for s in ("random", "demo") for n in ("40", "80")}
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 and r["steps"] == "3" for r in rows)
    image = Image.open(tmp_path / "curve-test.png")
    assert image.size == (840, 540)
    low, high = image.convert("L").getextrema()
    assert high - low > 100, "something is drawn on it"
    assert "| random |" in first.stdout and "| demo |" in first.stdout, "the table"

    def stage_summaries() -> list[Path]:
        return sorted(p for p in (tmp_path / "points").rglob("summary.json") if p.parent.name == "finetune")

    points = stage_summaries()
    assert len(points) == 4
    assert not list((tmp_path / "points").rglob("model.safetensors")), "fine-tuned weights are not kept"
    again = curve(tmp_path, "--starts", "random,demo", "--sizes", "40,80")
    assert "pre-training" not in again.stdout, "the start is cached"
    assert [p.stat().st_mtime_ns for p in points] == [p.stat().st_mtime_ns for p in stage_summaries()], "none re-ran"
    (tmp_path / "curve-test.png").unlink()
    curve(tmp_path, "--plot-only")
    assert (tmp_path / "curve-test.png").is_file()

    # Settings are chosen on 10% carved from the labeled training reviews, not on the test set.
    # (and the ELECTRA-style start: jobs/transfer-rtd.yaml's rtd pre-training, its discriminator fine-tuned;
    # masked LM alone: the demo's pre-training with random token embeddings)
    validation = curve(tmp_path, "--starts", "rtd,mlm", "--sizes", "40", "--split", "validation")
    assert "validation accuracy" in validation.stdout and "pre-training rtd (4 steps)" in validation.stdout
    config = (tmp_path / "starts" / "rtd" / "transfer-rtd" / "pretrain" / "model" / "config.json").read_text()
    assert '"ElectraForPreTraining"' in config
    assert "pre-training mlm (4 steps)" in validation.stdout and "| mlm |" in validation.stdout
    # demo's token embeddings started from co-occurrence vectors (std 0.3); mlm's from random init (std 0.02)
    stds = []
    for start in ("demo", "mlm"):
        with safe_open(tmp_path / "starts" / start / "demo" / "pretrain" / "model" / "model.safetensors", "pt") as f:
            stds.append(float(f.get_tensor("bert.embeddings.word_embeddings.weight").std()))
    assert stds[0] > 0.15 and stds[1] < 0.05, stds
    assert (tmp_path / "curve-validation.csv").is_file() and (tmp_path / "points" / "validation").is_dir()

    # The learning rate is chosen per start; a point is cached per rate: another rate runs its own points, and
    # each start is tabulated at its own rate only.
    before = len(stage_summaries())
    curve(tmp_path, "--starts", "rtd,mlm", "--sizes", "40", "--split", "validation", "--lr", "1e-3,mlm=5e-4")
    assert len(stage_summaries()) == before + 1, "one new point: mlm at its own rate; rtd cached"
    with (tmp_path / "curve-validation.csv").open(newline="") as stream:
        rates = {(r["start"], r["lr"]) for r in csv.DictReader(stream)}
    assert rates == {("rtd", "0.001"), ("mlm", "0.0005")}, rates


@pytest.mark.slow
def test_image_curve_fine_tunes_the_mae_encoder_and_a_resnet_from_scratch(tmp_path) -> None:
    """--images: the same runner on Fashion-MNIST; the mae start is jobs/vision-mae.yaml's pre-training."""
    result = curve(tmp_path, "--images", "--starts", "mae,resnet", "--sizes", "100")
    assert "pre-training mae (4 steps)" in result.stdout and "| mae |" in result.stdout
    export = tmp_path / "starts" / "mae" / "vision-mae" / "pretrain" / "model"
    assert json.loads((export / "config.json").read_text())["architectures"] == ["ViTMAEForPreTraining"]
    with (tmp_path / "curve-test.csv").open(newline="") as stream:
        rows = {r["start"]: r for r in csv.DictReader(stream)}
    assert set(rows) == {"mae", "resnet"} and all(r["labels"] == "100" and r["steps"] == "3" for r in rows.values())
    with gzip.open("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz") as stream:
        first = list(stream.read(8 + 200)[8:])  # the 200 test images scored (--max-eval)
    majority = max(first.count(label) for label in set(first)) / 200
    assert all(float(r["majority"]) == pytest.approx(majority) for r in rows.values())
    points = [p for p in (tmp_path / "points").rglob("summary.json") if p.parent.name == "finetune"]
    summaries = {p.parts[-6]: json.loads(p.read_text()) for p in points}
    assert summaries["mae"]["init_from"] == str(export) and summaries["resnet"]["init_from"] is None
    assert summaries["mae"]["num_params"] > 1.5 * summaries["resnet"]["num_params"], "a ViT (0.54 M), a ResNet (0.31 M)"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--starts", "random,bert"], "argument --starts: unknown start 'bert'"),
        (["--starts", "demo-0x"], "argument --starts: unknown start 'demo-0x'"),
        (["--images", "--starts", "vit,demo"], "argument --starts: unknown start 'demo' (one of mae, mae-4x, vit,"),
        (["--sizes", "250,lots"], "argument --sizes: 'lots' is not a comma-separated list of whole numbers"),
        (["--seeds", "all"], "argument --seeds: 'all' is not a comma-separated list of whole numbers"),
        (["--lr", "fast"], "argument --lr: 'fast' is not RATE or START=RATE"),
        (["--lr", "minilm=2e-4"], "argument --lr: 'minilm=2e-4' names no rate for the other starts"),
        (["--lr", "1e-3,minlm=2e-4"], "argument --lr: unknown start 'minlm'"),
        (["--plot-only", "--lr", "0.123"], "no test points of random, demo, minilm at their --lr"),
    ],
)
def test_curve_runner_user_errors_name_the_flag_and_exit_2(tmp_path, args, message) -> None:
    command = [sys.executable, "benchmarks/transfer_curve.py", "--cache", str(tmp_path), *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
    usage, error = result.stderr.splitlines()[0], result.stderr.splitlines()[-1]
    assert usage.startswith("usage: transfer_curve.py") and error.startswith("transfer_curve.py: error: " + message)
    assert "Traceback" not in result.stderr and not list(tmp_path.iterdir()), "nothing ran"
