"""Throughput of `launcher run` (2 Ray workers, ZeRO-2) against a raw DeepSpeed loop under torchrun.

Run as: .venv/bin/python benchmarks/ray_vs_torchrun.py [--steps 100] [--warmup 10] [--repeat 2] [--log-every 10]

All train the same model, data and batch (benchmarks/pretrain-bench.yaml: the demo's pre-training
stage) with the same DeepSpeed config on 2 CPU processes of one thread each. Data is prepared once,
before anything is timed. Three runners, alternating (raw, torchrun, launcher, raw, ...) so drifting
machine load hits all of them:
  raw       a minimal DeepSpeed loop under torchrun (benchmarks/raw_deepspeed.py);
  torchrun  the launcher's per-rank code under torchrun, without Ray (benchmarks/launcher_torchrun.py);
  launcher  `launcher run`: the same per-rank code in 2 Ray Train workers.
Printed per run: steady-state tokens/s (steps after --warmup, from the rank-0 timestamps of logged
steps: every step for raw, every --log-every for the others, whose metrics, TensorBoard and console
line cost something each time) and seconds from command start to the end of the first step (the
launcher always logs step 1). Then the ratio launcher / raw (the target), split into the loop's
share (torchrun / raw) and Ray's (launcher / torchrun).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "benchmarks" / "pretrain-bench.yaml"


def steady_rate(records: list[dict], warmup: int) -> float:
    """Tokens per second over the steps after `warmup` (timestamps of step ends)."""
    after = [r for r in records if r["step"] >= warmup]
    assert len(after) >= 2, "too few logged steps after warm-up: raise --steps"
    tokens = sum(r["tokens"] for r in after[1:])
    return tokens / (after[-1]["time"] - after[0]["time"])


def torchrun(script: str, args: list[str], env: dict[str, str], what: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 benchmarks/SCRIPT ARGS` on loopback; exits with its stderr if it fails."""
    from launcher.worker.context import free_port

    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"{what} failed:\n{result.stderr[-4000:]}")
    return result


def run_raw(out: Path, steps: int, env: dict[str, str]) -> tuple[float, list[dict]]:
    start = time.time()
    result = torchrun("raw_deepspeed.py", [str(JOB), str(out), str(steps)], env, "raw DeepSpeed run")
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"step"')]
    return start, records


def clean_stage(out: Path) -> Path:
    stage = out / "bench" / "pretrain"
    for name in ("metrics.jsonl", "summary.json"):
        (stage / name).unlink(missing_ok=True)
    for path in (stage / "checkpoints", stage / "model", stage / "tensorboard"):
        subprocess.run(["rm", "-rf", str(path)], check=True)
    return stage


def stage_records(stage: Path, steps: int) -> list[dict]:
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    records, seen = [], 0.0
    for row in rows:  # cumulative train/tokens -> tokens of each step
        records.append({"step": row["step"], "time": row["time"], "tokens": row["train/tokens"] - seen,
                        "mfu": row.get("train/mfu")})  # fmt: skip
        seen = row["train/tokens"]
    # The last step's record is written after the stage's final evaluation: not training time.
    return [r for r in records if r["step"] < steps]


def run_torchrun(out: Path, steps: int, env: dict[str, str], log_every: int) -> tuple[float, list[dict]]:
    stage = clean_stage(out)
    start = time.time()
    args = [str(JOB), str(out), str(steps), str(log_every)]
    torchrun("launcher_torchrun.py", args, env, "launcher code under torchrun")
    return start, stage_records(stage, steps)


def run_launcher(out: Path, steps: int, env: dict[str, str], log_every: int) -> tuple[float, list[dict]]:
    stage = clean_stage(out)
    start = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "launcher", "run", str(JOB), f"output_dir={out}", f"stages.0.max_steps={steps}",
         f"stages.0.log_every={log_every}"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"launcher run failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return start, stage_records(stage, steps)


def measure(steps: int, warmup: int, repeat: int, log_every: int) -> dict[str, list[dict[str, float]]]:
    """Each runner `repeat` times, alternating: steady tokens/s, seconds to the first step, launcher's MFU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="launcher-bench-") as tmp:
        out = Path(tmp)
        env["TMPDIR"] = tmp  # what torchrun leaves there (torchelastic_* folders) goes with it
        subprocess.run([sys.executable, "-m", "launcher", "prepare", str(JOB), f"output_dir={out}"], cwd=ROOT,
                       env=env, check=True, capture_output=True)  # fmt: skip
        runners = {
            "raw": lambda: run_raw(out, steps, env),
            "torchrun": lambda: run_torchrun(out, steps, env, log_every),
            "launcher": lambda: run_launcher(out, steps, env, log_every),
        }
        for _ in range(repeat):
            for name, runner in runners.items():
                start, records = runner()
                rate = steady_rate(records, warmup)
                first = records[0]["time"] - start
                mfu = [r["mfu"] for r in records if r.get("mfu") is not None]
                results.setdefault(name, []).append({"rate": rate, "first": first, "mfu": mfu[-1] if mfu else None})
                print(f"{name:<9} steady {rate:9,.0f} tokens/s   first step after {first:5.1f} s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--log-every", type=int, default=10, help="launcher's metrics cadence (1: a TensorBoard/console line per step)"
    )
    args = parser.parse_args()
    results = measure(args.steps, args.warmup, args.repeat, args.log_every)
    rate = {name: statistics.median(r["rate"] for r in runs) for name, runs in results.items()}
    first = {name: statistics.median(r["first"] for r in runs) for name, runs in results.items()}
    print(
        f"ratio launcher/raw tokens/s: {rate['launcher'] / rate['raw']:.3f} (target >= 0.95) = loop "
        f"{rate['torchrun'] / rate['raw']:.3f} (torchrun/raw) x Ray {rate['launcher'] / rate['torchrun']:.3f} "
        f"(launcher/torchrun); first step: raw {first['raw']:.1f} s, torchrun {first['torchrun']:.1f} s, "
        f"launcher {first['launcher']:.1f} s"
    )


if __name__ == "__main__":
    main()
