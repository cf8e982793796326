"""The specs the data, the module and the evaluation share: evaluation sets, zero-shot heads, logit projections.

They live apart from `data` and `eval` so that either can name them without importing the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

#: FLYP's class prompt, the finetune and zero-shot head template when a config gives none.
DEFAULT_TEMPLATES = ("a photo of a {c}.",)


class LogitProjection:
    """Maps (B, C_head) logits of a head onto the (B, C_set) classes of an evaluation set.

    Attributes:
        num_head_classes: width of the head the projection expects (e.g. 1000 for ImageNet).
        num_classes: number of classes of the set, i.e. the width of the projected logits.
    """

    def __init__(self, num_head_classes: int, num_classes: int) -> None:
        self.num_head_classes = num_head_classes
        self.num_classes = num_classes

    def __call__(self, logits: Tensor) -> Tensor:
        """(B, C_head) -> (B, C_set)."""
        if logits.ndim != 2 or logits.shape[1] != self.num_head_classes:
            raise ValueError(
                f"{type(self).__name__} expects (B, {self.num_head_classes}) logits of the full head, "
                f"got shape {tuple(logits.shape)}; build the head from the set's head class names"
            )
        return self.project(logits)

    def project(self, logits: Tensor) -> Tensor:
        raise NotImplementedError


@dataclass
class EvalSet:
    """A named evaluation set: its images, labels and its *own* class names (zero-shot sets differ from ID).

    Attributes:
        name: used in metric names, `val/<name>/acc`.
        manifest: table with `filepath`, `label`.
        classnames: list or file; the zero-shot head has one row per name.
        templates: prompt templates for its zero-shot head; None uses `AnchorDataModule.eval_templates`.
    """

    name: str
    manifest: str
    classnames: str | list[str]
    templates: list[str] | None = None


@dataclass(frozen=True)
class EvalSpec:
    """What the module needs to build a set's zero-shot head and score it.

    Attributes:
        name: the set's name in metric keys.
        classnames: one head row per name (for ImageNet-A/R/ObjectNet: the 1000 ImageNet names).
        templates: prompt templates with `{c}`.
        project: maps (B, len(classnames)) head logits to (B, num_classes) set logits (class subsets, pooling).
    """

    name: str
    classnames: list[str]
    templates: list[str]
    project: LogitProjection | None = None

    @property
    def num_classes(self) -> int:
        return self.project.num_classes if self.project is not None else len(self.classnames)
