"""The embedded experiment: ARF against its baselines and controls on the miniature world, offline.

shipped (or pretrained, cached) world CLIP -> zero-shot -> FLYP -> ARF -> controls: random-pool replay with as
many pairs as the retrieved set and the same λ, and WiSE-FT of FLYP and ARF; with `ablations`, each anchor stream
alone (generative captions, kNN captions, retrieval); with `anchor_sizes`, retrieval and replay at other sizes;
with `baselines`, also the cross-entropy finetunes LP, FT and LP-FT.
Prints a table (ID, each shift, shift average, zero-shot classes, OOD average) and writes it as CSV and
markdown, with a PNG of ID vs OOD per method, WiSE-FT curves and feature drift, under the output folder.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L
import pandas as pd

from anchor_clip.baselines import ClassifierFinetuneModule
from anchor_clip.data import AnchorDataModule
from anchor_clip.data.tables import read_table, write_atomic, write_table
from anchor_clip.demo.anchors import build_anchors
from anchor_clip.demo.data import eval_templates, finetune_config, finetune_data, world_eval_sets
from anchor_clip.demo.pretrain import cache_root, pretrain_key, pretrain_world_clip
from anchor_clip.demo.recipes import AnchorRecipe, DemoConfig, FinetuneRecipe, PretrainRecipe
from anchor_clip.demo.report import drift_table, plot, summarize, summarize_curves
from anchor_clip.eval.drift import FeatureRecorder
from anchor_clip.eval.tables import to_markdown
from anchor_clip.eval.zeroshot import evaluate_zero_shot
from anchor_clip.module import AnchorFinetuneModule
from anchor_clip.wise import interpolate
from anchor_clip.world import pretrained as shipped
from anchor_clip.world.captions import CLASS_PROMPT
from anchor_clip.world.config import World, WorldConfig
from anchor_clip.world.generate import generate_world

log = logging.getLogger(__name__)


def methods(anchors: dict[str, Path], world: World, config: DemoConfig) -> dict[str, dict]:
    """`finetune` arguments of each finetuned method (zero-shot and WiSE-FT need no finetune of their own).

    The classifier baselines come first: LP-FT starts from the head the LP run saves.
    """
    runs = {
        "lp": {"classifier": {"linear_probe": True}},
        "ft": {"classifier": {}},
        "lp_ft": {"classifier": {"init_head": "lp"}},
    } if config.baselines else {}
    runs["flyp"] = {}
    if config.ablations:
        runs |= {
            "arf_caption": {"captions": anchors["captions"]},
            "arf_caption_knn": {"captions": anchors["captions_knn"]},
            "arf_retrieval": {"retrieved": anchors["retrieved"]},
        }
    runs |= {
        "arf": {"captions": anchors["captions"], "retrieved": anchors["retrieved"]},
        "replay": {"retrieved": anchors["replay"]},
    }
    for k in config.anchor_sizes:
        runs[f"arf_retrieval@{k}"] = {"retrieved": anchors[f"retrieved@{k}"]}
        runs[f"replay@{k}"] = {"retrieved": anchors[f"replay@{k}"]}
    if config.oracle:
        runs["oracle_caption"] = {"captions": world.captions_oracle}
    return runs


def evaluate(module: AnchorFinetuneModule, data: AnchorDataModule,
             recorder: FeatureRecorder | None = None) -> dict[str, float]:
    """Top-1 accuracy (%) of `module` on every evaluation set of `data` (image features into `recorder`)."""
    results = evaluate_zero_shot(module, data, callbacks=[] if recorder is None else [recorder])
    return {name: 100.0 * r["acc"] for name, r in results.items()}


def finetune(world: World, weights: str, recipe: FinetuneRecipe, run_dir: Path, seed: int, model: dict | None,
             captions=None, retrieved=None, classifier: dict | None = None) -> AnchorFinetuneModule:
    """One finetune of the pretrained world CLIP on the finetune stream plus the given anchors.

    With `classifier` (`ClassifierFinetuneModule` arguments; `init_head` names an earlier run whose head
    starts this one) it is a cross-entropy baseline instead; its head is saved as `run_dir/../<name>/head.pt`.
    """
    L.seed_everything(seed, workers=True)
    model = finetune_config(model)
    common = dict(backbone="world_clip", pretrained=weights, backbone_config=model, lr=recipe.lr,
                  weight_decay=recipe.weight_decay, warmup_steps=recipe.warmup_steps,
                  channels_last=recipe.channels_last)
    if classifier is not None:
        init = classifier.get("init_head")
        module = ClassifierFinetuneModule(
            linear_probe=classifier.get("linear_probe", False),
            init_head=None if init is None else str(run_dir.parent / init / "head.pt"), **common)
    else:
        module = AnchorFinetuneModule(caption_weight=recipe.caption_weight if captions else 0.0,
                                      retrieved_weight=recipe.retrieved_weight if retrieved else 0.0, **common)
    data = finetune_data(world, recipe, weights, model, captions, retrieved)
    trainer = L.Trainer(max_steps=recipe.steps, default_root_dir=run_dir, limit_val_batches=0,
                        num_sanity_val_steps=0, enable_model_summary=False, log_every_n_steps=20,
                        logger=L.pytorch.loggers.CSVLogger(run_dir, name="logs"), enable_checkpointing=False)
    trainer.fit(module, data)
    if classifier is not None:
        module.save_head(str(run_dir / "head.pt"))
    return module


def wise_curves(pretrained: AnchorFinetuneModule, finetuned: dict[str, AnchorFinetuneModule],
                data: AnchorDataModule, alphas: tuple[float, ...],
                results: dict[str, dict[str, float]] | None = None) -> pd.DataFrame:
    """Accuracies of WiSE-FT interpolations between the pretrained model and each finetuned one, per α.

    The ends of each curve are the pretrained (α=0) and finetuned (α=1) models themselves: their accuracies are
    taken from `results` (keys "zeroshot" and the method names) when given, instead of being measured again.
    """
    results = results or {}
    merged = copy.deepcopy(pretrained)
    rows = []
    for method, module in finetuned.items():
        for alpha in alphas:
            known = results.get({0.0: "zeroshot", 1.0: method}.get(alpha, ""))
            if known is None:
                merged.backbone.load_state_dict(interpolate(pretrained.backbone.state_dict(),
                                                            module.backbone.state_dict(), alpha))
                known = evaluate(merged, data)
            rows.append({"method": method, "alpha": alpha, **known})
    return pd.DataFrame(rows)


def world_clip(world: World, config: DemoConfig) -> str:
    """The world CLIP the demo finetunes: the shipped one pretrained under this exact world, model and recipe
    (its tag), else one pretrained here (its cached path); `config.force_pretrain` forces the latter."""
    tag = shipped.shipped_tag_for(pretrain_key(world, config.model, config.pretrain))
    if tag is not None and not config.force_pretrain:
        return tag  # every load of the tag checks the file's sha256
    return str(pretrain_world_clip(world, model_config=config.model, recipe=config.pretrain))


def prepare(config: DemoConfig, timings: dict[str, float] | None = None) -> tuple[World, str, dict[str, Path]]:
    """The world, its pretrained CLIP (a tag or a path) and the anchors, each built once and cached under
    `cache_root()`."""
    timings = {} if timings is None else timings
    start = time.perf_counter()
    world = generate_world(cache_root() / "worlds", config.world)
    weights = world_clip(world, config)
    timings["world_and_pretrain_s"] = time.perf_counter() - start
    start = time.perf_counter()
    key = hashlib.sha256(json.dumps(asdict(config.anchors), sort_keys=True).encode()).hexdigest()[:12]
    anchors = build_anchors(world, weights, config.model, config.anchors,
                            cache_root() / "anchors" / pretrain_key(world, config.model, config.pretrain) / key,
                            knn=config.ablations, sizes=config.anchor_sizes)
    timings["anchors_s"] = time.perf_counter() - start
    return world, weights, anchors


def fit_args(config: DemoConfig | None = None) -> list[str]:
    """`python -m anchor_clip.fit` arguments for ARF (both anchor streams) on the embedded world.

    What `python -m anchor_clip.fit` runs when given no arguments: the world, its CLIP and the anchors are
    prepared (cached) first, then the run is an ordinary LightningCLI fit whose flags can be copied.
    """
    config = config or DemoConfig()
    world, weights, anchors = prepare(config)
    recipe = config.finetune
    eval_sets = [asdict(s) for s in world_eval_sets(world)]
    return [
        "fit", "--seed_everything", str(config.seed),
        "--model.backbone", "world_clip", "--model.pretrained", weights,
        "--model.backbone_config", json.dumps(finetune_config(config.model)),
        "--model.caption_weight", str(recipe.caption_weight), "--model.retrieved_weight", str(recipe.retrieved_weight),
        "--model.lr", str(recipe.lr), "--model.weight_decay", str(recipe.weight_decay),
        "--model.warmup_steps", str(recipe.warmup_steps), "--model.channels_last", str(recipe.channels_last),
        "--data.finetune", str(world.finetune), "--data.classnames", str(world.finetune_classnames_file),
        "--data.templates", json.dumps([CLASS_PROMPT]), "--data.captions", str(anchors["captions"]),
        "--data.retrieved", str(anchors["retrieved"]), "--data.eval_sets", json.dumps(eval_sets),
        "--data.eval_templates", json.dumps(eval_templates(world)), "--data.batch_size", str(recipe.batch_size),
        *(["--data.retrieved_batch_size", str(recipe.retrieved_batch_size)] if recipe.retrieved_batch_size else []),
        "--data.num_workers", str(recipe.num_workers), "--data.decoded_cache_mb", str(recipe.decoded_cache_mb),
        "--trainer.max_steps", str(recipe.steps), "--trainer.val_check_interval", str(recipe.steps),
        "--trainer.check_val_every_n_epoch", "null", "--trainer.default_root_dir", "runs/world_arf",
    ]


def run_demo(config: DemoConfig, out: str | Path) -> pd.DataFrame:
    """Run every method once (finetune seed `config.seed`) and write results under `out`."""
    out = Path(out)
    timings: dict[str, float] = {}
    start_all = time.perf_counter()
    world, weights, anchors = prepare(config, timings)

    model = finetune_config(config.model)
    # evaluation in the main process: a few thousand decoded 32 px images cost less than starting workers
    eval_data = finetune_data(world, replace(config.finetune, num_workers=0), weights, model)
    pretrained = AnchorFinetuneModule(backbone="world_clip", pretrained=weights, backbone_config=model)
    recorders = {"zeroshot": FeatureRecorder()}
    results = {"zeroshot": evaluate(pretrained, eval_data, recorders["zeroshot"])}
    modules = {}
    for name, kwargs in methods(anchors, world, config).items():
        start = time.perf_counter()
        modules[name] = finetune(world, weights, config.finetune, out / "runs" / name, config.seed, config.model,
                                 **kwargs)
        timings[f"{name}_s"] = time.perf_counter() - start
        recorders[name] = FeatureRecorder()
        results[name] = evaluate(modules[name], eval_data, recorders[name])
        log.info("%s: %s", name, results[name])
    features = {name: recorder.features() for name, recorder in recorders.items()}

    curves = wise_curves(pretrained, {m: modules[m] for m in ("flyp", "arf")}, eval_data, config.wise_alphas, results)
    results["wise_flyp_0.5"] = curves.set_index(["method", "alpha"]).loc[("flyp", 0.5)].to_dict()

    table = summarize(results, world)
    write_table(summarize_curves(curves, world), out / "wise.csv")
    write_table(drift_table(features.pop("zeroshot"), features), out / "drift.csv")
    write_table(table.reset_index(), out / "results.csv")
    write_atomic(out / "results.md", lambda tmp: Path(tmp).write_text(to_markdown(table)))
    plot(table, out / "id_vs_ood.png")
    timings["total_s"] = time.perf_counter() - start_all
    report = {"config": asdict(config), "timings_s": timings, "anchors": {k: str(v) for k, v in anchors.items()},
              "world": str(world.root), "pretrained": weights,
              "anchor_pairs": {k: len(read_table(v)) for k, v in anchors.items() if "retrieved" in k or "replay" in k},
              "caption_quality": {k: json.loads((v.parent / "quality.json").read_text())
                                  for k, v in anchors.items() if k.startswith("captions")}}
    write_atomic(out / "demo.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1, default=str)))
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m anchor_clip.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo", help="output folder for the table, CSV and PNG")
    parser.add_argument("--seed", type=int, default=0, help="finetune seed")
    parser.add_argument("--world-seed", type=int, default=0, help="world seed (class split and images)")
    parser.add_argument("--context-bias", type=float, default=WorldConfig.finetune_context_bias,
                        help="share of finetune and ID images on their class's home context (a new world)")
    parser.add_argument("--steps", type=int, default=FinetuneRecipe.steps, help="finetune steps per method")
    parser.add_argument("--pretrain-steps", type=int, default=PretrainRecipe.steps,
                        help="world-CLIP pretraining steps (each value is its own cache entry)")
    parser.add_argument("--caption-weight", type=float, default=FinetuneRecipe.caption_weight,
                        help="λ_caption of the runs with caption anchors")
    parser.add_argument("--retrieved-weight", type=float, default=FinetuneRecipe.retrieved_weight,
                        help="λ_retrieved of the runs with retrieved anchors (and of the replay control)")
    parser.add_argument("--retrieved-batch-size", type=int, default=FinetuneRecipe.retrieved_batch_size,
                        help="retrieved (and replay) pairs per step; default: the finetune batch size")
    parser.add_argument("--oracle", action="store_true", help="also run the oracle-caption ablation")
    parser.add_argument("--baselines", action="store_true", help="also run the LP, FT and LP-FT baselines")
    parser.add_argument("--ablations", action="store_true",
                        help="also run each anchor stream alone (generative captions, kNN captions, retrieval)")
    parser.add_argument("--anchor-sizes", type=int, nargs="*", default=[],
                        help="also run retrieval and random replay with these k per class (the size curve)")
    parser.add_argument("--captioner", default=AnchorRecipe.captioner,
                        help="shipped captioner tag, a BLIP save_pretrained folder, or 'knn'")
    parser.add_argument("--pretrain", action="store_true",
                        help="pretrain the world CLIP here even when a shipped one matches (cached)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    world = WorldConfig(seed=args.world_seed, finetune_context_bias=args.context_bias)
    config = DemoConfig(world=world, seed=args.seed, oracle=args.oracle, baselines=args.baselines,
                        ablations=args.ablations, anchor_sizes=tuple(args.anchor_sizes), force_pretrain=args.pretrain,
                        anchors=AnchorRecipe(captioner=args.captioner),
                        finetune=FinetuneRecipe(steps=args.steps, caption_weight=args.caption_weight,
                                                retrieved_weight=args.retrieved_weight,
                                                retrieved_batch_size=args.retrieved_batch_size),
                        pretrain=PretrainRecipe(steps=args.pretrain_steps))
    table = run_demo(config, args.out)
    print(to_markdown(table))
    print(f"\nwritten to {Path(args.out).resolve()}: results.csv/.md, id_vs_ood.png, wise.csv, drift.csv, demo.json")


if __name__ == "__main__":
    main()
