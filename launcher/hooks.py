"""What the training loop takes from outside: when to stop, and what to call before each step.

The loop receives a `StopPolicy` and `StepCallback`s as arguments; `loop_hooks` builds them from the
environment, the one place the loop's variables are read. Their names are defined here once
(torch-free, so the Ray driver forwards them to its workers). Set on the `launcher run` command.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

STOP_AFTER_STEP_ENV = "LAUNCHER_STOP_AFTER_STEP"  # test hook: stop (after a checkpoint) after this step
STOP_FILE_ENV = "LAUNCHER_STOP_FILE"  # another stop file, for whoever started the run (SLURM: on SIGUSR1)
TRACE_SAMPLES_ENV = "LAUNCHER_TRACE_SAMPLES"  # a folder: each rank appends the sample ids it trains on
HANG_AT_STEP_ENV = "LAUNCHER_HANG_AT_STEP"  # test hook, "RANK:STEP": that rank sleeps inside that step for good

# `launcher run --verbose`: the libraries' own progress lines (Ray's per-report and per-checkpoint lines,
# DeepSpeed's op builds) on the console too; without it they go only to Ray's and the stage's log files.
VERBOSE_ENV = "LAUNCHER_VERBOSE"
LOOP_ENV = (STOP_AFTER_STEP_ENV, STOP_FILE_ENV, TRACE_SAMPLES_ENV, HANG_AT_STEP_ENV, VERBOSE_ENV)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


@dataclass(frozen=True)
class StopPolicy:
    """When rank 0 asks the stage to stop after a checkpoint (the loop shares the answer with every rank).

    `stage_file`: the stage's own stop file (`<stage>/STOP`: the driver writes it on SIGTERM/SIGINT),
    removed once honoured so that the re-run goes on. `job_file`: a stop file of whoever started the
    run (the SLURM template's, on SIGUSR1), left for them. `after_step`: a test hook.
    """

    stage_file: Path | None = None
    job_file: Path | None = None
    after_step: int | None = None

    def requested(self, step: int) -> bool:
        """Whether to stop once step `step` (1-based, just finished) is checkpointed."""
        if step == self.after_step:
            return True
        return any(path is not None and path.exists() for path in (self.stage_file, self.job_file))

    def honoured(self) -> None:
        if self.stage_file is not None:
            self.stage_file.unlink(missing_ok=True)


class StepCallback(Protocol):
    def before_step(self, step: int, micro_batches: list[list[int]]) -> None:
        """Called on every rank before step `step` (0-based) with the sample ids of its micro-batches."""

    def close(self) -> None: ...


class SampleTrace:
    """Appends `{"step", "samples"}` per step to `<folder>/<stage>_rank<R>.jsonl` (tests check coverage and resume)."""

    def __init__(self, folder: Path, stage: str, rank: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = (folder / f"{stage}_rank{rank}.jsonl").open("a")

    def before_step(self, step: int, micro_batches: list[list[int]]) -> None:
        self._file.write(json.dumps({"step": step, "samples": [i for m in micro_batches for i in m]}) + "\n")

    def close(self) -> None:
        self._file.close()


@dataclass
class HangAt:
    """Test hook: this rank sleeps for good inside step `step` (1-based), as a stuck collective would."""

    step: int

    def before_step(self, step: int, micro_batches: list[list[int]]) -> None:
        if step + 1 == self.step:
            time.sleep(10**9)

    def close(self) -> None:
        pass


def loop_hooks(
    stage_stop_file: Path, stage: str, rank: int, environ: Mapping[str, str] = os.environ
) -> tuple[StopPolicy, list[StepCallback]]:
    """The loop's stop policy and step callbacks for this rank, from the environment (read here only)."""
    after = environ.get(STOP_AFTER_STEP_ENV)
    job_file = environ.get(STOP_FILE_ENV)
    policy = StopPolicy(
        stage_file=stage_stop_file,
        job_file=Path(job_file) if job_file else None,
        after_step=int(after) if after else None,
    )
    callbacks: list[StepCallback] = []
    if environ.get(TRACE_SAMPLES_ENV):
        callbacks.append(SampleTrace(Path(environ[TRACE_SAMPLES_ENV]), stage, rank))
    hang_rank, _, hang_step = environ.get(HANG_AT_STEP_ENV, "").partition(":")
    if hang_step and int(hang_rank) == rank:
        callbacks.append(HangAt(int(hang_step)))
    return policy, callbacks
