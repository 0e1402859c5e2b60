"""Per-rank entry: build tokenizer, task, model and engine from the driver's `StageLaunch`, train, export.

The same function runs in debug mode (one process) and in every Ray worker; only the
`RankContext` differs. It trusts the launch: the spec was validated, the plan derived and the
paths resolved on the driver.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from launcher import atomic
from launcher.checkpoint_manifest import (
    UNIVERSAL,
    needs_universal,
    read_manifest,
    resume_problem,
    run_meta,
    trust,
    verify,
)
from launcher.contract import StageLaunch, StageResult
from launcher.data.validation import has_validation
from launcher.errors import RunError, UserError
from launcher.hooks import loop_hooks, verbose
from launcher.jobspec.deepspeed_config import build_deepspeed_config
from launcher.jobspec.layout import STOP_FILE
from launcher.metrics import MetricsWriter, NullWriter, compute_precision, json_safe, matmul_shapes, peak_flops
from launcher.tasks import build_task, load_preprocessor
from launcher.tasks.embedding_init import init_from_corpus
from launcher.worker import deepspeed_internals
from launcher.worker.context import RankContext
from launcher.worker.deepspeed_io import export_model, load_checkpoint
from launcher.worker.engine import build_engine
from launcher.worker.loop import Loop, TrainState
from launcher.worker.watchdog import StepWatchdog, watchdog_notes


def run_stage(launch: StageLaunch, ctx: RankContext) -> StageResult:
    """Train the launched stage on this rank; returns its result (`stopped` when asked to stop early)."""
    started = time.perf_counter()
    quiet_libraries()
    stage_log(launch.paths.stage_dir, ctx.rank)
    spec, index, plan, paths = launch.spec, launch.index, launch.plan, launch.paths
    stage = launch.stage
    assert plan.world_size == ctx.world_size, f"plan is for {plan.world_size} ranks, this run has {ctx.world_size}"
    assert plan.steps is not None, "the coordinator resolves steps before launching"
    print(f"stage {stage.name}: rank {ctx.rank}/{ctx.world_size} on {socket.gethostname()} ({ctx.device})", flush=True)

    torch.manual_seed(spec.seed)
    tokenizer = load_preprocessor(stage, paths.tokenizer_dir)  # an image stage's image processor
    task = build_task(stage, tokenizer)
    memory_before_model = memory_bytes(ctx.device)
    model = task.build_model(paths.start)
    fresh = task.fresh_modules()
    if fresh is not None and ctx.is_main:
        print(f"stage {stage.name}: {paths.start} has no weights for {fresh}; they start from random init", flush=True)
    trust(launch.checkpoint_verdicts)  # the folders the driver hashed already
    restore = ctx.restore_dir(paths.checkpoints)
    if stage.embedding_init.method == "cooccurrence" and paths.start is None and restore is None:
        line = init_from_corpus(model, stage, paths.data_dir, tokenizer.all_special_ids, spec.seed)
        if ctx.is_main:
            print(f"stage {stage.name}: {line}", flush=True)
    fpt = task.flops_per_token(model, plan.seq_len)
    num_params = sum(p.numel() for p in model.parameters())
    ds_config = build_deepspeed_config(spec.deepspeed, stage, plan, model)
    meta = run_meta(ctx.world_size, plan.global_batch_size, plan.zero_stage, stage.precision)
    universal = False
    if restore is not None:
        saved = read_manifest(restore)
        assert saved is not None, f"{restore} verified, so it has a manifest"
        problem = resume_problem(saved, meta)
        if problem is not None:  # the driver checks first; this guards checkpoints that appeared since
            raise UserError(f"stages.{index}: {problem}")
        universal = needs_universal(saved, meta)
        if universal:
            problem = verify(restore / UNIVERSAL)  # the driver's verdict (trusted above), or hashed here
            if problem is not None:
                raise UserError(
                    f"stages.{index}: {restore}'s universal copy: {problem}; run the same command again to convert it"
                )
            ds_config["checkpoint"] = {"load_universal": True}
    engine = build_engine(model, ds_config, stage, plan.steps, ctx.device, spec.cluster.collective_timeout_s)
    if stage.model.compile:
        engine.compile()  # in place: the module's state-dict keys (checkpoints, export) stay the same

    state, load_s = TrainState(), 0.0
    if restore is not None:
        loading = time.perf_counter()
        state = TrainState(**load_checkpoint(engine, restore, universal)["train_state"])
        load_s = time.perf_counter() - loading
    resumed_from_step = None if restore is None else state.step
    # MFU against the peak of what runs: the dtype the engine computes in, and on a CPU this model's matmul shapes.
    computes_in = compute_precision(engine.module)
    shapes = matmul_shapes(engine.module, plan.micro_batch_size * plan.seq_len)
    peak, peak_source = peak_flops(ctx.device, computes_in, shapes)
    writer: NullWriter = NullWriter()
    if ctx.is_main:
        sinks = []
        if launch.mlflow_run is not None:
            from launcher.metrics.mlflow_sink import MlflowMetrics

            sinks.append(MlflowMetrics(launch.mlflow_run))
        writer = MetricsWriter(paths.stage_dir, stage.name, state.step, plan.steps, sinks)
    if state.step == 0:
        writer.text("spec", "```\n" + yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False) + "```")
        writer.text("deepspeed_config", "```\n" + json.dumps(ds_config, indent=1) + "```")
    stop, callbacks = loop_hooks(paths.stage_dir / STOP_FILE, stage.name, ctx.rank)
    loop = Loop(
        engine=engine, task=task, stage=stage, plan=plan, ctx=ctx, writer=writer, checkpoints=paths.checkpoints,
        seed=spec.seed, train_set=task.dataset(paths.data_dir, "train", spec.seed),
        eval_set=task.dataset(paths.data_dir, "eval", spec.seed), flops_per_token=fpt, peak_flops=peak,
        checkpoint_meta=meta, stop=stop, callbacks=callbacks,
        measure_peak=None if ctx.device.type == "cuda" else lambda: peak_flops(ctx.device, computes_in, shapes)[0],
    )  # fmt: skip
    stopped = False
    if state.step < plan.steps and not state.early_stopped:
        timeout, notes = spec.cluster.step_timeout_s, watchdog_notes(paths.stage_dir)
        loop.watchdog = None if timeout is None else StepWatchdog(timeout, ctx.rank, stage.name, notes)
        try:
            state, stopped = loop.run(state)
        finally:
            if loop.watchdog is not None:
                loop.watchdog.stop()
    writer.close()
    table = task.metrics_table(state.eval) if ctx.is_main and not stopped else None
    if table is not None:
        print(f"stage {stage.name}: evaluation at step {state.step}\n{table}", flush=True)
    result = StageResult(
        stage=stage.name,
        task=stage.task,
        steps=state.step,
        tokens=state.tokens,
        wall_s=round(state.wall_s, 3),
        train_loss=json_safe(state.last_train_loss),
        eval={key: json_safe(value) for key, value in state.eval.items()},
        reference=task.reference_metrics(loop.eval_set),
        world_size=ctx.world_size,
        global_batch_size=plan.global_batch_size,
        zero_stage=plan.zero_stage,
        precision=stage.precision,
        num_params=num_params,
        **optimizer_state_bytes(engine),
        flops_per_token=fpt,
        peak_flops_per_device=loop.peak_flops,
        peak_flops_source=peak_source,
        init_from=stage.init_from,
        resumed_from_step=resumed_from_step,
        process_s=round(time.perf_counter() - started, 3),
        peak_memory_bytes=peak_memory_bytes(ctx.device),
        stopped=stopped,
        best={"metric": stage.best_metric, "value": state.best_value, "step": state.best_step}
        if stage.best_metric is not None
        else None,
        early_stopped_at=state.step if state.early_stopped else None,
        memory_before_model_bytes=memory_before_model,
        checkpoint_save_s=round(loop.checkpoint_s, 3),
        checkpoint_load_s=round(load_s, 3),
    )
    if not stopped:
        if state.best_step is not None and state.best_step != state.step:
            restore_best(engine, paths.checkpoints, state.best_step, stage.name)
            if ctx.is_main:
                print(f"stage {stage.name}: exporting step {state.best_step}, the best {stage.best_metric} "
                      f"({state.best_value:.4f}), not the last step {state.step}", flush=True)  # fmt: skip
        if has_validation(paths.data_dir):  # data.validation_fraction: the test set, scored once, on the export
            loop.eval_set = task.dataset(paths.data_dir, "test", spec.seed)
            test = loop.evaluate()
            result = dataclasses.replace(result, test={key: json_safe(value) for key, value in test.items()})
            table = task.metrics_table(test) if ctx.is_main else None
            if table is not None:
                print(f"stage {stage.name}: test set, the exported model\n{table}", flush=True)
        export_model(engine, tokenizer, paths.model_dir, ctx.is_main)
        if ctx.is_main:
            atomic.write_json(paths.summary, result.to_json())
    return result


def restore_best(engine: Any, checkpoints: Path, step: int, stage_name: str) -> None:
    """Put the best checkpoint's weights back into the engine before the export (partitioned as they were
    saved: under ZeRO-3 the export then gathers them one parameter at a time, as it does the last step's)."""
    from launcher.checkpoint_manifest import tag_for, verify

    path = checkpoints / tag_for(step)
    problem = verify(path)
    if problem is not None:
        raise RunError(f"stage {stage_name}: the best checkpoint (step {step}) does not verify: {problem}")
    load_checkpoint(engine, path)


