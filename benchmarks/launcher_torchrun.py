"""The launcher's own per-rank code (`run_stage`: sampler, metrics, checkpoint cadence) under torchrun.

Run by benchmarks/ray_vs_torchrun.py as
  torchrun --nproc_per_node 2 benchmarks/launcher_torchrun.py JOB.yaml OUTPUT_DIR STEPS LOG_EVERY [cuda]
and by benchmarks/gpu_check.sh with `cuda` (one GPU per process, the nccl backend).
It sits between the raw DeepSpeed loop and `launcher run`: the same per-rank code Ray runs, without
Ray. Its tokens/s against raw is the cost of the launcher's loop; Ray's against it, the cost of Ray.
Data must be prepared already (`launcher prepare`); metrics go to the stage's metrics.jsonl.
"""

from __future__ import annotations

import os
import sys

import torch

from launcher.contract import StageLaunch
from launcher.coordinator.driver import resolve
from launcher.jobspec.load import load_spec
from launcher.worker.context import RankContext
from launcher.worker.entry import run_stage


def main(job: str, output_dir: str, steps: int, log_every: int, device_type: str = "cpu") -> None:
    overrides = [f"output_dir={output_dir}", f"stages.0.max_steps={steps}", f"stages.0.log_every={log_every}",
                 f"cluster.num_workers={os.environ['WORLD_SIZE']}"]  # fmt: skip
    if device_type == "cuda":
        overrides.append("cluster.use_gpu=true")
    spec = load_spec(job, overrides)
    _, plans = resolve(spec, local=False, log=False, only=spec.stages[0].name)  # reads what `prepare` wrote
    plan = plans[0]
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # what Ray Train does before calling the worker
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = torch.distributed.get_rank()
    context = RankContext(rank, torch.distributed.get_world_size(), local_rank, device)
    run_stage(StageLaunch.of(spec, 0, plan), context)


if __name__ == "__main__":
    kind = sys.argv[5] if len(sys.argv) > 5 else "cpu"
    os.environ.setdefault("DS_ACCELERATOR", kind)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), kind)
