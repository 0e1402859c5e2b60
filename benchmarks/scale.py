"""Real model sizes on this machine: one table of presets pre-trained for a few steps under Ray workers.

Run as: python benchmarks/scale.py [--quick] [--workers 2] [--steps 3] [--out runs/scale]

Each row is `launcher run benchmarks/scale.yaml` with overrides (a preset, its task, the ZeRO stage, offload,
activation checkpointing), then the same command with one more step, which resumes from the row's final
checkpoint. Per row, from rank 0's `summary.json` and `metrics.jsonl`:

- tokens/s and MFU of the last logged step (the first one warms up), MFU against the measured peak of the
  dtype that ran;
- model states: the ZeRO formula's weights + optimizer state per rank (`launcher validate`'s numbers;
  gradients are allocated at the first backward and so are not in it) against the measured growth of the
  rank's resident memory from before the model was built to just before step 1;
- peak RSS of the rank, and what the steps added on top of the built engine: gradients (the formula's)
  plus activations and allocator slack, shown as "activations" (= peak - after init - gradients);
- checkpoint size on disk, rank 0's save seconds (write, hash, report, commit), resume seconds (load).

`--quick` runs BERT-base alone (checkpointing off and on), the rest adds GPT-2 and SmolLM2-360M (ZeRO-3 with
optimizer offload) and prints the plan of TinyLlama-1.1B under ZeRO-3 + offload against this machine's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher.jobspec.load import load_spec  # noqa: E402
from launcher.jobspec.plan import memory_plan, plan_stage  # noqa: E402
from launcher.models.count import count_params  # noqa: E402

JOB = "benchmarks/scale.yaml"
GiB = 2**30

# name, preset, task, ZeRO stage, offload_optimizer, activation checkpointing, micro-batch
QUICK = [
    ("bert-base", "bert-base", "mlm", 2, False, False, 1),
    ("bert-base+ckpt", "bert-base", "mlm", 2, False, True, 1),
]
FULL = [
    *QUICK,
    ("gpt2", "gpt2", "clm", 2, False, False, 1),
    ("gpt2+ckpt", "gpt2", "clm", 2, False, True, 1),
    ("smollm2-360m z3+off+ckpt", "smollm2-360m", "clm", 3, True, True, 1),
]


def overrides(row: tuple, workers: int, steps: int, out: Path) -> list[str]:
    name, preset, task, zero, offload, ckpt, micro = row
    job = "scale-" + name.replace("+", "-").replace(" ", "-")
    return [
        f"name={job}", f"output_dir={out}", f"cluster.num_workers={workers}", f"deepspeed.zero_stage={zero}",
        f"deepspeed.offload_optimizer={str(offload).lower()}", f"stages.0.task={task}",
        f"stages.0.model={{preset: {preset}, activation_checkpointing: {str(ckpt).lower()}}}",
        f"stages.0.batch.micro_batch_size={micro}", f"stages.0.max_steps={steps}",
    ]  # fmt: skip


def launcher(*args: str) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "", "DS_ACCELERATOR": "cpu"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"scale: `launcher {' '.join(args)}` failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def measure(row: tuple, workers: int, steps: int, out: Path) -> dict:
    args = overrides(row, workers, steps, out)
    spec = load_spec(ROOT / JOB, args)
    stage_dir = out / spec.name / "pretrain"
    shutil.rmtree(out / spec.name, ignore_errors=True)
    launcher("run", JOB, *args)
    summary = json.loads((stage_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "train/tokens_per_sec" in r][-1]
    checkpoint = sorted((stage_dir / "checkpoints").glob("step_*"))[-1]
    size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    num_params = summary["num_params"]
    plan = plan_stage(spec, 0, local=False, num_params=num_params)
    states = memory_plan(spec, 0, plan, num_params).states
    launcher("run", JOB, *args[:-1], f"stages.0.max_steps={steps + 1}")  # resumes from the final checkpoint
    resumed = json.loads((stage_dir / "summary.json").read_text())
    assert resumed["resumed_from_step"] == steps, resumed["resumed_from_step"]
    after_init, peak = summary["memory_after_init_bytes"], summary["peak_memory_bytes"]
    return {
        "name": row[0], "params": num_params, "zero": row[3], "offload": row[4], "ckpt": row[5],
        "tokens_per_s": last["train/tokens_per_sec"], "mfu": last["train/mfu"],
        "states_formula": states["weights"] + states["optimizer"],
        "states_measured": after_init - summary["memory_before_model_bytes"],
        "peak_rss": peak, "activations": peak - after_init - states["gradients"],
        "checkpoint_bytes": size, "save_s": summary["checkpoint_save_s"], "resume_s": resumed["checkpoint_load_s"],
        "step_s": 1.0 / last["train/tokens_per_sec"] * plan.tokens_per_step,
    }  # fmt: skip


def print_table(rows: list[dict]) -> None:
    print(
        f"{'row':<26} {'params':>8} {'ZeRO':>4} {'tok/s':>7} {'s/step':>7} {'MFU':>6} {'states formula':>15} "
        f"{'measured':>9} {'ratio':>6} {'peak RSS':>9} {'activ.':>8} {'ckpt':>8} {'save s':>7} {'resume s':>8}"
    )
    for r in rows:
        ratio = r["states_measured"] / r["states_formula"]
        print(
            f"{r['name']:<26} {r['params'] / 1e6:7.1f}M {r['zero']:>4} {r['tokens_per_s']:7.1f} {r['step_s']:7.1f} "
            f"{r['mfu']:6.1%} {r['states_formula'] / GiB:11.2f} GiB {r['states_measured'] / GiB:5.2f} GiB "
            f"{ratio:6.2f} {r['peak_rss'] / GiB:5.2f} GiB {r['activations'] / GiB:4.2f} GiB "
            f"{r['checkpoint_bytes'] / GiB:4.2f} GiB {r['save_s']:7.1f} {r['resume_s']:8.1f}"
        )
    by_name = {r["name"]: r for r in rows}
    for name, r in by_name.items():
        if name.endswith("+ckpt") and name.removesuffix("+ckpt") in by_name:
            plain = by_name[name.removesuffix("+ckpt")]
            print(
                f"activation checkpointing, {plain['name']}: activations {plain['activations'] / GiB:.2f} -> "
                f"{r['activations'] / GiB:.2f} GiB ({plain['activations'] / max(r['activations'], 1):.1f}x less), "
                f"time per step x{r['step_s'] / plain['step_s']:.2f}"
            )


def plan_only(preset: str, workers: int) -> None:
    args = [f"cluster.num_workers={workers}", "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true",
            "stages.0.task=clm", f"stages.0.model={{preset: {preset}, activation_checkpointing: true}}"]  # fmt: skip
    spec = load_spec(ROOT / JOB, args)
    num_params = count_params(spec, spec.stages[0])
    memory = memory_plan(spec, 0, plan_stage(spec, 0, local=False, num_params=num_params), num_params)
    per_rank = memory.device_bytes + memory.states["offloaded"]
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(
        f"plan, {preset} (ZeRO-3 + optimizer offload + checkpointing, {workers} workers): {num_params / 1e6:.0f}M "
        f"parameters, {per_rank / GiB:.2f} GiB per rank of model states and activations (all in host memory "
        f"on CPU), {workers * per_rank / GiB:.1f} GiB for the job against {total / GiB:.1f} GiB here"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="BERT-base alone (about 5 minutes on 2 cores)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "scale")
    args = parser.parse_args()
    rows = []
    for row in QUICK if args.quick else FULL:
        rows.append(measure(row, args.workers, args.steps, args.out))
        print(f"scale: {row[0]} done", file=sys.stderr, flush=True)
    print_table(rows)
    if not args.quick:
        plan_only("tinyllama-1.1b", args.workers)


if __name__ == "__main__":
    main()
