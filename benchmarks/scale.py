"""Real model sizes on this machine: presets pre-trained for a few steps under Ray workers, and what
activation checkpointing saves.

Run as: python benchmarks/scale.py [--quick] [--workers 2] [--steps 3] [--out runs/scale]

First, activation memory itself: one forward + backward of a micro-batch of 4 x 512 tokens in a fresh
process (no DeepSpeed), activation checkpointing off and on: the peak resident memory the step adds beyond
the gradients, and the time of a step (the second one).

Then one row per configuration: `launcher run benchmarks/scale.yaml` with overrides (a preset, its task,
the ZeRO stage, offload, activation checkpointing), then the same command with one more step, which resumes
from the row's final checkpoint. From rank 0's `summary.json` and `metrics.jsonl`:

- tokens/s and MFU of the last logged step (the first one warms up), MFU against the measured peak of the
  dtype that ran;
- model states: the ZeRO formula's weights + optimizer state per rank (`launcher validate`'s numbers) against
  the bytes of rank 0's weight, Adam-moment and fp32-master tensors;
- peak RSS of the rank and the rest beyond its model states (gradients taken from the formula): activations,
  DeepSpeed's communication buckets, the allocator's slack;
- checkpoint size on disk, rank 0's save seconds (write, hash, report, commit), resume seconds (load).

`--quick` runs BERT-base alone and resumes its first row only (under 5 minutes on 2 cores); the full run adds
GPT-2 and SmolLM2-360M (ZeRO-3 with optimizer offload) and prints the plan of TinyLlama-1.1B under ZeRO-3 +
offload against this machine's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
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
    ("smollm2-360m z3+off+ckpt", "smollm2-360m", "clm", 3, True, True, 1),
]

PROBE = r"""
import json, resource, sys, time
from contextlib import nullcontext
from pathlib import Path
import torch
from launcher.jobspec.load import load_spec
from launcher.jobspec.plan import ArchitectureSizes, activation_bytes
from launcher.tasks import build_task

preset, task_name, micro, seq, ckpt = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
attention = sys.argv[6]
spec = load_spec("benchmarks/scale.yaml", [f"stages.0.task={task_name}",
                 f"stages.0.model={{preset: {preset}, activation_checkpointing: {ckpt}, attention: {attention}}}"])
stage = spec.stages[0]
vocab = stage.tokenizer.vocab_size

class Special:
    pad_token_id = bos_token_id = eos_token_id = None
    all_special_ids = []
    def __len__(self):
        return vocab

torch.manual_seed(0)
model = build_task(stage, Special()).build_model(None)  # with the stage's activation checkpointing
model.train()
ids = torch.randint(10, vocab, (micro, seq))
labels = ids.masked_fill(torch.rand(micro, seq) > stage.mask_probability(), -100) if task_name == "mlm" else ids
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

def rss():
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()

weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
saved = {}

def pack(tensor):  # what autograd keeps for the backward pass, each storage once, the weights left out
    storage = tensor.untyped_storage()
    if storage.data_ptr() not in weights:
        saved[storage.data_ptr()] = storage.nbytes()
    return tensor

def step(count_saved=False):
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor) if count_saved else nullcontext():
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)

before = rss()
step(count_saved=True)  # the first step's peak: activations, gradients and the kernels' temporaries
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
step()
grads = sum(p.numel() * p.element_size() for p in model.parameters())
config = model.config
sizes = ArchitectureSizes(config.hidden_size, config.num_hidden_layers, config.num_attention_heads, vocab,
                          attention, ckpt == "true", on_gpu=torch.cuda.is_available())
formula = activation_bytes(sizes, micro, seq, "fp32", task_name, stage.mask_probability())
print(json.dumps({"activations": peak - before - grads, "saved": sum(saved.values()), "formula": formula,
                  "step_s": time.perf_counter() - start}))
