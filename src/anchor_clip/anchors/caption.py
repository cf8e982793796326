"""Caption the finetune images for ARF's caption anchors, in shards a killed job resumes from.

ARF pairs every finetune image with a caption from a pretrained captioner; the caption stream of
`AnchorDataModule(captions=...)` reads the table this job writes. Three captioners are built in:
BLIP / BLIP-2 (Hugging Face), open_clip CoCa, and a kNN captioner that borrows the caption of the
nearest pool image under the pretrained CLIP backbone itself (no extra model).

    python -m anchor_clip.caption --finetune ft.csv --out_dir caps --device cuda --precision 16 \
        --captioner BlipCaptioner --captioner.model Salesforce/blip-image-captioning-large

Layout of `out_dir` (every file is written to a temporary name and renamed into place):

    shard_00000.parquet   image_id, caption (+ captioner columns, + score) of manifest rows [0, shard_size)
    index-00000.json      what the job is (fingerprint) and which shards process (rank) 0 finished, with timings
    captions.parquet      the merged caption table, one row per finetune image, in manifest order
    report.json           counts, throughput, settings, and how often captions name their image's class

A shard is listed in its process's index only after its file is in place, and a re-run skips every
listed shard, so a killed job keeps its finished shards and captions each image once. With several
processes (``torchrun --nproc_per_node 8 -m anchor_clip.caption ...``), shard ``s`` belongs to rank
``s % world_size``; each rank writes its own shards and index, and whichever rank finds all shards
done last writes the merged table. No process group is needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from anchor_clip.anchors.embed import (
    Precision,
    check_fingerprint,
    embed_pool,
    load_pool_embeddings,
    resolve_backbone,
)
from anchor_clip.anchors.index import CosineIndex, build_index
from anchor_clip.backbones import ClipBackbone, create_backbone
from anchor_clip.backbones.base import ImageTransform
from anchor_clip.data.images import load_image
from anchor_clip.data.tables import read_classnames, read_table, resolve_paths, write_json, write_table

logger = logging.getLogger(__name__)

_DTYPES = {"32": torch.float32, "16": torch.float16, "bf16": torch.bfloat16}


def _check_precision(precision: str) -> torch.dtype:
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {list(_DTYPES)}, got {precision!r}")
    return _DTYPES[precision]


def _autocast(device: torch.device, precision: Precision) -> AbstractContextManager:
    """Mixed precision for CLIP towers: weights stay float32, matmuls run in half precision."""
    dtype = _check_precision(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "32")


# --------------------------------------------------------------------------------------------------
# Class-name mentions: the label filter of the kNN captioner and the report share one matcher.
# --------------------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    """Lower-case words; underscores, hyphens and punctuation separate them ("great_white_shark" -> 3 words)."""
    return re.findall(r"[^\W_]+", text.lower())


def _forms(words: tuple[str, ...]) -> list[tuple[str, ...]]:
    """A name and the regular plurals of its last word (s, es, consonant + y -> ies)."""
    *head, last = words
    lasts = [last, last + "s", last + "es"]
    if len(last) > 1 and last.endswith("y") and last[-2] not in "aeiou":
        lasts.append(last[:-1] + "ies")  # butterfly -> butterflies
    return [(*head, form) for form in lasts]


class ClassNameMatcher:
    """Finds the class names a text mentions: whole words, case-insensitive, tolerant of regular plurals.

    Names are looked up as word n-grams in a dict, so the cost per text does not grow with the number of
    classes (a 1000-way regex alternation would, and ImageNet-size jobs check a million captions). Matching
    is longest-first from left to right, so "great white shark" in a caption is that class and not also
    "shark". Irregular plurals (mouse/mice) are not covered.

    Args:
        names: class names; `find` returns indices into this list.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.keys = [tuple(_words(name)) for name in names]
        self.forms: dict[tuple[str, ...], set[int]] = {}
        for i, (name, key) in enumerate(zip(names, self.keys, strict=True)):
            if not key:
                raise ValueError(f"class name {name!r} (index {i}) has no words to match")
            for form in _forms(key):
                self.forms.setdefault(form, set()).add(i)
        self.max_words = max(len(key) for key in self.forms)

    def find(self, text: str) -> set[int]:
        """Indices of the names mentioned in `text` (several when names repeat, as ImageNet's two "crane"s)."""
        words, found, start = _words(text), set(), 0
        while start < len(words):
            for n in range(min(self.max_words, len(words) - start), 0, -1):
                hit = self.forms.get(tuple(words[start : start + n]))
                if hit:
                    found |= hit
                    start += n
                    break
            else:
                start += 1
        return found


