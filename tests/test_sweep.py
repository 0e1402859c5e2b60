"""`launcher sweep`: trials of a stage on Ray Tune, the best one's export as the stage's, a table of all trials."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from launcher.errors import UserError
from launcher.jobspec.load import apply_overrides, load_spec, read_yaml
from tests.conftest import TINY, assert_ok, on_ray, run_cli

GRID = "stages.1.sweep={params: {optim.lr: {grid: [1e-3, 1e-2]}, seed: {grid: [0, 1]}}, metric: accuracy}"


def _plan(*overrides: str):
    from launcher.jobspec.sweep import plan_sweep

    raw = apply_overrides(read_yaml(TINY), list(overrides))
    return plan_sweep(raw, load_spec(TINY, list(overrides)), "finetune")


def test_trials_are_the_grid_times_the_samples_drawn_the_same_way_every_time(tmp_path: Path) -> None:
    sweep = (
        "stages.1.sweep={params: {optim.lr: {loguniform: [1e-4, 1e-2]}, batch.micro_batch_size: {grid: [4, 8]}}, "
        "num_samples: 3}"
    )
    plan = _plan(f"output_dir={tmp_path}", sweep)
    again = _plan(f"output_dir={tmp_path}", sweep)
    assert [t.values for t in plan.trials] == [t.values for t in again.trials], "seeded: the same trials each run"
    assert len(plan.trials) == 6 and [t.values["batch.micro_batch_size"] for t in plan.trials] == [4, 8] * 3
    rates = [t.values["optim.lr"] for t in plan.trials]
    assert all(1e-4 <= r < 1e-2 for r in rates) and len(set(rates)) == 6
    first = plan.trials[0]
    assert first.spec.stages[1].optim.lr == rates[0] and first.spec.stages[1].batch.micro_batch_size == 4
    assert first.spec.output_dir == str((tmp_path / "tiny" / "finetune" / "trials").resolve())
    assert first.spec.name == "trial_00" and first.spec.stages[1].sweep is None
    assert (plan.metric, plan.mode) == ("loss", "min"), "no best_metric: eval loss, minimised"
    # A job field (seed) and a stage's best_metric as the default metric; `1e-3` (a YAML string) typed as a float.
    plan = _plan(GRID.replace(", metric: accuracy", ""), "stages.1.best_metric=macro_f1")
    assert [t.values for t in plan.trials] == [
        {"optim.lr": 1e-3, "seed": 0}, {"optim.lr": 1e-2, "seed": 0},
        {"optim.lr": 1e-3, "seed": 1}, {"optim.lr": 1e-2, "seed": 1},
    ]  # fmt: skip
    assert plan.trials[2].spec.seed == 1 and (plan.metric, plan.mode) == ("macro_f1", "max")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stages.1.sweep={params: {optim.lrr: {grid: [1]}}}",
         "stages.1.sweep.params.optim.lrr: no such field in a stage or the job"),
        ("sweep={params: {optimizer.lr: {grid: [1]}}}",
         "sweep.params.optimizer.lr: no such field in a stage or the job"),
        ("stages.1.sweep={params: {task: {grid: [mlm]}}}", "stages.1.sweep.params.task: cannot be swept"),
        ("stages.1.sweep={params: {seed: {grid: [0]}}, metric: f1}",
         "stages.1.sweep.metric: task classification reports no 'f1'; it reports loss, accuracy, macro_f1"),
        ("stages.1.sweep={params: {seed: {grid: [0]}, optim.lr: {grid: [1], uniform: [0, 1]}}}",
         "stages.1.sweep.params.optim.lr: give exactly one of grid, choice, uniform, loguniform, randint"),
    ],
)  # fmt: skip
def test_a_sweep_over_a_field_that_does_not_exist_or_a_metric_the_task_lacks_is_refused(
    override: str, message: str
) -> None:
    with pytest.raises(UserError) as caught:
        load_spec(TINY, [override])
    assert str(caught.value).startswith(message), caught.value


def test_bad_values_and_a_job_sweeps_metric_are_refused_before_any_trial() -> None:
    with pytest.raises(UserError, match=r"stages\.1\.sweep\.params: trial 1 \(optim\.lr=-1\.0\): stages\.1\.optim\.lr"):
        _plan("stages.1.sweep={params: {optim.lr: {grid: [1e-3, -1.0]}}}")
    with pytest.raises(UserError, match=r"^sweep\.metric: task classification reports no 'perplexity'"):
        _plan("sweep={params: {seed: {grid: [0, 1]}}, metric: perplexity}")
    with pytest.raises(UserError, match=r"sweep\.scheduler: asha stops trials at evaluations during training"):
        _plan("stages.1.sweep={params: {seed: {grid: [0, 1]}}, scheduler: asha}")
    with pytest.raises(UserError, match="stage finetune has no sweep section"):
        _plan()


@pytest.mark.slow
@pytest.mark.ray
def test_a_four_trial_sweep_chooses_the_best_and_writes_the_table(ray_cluster, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_ok(run_cli("run", str(TINY), "--local", "--stage", "pretrain", f"output_dir={out}"))
    shrink = ["stages.1.eval_every=2", "stages.1.max_steps=4"]
    result = run_cli("sweep", str(TINY), "--stage", "finetune", f"output_dir={out}", GRID, *shrink,
                     env=on_ray(ray_cluster))  # fmt: skip
    assert_ok(result)
    stage = out / "tiny" / "finetune"
    with (stage / "sweep.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [(float(r["optim.lr"]), int(r["seed"])) for r in rows] == [(1e-3, 0), (1e-2, 0), (1e-3, 1), (1e-2, 1)]
    assert all(r["status"] == "done" and r["steps"] == "4" for r in rows), rows
    # Each trial is its own run of the stage with its values, under the stage's folder.
    for number, row in enumerate(rows):
        trial = stage / "trials" / f"trial_{number:02d}"
        spec = json.loads((trial / "trial.json").read_text())["spec"]
        assert spec["seed"] == int(row["seed"]) and spec["stages"][1]["optim"]["lr"] == float(row["optim.lr"])
        summary = json.loads((trial / "finetune" / "summary.json").read_text())
        assert abs(summary["eval"]["accuracy"] - float(row["score"])) < 1e-9
        assert (trial / "pretrain").resolve() == (out / "tiny" / "pretrain").resolve()
    scores = [float(r["score"]) for r in rows]
    best = rows[scores.index(max(scores))]["trial"]
    table = json.loads((stage / "sweep.json").read_text())
    assert table["best_trial"] == best and table["metric"] == "eval/accuracy" and len(table["trials"]) == 4
    assert (
        f"{best} " in result.stdout and "<- best" in result.stdout and f"sweep finetune: best {best}" in result.stdout
    )
    # The best trial's export and summary are the stage's own: a later stage's init_from reads them.
    exported = stage / "trials" / best / "finetune" / "model"
    files = sorted(p.name for p in (stage / "model").iterdir())
    assert "model.safetensors" in files and files == sorted(p.name for p in exported.iterdir())
    assert os.path.samefile(stage / "model" / "model.safetensors", exported / "model.safetensors")
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["sweep"]["trial"] == best and summary["eval"]["accuracy"] == max(scores)
    again = run_cli("run", str(TINY), "--local", "--stage", "finetune", f"output_dir={out}", *shrink)
    assert_ok(again)
    assert "stage finetune: already complete" in again.stdout


@pytest.mark.slow  # a CLI subprocess: kept out of the quick tier
def test_sweep_cli_errors_are_one_line_and_start_nothing(tmp_path: Path) -> None:
    result = run_cli("sweep", str(TINY), "--stage", "finetune", f"output_dir={tmp_path}",
                     "stages.1.sweep={params: {optim.lrr: {grid: [1]}}}")  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "error: stages.1.sweep.params.optim.lrr: no such field in a stage or the job (paths look like optim.lr, "
        "data.seq_len, seed)"
    )
    result = run_cli("sweep", str(TINY), "--stage", "finetune", f"output_dir={tmp_path}", GRID)
    assert result.returncode == 2
    assert "error: --stage: finetune reads stage 'pretrain', which has not completed; run it first" in result.stderr
    assert not (tmp_path / "tiny").exists(), "nothing written"


def test_a_stage_whose_export_a_sweep_chose_counts_as_complete(tmp_path: Path) -> None:
    """`launcher run` does not retrain a swept stage, even when the best trial ran fewer steps than the spec says
    (a sweep over max_steps or the batch)."""
    from launcher.coordinator.driver import completed_result
    from launcher.jobspec.plan import plan_job
    from tests.test_contract import _result

    spec = load_spec(TINY, [f"output_dir={tmp_path}"])
    plan = plan_job(spec, local=True, sample_counts={"pretrain": 400, "finetune": 200})[1]
    summary = tmp_path / "tiny" / "finetune" / "summary.json"
    summary.parent.mkdir(parents=True)
    short = _result(steps=plan.steps - 1).to_json()
    summary.write_text(json.dumps(short))
    assert completed_result(spec, plan) is None
    summary.write_text(json.dumps({**short, "sweep": {"trial": "trial_01"}}))
    assert completed_result(spec, plan) is not None
