"""The embedded miniature world: procedurally drawn image-caption data for offline ARF experiments.

Forty-odd shape classes in four styles (photo, sketch, cartoon, painting) at 32 px, with rich captions, split
like the paper's setup (pretraining/retrieval pool, a photo-only finetune set on half the classes, and ID,
style-shift and zero-shot-class eval sets). The generator needs only numpy and PIL; `world.clip` holds the
world's CLIP (model, word tokenizer and the `world_clip` backbone adapter).
"""

from anchor_clip.world.captions import CLASS_PROMPT, STYLE_PROMPT, class_prompts, describe, vocabulary, words
from anchor_clip.world.config import EvalSplit, World, WorldConfig
from anchor_clip.world.generate import generate_world
from anchor_clip.world.render import render_scene
from anchor_clip.world.scene import STYLES, Scene, sample_scene
from anchor_clip.world.shapes import SHAPE_NAMES

__all__ = [
    "CLASS_PROMPT",
    "SHAPE_NAMES",
    "STYLES",
    "STYLE_PROMPT",
    "EvalSplit",
    "Scene",
    "World",
    "WorldConfig",
    "class_prompts",
    "describe",
    "generate_world",
    "render_scene",
    "sample_scene",
    "vocabulary",
    "words",
]
