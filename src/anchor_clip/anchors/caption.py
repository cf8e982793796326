"""Caption the finetune images for ARF's caption anchors, in shards a killed job resumes from.

ARF pairs every finetune image with a caption from a pretrained captioner; the caption stream of
`AnchorDataModule(captions=...)` reads the table this job writes. Three captioners are built in:
BLIP / BLIP-2 (Hugging Face), open_clip CoCa, and a kNN captioner that borrows the caption of the
nearest pool image under the pretrained CLIP backbone itself (no extra model).

    python -m anchor_clip.caption --finetune ft.csv --out_dir caps --device cuda --precision 16 \
        --captioner BlipCaptioner --captioner.model Salesforce/blip-image-captioning-large

Layout of `out_dir` (every file is written to a temporary name and renamed into place):

    shard_00000.parquet   image_id, caption (+ captioner columns, + score) of manifest rows [0, shard_size)
    index-00000.json      what the job is (fingerprint) and which shards process (rank) 0 finished, with timings;
                          the scheme of `anchors.shards`, which pool embedding shares
    captions.parquet      the merged caption table, one row per finetune image, in manifest order
    report.json           counts, throughput, settings, and how often captions name their image's class

A shard is listed in its process's index only after its file is in place, and a re-run skips every
listed shard, so a killed job keeps its finished shards and captions each image once. With several
processes (``torchrun --nproc_per_node 8 -m anchor_clip.caption ...``), shard ``s`` belongs to rank
``s % world_size``; each rank writes its own shards and index, and whichever rank finds all shards
done last writes the merged table. No process group is needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from torch.utils.data import DataLoader, Dataset

from anchor_clip.anchors.captioners import Captioner, CaptionScorer
from anchor_clip.anchors.mentions import mention_rates
from anchor_clip.anchors.shards import ShardIndex
from anchor_clip.backbones.base import ImageTransform
from anchor_clip.data.images import load_image
from anchor_clip.data.tables import read_classnames, read_table, resolve_paths, write_json, write_table
from anchor_clip.precision import Precision, check_precision

logger = logging.getLogger(__name__)


class _ShardImages(Dataset):
    """Rows of one shard: decoded once per image, then transformed for the captioner (and the scorer)."""

    def __init__(self, paths: Sequence[str], transforms: dict[str, ImageTransform]) -> None:
        self.paths, self.transforms = list(paths), transforms

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image = load_image(self.paths[index])
        except OSError as err:
            raise ValueError(f"cannot read finetune image {self.paths[index]}: {err}") from err
        return {"index": index, **{key: transform(image) for key, transform in self.transforms.items()}}


def _shard_path(out_dir: Path, shard: int) -> Path:
    return out_dir / f"shard_{shard:05d}.parquet"


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """This process's rank, from the arguments or torchrun's RANK/WORLD_SIZE variables (else 0 of 1)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def _process_device(device: str) -> str:
    """Under torchrun, a bare "cuda" means this process's own GPU (LOCAL_RANK)."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


@dataclass
class CaptionResult:
    """What one process of the job did.

    Attributes:
        captioned: images this process captioned in this run (0 when every shard was already done).
        table: the merged caption table, or None when other processes still had shards to finish.
        report: the report written next to the table, or None with `table`.
    """

    captioned: int
    table: Path | None
    report: dict[str, Any] | None


def caption_finetune_set(
    finetune: str,
    out_dir: str,
    captioner: Captioner,
    classnames: str | list[str] | None = None,
    other_classnames: str | list[str] | None = None,
    score_backbone: str | None = None,
    score_pretrained: str | None = None,
    score_backbone_config: dict[str, Any] | None = None,
    score_threshold: float | None = None,
    fallback_template: str = "a photo of a {}.",
    table: str = "captions.parquet",
    batch_size: int = 64,
    num_workers: int = 4,
    device: str = "cpu",
    precision: Precision = "32",
    shard_size: int = 10_000,
    rank: int | None = None,
    world_size: int | None = None,
) -> CaptionResult:
    """Caption every image of a finetune manifest into resumable shards, then merge them into one table.

    Args:
        finetune: finetune manifest (`image_id`, `filepath`, `label`; docs/formats.md).
        out_dir: shard directory; finished shards found there are kept.
        captioner: a `BlipCaptioner`, `CocaCaptioner`, `KnnCaptioner` or any `Captioner`.
        classnames: finetune class names (list or file; label i names line i). Needed by the kNN label filter
            and the score fallback; with them the report counts how often captions name the image's class.
        other_classnames: class names outside the finetune set (e.g. the zero-shot evaluation classes); the
            report counts captions that name one of them.
        score_backbone: backbone spec that scores each image-caption pair by cosine similarity (a `score` column).
        score_pretrained: pretrained tag or checkpoint of `score_backbone`.
        score_backbone_config: config dict of `score_backbone` instead of a named model.
        score_threshold: captions scoring below it are replaced by `fallback_template` with the image's class
            name in the merged table, since the caption stream needs a text for every finetune image. Applied at
            merge time, so changing it re-captions nothing.
        fallback_template: class prompt for replaced captions (one `{}`).
        table: file name of the merged table in `out_dir`; its extension picks the format (.parquet keeps
            empty captions and string ids exactly; CSV turns an empty caption into "nan" on reading).
        batch_size: images per `generate` call.
        num_workers: DataLoader workers decoding and transforming images.
        device: torch device; under torchrun, "cuda" means this process's GPU.
        precision: "32", "16" or "bf16".
        shard_size: manifest rows per shard (the unit of resumption).
        rank: this process's index among `world_size`; None reads torchrun's RANK (else 0).
        world_size: number of processes splitting the shards; None reads WORLD_SIZE (else 1).

    Returns:
        What this process did, with the merged table when it was the one to write it.
    """
    if batch_size <= 0 or shard_size <= 0:
        raise ValueError(f"batch_size and shard_size must be positive, got {batch_size} and {shard_size}")
    check_precision(precision)
    manifest = read_table(finetune, required=("image_id", "filepath", "label"), what="finetune manifest")
    if manifest.empty:
        raise ValueError(f"finetune manifest {finetune} has no rows; there is nothing to caption")
    duplicated = manifest["image_id"][manifest["image_id"].duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(
            f"finetune manifest {finetune} repeats image_id values {duplicated[:5]}; ids must be unique "
            "because the caption table is keyed by them"
        )
    names = read_classnames(classnames, what="classnames") if classnames is not None else None
    if names is not None:
        bad = sorted(set(manifest["label"][(manifest["label"] < 0) | (manifest["label"] >= len(names))]))
        if bad:
            raise ValueError(
                f"labels {bad[:5]} of {finetune} do not index the {len(names)} class names; "
                "check that the class-name list belongs to this manifest"
            )
    if names is None and (captioner.uses_labels or score_threshold is not None):
        raise ValueError(
            "classnames are required by the kNN label filter and by score_threshold (the fallback text "
            "names the class); pass --classnames"
        )
    if score_threshold is not None and score_backbone is None:
        raise ValueError("score_threshold needs score_backbone, the CLIP model that scores captions")
    if "{}" not in fallback_template:
        raise ValueError(f"fallback_template needs one '{{}}' for the class name, got {fallback_template!r}")
    if Path(table).suffix.lower() not in (".csv", ".jsonl", ".parquet") or Path(table).name != table:
        raise ValueError(f"table must be a file name ending in .parquet, .csv or .jsonl, got {table!r}")
    scorer = CaptionScorer(score_backbone, score_pretrained, score_backbone_config) if score_backbone else None

    ids = manifest["image_id"].tolist()
    n_shards = -(-len(ids) // shard_size)
    fingerprint = {
        "rows": len(ids),
        "image_ids_sha1": hashlib.sha1("\n".join(ids).encode()).hexdigest(),
        "shard_size": shard_size,
        "captioner": captioner.settings(),
        "scorer": scorer.settings() if scorer else None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world_size = _rank_and_world(rank, world_size)
    index = ShardIndex(out, fingerprint, "captions", rank)
    finished = index.finished()
    todo = [s for s in range(rank, n_shards, world_size) if s not in finished]

    captioned = 0
    if todo:
        device = _process_device(device)
        paths = resolve_paths(manifest, finetune)
        label_names = [names[label] for label in manifest["label"]] if names is not None else None
        captioner.setup(device, precision)
        transforms = {"pixels": captioner.transform}
        if scorer is not None:
            scorer.setup(device, precision)
            transforms["score_pixels"] = scorer.transform
        for shard in todo:
            rows = slice(shard * shard_size, min((shard + 1) * shard_size, len(ids)))
            start = time.perf_counter()
            columns = _caption_shard(
                paths[rows],
                label_names[rows] if label_names else None,
                captioner,
                scorer,
                transforms,
                batch_size,
                num_workers,
                pin_memory=device.startswith("cuda"),
            )
            write_table(pd.DataFrame({"image_id": ids[rows], **columns}), _shard_path(out, shard))
            seconds = time.perf_counter() - start
            index.commit(shard, {"rows": rows.stop - rows.start, "seconds": seconds, "device": device,
                                 "precision": precision, "batch_size": batch_size})
            captioned += rows.stop - rows.start
            logger.info(
                "rank %d: shard %d of %d, %d images in %.1f s (%.1f images/s)",
                rank,
                shard + 1,
                n_shards,
                rows.stop - rows.start,
                seconds,
                (rows.stop - rows.start) / seconds,
            )
        finished = index.finished()

    if len(finished) < n_shards:
        return CaptionResult(captioned, None, None)
    merged, report = _merge(
        out, manifest, n_shards, finished, names, other_classnames, fingerprint, score_threshold, fallback_template
    )
    table_path = write_table(merged, out / table)
    report["table"] = str(table_path)
    write_json(report, out / "report.json")
    return CaptionResult(captioned, table_path, report)


def _caption_shard(
    paths: Sequence[str],
    label_names: Sequence[str] | None,
    captioner: Captioner,
    scorer: CaptionScorer | None,
    transforms: dict[str, ImageTransform],
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
) -> dict[str, list]:
    """Columns (caption, captioner extras, score) for the images of one shard, in order."""
    loader = DataLoader(
        _ShardImages(paths, transforms),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
    columns: dict[str, list] = {}
    for batch in loader:
        names = [label_names[i] for i in batch["index"].tolist()] if label_names is not None else None
        out = captioner.generate(batch["pixels"], names)
        if scorer is not None:
            out["score"] = scorer.score(batch["score_pixels"], out["caption"])
        for key, values in out.items():
            columns.setdefault(key, []).extend(values)
    return columns


def _merge(
    out: Path,
    manifest: pd.DataFrame,
    n_shards: int,
    finished: dict[int, dict],
    names: list[str] | None,
    other_classnames: str | list[str] | None,
    fingerprint: dict,
    score_threshold: float | None,
    fallback_template: str,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The caption table in manifest order (threshold applied) and the report describing it."""
    merged = pd.concat(
        [
            read_table(_shard_path(out, s), required=("image_id", "caption"), what=f"caption shard {s}")
            for s in range(n_shards)
        ],
        ignore_index=True,
    )
    if merged["image_id"].tolist() != manifest["image_id"].tolist():
        raise ValueError(
            f"the shards in {out} do not line up with the finetune manifest's image ids; delete {out} and caption again"
        )
    captioner_captions = merged["caption"].tolist()
    labels = manifest["label"].tolist()
    seconds = sum(entry["seconds"] for entry in finished.values())
    report: dict[str, Any] = {
        "images": len(merged),
        "shards": n_shards,
        "shard_size": fingerprint["shard_size"],
        "seconds": seconds,
        "images_per_second_per_process": len(merged) / seconds if seconds > 0 else None,
        "devices": sorted({entry["device"] for entry in finished.values()}),
        "precision": sorted({entry["precision"] for entry in finished.values()}),
        "captioner": fingerprint["captioner"],
        "score": None,
        "label_filter": None,
        "class_mentions": None,
    }
    if "score" in merged:
        score = {**fingerprint["scorer"], "threshold": score_threshold, "mean": float(merged["score"].mean())}
        if score_threshold is not None:
            below = merged["score"] < score_threshold
            merged["captioner_caption"] = captioner_captions
            merged["below_threshold"] = below
            replaced_labels = manifest["label"].to_numpy()[below.to_numpy()]
            merged.loc[below, "caption"] = [fallback_template.format(names[label]) for label in replaced_labels]
            score.update(below_threshold=int(below.sum()), fallback_template=fallback_template)
        report["score"] = score
    if "label_found" in merged:
        found, rank = merged["label_found"].astype(bool), merged["neighbour_rank"]
        report["label_filter"] = {
            "top_m": fingerprint["captioner"]["top_m"],
            "kept_nearest": int((found & (rank == 0)).sum()),
            "replaced": int((rank > 0).sum()),
            "fell_back": int((~found).sum()),
        }
    if names is not None:
        others = read_classnames(other_classnames, what="other_classnames") if other_classnames else None
        report["class_mentions"] = {"captioner": mention_rates(captioner_captions, labels, names, others)}
        if score_threshold is not None:
            report["class_mentions"]["table"] = mention_rates(merged["caption"].tolist(), labels, names, others)
    return merged, report


def main(args: list[str] | None = None) -> CaptionResult:
    """`python -m anchor_clip.caption`: `caption_finetune_set` from the command line or a YAML file (--config)."""
    from jsonargparse import CLI

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = CLI(caption_finetune_set, args=args, as_positional=False, prog="python -m anchor_clip.caption")
    if result.table is None:
        print(f"captioned {result.captioned} images; other processes still have shards to finish")
    else:
        print(f"captioned {result.captioned} images; caption table: {result.table}")
        print(json.dumps({k: v for k, v in result.report.items() if k != "captioner"}, indent=2))
    return result
