"""open_clip models as anchor_clip backbones.

Selected as ``open_clip:<name>`` where ``<name>`` is anything `open_clip.create_model` takes: a built-in
architecture from `open_clip.list_models()` (``ViT-B-16``, with ``pretrained`` a tag such as ``openai`` or a
local checkpoint file), ``hf-hub:org/repo`` or ``local-dir:/path`` (those carry their own weights). A model
config dict (``{"embed_dim": ..., "vision_cfg": {...}, "text_cfg": {...}}``, the layout of open_clip's
``model_configs/*.json``) builds a randomly initialised model instead, which is how tests get tiny models
offline.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import open_clip
from open_clip.pretrained import download_pretrained_from_hf, get_pretrained_cfg, list_pretrained_tags_by_model
from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from torch import Tensor, nn

from anchor_clip.backbones.base import BackboneIO, ClipBackbone, Tokenizer
from anchor_clip.backbones.registry import register_backbone

_HF_HUB = "hf-hub:"
_LOCAL_DIR = "local-dir:"
_REQUIRED_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


def _check_spec(model: str | None, config: Mapping[str, Any] | None) -> None:
    if (model is None) == (config is None):
        raise ValueError(
            f"open_clip backbone needs exactly one of a model name or a config dict (got model={model!r}, "
            f"config={'a dict' if config is not None else None}). Use 'open_clip:ViT-B-16' or 'open_clip' with config."
        )


def _model_name(model: str) -> str:
    """The name open_clip looks up (it spells ``ViT-B/16`` as ``ViT-B-16``); raises listing close matches."""
    if model.startswith((_HF_HUB, _LOCAL_DIR)):
        return model
    name = model.replace("/", "-")
    if open_clip.get_model_config(name) is None:
        available = open_clip.list_models()
        # Compare case-folded so 'vit_b_16' still finds 'ViT-B-16'.
        by_lower = {known.lower(): known for known in available}
        close = [by_lower[hit] for hit in difflib.get_close_matches(name.lower(), by_lower, n=5, cutoff=0.5)]
        raise ValueError(
            f"unknown open_clip model {model!r}; close matches: {close or 'none'}. "
            f"open_clip.list_models() has {len(available)} names; 'hf-hub:org/repo' and 'local-dir:/path' "
            "names work too, or pass a config dict instead of a name."
        )
    return name


def _check_pretrained(name: str, pretrained: str | None) -> None:
    """Fail before any download when `pretrained` can not be resolved (open_clip would raise a bare RuntimeError)."""
    if pretrained is None:
        return
    if name.startswith((_HF_HUB, _LOCAL_DIR)):
        raise ValueError(
            f"{name!r} carries its own weights, so pretrained={pretrained!r} would be ignored; set pretrained to null."
        )
    if not get_pretrained_cfg(name, pretrained) and not os.path.isfile(pretrained):
        raise ValueError(
            f"pretrained={pretrained!r} is neither a pretrained tag of {name!r} "
            f"(tags: {list_pretrained_tags_by_model(name)}) nor an existing checkpoint file."
        )


def _tower_cfgs(config: Mapping[str, Any]) -> tuple[open_clip.CLIPVisionCfg, open_clip.CLIPTextCfg]:
    """Parse the two tower configs with open_clip's own dataclasses, so defaults match what it builds."""
    missing = [key for key in _REQUIRED_CONFIG_KEYS if key not in config]
    if missing:
        raise ValueError(
            f"open_clip config lacks {missing} (got keys {sorted(config)}); it needs {list(_REQUIRED_CONFIG_KEYS)} "
            "like the JSON files in open_clip/model_configs."
        )
    try:
        return open_clip.CLIPVisionCfg(**config["vision_cfg"]), open_clip.CLIPTextCfg(**config["text_cfg"])
    except TypeError as err:
        raise ValueError(f"bad open_clip tower config ({err}); see open_clip.CLIPVisionCfg/CLIPTextCfg.") from err


