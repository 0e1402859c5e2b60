"""Every shipped job spec opens with the command that runs it, loads and validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.jobspec.load import load_spec
from launcher.jobspec.plan import plan_job
from launcher.models.count import param_counts
from tests.conftest import ROOT, run_cli

JOB_FILES = sorted((ROOT / "jobs").rglob("*.yaml"))


def test_there_are_jobs() -> None:
    names = {p.relative_to(ROOT / "jobs").as_posix() for p in JOB_FILES}
    assert {"demo.yaml", "debug/tiny.yaml", "finetune-minilm-rt.yaml", "pretrain-gpt-clm.yaml"} <= names


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.relative_to(ROOT / "jobs").as_posix())
def test_job_validates(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Run as: launcher run jobs/"), f"{path} must open with its launch command"
    assert path.relative_to(ROOT).as_posix() in first
    spec = load_spec(path)
    for local in (True, False):
        for stage, plan in zip(spec.stages, plan_job(spec, local=local, param_counts=param_counts(spec)), strict=True):
            assert plan.micro_batch_size == stage.batch.micro_batch_size
            if stage.batch.global_batch_size is not None:  # the same batch in one process as on the cluster
                assert plan.global_batch_size == stage.batch.global_batch_size, (stage.name, local)


def test_validate_cli_prints_plan() -> None:
    result = run_cli(
        "validate", "jobs/demo.yaml", "stages.0.max_steps=20", "cluster.num_workers=2",
        "stages.0.batch.micro_batch_size=16", "stages.0.batch.global_batch_size=128",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "stage 0 pretrain" in out and "stage 2 baseline" in out
    assert "global batch 128 = micro 16 x accumulation 4 x workers 2" in out  # accumulation derived
    assert "steps 20" in out
    assert "ZeRO-2" in out and "model states per worker" in out
