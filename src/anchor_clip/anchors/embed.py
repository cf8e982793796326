"""Embed an image-text pool with a CLIP backbone, in shards a killed job can resume from.

A pool is a pair manifest or webdataset tar shards (read by `anchors.pool`). Pools run to millions of
pairs, so the job writes its output in shards under `out_dir`:

    out_dir/index-00000.json      what was embedded with what, and which shards are finished (`anchors.shards`)
    out_dir/image_00000.npy       (n, D) float32 L2-normalized image features of shard 0
    out_dir/text_00000.npy        (n, D) float32 L2-normalized caption features of shard 0
    out_dir/meta_00000.parquet    the shard's pool rows (filepath/caption/extra columns, or tar offsets)

Every file is written to a temporary name and renamed into place, and a shard is listed in the index
only after its three files are in place, so a killed job leaves no half shard and a re-run skips
finished shards. Manifest pools are cut into `shard_size` rows; a tar file is one shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from anchor_clip.anchors.pool import ImageTextDataset, PoolSource, image_refs, read_manifest_pool, scan_tar
from anchor_clip.anchors.shards import ShardIndex, read_indexes
from anchor_clip.backbones.base import BackboneIO, ClipBackbone
from anchor_clip.backbones.registry import create_backbone
from anchor_clip.data.tables import read_table, write_atomic, write_table
from anchor_clip.precision import Precision, autocast


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object keeps np.save from appending ".npy" to the temp name
            np.save(f, array)

    write_atomic(path, write)


@torch.no_grad()
def encode_dataset(
    model: ClipBackbone,
    dataset: ImageTextDataset,
    batch_size: int = 256,
    num_workers: int = 4,
    device: str | torch.device = "cpu",
    precision: Precision = "32",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Encode every item of `dataset` with `model` (already on `device`, in eval mode).

    Returns:
        image: (N, D) float32 normalized image features; text: (N, D) caption features, or None when the
        dataset has no captions. Features are re-normalized in float32 since half-precision towers leave
        norms ~1e-3 off 1, and the index treats inner products as cosines.
    """
    device = torch.device(device)
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False, pin_memory=device.type == "cuda"
    )
    images, texts = [], []
    for batch in loader:
        with autocast(device, precision):
            images.append(model.encode_image(batch["image"].to(device, non_blocking=True)))
            if "tokens" in batch:
                texts.append(model.encode_text(batch["tokens"].to(device, non_blocking=True)))
    image = F.normalize(torch.cat(images).float(), dim=-1).cpu().numpy()
    text = F.normalize(torch.cat(texts).float(), dim=-1).cpu().numpy() if texts else None
    return image, text


def resolve_backbone(
    backbone: ClipBackbone | str,
    backbone_io: BackboneIO | None = None,
    pretrained: str | None = None,
    config: dict | None = None,
) -> tuple[ClipBackbone, BackboneIO, str]:
    """(model, io, identity string) from a ready backbone or a registry spec.

    The identity is recorded next to embeddings, so features of two different models are never mixed.
    """
    if isinstance(backbone, ClipBackbone):
        if pretrained is not None or config is not None:
            raise ValueError(
                "pretrained/config only apply to a backbone spec; a ready ClipBackbone was given. "
                "Drop them, or pass the spec string instead of the model."
            )
        return backbone, backbone_io or backbone.io, f"object:{type(backbone).__qualname__}"
    if not isinstance(backbone, str):
        raise ValueError(
            f"backbone must be a ClipBackbone or a spec string like 'open_clip:ViT-B-16', got {backbone!r}"
        )
    model = create_backbone(backbone, pretrained=pretrained, config=config)
    identity = json.dumps({"spec": backbone, "pretrained": pretrained, "config": config}, sort_keys=True)
    return model, backbone_io or model.io, identity


@dataclass
class PoolEmbeddings:
    """A fully embedded pool.

    Attributes:
        image: (N, D) float32 normalized image features.
        text: (N, D) float32 normalized caption features.
        rows: (N,) pool rows aligned with the features (`filepath, caption, ...` or tar locations).
        kind: "manifest" or "webdataset".
        backbone: identity of the model that produced the features.
    """

    image: np.ndarray
    text: np.ndarray
    rows: pd.DataFrame
    kind: str
    backbone: str


def _shard_files(out_dir: Path, shard: int) -> dict[str, Path]:
    return {
        "image": out_dir / f"image_{shard:05d}.npy",
        "text": out_dir / f"text_{shard:05d}.npy",
        "meta": out_dir / f"meta_{shard:05d}.parquet",
    }


def _save_shard(out_dir: Path, shard: int, image: np.ndarray, text: np.ndarray, rows: pd.DataFrame) -> None:
    """Write one shard's three files, each atomically (the caller lists it in the index afterwards)."""
    files = _shard_files(out_dir, shard)
    _save_npy(files["image"], image)
    _save_npy(files["text"], text)
    write_table(rows.reset_index(drop=True), files["meta"])


