"""Building a world on disk: config, the paper's splits, and the cached, atomic write.

A world lives under ``root/<config key>/``. It is built in a hidden temporary directory beside it and
renamed into place only when every image and table is written, so a killed build never leaves a world
that looks complete, and a second call with the same config reuses the first one's result.

Splits (mirroring ARF's setup, with styles standing in for ImageNet's distribution shifts):

| file | classes | styles | labels index |
|---|---|---|---|
| ``pretrain/pretrain.csv`` (image_id, filepath, caption, label, style) | all, even | all, even | ``classnames.txt`` |
| ``pool.csv`` (same columns) | all + pool-only, skewed | all, skewed | ``pool_classnames.txt`` |
| ``finetune.csv`` (image_id, filepath, label, style) | finetune | finetune style | ``finetune_classnames.txt`` |
| ``captions_oracle.csv`` (image_id, caption) | the finetune images' true captions (ablation only) | | |
| ``eval_id.csv`` | finetune | finetune style | ``finetune_classnames.txt`` |
| ``eval_shift_<style>.csv`` | finetune | each other style | ``finetune_classnames.txt`` |
| ``eval_zeroshot.csv`` | the other classes | all, balanced | ``zeroshot_classnames.txt`` |

The pretraining corpus plays WIT (CLIP's data) and the pool CC3M (ARF's retrieval pool): two corpora with
their own class and style mix and caption wording (`captions.describe` vs `captions.describe_web`), the pool
with concepts no evaluation needs. The corpus is built only when a world CLIP is pretrained
(`generate_pretraining_corpus`): a user of the shipped CLIP never draws it.
Every image is its own random draw (seeded by world seed, split and index), so no image appears twice.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import multiprocessing
import os
import secrets
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from anchor_clip.world.captions import WebCaptions, describe, describe_web
from anchor_clip.world.render import render_scene
from anchor_clip.world.scene import STYLES, home_context, sample_scene
from anchor_clip.world.shapes import SHAPE_NAMES

log = logging.getLogger(__name__)

#: Bumped whenever drawing, wording or split logic changes, so worlds cached under an old key are not reused.
GENERATOR_VERSION = 5
#: Images per worker task; worlds of at most two chunks are drawn in-process.
CHUNK = 1000
_SPLIT_CODES = {"classes": 0, "pool": 1, "finetune": 2, "eval_id": 3, "eval_zeroshot": 4}  # seeds the split streams
_PRETRAIN_CODE = 99  # the pretraining corpus's stream, apart from the shift sets' codes


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


@dataclass(frozen=True)
class _Split:
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


def _pool_split(config: WorldConfig) -> _Split:
    """The retrieval pool: (class, style) drawn from a skewed class mix and the pool's style weights."""
    concepts = pool_concepts(config)
    rng = np.random.default_rng([config.seed, _SPLIT_CODES["pool"]])
    ranks = rng.permutation(len(concepts))
    class_p = (ranks + 1.0) ** -config.pool_class_skew
    style_p = np.asarray(config.pool_style_weights, dtype=np.float64)
    cells = rng.choice(len(concepts) * len(config.styles), size=config.pool_size,
                       p=(np.outer(class_p / class_p.sum(), style_p / style_p.sum())).ravel())
    classes, styles = np.divmod(cells, len(config.styles))
    return _Split(name="pool", code=_SPLIT_CODES["pool"], shapes=[concepts[c] for c in classes],
                  styles=[config.styles[i] for i in styles], labels=[int(c) for c in classes], web=True)


def plan_pretraining(config: WorldConfig) -> _Split:
    """The pretraining corpus: every world class in every style, evenly, worded by `describe`."""
    names = SHAPE_NAMES[: config.num_classes]
    cells = [(c, s) for c in range(config.num_classes) for s in config.styles]
    draws = _balanced(cells, config.pretrain_size, np.random.default_rng([config.seed, _PRETRAIN_CODE]))
    return _Split(name="pretrain", code=_PRETRAIN_CODE, shapes=[names[c] for c, _ in draws],
                  styles=[s for _, s in draws], labels=[c for c, _ in draws])


