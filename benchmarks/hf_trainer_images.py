"""Image classification as a user writes it without the launcher: ViTForImageClassification + HF `Trainer`.

Run by benchmarks/finetune_vs_trainer.py --images (which installs `accelerate` into the benchmark's own
folder and puts it on PYTHONPATH); by hand:
  PYTHONPATH=runs/bench-deps .venv/bin/python benchmarks/hf_trainer_images.py --steps 300 [--workers 2]

The recipe of HF's run_image_classification.py: per-image training transforms applied as the loader reads
each image (random resized crop, horizontal flip, then to a tensor and normalised; torchvision's transforms
written in PIL, since torchvision has no build for this torch on CPU), `Trainer`'s defaults otherwise
(fused AdamW, random sampler, `--workers` loader processes). The model and optimisation are
benchmarks/vision-finetune.yaml's: the small ViT (4 layers, 128 wide, 4x4 patches of Fashion-MNIST's 28x28
grey images repeated to 3 channels), the first `--train-samples` labeled training images, batch 64,
lr 1e-3, weight decay 0.05, cosine decay after 20 warm-up steps, clipping 1.0, normalised with the
training images' mean and std. Prints one JSON line: the images trained on, `trainer.train()` seconds,
their ratio, the mean training loss and the accuracy on the 10,000 test images.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
from pathlib import Path

import numpy as np
import torch
from hf_trainer_finetune import quiet_arguments, timed_train  # this folder: the script's own path

FASHION = Path("/usr/share/datasets/fashion-mnist")
SIZE, SCALE, RATIO = 28, (0.35, 1.0), (3 / 4, 4 / 3)


def read_idx(split: str, count: int | None) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(FASHION / f"{split}-images-idx3-ubyte.gz") as stream:
        images = np.frombuffer(stream.read(), dtype=np.uint8, offset=16).reshape(-1, SIZE, SIZE)
    with gzip.open(FASHION / f"{split}-labels-idx1-ubyte.gz") as stream:
        labels = np.frombuffer(stream.read(), dtype=np.uint8, offset=8)
    return images[:count], labels[:count].astype(np.int64)


class Images(torch.utils.data.Dataset):
    """PIL images; training ones get torchvision's RandomResizedCrop and RandomHorizontalFlip, as written in PIL."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: float, std: float, train: bool) -> None:
        from PIL import Image

        self.images = [Image.fromarray(pixels) for pixels in images]
        self.labels, self.mean, self.std, self.train = labels, mean, std, train

    def __len__(self) -> int:
        return len(self.images)

    def crop(self, image):  # torchvision's RandomResizedCrop.get_params: ten tries, then the whole image
        from PIL import Image

        area = SIZE * SIZE
        for _ in range(10):
            target = area * random.uniform(*SCALE)
            aspect = math.exp(random.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
            width, height = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < width <= SIZE and 0 < height <= SIZE:
                left, top = random.randint(0, SIZE - width), random.randint(0, SIZE - height)
                return image.resize(
                    (SIZE, SIZE), Image.Resampling.BILINEAR, box=(left, top, left + width, top + height)
                )
        return image

    def __getitem__(self, index: int) -> dict:
        from PIL import ImageOps

        image = self.images[index]
        if self.train:
            image = self.crop(image)
            if random.random() < 0.5:
                image = ImageOps.mirror(image)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
        pixels = ((pixels - self.mean) / self.std).expand(3, SIZE, SIZE)
        return {"pixel_values": pixels, "labels": int(self.labels[index])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--train-samples", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=0, help="the loader's processes (Trainer's default 0)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers import Trainer, ViTConfig, ViTForImageClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    train_pixels, train_labels = read_idx("train", args.train_samples)
    test_pixels, test_labels = read_idx("t10k", None)
    mean, std = float(train_pixels.mean() / 255.0), float(train_pixels.std() / 255.0)
    train = Images(train_pixels, train_labels, mean, std, train=True)
    test = Images(test_pixels, test_labels, mean, std, train=False)
    torch.manual_seed(args.seed)
    config = ViTConfig(image_size=SIZE, patch_size=4, num_channels=3, hidden_size=128, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=256, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, num_labels=10)  # fmt: skip
    model = ViTForImageClassification(config)

    training_args = quiet_arguments(
        "hf-trainer-images-",
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=256,
        learning_rate=args.lr,
        weight_decay=0.05,
        warmup_steps=20,
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        seed=args.seed,
        dataloader_num_workers=args.workers,
        dataloader_persistent_workers=args.workers > 0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train)
    train_output, train_s = timed_train(trainer)
    images = args.steps * args.batch
    predictions = trainer.predict(test)
    accuracy = float((np.argmax(predictions.predictions, axis=-1) == test_labels).mean())
    print(
        json.dumps(
            {
                "runner": "trainer" + (f"+{args.workers}workers" if args.workers else ""),
                "tokens": images,
                "train_s": round(train_s, 3),
                "tokens_per_s": round(images / train_s, 1),
                "train_loss": round(train_output.training_loss, 4),
                "accuracy": round(accuracy, 4),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
