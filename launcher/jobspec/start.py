"""Where a stage starts, resolved once: the one answer every layer reads.

A stage starts from an earlier stage's export (`init_from: <stage>`), from a model folder
(`init_from: <dir>` or `model.path`), or from fresh weights. Its tokenizer comes from
`tokenizer.source`, else from where its weights come from, else it is trained on the stage's corpus.
Its architecture is the first stage's of an `init_from` chain (or that folder's `config.json`).
`resolve_start` turns those three rules into a `StageStart`; nothing else reads `init_from`,
`model.path` or `tokenizer.source` to answer them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from launcher.jobspec import layout
from launcher.jobspec.models import JobSpec, ModelSpec, StageSpec

StartKind = Literal["stage", "folder", "fresh"]


@dataclass(frozen=True)
class StageStart:
    """Where one stage's weights, tokenizer and architecture come from."""

    kind: StartKind  # an earlier stage's export, a model folder, or fresh weights
    weights: Path | None  # the folder the weights load from (None: fresh)
    field: str | None  # the spec field naming it (`stages.2.init_from`, `stages.0.model.path`)
    stage: str | None  # the earlier stage, when kind is "stage"
    tokenizer: Path | None  # the folder the tokenizer is copied from (None: trained on this stage's corpus)
    tokenizer_field: str  # the field an unusable tokenizer folder is reported under
    tokenizer_stage: str | None  # the earlier stage the tokenizer comes from, if it comes from one
    model: ModelSpec  # the architecture's own sizes: the chain's first stage's `model` section
    model_dir: Path | None  # a model folder whose `config.json` holds the sizes instead (None: `model`'s)
    vocab_size: int  # the vocabulary a trained tokenizer gets: this stage's, or the stage it inherits from
    dependencies: tuple[str, ...]  # earlier stages whose export or tokenizer this stage reads

    @property
    def description(self) -> str:
        """In words, for the ladder: "our pre-training", "pretrained all-MiniLM-L6-v2", "random initialisation"."""
        if self.kind == "stage":
            return "our pre-training"
        if self.kind == "folder":
            assert self.weights is not None
            return f"pretrained {self.weights.name}"
        return "random initialisation"

    @property
    def ladder_kind(self) -> str:
        """ "ours", "pretrained" or "scratch" (how the ladder groups its rungs)."""
        return {"stage": "ours", "folder": "pretrained", "fresh": "scratch"}[self.kind]


def resolve_start(spec: JobSpec, stage: StageSpec) -> StageStart:
    """The validated spec's answer for `stage` (validation guarantees a referenced stage runs earlier)."""
    index = spec.stages.index(stage)
    earlier = spec.referenced_stage(stage.init_from)
    if earlier is not None:
        kind: StartKind = "stage"
        weights: Path | None = layout.model_dir(spec, earlier.name)
        field: str | None = f"stages.{index}.init_from"
    elif stage.init_from is not None:
        kind, weights, field = "folder", Path(stage.init_from), f"stages.{index}.init_from"
    elif stage.model.path is not None:
        kind, weights, field = "folder", Path(stage.model.path), f"stages.{index}.model.path"
    else:
        kind, weights, field = "fresh", None, None

    tokenizer_ref = stage.tokenizer.source or stage.init_from
    tokenizer_stage = spec.referenced_stage(tokenizer_ref)
    if tokenizer_stage is not None:
        tokenizer: Path | None = layout.tokenizer_dir(spec, tokenizer_stage.name)
    elif tokenizer_ref is not None:
        tokenizer = Path(tokenizer_ref)
    else:
        tokenizer = None if stage.model.path is None else Path(stage.model.path)

    if earlier is not None:
        inherited = resolve_start(spec, earlier)
        model, model_dir = inherited.model, inherited.model_dir
    else:
        model, model_dir = stage.model, weights
    vocab = stage.tokenizer.vocab_size if tokenizer_stage is None else resolve_start(spec, tokenizer_stage).vocab_size
    dependencies = tuple(
        ref for ref in dict.fromkeys((stage.init_from, stage.tokenizer.source)) if spec.referenced_stage(ref)
    )
    return StageStart(
        kind=kind,
        weights=weights,
        field=field,
        stage=None if earlier is None else earlier.name,
        tokenizer=tokenizer,
        tokenizer_field=f"stages.{index}.tokenizer.source",
        tokenizer_stage=None if tokenizer_stage is None else tokenizer_stage.name,
        model=model,
        model_dir=model_dir,
        vocab_size=vocab,
        dependencies=dependencies,
    )
