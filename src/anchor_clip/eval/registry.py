"""Registry of evaluation-set readers, filled the way timm registers models: each module of `eval.readers`
decorates its readers with `register_dataset`, and importing `anchor_clip.eval` imports them all.

A reader turns one release's on-disk layout into an `EvalDataset`: image paths with labels, the set's
class names, the prompt templates of its zero-shot head and, for sets that score an ImageNet head
(ImageNet-A/R, ObjectNet), the projection from the 1000 head classes onto the set's classes.

    >>> list_datasets("imagenet*")
    ['imagenet', 'imagenet_a', 'imagenet_r', 'imagenet_sketch', 'imagenet_v2']
    >>> dataset = build_eval_dataset("imagenet_r", "/data/imagenet-r", transform)  # doctest: +SKIP

Class names come from the releases' own files or open_clip's ImageNet metadata, never from lists
typed here; a missing file or folder raises a `ValueError` that shows the expected layout.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from anchor_clip.backbones.base import ImageTransform
from anchor_clip.eval.datasets import EvalDataset, LayoutError, format_templates

Reader = Callable[[str, Path, ImageTransform | None], EvalDataset]
Role = Literal["id", "shift", "transfer"]


@dataclass(frozen=True)
class DatasetInfo:
    """A registered reader and where its set sits in the paper's tables.

    Attributes:
        name: registry name.
        reader: `(name, root, transform) -> EvalDataset`.
        layout: the expected directory tree under the root, shown in errors.
        benchmark: the table the set belongs to ('imagenet', 'domainnet', 'transfer').
        role: 'id' (the finetuning distribution), 'shift' (a shift of the benchmark's id set) or 'transfer'.
    """

    name: str
    reader: Reader
    layout: str
    benchmark: str
    role: Role


_DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(name: str, *, layout: str, benchmark: str, role: Role) -> Callable[[Reader], Reader]:
    """Function decorator adding a reader under `name` (warns when one is replaced)."""

    def wrap(reader: Reader) -> Reader:
        if name in _DATASETS and _DATASETS[name].reader is not reader:
            warnings.warn(f"evaluation dataset {name!r} re-registered", stacklevel=2)
        _DATASETS[name] = DatasetInfo(name, reader, layout.strip("\n"), benchmark, role)
        return reader

    return wrap


def list_datasets(pattern: str = "*") -> list[str]:
    """Registered dataset names matching a shell-style pattern, sorted."""
    return sorted(n for n in _DATASETS if fnmatch.fnmatch(n, pattern))


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of `name`; unknown names raise listing the available ones."""
    if name not in _DATASETS:
        close = difflib.get_close_matches(name, _DATASETS, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"unknown evaluation dataset {name!r}; available: {list_datasets()}.{hint}")
    return _DATASETS[name]


def build_eval_dataset(name: str, root: str | os.PathLike, transform: ImageTransform | None = None,
                       templates: Sequence[str] | None = None) -> EvalDataset:
    """Read a registered dataset from its release layout under `root`.

    Args:
        name: registry name (see `list_datasets()`).
        root: the dataset's root folder, laid out as `dataset_info(name).layout` shows.
        transform: PIL image -> (3, H, W) tensor, the backbone's eval transform (None: set it later).
        templates: prompt templates replacing the set's defaults.
    """
    info = dataset_info(name)
    root = Path(root).expanduser()
    try:
        if not root.is_dir():
            raise LayoutError(f"root {str(root)!r} is not a directory")
        dataset = info.reader(name, root, transform)
    except LayoutError as err:
        raise ValueError(f"{name}: {err}.\nExpected layout:\n{info.layout}") from None
    if templates is not None:
        dataset.templates = format_templates(templates)
    return dataset
