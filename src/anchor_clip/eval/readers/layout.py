"""Helpers the readers share: folders, files and class-folder image listings, raising `LayoutError`s."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from anchor_clip.eval import projections
from anchor_clip.eval.datasets import LayoutError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})



def require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise LayoutError(f"folder {str(path)!r} does not exist")
    return path


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise LayoutError(f"file {str(path)!r} does not exist")
    return path


def class_folders(path: Path) -> list[str]:
    names = sorted(entry.name for entry in os.scandir(require_dir(path)) if entry.is_dir())
    if not names:
        raise LayoutError(f"{str(path)!r} has no class folders")
    return names


def list_images(folder: Path) -> list[str]:
    return sorted(e.path for e in os.scandir(folder) if e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS)


def folder_samples(base: Path, folders: Sequence[str]) -> tuple[list[str], list[int]]:
    """Images of `base/<folders[i]>/*` with label i."""
    paths, labels = [], []
    for label, folder in enumerate(folders):
        files = list_images(require_dir(base / folder))
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise LayoutError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the class folders of {str(base)!r}")
    return paths, labels


def check_wnids(folders: Sequence[str], where: Path) -> None:
    wnids = projections.imagenet_wnids()
    if list(folders) != wnids:
        missing, extra = sorted(set(wnids) - set(folders)), sorted(set(folders) - set(wnids))
        raise LayoutError(f"{str(where)!r} must hold one folder per ImageNet class ({len(wnids)} wnids); found "
                          f"{len(folders)} folders, missing {missing[:5]}, unexpected {extra[:5]}")
