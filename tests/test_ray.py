"""Ray Train coordinator: the tiny job with 2 DeepSpeed workers on a private loopback Ray."""

from __future__ import annotations

import json

import pytest

from tests.conftest import assert_ok, read_jsonl, run_cli

pytestmark = pytest.mark.ray


def test_tiny_with_two_ray_workers_zero2(tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    result = run_cli("run", "jobs/debug/tiny.yaml", f"output_dir={tmp_path}", "cluster.num_workers=2",
                     "deepspeed.zero_stage=2", "stages.0.max_steps=6", "stages.0.checkpoint_every=3",
                     env={"RAY_ADDRESS": ""})  # fmt: skip
    assert_ok(result)
    for stage in ("pretrain", "finetune"):
        summary = json.loads((tmp_path / "tiny" / stage / "summary.json").read_text())
        assert summary["world_size"] == 2
        assert summary["global_batch_size"] == 2 * 8 * (1 if stage == "pretrain" else 2)
    records = read_jsonl(tmp_path / "tiny" / "pretrain" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[-1]["train/loss"] < records[0]["train/loss"]
    checkpoints = sorted(p.name for p in (tmp_path / "tiny" / "pretrain" / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_00000003", "step_00000006"]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "tiny" / "finetune" / "model")
    assert model.config.num_labels == 2


def _descendants(pid: int):
    import psutil

    return psutil.Process(pid).children(recursive=True)


def test_worker_killed_mid_run_is_replaced_and_resumes(tmp_path) -> None:
    """SIGKILL one worker after the first registered checkpoint: the stage completes from it, same loss."""
    import os
    import shutil
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    args = ["jobs/debug/tiny.yaml", "cluster.num_workers=2", "deepspeed.zero_stage=1", "stages.0.max_steps=60",
            "stages.0.checkpoint_every=4", "stages.0.model.hidden_size=128", "stages.0.data.seq_len=64",
            "stages.0.batch.micro_batch_size=32", "stages.1.max_steps=2"]  # fmt: skip
    straight, faulty = tmp_path / "straight", tmp_path / "faulty"
    assert_ok(run_cli("prepare", *args, f"output_dir={straight}"))
    shutil.copytree(straight, faulty)
    assert_ok(run_cli("run", *args, f"output_dir={straight}", env={"RAY_ADDRESS": ""}))

    env = {**os.environ, "RAY_ADDRESS": "", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "run", *args, f"output_dir={faulty}"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        # Ray registers a reported checkpoint in its snapshot a moment after the files land.
        snapshot = faulty / "tiny" / "pretrain" / "checkpoints" / "checkpoint_manager_snapshot.json"

        def registered() -> bool:
            return snapshot.exists() and "step_00000004" in snapshot.read_text()

        deadline = time.monotonic() + 300
        while not registered() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert registered(), "no checkpoint was registered"
        workers = [p for p in _descendants(proc.pid) if "RayTrainWorker" in " ".join(p.cmdline())]
        assert len(workers) == 2, [p.cmdline() for p in workers]
        workers[1].kill()
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-5000:]
    summary = json.loads((faulty / "tiny" / "pretrain" / "summary.json").read_text())
    assert summary["steps"] == 60
    assert summary["resumed_from_step"] is not None and summary["resumed_from_step"] >= 4, "resumed, not from 0"
    want = read_jsonl(straight / "tiny" / "pretrain" / "metrics.jsonl")[-1]
    got = read_jsonl(faulty / "tiny" / "pretrain" / "metrics.jsonl")[-1]
    assert got["step"] == want["step"] == 60
    assert abs(got["train/loss"] - want["train/loss"]) <= 1e-5
    assert abs(got["eval/loss"] - want["eval/loss"]) <= 1e-5