def embed_pool(
    pool: str | Sequence[str],
    out_dir: str | os.PathLike,
    backbone: ClipBackbone | str,
    backbone_io: BackboneIO | None = None,
    pretrained: str | None = None,
    config: dict | None = None,
    batch_size: int = 256,
    num_workers: int = 4,
    device: str = "cpu",
    precision: Precision = "32",
    shard_size: int = 50_000,
    backbone_id: str | None = None,
    on_shard_done: Callable[[int], None] | None = None,
) -> PoolEmbeddings:
    """Embed images and captions of a pool into resumable shards under `out_dir`, then load them.

    Args:
        pool: a pair manifest path, or webdataset tar paths / glob patterns.
        out_dir: shard directory; finished shards found there are skipped.
        backbone: a ready `ClipBackbone`, or a registry spec (`open_clip:ViT-B-16`) built with
            `pretrained` and `config`. A ready model is moved to `device` and put in eval mode.
        backbone_io: transforms and tokenizer; defaults to the backbone's own.
        pretrained: pretrained tag or checkpoint, for a spec.
        config: model config dict, for a spec.
        batch_size: pairs per forward pass.
        num_workers: DataLoader workers decoding images and tokenizing captions.
        device: torch device for the model ("cpu", "cuda", "cuda:1").
        precision: "32", or "bf16"/"16" autocast (GPU throughput; features are stored as float32).
        shard_size: manifest rows per shard (a tar is always one shard).
        backbone_id: name recorded with the embeddings, which a resumed run must match; defaults to the
            spec (with pretrained and config), or the class name of a ready model.
        on_shard_done: called with the shard number after each shard is committed (progress reporting).

    Returns:
        The complete pool embeddings.
    """
    if shard_size <= 0 or batch_size <= 0:
        raise ValueError(f"shard_size and batch_size must be positive, got {shard_size} and {batch_size}")
    source = PoolSource.resolve(pool)
    model, model_io, identity = resolve_backbone(backbone, backbone_io, pretrained, config)
    identity = backbone_id or identity
    manifest = read_manifest_pool(source.paths[0]) if source.kind == "manifest" else None
    n_shards = -(-len(manifest) // shard_size) if manifest is not None else len(source.paths)
    fingerprint = {
        "kind": source.kind,
        "paths": list(source.paths),
        "rows": None if manifest is None else len(manifest),
        "shard_size": shard_size if manifest is not None else None,
        "backbone": identity,
        "n_shards": n_shards,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = ShardIndex(out, fingerprint, "embeddings")
    finished = index.finished()
    todo = [s for s in range(n_shards) if s not in finished]
    if todo:
        was_training = model.training
        model.eval().to(device)
        for shard in todo:
            if manifest is not None:
                rows = manifest.iloc[shard * shard_size : (shard + 1) * shard_size]
                # Checked here, not in a worker, so a bad path fails with its name rather than mid-batch.
                absent = [p for p in rows["filepath"] if not os.path.isfile(p)]
                if absent:
                    raise ValueError(
                        f"{len(absent)} image(s) of pool manifest {source.paths[0]} do not exist, e.g. {absent[:3]}; "
                        "relative paths resolve against the manifest's directory."
                    )
            else:
                rows = scan_tar(source.paths[shard])
            if rows.empty:
                raise ValueError(f"pool shard {source.paths[min(shard, len(source.paths) - 1)]} holds no samples")
            dataset = ImageTextDataset(image_refs(rows), list(rows["caption"]), model_io)
            image, text = encode_dataset(model, dataset, batch_size, num_workers, device, precision)
            _save_shard(out, shard, image, text, rows)
            index.commit(shard, {"rows": len(rows)})
            if on_shard_done is not None:
                on_shard_done(shard)
        model.train(was_training)
    return load_pool_embeddings(out)


def load_pool_embeddings(out_dir: str | os.PathLike) -> PoolEmbeddings:
    """Concatenate the shards of a finished `embed_pool` run (raises if shards are still missing)."""
    out = Path(out_dir)
    indexes = read_indexes(out)
    if not indexes:
        raise ValueError(f"{out} has no index-*.json; run embed_pool on the pool first")
    fingerprint = next(iter(indexes.values()))["fingerprint"]
    finished = ShardIndex(out, fingerprint, "embeddings").finished()
    n_shards = fingerprint["n_shards"]
    missing = sorted(set(range(n_shards)) - set(finished))
    if missing:
        raise ValueError(f"{out}: shards {missing[:10]} of {n_shards} are not embedded yet; re-run embed_pool")
    files = [_shard_files(out, s) for s in range(n_shards)]
    return PoolEmbeddings(
        image=np.concatenate([np.load(f["image"]) for f in files]),
        text=np.concatenate([np.load(f["text"]) for f in files]),
        rows=pd.concat([read_table(f["meta"]) for f in files], ignore_index=True),
        kind=fingerprint["kind"],
        backbone=fingerprint["backbone"],
    )


def embed_images(
    filepaths: Sequence[str],
    model: ClipBackbone,
    backbone_io: BackboneIO | None = None,
    batch_size: int = 256,
    num_workers: int = 4,
    device: str = "cpu",
    precision: Precision = "32",
) -> np.ndarray:
    """(N,) image paths -> (N, D) float32 normalized image features (e.g. of evaluation images)."""
    if len(filepaths) == 0:
        raise ValueError("no images to embed (got an empty list of file paths)")
    was_training = model.training
    model.eval().to(device)
    dataset = ImageTextDataset(list(filepaths), None, backbone_io or model.io)
    image, _ = encode_dataset(model, dataset, batch_size, num_workers, device, precision)
    model.train(was_training)
    return image
