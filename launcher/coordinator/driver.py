"""Driver side, shared by every backend: claim the output folder, prepare data, plan, run stages in order.

A stage whose `summary.json` shows all its steps is skipped; any other stage resumes from its last
checkpoint. The backend (local process or Ray) only runs one stage's ranks.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import signal
import tempfile
from collections.abc import Callable

from launcher import atomic
from launcher.checkpoint_manifest import (
    convert_to_universal,
    latest_checkpoint,
    needs_universal,
    read_manifest,
    resume_problem,
    run_meta,
    verdicts,
)
from launcher.contract import StageLaunch, StageResult
from launcher.coordinator.signals import Interrupted, StopOnSignal
from launcher.coordinator.start_check import check_start
from launcher.coordinator.tracking import MlflowTracker
from launcher.data.prepare import JobRunner, PreparedStage, prepare_job, run_jobs_locally
from launcher.errors import UserError
from launcher.jobspec import layout
from launcher.jobspec.models import JobSpec
from launcher.jobspec.plan import StagePlan, plan_job
from launcher.jobspec.start import resolve_start
from launcher.metrics.ladder import render_ladder

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request after a checkpoint; the same command resumes
StageRunner = Callable[[StageLaunch], StageResult]  # runs one stage's ranks: in this process, or on Ray


def claim_job_dir(spec: JobSpec) -> None:
    """Refuse an output folder that holds another job's run, or that cannot be written; record ours."""
    root = layout.job_dir(spec)
    marker = root / "job.json"
    identity = {"name": spec.name, "stages": [[s.name, s.task] for s in spec.stages]}
    recorded = None
    if marker.exists():
        recorded = atomic.read_json(marker, if_torn="taken as this job's (a crash mid-write); written again")
        if recorded is not None and recorded != identity:
            raise UserError(
                f"output_dir: {root} holds another job's run ({marker} differs: {recorded}); "
                "use another output_dir or name"
            )
    elif root.is_dir() and any(root.iterdir()):
        raise UserError(f"output_dir: {root} is not empty and holds no launcher run; use another output_dir or name")
    try:
        root.mkdir(parents=True, exist_ok=True)
        if recorded != identity:
            atomic.write_json(marker, identity)
        tempfile.TemporaryFile(dir=root).close()  # writable (also when the marker was there already)
    except OSError as exc:
        raise UserError(f"output_dir: cannot write {root}: {exc.strerror or exc}") from None


def resolve(
    spec: JobSpec, local: bool, log: bool = True, only: str | None = None, run_jobs: JobRunner = run_jobs_locally
) -> tuple[dict[str, PreparedStage], list[StagePlan]]:
    """Prepare (cached) every stage's data, or `only` that stage's, then derive each stage's plan.

    `run_jobs` runs the preparation tasks: on this machine's cores, or as Ray Data tasks on a cluster.
    """
    prepared = prepare_job(spec, log=log, only=only, run_jobs=run_jobs)
    counts = {name: info.num_train_samples for name, info in prepared.items()}
    return prepared, plan_job(spec, local, counts)  # workers count their model's parameters


def completed_result(spec: JobSpec, plan: StagePlan) -> StageResult | None:
    """The stage's result from its `summary.json` when it ran all its steps, else None (it runs or resumes)."""
    path = layout.summary_path(spec, plan.name)
    if not path.exists():
        return None
    summary = atomic.read_json(path, if_torn="the stage is not complete; it resumes from its last checkpoint")
    if not isinstance(summary, dict):
        return None
    try:
        result = StageResult.from_json(summary)
    except (KeyError, TypeError) as exc:
        print(f"warning: {path} lacks {exc} (another launcher version?); the stage runs again to write it")
        return None
    if summary.get("sweep") is not None:  # the best trial of `launcher sweep`, which may have swept the steps
        return result
    return result if result.steps >= (plan.steps or 0) or result.early_stopped_at is not None else None


