"""Metrics writer: jsonl per logged step, truncation on resume, console lines for every kind of step."""

from __future__ import annotations

from launcher.metrics import MetricsWriter
from tests.conftest import read_jsonl


def test_writer_logs_and_truncates_on_resume(tmp_path, capsys) -> None:
    writer = MetricsWriter(tmp_path, "stage", start_step=0, total_steps=4)
    for step in (1, 2, 3):
        writer.log(step, {"train/loss": 1.0 / step, "train/tokens_per_sec": 100.0})
        writer.progress(step, {"train/loss": 1.0 / step, "train/tokens_per_sec": 100.0})
    writer.progress(3, {"eval/loss": 0.5, "eval/accuracy": 0.75})  # an eval step that is not a log step
    writer.close()
    out = capsys.readouterr().out
    assert "[stage] step 3/4 eval/loss 0.5000 eval/accuracy 0.7500" in out
    assert "[stage] step 1/4 loss 1.0000 tok/s 100" in out
    resumed = MetricsWriter(tmp_path, "stage", start_step=2, total_steps=4)
    resumed.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
