"""What crosses the driver <-> rank boundary, typed and the same on every backend (standard library only).

The driver validates the spec, plans the stage and resolves its references once, then hands every
rank a `StageLaunch`; rank 0 hands back a `StageResult`. `--local` passes both in process; Ray
Train pickles the launch into each worker and returns rank 0's result as `Result.return_value`.
Ranks do not re-validate the spec: the driver's checks (files, references, batch arithmetic)
may not even hold on a node that does not see the driver's working directory.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from launcher.jobspec import layout
from launcher.jobspec.models import JobSpec, StageSpec
from launcher.jobspec.plan import StagePlan
from launcher.jobspec.start import resolve_start


@dataclass(frozen=True)
class StagePaths:
    """Every path a stage's ranks read or write, resolved on the driver (see `launcher.jobspec.layout`)."""

    stage_dir: Path  # metrics, TensorBoard, the stop file
    data_dir: Path  # prepared token stores
    tokenizer_dir: Path  # the tokenizer that made them
    checkpoints: Path
    model_dir: Path  # the export this stage writes
    summary: Path  # summary.json, written by rank 0 once the export is complete
    start: Path | None  # weights to start from: an earlier stage's export, a model folder, or None (fresh)

    @classmethod
    def of(cls, spec: JobSpec, stage: StageSpec) -> StagePaths:
        return cls(
            stage_dir=layout.stage_dir(spec, stage.name),
            data_dir=layout.data_dir(spec, stage.name),
            tokenizer_dir=layout.tokenizer_dir(spec, stage.name),
            checkpoints=layout.checkpoints_dir(spec, stage.name),
            model_dir=layout.model_dir(spec, stage.name),
            summary=layout.summary_path(spec, stage.name),
            start=resolve_start(spec, stage).weights,
        )


# MLflow's HTTP client retries a tracking server that does not answer for minutes by default; both sides of a
# `TrackerRun` (the driver and rank 0) set these before their first request, so a dead server fails fast.
MLFLOW_FAST_FAIL_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def shown_uri(uri: str) -> str:
    """A tracking URI as printed, logged and recorded: without its user name and password."""
    import urllib.parse

    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    netloc = f"***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True)
class TrackerRun:
    """The MLflow run of a stage (`metrics.mlflow`): the driver makes and ends it, rank 0 logs the metrics into it."""

    tracking_uri: str
    run_id: str


@dataclass(frozen=True)
class StageLaunch:
    """One stage as the driver hands it to its ranks: the validated spec, the plan, the resolved paths."""

    spec: JobSpec
    index: int
    plan: StagePlan
    paths: StagePaths
    # The driver's checkpoint verdicts (`launcher.checkpoint_manifest.verdicts`): rank 0 does not hash a
    # folder again that the driver hashed, unless a file of it changed since.
    checkpoint_verdicts: tuple[Any, ...] = ()
    mlflow_run: TrackerRun | None = None  # with `metrics.mlflow`, when its store answered

    @property
    def stage(self) -> StageSpec:
        return self.spec.stages[self.index]

    @classmethod
    def of(cls, spec: JobSpec, index: int, plan: StagePlan, checkpoint_verdicts: tuple[Any, ...] = ()) -> StageLaunch:
        assert plan.steps is not None, "the driver resolves steps (from the prepared data) before launching"
        assert plan.name == spec.stages[index].name, f"plan {plan.name} is not for stage {index}"
        return cls(spec, index, plan, StagePaths.of(spec, spec.stages[index]), checkpoint_verdicts)


@dataclass(frozen=True)
class StageResult:
    """A stage's outcome as rank 0 saw it; `summary.json` is its JSON form (`to_json` / `from_json`).

    `stopped`: the stage stopped on request after a checkpoint, before its last step (no export,
    no summary.json); the same command resumes it.
    """

    stage: str
    task: str
    steps: int
    tokens: int
    wall_s: float
    train_loss: float | None  # mean over the last logging window; None when not finite
    eval: dict[str, float | None]  # loss, and accuracy for classification
    reference: dict[str, float]  # e.g. majority_accuracy: what a trivial predictor scores on the eval set
    world_size: int
    global_batch_size: int
    zero_stage: int
    precision: str
    num_params: int
    optimizer_state_bytes: int  # rank 0's Adam moments
    fp32_master_bytes: int  # rank 0's fp32 master partition (ZeRO)
    flops_per_token: float
    peak_flops_per_device: float
    peak_flops_source: str
    init_from: str | None
    resumed_from_step: int | None
    process_s: float  # the rank's whole run: build, train, export
    peak_memory_bytes: int
    stopped: bool = False
    memory_before_model_bytes: int = 0  # the rank's memory before its model is built
    checkpoint_save_s: float = 0.0  # rank 0's time in saving checkpoints (write, hash, report, commit)
    checkpoint_load_s: float = 0.0  # the rank's time loading the checkpoint it resumed from
    weight_bytes: int = 0  # rank 0's weights (its partition under ZeRO-3)
    best: dict[str, Any] | None = None  # with `best_metric`: {"metric", "value", "step"} of the exported checkpoint
    early_stopped_at: int | None = None  # the step `early_stopping_patience` ended the stage at
    test: dict[str, float | None] | None = None  # with `data.validation_fraction`: the export on the test set

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageResult:
        """From a `summary.json`; KeyError names the fields it lacks (a file from another version)."""
        names = [f.name for f in fields(cls)]
        optional = {f.name for f in fields(cls) if f.default is not MISSING}
        missing = [name for name in names if name not in data and name not in optional]
        if missing:
            raise KeyError(", ".join(missing))
        return cls(**{name: data[name] for name in names if name in data})
