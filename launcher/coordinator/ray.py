"""Ray Train coordinator: each stage is one `TorchTrainer` run of N DeepSpeed workers.

Joins the cluster named by RAY_ADDRESS (or `cluster.address`); with neither, starts a private Ray
for this command (no dashboard; token auth with a token of its own; sessions, logs and temp files
in a 0700 folder of its own, kept only when the run fails) and shuts it down afterwards.
That private cluster listens on loopback only (`ray_internals.bind_to_loopback`) and needs the token too.
Each worker calls the same per-rank entry as `--local`; checkpoints are reported to Ray
(`RunConfig(storage_path=<stage dir>, name="checkpoints")`) and committed by rank 0 once every
rank's upload is in, so a restarted worker group, or a re-run of the command, resumes from the
last committed checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import secrets
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from launcher.contract import StageLaunch, StageResult
from launcher.coordinator import ray_internals
from launcher.errors import RunError, UserError
from launcher.hooks import LOOP_ENV, verbose
from launcher.jobspec.models import JobSpec

# Variables the workers need from the driver's environment (never secrets).
_FORWARDED_ENV = ("DS_ACCELERATOR", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "TORCH_EXTENSIONS_DIR", *LOOP_ENV)


def _train_worker(config: dict[str, Any]) -> StageResult:
    """Runs inside every Ray Train worker; Ray Train hands rank 0's result to the driver (`Result.return_value`)."""
    if Path(config["cwd"]).is_dir():
        os.chdir(config["cwd"])  # relative paths in the launch mean the same as on the driver
    from launcher.worker.context import ray_context
    from launcher.worker.entry import run_stage

    if not verbose():
        ray_internals.quiet_worker_context()

    launch: StageLaunch = config["launch"]
    return run_stage(launch, ray_context(launch.spec.cluster.use_gpu))


def run_stage_ray(launch: StageLaunch, private: bool = False) -> StageResult:
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from launcher.worker.watchdog import hang_report, watchdog_notes

    cluster = launch.spec.cluster
    resources: dict[str, float] = {"CPU": cluster.cpus_per_worker}
    if cluster.use_gpu:
        resources["GPU"] = 1
    trainer = ray_internals.trainer_class(private)(
        _train_worker,
        train_loop_config={"launch": launch, "cwd": os.getcwd()},
        torch_config=TorchConfig(backend="nccl" if cluster.use_gpu else "gloo", timeout_s=cluster.collective_timeout_s),
        scaling_config=ScalingConfig(
            num_workers=launch.plan.world_size, use_gpu=cluster.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=launch.paths.checkpoints.name,
            storage_path=str(launch.paths.checkpoints.parent.resolve()),
            failure_config=FailureConfig(max_failures=cluster.max_failures),
            # Rank 0 prunes after its commit: only committed checkpoints count toward the kept ones.
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            # Ray Train's per-report, per-checkpoint and worker-group lines: in Ray's log files, on the console
            # only with --verbose (the launcher prints its own progress).
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
    )
    # Ray Train's own hang detection: its barriers (every `ray.train.report`) give up after this long.
    # Read from the driver's environment; Ray hands it to its controller and workers.
    os.environ["RAY_TRAIN_COLLECTIVE_TIMEOUT_S"] = str(cluster.collective_timeout_s)
    notes = watchdog_notes(launch.paths.stage_dir)
    shutil.rmtree(notes, ignore_errors=True)
    try:
        result = trainer.fit()
    except Exception as exc:  # a user or run error inside the workers: the same one line as in debug mode
        known = _known_error(exc)
        hung = hang_report(notes)
        if known is None and hung is not None:
            known = RunError(f"{hung}; the stage failed (cluster.max_failures={cluster.max_failures})")
        if known is None:
            raise
        raise known from None
    assert isinstance(result.return_value, StageResult), f"rank 0 returned {type(result.return_value).__name__}"
    return result.return_value


def _known_error(exc: BaseException) -> UserError | RunError | None:
    """The first `UserError`/`RunError` a worker raised, found in what Ray Train wraps it in."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, (UserError, RunError)):
            return type(current)(str(current))
        failures = getattr(current, "worker_failures", None)  # ray.train.WorkerGroupError: rank -> exception
        if isinstance(failures, dict):
            pending.extend(f for _, f in sorted(failures.items()) if isinstance(f, BaseException))
        for inner in (getattr(current, "cause", None), current.__cause__, current.__context__):
            if isinstance(inner, BaseException):
                pending.append(inner)
    return None


def cluster_address(spec: JobSpec) -> str | None:
    """The Ray cluster this command joins: RAY_ADDRESS wins over `cluster.address`; None starts a private one."""
    return os.environ.get("RAY_ADDRESS") or spec.cluster.address


def prepare_on_cluster(spec: JobSpec, address: str) -> None:
    """`launcher prepare` on a Ray cluster: every stage's preparation tasks run as Ray Data tasks there."""
    import ray

    from launcher.coordinator.driver import claim_job_dir, resolve
    from launcher.data.prepare import run_jobs_on_ray

    claim_job_dir(spec)
    env = {name: os.environ[name] for name in _FORWARDED_ENV if name in os.environ}
    ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
    try:
        resolve(spec, local=False, run_jobs=run_jobs_on_ray)
    finally:
        ray.shutdown()


@contextlib.contextmanager
def ray_session(
    spec: JobSpec, run_ends_well: Callable[[], bool] = lambda: True, preload: str | None = None
) -> Iterator[str | None]:
    """Ray for this command: the cluster RAY_ADDRESS or `cluster.address` names, else a private one on
    loopback with a token of its own, shut down (and its folder removed) on the way out. Yields the
    address joined, or None for a private cluster. A private cluster's logs are kept when the body
    fails other than by a user error or a stop on request, or when `run_ends_well()` says no. `preload`: a
    module imported in a thread while Ray starts (after the auth variables are set: Ray reads them on import)."""
    from launcher.coordinator.signals import Interrupted

    env = {name: os.environ[name] for name in _FORWARDED_ENV if name in os.environ}
    env.setdefault("HF_HUB_OFFLINE", "1")
    # Ray Train re-routes print() in workers through its logger, which shows every line twice.
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    address = cluster_address(spec)
    if address and address != "auto" and "://" not in address:
        # Ray Train's placement-group cleaner, an actor, finds the cluster's API server from RAY_ADDRESS
        # or by looking for GCS processes on its node; two Ray clusters on a node (two SLURM jobs) made
        # it fail and leave the run's placement group behind if the controller died.
        env.setdefault("RAY_ADDRESS", address)
    # A joined cluster's auth mode and token come from the environment (RAY_AUTH_MODE,
    # RAY_AUTH_TOKEN_PATH); a private one gets its own token. Ray reads both when it is imported.
    private = None if address else _private_folder()
    if private is not None:
        # One machine that this command started: no node can be preempted, so Ray Train's
        # preemption-watcher actor (polling every 5 s) would only take CPU from the workers.
        # Ray Train hands this variable from the driver's environment to its controller.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Nor is there a metrics endpoint anyone scrapes (TensorBoard is the monitor): no Train metrics.
        os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's pair sockets: loopback, like the rest
    if preload is not None:
        threading.Thread(target=importlib.import_module, args=(preload,), daemon=True).start()
    import ray

    ray_internals.poll_workers_often(env, spec.cluster.num_workers)
    if private is not None:
        ray_internals.bind_to_loopback()
    level = logging.INFO if verbose() else logging.WARNING  # "Started a local Ray instance." and the like
    keep_logs = True  # unless the run ends well, or on a user error (nothing of Ray's to look at)
    try:
        if address:
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True, logging_level=level)
        else:
            # No dashboard: its processes would share the workers' CPUs, and nobody watches a
            # cluster that lives as long as this command (TensorBoard is the monitor).
            ray.init(
                include_dashboard=False,
                runtime_env={"env_vars": env},
                log_to_driver=True,
                logging_level=level,
                _temp_dir=str(private / "ray"),
            )
        yield address
        keep_logs = not run_ends_well()
    except (UserError, Interrupted):  # nothing of Ray's to look at; stopped at once on request
        keep_logs = False
        raise
    finally:
        ray.shutdown()
        if private is not None:
            _remove_private(private, keep_logs)


