"""Ray Train coordinator: DeepSpeed workers under a TorchTrainer, on one token-authenticated loopback Ray head
shared by this module (started with free ports, ended by PID), or on a private Ray where a test says so."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, assert_ok, read_jsonl, run_cli
from tests.conftest import on_ray as on
from tests.ray_head import RayHead

pytestmark = pytest.mark.ray
TINY = ["jobs/debug/tiny.yaml", "cluster.num_workers=2", "stages.0.max_steps=12", "stages.0.checkpoint_every=12",
        "stages.0.optim.lr=5e-3", "stages.0.data.max_train_samples=100"]  # fmt: skip
PRETRAIN = ["--stage", "pretrain"]  # the fine-tuning stage adds nothing these tests look at
# A bigger pre-training (still seconds) for the fault test; ZeRO-1's run below is its uninterrupted reference.
FAULT = ["jobs/debug/tiny.yaml", "cluster.num_workers=2", "stages.0.max_steps=60", "stages.0.checkpoint_every=4",
         "stages.0.model.hidden_size=128", "stages.0.data.seq_len=64",
         "stages.0.batch.micro_batch_size=32"]  # fmt: skip


@pytest.fixture(scope="session")
def head(ray_cluster: RayHead) -> RayHead:
    """The session's shared head (`tests.conftest.ray_cluster`)."""
    return ray_cluster


@pytest.fixture(scope="module")
def zero_runs(head: RayHead, tmp_path_factory) -> dict[int, Path]:
    """The tiny job with 2 workers under each ZeRO stage (ZeRO-1 with the fault test's bigger model).
    Every rank traces its samples. ZeRO-1's preparation is copied for the fault test before it runs."""
    root = tmp_path_factory.mktemp("zero")
    runs = {}
    for zero in (0, 1, 2, 3):
        args = [*(FAULT if zero == 1 else TINY), f"deepspeed.zero_stage={zero}"]
        out = runs[zero] = root / f"zero{zero}"
        if zero == 1:
            assert_ok(run_cli("prepare", *args, f"output_dir={out}"))
            shutil.copytree(out, root / "faulty")
        result = run_cli("run", *args, *PRETRAIN, f"output_dir={out}",
                         env=on(head, LAUNCHER_TRACE_SAMPLES=str(out / "trace")))  # fmt: skip
        assert_ok(result)
        (out / "console.txt").write_text(result.stdout + result.stderr)
    return runs


def test_the_console_shows_the_launchers_lines_and_the_libraries_go_to_logs(zero_runs) -> None:
    """Ray Train's per-report, per-checkpoint and process-group lines and DeepSpeed's op builds stay off the
    console by default: Ray keeps its own in its log files, the launcher the others in the stage's logs/."""
    console = (zero_runs[2] / "console.txt").read_text()
    assert "[pretrain] step" in console
    for noise in ("Reporting training result", "Checkpoint successfully created", "built successfully",
                  "Setting up process group", "Started training worker group"):  # fmt: skip
        assert noise not in console, noise
    logs = zero_runs[2] / "tiny" / "pretrain" / "logs"
    assert "built successfully" in (logs / "rank0.log").read_text() + (logs / "rank1.log").read_text()


