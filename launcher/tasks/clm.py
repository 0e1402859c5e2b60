"""clm: GPT-style causal language modelling on packed blocks."""

from __future__ import annotations

from typing import Any

import torch

from launcher.tasks.base import EvalSums, Task, pad_batch


class CausalLM(Task):
    """GPT-style next-token prediction (the model shifts labels itself); padding ignored."""

    auto_class_name = "AutoModelForCausalLM"

    def collate(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        ids, mask = pad_batch([s["input_ids"] for s in samples], self.pad_id)
        labels = ids.masked_fill(mask == 0, -100)
        if self.stage.data.document_mask:
            return self._within_documents(ids, mask, labels)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def _within_documents(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """`data.document_mask`: each packed document attends only to itself and its positions restart at 0.

        A document starts at position 0 and after every separator. The mask is 4D (batch, 1, query,
        key: causal, same document, real token), which the model uses as given; the first token of a
        later document is not a target (nothing before it in its document predicts it).
        """
        from launcher.data.tokenizer import separator_id

        length = ids.shape[1]
        starts = torch.zeros_like(ids, dtype=torch.bool)
        starts[:, 0] = True
        starts[:, 1:] = ids[:, :-1] == separator_id(self.tokenizer)
        document = starts.cumsum(dim=1)
        index = torch.arange(length).expand_as(ids)
        position_ids = index - torch.where(starts, index, 0).cummax(dim=1).values
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        same = document[:, :, None] == document[:, None, :]
        attention = (causal & same & mask.bool()[:, None, :])[:, None]
        labels = labels.masked_fill(starts & (index > 0), -100)
        return {"input_ids": ids, "attention_mask": attention, "position_ids": position_ids, "labels": labels}

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        if self.stage.data.document_mask:  # a real token attends to itself: the diagonal of the 4D mask
            return int(batch["attention_mask"].diagonal(dim1=-2, dim2=-1).sum())
        return super().num_tokens(batch)

    def eval_sums(self, outputs: Any, batch: dict[str, torch.Tensor]) -> EvalSums:
        count = float((batch["labels"][:, 1:] != -100).sum())
        return EvalSums(loss_sum=float(outputs.loss) * count, count=count)