def optimizer_state_bytes(engine: Any) -> dict[str, int]:
    """This rank's measured model states but gradients: Adam's moments, the fp32 master partition ZeRO keeps,
    and the weights."""

    def nbytes(tensors: Any) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t) and t.dim() > 0)

    base = deepspeed_internals.torch_optimizer(engine)
    moments = nbytes(t for state in base.state.values() for t in state.values())
    master = nbytes(deepspeed_internals.fp32_master_tensors(engine))
    weights = nbytes(deepspeed_internals.local_weights(engine.module.parameters()))
    return {"optimizer_state_bytes": moments, "fp32_master_bytes": master, "weight_bytes": weights}


def peak_memory_bytes(device: torch.device) -> int:
    """This rank's peak: GPU memory allocated by torch on CUDA, else the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def memory_bytes(device: torch.device) -> int:
    """This rank's memory now: GPU memory allocated by torch on CUDA, else the process's resident set."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    import resource

    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def stage_log(stage_dir: Path, rank: int) -> None:
    """`<stage dir>/logs/rank<N>.log`: the libraries' own lines this rank keeps off the console (DeepSpeed's
    info lines and op builds, Python warnings), unless `--verbose` shows them on the console instead."""
    if verbose():
        return
    import logging

    folder = stage_dir / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(folder / f"rank{rank}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.captureWarnings(True)
    for name in ("launcher", "py.warnings", "DeepSpeed"):
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if not isinstance(h, logging.FileHandler)]
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    for name in ("launcher", "py.warnings"):  # not also to the root logger's console handler (Ray's workers have one)
        logging.getLogger(name).propagate = False


def quiet_libraries() -> None:
    """Keep the console for our progress line: no per-load reports or weight-writing bars."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
