"""Backbone adapters: one contract for every family, then per-family parity with the wrapped library.

Everything runs offline on tiny random models; tests that download real weights are marked ``slow``.
"""

from __future__ import annotations

import gzip
import json
import pickle
import sys
import types
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F
from transformers import CLIPImageProcessor, CLIPModel

import anchor_clip.backbones.hf_clip  # noqa: F401  (registers "hf_clip")
import anchor_clip.backbones.open_clip  # noqa: F401  (registers "open_clip")
from anchor_clip.backbones import registry
from anchor_clip.backbones.base import ClipBackbone
from anchor_clip.backbones.hf_clip import HFClipBackbone
from anchor_clip.backbones.open_clip import OpenClipBackbone
from anchor_clip.backbones.registry import create_backbone, create_io
from anchor_clip.losses import contrastive_loss

DOC_EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "new_backbone.md"


def _import_doc_example() -> types.ModuleType:
    """Run the first Python block of docs/new_backbone.md as a module, so the documented class is the tested one.

    It is registered in `sys.modules` so its classes pickle like any importable module's.
    """
    name = "new_backbone_example"
    if name not in sys.modules:
        code = DOC_EXAMPLE.read_text().split("```python\n", 1)[1].split("```", 1)[0]
        module = types.ModuleType(name)
        module.__file__ = str(DOC_EXAMPLE)
        sys.modules[name] = module
        exec(compile(code, str(DOC_EXAMPLE), "exec"), module.__dict__)
    return sys.modules[name]


_import_doc_example()  # registers "tiny_cnn"

TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_HF_CLIP = {
    "projection_dim": 24,
    "text_config": {
        "vocab_size": 49408,  # the CLIP BPE's size: config-only models use open_clip's tokenizer
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    },
}

#: family -> (spec, config) of a tiny random model; every family must appear here to be held to the contract.
BACKBONE_SPECS: dict[str, tuple[str, dict | None]] = {
    "open_clip": ("open_clip", TINY_OPEN_CLIP),
    "hf_clip": ("hf_clip", TINY_HF_CLIP),
    "tiny_cnn": ("tiny_cnn:resnet18", {"embed_dim": 32}),  # the docs/new_backbone.md example
    "world_clip": ("world_clip", {"embed_dim": 32, "image_width": 8, "text_width": 32, "text_layers": 1,
                                  "text_heads": 2, "context_length": 16}),
}

TEXTS = ["a photo of a cat", "a sketch of a dog", "an origami crane, folded from red paper"]


def _pil_image(size: tuple[int, int] = (45, 37), mode: str = "RGB", seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy()).convert(mode)


def _images(backbone: ClipBackbone, n: int = len(TEXTS)) -> Tensor:
    """(n, 3, H, W) at whatever size the backbone's own eval transform produces."""
    return torch.stack([backbone.io.eval_transform(_pil_image(seed=i)) for i in range(n)])


def _contrastive_loss(backbone: ClipBackbone, images: Tensor, tokens: Tensor) -> Tensor:
    return contrastive_loss(backbone.encode_image(images), backbone.encode_text(tokens), backbone.logit_scale)


def _params_reached_by(backbone: ClipBackbone, features: Tensor) -> set[str]:
    """Names of the parameters `features` depends on (those receiving a gradient)."""
    backbone.zero_grad(set_to_none=True)
    features.sum().backward()
    reached = {name for name, param in backbone.named_parameters() if param.grad is not None}
    backbone.zero_grad(set_to_none=True)
    return reached


@pytest.fixture(params=sorted(BACKBONE_SPECS))
def family(request) -> str:
    return request.param


@pytest.fixture
def backbone(family: str) -> ClipBackbone:
    torch.manual_seed(0)
    spec, config = BACKBONE_SPECS[family]
    return create_backbone(spec, config=config)


# ---- the contract every family satisfies --------------------------------------------------------------------------


def test_every_family_shipped_with_anchor_clip_is_held_to_the_contract():
    # Read the registry itself to see where each family comes from: families other tests register are not ours.
    shipped = {name for name, cls in registry._FAMILIES.items() if cls.__module__.startswith("anchor_clip.")}
    assert shipped <= set(BACKBONE_SPECS), f"add a tiny spec for {sorted(shipped - set(BACKBONE_SPECS))}"


