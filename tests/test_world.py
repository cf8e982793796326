"""The embedded world: splits mirror the paper's setup, generation is deterministic, cached and atomic."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from anchor_clip.data import EvalSet
from anchor_clip.demo import pretrain as pretrain_module
from anchor_clip.demo.pretrain import PretrainRecipe, pretrain_world_clip
from anchor_clip.module import AnchorFinetuneModule
from anchor_clip.world import (
    SHAPE_NAMES,
    STYLES,
    World,
    WorldConfig,
    class_prompts,
    describe,
    generate_world,
    render_scene,
    sample_scene,
    vocabulary,
    words,
)
from anchor_clip.world import generate as generate_module
from anchor_clip.world.captions import MENTION_PROB, SIZE_WORDS, STYLE_NOUNS, hypernym, plural
from anchor_clip.world.generate import generate_pretraining_corpus
from anchor_clip.world.render import silhouette
from anchor_clip.world.scene import COLOURS
from tests.conftest import TINY_WORLD_CLIP

SMALL = WorldConfig(num_classes=8, finetune_classes=4, pretrain_size=96, pool_size=96, finetune_per_class=6,
                    eval_per_class=4)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return generate_world(tmp_path_factory.mktemp("worlds"), SMALL)


def test_zeroshot_classes_never_appear_in_finetune_set(world):
    finetune_names = _lines(world.finetune_classnames_file)
    zeroshot_names = _lines(world.zeroshot_classnames_file)
    seen = {finetune_names[int(r["label"])] for r in _rows(world.finetune)}
    assert seen == set(finetune_names)
    assert not seen & set(zeroshot_names)
    assert sorted(finetune_names + zeroshot_names) == sorted(_lines(world.classnames_file))
    zeroshot_eval = {zeroshot_names[int(r["label"])] for r in _rows(world.eval_sets["zeroshot"].manifest)}
    assert zeroshot_eval == set(zeroshot_names)


def test_id_and_shift_sets_have_disjoint_styles(world):
    id_styles = {r["style"] for r in _rows(world.eval_sets["id"].manifest)}
    assert id_styles == {r["style"] for r in _rows(world.finetune)} == {"photo"}
    shift_names = [name for name in world.eval_sets if name.startswith("shift_")]
    assert sorted(shift_names) == ["shift_cartoon", "shift_painting", "shift_sketch"]
    for name in shift_names:
        styles = {r["style"] for r in _rows(world.eval_sets[name].manifest)}
        assert styles == {name.removeprefix("shift_")}
        assert not styles & id_styles


def test_eval_labels_index_their_own_classname_files(world):
    for name, eval_set in world.eval_sets.items():
        rows = _rows(eval_set.manifest)
        classnames = _lines(eval_set.classnames)
        assert {"filepath", "label"} <= set(rows[0]), name
        assert {int(r["label"]) for r in rows} == set(range(len(classnames))), name
        assert all((eval_set.manifest.parent / r["filepath"]).is_file() for r in rows), name
    assert {r["style"] for r in _rows(world.eval_sets["zeroshot"].manifest)} == set(STYLES)


def test_pretraining_corpus_covers_every_class_and_style_evenly(world):
    rows = _rows(generate_pretraining_corpus(world))
    assert len(rows) == SMALL.pretrain_size
    counts = Counter((r["label"], r["style"]) for r in rows)
    assert len(counts) == SMALL.num_classes * len(SMALL.styles)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_pretraining_captions_name_the_label_and_the_style(world):
    classnames = _lines(world.classnames_file)
    for row in _rows(generate_pretraining_corpus(world)):
        caption_words = set(words(row["caption"]))
        name = classnames[int(row["label"])]
        assert name in caption_words or plural(name) in caption_words, row
        assert row["style"] in caption_words, row


def test_pool_is_another_corpus_with_concepts_no_evaluation_needs(tmp_path):
    config = replace(SMALL, pool_size=4000, pool_extra_classes=4)
    world = generate_world(tmp_path, config)
    rows = _rows(world.pool)
    concepts = _lines(world.pool_classnames_file)
    assert concepts[: config.num_classes] == _lines(world.classnames_file) and len(concepts) == 12
    labels = Counter(int(r["label"]) for r in rows)
    assert set(labels) == set(range(12))  # the pool-only concepts appear, and only there
    assert max(labels.values()) > 1.5 * min(labels.values())  # a skewed class mix, not the corpus's even one
    styles = Counter(r["style"] for r in rows)
    for style, weight in zip(config.styles, config.pool_style_weights, strict=True):
        assert abs(styles[style] / len(rows) - weight / sum(config.pool_style_weights)) < 0.03, style
    corpus = {r["filepath"] for r in _rows(generate_pretraining_corpus(world))}
    assert not corpus & {str(Path("pretrain") / r["filepath"]) for r in rows}  # disjoint draws, disjoint files


def test_pool_captions_are_wrong_partial_or_hypernyms_at_their_configured_rates(tmp_path):
    config = replace(SMALL, pool_size=4000, pool_extra_classes=0)
    world = generate_world(tmp_path, config)
    concepts = _lines(world.pool_classnames_file)
    named, other, hypernyms = 0, 0, 0
    rows = _rows(world.pool)
    for row in rows:
        caption_words = set(words(row["caption"]))
        said = {c for c in concepts if c in caption_words or plural(c) in caption_words}
        own = concepts[int(row["label"])]
        named += own in said
        other += bool(said - {own})
        hypernyms += bool({hypernym(own), plural(hypernym(own))} & caption_words) and own not in said
    noise = config.web_captions
    assert abs(named / len(rows) - (1 - noise.wrong - noise.partial - noise.hypernym)) < 0.03
    assert abs(other / len(rows) - noise.wrong) < 0.03
    assert abs(hypernyms / len(rows) - noise.hypernym) < 0.03


def test_no_image_appears_twice_across_splits(world):
    digests = Counter(hashlib.sha1(p.read_bytes()).hexdigest() for p in (world.root / "images").rglob("*.png"))
    assert sum(digests.values()) == sum(world.split_sizes.values())
    assert max(digests.values()) == 1


def test_same_seed_gives_identical_world_and_another_seed_differs(tmp_path, world):
    again = generate_world(tmp_path / "a", SMALL)
    other = generate_world(tmp_path / "b", replace(SMALL, seed=1))
    for table in ("pool.csv", "finetune.csv", "eval_zeroshot.csv", "captions_oracle.csv"):
        assert (again.root / table).read_bytes() == (world.root / table).read_bytes()
        assert (other.root / table).read_bytes() != (world.root / table).read_bytes()
    image = "images/pool/000000.png"
    assert (again.root / image).read_bytes() == (world.root / image).read_bytes()
    assert (other.root / image).read_bytes() != (world.root / image).read_bytes()


def test_world_does_not_depend_on_worker_count(tmp_path, monkeypatch, world):
    monkeypatch.setattr(generate_module, "CHUNK", 40)  # 7 splits -> 10 chunks over 2 processes
    parallel = generate_world(tmp_path, SMALL, num_workers=2)
    for table in ("pool.csv", "eval_shift_sketch.csv"):
        assert (parallel.root / table).read_bytes() == (world.root / table).read_bytes()
    for path in (world.root / "images").rglob("*.png"):
        assert (parallel.root / path.relative_to(world.root)).read_bytes() == path.read_bytes()


def test_rerunning_a_complete_world_does_not_regenerate(tmp_path, monkeypatch):
    first = generate_world(tmp_path, SMALL)
    stamp = (first.root / "world.json").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("a complete world was rebuilt")

    monkeypatch.setattr(generate_module, "_build", fail)
    second = generate_world(tmp_path, SMALL)
    assert second == first
    assert (first.root / "world.json").stat().st_mtime_ns == stamp


def test_killed_build_leaves_no_world_and_the_next_call_completes_it(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_render = generate_module.render_scene

    def dies_midway(scene, image_size):
        calls["n"] += 1
        if calls["n"] > 50:
            raise KeyboardInterrupt  # what a Ctrl-C mid-build raises
        return real_render(scene, image_size)

    monkeypatch.setattr(generate_module, "render_scene", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        generate_world(tmp_path, SMALL)
    assert not (tmp_path / SMALL.key).exists()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    world = generate_world(tmp_path, SMALL)
    assert sum(1 for _ in (world.root / "images").rglob("*.png")) == sum(world.split_sizes.values())


def test_partial_world_directory_is_not_taken_as_complete(tmp_path):
    partial = tmp_path / SMALL.key
    (partial / "images" / "pool").mkdir(parents=True)
    (partial / "pool.csv").write_text("image_id,filepath,caption,label,style\n")  # killed before world.json
    dead_build = tmp_path / f".{SMALL.key}.build-{2**22 + 17}-deadbeef"  # a pid above Linux's pid_max
    dead_build.mkdir()
    world = generate_world(tmp_path, SMALL)
    assert len(_rows(world.pool)) == SMALL.pool_size
    assert json.loads((world.root / "world.json").read_text())["key"] == SMALL.key
    assert not dead_build.exists()


def test_world_load_rejects_a_directory_without_world_json(tmp_path):
    with pytest.raises(ValueError, match="no world.json"):
        World.load(tmp_path)


def test_captions_always_name_class_count_and_style_and_never_a_wrong_attribute():
    rng = np.random.default_rng(0)
    count_words = {1: {"a", "an", "one"}, 2: {"two", "pair"}, 3: {"three"}}
    colours, sizes = set(COLOURS), {w for phrases in SIZE_WORDS.values() for p in phrases for w in words(p)}
    mentioned = Counter()
    for i in range(600):
        scene = sample_scene(rng, SHAPE_NAMES[i % len(SHAPE_NAMES)], STYLES[i % len(STYLES)])
        caption = set(words(describe(scene, rng)))
        noun = scene.shape if scene.count == 1 else plural(scene.shape)
        assert {noun, scene.style} <= caption and caption & count_words[scene.count], caption
        assert caption & colours <= {scene.colour, scene.background_colour}, caption
        assert caption & sizes <= {w for p in SIZE_WORDS[scene.size] for w in words(p)}, caption
        mentioned["colour"] += scene.colour in caption
        mentioned["size"] += bool(caption & sizes)
        mentioned["background"] += "background" in caption
    for attribute, count in mentioned.items():  # optional attributes appear at their configured rates
        assert abs(count / 600 - MENTION_PROB[attribute]) < 0.08, (attribute, count)


def test_captions_vary_in_wording():
    rng = np.random.default_rng(0)
    scene = sample_scene(rng, "star", "sketch")
    captions = {describe(scene, rng) for _ in range(200)}
    openings = {c.split()[0] for c in captions}
    assert len(captions) > 100
    assert len(openings) >= 4  # templates differ in word order, not only in synonyms
    assert any(noun in c for c in captions for noun in STYLE_NOUNS["sketch"][1:])


def test_every_caption_and_prompt_word_is_in_the_vocabulary():
    vocab = set(vocabulary())
    rng = np.random.default_rng(1)
    scenes = [sample_scene(rng, name, style) for name in SHAPE_NAMES for style in STYLES for _ in range(6)]
    texts = [describe(scene, rng) for scene in scenes]
    texts += class_prompts(list(SHAPE_NAMES)) + [p for s in STYLES for p in class_prompts(list(SHAPE_NAMES), s)]
    missing = {w for t in texts for w in words(t)} - vocab
    assert not missing
    assert max(len(words(t)) for t in texts) <= 30  # fits a 32-token context with SOT and EOT


def test_render_is_a_pure_function_of_the_scene():
    scene = sample_scene(np.random.default_rng(3), "fish", "painting")
    first, second = np.asarray(render_scene(scene)), np.asarray(render_scene(scene))
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, second)


def _style_statistics(image) -> dict[str, float]:
    x = np.asarray(image, dtype=float) / 255
    grey = x.mean(axis=-1)
    laplacian = grey[1:-1, 1:-1] - (grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:]) / 4
    return {
        "brightness": grey.mean(),
        "saturation": (x.max(axis=-1) - x.min(axis=-1)).mean(),
        "flat": (np.abs(np.diff(x, axis=1)).max(axis=-1) < 1 / 255).mean(),  # neighbours of identical colour
        "grain": np.median(np.abs(laplacian)),  # pixel-level noise, robust to the few edge pixels
    }


def test_each_style_leaves_its_own_signature_on_the_same_scene():
    rng = np.random.default_rng(4)
    stats = {style: [] for style in STYLES}
    for i in range(40):
        scene = sample_scene(rng, SHAPE_NAMES[i], "photo")
        for style in STYLES:
            stats[style].append(_style_statistics(render_scene(replace(scene, style=style))))
    mean = {style: {k: np.mean([s[k] for s in rows]) for k in rows[0]} for style, rows in stats.items()}
    photo, sketch, cartoon, painting = (mean[s] for s in ("photo", "sketch", "cartoon", "painting"))
    assert sketch["brightness"] > photo["brightness"] + 0.15 and sketch["saturation"] < 0.5 * photo["saturation"]
    assert cartoon["flat"] > 0.3 > 0.05 > photo["flat"]  # flat fills vs sensor noise
    assert painting["saturation"] > photo["saturation"] and painting["flat"] < 0.1  # vivid, never flat
    assert photo["grain"] > 1.3 * painting["grain"]  # smeared paint has no pixel grain


def test_default_class_silhouettes_are_distinct_from_each_other():
    masks = {name: silhouette(name, [(64.0, 64.0, 42.0, 42.0, 0.0)], 32) for name in SHAPE_NAMES[:40]}
    names = list(masks)
    worst = max(
        (np.minimum(masks[a], masks[b]).sum() / np.maximum(masks[a], masks[b]).sum(), a, b)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    )
    assert worst[0] < 0.86, worst  # circle vs square is the closest pair; the regular polygons come after 40
    assert all(m.sum() > 40 for m in masks.values())  # every class fills a visible area at 32 px


@pytest.mark.parametrize(
    "override, message",
    [
        ({"finetune_classes": 8}, "finetune_classes"),
        ({"num_classes": 99}, "num_classes"),
        ({"styles": ("photo", "mosaic")}, "styles"),
        ({"finetune_style": "sketch", "styles": ("photo",)}, "finetune_style"),
        ({"pretrain_size": 10}, "pretrain_size"),
        ({"pool_extra_classes": 99}, "pool_extra_classes"),
        ({"pool_style_weights": (1.0,)}, "pool_style_weights"),
    ],
)
def test_invalid_config_raises_with_the_offending_field(override, message):
    with pytest.raises(ValueError, match=message):
        replace(SMALL, **override)


def test_config_key_changes_with_any_field_and_lists_equal_tuples():
    assert replace(SMALL, styles=list(SMALL.styles)).key == SMALL.key
    assert replace(SMALL, eval_per_class=5).key != SMALL.key
    assert len({WorldConfig(seed=s).key for s in range(5)}) == 5
    assert os.sep not in SMALL.key


def test_home_context_is_fixed_per_class_and_keeps_the_object_visible():
    from anchor_clip.world.scene import _BACKGROUND_COLOURS, home_context

    rng = np.random.default_rng(5)
    patterns = {}
    for name in SHAPE_NAMES[:40]:
        scenes = [sample_scene(rng, name, "photo") for _ in range(6)]
        homes = [home_context(s) for s in scenes]
        assert len({h.background for h in homes}) == 1  # one pattern per class, whatever else the scene holds
        for scene, home in zip(scenes, homes, strict=True):
            assert home.background_colour in _BACKGROUND_COLOURS[scene.colour]  # contrasts with the object
            assert replace(home, background=scene.background, background_colour=scene.background_colour) == scene
        patterns[name] = homes[0].background
    assert len(set(patterns.values())) >= 4  # classes spread over the patterns


def test_context_bias_changes_only_the_finetune_and_id_images(tmp_path):
    plain = generate_world(tmp_path / "plain", replace(SMALL, finetune_context_bias=0.0))
    biased = generate_world(tmp_path / "biased", replace(SMALL, finetune_context_bias=1.0))

    def digests(world: World, split: str) -> list[str]:
        folder = world.root / "images" / split
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())]

    for split in ("pool", "eval_zeroshot", "eval_shift_sketch"):
        assert digests(plain, split) == digests(biased, split)
    for split in ("finetune", "eval_id"):
        before, after = digests(plain, split), digests(biased, split)
        assert sum(a != b for a, b in zip(before, after, strict=True)) > len(before) // 2
    with pytest.raises(ValueError, match="finetune_context_bias=1.5 must be in"):
        replace(SMALL, finetune_context_bias=1.5)


def test_pretrain_cache_key_ignores_the_worker_count_but_not_the_recipe(world):
    recipe = PretrainRecipe(steps=4, batch_size=16, num_workers=0)
    key = pretrain_module.pretrain_key(world, TINY_WORLD_CLIP, recipe)
    assert pretrain_module.pretrain_key(world, TINY_WORLD_CLIP, replace(recipe, num_workers=2)) == key
    assert pretrain_module.pretrain_key(world, TINY_WORLD_CLIP, replace(recipe, steps=5)) != key


def test_killed_pretraining_resumes_from_its_last_checkpoint(tmp_path, world, monkeypatch):
    """A run killed mid-way trains only the steps after its last checkpoint on the next call."""
    recipe = PretrainRecipe(steps=4, batch_size=16, num_workers=0, warmup_steps=1)
    model = TINY_WORLD_CLIP
    monkeypatch.setattr(pretrain_module, "CHECKPOINT_EVERY", 2)
    real_step = AnchorFinetuneModule.training_step
    steps = []

    def dies_at_step_3(self, batch, batch_idx):
        steps.append(self.global_step)
        if len(steps) == 3:  # the first call's step 3; the resumed call (steps cleared) makes only two
            raise RuntimeError("killed")
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(AnchorFinetuneModule, "training_step", dies_at_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        pretrain_world_clip(world, model, recipe, cache_dir=tmp_path)
    run_dir = tmp_path / "world_clip" / pretrain_module.pretrain_key(world, model, recipe)
    assert not (run_dir / "world_clip.pt").exists()
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)  # what resuming loads
    assert last["global_step"] == 2

    steps.clear()
    weights = pretrain_world_clip(world, model, recipe, cache_dir=tmp_path)
    assert steps == [2, 3]  # steps 3 and 4 only, not a restart
    assert weights.is_file()
    assert "val/id/acc" in json.loads((run_dir / "pretrain.json").read_text())["metrics"]


def test_checkpoint_the_weights_only_loader_refuses_is_moved_aside_and_pretraining_restarts(tmp_path, world):
    """An unloadable last.ckpt (objects pickled by an earlier version) is kept beside, not resumed or deleted."""
    recipe = PretrainRecipe(steps=2, batch_size=16, num_workers=0, warmup_steps=1)
    model = TINY_WORLD_CLIP
    last = tmp_path / "world_clip" / pretrain_module.pretrain_key(world, model, recipe) / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    old_hparams = {"eval_sets": [EvalSet("id", "m.csv", "c.txt")]}  # as checkpoints before plain-dict eval sets
    torch.save({"global_step": 1, "datamodule_hyper_parameters": old_hparams}, last)
    with pytest.warns(UserWarning, match="cannot be loaded weights-only.*restarts from step 0"):
        weights = pretrain_world_clip(world, model, recipe, cache_dir=tmp_path)
    assert weights.is_file()
    stale = last.with_name("last.ckpt.unloadable")
    assert torch.load(stale, weights_only=False)["global_step"] == 1  # the old file, intact
    assert torch.load(last, weights_only=True)["global_step"] == 2  # the new run's own checkpoint
