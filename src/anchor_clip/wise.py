"""WiSE-FT (Wortsman et al., 2022): interpolate the weights of a zero-shot and a finetuned model.

θ_α = (1 − α)·θ_zeroshot + α·θ_finetuned. A pure function over state dicts, so it serves any backbone;
the sweep over α and the evaluation at each α live with the evaluation code.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def interpolate(zeroshot: Mapping[str, Tensor], finetuned: Mapping[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """Weight-space interpolation of two state dicts of one architecture.

    Args:
        zeroshot: state dict of the pretrained model (α = 0).
        finetuned: state dict of the finetuned model (α = 1).
        alpha: mixing coefficient in [0, 1].

    Returns:
        A new state dict; non-float entries (step counters, integer buffers) are taken from `finetuned`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if set(zeroshot) != set(finetuned):
        only_zs, only_ft = sorted(set(zeroshot) - set(finetuned)), sorted(set(finetuned) - set(zeroshot))
        raise ValueError(f"state dicts differ in keys: only zero-shot {only_zs[:5]}, only finetuned {only_ft[:5]}")
    merged = {}
    for key, ft in finetuned.items():
        zs = zeroshot[key]
        if zs.shape != ft.shape:
            raise ValueError(f"{key}: shape {tuple(zs.shape)} (zero-shot) != {tuple(ft.shape)} (finetuned)")
        if not torch.is_floating_point(ft):
            merged[key] = ft.clone()
        elif alpha in (0.0, 1.0):  # exact endpoints: no rounding from the lerp
            merged[key] = (ft if alpha == 1.0 else zs).clone()
        else:
            merged[key] = torch.lerp(zs, ft.to(zs.dtype), alpha)
    return merged