def test_encoders_give_unit_norm_features_of_one_width(backbone: ClipBackbone):
    image_features = backbone.encode_image(_images(backbone))
    text_features = backbone.encode_text(backbone.tokenize(TEXTS))

    assert image_features.shape[0] == text_features.shape[0] == len(TEXTS)
    assert image_features.shape[1] == text_features.shape[1]
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(len(TEXTS)))
    torch.testing.assert_close(text_features.norm(dim=-1), torch.ones(len(TEXTS)))


def test_tokenize_gives_one_row_of_long_ids_per_text(backbone: ClipBackbone):
    tokens = backbone.tokenize(TEXTS)

    assert tokens.dtype == torch.long
    assert tokens.ndim == 2 and tokens.shape[0] == len(TEXTS)
    assert not torch.equal(tokens[0], tokens[1])


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_transforms_turn_any_pil_image_into_a_chw_tensor_the_model_takes(backbone: ClipBackbone, mode: str):
    image = _pil_image(size=(53, 41), mode=mode)
    backbone.eval()  # one image is a batch of 1, which batch norm refuses in training mode
    for transform in (backbone.io.train_transform, backbone.io.eval_transform):
        tensor = transform(image)
        assert tensor.dtype == torch.float32 and tensor.ndim == 3 and tensor.shape[0] == 3
        backbone.encode_image(tensor.unsqueeze(0))  # the size is one the image tower accepts


def test_create_io_matches_the_built_backbones_io_without_building_it(family: str, backbone: ClipBackbone):
    spec, config = BACKBONE_SPECS[family]
    io = create_io(spec, config=config)
    image = _pil_image()

    torch.testing.assert_close(io.eval_transform(image), backbone.io.eval_transform(image))
    assert torch.equal(io.tokenizer(TEXTS), backbone.io.tokenizer(TEXTS))


def test_io_survives_pickling_for_dataloader_workers(backbone: ClipBackbone):
    io = pickle.loads(pickle.dumps(backbone.io))
    image = _pil_image()

    torch.testing.assert_close(io.eval_transform(image), backbone.io.eval_transform(image))
    assert torch.equal(io.tokenizer(TEXTS), backbone.io.tokenizer(TEXTS))


def test_logit_scale_is_the_positive_exp_of_its_log(backbone: ClipBackbone):
    assert backbone.logit_scale.item() > 0
    torch.testing.assert_close(backbone.logit_scale, backbone.log_logit_scale.exp().clamp(max=100.0))
    assert backbone.log_logit_scale.requires_grad


@pytest.mark.parametrize("locked", [False, True])
def test_param_groups_hold_each_trainable_param_once_with_no_decay_on_biases_and_norms(
    backbone: ClipBackbone, locked: bool
):
    if locked:
        backbone.lock(image=True)
    decay, no_decay = backbone.param_groups(weight_decay=0.1)
    grouped = [id(p) for p in decay["params"]] + [id(p) for p in no_decay["params"]]
    trainable = {id(p) for p in backbone.parameters() if p.requires_grad}

    assert len(grouped) == len(set(grouped)), "a parameter sits in two groups"
    assert set(grouped) == trainable
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]), "a bias or norm weight would be decayed"
    assert any(p is backbone.log_logit_scale for p in no_decay["params"])


@pytest.mark.parametrize("tower", ["image", "text"])
def test_lock_freezes_exactly_one_tower(backbone: ClipBackbone, tower: str):
    tokens = backbone.tokenize(TEXTS)
    image_params = _params_reached_by(backbone, backbone.encode_image(_images(backbone)))
    text_params = _params_reached_by(backbone, backbone.encode_text(tokens))
    locked, other = (image_params, text_params) if tower == "image" else (text_params, image_params)

    backbone.lock(**{tower: True})
    frozen = {name for name, param in backbone.named_parameters() if not param.requires_grad}

    assert locked <= frozen, f"{sorted(locked - frozen)[:5]} still train"
    assert not frozen & other, f"{sorted(frozen & other)[:5]} of the other tower were frozen"
    assert backbone.log_logit_scale.requires_grad


