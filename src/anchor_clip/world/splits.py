"""Which images each split of a world shows: its (class, style) draws and labels, before any pixel is drawn."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from anchor_clip.world.config import WorldConfig
from anchor_clip.world.scene import STYLES
from anchor_clip.world.shapes import SHAPE_NAMES

SPLIT_CODES = {"classes": 0, "pool": 1, "finetune": 2, "eval_id": 3, "eval_zeroshot": 4}  # seeds the split streams
PRETRAIN_CODE = 99  # the pretraining corpus's stream, apart from the shift sets' codes


@dataclass(frozen=True)
class Split:
    """One split's images: the class and style of each, and the label written to its table."""

    name: str
    code: int  # seeds this split's image stream
    shapes: list[str]
    styles: list[str]
    labels: list[int]
    context_bias: float = 0.0  # share of its scenes moved onto their class's home context
    web: bool = False  # worded by `describe_web` (the retrieval pool) instead of `describe`


def _balanced(cells: list[tuple[int, str]], n: int, rng: np.random.Generator) -> list[tuple[int, str]]:
    """`n` draws covering `cells` as evenly as possible, in random order."""
    extra = rng.choice(len(cells), n % len(cells), replace=False)
    chosen = cells * (n // len(cells)) + [cells[i] for i in extra]
    return [chosen[i] for i in rng.permutation(len(chosen))]


def pool_concepts(config: WorldConfig) -> tuple[str, ...]:
    """The pool's class names: the world's classes, then the pool-only concepts."""
    return SHAPE_NAMES[: config.num_classes + config.pool_extra_classes]


def _pool_split(config: WorldConfig) -> Split:
    """The retrieval pool: (class, style) drawn from a skewed class mix and the pool's style weights."""
    concepts = pool_concepts(config)
    rng = np.random.default_rng([config.seed, SPLIT_CODES["pool"]])
    ranks = rng.permutation(len(concepts))
    class_p = (ranks + 1.0) ** -config.pool_class_skew
    style_p = np.asarray(config.pool_style_weights, dtype=np.float64)
    cells = rng.choice(len(concepts) * len(config.styles), size=config.pool_size,
                       p=(np.outer(class_p / class_p.sum(), style_p / style_p.sum())).ravel())
    classes, styles = np.divmod(cells, len(config.styles))
    return Split(name="pool", code=SPLIT_CODES["pool"], shapes=[concepts[c] for c in classes],
                  styles=[config.styles[i] for i in styles], labels=[int(c) for c in classes], web=True)


def plan_pretraining(config: WorldConfig) -> Split:
    """The pretraining corpus: every world class in every style, evenly, worded by `describe`."""
    names = SHAPE_NAMES[: config.num_classes]
    cells = [(c, s) for c in range(config.num_classes) for s in config.styles]
    draws = _balanced(cells, config.pretrain_size, np.random.default_rng([config.seed, PRETRAIN_CODE]))
    return Split(name="pretrain", code=PRETRAIN_CODE, shapes=[names[c] for c, _ in draws],
                  styles=[s for _, s in draws], labels=[c for c, _ in draws])


def plan_splits(config: WorldConfig) -> tuple[list[int], list[Split]]:
    """Choose the finetune classes and every split's (class, style) draws; no pixels yet.

    Returns:
        The global indices of the finetune classes (sorted), and the splits (the pretraining corpus apart:
        `plan_pretraining`).
    """
    names = SHAPE_NAMES[: config.num_classes]
    class_rng = np.random.default_rng([config.seed, SPLIT_CODES["classes"]])
    ft = sorted(int(i) for i in class_rng.choice(config.num_classes, config.finetune_classes, replace=False))
    zs = [i for i in range(config.num_classes) if i not in ft]
    ft_label = {c: i for i, c in enumerate(ft)}
    zs_label = {c: i for i, c in enumerate(zs)}

    def split(name: str, code: int, cells: list[tuple[int, str]], n: int, labels: dict[int, int] | None,
              context_bias: float = 0.0) -> Split:
        draws = _balanced(cells, n, np.random.default_rng([config.seed, code]))
        return Split(
            name=name,
            code=code,
            shapes=[names[c] for c, _ in draws],
            styles=[s for _, s in draws],
            labels=[c if labels is None else labels[c] for c, _ in draws],
            context_bias=context_bias,
        )

    ft_cells = [(c, config.finetune_style) for c in ft]
    splits = [
        _pool_split(config),
        # only the finetune and ID images carry the context bias: the pool and the OOD sets never do
        split("finetune", SPLIT_CODES["finetune"], ft_cells, len(ft) * config.finetune_per_class, ft_label,
              config.finetune_context_bias),
        split("eval_id", SPLIT_CODES["eval_id"], ft_cells, len(ft) * config.eval_per_class, ft_label,
              config.finetune_context_bias),
    ]
    for style in config.styles:
        if style != config.finetune_style:
            code = len(SPLIT_CODES) + STYLES.index(style)
            splits.append(split(f"eval_shift_{style}", code, [(c, style) for c in ft],
                                len(ft) * config.eval_per_class, ft_label))
    zs_cells = [(c, s) for c in zs for s in config.styles]
    splits.append(split("eval_zeroshot", SPLIT_CODES["eval_zeroshot"], zs_cells, len(zs) * config.eval_per_class,
                        zs_label))
    return ft, splits
