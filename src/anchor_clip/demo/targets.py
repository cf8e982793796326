"""What the embedded world's results should show over seeds: per-seed tables, their means, and the targets.

`run_seeds` runs the demo once per world seed (finetune seed = world seed) and stacks the tables; `targets`
reads the world's targets off the seed means (FLYP forgets, ARF keeps FLYP's ID accuracy and wins back what
FLYP lost, no control dominates ARF). `experiments/world_seeds.py` is the command line over them.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from anchor_clip.data.tables import read_table
from anchor_clip.demo.recipes import DemoConfig, FinetuneRecipe, PretrainRecipe
from anchor_clip.demo.run import run_demo
from anchor_clip.world.generate import WorldConfig

COLUMNS = ["id", "shift_avg", "zeroshot", "ood_avg"]


def run_seeds(seeds: list[int], out: Path, context_bias: float = WorldConfig.finetune_context_bias,
              finetune: FinetuneRecipe | None = None, pretrain: PretrainRecipe | None = None) -> pd.DataFrame:
    """Per-seed demo tables stacked, with a `seed` column (runs the seeds that have no results yet).

    `context_bias` is each world's `WorldConfig.finetune_context_bias`; `finetune` the recipe of every method,
    `pretrain` the world CLIP's.
    """
    finetune, pretrain = finetune or FinetuneRecipe(), pretrain or PretrainRecipe()
    frames = []
    for seed in seeds:
        seed_dir = out / f"seed_{seed}"
        if not (seed_dir / "results.csv").is_file():
            world = WorldConfig(seed=seed, finetune_context_bias=context_bias)
            run_demo(DemoConfig(world=world, seed=seed, finetune=finetune, pretrain=pretrain), seed_dir)
        frames.append(read_table(seed_dir / "results.csv", required=["method", *COLUMNS]).assign(seed=seed))
    return pd.concat(frames, ignore_index=True)


def mean_std(runs: pd.DataFrame) -> pd.DataFrame:
    """Per method run on every seed, each accuracy column as "mean ± std" (sample std; 0 for a single seed)."""
    seeds = runs["seed"].nunique()
    runs = runs.groupby("method", sort=False).filter(lambda g: g["seed"].nunique() == seeds)
    numeric = runs.drop(columns="seed").groupby("method", sort=False)
    mean, std = numeric.mean(), numeric.std(ddof=1).fillna(0.0)
    return mean.round(1).astype(str) + " ± " + std.round(1).astype(str)


def recovery(runs: pd.DataFrame, method: str, column: str) -> float:
    """Share of FLYP's loss against zero-shot on `column` that `method` wins back (on the seed means)."""
    means = runs.groupby("method")[column].mean()
    lost = means["zeroshot"] - means["flyp"]
    return float("nan") if lost <= 0 else (means[method] - means["flyp"]) / lost


def targets(runs: pd.DataFrame) -> pd.DataFrame:
    """The embedded world's targets, each with its measured value on the seed means and whether it holds."""
    m = runs.groupby("method")[COLUMNS].mean()
    # (target, a, b, column, threshold): the measured value is m[a] - m[b] on `column`, wanted >= threshold
    differences = [
        ("FLYP ID gain over zero-shot", "flyp", "zeroshot", "id", 6, ">= 6 (stretch 10)"),
        ("FLYP loss on zero-shot classes", "zeroshot", "flyp", "zeroshot", 5, ">= 5"),
        ("FLYP loss on shift average", "zeroshot", "flyp", "shift_avg", 3, ">= 3"),
        ("ARF ID minus FLYP ID", "arf", "flyp", "id", -1, ">= -1"),
    ]
    rows = []
    for target, a, b, column, threshold, wanted in differences:
        value = m.loc[a, column] - m.loc[b, column]
        rows.append((target, value, wanted, value >= threshold))
    for method in ("arf", "arf_caption", "arf_retrieval"):
        for column, axis in (("shift_avg", "shift"), ("zeroshot", "zero-shot classes")):
            share = recovery(runs, method, column)
            rows.append((f"{method} recovery of FLYP's {axis} loss", share, ">= 0.5" if method == "arf" else "report",
                         share >= 0.5 if method == "arf" else None))
    for control in ("replay", "wise_flyp_0.5"):
        dominated = bool((m.loc[control, ["id", "ood_avg"]] >= m.loc["arf", ["id", "ood_avg"]]).all())
        rows.append((f"ARF dominated by {control} (ID and OOD avg both >=)", float(dominated), "no", not dominated))
    table = pd.DataFrame(rows, columns=["target", "measured", "wanted", "holds"])
    table["measured"] = table["measured"].round(3)
    table["holds"] = table["holds"].map({True: "yes", False: "no"}).fillna("")
    return table
