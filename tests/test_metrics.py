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


def _result(stage: str, task: str, evals: dict, reference: dict):
    from launcher.contract import StageResult

    return StageResult(
        stage=stage, task=task, steps=10, tokens=1000, wall_s=1.0, train_loss=0.5, eval=evals, reference=reference,
        world_size=1, global_batch_size=32, zero_stage=0, precision="fp32", num_params=10, optimizer_state_bytes=80,
        fp32_master_bytes=0, flops_per_token=60.0, peak_flops_per_device=1e9, peak_flops_source="measured",
        init_from=None, resumed_from_step=None, process_s=2.0, peak_memory_bytes=1,
    )  # fmt: skip


def _demo_summaries(accuracy: dict[str, float], majority: float = 0.579) -> list:
    rows = [_result("pretrain", "mlm", {"loss": 5.8}, {})]
    rows += [
        _result(name, "classification", {"loss": 0.5, "accuracy": acc}, {"majority_accuracy": majority})
        for name, acc in accuracy.items()
    ]
    return rows


def _demo_spec(minilm: bool = True):
    from launcher.jobspec.load import load_spec
    from tests.conftest import ROOT

    spec = load_spec(ROOT / "jobs" / "demo.yaml", [])
    if not minilm:
        spec.stages = [s for s in spec.stages if s.name != "minilm"]
    return spec


def test_ladder_ranks_the_starts_and_says_who_wins_from_the_figures() -> None:
    """The demo's ladder: majority class, then each fine-tuning by test accuracy, and one sentence computed
    from the figures (which start wins and by how much; our pre-training against from scratch)."""
    from launcher.metrics.ladder import render_ladder

    spec = _demo_spec()
    lines = render_ladder(spec, _demo_summaries({"finetune": 0.6540, "baseline": 0.6910, "minilm": 0.7850}))
    assert lines[0] == "test accuracy on data/demo/test.csv:"
    assert lines[1].startswith("  majority class") and lines[1].endswith("0.5790")
    assert [line.split()[-1] for line in lines[2:5]] == ["minilm", "baseline", "finetune"], "ranked"
    assert "random initialisation" in lines[3] and "our pre-training" in lines[4] and "250 labels" in lines[4]
    assert lines[-1] == (
        "Pretrained all-minilm-l6-v2 (minilm) wins by 9.4 points over random initialisation (baseline); "
        "our pre-training loses to training from scratch by 3.7 points."
    )
    lines = render_ladder(spec, _demo_summaries({"finetune": 0.7010, "baseline": 0.6910, "minilm": 0.5790}))
    assert lines[-1] == (
        "Our pre-training (finetune) wins by 1.0 point over random initialisation (baseline); "
        "minilm is no better than the majority class."
    )
    lines = render_ladder(spec, _demo_summaries({"finetune": 0.7010, "baseline": 0.6910, "minilm": 0.7850}))
    assert lines[-1].endswith(
        "over our pre-training (finetune); our pre-training beats training from scratch by 1.0 point."
    )


def test_ladder_needs_two_comparable_classification_stages() -> None:
    from launcher.metrics.ladder import render_ladder

    spec = _demo_spec(minilm=False)
    assert render_ladder(spec, _demo_summaries({"finetune": 0.70})) == [], "one stage: nothing to compare"
    assert render_ladder(spec, _demo_summaries({"finetune": 0.70, "baseline": 0.70}))[-1] == (
        "Our pre-training (finetune) and random initialisation (baseline) tie at 0.700."
    )


def test_mfu_is_taken_against_the_peak_of_what_ran_and_never_logged_above_100_percent(capsys) -> None:
    """The peak is measured in the dtype the model computes in, with its matmul shapes; an MFU above 100% (a
    peak measured low on a busy CPU) is measured again, and if still above, logged as NaN with one warning."""
    import math
    from types import SimpleNamespace

    import torch

    from launcher.metrics import compute_precision, matmul_shapes, measure_cpu_peak_flops
    from launcher.worker.loop import Loop

    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 32), torch.nn.Linear(32, 8))
    assert compute_precision(model) == "fp32" and compute_precision(model.to(torch.bfloat16)) == "bf16"
    assert matmul_shapes(model, 64) == [(64, 32, 8), (64, 8, 32)]
    assert measure_cpu_peak_flops("fp32", [(64, 8, 32)], repeats=1) > 1e6

    def loop(peak: float, remeasured: float | None) -> SimpleNamespace:
        measure = None if remeasured is None else (lambda: remeasured)
        ctx, stage = SimpleNamespace(world_size=2, is_main=True), SimpleNamespace(name="s")
        return SimpleNamespace(flops_per_token=10.0, peak_flops=peak, measure_peak=measure, _mfu_warned=False,
                               ctx=ctx, stage=stage)  # fmt: skip

    fine = loop(1000.0, None)
    assert Loop._mfu(fine, 100.0) == 0.5
    remeasured = loop(100.0, 4000.0)
    assert Loop._mfu(remeasured, 100.0) == 0.125 and remeasured.peak_flops == 4000.0
    still = loop(100.0, 200.0)
    assert math.isnan(Loop._mfu(still, 100.0)) and math.isnan(Loop._mfu(still, 100.0))
    assert capsys.readouterr().out.count("is above 100%") == 1
