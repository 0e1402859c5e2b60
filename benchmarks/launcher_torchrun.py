"""The launcher's own per-rank code (`run_stage`: sampler, metrics, checkpoint cadence) under torchrun.

Run by benchmarks/ray_vs_torchrun.py as
  torchrun --nproc_per_node 2 benchmarks/launcher_torchrun.py JOB.yaml OUTPUT_DIR STEPS LOG_EVERY
It sits between the raw DeepSpeed loop and `launcher run`: the same per-rank code Ray runs, without
Ray. Its tokens/s against raw is the cost of the launcher's loop; Ray's against it, the cost of Ray.
Data must be prepared already (`launcher prepare`); metrics go to the stage's metrics.jsonl.
"""

from __future__ import annotations

import os
import sys

import torch

from launcher.coordinator.driver import resolve
from launcher.spec.load import load_spec
from launcher.spec.plan import plan_as_dict
from launcher.worker.context import RankContext
from launcher.worker.entry import run_stage


def main(job: str, output_dir: str, steps: int, log_every: int) -> None:
    overrides = [f"output_dir={output_dir}", f"stages.0.max_steps={steps}", f"stages.0.log_every={log_every}"]
    spec = load_spec(job, overrides)
    _, plans = resolve(spec, local=False, log=False, only=spec.stages[0].name)  # reads what `prepare` wrote
    plan = plans[0]
    torch.distributed.init_process_group("gloo")  # what Ray Train does before calling the worker
    rank = torch.distributed.get_rank()
    context = RankContext(rank, torch.distributed.get_world_size(), int(os.environ["LOCAL_RANK"]), torch.device("cpu"))
    run_stage(spec.model_dump(mode="json"), 0, plan_as_dict(plan), context)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
