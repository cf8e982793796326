"""kNN captions: the caption of the nearest pool images by CLIP similarity, checked against the label."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from anchor_clip.anchors.captioners.base import Captioner
from anchor_clip.anchors.embed import (
    embed_pool,
    load_pool_embeddings,
    resolve_backbone,
)
from anchor_clip.anchors.index import CosineIndex, build_index
from anchor_clip.anchors.mentions import first_consistent
from anchor_clip.backbones import ClipBackbone
from anchor_clip.precision import Precision, autocast


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
