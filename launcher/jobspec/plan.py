"""Derived values: the one place where world size, accumulation, global batch and steps are computed.

`launcher validate` prints this plan; the coordinator and the workers use the very same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import UserError
from launcher.jobspec.models import JobSpec, ModelSpec, StageSpec

# Bytes per parameter of model states (ZeRO paper, section 3): weights, gradients, Adam state.
# fp32: 4 + 4 + 8 (exp_avg, exp_avg_sq). Mixed precision: 2 + 2 + 12 (fp32 master + two moments).
_STATE_BYTES = {"fp32": (4, 4, 8), "bf16": (2, 2, 12), "fp16": (2, 2, 12)}
# DeepSpeed's ZeRO optimizers (stage >= 1) keep an fp32 master partition even when training in fp32.
_FP32_ZERO_MASTER_BYTES = 4


@dataclass(frozen=True)
class StagePlan:
    """Everything derived for one stage; `steps` is None until the data size is known."""

    name: str
    task: str
    world_size: int
    micro_batch_size: int
    grad_accum_steps: int
    global_batch_size: int
    eval_batch_size: int
    seq_len: int
    tokens_per_step: int
    steps: int | None
    zero_stage: int
    num_params: int | None
    model_states_bytes_per_worker: int | None
    optimizer_states_bytes_per_worker: int | None


def world_size(spec: JobSpec, local: bool) -> int:
    """Ranks that train: one in debug mode, otherwise `cluster.num_workers` (0 also means one)."""
    return 1 if local else max(1, spec.cluster.num_workers)


def batch_sizes(stage: StageSpec, world: int, index: int) -> tuple[int, int, int]:
    """(micro, accumulation, global) with global = micro x accumulation x world, checked once."""
    batch = stage.batch
    micro = batch.micro_batch_size
    accum = batch.grad_accum_steps
    if accum is None:
        if batch.global_batch_size is None:
            accum = 1
        else:
            per_step = micro * world
            if batch.global_batch_size % per_step:
                raise UserError(
                    f"stages.{index}.batch.global_batch_size: {batch.global_batch_size} is not a multiple of "
                    f"micro_batch_size x workers = {micro} x {world} = {per_step}"
                )
            accum = batch.global_batch_size // per_step
    global_batch = micro * accum * world
    if batch.global_batch_size is not None and batch.global_batch_size != global_batch:
        raise UserError(
            f"stages.{index}.batch.global_batch_size: {batch.global_batch_size} != micro_batch_size x "
            f"grad_accum_steps x workers = {micro} x {accum} x {world} = {global_batch}"
        )
    return micro, accum, global_batch


def total_steps(stage: StageSpec, global_batch: int, num_train_samples: int | None) -> int | None:
    """`max_steps`, or epochs over the training set rounded up to whole steps."""
    if stage.max_steps is not None:
        return stage.max_steps
    if num_train_samples is None:
        return None
    assert stage.epochs is not None
    return max(1, math.ceil(stage.epochs * math.ceil(num_train_samples / global_batch)))


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    """Steps that visit every sample once (the last step wraps around to fill its batch)."""
    return max(1, math.ceil(num_samples / global_batch))


def model_states_bytes(num_params: int, precision: str, zero_stage: int, world: int) -> dict[str, int]:
    """Per-worker bytes of weights, gradients and optimizer state under ZeRO (activations excluded).

    Stage 1 partitions the optimizer state over the workers, stage 2 also the gradients, stage 3
    also the weights (the ZeRO paper's Psi-based formula).
    """
    weights, grads, optim = (b * num_params for b in _STATE_BYTES[precision])
    if zero_stage >= 1:
        if precision == "fp32":
            optim += _FP32_ZERO_MASTER_BYTES * num_params
        optim /= world
    if zero_stage >= 2:
        grads /= world
    if zero_stage >= 3:
        weights /= world
    return {"weights": int(weights), "gradients": int(grads), "optimizer": int(optim)}


def vocab_size(spec: JobSpec, stage: StageSpec) -> int:
    """The vocabulary size a stage's model is built with: its tokenizer's, or the stage it inherits one from."""
    earlier = spec.referenced_stage(stage.tokenizer.source or stage.init_from)
    return stage.tokenizer.vocab_size if earlier is None else vocab_size(spec, earlier)


def architecture(spec: JobSpec, stage: StageSpec) -> tuple[ModelSpec, Path | None]:
    """The model a stage starts from: an earlier stage's (inherited), a local directory's, or its own spec."""
    earlier = spec.referenced_stage(stage.init_from)
    if earlier is not None:
        return architecture(spec, earlier)
    if stage.init_from is not None:
        return stage.model, Path(stage.init_from)
    return stage.model, None if stage.model.path is None else Path(stage.model.path)


def plan_stage(
    spec: JobSpec, index: int, local: bool, num_train_samples: int | None = None, num_params: int | None = None
) -> StagePlan:
    """The stage's numbers. `num_params` (counted on the meta device by `launcher.models.count`, which
    imports torch: printed by `validate`, not needed to run) adds the memory estimate."""
    stage = spec.stages[index]
    world = world_size(spec, local)
    micro, accum, global_batch = batch_sizes(stage, world, index)
    states = None
    if num_params is not None:
        states = model_states_bytes(num_params, stage.precision, spec.deepspeed.zero_stage, world)
    return StagePlan(
        name=stage.name,
        task=stage.task,
        world_size=world,
        micro_batch_size=micro,
        grad_accum_steps=accum,
        global_batch_size=global_batch,
        eval_batch_size=stage.batch.eval_batch_size or micro,
        seq_len=stage.data.seq_len,
        tokens_per_step=global_batch * stage.data.seq_len,
        steps=total_steps(stage, global_batch, num_train_samples),
        zero_stage=spec.deepspeed.zero_stage,
        num_params=num_params,
        model_states_bytes_per_worker=None if states is None else sum(states.values()),
        optimizer_states_bytes_per_worker=None if states is None else states["optimizer"],
    )


def plan_job(
    spec: JobSpec,
    local: bool,
    sample_counts: dict[str, int] | None = None,
    param_counts: dict[str, int | None] | None = None,
) -> list[StagePlan]:
    samples, params = sample_counts or {}, param_counts or {}
    return [
        plan_stage(spec, i, local, samples.get(stage.name), params.get(stage.name))
        for i, stage in enumerate(spec.stages)
    ]


def render_plan(spec: JobSpec, plans: list[StagePlan], local: bool) -> str:
    mode = "local (1 process, no Ray)" if local else f"ray ({plans[0].world_size} workers)"
    lines = [
        f"job {spec.name}: {len(plans)} stage(s), mode {mode}, output {Path(spec.output_dir) / spec.name}",
        f"deepspeed: zero_stage {spec.deepspeed.zero_stage}, offload_optimizer {spec.deepspeed.offload_optimizer}, "
        f"offload_param {spec.deepspeed.offload_param}",
    ]
    for index, (stage, plan) in enumerate(zip(spec.stages, plans, strict=True)):
        steps = plan.steps if plan.steps is not None else f"{stage.epochs} epoch(s) (steps known after prepare)"
        memory = "unknown"
        if plan.model_states_bytes_per_worker is not None:
            memory = (
                f"{_gib(plan.model_states_bytes_per_worker)} (optimizer state "
                f"{_gib(plan.optimizer_states_bytes_per_worker or 0)})"
            )
        params = "unknown" if plan.num_params is None else f"{plan.num_params / 1e6:.2f} M"
        source = f", init_from {stage.init_from}" if stage.init_from else ""
        lines += [
            f"stage {index} {plan.name}: task {plan.task}{source}, precision {stage.precision}",
            f"  world size {plan.world_size}; global batch {plan.global_batch_size} = micro {plan.micro_batch_size}"
            f" x accumulation {plan.grad_accum_steps} x workers {plan.world_size}",
            f"  tokens per step {plan.tokens_per_step} (seq_len {plan.seq_len}); steps {steps}",
            f"  parameters {params}; model states per worker (ZeRO-{plan.zero_stage}) {memory}",
        ]
    return "\n".join(lines)


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB" if num_bytes < 2**30 else f"{num_bytes / 2**30:.2f} GiB"