def plan_splits(config: WorldConfig) -> tuple[list[int], list[_Split]]:
    """Choose the finetune classes and every split's (class, style) draws; no pixels yet.

    Returns:
        The global indices of the finetune classes (sorted), and the splits (the pretraining corpus apart:
        `plan_pretraining`).
    """
    names = SHAPE_NAMES[: config.num_classes]
    class_rng = np.random.default_rng([config.seed, _SPLIT_CODES["classes"]])
    ft = sorted(int(i) for i in class_rng.choice(config.num_classes, config.finetune_classes, replace=False))
    zs = [i for i in range(config.num_classes) if i not in ft]
    ft_label = {c: i for i, c in enumerate(ft)}
    zs_label = {c: i for i, c in enumerate(zs)}

    def split(name: str, code: int, cells: list[tuple[int, str]], n: int, labels: dict[int, int] | None,
              context_bias: float = 0.0) -> _Split:
        draws = _balanced(cells, n, np.random.default_rng([config.seed, code]))
        return _Split(
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
        split("finetune", _SPLIT_CODES["finetune"], ft_cells, len(ft) * config.finetune_per_class, ft_label,
              config.finetune_context_bias),
        split("eval_id", _SPLIT_CODES["eval_id"], ft_cells, len(ft) * config.eval_per_class, ft_label,
              config.finetune_context_bias),
    ]
    for style in config.styles:
        if style != config.finetune_style:
            code = len(_SPLIT_CODES) + STYLES.index(style)
            splits.append(split(f"eval_shift_{style}", code, [(c, style) for c in ft],
                                len(ft) * config.eval_per_class, ft_label))
    zs_cells = [(c, s) for c in zs for s in config.styles]
    splits.append(split("eval_zeroshot", _SPLIT_CODES["eval_zeroshot"], zs_cells, len(zs) * config.eval_per_class,
                        zs_label))
    return ft, splits


def _render_chunk(seed: int, code: int, start: int, shapes: list[str], styles: list[str], image_size: int,
                  image_dir: str, context_bias: float = 0.0, web: WebCaptions | None = None,
                  concepts: tuple[str, ...] = ()) -> list[str]:
    """Draw, caption and save images `start`, `start + 1`, ... of one split; returns their captions.

    `context_bias` is the share of scenes moved onto their class's home context; with `web`, captions are the
    pool's (`describe_web` over `concepts`).
    """
    captions = []
    for offset, (shape, style) in enumerate(zip(shapes, styles, strict=True)):
        index = start + offset
        rng = np.random.default_rng([seed, code, index])  # one stream per image: independent of chunking
        scene = sample_scene(rng, shape, style)
        if context_bias > 0 and rng.random() < context_bias:  # no draw without bias: unbiased worlds stay as they were
            scene = home_context(scene)
        captions.append(describe(scene, rng) if web is None else describe_web(scene, rng, concepts, web))
        render_scene(scene, image_size).save(os.path.join(image_dir, f"{index:06d}.png"), format="PNG")
    return captions


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _draw(build_dir: Path, config: WorldConfig, splits: list[_Split], num_workers: int) -> dict[str, list[str]]:
    """Render and save every image of every split; returns each split's captions in image order."""
    owners, tasks = [], []  # the split of each chunk, and the chunk's `_render_chunk` arguments
    for split in splits:
        image_dir = build_dir / "images" / split.name
        image_dir.mkdir(parents=True)
        for start in range(0, len(split.shapes), CHUNK):
            stop = start + CHUNK
            owners.append(split.name)
            tasks.append((config.seed, split.code, start, split.shapes[start:stop], split.styles[start:stop],
                          config.image_size, str(image_dir), split.context_bias,
                          config.web_captions if split.web else None, pool_concepts(config)))
    if num_workers > 1 and sum(len(split.shapes) for split in splits) > 2 * CHUNK:
        # fork where the OS has it: workers touch only numpy and PIL (never torch's thread pools, which a forked
        # child must not use), and unlike spawn it works from scripts without a __main__ guard and from stdin
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(min(num_workers, len(tasks)), mp_context=multiprocessing.get_context(method)) as pool:
            results = list(pool.map(_render_chunk, *zip(*tasks, strict=True)))
    else:
        results = [_render_chunk(*task) for task in tasks]
    captions: dict[str, list[str]] = {split.name: [] for split in splits}
    for owner, chunk in zip(owners, results, strict=True):  # chunks come back in submission order
        captions[owner] += chunk
    return captions


def _write_tables(build_dir: Path, split: _Split, captions: list[str]) -> None:
    ids = [f"{split.name}_{i:06d}" for i in range(len(split.shapes))]
    paths = [f"images/{split.name}/{i:06d}.png" for i in range(len(split.shapes))]
    if split.name in ("pool", "pretrain"):
        rows = zip(ids, paths, captions, split.labels, split.styles, strict=True)
        _write_csv(build_dir / f"{split.name}.csv", ["image_id", "filepath", "caption", "label", "style"], rows)
        return
    # finetune and eval manifests keep the style (per-style breakdowns) beside filepath and label
    rows = zip(ids, paths, split.labels, split.styles, strict=True)
    _write_csv(build_dir / f"{split.name}.csv", ["image_id", "filepath", "label", "style"], rows)
    if split.name == "finetune":
        _write_csv(build_dir / "captions_oracle.csv", ["image_id", "caption"], zip(ids, captions, strict=True))


