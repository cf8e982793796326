"""The backbone adapter interface every CLIP-style model is wrapped in.

Adapters only translate a foreign model's API into this one; no ARF logic lives here, so the module,
the anchor jobs and the evaluators work with any backbone the registry knows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

Tokenizer = Callable[[Sequence[str]], Tensor]
ImageTransform = Callable[..., Tensor]


@dataclass(frozen=True)
class BackboneIO:
    """What the data side needs from a backbone, available without loading weights.

    Built by `registry.create_io`, so DataLoader workers can tokenize and transform without a model. A transform
    with a true `takes_arrays` attribute is also given decoded images as (H, W, 3) uint8 arrays (`ImageFiles.image`).
    """

    train_transform: ImageTransform  # PIL image -> (3, H, W) float tensor, with augmentation
    eval_transform: ImageTransform  # PIL image -> (3, H, W) float tensor, deterministic
    tokenizer: Tokenizer  # list of B strings -> (B, L) long tensor


class ClipBackbone(nn.Module, ABC):
    """A two-tower image-text model as the rest of anchor_clip sees it.

    Subclass it (and decorate with `@register_backbone("name")`) to bring a new model family:
    implement `from_spec`, `io_from_spec` and the encoders, and set `self._io` (and `self.model`, whose
    `logit_scale` is the temperature, or override `log_logit_scale`); the defaults of `param_groups`, `lock` and
    `set_grad_checkpointing` work for most towers.
    """

    #: Sub-module names of the two towers, used by `lock`; set by each adapter.
    image_tower: str = "visual"
    text_tower: str = "transformer"

    @classmethod
    @abstractmethod
    def from_spec(cls, model: str | None, pretrained: str | None = None, config: dict | None = None) -> ClipBackbone:
        """Build from the model part of a registry spec (see `registry.create_backbone`)."""

    @classmethod
    @abstractmethod
    def io_from_spec(cls, model: str | None, config: dict | None = None, pretrained: str | None = None) -> BackboneIO:
        """Tokenizer and transforms for a spec without building the model (used by DataLoader workers).

        `pretrained` matters where a family's weights fix their own preprocessing (open_clip tags differ in
        normalization statistics); families without such variation ignore it.
        """

    @abstractmethod
    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images -> (B, D) L2-normalized features."""

    @abstractmethod
    def encode_text(self, tokens: Tensor) -> Tensor:
        """(B, L) token ids -> (B, D) L2-normalized features."""

    @property
    def io(self) -> BackboneIO:
        """Tokenizer and image transforms matching this model: `self._io`, which adapters set when built."""
        return self._io

    @property
    def log_logit_scale(self) -> nn.Parameter:
        """The learned temperature, stored as a log (CLIP convention) so it stays positive.

        open_clip, Hugging Face and the world CLIP all keep it as `model.logit_scale`; adapters of models that
        keep it elsewhere override this.
        """
        return self.model.logit_scale

    @property
    def logit_scale(self) -> Tensor:
        """Exponentiated temperature, clamped at 100 as CLIP does during training."""
        return self.log_logit_scale.exp().clamp(max=100.0)

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """List of B strings -> (B, L) token ids on the model's device."""
        return self.io.tokenizer(list(texts)).to(self.log_logit_scale.device)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: no decay on gains, biases and the temperature (open_clip's training rule)."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            exclude = param.ndim < 2 or "logit_scale" in name
            (no_decay if exclude else decay).append(param)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def lock(self, image: bool = False, text: bool = False) -> None:
        """Freeze whole towers (e.g. `image=True` for a text-only finetune)."""
        for tower, frozen in ((self.image_tower, image), (self.text_tower, text)):
            if frozen:
                for param in self.get_submodule(tower).parameters():
                    param.requires_grad_(False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory; adapters whose model supports it override this."""
        raise NotImplementedError(f"{type(self).__name__} does not support gradient checkpointing")

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> Tensor:
        """Encode raw strings in chunks: (N,) strings -> (N, D) normalized features."""
        chunks = [self.encode_text(self.tokenize(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
        return torch.cat(chunks)


def state_dict_from_checkpoint(obj: object, path: Path) -> dict[str, Tensor]:
    """The backbone's weights from a plain state dict or a Lightning checkpoint (keys under ``backbone.``)."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        prefix = "backbone."
        state = {k[len(prefix) :]: v for k, v in obj["state_dict"].items() if k.startswith(prefix)}
        if not state:
            roots = sorted({k.split(".")[0] for k in obj["state_dict"]})
            raise ValueError(
                f"{path} is a Lightning checkpoint without 'backbone.' weights (top-level names: {roots}); "
                "expected a checkpoint of a module that stores the adapter as self.backbone"
            )
        return state
    if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return obj
    raise ValueError(f"{path} holds neither a state dict of tensors nor a Lightning checkpoint (got {type(obj)})")
