"""Against a real SLURM: munged, slurmctld and two slurmd nodes, each in its own network namespace.

`tests/cluster/local_slurm.sh up` starts the cluster for this module and `down` stops it, even
when a test fails. Needs root (CI runs as root). Select with `pytest -m cluster`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, read_jsonl

pytestmark = pytest.mark.cluster
SCRIPT = ROOT / "tests" / "cluster" / "local_slurm.sh"
DEMO = ROOT / "data" / "demo"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    if os.geteuid() != 0:
        pytest.fail("the SLURM cluster tests need root (network namespaces, slurmd)")
    state = tmp_path_factory.mktemp("slurm") / "cluster"
    # Per-node Ray temp dirs (`/tmp/ray-<job>-<node>`): a job killed by a plain scancel cannot remove its own.
    before = set(Path("/tmp").glob("ray-*-node*"))
    up = subprocess.run(["bash", str(SCRIPT), "up", str(state)], capture_output=True, text=True, check=False)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf"), "RAY_ADDRESS": "", "DS_ACCELERATOR": "cpu",
               "LAUNCHER_STATE_DIR": str(state.parent / "jobs")}  # fmt: skip
        yield env
    finally:
        subprocess.run(["bash", str(SCRIPT), "down", str(state)], capture_output=True, text=True, check=False)
        for folder in set(Path("/tmp").glob("ray-*-node*")) - before:
            shutil.rmtree(folder, ignore_errors=True)


def slurm_state(env: dict[str, str]) -> Path:
    return Path(env["LAUNCHER_STATE_DIR"])


def _sbatch(env: dict[str, str], *args: str) -> int:
    out = subprocess.run(["sbatch", "--parsable", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().split(";")[0])


def _job(env: dict[str, str], job_id: int) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], env=env, capture_output=True, text=True,
                         check=False)  # fmt: skip
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def _wait_done(env: dict[str, str], job_ids: list[int], timeout: float = 420) -> dict[int, dict[str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = {job_id: _job(env, job_id) for job_id in job_ids}
        if all(job.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for job in jobs.values()):
            return jobs
        assert time.monotonic() < deadline, jobs
        time.sleep(1)


def _tiny(out: Path, *extra: str) -> list[str]:
    """The tiny job (absolute paths: the nodes share this file system), shrunk further."""
    return ["jobs/debug/tiny.yaml", "--stage", "pretrain", f"output_dir={out}",
            f"stages.0.data.train={DEMO / 'unlabeled.jsonl'}", f"stages.1.data.train={DEMO / 'train.csv'}",
            f"stages.1.data.eval={DEMO / 'test.csv'}", *extra]  # fmt: skip


def _images(tmp_path: Path) -> list[str]:
    """jobs/vision-mae.yaml's mae stage on 300 / 100 Fashion-MNIST images (IDX files on the shared file system)."""
    from tests.test_images import fashion, write_idx

    train = write_idx(tmp_path / "idx", "train", *fashion("train", 300))
    test = write_idx(tmp_path / "idx", "t10k", *fashion("t10k", 100))
    return ["jobs/vision-mae.yaml", "--stage", "pretrain", f"output_dir={tmp_path / 'b'}",
            f"stages.0.data.train={train}", f"stages.0.data.eval={test}", "stages.0.batch.micro_batch_size=16",
            "stages.0.batch.global_batch_size=32", "stages.0.schedule.warmup_steps=0", "stages.0.eval_every=0",
            "stages.0.checkpoint_every=0"]  # fmt: skip


def _ner(out: Path) -> list[str]:
    """jobs/ner.yaml's first stage: token classification of WNUT 2016 from the packaged MiniLM (`make data`)."""
    ner, minilm = ROOT / "data" / "ner", ROOT / "data" / "models" / "all-minilm-l6-v2"
    return ["jobs/ner.yaml", "--stage", "ner-minilm", f"output_dir={out}", f"stages.0.init_from={minilm}",
            f"stages.0.data.train={ner / 'wnut16-train.conll'}", f"stages.0.data.eval={ner / 'wnut16-test.conll'}",
            "stages.0.data.max_eval_samples=64", "stages.0.checkpoint_every=0"]  # fmt: skip


