"""The finetune stream, which also carries the caption-anchor texts of the same images.

ARF's caption anchors pair the *finetune images* with captioner text. Serving both texts with one image
lets the module encode each image once for the two losses (see `AnchorFinetuneModule.encode_streams`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from anchor_clip.backbones.base import ImageTransform
from anchor_clip.data.images import LabelledImages
from anchor_clip.data.tables import check_templates, check_unique, read_table


class FinetuneImages(LabelledImages):
    """Labelled finetune images with a class prompt and, optionally, a caption per image.

    Args:
        manifest: table with `image_id`, `filepath`, `label`.
        classnames: the finetune class names.
        templates: prompt templates with a `{c}` for the class name; one is drawn per image and step
            (FLYP trains on the prompt texts, not a fixed head) from torch's RNG, which the training loader
            seeds per item (`GuardedItems`), so the draw is a function of (seed, epoch, position).
        transform: training image transform.
        captions: optional caption table (`image_id`, `caption`) covering every finetune image.
    """

    def __init__(self, manifest: str | Path, classnames: str | Sequence[str], templates: Sequence[str],
                 transform: ImageTransform, captions: str | Path | None = None) -> None:
        super().__init__(manifest, classnames, transform, what="data.finetune",
                         required=("image_id", "filepath", "label"))
        check_templates(templates, "data.templates")
        self.templates = list(templates)
        self.captions = None if captions is None else self._match_captions(captions)

    def _match_captions(self, path: str | Path) -> list[str]:
        table = read_table(path, required=("image_id", "caption"), what="data.captions",
                           nonempty=("image_id", "caption"))
        check_unique(table, "image_id", "data.captions", path)
        by_id = dict(zip(table["image_id"], table["caption"], strict=True))
        ids = self.frame["image_id"].tolist()
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ValueError(
                f"data.captions: {path} has no caption for {len(missing)} of {len(ids)} finetune images "
                f"(first: {missing[:5]}); it may belong to another dataset. Re-run `python -m anchor_clip.caption`."
            )
        return [by_id[i] for i in ids]

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        template = self.templates[torch.randint(len(self.templates), ()).item()]
        item["texts"] = template.format(c=self.classnames[int(item["labels"])])
        if self.captions is not None:
            item["captions"] = self.captions[index]
        return item
