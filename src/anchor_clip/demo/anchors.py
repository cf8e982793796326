"""The demo's anchors: both anchor jobs run with the pretrained world CLIP, plus the random-replay control.

Caption anchors come from a generative captioner (the shipped world BLIP, through the same caption job a
real BLIP checkpoint runs in) or, as an ablation, from the kNN captioner over the pool; retrieved anchors from
the retrieval pool, a corpus apart from the CLIP's pretraining data, as CC3M is apart from WIT.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from anchor_clip.anchors.caption import caption_finetune_set
from anchor_clip.anchors.captioners import BlipCaptioner, Captioner, KnnCaptioner
from anchor_clip.anchors.mentions import mention_rates
from anchor_clip.anchors.retrieve import retrieve
from anchor_clip.data.tables import read_table, resolve_paths, write_atomic, write_table
from anchor_clip.demo.recipes import AnchorRecipe
from anchor_clip.world import pretrained as shipped
from anchor_clip.world.captions import STYLE_PROMPT, attribute_recall
from anchor_clip.world.config import World


def _retrieve(world: World, weights: str, model: dict | None, k: int, recipe: AnchorRecipe, out: Path) -> Path:
    if not (out / "retrieved_anchors.csv").is_file():
        retrieve(pool=str(world.pool), classnames=str(world.finetune_classnames_file), out_dir=str(out),
                 backbone="world_clip", pretrained=weights, backbone_config=model,
                 templates=tuple(STYLE_PROMPT.replace("{style}", s) for s in world.config.styles), k=k,
                 pool_classnames=str(world.pool_classnames_file),
                 exclude_manifests=None if recipe.exclude_threshold is None else
                 [str(s.manifest) for s in world.eval_sets.values()],
                 exclude_threshold=recipe.exclude_threshold or 1.0, num_workers=2)
    return out / "retrieved_anchors.csv"


def _replay(world: World, retrieved: Path, out: Path) -> Path:
    """As many random pool pairs as `retrieved` holds: the control that asks whether retrieval matters."""
    replay = out / "replay_anchors.csv"
    if not replay.is_file():
        pool = read_table(world.pool, required=("filepath", "caption"), what="world pool")
        sample = pool.sample(n=len(read_table(retrieved)), random_state=0)
        sample["filepath"] = resolve_paths(sample, world.pool)
        write_table(sample, replay)
    return replay


def caption_quality(captions: Path, world: World) -> dict[str, Any]:
    """How well the captions describe the finetune images, against the generator's true captions.

    Returns:
        ``class_accuracy`` (share naming the image's class), ``unseen_class_rate`` (share naming a zero-shot
        class), ``attribute_recall`` (mean share of the true caption's attribute words kept) and ``images``.
    """
    table = read_table(captions, required=("image_id", "caption"), what="caption table")
    finetune = read_table(world.finetune, required=("image_id", "label"), what="world finetune")
    oracle = read_table(world.captions_oracle, required=("image_id", "caption"), what="world oracle captions")
    merged = finetune.merge(table, on="image_id").merge(oracle, on="image_id", suffixes=("", "_oracle"))
    texts = merged["caption"].fillna("").astype(str).tolist()
    rates = mention_rates(texts, merged["label"].tolist(), world.finetune_classnames, world.zeroshot_classnames)
    return {
        "images": len(texts),
        "class_accuracy": rates["names_own_class"],
        "unseen_class_rate": rates["names_unseen_class"],
        "attribute_recall": attribute_recall(texts, merged["caption_oracle"].tolist()),
    }


def _caption(world: World, captioner: Captioner, out: Path) -> Path:
    result = caption_finetune_set(str(world.finetune), str(out), captioner,
                                  classnames=str(world.finetune_classnames_file),
                                  other_classnames=str(world.zeroshot_classnames_file), num_workers=2)
    quality = out / "quality.json"
    if not quality.is_file():
        text = json.dumps(caption_quality(Path(result.table), world), indent=1)
        write_atomic(quality, lambda tmp: Path(tmp).write_text(text))
    return Path(result.table)


def generative_captioner(recipe: AnchorRecipe) -> BlipCaptioner:
    """The recipe's BLIP: a shipped tag (hash-checked) or a `save_pretrained` folder."""
    known = recipe.captioner in shipped.manifest()["captioner"]
    model = str(shipped.captioner_dir(recipe.captioner)) if known else recipe.captioner
    return BlipCaptioner(model=model, num_beams=recipe.caption_beams)


def build_anchors(world: World, weights: str, model: dict | None, recipe: AnchorRecipe, out: Path,
                  knn: bool = False, sizes: tuple[int, ...] = ()) -> dict[str, Path]:
    """Run the anchor jobs with the pretrained world CLIP (`weights`: a tag or a path), each result cached.

    Returns:
        ``retrieved``, ``replay`` and ``captions`` (the recipe's captioner); with `knn`, ``captions_knn``; per
        size k of `sizes`, ``retrieved@k`` and ``replay@k``.
    """
    retrieved = _retrieve(world, weights, model, recipe.retrieved_per_class, recipe, out / "retrieved")
    anchors = {"retrieved": retrieved, "replay": _replay(world, retrieved, out / "replay")}
    for k in sizes:
        anchors[f"retrieved@{k}"] = _retrieve(world, weights, model, k, recipe, out / f"retrieved_k{k}")
        anchors[f"replay@{k}"] = _replay(world, anchors[f"retrieved@{k}"], out / f"replay_k{k}")
    if knn or recipe.captioner == "knn":
        # the kNN captioner searches the pool embeddings the retrieval job already made
        captioner = KnnCaptioner("world_clip", pool_embeddings=str(out / "retrieved" / "pool_embeddings"),
                                 pretrained=weights, config=model, label_filter=recipe.caption_label_filter,
                                 top_m=recipe.caption_neighbours, num_workers=2)
        anchors["captions_knn"] = _caption(world, captioner, out / "captions_knn")
    anchors["captions"] = (anchors["captions_knn"] if recipe.captioner == "knn"
                           else _caption(world, generative_captioner(recipe), out / "captions_generative"))
    return anchors
