"""The private Ray and DeepSpeed names the launcher reaches (`launcher.coordinator.ray_internals`,
`launcher.worker.deepspeed_internals`): checked against the installed releases, loudly.

A new Ray or DeepSpeed fails here first, naming the release and each name that moved, before any
run bends or hangs on it."""

from __future__ import annotations

import os

import pytest

from launcher.coordinator import ray_internals
from launcher.worker import deepspeed_internals


def test_ray_is_the_release_its_private_hooks_were_read_in() -> None:
    import ray

    assert ray.__version__ == ray_internals.CHECKED_WITH, (
        f"Ray {ray.__version__} is installed; launcher/coordinator/ray_internals.py was read against "
        f"{ray_internals.CHECKED_WITH}: read its hooks in the new release's source, then move CHECKED_WITH"
    )
    assert ray_internals.missing() == [], f"Ray {ray.__version__} lacks these private names"


def test_deepspeed_is_the_release_its_internals_were_read_in() -> None:
    import deepspeed

    assert deepspeed.__version__ == deepspeed_internals.CHECKED_WITH, (
        f"DeepSpeed {deepspeed.__version__} is installed; launcher/worker/deepspeed_internals.py was read against "
        f"{deepspeed_internals.CHECKED_WITH}: read those names in the new release's source, then move CHECKED_WITH"
    )
    assert deepspeed_internals.missing() == [], f"DeepSpeed {deepspeed.__version__} lacks these private names"


def test_missing_names_are_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check itself can fail: a moved module and a renamed attribute are both named."""
    monkeypatch.setattr(ray_internals, "_NAMES", (("ray.no_such_module", "x"), ("ray", "no_such_name")))
    assert ray_internals.missing() == ["ray.no_such_module (module)", "ray.no_such_name"]
    monkeypatch.setattr(
        deepspeed_internals, "_NAMES", (("deepspeed.runtime.engine", "DeepSpeedEngine", "self._no_such_attribute"),)
    )
    assert deepspeed_internals.missing() == ["deepspeed.runtime.engine.DeepSpeedEngine: self._no_such_attribute"]


def test_trainer_starts_no_ray_data_actor_and_private_one_no_placement_group_cleaner() -> None:
    """The launcher passes no Ray Datasets: Ray Train's datasets callback (a DatasetManager actor per
    worker group) goes everywhere. The private cluster ends with the command: Ray Train's placement-group
    cleaner (and the dashboard it polls) would only take CPU from the workers."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    def callbacks(trainer_type: type) -> set[str]:
        trainer = trainer_type(lambda config: None, scaling_config=ScalingConfig(num_workers=1))
        return {type(c).__name__ for c in trainer._create_default_callbacks()}

    ray_own = callbacks(TorchTrainer)
    assert {"DatasetsCallback", "PlacementGroupCleanerCallback"} <= ray_own
    assert callbacks(ray_internals.trainer_class(private=False)) == ray_own - {"DatasetsCallback"}
    everything = {"DatasetsCallback", "PlacementGroupCleanerCallback"}
    assert callbacks(ray_internals.trainer_class(private=True)) == ray_own - everything
    # fit() would replace the launcher's SIGINT handler with Ray Train's (abort without a checkpoint).
    trainer = ray_internals.trainer_class(False)
    assert trainer._register_sigint_handler is not DataParallelTrainer._register_sigint_handler


def test_the_controller_polls_its_workers_every_half_second_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Train's controller reads its poll interval from the environment of the process that calls fit;
    the runtime environment carries it to a sweep's trial actors. A user's value stays; a large job keeps Ray's."""
    from ray.train.v2._internal.constants import HEALTH_CHECK_INTERVAL_S_ENV_VAR as name
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    monkeypatch.delenv(name, raising=False)
    env: dict[str, str] = {}
    ray_internals.poll_workers_often(env, 2)
    assert env[name] == "0.5" and get_env_vars_to_propagate()[name] == "0.5", "the controller gets it"
    monkeypatch.setenv(name, "3")
    env = {}
    ray_internals.poll_workers_often(env, 2)
    assert env[name] == "3" and os.environ[name] == "3", "the user's value stays"
    monkeypatch.delenv(name)
    env = {}
    ray_internals.poll_workers_often(env, 512)
    assert name not in env and name not in os.environ, "Ray's default at scale"


def test_deepspeed_imports_without_mlflow_and_mlflow_imports_after() -> None:
    """DeepSpeed's autotuner imports MLflow when it is installed (~1.4 s in every worker); the launcher's
    import hides it from DeepSpeed only: MLflow is not loaded by it, and imports normally afterwards."""
    import subprocess
    import sys

    check = (
        "import sys\n"
        "from launcher.worker.deepspeed_internals import import_deepspeed\n"
        "import_deepspeed()\n"
        "from deepspeed.autotuning import autotuner\n"
        "assert 'mlflow' not in sys.modules and not autotuner.has_mlflow\n"
        "import mlflow\n"
        "assert mlflow.__version__\n"
        "print('ok')\n"
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=300,
                            check=False)  # fmt: skip
    assert result.returncode == 0 and result.stdout.splitlines()[-1:] == ["ok"], result.stdout + result.stderr[-3000:]
