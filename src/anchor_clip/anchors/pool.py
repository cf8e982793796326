"""Reading an image-text pool: a pair manifest or webdataset tar shards, as rows and decoded model inputs.

A pool is either a pair manifest (CSV/JSONL/parquet with `filepath, caption`; see docs/formats.md) or
webdataset tar shards in the img2dataset layout (`{key}.jpg|png|webp`, `{key}.txt`, `{key}.json` per
sample). Tar members are located once (`scan_tar`) and read by offset afterwards, so workers never re-read
a tar.
"""

from __future__ import annotations

import io as bytes_io
import json
import os
import posixpath
import tarfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from anchor_clip.backbones.base import BackboneIO
from anchor_clip.data.tables import read_table, resolve_paths

TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")
#: Image members a webdataset sample may hold, in the order one is picked.
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
#: Columns of a webdataset pool row that locate the sample inside its tar, not data about the pair.
TAR_COLUMNS = ("tar", "member", "offset", "size")

# An image is a file path, or (tar path, byte offset, byte size) of a member inside an uncompressed tar.
ImageRef = str | tuple[str, int, int]



@dataclass(frozen=True)
class PoolSource:
    """Where a pool's pairs live: one pair manifest, or a sorted list of webdataset tar shards."""

    kind: Literal["manifest", "webdataset"]
    paths: tuple[str, ...]

    @classmethod
    def resolve(cls, pool: str | Sequence[str]) -> PoolSource:
        """Classify `pool`: a table path -> manifest; tar paths or glob patterns -> webdataset shards."""
        patterns = [pool] if isinstance(pool, str | os.PathLike) else list(pool)
        if len(patterns) == 1 and Path(patterns[0]).suffix in TABLE_SUFFIXES:
            if not Path(patterns[0]).is_file():
                raise ValueError(f"pool manifest {patterns[0]} does not exist")
            return cls("manifest", (str(Path(patterns[0]).resolve()),))
        paths = sorted({str(Path(p).resolve()) for pattern in patterns for p in glob(str(pattern))})
        if not paths:
            raise ValueError(
                f"pool {pool!r} matched no file; give a pair manifest ({', '.join(TABLE_SUFFIXES)}) "
                "or webdataset shards as tar paths / a glob such as 'shards/*.tar'."
            )
        not_tar = [p for p in paths if not p.endswith(".tar")]
        if not_tar:
            raise ValueError(
                f"webdataset pool entries must be uncompressed .tar files, got {not_tar[:3]}; "
                "decompress .tar.gz shards (gunzip) first, or pass a single manifest table."
            )
        return cls("webdataset", tuple(paths))


def read_manifest_pool(path: str | os.PathLike) -> pd.DataFrame:
    """A pair manifest with `filepath` made absolute (relative paths resolve against the manifest's dir)."""
    path = Path(path)
    table = read_table(path)
    missing = [c for c in ("filepath", "caption") if c not in table.columns]
    if missing:
        raise ValueError(
            f"pool manifest {path} has no column(s) {missing} (found: {list(table.columns)}); a pair manifest "
            "needs 'filepath' and 'caption' (docs/formats.md). Rename the columns or check the separator."
        )
    if table.empty:
        raise ValueError(f"pool manifest {path} has no rows; an empty pool cannot be retrieved from")
    table = table.copy()
    table["filepath"] = resolve_paths(table, path)
    table["caption"] = table["caption"].astype(str)
    return table


def scan_tar(path: str | os.PathLike) -> pd.DataFrame:
    """Index one img2dataset-style tar: one row per sample that has an image and a caption.

    Returns:
        Columns `key, caption, tar, member, offset, size` (where the image bytes sit, so DataLoader
        workers and the materializer can seek to them without re-reading the tar) plus the scalar fields
        of `{key}.json` (e.g. `url`, `label`, `style`).
    """
    path = str(path)
    try:
        tar = tarfile.open(path, "r:")  # "r:" refuses compressed tars, whose members cannot be seeked to
    except tarfile.ReadError as err:
        raise ValueError(f"cannot read {path} as an uncompressed tar ({err}); decompress the shard first") from err
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    with tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, base = posixpath.split(member.name)
            stem, _, ext = base.partition(".")  # webdataset keys end at the first dot of the file name
            samples.setdefault(posixpath.join(folder, stem), {})[ext.lower()] = member
        rows, incomplete = [], 0
        for key, members in samples.items():
            image = next((members[e] for e in TAR_IMAGE_EXTENSIONS if e in members), None)
            if image is None or "txt" not in members:
                incomplete += 1
                continue
            row: dict[str, Any] = {}
            if "json" in members:
                info = json.loads(tar.extractfile(members["json"]).read())
                row.update({k: v for k, v in info.items() if isinstance(v, str | int | float | bool) or v is None})
            row.update(
                key=key,
                caption=tar.extractfile(members["txt"]).read().decode("utf-8").strip(),
                tar=path,
                member=image.name,
                offset=image.offset_data,
                size=image.size,
            )
            rows.append(row)
    if incomplete:
        warnings.warn(f"{path}: skipped {incomplete} sample(s) without an image or a .txt caption", stacklevel=2)
    table = pd.DataFrame(rows)
    # JSON fields can mix types across samples (a number here, a string there); strings keep parquet happy.
    for column in table.columns:
        if table[column].dtype == object and column not in ("key", "caption", "tar", "member"):
            table[column] = table[column].map(lambda v: v if v is None or isinstance(v, str) else str(v))
    return table


def read_image_bytes(ref: ImageRef) -> bytes:
    """The raw bytes of an image file or of a tar member given as (tar path, offset, size)."""
    if isinstance(ref, str):
        return Path(ref).read_bytes()
    tar, offset, size = ref
    with open(tar, "rb") as f:
        f.seek(offset)
        return f.read(size)


def image_refs(rows: pd.DataFrame) -> list[ImageRef]:
    """Image references of pool rows: file paths for manifest rows, tar locations for webdataset rows."""
    if "tar" in rows.columns:
        return list(zip(rows["tar"], rows["offset"].astype(int), rows["size"].astype(int), strict=True))
    return list(rows["filepath"])


class ImageTextDataset(Dataset):
    """Images (and optionally captions) as model inputs; runs in DataLoader workers, so holds no model.

    Items are dicts: `image` (3, H, W) float from the eval transform, and `tokens` (L,) when captions
    are given.
    """

    def __init__(self, images: Sequence[ImageRef], captions: Sequence[str] | None, backbone_io: BackboneIO) -> None:
        if captions is not None and len(captions) != len(images):
            raise ValueError(f"got {len(images)} images but {len(captions)} captions; they must pair up")
        self.images, self.captions, self.io = list(images), captions, backbone_io

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ref = self.images[i]
        try:
            image = Image.open(bytes_io.BytesIO(read_image_bytes(ref))).convert("RGB")
        except OSError as err:
            raise ValueError(f"cannot decode image {ref}: {err}") from err
        item = {"image": self.io.eval_transform(image)}
        if self.captions is not None:
            item["tokens"] = self.io.tokenizer([self.captions[i]])[0]
        return item
