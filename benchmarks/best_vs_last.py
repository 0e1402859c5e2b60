"""The demo's fine-tuning exported at its best validation evaluation against its last step, over seeds.

Run as: .venv/bin/python benchmarks/best_vs_last.py [--seeds 0,1,2] [--out runs/best-vs-last] [--max-steps N]

Both variants are `launcher run jobs/demo.yaml --local --stage finetune` from the same pre-training export (made
once, `--stage pretrain`, cached under --out) and hold out 20% of the 250 labeled reviews as validation
(`data.validation_fraction: 0.2`: the same seeded, stratified carve for both at a seed); each export is scored
once on the 2,000 test reviews (the summary's `test`). `last` trains its 250 steps and exports the last one, as the
demo does; `best` evaluates every 25 steps on the validation split, exports the best accuracy
(`best_metric: accuracy`) and stops after 3 evaluations without improvement (`early_stopping_patience: 3`).
Prints one row per run and the mean per variant; writes <out>/best-vs-last.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOB = "jobs/demo.yaml"
VARIANTS = {
    "last": [],
    "best": ["stages.1.eval_every=25", "stages.1.best_metric=accuracy", "stages.1.early_stopping_patience=3"],
}


def launcher(*args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, check=False)  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"launcher {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "best-vs-last")
    parser.add_argument("--max-steps", type=int, help="(tests) fine-tuning steps")
    parser.add_argument("--override", action="append", default=[], help="(tests) another override of the runs")
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    start = args.out / "start"
    export = start / "demo" / "pretrain" / "model"
    if not (export / "config.json").is_file():
        print("pre-training the demo's start ...", flush=True)
        launcher("run", JOB, "--local", "--stage", "pretrain", f"output_dir={start}")
    rows = []
    for seed in seeds:
        for variant, extra in VARIANTS.items():
            out = args.out / variant / f"seed{seed}"
            summary_path = out / "demo" / "finetune" / "summary.json"
            if not summary_path.is_file():
                steps = [f"stages.1.max_steps={args.max_steps}"] if args.max_steps else []
                launcher("run", JOB, "--local", "--stage", "finetune", f"output_dir={out}", f"seed={seed}",
                         f"stages.1.init_from={export}", "stages.1.data.validation_fraction=0.2", *extra,
                         *steps, *args.override)  # fmt: skip
            summary = json.loads(summary_path.read_text())
            best = summary.get("best") or {}
            rows.append({
                "variant": variant, "seed": seed, "test_accuracy": summary["test"]["accuracy"],
                "test_macro_f1": summary["test"]["macro_f1"], "steps": summary["steps"],
                "exported_step": best.get("step") or summary["steps"], "wall_s": summary["wall_s"],
                "process_s": summary["process_s"],
            })  # fmt: skip
            print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()),
                  flush=True)  # fmt: skip
    with (args.out / "best-vs-last.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("| variant | test accuracy (mean, min-max) | macro-F1 | steps trained | exported step | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for variant in VARIANTS:
        mine = [row for row in rows if row["variant"] == variant]

        def spread(key: str, rows: list[dict] = mine) -> str:
            values = [row[key] for row in rows]
            return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"

        print(f"| {variant} | {spread('test_accuracy')} | {spread('test_macro_f1')} | "
              f"{', '.join(str(row['steps']) for row in mine)} | {', '.join(str(row['exported_step']) for row in mine)}"
              f" | {spread('wall_s')} |")  # fmt: skip


if __name__ == "__main__":
    main()
