"""End-to-end claims about `python -m anchor_clip.fit` on a tiny random backbone and generated data."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from anchor_clip.eval.zeroshot import evaluate_zero_shot
from anchor_clip.fit import cli_main
from tests.conftest import CLASSES

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "experiments" / "tiny.yaml")


def data_args(tiny_data, captions=True, retrieved=True) -> list[str]:
    eval_sets = [
        {"name": "id", "manifest": tiny_data["eval_id"], "classnames": tiny_data["classnames"]},
        {"name": "zs", "manifest": tiny_data["eval_zs"], "classnames": CLASSES[2:]},
    ]
    args = ["--data.finetune", tiny_data["finetune"], "--data.classnames", tiny_data["classnames"],
            "--data.eval_sets", json.dumps(eval_sets)]
    if captions:
        args += ["--data.captions", tiny_data["captions"]]
    if retrieved:
        args += ["--data.retrieved", tiny_data["retrieved"]]
    return args


def fit(tmp_path, tiny_data, *extra, captions=True, retrieved=True):
    args = ["fit", "--config", TINY, "--trainer.default_root_dir", str(tmp_path), *data_args(tiny_data, captions,
                                                                                                 retrieved), *extra]
    return cli_main(args)


def metrics(tmp_path) -> pd.DataFrame:
    return pd.read_csv(next(Path(tmp_path).rglob("metrics.csv")))


def test_fit_smoke_all_three_streams_write_checkpoint_and_per_set_accuracy(tmp_path, tiny_data):
    cli = fit(tmp_path, tiny_data)
    frame = metrics(tmp_path)
    for column in ("train/loss", "train/loss_finetune", "train/loss_caption", "train/loss_retrieved",
                   "val/id/acc", "val/zs/acc"):
        assert column in frame.columns and frame[column].notna().any(), column
    train = frame.dropna(subset=["train/loss"])
    assert len(train) == 4  # max_steps in tiny.yaml
    acc = frame["val/id/acc"].dropna().iloc[-1]
    # the logged accuracy is the final model's, over the 16 ID images (validation ran at the last step)
    again = evaluate_zero_shot(cli.model, cli.datamodule)["id"]
    assert again["n"] == 16 and acc == pytest.approx(again["correct"] / 16)
    checkpoint = torch.load(next(Path(tmp_path).rglob("last.ckpt")), weights_only=False)
    assert checkpoint["global_step"] == 4
    assert checkpoint["hyper_parameters"]["caption_weight"] == 0.5
    assert (next(Path(tmp_path).rglob("config.yaml"))).is_file()


def test_zero_anchor_weights_reproduce_a_flyp_run(tmp_path, tiny_data):
    flyp = fit(tmp_path / "flyp", tiny_data, "--model.caption_weight", "0", "--model.retrieved_weight", "0",
               captions=False, retrieved=False)
    arf0 = fit(tmp_path / "arf0", tiny_data, "--model.caption_weight", "0", "--model.retrieved_weight", "0",
               retrieved=False)
    assert "train/loss_caption" not in metrics(tmp_path / "arf0").columns
    a, b = flyp.model.state_dict(), arf0.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the same CLI and seed without running: the weights both runs started from
    start = cli_main(["--config", TINY, *data_args(tiny_data, captions=False, retrieved=False)], run=False)
    start = start.model.state_dict()
    moved = [k for k in a if not torch.equal(a[k], start[k])]
    assert "backbone.model.logit_scale" in moved and len(moved) > len(a) // 2  # both towers trained


def test_bf16_mixed_precision_step_runs_on_cpu(tmp_path, tiny_data):
    cli = fit(tmp_path, tiny_data, "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "1",
              "--trainer.val_check_interval", "1")
    assert cli.trainer.global_step == 1
    assert torch.isfinite(torch.tensor(metrics(tmp_path)["train/loss"].dropna().to_numpy())).all()


def test_config_typo_fails_with_a_message_naming_the_key(tiny_data):
    run = subprocess.run([sys.executable, "-m", "anchor_clip.fit", "fit", "--config", TINY,
                          "--model.caption_weigth", "1"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode != 0
    assert "caption_weigth" in run.stderr


@pytest.mark.parametrize("argv", [["--help"], ["fit", "--help"]])
def test_help_lists_the_arf_knobs(argv):
    run = subprocess.run([sys.executable, "-m", "anchor_clip.fit", *argv], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0
    assert ("retrieved_weight" in run.stdout) == (argv[0] == "fit")
