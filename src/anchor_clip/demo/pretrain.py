"""Pretraining the world's CLIP on its pool, with the library's own module on a pairs-only stream.

The result plays the part of OpenAI's CLIP in the embedded experiments, so it must be trained to a
plateau: replaying pool pairs during finetuning should then preserve features, not simply continue
pretraining. It is cached under the user cache directory, keyed by world, model config and recipe, and a
killed run resumes from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from anchor_clip.data import AnchorDataModule
from anchor_clip.data.tables import write_atomic
from anchor_clip.demo.data import world_eval_sets
from anchor_clip.demo.recipes import PretrainRecipe
from anchor_clip.module import AnchorFinetuneModule
from anchor_clip.world.config import World
from anchor_clip.world.generate import generate_pretraining_corpus

#: Decode the pool's 32 px images once instead of every epoch; the weights are the same, so not in the cache key.
POOL_DECODED_MB = 512

CHECKPOINT_EVERY = 250  # training steps between the checkpoints a killed run resumes from

PRETRAIN_VERSION = 3  # bump when the recipe or the world_clip defaults change, so old caches are not reused


def cache_root() -> Path:
    """`$ANCHOR_CLIP_CACHE`, else `$XDG_CACHE_HOME/anchor_clip`, else `~/.cache/anchor_clip`."""
    if "ANCHOR_CLIP_CACHE" in os.environ:
        return Path(os.environ["ANCHOR_CLIP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "anchor_clip"


def _resumable(last: Path) -> Path | None:
    """`last` if resuming can load it, else None, with an unloadable file moved aside (never deleted).

    Resuming loads checkpoints weights-only; one written by an earlier anchor_clip that pickled objects
    (its evaluation sets) is refused, and would otherwise stop every later run of the same recipe.
    """
    if not last.is_file():
        return None
    try:
        torch.load(last, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        stale = last.with_name(last.name + ".unloadable")
        os.replace(last, stale)
        warnings.warn(f"{last} cannot be loaded weights-only ({str(err).splitlines()[0]}); moved to {stale}, "
                      "pretraining restarts from step 0", stacklevel=3)
        return None
    return last


def pretrain_key(world: World, model_config: dict[str, Any] | None, recipe: PretrainRecipe) -> str:
    weights_recipe = {k: v for k, v in asdict(recipe).items() if k not in ("num_workers", "eval_every")}
    payload = {"version": PRETRAIN_VERSION, "world": world.config.key, "model": model_config or {},
               "recipe": weights_recipe}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def pretrain_world_clip(world: World, model_config: dict[str, Any] | None = None,
                        recipe: PretrainRecipe | None = None, cache_dir: str | Path | None = None) -> Path:
    """Pretrain (or reuse) the world CLIP and return the path of its backbone state dict.

    Args:
        world: a generated world; its pretraining corpus (drawn here if missing) is the data.
        model_config: overrides of the `world_clip` backbone config.
        recipe: optimisation settings; None = `PretrainRecipe()`.
        cache_dir: where runs and results live; defaults to `cache_root()`.

    Returns:
        `<cache>/world_clip/<key>/world_clip.pt`, loadable with `create_backbone("world_clip", pretrained=path)`.
    """
    recipe = recipe or PretrainRecipe()
    run_dir = Path(cache_dir or cache_root()) / "world_clip" / pretrain_key(world, model_config, recipe)
    weights = run_dir / "world_clip.pt"
    if weights.is_file():
        return weights
    L.seed_everything(recipe.seed, workers=True)
    module = AnchorFinetuneModule(backbone="world_clip", backbone_config=model_config, retrieved_weight=1.0,
                                  lr=recipe.lr, weight_decay=recipe.weight_decay, warmup_steps=recipe.warmup_steps,
                                  channels_last=recipe.channels_last)
    corpus = generate_pretraining_corpus(world)
    data = AnchorDataModule(retrieved=str(corpus), eval_sets=world_eval_sets(world, ("id", "zeroshot")),
                            batch_size=recipe.batch_size, num_workers=recipe.num_workers,
                            decoded_cache_mb=POOL_DECODED_MB, backbone="world_clip",
                            backbone_config=model_config)
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, every_n_train_steps=CHECKPOINT_EVERY)
    # Zero-shot accuracy every `eval_every` steps (the curve that shows the plateau) when that divides the run,
    # else once at its end; the last one is recorded.
    interval = recipe.eval_every if recipe.steps % recipe.eval_every == 0 else recipe.steps
    trainer = L.Trainer(max_steps=recipe.steps, default_root_dir=run_dir, callbacks=[checkpoints],
                        logger=CSVLogger(run_dir, name="logs"), val_check_interval=interval,
                        check_val_every_n_epoch=None, num_sanity_val_steps=0, enable_model_summary=False,
                        log_every_n_steps=25)
    last = _resumable(run_dir / "checkpoints" / "last.ckpt")
    trainer.fit(module, data, ckpt_path=None if last is None else str(last))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    summary = {"recipe": asdict(recipe), "model_config": model_config, "world": world.config.key, "metrics": metrics}
    write_atomic(run_dir / "pretrain.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    # The weights file is written last: its presence means the whole run is done.
    write_atomic(weights, lambda tmp: torch.save(module.backbone.state_dict(), tmp))
    return weights
