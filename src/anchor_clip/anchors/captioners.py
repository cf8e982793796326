"""Captioners for ARF's text-compensated anchors: BLIP / BLIP-2, open_clip CoCa, and kNN over a pool.

Each turns a batch of finetune images into captions (`Captioner.generate`); the sharded job in
`anchors.caption` drives them. `CaptionScorer` rates image–caption pairs with a CLIP for filtering.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from anchor_clip.anchors.embed import (
    embed_pool,
    load_pool_embeddings,
    resolve_backbone,
)
from anchor_clip.anchors.index import CosineIndex, build_index
from anchor_clip.anchors.mentions import first_consistent
from anchor_clip.backbones import ClipBackbone, create_backbone
from anchor_clip.backbones.base import ImageTransform
from anchor_clip.precision import Precision, autocast, check_precision


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
        self.dtype = check_precision(precision)
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
        with autocast(self.device, self.precision):
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
        with autocast(self.device, self.precision):
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
        with autocast(self.device, self.precision):
            image = self.backbone.encode_image(pixels.to(self.device))
            text = self.backbone.encode_text(self.backbone.tokenize(captions))
        similarity = (F.normalize(image.float(), dim=-1) * F.normalize(text.float(), dim=-1)).sum(-1)  # (B,)
        return similarity.cpu().tolist()

