"""Backbone registry: one name string selects a model family and a model within it.

A spec reads ``family:model`` (``open_clip:ViT-B-16``, ``hf_clip:openai/clip-vit-base-patch16``) or
just ``family`` when the family has a single model (``world_clip``). The model part is handed to the
family's adapter untouched, so it may itself be a local path.
"""

from __future__ import annotations

import difflib
import warnings
from typing import Any, TypeVar

from anchor_clip.backbones.base import BackboneIO, ClipBackbone

_FAMILIES: dict[str, type[ClipBackbone]] = {}

B = TypeVar("B", bound=type[ClipBackbone])


def register_backbone(name: str):
    """Class decorator adding an adapter family under `name` (warns when one is replaced)."""

    def wrap(cls: B) -> B:
        if name in _FAMILIES and _FAMILIES[name] is not cls:
            warnings.warn(f"backbone family {name!r} re-registered: {_FAMILIES[name]} -> {cls}", stacklevel=2)
        _FAMILIES[name] = cls
        return cls

    return wrap


def list_backbones() -> list[str]:
    """Names of the registered backbone families."""
    return sorted(_FAMILIES)


def _split(spec: str) -> tuple[type[ClipBackbone], str | None]:
    family, _, model = spec.partition(":")
    if family not in _FAMILIES:
        close = difflib.get_close_matches(family, _FAMILIES, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(
            f"unknown backbone family {family!r} in spec {spec!r}; available: {list_backbones()}.{hint} "
            "Specs read 'family:model', e.g. 'open_clip:ViT-B-16'."
        )
    return _FAMILIES[family], (model or None)


def check_spec(spec: str | None, field: str) -> str:
    """`spec` when it names a registered family; a missing or unknown one raises a ValueError naming the choices.

    No family is a default: a run that forgot its backbone must not train some small model from random init.
    """
    if not spec:
        raise ValueError(
            f"{field} is not set; name the backbone as 'family:model' with a family from {list_backbones()}, e.g. "
            "'open_clip:ViT-B-16' (with model.pretrained: openai) or 'world_clip' (the embedded world's CLIP)"
        )
    _split(spec)
    return spec


def create_backbone(spec: str, pretrained: str | None = None, config: dict[str, Any] | None = None) -> ClipBackbone:
    """Build a backbone from its spec.

    Args:
        spec: ``family:model``.
        pretrained: the family's pretrained tag or a local checkpoint path; None for random init.
        config: a model config dict instead of a named model (how tests build tiny models offline).
    """
    cls, model = _split(spec)
    return cls.from_spec(model, pretrained=pretrained, config=config)


def create_io(spec: str, config: dict[str, Any] | None = None, pretrained: str | None = None) -> BackboneIO:
    """Tokenizer and transforms for a spec (and its pretrained tag), without building or loading the model."""
    cls, model = _split(spec)
    return cls.io_from_spec(model, config=config, pretrained=pretrained)
