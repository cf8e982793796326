"""Claims about how a run survives faults: bad files, bad tables, kills, divergence, DDP and bad settings.

Each test injects the fault it is about (a corrupt or missing image, a killed process, a NaN) into a tiny
run on generated data, on CPU.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from anchor_clip.checkpoint_io import AtomicCheckpointIO
from anchor_clip.data import AnchorDataModule, EvalSet
from anchor_clip.data.sampling import StreamSampler
from anchor_clip.data.tables import write_table
from anchor_clip.data.unreadable import SKIPPED, GuardedItems, UnreadableImageWarning
from anchor_clip.fit import cli_main
from anchor_clip.module import AnchorFinetuneModule
from tests.conftest import CLASSES, TINY_OPEN_CLIP

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "experiments" / "tiny.yaml")


# -- helpers ---------------------------------------------------------------------------------------------------
def copy_data(tiny_data, tmp_path) -> dict[str, str]:
    """A private copy of the tiny dataset, to damage."""
    root = tmp_path / "data"
    shutil.copytree(tiny_data["root"], root)
    return {k: v.replace(tiny_data["root"], str(root)) for k, v in tiny_data.items()}


def corrupt(path: str | Path, truncate: bool = False) -> None:
    """Damage an image: cut it in half (a half-copied file) or replace it by bytes of another kind."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if truncate else b"<html>not an image</html>")


def image_path(data: dict[str, str], table: str, row: int) -> str:
    frame = pd.read_parquet(data[table]) if table == "retrieved" else pd.read_csv(data[table])
    return str(Path(data["root"]) / frame["filepath"][row])


def make_datamodule(data: dict[str, str], **overrides) -> AnchorDataModule:
    kwargs = dict(finetune=data["finetune"], classnames=data["classnames"], captions=data["captions"],
                  retrieved=data["retrieved"], eval_sets=[EvalSet("id", data["eval_id"], data["classnames"])],
                  batch_size=8, retrieved_batch_size=8, eval_batch_size=16, num_workers=0,
                  backbone="open_clip", backbone_config=TINY_OPEN_CLIP)
    kwargs.update(overrides)
    return AnchorDataModule(**kwargs)


def make_module(**overrides) -> AnchorFinetuneModule:
    kwargs = dict(backbone="open_clip", backbone_config=TINY_OPEN_CLIP, caption_weight=0.5, retrieved_weight=0.5,
                  lr=1e-4, warmup_steps=1)
    kwargs.update(overrides)
    return AnchorFinetuneModule(**kwargs)


def trainer(tmp_path, max_steps: int, callbacks=(), validate: bool = False, **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path, name="logs"),
                     log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=1.0 if validate else 0,
                     enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                     callbacks=list(callbacks), **kwargs)


def metrics(root) -> pd.DataFrame:
    """metrics.csv of the latest run under `root` (a resumed run logs into a new version folder)."""
    return pd.read_csv(max(Path(root).rglob("metrics.csv"), key=lambda p: int(p.parent.name.removeprefix("version_"))))


def last(frame: pd.DataFrame, column: str) -> float:
    return frame[column].dropna().iloc[-1]


def epoch_keys(stream: str, size: int, batch_size: int, num_batches: int, world: int = 1,
               rank: int = 0) -> list[list[int]]:
    """The rows each step of epoch 0 reads from a stream, in the loaders' order (seed 0)."""
    keys = [i for i, _ in StreamSampler(range(size), batch_size, num_batches, seed=0, stream=stream,
                                        num_replicas=world, rank=rank)]
    return [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]


# -- 1. corrupt or missing images ------------------------------------------------------------------------------
def test_training_batches_keep_their_size_when_an_image_is_unreadable(tiny_data, tmp_path):
    data = copy_data(tiny_data, tmp_path)
    dm = make_datamodule(data, captions=None, retrieved=None)
    dm.setup("fit")
    corrupt(image_path(data, "finetune", 3))
    guarded = GuardedItems(dm.streams["finetune"], substitute=True)
    item = guarded[(3, 123)]
    assert item[SKIPPED] == [f"{image_path(data, 'finetune', 3)} (UnidentifiedImageError)"]
    assert item["labels"] == dm.streams["finetune"][4]["labels"]  # the next row stands in
    batches = list(dm.train_dataloader())
    assert all(b["finetune"]["images"].shape[0] == 8 for b, _, _ in batches)
    assert sum(len(b["finetune"][SKIPPED]) for b, _, _ in batches) == 1  # one pass over 32 rows: read once


