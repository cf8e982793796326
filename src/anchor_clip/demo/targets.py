"""What the embedded world's results should show over seeds: per-seed tables, their means, and the targets.

`run_seeds` runs the demo once per world seed (finetune seed = world seed) and stacks the tables; `targets`
reads the world's targets off the seed means (FLYP forgets, ARF keeps FLYP's ID accuracy and wins back what
FLYP lost, no control dominates ARF). `experiments/world_seeds.py` is the command line over them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from anchor_clip.data.tables import read_table
from anchor_clip.demo.recipes import DemoConfig, FinetuneRecipe, PretrainRecipe
from anchor_clip.demo.run import run_demo
from anchor_clip.world.config import WorldConfig

COLUMNS = ["id", "shift_avg", "zeroshot", "ood_avg"]


def run_seeds(seeds: list[int], out: Path, context_bias: float = WorldConfig.finetune_context_bias,
              finetune: FinetuneRecipe | None = None, pretrain: PretrainRecipe | None = None,
              ablations: bool = True, anchor_sizes: tuple[int, ...] = ()) -> pd.DataFrame:
    """Per-seed demo tables stacked, with a `seed` column (runs the seeds that have no results yet).

    `context_bias` is each world's `WorldConfig.finetune_context_bias`; `finetune` the recipe of every method,
    `pretrain` the world CLIP's; `ablations` and `anchor_sizes` as in `DemoConfig`.
    """
    finetune, pretrain = finetune or FinetuneRecipe(), pretrain or PretrainRecipe()
    frames = []
    for seed in seeds:
        seed_dir = out / f"seed_{seed}"
        if not (seed_dir / "results.csv").is_file():
            world = WorldConfig(seed=seed, finetune_context_bias=context_bias)
            run_demo(DemoConfig(world=world, seed=seed, finetune=finetune, pretrain=pretrain, ablations=ablations,
                                anchor_sizes=anchor_sizes), seed_dir)
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


def _methods(runs: pd.DataFrame) -> set[str]:
    return set(runs["method"])


def paired_differences(runs: pd.DataFrame, pairs: list[tuple[str, str]]) -> pd.DataFrame:
    """`a − b` per seed on ID and OOD average, as mean ± std over the seeds, for each (a, b) present."""
    rows, present = [], _methods(runs)
    wide = runs.pivot_table(index="seed", columns="method", values=["id", "ood_avg"])
    for a, b in pairs:
        if not {a, b} <= present:
            continue
        diff = {col: wide[(col, a)] - wide[(col, b)] for col in ("id", "ood_avg")}
        rows.append({"difference": f"{a} − {b}",
                     **{f"{col}": f"{d.mean():+.2f} ± {d.std(ddof=1) if len(d) > 1 else 0.0:.2f}"
                        for col, d in diff.items()},
                     "per seed (ID / OOD)": ", ".join(f"{i:+.2f} / {o:+.2f}"
                                                      for i, o in zip(diff["id"], diff["ood_avg"], strict=True))})
    return pd.DataFrame(rows)


def anchor_pairs(out: Path, seeds: list[int]) -> pd.DataFrame:
    """Anchor pairs per seed and anchor set, from each seed's `demo.json`."""
    rows = []
    for seed in seeds:
        report = json.loads((out / f"seed_{seed}" / "demo.json").read_text())
        rows += [{"seed": seed, "anchors": k, "pairs": n} for k, n in report.get("anchor_pairs", {}).items()]
    return pd.DataFrame(rows, columns=["seed", "anchors", "pairs"])


def size_curve(runs: pd.DataFrame, pairs: pd.DataFrame, full_k: int) -> pd.DataFrame:
    """OOD and ID average against the number of anchor pairs, retrieved anchors vs random replay of that size."""
    sizes = sorted({int(m.split("@")[1]) for m in _methods(runs) if m.startswith("arf_retrieval@")} | {full_k})
    rows = []
    for k in sizes:
        for method, anchors in (("arf_retrieval", "retrieved"), ("replay", "replay")):
            name, key = (method, anchors) if k == full_k else (f"{method}@{k}", f"{anchors}@{k}")
            runs_k = runs[runs["method"] == name]
            if runs_k.empty:
                continue
            n = pairs.loc[pairs["anchors"] == key, "pairs"]
            rows.append({"anchors": method, "k per class": k, "pairs (mean)": round(float(n.mean()), 0),
                         "ID": f"{runs_k['id'].mean():.1f} ± {runs_k['id'].std(ddof=1):.1f}",
                         "OOD avg": f"{runs_k['ood_avg'].mean():.1f} ± {runs_k['ood_avg'].std(ddof=1):.1f}"})
    return pd.DataFrame(rows)


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
    for method in [m for m in ("arf", "arf_caption", "arf_caption_knn", "arf_retrieval") if m in _methods(runs)]:
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