def test_two_jobs_at_once_each_on_a_two_node_ray_cluster(slurm, tmp_path) -> None:
    """Both jobs run at the same time on the same two nodes (own ports, temp dirs and tokens), each
    with a Ray cluster of two nodes with distinct addresses, and both nodes train. Their ports come from a
    range of three blocks of 100 whose first block has a port taken on node2: each job takes a block of its
    own, never that one. One is the NER job's MiniLM stage, the other the image job's masked-autoencoder stage
    (the tiny text job runs under SLURM in the tests below)."""
    holder = subprocess.Popen(
        ["nsenter", "--net=/run/netns/lslurm-node2", "python3", "-c",
         "import socket, time; s = socket.socket(); s.bind(('', 24050)); s.listen(); time.sleep(600)"],
    )  # fmt: skip
    env = {**slurm, "LAUNCHER_RAY_PORT_RANGE": "24000-24299"}
    commands = {"a": _ner(tmp_path / "a"), "b": _images(tmp_path)}
    stages = {"a": tmp_path / "a" / "ner" / "ner-minilm", "b": tmp_path / "b" / "vision-mae" / "pretrain"}
    ids = []
    try:
        for name, args in commands.items():
            ids.append(_sbatch(env, "-N", "2", "--cpus-per-task=1", f"--output={tmp_path}/{name}-%j.out",
                               "slurm/pretrain.sh", *args, "stages.0.max_steps=6"))  # fmt: skip
        jobs = _wait_done(slurm, ids)
    finally:
        holder.kill()
        holder.wait()
    logs = {name: next(tmp_path.glob(f"{name}-*.out")).read_text() for name in ("a", "b")}
    for (name, log), job in zip(logs.items(), jobs.values(), strict=True):
        assert job["JobState"] == "COMPLETED", log[-4000:]
        # Two clusters share the nodes: Ray Train's actors still find their own (RAY_ADDRESS reaches them).
        assert "Found multiple active Ray instances" not in log, log[-4000:]
        nodes = re.findall(r"launcher-slurm: node (\S+) (\S+)", log)
        assert {host for host, _ in nodes} == {"node1", "node2"} and len({ip for _, ip in nodes}) == 2, nodes
        ranks = set(re.findall(rf"stage {stages[name].name}: rank (\d)/2 on (node\d)", log))
        assert {rank for rank, _ in ranks} == {"0", "1"} and {host for _, host in ranks} == {"node1", "node2"}, ranks
        summary = json.loads((stages[name] / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] == 6
        assert (stages[name] / "model" / "model.safetensors").is_file()
        if name == "a":  # token classification: entity-level scores of the 64 eval sentences, the labels exported
            assert summary["task"] == "token_classification" and {"f1", "precision", "recall"} <= set(summary["eval"])
            config = json.loads((stages[name] / "model" / "config.json").read_text())
            assert config["architectures"] == ["BertForTokenClassification"] and len(config["id2label"]) == 21
    ports = {name: re.search(r"head node1 at [\d.]+:(\d+)", log).group(1) for name, log in logs.items()}
    assert ports["a"] != ports["b"] and set(ports.values()) <= {"24100", "24200"}, ports
    assert not list((slurm_state(slurm) / "ports").iterdir()), "the jobs released their port blocks"
    # They overlapped in time: each started before the other ended.
    start = {job_id: job["StartTime"] for job_id, job in jobs.items()}
    end = {job_id: job["EndTime"] for job_id, job in jobs.items()}
    assert start[ids[0]] < end[ids[1]] and start[ids[1]] < end[ids[0]], (start, end)


def _wait_for_step(env: dict[str, str], job_id: int, metrics: Path, step: int) -> None:
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= step):
        assert time.monotonic() < deadline and _job(env, job_id).get("JobState") in ("PENDING", "RUNNING")
        time.sleep(0.2)


def test_preemption_checkpoints_requeues_and_resumes(slurm, tmp_path) -> None:
    """Stopped twice: by SIGUSR1 to the batch script (what `--signal=B:USR1@grace` sends before the time
    limit), then by a real preemption (an `urgent` job that needs the whole nodes; the site's
    `preempt_send_user_signal` sends the job's --signal). Each time the run checkpoints and the job
    is requeued; it ends complete, every step trained once."""
    out = tmp_path / "run"
    job_id = _sbatch(slurm, "-N", "2", "--cpus-per-task=1", f"--output={tmp_path}/job.out", "slurm/pretrain.sh",
                     *_tiny(out, "stages.0.max_steps=400", "stages.0.checkpoint_every=1000",
                            "stages.0.eval_every=1000"))  # fmt: skip
    metrics = out / "tiny" / "pretrain" / "metrics.jsonl"
    _wait_for_step(slurm, job_id, metrics, 5)
    signal = subprocess.run(["scancel", "--signal=USR1", "--batch", str(job_id)], env=slurm, check=False)
    assert signal.returncode == 0
    log = tmp_path / "job.out"
    deadline = time.monotonic() + 300
    while "restart 1" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.5)
    first = int(re.search(r"stage pretrain: stopped at step (\d+) after a checkpoint", log.read_text()).group(1))
    _wait_for_step(slurm, job_id, metrics, first + 5)
    urgent = _sbatch(slurm, "-p", "urgent", "-N", "2", "--exclusive", f"--output={tmp_path}/urgent.out",
                     "--wrap", "sleep 2")  # fmt: skip
    jobs = _wait_done(slurm, [job_id, urgent], timeout=600)
    text = log.read_text()
    assert jobs[urgent]["JobState"] == "COMPLETED", jobs[urgent]
    assert jobs[job_id]["JobState"] == "COMPLETED" and jobs[job_id]["Restarts"] == "2", text[-4000:]
    stops = [int(n) for n in re.findall(r"stage pretrain: stopped at step (\d+) after a checkpoint", text)]
    assert len(stops) == 2 and 5 <= stops[0] < stops[1] < 400, stops
    assert text.count("received USR1: asking the run to checkpoint and stop") == 2
    assert "restart 2" in text and text.count("requeueing job") == 2
    summary = json.loads((out / "tiny" / "pretrain" / "summary.json").read_text())
    assert summary["steps"] == 400 and summary["resumed_from_step"] == stops[1], "continued from the checkpoint"
    assert [r["step"] for r in read_jsonl(metrics)] == list(range(1, 401))


