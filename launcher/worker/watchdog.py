"""A rank that stops making progress ends itself, saying where, instead of hanging for hours.

The loop calls `beat` after every step, eval batch and checkpoint. A daemon thread checks the
time since the last beat; past `timeout_s` it prints one line naming the rank, the stage and the
last step (also into `note`, a file the driver reads when the stage fails: a worker's last words
may not reach the driver's console), dumps every thread's stack, and ends the process with `EXIT_HUNG`.
Under Ray the worker group then fails and is restarted from the last committed checkpoint while
`cluster.max_failures` allows; the other ranks' collectives fail by `cluster.collective_timeout_s`.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

from launcher import atomic

EXIT_HUNG = 70  # EX_SOFTWARE


class StepWatchdog:
    def __init__(self, timeout_s: float, rank: int, stage: str, note: Path | None = None) -> None:
        self.timeout_s, self.rank, self.stage, self.note = timeout_s, rank, stage, note
        self.step = 0
        self.last = time.monotonic()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="launcher-step-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int) -> None:
        self.step, self.last = step, time.monotonic()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stopped.wait(min(self.timeout_s / 10, 5.0)):
            idle = time.monotonic() - self.last
            if idle > self.timeout_s:
                message = (
                    f"stage {self.stage}: rank {self.rank} made no progress for {idle:.0f} s after step "
                    f"{self.step} (cluster.step_timeout_s={self.timeout_s:g}); it was ended"
                )
                if self.note is not None:
                    with contextlib.suppress(OSError):
                        atomic.write_json(self.note, {"rank": self.rank, "step": self.step, "message": message})
                print(f"error: {message}. Its threads:", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(EXIT_HUNG)


def watchdog_note(stage_dir: Path) -> Path:
    """Where a watchdog leaves the reason it ended its rank (removed when the stage starts)."""
    return stage_dir / "watchdog.json"
