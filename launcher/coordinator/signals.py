"""SIGTERM and SIGINT during `launcher run`: checkpoint and stop, then clean up; twice: stop at once.

The first signal asks the running stage to stop, the way the stop file does: the driver writes the
stage's `STOP` file, rank 0 sees it at the next step, every rank checkpoints, and the command exits
75 after shutting Ray down and removing its private folder; the same command resumes. A second
signal (at least `REPEAT_S` later) raises `KeyboardInterrupt` in the driver (Ray's blocking calls
let it through promptly), which unwinds through the same cleanup and exits 128 + the signal number.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_S = 2.0  # a second signal sooner than this is the first one delivered again, not a second request


class Interrupted(Exception):
    """A second signal: the run stopped at once, without a checkpoint of the current step."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped at once by {signal.Signals(signum).name}; re-run to resume from the last checkpoint")
        self.exit_code = 128 + signum


class StopOnSignal:
    """Installed for the stages' run (main thread only); `watch` names the stop file of the running stage."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.first = 0.0
        self.stop_file: Path | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def watch(self, stop_file: Path | None) -> None:
        self.stop_file = stop_file
        if self.signum is not None and stop_file is not None:
            stop_file.touch()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signum is not None:
            if now - self.first < REPEAT_S:
                return  # the same request delivered twice (under SLURM: by slurmd and by srun)
            self.signum = signum
            raise KeyboardInterrupt
        self.signum, self.first = signum, now
        name = signal.Signals(signum).name
        print(f"{name}: stopping after a checkpoint; send it again to stop at once", file=sys.stderr, flush=True)
        if self.stop_file is not None:
            self.stop_file.touch()
