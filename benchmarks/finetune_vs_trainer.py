"""Run as: .venv/bin/python benchmarks/finetune_vs_trainer.py [--steps 200] [--repeat 3] [--ray]
    or: .venv/bin/python benchmarks/finetune_vs_trainer.py --images [--steps 300] [--repeat 3]

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
preparation, the final evaluation and export), and accuracy on the 2,000 test reviews (Trainer: against
`predict`'s `label_ids`, since with length grouping it visits the test set in grouped order). Printed:
each run with the machine's 1-minute load average at its end, then per runner the median tokens/s, the
accuracy (mean and per seed) and launcher / this. The reference is HF's fastest row that keeps its
accuracy (mean within ACCURACY_TOLERANCE of the plain Trainer's): the ratio launcher / reference has
the target >= 1.3, goal 2.

With --images, the same comparison for image classification: benchmarks/vision-finetune.yaml's small ViT on
the first 1,000 labeled Fashion-MNIST training images (batch 64, lr 1e-3, cosine after 20 warm-up steps,
random resized crops and flips), scored on the 10,000 test images; images/s in place of tokens/s. Runners:
  trainer        HF `Trainer` with run_image_classification.py's per-image transforms on the fly, its
                 defaults otherwise (no loader processes): benchmarks/hf_trainer_images.py;
  trainer+workers the same with 2 loader processes (`dataloader_num_workers=2`, persistent);
  launcher       `launcher run benchmarks/vision-finetune.yaml --local` with the steps and the 1,000 images.

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
HF_RUNNERS = ("trainer", "trainer+group")
IMAGE_JOB = ROOT / "benchmarks" / "vision-finetune.yaml"
FASHION_TRAIN = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")  # Debian's dataset-fashion-mnist
IMAGE_HF_RUNNERS = ("trainer", "trainer+workers")
IMAGE_SAMPLES = 1000
ACCURACY_TOLERANCE = 0.01  # a mean test accuracy this far below the plain Trainer's counts as lost (seed noise ~0.005)


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
    return trainer_row([
        sys.executable, str(ROOT / "benchmarks" / "hf_trainer_finetune.py"), str(MODEL), str(TRAIN), str(TEST),
        "--steps", str(steps), "--batch", "16", "--lr", "5e-5", "--warmup", "20", "--max-length", "64",
        "--seed", str(seed), *(["--group-by-length"] if group else []),
    ], env)  # fmt: skip


def run_trainer_images(steps: int, seed: int, workers: int, env: dict[str, str]) -> dict:
    return trainer_row([
        sys.executable, str(ROOT / "benchmarks" / "hf_trainer_images.py"), "--steps", str(steps),
        "--train-samples", str(IMAGE_SAMPLES), "--seed", str(seed), "--workers", str(workers),
    ], env)  # fmt: skip


def trainer_row(command: list[str], env: dict[str, str]) -> dict:
    """Runs an HF Trainer script (`accelerate` on its path); its JSON line's throughput, accuracy and loss."""
    env = {**env, "PYTHONPATH": str(bench_deps())}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"HF Trainer run failed:\n{result.stderr[-4000:]}")
    row = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    return {"tokens_per_s": row["tokens_per_s"], "accuracy": row["accuracy"], "train_loss": row["train_loss"]}


def fresh_stage(stage: Path) -> None:
    """Removes a previous run's outputs of the stage (its prepared data stays)."""
    for name in ("checkpoints", "model", "tensorboard"):
        subprocess.run(["rm", "-rf", str(stage / name)], check=True)
    for name in ("summary.json", "metrics.jsonl", "../summary.json"):
        (stage / name).unlink(missing_ok=True)


def run_launcher(steps: int, seed: int, out: Path, env: dict[str, str], ray: bool) -> dict:
    stage = out / "finetune-minilm-rt" / "finetune"
    fresh_stage(stage)
    overrides = [
        f"output_dir={out}", f"seed={seed}", f"stages.0.max_steps={steps}", "stages.0.optim.lr=5e-5",
        "stages.0.schedule.warmup_steps=20", "stages.0.checkpoint_every=0", "stages.0.log_every=50",
        "stages.0.batch.grad_accum_steps=1",
        *(["cluster.num_workers=2", "stages.0.batch.micro_batch_size=8"] if ray else
          ["stages.0.batch.micro_batch_size=16"]),
    ]  # fmt: skip
    return launcher_row([str(JOB), *([] if ray else ["--local"]), *overrides], stage, env)


def run_launcher_images(steps: int, seed: int, out: Path, env: dict[str, str]) -> dict:
    stage = out / "vision-transfer" / "finetune"
    fresh_stage(stage)
    overrides = [f"output_dir={out}", f"seed={seed}", f"stages.0.max_steps={steps}",
                 f"stages.0.data.max_train_samples={IMAGE_SAMPLES}"]  # fmt: skip
    return launcher_row([str(IMAGE_JOB), "--local", *overrides], stage, env)


