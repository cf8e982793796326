"""Claims about WiSE-FT weight interpolation."""

import pytest
import torch

from anchor_clip.wise import interpolate


def _pair():
    torch.manual_seed(0)
    zs = {"w": torch.randn(3, 4), "b": torch.randn(4), "steps": torch.tensor(0)}
    ft = {"w": torch.randn(3, 4), "b": torch.randn(4), "steps": torch.tensor(7)}
    return zs, ft


def test_interpolation_alpha_zero_returns_zeroshot_weights():
    zs, ft = _pair()
    out = interpolate(zs, ft, 0.0)
    assert torch.equal(out["w"], zs["w"]) and torch.equal(out["b"], zs["b"])


def test_interpolation_alpha_one_returns_finetuned_weights():
    zs, ft = _pair()
    out = interpolate(zs, ft, 1.0)
    assert all(torch.equal(out[k], ft[k]) for k in ft)


def test_interpolation_is_linear_in_alpha():
    zs, ft = _pair()
    out = interpolate(zs, ft, 0.25)
    assert torch.allclose(out["w"], 0.75 * zs["w"] + 0.25 * ft["w"])
    assert out["steps"] == 7  # integer buffers are not averaged


def test_mismatched_state_dicts_are_rejected():
    zs, ft = _pair()
    with pytest.raises(ValueError, match="differ in keys"):
        interpolate(zs, {"w": ft["w"]}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        interpolate(zs, {**ft, "w": torch.randn(4, 3)}, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        interpolate(zs, ft, 1.5)
