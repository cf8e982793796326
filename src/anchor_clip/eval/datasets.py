"""An evaluation set as the module scores it: images, labels, class names, head templates and a projection.

`EvalDataset` is what every reader in `eval.readers` returns and what `evaluate` scores; `from_eval_set` makes
one from a plain manifest set (`data.eval_sets`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from anchor_clip.backbones.base import ImageTransform
from anchor_clip.data.images import LabelledImages, load_image
from anchor_clip.data.tables import check_templates
from anchor_clip.eval.projections import LogitProjection
from anchor_clip.specs import EvalSet, EvalSpec


def format_templates(templates: Sequence[str | Callable[[str], str]]) -> list[str]:
    """Templates as format strings with a `{c}` slot ('a photo of a {c}.'), from strings or open_clip's lambdas."""
    return [t if isinstance(t, str) else t("{c}") for t in templates]


# The 80-prompt CLIP ensemble: what CLIP, WiSE-FT and FLYP score ImageNet and its shifts with.
OPENAI_TEMPLATES = format_templates(OPENAI_IMAGENET_TEMPLATES)


class LayoutError(ValueError):
    """A reader found a piece of its layout missing; `build_eval_dataset` adds the expected tree."""


class EvalDataset(Dataset):
    """A labelled evaluation set with what its zero-shot head needs.

    Items are `{"images": (3, H, W), "labels": ()}`, the batches `AnchorFinetuneModule`'s eval step reads.

    Args:
        name: set name, used in metric and table columns.
        paths: image files.
        labels: index into `classnames` per image.
        classnames: the set's classes (label i names `classnames[i]`).
        templates: prompt templates of the zero-shot head (`{c}` marks the class name).
        transform: PIL image -> (3, H, W) tensor, the backbone's eval transform; None lists the set only
            (give each model's transform with `with_transform`).
        head_classnames: classes of the head the set is scored with, when they differ from `classnames`
            (the 1000 ImageNet names for ImageNet-A/R and ObjectNet); needs `project`.
        project: maps (B, len(head_classnames)) head logits onto (B, len(classnames)).
        loader: opens a path as an RGB PIL image.
    """

    def __init__(self, name: str, paths: Sequence[str], labels: Sequence[int], classnames: Sequence[str],
                 templates: Sequence[str], transform: ImageTransform | None,
                 head_classnames: Sequence[str] | None = None, project: LogitProjection | None = None,
                 loader: Callable[[str], Image.Image] = load_image) -> None:
        if not paths:
            raise ValueError(f"{name}: the evaluation set has no images")
        if len(paths) != len(labels):
            raise ValueError(f"{name}: {len(paths)} paths but {len(labels)} labels")
        check_templates(templates, f"{name}.templates")
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        if self.labels.min() < 0 or self.labels.max() >= len(classnames):
            raise ValueError(f"{name}: labels span [{int(self.labels.min())}, {int(self.labels.max())}] but the set "
                             f"has {len(classnames)} classes")
        if (head_classnames is None) != (project is None):
            raise ValueError(f"{name}: head_classnames and project go together (a head wider than the set's "
                             "classes needs a projection onto them)")
        if project is not None and (project.num_classes, project.num_head_classes) != (
                len(classnames), len(head_classnames)):
            raise ValueError(f"{name}: the projection maps {project.num_head_classes} -> {project.num_classes} "
                             f"classes, but the head has {len(head_classnames)} and the set {len(classnames)}")
        self.name = name
        self.paths = list(paths)
        self.classnames = list(classnames)
        self.templates = list(templates)
        self.head_classnames = list(head_classnames) if head_classnames is not None else self.classnames
        self.project = project
        self.transform = transform
        self.loader = loader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if self.transform is None:
            raise ValueError(f"{self.name}: no image transform; read the set through with_transform(transform)")
        return {"images": self.transform(self.loader(self.paths[index])), "labels": self.labels[index]}

    @property
    def spec(self) -> EvalSpec:
        """What `AnchorFinetuneModule.build_heads` needs: the *head* class names and the templates."""
        return EvalSpec(self.name, self.head_classnames, self.templates, self.project)

    def with_transform(self, transform: ImageTransform | None) -> EvalDataset:
        """The same set read with another backbone's transform (the listing is not redone)."""
        other = copy.copy(self)
        other.transform = transform
        return other


def from_eval_set(eval_set: EvalSet, transform: ImageTransform | None, default_templates: Sequence[str]) -> EvalDataset:
    """An `EvalDataset` from a plain manifest set (`filepath,label` + class names, as in `data.eval_sets`)."""
    images = LabelledImages(eval_set.manifest, eval_set.classnames, transform, what=f"eval_sets[{eval_set.name}]")
    templates = eval_set.templates or default_templates
    return EvalDataset(eval_set.name, images.paths, images.labels.tolist(), images.classnames, templates, transform)