def launcher_row(args: list[str], stage: Path, env: dict[str, str]) -> dict:
    """`launcher run ARGS`; the stage summary's throughput (tokens or images over training seconds), accuracy, loss."""
    command = [sys.executable, "-m", "launcher", "run", *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"launcher run failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    summary = json.loads((stage / "summary.json").read_text())
    return {
        "tokens_per_s": summary["tokens"] / summary["wall_s"],
        "accuracy": summary["eval"]["accuracy"],
        "train_loss": summary["train_loss"],
    }


def measure(steps: int, repeat: int, ray: bool = False, images: bool = False) -> dict[str, list[dict]]:
    """Every runner `repeat` times, alternating; the rows of each runner's runs (tokens_per_s, accuracy, load)."""
    for path in (FASHION_TRAIN,) if images else (MODEL, TRAIN, TEST):
        if not path.exists():
            raise SystemExit(f"{path} is missing: run `make data` first")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "", "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="launcher-bench-ft-") as tmp:
        out = Path(tmp)
        if images:
            runners = {
                "trainer": lambda seed: run_trainer_images(steps, seed, 0, env),
                "trainer+workers": lambda seed: run_trainer_images(steps, seed, 2, env),
                "launcher": lambda seed: run_launcher_images(steps, seed, out, env),
            }
        else:
            runners = {
                "trainer": lambda seed: run_trainer(steps, seed, False, env),
                "trainer+group": lambda seed: run_trainer(steps, seed, True, env),
                "launcher": lambda seed: run_launcher(steps, seed, out, env, ray=False),
            }
        if ray:
            runners["launcher-ray"] = lambda seed: run_launcher(steps, seed, out, env, ray=True)
        unit = "images" if images else "tokens"
        for seed in range(repeat):
            for name, runner in runners.items():
                row = {**runner(seed), "seed": seed, "load": os.getloadavg()[0]}
                results.setdefault(name, []).append(row)
                print(f"{name:<15} seed {seed}  {row['tokens_per_s']:8,.0f} {unit}/s  accuracy {row['accuracy']:.4f}  "
                      f"train loss {row['train_loss']:.4f}  load {row['load']:.2f}", flush=True)  # fmt: skip
    return results


def reference(results: dict[str, list[dict]]) -> str:
    """HF's fastest runner whose mean accuracy is within ACCURACY_TOLERANCE of the plain Trainer's."""
    names = [name for name in (*HF_RUNNERS, *IMAGE_HF_RUNNERS) if name in results]
    accuracy = {name: statistics.mean(r["accuracy"] for r in results[name]) for name in names}
    kept = [name for name in names if accuracy[name] >= accuracy["trainer"] - ACCURACY_TOLERANCE]
    return max(kept, key=lambda name: statistics.median(r["tokens_per_s"] for r in results[name]))


def summarise(results: dict[str, list[dict]]) -> list[dict]:
    """One row per runner: median tokens/s, accuracy (mean, per seed), median load, launcher / this."""
    rate = {name: statistics.median(r["tokens_per_s"] for r in rows) for name, rows in results.items()}
    return [
        {
            "runner": name,
            "tokens_per_s": rate[name],
            "accuracy": statistics.mean(r["accuracy"] for r in rows),
            "accuracy_per_seed": [r["accuracy"] for r in rows],
            "load": statistics.median(r["load"] for r in rows),
            "launcher_over_this": rate["launcher"] / rate[name],
        }
        for name, rows in results.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ray", action="store_true", help="also run the launcher on 2 Ray workers")
    parser.add_argument("--images", action="store_true", help="image classification (Fashion-MNIST) instead of text")
    args = parser.parse_args()
    if args.images and args.ray:
        parser.error("--ray compares the text job only")
    results = measure(args.steps, args.repeat, args.ray, args.images)
    rate_name = f"median {'images' if args.images else 'tokens'}/s"
    header = f"{'runner':<15} {rate_name:>16}  {'accuracy: mean (per seed)':<44} {'load':>5} {'launcher / this':>16}"
    print("\n" + header)
    for row in summarise(results):
        accuracy = f"{row['accuracy']:.4f} (" + " / ".join(f"{a:.4f}" for a in row["accuracy_per_seed"]) + ")"
        print(f"{row['runner']:<15} {row['tokens_per_s']:16,.0f}  {accuracy:<44} {row['load']:5.2f} "
              f"{row['launcher_over_this']:16.2f}")  # fmt: skip
    best = reference(results)
    rate = {row["runner"]: row["tokens_per_s"] for row in summarise(results)}
    goal = "goal >= 1.0" if args.images else "target >= 1.3, goal 2"
    print(f"reference: {best} (HF's fastest that keeps its accuracy); launcher / {best}: "
          f"{rate['launcher'] / rate[best]:.2f} ({goal})")  # fmt: skip


if __name__ == "__main__":
    main()
