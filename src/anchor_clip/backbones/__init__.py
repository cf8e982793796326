"""Backbone adapters: every model family behind one `ClipBackbone` interface, selected by spec string."""

from anchor_clip.backbones.base import BackboneIO, ClipBackbone
from anchor_clip.backbones.registry import (
    check_spec,
    create_backbone,
    create_io,
    list_backbones,
    register_backbone,
)

# Importing an adapter module registers its family (the world CLIP registers from `anchor_clip.world.clip`).
from anchor_clip.backbones import hf_clip, open_clip  # noqa: E402,F401  isort: skip

__all__ = [
    "BackboneIO",
    "ClipBackbone",
    "check_spec",
    "create_backbone",
    "create_io",
    "list_backbones",
    "register_backbone",
]
