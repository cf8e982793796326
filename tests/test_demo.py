"""The embedded demo end to end on a tiny world: every method runs, the outputs are written, notebooks render."""

import copy
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch
from nbclient import NotebookClient

from anchor_clip.bench import loader_throughput
from anchor_clip.demo import run as demo_module
from anchor_clip.demo.data import finetune_config, finetune_data
from anchor_clip.demo.recipes import AnchorRecipe, DemoConfig, FinetuneRecipe, PretrainRecipe
from anchor_clip.demo.run import evaluate, fit_args, prepare, run_demo, wise_curves
from anchor_clip.fit import cli_main
from anchor_clip.module import AnchorFinetuneModule
from anchor_clip.world.config import WorldConfig
from tests.conftest import TINY_WORLD_CLIP

METHODS = {"zeroshot", "lp", "ft", "lp_ft", "flyp", "arf_caption", "arf_caption_knn", "arf_retrieval", "arf", "replay",
           "arf_retrieval@16", "replay@16", "oracle_caption", "wise_flyp_0.5"}
#: What the first table each notebook displays must hold: the demo's methods, or the retrieval report's fields.
NOTEBOOK_SHOWS = {
    "results": sorted(METHODS),
    "wise_curves": ["flyp", "arf", "alpha", "ood_avg"],
    "feature_drift": sorted(METHODS - {"zeroshot", "wise_flyp_0.5"}),
    "anchors": ["'size'"],
}
NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_world_blip):
    root = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANCHOR_CLIP_CACHE", str(root / "cache"))
        config = DemoConfig(
            world=WorldConfig(num_classes=6, finetune_classes=3, pretrain_size=240, pool_size=240,
                              finetune_per_class=8, eval_per_class=4),
            pretrain=PretrainRecipe(steps=4, batch_size=32, num_workers=0, warmup_steps=1),
            finetune=FinetuneRecipe(steps=2, batch_size=8, num_workers=0, warmup_steps=1),
            # random towers: all images alike, so no near-duplicate exclusion
            anchors=AnchorRecipe(retrieved_per_class=8, exclude_threshold=None, captioner=str(tiny_world_blip)),
            ablations=True,
            anchor_sizes=(16,),
            model=TINY_WORLD_CLIP,
            oracle=True,
            baselines=True,
        )
        table = run_demo(config, root / "out")
    return {"table": table, "out": root / "out", "cache": root / "cache", "config": config}


def test_demo_table_has_every_method_and_consistent_averages(demo):
    table = demo["table"]
    assert set(table.index) == METHODS
    for column in ("id", "shift_sketch", "shift_cartoon", "shift_painting", "shift_avg", "zeroshot", "ood_avg"):
        assert table[column].between(0, 100).all(), column
    row = table.loc["flyp"]
    assert abs(row["shift_avg"] - row[["shift_sketch", "shift_cartoon", "shift_painting"]].mean()) < 0.01
    assert abs(row["ood_avg"] - (row["shift_avg"] + row["zeroshot"]) / 2) < 0.01
    assert set(pd.read_csv(demo["out"] / "results.csv")["method"]) == METHODS
    assert (demo["out"] / "id_vs_ood.png").stat().st_size > 1000


def test_wise_curve_endpoints_are_the_pretrained_and_finetuned_models(demo):
    curves = pd.read_csv(demo["out"] / "wise.csv").set_index(["method", "alpha"])
    table = demo["table"]
    for method in ("flyp", "arf"):
        assert curves.loc[(method, 0.0), "id"] == pytest.approx(table.loc["zeroshot", "id"])
        assert curves.loc[(method, 1.0), "id"] == pytest.approx(table.loc[method, "id"])
    assert curves.loc[("flyp", 0.5), "ood_avg"] == pytest.approx(table.loc["wise_flyp_0.5", "ood_avg"])


