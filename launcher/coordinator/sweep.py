"""`launcher sweep JOB.yaml --stage NAME`: the stage's trials on Ray Tune; the best one's export becomes the stage's.

Run as: launcher sweep jobs/demo.yaml --stage finetune stages.1.sweep.num_samples=2

Each trial is a full run of the stage (`launcher run --stage NAME` of a job that differs in the swept values) under
`<stage>/trials/trial_<N>/`, where the earlier stages it reads are links to the job's own. With
`cluster.num_workers: 0` (or `--local`) a trial trains in its Tune actor's process, taking `cpus_per_worker` CPUs
(a GPU with `use_gpu`), so Tune runs as many at once as the cluster holds; otherwise each trial is a Ray Train
run of the stage's workers, and as many trials run at once as the cluster's CPUs (GPUs) hold their workers. A
trial reports every evaluation of its metrics.jsonl to Tune, which feeds ASHA (`sweep.scheduler: asha`); a trial
ASHA stops checkpoints and stops at its next step. The best finished trial, by the sweep's metric at the
evaluation it exported, gives the stage its `model/` (hard links) and `summary.json`, so later stages'
`init_from` read it; every trial is tabulated on the console and in `<stage>/sweep.csv` and `sweep.json`.
A trial whose summary is there is not run again: the same command resumes a sweep.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import logging
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from launcher import atomic
from launcher.errors import RunError, UserError
from launcher.hooks import verbose
from launcher.jobspec import layout
from launcher.jobspec.models import JobSpec
from launcher.jobspec.sweep import SweepPlan, Trial, plan_sweep, score_of

POLL_S = 1.0  # how often a trial looks for new evaluations in its metrics.jsonl
TRIAL_FILE = "trial.json"  # in a trial's job folder: the spec it runs (a changed sweep does not reuse it)


@dataclass(frozen=True)
class TrialRun:
    """What a Tune trial needs to run its stage (pickled into its actor)."""

    spec: JobSpec
    stage: str
    local: bool
    private: bool  # the Ray cluster is this command's own
    cwd: str  # relative paths in the spec mean the same as on the driver
    metric: str

    @property
    def stage_dir(self) -> Path:
        return layout.stage_dir(self.spec, self.stage)


def _new_evaluations(path: Path, key: str, after: int) -> list[tuple[int, float]]:
    """(step, value) of the evaluations in a metrics.jsonl after step `after` (a torn last line is skipped)."""
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) > after and isinstance(record.get(key), (int, float)):
            found.append((record["step"], float(record[key])))
    return found


def trial_main(config: dict[str, Any], runs: list[TrialRun]) -> None:
    """One Tune trial: the stage runs in a thread of this actor; this thread reports its evaluations to Tune."""
    from ray import tune

    from launcher.coordinator.driver import run_job
    from launcher.coordinator.local import run_stage_local
    from launcher.coordinator.ray import run_stage_ray
    from launcher.data.prepare import run_jobs_locally

    run = runs[config["trial"]]
    os.chdir(run.cwd)
    run.stage_dir.mkdir(parents=True, exist_ok=True)
    runner = run_stage_local if run.local else functools.partial(run_stage_ray, private=run.private)
    codes: list[int] = []
    errors: list[BaseException] = []
    log = (run.stage_dir.parent / "trial.log").open("a")

    def stage() -> None:
        try:
            codes.append(run_job(run.spec, run.local, runner, only=run.stage, run_jobs=run_jobs_locally))
        except BaseException as exc:  # handed to the reporting thread, which raises it to Tune
            errors.append(exc)

    reported = 0
    metrics = run.stage_dir / "metrics.jsonl"
    with log, _output_to(log):
        thread = threading.Thread(target=stage, name="stage", daemon=True)
        thread.start()
        try:
            while True:
                thread.join(POLL_S)
                for step, value in _new_evaluations(metrics, f"eval/{run.metric}", reported):
                    tune.report({"score": value, "step": step})
                    reported = step
                if not thread.is_alive():
                    break
        except SystemExit:  # Tune stops the trial (ASHA): the stage checkpoints and stops at its next step
            (run.stage_dir / layout.STOP_FILE).touch()
            thread.join()
            raise
    if errors:
        raise errors[0]
    if codes[-1] != 0:
        raise RunError(f"{run.spec.name}: the stage stopped before its end (exit {codes[-1]})")


@contextlib.contextmanager
def _output_to(log: IO[str]) -> Iterator[None]:
    """The stage's lines, and what compilers and libraries write to the process's stdout and stderr, into the
    trial's log instead of the sweep's console (this actor runs one trial at a time)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield
    finally:
        log.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _hard_link_tree(source: Path, target: Path) -> None:
    """`target` as a copy of `source` whose files are hard links (a plain copy across file systems)."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, partial, copy_function=link, symlinks=True)
    if target.exists():
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        partial.rename(target)
        shutil.rmtree(old)
    else:
        partial.rename(target)


def _set_up_trials(plan: SweepPlan) -> None:
    """Each trial's job folder: claimed, its spec recorded, the earlier stages linked to the job's own."""
    from launcher.coordinator.driver import claim_job_dir

    spec = plan.spec
    for trial in plan.trials:
        job = layout.job_dir(trial.spec)
        record = {"values": trial.values, "spec": trial.spec.model_dump(mode="json")}
        recorded = atomic.read_json(job / TRIAL_FILE, if_torn="written again") if (job / TRIAL_FILE).exists() else None
        if recorded is not None and recorded != record:
            raise UserError(
                f"{job}: ran with other values or settings than the sweep now gives {trial.name} "
                f"({recorded.get('values')} then, {trial.values} now); remove {job.parent} to start the sweep afresh"
            )
        claim_job_dir(trial.spec)
        atomic.write_json(job / TRIAL_FILE, record)
        for earlier in spec.stages[: plan.index]:
            source, link = layout.stage_dir(spec, earlier.name), layout.stage_dir(trial.spec, earlier.name)
            if source.is_dir() and not link.is_symlink():
                link.symlink_to(source.resolve(), target_is_directory=True)


def _prepare_trials(plan: SweepPlan, local: bool) -> None:
    """Every trial's data (cached); trials whose preparation is the same share one (hard links)."""
    from launcher.coordinator.driver import resolve
    from launcher.data.prepare import fingerprint, read_meta

    stage = plan.stage.name
    done: dict[str, Path] = {}
    base = read_meta(plan.spec, plan.stage)
    if base is not None:
        done[base["fingerprint"]] = layout.data_dir(plan.spec, stage)
    for number, trial in enumerate(plan.trials):
        trial_stage = trial.spec.stages[plan.index]
        key = fingerprint(trial.spec, trial_stage)
        meta = read_meta(trial.spec, trial_stage)
        if (meta is None or meta["fingerprint"] != key) and key in done:
            _hard_link_tree(done[key], layout.data_dir(trial.spec, stage))
        resolve(trial.spec, local, log=number == 0, only=stage)
        done.setdefault(key, layout.data_dir(trial.spec, stage))


