"""Rank 0's side of `metrics.mlflow`: every logged step's scalars into the stage's MLflow run (the driver made it).

A failure to log is one warning, after which the stage goes on with TensorBoard, metrics.jsonl and the console.
"""

from __future__ import annotations

import math
import os
import sys
import time

from launcher.contract import MLFLOW_FAST_FAIL_ENV, TrackerRun, shown_uri


class MlflowMetrics:
    """A sink of `MetricsWriter`: `log(step, scalars)` as one MLflow batch."""

    def __init__(self, run: TrackerRun) -> None:
        for name, value in MLFLOW_FAST_FAIL_ENV.items():  # a Ray worker does not inherit the driver's settings
            os.environ.setdefault(name, value)
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=run.tracking_uri)
        self.run = run
        self.broken = False

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self.broken:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in scalars.items() if math.isfinite(value)]
        try:
            self.client.log_batch(self.run.run_id, metrics=metrics)
        except Exception as exc:  # the store went away mid-run: the stage goes on without it
            uri = self.run.tracking_uri
            first = (str(exc).replace(uri, shown_uri(uri)).strip().splitlines() or [type(exc).__name__])[0][:300]
            print(f"warning: metrics.mlflow: {shown_uri(uri)}: {first}; MLflow logging stops, TensorBoard "
                  "goes on", file=sys.stderr, flush=True)  # fmt: skip
            self.broken = True

    def close(self) -> None:
        pass
