"""classification: sequence classification (the BertForSequenceClassification recipe)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from launcher.data.store import DocumentDataset
from launcher.data.validation import document_split
from launcher.tasks.base import EvalSums, Task, pad_batch


class Classification(Task):
    """Sequence classification (the BertForSequenceClassification recipe), padded per batch."""

    auto_class_name = "AutoModelForSequenceClassification"
    metric_name = "accuracy"

    def num_labels(self) -> int | None:
        return len(self.stage.data.labels)

    def dataset(self, data_dir: Path, split: str, seed: int = 0) -> DocumentDataset:
        return DocumentDataset(document_split(data_dir, split))  # type: ignore[arg-type]

    def sample_lengths(self, dataset: Any) -> np.ndarray | None:
        return dataset.store.doc_lengths() if self.stage.data.group_by_length else None

    def collate(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        ids, mask = pad_batch([s["input_ids"] for s in samples], self.pad_id)
        labels = torch.tensor([int(s["label"]) for s in samples], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def empty_sums(self) -> EvalSums:
        k = len(self.stage.data.labels)
        return EvalSums(counts=(0.0,) * (k * k))  # the confusion matrix, row-major (true label, prediction)

    def eval_sums(self, outputs: Any, batch: dict[str, torch.Tensor]) -> EvalSums:
        k = len(self.stage.data.labels)
        labels, predicted = batch["labels"], outputs.logits.argmax(-1)
        confusion = torch.bincount(labels * k + predicted, minlength=k * k).tolist()
        count = float(len(labels))
        correct = float((predicted == labels).sum())
        return EvalSums(loss_sum=float(outputs.loss) * count, count=count, correct=correct, counts=tuple(confusion))

    def eval_metrics(self, sums: EvalSums) -> dict[str, float]:
        """Loss, accuracy and macro-F1, and per label precision, recall, F1 and the confusion matrix's row
        (`f1/<label>`, `confusion/<true>/<predicted>`), with scikit-learn's definitions (0 where undefined)."""
        from sklearn.metrics import precision_recall_fscore_support

        labels = self.stage.data.labels
        k = len(labels)
        count = max(sums.count, 1.0)
        metrics = {"loss": sums.loss_sum / count, "accuracy": sums.correct / count}
        cells = np.asarray(sums.counts, dtype=np.float64)
        true, predicted = np.divmod(np.arange(k * k), k)
        weighted = cells > 0
        if not weighted.any():
            return metrics
        scores = precision_recall_fscore_support(
            true[weighted], predicted[weighted], sample_weight=cells[weighted], labels=list(range(k)),
            zero_division=0.0,
        )  # fmt: skip
        precision, recall, f1 = (np.asarray(values, dtype=np.float64) for values in scores[:3])
        metrics["macro_f1"] = float(f1.mean())
        for i, name in enumerate(labels):
            metrics |= {f"precision/{name}": float(precision[i]), f"recall/{name}": float(recall[i]),
                        f"f1/{name}": float(f1[i])}  # fmt: skip
            metrics |= {f"confusion/{name}/{other}": float(cells[i * k + j]) for j, other in enumerate(labels)}
        return metrics

    def metrics_table(self, metrics: dict[str, float]) -> str | None:
        """Per-label precision, recall and F1 with the confusion matrix's rows, for the log."""
        if "macro_f1" not in metrics:
            return None
        labels = self.stage.data.labels
        width = max(8, *(len(name) for name in labels))
        head = f"{'label':<{width}} {'precision':>9} {'recall':>7} {'f1':>7}   " + " ".join(
            f"{name[:width]:>{width}}" for name in labels
        )
        rows = [head + "   (rows: true label, columns: predicted)"]
        for name in labels:
            cells = " ".join(f"{metrics[f'confusion/{name}/{other}']:>{width}.0f}" for other in labels)
            rows.append(f"{name:<{width}} {metrics[f'precision/{name}']:9.4f} {metrics[f'recall/{name}']:7.4f} "
                        f"{metrics[f'f1/{name}']:7.4f}   {cells}")  # fmt: skip
        rows.append(f"accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}")
        return "\n".join(rows)

    def reference_metrics(self, eval_set: Any) -> dict[str, float]:
        labels = eval_set.store.labels
        return {"majority_accuracy": float(np.bincount(labels).max() / len(labels))}
