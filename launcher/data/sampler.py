"""Which samples each rank sees at each step: a pure function of (seed, step, rank).

Every epoch visits the dataset in a fresh seeded order; step `s` takes the next global batch of
it and rank `r` takes its contiguous share, split into micro-batches. The last step of an epoch
wraps around to fill its batch, so the union over ranks covers every sample of the epoch. Resume
needs only the step number: no batch is replayed and none is skipped.

The order is never materialised: position p of epoch e maps to sample `IndexPermutation(n, (seed,
e))(p)`, a seeded bijection on [0, n). Memory is O(1) whatever the number of samples, and the
batch of any step costs the same to compute (resume at step k is O(1), not O(k) or O(n)).

With `lengths` (documents of different lengths, padded per batch), batches are grouped by length
(HF's `group_by_length`, as `LengthGroupedSampler` does it): each run of `GROUP_BATCHES` global
batches of the epoch's order is sorted by length, cut into global batches again, and those are
visited in a seeded shuffled order. An epoch still covers the same samples, a global batch is still
one set whatever the worker count, and padding nearly vanishes (the run of batches costs
O(GROUP_BATCHES x global batch) to compute, once per run).
"""

from __future__ import annotations

import numpy as np

from launcher.jobspec.plan import steps_per_epoch

_ROUNDS = 6
GROUP_BATCHES = 50  # global batches sorted together by length (HF's LengthGroupedSampler: 50 batches)
_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


class IndexPermutation:
    """A keyed pseudo-random bijection on [0, n): a balanced Feistel network on the smallest
    power-of-four domain that holds n, cycle-walked back into range (at most ~4 passes expected)."""

    def __init__(self, n: int, key: tuple[int, ...]) -> None:
        assert n > 0, "empty domain"
        bits = max(2, (n - 1).bit_length())
        self.n, self.half = n, np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        self.keys = np.random.default_rng(list(key)).integers(0, 2**63, size=_ROUNDS, dtype=np.uint64)

    def _round(self, right: np.ndarray, key: np.uint64) -> np.ndarray:
        z = (right ^ key) * _MIX[0]
        z = (z ^ (z >> np.uint64(30))) * _MIX[1]
        z = (z ^ (z >> np.uint64(27))) * _MIX[2]
        return (z ^ (z >> np.uint64(31))) & self.mask

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._round(right, key)
        return (left << self.half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            out = self._feistel(np.asarray(positions, dtype=np.uint64))
            outside = out >= self.n
            while outside.any():
                out[outside] = self._feistel(out[outside])
                outside = out >= self.n
        return out.astype(np.int64)


class StepSampler:
    def __init__(
        self, num_samples: int, micro: int, accum: int, world: int, rank: int, seed: int,
        lengths: np.ndarray | None = None,
    ) -> None:  # fmt: skip
        assert num_samples > 0, "empty dataset"
        assert lengths is None or len(lengths) == num_samples, "one length per sample"
        self.num_samples = num_samples
        self.micro, self.accum, self.world, self.rank, self.seed = micro, accum, world, rank, seed
        self.global_batch = micro * accum * world
        self.steps_per_epoch = steps_per_epoch(num_samples, self.global_batch)
        self.lengths = lengths
        self._epoch, self._order = -1, IndexPermutation(num_samples, (seed, 0))
        self._group: tuple[int, int] | None = None
        self._group_batches = np.zeros((0, self.global_batch), dtype=np.int64)

    def _epoch_order(self, epoch: int) -> IndexPermutation:
        if epoch != self._epoch:
            self._order, self._epoch = IndexPermutation(self.num_samples, (self.seed, epoch)), epoch
        return self._order

    def _global_batch(self, epoch: int, position: int) -> np.ndarray:
        """The samples of global batch `position` of `epoch`, in rank order."""
        size = self.global_batch
        if self.lengths is None:
            positions = np.arange(position * size, (position + 1) * size) % self.num_samples  # the last step wraps
            return self._epoch_order(epoch)(positions)
        group, offset = divmod(position, GROUP_BATCHES)
        if self._group != (epoch, group):
            first = group * GROUP_BATCHES
            count = min(GROUP_BATCHES, self.steps_per_epoch - first)
            samples = self._epoch_order(epoch)(np.arange(first * size, (first + count) * size) % self.num_samples)
            by_length = samples[np.lexsort((samples, self.lengths[samples]))].reshape(count, size)
            visit = np.random.default_rng([self.seed, epoch, group]).permutation(count)
            self._group, self._group_batches = (epoch, group), by_length[visit]
        return self._group_batches[offset]

    def micro_batches(self, step: int) -> list[list[int]]:
        """The `accum` micro-batches (sample indices) of this rank at `step` (0-based)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        share = self.micro * self.accum
        mine = self._global_batch(epoch, position)[self.rank * share : (self.rank + 1) * share]
        return [mine[m * self.micro : (m + 1) * self.micro].tolist() for m in range(self.accum)]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch
