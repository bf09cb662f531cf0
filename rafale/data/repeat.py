"""A training sampler that deals each batch several times in a row: offline PPO's epochs over a batch."""

from __future__ import annotations

from typing import Iterator

from torch.utils.data import DistributedSampler


class RepeatedBatches(DistributedSampler):
    """A DistributedSampler (so that Composer still reshuffles it every epoch) whose indices come a batch at a time,
    each batch `repeats` times in a row. A last batch short of `batch_size` is left out: repeated, it would merge
    with its own copy into one batch."""

    def __init__(self, dataset, batch_size: int, repeats: int, **kwargs):
        super().__init__(dataset, **kwargs)
        self.batch_size, self.repeats = batch_size, repeats

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        for start in range(0, len(indices) - self.batch_size + 1, self.batch_size):
            for _ in range(self.repeats):
                yield from indices[start:start + self.batch_size]

    def __len__(self) -> int:
        return super().__len__() // self.batch_size * self.batch_size * self.repeats
