"""The reference: a minimal DeepSpeed loop with no launcher around it, run under torchrun.

Run by benchmarks/ray_vs_torchrun.py as
  torchrun --nproc_per_node 2 benchmarks/raw_deepspeed.py JOB.yaml OUTPUT_DIR STEPS
It trains the same model (built by the same task code), on the same prepared blocks, with the same
DeepSpeed config as `launcher run`, but with a plain loop: no sampler, no metrics, no checkpoints.
Rank 0 prints one JSON line per step: {"step", "time", "tokens"}.
"""

from __future__ import annotations

import json
import os
import sys
import time

import deepspeed
import torch

from launcher.data.tokenizer import load_tokenizer
from launcher.jobspec import layout
from launcher.jobspec.deepspeed_config import build_deepspeed_config
from launcher.jobspec.load import load_spec
from launcher.jobspec.plan import plan_stage
from launcher.tasks import build_task


def main(job: str, output_dir: str, steps: int) -> None:
    spec = load_spec(job, [f"output_dir={output_dir}"])
    stage = spec.stages[0]
    plan = plan_stage(spec, 0, local=False)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    assert world == plan.world_size, f"run with --nproc_per_node {plan.world_size}"
    torch.manual_seed(spec.seed)
    task = build_task(stage, load_tokenizer(layout.tokenizer_dir(spec, stage.name)))
    model = task.build_model(None)
    config = build_deepspeed_config(spec.deepspeed, stage, plan, model)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    data = task.dataset(layout.data_dir(spec, stage.name), "train")
    generator = torch.Generator().manual_seed(rank)
    micro = plan.micro_batch_size
    engine.train()
    for step in range(steps):
        tokens = 0
        for _ in range(plan.grad_accum_steps):
            indices = torch.randint(len(data), (micro,), generator=generator).tolist()
            batch = task.collate([data[i] for i in indices], generator)
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            tokens += int(batch["attention_mask"].sum())
        if rank == 0:
            print(json.dumps({"step": step + 1, "time": time.time(), "tokens": tokens * world}), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
