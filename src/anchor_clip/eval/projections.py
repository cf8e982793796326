"""The ImageNet label space and the logit projections that map it onto the classes of a shifted set.

ImageNet-A and ImageNet-R hold 200 of the 1000 ImageNet classes, and ObjectNet 113 classes that each
cover one or more ImageNet classes. Their evaluation protocol (CLIP, WiSE-FT, FLYP) scores the
1000-way ImageNet head and then *projects* the logits onto the set's classes: a column subset for
A/R, a max over each class's ImageNet columns for ObjectNet. A projection is an explicit object that
checks the head width it receives, so a head of the wrong size fails loudly instead of being passed
through unprojected.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from torch import Tensor

from anchor_clip.specs import LogitProjection


def imagenet_classnames() -> list[str]:
    """The 1000 ImageNet class names (open_clip's cleaned CLIP names), index i = class i in wnid-sorted order."""
    return list(IMAGENET_CLASSNAMES)


def imagenet_wnids() -> list[str]:
    """The 1000 ILSVRC-2012 WordNet ids in the standard (sorted) label order, from timm's bundled synset list.

    The list ships with timm (a dependency of open_clip), so sets that hold only some of the classes
    (ImageNet-A/R) can be placed in the 1000-way label space without the ImageNet folders at hand.
    """
    try:
        from timm.data import ImageNetInfo
    except ImportError as err:  # pragma: no cover - timm comes with open_clip_torch
        raise ValueError("the ImageNet wnid list comes from timm; install it with `pip install timm`") from err
    wnids = list(ImageNetInfo("imagenet-1k").label_names())
    if wnids != sorted(wnids) or len(wnids) != len(imagenet_classnames()):
        raise ValueError(f"timm's imagenet-1k synset list ({len(wnids)} ids) is not the sorted 1000-class order")
    return wnids


class ClassSubset(LogitProjection):
    """Keep the head columns of a subset of classes (ImageNet-A/R): the argmax is taken over the subset only.

    Args:
        indices: head class index of each set class, in the set's label order.
        num_head_classes: width of the full head.
    """

    def __init__(self, indices: Sequence[int], num_head_classes: int) -> None:
        indices = [int(i) for i in indices]
        if not indices or len(set(indices)) != len(indices):
            raise ValueError(f"a class subset needs distinct indices, got {indices[:10]}")
        bad = [i for i in indices if not 0 <= i < num_head_classes]
        if bad:
            raise ValueError(f"class subset indices {bad[:5]} are outside a head of {num_head_classes} classes")
        super().__init__(num_head_classes, len(indices))
        self.indices = torch.tensor(indices, dtype=torch.long)

    def project(self, logits: Tensor) -> Tensor:
        return logits[:, self.indices.to(logits.device)]  # (B, C_head) -> (B, C_set)

    def to_head_classes(self, predictions: Tensor) -> Tensor:
        """Map set-class predictions (B,) back to head class ids (B,), e.g. ImageNet indices."""
        return self.indices.to(predictions.device)[predictions]


class PooledClasses(LogitProjection):
    """Max over the head columns of each set class (ObjectNet: one class covers several ImageNet classes).

    The max follows the ObjectNet protocol of WiSE-FT/FLYP: a set class scores as its best-matching
    head class.

    Args:
        groups: for each set class, the head class indices it covers (non-empty).
        num_head_classes: width of the full head.
    """

    def __init__(self, groups: Sequence[Sequence[int]], num_head_classes: int) -> None:
        groups = [[int(i) for i in group] for group in groups]
        if not groups or any(not group for group in groups):
            raise ValueError("pooled classes need at least one class, each covering at least one head class")
        bad = [i for group in groups for i in group if not 0 <= i < num_head_classes]
        if bad:
            raise ValueError(f"pooled class indices {bad[:5]} are outside a head of {num_head_classes} classes")
        super().__init__(num_head_classes, len(groups))
        width = max(len(group) for group in groups)
        # Pad each group with its own first index: a repeated column leaves the max unchanged.
        self.index = torch.tensor([group + group[:1] * (width - len(group)) for group in groups])  # (C_set, K)

    def project(self, logits: Tensor) -> Tensor:
        gathered = logits[:, self.index.to(logits.device)]  # (B, C_head) -> (B, C_set, K)
        return gathered.amax(dim=-1)  # (B, C_set)


def objectnet_classes(mappings: Path, num_head_classes: int) -> tuple[list[str], list[str], list[list[int]]]:
    """ObjectNet's classes that overlap ImageNet, from the release's `mappings/` folder.

    The release maps each ObjectNet label to '; '-joined ImageNet names (`objectnet_to_imagenet_1k.json`);
    line i of `imagenet_to_label_2012_v2` names ILSVRC-2012 id i, and `pytorch_to_imagenet_2012_id.json`
    places those ids in the sorted-wnid order that heads use.

    Returns:
        folders: image folder of each overlapping class, sorted (the set's label order).
        labels: ObjectNet label of each folder.
        groups: head (ImageNet) class indices each class covers.
    """
    folder_to_label = json.loads((mappings / "folder_to_objectnet_label.json").read_text())
    to_imagenet = json.loads((mappings / "objectnet_to_imagenet_1k.json").read_text())
    lines = (mappings / "imagenet_to_label_2012_v2").read_text().splitlines()
    names_2012 = {line.strip(): i for i, line in enumerate(lines) if line.strip()}
    pytorch_to_2012 = json.loads((mappings / "pytorch_to_imagenet_2012_id.json").read_text())
    head_of_2012 = {int(v): int(k) for k, v in pytorch_to_2012.items()}
    label_to_folder = {label: folder for folder, label in folder_to_label.items()}
    unknown = [label for label in to_imagenet if label not in label_to_folder]
    if unknown:
        raise ValueError(f"objectnet_to_imagenet_1k.json names labels {unknown[:5]} that no image folder has "
                         "(folder_to_objectnet_label.json); the mapping files come from different releases")
    folders = sorted(label_to_folder[label] for label in to_imagenet)
    groups = []
    for folder in folders:
        names = to_imagenet[folder_to_label[folder]].split("; ")
        missing = [n for n in names if n not in names_2012 or names_2012[n] not in head_of_2012]
        if missing:
            raise ValueError(f"ObjectNet class {folder!r} maps to ImageNet names {missing} that "
                             "imagenet_to_label_2012_v2 / pytorch_to_imagenet_2012_id.json do not resolve")
        groups.append(sorted(head_of_2012[names_2012[n]] for n in names))
    bad = [i for group in groups for i in group if i >= num_head_classes]
    if bad:
        raise ValueError(f"ObjectNet mapping points at head classes {bad[:5]}, beyond the {num_head_classes} "
                         "ImageNet classes")
    return folders, [folder_to_label[f] for f in folders], groups
