"""Reading streams that hold a few bad image files: seeded items, skipped files, and the checks that bound them.

A web-scale pool always has some missing or undecodable files; one of them must not kill a long run, and
many of them (a wrong image root, a half-copied folder) must stop it early with a clear error. Three pieces:

- `check_files` (in `AnchorDataModule.setup`, every process): missing files beyond `max_bad_fraction` of a
  table are an error before any worker starts; fewer are a warning, and the loaders skip them.
- `GuardedItems` (in the loader workers): reads an item under its own seed and turns an unreadable image into
  a record under the item key `skipped` instead of an exception.
- `BadDataMonitor` (`anchor_clip.callbacks`, main process): counts those records over all processes, logs
  them, and stops the run when a stream's decode failures pass the same fraction.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from anchor_clip.data.images import UnreadableImage

SKIPPED = "skipped"  # item and batch key: the files a loader could not read, as "path (error)" strings


class UnreadableImageWarning(UserWarning):
    """Some images of a stream were skipped; the message names the first few."""


def check_files(paths: Sequence[str], what: str, table: str | Path, max_bad_fraction: float) -> list[str]:
    """Check that the images a table lists exist, before any worker starts.

    Every process reads the same table, so every process takes the same decision: no rank can fail alone.

    Args:
        paths: the resolved image paths of the table.
        what: the config field of the table, named in messages.
        table: the table file, named in messages.
        max_bad_fraction: the largest share of missing files that is skipped rather than an error.

    Returns:
        The missing paths (already warned about).
    """
    missing = [p for p in paths if not os.path.isfile(p)]
    if not missing:
        return missing
    share = len(missing) / len(paths)
    if share > max_bad_fraction:
        raise ValueError(
            f"{what}: {len(missing)} of {len(paths)} images listed in {table} do not exist ({share:.1%}, more than "
            f"data.max_bad_fraction={max_bad_fraction}); first: {missing[:5]}. Relative filepaths resolve against "
            "the table's folder: check the image root, or raise data.max_bad_fraction to train without them."
        )
    warnings.warn(f"{what}: {len(missing)} of {len(paths)} images listed in {table} do not exist and are skipped; "
                  f"first: {missing[:5]}", UnreadableImageWarning, stacklevel=2)
    return missing


class GuardedItems(Dataset):
    """A stream's dataset as its loader reads it: per-item seeds, and unreadable images recorded, not raised.

    Keys are plain indices or `(index, seed)` pairs (what `StreamSampler` yields). With a seed, the item is
    read with torch's RNG seeded by it, so the augmentation and the drawn prompt template are functions of
    (seed, epoch, position) alone: the same whatever the worker count, and the same again in a resumed run.

    An unreadable image is handled in one of two ways, both leaving `"skipped": ["path (error)", ...]` in the
    item for `BadDataMonitor` to count:
    - `substitute=True` (training): the next readable item of the manifest takes its place. Batches then keep
      their size, which the contrastive loss under DDP needs (its gather wants equal local batches), and the
      replacement is deterministic, so a resumed run still replays the same data. Re-drawing a random item
      would need a second seed for the same guarantee, and dropping the item would leave ranks unequal.
    - `substitute=False` (evaluation): the item is dropped (the collate leaves it out), so accuracy is over
      the readable images only and no image counts twice.

    Args:
        dataset: a map-style dataset whose items are dicts and whose image reads raise `UnreadableImage`.
        substitute: replace unreadable items (training) or drop them (evaluation).
        max_tries: how many consecutive unreadable items a substitution may walk past before it is an error.
    """

    def __init__(self, dataset: Dataset, substitute: bool, max_tries: int = 64) -> None:
        self.dataset, self.substitute, self.max_tries = dataset, substitute, max_tries

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        # Only the CPU generator: transforms and template draws use it, and the loader's RNG must stay untouched.
        with torch.random.fork_rng(devices=[]):
            return self._item(key)

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> list[dict]:
        """A batch's items, as `__getitem__` reads each, under one saved RNG state (saving it per item costs
        as much as reading a small decoded image)."""
        with torch.random.fork_rng(devices=[]):
            return [self._item(key) for key in keys]

    def _item(self, key: int | tuple[int, int]) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, None)
        skipped: list[str] = []
        for offset in range(self.max_tries if self.substitute else 1):
            try:
                item = self._read((index + offset) % len(self.dataset), seed)
            except UnreadableImage as err:
                skipped.append(f"{err.path} ({err.reason})")
                continue
            item[SKIPPED] = skipped
            return item
        if not self.substitute:
            return {SKIPPED: skipped}
        raise ValueError(f"{self.max_tries} consecutive images are unreadable from row {index} on (first: "
                         f"{skipped[:3]}); the stream is mostly broken: check the image files")

    def _read(self, index: int, seed: int | None) -> dict:
        if seed is not None:
            torch.random.default_generator.manual_seed(seed)
        return self.dataset[index]
