"""Claims about AnchorFinetuneModule: which encoder calls a step makes and what the loss equals."""

import pytest
import torch

from anchor_clip import AnchorDataModule, AnchorFinetuneModule
from tests.conftest import make_module


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


def _loss_and_grads(module, batch):
    loss = module.objective(module.encode_streams(batch), module.backbone.logit_scale)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _assert_same_step(a, b, atol):
    assert torch.allclose(a[0], b[0], atol=atol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert torch.allclose(a[1][name], b[1][name], atol=atol), name


def test_compiled_encoders_give_the_same_loss_and_gradients(batch):
    eager = make_module()
    compiled = make_module()
    compiled.compile_encoders(backend="aot_eager")  # traced and run through AOTAutograd, no C++ build
    assert set(compiled.compiled) == {"image", "text"}
    _assert_same_step(_loss_and_grads(eager, batch), _loss_and_grads(compiled, batch), atol=1e-5)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints keep their keys


def test_compile_flag_compiles_encoders_when_fitting_only(batch):
    module = make_module(compile_backbone=True, compile_options={"backend": "aot_eager"})
    module.trainer = type("T", (), {"world_size": 1, "datamodule": None})()
    module.setup("validate")
    assert module.compiled == {}
    module.setup("fit")
    assert set(module.compiled) == {"image", "text"}


def test_channels_last_layout_gives_the_same_loss_and_gradients():
    config = {"image_width": 8, "text_width": 32, "text_layers": 1, "text_heads": 2, "embed_dim": 16}
    modules = [make_module(backbone="world_clip", backbone_config=config, channels_last=flag) for flag in (False, True)]
    convs = [m for m in modules[1].backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = modules[0].backbone.tokenize([f"a photo of a {c}" for c in ("square", "circle", "star", "ring")] * 3)
    world_batch = {"finetune": {"images": images[:6], "texts": tokens[:6], "captions": tokens[6:]},
                   "retrieved": {"images": images[6:], "texts": tokens[:6].flip(0)}}
    layouts = []
    encode = modules[1].backbone.encode_image
    modules[1].backbone.encode_image = lambda x: layouts.append(x.is_contiguous(memory_format=torch.channels_last)) \
        or encode(x)
    _assert_same_step(*(_loss_and_grads(m, world_batch) for m in modules), atol=1e-5)
    assert layouts == [True]  # the inputs were converted too


def test_a_module_without_a_backbone_names_the_registered_families():
    with pytest.raises(ValueError, match=r"model.backbone is not set; .*'open_clip'.*'world_clip'"):
        AnchorFinetuneModule()
    with pytest.raises(ValueError, match=r"data.backbone .* is not set"):
        AnchorDataModule(retrieved="pairs.csv")