def _config_tokenizer(text_cfg: open_clip.CLIPTextCfg) -> Tokenizer:
    """The tokenizer `open_clip.get_tokenizer` would pick for a text config that has no registered name."""
    kwargs = text_cfg.tokenizer_kwargs or {}
    if text_cfg.hf_tokenizer_name:
        return HFTokenizer(
            text_cfg.hf_tokenizer_name,
            context_length=text_cfg.context_length,
            tokenizer_mode=text_cfg.tokenizer_mode,
            **kwargs,
        )
    tokenizer = open_clip.SimpleTokenizer(context_length=text_cfg.context_length or DEFAULT_CONTEXT_LENGTH, **kwargs)
    # A smaller embedding table would turn the first rare word into an IndexError deep inside training.
    if text_cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"text_cfg.vocab_size={text_cfg.vocab_size} is smaller than the CLIP BPE vocabulary "
            f"({tokenizer.vocab_size} ids); set text_cfg.vocab_size >= {tokenizer.vocab_size}."
        )
    return tokenizer


def _config_preprocess(vision_cfg: open_clip.CLIPVisionCfg) -> dict[str, Any]:
    """A config dict brings no pretrained tag, so it gets open_clip's default (OpenAI) preprocessing at its size."""
    return merge_preprocess_dict(PreprocessCfg(), {"size": vision_cfg.image_size})


def _named_preprocess(name: str, pretrained: str | None) -> dict[str, Any]:
    """Preprocessing of a named model as `open_clip.create_model` resolves it, without building the model.

    Defaults, overlaid by the pretrained tag's entry (mean/std/resize mode differ per tag) or by the
    ``preprocess_cfg`` of an ``hf-hub:``/``local-dir:`` config file; the size comes from the vision config.
    """
    if name.startswith(_LOCAL_DIR):
        config_file = Path(name.removeprefix(_LOCAL_DIR)) / "open_clip_config.json"
    elif name.startswith(_HF_HUB):
        # Fetches only the small JSON config (huggingface_hub caches it), never the weights.
        config_file = Path(download_pretrained_from_hf(name.removeprefix(_HF_HUB), filename="open_clip_config.json"))
    else:
        config_file = None
    if config_file is not None:
        full = json.loads(config_file.read_text())
        model_cfg, overlay = full["model_cfg"], full.get("preprocess_cfg", {})
    else:
        model_cfg = open_clip.get_model_config(name)
        overlay = get_pretrained_cfg(name, pretrained) if pretrained else {}
        if pretrained is None:
            _warn_if_tags_preprocess_differently(name)
    preprocess = merge_preprocess_dict(PreprocessCfg(), overlay)
    preprocess["size"] = open_clip.CLIPVisionCfg(**model_cfg["vision_cfg"]).image_size
    return preprocess


def _warn_if_tags_preprocess_differently(name: str) -> None:
    """Without a tag the defaults apply; say so when some of the model's weights expect other preprocessing."""
    default = merge_preprocess_dict(PreprocessCfg(), {})
    odd = [
        tag
        for tag in list_pretrained_tags_by_model(name)
        if merge_preprocess_dict(default, get_pretrained_cfg(name, tag)) != default
    ]
    if odd:
        warnings.warn(
            f"transforms for open_clip:{name} without a pretrained tag use open_clip's defaults (mean "
            f"{default['mean']}, std {default['std']}, resize '{default['resize_mode']}'), but its tags {odd} were "
            "trained with other preprocessing; pass pretrained= to get theirs.",
            stacklevel=4,  # point at the caller of io_from_spec
        )


def _io(preprocess: Mapping[str, Any], tokenizer: Tokenizer) -> BackboneIO:
    cfg = PreprocessCfg(**preprocess)
    return BackboneIO(
        train_transform=image_transform_v2(cfg, is_train=True),
        eval_transform=image_transform_v2(cfg, is_train=False),
        tokenizer=tokenizer,
    )


def _model_from_config(config: Mapping[str, Any]) -> nn.Module:
    """Instantiate the class `open_clip.create_model` would choose for this config, randomly initialised."""
    cfg = copy.deepcopy(dict(config))
    text_cfg = cfg["text_cfg"]
    hf_text = "hf_model_name" in text_cfg
    if hf_text:
        # A config dict means random init; an HF text tower would otherwise fetch its base weights.
        text_cfg.setdefault("hf_model_pretrained", False)
    custom_text = cfg.pop("custom_text", False) or hf_text
    if "multimodal_cfg" in cfg:
        return open_clip.CoCa(**cfg)
    return (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)(**cfg)


