"""Data streams of ARF: finetune (+caption anchors), retrieved anchors, evaluation sets."""

from anchor_clip.data.datamodule import AnchorDataModule
from anchor_clip.specs import EvalSet, EvalSpec

__all__ = ["AnchorDataModule", "EvalSet", "EvalSpec"]
