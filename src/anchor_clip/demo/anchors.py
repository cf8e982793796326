"""The demo's anchors: both anchor jobs run with the pretrained world CLIP, plus the random-replay control."""

from __future__ import annotations

from pathlib import Path

from anchor_clip.anchors.caption import caption_finetune_set
from anchor_clip.anchors.captioners import KnnCaptioner
from anchor_clip.anchors.retrieve import retrieve
from anchor_clip.data.tables import read_table, resolve_paths, write_table
from anchor_clip.demo.recipes import AnchorRecipe
from anchor_clip.world.captions import STYLE_PROMPT
from anchor_clip.world.generate import World


def build_anchors(world: World, weights: Path, model: dict | None, recipe: AnchorRecipe,
                  out: Path) -> dict[str, Path]:
    """Run the two anchor jobs with the pretrained world CLIP, plus the random-replay control set."""
    classnames = str(world.finetune_classnames_file)
    retrieved_dir = out / "retrieved"
    if not (retrieved_dir / "retrieved_anchors.csv").is_file():
        retrieve(pool=str(world.pool), classnames=classnames, out_dir=str(retrieved_dir), backbone="world_clip",
                 pretrained=str(weights), backbone_config=model, templates=tuple(STYLE_PROMPT.replace("{style}", s)
                                                          for s in world.config.styles),
                 k=recipe.retrieved_per_class, pool_classnames=str(world.classnames_file),
                 exclude_manifests=None if recipe.exclude_threshold is None else
                 [str(s.manifest) for s in world.eval_sets.values()],
                 exclude_threshold=recipe.exclude_threshold or 1.0, num_workers=2)
    retrieved = retrieved_dir / "retrieved_anchors.csv"

    replay = out / "replay" / "replay_anchors.csv"
    if not replay.is_file():
        pool = read_table(world.pool, required=("filepath", "caption"), what="world pool")
        sample = pool.sample(n=len(read_table(retrieved)), random_state=0)
        sample["filepath"] = resolve_paths(sample, world.pool)
        write_table(sample, replay)

    # The kNN captioner searches the pool embeddings the retrieval job already made.
    captioner = KnnCaptioner("world_clip", pool_embeddings=str(retrieved_dir / "pool_embeddings"),
                             pretrained=str(weights), config=model, label_filter=recipe.caption_label_filter,
                             top_m=recipe.caption_neighbours, num_workers=2)
    captions = caption_finetune_set(str(world.finetune), str(out / "captions_knn"), captioner, classnames=classnames,
                                    other_classnames=str(world.zeroshot_classnames_file), num_workers=2)
    return {"retrieved": retrieved, "replay": replay, "captions": Path(captions.table)}
