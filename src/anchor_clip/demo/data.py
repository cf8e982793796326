"""The world as the library's data: its evaluation sets, zero-shot prompts and each finetune's data module."""

from __future__ import annotations

from anchor_clip.data import AnchorDataModule, EvalSet
from anchor_clip.demo.recipes import FinetuneRecipe
from anchor_clip.world.captions import CLASS_PROMPT, STYLE_PROMPT
from anchor_clip.world.config import World


def world_eval_sets(world: World, names: tuple[str, ...] | None = None) -> list[EvalSet]:
    """The world's evaluation sets as `EvalSet`s, templates left to the data module's default."""
    return [
        EvalSet(name, str(s.manifest), str(s.classnames))
        for name, s in world.eval_sets.items()
        if names is None or name in names
    ]


def eval_templates(world: World) -> list[str]:
    """Zero-shot head prompts: one per style, like the style words in CLIP's ImageNet prompt ensemble."""
    return [STYLE_PROMPT.replace("{style}", style) for style in world.config.styles]


def finetune_config(model: dict | None) -> dict:
    """The world CLIP config for finetuning: BatchNorm statistics frozen at their pretrained values.

    CLIP's towers have no batch statistics; without this, a photo-only finetune batch would re-estimate the
    statistics that sketches and paintings are normalized with, a forgetting mechanism CLIP does not have.
    """
    return {**(model or {}), "freeze_batch_stats": True}


def finetune_data(world: World, recipe: FinetuneRecipe, weights: str, model: dict | None, captions=None,
                  retrieved=None) -> AnchorDataModule:
    """The data module of one finetune: the finetune stream, the given anchors and every evaluation set."""
    return AnchorDataModule(
        finetune=str(world.finetune), classnames=str(world.finetune_classnames_file), templates=[CLASS_PROMPT],
        captions=None if captions is None else str(captions), retrieved=None if retrieved is None else str(retrieved),
        eval_sets=world_eval_sets(world), eval_templates=eval_templates(world), batch_size=recipe.batch_size,
        retrieved_batch_size=recipe.retrieved_batch_size, num_workers=recipe.num_workers,
        decoded_cache_mb=recipe.decoded_cache_mb, backbone="world_clip", backbone_config=model, pretrained=weights)