def test_prepare_on_a_cluster_runs_ray_data_tasks_that_match_the_local_result(head: RayHead, tmp_path) -> None:
    """`launcher prepare` joined to a cluster: one Ray Data task per chunk, in Ray's worker processes, each writing its
    own shards; the union is the single-machine result token for token (the same vocabulary: MiniLM's)."""
    from launcher.data.store import TokenStore

    args = ["prepare", "jobs/debug/tiny.yaml", "cluster.num_workers=2", "stages.0.data.max_train_samples=null",
            "stages.0.data.max_eval_samples=null", f"stages.0.tokenizer.source={ROOT / 'data/models/all-minilm-l6-v2'}",
            "stages.1.data.max_train_samples=null"]  # fmt: skip
    on_ray = run_cli(*args, f"output_dir={tmp_path / 'ray'}", env=on(head))
    assert_ok(on_ray)
    # Ray Data decides how many worker processes run the tasks at once (1 or 2 seen on this 2-CPU head)
    assert "preparation: 2 Ray Data task(s) on the cluster" in on_ray.stdout, on_ray.stdout
    assert re.search(r"stages.0.data.train: 2 task\(s\) in [12] process\(es\) on 1 host", on_ray.stdout)
    local = run_cli(*args, f"output_dir={tmp_path / 'local'}", "--local")
    assert_ok(local)
    assert re.search(r"stages.0.data.train: 2 task\(s\) in [12] process\(es\)", local.stdout), "worker processes here"
    for stage in ("pretrain", "finetune"):
        for split in ("train", "eval"):
            stores = [TokenStore.read(tmp_path / where / "tiny" / stage / "data", split) for where in ("ray", "local")]
            assert stores[0].num_tokens == stores[1].num_tokens > 0
            assert np.array_equal(stores[0].tokens(0, stores[0].num_tokens), stores[1].tokens(0, stores[1].num_tokens))
            assert [s.num_docs for s in stores[0].shards] == [s.num_docs for s in stores[1].shards]


