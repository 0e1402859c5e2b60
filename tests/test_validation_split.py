"""data.validation_fraction: a seeded, stratified validation split carved from the training labels; the eval set
becomes the test set, scored once on the export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from launcher.data.validation import carve
from launcher.errors import UserError
from launcher.jobspec.load import load_spec
from tests.conftest import TINY, assert_ok, run_cli


def test_the_carve_keeps_each_labels_share_and_is_the_same_for_the_same_seed() -> None:
    labels = np.random.default_rng(7).permutation(np.array([0] * 60 + [1] * 30 + [2] * 10))
    held = carve(len(labels), 0.2, 0, labels, "f")
    assert len(held) == 20 and np.all(np.diff(held) > 0), "sorted, distinct indices"
    assert np.bincount(labels[held], minlength=3).tolist() == [12, 6, 2], "each label's share of the training set"
    assert np.array_equal(held, carve(len(labels), 0.2, 0, labels, "f")), "the same seed, the same split"
    assert not np.array_equal(held, carve(len(labels), 0.2, 1, labels, "f")), "another seed, another split"
    unlabeled = carve(50, 0.1, 0, None, "f")  # token_classification: seeded, not stratified
    assert len(unlabeled) == 5 and np.array_equal(unlabeled, carve(50, 0.1, 0, None, "f"))


def test_a_carve_that_cannot_keep_every_label_is_refused_naming_the_field() -> None:
    with pytest.raises(UserError, match=r"^stages\.1\.data\.validation_fraction: 0\.1 of 11 training documents"):
        carve(11, 0.1, 0, np.array([0] * 10 + [1]), "stages.1.data.validation_fraction")
    with pytest.raises(UserError, match=r"stages\.0\.data\.validation_fraction: for classification"):
        load_spec(TINY, ["stages.0.data.validation_fraction=0.1"])


@pytest.mark.slow
def test_evaluation_reads_the_validation_split_and_the_test_set_scores_the_export(tmp_path: Path) -> None:
    from launcher.data.store import TokenStore

    out = tmp_path / "out"
    result = run_cli("run", str(TINY), "--local", f"output_dir={out}", "stages.1.data.validation_fraction=0.2",
                     "stages.1.eval_every=2", "stages.1.best_metric=accuracy")  # fmt: skip
    assert_ok(result)
    assert "data finetune: 160 train / 40 eval samples" in result.stdout  # 200 training reviews, 20% held out
    data = out / "tiny" / "finetune" / "data"
    held = np.load(data / "validation.npy")
    labels = TokenStore.read(data, "train").labels
    assert len(held) == 40 and abs(labels[held].mean() - labels.mean()) <= 1 / 40, "stratified by label"
    summary = json.loads((out / "tiny" / "finetune" / "summary.json").read_text())
    confusion = [v for k, v in summary["eval"].items() if k.startswith("confusion/")]
    assert sum(confusion) == 40, "evaluation during training read the 40 validation reviews"
    test = summary["test"]
    assert sum(v for k, v in test.items() if k.startswith("confusion/")) == 64, "the 64 test reviews, once"
    assert 0 <= test["accuracy"] <= 1 and f"test_accuracy {test['accuracy']:.4f}" in result.stdout
    assert "test set, the exported model" in result.stdout