def test_contrastive_step_gives_finite_gradients_to_every_parameter(backbone: ClipBackbone):
    backbone.train()
    loss = _contrastive_loss(backbone, _images(backbone), backbone.tokenize(TEXTS))
    loss.backward()

    assert torch.isfinite(loss)
    missing = [name for name, param in backbone.named_parameters() if param.grad is None]
    assert not missing, f"no gradient reached {missing[:5]}"
    assert all(torch.isfinite(param.grad).all() for param in backbone.parameters())
    assert backbone.log_logit_scale.grad.abs() > 0


def test_unknown_family_error_lists_the_registered_families():
    listed = r"unknown backbone family 'open_cilp'.*available: \[.*'hf_clip'.*\]\. Did you mean \['open_clip'\]"
    with pytest.raises(ValueError, match=listed):
        create_backbone("open_cilp:ViT-B-16")


# ---- open_clip --------------------------------------------------------------------------------------------------


def test_open_clip_adapter_encodes_exactly_like_open_clip_on_the_same_weights():
    torch.manual_seed(0)
    backbone = create_backbone("open_clip", config=TINY_OPEN_CLIP).eval()
    reference = open_clip.CLIP(**TINY_OPEN_CLIP).eval()
    reference.load_state_dict(backbone.model.state_dict())
    images, tokens = _images(backbone), backbone.tokenize(TEXTS)

    with torch.no_grad():
        assert torch.equal(backbone.encode_image(images), reference.encode_image(images, normalize=True))
        assert torch.equal(backbone.encode_text(tokens), reference.encode_text(tokens, normalize=True))
    assert backbone.logit_scale.item() == pytest.approx(reference.logit_scale.exp().item())


def test_open_clip_checkpoint_file_round_trip_reproduces_encodings(tmp_path: Path):
    torch.manual_seed(0)
    original = create_backbone("open_clip", config=TINY_OPEN_CLIP).eval()
    with torch.no_grad():
        original.log_logit_scale.fill_(3.0)  # a value random init never gives, to see it load
    checkpoint = tmp_path / "tiny_clip.pt"
    torch.save(original.model.state_dict(), checkpoint)

    torch.manual_seed(1)  # different random init underneath, so only the file can make them agree
    loaded = create_backbone("open_clip", pretrained=str(checkpoint), config=TINY_OPEN_CLIP).eval()
    images, tokens = _images(original), original.tokenize(TEXTS)

    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), original.encode_image(images))
        assert torch.equal(loaded.encode_text(tokens), original.encode_text(tokens))
    assert loaded.log_logit_scale.item() == 3.0


@pytest.mark.parametrize(("tag", "quick_gelu"), [("openai", True), ("laion2b_s34b_b88k", False)])
def test_open_clip_builds_the_activation_its_pretrained_tag_was_trained_with(monkeypatch, tag: str, quick_gelu: bool):
    """ViT-B-16's config uses GELU while OpenAI trained it with QuickGELU; open_clip itself only warns."""
    calls = []

    def record_instead_of_downloading(name, **kwargs):
        calls.append(kwargs)
        return open_clip.CLIP(**TINY_OPEN_CLIP)

    monkeypatch.setattr(open_clip, "create_model", record_instead_of_downloading)
    create_backbone("open_clip:ViT-B-16", pretrained=tag)

    assert calls == [{"pretrained": tag, "force_quick_gelu": quick_gelu}]


def test_open_clip_io_for_a_named_model_needs_no_weights():
    io = OpenClipBackbone.io_from_spec("ViT-B-16", pretrained="openai")  # offline: nothing may be downloaded

    assert io.eval_transform(_pil_image()).shape == (3, 224, 224)
    assert io.train_transform(_pil_image()).shape == (3, 224, 224)
    assert io.tokenizer(TEXTS).shape == (len(TEXTS), 77)


def test_open_clip_io_normalizes_with_the_pretrained_tags_statistics():
    white = Image.new("RGB", (240, 240), (255, 255, 255))
    laion = OpenClipBackbone.io_from_spec("ViT-L-14", pretrained="laion2b_s32b_b82k").eval_transform(white)
    openai = OpenClipBackbone.io_from_spec("ViT-L-14", pretrained="openai").eval_transform(white)

    torch.testing.assert_close(laion, torch.ones_like(laion))  # mean 0.5, std 0.5: (1 - 0.5) / 0.5
    expected = (1 - torch.tensor(open_clip.OPENAI_DATASET_MEAN)) / torch.tensor(open_clip.OPENAI_DATASET_STD)
    torch.testing.assert_close(openai[:, 0, 0], expected)


