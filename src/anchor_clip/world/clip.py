"""A tiny CLIP for the embedded world: conv image tower, word-level transformer text tower.

Built to be pretrained on the world's pool in CPU minutes (see `anchor_clip.world`): at 32 px a small
conv net learns far faster than a ViT, and the world's closed vocabulary (`world.vocabulary()`) makes a
word-level tokenizer exact, so no BPE table is needed. `WorldClip` is the model in open_clip's shape
(`visual`, `text`, `logit_scale` stored as a log); `WorldClipBackbone` adapts it to `ClipBackbone` and
registers it as the ``world_clip`` family when this module is imported (`import anchor_clip` does).

Spec: ``world_clip`` (one model; sizes come from the ``config`` dict, e.g. tests build a tiny one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.transforms import functional as TF

from anchor_clip.backbones.base import BackboneIO, ClipBackbone, state_dict_from_checkpoint
from anchor_clip.backbones.registry import register_backbone
from anchor_clip.world import pretrained as shipped
from anchor_clip.world.captions import vocabulary, words


@dataclass(frozen=True)
class WorldClipConfig:
    """Sizes of the world CLIP; every field can be overridden by the spec's ``config`` dict."""

    embed_dim: int = 128  # joint image-text embedding size
    image_size: int = 32  # input pixels per side (the world's default)
    image_width: int = 32  # channels of the first conv layer; doubled at each of the next three
    # "batch" (BatchNorm2d) or "group" (GroupNorm, batch-independent like a ViT's LayerNorm); batch norm learns
    # the world's shapes far faster
    image_norm: str = "batch"
    # keep BatchNorm's running statistics fixed while training (finetuning): features then stop depending on
    # what else is in the batch, so e.g. a photo-only finetune batch cannot shift the statistics sketches use
    freeze_batch_stats: bool = False
    context_length: int = 32  # tokens per text, SOT and EOT included (world captions stay under 30 words)
    text_width: int = 128  # transformer width
    text_layers: int = 3
    text_heads: int = 4
    mlp_ratio: float = 4.0  # transformer MLP hidden size / width
    init_temperature: float = 0.07  # CLIP's initial softmax temperature; logit_scale starts at log(1 / 0.07)
    # per-channel pixel mean / std of the default world's pool (all four styles mixed)
    mean: tuple[float, float, float] = (0.67, 0.57, 0.51)
    std: tuple[float, float, float] = (0.31, 0.28, 0.33)

    def __post_init__(self) -> None:
        for key in ("mean", "std"):  # YAML gives lists
            object.__setattr__(self, key, tuple(getattr(self, key)))
        if self.image_norm not in ("group", "batch"):
            raise ValueError(f"image_norm={self.image_norm!r}; expected 'group' or 'batch'")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width={self.text_width} must be divisible by text_heads={self.text_heads}")
        if self.context_length < 3:
            raise ValueError(f"context_length={self.context_length} leaves no room for words between SOT and EOT")

    @classmethod
    def from_dict(cls, overrides: dict | None) -> WorldClipConfig:
        """Defaults updated with `overrides`; unknown keys raise instead of being ignored."""
        overrides = overrides or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown world_clip config keys {unknown}; known keys: {sorted(known)}")
        return cls(**overrides)


