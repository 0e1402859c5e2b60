"""best_metric and early_stopping_patience: the best evaluation's checkpoint is kept, exported and resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY, assert_ok, read_jsonl, run_cli

# The eval loss of this run falls at every evaluation; `best_mode: max` makes the first evaluation the best, so
# the best lies before the last step and the patience runs out: every path of the feature is taken.
BEST = ["stages.1.max_steps=12", "stages.1.eval_every=1", "stages.1.best_metric=eval/loss", "stages.1.best_mode=max",
        "stages.1.optim.lr=3e-3", "stages.1.keep_checkpoints=1", "stages.1.checkpoint_every=0"]  # fmt: skip


def _expected(records: list[dict], patience: int | None) -> tuple[int, int | None]:
    """(best step, early-stop step) from the logged eval losses, as the loop must decide them (larger is better)."""
    best_step, best, since = None, -float("inf"), 0
    for record in records:
        if "eval/loss" not in record:
            continue
        if record["eval/loss"] > best:
            best, best_step, since = record["eval/loss"], record["step"], 0
        else:
            since += 1
            if patience is not None and since >= patience:
                return best_step, record["step"]
    return best_step, None


@pytest.mark.slow
def test_best_checkpoint_is_exported_kept_and_early_stopping_stops_at_the_right_evaluation(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "best"
    result = run_cli("run", str(TINY), "--local", f"output_dir={out}", *BEST, "stages.1.early_stopping_patience=3")
    assert_ok(result)
    stage = out / "tiny" / "finetune"
    records = read_jsonl(stage / "metrics.jsonl")
    best_step, stop_step = _expected(records, 3)
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["best"]["step"] == best_step and summary["best"]["metric"] == "eval/loss"
    assert stop_step is not None and best_step < stop_step, "the run takes the early stop after a mid-way best"
    assert summary["early_stopped_at"] == stop_step
    assert summary["steps"] == stop_step < 12 and f"early stop at step {stop_step}" in result.stdout
    folders = sorted(p.name for p in (stage / "checkpoints").glob("step_*"))
    assert f"step_{best_step:08d}" in folders, "keep_checkpoints=1 never removes the best"
    # The export holds the best step's weights (ZeRO-0: the module state of its checkpoint), not the last one's.
    saved = torch.load(stage / "checkpoints" / f"step_{best_step:08d}" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)["module"]  # fmt: skip
    exported = load_file(stage / "model" / "model.safetensors")
    assert exported and all(torch.equal(exported[name], saved[name]) for name in exported)
    assert f"exporting step {best_step}" in result.stdout
    assert sorted((stage / "checkpoints").glob("step_*"))[-1].name == f"step_{stop_step:08d}"
    # The same command again: the stage is complete (an early stop counts), nothing retrains.
    again = run_cli("run", str(TINY), "--local", f"output_dir={out}", *BEST, "stages.1.early_stopping_patience=3")
    assert_ok(again)
    assert "stage finetune: already complete" in again.stdout


@pytest.mark.slow  # CLI subprocesses (torch imports): kept out of the quick tier
def test_best_metric_and_patience_are_checked_against_the_task() -> None:
    out = run_cli("validate", str(TINY), "stages.1.best_metric=eval/f1")
    assert out.returncode == 2 and "stages.1.best_metric: task classification reports no 'f1'; it reports loss" in (
        out.stderr
    )
    out = run_cli("validate", str(TINY), "stages.1.early_stopping_patience=2")
    assert out.returncode == 2 and "stages.1.early_stopping_patience: needs best_metric" in out.stderr
    out = run_cli("validate", str(TINY), "stages.1.early_stopping_patience=2", "stages.1.best_metric=accuracy")
    assert out.returncode == 2 and "needs evaluations during training" in out.stderr
    assert (
        run_cli("validate", str(TINY), "stages.1.best_metric=macro_f1", "stages.1.eval_every_epochs=1").returncode == 0
    )
