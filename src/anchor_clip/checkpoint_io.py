"""A checkpoint plugin whose files are written atomically, so a killed save never leaves half a checkpoint.

`anchor_clip.fit` passes `AtomicCheckpointIO` to its trainer (pass it to your own `Trainer(plugins=...)`).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from anchor_clip.data.tables import write_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written to a temporary file beside the target and renamed into place.

    Lightning 2.6 saves through an fsspec transaction whose temporary file lives in the system temp
    folder and is *moved* into place; when that folder is on another filesystem (a local /tmp and a
    network checkpoint folder, the usual cluster layout) the move is a copy, and a job killed during
    the copy leaves a truncated `last.ckpt`. A temporary file in the same folder makes the final step a
    rename, which is atomic: a killed save leaves the previous checkpoint or the new one, never half.
    URLs (s3://, gs://) keep Lightning's own saving: object stores publish whole objects.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_atomic(path, lambda tmp: torch.save(checkpoint, tmp))
        return None
