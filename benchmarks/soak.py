"""Soak: N consecutive tiny runs on a private Ray, each checked for what it left behind.

Run as: .venv/bin/python benchmarks/soak.py [RUNS]   (default 10; about 30 s a run on 2 cores)

Each run is `launcher run jobs/debug/tiny.yaml --stage pretrain` with 2 Ray workers and no
RAY_ADDRESS (a private Ray the command starts and stops). After each it lists the processes the
command started (its process tree, sampled while it ran) that are still alive 5 s later, new
/dev/shm files, new folders in the temp dir, and new listening TCP sockets; any of them fails the
soak (exit 1). Ends nothing it did not start.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def _listening() -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN}


def main(runs: int) -> int:
    out = Path(tempfile.mkdtemp(prefix="soak-"))
    temp = Path(tempfile.mkdtemp(prefix="s", dir="/tmp"))  # the runs' TMPDIR: short, Ray's sockets go below
    env = {**os.environ, "RAY_ADDRESS": "", "TMPDIR": str(temp), "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    failures = 0
    print("run | exit | wall s | processes left | /dev/shm files left | temp entries left | new listeners")
    try:
        for run in range(1, runs + 1):
            before_shm, before_listen = set(os.listdir("/dev/shm")), _listening()
            started = time.monotonic()
            command = [sys.executable, "-m", "launcher", "run", "jobs/debug/tiny.yaml", "--stage", "pretrain",
                       "cluster.num_workers=2", "stages.0.max_steps=4", f"output_dir={out / str(run)}"]  # fmt: skip
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True)  # fmt: skip
            tree: dict[int, psutil.Process] = {}  # every process the command started, seen while it ran
            while proc.poll() is None:
                with contextlib.suppress(psutil.Error):
                    tree.update({c.pid: c for c in psutil.Process(proc.pid).children(recursive=True)})
                time.sleep(0.2)
            stderr = proc.stderr.read() if proc.stderr else ""
            wall = time.monotonic() - started
            _, alive = psutil.wait_procs(list(tree.values()), timeout=5)  # Ray's shutdown lets go asynchronously
            names = sorted({p.name() for p in alive if p.is_running()})
            shm = sorted(set(os.listdir("/dev/shm")) - before_shm)
            entries = sorted(os.listdir(temp))
            listeners = sorted(_listening() - before_listen)
            bad = proc.returncode != 0 or names or shm or entries or listeners
            failures += bool(bad)
            print(f"{run} | {proc.returncode} | {wall:.1f} | {names or 0} | {shm or 0} | {entries or 0} | "
                  f"{listeners or 0}", flush=True)  # fmt: skip
            if proc.returncode != 0:
                print(stderr[-2000:], file=sys.stderr)
    finally:
        subprocess.run(["rm", "-rf", str(out), str(temp)], check=False)
    print(f"{runs - failures}/{runs} runs clean")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10))
