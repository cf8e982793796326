"""Lightning callbacks that keep a long run honest: bad-data accounting.

`AnchorFinetuneModule.configure_callbacks` adds `BadDataMonitor` to every trainer that runs the module.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch

from anchor_clip.data.datamodule import DataSource
from anchor_clip.data.unreadable import SKIPPED, UnreadableImageWarning

DEFAULT_MAX_BAD_FRACTION = 0.01


class BadDataMonitor(L.Callback):
    """Counts the images each stream skipped, logs `data/skipped_<stream>`, and stops a run with too many.

    The loaders record the files they could not read under the batch key `skipped` (see `data.unreadable`);
    workers cannot update counters in the main process, so the records travel with the batch and this
    callback takes them out before the step. It sums the counts over processes at every batch, so every
    rank sees the same totals and raises at the same step: no rank is left waiting in a collective for one
    that stopped.

    A stream stops the run when its skipped count exceeds `max_bad_fraction × max(size, images attempted)`.
    During its first pass every skip is a distinct file, so this is exactly "more than that share of the
    stream is bad"; after it, the count over the attempts is a running estimate of the same share.
    Training counts run for the whole fit (and survive a resume); evaluation counts restart with each
    evaluation run. The first skipped files of each stream are named in one warning per process.
    """

    def __init__(self) -> None:
        self.train_counts: dict[str, list[int]] = {}  # stream -> [skipped, attempted], summed over processes
        self.eval_counts: dict[str, list[int]] = {}
        self.warned: set[str] = set()

    # -- hooks ---------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        parts = {name: part for name, part in batch.items() if isinstance(part, dict) and SKIPPED in part}
        totals = self._update(trainer, pl_module, parts, self.train_counts)
        for name, (skipped, _) in totals.items():
            pl_module.log(f"data/skipped_{name}", float(skipped), on_step=True, on_epoch=False, batch_size=1)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.eval_counts = {}

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.eval_counts = {}

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch(trainer, pl_module, batch, dataloader_idx)

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                            batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch(trainer, pl_module, batch, dataloader_idx)

    def state_dict(self) -> dict[str, Any]:
        return {"train_counts": self.train_counts}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_counts = {k: list(v) for k, v in state_dict.get("train_counts", {}).items()}

    # -- accounting ----------------------------------------------------------------------------------------
    def _eval_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, dataloader_idx: int) -> None:
        if not isinstance(batch, dict) or SKIPPED not in batch:
            return
        specs = getattr(pl_module, "eval_specs", [])
        name = specs[dataloader_idx].name if dataloader_idx < len(specs) else f"eval_{dataloader_idx}"
        before = self.eval_counts.get(name, [0, 0])[0]
        totals = self._update(trainer, pl_module, {name: batch}, self.eval_counts)
        # per-batch global counts, summed over the evaluation run by the logger
        pl_module.log(f"data/skipped_{name}", float(totals[name][0] - before), on_step=False, on_epoch=True,
                      reduce_fx="sum", add_dataloader_idx=False, batch_size=1)

    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, parts: dict[str, dict],
                counts: dict[str, list[int]]) -> dict[str, list[int]]:
        """Take the skip records out of `parts`, add the totals over processes to `counts`, check the limit."""
        if not parts:
            return {}
        local = {}
        for name, part in parts.items():
            skipped = part.pop(SKIPPED)
            kept = len(part["images"]) if "images" in part else 0
            local[name] = (skipped, kept + len(skipped))
            if skipped and name not in self.warned:
                self.warned.add(name)
                warnings.warn(f"{self._source(trainer, name).what}: skipping unreadable images, first: "
                              f"{skipped[:5]}", UnreadableImageWarning, stacklevel=2)
        # (streams, 2) on every process, in the same stream order, summed over processes
        numbers = torch.tensor([[len(s), n] for s, n in local.values()], dtype=torch.long, device=pl_module.device)
        numbers = trainer.strategy.reduce(numbers, reduce_op="sum").tolist()
        limit = getattr(trainer.datamodule, "max_bad_fraction", DEFAULT_MAX_BAD_FRACTION)
        for (name, (skipped, _)), (n_skipped, n_attempted) in zip(local.items(), numbers, strict=True):
            total = counts.setdefault(name, [0, 0])
            total[0] += int(n_skipped)
            total[1] += int(n_attempted)
            source = self._source(trainer, name)
            if total[0] > limit * max(source.size, total[1]):
                named = f"first here: {skipped[:5]}" if skipped else "read by other processes (see their warnings)"
                raise ValueError(
                    f"{source.what}: {total[0]} of {total[1]} images read so far were unreadable (the set has "
                    f"{source.size}, listed in {source.table}), more than data.max_bad_fraction={limit}; {named}. "
                    "Repair or drop those files, or raise data.max_bad_fraction."
                )
        return {name: counts[name] for name in local}

    @staticmethod
    def _source(trainer: L.Trainer, name: str) -> DataSource:
        sources = getattr(trainer.datamodule, "sources", {})
        return sources.get(name) or DataSource(name, "its manifest", 0)
