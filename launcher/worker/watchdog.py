"""A rank that stops making progress ends itself, saying where, instead of hanging for hours.

The loop calls `beat` after every step, eval batch and checkpoint. A daemon thread checks the
time since the last beat; past `timeout_s` it prints one line naming the rank, the stage and the
last step (also into a note the driver reads when the stage fails: a worker's last words may not
reach the driver's console), dumps every thread's stack, and ends the process with `EXIT_HUNG`.
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
    """Watches the thread that creates it (the training thread: under Ray it is not the main one).

    A rank whose training thread is inside a collective (a frame in torch.distributed or DeepSpeed's
    comm) is held up by another rank; it gives the rank that holds everyone up a head start (half the
    timeout again), so that the culprit is the one named.
    """

    def __init__(self, timeout_s: float, rank: int, stage: str, notes: Path | None = None) -> None:
        self.timeout_s, self.rank, self.stage, self.notes = timeout_s, rank, stage, notes
        self.step = 0
        self.last = time.monotonic()
        self._watched = threading.get_ident()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="launcher-step-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int) -> None:
        self.step, self.last = step, time.monotonic()

    def in_collective(self) -> bool:
        frame = sys._current_frames().get(self._watched)  # the training thread's current stack
        while frame is not None:
            name = frame.f_code.co_filename
            if name.endswith("distributed_c10d.py") or f"{os.sep}deepspeed{os.sep}comm{os.sep}" in name:
                return True
            frame = frame.f_back
        return False

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stopped.wait(min(self.timeout_s / 10, 5.0)):
            idle = time.monotonic() - self.last
            waiting = self.in_collective()
            if idle > self.timeout_s * (1.5 if waiting else 1.0):
                where = "waiting for the other ranks in a collective" if waiting else f"inside step {self.step + 1}"
                message = (
                    f"stage {self.stage}: rank {self.rank} made no progress for {idle:.0f} s after step "
                    f"{self.step}, {where} (cluster.step_timeout_s={self.timeout_s:g}); it was ended"
                )
                if self.notes is not None:
                    with contextlib.suppress(OSError):
                        self.notes.mkdir(parents=True, exist_ok=True)
                        note = {"rank": self.rank, "step": self.step, "waiting": waiting, "message": message}
                        atomic.write_json(self.notes / f"rank{self.rank}.json", note)
                print(f"error: {message}. Its threads:", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(EXIT_HUNG)


def watchdog_notes(stage_dir: Path) -> Path:
    """The folder where watchdogs leave why they ended their rank (emptied when the stage starts)."""
    return stage_dir / "watchdog"


def hang_report(notes: Path) -> str | None:
    """One line for the driver: the ranks that held the others up (or, failing that, every rank noted)."""
    found = [n for n in (atomic.read_json(p) for p in sorted(notes.glob("rank*.json"))) if isinstance(n, dict)]
    culprits = [n for n in found if not n["waiting"]] or found
    if not culprits:
        return None
    line = "; ".join(n["message"] for n in culprits)
    waited = [str(n["rank"]) for n in found if n["waiting"] and n not in culprits]
    return line + (f" (rank {', '.join(waited)} waited for it)" if waited else "")
