"""The base of every task: eval sums, dynamic padding, and the model a stage builds or loads.

A task never touches DeepSpeed or the rank layout: the loop hands it samples and a generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launcher.data.store import BlockDataset, MixtureDataset, TokenStore, block_prefix
from launcher.jobspec.models import ModelSpec, StageSpec
from launcher.metrics import flops_per_token
from launcher.models.configs import apply_runtime, hf_config


@dataclass
class EvalSums:
    """Additive eval statistics, summed over batches and ranks (`aux_*`: a task's second loss, e.g. rtd's generator;
    `counts`: a task's own fixed-length tally, e.g. token_classification's entities per type)."""

    loss_sum: float = 0.0
    count: float = 0.0
    correct: float = 0.0
    aux_loss_sum: float = 0.0
    aux_count: float = 0.0
    counts: tuple[float, ...] = ()

    def __add__(self, other: EvalSums) -> EvalSums:
        scalars = (a + b for a, b in zip(self.values()[:_SCALARS], other.values()[:_SCALARS], strict=True))
        return EvalSums(*scalars, counts=tuple(a + b for a, b in zip(self.counts, other.counts, strict=True)))

    def values(self) -> list[float]:
        """Every sum as one flat list (what the ranks all-reduce)."""
        return [getattr(self, f.name) for f in fields(self)[:_SCALARS]] + list(self.counts)

    def with_values(self, values: list[float]) -> EvalSums:
        """Sums of this shape holding `values` (the all-reduced `values()`)."""
        return EvalSums(*values[:_SCALARS], counts=tuple(values[_SCALARS:]))


_SCALARS = len(fields(EvalSums)) - 1  # every field but `counts`


def pad_batch(rows: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest row of this batch (dynamic padding), with its attention mask."""
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


class Task:
    """Base: language-model objectives on packed blocks (mlm, clm override the collator)."""

    auto_class_name = ""
    metric_name = "perplexity"

    def __init__(self, stage: StageSpec, tokenizer: Any) -> None:
        self.stage = stage
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.fresh_weights: list[str] = []  # weights the start model lacked (set by build_model)

    def num_labels(self) -> int | None:
        return None

    def model_class(self) -> Any:
        import transformers

        return getattr(transformers, self.auto_class_name)

    def build_model(self, init_path: Path | None) -> torch.nn.Module:
        """The stage's model: loaded from `init_path` (an export or a local model) or built from the spec's
        sizes, with the spec's runtime switches (activation checkpointing) applied."""
        model = (
            self.load(init_path)
            if init_path is not None
            else self.from_config(self.config(self.stage.model, len(self.tokenizer)))
        )
        apply_runtime(model, self.stage.model)
        return model

    def load(self, init_path: Path) -> torch.nn.Module:
        """The start model in `init_path` with this task's head (`fresh_weights`: what it had no weights for)."""
        auto = self.model_class()
        kwargs: dict[str, Any] = {"attn_implementation": self.stage.model.attention}
        if self.num_labels() is not None:
            labels = self.stage.data.labels
            kwargs |= {
                "num_labels": len(labels),
                "id2label": dict(enumerate(labels)),
                "label2id": {name: i for i, name in enumerate(labels)},
            }
        model, info = auto.from_pretrained(str(init_path), local_files_only=True, output_loading_info=True, **kwargs)
        self.fresh_weights = sorted(info.get("missing_keys", []))
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.pad_id
        return model

    def config(self, model: ModelSpec, vocab_size: int) -> Any:
        """The HF config of a model built from the spec's sizes (with this task's labels)."""
        config = hf_config(model, vocab_size, self.tokenizer, self.num_labels())
        if self.num_labels() is not None:
            config.id2label = dict(enumerate(self.stage.data.labels))
            config.label2id = {name: i for i, name in enumerate(self.stage.data.labels)}
        return config

    def from_config(self, config: Any) -> torch.nn.Module:
        """A freshly initialised model of `config` with this task's head."""
        from transformers import PreTrainedModel

        auto = self.model_class()
        # Auto classes build from a config with `from_config`; a concrete model class is called.
        return auto(config) if issubclass(auto, PreTrainedModel) else auto.from_config(config)

    def flops_per_token(self, model: torch.nn.Module, seq_len: int) -> float:
        """Training FLOPs per token of `model` on `seq_len`-token sequences (for MFU)."""
        return flops_per_token(model, seq_len)

    def fresh_modules(self) -> str | None:
        """The modules `build_model` had to initialise (the start model had no weights for them), in a few words.

        A pretrained encoder continued with a masked-LM stage (e.g. all-MiniLM-L6-v2, saved without
        its MLM head) gets a new prediction head; any start model gets a new classifier."""
        if not self.fresh_weights:
            return None
        modules = sorted({".".join(name.rsplit(".", 1)[0].split(".")[:2]) for name in self.fresh_weights})
        return f"{', '.join(modules)} ({len(self.fresh_weights)} tensors)"

    def dataset(self, data_dir: Path, split: str, seed: int = 0):  # noqa: ANN201
        """Blocks of the split's stream; a `data.sources` mixture's training split draws from each source's own."""
        prefix = block_prefix(self.stage.task, self.tokenizer)
        seq_len = self.stage.data.seq_len
        if split == "train" and self.stage.data.sources:
            weights = TokenStore.source_weights(data_dir)
            parts = [BlockDataset(TokenStore.read(data_dir, split, s), seq_len, prefix) for s in range(len(weights))]
            return MixtureDataset(parts, weights, seed)
        return BlockDataset(TokenStore.read(data_dir, split), seq_len, prefix)

    def collate(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def sample_lengths(self, dataset: Any) -> np.ndarray | None:
        """Lengths to group training batches by (`data.group_by_length`), or None: packed blocks are all equal."""
        return None

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Real (non-padding) tokens of a collated batch."""
        return int(batch["attention_mask"].sum())

    def metrics_table(self, metrics: dict[str, float]) -> str | None:
        """A readable table of the final evaluation for the log (per-label figures), or None."""
        return None

    def empty_sums(self) -> EvalSums:
        """The sums before the first eval batch; every rank starts from the same shape (`counts` included)."""
        return EvalSums()

    def eval_sums(self, outputs: Any, batch: dict[str, torch.Tensor]) -> EvalSums:
        count = float((batch["labels"] != -100).sum())
        return EvalSums(loss_sum=float(outputs.loss) * count, count=count)

    def eval_metrics(self, sums: EvalSums) -> dict[str, float]:
        loss = sums.loss_sum / max(sums.count, 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    def reference_metrics(self, eval_set: Any) -> dict[str, float]:
        """What a model that learned nothing scores on this eval set (for the summary)."""
        return {}
