"""The one DeepSpeed-config builder: the JSON is generated from the spec, never kept beside it."""

from __future__ import annotations

from typing import Any

from launcher.jobspec.models import DeepSpeedSpec, StageSpec
from launcher.jobspec.plan import StagePlan


def build_deepspeed_config(ds: DeepSpeedSpec, stage: StageSpec, plan: StagePlan) -> dict[str, Any]:
    """DeepSpeed config for one stage; batch sizes come from the plan (one source of truth)."""
    optim = stage.optim
    config: dict[str, Any] = {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        "gradient_clipping": optim.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": [optim.beta1, optim.beta2],
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                # torch's AdamW: no JIT-compiled fused_adam / cpu_adam op on machines without a toolchain,
                # in its fused form (one kernel over all tensors, CPU and CUDA; what HF Trainer picks by
                # default): measured 15% faster per step than the per-tensor loop on this CPU.
                "torch_adam": True,
                "fused": True,
            },
        },
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": stage.precision == "bf16"},
        "fp16": {"enabled": stage.precision == "fp16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        config["zero_force_ds_cpu_optimizer"] = False
    if ds.offload_param:
        config["zero_optimization"]["offload_param"] = {"device": "cpu"}
    return config
