"""Run as: .venv/bin/python benchmarks/finetune_vs_trainer.py [--steps 200] [--repeat 3] [--ray]

Fine-tuning throughput of the launcher against the seed's recipe it replaces: the packaged MiniLM
(data/models/all-minilm-l6-v2, `make data`) on the demo's Rotten Tomatoes split (10,752 training
reviews, the 2,000 test reviews), the same steps, batch 16, lr 5e-5, 20 warm-up steps, linear
decay, weight decay 0.01, clipping 1.0, max length 64, on this machine's cores. Runners, alternated
(one of each per repeat, repeat r with seed r) so drifting machine load hits all of them:
  trainer        HF `Trainer` + `DataCollatorWithPadding` (dynamic padding), its defaults otherwise
                 (fused AdamW, random sampler): benchmarks/hf_trainer_finetune.py;
  trainer+group  the same with `train_sampling_strategy="group_by_length"` (HF's length grouping);
  launcher       `launcher run jobs/finetune-minilm-rt.yaml --local` with the settings above as overrides;
  launcher-ray   (with --ray) the same job on 2 Ray workers of one core each, micro-batch 8.
Measured: non-padding (attention-mask) tokens of the training batches over training seconds (Trainer:
`trainer.train()`; launcher: `tokens / wall_s` of the stage summary, which leaves out data
preparation, the final evaluation and export), and accuracy on the 2,000 test reviews. Printed: each
run, then medians of tokens/s, mean accuracy, and the ratios launcher / trainer (target >= 1.3, goal 2)
and launcher / trainer+group.

The Trainer runner needs `accelerate`, which the project does not: it is installed with --no-deps
into runs/bench-deps (the benchmark's own folder) and put on that runner's PYTHONPATH only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "jobs" / "finetune-minilm-rt.yaml"
MODEL = ROOT / "data" / "models" / "all-minilm-l6-v2"
TRAIN, TEST = ROOT / "data" / "demo" / "train.csv", ROOT / "data" / "demo" / "test.csv"
DEPS = ROOT / "runs" / "bench-deps"
ACCELERATE = "accelerate==1.16.0"


def bench_deps() -> Path:
    """`accelerate` for HF Trainer, in the benchmark's own folder (the project does not depend on it)."""
    if not (DEPS / "accelerate").is_dir():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--target", str(DEPS), ACCELERATE],
            check=True,
        )  # fmt: skip
    return DEPS


def run_trainer(steps: int, seed: int, group: bool, env: dict[str, str]) -> dict:
    command = [
        sys.executable, str(ROOT / "benchmarks" / "hf_trainer_finetune.py"), str(MODEL), str(TRAIN), str(TEST),
        "--steps", str(steps), "--batch", "16", "--lr", "5e-5", "--warmup", "20", "--max-length", "64",
        "--seed", str(seed), *(["--group-by-length"] if group else []),
    ]  # fmt: skip
    env = {**env, "PYTHONPATH": str(bench_deps())}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"HF Trainer run failed:\n{result.stderr[-4000:]}")
    row = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    return {"tokens_per_s": row["tokens_per_s"], "accuracy": row["accuracy"]}


def run_launcher(steps: int, seed: int, out: Path, env: dict[str, str], ray: bool) -> dict:
    stage = out / "finetune-minilm-rt" / "finetune"
    for name in ("checkpoints", "model", "tensorboard"):
        subprocess.run(["rm", "-rf", str(stage / name)], check=True)
    for name in ("summary.json", "metrics.jsonl", "../summary.json"):
        (stage / name).unlink(missing_ok=True)
    overrides = [
        f"output_dir={out}", f"seed={seed}", f"stages.0.max_steps={steps}", "stages.0.optim.lr=5e-5",
        "stages.0.schedule.warmup_steps=20", "stages.0.checkpoint_every=0", "stages.0.log_every=50",
        "stages.0.batch.grad_accum_steps=1",
        *(["cluster.num_workers=2", "stages.0.batch.micro_batch_size=8"] if ray else
          ["stages.0.batch.micro_batch_size=16"]),
    ]  # fmt: skip
    command = [sys.executable, "-m", "launcher", "run", str(JOB), *([] if ray else ["--local"]), *overrides]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"launcher run failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    summary = json.loads((stage / "summary.json").read_text())
    return {"tokens_per_s": summary["tokens"] / summary["wall_s"], "accuracy": summary["eval"]["accuracy"]}


def measure(steps: int, repeat: int, ray: bool = False, group: bool = True) -> dict[str, list[dict]]:
    """Every runner `repeat` times, alternating; the rows of each runner's runs (tokens_per_s, accuracy)."""
    for path in (MODEL, TRAIN, TEST):
        if not path.exists():
            raise SystemExit(f"{path} is missing: run `make data` first")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "", "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="launcher-bench-ft-") as tmp:
        out = Path(tmp)
        runners = {"trainer": lambda seed: run_trainer(steps, seed, False, env)}
        if group:
            runners["trainer+group"] = lambda seed: run_trainer(steps, seed, True, env)
        runners["launcher"] = lambda seed: run_launcher(steps, seed, out, env, ray=False)
        if ray:
            runners["launcher-ray"] = lambda seed: run_launcher(steps, seed, out, env, ray=True)
        for seed in range(repeat):
            for name, runner in runners.items():
                row = runner(seed)
                results.setdefault(name, []).append(row)
                print(f"{name:<14} seed {seed}  {row['tokens_per_s']:8,.0f} tokens/s  accuracy {row['accuracy']:.4f}",
                      flush=True)  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ray", action="store_true", help="also run the launcher on 2 Ray workers")
    args = parser.parse_args()
    results = measure(args.steps, args.repeat, args.ray)
    rate = {name: statistics.median(r["tokens_per_s"] for r in rows) for name, rows in results.items()}
    accuracy = {name: statistics.mean(r["accuracy"] for r in rows) for name, rows in results.items()}
    print(f"\n{'runner':<14} {'median tokens/s':>16} {'mean accuracy':>14} {'launcher / this':>16}")
    for name in results:
        print(f"{name:<14} {rate[name]:16,.0f} {accuracy[name]:14.4f} {rate['launcher'] / rate[name]:16.2f}")
    print(
        f"ratio launcher / trainer: {rate['launcher'] / rate['trainer']:.2f} (target >= 1.3, goal 2); "
        f"launcher / trainer+group: {rate['launcher'] / rate['trainer+group']:.2f}; accuracy launcher "
        f"{accuracy['launcher']:.4f} vs trainer {accuracy['trainer']:.4f}"
    )


if __name__ == "__main__":
    main()
