"""Claims about the evaluation-set registry, the ImageNet class masks, the results tables and the evaluate CLI.

Every layout is written into tmp_path with a few tiny images; the ImageNet label space is shrunk to six
classes so the ImageNet-family readers can be checked without 1000 folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from anchor_clip.eval import build_eval_dataset, dataset_info, list_datasets, projections
from anchor_clip.eval.datasets import EvalDataset
from anchor_clip.eval.projections import ClassSubset, PooledClasses
from anchor_clip.eval.readers.transfer import TRANSFER_SETS
from anchor_clip.eval.tables import append_jsonl, load_results, results_table, write_results_table
from anchor_clip.evaluate import evaluate_module, main
from anchor_clip.fit import cli_main
from anchor_clip.module import AnchorFinetuneModule
from tests.conftest import TINY_OPEN_CLIP

REPO = Path(__file__).resolve().parents[1]
FAKE_WNIDS = [f"n0000000{i}" for i in range(6)]
FAKE_NAMES = ["tabby cat", "beagle", "analog clock", "digital clock", "banana", "teapot"]
TO_TENSOR = transforms.Compose([transforms.Resize((8, 8)), transforms.ToTensor()])


@pytest.fixture
def imagenet_space(monkeypatch):
    """A six-class stand-in for the 1000-class ImageNet label space."""
    monkeypatch.setattr(projections, "imagenet_wnids", lambda: list(FAKE_WNIDS))
    monkeypatch.setattr(projections, "imagenet_classnames", lambda: list(FAKE_NAMES))


def image(path: Path, label: int, size: tuple[int, int] = (12, 10)) -> Path:
    """A small flat-colour image whose red channel encodes the label."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), (40 * label, 80, 120), dtype=np.uint8)).save(path)
    return path


def wnid_folders(base: Path, wnids: list[str], per_class: int = 2, ext: str = ".JPEG") -> None:
    for wnid in wnids:
        for k in range(per_class):
            image(base / wnid / f"{wnid}_{k}{ext}", FAKE_WNIDS.index(wnid) if wnid in FAKE_WNIDS else 0)


def folder_of(path: str) -> str:
    return Path(path).parent.name


# -- readers ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "sub"), [("imagenet", "val"), ("imagenet_sketch", "sketch")])
def test_full_imagenet_readers_label_wnid_folders_in_sorted_order(tmp_path, imagenet_space, name, sub):
    wnid_folders(tmp_path / sub, FAKE_WNIDS)
    (tmp_path / sub / FAKE_WNIDS[0] / "README.txt").write_text("not an image")
    dataset = build_eval_dataset(name, tmp_path, TO_TENSOR)
    assert len(dataset) == 2 * len(FAKE_WNIDS)
    assert [FAKE_WNIDS[label] for label in dataset.labels] == [folder_of(p) for p in dataset.paths]
    assert dataset.classnames == FAKE_NAMES and dataset.project is None
    assert len(dataset.templates) == 80 and all("{c}" in t for t in dataset.templates)
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch["images"].shape == (4, 3, 8, 8) and batch["labels"].tolist() == dataset.labels[:4].tolist()


def test_imagenet_with_a_class_folder_missing_names_the_missing_wnid(tmp_path, imagenet_space):
    wnid_folders(tmp_path / "val", FAKE_WNIDS[:-1])
    with pytest.raises(ValueError, match=f"missing \\['{FAKE_WNIDS[-1]}'\\]"):
        build_eval_dataset("imagenet", tmp_path, TO_TENSOR)


def test_imagenet_v2_labels_are_the_integer_folder_names(tmp_path, imagenet_space):
    for index in (0, 3, 5):
        for k in range(2):
            image(tmp_path / str(index) / f"{k}.jpeg", index)
    dataset = build_eval_dataset("imagenet_v2", tmp_path, TO_TENSOR)
    assert dataset.labels.tolist() == [0, 0, 3, 3, 5, 5]
    assert [int(folder_of(p)) for p in dataset.paths] == dataset.labels.tolist()
    assert dataset.classnames == FAKE_NAMES