def _consolidated(checkpoint: Path, zero_stage: int) -> dict:
    """The fp32 weights of a DeepSpeed checkpoint folder, gathered from every rank's shard."""
    import torch

    if zero_stage == 0:
        return torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_zero_stage_trains_and_exports_the_consolidated_weights(zero_runs, zero: int) -> None:
    import torch
    from safetensors.torch import load_file

    pretrain = zero_runs[zero] / "tiny" / "pretrain"
    summary = json.loads((pretrain / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == zero
    records = read_jsonl(pretrain / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, summary["steps"] + 1))
    first, last = (sum(r["train/loss"] for r in part) / 3 for part in (records[:3], records[-3:]))
    assert last < first - 0.1, f"loss did not fall: {first:.3f} -> {last:.3f}"
    exported = load_file(pretrain / "model" / "model.safetensors")
    consolidated = _consolidated(pretrain / "checkpoints" / f"step_{summary['steps']:08d}", zero)
    assert set(exported) <= set(consolidated), set(exported) - set(consolidated)
    for name, tensor in exported.items():
        assert torch.equal(tensor, consolidated[name].to(tensor.dtype)), f"{name} differs"
    snapshot = (pretrain / "checkpoints" / "checkpoint_manager_snapshot.json").read_text()
    assert f"step_{summary['steps']:08d}" in snapshot, "the final checkpoint went through ray.train.report"
    # Committed after both ranks' uploads: the manifest lists every rank's shard, and they verify.
    from launcher.checkpoint_manifest import read_manifest, verify

    final = pretrain / "checkpoints" / f"step_{summary['steps']:08d}"
    manifest = read_manifest(final)
    assert manifest is not None and verify(final) is None
    for rank in (0, 1) if zero else ():
        assert any(name.startswith(f"zero_pp_rank_{rank}_") for name in manifest["files"]), manifest["files"]
    if zero:  # rank 1 hashed its shard itself: a copy with one byte flipped in it does not verify
        flipped = Path(tempfile.mkdtemp(prefix="flipped-")) / final.name
        try:
            shutil.copytree(final, flipped)
            shard = next(p for p in flipped.iterdir() if p.name.startswith("zero_pp_rank_1_"))
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 0x10
            shard.write_bytes(bytes(data))
            assert f"{shard.name} does not match its sha256" in (verify(flipped) or "")
        finally:
            shutil.rmtree(flipped.parent, ignore_errors=True)


@pytest.mark.parametrize("zero", [0, 2])
def test_ranks_see_disjoint_shards_whose_union_is_the_epoch(zero_runs, zero: int) -> None:
    pretrain = zero_runs[zero] / "tiny" / "pretrain"
    num_samples = json.loads((pretrain / "data" / "meta.json").read_text())["prepared"]["num_train_samples"]
    summary = json.loads((pretrain / "summary.json").read_text())
    per_epoch = -(-num_samples // summary["global_batch_size"])
    assert summary["steps"] > per_epoch, "the run covers a whole epoch"
    ranks = [read_jsonl(zero_runs[zero] / "trace" / f"pretrain_rank{r}.jsonl") for r in (0, 1)]
    seen: list[int] = []
    for step0, step1 in zip(ranks[0][:per_epoch], ranks[1][:per_epoch], strict=True):
        assert step0["step"] == step1["step"] and not set(step0["samples"]) & set(step1["samples"])
        seen += step0["samples"] + step1["samples"]
    assert set(seen) == set(range(num_samples)), "the union over ranks is the whole epoch"
    assert len(seen) - num_samples < summary["global_batch_size"], "only the last step wraps around"


def test_optimizer_state_per_rank_halves_from_zero_stage_1(zero_runs) -> None:
    """Measured tensors: Adam's moments are 8 bytes x parameters per rank at stage 0 and half that from
    stage 1 on (the ZeRO paper's partitioned optimizer state); `launcher validate`'s estimate matches."""
    from launcher.jobspec.load import load_spec
    from launcher.jobspec.plan import plan_stage
    from launcher.models.count import count_params

    for zero, out in zero_runs.items():
        summary = json.loads((out / "tiny" / "pretrain" / "summary.json").read_text())
        full = 8 * summary["num_params"]
        share = summary["optimizer_state_bytes"] / full
        assert (share == 1.0) if zero == 0 else (0.49 < share < 0.52), (zero, share)
        args = [*(FAULT if zero == 1 else TINY)[1:], f"deepspeed.zero_stage={zero}"]
        spec = load_spec(ROOT / "jobs/debug/tiny.yaml", args)
        estimate = plan_stage(spec, 0, local=False, num_params=count_params(spec, spec.stages[0]))
        assert estimate.num_params == summary["num_params"]
        measured = summary["optimizer_state_bytes"] + summary["fp32_master_bytes"]
        expected = estimate.optimizer_states_bytes_per_worker
        assert abs(measured - expected) / expected < 0.02, (zero, measured, expected)
    printed = run_cli("validate", "jobs/debug/tiny.yaml", "cluster.num_workers=2", "deepspeed.zero_stage=2")
    assert "optimizer state" in printed.stdout


def test_worker_killed_mid_run_is_replaced_and_resumes(head: RayHead, zero_runs) -> None:
    """SIGKILL one worker after the first registered checkpoint: the stage completes from it, and its final
    losses equal the uninterrupted run's (ZeRO-1's run above, same preparation) within 1e-5."""
    import psutil

    straight, faulty = zero_runs[1], zero_runs[1].parent / "faulty"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", **on(head)}
    command = [sys.executable, "-m", "launcher", "run", *FAULT, *PRETRAIN, "deepspeed.zero_stage=1",
               f"output_dir={faulty}"]  # fmt: skip
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Ray registers a reported checkpoint in its snapshot a moment after the files land.
        snapshot = faulty / "tiny" / "pretrain" / "checkpoints" / "checkpoint_manager_snapshot.json"

        def registered() -> bool:
            return snapshot.exists() and "step_00000004" in snapshot.read_text()

        deadline = time.monotonic() + 300
        while not registered() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert registered(), "no checkpoint was registered"
        workers = [p for p in psutil.Process(head.pid).children(recursive=True)
                   if "RayTrainWorker" in " ".join(p.cmdline())]  # fmt: skip
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


RESHARD_ARGS = ["jobs/debug/tiny.yaml", "deepspeed.zero_stage=2", "stages.0.max_steps=8",
                "stages.0.checkpoint_every=100", "stages.0.batch.grad_accum_steps=null",
                "stages.0.batch.global_batch_size=16", "stages.1.max_steps=2"]  # fmt: skip


@pytest.fixture(scope="module")
def reshard_reference(tmp_path_factory) -> Path:
    """One preparation for every run below (tokenizer training is not deterministic across processes);
    `_reference` runs the uninterrupted 1-worker run (accumulation 2) of each ZeRO stage beside it."""
    prepared = tmp_path_factory.mktemp("reshard") / "prepared"
    assert_ok(run_cli("prepare", *RESHARD_ARGS, f"output_dir={prepared}", "--local"))
    return prepared


def _reference(prepared: Path, zero: int) -> Path:
    """The uninterrupted run's metrics.jsonl under ZeRO stage `zero` (run once per module)."""
    reference = prepared.parent / f"reference-zero{zero}"
    if not reference.exists():
        shutil.copytree(prepared, reference.with_suffix(".partial"))
        args = [*RESHARD_ARGS, f"deepspeed.zero_stage={zero}", *PRETRAIN, "--local"]
        assert_ok(run_cli("run", *args, f"output_dir={reference.with_suffix('.partial')}"))
        reference.with_suffix(".partial").rename(reference)
    return reference / "tiny" / "pretrain" / "metrics.jsonl"


@pytest.mark.parametrize(
    ("zero", "modes"),
    # ZeRO-2 one way (its universal path is ZeRO-1's too); ZeRO-3 both ways in one chain (its load has repairs
    # of its own): 2 workers stop at step 4, 1 process resumes and stops at 6, 2 workers resume and finish.
    [pytest.param(2, ("ray2", "local1"), id="2-ray2-local1"),
     pytest.param(3, ("ray2", "local1", "ray2"), marks=pytest.mark.slow, id="3-ray2-local1-ray2")],
)  # fmt: skip
def test_resume_on_a_different_worker_count(head, tmp_path, reshard_reference: Path, zero: int, modes) -> None:
    """ZeRO-2 and ZeRO-3 shards of 2 workers resume on 1, and ZeRO-3's of 1 on 2 (same global batch: 2 x 8 = 1 x 8 x 2),
    through DeepSpeed's universal copy. Draws are keyed by micro-batch, not rank, so every step's loss equals the
    uninterrupted 1-worker run's."""
    from launcher.hooks import STOP_AFTER_STEP_ENV

    flags = {"ray2": ["cluster.num_workers=2"], "local1": ["--local"]}
    env = {"local1": {}, "ray2": on(head)}
    shutil.copytree(reshard_reference, tmp_path / "run")
    out = [f"output_dir={tmp_path / 'run'}", f"deepspeed.zero_stage={zero}"]
    summary_path = tmp_path / "run" / "tiny" / "pretrain" / "summary.json"
    stops = [4, 6][: len(modes) - 1]
    for i, mode in enumerate(modes):
        stop = {STOP_AFTER_STEP_ENV: str(stops[i])} if i < len(stops) else {}
        result = run_cli("run", *RESHARD_ARGS, *PRETRAIN, *out, *flags[mode], env={**env[mode], **stop})
        if stop:
            assert result.returncode == 75, result.stdout[-2000:] + result.stderr[-3000:]
        else:
            assert_ok(result)
        if i:
            assert "converting it to DeepSpeed's universal format" in result.stdout, (mode, result.stdout[-2000:])
    summary = json.loads(summary_path.read_text())
    assert summary["resumed_from_step"] == stops[-1] and summary["steps"] == 8
    assert summary["world_size"] == (2 if modes[-1] == "ray2" else 1)
    got = read_jsonl(tmp_path / "run" / "tiny" / "pretrain" / "metrics.jsonl")
    want = read_jsonl(_reference(reshard_reference, zero))
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 9))
    for have, expected in zip(got, want, strict=True):
        assert abs(have["train/loss"] - expected["train/loss"]) < 1e-4, (have["step"], have, expected)
        assert abs(have["train/lr"] - expected["train/lr"]) < 1e-9


