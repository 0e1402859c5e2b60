"""mae: masked-autoencoder pre-training on unlabelled images (He et al. 2021; transformers' ViTMAEForPreTraining).

The encoder sees a random `1 - mae.mask_ratio` of each image's patches; a small decoder reconstructs the
pixels of the hidden ones, scored by mean squared error on them (per patch normalised pixels with
`mae.norm_pix_loss`). Which patches hide is the model's `noise` argument, drawn from the loop's
generator in training (the same on any number of workers and on a resumed run), seeded by the image's
index in evaluation. The export's ViT encoder starts an
`image_classification` stage (`init_from`), its decoder left behind, as an mlm export starts a text
classifier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from launcher.jobspec.models import ModelSpec
from launcher.tasks.base import EvalSums
from launcher.tasks.vision import ImageTask


class MaskedAutoencoder(ImageTask):
    auto_class_name = "ViTMAEForPreTraining"
    metric_name = "loss"

    def config(self, model: ModelSpec, vocab_size: int) -> Any:
        """A ViT-MAE at the spec's sizes (`vocab_size`: unused)."""
        from transformers import ViTMAEConfig

        mae = self.stage.mae
        return ViTMAEConfig(
            image_size=self.stage.image.size, patch_size=model.patch_size, num_channels=3,
            hidden_size=model.hidden_size, num_hidden_layers=model.num_layers, num_attention_heads=model.num_heads,
            intermediate_size=model.intermediate_size or 4 * model.hidden_size, hidden_dropout_prob=model.dropout,
            attention_probs_dropout_prob=model.dropout, mask_ratio=mae.mask_ratio, norm_pix_loss=mae.norm_pix_loss,
            decoder_hidden_size=mae.decoder_hidden_size, decoder_num_hidden_layers=mae.decoder_num_layers,
            decoder_num_attention_heads=mae.decoder_num_heads,
            decoder_intermediate_size=mae.decoder_intermediate_size or 4 * mae.decoder_hidden_size,
            attn_implementation=model.attention,
        )  # fmt: skip

    def from_config(self, config: Any) -> torch.nn.Module:
        from transformers import ViTMAEForPreTraining

        return ViTMAEForPreTraining(config)

    def load_class(self, init_path: Path) -> Any:
        from transformers import ViTMAEForPreTraining

        return ViTMAEForPreTraining  # continues an mae export

    def num_patches(self) -> int:
        return (self.stage.image.size // self.stage.model.patch_size) ** 2

    def collate(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Training masks come from the loop's generator (keyed by step and micro-batch); an eval image's mask is
        a function of the image alone, so the eval loss is the same whatever the ranks and batches."""
        pixels, patches = self.pixel_values(samples, generator), self.num_patches()
        if samples[0]["augment"]:
            noise = torch.rand((len(samples), patches), generator=generator)
        else:
            seeded = (torch.Generator().manual_seed(int(s["index"])) for s in samples)
            noise = torch.stack([torch.rand(patches, generator=own) for own in seeded])
        return {"pixel_values": pixels, "noise": noise}

    def example_inputs(self, size: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.zeros((1, 3, size, size)), "noise": torch.rand((1, self.num_patches()))}

    def eval_sums(self, outputs: Any, batch: dict[str, torch.Tensor]) -> EvalSums:
        count = float(batch["pixel_values"].shape[0])
        return EvalSums(loss_sum=float(outputs.loss) * count, count=count)

    def eval_metrics(self, sums: EvalSums) -> dict[str, float]:
        return {"loss": sums.loss_sum / max(sums.count, 1.0)}
