"""The embedded experiment: ARF against its baselines and controls on the miniature world, offline.

`recipes` holds what a run computes, `pretrain` the world CLIP's (cached) pretraining, `anchors` the anchor
jobs run on the world, `run` the finetunes and their evaluation, `report` the tables and plots, and `targets`
what the world's results are expected to show over seeds. `python -m anchor_clip.demo` runs `run.main`.
"""

from anchor_clip.demo.data import finetune_config, finetune_data
from anchor_clip.demo.pretrain import cache_root, pretrain_world_clip
from anchor_clip.demo.recipes import WORLD_MODEL, AnchorRecipe, DemoConfig, FinetuneRecipe, PretrainRecipe
from anchor_clip.demo.run import fit_args, prepare, run_demo

__all__ = [
    "WORLD_MODEL",
    "AnchorRecipe",
    "DemoConfig",
    "FinetuneRecipe",
    "PretrainRecipe",
    "cache_root",
    "finetune_config",
    "finetune_data",
    "fit_args",
    "prepare",
    "pretrain_world_clip",
    "run_demo",
]
