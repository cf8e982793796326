"""Reading and writing the tables anchor_clip exchanges (see docs/formats.md).

Every table is CSV, JSONL or parquet, chosen by extension, and is checked for the columns its reader
needs, so a wrong separator or a caption file for another dataset fails here with a useful message
rather than as a `KeyError` inside a DataLoader worker.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

# Ids, paths and captions stay strings: an id like "0001" must not become the number 1.
_STRING_COLUMNS = {"image_id": str, "filepath": str, "caption": str}
_READERS = {
    ".csv": lambda p: pd.read_csv(p, dtype=_STRING_COLUMNS, keep_default_na=False),
    ".jsonl": lambda p: pd.read_json(p, lines=True, dtype=False),
    ".parquet": pd.read_parquet,
}


def read_table(path: str | Path, required: Sequence[str] = (), what: str = "table",
               nonempty: Sequence[str] = ()) -> pd.DataFrame:
    """Load a table and check it has the `required` columns.

    Args:
        path: a .csv, .jsonl or .parquet file.
        required: column names the caller needs.
        what: the config field or role of the table, named in errors.
        nonempty: columns that may hold no null or blank value (a missing caption would otherwise train as
            the text "None" or "").
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what}: file {str(path)!r} does not exist")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(
            f"{what}: {path.name} has unsupported extension {path.suffix!r}; use one of {sorted(_READERS)}"
        )
    frame = reader(path)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{what}: {path} has no column(s) {missing} (found: {list(frame.columns)}). "
            f"Expected columns {list(required)}; CSV files must be comma-separated with a header row."
        )
    for column in nonempty:
        values = frame[column]
        blank = values.isna() | values.astype(str).str.strip().eq("")
        if blank.any():
            key = frame["image_id"] if "image_id" in frame.columns and column != "image_id" else None
            first = (key[blank] if key is not None else frame.index[blank]).tolist()[:5]
            raise ValueError(
                f"{what}: {path} has {int(blank.sum())} empty value(s) in column {column!r} (first "
                f"{'image_ids' if key is not None else 'rows'}: {first}); fill or drop those rows"
            )
    for column in _STRING_COLUMNS:
        if column in frame.columns:
            frame[column] = frame[column].astype(str)
    return frame


def check_unique(frame: pd.DataFrame, column: str, what: str, path: str | Path) -> None:
    """Ids that key a join (`image_id`) must be unique, or rows silently take another row's value."""
    duplicated = frame[column][frame[column].duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(f"{what}: {path} repeats {len(duplicated)} {column}(s) (first: {duplicated[:5]}); "
                         f"each {column} must appear once")


def write_atomic(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call `write(tmp)` on a temp file in `path`'s directory, then rename it to `path`.

    A killed writer leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(obj: object, path: str | Path) -> Path:
    """Write JSON atomically (reports, shard indexes)."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=str)))


def write_table(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a table atomically, in the format its extension names."""
    suffix = Path(path).suffix.lower()
    if suffix not in _READERS:
        raise ValueError(f"cannot write {path}: unsupported extension {suffix!r}; use one of {sorted(_READERS)}")
    writers = {
        ".csv": lambda tmp: frame.to_csv(tmp, index=False),
        ".jsonl": lambda tmp: frame.to_json(tmp, orient="records", lines=True, force_ascii=False),
        ".parquet": lambda tmp: frame.to_parquet(tmp, index=False),
    }
    return write_atomic(path, writers[suffix])


def resolve_paths(frame: pd.DataFrame, table_path: str | Path) -> list[str]:
    """Absolute image paths: relative `filepath`s resolve against the table's directory."""
    base = Path(table_path).resolve().parent
    return [p if os.path.isabs(p) else str(base / p) for p in frame["filepath"]]


def check_templates(templates: Sequence[str], what: str) -> None:
    """Prompt templates name the class as `{c}` (``"a photo of a {c}."``), the convention of every job here."""
    if not templates or any("{c}" not in t for t in templates):
        raise ValueError(f"{what} must be non-empty format strings containing '{{c}}', got {list(templates)}")


def read_classnames(spec: str | Sequence[str], what: str = "classnames") -> list[str]:
    """Class names from a list or a text file with one name per line (line i names label i)."""
    if isinstance(spec, str):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"{what}: class-name file {spec!r} does not exist (expected one name per line)")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [str(n) for n in spec]
    if not names:
        raise ValueError(f"{what}: no class names in {spec!r}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{what}: class names must be unique, got duplicates {duplicates[:5]}")
    return names
