"""The driver <-> rank contract: a launch resolved once on the driver, a typed result handed back."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import pytest

from launcher.contract import StageLaunch, StageResult
from launcher.errors import UserError
from launcher.jobspec.load import load_spec
from launcher.jobspec.plan import plan_job
from tests.conftest import ROOT, TINY


def _result(**changes: object) -> StageResult:
    base = StageResult(
        stage="finetune", task="classification", steps=4, tokens=900, wall_s=1.5, train_loss=0.69,
        eval={"loss": 0.7, "accuracy": 0.5}, reference={"majority_accuracy": 0.55}, world_size=1,
        global_batch_size=16, zero_stage=0, precision="fp32", num_params=30_000, optimizer_state_bytes=240_000,
        fp32_master_bytes=0, flops_per_token=2e5, peak_flops_per_device=9e10, peak_flops_source="measured matmul",
        init_from="pretrain", resumed_from_step=None, process_s=3.0, peak_memory_bytes=10**9,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


def test_launch_resolves_what_a_stage_reads_once_on_the_driver(tmp_path: Path) -> None:
    spec = load_spec(TINY, [f"output_dir={tmp_path}"])
    plans = plan_job(spec, local=True, sample_counts={"pretrain": 400, "finetune": 200})
    launch = StageLaunch.of(spec, 1, plans[1])
    paths = launch.paths
    assert launch.stage.name == "finetune" and launch.plan is plans[1]
    assert paths.start == tmp_path / "tiny" / "pretrain" / "model", "init_from: an earlier stage's export"
    assert paths.tokenizer_dir == tmp_path / "tiny" / "finetune" / "data" / "tokenizer"
    assert paths.summary == tmp_path / "tiny" / "finetune" / "summary.json"
    assert paths.checkpoints.parent == paths.stage_dir == tmp_path / "tiny" / "finetune"
    assert StageLaunch.of(spec, 0, plans[0]).paths.start is None, "fresh weights"
    with pytest.raises(AssertionError, match="not for stage"):
        StageLaunch.of(spec, 0, plans[1])


def test_ranks_take_the_launch_as_validated_without_checking_the_files_again(tmp_path: Path) -> None:
    """A launch crosses to Ray workers pickled: unpickling re-runs no validation, so a rank on a node that
    does not see the driver's files does not fail the spec's checks (the driver ran them)."""
    model = tmp_path / "model"
    shutil.copytree(ROOT / "data" / "models" / "all-minilm-l6-v2", model)
    spec = load_spec(TINY, [f"output_dir={tmp_path}", f"stages.1.init_from={model}"])
    plans = plan_job(spec, local=True, sample_counts={"pretrain": 400, "finetune": 200})
    shutil.rmtree(model)
    with pytest.raises(UserError, match=r"stages\.1\.init_from"):
        load_spec(TINY, [f"output_dir={tmp_path}", f"stages.1.init_from={model}"])  # what a rank used to do
    launch = pickle.loads(pickle.dumps(StageLaunch.of(spec, 1, plans[1])))
    assert launch.paths.start == model and launch.spec == spec


def test_result_is_summary_json_and_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """summary.json is the result's JSON form; a summary lacking fields (another version's) is not taken as
    a completed stage: one warning naming the fields, and the stage runs again."""
    from launcher.coordinator.driver import completed_result

    result = _result()
    assert StageResult.from_json(json.loads(json.dumps(result.to_json()))) == result
    assert result.to_json()["eval"] == {"loss": 0.7, "accuracy": 0.5} and result.to_json()["stopped"] is False
    spec = load_spec(TINY, [f"output_dir={tmp_path}"])
    plan = plan_job(spec, local=True, sample_counts={"pretrain": 400, "finetune": 200})[1]
    summary = tmp_path / "tiny" / "finetune" / "summary.json"
    summary.parent.mkdir(parents=True)
    summary.write_text(json.dumps(result.to_json()))
    assert completed_result(spec, plan) == result
    summary.write_text(json.dumps(_result(steps=plan.steps - 1).to_json()))
    assert completed_result(spec, plan) is None, "fewer steps than the plan: not complete"
    partial = {k: v for k, v in result.to_json().items() if k not in ("tokens", "wall_s")}
    summary.write_text(json.dumps(partial))
    assert completed_result(spec, plan) is None
    assert "lacks 'tokens, wall_s'" in capsys.readouterr().out