@lru_cache(maxsize=4096)
def _matcher(name: str) -> ClassNameMatcher:
    return ClassNameMatcher([name])


def mentions(caption: str, name: str) -> bool:
    """Whether `caption` names the class `name` (whole words, case-insensitive, plural-tolerant)."""
    return bool(_matcher(name).find(caption))


def first_consistent(candidates: Sequence[Sequence[str]], label_names: Sequence[str]) -> tuple[list[int], list[bool]]:
    """For each image, the rank of the first candidate caption that names the image's class.

    Args:
        candidates: per image, its neighbours' captions, nearest first.
        label_names: per image, the name of its known class.

    Returns:
        ranks: index into each candidate list (0 where none matches: fall back to the nearest);
        found: whether a matching caption was found.
    """
    ranks, found = [], []
    for captions, name in zip(candidates, label_names, strict=True):
        rank = next((i for i, caption in enumerate(captions) if mentions(caption, name)), None)
        ranks.append(0 if rank is None else rank)
        found.append(rank is not None)
    return ranks, found


def mention_rates(
    captions: Sequence[str],
    labels: Sequence[int],
    classnames: Sequence[str],
    other_classnames: Sequence[str] | None = None,
) -> dict[str, float]:
    """How often captions name their image's class, another finetune class, or a class outside the finetune set.

    The last one is what hurts zero-shot accuracy: such captions pull unseen-class texts onto finetune images.

    Args:
        captions: one per image.
        labels: per image, its index into `classnames`.
        classnames: the finetune class names.
        other_classnames: names of classes outside the finetune set; names equal to a finetune class are ignored.

    Returns:
        Fractions of captions: `names_own_class`, `names_other_finetune_class`, and `names_unseen_class` when
        `other_classnames` are given.
    """
    finetune_keys = {tuple(_words(name)) for name in classnames}
    unseen = [name for name in other_classnames or [] if tuple(_words(name)) not in finetune_keys]
    matcher = ClassNameMatcher([*classnames, *unseen])
    own = other = outside = 0
    for caption, label in zip(captions, labels, strict=True):
        found = matcher.find(caption)
        own += label in found
        # Compare names, not indices: a name listed twice (ImageNet's two "crane"s) is not another class.
        other += any(i < len(classnames) and matcher.keys[i] != matcher.keys[label] for i in found)
        outside += any(i >= len(classnames) for i in found)
    n = len(captions)
    rates = {"names_own_class": own / n, "names_other_finetune_class": other / n}
    if other_classnames:
        rates["names_unseen_class"] = outside / n
    return rates


# --------------------------------------------------------------------------------------------------
# Captioners
# --------------------------------------------------------------------------------------------------


class Captioner(ABC):
    """Writes one caption per image.

    The job calls `setup` once (weights are loaded only when there is something to caption), applies
    `transform` to each image in the DataLoader workers, and calls `generate` on batches. `caption` is the
    one-call version for a few PIL images.

    Subclass it to bring a new captioner; `settings` must identify everything that changes the captions,
    since a re-run with other settings must not append to the old shards.
    """

    #: PIL image -> (3, H, W) model input; set by `setup`. A plain transform object rather than a bound
    #: method, so pickling it into DataLoader workers does not copy the model.
    transform: ImageTransform | None = None

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """JSON-able description of the captioner (kept in the index fingerprint and the report)."""

    @abstractmethod
    def setup(self, device: str = "cpu", precision: Precision = "32") -> None:
        """Load the model onto `device`; "16"/"bf16" run it in half precision (GPU throughput)."""

    @abstractmethod
    def generate(self, pixels: Tensor, label_names: Sequence[str] | None = None) -> dict[str, list]:
        """Caption a batch.

        Args:
            pixels: (B, 3, H, W) images from `transform`.
            label_names: per image, the name of its known class, for captioners that check consistency
                (see `uses_labels`); others ignore it.

        Returns:
            Columns of B values: `caption`, plus any per-image columns the captioner records.
        """

    @property
    def uses_labels(self) -> bool:
        """Whether `generate` needs `label_names` (the job then requires class names)."""
        return False

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """Caption a few PIL images: B images -> B strings."""
        if self.transform is None:
            raise RuntimeError(f"{type(self).__name__}.setup(device, precision) must run before caption()")
        pixels = torch.stack([self.transform(image.convert("RGB")) for image in images])
        return self.generate(pixels)["caption"]


class _ImageProcessorTransform:
    """A Hugging Face image processor as a per-image transform: PIL -> (3, H, W) pixel values."""

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor

    def __call__(self, image: Image.Image) -> Tensor:
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


