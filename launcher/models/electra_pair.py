"""ELECTRA-style replaced-token detection (Clark et al., 2020): a small generator and a discriminator, trained jointly.

The generator is a narrow masked LM: it sees the block with ~15% of its tokens replaced by [MASK] and
predicts them. Its predictions are *sampled* (no gradient through the sample) into the original block,
and the discriminator labels every real token as original or replaced. The discriminator learns from
every token, not only the masked ones, which is where the method's compute efficiency comes from.
Both share the token, position and type embeddings (the generator's output layer is tied to them);
the loss is `generator MLM loss + rtd.discriminator_weight x discriminator loss`.

The export is the discriminator alone, as HF's `ElectraForPreTraining` (safetensors):
`AutoModelForSequenceClassification` loads it as `ElectraForSequenceClassification` (only the
classifier is new). The generator is a training device and is not exported; a stage that starts an
rtd stage from an export (`init_from`) starts a fresh generator beside the loaded discriminator.

Sampling is exact on resume: the collator draws one uniform number per position from the step's
seeded generator, and the model turns it into a token by inverting the generator's cumulative
distribution at the masked positions (no other randomness than dropout, which the loop seeds).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.utils import ModelOutput

from launcher.jobspec.models import ModelSpec


@dataclass
class RTDOutput(ModelOutput):
    """The joint loss (what is optimised) and its parts, with the discriminator's per-token verdicts."""

    loss: torch.Tensor | None = None
    generator_loss: torch.Tensor | None = None
    discriminator_loss: torch.Tensor | None = None
    masked: torch.Tensor | None = None  # masked positions (generator targets)
    scored: torch.Tensor | None = None  # real tokens the discriminator was scored on
    correct: torch.Tensor | None = None  # of those, how many it labelled right (replaced or not)


def discriminator_config(model: ModelSpec, vocab_size: int, pad_id: int | None):  # noqa: ANN201
    """The discriminator: a BERT-shaped ELECTRA encoder of the spec's sizes (embeddings as wide as it)."""
    from transformers import ElectraConfig

    return ElectraConfig(
        vocab_size=vocab_size,
        embedding_size=model.hidden_size,
        hidden_size=model.hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads,
        intermediate_size=model.intermediate_size or 4 * model.hidden_size,
        max_position_embeddings=model.max_position_embeddings,
        hidden_dropout_prob=model.dropout,
        attention_probs_dropout_prob=model.dropout,
        pad_token_id=pad_id,
        attn_implementation=model.attention,
    )


def generator_shape(hidden: int, heads: int, inter: int, generator_size: float) -> tuple[int, int, int]:
    """The generator's (hidden size, heads, MLP width) at `generator_size` of the discriminator's width."""
    gen_heads = max(1, round(heads * generator_size))
    per_head = max(1, round(hidden * generator_size / gen_heads))
    return gen_heads * per_head, gen_heads, max(1, round(inter * generator_size))


def generator_config(discriminator: Any, generator_size: float) -> Any:
    """The generator beside `discriminator`: `generator_size` times as wide, as deep, the same embeddings."""
    hidden, heads, inter = generator_shape(
        discriminator.hidden_size, discriminator.num_attention_heads, discriminator.intermediate_size, generator_size
    )
    config = discriminator.__class__(**discriminator.to_dict())
    config.hidden_size, config.num_attention_heads, config.intermediate_size = hidden, heads, inter
    config.architectures = None
    return config


def sample_tokens(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row of `logits`, drawn from its softmax by inverting the CDF at `uniform` (in [0, 1))."""
    cdf = logits.float().softmax(-1).cumsum(-1)
    draw = uniform.to(cdf.dtype).unsqueeze(-1) * cdf[:, -1:]  # scaled: the last entry may round below 1
    return torch.searchsorted(cdf, draw, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


class ElectraPair(torch.nn.Module):
    """Generator and discriminator as one module (one DeepSpeed engine, one optimizer, one checkpoint)."""

    def __init__(
        self,
        discriminator: transformers.ElectraForPreTraining,
        generator: transformers.ElectraForMaskedLM,
        discriminator_weight: float,
    ) -> None:
        super().__init__()
        assert discriminator.config.embedding_size == generator.config.embedding_size, "shared embeddings"
        self.discriminator = discriminator
        self.generator = generator
        generator.electra.embeddings = discriminator.electra.embeddings
        generator.generator_lm_head.weight = discriminator.electra.embeddings.word_embeddings.weight
        self.discriminator_weight = discriminator_weight

    def get_input_embeddings(self) -> torch.nn.Module:
        """The token embeddings both networks share."""
        return self.discriminator.get_input_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        sample_u: torch.Tensor,
    ) -> RTDOutput:
        masked = labels != -100
        hidden = self.generator.electra(input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
        # The output layer runs on the masked positions only (as in launcher.models.sparse_mlm).
        logits = self.generator.generator_lm_head(self.generator.generator_predictions(hidden[masked])).float()
        if logits.shape[0]:
            generator_loss = torch.nn.functional.cross_entropy(logits, labels[masked])
        else:  # nothing masked in this micro-batch: a zero loss that keeps the graph
            generator_loss = hidden.sum() * 0.0
        with torch.no_grad():
            original = torch.where(masked, labels, input_ids)
            corrupted = original.clone()
            corrupted[masked] = sample_tokens(logits, sample_u[masked])
            real = attention_mask.bool()
            replaced = (corrupted != original) & real
        out = self.discriminator.electra(corrupted, attention_mask=attention_mask, return_dict=True).last_hidden_state
        verdict = self.discriminator.discriminator_predictions(out)[real].float()
        target = replaced[real].float()
        discriminator_loss = torch.nn.functional.binary_cross_entropy_with_logits(verdict, target)
        return RTDOutput(
            loss=generator_loss + self.discriminator_weight * discriminator_loss,
            generator_loss=generator_loss.detach(),
            discriminator_loss=discriminator_loss.detach(),
            masked=masked.sum(),
            scored=real.sum(),
            correct=((verdict > 0) == target.bool()).sum(),
        )

    def save_pretrained(self, out_dir: str, state_dict: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> None:
        """The export: the discriminator as `ElectraForPreTraining` (the generator is not kept)."""
        state = self.state_dict() if state_dict is None else state_dict
        prefix = "discriminator."
        mine = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        self.discriminator.save_pretrained(out_dir, state_dict=mine, **kwargs)


def build_pair(config: Any, generator_size: float, discriminator_weight: float) -> ElectraPair:
    """A fresh pair around a discriminator config."""
    from transformers import ElectraForMaskedLM, ElectraForPreTraining

    generator = ElectraForMaskedLM(generator_config(config, generator_size))
    return ElectraPair(ElectraForPreTraining(config), generator, discriminator_weight)


def load_pair(init_path: Path, pad_id: int | None, generator_size: float, discriminator_weight: float):  # noqa: ANN201
    """The discriminator loaded from an ELECTRA export and a fresh generator; also the weights that start fresh."""
    from transformers import ElectraForMaskedLM, ElectraForPreTraining

    discriminator, info = ElectraForPreTraining.from_pretrained(
        str(init_path), local_files_only=True, output_loading_info=True
    )
    if discriminator.config.pad_token_id is None:
        discriminator.config.pad_token_id = pad_id
    generator = ElectraForMaskedLM(generator_config(discriminator.config, generator_size))
    shared = "electra.embeddings."
    fresh = sorted(info.get("missing_keys", []))
    fresh += sorted(f"generator.{name}" for name, _ in generator.named_parameters() if not name.startswith(shared))
    return ElectraPair(discriminator, generator, discriminator_weight), fresh
