"""token_classification: a tag per word (NER, part of speech, chunking), the recipe of HF's run_ner.py.

Sentences come prepared with a label per sub-token (`launcher.data.token_labels`: the word's tag on
its first sub-token, -100 on the rest unless `data.label_all_subtokens`). Metrics: token accuracy over
the labelled sub-tokens and, for an IOB2 tag set, entity-level precision / recall / F1 overall (micro)
and per type, as `seqeval` defines them. Entities never cross sentences, so each eval batch's
entities are counted with seqeval's own `get_entities` and the counts (true, predicted, correct per
type) are summed over batches and ranks: the figures are exactly seqeval's on the whole eval set,
without gathering any tag sequence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from launcher.data.store import TaggedDataset
from launcher.data.token_labels import IGNORE_INDEX, is_iob2
from launcher.data.validation import document_split
from launcher.tasks.base import EvalSums, Task, pad_batch


def entity_types(labels: list[str]) -> list[str]:
    """The entity types of an IOB2 tag set (PER for B-PER / I-PER), sorted as seqeval's report sorts them."""
    return sorted({tag[2:] for tag in labels if tag != "O"}) if is_iob2(labels) else []


def entity_counts(gold: list[list[str]], predicted: list[list[str]], types: list[str]) -> list[float]:
    """(gold, predicted, correct) entities per type, flattened type by type: additive over sentences."""
    from seqeval.metrics.sequence_labeling import get_entities

    true = {(kind, start, end) for kind, start, end in get_entities(gold)}
    pred = {(kind, start, end) for kind, start, end in get_entities(predicted)}
    counts = []
    for kind in types:
        true_k = {e for e in true if e[0] == kind}
        pred_k = {e for e in pred if e[0] == kind}
        counts += [float(len(true_k)), float(len(pred_k)), float(len(true_k & pred_k))]
    return counts


def scores(true: float, predicted: float, correct: float) -> tuple[float, float, float]:
    """Precision, recall, F1 (0 where undefined, seqeval's zero_division default)."""
    precision = correct / predicted if predicted else 0.0
    recall = correct / true if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


class TokenClassification(Task):
    """A tag per word; the model is `AutoModelForTokenClassification` with the tag names as `id2label`."""

    auto_class_name = "AutoModelForTokenClassification"
    metric_name = "f1"

    def __init__(self, stage: Any, tokenizer: Any) -> None:
        super().__init__(stage, tokenizer)
        self.labels = list(stage.data.labels)
        self.types = entity_types(self.labels)
        if not self.types:
            self.metric_name = "accuracy"  # a tag set without entities (part of speech): token accuracy

    def num_labels(self) -> int | None:
        return len(self.labels)

    def dataset(self, data_dir: Path, split: str, seed: int = 0) -> TaggedDataset:
        return TaggedDataset(document_split(data_dir, split))  # type: ignore[arg-type]

    def sample_lengths(self, dataset: Any) -> np.ndarray | None:
        return dataset.store.doc_lengths() if self.stage.data.group_by_length else None

    def collate(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        ids, mask = pad_batch([s["input_ids"] for s in samples], self.pad_id)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, sample in enumerate(samples):
            labels[i, : len(sample["labels"])] = torch.as_tensor(sample["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def empty_sums(self) -> EvalSums:
        return EvalSums(counts=(0.0,) * (3 * len(self.types)))

    def tag_sequences(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[list[list[str]], list[list[str]]]:
        """(gold, predicted) tag names of each sentence at its labelled positions."""
        predicted = logits.argmax(-1).cpu().numpy()
        gold = labels.cpu().numpy()
        keep = gold != IGNORE_INDEX
        names = self.labels
        return (
            [[names[t] for t in row[k]] for row, k in zip(gold, keep, strict=True)],
            [[names[t] for t in row[k]] for row, k in zip(predicted, keep, strict=True)],
        )

    def eval_sums(self, outputs: Any, batch: dict[str, torch.Tensor]) -> EvalSums:
        labels = batch["labels"]
        scored = labels != IGNORE_INDEX
        count = float(scored.sum())
        correct = float(((outputs.logits.argmax(-1) == labels) & scored).sum())
        counts: tuple[float, ...] = ()
        if self.types:
            counts = tuple(entity_counts(*self.tag_sequences(outputs.logits, labels), self.types))
        return EvalSums(loss_sum=float(outputs.loss) * count, count=count, correct=correct, counts=counts)

    def eval_metrics(self, sums: EvalSums) -> dict[str, float]:
        count = max(sums.count, 1.0)
        metrics = {"loss": sums.loss_sum / count, "accuracy": sums.correct / count}
        if not self.types:
            return metrics
        per_type = np.asarray(sums.counts, dtype=np.float64).reshape(len(self.types), 3)
        precision, recall, f1 = scores(*per_type.sum(axis=0))
        metrics |= {"precision": precision, "recall": recall, "f1": f1}
        for kind, (true, predicted, correct) in zip(self.types, per_type, strict=True):
            p, r, f = scores(true, predicted, correct)
            metrics |= {f"precision/{kind}": p, f"recall/{kind}": r, f"f1/{kind}": f}
        return metrics

    def reference_metrics(self, eval_set: Any) -> dict[str, float]:
        """Token accuracy of always answering the most frequent tag (O in NER data)."""
        labels = np.concatenate([eval_set.store.token_labels(i) for i in range(len(eval_set))])
        labels = labels[labels != IGNORE_INDEX]
        if not len(labels):
            return {}
        return {"majority_accuracy": float(np.bincount(labels).max() / len(labels))}
