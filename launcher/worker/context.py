"""Who this rank is and how it reports: one process (debug mode) or a Ray Train worker.

The training loop only sees a `RankContext`; it never asks which backend runs it.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class RankContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def restore_dir(self, checkpoints: Path) -> Path | None:
        """A DeepSpeed checkpoint folder (with a `latest` tag file) to resume from, if any."""
        return checkpoints if (checkpoints / "latest").is_file() else None

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        """Tell the coordinator about progress; a single process has nobody to tell."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_context(use_gpu: bool | None = None) -> RankContext:
    """World size 1 in this process: the variables DeepSpeed expects from a launcher, on loopback."""
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )  # fmt: skip
    cuda = torch.cuda.is_available() if use_gpu is None else use_gpu
    return RankContext(rank=0, world_size=1, local_rank=0, device=torch.device("cuda:0" if cuda else "cpu"))