def _concurrency(plan: SweepPlan, local: bool) -> tuple[dict[str, float], int | None]:
    """Each trial's Tune resources, and how many trials run at once (None: as many as the resources allow)."""
    import ray

    cluster = plan.spec.cluster
    if local:
        return {"cpu": cluster.cpus_per_worker, "gpu": 1 if cluster.use_gpu else 0}, plan.sweep.max_concurrent_trials
    # The trial only waits on its Ray Train run, whose workers take the resources; Tune needs a resource to place
    # it, so it takes one byte of memory.
    waiting = {"cpu": 0, "memory": 1}
    if plan.sweep.max_concurrent_trials is not None:
        return waiting, plan.sweep.max_concurrent_trials
    total = ray.cluster_resources()
    if cluster.use_gpu:
        fits = int(total.get("GPU", 0) // cluster.num_workers)
    else:
        fits = int(total.get("CPU", 0) // (cluster.num_workers * cluster.cpus_per_worker))
    return waiting, max(1, fits)


def _tune(plan: SweepPlan, local: bool, private: bool) -> dict[int, str]:
    """Run the trials; returns the first line of each failed trial's error by trial number."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    runs = [TrialRun(t.spec, plan.stage.name, local, private, os.getcwd(), plan.metric) for t in plan.trials]
    resources, concurrent = _concurrency(plan, local)
    sweep = plan.sweep
    scheduler = (
        ASHAScheduler(
            time_attr="training_iteration",
            metric="score",
            mode=plan.mode,
            max_t=10**6,
            grace_period=sweep.asha.grace_evals,
            reduction_factor=sweep.asha.reduction_factor,
        )
        if sweep.scheduler == "asha"
        else FIFOScheduler()
    )
    if not verbose():  # Tune's banner and its per-trial error tracebacks: the table and the trial logs say it
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    storage = plan.stage_dir.resolve()
    shutil.rmtree(storage / "tune", ignore_errors=True)  # Tune's own records of an earlier sweep
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trial_main, runs=runs), resources),
        param_space={"trial": tune.grid_search(list(range(len(runs))))},
        tune_config=tune.TuneConfig(num_samples=1, scheduler=scheduler, max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str(storage),
            verbose=0,
            callbacks=[_Lines(plan)],
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    grid = tuner.fit()
    failed = {}
    for result in grid:
        if result.error is not None:
            failed[result.config["trial"]] = _first_line(result.error)
    return failed


def _first_line(error: BaseException) -> str:
    """The user-facing line of a trial's error (Ray wraps it in a RayTaskError with a traceback)."""
    from launcher.coordinator.ray import _known_error

    known = _known_error(error)
    cause = getattr(error, "cause", None)
    text = str(known or cause or error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _describe(trial: Trial) -> str:
    return ", ".join(f"{path}={value}" for path, value in trial.values.items())


class _Lines:
    """Tune callback: one console line when a trial starts, evaluates, ends or fails."""

    def __new__(cls, plan: SweepPlan) -> Any:
        from ray import tune

        class Lines(tune.Callback):
            def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                number = trial.config["trial"]
                print(f"sweep: {plan.trials[number].name} started ({_describe(plan.trials[number])})", flush=True)

            def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
                name = plan.trials[trial.config["trial"]].name
                print(f"sweep: {name} step {result['step']}: eval/{plan.metric} {result['score']:.4f}", flush=True)

            def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                print(f"sweep: {plan.trials[trial.config['trial']].name} ended", flush=True)

            def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                name = plan.trials[trial.config["trial"]].name
                print(f"sweep: {name} failed (its log: {layout.job_dir(plan.trials[trial.config['trial']].spec)}"
                      "/trial.log)", flush=True)  # fmt: skip

        return Lines()


def trial_rows(plan: SweepPlan, failed: dict[int, str]) -> list[dict[str, Any]]:
    """One row per trial: its values, how it ended, its score (finished trials only) and its eval figures."""
    rows = []
    for trial in plan.trials:
        stage_dir = layout.stage_dir(trial.spec, plan.stage.name)
        records = []
        if (stage_dir / "metrics.jsonl").exists():
            records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines() if line]
        summary = atomic.read_json(stage_dir / "summary.json", if_torn="not finished") if (
            stage_dir / "summary.json").exists() else None  # fmt: skip
        row: dict[str, Any] = {"trial": trial.name, **trial.values}
        last = _new_evaluations(stage_dir / "metrics.jsonl", f"eval/{plan.metric}", 0)
        if isinstance(summary, dict):
            stopped = summary.get("early_stopped_at")
            row["status"] = "done" if stopped is None else f"done (early stop at {stopped})"
            row["steps"] = summary["steps"]
            row["score"] = score_of(summary, records, plan.metric)
            row["exported_step"] = (summary.get("best") or {}).get("step") or summary["steps"]
            row["wall_s"] = summary["wall_s"]
            evals = {k: v for k, v in (summary.get("eval") or {}).items() if "/" not in k}
        else:
            if trial.number in failed:
                row["status"] = f"failed: {failed[trial.number]}"
            elif last:
                row["status"] = f"stopped by {plan.sweep.scheduler} at step {last[-1][0]}"
            else:
                row["status"] = "not run"
            row["steps"] = max((r.get("step", 0) for r in records), default=0)
            row["score"], row["exported_step"], row["wall_s"] = None, None, None
            evals = {}
        row["last_eval"] = last[-1][1] if last else None
        row.update({f"eval_{k}": v for k, v in evals.items()})
        rows.append(row)
    return rows


def best_row(rows: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The finished trial with the best score (the first of equals)."""
    scored = [row for row in rows if row["score"] is not None]
    if not scored:
        return None
    pick = max if mode == "max" else min
    best = pick(row["score"] for row in scored)
    return next(row for row in scored if row["score"] == best)


def render_rows(plan: SweepPlan, rows: list[dict[str, Any]], best: dict[str, Any] | None) -> str:
    columns = ["trial", *plan.sweep.params, "status", "steps", "score", "wall_s"]
    header = {**{c: c for c in columns}, "score": f"eval/{plan.metric}"}

    def cell(row: dict[str, Any], column: str) -> str:
        value = row.get(column)
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}" if column != "score" else f"{value:.4f}"
        return str(value)

    cells = [[header[c] for c in columns]] + [[cell(row, c) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = []
    for n, line in enumerate(cells):
        mark = "  <- best" if n and best is not None and rows[n - 1]["trial"] == best["trial"] else ""
        lines.append("  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip() + mark)
    return "\n".join(lines)


def write_table(plan: SweepPlan, rows: list[dict[str, Any]], best: dict[str, Any] | None) -> tuple[Path, Path]:
    stage_dir = plan.stage_dir
    columns = list(dict.fromkeys(key for row in rows for key in row))
    csv_path, json_path = stage_dir / "sweep.csv", stage_dir / "sweep.json"
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(csv_path, text.getvalue())
    atomic.write_json(json_path, {
        "stage": plan.stage.name, "metric": f"eval/{plan.metric}", "mode": plan.mode,
        "scheduler": plan.sweep.scheduler, "best_trial": best["trial"] if best else None, "trials": rows,
    })  # fmt: skip
    return csv_path, json_path


def publish_best(plan: SweepPlan, best: dict[str, Any], csv_path: Path) -> Path:
    """The best trial's export and summary as the stage's own (its `model/` hard links to the trial's)."""
    trial = next(t for t in plan.trials if t.name == best["trial"])
    name = plan.stage.name
    source = layout.model_dir(trial.spec, name)
    target = layout.model_dir(plan.spec, name)
    _hard_link_tree(source, target)
    summary = atomic.read_json(layout.summary_path(trial.spec, name), if_torn="the trial is not finished")
    assert isinstance(summary, dict), f"{trial.name} finished, so its summary is whole"
    summary["sweep"] = {
        "trial": trial.name, "values": trial.values, "metric": f"eval/{plan.metric}", "mode": plan.mode,
        "score": best["score"], "trials": len(plan.trials), "table": str(csv_path),
    }  # fmt: skip
    atomic.write_json(layout.summary_path(plan.spec, name), summary)
    return target


def run_sweep(spec_path: str, overrides: list[str], stage_name: str | None, local: bool) -> int:
    from launcher.coordinator.driver import check_devices, claim_job_dir, select_stage, stage_dependencies
    from launcher.coordinator.ray import ray_session
    from launcher.jobspec.load import apply_overrides, parse_spec, read_yaml

    if stage_name is None:
        raise UserError("--stage: name the stage to sweep")
    raw = apply_overrides(read_yaml(spec_path), list(overrides))
    spec = parse_spec(raw)
    local = local or spec.cluster.num_workers == 0
    check_devices(spec, local, stage_name)
    index = select_stage(spec, stage_name)
    assert index is not None
    for name in stage_dependencies(spec, index):
        if not layout.summary_path(spec, name).exists():
            raise UserError(f"--stage: {stage_name} reads stage {name!r}, which has not completed; run it first")
    # Ray reads its auth variables when imported, and the trials' values come from Ray Tune: in the session.
    with ray_session(spec) as address:
        plan = plan_sweep(raw, spec, stage_name)
        claim_job_dir(spec)
        _set_up_trials(plan)
        _prepare_trials(plan, local)
        print(
            f"sweep {stage_name}: {len(plan.trials)} trial(s) of {', '.join(plan.sweep.params)} on Ray Tune "
            f"({plan.sweep.scheduler}), best by eval/{plan.metric} ({plan.mode}); trials under "
            f"{plan.stage_dir / 'trials'}",
            flush=True,
        )
        failed = _tune(plan, local, private=address is None)
    rows = trial_rows(plan, failed)
    best = best_row(rows, plan.mode)
    csv_path, json_path = write_table(plan, rows, best)
    print(render_rows(plan, rows, best))
    print(f"sweep table: {csv_path} and {json_path}")
    if best is None:
        raise RunError(f"sweep {stage_name}: no trial finished with a finite eval/{plan.metric}; see the trial logs")
    model = publish_best(plan, best, csv_path)
    trial = next(t for t in plan.trials if t.name == best["trial"])
    print(f"sweep {stage_name}: best {trial.name} ({_describe(trial)}) with eval/{plan.metric} {best['score']:.4f}; "
          f"the stage's export is now its model: {model}")  # fmt: skip
    return 0