def test_open_clip_io_without_a_tag_warns_when_the_models_tags_normalize_differently():
    with pytest.warns(UserWarning, match="laion2b_s32b_b82k"):
        OpenClipBackbone.io_from_spec("ViT-L-14")


def test_unknown_open_clip_model_error_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown open_clip model 'ViT-B-61'.*'ViT-B-16'"):
        create_backbone("open_clip:ViT-B-61")
    with pytest.raises(ValueError, match=r"'vit_b_16'.*'ViT-B-16'"):
        create_io("open_clip:vit_b_16")


def test_unknown_open_clip_pretrained_tag_error_lists_the_models_tags():
    with pytest.raises(ValueError, match=r"'opnai' is neither a pretrained tag of 'ViT-B-16' \(tags: \['openai'"):
        create_backbone("open_clip:ViT-B-16", pretrained="opnai")


@pytest.mark.parametrize("family", ["open_clip", "hf_clip"])
def test_spec_needs_exactly_one_of_a_model_name_and_a_config(family: str):
    with pytest.raises(ValueError, match="exactly one of"):
        create_backbone(family)
    with pytest.raises(ValueError, match="exactly one of"):
        create_io(f"{family}:some-model", config=BACKBONE_SPECS[family][1])


def test_open_clip_config_with_a_vocab_smaller_than_the_bpe_is_rejected():
    config = {**TINY_OPEN_CLIP, "text_cfg": {**TINY_OPEN_CLIP["text_cfg"], "vocab_size": 1000}}
    with pytest.raises(ValueError, match="vocab_size=1000 is smaller than the CLIP BPE vocabulary"):
        create_backbone("open_clip", config=config)


def test_open_clip_config_with_an_unknown_field_names_it():
    config = {**TINY_OPEN_CLIP, "vision_cfg": {**TINY_OPEN_CLIP["vision_cfg"], "patch": 8}}
    with pytest.raises(ValueError, match="'patch'"):
        create_backbone("open_clip", config=config)


# ---- Hugging Face CLIP ------------------------------------------------------------------------------------------


def _hf_features(output) -> Tensor:
    return output if isinstance(output, Tensor) else output.pooler_output


def test_hf_clip_adapter_encodes_like_clipmodel_get_features_normalized():
    torch.manual_seed(0)
    backbone = create_backbone("hf_clip", config=TINY_HF_CLIP).eval()
    images, tokens = _images(backbone), backbone.tokenize(TEXTS)

    with torch.no_grad():
        image_ref = F.normalize(_hf_features(backbone.model.get_image_features(pixel_values=images)), dim=-1)
        text_ref = F.normalize(_hf_features(backbone.model.get_text_features(input_ids=tokens)), dim=-1)
        assert torch.equal(backbone.encode_image(images), image_ref)
        assert torch.equal(backbone.encode_text(tokens), text_ref)


def test_hf_clip_text_features_ignore_what_follows_the_end_of_text_token():
    torch.manual_seed(0)
    backbone = create_backbone("hf_clip", config=TINY_HF_CLIP).eval()
    tokens = backbone.tokenize(TEXTS)
    padded_differently = torch.where(tokens == 0, torch.full_like(tokens, 49407), tokens)

    with torch.no_grad():
        torch.testing.assert_close(backbone.encode_text(padded_differently), backbone.encode_text(tokens))


def test_hf_clip_config_with_a_tiny_vocab_is_rejected():
    config = {**TINY_HF_CLIP, "text_config": {**TINY_HF_CLIP["text_config"], "vocab_size": 1000}}
    with pytest.raises(ValueError, match="vocab_size=1000 is smaller than the CLIP BPE vocabulary"):
        create_backbone("hf_clip", config=config)


def test_hf_clip_config_with_a_foreign_eos_id_is_rejected():
    config = {**TINY_HF_CLIP, "text_config": {**TINY_HF_CLIP["text_config"], "eos_token_id": 7}}
    with pytest.raises(ValueError, match="eos_token_id=7"):
        create_io("hf_clip", config=config)


