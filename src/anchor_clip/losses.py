"""Contrastive losses of ARF: one symmetric CLIP loss, applied to each of the three streams.

Stream names (`finetune`, `caption`, `retrieved`) are shared with the batch keys, the YAML weight keys
and the logged terms, so one grep finds a stream everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STREAMS = ("finetune", "caption", "retrieved")

Gather = Callable[[Tensor], Tensor]


def contrastive_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    gather: Gather | None = None,
    rank: int = 0,
) -> Tensor:
    """Symmetric InfoNCE between paired images and texts (CLIP, Radford et al. 2021; ARF uses it for every term).

    Under DDP each process scores its *local* rows against the *gathered* columns of all processes
    ("local loss"), and `gather` must pass gradients back to the shard that produced them (e.g.
    `LightningModule.all_gather(x, sync_grads=True)`). The mean of the per-process losses then equals
    the loss of one process holding the whole batch, and so do the gradients after DDP's averaging.
    Every process must hold the same number of pairs (use `drop_last`).

    Args:
        image_features: (B, D) L2-normalized image features of this process.
        text_features: (B, D) L2-normalized features of the paired texts; row i pairs with image i.
        logit_scale: scalar, already exponentiated.
        gather: maps a local (B, D) tensor to the (W*B, D) concatenation over the W processes, rank order.
        rank: this process's rank, which locates its positives among the gathered columns.

    Returns:
        Scalar loss: mean of the image->text and text->image cross-entropies.

    Duplicate texts in a batch (two images of one class under FLYP) count as negatives of each other,
    as in FLYP; this keeps the finetune loss identical to the pretraining loss.
    """
    if image_features.shape != text_features.shape:
        raise ValueError(f"image/text features must pair row by row, got {tuple(image_features.shape)} "
                         f"and {tuple(text_features.shape)}")
    all_images, all_texts = image_features, text_features
    if gather is not None:
        all_images, all_texts = gather(image_features), gather(text_features)
    logits_per_image = logit_scale * image_features @ all_texts.T  # (B, W*B)
    logits_per_text = logit_scale * text_features @ all_images.T  # (B, W*B)
    batch = image_features.shape[0]
    labels = torch.arange(batch, device=image_features.device) + rank * batch
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class ContrastiveLoss(nn.Module):
    """`contrastive_loss` with its distributed knobs bound at construction (open_clip's ClipLoss shape)."""

    def __init__(self, gather: Gather | None = None, rank: int = 0) -> None:
        super().__init__()
        self.gather, self.rank = gather, rank

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
        return contrastive_loss(image_features, text_features, logit_scale, self.gather, self.rank)


class ARFLoss(nn.Module):
    """ARF objective: L = L_finetune + λ_caption·L_caption + λ_retrieved·L_retrieved (Han et al., 2024).

    Each term is the same contrastive loss over a different set of pairs:
    - finetune: finetune images ↔ class-prompt texts ("a photo of a {class}."), i.e. FLYP;
    - caption: the same images ↔ captions of a pretrained captioner (text-compensated anchors);
    - retrieved: pool images ↔ their own captions, retrieved for the task (image-text anchors).
    With both anchor weights 0 this is exactly FLYP.
    """

    def __init__(self, weights: Mapping[str, float], gather: Gather | None = None, rank: int = 0) -> None:
        super().__init__()
        unknown = set(weights) - set(STREAMS)
        if unknown:
            raise ValueError(f"unknown loss streams {sorted(unknown)}; expected a subset of {STREAMS}")
        self.weights = dict(weights)
        self.pair_loss = ContrastiveLoss(gather, rank)

    def active(self, stream: str) -> bool:
        """Whether a stream contributes; inactive streams are never encoded (λ=0 costs nothing)."""
        return self.weights.get(stream, 0.0) != 0.0

    def forward(self, pairs: Mapping[str, tuple[Tensor, Tensor]], logit_scale: Tensor) -> dict[str, Tensor]:
        """Score each active stream's (image_features, text_features) pair.

        Returns:
            `loss_<stream>` for each scored stream (unweighted, for logging) and `loss`, the weighted sum.
        """
        terms = {f"loss_{s}": self.pair_loss(*pairs[s], logit_scale) for s in STREAMS if s in pairs and self.active(s)}
        if not terms:
            raise ValueError(f"no active stream in batch: got {sorted(pairs)}, weights {self.weights}")
        terms["loss"] = sum(self.weights[name.removeprefix("loss_")] * value for name, value in terms.items())
        return terms
