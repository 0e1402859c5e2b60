"""Parameter counts of a stage's model, built on the meta device (no memory), for `launcher validate`."""

from __future__ import annotations

from pathlib import Path

import torch

from launcher.jobspec.models import JobSpec, ModelSpec, StageSpec
from launcher.jobspec.start import resolve_start


class NoTokenizer:
    """A tokenizer stand-in without special tokens: their ids do not change a model's size."""

    pad_token_id = bos_token_id = eos_token_id = None


def count_parameters(stage: StageSpec, model: ModelSpec, model_dir: Path | None, vocab: int) -> int | None:
    """Parameters of the model `stage` trains, counted on a copy built on the meta device (no memory).

    The architecture is `model_dir`'s `config.json` (an export or a local pretrained model, whatever
    its family) or else the spec's `model` with `vocab` tokens; the head is the stage's task's. None
    when the directory's config cannot be read.
    """
    import transformers

    from launcher.tasks import build_task

    task = build_task(stage, NoTokenizer())
    if model_dir is not None:
        try:
            config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        except (OSError, ValueError):
            return None
        if task.num_labels() is not None:
            config.num_labels = task.num_labels()
    else:
        config = task.config(model, vocab)
    with torch.device("meta"):
        built = task.from_config(config)
    return sum(p.numel() for p in built.parameters())


def count_params(spec: JobSpec, stage: StageSpec) -> int | None:
    """Parameters of the stage's model as it will train (its start model's architecture, this stage's head)."""
    start = resolve_start(spec, stage)
    if start.model_dir is not None and not (start.model_dir / "config.json").is_file():
        return None  # not an HF model folder: nothing to count (the run itself reports it)
    return count_parameters(stage, start.model, start.model_dir, start.vocab_size)


def param_counts(spec: JobSpec) -> dict[str, int | None]:
    """Every stage's parameter count, by stage name (what `plan_job` takes to estimate memory)."""
    return {stage.name: count_params(spec, stage) for stage in spec.stages}