"""


def probe_activations(preset: str, task: str, micro: int, seq: int, attention: str = "sdpa") -> None:
    result = {}
    for ckpt in ("false", "true"):
        command = [sys.executable, "-c", PROBE, preset, task, str(micro), str(seq), ckpt, attention]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"scale: activation probe of {preset} failed:\n{done.stderr[-3000:]}")
        result[ckpt] = json.loads(done.stdout.strip().splitlines()[-1])
    off, on = result["false"], result["true"]
    print(f"activations, {preset} ({task}, micro-batch {micro} x {seq}, fp32, {attention}): checkpointing off "
          f"{off['activations'] / GiB:.2f} GiB at {off['step_s']:.1f} s/step, on {on['activations'] / GiB:.2f} GiB "
          f"at {on['step_s']:.1f} s/step: {off['activations'] / max(on['activations'], 1):.1f}x less memory for "
          f"x{on['step_s'] / off['step_s']:.2f} the time", flush=True)  # fmt: skip
    for name, r in (("off", off), ("on", on)):
        print(f"  checkpointing {name}: kept for backward {r['saved'] / GiB:.2f} GiB (the plan's formula "
              f"{r['formula'] / GiB:.2f} GiB, x{r['saved'] / r['formula']:.2f}); the step's peak RSS beyond "
              f"gradients {r['activations'] / GiB:.2f} GiB", flush=True)  # fmt: skip


def overrides(row: tuple, workers: int, steps: int, out: Path) -> list[str]:
    name, preset, task, zero, offload, ckpt, micro = row
    job = "scale-" + name.replace("+", "-").replace(" ", "-")
    return [
        f"name={job}", f"output_dir={out}", f"cluster.num_workers={workers}", f"deepspeed.zero_stage={zero}",
        f"deepspeed.offload_optimizer={str(offload).lower()}", f"stages.0.task={task}",
        f"stages.0.model={{preset: {preset}, activation_checkpointing: {str(ckpt).lower()}}}",
        f"stages.0.batch.micro_batch_size={micro}", f"stages.0.max_steps={steps}",
    ]  # fmt: skip


class RowFailed(Exception):
    """A row's `launcher run` failed: the table still prints the other rows, and this one's reason."""


def launcher(*args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        output = done.stdout + done.stderr
        oom = "memory monitor" in output or "OutOfMemoryError" in output
        why = "Ray's memory monitor killed a worker (out of host memory)" if oom else output.strip()[-1500:]
        raise RowFailed(f"`launcher {' '.join(args)}` failed ({done.returncode}): {why}")


def measure(row: tuple, workers: int, steps: int, out: Path, resume: bool = True) -> dict:
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
    resume_s = None
    if resume:
        launcher("run", JOB, *args[:-1], f"stages.0.max_steps={steps + 1}")  # resumes from the final checkpoint
        resumed = json.loads((stage_dir / "summary.json").read_text())
        assert resumed["resumed_from_step"] == steps, resumed["resumed_from_step"]
        resume_s = resumed["checkpoint_load_s"]
    measured = summary["weight_bytes"] + summary["optimizer_state_bytes"] + summary["fp32_master_bytes"]
    return {
        "name": row[0], "params": num_params, "zero": row[3],
        "tokens_per_s": last["train/tokens_per_sec"], "mfu": last["train/mfu"],
        "step_s": plan.tokens_per_step / last["train/tokens_per_sec"],
        # on a CPU the offloaded optimizer state is in the same memory as the rest
        "states_formula": states["weights"] + states["optimizer"] + states["offloaded"], "states_measured": measured,
        "peak_rss": summary["peak_memory_bytes"],
        "rest": summary["peak_memory_bytes"] - summary["memory_before_model_bytes"] - measured - states["gradients"],
        "checkpoint_bytes": size, "save_s": summary["checkpoint_save_s"], "resume_s": resume_s,
    }  # fmt: skip


def print_table(rows: list[dict]) -> None:
    print(
        f"{'row':<26} {'params':>8} {'ZeRO':>4} {'tok/s':>7} {'s/step':>7} {'MFU':>6} {'states formula':>15} "
        f"{'measured':>9} {'ratio':>6} {'peak RSS':>9} {'rest':>8} {'ckpt':>8} {'save s':>7} {'resume s':>8}"
    )
    for r in rows:
        print(f"{r['name']:<26} {r['params'] / 1e6:7.1f}M {r['zero']:>4} {r['tokens_per_s']:7.1f} {r['step_s']:7.1f} "
              f"{r['mfu']:6.1%} {r['states_formula'] / GiB:11.2f} GiB {r['states_measured'] / GiB:5.2f} GiB "
              f"{r['states_measured'] / r['states_formula']:6.2f} {r['peak_rss'] / GiB:5.2f} GiB "
              f"{r['rest'] / GiB:4.2f} GiB {r['checkpoint_bytes'] / GiB:4.2f} GiB {r['save_s']:7.1f} "
              f"{'-' if r['resume_s'] is None else format(r['resume_s'], '.1f'):>8}")  # fmt: skip


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
    parser.add_argument(
        "--quick", action="store_true",
        help="BERT-base alone, its checkpointing row not resumed again (under 5 minutes on 2 cores)",
    )  # fmt: skip
    parser.add_argument("--activations-only", action="store_true", help="the activation probes alone (sdpa, eager)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "scale")
    parser.add_argument("--rows", help="comma-separated row names to run (default: all of the chosen set)")
    parser.add_argument("--no-probes", action="store_true", help="skip the activation probes")
    args = parser.parse_args()
    if not args.no_probes:
        probe_activations("bert-base", "mlm", 4, 512)
        if args.activations_only or not args.quick:
            probe_activations("bert-base", "mlm", 4, 512, attention="eager")
        if args.activations_only:
            return
        if not args.quick:
            probe_activations("gpt2", "clm", 4, 512)
    chosen = QUICK if args.quick else FULL
    if args.rows:
        names = args.rows.split(",")
        unknown = sorted(set(names) - {row[0] for row in FULL})
        if unknown:
            sys.exit(f"--rows: no row {', '.join(unknown)} (rows: {', '.join(row[0] for row in FULL)})")
        chosen = [row for row in FULL if row[0] in names]
    rows, failed = [], []
    for row in chosen:
        try:
            # --quick: the checkpointing row's checkpoint holds the same tensors as the row before's, resumed there
            resume = not (args.quick and row[5])
            rows.append(measure(row, args.workers, args.steps, args.out, resume))
            print(f"scale: {row[0]} done", file=sys.stderr, flush=True)
        except RowFailed as exc:
            failed.append(f"{row[0]}: {exc}")
            print(f"scale: {row[0]} failed", file=sys.stderr, flush=True)
    print_table(rows)
    for line in failed:
        print(f"failed: {line}")
    print(
        "states: rank 0's weights + optimizer state (Adam moments, fp32 master), the ZeRO formula against the "
        "tensors' bytes; rest: peak RSS - RSS before the model - model states (gradients from the formula)"
    )
    if not args.quick:
        plan_only("tinyllama-1.1b", args.workers)


if __name__ == "__main__":
    main()
