"""The environment variables the per-rank loop reads, named once (torch-free, so the driver can forward them).

Set on the `launcher run` command; a Ray driver forwards them to its workers.
"""

from __future__ import annotations

STOP_AFTER_STEP_ENV = "LAUNCHER_STOP_AFTER_STEP"  # test hook: stop (after a checkpoint) after this step
STOP_FILE_ENV = "LAUNCHER_STOP_FILE"  # another stop file, for whoever started the run (SLURM: on SIGUSR1)
TRACE_SAMPLES_ENV = "LAUNCHER_TRACE_SAMPLES"  # a folder: each rank appends the sample ids it trains on
HANG_AT_STEP_ENV = "LAUNCHER_HANG_AT_STEP"  # test hook, "RANK:STEP": that rank sleeps inside that step for good

LOOP_ENV = (STOP_AFTER_STEP_ENV, STOP_FILE_ENV, TRACE_SAMPLES_ENV, HANG_AT_STEP_ENV)
