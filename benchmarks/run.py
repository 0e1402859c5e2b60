"""Run as: .venv/bin/python benchmarks/run.py [--quick]   (or `make bench`; `make bench BENCH_ARGS=--quick`)

Every speed comparison of the launcher against what a user would run instead, back to back in one
invocation on this machine, as one table (what, ours, theirs, ratio, target):
  fine-tune   `launcher run jobs/finetune-minilm-rt.yaml --local` against HF Trainer with dynamic padding,
              plain and with length grouping (benchmarks/finetune_vs_trainer.py): tokens/s and test
              accuracy of each; the target ratio is taken against HF's fastest row that keeps its accuracy;
  pre-train   `launcher run benchmarks/pretrain-bench.yaml` on 2 Ray workers against a raw DeepSpeed loop
              under torchrun (benchmarks/ray_vs_torchrun.py): steady tokens/s, seconds from command to the
              end of the first step, and the launcher's MFU against this machine's measured matmul peak.
Runners alternate inside each comparison; figures are medians over --repeat runs (accuracy: the mean).
On a CPU the MFU's peak is a matmul timed at each worker's start-up, so it moves with the load then.
The full run (3 repeats) takes about 40 minutes on 2 cores; --quick (1 repeat, fewer steps) about 4.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import finetune_vs_trainer
import ray_vs_torchrun


def number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) >= 1 else f"{value:.4f}"


def median(rows: list[dict], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def mean(rows: list[dict], key: str) -> float:
    return statistics.mean(row[key] for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, fewer steps: about 4 minutes on 2 cores")
    parser.add_argument("--repeat", type=int, default=None, help="runs per runner (default 3; 1 with --quick)")
    args = parser.parse_args()
    repeat = args.repeat or (1 if args.quick else 3)
    ft_steps, pt_steps = (100, 40) if args.quick else (200, 100)

    print(f"== fine-tune: launcher --local vs HF Trainer ({ft_steps} steps, {repeat} run(s) each)", flush=True)
    ft = finetune_vs_trainer.measure(ft_steps, repeat)
    print(f"== pre-train: launcher on Ray vs raw DeepSpeed ({pt_steps} steps, {repeat} run(s) each)", flush=True)
    pt = ray_vs_torchrun.measure(pt_steps, warmup=10, repeat=repeat, log_every=10)

    best = finetune_vs_trainer.reference(ft)
    ours_rate, ours_acc = median(ft["launcher"], "tokens_per_s"), mean(ft["launcher"], "accuracy")
    mfu = [r["mfu"] for r in pt["launcher"] if r["mfu"] is not None]
    rows = []
    for name, what in (("trainer", "HF Trainer"), ("trainer+group", "HF Trainer+group")):
        target = ">= 1.3 (goal 2)" if name == best else "(for reference)"
        rows += [
            (f"fine-tune tokens/s (vs {what})", ours_rate, median(ft[name], "tokens_per_s"), target),
            (f"fine-tune test accuracy (vs {what})", ours_acc, mean(ft[name], "accuracy"), ">= 1.0 (seed noise)"),
        ]
    rows += [
        ("pre-train tokens/s (vs raw DeepSpeed)", median(pt["launcher"], "rate"), median(pt["raw"], "rate"),
         ">= 0.95"),
        ("pre-train start-up s (to first step)", median(pt["launcher"], "first"), median(pt["raw"], "first"),
         "<= raw + 10 s"),
    ]  # fmt: skip
    start_gap = median(pt["launcher"], "first") - median(pt["raw"], "first")
    rows[-1] = (*rows[-1][:3], f"<= raw + 10 s (now raw {start_gap:+.1f} s)")
    print(f"\n{'what':<46} {'ours':>10} {'theirs':>10} {'ratio':>7}  target")
    for what, ours, theirs, target in rows:
        print(f"{what:<46} {number(ours):>10} {number(theirs):>10} {ours / theirs:7.3f}  {target}")
    if mfu:
        print(f"{'pre-train MFU (measured CPU matmul peak)':<46} {statistics.median(mfu):10.2%} {'':>10} {'':>7}  "
              "report (GPU target: >= 40% at 350M on an H200)")  # fmt: skip


if __name__ == "__main__":
    main()
