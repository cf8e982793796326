"""The seed sweep's aggregation and target checks, on tables made up here (the sweep itself takes an hour)."""

import json
import math

import pandas as pd
import pytest

from anchor_clip.demo import targets as targets_module
from anchor_clip.demo.targets import mean_std, paired_differences, recovery, run_seeds, size_curve, targets
from experiments.world_seeds import main


def _runs() -> pd.DataFrame:
    rows = []
    for seed, noise in ((0, -1.0), (1, 1.0)):
        for method, (id_, shift, zs) in {
            "zeroshot": (70, 70, 70), "flyp": (80, 60, 50), "arf": (80, 66, 62), "arf_caption": (80, 61, 60),
            "arf_retrieval": (81, 68, 58), "replay": (79, 70, 70), "wise_flyp_0.5": (75, 68, 64),
        }.items():
            rows.append({"method": method, "seed": seed, "id": id_ + noise, "shift_avg": shift, "zeroshot": zs,
                         "ood_avg": (shift + zs) / 2})
    return pd.DataFrame(rows)


def test_mean_std_over_seeds():
    summary = mean_std(_runs())
    assert summary.loc["flyp", "id"] == "80.0 ± 1.4"  # values 79 and 81: sample std sqrt(2)
    assert summary.loc["arf", "shift_avg"] == "66.0 ± 0.0"


def test_recovery_is_the_share_of_flyps_loss_won_back():
    runs = _runs()
    assert recovery(runs, "arf", "shift_avg") == pytest.approx(0.6)  # FLYP lost 10, ARF won back 6
    assert recovery(runs, "arf", "zeroshot") == pytest.approx(0.6)  # lost 20, won back 12
    no_loss = runs.assign(shift_avg=70.0)
    assert math.isnan(recovery(no_loss, "arf", "shift_avg"))  # undefined when FLYP lost nothing


def test_targets_report_domination_by_a_control():
    checks = targets(_runs()).set_index("target")
    assert checks.loc["FLYP loss on shift average", "holds"] == "yes"
    assert checks.loc["arf recovery of FLYP's shift loss", "holds"] == "yes"
    assert checks.loc["arf_caption recovery of FLYP's shift loss", "holds"] == ""  # reported, no target
    # replay: ID 79 < ARF 80, so it does not dominate even though its OOD average is higher
    assert checks.loc["ARF dominated by replay (ID and OOD avg both >=)", "holds"] == "yes"
    better = _runs()
    better.loc[better["method"] == "replay", "id"] += 5
    assert targets(better).set_index("target").loc["ARF dominated by replay (ID and OOD avg both >=)", "holds"] == "no"


def test_finished_seeds_are_read_not_rerun(tmp_path):
    for seed, frame in _runs().groupby("seed"):
        (tmp_path / f"seed_{seed}").mkdir()
        frame.drop(columns="seed").to_csv(tmp_path / f"seed_{seed}" / "results.csv", index=False)
    runs = run_seeds([0, 1], tmp_path)  # would take an hour if it ran the demo
    assert sorted(runs["seed"].unique()) == [0, 1]
    assert len(runs) == 14


def test_the_sweeps_flags_reach_every_seeds_demo(tmp_path, monkeypatch):
    configs = []

    def fake_demo(config, out):  # records the config and writes what a finished demo leaves
        configs.append(config)
        out.mkdir(parents=True)
        _runs().query("seed == 0").drop(columns="seed").to_csv(out / "results.csv", index=False)
        (out / "demo.json").write_text(json.dumps({"anchor_pairs": {"retrieved": 100, "replay": 100}}))

    monkeypatch.setattr(targets_module, "run_demo", fake_demo)
    main(["--seeds", "3", "4", "--out", str(tmp_path), "--pretrain-steps", "4800", "--caption-weight", "0.5",
          "--anchor-sizes", "10", "20"])
    assert [(c.world.seed, c.seed) for c in configs] == [(3, 3), (4, 4)]
    assert {(c.ablations, c.anchor_sizes) for c in configs} == {(True, (10, 20))}
    assert {c.pretrain.steps for c in configs} == {4800}
    assert {c.finetune.caption_weight for c in configs} == {0.5}
    assert (tmp_path / "summary.md").read_text().startswith("seeds [3, 4]")


def test_methods_missing_on_some_seed_are_left_out_of_the_means():
    runs = pd.concat([_runs(), pd.DataFrame([{"method": "lp", "seed": 0, "id": 75.0, "shift_avg": 60.0,
                                              "zeroshot": 70.0, "ood_avg": 65.0}])])
    assert "lp" not in mean_std(runs).index


def test_paired_differences_are_per_seed_differences_with_their_spread():
    table = paired_differences(_runs(), [("arf", "replay"), ("arf", "missing")]).set_index("difference")
    assert list(table.index) == ["arf − replay"]  # a pair with a method not run is left out
    # ID: arf 80 vs replay 79 on both seeds (same noise), OOD: (66 + 62) / 2 - (70 + 70) / 2 = -6
    assert table.loc["arf − replay", "id"] == "+1.00 ± 0.00"
    assert table.loc["arf − replay", "ood_avg"] == "-6.00 ± 0.00"


def test_size_curve_pairs_each_size_of_retrieved_anchors_with_replay_of_that_size():
    runs = _runs()
    small = runs[runs["method"].isin(["arf_retrieval", "replay"])].copy()
    small["method"] = small["method"] + "@10"
    small["ood_avg"] -= 5
    pairs = pd.DataFrame([{"seed": s, "anchors": a, "pairs": n} for s in (0, 1)
                          for a, n in (("retrieved", 300), ("replay", 300), ("retrieved@10", 100), ("replay@10", 100))])
    curve = size_curve(pd.concat([runs, small]), pairs, full_k=30)
    assert list(zip(curve["anchors"], curve["k per class"], curve["pairs (mean)"], strict=True)) == [
        ("arf_retrieval", 10, 100), ("replay", 10, 100), ("arf_retrieval", 30, 300), ("replay", 30, 300)]
    assert curve["OOD avg"].tolist() == ["58.0 ± 0.0", "65.0 ± 0.0", "63.0 ± 0.0", "70.0 ± 0.0"]
