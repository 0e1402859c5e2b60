"""A stage's sweep, resolved on the driver: which field each path names, the metric, and one spec per trial.

Imports neither torch nor Ray. The trials' values come from Ray Tune's own variant generator (seeded by the
job's seed, in a fixed order), so `launcher sweep` run again gives trial N the same values and it resumes.
Each trial is the job with that stage's values changed, under `<stage>/trials/trial_<N>/`, where the stages
it reads are linked to the job's own: running it is `launcher run --stage NAME` on that job.
"""

from __future__ import annotations

import copy
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from launcher.errors import UserError
from launcher.jobspec import layout
from launcher.jobspec.models import JobSpec, StageSpec, SweepSpec, best_maximises, task_metrics

# Fields whose change would make a trial another job, another stage, or another cluster, not a variant.
UNSWEPT = {"stage": ("name", "task", "sweep"), "job": ("name", "output_dir", "stages", "sweep", "cluster")}
TRIALS_DIR = "trials"  # under the stage's folder


def _field_model(annotation: Any) -> type[BaseModel] | None:
    """The spec section an annotation holds (`OptimSpec`, `SweepSpec | None`), or None for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for arg in typing.get_args(annotation) if (m := _field_model(arg)) is not None), None)


def _names_field(model: type[BaseModel], parts: list[str]) -> bool:
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        inner = _field_model(field.annotation)
        if depth < len(parts) - 1:
            if inner is None:
                return False
            model = inner
    return True


def field_owner(path: str) -> Literal["stage", "job"]:
    """Whether a sweep path names a stage field or (where a stage has none) a job field; ValueError otherwise."""
    parts = path.split(".")
    for owner, model in (("stage", StageSpec), ("job", JobSpec)):
        if _names_field(model, parts):
            if parts[0] in UNSWEPT[owner]:
                raise ValueError(f"{path}: cannot be swept (a trial changes values of one stage, not its identity)")
            return owner  # type: ignore[return-value]
    raise ValueError(f"{path}: no such field in a stage or the job (paths look like optim.lr, data.seq_len, seed)")


def check_paths(sweep: SweepSpec) -> None:
    """Every path names a field (messages start with `params.<path>`)."""
    for path in sweep.params:
        try:
            field_owner(path)
        except ValueError as exc:
            raise ValueError(f"params.{exc}") from None


def metric_and_mode(sweep: SweepSpec, stage: StageSpec) -> tuple[str, str]:
    """The eval metric (without `eval/`) that chooses the best trial, and `max` or `min`."""
    best = stage.best_metric.removeprefix("eval/") if stage.best_metric else None
    metric = (sweep.metric or "").removeprefix("eval/") or best or "loss"
    known = task_metrics(stage.task, stage.data.labels)
    if metric not in known:
        raise ValueError(f"metric: task {stage.task} reports no {metric!r}; it reports {', '.join(known)}")
    mode = sweep.mode or (stage.best_mode if metric == best and stage.best_mode else None)
    return metric, mode or ("max" if best_maximises(metric, None) else "min")


@dataclass(frozen=True)
class Trial:
    """One trial: its number, its values by path, and the job spec that runs it (under the stage's folder)."""

    number: int
    values: dict[str, Any]
    spec: JobSpec

    @property
    def name(self) -> str:
        return f"trial_{self.number:02d}"


@dataclass(frozen=True)
class SweepPlan:
    spec: JobSpec  # the job as given
    index: int  # the swept stage
    sweep: SweepSpec
    field: str  # where the sweep section is: `stages.<i>.sweep` or `sweep`
    metric: str
    mode: str
    trials: list[Trial]

    @property
    def stage(self) -> StageSpec:
        return self.spec.stages[self.index]

    @property
    def stage_dir(self) -> Path:
        return layout.stage_dir(self.spec, self.stage.name)

    def trial_job_dir(self, trial: Trial) -> Path:
        return layout.job_dir(trial.spec)


def _tune_domain(param: Any) -> Any:
    from ray import tune

    kind = param.kind()
    value = getattr(param, kind)
    return {
        "grid": lambda: tune.grid_search(list(value)),
        "choice": lambda: tune.choice(list(value)),
        "uniform": lambda: tune.uniform(*value),
        "loguniform": lambda: tune.loguniform(*value),
        "randint": lambda: tune.randint(*value),
    }[kind]()


def trial_values(sweep: SweepSpec, seed: int) -> list[dict[str, Any]]:
    """Every trial's values, in order: the grid `num_samples` times, the distributions drawn anew each time
    (Ray Tune's variant generator with a random state seeded by `seed`: the same list on every run)."""
    import numpy as np
    from ray.tune.search.variant_generator import generate_variants

    keys = {f"p{i}": path for i, path in enumerate(sweep.params)}  # Tune splits keys on dots and slashes
    space = {key: _tune_domain(sweep.params[path]) for key, path in keys.items()}
    state = np.random.RandomState(seed)
    values = []
    for _ in range(sweep.num_samples):
        for _, resolved in generate_variants(copy.deepcopy(space), random_state=state):
            values.append({path: _plain(resolved[key]) for key, path in keys.items()})
    return values


def _plain(value: Any) -> Any:
    """numpy scalars as Python values (they go into YAML, JSON and CSV)."""
    return value.item() if hasattr(value, "item") else value


def _set(data: dict[str, Any], parts: list[str], value: Any) -> None:
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _typed(spec: JobSpec, index: int, path: str) -> Any:
    node: Any = spec.stages[index] if field_owner(path) == "stage" else spec
    for part in path.split("."):
        node = getattr(node, part)
    return node


def plan_sweep(raw: dict[str, Any], spec: JobSpec, stage_name: str) -> SweepPlan:
    """The sweep of `stage_name`: checked (paths, metric, every trial's spec) before anything runs.

    `raw`: the job's YAML mapping with the command's overrides applied (what `spec` was validated from)."""
    from launcher.jobspec.load import parse_spec

    names = [s.name for s in spec.stages]
    if stage_name not in names:
        raise UserError(f"--stage: no stage named {stage_name!r} (stages: {', '.join(names)})")
    index = names.index(stage_name)
    stage = spec.stages[index]
    sweep, field = (stage.sweep, f"stages.{index}.sweep") if stage.sweep is not None else (spec.sweep, "sweep")
    if sweep is None:
        raise UserError(f"stages.{index}.sweep: stage {stage_name} has no sweep section (nor has the job)")
    try:
        check_paths(sweep)
        metric, mode = metric_and_mode(sweep, stage)
    except ValueError as exc:
        raise UserError(f"{field}.{exc}") from None
    if sweep.scheduler == "asha" and not stage.eval_every and stage.eval_every_epochs is None:
        raise UserError(f"{field}.scheduler: asha stops trials at evaluations during training; set "
                        f"stages.{index}.eval_every or eval_every_epochs")  # fmt: skip
    trial_root = (layout.stage_dir(spec, stage_name) / TRIALS_DIR).resolve()
    trials = []
    for number, values in enumerate(trial_values(sweep, spec.seed)):
        data = copy.deepcopy(raw)
        data.pop("sweep", None)
        data["stages"][index].pop("sweep", None)
        for path, value in values.items():
            target = data["stages"][index] if field_owner(path) == "stage" else data
            _set(target, path.split("."), value)
        data["output_dir"], data["name"] = str(trial_root), f"trial_{number:02d}"
        try:
            trial_spec = parse_spec(data)
        except UserError as exc:
            shown = ", ".join(f"{path}={value!r}" for path, value in values.items())
            raise UserError(f"{field}.params: trial {number} ({shown}): {exc}") from None
        typed = {path: _typed(trial_spec, index, path) for path in values}  # `1e-3` in YAML is a string
        trials.append(Trial(number, typed, trial_spec))
    return SweepPlan(spec, index, sweep, field, metric, mode, trials)


def score_of(summary: dict[str, Any], records: list[dict[str, Any]], metric: str) -> float | None:
    """A finished trial's metric at the evaluation it exported (its best_metric's best step, else its last)."""
    best = summary.get("best") or {}
    step = best.get("step") or summary.get("steps")
    key = f"eval/{metric}"
    at_step = [r[key] for r in records if r.get("step") == step and isinstance(r.get(key), (int, float))]
    value = at_step[-1] if at_step else (summary.get("eval") or {}).get(metric)
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else float(value)
