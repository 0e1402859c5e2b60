"""image_classification: a label per image (the recipe of HF's run_image_classification.py).

Models: ViT (`ViTForImageClassification`) and ResNet (`ResNetForImageClassification`) built from the
spec's sizes, or any start model: an mae export's ViT encoder (its classifier fresh), an earlier
image_classification export, a local HF image classifier. Metrics are classification's (an all-reduced
confusion matrix: accuracy, macro-F1, per-label precision / recall / F1), plus each class's accuracy
(`accuracy/<label>`: the share of its images classified right, i.e. its recall). The export carries the
label names (`id2label`) and the image processor, so `pipeline("image-classification", model=export)`
answers with them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from launcher.jobspec.models import ModelSpec
from launcher.tasks.classification import Classification
from launcher.tasks.vision import ImageTask, start_model_type

ENCODERS = {"vit": "ViTForImageClassification", "vit_mae": "ViTForImageClassification",
            "resnet": "ResNetForImageClassification"}  # fmt: skip


class ImageClassification(ImageTask, Classification):
    """Images and their labels in; logits over `data.labels` out."""

    auto_class_name = "AutoModelForImageClassification"
    metric_name = "accuracy"

    def config(self, model: ModelSpec, vocab_size: int) -> Any:
        """ViT or ResNet at the spec's sizes with this stage's labels (`vocab_size`: unused, images have none)."""
        from transformers import ResNetConfig, ViTConfig

        labels = self.stage.data.labels
        common: dict[str, Any] = {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
            "num_channels": 3,
        }
        if model.family == "resnet":
            depths = model.depths or [2] * model.num_layers
            return ResNetConfig(
                embedding_size=model.hidden_size // (4 if model.block == "bottleneck" else 1),
                hidden_sizes=[model.hidden_size * 2**i for i in range(len(depths))],
                depths=depths, layer_type=model.block, downsample_in_first_stage=False, **common,
            )  # fmt: skip
        return ViTConfig(
            image_size=self.stage.image.size, patch_size=model.patch_size, hidden_size=model.hidden_size,
            num_hidden_layers=model.num_layers, num_attention_heads=model.num_heads,
            intermediate_size=model.intermediate_size or 4 * model.hidden_size, hidden_dropout_prob=model.dropout,
            attention_probs_dropout_prob=model.dropout, attn_implementation=model.attention, **common,
        )  # fmt: skip

    def from_config(self, config: Any) -> torch.nn.Module:
        import transformers

        if config.model_type == "vit_mae":  # an mae export's config (`launcher validate` counts from it)
            config = transformers.ViTConfig(**{k: v for k, v in config.to_dict().items() if k != "model_type"})
        name = ENCODERS.get(config.model_type)
        if name is None:
            return transformers.AutoModelForImageClassification.from_config(config)
        return getattr(transformers, name)(config)

    def load_class(self, init_path: Path) -> Any:
        """ViT for vit and mae exports (the encoder's weights load, the MAE decoder is left out), ResNet for
        resnet, else the auto class."""
        import transformers

        return getattr(transformers, ENCODERS.get(start_model_type(init_path) or "", self.auto_class_name))

    def load(self, init_path: Path) -> torch.nn.Module:
        model = super().load(init_path)
        if start_model_type(init_path) == "vit_mae":
            # The export is a ViT classifier now, whatever it was loaded from (the pipeline reads model_type).
            model.config = type(model.config)(**{k: v for k, v in model.config.to_dict().items()
                                                 if not k.startswith(("decoder_", "mask_ratio", "norm_pix_loss"))
                                                 and k != "model_type"})  # fmt: skip
        return model

    def collate(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        labels = torch.tensor([int(s["label"]) for s in samples], dtype=torch.long)
        return {"pixel_values": self.pixel_values(samples, generator), "labels": labels}

    def eval_metrics(self, sums: Any) -> dict[str, float]:
        """Classification's figures and each class's accuracy (its recall: the share of its images right)."""
        metrics = super().eval_metrics(sums)
        for name in self.stage.data.labels:
            if f"recall/{name}" in metrics:
                metrics[f"accuracy/{name}"] = metrics[f"recall/{name}"]
        return metrics
