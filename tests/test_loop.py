"""The training loop in this process: accumulation, cadence, stop policy, step callbacks, resume state.

A one-layer BERT classifier on 200 prepared demo reviews, a real DeepSpeed engine (ZeRO-0, fp32, one
rank on the CPU) and no dropout, so two runs that should agree do so to float rounding. The module
starts DeepSpeed's process group (a world of one, on loopback) once, and puts back the environment
variables it sets for that when it ends.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.hooks import SampleTrace, StopPolicy
from launcher.metrics import NullWriter
from tests.conftest import TINY, read_jsonl

torch = pytest.importorskip("torch")


class RecordingWriter(NullWriter):
    def __init__(self) -> None:
        self.logged: dict[int, dict[str, float]] = {}

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.logged[step] = dict(scalars)


class StopFileAt:
    """A step callback that creates a stop file before step `step` (0-based), as the driver does on SIGTERM."""

    def __init__(self, path: Path, step: int) -> None:
        self.path, self.step = path, step

    def before_step(self, step: int, micro_batches: list[list[int]]) -> None:
        if step == self.step:
            self.path.touch()

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny job's classification stage alone (from random init), its data prepared, and a rank context."""
    from launcher.contract import StageLaunch
    from launcher.coordinator.driver import resolve
    from launcher.jobspec.load import parse_spec
    from launcher.worker.context import local_context

    data = yaml.safe_load(TINY.read_text())
    stage = {**data["stages"][1], "init_from": None, "model": data["stages"][0]["model"], "max_steps": 6}
    stage["data"] = {**stage["data"], "max_eval_samples": 32}
    stage["batch"] = {"micro_batch_size": 8, "grad_accum_steps": 1, "eval_batch_size": 16}
    data.update(output_dir=str(tmp_path_factory.mktemp("loop")), stages=[stage])
    spec = parse_spec(data)
    _, plans = resolve(spec, local=True, log=False)
    saved = dict(os.environ)
    ctx = local_context(use_gpu=False)
    yield StageLaunch.of(spec, 0, plans[0]), ctx
    os.environ.clear()
    os.environ.update(saved)


