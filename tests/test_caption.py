"""The captioning job: tiny random BLIP, BLIP-2, CoCa and kNN captioners, sharded resumable output, the label filter."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pandas as pd
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from anchor_clip.anchors import caption as caption_job
from anchor_clip.anchors.caption import caption_finetune_set, main
from anchor_clip.anchors.captioners import BlipCaptioner, CocaCaptioner, KnnCaptioner
from anchor_clip.anchors.mentions import ClassNameMatcher, first_consistent, mention_rates, mentions
from anchor_clip.data import AnchorDataModule
from tests.conftest import CLASSES, TINY_OPEN_CLIP

WORDS = ["a", "photo", "picture", "of", "the", "red", "green", "blue", "yellow", "square", "circle", "line", "dot"]

# CoCa needs one width through image tokens, text tokens and the decoder (embed_dim = all widths).
TINY_COCA = {
    "embed_dim": 64,
    "vision_cfg": {
        "image_size": 32,
        "layers": 1,
        "width": 64,
        "patch_size": 8,
        "attentional_pool": True,
        "attn_pooler_heads": 4,
        "output_tokens": True,
    },
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 49408,
        "width": 64,
        "heads": 4,
        "layers": 1,
        "embed_cls": True,
        "output_tokens": True,
    },
    "multimodal_cfg": {
        "context_length": 16,
        "vocab_size": 49408,
        "width": 64,
        "heads": 4,
        "layers": 1,
        "attn_pooler_heads": 4,
    },
}


def _vision(**extra) -> dict:
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        **extra,
    )


def save_tiny_blip(path: Path) -> str:
    """A random BLIP with a 19-token WordPiece vocabulary, saved with its processor like a Hub checkpoint."""
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {word: i for i, word in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    tokenizer = BertTokenizerFast(
        tokenizer_object=backend,
        bos_token="[DEC]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        mask_token="[MASK]",
    )
    config = BlipConfig(
        vision_config=_vision(),
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=vocab["[DEC]"],
            sep_token_id=vocab["[SEP]"],
            eos_token_id=vocab["[SEP]"],
            pad_token_id=vocab["[PAD]"],
        ),
        projection_dim=32,
        image_text_hidden_size=32,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(path)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(path)
    return str(path)


def save_tiny_blip2(path: Path) -> str:
    """A random BLIP-2 with a tiny OPT language model and a word-level tokenizer."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        OPTConfig,
        PreTrainedTokenizerFast,
    )

    vocab = {word: i for i, word in enumerate(["<pad>", "<unk>", "</s>", "question", "answer", ":", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    processor = Blip2Processor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer, num_query_tokens=4)
    language = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
        bos_token_id=vocab["</s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
    )
    config = Blip2Config(
        vision_config=_vision(),
        qformer_config=dict(
            vocab_size=16,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            encoder_hidden_size=32,
        ),
        text_config=language.to_dict(),
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def save_tiny_coca(path: Path) -> str:
    """Weights for TINY_COCA. open_clip zero-initialises the decoder's output projection, which makes every token
    equally likely; a random projection gives a model whose greedy captions depend on the image."""
    torch.manual_seed(0)
    model = open_clip.CoCa(**TINY_COCA)
    torch.nn.init.normal_(model.text_decoder.text_projection, std=0.5)
    torch.save(model.state_dict(), path)
    return str(path)


def save_tiny_clip(path: Path) -> str:
    """Weights for TINY_OPEN_CLIP: the kNN captioner embeds pool and queries with one model, built twice."""
    torch.manual_seed(0)
    torch.save(open_clip.CLIP(**TINY_OPEN_CLIP).state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> str:
    return save_tiny_blip(tmp_path_factory.mktemp("blip"))


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory) -> str:
    return save_tiny_blip2(tmp_path_factory.mktemp("blip2"))


@pytest.fixture(scope="module")
def coca_checkpoint(tmp_path_factory) -> str:
    return save_tiny_coca(tmp_path_factory.mktemp("coca") / "coca.pt")


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory) -> str:
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip.pt")


@pytest.fixture(scope="module")
def small_finetune(tiny_data, tmp_path_factory) -> str:
    """The first 8 finetune images (CoCa decodes over the 49k-token BPE vocabulary: slow on CPU)."""
    path = tmp_path_factory.mktemp("small") / "finetune.csv"
    frame = pd.read_csv(tiny_data["finetune"]).iloc[:8]
    frame.assign(filepath=[str(Path(tiny_data["root"]) / p) for p in frame["filepath"]]).to_csv(path, index=False)
    return str(path)


def _images(tiny_data: dict, n: int) -> list[Image.Image]:
    frame = pd.read_csv(tiny_data["finetune"])
    return [Image.open(Path(tiny_data["root"]) / p).convert("RGB") for p in frame["filepath"][:n]]


def _job(tiny_data: dict, out: Path, captioner, finetune: str | None = None, **kwargs):
    kwargs = {"classnames": tiny_data["classnames"], "batch_size": 4, "num_workers": 0, "shard_size": 12, **kwargs}
    return caption_finetune_set(finetune or tiny_data["finetune"], str(out), captioner, **kwargs)


def _load_into_datamodule(tiny_data: dict, table: Path, finetune: str | None = None) -> dict:
    dm = AnchorDataModule(
        finetune=finetune or tiny_data["finetune"],
        classnames=tiny_data["classnames"],
        captions=str(table),
        backbone="open_clip",
        backbone_config=TINY_OPEN_CLIP,
        batch_size=4,
        num_workers=0,
    )
    dm.setup("fit")
    return dm.streams["finetune"][0]


@pytest.fixture
def pool_with_finetune_images(tiny_data, tmp_path) -> tuple[str, dict[str, str]]:
    """A pool holding every finetune image under a caption of its own, plus the 40 retrieved-pool images."""
    finetune = pd.read_csv(tiny_data["finetune"])
    own = {
        image_id: f"a {CLASSES[label]} number {i}" if i % 2 == 0 else f"a purple star number {i}"
        for i, (image_id, label) in enumerate(zip(finetune["image_id"], finetune["label"], strict=True))
    }
    others = pd.read_parquet(tiny_data["retrieved"])
    pool = pd.DataFrame(
        {
            "filepath": [str(Path(tiny_data["root"]) / p) for p in [*finetune["filepath"], *others["filepath"]]],
            "caption": [*own.values(), *others["caption"]],
        }
    )
    pool.to_csv(tmp_path / "pool.csv", index=False)
    return str(tmp_path / "pool.csv"), own


@pytest.fixture
def knn(clip_checkpoint, pool_with_finetune_images, tmp_path):
    """Builds kNN captioners over that pool with the saved tiny CLIP."""

    def make(**kwargs) -> KnnCaptioner:
        return KnnCaptioner(
            backbone="open_clip",
            config=TINY_OPEN_CLIP,
            pretrained=clip_checkpoint,
            pool=pool_with_finetune_images[0],
            pool_embeddings=str(tmp_path / "pool_embeddings"),
            num_workers=0,
            **kwargs,
        )

    return make


# --- class-name matching ------------------------------------------------------------------------------------


def test_class_names_match_whole_words_any_case_and_regular_plurals():
    assert mentions("Two RED SQUARES on a table", "red square")
    assert mentions("three butterflies", "butterfly")
    assert mentions("a great white shark", "great_white_shark")
    assert mentions("a t-shirt", "T-shirt") and mentions("a t shirt", "T-shirt")
    assert not mentions("a redsquare", "red square")
    assert not mentions("a red and a square", "red square")
    assert not mentions("a catalog", "cat")


def test_longest_name_wins_so_a_shark_species_is_not_also_shark():
    matcher = ClassNameMatcher(["shark", "great white shark"])
    assert matcher.find("a great white shark near a shark") == {0, 1}
    assert matcher.find("a great white shark") == {1}


def test_label_filter_takes_first_neighbour_naming_the_label_else_the_nearest():
    candidates = [
        ["a dog on grass", "two red squares", "a red square"],
        ["a dog on grass", "a cat"],
        ["a green circle", "a red square"],
    ]
    ranks, found = first_consistent(candidates, ["red square", "red square", "green circle"])
    assert ranks == [1, 0, 0]
    assert found == [True, False, True]


def test_mention_rates_count_own_other_and_unseen_classes():
    captions = ["a red square", "a red square and a blue line", "a purple star", "nothing"]
    rates = mention_rates(
        captions,
        [0, 0, 1, 2],
        ["red square", "green circle", "blue line"],
        other_classnames=["purple star", "red square"],
    )
    assert rates == {"names_own_class": 0.5, "names_other_finetune_class": 0.25, "names_unseen_class": 0.25}


# --- captioners ---------------------------------------------------------------------------------------------


def test_blip_cache_loads_into_the_datamodule_caption_stream(tiny_data, small_finetune, blip_dir, tmp_path):
    captioner = BlipCaptioner(model=blip_dir, max_new_tokens=6, num_beams=1)
    result = _job(tiny_data, tmp_path, captioner, finetune=small_finetune, shard_size=3)
    table = pd.read_parquet(result.table)
    assert table["image_id"].tolist() == pd.read_csv(small_finetune)["image_id"].tolist()
    # Decoded through the saved tokenizer: only vocabulary words, no special tokens.
    assert set(" ".join(table["caption"]).split()) <= set(WORDS)
    assert table["caption"].str.len().gt(0).any()
    item = _load_into_datamodule(tiny_data, result.table, small_finetune)
    assert item["captions"] == table["caption"].iloc[0]


def test_blip_batched_captions_equal_one_at_a_time(tiny_data, blip_dir):
    captioner = BlipCaptioner(model=blip_dir, max_new_tokens=6, num_beams=2)
    captioner.setup("cpu")
    images = _images(tiny_data, 4)
    assert captioner.caption(images) == [captioner.caption([image])[0] for image in images]


def test_blip_keeps_its_prompt_prefix_and_blip2_keeps_only_the_answer(tiny_data, blip_dir, blip2_dir):
    images = _images(tiny_data, 3)
    blip = BlipCaptioner(model=blip_dir, prompt="a picture of", max_new_tokens=4, num_beams=1)
    blip.setup("cpu")
    assert all(c.startswith("a picture of") for c in blip.caption(images))

    blip2 = BlipCaptioner(model=blip2_dir, prompt="question : a photo answer :", max_new_tokens=4, num_beams=1)
    blip2.setup("cpu")
    prompted = blip2.caption(images)
    assert not any(c.startswith("question") for c in prompted)
    unprompted = BlipCaptioner(model=blip2_dir, max_new_tokens=4, num_beams=1)
    unprompted.setup("cpu")
    assert all(set(c.split()) <= set(WORDS) | {"question", "answer", ":"} for c in unprompted.caption(images))


def test_coca_cache_from_config_and_checkpoint_loads_into_the_datamodule(
    tiny_data, small_finetune, coca_checkpoint, tmp_path
):
    captioner = CocaCaptioner(
        config=TINY_COCA, pretrained=coca_checkpoint, seq_len=6, generate_kwargs={"min_seq_len": 2}
    )
    result = _job(tiny_data, tmp_path, captioner, finetune=small_finetune, batch_size=8)
    table = pd.read_parquet(result.table)
    assert table["caption"].str.len().gt(0).all()
    assert not table["caption"].str.contains("<start_of_text>|<end_of_text>").any()
    # Greedy decoding is deterministic: the cached captions are what the captioner says for the same images.
    assert captioner.caption(_images(tiny_data, 3)) == table["caption"].iloc[:3].tolist()
    assert _load_into_datamodule(tiny_data, result.table, small_finetune)["captions"] == table["caption"].iloc[0]


def test_knn_returns_the_exact_pool_caption_for_an_image_in_the_pool(
    tiny_data, pool_with_finetune_images, knn, tmp_path
):
    own = pool_with_finetune_images[1]
    result = _job(tiny_data, tmp_path / "out", knn(), other_classnames=["purple star"])
    table = pd.read_parquet(result.table)
    assert table["caption"].tolist() == [own[i] for i in table["image_id"]]
    assert table["neighbour_similarity"].gt(0.999).all()
    # Even rows name their own class, odd rows a class outside the finetune set.
    assert result.report["class_mentions"]["captioner"] == {
        "names_own_class": 0.5,
        "names_other_finetune_class": 0.0,
        "names_unseen_class": 0.5,
    }
    assert _load_into_datamodule(tiny_data, result.table)["captions"] == own[table["image_id"].iloc[0]]


def test_knn_label_filter_walks_past_neighbours_that_miss_the_label(
    tiny_data, pool_with_finetune_images, knn, tmp_path
):
    own = pool_with_finetune_images[1]
    labels = pd.read_csv(tiny_data["finetune"])["label"].tolist()
    # Every image is its own nearest neighbour: even images' own captions name their class, odd ones' do not.
    result = _job(tiny_data, tmp_path / "out", knn(label_filter=True, top_m=20), other_classnames=["purple star"])
    table = pd.read_parquet(result.table)
    named = [mentions(c, CLASSES[label]) for c, label in zip(table["caption"], labels, strict=True)]
    assert table["label_found"].tolist() == named
    even = table.index % 2 == 0
    # Even images keep their own caption (it names the class); odd ones move down to one that does, if any.
    assert (table["neighbour_rank"][even] == 0).all() and table["caption"][even].tolist() == [
        own[i] for i in table["image_id"][even]
    ]
    assert (table["neighbour_rank"][~even & table["label_found"]] > 0).all()
    assert (table["caption"][~table["label_found"]] == [own[i] for i in table["image_id"][~table["label_found"]]]).all()
    counts = result.report["label_filter"]
    assert counts["kept_nearest"] == even.sum()
    assert counts["replaced"] + counts["fell_back"] == (~even).sum()
    assert result.report["class_mentions"]["captioner"]["names_unseen_class"] == counts["fell_back"] / 32


# --- the sharded job ----------------------------------------------------------------------------------------


def test_killed_job_resumes_without_recaptioning_finished_shards(
    tiny_data, small_finetune, blip_dir, tmp_path, monkeypatch
):
    captioner = BlipCaptioner(model=blip_dir, max_new_tokens=6, num_beams=1)
    # 8 images in shards of 3 (3 + 3 + 2), captioned 2 at a time.
    job = {"finetune": small_finetune, "shard_size": 3, "batch_size": 2}
    uninterrupted = pd.read_parquet(_job(tiny_data, tmp_path / "whole", captioner, **job).table)

    calls: list[int] = []
    generate = BlipCaptioner.generate

    def dies_in_second_shard(self, pixels, label_names=None):
        calls.append(len(pixels))
        if len(calls) == 4:  # calls 1-2 caption shard 0, call 3 the first half of shard 1
            raise KeyboardInterrupt
        return generate(self, pixels, label_names)

    monkeypatch.setattr(BlipCaptioner, "generate", dies_in_second_shard)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        _job(tiny_data, out, captioner, **job)
    assert sorted(p.name for p in out.iterdir()) == ["index-00000.json", "shard_00000.parquet"]

    calls.clear()
    monkeypatch.setattr(
        BlipCaptioner,
        "generate",
        lambda self, pixels, label_names=None: calls.append(len(pixels)) or generate(self, pixels, label_names),
    )
    result = _job(tiny_data, out, captioner, **job)
    assert sum(calls) == result.captioned == 8 - 3
    pd.testing.assert_frame_equal(pd.read_parquet(result.table), uninterrupted)

    # With every shard done, a re-run only merges: it loads no model.
    monkeypatch.setattr(BlipCaptioner, "setup", lambda *a, **k: pytest.fail("setup ran with nothing to caption"))
    assert _job(tiny_data, out, captioner, **job).captioned == 0


def test_ranks_caption_disjoint_shards_and_the_last_one_merges(tiny_data, knn, tmp_path):
    whole = _job(tiny_data, tmp_path / "whole", knn())
    first = _job(tiny_data, tmp_path / "split", knn(), rank=0, world_size=2)
    assert first.table is None and first.captioned == 12 + 8  # shards 0 and 2 of 12 + 12 + 8 rows
    second = _job(tiny_data, tmp_path / "split", knn(), rank=1, world_size=2)
    assert second.captioned == 12
    pd.testing.assert_frame_equal(pd.read_parquet(second.table), pd.read_parquet(whole.table))


def test_score_threshold_swaps_low_scores_for_the_class_prompt_without_recaptioning(
    tiny_data, small_finetune, blip_dir, tmp_path, monkeypatch
):
    captioner = BlipCaptioner(model=blip_dir, max_new_tokens=6, num_beams=1)
    score = {"finetune": small_finetune, "score_backbone": "open_clip", "score_backbone_config": TINY_OPEN_CLIP}
    scored = pd.read_parquet(_job(tiny_data, tmp_path, captioner, **score).table)
    assert scored["score"].between(-1, 1).all()

    threshold = float(scored["score"].median())
    monkeypatch.setattr(BlipCaptioner, "setup", lambda *a, **k: pytest.fail("a new threshold re-captioned"))
    result = _job(tiny_data, tmp_path, captioner, score_threshold=threshold, **score)
    table = pd.read_parquet(result.table)
    below = scored["score"] < threshold
    labels = pd.read_csv(small_finetune)["label"]
    assert table["caption"][below].tolist() == [f"a photo of a {CLASSES[label]}." for label in labels[below]]
    assert table["caption"][~below].tolist() == scored["caption"][~below].tolist()
    assert result.report["score"]["below_threshold"] == below.sum() > 0


def test_resuming_with_other_captioner_settings_is_refused(tiny_data, small_finetune, blip_dir, tmp_path):
    _job(tiny_data, tmp_path, BlipCaptioner(model=blip_dir, max_new_tokens=6, num_beams=1), finetune=small_finetune)
    with pytest.raises(ValueError, match="different job.*captioner"):
        _job(tiny_data, tmp_path, BlipCaptioner(model=blip_dir, max_new_tokens=7, num_beams=1), finetune=small_finetune)


def test_label_filter_without_classnames_is_refused(tiny_data, tmp_path):
    knn = KnnCaptioner(backbone="open_clip", config=TINY_OPEN_CLIP, pool_embeddings=str(tmp_path), label_filter=True)
    with pytest.raises(ValueError, match="classnames are required"):
        _job(tiny_data, tmp_path / "out", knn, classnames=None)


def test_cli_runs_a_yaml_config_and_documents_its_arguments(
    tiny_data, pool_with_finetune_images, clip_checkpoint, tmp_path, capsys
):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--captioner" in capsys.readouterr().out

    pool, own = pool_with_finetune_images
    config = {
        "finetune": tiny_data["finetune"],
        "out_dir": str(tmp_path / "out"),
        "classnames": tiny_data["classnames"],
        "num_workers": 0,
        "table": "captions.csv",
        "captioner": {
            "class_path": "KnnCaptioner",
            "init_args": {
                "backbone": "open_clip",
                "config": TINY_OPEN_CLIP,
                "pretrained": clip_checkpoint,
                "pool": pool,
                "pool_embeddings": str(tmp_path / "pool_embeddings"),
                "num_workers": 0,
            },
        },
    }
    (tmp_path / "job.yaml").write_text(json.dumps(config))  # JSON is YAML
    result = main(["--config", str(tmp_path / "job.yaml")])
    assert result.table.name == "captions.csv"
    assert _load_into_datamodule(tiny_data, result.table)["captions"] == next(iter(own.values()))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["images"] == 32 and report["captioner"]["kind"] == "knn"


def test_job_module_is_runnable_as_python_dash_m():
    import importlib

    entry = importlib.import_module("anchor_clip.caption")
    assert entry.main is caption_job.main
