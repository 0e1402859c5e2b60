"""Where a job's files live: `<output_dir>/<job name>/<stage name>/...` (the contract)."""

from __future__ import annotations

from pathlib import Path

from launcher.jobspec.models import JobSpec


def job_dir(spec: JobSpec) -> Path:
    return Path(spec.output_dir) / spec.name


def stage_dir(spec: JobSpec, stage_name: str) -> Path:
    return job_dir(spec) / stage_name


def model_dir(spec: JobSpec, stage_name: str) -> Path:
    """The stage's HF-format export; a later stage's `init_from: <stage>` reads it."""
    return stage_dir(spec, stage_name) / "model"


def data_dir(spec: JobSpec, stage_name: str) -> Path:
    """The prepared data: written whole into a temporary folder, then renamed here."""
    return stage_dir(spec, stage_name) / "data"


def tokenizer_dir(spec: JobSpec, stage_name: str) -> Path:
    """Inside the prepared data, so the tokens and the vocabulary that made them change together."""
    return data_dir(spec, stage_name) / "tokenizer"


STOP_FILE = "STOP"  # in a stage's folder: rank 0 stops the stage at the next step, after a checkpoint


def checkpoints_dir(spec: JobSpec, stage_name: str) -> Path:
    return stage_dir(spec, stage_name) / "checkpoints"


def summary_path(spec: JobSpec, stage_name: str) -> Path:
    return stage_dir(spec, stage_name) / "summary.json"
