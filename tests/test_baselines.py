"""Claims about the classifier baselines (LP, FT, LP-FT)."""

import lightning as L
import pytest
import torch

from anchor_clip.baselines import ClassifierFinetuneModule
from tests.conftest import TINY_OPEN_CLIP, make_datamodule


def fit(tiny_data, tmp_path, steps=3, **kwargs):
    torch.manual_seed(0)
    module = ClassifierFinetuneModule(backbone="open_clip", backbone_config=TINY_OPEN_CLIP, lr=1e-3, **kwargs)
    data = make_datamodule(tiny_data, captions=None, retrieved=None)
    trainer = L.Trainer(max_steps=steps, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    trainer.fit(module, data)
    return module, before, data


def test_head_starts_as_the_zero_shot_head(tiny_data, tmp_path):
    module, _, data = fit(tiny_data, tmp_path, steps=0)
    module.eval_specs = data.eval_specs
    super(ClassifierFinetuneModule, module).build_heads()  # the text tower's heads only
    expected = module.heads["id"] * module.backbone.logit_scale  # (D, C), scaled like the trained head
    assert torch.allclose(module.head.weight.T, expected, atol=1e-5)


def test_linear_probe_trains_only_the_head(tiny_data, tmp_path):
    module, before, _ = fit(tiny_data, tmp_path, linear_probe=True)
    after = module.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert module.head.weight.requires_grad


def test_ft_trains_the_image_tower_not_the_text_tower(tiny_data, tmp_path):
    module, before, _ = fit(tiny_data, tmp_path)
    after = module.backbone.state_dict()
    assert not torch.equal(before["model.visual.conv1.weight"], after["model.visual.conv1.weight"])
    assert torch.equal(before["model.token_embedding.weight"], after["model.token_embedding.weight"])


def test_lp_ft_starts_from_the_saved_lp_head(tiny_data, tmp_path):
    lp, _, _ = fit(tiny_data, tmp_path / "lp", linear_probe=True)
    lp.save_head(str(tmp_path / "head.pt"))
    ft, _, _ = fit(tiny_data, tmp_path / "ft", steps=0, init_head=str(tmp_path / "head.pt"))
    assert torch.equal(ft.head.weight, lp.head.weight)


def test_anchor_weights_are_refused():
    with pytest.raises(ValueError, match="finetune stream only"):
        ClassifierFinetuneModule(backbone="open_clip", backbone_config=TINY_OPEN_CLIP, caption_weight=1.0)
