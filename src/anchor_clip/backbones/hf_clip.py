"""Hugging Face transformers `CLIPModel`s as anchor_clip backbones.

Selected as ``hf_clip:<id or path>`` (``hf_clip:openai/clip-vit-base-patch16``, or a directory written by
``save_pretrained``). As is the transformers convention, that checkpoint names the weights, the tokenizer and
the image-processor settings at once, so ``pretrained`` stays None; a finetuned model is saved with
``save_pretrained`` and selected by its directory. A config dict ``{"text_config": {...}, "vision_config":
{...}, ...}`` (any `CLIPConfig` fields) builds a randomly initialised model instead, which is how tests get
tiny models offline. Such a model has no tokenizer files, so it uses open_clip's CLIP BPE (49408 ids, context
length ``text_config.max_position_embeddings``); a ``text_config.vocab_size`` below 49408 raises a ValueError
rather than clamping ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import open_clip
import PIL.Image
from torch import Tensor
from torch.nn import functional as F
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
from transformers import AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

from anchor_clip.backbones.base import BackboneIO, ClipBackbone, Tokenizer
from anchor_clip.backbones.registry import register_backbone

#: Sub-modules of each tower in a `CLIPModel`; the projections belong to their tower when locking.
_TOWERS = {"image": ("vision_model", "visual_projection"), "text": ("text_model", "text_projection")}

#: The old CLIP configs set eos_token_id=2, which transformers reads as "pool at the largest id" (the eot).
_LEGACY_EOS_ID = 2


class _PaddedTokenizer:
    """A transformers tokenizer behind anchor_clip's call: B strings -> (B, L) ids, padded/truncated to L.

    A plain class (not a closure) so DataLoader workers can pickle it.
    """

    def __init__(self, tokenizer: Any, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts: Sequence[str]) -> Tensor:
        # Truncation keeps the end-of-text token, and padding after it is harmless: the text tower is
        # causal and pools at the first end-of-text token, so no attention mask is needed downstream.
        batch = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return batch["input_ids"]


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    return image.convert("RGB")


def _transforms(processor: Any) -> tuple[Compose, Compose]:
    """(train, eval) transforms from a transformers image processor's settings.

    Eval reproduces the processor (resize, center crop, normalize) with torchvision so it runs on PIL images in
    DataLoader workers; train is open_clip's RandomResizedCrop recipe at the same output size and statistics.
    """
    size, crop = processor.size, processor.crop_size
    resize = size.get("shortest_edge") or (size.get("height"), size.get("width"))
    if processor.do_center_crop:
        out = (crop.get("height"), crop.get("width"))
    elif isinstance(resize, tuple):
        out = resize
    else:
        raise ValueError(
            f"image processor resizes the shortest edge to {resize} without a center crop, which gives images of "
            "varying shape; set do_center_crop=true (with crop_size) in its preprocessor_config.json."
        )
    interpolation = InterpolationMode(PIL.Image.Resampling(int(processor.resample)).name.lower())
    mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    crop_step = [CenterCrop(out)] if processor.do_center_crop else []
    eval_transform = Compose(
        [_to_rgb, Resize(resize, interpolation=interpolation), *crop_step, ToTensor(), Normalize(mean, std)]
    )
    train_transform = open_clip.image_transform(out, is_train=True, mean=mean, std=std)
    return train_transform, eval_transform


def _clip_config(config: Mapping[str, Any]) -> CLIPConfig:
    if not isinstance(config, Mapping):
        raise ValueError(f"hf_clip config must be a dict of CLIPConfig fields, got {type(config).__name__}.")
    return CLIPConfig(**config)


def _bpe_tokenizer(clip_config: CLIPConfig) -> Tokenizer:
    """open_clip's CLIP BPE tokenizer for a config-only model, checked against the text tower it feeds.

    A config brings no tokenizer files, and this BPE is the one CLIP checkpoints use, shipped inside open_clip.
    A text tower with fewer than its 49408 ids is rejected (rather than clamping ids, which would silently
    merge words), as is an end-of-text id other than the BPE's, since the tower pools at that token.
    """
    text = clip_config.text_config
    tokenizer = open_clip.SimpleTokenizer(context_length=text.max_position_embeddings)
    if text.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"text_config.vocab_size={text.vocab_size} is smaller than the CLIP BPE vocabulary "
            f"({tokenizer.vocab_size} ids) used for config-only models; set text_config.vocab_size >= "
            f"{tokenizer.vocab_size}, or load a checkpoint directory that has its own tokenizer."
        )
    if text.eos_token_id not in (tokenizer.eot_token_id, _LEGACY_EOS_ID):
        raise ValueError(
            f"text_config.eos_token_id={text.eos_token_id} is not the CLIP BPE end-of-text id "
            f"{tokenizer.eot_token_id}, so text features would pool the wrong token; set it to "
            f"{tokenizer.eot_token_id}."
        )
    return tokenizer


def _pooled(output: Tensor | Any) -> Tensor:
    """transformers 4.x `get_*_features` return the projected features; 5.x wrap them in `pooler_output`."""
    return output if isinstance(output, Tensor) else output.pooler_output


@register_backbone("hf_clip")
class HFClipBackbone(ClipBackbone):
    """A transformers `CLIPModel` behind the `ClipBackbone` interface.

    Attributes:
        model: the wrapped `CLIPModel`, untouched, so ``model.save_pretrained`` writes a loadable checkpoint.
    """

    image_tower = "model.vision_model"
    text_tower = "model.text_model"

    def __init__(self, model: CLIPModel, io: BackboneIO):
        super().__init__()
        self.model = model
        self._io = io

    @classmethod
    def from_spec(
        cls, model: str | None, pretrained: str | None = None, config: dict[str, Any] | None = None
    ) -> HFClipBackbone:
        """Build on CPU in fp32 (Lightning moves and casts it).

        Args:
            model: a Hub id or a local ``save_pretrained`` directory, or None with `config`.
            pretrained: must be None; the checkpoint in `model` already names the weights.
            config: `CLIPConfig` fields (``text_config``, ``vision_config``, ``projection_dim``, ...) for a
                randomly initialised model.
        """
        if pretrained is not None:
            raise ValueError(
                f"hf_clip takes its weights from the model id or directory, not pretrained={pretrained!r}; set "
                "pretrained to null and select a finetuned model by its save_pretrained directory "
                "('hf_clip:/path/to/dir')."
            )
        io = cls.io_from_spec(model, config=config)
        if config is not None:
            clip = CLIPModel(_clip_config(config))
        else:
            # transformers 5 loads in the checkpoint's dtype by default; training here starts from fp32.
            clip = CLIPModel.from_pretrained(model).float()
        return cls(clip, io)

    @classmethod
    def io_from_spec(
        cls, model: str | None, config: dict[str, Any] | None = None, pretrained: str | None = None
    ) -> BackboneIO:
        """Tokenizer and transforms from the checkpoint's tokenizer and image-processor files (no weights), or,
        for a config dict, the CLIP BPE tokenizer and CLIP statistics at ``vision_config.image_size``."""
        if (model is None) == (config is None):
            raise ValueError(
                f"hf_clip backbone needs exactly one of a model id/path or a config dict (got model={model!r}, "
                f"config={'a dict' if config is not None else None}). Use 'hf_clip:openai/clip-vit-base-patch16' "
                "or 'hf_clip' with config."
            )
        if config is not None:
            clip_config = _clip_config(config)
            tokenizer = _bpe_tokenizer(clip_config)
            side = clip_config.vision_config.image_size
            # CLIPImageProcessor's defaults are CLIP's own (OpenAI mean/std, bicubic); only the size is ours.
            processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        else:
            clip_config = CLIPConfig.from_pretrained(model)
            tokenizer = _PaddedTokenizer(
                AutoTokenizer.from_pretrained(model), clip_config.text_config.max_position_embeddings
            )
            processor = AutoImageProcessor.from_pretrained(model)
        train_transform, eval_transform = _transforms(processor)
        return BackboneIO(train_transform=train_transform, eval_transform=eval_transform, tokenizer=tokenizer)

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, D) unit-norm image features."""
        return F.normalize(_pooled(self.model.get_image_features(pixel_values=images)), dim=-1)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """(B, L) token ids -> (B, D) unit-norm text features."""
        return F.normalize(_pooled(self.model.get_text_features(input_ids=tokens)), dim=-1)

    def lock(self, image: bool = False, text: bool = False) -> None:
        """Freeze whole towers, each with its projection (``visual_projection``/``text_projection``)."""
        for tower, frozen in (("image", image), ("text", text)):
            if frozen:
                for name in _TOWERS[tower]:
                    self.model.get_submodule(name).requires_grad_(False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # transformers 5 renamed gradient checkpointing to activation checkpointing; 4.x has only the old name.
        prefix = "activation" if hasattr(self.model, "activation_checkpointing_enable") else "gradient"
        if enable:
            # Non-reentrant checkpointing still yields gradients when a frozen tower's inputs need none.
            getattr(self.model, f"{prefix}_checkpointing_enable")(
                **{f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}
            )
        else:
            getattr(self.model, f"{prefix}_checkpointing_disable")()