@pytest.mark.parametrize("name", ["imagenet_a", "imagenet_r"])
def test_imagenet_a_r_classes_are_the_wnid_folders_present(tmp_path, imagenet_space, name):
    present = [FAKE_WNIDS[4], FAKE_WNIDS[1]]
    wnid_folders(tmp_path, present, ext=".jpg")
    dataset = build_eval_dataset(name, tmp_path, TO_TENSOR)
    assert dataset.classnames == [FAKE_NAMES[1], FAKE_NAMES[4]]  # sorted wnids = the set's label order
    assert dataset.labels.tolist() == [0, 0, 1, 1]
    assert dataset.head_classnames == FAKE_NAMES and dataset.spec.classnames == FAKE_NAMES
    assert dataset.project.indices.tolist() == [1, 4]


def test_imagenet_r_rejects_a_folder_that_is_not_an_imagenet_wnid(tmp_path, imagenet_space):
    wnid_folders(tmp_path, [FAKE_WNIDS[0], "n99999999"], ext=".jpg")
    with pytest.raises(ValueError, match="n99999999"):
        build_eval_dataset("imagenet_r", tmp_path, TO_TENSOR)


def write_objectnet(root: Path) -> None:
    """ObjectNet release layout: two overlapping classes, one ObjectNet-only class, ILSVRC ids permuted."""
    for folder, count in (("alarm_clock", 2), ("banana", 1), ("chair", 1)):
        for k in range(count):
            image(root / "images" / folder / f"{k}.png", k, size=(20, 16))
    mappings = root / "mappings"
    mappings.mkdir(parents=True)
    order_2012 = [3, 0, 5, 1, 4, 2]  # ILSVRC-2012 id j is head (sorted-wnid) class order_2012[j]
    (mappings / "imagenet_to_label_2012_v2").write_text("\n".join(FAKE_NAMES[i] for i in order_2012) + "\n")
    pytorch_to_2012 = {str(i): j for j, i in enumerate(order_2012)}
    (mappings / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps(pytorch_to_2012))
    (mappings / "folder_to_objectnet_label.json").write_text(
        json.dumps({"alarm_clock": "Alarm clock", "banana": "Banana", "chair": "Chair"}))
    (mappings / "objectnet_to_imagenet_1k.json").write_text(
        json.dumps({"Banana": "banana", "Alarm clock": "analog clock; digital clock"}))


def test_objectnet_keeps_overlapping_classes_and_crops_the_border(tmp_path, imagenet_space):
    write_objectnet(tmp_path)
    dataset = build_eval_dataset("objectnet", tmp_path, TO_TENSOR)
    assert dataset.classnames == ["Alarm clock", "Banana"]  # 'chair' has no ImageNet class: left out
    assert dataset.labels.tolist() == [0, 0, 1]
    assert [folder_of(p) for p in dataset.paths] == ["alarm_clock", "alarm_clock", "banana"]
    assert dataset.project.index[:, 0].tolist() == [2, 4] and set(dataset.project.index[0].tolist()) == {2, 3}
    assert dataset.loader(dataset.paths[0]).size == (16, 12)  # 20x16 minus 2 px per side


def test_domainnet_reads_the_official_split_file(tmp_path):
    lines = ["clipart/aircraft_carrier/a.jpg 0", "clipart/zebra/b.jpg 1", "clipart/aircraft_carrier/c.jpg 0"]
    for line in lines:
        image(tmp_path / line.split()[0], int(line.split()[1]))
    (tmp_path / "clipart_test.txt").write_text("\n".join(lines) + "\n")
    dataset = build_eval_dataset("domainnet_clipart", tmp_path, TO_TENSOR)
    assert dataset.classnames == ["aircraft carrier", "zebra"]
    assert dataset.labels.tolist() == [0, 1, 0]
    assert dataset.paths[1] == str(tmp_path / "clipart/zebra/b.jpg")
    assert dataset_info("domainnet_real").role == "id" and dataset_info("domainnet_sketch").role == "shift"


@pytest.mark.parametrize("name", sorted(TRANSFER_SETS))
def test_transfer_sets_read_the_coop_split_file(tmp_path, name):
    spec = TRANSFER_SETS[name]
    split = {"train": [["c/t.jpg", 2, "class_c"]], "val": [],
             "test": [["a/1.jpg", 0, "class_a"], ["b/2.jpg", 1, "class_b"], ["a/3.jpg", 0, "class_a"]]}
    (tmp_path / spec.split_file).write_text(json.dumps(split))
    for relpath, label, _ in split["test"]:
        image(tmp_path / spec.image_dir / relpath, label)
    dataset = build_eval_dataset(name, tmp_path, TO_TENSOR)
    assert dataset.classnames == ["class a", "class b", "class c"]  # all splits name classes; '_' -> ' '
    assert dataset.labels.tolist() == [0, 1, 0]
    assert dataset.paths[1] == str(tmp_path / spec.image_dir / "b/2.jpg")
    assert dataset.templates == [spec.template] and dataset_info(name).role == "transfer"
    assert next(iter(DataLoader(dataset, batch_size=3)))["images"].shape == (3, 3, 8, 8)


def test_fgvc_aircraft_labels_follow_variants_txt(tmp_path):
    (tmp_path / "variants.txt").write_text("707-320\nA300B4\nDC-3\n")
    (tmp_path / "images_variant_test.txt").write_text("0001 DC-3\n0002 707-320\n")
    for image_id in ("0001", "0002"):
        image(tmp_path / "images" / f"{image_id}.jpg", 0)
    dataset = build_eval_dataset("fgvc_aircraft", tmp_path, TO_TENSOR)
    assert dataset.classnames == ["707-320", "A300B4", "DC-3"] and dataset.labels.tolist() == [2, 0]


@pytest.mark.parametrize("name", list_datasets())
def test_missing_root_or_layout_error_shows_the_expected_layout(tmp_path, imagenet_space, name):
    with pytest.raises(ValueError, match=f"(?s){name}: root .* is not a directory.*Expected layout:\n  <root>/"):
        build_eval_dataset(name, tmp_path / "absent", TO_TENSOR)
    with pytest.raises(ValueError, match="(?s)(does not exist|no class folders).*Expected layout"):
        build_eval_dataset(name, tmp_path, TO_TENSOR)  # exists, but empty


def test_unknown_dataset_name_lists_the_registry():
    with pytest.raises(ValueError, match=r"unknown evaluation dataset 'imagenet-r'.*Did you mean \['imagenet_r'"):
        build_eval_dataset("imagenet-r", "/nowhere", TO_TENSOR)


# -- class masks -------------------------------------------------------------------------------------------------
def test_imagenet_r_logits_keep_exactly_the_sets_classes(tmp_path, imagenet_space):
    wnid_folders(tmp_path, [FAKE_WNIDS[1], FAKE_WNIDS[4]], ext=".jpg")
    project = build_eval_dataset("imagenet_r", tmp_path, TO_TENSOR).project
    logits = torch.tensor([[9.0, 1.0, 0.0, 0.0, 2.0, 8.0],    # best overall is class 0, outside the set
                           [0.0, 3.0, 7.0, 0.0, -1.0, 0.0]])  # best overall is class 2, outside the set
    projected = project(logits)
    assert torch.equal(projected, logits[:, [1, 4]])
    predictions = projected.argmax(dim=-1)
    assert predictions.tolist() == [1, 0]
    assert project.to_head_classes(predictions).tolist() == [4, 1]


def test_objectnet_pools_each_class_by_the_max_of_its_imagenet_logits(tmp_path, imagenet_space):
    write_objectnet(tmp_path)
    project = build_eval_dataset("objectnet", tmp_path, TO_TENSOR).project
    logits = torch.tensor([[9.0, 0.0, 1.0, 5.0, 2.0, 0.0],
                           [0.0, 0.0, 1.0, 2.0, 3.0, 9.0]])
    assert torch.equal(project(logits), torch.tensor([[5.0, 2.0], [2.0, 3.0]]))
    assert project(logits).argmax(dim=-1).tolist() == [0, 1]


def test_projections_reject_a_head_of_the_wrong_width():
    with pytest.raises(ValueError, match=r"expects \(B, 6\)"):
        ClassSubset([1, 4], 6)(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"expects \(B, 6\)"):
        PooledClasses([[0, 1], [4]], 6)(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="outside a head"):
        ClassSubset([7], 6)


def test_subset_of_the_full_head_equals_a_head_built_from_the_subset_names():
    torch.manual_seed(0)
    module = AnchorFinetuneModule(backbone="open_clip", backbone_config=TINY_OPEN_CLIP).eval()
    full = EvalDataset("full", ["x"], [0], FAKE_NAMES, ["a photo of a {c}."], None)
    sub = EvalDataset("sub", ["x"], [0], [FAKE_NAMES[1], FAKE_NAMES[4]], ["a photo of a {c}."], None)
    module.eval_specs = [full.spec, sub.spec]
    module.build_heads()
    features = module.backbone.encode_image(torch.rand(3, 3, 32, 32))
    masked = ClassSubset([1, 4], 6)(features @ module.heads["full"])
    assert torch.allclose(masked, features @ module.heads["sub"], atol=1e-6)


# -- tables ------------------------------------------------------------------------------------------------------
ROWS = [
    {"method": "zero-shot", "dataset": "in", "acc": 0.68}, {"method": "zero-shot", "dataset": "a", "acc": 0.50},
    {"method": "zero-shot", "dataset": "r", "acc": 0.77}, {"method": "zero-shot", "dataset": "pets", "acc": 0.89},
    {"method": "FLYP", "dataset": "in", "acc": 0.82}, {"method": "FLYP", "dataset": "a", "acc": 0.48},
    {"method": "FLYP", "dataset": "r", "acc": 0.71},
]


def test_ood_average_is_the_mean_of_the_shifts_and_missing_sets_leave_it_empty():
    table = results_table(ROWS, id_set="in", shift_sets=["a", "r"], transfer_sets=["pets"])
    assert list(table.columns) == ["in", "a", "r", "OOD avg", "pets", "ZS avg"]
    assert list(table.index) == ["zero-shot", "FLYP"]
    assert table.loc["zero-shot", "OOD avg"] == pytest.approx(63.5)
    assert table.loc["FLYP", "OOD avg"] == pytest.approx(59.5)
    assert table.loc["FLYP", "in"] == pytest.approx(82.0)
    assert np.isnan(table.loc["FLYP", "ZS avg"])  # FLYP has no transfer result: no average over fewer sets