class WordTokenizer:
    """Word-level tokenizer over a closed vocabulary: lowercase, punctuation dropped, unknown words -> UNK.

    A text becomes ``[SOT, w1, ..., wn, EOT, PAD, ...]`` of exactly `context_length` ids; texts that are too
    long keep their first words and still end in EOT, where the text tower pools.
    """

    PAD, SOT, EOT, UNK = 0, 1, 2, 3
    SPECIALS = ("<pad>", "<sot>", "<eot>", "<unk>")

    def __init__(self, vocab: Sequence[str], context_length: int = 32) -> None:
        self.itos = list(self.SPECIALS) + [w for w in vocab if w not in self.SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.context_length = context_length

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """Ids of a text's words, without SOT/EOT or padding."""
        return [self.stoi.get(w, self.UNK) for w in words(text)]

    def __call__(self, texts: str | Sequence[str]) -> Tensor:
        """B strings -> (B, context_length) long tensor (a single string counts as B = 1)."""
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for text in texts:
            ids = [self.SOT, *self.encode(text)[: self.context_length - 2], self.EOT]
            rows.append(ids + [self.PAD] * (self.context_length - len(ids)))
        # one tensor from padded lists: a tensor per text would cost more than the encoding
        return torch.tensor(rows, dtype=torch.long).view(len(rows), self.context_length)

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """Token ids of one text -> its words joined by spaces (specials dropped, UNK kept as <unk>)."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return " ".join(self.itos[i] for i in ids if i not in (self.PAD, self.SOT, self.EOT))


def _run(layer: nn.Module, x: Tensor, checkpointed: bool) -> Tensor:
    """Apply a layer, recomputing it in backward instead of storing activations when `checkpointed`."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(layer, x, use_reentrant=False)
    return layer(x)


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.GroupNorm(math.gcd(8, channels), channels) if kind == "group" else nn.BatchNorm2d(channels)


class ConvImageTower(nn.Module):
    """Five 3x3 conv layers (norm + ReLU), max-pooled 32 -> 16 -> 8 -> 4, mean-pooled, projected.

    Pooling right after the first layer keeps a 32 px forward+backward cheap on CPU while the later, wider
    layers still see every object: the world's smallest objects are ~6 px.
    """

    def __init__(self, config: WorldClipConfig) -> None:
        super().__init__()
        w = config.image_width
        channels = [3, w, 2 * w, 4 * w, 8 * w, 8 * w]
        pooled = [True, True, True, False, False]  # after layers 1-3: 32 -> 4 px
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),  # the norm's shift makes a bias redundant
                _norm(config.image_norm, c_out),
                nn.ReLU(inplace=True),
                *([nn.MaxPool2d(2)] if pool else []),
            )
            for c_in, c_out, pool in zip(channels[:-1], channels[1:], pooled, strict=True)
        )
        self.proj = nn.Linear(channels[-1], config.embed_dim, bias=False)
        self.grad_checkpointing = False

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) normalized pixels -> (B, embed_dim) unnormalized features."""
        x = images
        for stage in self.stages:
            x = _run(stage, x, self.grad_checkpointing)
        return self.proj(x.mean(dim=(2, 3)))  # (B, C, h, w) -> (B, C) -> (B, D)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        # (B, L, 3W) -> 3 x (B, heads, L, W / heads)
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-norm transformer block (CLIP / GPT-2 layout)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextTower(nn.Module):
    """Token + position embeddings, causal transformer, features read at the EOT token (as CLIP does).

    The causal mask means no token up to EOT sees the padding after it, so no padding mask is needed.
    """

    def __init__(self, config: WorldClipConfig, vocab_size: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, config.text_width)
        self.positional_embedding = nn.Parameter(torch.randn(config.context_length, config.text_width) * 0.01)
        self.blocks = nn.ModuleList(
            Block(config.text_width, config.text_heads, config.mlp_ratio) for _ in range(config.text_layers)
        )
        self.ln_final = nn.LayerNorm(config.text_width)
        self.proj = nn.Linear(config.text_width, config.embed_dim, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.proj.weight, std=config.text_width**-0.5)
        self.grad_checkpointing = False

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, L) token ids -> (B, embed_dim) unnormalized features."""
        if tokens.shape[1] != self.positional_embedding.shape[0]:
            raise ValueError(
                f"tokens have length {tokens.shape[1]}, the model's context length is "
                f"{self.positional_embedding.shape[0]}; tokenize with this backbone's tokenizer"
            )
        eot = (tokens == WordTokenizer.EOT).int().argmax(dim=1)  # first EOT of each row
        # causal attention: positions after the batch's last EOT never reach a feature, so skip them
        # (world captions use ~18 of 32 positions; this saves about 40% of the text tower's compute)
        length = int(eot.max()) + 1
        x = self.token_embedding(tokens[:, :length]) + self.positional_embedding[:length]  # (B, length, W)
        for block in self.blocks:
            x = _run(block, x, self.grad_checkpointing)
        x = self.ln_final(x)
        return self.proj(x[torch.arange(x.shape[0], device=x.device), eot])  # (B, W) -> (B, D)


class WorldClip(nn.Module):
    """The two towers and the temperature, laid out like open_clip's CLIP."""

    def __init__(self, config: WorldClipConfig, vocab_size: int) -> None:
        super().__init__()
        self.visual = ConvImageTower(config)
        self.text = TextTower(config, vocab_size)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))  # stored as a log

    def encode_image(self, images: Tensor) -> Tensor:
        return F.normalize(self.visual(images), dim=-1)

    def encode_text(self, tokens: Tensor) -> Tensor:
        return F.normalize(self.text(tokens), dim=-1)


def _rgb(image: Image.Image) -> Image.Image:
    """Greyscale, palette and RGBA inputs become the 3 channels the conv tower takes."""
    return image if image.mode == "RGB" else image.convert("RGB")


class WorldImageTransform:
    """PIL image -> normalised (3, size, size) tensor, translated by up to `shift` pixels when training.

    The same tensor as torchvision's Resize, CenterCrop, ToTensor, Normalize and (with a shift) a
    reflect-padded RandomCrop, from the same random draws, in a third of the time: the translation slices
    the uint8 pixels and the arithmetic runs once on the final ones. The world's loader spends most of
    its time in this transform, at 32 px the per-call overhead of five torchvision transforms dominates.
    No flip or colour jitter: a mirror would make "on the left" captions false, jitter the colour words.
    """

    takes_arrays = True  # decoded streams pass (H, W, 3) uint8 arrays (see `ImageFiles.image`)

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], shift: int = 0) -> None:
        self.size, self.shift = size, shift
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        # source row/column of each reflect-padded one: cropping through it never builds the padded image
        padded = np.abs(np.arange(size + 2 * shift) - shift)
        self._reflect = np.where(padded > size - 1, 2 * (size - 1) - padded, padded)

    def __call__(self, image: Image.Image | np.ndarray) -> Tensor:
        if isinstance(image, np.ndarray) and image.shape == (self.size, self.size, 3) and image.dtype == np.uint8:
            pixels = image  # read only: the crop and the conversion below copy it
        else:
            image = _rgb(image if isinstance(image, Image.Image) else Image.fromarray(image))
            if image.size != (self.size, self.size):  # world images already have the model's size
                image = TF.center_crop(TF.resize(image, self.size), self.size)
            pixels = np.array(image)
        if self.shift:
            size = self.size
            top, left = (int(torch.randint(0, 2 * self.shift + 1, (1,))) for _ in range(2))  # RandomCrop's draws
            pixels = pixels.take(self._reflect[top : top + size], 0).take(self._reflect[left : left + size], 1)
        tensor = torch.from_numpy(pixels).permute(2, 0, 1).contiguous().float()
        return tensor.div_(255).sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, shift={self.shift})"


