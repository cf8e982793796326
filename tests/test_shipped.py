"""The world models shipped with the package: hashes, the configs they record, and the accuracy they score."""

import json
import shutil
from types import SimpleNamespace

import pytest
from PIL import Image

from anchor_clip import AnchorDataModule, AnchorFinetuneModule, EvalSet
from anchor_clip.anchors.captioners import BlipCaptioner
from anchor_clip.demo.pretrain import pretrain_key
from anchor_clip.demo.recipes import WORLD_MODEL, DemoConfig
from anchor_clip.eval.zeroshot import evaluate_zero_shot
from anchor_clip.world import pretrained as shipped
from anchor_clip.world.captions import STYLE_PROMPT, plural, vocabulary, words
from anchor_clip.world.config import WorldConfig
from anchor_clip.world.generate import draw_split
from anchor_clip.world.shapes import SHAPE_NAMES
from anchor_clip.world.splits import plan_splits


def test_every_shipped_file_matches_its_manifest_hash():
    assert shipped.world_clip_tags() == ["world0", "world1", "world2"]
    for tag in shipped.world_clip_tags():
        assert shipped.world_clip_weights(tag).stat().st_size < 1_000_000  # float16, small
    assert (shipped.captioner_dir("world_blip") / "model.safetensors").is_file()


def test_a_damaged_shipped_file_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "weights"
    shutil.copytree(shipped.WEIGHTS_DIR, copy)
    damaged = copy / shipped.world_clip_entry("world0")["file"]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(shipped, "WEIGHTS_DIR", copy)
    with pytest.raises(ValueError, match="sha256"):
        shipped.world_clip_weights("world0")


def test_the_demo_finetunes_the_shipped_world_clip_of_each_default_world():
    config = DemoConfig()
    for seed in (0, 1, 2):
        key = pretrain_key(SimpleNamespace(config=WorldConfig(seed=seed)), config.model, config.pretrain)
        assert shipped.shipped_tag_for(key) == f"world{seed}"


def test_every_shipped_world_clip_records_its_plateau_curve():
    for tag in shipped.world_clip_tags():
        plateau = shipped.world_clip_entry(tag)["plateau"]
        points = plateau["id_acc_points"]  # zero-shot ID accuracy at each evaluation of the last fifth
        assert len(points) >= 2 and plateau["id_acc_range"] == pytest.approx(max(points) - min(points), abs=0.011)


def test_shipped_world_clip_scores_its_recorded_zero_shot_accuracy_on_the_regenerated_eval_set(tmp_path):
    entry = shipped.world_clip_entry("world0")
    world = WorldConfig(**entry["world"])
    assert world.key == entry["world_key"]
    manifest = draw_split(world, "eval_id", tmp_path)
    finetune_classes, _ = plan_splits(world)
    names = tmp_path / "finetune_classnames.txt"
    names.write_text("\n".join(SHAPE_NAMES[i] for i in finetune_classes) + "\n")
    module = AnchorFinetuneModule(backbone="world_clip", pretrained="world0")  # the tag brings its model config
    assert module.backbone.config.embed_dim == WORLD_MODEL["embed_dim"]
    # the data module needs a training stream: the eval images stand in (only validation runs)
    data = AnchorDataModule(finetune=str(manifest), classnames=str(names), templates=["a photo of a {c}."],
                            eval_sets=[EvalSet("id", str(manifest), str(names))], backbone="world_clip",
                            backbone_config=entry["model"], num_workers=0,
                            eval_templates=[STYLE_PROMPT.replace("{style}", s) for s in world.styles])
    acc = 100 * evaluate_zero_shot(module, data)["id"]["acc"]
    assert acc == pytest.approx(entry["zero_shot"]["id"], abs=0.5)


def test_shipped_captioner_runs_through_the_hugging_face_blip_path_and_describes_world_objects(tmp_path):
    world = WorldConfig(**shipped.world_clip_entry("world0")["world"])
    manifest = draw_split(world, "eval_id", tmp_path)
    rows = [line.split(",") for line in manifest.read_text().splitlines()[1:33]]
    captioner = BlipCaptioner(model=str(shipped.captioner_dir()), num_beams=1)
    captioner.setup()
    captions = captioner.caption([Image.open(tmp_path / r[1]) for r in rows])
    known = set(vocabulary())
    assert all(captions) and all(set(words(c)) <= known for c in captions), captions
    # it learned the corpus's alt-text: nearly every caption names some class of the world and the style
    objects = [any(n in words(c) or plural(n) in words(c) for n in SHAPE_NAMES) for c in captions]
    assert sum(objects) >= 0.9 * len(rows) and sum("photo" in words(c) for c in captions) >= 0.5 * len(rows)
    recorded = json.loads((shipped.captioner_dir() / "recipe.json").read_text())
    assert recorded["corpus_size"] == world.pretrain_size
