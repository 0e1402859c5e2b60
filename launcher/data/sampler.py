"""Which samples each rank sees at each step: a pure function of (seed, step, rank).

Every epoch is a fresh seeded permutation of the dataset; step `s` takes the next global batch of
it and rank `r` takes its contiguous share, split into micro-batches. The last step of an epoch
wraps around to fill its batch, so the union over ranks covers every sample of the epoch. Resume
needs only the step number: no batch is replayed and none is skipped.
"""

from __future__ import annotations

import numpy as np

from launcher.spec.plan import steps_per_epoch


class StepSampler:
    def __init__(self, num_samples: int, micro: int, accum: int, world: int, rank: int, seed: int) -> None:
        assert num_samples > 0, "empty dataset"
        self.num_samples = num_samples
        self.micro, self.accum, self.world, self.rank, self.seed = micro, accum, world, rank, seed
        self.global_batch = micro * accum * world
        self.steps_per_epoch = steps_per_epoch(num_samples, self.global_batch)
        self._epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            reps = -(-self.steps_per_epoch * self.global_batch // self.num_samples)
            self._order, self._epoch = np.tile(perm, reps), epoch
        return self._order

    def micro_batches(self, step: int) -> list[list[int]]:
        """The `accum` micro-batches (sample indices) of this rank at `step` (0-based)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        start = position * self.global_batch + self.rank * self.micro * self.accum
        mine = order[start : start + self.micro * self.accum]
        return [mine[m * self.micro : (m + 1) * self.micro].tolist() for m in range(self.accum)]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch
