"""The embedded experiment: ARF against its baselines and controls on the miniature world, offline.

pretrain (cached) -> zero-shot -> FLYP -> ARF (caption, retrieval, both) -> controls: random-pool replay with
as many pairs as the retrieved set and the same λ, and WiSE-FT of FLYP and ARF; with `baselines`, also the
cross-entropy finetunes LP, FT and LP-FT.
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
from torch import Tensor

from anchor_clip.anchors.caption import caption_finetune_set
from anchor_clip.anchors.captioners import KnnCaptioner
from anchor_clip.anchors.retrieve import retrieve
from anchor_clip.baselines import ClassifierFinetuneModule
from anchor_clip.data import AnchorDataModule
from anchor_clip.data.tables import read_table, resolve_paths, write_atomic, write_table
from anchor_clip.eval.drift import FeatureRecorder, feature_drift
from anchor_clip.eval.tables import to_markdown
from anchor_clip.module import AnchorFinetuneModule
from anchor_clip.wise import interpolate
from anchor_clip.world.captions import CLASS_PROMPT, STYLE_PROMPT
from anchor_clip.world.generate import World, WorldConfig, generate_world
from anchor_clip.world.pretrain import PretrainRecipe, cache_root, pretrain_world_clip, world_eval_sets

log = logging.getLogger(__name__)


@dataclass
class FinetuneRecipe:
    """One finetune's settings, shared by every method so that only the anchors differ."""

    # 3 worlds: at 400, FLYP loses 6.6 (shift) / 11.0 (zero-shot classes), ARF's ID gap -0.3, and a cached demo
    # fits 10 minutes on a slow 2-core machine; at 600, 8.75 / 14.0 and +0.03, but 16 minutes there
    steps: int = 400
    batch_size: int = 128  # finetune images per step; caption anchors pair with these images
    retrieved_batch_size: int | None = None  # retrieved (or replay) pairs per step; None = batch_size
    lr: float = 2e-3  # on worlds 0 and 1, FLYP loses 1-4 more points on the style shifts than at 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    # λ of the anchor streams (replay uses λ_retrieved). 3 worlds at 600 steps, 0.25 / 0.5: ARF's ID gap +0.03,
    # recovery 178 % / 115 %; at 1 / 1 (on another machine) -1.35, and kNN captions cost 1.8 OOD next to retrieval.
    caption_weight: float = 0.25
    retrieved_weight: float = 0.5
    num_workers: int = 2
    channels_last: bool = True  # conv tower forward+backward 15-25 % faster on CPU; same loss up to rounding
    decoded_cache_mb: float = 512  # decode the 32 px training streams once (finetune 12 MB, retrieved ~90 MB)


@dataclass
class AnchorRecipe:
    """How the anchors are built (knobs of the anchor jobs, not world-only special cases)."""

    retrieved_per_class: int = 1500  # k of the retrieval job, split evenly over the style query templates
    caption_neighbours: int = 20  # kNN captioner: how far down the neighbours the label filter may walk
    caption_label_filter: bool = True
    exclude_threshold: float | None = 0.98  # drop pool images this close (cosine) to an eval image; None: keep all


#: The world CLIP of the demo: narrower than `WorldClipConfig`'s defaults so pretraining fits CPU minutes.
WORLD_MODEL = {"image_width": 16, "text_width": 64, "text_layers": 2, "text_heads": 2, "embed_dim": 64}


@dataclass
class DemoConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    pretrain: PretrainRecipe = field(default_factory=PretrainRecipe)
    finetune: FinetuneRecipe = field(default_factory=FinetuneRecipe)
    anchors: AnchorRecipe = field(default_factory=AnchorRecipe)
    model: dict | None = field(default_factory=lambda: dict(WORLD_MODEL))  # world_clip config overrides
    seed: int = 0  # finetune seed (world and pretraining have their own)
    oracle: bool = False  # also run the ablation with the generator's true captions
    baselines: bool = False  # also run the cross-entropy finetunes LP, FT and LP-FT
    wise_alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # WiSE-FT curve points (0.5 enters the table)


def eval_templates(world: World) -> list[str]:
    """Zero-shot head prompts: one per style, like the style words in CLIP's ImageNet prompt ensemble."""
    return [STYLE_PROMPT.replace("{style}", style) for style in world.config.styles]


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


def methods(anchors: dict[str, Path], world: World, oracle: bool, baselines: bool = False) -> dict[str, dict]:
    """`finetune` arguments of each finetuned method (zero-shot and WiSE-FT need no finetune of their own).

    The classifier baselines come first: LP-FT starts from the head the LP run saves.
    """
    runs = {
        "lp": {"classifier": {"linear_probe": True}},
        "ft": {"classifier": {}},
        "lp_ft": {"classifier": {"init_head": "lp"}},
    } if baselines else {}
    runs |= {
        "flyp": {},
        "arf_caption": {"captions": anchors["captions"]},
        "arf_retrieval": {"retrieved": anchors["retrieved"]},
        "arf": {"captions": anchors["captions"], "retrieved": anchors["retrieved"]},
        "replay": {"retrieved": anchors["replay"]},
    }
    if oracle:
        runs["oracle_caption"] = {"captions": world.captions_oracle}
    return runs


def _datamodule(world: World, recipe: FinetuneRecipe, weights: Path, model: dict | None, captions=None,
                retrieved=None) -> AnchorDataModule:
    return AnchorDataModule(
        finetune=str(world.finetune), classnames=str(world.finetune_classnames_file), templates=[CLASS_PROMPT],
        captions=None if captions is None else str(captions), retrieved=None if retrieved is None else str(retrieved),
        eval_sets=world_eval_sets(world), eval_templates=eval_templates(world), batch_size=recipe.batch_size,
        retrieved_batch_size=recipe.retrieved_batch_size, num_workers=recipe.num_workers,
        decoded_cache_mb=recipe.decoded_cache_mb, backbone="world_clip", backbone_config=model, pretrained=str(weights))


def evaluate(module: AnchorFinetuneModule, data: AnchorDataModule,
             recorder: FeatureRecorder | None = None) -> dict[str, float]:
    """Top-1 accuracy (%) of `module` on every evaluation set of `data` (image features into `recorder`)."""
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        callbacks=[] if recorder is None else [recorder])
    result = trainer.validate(module, data, verbose=False)
    merged = {k: v for r in result for k, v in r.items()}
    return {name.split("/")[1]: 100.0 * value for name, value in merged.items() if name.endswith("/acc")}


def finetune_config(model: dict | None) -> dict:
    """The world CLIP config for finetuning: BatchNorm statistics frozen at their pretrained values.

    CLIP's towers have no batch statistics; without this, a photo-only finetune batch would re-estimate the
    statistics that sketches and paintings are normalized with, a forgetting mechanism CLIP does not have.
    """
    return {**(model or {}), "freeze_batch_stats": True}


def finetune(world: World, weights: Path, recipe: FinetuneRecipe, run_dir: Path, seed: int, model: dict | None,
             captions=None, retrieved=None, classifier: dict | None = None) -> AnchorFinetuneModule:
    """One finetune of the pretrained world CLIP on the finetune stream plus the given anchors.

    With `classifier` (`ClassifierFinetuneModule` arguments; `init_head` names an earlier run whose head
    starts this one) it is a cross-entropy baseline instead; its head is saved as `run_dir/../<name>/head.pt`.
    """
    L.seed_everything(seed, workers=True)
    model = finetune_config(model)
    common = dict(backbone="world_clip", pretrained=str(weights), backbone_config=model, lr=recipe.lr,
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
    data = _datamodule(world, recipe, weights, model, captions, retrieved)
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


def summarize_curves(curves: pd.DataFrame, world: World) -> pd.DataFrame:
    """`summarize` for every (method, α) row of `wise_curves`."""
    table = summarize({i: row.drop(["method", "alpha"]).to_dict() for i, row in curves.iterrows()}, world)
    return pd.concat([curves[["method", "alpha"]], table.reset_index(drop=True)], axis=1)


def drift_table(reference: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]]) -> pd.DataFrame:
    """Image-feature drift from the pretrained model's features, per finetuned method and evaluation set."""
    return pd.DataFrame([{"method": method, "set": name, **feature_drift(reference[name], features[name])}
                         for method, features in finetuned.items() for name in reference])


def summarize(results: dict[str, dict[str, float]], world: World) -> pd.DataFrame:
    """Per method: ID, each shift, shift average, zero-shot classes and the OOD average (shift avg, zero-shot)."""
    shifts = [f"shift_{s}" for s in world.shift_styles]
    rows = []
    for method, acc in results.items():
        row = {"method": method, "id": acc["id"], **{s: acc[s] for s in shifts}}
        row["shift_avg"] = float(np.mean([acc[s] for s in shifts]))
        row["zeroshot"] = acc["zeroshot"]
        row["ood_avg"] = (row["shift_avg"] + row["zeroshot"]) / 2
        rows.append(row)
    return pd.DataFrame(rows).set_index("method").round(2)


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for method, row in table.iterrows():
        ax.scatter(row["ood_avg"], row["id"], s=40)
        ax.annotate(method, (row["ood_avg"], row["id"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("OOD average (shift avg, zero-shot classes), %")
    ax.set_ylabel("ID accuracy, %")
    ax.set_title("Miniature world: ID vs OOD")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def prepare(config: DemoConfig, timings: dict[str, float] | None = None) -> tuple[World, Path, dict[str, Path]]:
    """The world, its pretrained CLIP and the anchors, each built once and cached under `cache_root()`."""
    timings = {} if timings is None else timings
    start = time.perf_counter()
    world = generate_world(cache_root() / "worlds", config.world)
    weights = pretrain_world_clip(world, model_config=config.model, recipe=config.pretrain)
    timings["world_and_pretrain_s"] = time.perf_counter() - start
    start = time.perf_counter()
    key = hashlib.sha256(json.dumps(asdict(config.anchors), sort_keys=True).encode()).hexdigest()[:12]
    anchors = build_anchors(world, weights, config.model, config.anchors,
                            cache_root() / "anchors" / weights.parent.name / key)
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
        "--model.backbone", "world_clip", "--model.pretrained", str(weights),
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
    eval_data = _datamodule(world, replace(config.finetune, num_workers=0), weights, model)
    pretrained = AnchorFinetuneModule(backbone="world_clip", pretrained=str(weights), backbone_config=model)
    recorders = {"zeroshot": FeatureRecorder()}
    results = {"zeroshot": evaluate(pretrained, eval_data, recorders["zeroshot"])}
    modules = {}
    for name, kwargs in methods(anchors, world, config.oracle, config.baselines).items():
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
              "world": str(world.root), "pretrained": str(weights)}
    write_atomic(out / "demo.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1, default=str)))
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    world = WorldConfig(seed=args.world_seed, finetune_context_bias=args.context_bias)
    config = DemoConfig(world=world, seed=args.seed, oracle=args.oracle, baselines=args.baselines,
                        finetune=FinetuneRecipe(steps=args.steps, caption_weight=args.caption_weight,
                                                retrieved_weight=args.retrieved_weight,
                                                retrieved_batch_size=args.retrieved_batch_size),
                        pretrain=PretrainRecipe(steps=args.pretrain_steps))
    table = run_demo(config, args.out)
    print(to_markdown(table))
    print(f"\nwritten to {Path(args.out).resolve()}: results.csv/.md, id_vs_ood.png, wise.csv, drift.csv, demo.json")


if __name__ == "__main__":
    main()
