"""Derived values: the one place where world size, accumulation, global batch and steps are computed.

`launcher validate` prints this plan; the coordinator and the workers use the very same numbers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

from launcher.errors import UserError
from launcher.jobspec.models import IMAGE_TASKS, JobSpec, StageSpec
from launcher.jobspec.start import resolve_start

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


def model_states_bytes(
    num_params: int,
    precision: str,
    zero_stage: int,
    world: int,
    offload_optimizer: bool = False,
    offload_param: bool = False,
) -> dict[str, int]:
    """Per-worker bytes of weights, gradients and optimizer state under ZeRO (activations excluded).

    Stage 1 partitions the optimizer state over the workers, stage 2 also the gradients, stage 3
    also the weights (the ZeRO paper's Psi-based formula). What ZeRO-Offload keeps in host memory
    instead of on the device is listed apart (`offloaded`): the optimizer state with
    `offload_optimizer`, the weights' partition with `offload_param`.
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
    offloaded = (optim if offload_optimizer else 0) + (weights if offload_param else 0)
    return {
        "weights": int(0 if offload_param else weights),
        "gradients": int(grads),
        "optimizer": int(0 if offload_optimizer else optim),
        "offloaded": int(offloaded),
    }


def activation_bytes(
    sizes: ArchitectureSizes, micro_batch: int, seq_len: int, precision: str, task: str, mask_probability: float
) -> int:
    """Activations one rank keeps for the backward pass of one micro-batch (an estimate).

    Per transformer block, Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
    Transformer Models", eq. 2): s*b*h*(34 + 5*a*s/h) bytes with 16-bit activations; the 5*a*s/h
    term (attention scores, softmax, dropout) is not kept by fused attention kernels (sdpa, flash) on a
    GPU; eager attention keeps it, and so does sdpa on the CPU (the tensors it keeps for the backward pass
    are eager's, byte for byte: benchmarks/README.md, "Model sizes"). fp32 doubles it. With activation
    checkpointing a block keeps only its input (2*s*b*h) and one block at a time is recomputed in full.
    The output layer keeps fp32 logits and their gradient for the scored positions (masked LM: the
    masked share only; classification: none worth counting).
    """
    s, b, h, a = seq_len, micro_batch, sizes.hidden_size, sizes.num_heads
    scale = 2.0 if precision == "fp32" else 1.0
    per_block = s * b * h * (34 + (5 * a * s / h if sizes.keeps_attention_scores else 0)) * scale
    if sizes.activation_checkpointing:
        blocks = sizes.num_layers * 2 * s * b * h * scale + per_block
    else:
        blocks = sizes.num_layers * per_block
    scored = {"clm": 1.0, "mlm": mask_probability, "rtd": mask_probability}.get(task, 0.0)
    logits = 2 * 4 * b * s * sizes.vocab_size * scored
    return int(blocks + logits)


@dataclass(frozen=True)
class ArchitectureSizes:
    """What the activation estimate needs to know about a model, from the spec or a model folder's config."""

    hidden_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    attention: str
    activation_checkpointing: bool
    on_gpu: bool = True  # the plan is for GPU workers (`cluster.use_gpu` or `cluster.gpu_memory_gb`)

    @property
    def keeps_attention_scores(self) -> bool:
        """Whether the attention probabilities stay for the backward pass (the 5*a*s/h term)."""
        return self.attention == "eager" or not self.on_gpu


@dataclass(frozen=True)
class MemoryPlan:
    """One worker's memory for a stage: model states on the device and offloaded, and one micro-batch's
    activations; `usable_bytes` (from `cluster.gpu_memory_gb`) says what it must fit in."""

    states: dict[str, int]
    activations: int | None
    usable_bytes: int | None

    @property
    def device_bytes(self) -> int:
        return self.states["weights"] + self.states["gradients"] + self.states["optimizer"] + (self.activations or 0)

    @property
    def fits(self) -> bool | None:
        return None if self.usable_bytes is None else self.device_bytes <= self.usable_bytes


# The share of a GPU's memory the plan may fill: the rest is the CUDA context, communication buffers and the
# caching allocator's fragmentation.
USABLE_GPU_SHARE = 0.9


def _sizes(spec: JobSpec, stage: StageSpec) -> ArchitectureSizes | None:
    """The start model's sizes: the spec's, or the `config.json` of a model folder (bert, gpt2 or llama keys)."""
    start = resolve_start(spec, stage)
    model, directory = start.model, start.model_dir
    own = stage.model
    on_gpu = spec.cluster.use_gpu or spec.cluster.gpu_memory_gb is not None
    if stage.task in IMAGE_TASKS and model.family == "resnet" and directory is None:
        return None  # convolutions: the transformer estimate does not apply
    if directory is None:
        return ArchitectureSizes(model.hidden_size, model.num_layers, model.num_heads, start.vocab_size,
                                 own.attention, own.activation_checkpointing, on_gpu)  # fmt: skip
    try:
        config = json.loads((directory / "config.json").read_text())
        return ArchitectureSizes(
            int(config.get("hidden_size") or config["n_embd"]),
            int(config.get("num_hidden_layers") or config["n_layer"]),
            int(config.get("num_attention_heads") or config["n_head"]),
            int(config.get("vocab_size") or 0),  # image models have none
            own.attention,
            own.activation_checkpointing,
            on_gpu,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def memory_plan(spec: JobSpec, index: int, plan: StagePlan, num_params: int) -> MemoryPlan:
    """Stage `index`'s per-worker memory for its ZeRO stage, offload and worker count."""
    stage, ds = spec.stages[index], spec.deepspeed
    states = model_states_bytes(
        num_params, stage.precision, ds.zero_stage, plan.world_size, ds.offload_optimizer, ds.offload_param
    )
    sizes = _sizes(spec, stage)
    activations = None
    if sizes is not None:
        activations = activation_bytes(
            sizes, plan.micro_batch_size, plan.seq_len, stage.precision, stage.task, stage.mask_probability()
        )
    gpu = spec.cluster.gpu_memory_gb
    return MemoryPlan(states, activations, None if gpu is None else int(gpu * 2**30 * USABLE_GPU_SHARE))


def fit_advice(spec: JobSpec, index: int, plan: StagePlan, num_params: int) -> list[str]:
    """Single changes to the spec after which stage `index` fits `cluster.gpu_memory_gb` (first ones first)."""
    stage, ds = spec.stages[index], spec.deepspeed
    candidates: list[tuple[str, JobSpec, StagePlan]] = []

    def variant(change: str, updated: JobSpec, new_plan: StagePlan | None = None) -> None:
        candidates.append((change, updated, new_plan or plan))

    def with_stage(**model: object) -> JobSpec:
        stages = list(spec.stages)
        stages[index] = stage.model_copy(update={"model": stage.model.model_copy(update=model)})
        return spec.model_copy(update={"stages": stages})

    def with_ds(**fields: object) -> JobSpec:
        return spec.model_copy(update={"deepspeed": ds.model_copy(update=fields)})

    if not stage.model.activation_checkpointing:
        variant(f"stages.{index}.model.activation_checkpointing=true", with_stage(activation_checkpointing=True))
    for zero in range(ds.zero_stage + 1, 4):
        variant(f"deepspeed.zero_stage={zero}", with_ds(zero_stage=zero), replace(plan, zero_stage=zero))
    if ds.zero_stage >= 1 and not ds.offload_optimizer:
        variant("deepspeed.offload_optimizer=true", with_ds(offload_optimizer=True))
    if ds.zero_stage == 3 and not ds.offload_param:
        variant("deepspeed.offload_param=true", with_ds(offload_param=True))
    if plan.micro_batch_size > 1:
        half = plan.micro_batch_size // 2
        variant(
            f"stages.{index}.batch.micro_batch_size={half} (accumulation x2 keeps the global batch)",
            spec,
            replace(plan, micro_batch_size=half),
        )
    if ds.zero_stage >= 1:
        workers = 2 * plan.world_size
        variant(f"cluster.num_workers={workers}", spec, replace(plan, world_size=workers))
    return [change for change, s, p in candidates if memory_plan(s, index, p, num_params).fits]


def check_fit(spec: JobSpec, plans: list[StagePlan], param_counts: dict[str, int | None]) -> None:
    """With `cluster.gpu_memory_gb`: refuse a stage whose worker memory does not fit, naming what would."""
    if spec.cluster.gpu_memory_gb is None:
        return
    for index, plan in enumerate(plans):
        num_params = param_counts.get(plan.name)
        if num_params is None:
            continue
        memory = memory_plan(spec, index, plan, num_params)
        if memory.fits:
            continue
        advice = fit_advice(spec, index, plan, num_params)
        hint = f"; fits with {' or '.join(advice[:3])}" if advice else "; no single change of ZeRO stage, offload, "
        if not advice:
            hint += "activation checkpointing, micro-batch or worker count makes it fit"
        raise UserError(
            f"cluster.gpu_memory_gb: stage {index} ({plan.name}) needs ~{_gib(memory.device_bytes)} per worker, "
            f"more than {_gib(memory.usable_bytes or 0)} usable of {spec.cluster.gpu_memory_gb:g} GiB{hint}"
        )


def sample_tokens(spec: JobSpec, stage: StageSpec) -> int:
    """The sequence a sample is to the model: `data.seq_len` tokens of text; an image's patches and the [CLS]
    token for a ViT (all of them: mae's encoder sees a share, its decoder all); 1 for a ResNet (no tokens)."""
    if stage.task not in IMAGE_TASKS:
        return stage.data.seq_len
    start = resolve_start(spec, stage)
    config: dict = {}
    if start.model_dir is not None:
        try:
            config = json.loads((start.model_dir / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
    patch = config.get("patch_size") if config else (start.model.patch_size if start.model.family == "vit" else None)
    if not isinstance(patch, int):
        return 1
    return (stage.image.size // patch) ** 2 + 1


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
        ds = spec.deepspeed
        states = model_states_bytes(
            num_params, stage.precision, ds.zero_stage, world, ds.offload_optimizer, ds.offload_param
        )
    return StagePlan(
        name=stage.name,
        task=stage.task,
        world_size=world,
        micro_batch_size=micro,
        grad_accum_steps=accum,
        global_batch_size=global_batch,
        eval_batch_size=stage.batch.eval_batch_size or micro,
        seq_len=sample_tokens(spec, stage),
        tokens_per_step=global_batch * (1 if stage.task in IMAGE_TASKS else stage.data.seq_len),
        steps=total_steps(stage, global_batch, num_train_samples),
        zero_stage=spec.deepspeed.zero_stage,
        num_params=num_params,
        model_states_bytes_per_worker=None if states is None else sum(states.values()) - states["offloaded"],
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


def single_host_warning(spec: JobSpec, local: bool) -> str | None:
    """A warning when CPU workers of a fine-tuning job take every core of this one host (a private Ray).

    Each step they all-reduce every gradient with each other and share the cores with Ray, where one
    process (`--local`) runs the same steps on all the cores with no all-reduce (benchmarks/README.md).
    """
    cluster = spec.cluster
    if local or cluster.use_gpu or cluster.num_workers < 2 or cluster.address or os.environ.get("RAY_ADDRESS"):
        return None
    cores = os.cpu_count() or 1
    if cluster.num_workers * cluster.cpus_per_worker < cores or all(s.task != "classification" for s in spec.stages):
        return None
    return (
        f"warning: {cluster.num_workers} CPU workers x {cluster.cpus_per_worker} core(s) on this {cores}-core host "
        "fine-tune slower than one process on all its cores: add --local (see benchmarks/README.md)"
    )


def render_plan(spec: JobSpec, plans: list[StagePlan], local: bool) -> str:
    mode = "local (1 process, no Ray)" if local else f"ray ({plans[0].world_size} workers)"
    lines = [
        f"job {spec.name}: {len(plans)} stage(s), mode {mode}, output {Path(spec.output_dir) / spec.name}",
        f"deepspeed: zero_stage {spec.deepspeed.zero_stage}, offload_optimizer {spec.deepspeed.offload_optimizer}, "
        f"offload_param {spec.deepspeed.offload_param}",
    ]
    warning = single_host_warning(spec, local)
    if warning is not None:
        lines.append(warning)
    for index, (stage, plan) in enumerate(zip(spec.stages, plans, strict=True)):
        steps = plan.steps if plan.steps is not None else f"{stage.epochs} epoch(s) (steps known after prepare)"
        params = "unknown" if plan.num_params is None else f"{plan.num_params / 1e6:.2f} M"
        source = f", init_from {stage.init_from}" if stage.init_from else ""
        lines += [
            f"stage {index} {plan.name}: task {plan.task}{source}, precision {stage.precision}",
            f"  world size {plan.world_size}; global batch {plan.global_batch_size} = micro {plan.micro_batch_size}"
            f" x accumulation {plan.grad_accum_steps} x workers {plan.world_size}",
            per_step_line(stage, plan, steps),
        ]
        if plan.num_params is None or plan.model_states_bytes_per_worker is None:
            lines.append(f"  parameters {params}; model states per worker (ZeRO-{plan.zero_stage}) unknown")
            continue
        memory = memory_plan(spec, index, plan, plan.num_params)
        states = memory.states
        offloaded = f"; offloaded to host memory {_gib(states['offloaded'])}" if states["offloaded"] else ""
        lines.append(
            f"  parameters {params}; model states per worker (ZeRO-{plan.zero_stage}) "
            f"{_gib(plan.model_states_bytes_per_worker)}: weights {_gib(states['weights'])}, gradients "
            f"{_gib(states['gradients'])}, optimizer state {_gib(states['optimizer'])}{offloaded}"
        )
        checkpointing = "on" if stage.model.activation_checkpointing else "off"
        gpu = spec.cluster.use_gpu or spec.cluster.gpu_memory_gb is not None
        on_cpu = "; CPU workers keep the attention scores" if not gpu else ""
        if memory.activations is not None:
            lines.append(
                f"  activations ~{_gib(memory.activations)} per micro-batch of {plan.micro_batch_size} x {plan.seq_len}"
                f" (activation checkpointing {checkpointing}, attention {stage.model.attention}{on_cpu})"
            )
        if memory.usable_bytes is not None:
            verdict = "fits" if memory.fits else "does NOT fit"
            lines.append(
                f"  GPU memory: ~{_gib(memory.device_bytes)} per worker of {_gib(memory.usable_bytes)} usable "
                f"({spec.cluster.gpu_memory_gb:g} GiB x {USABLE_GPU_SHARE}): {verdict}"
            )
    return "\n".join(lines)


def per_step_line(stage: StageSpec, plan: StagePlan, steps: object) -> str:
    if stage.task not in IMAGE_TASKS:
        return f"  tokens per step {plan.tokens_per_step} (seq_len {plan.seq_len}); steps {steps}"
    side, tokens = stage.image.size, f", {plan.seq_len} tokens each" if plan.seq_len > 1 else ""
    return f"  images per step {plan.tokens_per_step} ({side}x{side} pixels{tokens}); steps {steps}"


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB" if num_bytes < 2**30 else f"{num_bytes / 2**30:.2f} GiB"
