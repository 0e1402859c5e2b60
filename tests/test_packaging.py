"""Shell scripts and the cluster image: linted, and the image pins what pyproject pins."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT

BIN = Path(sys.executable).parent
SCRIPTS = sorted([*ROOT.glob("slurm/*.sh"), *ROOT.glob("tests/cluster/*.sh"), *ROOT.glob("benchmarks/*.sh"),
                  ROOT / ".ci" / "run"])  # fmt: skip


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_scripts_are_shellcheck_clean(script: Path) -> None:
    result = subprocess.run([str(BIN / "shellcheck"), "--shell=bash", str(script)], capture_output=True, text=True,
                            check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout


def test_dockerfile_is_hadolint_clean() -> None:
    result = subprocess.run([str(BIN / "hadolint"), "--no-color", str(ROOT / "docker" / "Dockerfile")],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout


def test_image_pins_match_pyproject() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(re.match(r"([A-Za-z0-9_-]+)(?:\[[^]]*\])?==(.+)", d).groups() for d in deps if "==" in d)
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)_VERSION=(\S+)", dockerfile, flags=re.M))
    assert args == {"TORCH": pins["torch"], "DEEPSPEED": pins["deepspeed"], "RAY": pins["ray"]}
    constraints = (ROOT / "requirements" / "constraints.txt").read_text()
    assert f"torch=={pins['torch']}" in constraints


def test_jobspec_imports_neither_torch_ray_nor_deepspeed() -> None:
    """The job spec layer (load, plan, DeepSpeed config, layout) stays importable without the heavy stack."""
    modules = [f"launcher.jobspec.{p.stem}" for p in sorted((ROOT / "launcher" / "jobspec").glob("*.py"))]
    heavy = ("torch", "transformers", "ray", "deepspeed")
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint(sorted(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"launcher.jobspec imported {result.stdout.strip()}"
