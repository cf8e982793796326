"""`python -m anchor_clip.fit`: the LightningCLI entry point for every finetune (FLYP, ARF, pretraining).

Trainer flags (devices, strategy=ddp, precision=bf16-mixed, max_steps, ...) are Lightning's own.
The backbone is named once, under `model.`; the CLI links it to `data.` so the loaders tokenize and
transform for the same model.

Runs are resumable: `--ckpt_path last` continues a killed run from its last checkpoint with the same
data order and schedule (see docs/reliability.md), and checkpoints are written atomically.
"""

from __future__ import annotations

import os
import sys

from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from anchor_clip.checkpoint_io import AtomicCheckpointIO
from anchor_clip.data import AnchorDataModule
from anchor_clip.module import AnchorFinetuneModule


class AnchorCLI(LightningCLI):
    """LightningCLI with the backbone linked from the model to the data, CSV logs and atomic checkpoints by default."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.backbone", "data.backbone")
        parser.link_arguments("model.backbone_config", "data.backbone_config")
        parser.link_arguments("model.pretrained", "data.pretrained")

    def instantiate_trainer(self, **kwargs) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        if config.get("logger") in (None, True):
            # metrics.csv beside the checkpoints: what notebooks and results tables read
            kwargs["logger"] = CSVLogger(config.get("default_root_dir") or os.getcwd(), name="logs")
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                # One folder per run root, not per logger version: `--ckpt_path last` must find a killed run's files.
                callback.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        return trainer


def cli_main(args: list[str] | None = None, run: bool = True) -> AnchorCLI:
    """Run the CLI; `args` lets notebooks and tests call it without a shell."""
    return AnchorCLI(
        AnchorFinetuneModule,
        AnchorDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "callbacks": [ModelCheckpoint(save_last=True), LearningRateMonitor(logging_interval="step")],
        },
    )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        cli_main()
    else:  # the embedded default: ARF on the miniature world, prepared (and cached) first
        from anchor_clip.demo import fit_args

        cli_main(fit_args())
