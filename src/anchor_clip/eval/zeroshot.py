"""Zero-shot evaluation through `Trainer.validate`: the one path every evaluation of a module takes.

The module's own validation step scores each set with zero-shot heads built from its *current* text tower
(FLYP). `evaluate_zero_shot` runs that step outside a fit: on an `AnchorDataModule`'s evaluation sets (the
demo) or on `EvalDataset`s wrapped in `EvalSets` (`python -m anchor_clip.evaluate`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from anchor_clip.backbones.base import ImageTransform
from anchor_clip.eval.datasets import EvalDataset
from anchor_clip.specs import EvalSpec


class EvalSets(L.LightningDataModule):
    """Evaluation datasets as a data module: their specs for the module's heads, one validation loader each.

    Args:
        datasets: the sets, listed without a transform or with another model's.
        transform: the evaluated model's eval transform, applied to every set.
        batch_size: images per forward pass.
        num_workers: image-decoding workers per loader.
        pin_memory: pin batches for a faster host-to-GPU copy.
    """

    def __init__(self, datasets: Sequence[EvalDataset], transform: ImageTransform, batch_size: int = 256,
                 num_workers: int = 4, pin_memory: bool = False) -> None:
        super().__init__()
        names = [d.name for d in datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluation set names must be unique, got {names}")
        self.datasets = [d.with_transform(transform) for d in datasets]
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory

    @property
    def eval_specs(self) -> list[EvalSpec]:
        """Head class names, templates and projection of each set, in `dataloader_idx` order."""
        return [d.spec for d in self.datasets]

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(d, batch_size=self.batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory)
                for d in self.datasets]


class _CorrectCounts(L.Callback):
    """Exact per-set counts of correct predictions and scored images, from the predictions the step returns."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: {"correct": 0, "n": 0})

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if outputs is None:  # every image of the batch was unreadable
            return
        counts = self.counts[pl_module.eval_specs[dataloader_idx].name]
        counts["correct"] += int((outputs["predictions"].cpu() == batch["labels"].cpu()).sum())
        counts["n"] += len(outputs["predictions"])


def evaluate_zero_shot(module: L.LightningModule, data: L.LightningDataModule,
                       callbacks: Sequence[L.Callback] = (), **trainer_options: Any) -> dict[str, dict[str, float]]:
    """Top-1 zero-shot accuracy of `module` on every evaluation set of `data`, by `Trainer.validate`.

    Args:
        module: an `AnchorFinetuneModule` (or subclass); its validation step does the scoring.
        data: a data module with `eval_specs` and one validation loader per set.
        callbacks: more callbacks for the validation run (e.g. a `FeatureRecorder`).
        trainer_options: `Trainer` arguments (`accelerator`, `devices`, `precision`, ...).

    Returns:
        `{set name: {"acc": the logged `val/<set>/acc` (a fraction), "correct": images right, "n": images scored}}`,
        in loader order.
    """
    counter = _CorrectCounts()
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, callbacks=[*callbacks, counter], **trainer_options)
    logged = {k: v for r in trainer.validate(module, data, verbose=False) for k, v in r.items()}
    return {
        name.split("/")[1]: {"acc": value, **counter.counts[name.split("/")[1]]}
        for name, value in logged.items() if name.endswith("/acc")
    }