@register_backbone("open_clip")
class OpenClipBackbone(ClipBackbone):
    """Any open_clip CLIP/CustomTextCLIP/CoCa model behind the `ClipBackbone` interface.

    Attributes:
        model: the wrapped open_clip model, untouched, so its state dict loads back into open_clip.
    """

    image_tower = "model.visual"

    def __init__(self, model: nn.Module, io: BackboneIO):
        super().__init__()
        self.model = model
        self._io = io
        # CLIP keeps its text parts as loose attributes; `lock` below uses open_clip's own grouping of them.
        self.text_tower = "model.text" if hasattr(model, "text") else "model.transformer"

    @classmethod
    def from_spec(
        cls, model: str | None, pretrained: str | None = None, config: dict[str, Any] | None = None
    ) -> OpenClipBackbone:
        """Build on CPU in fp32 (Lightning moves and casts it).

        Args:
            model: an open_clip model name (``ViT-B-16``, ``hf-hub:org/repo``, ``local-dir:/path``), or None
                with `config`.
            pretrained: a tag of that model (``openai``) or a checkpoint file; with `config`, only a file. None
                gives random weights. A checkpoint file trained with QuickGELU needs a ``-quickgelu`` model name
                (a tag brings that setting itself).
            config: an open_clip model config dict instead of a name.
        """
        _check_spec(model, config)
        if config is not None:
            vision_cfg, text_cfg = _tower_cfgs(config)
            tokenizer = _config_tokenizer(text_cfg)
            clip = _model_from_config(config)
            if pretrained is not None:
                if not os.path.isfile(pretrained):
                    raise ValueError(
                        f"with a config dict, pretrained must be a checkpoint file; {pretrained!r} is not a file."
                    )
                # open_clip's loader also converts foreign layouts (OpenAI JIT, big_vision) and resizes pos-embeds.
                open_clip.load_checkpoint(clip, pretrained)
            open_clip.set_model_preprocess_cfg(clip, _config_preprocess(vision_cfg))
        else:
            name = _model_name(model)
            _check_pretrained(name, pretrained)
            # open_clip only warns when a tag was trained with QuickGELU but the named config uses GELU
            # (ViT-B-16 + openai); build the activation the weights were trained with.
            tag_cfg = get_pretrained_cfg(name, pretrained) if pretrained else {}
            clip = open_clip.create_model(
                name, pretrained=pretrained, force_quick_gelu=tag_cfg.get("quick_gelu", False)
            )
            tokenizer = open_clip.get_tokenizer(name)
        return cls(clip, _io(open_clip.get_model_preprocess_cfg(clip), tokenizer))

    @classmethod
    def io_from_spec(
        cls, model: str | None, config: dict[str, Any] | None = None, pretrained: str | None = None
    ) -> BackboneIO:
        """Tokenizer and transforms equal to `from_spec(...).io`, read from configs only (no weights, no model).

        Args:
            model: as in `from_spec`.
            config: as in `from_spec`.
            pretrained: the tag the weights will come from; its normalization statistics can differ from the
                defaults (e.g. ``ViT-L-14``/``laion2b_s32b_b82k`` uses mean 0.5), so pass it when known.
        """
        _check_spec(model, config)
        if config is not None:
            vision_cfg, text_cfg = _tower_cfgs(config)
            return _io(_config_preprocess(vision_cfg), _config_tokenizer(text_cfg))
        name = _model_name(model)
        _check_pretrained(name, pretrained)
        return _io(_named_preprocess(name, pretrained), open_clip.get_tokenizer(name))

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, D) unit-norm image features."""
        return self.model.encode_image(images, normalize=True)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """(B, L) token ids -> (B, D) unit-norm text features."""
        return self.model.encode_text(tokens, normalize=True)

    def lock(self, image: bool = False, text: bool = False) -> None:
        """Freeze towers with open_clip's LiT-style locks (they know where each architecture keeps its parts).

        CoCa has no lock methods; its towers are whole sub-modules, so the generic `ClipBackbone.lock` serves.
        """
        if image:
            if hasattr(self.model, "lock_image_tower"):
                self.model.lock_image_tower()
            else:
                super().lock(image=True)
        if text:
            if hasattr(self.model, "lock_text_tower"):
                self.model.lock_text_tower()
            else:
                super().lock(text=True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)
