"""metrics.mlflow: a run per stage nested under the job's, read back through MLflow's client from a real server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.contract import shown_uri as shown
from launcher.coordinator.tracking import _job_params, flatten
from launcher.worker.context import free_port
from tests.conftest import TINY, assert_ok, read_jsonl, run_cli


@pytest.fixture(autouse=True)
def own_temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's SQLite stores leave a `db_init_lock-<hash>` file in the temp folder (mlflow/store/db/utils.py):
    here, in the test's own folder, for the server, the launcher and the client alike."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """`mlflow server` on loopback at a free port (SQLite store, proxied artifacts), ended with its process group."""
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
               "--artifacts-destination", str(store / "artifacts")]  # fmt: skip
    log = (tmp_path / "server.log").open("w")
    # No job runner (GenAI evaluation jobs, unused here): its store would be a temp folder that MLflow makes
    # in /dev/shm (mlflow/server/__init__.py) and never removes.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "mlflow server not up after 120 s"
                time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        except ProcessLookupError:
            pass
        log.close()


def test_params_are_the_spec_flattened() -> None:
    assert flatten({"optim": {"lr": 0.001, "betas": [0.9, 0.99]}, "seed": 0, "path": None}) == {
        "optim.lr": "0.001", "optim.betas": "[0.9, 0.99]", "seed": "0", "path": "None",
    }  # fmt: skip


def test_credentials_in_the_tracking_uri_are_never_shown_or_logged() -> None:
    from launcher.jobspec.load import load_spec

    uri = "https://ml-user:s3cret@mlflow.example.org:5000/path"
    assert shown(uri) == "https://***@mlflow.example.org:5000/path"
    assert shown("http://127.0.0.1:5000") == "http://127.0.0.1:5000" and shown("sqlite:///x.db") == "sqlite:///x.db"
    params = _job_params(load_spec(TINY, [f"metrics.mlflow={{tracking_uri: '{uri}'}}"]))
    assert params["metrics.mlflow.tracking_uri"] == shown(uri)
    assert not any("s3cret" in value for value in params.values())


@pytest.mark.slow
def test_each_stage_is_a_run_under_the_jobs_with_params_metrics_and_the_export(mlflow_server: str, tmp_path) -> None:
    from mlflow import MlflowClient

    out = tmp_path / "out"
    result = run_cli("run", str(TINY), "--local", f"output_dir={out}",
                     f"metrics.mlflow={{tracking_uri: '{mlflow_server}', experiment: tiny-test}}")  # fmt: skip
    assert_ok(result)
    assert f"at {mlflow_server}" in result.stdout and "warning" not in result.stderr
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("tiny-test")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"tiny", "pretrain", "finetune"}
    parent = runs["tiny"]
    assert parent.info.status == "FINISHED" and parent.data.params["seed"] == "0"
    for name in ("pretrain", "finetune"):
        run = runs[name]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
        stage = out / "tiny" / name
        records = read_jsonl(stage / "metrics.jsonl")
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert [(m.step, m.value) for m in history] == [
            (r["step"], r["train/loss"]) for r in records if "train/loss" in r
        ]
        evals = client.get_metric_history(run.info.run_id, "eval/loss")
        assert [m.step for m in evals] == [r["step"] for r in records if "eval/loss" in r]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
        assert {"model/model.safetensors", "model/config.json"} <= artifacts
        copy = Path(client.download_artifacts(run.info.run_id, "model/model.safetensors", str(tmp_path / name)))
        assert copy.read_bytes() == (stage / "model" / "model.safetensors").read_bytes()
        assert json.loads(Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path / name)))
                          .read_text())["stage"] == name  # fmt: skip
    params = runs["finetune"].data.params
    assert params["stage.optim.lr"] == "0.001" and params["stage.task"] == "classification"
    assert params["plan.global_batch_size"] == "16" and params["cluster.num_workers"] == "0"
    assert "eval/accuracy" in runs["finetune"].data.metrics and "eval/macro_f1" in runs["finetune"].data.metrics


@pytest.mark.slow
def test_a_store_that_does_not_answer_is_one_warning_and_the_stage_runs_with_tensorboard(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with_password = dead.replace("http://", "http://user:s3cret@")
    out = tmp_path / "out"
    result = run_cli("run", str(TINY), "--local", "--stage", "pretrain", f"output_dir={out}",
                     f"metrics.mlflow={{tracking_uri: '{with_password}'}}")  # fmt: skip
    assert_ok(result)
    warnings = [line for line in result.stderr.splitlines() if "metrics.mlflow" in line]
    shown_dead = dead.replace("http://", "http://***@")
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: metrics.mlflow: {shown_dead} does not answer")
    assert "s3cret" not in result.stdout + result.stderr
    assert warnings[0].endswith("the job runs with TensorBoard only")
    assert list((out / "tiny" / "pretrain" / "tensorboard").glob("events.*"))


@pytest.mark.slow
def test_without_a_uri_the_runs_go_to_a_store_in_the_jobs_folder(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    out = tmp_path / "out"
    assert_ok(run_cli("run", str(TINY), "--local", "--stage", "pretrain", f"output_dir={out}", "metrics.mlflow={}"))
    database = out / "tiny" / "mlflow.db"
    assert database.is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{database}")
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
              if r.info.run_name == "pretrain"]  # fmt: skip
    assert run.data.metrics["train/loss"] > 0 and run.data.params["stage.task"] == "mlm"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} >= {"model/model.safetensors"}
    assert (out / "tiny" / "mlartifacts").is_dir()