def run_ray(spec: JobSpec, only: str | None = None) -> int:
    from launcher.coordinator.driver import EXIT_STOPPED, run_job
    from launcher.data.prepare import run_jobs_locally, run_jobs_on_ray

    codes: list[int] = []
    # Ray Train and torch under it (~1.5 s) import while Ray starts, not after the data check.
    with ray_session(spec, lambda: codes[-1] in (0, EXIT_STOPPED), preload="ray.train.torch") as address:
        stage_runner = functools.partial(run_stage_ray, private=address is None)
        # On a cluster, data preparation fans out as Ray Data tasks over its nodes; a private
        # Ray is this one machine, where worker processes do the same with less start-up.
        run_jobs = run_jobs_on_ray if address else run_jobs_locally
        codes.append(run_job(spec, local=False, run_stage=stage_runner, only=only, run_jobs=run_jobs))
    return codes[-1]


def _private_folder() -> Path:
    """A 0700 folder for the private Ray: its token (never `~/.ray/auth_token`), sessions and temp files.

    Ray reads the token variables when it is imported. Processes Ray starts inherit TMPDIR, so
    what they leave behind (the dashboard's forkserver socket, staged checkpoint shards) goes
    here too, not into /tmp.
    """
    # Ray's sockets live under its temp dir (~70 bytes deeper), and a socket path has at most 107.
    base = tempfile.gettempdir()
    folder = Path(tempfile.mkdtemp(prefix="launcher-ray-", dir=base if len(base) <= 20 else "/tmp"))  # noqa: S108 (mkdtemp: unique, 0700)
    token = folder / "token"
    token.touch(mode=0o600)
    token.write_text(secrets.token_hex(32))
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), TMPDIR=str(folder))
    os.environ.pop("RAY_AUTH_TOKEN", None)
    return folder


def _remove_private(folder: Path, keep_logs: bool) -> None:
    """Remove the private Ray's folder; after a failure keep its logs (not the token) and say where."""
    if keep_logs and (folder / "ray").is_dir():
        (folder / "token").unlink(missing_ok=True)
        print(f"Ray's logs of this run: {folder / 'ray' / 'session_latest' / 'logs'}", file=sys.stderr)
        return
    shutil.rmtree(folder, ignore_errors=True)