class BlipCaptioner(Captioner):
    """BLIP or BLIP-2 from Hugging Face transformers; the architecture is read from the model's config.

    Args:
        model: a Hub id (``Salesforce/blip-image-captioning-large``, ``Salesforce/blip2-opt-2.7b``) or a local
            directory holding the model and its processor (`save_pretrained` output).
        prompt: text the caption continues. BLIP captions start with it (``"a picture of"`` is BLIP's own
            training prefix); for BLIP-2 it is an instruction and only the continuation is kept.
        max_new_tokens: caption length limit in tokens.
        num_beams: beam width; 1 is greedy decoding.
        generate_kwargs: further `generate` arguments (``repetition_penalty``, ``min_new_tokens``, ...).
    """

    def __init__(
        self,
        model: str = "Salesforce/blip-image-captioning-large",
        prompt: str | None = None,
        max_new_tokens: int = 30,
        num_beams: int = 3,
        generate_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.model_name = model
        self.prompt = prompt
        self.generate_kwargs = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, **(generate_kwargs or {})}

    def settings(self) -> dict[str, Any]:
        return {"kind": "blip", "model": self.model_name, "prompt": self.prompt, "generate": self.generate_kwargs}

    def setup(self, device: str = "cpu", precision: Precision = "32") -> None:
        from transformers import AutoConfig, AutoProcessor, Blip2ForConditionalGeneration, BlipForConditionalGeneration

        classes = {"blip": BlipForConditionalGeneration, "blip-2": Blip2ForConditionalGeneration}
        model_type = AutoConfig.from_pretrained(self.model_name).model_type
        if model_type not in classes:
            raise ValueError(
                f"{self.model_name!r} is a {model_type!r} model; BlipCaptioner runs {sorted(classes)} models. "
                "Use CocaCaptioner for open_clip CoCa, or subclass Captioner for other architectures."
            )
        self.dtype = _check_precision(precision)
        self.device = torch.device(device)
        # Half-precision weights (not autocast) are how BLIP checkpoints are meant to run on GPU.
        self.model = classes[model_type].from_pretrained(self.model_name, dtype=self.dtype).to(self.device).eval()
        processor = AutoProcessor.from_pretrained(self.model_name)
        self.tokenizer = processor.tokenizer
        self.transform = _ImageProcessorTransform(processor.image_processor)
        self.decoder_only = model_type == "blip-2" and not self.model.config.text_config.is_encoder_decoder
        self.prompt_ids = self._prompt_ids(model_type)

    def _prompt_ids(self, model_type: str) -> Tensor | None:
        """(1, L) input ids of the prompt, or None for BLIP's own start token."""
        if model_type == "blip":
            if self.prompt is None:
                return None
            # BLIP swaps the leading [CLS] for its decoder start token and drops the trailing [SEP].
            return self.tokenizer(self.prompt, return_tensors="pt").input_ids
        config = self.model.config
        # BLIP-2 reads the query-token embeddings at these placeholder positions (what Blip2Processor inserts);
        # without a prompt the language model starts from its BOS token, as in Blip2ForConditionalGeneration.
        text = self.tokenizer(self.prompt).input_ids if self.prompt else [config.text_config.bos_token_id]
        return torch.tensor([[config.image_token_index] * config.num_query_tokens + list(text)])

    @torch.inference_mode()
    def generate(self, pixels: Tensor, label_names: Sequence[str] | None = None) -> dict[str, list]:
        batch = pixels.shape[0]
        inputs = {"pixel_values": pixels.to(self.device, self.dtype)}
        if self.prompt_ids is not None:
            # A copy per image: BLIP writes its start token into input_ids in place.
            inputs["input_ids"] = self.prompt_ids.to(self.device).repeat(batch, 1)
        tokens = self.model.generate(**inputs, **self.generate_kwargs)  # (B, L')
        if self.decoder_only:
            # A decoder-only language model returns its input ahead of the new tokens; keep only the caption.
            tokens = tokens[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return {"caption": [text.strip() for text in texts]}


def _enable_coca_sampling() -> None:
    """Re-enable CoCa's sampling decoders where open_clip switched all of CoCa generation off.

    open_clip 3.3 disables `CoCa.generate` when `transformers.BeamSearchScorer` cannot be imported, which is
    the case from transformers 5 on (open_clip #1129), although only beam search needs it. The imports before
    that one succeeded, so restoring the two logits warpers brings back ``generation_type="top_k"/"top_p"``
    exactly as open_clip implements them.
    """
    from open_clip import coca_model

    if coca_model._has_transformers:
        return
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    needed = (
        "LogitsProcessorList",
        "MinLengthLogitsProcessor",
        "RepetitionPenaltyLogitsProcessor",
        "MaxLengthCriteria",
        "StoppingCriteriaList",
    )
    missing = [name for name in needed if not hasattr(coca_model, name)]
    if missing:
        raise ValueError(
            f"open_clip's CoCa generation lacks {missing} from transformers; install a transformers "
            "version open_clip supports (pip install 'transformers<5')."
        )
    coca_model.GENERATION_TYPES.update(top_k=TopKLogitsWarper, top_p=TopPLogitsWarper)
    coca_model._has_transformers = True


class CocaCaptioner(Captioner):
    """open_clip CoCa, decoding with `CoCa.generate`, built through the open_clip backbone adapter.

    Args:
        model: an open_clip CoCa name (``coca_ViT-L-14``), or None with `config`.
        pretrained: a pretrained tag (``mscoco_finetuned_laion2B-s13B-b90k``) or a checkpoint file.
        config: an open_clip CoCa config dict (with ``multimodal_cfg``) instead of a name; random weights
            unless `pretrained` is a checkpoint file.
        generation_type: ``top_k`` with ``top_k=1`` (the default) is greedy and deterministic; ``top_p``
            samples; ``beam_search`` needs transformers < 5.
        seq_len: caption length limit in tokens, start token included.
        generate_kwargs: further `CoCa.generate` arguments (``top_k``, ``top_p``, ``temperature``,
            ``min_seq_len``, ``num_beams``, ``repetition_penalty``).
    """

    def __init__(
        self,
        model: str | None = None,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        generation_type: Literal["top_k", "top_p", "beam_search"] = "top_k",
        seq_len: int = 30,
        generate_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.spec = f"open_clip:{model}" if model else "open_clip"
        self.pretrained, self.config = pretrained, config
        defaults = {"top_k": 1} if generation_type == "top_k" else {}
        self.generate_kwargs = {
            "generation_type": generation_type,
            "seq_len": seq_len,
            **defaults,
            **(generate_kwargs or {}),
        }

    def settings(self) -> dict[str, Any]:
        return {
            "kind": "coca",
            "spec": self.spec,
            "pretrained": self.pretrained,
            "config": self.config,
            "generate": self.generate_kwargs,
        }

    def setup(self, device: str = "cpu", precision: Precision = "32") -> None:
        import open_clip
        from open_clip import coca_model

        _enable_coca_sampling()
        if self.generate_kwargs["generation_type"] == "beam_search" and not hasattr(coca_model, "BeamSearchScorer"):
            raise ValueError(
                "CoCa beam search needs transformers.BeamSearchScorer, which this transformers version "
                "lacks; use generation_type='top_k' (greedy) or install 'transformers<5'."
            )
        backbone = create_backbone(self.spec, pretrained=self.pretrained, config=self.config)
        if not isinstance(backbone.model, open_clip.CoCa):
            raise ValueError(
                f"{self.spec} (config={self.config is not None}) is a {type(backbone.model).__name__}, "
                "not a CoCa model; pick a coca_* model or a config with 'multimodal_cfg'."
            )
        self.tokenizer = backbone.io.tokenizer
        if not hasattr(self.tokenizer, "sot_token_id"):
            raise ValueError(f"CocaCaptioner decodes with open_clip's CLIP BPE tokenizer, got {type(self.tokenizer)}")
        self.device = torch.device(device)
        self.precision = precision
        self.model = backbone.model.to(self.device).eval()
        self.transform = backbone.io.eval_transform

    def _decode(self, ids: list[int]) -> str:
        """Token ids after the start token, up to the end token, as text."""
        tok = self.tokenizer
        ids = ids[1:] if ids and ids[0] == tok.sot_token_id else ids
        if tok.eot_token_id in ids:
            ids = ids[: ids.index(tok.eot_token_id)]
        return tok.decode(ids).strip()

    @torch.inference_mode()
    def generate(self, pixels: Tensor, label_names: Sequence[str] | None = None) -> dict[str, list]:
        with _autocast(self.device, self.precision):
            tokens = self.model.generate(
                pixels.to(self.device),
                sot_token_id=self.tokenizer.sot_token_id,
                eos_token_id=self.tokenizer.eot_token_id,
                **self.generate_kwargs,
            )  # (B, L')
        return {"caption": [self._decode(row) for row in tokens.tolist()]}


class KnnCaptioner(Captioner):
    """The caption of the most similar pool image under the pretrained CLIP backbone (no captioning model).

    The pool is embedded once by `anchor_clip.anchors.embed.embed_pool` (resumable; a finished directory is
    reused, e.g. the one the retrieval job made) and searched by cosine similarity with faiss.

    Label-consistency filter: unfiltered neighbours often describe a look-alike of another class, and such
    captions name classes the finetune set does not have, which costs zero-shot accuracy on those classes.
    With `label_filter`, the captioner walks down the `top_m` nearest pool images and takes the first
    caption that names the image's known class, falling back to the nearest one.

    Args:
        backbone: backbone spec (``open_clip:ViT-B-16``): the pretrained model being finetuned. It must carry
            weights (a `pretrained` tag or checkpoint, or an ``hf-hub:``/``local-dir:`` name): a randomly
            initialised model would embed the pool and the queries with different weights each time it is built.
        pool_embeddings: directory of pool embeddings (`embed_pool` output).
        pool: pair manifest, or webdataset tar paths / globs, to embed into `pool_embeddings` first (skipped
            when that directory is already complete); None to use the directory as it is.
        pretrained: pretrained tag or checkpoint of `backbone`.
        config: backbone config dict instead of a named model.
        label_filter: walk the neighbours for a caption naming the known class (needs class names).
        top_m: neighbours walked by the label filter.
        index_factory: faiss factory string; None picks exact search for small pools (see `build_index`).
        embed_batch_size: pool pairs per forward pass while embedding the pool.
        num_workers: DataLoader workers while embedding the pool.
    """

    def __init__(
        self,
        backbone: str,
        pool_embeddings: str,
        pool: str | list[str] | None = None,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        label_filter: bool = False,
        top_m: int = 20,
        index_factory: str | None = None,
        embed_batch_size: int = 256,
        num_workers: int = 4,
    ) -> None:
        if top_m < 1:
            raise ValueError(f"top_m must be at least 1, got {top_m}")
        self.backbone_spec, self.pretrained, self.config = backbone, pretrained, config
        self.pool_embeddings, self.pool = pool_embeddings, pool
        self.label_filter, self.top_m, self.index_factory = label_filter, top_m, index_factory
        self.embed_batch_size, self.num_workers = embed_batch_size, num_workers

    def settings(self) -> dict[str, Any]:
        return {
            "kind": "knn",
            "backbone": self.backbone_spec,
            "pretrained": self.pretrained,
            "config": self.config,
            "pool": self.pool,
            "pool_embeddings": str(Path(self.pool_embeddings).resolve()),
            "label_filter": self.label_filter,
            "top_m": self.top_m if self.label_filter else 1,
            "index_factory": self.index_factory,
        }

    @property
    def uses_labels(self) -> bool:
        return self.label_filter

    def setup(self, device: str = "cpu", precision: Precision = "32") -> None:
        if self.pool is not None:
            embed_pool(
                self.pool,
                self.pool_embeddings,
                backbone=self.backbone_spec,
                pretrained=self.pretrained,
                config=self.config,
                batch_size=self.embed_batch_size,
                num_workers=self.num_workers,
                device=device,
                precision=precision,
            )
        pool = load_pool_embeddings(self.pool_embeddings)
        backbone, _, identity = resolve_backbone(self.backbone_spec, pretrained=self.pretrained, config=self.config)
        if pool.backbone != identity:
            raise ValueError(
                f"{self.pool_embeddings} holds pool features of {pool.backbone}, not of {identity}; queries and pool "
                "must come from one model. Point pool_embeddings at a new directory and pass pool to embed it."
            )
        self.index: CosineIndex = build_index(pool.image, factory=self.index_factory)
        self.pool_captions: list[str] = pool.rows["caption"].astype(str).tolist()
        self.device, self.precision = torch.device(device), precision
        self.backbone: ClipBackbone = backbone.eval().to(self.device)
        self.transform = backbone.io.eval_transform

    @torch.inference_mode()
    def generate(self, pixels: Tensor, label_names: Sequence[str] | None = None) -> dict[str, list]:
        with _autocast(self.device, self.precision):
            features = self.backbone.encode_image(pixels.to(self.device))  # (B, D)
        # Half-precision towers leave norms slightly off 1; the index scores inner products as cosines.
        features = F.normalize(features.float(), dim=-1)
        filtering = self.label_filter and label_names is not None
        similarity, ids = self.index.search(features, self.top_m if filtering else 1)  # (B, k) each
        # -1 marks slots an approximate index could not fill (always at the end of a row); they are no neighbours.
        candidates = [[self.pool_captions[i] for i in row if i >= 0] for row in ids.tolist()]
        if any(not row for row in candidates):
            raise ValueError("the pool index returned no neighbour for some images; raise nprobe or use exact search")
        ranks, found = first_consistent(candidates, label_names) if filtering else ([0] * len(ids), None)
        columns = {
            "caption": [row[r] for row, r in zip(candidates, ranks, strict=True)],
            "neighbour_rank": ranks,
            "neighbour_similarity": [float(similarity[b, r]) for b, r in enumerate(ranks)],
        }
        if found is not None:
            columns["label_found"] = found
        return columns


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
        with _autocast(self.device, self.precision):
            image = self.backbone.encode_image(pixels.to(self.device))
            text = self.backbone.encode_text(self.backbone.tokenize(captions))
        similarity = (F.normalize(image.float(), dim=-1) * F.normalize(text.float(), dim=-1)).sum(-1)  # (B,)
        return similarity.cpu().tolist()


# --------------------------------------------------------------------------------------------------
# The sharded job
# --------------------------------------------------------------------------------------------------


class _ShardImages(Dataset):
    """Rows of one shard: decoded once per image, then transformed for the captioner (and the scorer)."""

    def __init__(self, paths: Sequence[str], transforms: dict[str, ImageTransform]) -> None:
        self.paths, self.transforms = list(paths), transforms

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image = load_image(self.paths[index])
        except OSError as err:
            raise ValueError(f"cannot read finetune image {self.paths[index]}: {err}") from err
        return {"index": index, **{key: transform(image) for key, transform in self.transforms.items()}}


def _shard_path(out_dir: Path, shard: int) -> Path:
    return out_dir / f"shard_{shard:05d}.parquet"


def _finished_shards(out_dir: Path, fingerprint: dict) -> dict[int, dict]:
    """Finished shards of all processes (shard -> its index entry), after checking they belong to this job."""
    finished: dict[int, dict] = {}
    for index_file in sorted(out_dir.glob("index-*.json")):
        state = json.loads(index_file.read_text())
        check_fingerprint(state["fingerprint"], fingerprint, out_dir, f"captions ({index_file.name})")
        finished.update({int(shard): entry for shard, entry in state["shards"].items()})
    return finished


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """This process's rank, from the arguments or torchrun's RANK/WORLD_SIZE variables (else 0 of 1)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def _process_device(device: str) -> str:
    """Under torchrun, a bare "cuda" means this process's own GPU (LOCAL_RANK)."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


@dataclass
class CaptionResult:
    """What one process of the job did.

    Attributes:
        captioned: images this process captioned in this run (0 when every shard was already done).
        table: the merged caption table, or None when other processes still had shards to finish.
        report: the report written next to the table, or None with `table`.
    """

    captioned: int
    table: Path | None
    report: dict[str, Any] | None


def caption_finetune_set(
    finetune: str,
    out_dir: str,
    captioner: Captioner,
    classnames: str | list[str] | None = None,
    other_classnames: str | list[str] | None = None,
    score_backbone: str | None = None,
    score_pretrained: str | None = None,
    score_backbone_config: dict[str, Any] | None = None,
    score_threshold: float | None = None,
    fallback_template: str = "a photo of a {}.",
    table: str = "captions.parquet",
    batch_size: int = 64,
    num_workers: int = 4,
    device: str = "cpu",
    precision: Precision = "32",
    shard_size: int = 10_000,
    rank: int | None = None,
    world_size: int | None = None,
) -> CaptionResult:
    """Caption every image of a finetune manifest into resumable shards, then merge them into one table.

    Args:
        finetune: finetune manifest (`image_id`, `filepath`, `label`; docs/formats.md).
        out_dir: shard directory; finished shards found there are kept.
        captioner: a `BlipCaptioner`, `CocaCaptioner`, `KnnCaptioner` or any `Captioner`.
        classnames: finetune class names (list or file; label i names line i). Needed by the kNN label filter
            and the score fallback; with them the report counts how often captions name the image's class.
        other_classnames: class names outside the finetune set (e.g. the zero-shot evaluation classes); the
            report counts captions that name one of them.
        score_backbone: backbone spec that scores each image-caption pair by cosine similarity (a `score` column).
        score_pretrained: pretrained tag or checkpoint of `score_backbone`.
        score_backbone_config: config dict of `score_backbone` instead of a named model.
        score_threshold: captions scoring below it are replaced by `fallback_template` with the image's class
            name in the merged table, since the caption stream needs a text for every finetune image. Applied at
            merge time, so changing it re-captions nothing.
        fallback_template: class prompt for replaced captions (one `{}`).
        table: file name of the merged table in `out_dir`; its extension picks the format (.parquet keeps
            empty captions and string ids exactly; CSV turns an empty caption into "nan" on reading).
        batch_size: images per `generate` call.
        num_workers: DataLoader workers decoding and transforming images.
        device: torch device; under torchrun, "cuda" means this process's GPU.
        precision: "32", "16" or "bf16".
        shard_size: manifest rows per shard (the unit of resumption).
        rank: this process's index among `world_size`; None reads torchrun's RANK (else 0).
        world_size: number of processes splitting the shards; None reads WORLD_SIZE (else 1).

    Returns:
        What this process did, with the merged table when it was the one to write it.
    """
    if batch_size <= 0 or shard_size <= 0:
        raise ValueError(f"batch_size and shard_size must be positive, got {batch_size} and {shard_size}")
    _check_precision(precision)
    manifest = read_table(finetune, required=("image_id", "filepath", "label"), what="finetune manifest")
    if manifest.empty:
        raise ValueError(f"finetune manifest {finetune} has no rows; there is nothing to caption")
    duplicated = manifest["image_id"][manifest["image_id"].duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(
            f"finetune manifest {finetune} repeats image_id values {duplicated[:5]}; ids must be unique "
            "because the caption table is keyed by them"
        )
    names = read_classnames(classnames, what="classnames") if classnames is not None else None
    if names is not None:
        bad = sorted(set(manifest["label"][(manifest["label"] < 0) | (manifest["label"] >= len(names))]))
        if bad:
            raise ValueError(
                f"labels {bad[:5]} of {finetune} do not index the {len(names)} class names; "
                "check that the class-name list belongs to this manifest"
            )
    if names is None and (captioner.uses_labels or score_threshold is not None):
        raise ValueError(
            "classnames are required by the kNN label filter and by score_threshold (the fallback text "
            "names the class); pass --classnames"
        )
    if score_threshold is not None and score_backbone is None:
        raise ValueError("score_threshold needs score_backbone, the CLIP model that scores captions")
    if "{}" not in fallback_template:
        raise ValueError(f"fallback_template needs one '{{}}' for the class name, got {fallback_template!r}")
    if Path(table).suffix.lower() not in (".csv", ".jsonl", ".parquet") or Path(table).name != table:
        raise ValueError(f"table must be a file name ending in .parquet, .csv or .jsonl, got {table!r}")
    scorer = CaptionScorer(score_backbone, score_pretrained, score_backbone_config) if score_backbone else None

    ids = manifest["image_id"].tolist()
    n_shards = -(-len(ids) // shard_size)
    fingerprint = {
        "rows": len(ids),
        "image_ids_sha1": hashlib.sha1("\n".join(ids).encode()).hexdigest(),
        "shard_size": shard_size,
        "captioner": captioner.settings(),
        "scorer": scorer.settings() if scorer else None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world_size = _rank_and_world(rank, world_size)
    finished = _finished_shards(out, fingerprint)
    todo = [s for s in range(rank, n_shards, world_size) if s not in finished]

    captioned = 0
    if todo:
        device = _process_device(device)
        paths = resolve_paths(manifest, finetune)
        label_names = [names[label] for label in manifest["label"]] if names is not None else None
        captioner.setup(device, precision)
        transforms = {"pixels": captioner.transform}
        if scorer is not None:
            scorer.setup(device, precision)
            transforms["score_pixels"] = scorer.transform
        index_file = out / f"index-{rank:05d}.json"
        state = (
            json.loads(index_file.read_text()) if index_file.exists() else {"fingerprint": fingerprint, "shards": {}}
        )
        for shard in todo:
            rows = slice(shard * shard_size, min((shard + 1) * shard_size, len(ids)))
            start = time.perf_counter()
            columns = _caption_shard(
                paths[rows],
                label_names[rows] if label_names else None,
                captioner,
                scorer,
                transforms,
                batch_size,
                num_workers,
                pin_memory=device.startswith("cuda"),
            )
            write_table(pd.DataFrame({"image_id": ids[rows], **columns}), _shard_path(out, shard))
            state["shards"][str(shard)] = {
                "rows": rows.stop - rows.start,
                "seconds": time.perf_counter() - start,
                "device": device,
                "precision": precision,
                "batch_size": batch_size,
            }
            write_json(state, index_file)
            captioned += rows.stop - rows.start
            seconds = state["shards"][str(shard)]["seconds"]
            logger.info(
                "rank %d: shard %d of %d, %d images in %.1f s (%.1f images/s)",
                rank,
                shard + 1,
                n_shards,
                rows.stop - rows.start,
                seconds,
                (rows.stop - rows.start) / seconds,
            )
        finished = _finished_shards(out, fingerprint)

    if len(finished) < n_shards:
        return CaptionResult(captioned, None, None)
    merged, report = _merge(
        out, manifest, n_shards, finished, names, other_classnames, fingerprint, score_threshold, fallback_template
    )
    table_path = write_table(merged, out / table)
    report["table"] = str(table_path)
    write_json(report, out / "report.json")
    return CaptionResult(captioned, table_path, report)


def _caption_shard(
    paths: Sequence[str],
    label_names: Sequence[str] | None,
    captioner: Captioner,
    scorer: CaptionScorer | None,
    transforms: dict[str, ImageTransform],
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
) -> dict[str, list]:
    """Columns (caption, captioner extras, score) for the images of one shard, in order."""
    loader = DataLoader(
        _ShardImages(paths, transforms),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
    columns: dict[str, list] = {}
    for batch in loader:
        names = [label_names[i] for i in batch["index"].tolist()] if label_names is not None else None
        out = captioner.generate(batch["pixels"], names)
        if scorer is not None:
            out["score"] = scorer.score(batch["score_pixels"], out["caption"])
        for key, values in out.items():
            columns.setdefault(key, []).extend(values)
    return columns


def _merge(
    out: Path,
    manifest: pd.DataFrame,
    n_shards: int,
    finished: dict[int, dict],
    names: list[str] | None,
    other_classnames: str | list[str] | None,
    fingerprint: dict,
    score_threshold: float | None,
    fallback_template: str,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The caption table in manifest order (threshold applied) and the report describing it."""
    merged = pd.concat(
        [
            read_table(_shard_path(out, s), required=("image_id", "caption"), what=f"caption shard {s}")
            for s in range(n_shards)
        ],
        ignore_index=True,
    )
    if merged["image_id"].tolist() != manifest["image_id"].tolist():
        raise ValueError(
            f"the shards in {out} do not line up with the finetune manifest's image ids; delete {out} and caption again"
        )
    captioner_captions = merged["caption"].tolist()
    labels = manifest["label"].tolist()
    seconds = sum(entry["seconds"] for entry in finished.values())
    report: dict[str, Any] = {
        "images": len(merged),
        "shards": n_shards,
        "shard_size": fingerprint["shard_size"],
        "seconds": seconds,
        "images_per_second_per_process": len(merged) / seconds if seconds > 0 else None,
        "devices": sorted({entry["device"] for entry in finished.values()}),
        "precision": sorted({entry["precision"] for entry in finished.values()}),
        "captioner": fingerprint["captioner"],
        "score": None,
        "label_filter": None,
        "class_mentions": None,
    }
    if "score" in merged:
        score = {**fingerprint["scorer"], "threshold": score_threshold, "mean": float(merged["score"].mean())}
        if score_threshold is not None:
            below = merged["score"] < score_threshold
            merged["captioner_caption"] = captioner_captions
            merged["below_threshold"] = below
            replaced_labels = manifest["label"].to_numpy()[below.to_numpy()]
            merged.loc[below, "caption"] = [fallback_template.format(names[label]) for label in replaced_labels]
            score.update(below_threshold=int(below.sum()), fallback_template=fallback_template)
        report["score"] = score
    if "label_found" in merged:
        found, rank = merged["label_found"].astype(bool), merged["neighbour_rank"]
        report["label_filter"] = {
            "top_m": fingerprint["captioner"]["top_m"],
            "kept_nearest": int((found & (rank == 0)).sum()),
            "replaced": int((rank > 0).sum()),
            "fell_back": int((~found).sum()),
        }
    if names is not None:
        others = read_classnames(other_classnames, what="other_classnames") if other_classnames else None
        report["class_mentions"] = {"captioner": mention_rates(captioner_captions, labels, names, others)}
        if score_threshold is not None:
            report["class_mentions"]["table"] = mention_rates(merged["caption"].tolist(), labels, names, others)
    return merged, report


def main(args: list[str] | None = None) -> CaptionResult:
    """`python -m anchor_clip.caption`: `caption_finetune_set` from the command line or a YAML file (--config)."""
    from jsonargparse import CLI

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = CLI(caption_finetune_set, args=args, as_positional=False, prog="python -m anchor_clip.caption")
    if result.table is None:
        print(f"captioned {result.captioned} images; other processes still have shards to finish")
    else:
        print(f"captioned {result.captioned} images; caption table: {result.table}")
        print(json.dumps({k: v for k, v in result.report.items() if k != "captioner"}, indent=2))
    return result
