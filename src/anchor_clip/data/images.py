"""Image-reading datasets shared by the streams: labelled images (finetune and evaluation sets)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from anchor_clip.backbones.base import ImageTransform
from anchor_clip.data.tables import read_classnames, read_table, resolve_paths


def load_image(path: str) -> Image.Image:
    """Open an image as RGB (web data mixes greyscale, palette and RGBA files)."""
    with Image.open(path) as image:
        return image.convert("RGB")


class LabelledImages(Dataset):
    """Images with integer labels into a class-name list: an evaluation set, or the base of the finetune stream.

    Args:
        manifest: table with `filepath` and `label` columns (see docs/formats.md).
        classnames: list of names or a file with one per line; label i names `classnames[i]`.
        transform: PIL image -> (3, H, W) tensor.
        what: the config field this set comes from, named in errors.
    """

    def __init__(self, manifest: str | Path, classnames: str | Sequence[str], transform: ImageTransform,
                 what: str = "dataset", required: Sequence[str] = ("filepath", "label")) -> None:
        self.frame = read_table(manifest, required=required, what=what)
        if self.frame.empty:
            raise ValueError(f"{what}: {manifest} has no rows")
        self.classnames = read_classnames(classnames, what=f"{what}.classnames")
        labels = self.frame["label"]
        bad = self.frame[(labels < 0) | (labels >= len(self.classnames))]
        if not bad.empty:
            raise ValueError(
                f"{what}: labels must index the {len(self.classnames)} class names, but {manifest} has labels "
                f"{sorted(bad['label'].unique())[:5]} (first rows {bad.index[:5].tolist()}); "
                "check that the class-name list belongs to this manifest"
            )
        self.paths = resolve_paths(self.frame, manifest)
        self.labels = torch.tensor(labels.to_numpy(), dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"images": self.transform(load_image(self.paths[index])), "labels": self.labels[index]}
