"""classification: sequence classification (the BertForSequenceClassification recipe)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from launcher.data.store import DocumentDataset, TokenStore
from launcher.tasks.base import EvalSums, Task, pad_batch


class Classification(Task):
    """Sequence classification (the BertForSequenceClassification recipe), padded per batch."""

    auto_class_name = "AutoModelForSequenceClassification"
    metric_name = "accuracy"

    def num_labels(self) -> int | None:
        return len(self.stage.data.labels)

    def dataset(self, data_dir: Path, split: str, seed: int = 0) -> DocumentDataset:
        return DocumentDataset(TokenStore.read(data_dir, split))

    def sample_lengths(self, dataset: Any) -> np.ndarray | None:
        return dataset.store.doc_lengths() if self.stage.data.group_by_length else None

    def collate(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        ids, mask = pad_batch([s["input_ids"] for s in samples], self.pad_id)
        labels = torch.tensor([int(s["label"]) for s in samples], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def eval_sums(self, outputs: Any, batch: dict[str, torch.Tensor]) -> EvalSums:
        count = float(len(batch["labels"]))
        correct = float((outputs.logits.argmax(-1) == batch["labels"]).sum())
        return EvalSums(loss_sum=float(outputs.loss) * count, count=count, correct=correct)

    def eval_metrics(self, sums: EvalSums) -> dict[str, float]:
        count = max(sums.count, 1.0)
        return {"loss": sums.loss_sum / count, "accuracy": sums.correct / count}

    def reference_metrics(self, eval_set: Any) -> dict[str, float]:
        labels = eval_set.store.labels
        return {"majority_accuracy": float(np.bincount(labels).max() / len(labels))}
