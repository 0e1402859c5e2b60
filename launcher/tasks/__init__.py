"""Objectives, one module each; a new task is a new module registered in `TASKS` (and its name in the spec).

Each task builds its model head, its collator and its eval metrics (`launcher.tasks.base.Task`).
"""

from __future__ import annotations

from typing import Any

from launcher.jobspec.models import StageSpec
from launcher.tasks.base import EvalSums, Task
from launcher.tasks.classification import Classification
from launcher.tasks.clm import CausalLM
from launcher.tasks.mlm import MaskedLM
from launcher.tasks.rtd import ReplacedTokenDetection
from launcher.tasks.token_classification import TokenClassification

TASKS: dict[str, type[Task]] = {
    "mlm": MaskedLM,
    "clm": CausalLM,
    "rtd": ReplacedTokenDetection,
    "classification": Classification,
    "token_classification": TokenClassification,
}

__all__ = ["TASKS", "EvalSums", "Task", "build_task"]


def build_task(stage: StageSpec, tokenizer: Any) -> Task:
    return TASKS[stage.task](stage, tokenizer)
