"""Who this rank is and how it reports: one process (debug mode) or a Ray Train worker.

The training loop only sees a `RankContext`; it never asks which backend runs it.
"""

from __future__ import annotations

import os
import shutil
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

    @property
    def shared_checkpoint_root(self) -> bool:
        """Every rank writes into the same folder (`checkpoint_root`), so rank 0 alone hashes it."""
        return True

    def restore_dir(self, checkpoints: Path) -> Path | None:
        """The checkpoint folder (`checkpoints/step_N`) to resume from, if any: the newest that verifies.

        The same rule on every backend: under Ray the storage is this folder too, and a checkpoint
        that Ray registered but rank 0 never committed is not one. With several ranks, rank 0
        verifies and chooses (the process group exists: Ray Train or torchrun made it).
        """
        from launcher.checkpoint_manifest import latest_checkpoint

        if self.world_size == 1 or not torch.distributed.is_initialized():
            return latest_checkpoint(checkpoints)
        # Rank 0 reads and hashes the candidates once, and every rank loads the one it chose.
        chosen = [latest_checkpoint(checkpoints) if self.is_main else None]
        torch.distributed.broadcast_object_list(chosen, src=0)
        return chosen[0]

    def checkpoint_root(self, checkpoints: Path) -> Path:
        """Where this rank writes the next checkpoint (here: the stage's persistent folder)."""
        return checkpoints

    def report(self, metrics: dict[str, float], checkpoint: Path) -> None:
        """Hand this rank's checkpoint files to the coordinator (written in place: nothing to do)."""


class RayRankContext(RankContext):
    """A Ray Train worker: checkpoints go through `ray.train.report` into the run's storage."""

    @property
    def shared_checkpoint_root(self) -> bool:
        return False

    def checkpoint_root(self, checkpoints: Path) -> Path:
        import tempfile

        return Path(tempfile.mkdtemp(prefix="launcher-ckpt-"))

    def report(self, metrics: dict[str, float], checkpoint: Path) -> None:
        import ray.train

        # Every rank reports its shard folder; Ray merges them into `checkpoints/step_N/` in storage.
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint)),
            checkpoint_dir_name=checkpoint.name,
            delete_local_checkpoint_after_upload=True,
        )
        shutil.rmtree(checkpoint.parent, ignore_errors=True)  # the temporary root from `checkpoint_root`


def ray_context(use_gpu: bool) -> RayRankContext:
    """Rank layout from Ray Train; Ray has already initialised torch.distributed and its variables."""
    import ray.train

    info = ray.train.get_context()
    local_rank = info.get_local_rank()
    os.environ.update(
        RANK=str(info.get_world_rank()), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(info.get_world_size())
    )
    device = torch.device("cpu")
    if use_gpu:
        from ray.train.torch import get_device

        device = get_device()  # Ray maps CUDA_VISIBLE_DEVICES and the local rank to this worker's GPU
    return RayRankContext(info.get_world_rank(), info.get_world_size(), local_rank, device)


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