def test_a_resume_with_another_global_batch_is_refused_on_a_private_ray(tmp_path) -> None:
    """On a private Ray (this command starts and stops its own): refused before any worker starts."""
    from launcher.hooks import STOP_AFTER_STEP_ENV

    args = [*RESHARD_ARGS, f"output_dir={tmp_path}"]
    assert run_cli("run", *args, *PRETRAIN, "--local", env={STOP_AFTER_STEP_ENV: "2"}).returncode == 75
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "tiny" / "pretrain" / "checkpoints").rglob("*")}
    temp = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))  # short: Ray's socket paths go below it
    try:
        env = {"RAY_ADDRESS": "", "TMPDIR": str(temp)}
        bigger = "stages.0.batch.global_batch_size=32"
        refused = run_cli("run", *args, bigger, *PRETRAIN, "cluster.num_workers=2", env=env)
        left = sorted(p.name for p in temp.iterdir())
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "stages.0:" in refused.stderr and "batch.global_batch_size=16" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert left == [], f"the private Ray's folder (token, sessions, temp files) is removed: {left}"
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "tiny" / "pretrain" / "checkpoints").rglob("*")}
    assert after == before, "the checkpoint is untouched"


def _ray(head, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    ray_bin = head.env["PATH"].split(":")[0] + "/ray"
    return subprocess.run([ray_bin, *args], cwd=ROOT, env=head.env, capture_output=True, text=True, timeout=timeout,
                          check=False)  # fmt: skip


def test_ray_job_submit_runs_the_tiny_job(head: RayHead, tmp_path) -> None:
    out = tmp_path / "runs"
    demo = ROOT / "data" / "demo"
    # Paths on storage every node sees: Ray uploads the working dir without git-ignored files (data/).
    overrides = [f"output_dir={out}", "cluster.num_workers=2", "deepspeed.zero_stage=2", "stages.0.max_steps=4",
                 f"stages.0.data.train={demo / 'unlabeled.jsonl'}", f"stages.1.data.train={demo / 'train.csv'}",
                 f"stages.1.data.eval={demo / 'test.csv'}"]  # fmt: skip
    # The module's head: loopback, free ports, token auth.
    without_token = {k: v for k, v in head.env.items() if not k.startswith("RAY_AUTH_TOKEN")}
    refused = subprocess.run(
        [head.env["PATH"].split(":")[0] + "/ray", "job", "list", "--address", head.dashboard],
        cwd=ROOT, env={**without_token, "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode != 0, "the head must refuse a client without the token"

    submitted = _ray(head, "job", "submit", "--address", head.dashboard, "--submission-id", "launcher-test",
                     "--working-dir", ".", "--no-wait", "--",
                     "python", "-m", "launcher", "run", "jobs/debug/tiny.yaml", *overrides)  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    deadline, status = time.monotonic() + 600, ""
    while time.monotonic() < deadline:
        status = _ray(head, "job", "status", "--address", head.dashboard, "launcher-test").stdout.lower()
        if any(f"job 'launcher-test' {word}" in status for word in ("succeeded", "failed", "stopped")):
            break
        time.sleep(2)
    logs = _ray(head, "job", "logs", "--address", head.dashboard, "launcher-test").stdout
    assert "job 'launcher-test' succeeded" in status, status + logs[-5000:]
    assert "job tiny complete" in logs
    for stage in ("pretrain", "finetune"):
        summary = json.loads((out / "tiny" / stage / "summary.json").read_text())
        assert summary["world_size"] == 2
        assert (out / "tiny" / stage / "model" / "model.safetensors").is_file()
    assert json.loads((out / "tiny" / "pretrain" / "summary.json").read_text())["steps"] == 4


def test_a_hung_worker_and_a_non_finite_loss_end_the_stage_with_one_line(head: RayHead, tmp_path) -> None:
    """Rank 1 sleeps inside step 3: its watchdog ends it within cluster.step_timeout_s and the driver names it
    (rank 0 waits in the step's all-reduce meanwhile); a NaN loss is the same one line as in debug mode."""
    from launcher.hooks import HANG_AT_STEP_ENV

    args = [*TINY, *PRETRAIN, "cluster.max_failures=0", "cluster.step_timeout_s=10", "cluster.collective_timeout_s=60"]
    started = time.monotonic()
    hung = run_cli("run", *args, f"output_dir={tmp_path / 'hung'}", env=on(head, **{HANG_AT_STEP_ENV: "1:3"}))
    assert hung.returncode == 1, hung.stderr[-3000:]
    assert time.monotonic() - started < 180
    last = hung.stderr.strip().splitlines()[-1]
    # Rank 0 waits in the step's all-reduce meanwhile: its watchdog gives rank 1 a head start, so rank 1 is named.
    assert last.startswith("error: stage pretrain: rank 1 made no progress for"), last
    assert "after step 2, inside step 3" in last, last
    diverged = run_cli("run", *args, "stages.0.optim.lr=1e30", f"output_dir={tmp_path / 'nan'}", env=on(head))
    assert diverged.returncode == 1, diverged.stderr[-3000:]
    last = diverged.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage pretrain: the training loss is nan at step"), diverged.stderr[-3000:]


def _listening(processes: list) -> list[tuple[str, int, str]]:
    import psutil

    found = []
    for process in processes:
        try:
            for conn in process.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((conn.laddr.ip, conn.laddr.port, process.name()))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _loopback(ip: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def test_private_ray_listens_on_loopback_and_sigterm_checkpoints_and_leaves_nothing(tmp_path) -> None:
    """A private Ray (this command's own): while the stage trains, every listening socket of the command's process
    tree is on loopback except torch's rendezvous store (rank 0's MASTER_PORT: torch has no bind address);
    SIGTERM then checkpoints, stops (exit 75) and leaves no process, /dev/shm file or temp folder; the re-run
    resumes from that checkpoint."""
    import psutil

    from launcher import checkpoint_manifest as rules

    temp = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))  # short: Ray's socket paths go below it
    shm_before = set(os.listdir("/dev/shm"))
    args = [*FAULT, *PRETRAIN, "stages.0.checkpoint_every=100", f"output_dir={tmp_path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "RAY_ADDRESS": "", "TMPDIR": str(temp)}
    command = [sys.executable, "-m", "launcher", "run", *args]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[int, psutil.Process] = {}
    try:
        metrics = tmp_path / "tiny" / "pretrain" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if metrics.exists() and metrics.read_text().count("\n") >= 3:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        seen = {p.pid: p for p in tree}
        sockets = _listening(tree)
        assert len(sockets) > 5, sockets  # GCS, raylet, workers, agents: the audit saw the cluster
        exposed = [s for s in sockets if not _loopback(s[0])]
        # torch's store: held by a rank, and every rank is its client (Ray sets MASTER_PORT after start-up).
        clients = Counter()
        for process in tree:
            with contextlib.suppress(psutil.Error):
                clients.update(c.raddr.port for c in process.net_connections(kind="inet") if c.raddr)
        store = [s for s in exposed if s[2] == "ray::RayTrainWorker" and clients[s[1]] >= 2]
        assert len(store) <= 1 and [s for s in exposed if s not in store] == [], f"beyond loopback: {exposed}"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:  # failed before the signal: end it and remove its folder here
            proc.kill()
            proc.wait()
            shutil.rmtree(temp, ignore_errors=True)
    try:
        assert proc.returncode == 75, err[-4000:]
        _, alive = psutil.wait_procs(list(seen.values()), timeout=20)
        assert alive == [], f"left running: {[p.name() for p in alive]}"
        assert sorted(os.listdir(temp)) == [], "the private Ray's folder is removed"
        assert set(os.listdir("/dev/shm")) - shm_before == set()
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    latest = rules.latest_checkpoint(tmp_path / "tiny" / "pretrain" / "checkpoints")
    assert latest is not None
    stopped_at = rules.read_manifest(latest)["step"]
    assert 3 <= stopped_at < 60 and rules.read_manifest(latest)["world_size"] == 2
    temp = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))
    try:
        resumed = run_cli("run", *args, env={"RAY_ADDRESS": "", "TMPDIR": str(temp)})
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert_ok(resumed)
    summary = json.loads((tmp_path / "tiny" / "pretrain" / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["resumed_from_step"] == stopped_at
