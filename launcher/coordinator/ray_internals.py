"""Every private Ray name the launcher touches, in one place.

Ray Train offers no public switch for five things the launcher needs: keeping the launcher's own
SIGINT handler during `fit()`, not starting a Ray Data actor per worker group when no dataset is
passed, not starting the placement-group cleaner on a cluster that ends with the command,
quieting its worker context's per-report lines, and polling its workers more often than every 2 s.
A private Ray also needs every server on loopback, which only a module constant switches. Each is
reached here and nowhere else; `CHECKED_WITH` is the Ray these names were read in, and
`tests/test_internals.py` fails loudly, naming what moved, on any other Ray (read the hooks again in
the new release's source, then move the pin and the constant).
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

CHECKED_WITH = "2.60.0"

# (module, attribute) pairs this module reaches; `missing()` says which of them the installed Ray lacks.
_NAMES = (
    ("ray.train.v2._internal.execution.context", "logger"),
    ("ray.train.v2._internal.callbacks.datasets", "DatasetsCallback"),
    ("ray.train.v2._internal.callbacks.placement_group_callback", "PlacementGroupCleanerCallback"),
    ("ray.train.v2.api.data_parallel_trainer", "DataParallelTrainer._register_sigint_handler"),
    ("ray.train.v2.api.data_parallel_trainer", "DataParallelTrainer._create_default_callbacks"),
    ("ray._private.ray_constants", "ENABLE_RAY_CLUSTER"),
    ("ray.train.v2._internal.constants", "HEALTH_CHECK_INTERVAL_S_ENV_VAR"),
    # Not private but a DeveloperAPI (no stability promise): `launcher.jobspec.sweep` draws a sweep's trials with it.
    ("ray.tune.search.variant_generator", "generate_variants"),
)


def missing() -> list[str]:
    """The private names above that the installed Ray does not have (empty with the checked release)."""
    absent = []
    for module_name, dotted in _NAMES:
        try:
            target: Any = importlib.import_module(module_name)
        except ImportError:
            absent.append(f"{module_name} (module)")
            continue
        for part in dotted.split("."):
            if not hasattr(target, part):
                absent.append(f"{module_name}.{dotted}")
                break
            target = getattr(target, part)
    return absent


POLL_S, POLL_MAX_WORKERS = "0.5", 64


def poll_workers_often(env: dict[str, str], num_workers: int) -> None:
    """Ray Train's controller polls its workers every 2 s by default (an internal variable), and a stage takes a
    few polls to start and to end: ~5 s of every stage run, and of every trial of a sweep. Up to
    POLL_MAX_WORKERS workers it polls every POLL_S seconds, unless the environment says otherwise. The controller
    reads the variable from the environment of the process that calls `fit` (this driver; a sweep's trial
    actor gets it through the runtime environment `env`)."""
    from ray.train.v2._internal.constants import HEALTH_CHECK_INTERVAL_S_ENV_VAR as name

    if num_workers <= POLL_MAX_WORKERS:
        os.environ.setdefault(name, POLL_S)
    if name in os.environ:
        env.setdefault(name, os.environ[name])


def quiet_worker_context() -> None:
    """Ray Train's "Reporting training result N: TrainingReport(...)" lines, one per rank and checkpoint: its
    worker context logs them at INFO under the module's own logger, outside the `ray.train` logger that
    `LoggingConfig` sets."""
    from ray.train.v2._internal.execution import context

    context.logger.setLevel(logging.WARNING)


def trainer_class(private: bool) -> type:
    """`TorchTrainer` that leaves SIGINT to the launcher and starts no Ray Data actor; on a private
    cluster, also without the placement-group cleaner.

    `fit()` installs Ray Train's own SIGINT handler (abort the run, no checkpoint) over the driver's;
    the launcher's handler checkpoints and stops instead (`launcher.coordinator.signals`). Ray
    Train's datasets callback starts a `DatasetManager` actor (a process importing Ray Data, ~0.2 GB)
    for every worker group even with no datasets; the launcher reads its own token stores and
    passes none, so that process would only take CPU from the workers while they start. The
    placement-group cleaner is a detached actor that asks the dashboard's state API every second
    whether the Train controller is still alive, to free its placement group should it die in a
    long-lived cluster. A private cluster ends with this command, so it would only take CPU (and
    the dashboard it needs) from the workers.
    """
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    unused: tuple[type, ...] = (DatasetsCallback, PlacementGroupCleanerCallback) if private else (DatasetsCallback,)

    class LauncherTrainer(TorchTrainer):
        def _register_sigint_handler(self, controller: Any) -> None:
            pass  # keep the launcher's handler

        def _create_default_callbacks(self) -> list[Any]:
            assert not self.datasets, "the launcher passes no Ray Datasets"
            return [c for c in super()._create_default_callbacks() if not isinstance(c, unused)]

    return LauncherTrainer


def bind_to_loopback() -> None:
    """Every server a private Ray starts (GCS, raylet, workers, agents, metrics) on 127.0.0.1 only.

    Ray takes the loopback address as the node's only where it does not form clusters (its switch
    for macOS and Windows, `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`, read when `ray` is imported). The
    variable goes to Ray's processes, the module constant to this one, whether or not `ray` was
    imported already.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
