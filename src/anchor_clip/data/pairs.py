"""Image–text pairs: the retrieved-anchor stream, and the pool a backbone is pretrained on."""

from __future__ import annotations

from pathlib import Path

from anchor_clip.backbones.base import ImageTransform
from anchor_clip.data.images import ImageFiles
from anchor_clip.data.tables import read_table, resolve_paths


class ImageTextPairs(ImageFiles):
    """Rows of a pair manifest (`filepath`, `caption`) as image tensors with their own caption.

    Args:
        manifest: pair table, e.g. the output of `python -m anchor_clip.retrieve`.
        transform: PIL image -> (3, H, W) tensor.
        min_pairs: fewer rows than this is an error: a near-empty anchor set silently turns ARF into FLYP.
        what: config field named in errors.
    """

    def __init__(self, manifest: str | Path, transform: ImageTransform, min_pairs: int = 1,
                 what: str = "data.retrieved") -> None:
        frame = read_table(manifest, required=("filepath", "caption"), what=what, nonempty=("filepath", "caption"))
        if len(frame) < min_pairs:
            raise ValueError(f"{what}: {manifest} has {len(frame)} pairs, fewer than the minimum {min_pairs} (one "
                             "global batch); re-run the retrieval with a larger k or lower the retrieved batch size")
        self.paths = resolve_paths(frame, manifest)
        self.captions = frame["caption"].tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        return {"images": self.transform(self.image(index)), "texts": self.captions[index]}
