"""Fixtures: a tiny on-disk dataset in every format the streams read, and tiny random backbones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from anchor_clip import AnchorDataModule, AnchorFinetuneModule, EvalSet

# A 2-layer ViT over 32 px images with CLIP's BPE vocabulary: random init, no download, ~7 M params.
TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}

# The world CLIP at its smallest: a width-8 conv tower and a 1-layer text tower, pretrained in seconds.
TINY_WORLD_CLIP = {"embed_dim": 32, "image_width": 8, "text_width": 32, "text_layers": 1, "text_heads": 2}

CLASSES = ["red square", "green circle", "blue line", "yellow dot"]
COLOURS = [(220, 30, 30), (30, 200, 60), (40, 60, 220), (230, 210, 40)]


def _draw(label: int, rng: np.random.Generator) -> Image.Image:
    pixels = rng.integers(0, 60, size=(32, 32, 3), dtype=np.uint8)
    x, y = rng.integers(4, 20, size=2)
    pixels[y : y + 10, x : x + 10] = COLOURS[label]
    return Image.fromarray(pixels)


def write_images(root: Path, prefix: str, labels: list[int], seed: int) -> list[str]:
    """Write one PNG per label under root/images; returns paths relative to root."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for i, label in enumerate(labels):
        rel = f"images/{prefix}_{i:04d}.png"
        _draw(label, rng).save(root / rel)
        paths.append(rel)
    return paths


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    """Finetune manifest + classnames, captions, retrieved pairs, and two eval sets (ID and unseen classes)."""
    root = tmp_path_factory.mktemp("tiny_data")
    labels = [i % 4 for i in range(32)]
    paths = write_images(root, "ft", labels, seed=0)
    ids = [f"ft{i}" for i in range(len(labels))]
    pd.DataFrame({"image_id": ids, "filepath": paths, "label": labels}).to_csv(root / "finetune.csv", index=False)
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    captions = [f"a small {CLASSES[label]} on a dark noisy background" for label in labels]
    pd.DataFrame({"image_id": ids, "caption": captions}).to_json(root / "captions.jsonl", orient="records", lines=True)

    pool_labels = [i % 4 for i in range(40)]
    pool_paths = write_images(root, "pool", pool_labels, seed=1)
    pool_captions = [f"photo of a {CLASSES[label]}" for label in pool_labels]
    pd.DataFrame({"filepath": pool_paths, "caption": pool_captions}).to_parquet(root / "retrieved.parquet")

    eval_labels = [i % 4 for i in range(16)]
    eval_paths = write_images(root, "eval", eval_labels, seed=2)
    pd.DataFrame({"filepath": eval_paths, "label": eval_labels}).to_csv(root / "eval_id.csv", index=False)
    zs_labels = [i % 2 for i in range(8)]
    zs_paths = write_images(root, "zs", [2 + label for label in zs_labels], seed=3)
    pd.DataFrame({"filepath": zs_paths, "label": zs_labels}).to_csv(root / "eval_zs.csv", index=False)
    return {
        "root": str(root),
        "finetune": str(root / "finetune.csv"),
        "classnames": str(root / "classnames.txt"),
        "captions": str(root / "captions.jsonl"),
        "retrieved": str(root / "retrieved.parquet"),
        "eval_id": str(root / "eval_id.csv"),
        "eval_zs": str(root / "eval_zs.csv"),
    }


def make_datamodule(tiny_data, **overrides) -> AnchorDataModule:
    """The tiny data module over `tiny_data` (all three streams, an ID and an unseen-class set), set up for fit."""
    kwargs = dict(
        finetune=tiny_data["finetune"],
        classnames=tiny_data["classnames"],
        captions=tiny_data["captions"],
        retrieved=tiny_data["retrieved"],
        eval_sets=[
            EvalSet("id", tiny_data["eval_id"], tiny_data["classnames"]),
            EvalSet("zs", tiny_data["eval_zs"], CLASSES[2:], templates=["a {c}."]),
        ],
        batch_size=8,
        retrieved_batch_size=6,
        num_workers=0,
        backbone="open_clip",
        backbone_config=TINY_OPEN_CLIP,
    )
    kwargs.update(overrides)
    dm = AnchorDataModule(**kwargs)
    dm.setup("fit")
    return dm


def make_module(**overrides) -> AnchorFinetuneModule:
    """A tiny open_clip ARF module (both anchor weights 0.5), seeded, in eval mode."""
    torch.manual_seed(0)
    kwargs = dict(backbone="open_clip", backbone_config=TINY_OPEN_CLIP, caption_weight=0.5, retrieved_weight=0.5)
    kwargs.update(overrides)
    return AnchorFinetuneModule(**kwargs).eval()  # eval: no dropout, so two passes give equal features


@pytest.fixture(scope="module")
def batch(tiny_data):
    batch, _, _ = next(iter(make_datamodule(tiny_data).train_dataloader()))
    return batch

#: A world BLIP small enough to train in seconds: the demo's generative captioner path on a tiny world.
TINY_WORLD_BLIP = {"hidden_size": 32, "vision_layers": 1, "text_layers": 1, "heads": 2}


@pytest.fixture(scope="session")
def tiny_world_blip(tmp_path_factory) -> Path:
    """A world BLIP trained for a few steps on a tiny world's pretraining corpus, saved with save_pretrained."""
    from anchor_clip.world.captioner import CaptionerConfig, CaptionerRecipe, train_world_captioner
    from anchor_clip.world.config import WorldConfig
    from anchor_clip.world.generate import generate_pretraining_corpus, generate_world

    root = tmp_path_factory.mktemp("world_blip")
    world = generate_world(root / "worlds", WorldConfig(num_classes=6, finetune_classes=3, pretrain_size=96,
                                                        pool_size=48, finetune_per_class=2, eval_per_class=2))
    corpus = generate_pretraining_corpus(world)
    return train_world_captioner(corpus, root / "blip", CaptionerConfig(**TINY_WORLD_BLIP),
                                 CaptionerRecipe(steps=40, batch_size=16, lr=3e-3, warmup_steps=2))