def build_io(config: WorldClipConfig) -> BackboneIO:
    """Tokenizer and transforms for a config (training translates by up to size/16 pixels)."""
    size, mean, std = config.image_size, config.mean, config.std
    return BackboneIO(
        train_transform=WorldImageTransform(size, mean, std, shift=max(1, size // 16)),
        eval_transform=WorldImageTransform(size, mean, std),
        tokenizer=WordTokenizer(vocabulary(), config.context_length),
    )


#: Pretrained tags -> checkpoint path (tried before file paths): the shipped world CLIPs (`world.pretrained`).
PRETRAINED: dict[str, Callable[[], Path]] = {tag: partial(shipped.world_clip_weights, tag)
                                             for tag in shipped.world_clip_tags()}


def _resolve_pretrained(pretrained: str) -> Path:
    if pretrained in PRETRAINED:
        return Path(PRETRAINED[pretrained]())
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise ValueError(
            f"world_clip pretrained={pretrained!r} is neither a known tag {sorted(PRETRAINED)} nor an existing "
            "checkpoint file; pass a path to a state dict (.pt) or a Lightning checkpoint (.ckpt)"
        )
    return path


@register_backbone("world_clip")
class WorldClipBackbone(ClipBackbone):
    """`ClipBackbone` adapter around `WorldClip`."""

    image_tower = "model.visual"
    text_tower = "model.text"

    def __init__(self, config: WorldClipConfig | None = None) -> None:
        super().__init__()
        self.config = config or WorldClipConfig()
        self._io = build_io(self.config)
        self.model = WorldClip(self.config, self._io.tokenizer.vocab_size)
        # conv weights channels-last: the CPU kernels then run the tower's inference 2.2x faster (pool embedding,
        # evaluation) whatever the input layout; loading a state dict keeps the layout
        self.model.visual.to(memory_format=torch.channels_last)
        self.train()  # applies `freeze_batch_stats` from the start

    @classmethod
    def from_spec(cls, model: str | None, pretrained: str | None = None, config: dict | None = None) -> ClipBackbone:
        _check_model_name(model)
        backbone = cls(WorldClipConfig.from_dict(shipped.tag_config(pretrained, config)))
        if pretrained:
            backbone.load_checkpoint(_resolve_pretrained(pretrained))
        return backbone

    @classmethod
    def io_from_spec(cls, model: str | None, config: dict | None = None, pretrained: str | None = None) -> BackboneIO:
        _check_model_name(model)
        return build_io(WorldClipConfig.from_dict(shipped.tag_config(pretrained, config)))

    def load_checkpoint(self, path: str | Path) -> None:
        """Load weights saved from this backbone (``state_dict()``) or a Lightning checkpoint of a module holding it.

        Raises:
            ValueError: naming the missing, unexpected and mis-shaped keys when the checkpoint does not fit.
        """
        path = Path(path)
        # Lightning checkpoints pickle hyper-parameters that the weights-only loader rejects; load trusted files only
        state = state_dict_from_checkpoint(torch.load(path, map_location="cpu", weights_only=False), path)
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
                  if state[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(
                f"checkpoint {path} does not fit this world_clip model (config {asdict(self.config)}): "
                f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, "
                f"shape mismatches (checkpoint vs model) {shapes[:8]}. "
                "Build the backbone with the config the checkpoint was trained with."
            )
        self.load_state_dict(state)

    def encode_image(self, images: Tensor) -> Tensor:
        return self.model.encode_image(images)

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.model.encode_text(tokens)

    def train(self, mode: bool = True) -> WorldClipBackbone:
        """Train mode, except BatchNorm layers stay in eval mode when `config.freeze_batch_stats` is set."""
        super().train(mode)
        if mode and self.config.freeze_batch_stats:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()  # normalize with the pretrained running statistics; affine weights still learn
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute conv stages and transformer blocks in backward instead of storing their activations.

        With ``image_norm="batch"`` the recomputation updates BatchNorm running statistics a second time.
        """
        self.model.visual.grad_checkpointing = enable
        self.model.text.grad_checkpointing = enable


def _check_model_name(model: str | None) -> None:
    if model not in (None, ""):
        raise ValueError(
            f"world_clip has a single model, got model name {model!r}; use the spec 'world_clip' and set sizes "
            "through the config dict (fields of WorldClipConfig)"
        )