@pytest.mark.parametrize("decoded_cache_mb", [0, 64])  # from the files, or decoded once (the eval set too)
def test_bad_images_are_skipped_counted_per_stream_and_logged(tiny_data, tmp_path, decoded_cache_mb):
    L.seed_everything(0)
    data = copy_data(tiny_data, tmp_path)
    bad_pool = [3, 10, 25]
    corrupt(image_path(data, "retrieved", 3), truncate=True)
    corrupt(image_path(data, "retrieved", 10))
    corrupt(image_path(data, "retrieved", 25), truncate=True)
    os.remove(image_path(data, "finetune", 5))
    corrupt(image_path(data, "eval_id", 2))
    dm = make_datamodule(data, max_bad_fraction=0.1, decoded_cache_mb=decoded_cache_mb)
    with pytest.warns(UnreadableImageWarning) as warned:
        trainer(tmp_path, max_steps=5, validate=True, val_check_interval=5).fit(make_module(), dm)
    messages = " ".join(str(w.message) for w in warned)
    assert "ft_0005.png" in messages and "data.retrieved: skipping unreadable images" in messages
    frame = metrics(tmp_path)
    # every draw of a bad row is one skip, over the 5 steps of the loaders' order (the finetune stream's 4-step
    # pass is followed by a step of its second pass, which may draw the missing row again)
    pool_draws = sum(i in bad_pool for step in epoch_keys("retrieved", 40, 8, 5) for i in step)
    ft_draws = sum(i == 5 for step in epoch_keys("finetune", 32, 8, 5) for i in step)
    assert last(frame, "data/skipped_retrieved") == pool_draws == 3
    assert last(frame, "data/skipped_finetune") == ft_draws >= 1
    assert last(frame, "data/skipped_id") == 1
    eval_batch = next(iter(dm.val_dataloader()[0]))
    assert eval_batch["images"].shape[0] == 15 and len(eval_batch[SKIPPED]) == 1  # evaluation drops, not replaces
    assert (last(frame, "val/id/acc") * 15) % 1 == pytest.approx(0, abs=1e-4)  # accuracy over the 15 readable


def test_stream_past_max_bad_fraction_stops_the_run_naming_the_dataset(tiny_data, tmp_path):
    L.seed_everything(0)
    data = copy_data(tiny_data, tmp_path)
    first_step = epoch_keys("retrieved", 40, 8, 5)[0]
    corrupt(image_path(data, "retrieved", first_step[0]))  # 1 of 40 is 2.5% > the default 1%
    module = make_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    # 9 reads: the 8 rows of the step and the stand-in for the bad one
    with pytest.raises(ValueError, match=r"data.retrieved: 1 of 9 images .*retrieved.parquet.*max_bad_fraction=0.01"):
        trainer(tmp_path, max_steps=3).fit(module, make_datamodule(data))
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # stopped before any update


def test_missing_files_past_max_bad_fraction_fail_in_setup_naming_the_files(tiny_data, tmp_path):
    data = copy_data(tiny_data, tmp_path)
    for row in (0, 1):
        os.remove(image_path(data, "eval_id", row))
    with pytest.raises(ValueError, match=r"data.eval_sets\[id\]: 2 of 16 images listed in .*eval_id.csv do not exist"
                                         r".*eval_0000.png"):
        make_datamodule(data).setup("fit")
    with pytest.warns(UnreadableImageWarning, match="eval_0000.png"):
        make_datamodule(data, max_bad_fraction=0.2).setup("fit")