def check_resumable(spec: JobSpec, index: int, plan: StagePlan) -> None:
    """Refuse, before any worker starts, a resume that the stage's last checkpoint cannot support."""
    latest = latest_checkpoint(layout.checkpoints_dir(spec, plan.name))
    if latest is None:
        return
    saved = read_manifest(latest)
    assert saved is not None, f"{latest} verified, so it has a manifest"
    now = run_meta(plan.world_size, plan.global_batch_size, plan.zero_stage, spec.stages[index].precision)
    problem = resume_problem(saved, now)
    if problem is not None:
        raise UserError(f"stages.{index}: {problem}")
    if needs_universal(saved, now):
        print(
            f"stage {plan.name}: checkpoint step {saved['step']} was written by {saved['world_size']} worker(s); "
            f"converting it to DeepSpeed's universal format for {plan.world_size}",
            flush=True,
        )
        convert_to_universal(latest)


def stage_dependencies(spec: JobSpec, index: int) -> list[str]:
    """Earlier stages whose export or tokenizer this stage reads."""
    return list(resolve_start(spec, spec.stages[index]).dependencies)


def select_stage(spec: JobSpec, only: str | None) -> int | None:
    """`--stage NAME`: its index; the stages it reads from must be complete already."""
    if only is None:
        return None
    names = [s.name for s in spec.stages]
    if only not in names:
        raise UserError(f"--stage: no stage named {only!r} (stages: {', '.join(names)})")
    return names.index(only)


def check_devices(spec: JobSpec, local: bool, only: str | None = None) -> None:
    """Refuse up front what the ranks' devices cannot run: fp16 on CPUs (DeepSpeed has no CPU fp16),
    flash_attention_2 without a CUDA GPU or the flash-attn package, `compile` on CPU without a C compiler.

    With `only` (`--stage NAME`), only that stage runs, so only its settings matter.
    """
    if local:
        import torch

        on_cpu = not torch.cuda.is_available()
    else:
        on_cpu = not spec.cluster.use_gpu
    where = "this machine has no CUDA device" if local else "cluster.use_gpu is false"
    for index, stage in enumerate(spec.stages):
        if only not in (None, stage.name):
            continue
        if stage.precision == "fp16" and on_cpu:
            raise UserError(f"stages.{index}.precision: fp16 needs a GPU and {where}; use bf16 or fp32")
        if stage.model.attention == "flash_attention_2":
            if on_cpu:
                raise UserError(f"stages.{index}.model.attention: flash_attention_2 needs a GPU and {where}; use sdpa")
            if importlib.util.find_spec("flash_attn") is None:
                raise UserError(
                    f"stages.{index}.model.attention: flash_attention_2 needs the flash-attn package; use sdpa"
                )
        if stage.model.compile and on_cpu and not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
            raise UserError(
                f"stages.{index}.model.compile: torch.compile on CPU needs a C compiler (cc, gcc or clang) on PATH"
            )


def run_job(
    spec: JobSpec,
    local: bool,
    run_stage: StageRunner,
    only: str | None = None,
    run_jobs: JobRunner = run_jobs_locally,
) -> int:
    """Run every stage in order (or only the stage named `only`) through `run_stage`; returns the exit code.

    Data preparation tasks (a cache miss) go through `run_jobs`."""
    selected = select_stage(spec, only)
    with StopOnSignal() as signals:
        try:
            results = _run_stages(spec, local, run_stage, selected, run_jobs, signals)
        except KeyboardInterrupt:
            raise Interrupted(signals.signum or signal.SIGINT) from None
    if results is None:
        return EXIT_STOPPED
    if selected is None:
        job_summary = {"job": spec.name, "stages": [result.to_json() for result in results]}
        atomic.write_json(layout.job_dir(spec) / "summary.json", job_summary)
    print(render_results(spec, results, "job" if selected is None else f"stage {only} of job"))
    return 0