def test_after_a_plain_scancel_the_next_run_resumes_from_the_last_committed_checkpoint(slurm, tmp_path) -> None:
    """`scancel` without --signal: srun answers its own SIGTERM by SIGKILLing its step's tasks, so nothing can
    checkpoint then (SLURM's behaviour; the README says so). What must hold: the checkpoints left are
    committed ones or ignored, and the next run (here `--local`, the same global batch) resumes from the
    newest committed one."""
    from launcher.checkpoint_manifest import latest_checkpoint, read_manifest, verify

    out = tmp_path / "run"
    args = _tiny(out, "stages.0.max_steps=400", "stages.0.checkpoint_every=5", "stages.0.eval_every=1000")
    job_id = _sbatch(slurm, "-N", "2", "--cpus-per-task=1", f"--output={tmp_path}/job.out", "slurm/pretrain.sh",
                     *args)  # fmt: skip
    _wait_for_step(slurm, job_id, out / "tiny" / "pretrain" / "metrics.jsonl", 12)
    assert subprocess.run(["scancel", str(job_id)], env=slurm, check=False).returncode == 0
    job = _wait_done(slurm, [job_id], timeout=120)[job_id]
    assert job["JobState"] == "CANCELLED", (tmp_path / "job.out").read_text()[-4000:]
    checkpoints = out / "tiny" / "pretrain" / "checkpoints"
    latest = latest_checkpoint(checkpoints)
    assert latest is not None
    committed = read_manifest(latest)["step"]
    assert committed >= 10 and committed % 5 == 0 and verify(latest) is None
    local = [*args, "--local", "stages.0.batch.grad_accum_steps=2", "stages.0.max_steps=" + str(committed + 5)]
    resumed = subprocess.run([sys.executable, "-m", "launcher", "run", *local], cwd=ROOT, env=slurm,
                             capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    summary = json.loads((out / "tiny" / "pretrain" / "summary.json").read_text())
    assert summary["resumed_from_step"] == committed


def test_launcher_slurm_renders_a_script_sbatch_accepts(slurm, tmp_path) -> None:
    hostile = 'it\'s a "job" $(touch ' + str(tmp_path / "pwned") + ") `id` ;x"
    rendered = subprocess.run(
        [str(Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "launcher"), "slurm", "jobs/debug/tiny.yaml",
         f"cluster.slurm.job_name={hostile}", "cluster.slurm.nodes=2", "cluster.slurm.cpus_per_node=1",
         "cluster.slurm.time_limit=00:10:00"],
        cwd=ROOT, env=slurm, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    script = tmp_path / "job.sbatch"
    script.write_text(rendered.stdout)
    test_only = subprocess.run(["sbatch", "--test-only", str(script)], env=slurm, capture_output=True, text=True,
                               check=False)  # fmt: skip
    assert test_only.returncode == 0 and "node" in test_only.stderr, test_only.stderr
    held = _sbatch(slurm, "--hold", str(script))
    try:
        assert _job(slurm, held)["NumNodes"] in ("2", "2-2")
        name = subprocess.run(["squeue", "-h", "-j", str(held), "-o", "%j"], env=slurm, capture_output=True,
                              text=True, check=False).stdout.strip()  # fmt: skip
        assert name == hostile, "the job name stays a name"
    finally:
        subprocess.run(["scancel", str(held)], env=slurm, check=False)
    assert not (tmp_path / "pwned").exists(), "nothing in the name was executed"
    shell = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert shell.returncode == 0, shell.stderr
