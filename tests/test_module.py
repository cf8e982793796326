"""Claims about AnchorFinetuneModule: which encoder calls a step makes and what the loss equals."""

import pytest
import torch

from anchor_clip.module import AnchorFinetuneModule
from tests.conftest import TINY_OPEN_CLIP
from tests.test_data import make_datamodule


def make_module(**overrides) -> AnchorFinetuneModule:
    torch.manual_seed(0)
    kwargs = dict(backbone="open_clip", backbone_config=TINY_OPEN_CLIP, caption_weight=0.5, retrieved_weight=0.5)
    kwargs.update(overrides)
    return AnchorFinetuneModule(**kwargs).eval()  # eval: no dropout, so two passes give equal features


@pytest.fixture(scope="module")
def batch(tiny_data):
    batch, _, _ = next(iter(make_datamodule(tiny_data).train_dataloader()))
    return batch


def _count_calls(module):
    sizes = {"image": [], "text": []}
    for kind in sizes:
        encoder = getattr(module.backbone, f"encode_{kind}")

        def wrapped(x, _encoder=encoder, _kind=kind):
            sizes[_kind].append(len(x))
            return _encoder(x)

        setattr(module.backbone, f"encode_{kind}", wrapped)
    return sizes


def test_shared_image_pass_equals_naive_three_stream_loss(batch):
    shared = make_module()
    naive = make_module(share_image_pass=False, fuse_encoder_calls=False)
    naive.load_state_dict(shared.state_dict())
    with torch.no_grad():
        a = shared.objective(shared.encode_streams(batch), shared.backbone.logit_scale)
        b = naive.objective(naive.encode_streams(batch), naive.backbone.logit_scale)
    assert set(a) == {"loss", "loss_finetune", "loss_caption", "loss_retrieved"}
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_shared_step_makes_one_image_call_and_one_text_call(batch):
    module = make_module(dedupe_prompts=False)
    calls = _count_calls(module)
    module.encode_streams(batch)
    assert calls == {"image": [8 + 6], "text": [8 + 8 + 6]}


def test_naive_step_encodes_finetune_images_twice(batch):
    module = make_module(share_image_pass=False, fuse_encoder_calls=False, dedupe_prompts=False)
    calls = _count_calls(module)
    module.encode_streams(batch)
    assert calls == {"image": [8, 8, 6], "text": [8, 8, 6]}


def test_zero_anchor_weights_skip_anchor_compute_entirely(batch):
    module = make_module(caption_weight=0.0, retrieved_weight=0.0, dedupe_prompts=False)
    calls = _count_calls(module)
    pairs = module.encode_streams(batch)
    assert list(pairs) == ["finetune"] and calls == {"image": [8], "text": [8]}


def test_caption_fraction_uses_the_first_images_of_the_batch(batch):
    module = make_module(caption_fraction=0.5, retrieved_weight=0.0)
    pairs = module.encode_streams(batch)
    assert pairs["caption"][0].shape[0] == 4
    assert torch.equal(pairs["caption"][0], pairs["finetune"][0][:4])


def test_caption_weight_without_caption_data_is_a_clear_error(batch):
    module = make_module()
    finetune = {k: v for k, v in batch["finetune"].items() if k != "captions"}
    with pytest.raises(ValueError, match="set data.captions"):
        module.encode_streams({"finetune": finetune})


def test_param_groups_exclude_temperature_from_weight_decay():
    module = make_module()
    decay, no_decay = module.backbone.param_groups(0.1)
    assert all(p is not module.backbone.log_logit_scale for p in decay["params"])
    assert any(p is module.backbone.log_logit_scale for p in no_decay["params"])


def test_deduplicated_prompts_give_the_same_loss_and_gradients(batch):
    finetune = dict(batch["finetune"])
    finetune["texts"] = finetune["texts"][torch.arange(8) % 3]  # 8 images, 3 distinct prompts
    dedup_batch = {"finetune": finetune, "retrieved": batch["retrieved"]}
    grads = {}
    for dedupe in (True, False):
        module = make_module(dedupe_prompts=dedupe)
        calls = _count_calls(module)
        loss = module.objective(module.encode_streams(dedup_batch), module.backbone.logit_scale)["loss"]
        loss.backward()
        grads[dedupe] = (loss.detach(), [p.grad.clone() for p in module.parameters() if p.grad is not None])
        assert calls["text"] == ([3 + 8 + 6] if dedupe else [8 + 8 + 6])
    assert torch.allclose(grads[True][0], grads[False][0], atol=1e-6)
    for a, b in zip(grads[True][1], grads[False][1], strict=True):
        assert torch.allclose(a, b, atol=1e-5)
