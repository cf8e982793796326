"""The step benchmark measures what it claims: every step runs, ARF's extra work shows in its FLOPs."""

import json

import pytest

from anchor_clip.bench import main
from tests.conftest import TINY_OPEN_CLIP


def test_bench_times_every_step_and_counts_their_flops(tmp_path, monkeypatch):
    monkeypatch.setattr("anchor_clip.bench.BENCH_MODEL", TINY_OPEN_CLIP)
    results = tmp_path / "bench.jsonl"
    out = main(["--batch-size", "6", "--classes", "3", "--warmup", "1", "--repeats", "2", "--device", "cpu",
                "--results", str(results)])
    assert set(out["steps"]) == {"flyp", "arf_shared", "arf_naive", "open_clip"}
    assert all(r["median_s"] > 0 and r["gflop"] > 0 for r in out["steps"].values())
    flops = out["flop_ratios"]
    # ARF encodes twice the images and a caption + retrieved text per image; FLYP only 3 distinct prompts
    assert flops["arf_shared/flyp"] > 1.8
    assert flops["arf_naive/arf_shared"] > 1.0  # the naive step encodes the finetune images twice
    assert flops["flyp/open_clip"] < 1.0  # prompt dedupe: 3 prompts encoded instead of 6
    assert json.loads(results.read_text().splitlines()[-1])["ratios"] == pytest.approx(out["ratios"])
