"""What pre-training bought, at a glance: the job's classification stages (text or image) ranked on their shared
test set.

A job with two or more classification stages evaluated on the same files (the demo: fine-tuning from
this job's pre-training, the same recipe from random initialisation, a packaged pretrained model) gets
a ladder after its results: the majority class first, then each stage by test accuracy, and one
sentence computed from those figures, saying which start wins and by how much. Standard library
only: the driver prints it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.contract import StageResult
from launcher.jobspec.models import JobSpec, StageSpec
from launcher.jobspec.start import resolve_start


@dataclass(frozen=True)
class Rung:
    stage: str
    start: str  # "our pre-training", "pretrained DIR", "random initialisation"
    kind: str  # "ours", "pretrained", "scratch"
    labeled: str  # how many labeled examples it trained on
    accuracy: float


def rungs(spec: JobSpec, results: list[StageResult]) -> tuple[float, list[Rung]] | None:
    """The majority-class accuracy and the ranked stages of the largest group sharing eval files (None if < 2)."""
    done = {result.stage: result for result in results}
    groups: dict[tuple[str, ...], list[tuple[StageSpec, StageResult]]] = {}
    for stage in spec.stages:
        result = done.get(stage.name)
        if stage.task not in ("classification", "image_classification") or not stage.data.eval or result is None:
            continue
        if result.eval.get("accuracy") is None:
            continue
        groups.setdefault(tuple(stage.data.eval), []).append((stage, result))
    if not groups:
        return None
    group = max(groups.values(), key=len)
    if len(group) < 2:
        return None
    majority = max(result.reference.get("majority_accuracy", 0.0) for _, result in group)
    ranked = []
    for stage, result in group:
        start = resolve_start(spec, stage)
        labeled = "all" if stage.data.max_train_samples is None else f"{stage.data.max_train_samples:,}"
        ranked.append(
            Rung(stage.name, start.description, start.ladder_kind, labeled, float(result.eval["accuracy"] or 0.0))
        )
    ranked.sort(key=lambda r: -r.accuracy)
    return majority, ranked


def verdict(majority: float, ranked: list[Rung]) -> str:
    """One sentence from the figures: who wins and by how much; our pre-training against from scratch."""

    def points(a: float, b: float) -> str:
        return f"{abs(a - b) * 100:.1f} point{'' if round(abs(a - b) * 100, 1) == 1 else 's'}"

    best, second = ranked[0], ranked[1]
    if best.accuracy == second.accuracy:
        parts = [f"{best.start} ({best.stage}) and {second.start} ({second.stage}) tie at {best.accuracy:.3f}"]
    else:
        gap = points(best.accuracy, second.accuracy)
        parts = [f"{best.start} ({best.stage}) wins by {gap} over {second.start} ({second.stage})"]
    ours = [r for r in ranked if r.kind == "ours"]
    scratch = [r for r in ranked if r.kind == "scratch"]
    if ours and scratch and {ours[0].stage, scratch[0].stage} != {best.stage, second.stage}:  # else said already
        a, b = ours[0], scratch[0]
        if a.accuracy > b.accuracy:
            parts.append(f"our pre-training beats training from scratch by {points(a.accuracy, b.accuracy)}")
        elif a.accuracy < b.accuracy:
            parts.append(f"our pre-training loses to training from scratch by {points(a.accuracy, b.accuracy)}")
        else:
            parts.append("our pre-training ties with training from scratch")
    idle = [r.stage for r in ranked if r.accuracy <= majority + 0.005]
    if idle:
        parts.append(f"{', '.join(idle)} {'is' if len(idle) == 1 else 'are'} no better than the majority class")
    sentence = "; ".join(parts)
    return sentence[0].upper() + sentence[1:] + "."


def render_ladder(spec: JobSpec, results: list[StageResult]) -> list[str]:
    """The ladder's lines (none when the job has fewer than two comparable classification stages)."""
    found = rungs(spec, results)
    if found is None:
        return []
    majority, ranked = found
    eval_files = ", ".join(next(s for s in spec.stages if s.name == ranked[0].stage).data.eval)
    width = max(len(r.start) for r in ranked)
    lines = [f"test accuracy on {eval_files}:", f"  {'majority class':<{width + 14}} {majority:.4f}"]
    lines += [f"  {r.start:<{width}} {r.labeled:>6} labels {r.accuracy:.4f}  stage {r.stage}" for r in ranked]
    lines.append(verdict(majority, ranked))
    return lines