def test_tables_are_written_as_markdown_and_csv_without_temp_files(tmp_path):
    table = results_table(ROWS, id_set="in", shift_sets=["a", "r"], transfer_sets=["pets"])
    markdown, csv = write_results_table(table, tmp_path / "table")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in markdown.read_text().splitlines()]
    assert cells[0] == ["method", "in", "a", "r", "OOD avg", "pets", "ZS avg"]
    assert cells[2] == ["zero-shot", "68.0", "50.0", "77.0", "63.5", "89.0", "89.0"]
    assert cells[3] == ["FLYP", "82.0", "48.0", "71.0", "59.5", "-", "-"]
    back = pd.read_csv(csv).set_index("method")
    pd.testing.assert_frame_equal(back, table, check_names=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv", "table.md"]


def test_tables_reject_two_accuracies_for_one_method_and_set():
    with pytest.raises(ValueError, match="several accuracies"):
        results_table([*ROWS, {"method": "FLYP", "dataset": "a", "acc": 0.4}], id_set="in")
    with pytest.raises(ValueError, match=r"no results for sets \['sketch'\]"):
        results_table(ROWS, id_set="in", shift_sets=["sketch"])


def test_jsonl_log_round_trips_and_keeps_the_latest_evaluation(tmp_path):
    log = tmp_path / "results.jsonl"
    append_jsonl(log, {"method": "FLYP", "alpha": None, "hparams": {"lr": 1e-5},
                       "results": {"in": {"acc": 0.5, "n": 10}, "a": {"acc": 0.25, "n": 4}}})
    append_jsonl(log, {"method": "FLYP", "alpha": None, "results": {"in": {"acc": 0.6, "n": 10}}})
    assert len(log.read_text().splitlines()) == 2
    frame = load_results(log)
    assert frame.set_index("dataset")["acc"].to_dict() == {"in": 0.6, "a": 0.25}
    assert len(load_results(log, keep=None)) == 3


# -- the evaluate CLI -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_data) -> dict[str, str]:
    """A 'pretrained' tiny open_clip file and a checkpoint finetuned from it by `anchor_clip.fit`."""
    root = tmp_path_factory.mktemp("finetuned")
    torch.manual_seed(0)
    pretrained = root / "pretrained.pt"
    zeroshot = AnchorFinetuneModule(backbone="open_clip", backbone_config=TINY_OPEN_CLIP)
    torch.save(zeroshot.backbone.model.state_dict(), pretrained)
    cli_main(["fit", "--config", str(REPO / "experiments" / "tiny.yaml"), "--trainer.default_root_dir", str(root),
              "--trainer.max_steps", "8", "--model.lr", "1e-3", "--data.finetune", tiny_data["finetune"],
              "--data.classnames", tiny_data["classnames"], "--model.pretrained", str(pretrained),
              "--model.caption_weight", "0", "--model.retrieved_weight", "0"])
    return {"pretrained": str(pretrained), "checkpoint": str(next(root.rglob("last.ckpt")))}


def test_evaluate_cli_tables_zero_shot_finetuned_and_wise_ft_endpoints(tmp_path, imagenet_space, tiny_data,
                                                                        finetuned):
    wnid_folders(tmp_path / "imagenet" / "val", FAKE_WNIDS, ext=".png")
    wnid_folders(tmp_path / "imagenet-r", FAKE_WNIDS[2:5], ext=".png")
    manifest = {"name": "shapes", "manifest": tiny_data["eval_id"], "classnames": tiny_data["classnames"]}
    out = tmp_path / "eval"
    table = main([
        "--checkpoints", json.dumps([finetuned["checkpoint"]]), "--names", "[FT]",
        "--backbone", "open_clip", "--backbone_config", json.dumps(TINY_OPEN_CLIP),
        "--pretrained", finetuned["pretrained"],
        "--datasets", json.dumps({"imagenet": str(tmp_path / "imagenet"), "imagenet_r": str(tmp_path / "imagenet-r")}),
        "--eval_sets", json.dumps([manifest]), "--wise_alphas", "[0, 0.5, 1]",
        "--output_dir", str(out), "--batch_size", "5", "--num_workers", "0", "--device", "cpu",
    ])
    assert list(table.index) == ["zero-shot", "FT", "FT WiSE-FT α=0", "FT WiSE-FT α=0.5", "FT WiSE-FT α=1"]
    assert list(table.columns) == ["imagenet", "imagenet_r", "shapes", "OOD avg"]
    # finetuning on the shapes changed what the model predicts, so equal rows below are not a coincidence
    assert table.loc["FT", "shapes"] != table.loc["zero-shot", "shapes"]
    assert table.loc["FT WiSE-FT α=0"].equals(table.loc["zero-shot"])
    assert table.loc["FT WiSE-FT α=1"].equals(table.loc["FT"])
    assert table["OOD avg"].equals((table["imagenet_r"] + table["shapes"]) / 2)
    header = (out / "table.md").read_text().splitlines()[0]
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns == ["method", "imagenet", "imagenet_r", "shapes", "OOD avg"]
    frame = load_results(out / "results.jsonl")
    assert len(frame) == 5 * 3 and set(frame.loc[frame["dataset"] == "imagenet_r", "n"]) == {6}
    assert frame.loc[frame["method"] == "FT WiSE-FT α=0.5", "alpha"].eq(0.5).all()


def test_evaluate_module_scores_a_projected_set_like_its_own_subset_head(tmp_path, imagenet_space):
    """ImageNet-R through the 1000-way head + mask gives the accuracy of a head built on its classes only."""
    wnid_folders(tmp_path / "r", FAKE_WNIDS[1:4], per_class=3, ext=".png")
    torch.manual_seed(1)
    module = AnchorFinetuneModule(backbone="open_clip", backbone_config=TINY_OPEN_CLIP)
    masked = build_eval_dataset("imagenet_r", tmp_path / "r", templates=["a photo of a {c}."])
    own = EvalDataset("own", masked.paths, masked.labels.tolist(), masked.classnames, masked.templates, None)
    results = evaluate_module(module, [masked, own], batch_size=4, num_workers=0)
    assert results["imagenet_r"] == results["own"] and results["own"]["n"] == 9


def test_evaluate_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--wise_alphas" in out and "--datasets" in out and "--eval_sets" in out


def test_evaluate_without_models_or_sets_says_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="nothing to evaluate"):
        main(["--datasets", "{}"])
    with pytest.raises(ValueError, match="no evaluation sets"):
        main(["--backbone", "open_clip", "--backbone_config", json.dumps(TINY_OPEN_CLIP)])
