"""Objectives. Each task builds its model head, its collator and its eval metrics.

A task never touches DeepSpeed or the rank layout: the loop hands it samples and a generator.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launcher.data.store import BlockDataset, DocumentDataset, MixtureDataset, TokenStore, block_prefix
from launcher.jobspec.models import ModelSpec, StageSpec
from launcher.metrics import flops_per_token


@dataclass
class EvalSums:
    """Additive eval statistics, summed over batches and ranks (`aux_*`: a task's second loss, e.g. rtd's generator)."""

    loss_sum: float = 0.0
    count: float = 0.0
    correct: float = 0.0
    aux_loss_sum: float = 0.0
    aux_count: float = 0.0

    def __add__(self, other: EvalSums) -> EvalSums:
        return EvalSums(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def values(self) -> list[float]:
        return list(astuple(self))


def _pad(rows: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest row of this batch (dynamic padding), with its attention mask."""
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def _model_config(model: ModelSpec, vocab_size: int, tokenizer: Any, num_labels: int | None):  # noqa: ANN202
    from transformers import BertConfig, GPT2Config, LlamaConfig

    inter = model.intermediate_size or 4 * model.hidden_size
    common: dict[str, Any] = {"vocab_size": vocab_size, "pad_token_id": tokenizer.pad_token_id}
    if num_labels is not None:
        common["num_labels"] = num_labels
    if model.family == "bert":
        return BertConfig(
            hidden_size=model.hidden_size,
            num_hidden_layers=model.num_layers,
            num_attention_heads=model.num_heads,
            intermediate_size=inter,
            max_position_embeddings=model.max_position_embeddings,
            hidden_dropout_prob=model.dropout,
            attention_probs_dropout_prob=model.dropout,
            **common,
        )
    if model.family == "gpt2":
        return GPT2Config(
            n_embd=model.hidden_size,
            n_layer=model.num_layers,
            n_head=model.num_heads,
            n_inner=inter,
            n_positions=model.max_position_embeddings,
            resid_pdrop=model.dropout,
            embd_pdrop=model.dropout,
            attn_pdrop=model.dropout,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **common,
        )
    return LlamaConfig(
        hidden_size=model.hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_heads,
        intermediate_size=inter,
        max_position_embeddings=model.max_position_embeddings,
        attention_dropout=model.dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **common,
    )


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
        auto = self.model_class()
        if init_path is not None:
            kwargs: dict[str, Any] = {}
            if self.num_labels() is not None:
                labels = self.stage.data.labels
                kwargs = {
                    "num_labels": len(labels),
                    "id2label": dict(enumerate(labels)),
                    "label2id": {name: i for i, name in enumerate(labels)},
                }
            model, info = auto.from_pretrained(
                str(init_path), local_files_only=True, output_loading_info=True, **kwargs
            )
            self.fresh_weights = sorted(info.get("missing_keys", []))
            if model.config.pad_token_id is None:
                model.config.pad_token_id = self.pad_id
            return model
        return self.from_config(self.config(self.stage.model, len(self.tokenizer)))

    def config(self, model: ModelSpec, vocab_size: int) -> Any:
        """The HF config of a model built from the spec's sizes (with this task's labels)."""
        config = _model_config(model, vocab_size, self.tokenizer, self.num_labels())
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

    def eval_sums(self, outputs: Any, batch: dict[str, torch.Tensor]) -> EvalSums:
        count = float((batch["labels"] != -100).sum())
        return EvalSums(loss_sum=float(outputs.loss) * count, count=count)

    def eval_metrics(self, sums: EvalSums) -> dict[str, float]:
        loss = sums.loss_sum / max(sums.count, 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    def reference_metrics(self, eval_set: Any) -> dict[str, float]:
        """What a model that learned nothing scores on this eval set (for the summary)."""
        return {}


class MaskedLM(Task):
    """BERT-style: 15% of tokens chosen; of those 80% [MASK], 10% random, 10% unchanged."""

    auto_class_name = "AutoModelForMaskedLM"

    def model_class(self) -> Any:
        from launcher.tasks.sparse_mlm import BertForMaskedLM

        return BertForMaskedLM

    def flops_per_token(self, model: torch.nn.Module, seq_len: int) -> float:
        return flops_per_token(model, seq_len, self.stage.mlm_probability)  # the head runs on masked tokens only

    def chosen(self, ids: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The positions to predict: `mlm_probability` of the real, non-special tokens."""
        special = torch.tensor(self.tokenizer.all_special_ids)
        maskable = (mask == 1) & ~torch.isin(ids, special)
        return (torch.rand(ids.shape, generator=generator) < self.stage.mlm_probability) & maskable

    def collate(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        ids, mask = _pad([s["input_ids"] for s in samples], self.pad_id)
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


class CausalLM(Task):
    """GPT-style next-token prediction (the model shifts labels itself); padding ignored."""

    auto_class_name = "AutoModelForCausalLM"

    def collate(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        ids, mask = _pad([s["input_ids"] for s in samples], self.pad_id)
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


class ReplacedTokenDetection(MaskedLM):
    """ELECTRA (`launcher.tasks.rtd`): a generator fills masked positions, a discriminator spots the replacements.

    Blocks and masked positions are the masked LM's; every chosen position becomes [MASK] (the paper's
    recipe: no random or kept tokens). Eval reports the joint loss, the discriminator's per-token
    accuracy over real tokens, and the generator's masked-LM loss.
    """

    auto_class_name = "AutoModelForPreTraining"
    metric_name = "accuracy"

    def config(self, model: ModelSpec, vocab_size: int) -> Any:
        from launcher.tasks.rtd import discriminator_config

        return discriminator_config(model, vocab_size, self.pad_id)

    def from_config(self, config: Any) -> torch.nn.Module:
        from launcher.tasks.rtd import build_pair

        return build_pair(config, self.stage.rtd_generator_size, self.stage.rtd_weight)

    def build_model(self, init_path: Path | None) -> torch.nn.Module:
        if init_path is None:
            return super().build_model(None)
        from launcher.tasks.rtd import load_pair

        stage = self.stage
        pair, self.fresh_weights = load_pair(init_path, self.pad_id, stage.rtd_generator_size, stage.rtd_weight)
        return pair

    def flops_per_token(self, model: torch.nn.Module, seq_len: int) -> float:
        # Both networks run forward and backward on every token; the generator's output layer on masked ones.
        return flops_per_token(model.discriminator, seq_len) + super().flops_per_token(model.generator, seq_len)

    def collate(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        ids, mask = _pad([s["input_ids"] for s in samples], self.pad_id)
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
        ids, mask = _pad([s["input_ids"] for s in samples], self.pad_id)
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


TASKS: dict[str, type[Task]] = {
    "mlm": MaskedLM,
    "clm": CausalLM,
    "rtd": ReplacedTokenDetection,
    "classification": Classification,
}


def build_task(stage: StageSpec, tokenizer: Any) -> Task:
    return TASKS[stage.task](stage, tokenizer)