# -- 2. bad tables are errors before training -----------------------------------------------------------------
def test_missing_caption_values_are_rejected_naming_the_image_ids(tiny_data, tmp_path):
    captions = pd.read_json(tiny_data["captions"], lines=True)
    captions.loc[[4, 9], "caption"] = None
    path = tmp_path / "captions.jsonl"
    write_table(captions, path)
    with pytest.raises(ValueError, match=r"captions.jsonl has 2 empty value\(s\) in column 'caption' .*'ft4', 'ft9'"):
        make_datamodule(tiny_data, captions=str(path)).setup("fit")


def test_repeated_image_ids_in_a_caption_file_are_rejected(tiny_data, tmp_path):
    captions = pd.read_json(tiny_data["captions"], lines=True)
    path = tmp_path / "captions.csv"
    write_table(pd.concat([captions, captions.iloc[[7]]]), path)
    with pytest.raises(ValueError, match=r"data.captions: .*captions.csv repeats 1 image_id\(s\) \(first: \['ft7'\]\)"):
        make_datamodule(tiny_data, captions=str(path)).setup("fit")


def test_empty_retrieved_manifest_is_rejected(tiny_data, tmp_path):
    path = tmp_path / "retrieved.parquet"
    write_table(pd.read_parquet(tiny_data["retrieved"]).iloc[:0], path)
    with pytest.raises(ValueError, match=r"data.retrieved: .*retrieved.parquet has 0 pairs, fewer than the minimum 8"):
        make_datamodule(tiny_data, retrieved=str(path)).setup("fit")


def test_non_integer_labels_are_rejected_naming_the_rows(tiny_data, tmp_path):
    frame = pd.read_csv(tiny_data["eval_id"])
    frame["label"] = frame["label"].astype(object)
    frame.loc[6, "label"] = "blue line"
    path = Path(tiny_data["root"]) / "eval_names.csv"  # beside the images, so filepaths resolve
    write_table(frame, path)
    with pytest.raises(ValueError, match=r"eval_names.csv has non-integer labels .*first bad rows \[6\]"):
        make_datamodule(tiny_data, eval_sets=[EvalSet("id", str(path), tiny_data["classnames"])]).setup("fit")