def _run_stages(
    spec: JobSpec,
    local: bool,
    run_stage: StageRunner,
    selected: int | None,
    run_jobs: JobRunner,
    signals: StopOnSignal,
) -> list[StageResult] | None:
    """The stages' results, or None when a stage stopped on request (or a signal came between stages)."""
    claim_job_dir(spec)
    only = None if selected is None else spec.stages[selected].name
    if selected is not None:
        for name in stage_dependencies(spec, selected):
            if not layout.summary_path(spec, name).exists():  # written only when a stage completes
                raise UserError(f"--stage: {only} reads stage {name!r}, which has not completed; run it first")
    prepared, plans = resolve(spec, local, only=only, run_jobs=run_jobs)
    tracker = MlflowTracker.open(spec)  # None without metrics.mlflow, or when its store does not answer
    status = "FAILED"
    try:
        results = []
        for index, plan in enumerate(plans):
            if selected is not None and index != selected:
                continue
            if signals.signum is not None:
                print(f"stopped before stage {plan.name}; re-run to go on", flush=True)
                status = "KILLED"
                return None
            result = _run_one(spec, index, plan, prepared, run_stage, signals, tracker)
            if result.stopped:
                print(f"stage {plan.name}: stopped at step {result.steps} after a checkpoint; re-run to resume")
                status = "KILLED"
                return None
            results.append(result)
        status = "FINISHED"
        return results
    finally:
        if tracker is not None:
            tracker.close(status)


def _run_one(
    spec: JobSpec,
    index: int,
    plan: StagePlan,
    prepared: dict[str, PreparedStage],
    run_stage: StageRunner,
    signals: StopOnSignal,
    tracker: MlflowTracker | None = None,
) -> StageResult:
    """Stage `index`: skipped when complete; else checked, then run through `run_stage` (in its own MLflow run,
    nested under the job's, with `metrics.mlflow`)."""
    done = completed_result(spec, plan)
    if done is not None:
        print(f"stage {plan.name}: already complete ({done.steps} steps), skipped", flush=True)
        return done
    check_start(spec, index, prepared[plan.name].vocab_size)  # an earlier stage's export exists by now
    check_resumable(spec, index, plan)
    launch = StageLaunch.of(spec, index, plan, tuple(verdicts()))  # hashed here: not again in rank 0
    stage_dir = launch.paths.stage_dir
    stage_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"stage {plan.name}: {plan.steps} steps, global batch {plan.global_batch_size}, world size "
        f"{plan.world_size}; tensorboard --logdir {stage_dir / 'tensorboard'}",
        flush=True,
    )
    # A stop file here was left by a run that was killed after asking (e.g. SIGTERM, then SIGKILL):
    # it is not a request to this run.
    (stage_dir / layout.STOP_FILE).unlink(missing_ok=True)
    signals.watch(stage_dir / layout.STOP_FILE)
    if tracker is not None:
        launch = dataclasses.replace(launch, mlflow_run=tracker.stage_run(spec, index, plan))
    result = None
    try:
        result = run_stage(launch)
        return result
    finally:
        if tracker is not None:
            tracker.stage_done(launch, result)
        signals.watch(None)
        (stage_dir / layout.STOP_FILE).unlink(missing_ok=True)  # asked for after the stage's last step: not needed


def render_results(spec: JobSpec, results: list[StageResult], what: str = "job") -> str:
    lines = [f"{what} {spec.name} complete: {layout.job_dir(spec)}"]
    for result in results:
        # per-type figures (`f1/person`) stay in summary.json and TensorBoard: one line per stage here
        evals = " ".join(f"eval_{k} {v:.4f}" for k, v in result.eval.items() if v is not None and "/" not in k)
        evals += "".join(f" test_{k} {v:.4f}" for k, v in (result.test or {}).items() if v is not None and "/" not in k)
        evals += "".join(f" ({k} {v:.4f})" for k, v in result.reference.items())
        loss = result.train_loss
        lines.append(
            f"  {result.stage:<12} steps {result.steps:<6} train_loss "
            f"{'nan' if loss is None else f'{loss:.4f}'}  {evals}  wall {result.wall_s:.1f}s"
        )
    lines += render_ladder(spec, results)
    lines.append(f"monitor: tensorboard --logdir {layout.job_dir(spec)} --host 127.0.0.1")
    return "\n".join(lines)