def test_wise_curve_reuses_the_endpoint_results_that_measuring_them_would_give(demo, monkeypatch):
    monkeypatch.setenv("ANCHOR_CLIP_CACHE", str(demo["cache"]))
    config = demo["config"]
    world, weights, _ = prepare(config)
    model = finetune_config(config.model)
    data = finetune_data(world, config.finetune, weights, model)
    pretrained = AnchorFinetuneModule(backbone="world_clip", pretrained=str(weights), backbone_config=model)
    finetuned = copy.deepcopy(pretrained)
    with torch.no_grad():
        for param in finetuned.backbone.parameters():
            param.add_(0.5 * torch.randn_like(param))
    results = {"zeroshot": evaluate(pretrained, data), "ft": evaluate(finetuned, data)}
    measured = wise_curves(pretrained, {"ft": finetuned}, data, (0.0, 0.5, 1.0)).set_index("alpha")
    assert measured.loc[0.0].drop("method").to_dict() == results["zeroshot"]
    assert measured.loc[1.0].drop("method").to_dict() == results["ft"]

    calls = []
    monkeypatch.setattr(demo_module, "evaluate", lambda module, data: calls.append(module) or evaluate(module, data))
    reused = wise_curves(pretrained, {"ft": finetuned}, data, (0.0, 0.5, 1.0), results).set_index("alpha")
    assert len(calls) == 1  # only the interpolated point is evaluated
    pd.testing.assert_frame_equal(reused, measured)


def test_replay_control_has_as_many_pairs_as_the_retrieved_anchors(demo):
    anchors = {p.parent.name: len(pd.read_csv(p)) for p in (demo["cache"] / "anchors").rglob("*_anchors.csv")}
    assert anchors["replay"] == anchors["retrieved"] > 0


def test_fit_without_arguments_runs_arf_on_the_world(demo, tmp_path, monkeypatch):
    monkeypatch.setenv("ANCHOR_CLIP_CACHE", str(demo["cache"]))
    args = fit_args(demo["config"])  # the world, its CLIP and the anchors come from the cache
    cli = cli_main([*args, "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1",
                    "--trainer.default_root_dir", str(tmp_path)])
    frame = pd.read_csv(next(tmp_path.rglob("metrics.csv")))
    assert {"train/loss_caption", "train/loss_retrieved", "val/zeroshot/acc"} <= set(frame.columns)
    assert cli.trainer.global_step == 2


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_renders_the_demo_outputs(demo, notebook, monkeypatch):
    monkeypatch.setenv("ANCHOR_CLIP_DEMO", str(demo["out"]))
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(notebook.parent)}}
                   ).execute()
    tables = [output["data"]["text/plain"] for cell in nb.cells if cell.cell_type == "code"
              for output in cell.outputs if output.output_type == "execute_result"]
    assert tables, f"{notebook.name} displayed nothing"
    for expected in NOTEBOOK_SHOWS[notebook.stem]:
        assert expected in tables[0], f"{notebook.name}: {expected!r} not in its first table:\n{tables[0]}"


def test_loader_throughput_times_the_worlds_arf_loader_and_step(demo, monkeypatch):
    monkeypatch.setenv("ANCHOR_CLIP_CACHE", str(demo["cache"]))
    out = loader_throughput(workers=0, batches=2, repeats=1, config=demo["config"])
    assert out["samples_per_step"] == 8 + 8  # a finetune batch and a retrieved batch of the recipe's size
    assert out["loader_samples_per_s"] > 0 and out["step_samples_per_s"] > 0
    assert out["loader/step"] == pytest.approx(out["loader_samples_per_s"] / out["step_samples_per_s"])


def test_demo_flags_set_the_anchor_weights_of_every_anchored_run(monkeypatch, tmp_path):
    seen = {}

    def run_demo(config: DemoConfig, out: str) -> pd.DataFrame:
        seen["config"] = config
        return pd.DataFrame({"id": [90.0]}, index=pd.Index(["flyp"], name="method"))

    monkeypatch.setattr(demo_module, "run_demo", run_demo)
    demo_module.main(["--out", str(tmp_path), "--caption-weight", "0.25", "--retrieved-weight", "0.5",
                      "--retrieved-batch-size", "48"])
    recipe = seen["config"].finetune
    assert (recipe.caption_weight, recipe.retrieved_weight, recipe.retrieved_batch_size) == (0.25, 0.5, 48)
    assert recipe.steps == FinetuneRecipe.steps  # the other knobs keep their defaults
