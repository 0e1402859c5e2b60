"""Ray Train coordinator: the tiny job with 2 DeepSpeed workers on a private loopback Ray."""

from __future__ import annotations

import json

import pytest

from tests.conftest import assert_ok, read_jsonl, run_cli

pytestmark = pytest.mark.ray


def test_tiny_with_two_ray_workers_zero2(tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    result = run_cli("run", "jobs/debug/tiny.yaml", f"output_dir={tmp_path}", "cluster.num_workers=2",
                     "deepspeed.zero_stage=2", "stages.0.max_steps=6", "stages.0.checkpoint_every=3",
                     env={"RAY_ADDRESS": ""})  # fmt: skip
    assert_ok(result)
    for stage in ("pretrain", "finetune"):
        summary = json.loads((tmp_path / "tiny" / stage / "summary.json").read_text())
        assert summary["world_size"] == 2
        assert summary["global_batch_size"] == 2 * 8 * (1 if stage == "pretrain" else 2)
    records = read_jsonl(tmp_path / "tiny" / "pretrain" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[-1]["train/loss"] < records[0]["train/loss"]
    checkpoints = sorted(p.name for p in (tmp_path / "tiny" / "pretrain" / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_00000003", "step_00000006"]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "tiny" / "finetune" / "model")
    assert model.config.num_labels == 2