def build(launch: Any, ctx: Any, checkpoints: Path, **stage_changes: Any) -> Any:
    """A fresh Loop (model seeded the same way every time) over the launch's prepared data."""
    from launcher.checkpoint_manifest import run_meta
    from launcher.data.tokenizer import load_tokenizer
    from launcher.jobspec.deepspeed_config import build_deepspeed_config
    from launcher.tasks import build_task
    from launcher.worker.engine import build_engine
    from launcher.worker.loop import Loop

    plan = launch.plan
    if "grad_accum_steps" in stage_changes:
        accum = stage_changes.pop("grad_accum_steps")
        plan = dataclasses.replace(plan, micro_batch_size=plan.global_batch_size // accum, grad_accum_steps=accum)
    stage = launch.stage.model_copy(update=stage_changes)
    torch.manual_seed(0)
    task = build_task(stage, load_tokenizer(launch.paths.tokenizer_dir))
    model = task.build_model(None)
    config = build_deepspeed_config(launch.spec.deepspeed, stage, plan, model)
    engine = build_engine(model, config, stage, plan.steps, ctx.device, 60)
    data_dir = launch.paths.data_dir
    return Loop(
        engine=engine, task=task, stage=stage, plan=plan, ctx=ctx, writer=RecordingWriter(), checkpoints=checkpoints,
        seed=0, train_set=task.dataset(data_dir, "train", 0), eval_set=task.dataset(data_dir, "eval", 0),
        flops_per_token=1.0, peak_flops=1.0, checkpoint_meta=run_meta(1, plan.global_batch_size, 0, "fp32"),
    )  # fmt: skip


def params(loop: Any) -> list[Any]:
    return [p.detach().clone() for p in loop.engine.module.parameters()]


def max_gap(a: list[Any], b: list[Any]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def test_accumulation_takes_the_same_steps_as_one_big_micro_batch(prepared: Any, tmp_path: Path) -> None:
    """Global batch 8 as 1 x 8 or as 2 accumulated micro-batches of 4: one optimizer step per global step,
    the same updates and the same logged loss (the mean over the micro-batches), the same token count."""
    from launcher.worker.loop import TrainState

    launch, ctx = prepared
    runs = {}
    for accum in (1, 2):
        loop = build(launch, ctx, tmp_path / f"ckpt{accum}", grad_accum_steps=accum, log_every=1)
        state, stopped = loop.run(TrainState())
        assert not stopped and state.step == 6 and loop.engine.global_steps == 6, "one optimizer step per step"
        runs[accum] = (params(loop), loop.writer.logged, state.tokens)
    assert max_gap(runs[1][0], runs[2][0]) < 1e-5, "accumulating two halves changed the updates"
    for step in range(1, 7):
        one, two = runs[1][1][step]["train/loss"], runs[2][1][step]["train/loss"]
        assert abs(one - two) < 1e-5, f"step {step}: logged loss {two} with accumulation, {one} without"
    assert runs[1][2] == runs[2][2] > 0, "tokens counted differently"


def test_cadence_of_logs_evals_and_checkpoints(prepared: Any, tmp_path: Path) -> None:
    """log_every 2 (and step 1), eval_every 3 (and the last step), checkpoint_every 4 (and the last step);
    keep_checkpoints 1 leaves the newest committed one."""
    from launcher.checkpoint_manifest import latest_checkpoint, read_manifest
    from launcher.worker.loop import TrainState

    launch, ctx = prepared
    loop = build(launch, ctx, tmp_path / "ckpt", log_every=2, eval_every=3, checkpoint_every=4, keep_checkpoints=1)
    saved_at = []
    original = loop.engine.save_checkpoint
    loop.engine.save_checkpoint = lambda *a, **k: (saved_at.append(loop.engine.global_steps), original(*a, **k))[1]
    state, _ = loop.run(TrainState())
    logged = loop.writer.logged
    assert sorted(logged) == [1, 2, 3, 4, 6], f"logged at {sorted(logged)}"
    assert all("train/loss" in logged[s] for s in (1, 2, 4, 6)) and "train/loss" not in logged[3]
    assert [s for s in sorted(logged) if "eval/accuracy" in logged[s]] == [3, 6]
    assert state.eval == {k.removeprefix("eval/"): v for k, v in logged[6].items() if k.startswith("eval/")}
    assert saved_at == [4, 6], f"checkpoints saved after steps {saved_at}"
    latest = latest_checkpoint(tmp_path / "ckpt")
    assert latest is not None and read_manifest(latest)["step"] == 6
    assert list((tmp_path / "ckpt").iterdir()) == [latest], "keep_checkpoints=1"


def test_stop_policy_stops_after_a_checkpoint_and_callbacks_see_every_step(prepared: Any, tmp_path: Path) -> None:
    """A stop file appearing during step 2 stops the run after step 2's checkpoint and is removed (the re-run
    goes on); the sample trace callback saw steps 0 and 1, each with its global batch of 8 samples."""
    from launcher.checkpoint_manifest import latest_checkpoint, read_manifest
    from launcher.worker.loop import TrainState

    launch, ctx = prepared
    loop = build(launch, ctx, tmp_path / "ckpt")
    stop_file = tmp_path / "STOP"
    loop.stop = StopPolicy(stage_file=stop_file)
    loop.callbacks = [SampleTrace(tmp_path / "trace", "t", 0), StopFileAt(stop_file, 1)]
    state, stopped = loop.run(TrainState())
    assert stopped and state.step == 2
    assert not stop_file.exists(), "an honoured stop file is removed"
    latest = latest_checkpoint(tmp_path / "ckpt")
    assert latest is not None and read_manifest(latest)["step"] == 2, "stopped without its checkpoint"
    trace = read_jsonl(tmp_path / "trace" / "t_rank0.jsonl")
    assert [r["step"] for r in trace] == [0, 1] and all(len(r["samples"]) == 8 for r in trace)
    assert StopPolicy(after_step=5).requested(5) and not StopPolicy(after_step=5).requested(4)
    assert not StopPolicy(stage_file=stop_file, job_file=tmp_path / "JOB").requested(3)
    (tmp_path / "JOB").touch()
    assert StopPolicy(stage_file=stop_file, job_file=tmp_path / "JOB").requested(3), "the job's stop file"


def test_resume_from_the_stop_checkpoint_continues_the_same_trajectory(prepared: Any, tmp_path: Path) -> None:
    """Stopped after step 3 and resumed into a fresh engine from that checkpoint's train state, the run logs
    the same losses for steps 4-6 and ends at the same weights as the run that never stopped."""
    from launcher.checkpoint_manifest import latest_checkpoint, read_manifest
    from launcher.worker.deepspeed_io import load_checkpoint
    from launcher.worker.loop import TrainState

    launch, ctx = prepared
    straight = build(launch, ctx, tmp_path / "straight", log_every=1)
    end, _ = straight.run(TrainState())
    first = build(launch, ctx, tmp_path / "resumed", log_every=1)
    first.stop = StopPolicy(after_step=3)
    state, stopped = first.run(TrainState())
    assert stopped and state.step == 3
    second = build(launch, ctx, tmp_path / "resumed", log_every=1)
    restore = latest_checkpoint(tmp_path / "resumed")
    assert restore is not None and read_manifest(restore)["step"] == 3
    state = TrainState(**load_checkpoint(second.engine, restore)["train_state"])
    assert state.step == 3 and 0 < state.tokens < end.tokens
    state, stopped = second.run(state)
    assert not stopped and state.step == 6
    assert state.tokens == end.tokens, "tokens after resuming differ from the uninterrupted run's"
    for step in (4, 5, 6):
        a, b = straight.writer.logged[step]["train/loss"], second.writer.logged[step]["train/loss"]
        assert abs(a - b) < 1e-6, f"step {step}: {b} after resuming, {a} straight through"
    assert max_gap(params(straight), params(second)) < 1e-6, "resumed weights differ"


def test_each_next_micro_batch_is_built_ahead_in_a_thread_and_trains_as_built_in_line(
    prepared: Any, tmp_path: Path
) -> None:
    """With the build-ahead on, accumulation 2 over 6 steps: the first training micro-batch is built on the
    loop's thread, the other 11 in the background thread, in the sampler's order. The run ends at the same
    weights and losses as the default on a CPU, which builds every batch in line."""
    import threading

    from launcher.data.sampler import StepSampler
    from launcher.worker.loop import TrainState

    launch, ctx = prepared
    here = threading.current_thread().name
    runs, built = {}, {}
    for name, build_ahead in (("ahead", True), ("default", None)):
        loop = build(launch, ctx, tmp_path / name, grad_accum_steps=2, log_every=1)
        loop.build_ahead = build_ahead
        built[name] = records = []
        in_line = loop._batch
        loop._batch = lambda dataset, indices, generator, records=records, in_line=in_line: (
            records.append((threading.current_thread().name, list(indices))),
            in_line(dataset, indices, generator),
        )[1]
        state, _ = loop.run(TrainState())
        assert state.step == 6
        runs[name] = loop
    ahead = runs["ahead"]
    lengths = ahead.task.sample_lengths(ahead.train_set)
    sampler = StepSampler(len(ahead.train_set), ahead.plan.micro_batch_size, 2, 1, 0, 0, lengths)
    expected = [sampler.micro_batches(s)[m] for s in range(6) for m in range(2)]
    for name, records in built.items():
        train, evaluation = records[:12], records[12:]  # the eval at the last step builds its 2 batches in line
        assert [indices for _, indices in train] == expected, name
        assert [thread for thread, _ in evaluation] == [here] * 2, name
    threads = [thread for thread, _ in built["ahead"][:12]]
    assert threads[0] == here, "the first batch has nothing to overlap"
    assert all(thread.startswith("batch-ahead") for thread in threads[1:]), threads
    assert all(thread == here for thread, _ in built["default"]), "a CPU run builds in line by default"
    assert max_gap(params(ahead), params(runs["default"])) < 1e-6, "batches built ahead trained differently"
    for step in range(1, 7):
        a, b = ahead.writer.logged[step]["train/loss"], runs["default"].writer.logged[step]["train/loss"]
        assert abs(a - b) < 1e-6, f"step {step}: {a} built ahead, {b} in line"
