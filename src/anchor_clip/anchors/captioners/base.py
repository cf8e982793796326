"""The captioner interface: what the sharded caption job (`anchors.caption`) drives."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from anchor_clip.backbones.base import ImageTransform
from anchor_clip.precision import Precision


class Captioner(ABC):
    """Writes one caption per image.

    The job calls `setup` once (weights are loaded only when there is something to caption), applies
    `transform` to each image in the DataLoader workers, and calls `generate` on batches. `caption` is the
    one-call version for a few PIL images.

    Subclass it to bring a new captioner; `settings` must identify everything that changes the captions,
    since a re-run with other settings must not append to the old shards.
    """

    #: PIL image -> (3, H, W) model input; set by `setup`. A plain transform object rather than a bound
    #: method, so pickling it into DataLoader workers does not copy the model.
    transform: ImageTransform | None = None

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """JSON-able description of the captioner (kept in the index fingerprint and the report)."""

    @abstractmethod
    def setup(self, device: str = "cpu", precision: Precision = "32") -> None:
        """Load the model onto `device`; "16"/"bf16" run it in half precision (GPU throughput)."""

    @abstractmethod
    def generate(self, pixels: Tensor, label_names: Sequence[str] | None = None) -> dict[str, list]:
        """Caption a batch.

        Args:
            pixels: (B, 3, H, W) images from `transform`.
            label_names: per image, the name of its known class, for captioners that check consistency
                (see `uses_labels`); others ignore it.

        Returns:
            Columns of B values: `caption`, plus any per-image columns the captioner records.
        """

    @property
    def uses_labels(self) -> bool:
        """Whether `generate` needs `label_names` (the job then requires class names)."""
        return False

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """Caption a few PIL images: B images -> B strings."""
        if self.transform is None:
            raise RuntimeError(f"{type(self).__name__}.setup(device, precision) must run before caption()")
        pixels = torch.stack([self.transform(image.convert("RGB")) for image in images])
        return self.generate(pixels)["caption"]
