"""Inference precision, one meaning for every job: weights stay float32, the towers' matmuls may run in half.

`"32"` is plain float32, `"bf16"` and `"16"` autocast to bfloat16 / float16. The anchor jobs enter `autocast`;
`evaluate` hands `trainer_precision` to Lightning, whose mixed precision is the same autocast.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Literal

import torch

Precision = Literal["32", "bf16", "16"]
DTYPES = {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}


def check_precision(precision: str) -> torch.dtype:
    """The autocast dtype of `precision`, or a ValueError naming the accepted values."""
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {list(DTYPES)}, got {precision!r}")
    return DTYPES[precision]


def autocast(device: torch.device, precision: Precision) -> AbstractContextManager:
    """Mixed precision on `device` for `precision` (a no-op context for "32")."""
    return torch.autocast(device.type, dtype=check_precision(precision), enabled=precision != "32")


def trainer_precision(precision: Precision) -> str:
    """Lightning's `Trainer(precision=...)` for `precision`: "32-true" or the matching mixed precision."""
    check_precision(precision)
    return {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}[precision]
