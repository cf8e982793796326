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
import json
import logging
import multiprocessing
import os
import secrets
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

from anchor_clip.world.captions import WebCaptions, describe, describe_web
from anchor_clip.world.config import GENERATOR_VERSION, World, WorldConfig
from anchor_clip.world.render import render_scene
from anchor_clip.world.scene import home_context, sample_scene
from anchor_clip.world.shapes import SHAPE_NAMES
from anchor_clip.world.splits import Split, plan_pretraining, plan_splits, pool_concepts

log = logging.getLogger(__name__)

#: Images per worker task; worlds of at most two chunks are drawn in-process.
CHUNK = 1000


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


def _draw(build_dir: Path, config: WorldConfig, splits: list[Split], num_workers: int) -> dict[str, list[str]]:
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


def _write_tables(build_dir: Path, split: Split, captions: list[str]) -> None:
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
