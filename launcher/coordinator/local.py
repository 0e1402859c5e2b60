"""Debug mode: every stage runs in this process as a world of one rank (no Ray)."""

from __future__ import annotations

import gc

from launcher.contract import StageLaunch, StageResult
from launcher.jobspec.models import JobSpec


def run_stage_local(launch: StageLaunch) -> StageResult:
    from launcher.worker.context import local_context
    from launcher.worker.entry import run_stage

    try:
        return run_stage(launch, local_context(True if launch.spec.cluster.use_gpu else None))
    finally:
        gc.collect()


def run_local(spec: JobSpec, only: str | None = None) -> int:
    from launcher.coordinator.driver import run_job

    return run_job(spec, local=True, run_stage=run_stage_local, only=only)
