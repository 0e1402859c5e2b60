"""Debug mode: every stage runs in this process as a world of one rank (no Ray)."""

from __future__ import annotations

import gc
from typing import Any

from launcher.spec.models import JobSpec


def run_stage_local(spec_data: dict[str, Any], index: int, plan_data: dict[str, Any]) -> dict[str, Any]:
    from launcher.worker.context import local_context
    from launcher.worker.entry import run_stage

    use_gpu = None if not spec_data["cluster"]["use_gpu"] else True
    try:
        return run_stage(spec_data, index, plan_data, local_context(use_gpu))
    finally:
        gc.collect()


def run_local(spec: JobSpec, only: str | None = None) -> int:
    from launcher.coordinator.driver import run_job

    return run_job(spec, local=True, run_stage=run_stage_local, only=only)
