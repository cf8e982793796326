"""CLIP scores of image-caption pairs, for filtering captions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from anchor_clip.backbones import create_backbone
from anchor_clip.backbones.base import ImageTransform
from anchor_clip.precision import Precision, autocast


class CaptionScorer:
    """Cosine similarity of each image and its caption under a CLIP backbone, to spot captions that miss.

    Args:
        backbone: backbone spec (``open_clip:ViT-B-16``).
        pretrained: its pretrained tag or checkpoint.
        config: its config dict instead of a named model.
    """

    def __init__(self, backbone: str, pretrained: str | None = None, config: dict[str, Any] | None = None) -> None:
        self.backbone_spec, self.pretrained, self.config = backbone, pretrained, config
        self.transform: ImageTransform | None = None

    def settings(self) -> dict[str, Any]:
        return {"backbone": self.backbone_spec, "pretrained": self.pretrained, "config": self.config}

    def setup(self, device: str = "cpu", precision: Precision = "32") -> None:
        backbone = create_backbone(self.backbone_spec, pretrained=self.pretrained, config=self.config)
        self.device, self.precision = torch.device(device), precision
        self.backbone = backbone.eval().to(self.device)
        self.transform = backbone.io.eval_transform

    @torch.inference_mode()
    def score(self, pixels: Tensor, captions: Sequence[str]) -> list[float]:
        """(B, 3, H, W) images and B captions -> B cosine similarities in [-1, 1]."""
        with autocast(self.device, self.precision):
            image = self.backbone.encode_image(pixels.to(self.device))
            text = self.backbone.encode_text(self.backbone.tokenize(captions))
        similarity = (F.normalize(image.float(), dim=-1) * F.normalize(text.float(), dim=-1)).sum(-1)  # (B,)
        return similarity.cpu().tolist()
