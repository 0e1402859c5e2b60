"""The seed's recipe, as a user would write it: BertForSequenceClassification + HF `Trainer`.

Run by benchmarks/finetune_vs_trainer.py (which installs `accelerate` into the benchmark's own
folder and puts it on PYTHONPATH); by hand:
  PYTHONPATH=runs/bench-deps .venv/bin/python benchmarks/hf_trainer_finetune.py MODEL TRAIN_CSV TEST_CSV \
      --steps 200 --batch 16 --lr 5e-5 --warmup 20 --max-length 64 [--group-by-length]

Dynamic padding (`DataCollatorWithPadding`), Trainer's default optimizer (fused AdamW with torch
>= 2.8), linear schedule, gradient clipping 1.0, no checkpoints. Prints one JSON line: the
attention-mask tokens of the batches trained on, `trainer.train()` seconds, their ratio, the mean
training loss, and the accuracy on the test reviews (against `predict`'s `label_ids`: with length
grouping, `predict` visits the test set in length-grouped order too).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def quiet_arguments(prefix: str, **settings: Any) -> Any:
    """`TrainingArguments` that save, evaluate and log nothing while training (the benchmarks time `train()`)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix=prefix),  # nothing is saved there (save_strategy="no")
        save_strategy="no", eval_strategy="no", logging_strategy="no", report_to="none",
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, **settings,
    )  # fmt: skip


def timed_train(trainer: Any) -> tuple[Any, float]:
    """`trainer.train()`'s output and its seconds from the start of training (after the Trainer's own set-up)."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        start = 0.0

        def on_train_begin(self, *_args: Any, **_kwargs: Any) -> None:
            Timer.start = time.perf_counter()

    trainer.add_callback(Timer())
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - max(Timer.start, start)
    shutil.rmtree(trainer.args.output_dir, ignore_errors=True)  # quiet_arguments' folder: nothing was saved
    return output, seconds


def read_csv(path: Path, labels: list[str]) -> tuple[list[str], list[int]]:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [row["text"] for row in rows], [labels.index(row["label"]) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("train")
    parser.add_argument("test")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--group-by-length", action="store_true")
    parser.add_argument("--labels", default="rotten,fresh")
    args = parser.parse_args()

    from datasets import Dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
    )
    from transformers.utils import logging

    logging.set_verbosity_error()
    labels = args.labels.split(",")
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)

    def encode(path: str) -> Dataset:
        texts, ids = read_csv(Path(path), labels)
        encoded = tokenizer(texts, truncation=True, max_length=args.max_length)
        return Dataset.from_dict({**encoded, "labels": ids})

    train, test = encode(args.train), encode(args.test)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=len(labels), local_files_only=True
    )
    collator = DataCollatorWithPadding(tokenizer)
    tokens = [0]

    class CountTokens(collator.__class__):  # the attention-mask tokens of every training batch
        def __call__(self, features):
            batch = super().__call__(features)
            tokens[0] += int(batch["attention_mask"].sum())
            return batch

    training_args = quiet_arguments(
        "hf-trainer-",
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=128,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        seed=args.seed,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, data_collator=CountTokens(tokenizer))
    train_output, train_s = timed_train(trainer)
    train_tokens = tokens[0]
    predictions = trainer.predict(test)
    # Scored against `label_ids`, the labels in the order `predict` visited the test set: with length
    # grouping on, transformers 5's `_get_eval_sampler` groups the test batches by length too, so the
    # predictions are not in dataset order (scored against `test["labels"]` they are at chance).
    assert predictions.label_ids is not None and len(predictions.label_ids) == len(test)
    accuracy = float((np.argmax(predictions.predictions, axis=-1) == predictions.label_ids).mean())
    print(
        json.dumps(
            {
                "runner": "trainer" + ("+group_by_length" if args.group_by_length else ""),
                "tokens": train_tokens,
                "train_s": round(train_s, 3),
                "tokens_per_s": round(train_tokens / train_s, 1),
                "train_loss": round(train_output.training_loss, 4),
                "accuracy": round(accuracy, 4),
                "optim": training_args.optim.value if hasattr(training_args.optim, "value") else training_args.optim,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
