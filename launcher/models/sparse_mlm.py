"""BERT masked LM that computes vocabulary logits only where the loss needs them.

HF's `BertForMaskedLM` projects every position onto the vocabulary, although only the ~15% masked
positions carry a label; on a small model that projection is most of the FLOPs. With labels, this
subclass runs the prediction head on the masked positions only (the loss is identical: unmasked
positions are ignored by the loss anyway). Without labels it is the stock forward, and its weights
and config are exactly HF's, so exports load with `AutoModelForMaskedLM`.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from transformers.modeling_outputs import MaskedLMOutput


class BertForMaskedLM(transformers.BertForMaskedLM):
    # The class keeps HF's name on purpose: `save_pretrained` records it as the architecture.

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> MaskedLMOutput:
        if labels is None:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = self.bert(input_ids, attention_mask=attention_mask, return_dict=True, **kwargs).last_hidden_state
        picked = labels != -100
        logits = self.cls(hidden[picked])
        if logits.shape[0] == 0:  # nothing masked in this micro-batch: a zero loss that keeps the graph
            return MaskedLMOutput(loss=hidden.sum() * 0.0, logits=logits)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels[picked])
        return MaskedLMOutput(loss=loss, logits=logits)
