"""ImageNet and its distribution shifts: V2, Sketch, A, R (class subsets) and ObjectNet (pooled classes)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

from anchor_clip.backbones.base import ImageTransform
from anchor_clip.data.images import load_image
from anchor_clip.eval import projections
from anchor_clip.eval.datasets import OPENAI_TEMPLATES, EvalDataset, LayoutError
from anchor_clip.eval.projections import ClassSubset, PooledClasses
from anchor_clip.eval.readers.layout import (
    check_wnids,
    class_folders,
    folder_samples,
    require_dir,
    require_file,
)
from anchor_clip.eval.registry import register_dataset


def _full_imagenet(name: str, base: Path, transform: ImageTransform | None) -> EvalDataset:
    folders = class_folders(base)
    check_wnids(folders, base)
    paths, labels = folder_samples(base, folders)
    return EvalDataset(name, paths, labels, projections.imagenet_classnames(), OPENAI_TEMPLATES, transform)


@register_dataset("imagenet", benchmark="imagenet", role="id", layout="""
  <root>/
    val/
      n01440764/*.JPEG      one folder per ImageNet class (1000 wnids), sorted = label order
      ...""")
def _imagenet(name: str, root: Path, transform: ImageTransform | None) -> EvalDataset:
    return _full_imagenet(name, root / "val", transform)


@register_dataset("imagenet_sketch", benchmark="imagenet", role="shift", layout="""
  <root>/
    sketch/
      n01440764/*.JPEG      one folder per ImageNet class (1000 wnids)
      ...""")
def _imagenet_sketch(name: str, root: Path, transform: ImageTransform | None) -> EvalDataset:
    return _full_imagenet(name, root / "sketch", transform)


@register_dataset("imagenet_v2", benchmark="imagenet", role="shift", layout="""
  <root>/                   e.g. imagenetv2-matched-frequency-format-val/
    0/*.jpeg                folder name = ImageNet class index 0..999
    1/*.jpeg
    ...""")
def _imagenet_v2(name: str, root: Path, transform: ImageTransform | None) -> EvalDataset:
    classnames = projections.imagenet_classnames()
    folders = class_folders(root)
    if not all(f.isdigit() and int(f) < len(classnames) for f in folders):
        odd = [f for f in folders if not (f.isdigit() and int(f) < len(classnames))]
        raise LayoutError(f"class folders must be ImageNet indices 0..{len(classnames) - 1}, found {odd[:5]}")
    paths, positions = folder_samples(root, folders)
    labels = [int(folders[p]) for p in positions]
    return EvalDataset(name, paths, labels, classnames, OPENAI_TEMPLATES, transform)


def _imagenet_subset(name: str, root: Path, transform: ImageTransform | None) -> EvalDataset:
    """ImageNet-A/R: the classes are the wnid folders present (200 in the releases), scored on the 1000-way head."""
    folders = class_folders(root)
    position = {wnid: i for i, wnid in enumerate(projections.imagenet_wnids())}
    unknown = [f for f in folders if f not in position]
    if unknown:
        raise LayoutError(f"folders {unknown[:5]} are not ImageNet wnids")
    indices = [position[f] for f in folders]
    head = projections.imagenet_classnames()
    paths, labels = folder_samples(root, folders)
    return EvalDataset(name, paths, labels, [head[i] for i in indices], OPENAI_TEMPLATES, transform,
                       head_classnames=head, project=ClassSubset(indices, len(head)))


_SUBSET_LAYOUT = """
  <root>/                   e.g. imagenet-{}/
    n01443537/*.jpg         one folder per class of the set (200 ImageNet wnids)
    ..."""
register_dataset("imagenet_a", benchmark="imagenet", role="shift", layout=_SUBSET_LAYOUT.format("a"))(_imagenet_subset)
register_dataset("imagenet_r", benchmark="imagenet", role="shift", layout=_SUBSET_LAYOUT.format("r"))(_imagenet_subset)


def _load_without_border(path: str, border: int = 2) -> Image.Image:
    """ObjectNet images carry a thin red frame; the ObjectNet protocol of WiSE-FT/FLYP crops 2 px off each side."""
    return ImageOps.crop(load_image(path), border=border)


@register_dataset("objectnet", benchmark="imagenet", role="shift", layout="""
  <root>/                   objectnet-1.0/
    images/
      air_freshener/*.png   one folder per ObjectNet class
      ...
    mappings/
      folder_to_objectnet_label.json
      objectnet_to_imagenet_1k.json
      imagenet_to_label_2012_v2
      pytorch_to_imagenet_2012_id.json""")
def _objectnet(name: str, root: Path, transform: ImageTransform | None) -> EvalDataset:
    mappings = require_dir(root / "mappings")
    for file in ("folder_to_objectnet_label.json", "objectnet_to_imagenet_1k.json", "imagenet_to_label_2012_v2",
                 "pytorch_to_imagenet_2012_id.json"):
        require_file(mappings / file)
    head = projections.imagenet_classnames()
    folders, labels, groups = projections.objectnet_classes(mappings, len(head))
    paths, positions = folder_samples(require_dir(root / "images"), folders)
    return EvalDataset(name, paths, positions, labels, OPENAI_TEMPLATES, transform, head_classnames=head,
                       project=PooledClasses(groups, len(head)), loader=_load_without_border)
