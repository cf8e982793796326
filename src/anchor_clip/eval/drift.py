"""Feature drift: how far finetuning moved a model's features away from the pretrained ones.

ARF's premise is that anchors keep the finetuned feature space close to the pretrained one where the
finetune data says nothing (other styles, unseen classes). These measures make that visible per set.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import lightning as L
import torch
from torch import Tensor


class FeatureRecorder(L.Callback):
    """Keeps the image features every validation batch produced, per evaluation set, in loader order.

    The module's validation step returns them, so a drift measure reuses the evaluation's forward passes
    instead of encoding every set again. Holds this process's batches only (one process: every image).
    """

    def __init__(self) -> None:
        self.batches: dict[str, list[Tensor]] = defaultdict(list)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if outputs is not None:
            self.batches[pl_module.eval_specs[dataloader_idx].name].append(outputs["features"].detach().float().cpu())

    def features(self) -> dict[str, Tensor]:
        """(N, D) features per set name."""
        return {name: torch.cat(parts) for name, parts in self.batches.items()}


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear centered kernel alignment of two (N, D) feature matrices (Kornblith et al., 2019).

    1 when one is an orthogonal transform (and scaling) of the other, near 0 for unrelated features.
    """
    x, y = x - x.mean(0), y - y.mean(0)
    cross = (y.T @ x).norm() ** 2  # ||Y^T X||_F^2
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()))


def feature_drift(reference: Tensor, other: Tensor) -> dict[str, float]:
    """Drift between the features two models give the same N images.

    Args:
        reference: (N, D) normalized features of the pretrained model.
        other: (N, D) normalized features of the finetuned model.

    Returns:
        `cosine`: mean cosine between each image's two features (1 = unmoved; comparable only because both
        models share the pretrained parameterization); `cka`: linear CKA of the two feature sets.
    """
    if reference.shape != other.shape:
        raise ValueError(f"features must describe the same images: {tuple(reference.shape)} vs {tuple(other.shape)}")
    return {"cosine": float((reference * other).sum(-1).mean()), "cka": linear_cka(reference, other)}
