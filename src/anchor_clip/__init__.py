"""anchor_clip: finetune CLIP-style models with rich-text anchors (ARF) and keep their OOD generalization.

    from anchor_clip import AnchorDataModule, AnchorFinetuneModule, ARFLoss, create_backbone
"""

from anchor_clip.backbones import (
    BackboneIO,
    ClipBackbone,
    create_backbone,
    create_io,
    list_backbones,
    register_backbone,
)
from anchor_clip.data import AnchorDataModule
from anchor_clip.losses import ARFLoss, contrastive_loss
from anchor_clip.module import AnchorFinetuneModule
from anchor_clip.specs import EvalSet, EvalSpec
from anchor_clip.wise import interpolate

# The world CLIP's adapter lives with the world it was built for; the package root sits above both layers, so
# importing it here registers the `world_clip` family for every entry point without `backbones` importing `world`.
from anchor_clip.world import clip as _world_clip  # noqa: E402,F401  isort: skip

__version__ = "0.1.0"

__all__ = [
    "ARFLoss",
    "AnchorDataModule",
    "AnchorFinetuneModule",
    "BackboneIO",
    "ClipBackbone",
    "EvalSet",
    "EvalSpec",
    "contrastive_loss",
    "create_backbone",
    "create_io",
    "interpolate",
    "list_backbones",
    "register_backbone",
]
