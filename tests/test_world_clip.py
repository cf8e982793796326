"""The world CLIP backbone: tokenizer, towers, checkpoints and the ClipBackbone contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from anchor_clip.backbones import registry
from anchor_clip.world import SHAPE_NAMES, STYLES, describe, sample_scene, vocabulary
from anchor_clip.world.clip import WordTokenizer, WorldClipBackbone, WorldClipConfig

TINY = {"embed_dim": 16, "image_width": 4, "text_width": 16, "text_layers": 1, "text_heads": 2}


def _tiny(**overrides) -> WorldClipBackbone:
    torch.manual_seed(0)
    return WorldClipBackbone.from_spec(None, config={**TINY, **overrides}).eval()


def _batch(backbone: WorldClipBackbone, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    tokens = backbone.tokenize([f"a photo of a {name}." for name in SHAPE_NAMES[:n]])
    return images, tokens


def _contrastive(backbone: WorldClipBackbone, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    logits = backbone.logit_scale * backbone.encode_image(images) @ backbone.encode_text(tokens).T
    target = torch.arange(len(images))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def test_tokenizer_round_trips_caption_words_and_frames_them_with_sot_eot_pad():
    tokenizer = WordTokenizer(vocabulary(), context_length=12)
    tokens = tokenizer(["A Photo of a STAR!", "two red fish, on the left."])
    assert tokens.shape == (2, 12) and tokens.dtype == torch.long
    assert tokenizer.decode(tokens[0]) == "a photo of a star"
    assert tokenizer.decode(tokens[1]) == "two red fish on the left"
    first = tokens[0].tolist()
    assert first[0] == WordTokenizer.SOT and first[6] == WordTokenizer.EOT
    assert first[7:] == [WordTokenizer.PAD] * 5


def test_unknown_words_become_unk_instead_of_failing():
    tokenizer = WordTokenizer(vocabulary(), context_length=8)
    tokens = tokenizer("a zebra of a star")
    assert tokens[0, 2].item() == WordTokenizer.UNK
    assert tokenizer.decode(tokens[0]) == "a <unk> of a star"


def test_long_texts_are_cut_but_still_end_in_eot():
    tokenizer = WordTokenizer(vocabulary(), context_length=6)
    row = tokenizer("a photo of a big red star on the left")[0].tolist()
    assert row[-1] == WordTokenizer.EOT and WordTokenizer.PAD not in row
    assert tokenizer.decode(row) == "a photo of a"


def test_every_world_caption_tokenizes_without_unknown_words():
    tokenizer = WordTokenizer(vocabulary(), context_length=32)
    rng = np.random.default_rng(0)
    captions = [describe(sample_scene(rng, name, style), rng) for name in SHAPE_NAMES for style in STYLES]
    tokens = tokenizer(captions)
    assert not (tokens == WordTokenizer.UNK).any()
    assert (tokens == WordTokenizer.EOT).sum(dim=1).eq(1).all()  # nothing was cut


def test_encoders_return_unit_norm_features_of_embed_dim():
    backbone = _tiny()
    images, tokens = _batch(backbone)
    with torch.no_grad():
        image_features, text_features = backbone.encode_image(images), backbone.encode_text(tokens)
    assert image_features.shape == text_features.shape == (4, 16)
    assert torch.allclose(image_features.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(text_features.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_logit_scale_starts_at_one_over_clip_temperature():
    backbone = _tiny()
    assert backbone.log_logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert backbone.logit_scale.item() == pytest.approx(1 / 0.07)


def test_text_features_ignore_everything_after_eot():
    backbone = _tiny()
    tokens = backbone.tokenize(["a photo of a star."])
    noisy = tokens.clone()
    eot = int((tokens[0] == WordTokenizer.EOT).nonzero()[0])
    noisy[0, eot + 1 :] = torch.randint(4, backbone.io.tokenizer.vocab_size, (tokens.shape[1] - eot - 1,))
    with torch.no_grad():
        assert torch.allclose(backbone.encode_text(tokens), backbone.encode_text(noisy), atol=1e-6)


def test_text_features_of_a_batch_equal_those_of_each_text_alone():
    backbone = _tiny()
    texts = ["a star.", "a sketch of two small red stars in a row at the top on a dotted green background."]
    with torch.no_grad():
        together = backbone.encode_text(backbone.tokenize(texts))
        alone = torch.cat([backbone.encode_text(backbone.tokenize([t])) for t in texts])
    assert torch.allclose(together, alone, atol=1e-6)


def test_contrastive_step_sends_gradients_to_both_towers_and_the_temperature():
    backbone = _tiny().train()
    _contrastive(backbone, *_batch(backbone)).backward()
    for tower in (backbone.image_tower, backbone.text_tower):
        grads = [p.grad for p in backbone.get_submodule(tower).parameters()]
        assert all(g is not None for g in grads), tower
        assert sum(g.abs().sum() for g in grads) > 0, tower
    assert backbone.log_logit_scale.grad is not None and backbone.log_logit_scale.grad != 0


@pytest.mark.parametrize("image_norm", ["group", "batch"])
def test_gradient_checkpointing_gives_the_same_gradients(image_norm):
    grads = []
    for checkpointed in (False, True):
        backbone = _tiny(image_norm=image_norm).train()
        backbone.set_grad_checkpointing(checkpointed)
        _contrastive(backbone, *_batch(backbone)).backward()
        grads.append({n: p.grad.clone() for n, p in backbone.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


def test_frozen_batch_stats_make_image_features_independent_of_the_batch():
    backbone = _tiny(freeze_batch_stats=True).train()
    assert backbone.training
    stats = [m.running_mean.clone() for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    images, _ = _batch(backbone)
    together = backbone.encode_image(images)
    alone = torch.cat([backbone.encode_image(image[None]) for image in images])
    assert torch.allclose(together, alone, atol=1e-5)
    after = [m.running_mean for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(stats, after, strict=True))
    _contrastive(backbone, *_batch(backbone)).backward()  # the norms' affine weights still learn
    assert all(m.weight.grad is not None for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_batch_norm_in_training_mode_does_depend_on_the_batch():
    backbone = _tiny().train()
    images, _ = _batch(backbone)
    together = backbone.encode_image(images)
    alone = torch.cat([backbone.encode_image(images[i : i + 2]) for i in (0, 2)])
    assert not torch.allclose(together, alone, atol=1e-3)  # why freeze_batch_stats exists


def test_saved_state_dict_reproduces_encodings_exactly(tmp_path):
    backbone = _tiny()
    path = tmp_path / "world_clip.pt"
    torch.save(backbone.state_dict(), path)
    loaded = WorldClipBackbone.from_spec(None, pretrained=str(path), config=TINY).eval()
    images, tokens = _batch(backbone)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), backbone.encode_image(images))
        assert torch.equal(loaded.encode_text(tokens), backbone.encode_text(tokens))


def test_conv_weights_stay_channels_last_when_loading_weights_saved_in_the_default_layout(tmp_path):
    backbone = _tiny()
    contiguous = {k: v.contiguous() for k, v in backbone.state_dict().items()}  # as an older checkpoint holds them
    path = tmp_path / "world_clip.pt"
    torch.save(contiguous, path)
    loaded = WorldClipBackbone.from_spec(None, pretrained=str(path), config=TINY).eval()
    convs = [m.weight for m in loaded.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    reference = _tiny()
    reference.load_state_dict(contiguous)
    reference.model.visual.to(memory_format=torch.contiguous_format)
    images, _ = _batch(backbone)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), reference.encode_image(images), atol=1e-5, rtol=1e-4)


def test_lightning_checkpoint_with_backbone_prefix_reproduces_encodings_exactly(tmp_path):
    backbone = _tiny()
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state["loss.weight"] = torch.ones(1)  # other modules of the LightningModule are ignored
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "hyper_parameters": {"lr": 1e-3}}, path)
    loaded = WorldClipBackbone.from_spec(None, pretrained=str(path), config=TINY).eval()
    images, tokens = _batch(backbone)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), backbone.encode_image(images))
        assert torch.equal(loaded.encode_text(tokens), backbone.encode_text(tokens))


def test_checkpoint_of_another_config_names_the_mismatched_keys(tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(_tiny(image_width=8).state_dict(), path)
    with pytest.raises(ValueError, match=r"model\.visual\.stages\.0\.0\.weight: \(8, 3, 3, 3\) vs \(4, 3, 3, 3\)"):
        WorldClipBackbone.from_spec(None, pretrained=str(path), config=TINY)
    deeper = tmp_path / "deeper.pt"
    torch.save(_tiny(text_layers=2).state_dict(), deeper)
    with pytest.raises(ValueError, match=r"unexpected keys \['model\.text\.blocks\.1\."):
        WorldClipBackbone.from_spec(None, pretrained=str(deeper), config=TINY)


def test_bad_pretrained_values_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="neither a known tag"):
        WorldClipBackbone.from_spec(None, pretrained=str(tmp_path / "missing.pt"), config=TINY)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"model.layer.weight": torch.ones(2)}}, foreign)
    with pytest.raises(ValueError, match="without 'backbone.' weights"):
        WorldClipBackbone.from_spec(None, pretrained=str(foreign), config=TINY)


def test_unknown_config_keys_and_model_names_are_rejected():
    with pytest.raises(ValueError, match="unknown world_clip config keys \\['widht'\\]"):
        WorldClipBackbone.from_spec(None, config={"widht": 3})
    with pytest.raises(ValueError, match="single model"):
        WorldClipBackbone.from_spec("ViT-B-16", config=TINY)
    with pytest.raises(ValueError, match="divisible"):
        WorldClipConfig.from_dict({"text_width": 10, "text_heads": 4})


def test_lock_image_freezes_exactly_the_image_tower():
    backbone = _tiny()
    backbone.lock(image=True)
    frozen = {n for n, p in backbone.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in backbone.named_parameters() if n.startswith("model.visual.")}


def test_param_groups_keep_decay_off_norms_biases_and_temperature():
    backbone = _tiny()
    decay, no_decay = backbone.param_groups(weight_decay=0.1)
    names = {id(p): n for n, p in backbone.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "model.logit_scale" in no_decay_names
    assert all(p.ndim < 2 for p in no_decay["params"])  # gains, biases, the temperature (open_clip's rule)
    assert all(p.ndim >= 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(backbone.parameters()))


def test_registry_builds_world_clip_and_its_io_without_weights():
    backbone = registry.create_backbone("world_clip", config=TINY)
    assert isinstance(backbone, WorldClipBackbone)
    io = registry.create_io("world_clip", config=TINY)
    assert io.tokenizer(["a photo of a star."]).shape == (1, 32)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    assert io.eval_transform(image).shape == io.train_transform(image).shape == (3, 32, 32)


@pytest.mark.parametrize(("mode", "side"), [("RGB", 32), ("L", 32), ("RGBA", 32), ("RGB", 48), ("P", 20)])
def test_transforms_give_torchvisions_tensors_from_the_same_random_draws(mode: str, side: int):
    config = WorldClipConfig.from_dict(TINY)
    io = WorldClipBackbone.io_from_spec(None, config=TINY)
    rgb = Image.fromarray(np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8))
    image = rgb.convert(mode)
    size = config.image_size
    base = [transforms.Lambda(lambda x: x.convert("RGB")), transforms.Resize(size), transforms.CenterCrop(size),
            transforms.ToTensor(), transforms.Normalize(config.mean, config.std)]
    expected_eval = transforms.Compose(base)
    expected_train = transforms.Compose([*base, transforms.RandomCrop(size, padding=2, padding_mode="reflect")])
    assert torch.equal(io.eval_transform(image), expected_eval(image))
    for seed in range(10):
        torch.manual_seed(seed)
        got = io.train_transform(image)
        torch.manual_seed(seed)
        assert torch.equal(got, expected_train(image))
        assert got.is_contiguous()


@pytest.mark.parametrize("train", [False, True])
def test_decoded_uint8_arrays_give_the_tensors_of_their_pil_images(train: bool):
    io = WorldClipBackbone.io_from_spec(None, config=TINY)
    transform = io.train_transform if train else io.eval_transform
    assert transform.takes_arrays
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    before = pixels.copy()
    for seed in range(5):
        torch.manual_seed(seed)
        from_array = transform(pixels)
        torch.manual_seed(seed)
        assert torch.equal(from_array, transform(Image.fromarray(pixels)))
    assert np.array_equal(pixels, before)  # the shared decoded array is only read
    other = np.random.default_rng(2).integers(0, 256, (48, 48, 3), dtype=np.uint8)  # another size: resized
    torch.manual_seed(0)
    from_array = transform(other)
    torch.manual_seed(0)
    assert torch.equal(from_array, transform(Image.fromarray(other)))


def test_tokenizer_batch_equals_each_text_alone():
    tokenizer = WordTokenizer(vocabulary(), context_length=8)
    texts = ["a photo of a star.", "", "a red star on the left of a blue moon in a sketch"]
    batch = tokenizer(texts)
    assert batch.shape == (3, 8) and batch.dtype == torch.long
    assert all(torch.equal(batch[i : i + 1], tokenizer(text)) for i, text in enumerate(texts))
    assert tokenizer([]).shape == (0, 8)


def test_train_transform_never_mirrors_left_and_right():
    io = WorldClipBackbone.io_from_spec(None, config=TINY)
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[:, :16] = 255  # white left half: "on the left" must stay true
    torch.manual_seed(0)
    for _ in range(20):
        x = io.train_transform(Image.fromarray(pixels))
        assert x[:, :, :14].mean() > x[:, :, 18:].mean()


def test_train_transform_is_a_small_reflect_padded_shift_of_the_eval_image():
    io = WorldClipBackbone.io_from_spec(None, config=TINY)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    reference = torch.nn.functional.pad(io.eval_transform(image)[None], (2, 2, 2, 2), mode="reflect")[0]
    shifts = {(dy, dx): reference[:, dy : dy + 32, dx : dx + 32] for dy in range(5) for dx in range(5)}
    torch.manual_seed(0)
    seen = set()
    for _ in range(30):
        x = io.train_transform(image)
        matches = [shift for shift, crop in shifts.items() if torch.allclose(x, crop, atol=1e-6)]
        assert len(matches) == 1  # normalised pixels of the image, translated by at most 2 pixels
        seen.add(matches[0])
    assert len(seen) > 5  # and the translation is random