def _build(build_dir: Path, config: WorldConfig, num_workers: int) -> None:
    """Write every image and table of the world into `build_dir`, `world.json` last."""
    ft, splits = plan_splits(config)
    captions = _draw(build_dir, config, splits, num_workers)
    for split in splits:
        _write_tables(build_dir, split, captions[split.name])
    names = SHAPE_NAMES[: config.num_classes]
    classes = {
        "classnames": list(names),
        "pool_classnames": list(pool_concepts(config)),
        "finetune_classnames": [names[i] for i in ft],
        "zeroshot_classnames": [n for i, n in enumerate(names) if i not in ft],
    }
    for stem, values in classes.items():
        (build_dir / f"{stem}.txt").write_text("\n".join(values) + "\n")
    meta = {
        "key": config.key,
        "generator_version": GENERATOR_VERSION,
        "config": asdict(config),
        **classes,
        "styles": list(config.styles),
        "finetune_style": config.finetune_style,
        "shift_styles": [s for s in config.styles if s != config.finetune_style],
        "split_sizes": {split.name: len(split.shapes) for split in splits},
    }
    # world.json is written last: its presence marks the directory complete
    (build_dir / "world.json").write_text(json.dumps(meta, indent=2) + "\n")


def is_complete(world_dir: Path, config: WorldConfig) -> bool:
    """True when `world_dir` holds a finished world for exactly this config."""
    meta_path = world_dir / "world.json"
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return False
    tables = ["captions_oracle.csv"] + [f"{name}.csv" for name in meta.get("split_sizes", {})]
    return meta.get("key") == config.key and all((world_dir / t).is_file() for t in tables)


def _remove_dead_builds(root: Path, key: str) -> None:
    """Delete temporary build directories of this world left by processes (on this machine) that no longer run."""
    for path in root.glob(f".{key}.build-*"):
        pid = path.name.split("-")[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, owned by someone else
            pass


def draw_split(config: WorldConfig, name: str, out_dir: str | Path) -> Path:
    """Draw one split of the world alone (e.g. ``eval_id``) into `out_dir` and return its manifest.

    The images and table are those `generate_world` writes for that split: enough to check a shipped world
    CLIP against its recorded accuracy without drawing the other 70k images.
    """
    _, splits = plan_splits(config)
    split = next((s for s in splits if s.name == name), None)
    if split is None:
        raise ValueError(f"the world has no split {name!r}; splits: {[s.name for s in splits]}")
    out_dir = Path(out_dir)
    captions = _draw(out_dir, config, [split], os.cpu_count() or 1)
    _write_tables(out_dir, split, captions[name])
    return out_dir / f"{name}.csv"


def generate_pretraining_corpus(world: World, num_workers: int | None = None) -> Path:
    """Build the world's pretraining corpus under ``<world>/pretrain/``, or reuse it; returns its manifest.

    Apart from `generate_world` because only pretraining reads it: drawn in a temporary folder beside it and
    renamed into place when complete, like the world itself.
    """
    if world.pretrain_corpus.is_file():
        return world.pretrain_corpus
    split = plan_pretraining(world.config)
    build_dir = world.root / f".pretrain.build-{os.getpid()}-{secrets.token_hex(4)}"
    build_dir.mkdir()
    started = time.perf_counter()
    try:
        captions = _draw(build_dir, world.config, [split], num_workers or os.cpu_count() or 1)
        _write_tables(build_dir, split, captions[split.name])
        try:
            os.replace(build_dir, world.pretrain_corpus.parent)
        except OSError:  # another process finished it first
            if not world.pretrain_corpus.is_file():
                raise
            shutil.rmtree(build_dir)
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    log.info("generated the pretraining corpus of %s (%d images) in %.1f s", world.root, len(split.shapes),
             time.perf_counter() - started)
    return world.pretrain_corpus


def generate_world(root: str | Path, config: WorldConfig | None = None, num_workers: int | None = None) -> World:
    """Build the world for `config` under ``root/<config.key>/``, or reuse it when already complete.

    Args:
        root: cache directory holding worlds (created if missing).
        config: what to build; defaults to `WorldConfig()` (~74k images).
        num_workers: processes drawing images (default: all CPUs); worlds of at most `2 * CHUNK` images are
            drawn in-process. The result does not depend on it.

    Returns:
        The complete `World`.
    """
    config = config or WorldConfig()
    root = Path(root)
    world_dir = root / config.key
    if is_complete(world_dir, config):
        return World.load(world_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(root, config.key)
    build_dir = root / f".{config.key}.build-{os.getpid()}-{secrets.token_hex(4)}"
    build_dir.mkdir()
    started = time.perf_counter()
    try:
        _build(build_dir, config, num_workers or os.cpu_count() or 1)
        if world_dir.exists() and not is_complete(world_dir, config):
            shutil.rmtree(world_dir)  # a leftover without world.json (e.g. a partial copy), not a world
        try:
            os.replace(build_dir, world_dir)
        except OSError:  # renaming onto a non-empty directory fails: another process finished this world first
            if not is_complete(world_dir, config):
                raise
            shutil.rmtree(build_dir)
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    world = World.load(world_dir)
    log.info("generated world %s (%d images) in %.1f s", world_dir, sum(world.split_sizes.values()),
             time.perf_counter() - started)
    return world
