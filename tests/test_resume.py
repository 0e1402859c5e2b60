"""Resume is exact: a run stopped after k steps and re-run logs the same per-step losses (fp32, CPU)."""

from __future__ import annotations

import json
import shutil

import pytest

from launcher.coordinator.driver import EXIT_STOPPED
from launcher.hooks import STOP_AFTER_STEP_ENV
from tests.conftest import assert_ok, read_jsonl, run_cli

pytestmark = pytest.mark.slow  # full training runs of shipped jobs (not in `make test-fast`)

# Dropout on, accumulation on, eval and checkpoint cadence not aligned with the stop.
ARGS = ["jobs/debug/tiny.yaml", "--local", "stages.0.model.dropout=0.1", "stages.0.max_steps=10",
        "stages.0.batch.grad_accum_steps=2", "stages.0.checkpoint_every=4", "stages.0.eval_every=3",
        "stages.1.max_steps=6"]  # fmt: skip


# ZeRO-3 (partitioned weights and optimizer state) with the demo's co-occurrence embeddings and an
# embedding rate of their own: the restored run (its embeddings from the checkpoint, its scaled
# optimizer group) must take the straight run's steps.
EMBEDDINGS = ["stages.0.embedding_init.method=cooccurrence", "stages.0.optim.embedding_lr_scale=0.5"]


# ZeRO-2 once, with rtd (its two models and two losses): the masked LM runs under ZeRO-0 and ZeRO-3.
@pytest.mark.parametrize(("zero_stage", "task", "extra"), [(0, "mlm", []), (2, "rtd", []), (3, "mlm", EMBEDDINGS)])
def test_stopped_and_resumed_run_matches_uninterrupted(tmp_path, zero_stage, task, extra) -> None:
    args = [*ARGS, f"deepspeed.zero_stage={zero_stage}", f"stages.0.task={task}", *extra]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # One preparation for both runs: `tokenizers` breaks vocabulary ties in hash order, so two
    # fresh preparations may differ; the resumed run reuses its own preparation like any re-run.
    assert_ok(run_cli("prepare", *args, f"output_dir={straight}"))
    shutil.copytree(straight, resumed)
    assert_ok(run_cli("run", *args, f"output_dir={straight}"))

    stopped = run_cli("run", *args, f"output_dir={resumed}", env={STOP_AFTER_STEP_ENV: "5"})
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    assert "stopped at step 5" in stopped.stdout
    assert [r["step"] for r in read_jsonl(resumed / "tiny" / "pretrain" / "metrics.jsonl")][-1] == 5
    again = run_cli("run", *args, f"output_dir={resumed}")
    assert_ok(again)

    for stage in ("pretrain", "finetune"):
        expected = read_jsonl(straight / "tiny" / stage / "metrics.jsonl")
        got = read_jsonl(resumed / "tiny" / stage / "metrics.jsonl")
        assert [r["step"] for r in got] == [r["step"] for r in expected]
        for want, have in zip(expected, got, strict=True):
            for key in ("train/loss", "train/lr", "train/grad_norm", "eval/loss"):
                if key in want:
                    assert abs(want[key] - have[key]) <= 1e-6, (stage, want["step"], key, want[key], have[key])
    summary = json.loads((resumed / "tiny" / "pretrain" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 5
    assert summary["steps"] == 10
