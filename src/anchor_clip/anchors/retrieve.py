"""Retrieve image-text anchors for the downstream classes from a pretraining-like pool (ARF's third stream).

The job embeds the pool (`embed.embed_pool`, resumable), embeds class prompts (class names x query
templates), searches the pool with a faiss index (`index.build_index`) and selects, per class, k pairs:

- **per-template quota**: k is split evenly over the templates, each template query taking its own top
  pairs. "a photo of a {c}" alone retrieves one style only; one query per style ("a sketch of a {c}.")
  gives the anchor set a balanced style mix.
- **global dedupe**: a pool pair is assigned at most once, to its best class (the class of the prompt it
  is most similar to); inside that class it goes to the best-scoring template that still has room.
- **exclusion**: pairs whose image is a near-duplicate (cosine >= tau) of an evaluation image are never
  selected, so anchors cannot leak test images; `min_score` drops weak matches.

Outputs under `out_dir`: `retrieved_anchors.csv` (a pair manifest, docs/formats.md), `retrieval_report.json`
(counts, similarity stats, precision and style mix when the pool is labelled) and `score_histogram.png`.
Images of webdataset pools are extracted to `out_dir/images/` so the manifest points at real files.

    python -m anchor_clip.retrieve --pool pool.csv --classnames classes.txt --out_dir anchors/ \
        --backbone open_clip:ViT-B-16 --pretrained openai --k 100
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from anchor_clip.anchors.embed import PoolEmbeddings, embed_images, embed_pool, resolve_backbone
from anchor_clip.anchors.index import build_index, normalize
from anchor_clip.anchors.pool import TAR_COLUMNS, read_image_bytes
from anchor_clip.anchors.select import (
    Modality,
    class_quotas,
    modality_vectors,
    near_duplicate_filter,
    query_prompts,
    select_anchors,
    template_of,
)
from anchor_clip.backbones.base import ClipBackbone
from anchor_clip.data.tables import read_classnames, read_table, resolve_paths, write_json, write_table
from anchor_clip.precision import Precision

#: One query per style, so each style gets k / 4 of a class's anchors (see the module docstring).
STYLE_TEMPLATES = ("a photo of a {c}.", "a sketch of a {c}.", "a cartoon of a {c}.", "a painting of a {c}.")
MANIFEST_NAME = "retrieved_anchors.csv"
REPORT_NAME = "retrieval_report.json"
HISTOGRAM_NAME = "score_histogram.png"

def _safe_relpath(key: str) -> Path:
    """A tar key as a relative path that cannot climb out of the images directory."""
    parts = [p for p in Path(key).parts if p not in ("", ".", "..", "/")]
    if not parts:
        raise ValueError(f"webdataset key {key!r} names no file")
    return Path(*parts)


def materialize_images(rows: pd.DataFrame, out_dir: Path) -> list[str]:
    """Extract the images of selected webdataset rows to `out_dir/images/<tar stem>/<key>.<ext>`.

    Files already there with the right size are kept, so a re-run only extracts what is missing.

    Returns:
        Paths relative to `out_dir` (the manifest's directory), one per row.
    """
    paths = []
    for tar, key, member, offset, size in zip(
        rows["tar"], rows["key"], rows["member"], rows["offset"], rows["size"], strict=True
    ):
        suffix = Path(member).name.partition(".")[2]
        relative = Path("images") / Path(tar).stem / _safe_relpath(f"{key}.{suffix}")
        target = out_dir / relative
        if not (target.is_file() and target.stat().st_size == size):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_bytes(read_image_bytes((tar, int(offset), int(size))))
            os.replace(tmp, target)
        paths.append(relative.as_posix())
    return paths


def anchor_table(
    selection: pd.DataFrame, pool: PoolEmbeddings, classnames: Sequence[str], prompts: Sequence[str], out_dir: Path
) -> pd.DataFrame:
    """The retrieved-anchor pair manifest: `filepath, caption, image_id, class, score, query` + pool extras.

    Manifest pools keep absolute file paths; webdataset images are extracted and referenced relative to
    `out_dir`, where the manifest is written. Pool columns named like ours are kept as `pool_<name>`.
    """
    n_templates = len(prompts) // len(classnames)
    rows = pool.rows.iloc[selection["pool_index"].to_numpy()].reset_index(drop=True)
    if pool.kind == "webdataset":
        filepaths = materialize_images(rows, out_dir)
        image_ids = rows["key"].astype(str)
        extras = rows.drop(columns=[*TAR_COLUMNS, "key", "caption"])
    else:
        filepaths = list(rows["filepath"])
        image_ids = rows["image_id"].astype(str) if "image_id" in rows else selection["pool_index"].astype(str)
        extras = rows.drop(columns=[c for c in ("filepath", "caption", "image_id") if c in rows])
    table = pd.DataFrame(
        {
            "filepath": filepaths,
            "caption": rows["caption"].to_numpy(),
            "image_id": image_ids.to_numpy(),
            "class": [classnames[c] for c in selection["class_index"]],
            "score": selection["score"].to_numpy(),
            "query": [
                prompts[c * n_templates + t]
                for c, t in zip(selection["class_index"], selection["template_index"], strict=True)
            ],
        }
    )
    extras = extras.rename(columns={c: f"pool_{c}" for c in extras.columns if c in table.columns})
    return pd.concat([table, extras.reset_index(drop=True)], axis=1)


def _label_names(anchors: pd.DataFrame, pool_classnames: Sequence[str] | None) -> pd.Series | None:
    """Pool labels of the anchors as class names, or None when they cannot be named."""
    if "label" not in anchors:
        return None
    labels = anchors["label"]
    if pd.api.types.is_numeric_dtype(labels):
        # Integer labels index the pool's own class list, which need not be the target class list.
        if pool_classnames is None:
            return None
        if labels.min() < 0 or labels.max() >= len(pool_classnames):
            raise ValueError(
                f"pool labels span [{labels.min()}, {labels.max()}] but pool_classnames has "
                f"{len(pool_classnames)} names; pass the class list the pool's labels index"
            )
        return labels.map(lambda i: pool_classnames[int(i)])
    return labels.astype(str)


def retrieval_report(
    anchors: pd.DataFrame,
    classnames: Sequence[str],
    templates: Sequence[str],
    k: int,
    pool_classnames: Sequence[str] | None = None,
) -> dict:
    """Counts, similarity statistics and, for labelled pools, precision and style mix of an anchor set.

    `precision` is the share of anchors whose pool label is any target class; `class_precision` the
    share whose pool label is the class it was retrieved for. Both need a `label` column holding class
    names, or integers plus `pool_classnames`.
    """
    counts = anchors["class"].value_counts()
    template = template_of(anchors, classnames, templates)
    per_class = {name: int(counts.get(name, 0)) for name in classnames}
    scores = anchors["score"].to_numpy()
    report: dict = {
        "size": len(anchors),
        "k": k,
        "classes": len(classnames),
        "per_class_counts": per_class,
        "short_classes": {name: n for name, n in per_class.items() if n < k},
        "per_template_counts": {t: int((template == t).sum()) for t in templates},
        "score": {
            name: float(fn(scores)) if len(scores) else None
            for name, fn in {
                "min": np.min,
                "p05": lambda s: np.percentile(s, 5),
                "mean": np.mean,
                "median": np.median,
                "p95": lambda s: np.percentile(s, 95),
                "max": np.max,
            }.items()
        },
        "precision": None,
        "class_precision": None,
    }
    names = _label_names(anchors, pool_classnames)
    if names is not None and len(anchors):
        report["precision"] = float(names.isin(set(classnames)).mean())
        report["class_precision"] = float((names.to_numpy() == anchors["class"].to_numpy()).mean())
    elif "label" in anchors:
        report["precision_note"] = "pool labels are integers; pass pool_classnames to name them"
    if "style" in anchors and len(anchors):
        report["style_mix"] = {str(s): float(v) for s, v in anchors["style"].value_counts(normalize=True).items()}
        report["style_by_template"] = {
            t: {str(s): int(v) for s, v in anchors.loc[template == t, "style"].value_counts().items()}
            for t in templates
        }
    return report


def save_score_histogram(
    anchors: pd.DataFrame, templates: Sequence[str], classnames: Sequence[str], path: Path
) -> None:
    """A stacked histogram of anchor scores, one colour per query template (atomic PNG write)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display needed on servers
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    template = template_of(anchors, classnames, templates)
    groups = [anchors.loc[template == t, "score"].to_numpy() for t in templates]
    scores = anchors["score"].to_numpy()
    low, high = (float(scores.min()), float(scores.max())) if len(scores) else (0.0, 1.0)
    pad = 0.01 if high - low < 1e-6 else 0.0  # equal scores still get bins of finite width
    axes.hist(groups, bins=40, range=(low - pad, high + pad), stacked=True, label=list(templates))
    axes.set_xlabel("cosine similarity of anchor to its query")
    axes.set_ylabel("anchors")
    axes.set_title(f"{len(anchors)} retrieved anchors")
    axes.legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def _eval_filepaths(manifests: Sequence[str]) -> list[str]:
    tables = {m: read_table(m, required=["filepath"], what="retrieve.exclude_manifests") for m in manifests}
    return [path for manifest, table in tables.items() for path in resolve_paths(table, manifest)]


def retrieve(
    pool: str | list[str],
    classnames: str | list[str],
    out_dir: str,
    backbone: str | ClipBackbone = "open_clip:ViT-B-16",
    pretrained: str | None = None,
    backbone_config: dict | None = None,
    templates: tuple[str, ...] = STYLE_TEMPLATES,
    k: int = 100,
    modality: Modality = "image",
    min_score: float | None = None,
    exclude_manifests: list[str] | None = None,
    exclude_threshold: float = 0.95,
    index_factory: str | None = None,
    nprobe: int | None = None,
    max_depth: int | None = None,
    pool_classnames: str | list[str] | None = None,
    embeddings_dir: str | None = None,
    batch_size: int = 256,
    num_workers: int = 4,
    device: str = "cpu",
    precision: Precision = "32",
    shard_size: int = 50_000,
) -> pd.DataFrame:
    """Retrieve k image-text anchors per downstream class from a pool and write manifest + report.

    Args:
        pool: pair manifest (CSV/JSONL/parquet with `filepath, caption`), or webdataset tar paths/globs.
        classnames: the downstream classes: a list, or a text file with one name per line.
        out_dir: where the manifest, report, histogram (and extracted webdataset images) go.
        backbone: registry spec (`open_clip:ViT-B-16`), or a ready `ClipBackbone` from Python.
        pretrained: pretrained tag or checkpoint path for the spec; None for random init.
        backbone_config: model config dict (JSON on the command line) instead of a named model.
        templates: query templates with a `{c}` placeholder; k is split evenly over them.
        k: anchors per class.
        modality: what prompts are compared with: pool `image`s, `text` captions, or `both` (mean).
        min_score: drop pairs scoring below this.
        exclude_manifests: evaluation manifests (`filepath` column) whose images must not be retrieved.
        exclude_threshold: image cosine at or above which a pool image counts as an evaluation image.
        index_factory: faiss factory string overriding the size-based choice ("Flat", "IVF4000,Flat").
        nprobe: IVF cells probed per query; None picks ~1% of the cells (at least 16).
        max_depth: neighbours searched per query at most; None means 16 x the largest template quota.
        pool_classnames: class names the pool's integer `label` column indexes (for the precision report).
        embeddings_dir: where pool embeddings are sharded; None uses `out_dir/pool_embeddings`. Reused
            (resumed) across runs with the same pool and backbone.
        batch_size: pairs per forward pass when embedding.
        num_workers: DataLoader workers when embedding.
        device: torch device for the backbone.
        precision: "32", or "bf16"/"16" autocast when embedding.
        shard_size: manifest rows per embedding shard.

    Returns:
        The anchor manifest as written to `out_dir/retrieved_anchors.csv`.
    """
    names = read_classnames(classnames)
    prompts = query_prompts(names, templates)
    class_quotas(k, len(templates))  # validates k before any embedding starts
    pool_names = read_classnames(pool_classnames) if pool_classnames is not None else None
    eval_paths = _eval_filepaths(exclude_manifests or [])
    out = Path(out_dir)
    model, model_io, identity = resolve_backbone(backbone, pretrained=pretrained, config=backbone_config)

    embeddings = embed_pool(
        pool,
        embeddings_dir or out / "pool_embeddings",
        model,
        model_io,
        backbone_id=identity,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        precision=precision,
        shard_size=shard_size,
    )
    model.eval().to(device)
    with torch.no_grad():
        prompt_features = normalize(model.encode_texts(prompts, batch_size=batch_size))  # (C*T, D)
    if prompt_features.shape[1] != embeddings.image.shape[1]:
        raise ValueError(
            f"prompt features are {prompt_features.shape[1]}-d but pool embeddings are "
            f"{embeddings.image.shape[1]}-d; the embeddings were made by another backbone"
        )
    queries = prompt_features.reshape(len(names), len(templates), -1)  # (C, T, D)
    pool_vectors, query_vectors = modality_vectors(embeddings.image, embeddings.text, queries, modality)
    index = build_index(pool_vectors, factory=index_factory, nprobe=nprobe)
    exclude = None
    if eval_paths:
        eval_features = embed_images(eval_paths, model, model_io, batch_size, num_workers, device, precision)
        exclude = near_duplicate_filter(embeddings.image, eval_features, exclude_threshold)
    selection = select_anchors(
        pool_vectors, query_vectors, k, index=index, exclude=exclude, min_score=min_score, max_depth=max_depth
    )

    anchors = anchor_table(selection.table, embeddings, names, prompts, out)
    write_table(anchors, out / MANIFEST_NAME)
    report = retrieval_report(anchors, names, templates, k, pool_names)
    report.update(
        pool={"size": len(embeddings.rows), "kind": embeddings.kind, "backbone": embeddings.backbone},
        index={"factory": index.factory, "nprobe": index.nprobe, "depth": selection.depth},
        excluded_near_duplicates=selection.excluded,
        config={
            "pool": pool,
            "backbone": identity,
            "templates": list(templates),
            "modality": modality,
            "min_score": min_score,
            "exclude_manifests": exclude_manifests,
            "exclude_threshold": exclude_threshold if eval_paths else None,
            "max_depth": max_depth,
        },
    )
    write_json(report, out / REPORT_NAME)
    save_score_histogram(anchors, templates, names, out / HISTOGRAM_NAME)
    return anchors


def main(args: Sequence[str] | None = None) -> None:
    """Command line: `python -m anchor_clip.retrieve --help` (also takes `--config job.yaml`)."""
    from jsonargparse import CLI

    import anchor_clip.backbones  # noqa: F401  (registers the adapter families)

    anchors = CLI(
        retrieve, args=None if args is None else list(args), as_positional=False, prog="python -m anchor_clip.retrieve"
    )
    print(f"retrieved {len(anchors)} anchors for {anchors['class'].nunique()} classes")
