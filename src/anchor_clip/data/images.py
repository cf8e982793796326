"""Image-reading datasets shared by the streams: labelled images (finetune and evaluation sets)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
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
    """An image file that is missing or does not decode; the training streams skip it (see `data.unreadable`).

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


class DecodedImages:
    """Every image of a stream decoded once into one (N, H, W, 3) uint8 array, read back as PIL images.

    A small image spends more of its loading time in the file read and PNG decode than in its transform, and a
    training stream decodes each file again every epoch. Decoded once, an epoch costs only the transforms, and
    they see the same pixels. One array rather than N image objects, so that forked DataLoader workers share
    its pages instead of copying them. An unreadable file raises `UnreadableImage` when its index is read, as
    it would from disk, so the streams skip and count it the same way.
    """

    def __init__(self, pixels: np.ndarray, unreadable: dict[int, UnreadableImage]) -> None:
        self.pixels, self.unreadable = pixels, unreadable

    @classmethod
    def decode(cls, paths: Sequence[str], max_mb: float, what: str) -> DecodedImages | None:
        """Decode `paths`, or None (the files stay on disk) if they differ in size or exceed `max_mb`."""
        pixels, unreadable = None, {}
        for index, path in enumerate(paths):
            try:
                image = np.asarray(read_image(path))  # (H, W, 3) uint8
            except UnreadableImage as err:
                unreadable[index] = err
                continue
            if pixels is None:
                needed_mb = len(paths) * image.nbytes / 2**20
                if needed_mb > max_mb:
                    warnings.warn(f"{what}: its {len(paths)} images need {needed_mb:.0f} MB decoded, more than "
                                  f"data.decoded_cache_mb={max_mb:g}; reading the files every epoch", stacklevel=2)
                    return None
                pixels = np.empty((len(paths), *image.shape), dtype=np.uint8)
            if image.shape != pixels.shape[1:]:
                warnings.warn(f"{what}: {path} is {image.shape[1]}x{image.shape[0]} px but the stream's first "
                              f"image is {pixels.shape[2]}x{pixels.shape[1]}; one array needs one size, so the "
                              "files are read every epoch", stacklevel=2)
                return None
            pixels[index] = image
        return None if pixels is None else cls(pixels, unreadable)

    def __getitem__(self, index: int) -> np.ndarray:
        """The (H, W, 3) uint8 pixels of one image: a view into the shared array, not a copy."""
        if index in self.unreadable:
            raise self.unreadable[index]
        return self.pixels[index]


class ImageFiles(Dataset):
    """A dataset of image files (`self.paths`) that can be decoded into memory once (`decode_once`)."""

    paths: list[str]
    transform: ImageTransform
    _decoded: DecodedImages | None = None

    def decode_once(self, max_mb: float, what: str) -> None:
        """Keep every image decoded in memory if they share a size and fit in `max_mb` (else warn, read files)."""
        self._decoded = DecodedImages.decode(self.paths, max_mb, what)

    def image(self, index: int) -> Image.Image | np.ndarray:
        """The image at `index` as `self.transform` takes it: a PIL image, or the decoded uint8 array itself.

        A transform with a true `takes_arrays` attribute gets decoded images as arrays: at 32 px, wrapping the
        pixels in a PIL image and reading them back costs as much as the transform.
        """
        if self._decoded is None:
            return read_image(self.paths[index])
        pixels = self._decoded[index]
        return pixels if getattr(self.transform, "takes_arrays", False) else Image.fromarray(pixels)


class LabelledImages(ImageFiles):
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
        return {"images": self.transform(self.image(index)), "labels": self.labels[index]}
