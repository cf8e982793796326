"""`python -m anchor_clip.evaluate`: zero-shot accuracy of checkpoints, their WiSE-FT interpolations and
zero-shot backbones on registered datasets and manifest sets, written as the paper's results table.

    python -m anchor_clip.evaluate \\
        --checkpoints '[runs/flyp/last.ckpt, runs/arf/last.ckpt]' --names '[FLYP, ARF]' \\
        --backbone open_clip:ViT-B-16 --pretrained openai \\
        --datasets '{imagenet: /data/imagenet, imagenet_v2: /data/imagenetv2-matched-frequency-format-val,
                     imagenet_sketch: /data/imagenet-sketch, imagenet_a: /data/imagenet-a,
                     imagenet_r: /data/imagenet-r, objectnet: /data/objectnet-1.0}' \\
        --wise_alphas '[0.5]' --output_dir runs/eval

Every model is scored with `AnchorFinetuneModule`'s zero-shot heads (class names × templates through the
model's own text tower); sets that score the ImageNet head (ImageNet-A/R, ObjectNet) project its logits
onto their classes. Writes `<output_dir>/table.md` and `table.csv`, and appends one JSON line per model
(with its config) to `<output_dir>/results.jsonl`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jsonargparse import CLI
from torch import Tensor

from anchor_clip.backbones import create_backbone
from anchor_clip.eval.datasets import EvalDataset, from_eval_set
from anchor_clip.eval.registry import build_eval_dataset, dataset_info
from anchor_clip.eval.tables import append_jsonl, results_table, to_markdown, write_results_table
from anchor_clip.eval.zeroshot import EvalSets, evaluate_zero_shot
from anchor_clip.module import AnchorFinetuneModule
from anchor_clip.precision import Precision, trainer_precision
from anchor_clip.specs import DEFAULT_TEMPLATES, EvalSet
from anchor_clip.wise import interpolate

log = logging.getLogger(__name__)
def evaluate_module(module: AnchorFinetuneModule, datasets: Sequence[EvalDataset], batch_size: int = 256,
                    num_workers: int = 4, precision: Precision = "32") -> dict[str, dict[str, float]]:
    """Top-1 zero-shot accuracy of a module on each set, on the module's device (`evaluate_zero_shot`).

    Heads come from `module.build_heads` (the current text tower, FLYP); sets sharing class names and
    templates (ImageNet and its shifts) share one head, so the 1000 × 80 prompts are encoded once.

    Returns:
        `{set name: {"acc": fraction correct, "n": number of images}}`.
    """
    device = module.device
    data = EvalSets(datasets, module.backbone.io.eval_transform, batch_size=batch_size, num_workers=num_workers,
                    pin_memory=device.type == "cuda")
    placement = {"accelerator": "gpu", "devices": [device.index or 0]} if device.type == "cuda" else {
        "accelerator": "cpu", "devices": 1}
    scores = evaluate_zero_shot(module, data, precision=trainer_precision(precision), **placement)
    results = {}
    for d in datasets:
        correct, n = scores[d.name]["correct"], scores[d.name]["n"]
        results[d.name] = {"acc": correct / n, "n": n}
        log.info("%s: %.4f on %d images", d.name, results[d.name]["acc"], n)
    return results


def _default_names(checkpoints: Sequence[str]) -> list[str]:
    """Shortest unique path tails without the suffix: `flyp/last`, `arf/last` rather than `last` twice."""
    parts = [Path(c).with_suffix("").parts for c in checkpoints]
    for depth in range(1, max(map(len, parts), default=1) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return list(checkpoints)


def _zeroshot_state(module: AnchorFinetuneModule, checkpoint: str) -> dict[str, Tensor]:
    """Backbone weights the checkpoint was finetuned from: its `backbone`/`pretrained`/`backbone_config`."""
    hp = module.hparams
    if hp.pretrained is None:
        raise ValueError(f"{checkpoint} was trained from random init (model.pretrained is null), so WiSE-FT has no "
                         "zero-shot endpoint; drop --wise_alphas for it")
    return create_backbone(hp.backbone, pretrained=hp.pretrained, config=hp.backbone_config).state_dict()


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def evaluate(
    checkpoints: list[str] | None = None,
    names: list[str] | None = None,
    backbone: str | None = None,
    pretrained: str | None = None,
    backbone_config: dict[str, Any] | None = None,
    zeroshot_name: str = "zero-shot",
    datasets: dict[str, str] | None = None,
    eval_sets: list[EvalSet] | None = None,
    eval_templates: list[str] | None = None,
    templates: dict[str, list[str]] | None = None,
    wise_alphas: list[float] | None = None,
    id_set: str | None = None,
    shift_sets: list[str] | None = None,
    transfer_sets: list[str] | None = None,
    output_dir: str = "runs/eval",
    batch_size: int = 256,
    num_workers: int = 4,
    device: str = "auto",
    precision: Precision = "32",
) -> pd.DataFrame:
    """Evaluate checkpoints and/or a zero-shot backbone on evaluation sets and write the results table.

    Args:
        checkpoints: Lightning `.ckpt` files of `AnchorFinetuneModule` (`python -m anchor_clip.fit`).
        names: method name of each checkpoint in the table; default: the shortest unique path tails.
        backbone: a backbone spec (`open_clip:ViT-B-16`) to evaluate zero-shot, without finetuning.
        pretrained: pretrained tag or checkpoint file of `backbone`.
        backbone_config: model config dict for `backbone` instead of a named model.
        zeroshot_name: method name of the zero-shot backbone.
        datasets: registered datasets to evaluate, name -> root folder (see `anchor_clip.eval.list_datasets`).
        eval_sets: manifest sets (`filepath,label` + class names), as in `data.eval_sets`.
        eval_templates: templates of manifest sets that give none; default "a photo of a {c}.".
        templates: per-set templates replacing a registered set's defaults, set name -> list.
        wise_alphas: also evaluate θ = (1-α)·θ_zero-shot + α·θ_finetuned of each checkpoint at each α; the
            zero-shot weights are rebuilt from the checkpoint's `model.backbone/pretrained/backbone_config`.
        id_set: the in-distribution set (first table column); default: the evaluated registered set whose role
            is 'id', else the first set.
        shift_sets: sets averaged into "OOD avg"; default: every other set that is not a transfer set.
        transfer_sets: zero-shot transfer sets averaged into "ZS avg"; default: registered transfer sets.
        output_dir: where table.md, table.csv and results.jsonl go.
        batch_size: images per forward pass.
        num_workers: image-decoding workers per loader.
        device: 'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...
        precision: '32', 'bf16' or '16' (autocast of the image tower; heads and logits stay fp32).

    Returns:
        The results table (methods × sets, accuracies in percent).
    """
    checkpoints = list(checkpoints or [])
    if not checkpoints and backbone is None:
        raise ValueError("nothing to evaluate: give --checkpoints and/or a zero-shot --backbone")
    if names is not None and len(names) != len(checkpoints):
        raise ValueError(f"--names has {len(names)} entries for {len(checkpoints)} checkpoints")
    missing = [c for c in checkpoints if not Path(c).is_file()]
    if missing:
        raise ValueError(f"checkpoint files {missing} do not exist")
    method_names = list(names) if names is not None else _default_names(checkpoints)
    sets = _build_sets(datasets or {}, eval_sets or [], eval_templates or list(DEFAULT_TEMPLATES), templates or {})
    run = dict(batch_size=batch_size, num_workers=num_workers, precision=precision)
    device_ = _resolve_device(device)
    output = Path(output_dir)
    common = {"datasets": dict(datasets or {}), "eval_sets": [s.name for s in eval_sets or []], "precision": precision}
    rows = []

    def record(method: str, results: dict, **fields: Any) -> None:
        append_jsonl(output / "results.jsonl", {"method": method, **fields, **common, "results": results,
                                                "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        rows.extend({"method": method, "dataset": k, **v} for k, v in results.items())

    if backbone is not None:
        module = AnchorFinetuneModule(backbone=backbone, pretrained=pretrained, backbone_config=backbone_config)
        log.info("evaluating %s (%s)", zeroshot_name, backbone)
        results = evaluate_module(module.to(device_), sets, **run)
        record(zeroshot_name, results, checkpoint=None, alpha=None, hparams=dict(module.hparams))
    for checkpoint, name in zip(checkpoints, method_names, strict=True):
        module = AnchorFinetuneModule.load_from_checkpoint(checkpoint, map_location="cpu")
        zeroshot = _zeroshot_state(module, checkpoint) if wise_alphas else None
        log.info("evaluating %s (%s)", name, checkpoint)
        hparams = dict(module.hparams)
        record(name, evaluate_module(module.to(device_), sets, **run), checkpoint=checkpoint, alpha=None,
               hparams=hparams)
        if zeroshot is not None:
            finetuned = {k: v.detach().cpu().clone() for k, v in module.backbone.state_dict().items()}
            for alpha in wise_alphas:
                module.backbone.load_state_dict(interpolate(zeroshot, finetuned, alpha))
                method = f"{name} WiSE-FT α={alpha:g}"
                log.info("evaluating %s", method)
                record(method, evaluate_module(module, sets, **run), checkpoint=checkpoint, alpha=alpha,
                       hparams=hparams)

    id_, shifts, transfer = _roles([s.name for s in sets], datasets or {}, id_set, shift_sets, transfer_sets)
    table = results_table(rows, id_, shifts, transfer)
    markdown, csv = write_results_table(table, output / "table")
    log.info("wrote %s, %s and %s", markdown, csv, output / "results.jsonl")
    return table


def _build_sets(datasets: dict[str, str], eval_sets: Sequence[EvalSet], eval_templates: list[str],
                templates: dict[str, list[str]]) -> list[EvalDataset]:
    """List every set once (no transform yet: each model brings its own), checking layouts before any model loads."""
    names = [*datasets, *(s.name for s in eval_sets)]
    if not names:
        raise ValueError("no evaluation sets: give --datasets (name -> root) and/or --eval_sets (manifests)")
    if len(set(names)) != len(names):
        raise ValueError(f"evaluation set names must be unique, got {names}")
    unknown = sorted(set(templates) - set(names))
    if unknown:
        raise ValueError(f"--templates names sets {unknown} that are not evaluated ({names})")
    sets = [build_eval_dataset(name, root, templates=templates.get(name)) for name, root in datasets.items()]
    for s in eval_sets:
        sets.append(from_eval_set(s, None, templates.get(s.name) or eval_templates))
    return sets


def _roles(names: list[str], registered: dict[str, str], id_set: str | None, shift_sets: list[str] | None,
           transfer_sets: list[str] | None) -> tuple[str | None, list[str], list[str]]:
    """Which evaluated set is ID, which are shifts and which zero-shot transfer sets, for the table."""
    role = {name: dataset_info(name).role for name in registered}
    for given in (id_set, *(shift_sets or []), *(transfer_sets or [])):
        if given is not None and given not in names:
            raise ValueError(f"set {given!r} is named for the table but not evaluated ({names})")
    if transfer_sets is None:
        transfer_sets = [n for n in names if role.get(n) == "transfer"]
    if id_set is None:
        candidates = [n for n in names if role.get(n) == "id"] or [n for n in names if n not in transfer_sets]
        id_set = candidates[0] if candidates else None
    if shift_sets is None:
        shift_sets = [n for n in names if n != id_set and n not in transfer_sets]
    return id_set, list(shift_sets), list(transfer_sets)


def main(args: list[str] | None = None) -> pd.DataFrame:
    """Run the CLI and print the table; `args` lets notebooks and tests call it without a shell."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    table = CLI(evaluate, args=args, as_positional=False)
    print(to_markdown(table))
    return table


if __name__ == "__main__":
    main()
