"""MLflow as a second tracker (`metrics.mlflow`): the job's run and one nested run per stage, made on the driver.

The driver makes the runs, logs their params (the resolved spec, flattened) and, once a stage has exported,
its model folder and summary as artifacts, and ends them; rank 0 logs the stage's metrics into its run
(`launcher.metrics.mlflow_sink`). A re-run reuses the runs it made (their ids are kept in `mlflow.json` in
the job's and the stage's folders), so a resumed stage continues its run. MLflow is imported only here and
in the sink, and only when the section is set. A store that does not answer is one warning line: the job
runs with TensorBoard alone.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from launcher import atomic
from launcher.contract import MLFLOW_FAST_FAIL_ENV, StageLaunch, StageResult, TrackerRun
from launcher.contract import shown_uri as shown
from launcher.errors import UserError
from launcher.jobspec import layout
from launcher.jobspec.models import JobSpec
from launcher.jobspec.plan import StagePlan

RUN_FILE = "mlflow.json"  # in the job's and each stage's folder: the run made for it, reused on a re-run
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param's value


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested spec values as `a.b.c -> text` params (lists as JSON)."""
    if isinstance(value, dict):
        flat: dict[str, str] = {}
        for key, inner in value.items():
            flat.update(flatten(inner, f"{prefix}{key}."))
        return flat
    text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return {prefix.rstrip("."): text[:MAX_PARAM_CHARS]}


def _first_line(exc: BaseException, uri: str) -> str:
    text = str(exc).replace(uri, shown(uri)).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


class MlflowTracker:
    """The job's MLflow runs; every call after a failure does nothing (one warning, TensorBoard goes on)."""

    def __init__(self, spec: JobSpec, client: Any, uri: str, experiment_id: str, parent_id: str) -> None:
        self.spec, self.client, self.uri = spec, client, uri
        self.experiment_id, self.parent_id = experiment_id, parent_id
        self.broken = False

    @classmethod
    def open(cls, spec: JobSpec) -> MlflowTracker | None:
        """The job's run (made, or the one a re-run made before), or None without `metrics.mlflow` or a store."""
        settings = spec.metrics.mlflow
        if settings is None:
            return None
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise UserError(
                "metrics.mlflow: MLflow is not installed; install the extra: pip install -e '.[mlflow]' "
                "(make setup does)"
            ) from None
        for name, value in MLFLOW_FAST_FAIL_ENV.items():
            os.environ.setdefault(name, value)
        job = layout.job_dir(spec).resolve()
        local = settings.tracking_uri is None
        uri = settings.tracking_uri or f"sqlite:///{job / 'mlflow.db'}"
        experiment = settings.experiment or spec.name
        try:
            client = MlflowClient(tracking_uri=uri)
            found = client.get_experiment_by_name(experiment)
            if found is not None:
                experiment_id = found.experiment_id
            else:
                location = (job / "mlartifacts").as_uri() if local else None
                experiment_id = client.create_experiment(experiment, artifact_location=location)
            parent = _reused(client, job / RUN_FILE, uri)
            if parent is None:
                parent = client.create_run(
                    experiment_id, run_name=spec.name, tags={"launcher.job": spec.name}
                ).info.run_id
                job_params = _job_params(spec)
                _log_params(client, parent, {**job_params, "stages": json.dumps([s.name for s in spec.stages])})
                atomic.write_json(job / RUN_FILE, {"tracking_uri": shown(uri), "run_id": parent})
            else:
                client.update_run(parent, status="RUNNING")
        except Exception as exc:  # the store's own errors (connection, auth, schema): a warning, not a failed job
            print(f"warning: metrics.mlflow: {shown(uri)} does not answer ({_first_line(exc, uri)}); the job runs with "
                  "TensorBoard only", file=sys.stderr, flush=True)  # fmt: skip
            return None
        print(f"mlflow: job run {parent} in experiment {experiment!r} at {shown(uri)}", flush=True)
        return cls(spec, client, uri, experiment_id, parent)

    def _failed(self, exc: BaseException) -> None:
        if not self.broken:
            print(f"warning: metrics.mlflow: {shown(self.uri)}: {_first_line(exc, self.uri)}; MLflow logging stops, "
                  "TensorBoard goes on",
                  file=sys.stderr, flush=True)  # fmt: skip
        self.broken = True

    def stage_run(self, spec: JobSpec, index: int, plan: StagePlan) -> TrackerRun | None:
        """The stage's run, nested under the job's, with the stage's resolved spec and plan as params."""
        if self.broken:
            return None
        stage = spec.stages[index]
        record = layout.stage_dir(spec, stage.name) / RUN_FILE
        try:
            run_id = _reused(self.client, record, self.uri)
            if run_id is None:
                tags = {"mlflow.parentRunId": self.parent_id, "launcher.job": spec.name, "launcher.stage": stage.name}
                run_id = self.client.create_run(self.experiment_id, run_name=stage.name, tags=tags).info.run_id
                params = {**_job_params(spec), **flatten(stage.model_dump(mode="json"), "stage.")}
                params.update(flatten({"world_size": plan.world_size, "global_batch_size": plan.global_batch_size,
                                       "steps": plan.steps, "zero_stage": plan.zero_stage}, "plan."))  # fmt: skip
                _log_params(self.client, run_id, params)
                record.parent.mkdir(parents=True, exist_ok=True)
                atomic.write_json(record, {"tracking_uri": shown(self.uri), "run_id": run_id})
            else:
                self.client.update_run(run_id, status="RUNNING")
        except Exception as exc:
            self._failed(exc)
            return None
        return TrackerRun(self.uri, run_id)

    def stage_done(self, launch: StageLaunch, result: StageResult | None) -> None:
        """After the stage: its export and summary as artifacts and FINISHED; KILLED when it stopped on request,
        FAILED when it raised (`result` None)."""
        run = launch.mlflow_run
        if run is None or self.broken:
            return
        try:
            if result is not None and not result.stopped:
                self.client.log_artifacts(run.run_id, str(launch.paths.model_dir), artifact_path="model")
                self.client.log_artifact(run.run_id, str(launch.paths.summary))
            status = "FAILED" if result is None else "KILLED" if result.stopped else "FINISHED"
            self.client.set_terminated(run.run_id, status=status)
        except Exception as exc:
            self._failed(exc)

    def close(self, status: str) -> None:
        if self.broken:
            return
        try:
            self.client.set_terminated(self.parent_id, status=status)
        except Exception as exc:
            self._failed(exc)


def _reused(client: Any, record: Path, uri: str) -> str | None:
    """The run a re-run made before (same store, still there), else None."""
    saved = atomic.read_json(record, if_torn="a new run is made") if record.exists() else None
    if not isinstance(saved, dict) or saved.get("tracking_uri") != shown(uri):
        return None
    try:
        client.get_run(saved["run_id"])
    except Exception:  # deleted, or another store under the same name
        return None
    return str(saved["run_id"])


def _job_params(spec: JobSpec) -> dict[str, str]:
    """The job's settings as params (stages apart), the tracking URI without credentials."""
    params = flatten(spec.model_dump(mode="json", exclude={"stages", "sweep"}))
    key = "metrics.mlflow.tracking_uri"
    if params.get(key) not in (None, "None"):
        params[key] = shown(params[key])
    return params


def _log_params(client: Any, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(key, value) for key, value in sorted(params.items())]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[start : start + 100])
