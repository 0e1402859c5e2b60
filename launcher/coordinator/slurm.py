"""`launcher slurm JOB.yaml [key=value ...] [--submit]`: an sbatch script rendered from the spec.

The `#SBATCH` header comes from `cluster.slurm` (the one place the node count lives); the body
execs `slurm/ray_job.sh`, which starts Ray across the allocation and asks `allocation_workers`
(through `launcher workers`) for the worker count it gives. Every value is shell-quoted (sbatch
parses `#SBATCH` lines with shell quoting too), so a job name with spaces, quotes or `$(...)` stays
a name.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from launcher.errors import UserError
from launcher.jobspec import layout
from launcher.jobspec.models import JobSpec


def launcher_home() -> Path:
    """The checkout holding `slurm/ray_job.sh` (LAUNCHER_HOME, else the one this package runs from)."""
    home = Path(os.environ.get("LAUNCHER_HOME") or Path(__file__).resolve().parents[2]).resolve()
    if not (home / "slurm" / "ray_job.sh").is_file():
        raise UserError(f"LAUNCHER_HOME: {home} has no slurm/ray_job.sh; point LAUNCHER_HOME at the repository")
    return home


def allocation_workers(nodes: int, gpus_per_node: int) -> tuple[int, bool]:
    """(training workers, on GPUs?) of an allocation: one worker per GPU, else `LAUNCHER_WORKERS_PER_NODE`
    (default 1) per node. The one rule: `launcher slurm` checks the plan with it before submitting, and
    slurm/ray_job.sh asks for it inside the allocation (`launcher workers NODES GPUS_PER_NODE`)."""
    per_node = os.environ.get("LAUNCHER_WORKERS_PER_NODE", "1")
    if gpus_per_node > 0:
        return nodes * gpus_per_node, True
    if not per_node.isdigit() or int(per_node) < 1:
        raise UserError(f"LAUNCHER_WORKERS_PER_NODE: {per_node!r} is not a positive whole number")
    return nodes * int(per_node), False


def workers_for(spec: JobSpec) -> int:
    """Training workers the allocation `cluster.slurm` asks for will give."""
    slurm = spec.cluster.slurm
    return allocation_workers(slurm.nodes, slurm.gpus_per_node or 0)[0]


def render_sbatch(spec: JobSpec, spec_path: str, overrides: list[str]) -> str:
    slurm = spec.cluster.slurm
    home = launcher_home()
    q = shlex.quote
    header = {
        "job-name": slurm.job_name or spec.name,
        "nodes": str(slurm.nodes),
        "ntasks-per-node": "1",
        "cpus-per-task": str(slurm.cpus_per_node),
        "gpus-per-node": str(slurm.gpus_per_node) if slurm.gpus_per_node else None,
        "time": slurm.time_limit,
        "partition": slurm.partition,
        "account": slurm.account,
        "signal": f"B:USR1@{slurm.preempt_grace_s}",
        "chdir": str(home),
        "output": "slurm-%j.out",
        "open-mode": "append",
    }
    lines = [
        "#!/usr/bin/env bash",
        f"# Rendered by: launcher slurm {json.dumps([spec_path, *overrides])[1:-1]}",
        "# Submit with: sbatch THIS_FILE   (sbatch options on the command line override the lines below)",
    ]
    lines += [f"#SBATCH --{key}={q(value)}" for key, value in header.items() if value is not None]
    lines += [
        "#SBATCH --requeue",
        "set -euo pipefail",
        f"export LAUNCHER_HOME={q(str(home))}",
    ]
    if slurm.requeue_on_term:
        lines.append("export LAUNCHER_REQUEUE_ON_TERM=1")
    spec_file = str(Path(spec_path).resolve())
    lines.append(f"exec {q(str(home / 'slurm' / 'ray_job.sh'))} {' '.join(q(a) for a in [spec_file, *overrides])}")
    return "\n".join(lines) + "\n"


def submit(spec: JobSpec, script: str) -> str:
    """Write the script beside the job's outputs and sbatch it; returns sbatch's answer."""
    if shutil.which("sbatch") is None:
        raise UserError("sbatch: not found on PATH (run on a SLURM login node, or print the script without --submit)")
    folder = layout.job_dir(spec) / "sbatch"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}.sh"
    path.write_text(script)
    result = subprocess.run(["sbatch", str(path)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise UserError(f"sbatch refused {path}: {result.stderr.strip()}")
    return f"{result.stdout.strip()} (script: {path})"
