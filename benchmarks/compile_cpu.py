"""Run as: .venv/bin/python benchmarks/compile_cpu.py [--steps 60] [--batch 16] [--max-len 64]

Does `model.compile: true` (torch.compile of the model, as the worker does with `engine.compile()`)
pay on this CPU? The packaged MiniLM (data/models/all-minilm-l6-v2, `make data`) fine-tuned as a
sequence classifier on the demo's Rotten Tomatoes reviews, the way a `classification` stage trains:
dynamic padding (each batch padded to its longest review, at most --max-len tokens), AdamW, clipping
at 1.0, fp32, this machine's intra-op threads. Two copies of the same weights, one eager and one
compiled, take the same batches; after both have seen every batch shape once (the compiled one
compiles then, automatic dynamic shapes after the second length), steps alternate in blocks of 5
so drifting machine load hits both alike.

Printed: the compiled copy's first-pass seconds (compiling) against the eager copy's, the median
steady-state step of each, their ratio (eager / compiled: above 1 means compiling pays once warm),
the steps a run needs to earn the compile time back, and the largest loss difference between the
copies over the timed steps (kernel rounding only).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "data" / "models" / "all-minilm-l6-v2"
TRAIN = ROOT / "data" / "demo" / "train.csv"
BLOCK = 5


def batches(tokenizer, batch: int, max_len: int, count: int) -> list[dict[str, torch.Tensor]]:
    with TRAIN.open(newline="") as stream:
        rows = list(csv.DictReader(stream))[: batch * count]
    labels = {"rotten": 0, "fresh": 1}
    out = []
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        enc = tokenizer([r["text"] for r in chunk], truncation=True, max_length=max_len, padding=True,
                        return_tensors="pt")  # fmt: skip
        enc["labels"] = torch.tensor([labels[r["label"]] for r in chunk])
        out.append(dict(enc))
    return out


def step(model, optimizer, batch: dict[str, torch.Tensor]) -> float:
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60, help="timed steps per copy")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=64)
    args = parser.parse_args()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(str(MODEL))
    data = batches(tokenizer, args.batch, args.max_len, args.steps + 8)
    warm, timed = data[:8], data[8:]
    copies = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(str(MODEL), num_labels=2, attn_implementation="sdpa")
        model.train()
        if name == "compiled":
            model.compile()
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01, fused=True)
        copies[name] = (model, optimizer)
    first = {}
    for name, (model, optimizer) in copies.items():
        started = time.perf_counter()
        for batch in warm:
            step(model, optimizer, batch)
        first[name] = time.perf_counter() - started
    times: dict[str, list[float]] = {name: [] for name in copies}
    losses: dict[str, list[float]] = {name: [] for name in copies}
    for start in range(0, len(timed), BLOCK):
        for name, (model, optimizer) in copies.items():
            for batch in timed[start : start + BLOCK]:
                began = time.perf_counter()
                losses[name].append(step(model, optimizer, batch))
                times[name].append(time.perf_counter() - began)
    eager, compiled = (statistics.median(times[n]) for n in ("eager", "compiled"))
    lengths = sorted({int(b["input_ids"].shape[1]) for b in data})
    print(f"MiniLM classifier, batch {args.batch}, {len(lengths)} padded lengths {lengths[0]}..{lengths[-1]}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, load {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"first {len(warm)} steps (compiling): eager {first['eager']:.1f} s, compiled {first['compiled']:.1f} s")
    print(f"median step over {len(timed)} timed steps: eager {eager * 1e3:.0f} ms, compiled {compiled * 1e3:.0f} ms, "
          f"eager / compiled {eager / compiled:.2f}")  # fmt: skip
    overhead = first["compiled"] - first["eager"]
    saved = eager - compiled
    print(f"compile time earned back after {overhead / saved:.0f} steps" if saved > 0 else "compiling never pays")
    gap = max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"], strict=True))
    print(f"largest loss difference eager vs compiled: {gap:.2e}")


if __name__ == "__main__":
    main()
