"""The demo's recipes: the world, its CLIP's pretraining, the anchors and every method's finetune.

A `DemoConfig` decides everything a demo run computes; each part is also a cache key (world, pretraining,
anchors), so changing one recipe rebuilds only what depends on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from anchor_clip.world.config import WorldConfig


@dataclass(frozen=True)
class PretrainRecipe:
    """Optimisation settings of world-CLIP pretraining."""

    steps: int = 4000  # zero-shot accuracy and loss plateau over the last fifth (world/weights/manifest.json)
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    # loader processes, not in the cache key (the weights do not depend on it); the decoded pool is cheap to batch
    num_workers: int = 0
    seed: int = 0
    eval_every: int = 400  # steps between zero-shot evaluations (the plateau curve); not in the cache key
    channels_last: bool = True  # conv tower forward+backward 15-25 % faster on CPU; same loss up to rounding


@dataclass
class FinetuneRecipe:
    """One finetune's settings, shared by every method so that only the anchors differ."""

    steps: int = 400  # the targets hold on 3 worlds and a cached demo fits 10 minutes on 2 cores (README)
    batch_size: int = 128  # finetune images per step; caption anchors pair with these images
    retrieved_batch_size: int | None = None  # retrieved (or replay) pairs per step; None = batch_size
    lr: float = 2e-3  # high enough that FLYP forgets the style shifts, as in the paper
    weight_decay: float = 0.1
    warmup_steps: int = 20
    # λ of the anchor streams (replay uses λ_retrieved): ARF keeps FLYP's ID accuracy at these (README, 3 worlds)
    caption_weight: float = 0.25
    retrieved_weight: float = 0.5
    num_workers: int = 2
    channels_last: bool = True  # conv tower forward+backward 15-25 % faster on CPU; same loss up to rounding
    decoded_cache_mb: float = 512  # decode the 32 px training streams once (finetune 12 MB, retrieved ~90 MB)


@dataclass
class AnchorRecipe:
    """How the anchors are built (knobs of the anchor jobs, not world-only special cases)."""

    retrieved_per_class: int = 1500  # k of the retrieval job, split evenly over the style query templates
    # the caption anchors' captioner: a shipped captioner tag (`world.pretrained`) or a BLIP `save_pretrained`
    # folder, run by the caption job as any Hugging Face BLIP; "knn" captions each image with its pool neighbours'
    captioner: str = "world_blip"
    caption_beams: int = 1  # beam width of the generative captioner (1: greedy)
    caption_neighbours: int = 20  # kNN captioner: how far down the neighbours the label filter may walk
    caption_label_filter: bool = True
    exclude_threshold: float | None = 0.98  # drop pool images this close (cosine) to an eval image; None: keep all


#: The world CLIP of the demo: narrower than `WorldClipConfig`'s defaults so pretraining fits CPU minutes.
WORLD_MODEL = {"image_width": 16, "text_width": 64, "text_layers": 2, "text_heads": 2, "embed_dim": 64}


@dataclass
class DemoConfig:
    """One demo run: the world, its CLIP, the anchors, the finetunes and which controls run."""

    world: WorldConfig = field(default_factory=WorldConfig)
    pretrain: PretrainRecipe = field(default_factory=PretrainRecipe)
    finetune: FinetuneRecipe = field(default_factory=FinetuneRecipe)
    anchors: AnchorRecipe = field(default_factory=AnchorRecipe)
    model: dict | None = field(default_factory=lambda: dict(WORLD_MODEL))  # world_clip config overrides
    seed: int = 0  # finetune seed (world and pretraining have their own)
    oracle: bool = False  # also run the ablation with the generator's true captions
    # also run each anchor stream alone (generative captions, kNN captions, retrieved anchors)
    ablations: bool = False
    # retrieved anchors and random replay at these k per class too (OOD against the number of anchor pairs)
    anchor_sizes: tuple[int, ...] = ()
    force_pretrain: bool = False  # pretrain the world CLIP even when a shipped one matches (cached like any other)
    baselines: bool = False  # also run the cross-entropy finetunes LP, FT and LP-FT
    wise_alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # WiSE-FT curve points (0.5 enters the table)
