"""Ship the world models: pretrained world CLIPs (float16) and the world BLIP, with their manifest.

Reads each world's pretraining run from the cache (`python -m anchor_clip.demo --pretrain`, or
`pretrain_world_clip`), checks its plateau on the logged curve, rounds the weights to float16, measures the
rounded weights' zero-shot accuracy on the world's evaluation sets with the demo's protocol, and writes
`src/anchor_clip/world/weights/` (files, then `manifest.json` last).

    PYTHONPATH=src python experiments/ship_world_models.py --seeds 0 1 2 --captioner <save_pretrained dir>
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from anchor_clip.data.tables import write_atomic
from anchor_clip.demo.data import finetune_data
from anchor_clip.demo.pretrain import cache_root, pretrain_key
from anchor_clip.demo.recipes import WORLD_MODEL, FinetuneRecipe, PretrainRecipe
from anchor_clip.demo.run import evaluate
from anchor_clip.module import AnchorFinetuneModule
from anchor_clip.world.config import WorldConfig
from anchor_clip.world.generate import generate_world
from anchor_clip.world.pretrained import MANIFEST, WEIGHTS_DIR, sha256


def plateau(run_dir: Path, steps: int) -> dict[str, float]:
    """How much zero-shot accuracy (points) and train loss move over the last fifth of pretraining."""
    logs = pd.concat([pd.read_csv(p) for p in sorted(run_dir.glob("logs/version_*/metrics.csv"))])
    start = int(0.8 * steps)
    val = logs.dropna(subset=["val/id/acc"]).drop_duplicates("step", keep="last").set_index("step").sort_index()
    tail = val.loc[val.index >= start - 1]
    loss = logs.dropna(subset=["train/loss"]).drop_duplicates("step", keep="last").set_index("step")["train/loss"]
    half = start + (steps - start) // 2
    first, second = loss[(loss.index >= start) & (loss.index < half)].mean(), loss[loss.index >= half].mean()
    return {
        "last_fifth_from_step": start,
        "id_acc_points": [round(100 * v, 2) for v in tail["val/id/acc"]],
        "zeroshot_acc_points": [round(100 * v, 2) for v in tail["val/zeroshot/acc"]],
        "id_acc_range": round(100 * float(tail["val/id/acc"].max() - tail["val/id/acc"].min()), 2),
        "zeroshot_acc_range": round(100 * float(tail["val/zeroshot/acc"].max() - tail["val/zeroshot/acc"].min()), 2),
        "train_loss_first_half": round(float(first), 4),
        "train_loss_second_half": round(float(second), 4),
        "train_loss_change_pct": round(100 * float(second - first) / float(first), 2),
    }


def ship_world_clip(seed: int, recipe: PretrainRecipe) -> dict:
    world = generate_world(cache_root() / "worlds", WorldConfig(seed=seed))
    key = pretrain_key(world, WORLD_MODEL, recipe)
    run_dir = cache_root() / "world_clip" / key
    state = torch.load(run_dir / "world_clip.pt", map_location="cpu", weights_only=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    name = f"world_clip_world{seed}.pt"
    write_atomic(WEIGHTS_DIR / name, lambda tmp: torch.save(half, tmp))
    (WEIGHTS_DIR / name).chmod(0o644)  # package data: readable by every user of an installation
    model = AnchorFinetuneModule(backbone="world_clip", pretrained=str(WEIGHTS_DIR / name),
                                 backbone_config=dict(WORLD_MODEL))
    data = finetune_data(world, FinetuneRecipe(num_workers=0), str(WEIGHTS_DIR / name), dict(WORLD_MODEL))
    return {
        "file": name, "sha256": sha256(WEIGHTS_DIR / name), "world": asdict(world.config),
        "world_key": world.config.key,
        "model": dict(WORLD_MODEL), "recipe": asdict(recipe), "pretrain_key": key, "steps": recipe.steps,
        "zero_shot": {k: round(v, 2) for k, v in evaluate(model, data).items()},  # %, style-prompt ensemble
        "plateau": plateau(run_dir, recipe.steps),
    }


def ship_captioner(source: Path, tag: str = "world_blip") -> dict:
    target = WEIGHTS_DIR / tag
    if target.resolve() != source.resolve():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
    files = sorted(p.name for p in target.iterdir() if p.is_file())
    trained = json.loads((target / "recipe.json").read_text())
    losses = pd.read_csv(target / "train_log.csv")
    return {"dir": tag, "sha256": {f: sha256(target / f) for f in files}, **trained,
            "trained_on": "the pretraining corpus of world 0 (pretrain/pretrain.csv)",
            "final_loss": round(float(losses["loss"].iloc[-5:].mean()), 4)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--captioner", type=Path, help="the trained world BLIP's save_pretrained folder")
    args = parser.parse_args(argv)
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {"world_clip": {}, "captioner": {}}
    for seed in args.seeds:
        manifest["world_clip"][f"world{seed}"] = ship_world_clip(seed, PretrainRecipe())
        print(f"world{seed}:", json.dumps(manifest["world_clip"][f"world{seed}"]["zero_shot"]),
              json.dumps(manifest["world_clip"][f"world{seed}"]["plateau"]))
    if args.captioner:
        manifest["captioner"]["world_blip"] = ship_captioner(args.captioner)
    text = json.dumps(manifest, indent=1) + "\n"
    write_atomic(MANIFEST, lambda tmp: Path(tmp).write_text(text))
    MANIFEST.chmod(0o644)


if __name__ == "__main__":
    main()
