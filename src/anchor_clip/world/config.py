"""What decides a world, and a finished world on disk: `WorldConfig` (hashed into its folder name) and `World`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from anchor_clip.world.captions import WebCaptions
from anchor_clip.world.scene import STYLES
from anchor_clip.world.shapes import SHAPE_NAMES

#: Bumped whenever drawing, wording or split logic changes, so worlds cached under an old key are not reused.
GENERATOR_VERSION = 5


@dataclass(frozen=True)
class WorldConfig:
    """Everything that decides a world's content; its hash names the world's directory."""

    seed: int = 0  # world seed: class split and every image
    num_classes: int = 40  # the first `num_classes` shapes of the catalogue: pretraining and evaluation classes
    finetune_classes: int = 20  # classes seen in finetuning; the rest are the zero-shot classes
    styles: tuple[str, ...] = STYLES  # all styles in the pool; the non-finetune ones are the shift sets
    finetune_style: str = "photo"  # the only style in the finetune set and the ID eval set
    image_size: int = 32  # pixels per side
    pretrain_size: int = 60000  # the world CLIP's pretraining corpus, balanced over (class, style)
    pool_size: int = 60000  # the retrieval pool, drawn from its own (class, style) mix and worded by `web_captions`
    pool_extra_classes: int = 12  # concepts (the next shapes of the catalogue) only the pool shows
    pool_class_skew: float = 0.5  # pool class frequency ~ rank^-skew over a seeded order, like web data's long tail
    pool_style_weights: tuple[float, ...] = (0.4, 0.15, 0.25, 0.2)  # pool style frequencies, aligned with `styles`
    web_captions: WebCaptions = field(default_factory=WebCaptions)
    finetune_per_class: int = 200  # finetune images per finetune class
    eval_per_class: int = 100  # images per class in each eval set
    # share of finetune and ID images drawn on their class's home context (`scene.home_context`); the pool and
    # the shift and zero-shot sets never are, so a finetune that learns the context pays for it out of domain.
    # Without it FLYP barely forgets in this world (3-seed means: +3.2 on the shifts, -3.5 on unseen classes)
    finetune_context_bias: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "styles", tuple(self.styles))  # YAML and JSON give lists
        object.__setattr__(self, "pool_style_weights", tuple(self.pool_style_weights))
        if isinstance(self.web_captions, dict):
            object.__setattr__(self, "web_captions", WebCaptions(**self.web_captions))
        problems = []
        if not 2 <= self.num_classes <= len(SHAPE_NAMES):
            problems.append(f"num_classes={self.num_classes} must be in [2, {len(SHAPE_NAMES)}]")
        if not 0 <= self.pool_extra_classes <= len(SHAPE_NAMES) - self.num_classes:
            problems.append(f"pool_extra_classes={self.pool_extra_classes} must be in "
                            f"[0, {len(SHAPE_NAMES)} - num_classes] (the catalogue has {len(SHAPE_NAMES)} shapes)")
        if len(self.pool_style_weights) != len(self.styles) or min(self.pool_style_weights, default=0) <= 0:
            problems.append(f"pool_style_weights={list(self.pool_style_weights)} must hold one positive weight per "
                            f"style of styles={list(self.styles)}")
        if self.pool_class_skew < 0:
            problems.append(f"pool_class_skew={self.pool_class_skew} must be >= 0")
        if not 1 <= self.finetune_classes < self.num_classes:
            problems.append(
                f"finetune_classes={self.finetune_classes} must be in [1, num_classes) so zero-shot classes remain"
            )
        unknown = [s for s in self.styles if s not in STYLES]
        if unknown or not self.styles or len(set(self.styles)) != len(self.styles):
            problems.append(f"styles={list(self.styles)} must be distinct names from {list(STYLES)}")
        if self.finetune_style not in self.styles:
            problems.append(f"finetune_style={self.finetune_style!r} must be one of styles={list(self.styles)}")
        if self.image_size < 16:
            problems.append(f"image_size={self.image_size} is too small to draw shapes; use >= 16")
        if self.pretrain_size < self.num_classes * len(self.styles):
            problems.append(
                f"pretrain_size={self.pretrain_size} must cover every (class, style) pair, "
                f"i.e. be >= num_classes * len(styles) = {self.num_classes * len(self.styles)}"
            )
        if self.pool_size < 1:
            problems.append(f"pool_size={self.pool_size} must be >= 1")
        if not 0.0 <= self.finetune_context_bias <= 1.0:
            problems.append(f"finetune_context_bias={self.finetune_context_bias} must be in [0, 1]")
        if self.finetune_per_class < 1 or self.eval_per_class < 1:
            problems.append("finetune_per_class and eval_per_class must be >= 1")
        if problems:
            raise ValueError("invalid WorldConfig: " + "; ".join(problems))

    @property
    def key(self) -> str:
        """Short hash of the config and generator version: the world's directory name."""
        payload = json.dumps({"generator_version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class EvalSplit:
    """One evaluation set: a manifest (filepath, label, ...) and the class names its labels index."""

    manifest: Path
    classnames: Path


@dataclass(frozen=True)
class World:
    """A complete world on disk; paths follow `docs/formats.md` and resolve relative to `root`."""

    root: Path
    config: WorldConfig
    classnames: tuple[str, ...]
    finetune_classnames: tuple[str, ...]
    zeroshot_classnames: tuple[str, ...]
    split_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def pool(self) -> Path:
        """Retrieval pool pair manifest (image_id, filepath, caption, label, style); labels index
        `pool_classnames_file`."""
        return self.root / "pool.csv"

    @property
    def pretrain_corpus(self) -> Path:
        """Pretraining pair manifest, same columns as the pool; built by `generate_pretraining_corpus`."""
        return self.root / "pretrain" / "pretrain.csv"

    @property
    def finetune(self) -> Path:
        """Finetune manifest (image_id, filepath, label, style); labels index `finetune_classnames_file`."""
        return self.root / "finetune.csv"

    @property
    def captions_oracle(self) -> Path:
        """The finetune images' true captions (image_id, caption): an ablation, never the default."""
        return self.root / "captions_oracle.csv"

    @property
    def classnames_file(self) -> Path:
        return self.root / "classnames.txt"

    @property
    def pool_classnames_file(self) -> Path:
        """The pool's concepts: the world's classes, then the pool-only ones."""
        return self.root / "pool_classnames.txt"

    @property
    def finetune_classnames_file(self) -> Path:
        return self.root / "finetune_classnames.txt"

    @property
    def zeroshot_classnames_file(self) -> Path:
        return self.root / "zeroshot_classnames.txt"

    @property
    def shift_styles(self) -> tuple[str, ...]:
        return tuple(s for s in self.config.styles if s != self.config.finetune_style)

    @property
    def eval_sets(self) -> dict[str, EvalSplit]:
        """Eval sets by name: ``id``, ``shift_<style>`` per shift style, ``zeroshot``."""
        sets = {"id": EvalSplit(self.root / "eval_id.csv", self.finetune_classnames_file)}
        for style in self.shift_styles:
            sets[f"shift_{style}"] = EvalSplit(self.root / f"eval_shift_{style}.csv", self.finetune_classnames_file)
        sets["zeroshot"] = EvalSplit(self.root / "eval_zeroshot.csv", self.zeroshot_classnames_file)
        return sets

    @classmethod
    def load(cls, root: str | Path) -> World:
        """Open a world directory written by `generate_world` (reads its ``world.json``)."""
        root = Path(root)
        meta_path = root / "world.json"
        if not meta_path.is_file():
            raise ValueError(f"{root} is not a complete world (no world.json); build it with generate_world()")
        meta = json.loads(meta_path.read_text())
        return cls(
            root=root,
            config=WorldConfig(**meta["config"]),
            classnames=tuple(meta["classnames"]),
            finetune_classnames=tuple(meta["finetune_classnames"]),
            zeroshot_classnames=tuple(meta["zeroshot_classnames"]),
            split_sizes=dict(meta["split_sizes"]),
        )
