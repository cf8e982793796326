"""The order in which a training stream is read: seeded, sharded over processes, and resumable mid-epoch."""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Dataset, DistributedSampler


class StreamSampler(DistributedSampler):
    """Yields `(index, item_seed)` keys of one stream for one process, epoch after epoch.

    An epoch is `num_batches` global batches of `batch_size × num_replicas` items. They are cut from a
    sequence of *passes*, each a permutation of the stream drawn from (seed, stream, epoch, pass) and
    trimmed to whole global batches: a stream shorter than the epoch cycles through fresh permutations
    (what `CombinedLoader`'s `max_size_cycle` did with a plain loader) and no global batch holds an item
    twice. Process r reads the r-th `batch_size` slice of each global batch, so the data of a step depends
    only on the global batch size, not on how many processes share it.

    Each index comes with a seed for the item's own randomness (augmentation, prompt template; see
    `GuardedItems`), drawn from the same generator: a step's data is a function of (seed, epoch, step).
    That is what makes a resumed run replay the uninterrupted one: `start_batch` skips the batches of
    epoch `start_epoch` that were consumed before the checkpoint. `__len__` still counts the whole epoch,
    because Lightning counts the consumed batches itself when it resumes.

    It subclasses `DistributedSampler` only for Lightning's sake: a `DistributedSampler` is neither wrapped
    nor replaced under DDP, and its `set_epoch` is called at every epoch start.

    Args:
        dataset: the stream (only its length is used).
        batch_size: items per step and process.
        num_batches: steps per epoch (the longest stream's passes set it; see `AnchorDataModule`).
        seed: base seed (Lightning's global seed).
        stream: the stream's name, mixed into the seed so streams of equal length get different orders.
        num_replicas: number of processes.
        rank: this process.
        start_epoch: the epoch a resumed run continues.
        start_batch: steps of `start_epoch` consumed before the checkpoint.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_batches: int, seed: int = 0, stream: str = "",
                 num_replicas: int = 1, rank: int = 0, start_epoch: int = 0, start_batch: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size, self.num_batches = batch_size, num_batches
        self.global_batch = batch_size * num_replicas
        self.batches_per_pass = len(dataset) // self.global_batch
        if self.batches_per_pass < 1:
            raise ValueError(f"stream {stream!r} has {len(dataset)} items, fewer than one global batch of "
                             f"{batch_size} × {num_replicas} processes; lower the batch size")
        self.stream_key = zlib.crc32(stream.encode())
        self.start_epoch, self.start_batch = start_epoch, start_batch
        self.set_epoch(start_epoch)

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def _pass(self, epoch: int, number: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, item seeds) of one pass: both (batches_per_pass × global_batch,)."""
        rng = np.random.default_rng([self.seed, self.stream_key, epoch, number])
        order = rng.permutation(len(self.dataset))[: self.batches_per_pass * self.global_batch]
        return order, rng.integers(0, 2**63 - 1, size=len(order))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch  # fixed for this iterator: a `set_epoch` call while it runs concerns the next one
        first = self.start_batch if epoch == self.start_epoch else 0
        current, order, seeds = -1, None, None
        for step in range(first, self.num_batches):
            number, offset = divmod(step, self.batches_per_pass)
            if number != current:
                current, (order, seeds) = number, self._pass(epoch, number)
            start = offset * self.global_batch + self.rank * self.batch_size
            for i in range(start, start + self.batch_size):
                yield int(order[i]), int(seeds[i])