# -- 3. checkpoint resume ---------------------------------------------------------------------------------------
class KillAtStep(L.Callback):
    """Ends the process the hard way (no cleanup, no checkpoint) before the step `step` runs."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os._exit(17)


def fit_args(tiny_data, root, *extra) -> list[str]:
    eval_sets = [{"name": "id", "manifest": tiny_data["eval_id"], "classnames": tiny_data["classnames"]}]
    return ["fit", "--config", TINY, "--trainer.default_root_dir", str(root),
            "--data.finetune", tiny_data["finetune"], "--data.classnames", tiny_data["classnames"],
            "--data.captions", tiny_data["captions"], "--data.retrieved", tiny_data["retrieved"],
            "--data.eval_sets", json.dumps(eval_sets), "--trainer.max_steps", "8",
            "--trainer.enable_progress_bar", "false", *extra]


def run_fit(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "anchor_clip.fit", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


def train_losses(root) -> pd.DataFrame:
    frame = metrics(root).dropna(subset=["train/loss"])
    return frame.drop_duplicates("step", keep="last").set_index("step").sort_index()


def weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> SimpleNamespace:
    """An uninterrupted tiny run of 8 steps (epochs of 5 steps; validation and a checkpoint after step 4)."""
    root = tmp_path_factory.mktemp("reference")
    cli = cli_main(fit_args(tiny_data, root))
    return SimpleNamespace(root=root, weights={k: v.clone() for k, v in cli.model.state_dict().items()})


def test_run_killed_mid_epoch_resumes_the_same_data_and_schedule(reference, tiny_data, tmp_path):
    killed = run_fit(fit_args(tiny_data, tmp_path, "--trainer.callbacks", json.dumps(
        [{"class_path": "tests.test_reliability.KillAtStep", "init_args": {"step": 5}}])), timeout=300)
    assert killed.returncode == 17, killed.stderr[-3000:]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    resumed_model = cli_main(fit_args(tiny_data, tmp_path, "--ckpt_path", "last")).model
    resumed, full = train_losses(tmp_path), train_losses(reference.root)
    assert list(resumed.index) == [4, 5, 6, 7]  # the rest of epoch 0 (step 4), then epoch 1
    for column in ("train/loss", "train/loss_finetune", "train/loss_caption", "train/loss_retrieved"):
        np.testing.assert_allclose(resumed[column], full.loc[4:, column], rtol=1e-6, err_msg=column)
    final = resumed_model.state_dict()
    assert all(torch.allclose(final[k], v, atol=1e-6) for k, v in reference.weights.items())


def test_resumed_sampler_reads_exactly_the_batches_left_in_its_epoch():
    stream = list(range(40))
    full = list(StreamSampler(stream, 4, num_batches=12, seed=3, stream="finetune"))
    resumed = StreamSampler(stream, 4, num_batches=12, seed=3, stream="finetune", start_epoch=0, start_batch=7)
    assert list(resumed) == full[7 * 4 :]
    resumed.set_epoch(1)  # later epochs start at their beginning, in a new order
    assert len(list(resumed)) == len(full) and list(resumed) != full
    batches = [full[i : i + 4] for i in range(0, len(full), 4)]
    assert all(len({i for i, _ in b}) == 4 for b in batches)  # passes hold whole batches: no item twice in one


def test_global_batches_do_not_depend_on_the_number_of_processes():
    stream = list(range(40))
    single = list(StreamSampler(stream, 8, num_batches=5, seed=0, stream="retrieved"))
    ranks = [list(StreamSampler(stream, 4, num_batches=5, seed=0, stream="retrieved", num_replicas=2, rank=r))
             for r in (0, 1)]
    for step in range(5):
        assert single[8 * step : 8 * step + 8] == ranks[0][4 * step : 4 * step + 4] + ranks[1][4 * step : 4 * step + 4]


def test_training_batches_do_not_depend_on_the_worker_count(tiny_data):
    def first_batches(workers: int) -> list[dict]:
        dm = make_datamodule(tiny_data, num_workers=workers, templates=[f"{i} {{c}}" for i in range(10)])
        dm.setup("fit")
        return [batch for (batch, _, _), _ in zip(dm.train_dataloader(), range(2), strict=False)]

    for a, b in zip(first_batches(0), first_batches(2), strict=True):
        for stream in ("finetune", "retrieved"):
            assert all(torch.equal(a[stream][k], b[stream][k]) for k in a[stream] if k != SKIPPED), stream


def test_item_seed_fixes_prompt_template_and_augmentation(tiny_data):
    dm = make_datamodule(tiny_data, captions=None, retrieved=None, templates=[f"{i} {{c}}" for i in range(10)])
    dm.setup("fit")
    guarded = GuardedItems(dm.streams["finetune"], substitute=True)
    torch.manual_seed(1)
    a = guarded[(5, 99)]
    torch.rand(100)  # whatever else used the global RNG in between
    b = guarded[(5, 99)]
    assert a["texts"] == b["texts"] and torch.equal(a["images"], b["images"])
    texts = {guarded[(5, seed)]["texts"] for seed in range(20)}
    assert len(texts) > 1  # the seed does draw


def test_batched_read_equals_item_reads_and_leaves_the_global_rng_alone(tiny_data):
    dm = make_datamodule(tiny_data, templates=[f"{i} {{c}}" for i in range(10)], decoded_cache_mb=64)
    dm.setup("fit")
    guarded = GuardedItems(dm.streams["finetune"], substitute=True)
    keys = [(i, 1000 + i) for i in range(8)]
    torch.manual_seed(7)
    state = torch.random.get_rng_state()
    batch = guarded.__getitems__(keys)  # what the DataLoader calls
    assert torch.equal(torch.random.get_rng_state(), state)
    for key, item in zip(keys, batch, strict=True):
        alone = guarded[key]
        assert item["texts"] == alone["texts"] and torch.equal(item["images"], alone["images"])


# -- 4. divergence ----------------------------------------------------------------------------------------------
class PoisonImages(L.Callback):
    """Sets one stream's images to NaN at the given steps: its loss term becomes NaN."""

    def __init__(self, steps: set[int], stream: str = "retrieved") -> None:
        self.steps, self.stream = steps, stream

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            batch[self.stream]["images"].fill_(float("nan"))


