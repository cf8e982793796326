"""The demo's tables and plot: per-method summaries, WiSE-FT curves, feature drift, ID vs OOD."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from torch import Tensor

from anchor_clip.data.tables import write_atomic
from anchor_clip.eval.drift import feature_drift
from anchor_clip.world.config import World


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
