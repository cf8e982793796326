"""`python -m anchor_clip.fit`: the LightningCLI entry point for every finetune (FLYP, ARF, pretraining).

Trainer flags (devices, strategy=ddp, precision=bf16-mixed, max_steps, ...) are Lightning's own.
The backbone is named once, under `model.`; the CLI links it to `data.` so the loaders tokenize and
transform for the same model.
"""

from __future__ import annotations

import os

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from anchor_clip.data import AnchorDataModule
from anchor_clip.module import AnchorFinetuneModule


class AnchorCLI(LightningCLI):
    """LightningCLI with the backbone linked from the model to the data, and CSV logs by default."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.backbone", "data.backbone")
        parser.link_arguments("model.backbone_config", "data.backbone_config")
        parser.link_arguments("model.pretrained", "data.pretrained")

    def instantiate_trainer(self, **kwargs) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        if config.get("logger") in (None, True):
            # metrics.csv beside the checkpoints: what notebooks and results tables read
            kwargs["logger"] = CSVLogger(config.get("default_root_dir") or os.getcwd(), name="logs")
        return super().instantiate_trainer(**kwargs)


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
    cli_main()