class WeightLog(L.Callback):
    def __init__(self) -> None:
        self.at_start: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.at_start[trainer.global_step] = torch.cat([p.detach().flatten() for p in pl_module.parameters()])


def test_nan_loss_stops_the_run_naming_term_and_step_and_keeps_the_last_checkpoint(tiny_data, tmp_path):
    L.seed_everything(0)
    module = make_module()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=0, save_last=True)
    run = trainer(tmp_path, max_steps=5, callbacks=[PoisonImages({1}), checkpoints], plugins=[AtomicCheckpointIO()])
    with pytest.raises(FloatingPointError, match=r"non-finite train/loss, train/loss_retrieved at step 1.*last.ckpt"):
        run.fit(module, make_datamodule(tiny_data))
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 1
    current = module.state_dict()
    assert all(torch.isfinite(v).all() and torch.equal(v, current[k]) for k, v in saved["state_dict"].items())


def test_skip_mode_drops_nonfinite_updates_and_counts_them(tiny_data, tmp_path):
    L.seed_everything(0)
    module, log = make_module(nonfinite="skip", warmup_steps=0), WeightLog()
    run = trainer(tmp_path, max_steps=4, callbacks=[PoisonImages({1, 2}), log])
    run.fit(module, make_datamodule(tiny_data))
    w, final = log.at_start, torch.cat([p.detach().flatten() for p in module.parameters()])
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[3], final)  # healthy steps update
    assert torch.equal(w[1], w[2]) and torch.equal(w[2], w[3])  # poisoned steps do not
    assert torch.isfinite(final).all()
    assert last(metrics(tmp_path), "train/skipped_nonfinite") == 2
    adam = run.optimizers[0].state[module.backbone.log_logit_scale]
    assert int(adam["step"]) == 2  # the moments saw only the 2 healthy steps


class InfGradient(L.Callback):
    def on_after_backward(self, trainer, pl_module) -> None:
        next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")


def test_nonfinite_gradient_of_a_finite_loss_is_named_as_a_gradient(tiny_data, tmp_path):
    with pytest.raises(FloatingPointError, match="non-finite gradient .* at step 0"):
        trainer(tmp_path, max_steps=1, callbacks=[InfGradient()]).fit(make_module(), make_datamodule(tiny_data))


# -- 5. atomic writes -------------------------------------------------------------------------------------------
def _write_large_table(path: str) -> None:
    rows = 3_000_000
    write_table(pd.DataFrame({"image_id": np.arange(rows).astype(str), "caption": ["a long caption"] * rows}), path)


class SlowToSave:
    """Pickles slowly, so a save is still under way when it is killed."""

    def __reduce__(self):
        time.sleep(60)
        return (SlowToSave, ())


def _save_slow_checkpoint(path: str) -> None:
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "slow": SlowToSave()}, path)


def kill_while_writing(target: Path, write, arg: str) -> None:
    """Run `write(arg)` in a child process and SIGKILL it once its temporary file is in the target's folder."""
    process = multiprocessing.get_context("fork").Process(target=write, args=(arg,))
    process.start()
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(f".{target.name}.") for p in target.parent.iterdir()):
        assert process.is_alive() and time.monotonic() < deadline, "the writer ended before it could be killed"
        time.sleep(0.005)
    process.kill()
    process.join()
    assert process.exitcode == -9


def test_table_write_killed_midway_leaves_the_previous_table(tmp_path):
    target = tmp_path / "captions.csv"
    previous = pd.DataFrame({"image_id": ["a", "b"], "caption": ["one", "two"]})
    write_table(previous, target)
    kill_while_writing(target, _write_large_table, str(target))
    pd.testing.assert_frame_equal(pd.read_csv(target), previous)


def test_checkpoint_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, target)
    kill_while_writing(target, _save_slow_checkpoint, str(target))
    assert torch.equal(torch.load(target)["state_dict"]["w"], torch.zeros(3))


