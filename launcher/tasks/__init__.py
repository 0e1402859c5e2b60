"""Objectives, one module each; a new task is a new module registered in `TASKS` (and its name in the spec).

Each task builds its model head, its collator and its eval metrics (`launcher.tasks.base.Task`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.data.tokenizer import load_tokenizer
from launcher.jobspec.models import IMAGE_TASKS, StageSpec
from launcher.tasks.base import EvalSums, Task
from launcher.tasks.classification import Classification
from launcher.tasks.clm import CausalLM
from launcher.tasks.image_classification import ImageClassification
from launcher.tasks.mae import MaskedAutoencoder
from launcher.tasks.mlm import MaskedLM
from launcher.tasks.rtd import ReplacedTokenDetection
from launcher.tasks.token_classification import TokenClassification

TASKS: dict[str, type[Task]] = {
    "mlm": MaskedLM,
    "clm": CausalLM,
    "rtd": ReplacedTokenDetection,
    "classification": Classification,
    "token_classification": TokenClassification,
    "image_classification": ImageClassification,
    "mae": MaskedAutoencoder,
}

__all__ = ["TASKS", "EvalSums", "Task", "build_task", "load_preprocessor"]


def build_task(stage: StageSpec, tokenizer: Any) -> Task:
    return TASKS[stage.task](stage, tokenizer)


def load_preprocessor(stage: StageSpec, directory: Path) -> Any:
    """What turns a stage's inputs into model inputs, saved with its data and its export: the tokenizer of a
    text stage, the image processor of an image stage."""
    if stage.task in IMAGE_TASKS:
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(str(directory), local_files_only=True)
    return load_tokenizer(directory)
