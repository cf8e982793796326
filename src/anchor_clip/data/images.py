"""Image-reading datasets shared by the streams: labelled images (finetune and evaluation sets)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from anchor_clip.backbones.base import ImageTransform
from anchor_clip.data.tables import check_unique, read_classnames, read_table, resolve_paths


def load_image(path: str) -> Image.Image:
    """Open an image as RGB (web data mixes greyscale, palette and RGBA files).

    An RGB file is returned as decoded: `convert` would copy it, a tenth of a small image's loading time.
    """
    with Image.open(path) as image:
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")


class UnreadableImage(Exception):
    """An image file that is missing or does not decode; the training streams skip it (see `data.robust`).

    Attributes:
        path: the file.
        reason: the underlying error, for the warning that names skipped files.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


# What PIL raises for missing, truncated or foreign files (OSError covers UnidentifiedImageError; a broken
# PNG chunk raises SyntaxError; a pixel count past PIL's limit raises DecompressionBombError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def read_image(path: str) -> Image.Image:
    """`load_image` that reports any unreadable file as `UnreadableImage`, and nothing else.

    Keeping the decode errors apart from transform or programming errors lets the loaders skip bad files
    without hiding bugs.
    """
    try:
        return load_image(path)
    except _DECODE_ERRORS as err:
        # the error's own text, unless it only repeats the path ("cannot identify image file '<path>'")
        reason = type(err).__name__ if path in str(err) or not str(err) else f"{type(err).__name__}: {err}"
        raise UnreadableImage(path, reason) from err


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
        self.frame = read_table(manifest, required=required, what=what,
                                nonempty=[c for c in required if c != "label"])
        if self.frame.empty:
            raise ValueError(f"{what}: {manifest} has no rows")
        if "image_id" in self.frame.columns:
            check_unique(self.frame, "image_id", what, manifest)
        self.classnames = read_classnames(classnames, what=f"{what}.classnames")
        labels = self.frame["label"]
        if not pd.api.types.is_integer_dtype(labels):
            bad = self.frame.index[pd.to_numeric(labels, errors="coerce").isna()].tolist()
            raise ValueError(f"{what}: {manifest} has non-integer labels (dtype {labels.dtype}, first bad rows "
                             f"{bad[:5]}); labels index the class-name list, 0..C-1")
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
        return {"images": self.transform(read_image(self.paths[index])), "labels": self.labels[index]}