def test_fit_checkpoints_atomically_into_one_folder_per_run(tiny_data, tmp_path):
    cli = cli_main(fit_args(tiny_data, tmp_path)[1:], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert cli.trainer.checkpoint_callback.dirpath == str(tmp_path / "checkpoints")  # where `--ckpt_path last` looks


# -- 6. distributed ---------------------------------------------------------------------------------------------
def ddp_args(data, root, *extra) -> list[str]:
    return fit_args(data, root, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.batch_size", "4",
                    "--data.retrieved_batch_size", "4", *extra)


def test_two_process_ddp_trains_three_streams_like_one_process(reference, tiny_data, tmp_path):
    run = run_fit(ddp_args(tiny_data, tmp_path), timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    ddp, single = train_losses(tmp_path), train_losses(reference.root)
    assert list(ddp.index) == list(range(8))
    for column in ("train/loss", "train/loss_finetune", "train/loss_caption", "train/loss_retrieved"):
        assert np.isfinite(ddp[column]).all()
        # each process logs its local loss; their mean is the global batch's, as in the single process
        np.testing.assert_allclose(ddp[column], single[column], rtol=1e-4, err_msg=column)
    assert last(metrics(tmp_path), "val/id/acc") == last(metrics(reference.root), "val/id/acc")
    a, b = (weights(root / "checkpoints" / "epoch=0-step=4.ckpt") for root in (tmp_path, reference.root))
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in b)


def test_bad_data_seen_by_one_rank_stops_every_rank(tiny_data, tmp_path):
    data = copy_data(tiny_data, tmp_path)
    rank1_first_step = epoch_keys("retrieved", 40, 4, 5, world=2, rank=1)[0]
    bad = image_path(data, "retrieved", rank1_first_step[0])
    corrupt(bad)
    run = run_fit(ddp_args(data, tmp_path / "run"), timeout=120)  # a rank left waiting would hang to the timeout
    assert run.returncode != 0
    # both ranks stop at the first step with the summed count: 2 × 4 rows + 1 stand-in read
    error = "ValueError: data.retrieved: 1 of 9 images read so far were unreadable"
    assert f"{error} (the set has 40" in run.stderr
    assert f"first here: ['{bad} (UnidentifiedImageError)']" in run.stderr  # rank 1, which read the file
    assert "read by other processes" in run.stderr  # rank 0, which did not


# -- 7. settings ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "message"), [
    ({"caption_weight": -0.5}, r"model.caption_weight .* must be a finite number >= 0, got -0.5"),
    ({"retrieved_weight": float("nan")}, r"model.retrieved_weight .* must be a finite number >= 0"),
    ({"caption_fraction": 1.5}, r"model.caption_fraction must be in \(0, 1\], got 1.5"),
    ({"nonfinite": "ignore"}, r"model.nonfinite must be one of \['raise', 'skip'\], got 'ignore'"),
    ({"backbone": "open_clipp"}, r"unknown backbone family 'open_clipp'.*available: \[.*'open_clip'.*"),
])
def test_bad_model_settings_are_errors_listing_valid_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_module(**overrides)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"batch_size": 0}, r"batch sizes must be positive integers \(per process\), got \{'data.batch_size': 0\}"),
    ({"max_bad_fraction": 1.5}, r"data.max_bad_fraction must be in \[0, 1\), got 1.5"),
    ({"eval_sets": [EvalSet("retrieved", "x.csv", CLASSES)]}, r"names \['retrieved'\] are training stream names"),
])
def test_bad_data_settings_are_errors_listing_valid_values(tiny_data, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_datamodule(tiny_data, **overrides)


def test_batch_size_is_per_process_and_the_global_batch_must_fit_the_stream(tiny_data):
    dm = make_datamodule(tiny_data, batch_size=20, retrieved=None)
    dm.trainer = SimpleNamespace(world_size=2)  # 2 × 20 > the 32 finetune images
    with pytest.raises(ValueError, match=r"data.finetune has 32 images, fewer than one global batch "
                                         r"\(data.batch_size=20 × 2 processes\)"):
        dm.setup("fit")


def test_unknown_evaluation_dataset_lists_the_registered_ones():
    from anchor_clip.eval import dataset_info

    with pytest.raises(ValueError, match=r"unknown evaluation dataset 'imagenet_rr'; available: .*Did you mean"):
        dataset_info("imagenet_rr")
