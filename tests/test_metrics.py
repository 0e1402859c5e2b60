"""Metrics writer: jsonl per logged step, truncation on resume, console lines for every kind of step."""

from __future__ import annotations

import math

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


def test_gpu_peak_table_matches_whole_model_names() -> None:
    from launcher.metrics import gpu_peak_flops

    assert gpu_peak_flops("NVIDIA L40S", "bf16") == (362e12, "table (L40S)"), "not the L4's figure"
    assert gpu_peak_flops("NVIDIA L4", "bf16") == (121e12, "table (L4)")
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "fp32") == (67e12, "table (H100)")
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", "bf16")[0] == 312e12
    peak, source = gpu_peak_flops("Tesla V100-SXM2-16GB", "bf16")
    assert math.isnan(peak) and source == "V100 has no bf16 arithmetic"
    assert gpu_peak_flops("Tesla V100-SXM2-16GB", "fp16")[0] == 125e12
    peak, source = gpu_peak_flops("NVIDIA GeForce RTX 4090", "bf16")
    assert math.isnan(peak) and "unknown GPU" in source
