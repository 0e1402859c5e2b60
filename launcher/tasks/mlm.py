"""mlm: BERT-style masked language modelling on packed blocks."""

from __future__ import annotations

from typing import Any

import torch

from launcher.metrics import flops_per_token
from launcher.tasks.base import Task, pad_batch


class MaskedLM(Task):
    """BERT-style: 15% of tokens chosen; of those 80% [MASK], 10% random, 10% unchanged."""

    auto_class_name = "AutoModelForMaskedLM"

    def model_class(self) -> Any:
        from launcher.models.sparse_mlm import BertForMaskedLM

        return BertForMaskedLM

    def flops_per_token(self, model: torch.nn.Module, seq_len: int) -> float:
        return flops_per_token(model, seq_len, self.stage.mask_probability())  # the head runs on masked tokens only

    def chosen(self, ids: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The positions to predict: the task's `mask_probability` of the real, non-special tokens."""
        special = torch.tensor(self.tokenizer.all_special_ids)
        maskable = (mask == 1) & ~torch.isin(ids, special)
        return (torch.rand(ids.shape, generator=generator) < self.stage.mask_probability()) & maskable

    def collate(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        ids, mask = pad_batch([s["input_ids"] for s in samples], self.pad_id)
        labels = ids.clone()
        chosen = self.chosen(ids, mask, generator)
        labels[~chosen] = -100
        roll = torch.rand(ids.shape, generator=generator)
        inputs = ids.clone()
        inputs[chosen & (roll < 0.8)] = self.tokenizer.mask_token_id
        random_ids = torch.randint(len(self.tokenizer), ids.shape, generator=generator)
        swap = chosen & (roll >= 0.8) & (roll < 0.9)
        inputs[swap] = random_ids[swap]
        return {"input_ids": inputs, "attention_mask": mask, "labels": labels}
