"""Claims about the feature-drift measures."""

import pytest
import torch
import torch.nn.functional as F

from anchor_clip.eval.drift import feature_drift, linear_cka


def _features(seed: int, n: int = 64, d: int = 16) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_unchanged_features_have_cosine_and_cka_one():
    x = _features(0)
    assert feature_drift(x, x) == pytest.approx({"cosine": 1.0, "cka": 1.0})


def test_cka_is_invariant_to_rotation_but_cosine_sees_it():
    x = _features(0)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))
    drift = feature_drift(x, x @ rotation)
    assert drift["cka"] == pytest.approx(1.0, abs=1e-5)
    assert drift["cosine"] < 0.5


def test_unrelated_features_have_low_cka():
    assert linear_cka(_features(0, n=512), _features(1, n=512)) < 0.1


def test_drift_needs_the_same_images():
    with pytest.raises(ValueError, match="same images"):
        feature_drift(_features(0, n=4), _features(0, n=5))


def test_recorder_keeps_the_features_validation_computed_for_every_image_in_order(tiny_data):
    import lightning as L

    from anchor_clip.eval.drift import FeatureRecorder
    from tests.conftest import make_datamodule, make_module

    data, module = make_datamodule(tiny_data, eval_batch_size=5), make_module()
    recorder = FeatureRecorder()
    L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=[recorder]).validate(module, data, verbose=False)
    recorded = recorder.features()
    assert sorted(recorded) == ["id", "zs"]
    for spec, dataset in zip(data.eval_specs, data.evals, strict=True):
        images = torch.stack([dataset[i]["images"] for i in range(len(dataset))])
        with torch.no_grad():
            expected = module.backbone.encode_image(images)
        torch.testing.assert_close(recorded[spec.name], expected, atol=1e-5, rtol=1e-4)
