"""rtd: ELECTRA-style replaced-token detection (the pair of networks is `launcher.models.electra_pair`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from launcher.jobspec.models import ModelSpec
from launcher.metrics import flops_per_token
from launcher.tasks.base import EvalSums, pad_batch
from launcher.tasks.mlm import MaskedLM


class ReplacedTokenDetection(MaskedLM):
    """ELECTRA (`launcher.models.electra_pair`): a generator fills masked positions, a discriminator spots replacements.

    Blocks and masked positions are the masked LM's; every chosen position becomes [MASK] (the paper's
    recipe: no random or kept tokens). Eval reports the joint loss, the discriminator's per-token
    accuracy over real tokens, and the generator's masked-LM loss.
    """

    auto_class_name = "AutoModelForPreTraining"
    metric_name = "accuracy"

    def config(self, model: ModelSpec, vocab_size: int) -> Any:
        from launcher.models.electra_pair import discriminator_config

        return discriminator_config(model, vocab_size, self.pad_id)

    def from_config(self, config: Any) -> torch.nn.Module:
        from launcher.models.electra_pair import build_pair

        return build_pair(config, self.stage.rtd.generator_size, self.stage.rtd.discriminator_weight)

    def load(self, init_path: Path) -> torch.nn.Module:
        from launcher.models.electra_pair import load_pair

        stage = self.stage
        pair, self.fresh_weights = load_pair(
            init_path, self.pad_id, stage.rtd.generator_size, stage.rtd.discriminator_weight
        )
        return pair

    def flops_per_token(self, model: torch.nn.Module, seq_len: int) -> float:
        # Both networks run forward and backward on every token; the generator's output layer on masked ones.
        return flops_per_token(model.discriminator, seq_len) + super().flops_per_token(model.generator, seq_len)

    def collate(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        ids, mask = pad_batch([s["input_ids"] for s in samples], self.pad_id)
        chosen = self.chosen(ids, mask, generator)
        labels = ids.masked_fill(~chosen, -100)
        inputs = ids.masked_fill(chosen, self.tokenizer.mask_token_id)
        sample_u = torch.rand(ids.shape, generator=generator)  # one draw per position: replacements are replayable
        return {"input_ids": inputs, "attention_mask": mask, "labels": labels, "sample_u": sample_u}

    def eval_sums(self, outputs: Any, batch: dict[str, torch.Tensor]) -> EvalSums:
        scored, masked = float(outputs.scored), float(outputs.masked)
        return EvalSums(
            loss_sum=float(outputs.loss) * scored,
            count=scored,
            correct=float(outputs.correct),
            aux_loss_sum=float(outputs.generator_loss) * masked,
            aux_count=masked,
        )

    def eval_metrics(self, sums: EvalSums) -> dict[str, float]:
        count = max(sums.count, 1.0)
        generator_loss = sums.aux_loss_sum / max(sums.aux_count, 1.0)
        return {
            "loss": sums.loss_sum / count,
            "accuracy": sums.correct / count,
            "generator_loss": generator_loss,
            "generator_perplexity": math.exp(min(generator_loss, 50.0)),
        }
