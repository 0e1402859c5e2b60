"""A Ray head for tests: loopback only, free ports, its own temp dir, token auth with a private token.

Started as `ray start --head --block` in a new session and ended by its PID (then its process
group), never with `ray stop`, which would kill every Ray on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from launcher.worker.context import free_port


@dataclass
class RayHead:
    address: str  # GCS, for RAY_ADDRESS / ray.init
    dashboard: str  # Jobs API, for `ray job submit --address`
    env: dict[str, str]  # what a client needs: auth mode and token file
    log: Path
    pid: int  # `ray start --block`; Ray's processes on this node descend from it


def _distinct_free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


@contextmanager
def ray_head(workdir: Path, num_cpus: int = 2) -> Iterator[RayHead]:
    token = workdir / "ray_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
        "RAY_ADDRESS": "",
    }
    gcs, dashboard, client, agent_http, agent_grpc, env_agent, metrics = _distinct_free_ports(7)
    temp_dir = Path(tempfile.mkdtemp(prefix="rayt", dir="/tmp"))  # short: Ray's socket paths are length-limited
    log = workdir / "ray_head.log"
    command = [
        str(Path(bin_dir) / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={gcs}", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
        f"--metrics-export-port={metrics}",
    ]  # fmt: skip
    with log.open("w") as out:
        # TMPDIR: what its processes leave behind (the dashboard's forkserver socket) goes with temp_dir.
        proc = subprocess.Popen(command, env={**env, "TMPDIR": str(temp_dir)}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                request = urllib.request.Request(
                    f"{url}/api/version", headers={"Authorization": f"Bearer {token.read_text()}"}
                )
                with urllib.request.urlopen(request, timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"Ray head not up after 120 s:\n{log.read_text()[-3000:]}"
                time.sleep(0.5)
        yield RayHead(address=f"127.0.0.1:{gcs}", dashboard=url, env=env, log=log, pid=proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever of its session is left (ours alone: it was started in a new session)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
