"""Results tables in the layout of the paper: ID, each shift, OOD average, and the zero-shot transfer sets.

Accuracies travel as a tidy table (`method`, `dataset`, `acc` in [0, 1]); each evaluated model is also
appended as one JSON line with its config, which notebooks load with `load_results`.

    >>> rows = [{"method": "FLYP", "dataset": "imagenet", "acc": 0.8}, {"method": "FLYP", "dataset": "a", "acc": 0.5},
    ...         {"method": "FLYP", "dataset": "r", "acc": 0.7}]
    >>> float(results_table(rows, id_set="imagenet", shift_sets=["a", "r"]).loc["FLYP", "OOD avg"])
    60.0
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from anchor_clip.data.tables import write_atomic, write_table

OOD_AVG = "OOD avg"
TRANSFER_AVG = "ZS avg"


def tidy(results: pd.DataFrame | Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Check and normalise per-method per-dataset accuracies into a (method, dataset, acc) frame."""
    frame = results.copy() if isinstance(results, pd.DataFrame) else pd.DataFrame(list(results))
    missing = [c for c in ("method", "dataset", "acc") if c not in frame.columns]
    if missing:
        raise ValueError(f"results need columns ['method', 'dataset', 'acc'], missing {missing} "
                         f"(found {list(frame.columns)})")
    frame["acc"] = frame["acc"].astype(float)
    if ((frame["acc"] < 0) | (frame["acc"] > 1)).any():
        raise ValueError("accuracies must be fractions in [0, 1]; the tables report them in percent")
    duplicated = frame[frame.duplicated(["method", "dataset"], keep=False)]
    if not duplicated.empty:
        pairs = sorted(set(zip(duplicated["method"], duplicated["dataset"], strict=True)))
        raise ValueError(f"results hold several accuracies for {pairs[:3]}; give each evaluation its own "
                         "method name or load them with load_results(..., keep='last')")
    return frame


def results_table(results: pd.DataFrame | Iterable[Mapping[str, Any]], id_set: str | None = None,
                  shift_sets: Sequence[str] = (), transfer_sets: Sequence[str] = ()) -> pd.DataFrame:
    """The paper-style table, one row per method (first-seen order), accuracies in percent.

    Columns: `id_set`, each shift, `OOD avg` (mean over the shifts), each transfer set, `ZS avg` (mean over
    them). An average over a group is NaN for a method that lacks any set of the group, rather than a
    mean over fewer sets that would not compare across rows.

    Args:
        results: tidy accuracies (`method`, `dataset`, `acc` in [0, 1]).
        id_set: the in-distribution set, first column.
        shift_sets: its distribution shifts.
        transfer_sets: zero-shot transfer sets.
    """
    frame = tidy(results)
    groups = [([id_set] if id_set else []), list(shift_sets), list(transfer_sets)]
    wanted = [s for group in groups for s in group]
    if not wanted:
        raise ValueError("results_table needs an id_set, shift_sets or transfer_sets to lay out")
    absent = [s for s in wanted if s not in set(frame["dataset"])]
    if absent:
        raise ValueError(f"no results for sets {absent}; the results hold {sorted(frame['dataset'].unique())}")
    wide = frame.pivot(index="method", columns="dataset", values="acc").reindex(frame["method"].unique())
    table = pd.DataFrame(index=wide.index)
    table.index.name = "method"
    for sets, average in ((groups[0], None), (groups[1], OOD_AVG), (groups[2], TRANSFER_AVG)):
        for s in sets:
            table[s] = 100 * wide[s]
        if average and sets:
            table[average] = table[list(sets)].mean(axis=1, skipna=False)
    return table


def to_markdown(table: pd.DataFrame, digits: int = 1) -> str:
    """A GitHub markdown table; missing entries print as '-'."""
    cells = table.astype(object).where(table.notna(), None)  # tabulate prints `missingval` for None, not NaN
    return cells.to_markdown(floatfmt=f".{digits}f", missingval="-") + "\n"


def write_results_table(table: pd.DataFrame, stem: str | os.PathLike, digits: int = 1) -> tuple[Path, Path]:
    """Write `<stem>.md` (rounded) and `<stem>.csv` (full precision), each atomically; returns both paths."""
    stem = Path(stem)
    markdown, csv = stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".csv")
    write_atomic(markdown, lambda tmp: Path(tmp).write_text(to_markdown(table, digits)))
    write_table(table.reset_index(), csv)
    return markdown, csv


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one JSON line (one evaluated model with its config) to a results log.

    A single write of one line keeps concurrent appenders from interleaving within a record.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=str) + "\n"
    with path.open("a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def load_results(path: str | os.PathLike, keep: str | None = "last") -> pd.DataFrame:
    """The tidy accuracies of a JSONL results log written by `python -m anchor_clip.evaluate`.

    Args:
        path: the log; each line has `method` and `results: {set: {"acc": ..., "n": ...}}`.
        keep: which record wins when a (method, set) pair was evaluated more than once ('first'/'last'),
            None to keep them all.

    Returns:
        Columns `method`, `dataset`, `acc`, `n` plus every other scalar field of the record (`alpha`,
        `checkpoint`, ...).
    """
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if "method" not in record or not isinstance(record.get("results"), dict):
            raise ValueError(f"{path} line {number} is not an evaluation record (needs 'method' and 'results')")
        fields = {k: v for k, v in record.items() if k != "results" and not isinstance(v, dict | list)}
        rows += [{**fields, "dataset": name, **result} for name, result in record["results"].items()]
    frame = pd.DataFrame(rows)
    if keep is not None and not frame.empty:
        frame = frame.drop_duplicates(["method", "dataset"], keep=keep).reset_index(drop=True)
    return frame
