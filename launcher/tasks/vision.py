"""The base of the image tasks (image_classification, mae): prepared images in, pixel batches out.

A batch is built from uint8 images as the model's `pixel_values`: training images get the stage's
augmentation (a random resized crop and a horizontal flip, torchvision's `RandomResizedCrop` /
`RandomHorizontalFlip` as HF's run_image_classification.py trains), drawn from the loop's generator,
so a step's crops are the same on any number of workers and on a resumed run; then every image is
scaled to [0, 1] and normalised with the image processor's mean and std (the processor the stage's
data was prepared with and its export carries). Grey images are repeated to 3 channels, as the
processor's RGB conversion gives them at inference. A "token" of these tasks is an image: the loop's
tokens per second are images per second.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launcher.data.images import ImageDataset, ImageStore
from launcher.jobspec.models import StageSpec
from launcher.models.configs import apply_runtime
from launcher.tasks.base import Task


def crop_boxes(
    count: int, size: int, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """`count` (left, top, width, height) boxes of torchvision's RandomResizedCrop on a `size` x `size` image:
    area a share in `scale` of the image's, aspect (log-uniform) in `ratio`; the first of ten tries that fits,
    else the whole image. All tries are drawn at once (four doubles a try, image by image, try by try)."""
    share, aspect_draw, x_draw, y_draw = torch.rand((count, 10, 4), generator=generator, dtype=torch.float64).unbind(-1)
    target = size * size * (scale[0] + share * (scale[1] - scale[0]))
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + aspect_draw * (log_high - log_low))
    width, height = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))
    fits = (width > 0) & (width <= size) & (height > 0) & (height <= size)
    left, top = torch.floor(x_draw * (size - width + 1)), torch.floor(y_draw * (size - height + 1))
    first = fits.to(torch.int8).argmax(dim=1).reshape(count, 1, 1).expand(-1, 1, 4)
    boxes = torch.stack([left, top, width, height], dim=-1).gather(1, first).squeeze(1)
    whole = torch.tensor([0.0, 0.0, float(size), float(size)], dtype=torch.float64)
    return torch.where(fits.any(dim=1, keepdim=True), boxes, whole).float()


def augment(pixels: torch.Tensor, stage: StageSpec, generator: torch.Generator) -> torch.Tensor:
    """Random resized crops and flips of a float batch (N x C x S x S), as one bilinear resampling."""
    count, _, size, _ = pixels.shape
    image = stage.image
    if image.random_resized_crop:
        left, top, width, height = crop_boxes(count, size, image.crop_scale, image.crop_ratio, generator).unbind(1)
    else:
        left = top = torch.zeros(count)
        width = height = torch.full((count,), float(size))
    flip = torch.ones(count)
    if image.horizontal_flip:
        flip = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0)
    # The affine grid maps the output square onto the crop box (coordinates in [-1, 1], pixel edges aligned).
    theta = torch.zeros((count, 2, 3))
    theta[:, 0, 0] = width / size * flip
    theta[:, 0, 2] = (2 * left + width) / size - 1
    theta[:, 1, 1] = height / size
    theta[:, 1, 2] = (2 * top + height) / size - 1
    grid = torch.nn.functional.affine_grid(theta, list(pixels.shape), align_corners=False)
    return torch.nn.functional.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)


class ImageTask(Task):
    """Images from the prepared store (`launcher.data.images`); `tokenizer` is the stage's image processor."""

    def __init__(self, stage: StageSpec, tokenizer: Any) -> None:
        self.stage = stage
        self.tokenizer = tokenizer  # the image processor (saved with the export, as a text task's tokenizer)
        self.pad_id = None
        self.fresh_weights = []
        self._normalisation: tuple[torch.Tensor, torch.Tensor] | None = None

    def dataset(self, data_dir: Path, split: str, seed: int = 0) -> ImageDataset:
        return ImageDataset(ImageStore.read(data_dir, split), augment=split == "train")

    def sample_lengths(self, dataset: Any) -> np.ndarray | None:
        return None

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["pixel_values"].shape[0])  # images

    def normalisation(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._normalisation is None:
            mean = torch.tensor(self.tokenizer.image_mean, dtype=torch.float32).reshape(1, -1, 1, 1)
            std = torch.tensor(self.tokenizer.image_std, dtype=torch.float32).reshape(1, -1, 1, 1)
            self._normalisation = mean, std
        return self._normalisation

    def pixel_values(self, samples: list[dict[str, Any]], generator: torch.Generator) -> torch.Tensor:
        """The samples' images as the model's input: augmented (training split), in [0, 1], normalised."""
        pixels = torch.from_numpy(np.stack([s["pixels"] for s in samples])).permute(0, 3, 1, 2).float() / 255.0
        if samples[0]["augment"]:  # channel by channel: a grey image is resampled once, then repeated
            pixels = augment(pixels.contiguous(), self.stage, generator)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        mean, std = self.normalisation()
        return ((pixels - mean) / std).contiguous()

    def build_model(self, init_path: Path | None) -> torch.nn.Module:
        model = self.load(init_path) if init_path is not None else self.from_config(self.config(self.stage.model, 0))
        apply_runtime(model, self.stage.model)
        return model

    def load_class(self, init_path: Path) -> Any:
        """The class that loads the start model with this task's head."""
        raise NotImplementedError

    def load(self, init_path: Path) -> torch.nn.Module:
        kwargs: dict[str, Any] = {}
        if self.num_labels() is not None:
            labels = self.stage.data.labels
            kwargs |= {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                       "label2id": {name: i for i, name in enumerate(labels)}}  # fmt: skip
        model, info = self.load_class(init_path).from_pretrained(
            str(init_path), local_files_only=True, output_loading_info=True, **kwargs
        )
        self.fresh_weights = sorted(info.get("missing_keys", []))
        return model

    def flops_per_token(self, model: torch.nn.Module, seq_len: int) -> float:
        """Training FLOPs per image: three times one image's forward pass as torch's FLOP counter counts it
        (matmuls and convolutions; the backward pass costs about twice the forward)."""
        from torch.utils.flop_counter import FlopCounterMode

        size = self.stage.image.size
        was_training = model.training
        model.eval()  # batch norm keeps its running statistics
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                model(**self.example_inputs(size))
        finally:
            model.train(was_training)
        return 3.0 * counter.get_total_flops()

    def example_inputs(self, size: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.zeros((1, 3, size, size))}


def start_model_type(init_path: Path) -> str | None:
    """The `model_type` of the model folder a stage starts from."""
    try:
        return json.loads((init_path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None