def test_hf_clip_rejects_a_pretrained_tag():
    with pytest.raises(ValueError, match="set pretrained to null"):
        create_backbone("hf_clip", pretrained="openai", config=TINY_HF_CLIP)


def _write_hf_checkpoint(directory: Path, model: CLIPModel) -> CLIPImageProcessor:
    """A complete local HF CLIP checkpoint: weights, a CLIP tokenizer built from open_clip's BPE, a processor."""
    model.save_pretrained(directory)
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): index for token, index in open_clip.SimpleTokenizer().encoder.items()}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    # The merges open_clip reads: the file's first line is a header, and CLIP uses the first 48894 merges.
    merges = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    processor = CLIPImageProcessor(
        size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.25] * 3
    )
    processor.save_pretrained(directory)
    return processor


def test_hf_clip_local_checkpoint_round_trip_keeps_weights_tokenizer_and_processor(tmp_path: Path):
    torch.manual_seed(0)
    original = create_backbone("hf_clip", config=TINY_HF_CLIP).eval()
    processor = _write_hf_checkpoint(tmp_path, original.model)

    loaded = create_backbone(f"hf_clip:{tmp_path}").eval()
    images = _images(original)
    hf_tokens, bpe_tokens = loaded.tokenize(TEXTS), original.tokenize(TEXTS)

    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), original.encode_image(images))
        # The checkpoint's own tokenizer pads with end-of-text ids where open_clip pads with 0; ids agree up to there.
        torch.testing.assert_close(loaded.encode_text(hf_tokens), original.encode_text(bpe_tokens))
    assert torch.equal(hf_tokens[bpe_tokens != 0], bpe_tokens[bpe_tokens != 0])
    # 60x48 resizes to 50x40, leaving even margins, where torchvision's and transformers' center crops agree
    # (on odd margins they round the offset differently, a one-pixel shift).
    image = _pil_image(size=(60, 48))
    expected = torch.as_tensor(processor(images=image, return_tensors="pt")["pixel_values"][0])
    # Up to one 8-bit grey level (1 / 255 / std) from resampling rounding.
    torch.testing.assert_close(loaded.io.eval_transform(image), expected, atol=0.02, rtol=0)


@pytest.mark.parametrize("family", ["open_clip", "hf_clip"])
def test_grad_checkpointing_leaves_gradients_unchanged(family: str):
    spec, config = BACKBONE_SPECS[family]
    torch.manual_seed(0)
    backbone = create_backbone(spec, config=config).train()
    images, tokens = _images(backbone), backbone.tokenize(TEXTS)

    def gradients() -> dict[str, Tensor]:
        backbone.zero_grad(set_to_none=True)
        _contrastive_loss(backbone, images, tokens).backward()
        return {name: param.grad.clone() for name, param in backbone.named_parameters()}

    plain = gradients()
    backbone.set_grad_checkpointing(True)
    checkpointed = gradients()
    backbone.set_grad_checkpointing(False)

    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


# ---- real checkpoints (downloads; skipped unless `-m slow`) ------------------------------------------------------


@pytest.mark.slow
def test_open_clip_vit_b_16_openai_loads_and_separates_captions():
    backbone = create_backbone("open_clip:ViT-B-16", pretrained="openai").eval()
    with torch.no_grad():
        text_features = backbone.encode_texts(["a photo of a cat", "a photo of a dog"])
        image_features = backbone.encode_image(backbone.io.eval_transform(_pil_image()).unsqueeze(0))
    assert text_features.shape == (2, 512) and image_features.shape == (1, 512)
    assert backbone.logit_scale.item() == pytest.approx(100.0)
    assert (text_features[0] @ text_features[1]).item() < 0.99


@pytest.mark.slow
def test_hf_clip_openai_vit_b_16_loads_with_its_processor():
    backbone = create_backbone("hf_clip:openai/clip-vit-base-patch16").eval()
    with torch.no_grad():
        text_features = backbone.encode_texts(["a photo of a cat", "a photo of a dog"])
    assert backbone.io.eval_transform(_pil_image()).shape == (3, 224, 224)
    assert text_features.shape == (2, 512)
    assert backbone.logit_scale.item() == pytest.approx(100.0)
    assert isinstance(backbone, HFClipBackbone)
