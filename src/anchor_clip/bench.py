"""`python -m anchor_clip.bench`: what an ARF step costs next to FLYP and next to open_clip's own step.

Times steady-state training steps (warm-up first, then the median of several repetitions) in one process,
on one model and one batch: FLYP, ARF with the shared image pass, ARF as a naive three-stream step, and
open_clip's step (its `ClipLoss` + the same optimizer on the same open_clip model). Prints times, memory
and ratios, and appends them as one JSON line to `--results` when given.

Memory: on CUDA, the peak allocated bytes; on CPU (no allocator statistics), the bytes the forward pass
saves for backward, which is what grows with the step's batch and dominates its peak.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
from open_clip.loss import ClipLoss

from anchor_clip.eval.tables import append_jsonl
from anchor_clip.module import AnchorFinetuneModule

#: Small enough for CPU, large enough that the encoders, not Python overhead, dominate a step.
BENCH_MODEL = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 256, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}
#: ViT-B/16 sized, for an accelerator.
VIT_B16_MODEL = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
}


def make_batch(config: dict, batch: int, classes: int,
               generator: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
    """Random images and token ids in the shapes the data module yields (B_ret = B_ft).

    Finetune texts are class prompts, so they repeat: each is one of `classes` distinct token rows.
    """
    size, length = config["vision_cfg"]["image_size"], config["text_cfg"]["context_length"]

    def tokens(n: int = batch) -> torch.Tensor:
        return torch.randint(1, 49406, (n, length), generator=generator)

    prompts = tokens(classes)[torch.randint(classes, (batch,), generator=generator)]  # (B, L), repeated rows

    def images() -> torch.Tensor:
        return torch.randn(batch, 3, size, size, generator=generator)

    return {
        "finetune": {"images": images(), "labels": torch.zeros(batch, dtype=torch.long), "texts": prompts,
                     "captions": tokens()},
        "retrieved": {"images": images(), "texts": tokens()},
    }


@contextmanager
def saved_bytes() -> dict:
    """Count the bytes autograd saves for backward inside the block (CPU activation memory)."""
    seen: dict[int, int] = {}
    out = {"bytes": 0}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out
    out["bytes"] = sum(seen.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(steps: dict[str, Callable[[], torch.Tensor]], warmup: int, repeats: int,
               device: torch.device) -> dict[str, dict]:
    """Median seconds of each step (forward, backward, optimizer) and its memory.

    Repetitions are interleaved (one of each step per round), so a change in machine load during the run
    shifts every step alike instead of biasing the ratios.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    results = {}
    for name, step in steps.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step()
            memory = torch.cuda.max_memory_allocated()
        else:
            with saved_bytes() as saved:
                step()
            memory = saved["bytes"]
        results[name] = {"median_s": statistics.median(times[name]), "min_s": min(times[name]),
                         "memory_mb": memory / 2**20}
    return results


def module_step(module: AnchorFinetuneModule, optimizer: torch.optim.Optimizer, batch: dict,
                autocast: torch.autocast) -> Callable[[], torch.Tensor]:
    """The module's training step (encode streams, ARF loss) without Lightning's logging, then AdamW."""

    def step() -> torch.Tensor:
        with autocast:
            loss = module.objective(module.encode_streams(batch), module.backbone.logit_scale)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def open_clip_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict,
                   autocast: torch.autocast) -> Callable[[], torch.Tensor]:
    """open_clip's own training step body: encode, `ClipLoss`, backward, optimizer step."""
    loss_fn = ClipLoss()
    images, texts = batch["finetune"]["images"], batch["finetune"]["texts"]

    def step() -> torch.Tensor:
        with autocast:
            loss = loss_fn(model.encode_image(images, normalize=True), model.encode_text(texts, normalize=True),
                           model.logit_scale.exp())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def run(config: dict, batch_size: int, classes: int, device: str, precision: str, warmup: int,
        repeats: int) -> dict:
    device = torch.device(device)
    dtype = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}[precision]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    batch = make_batch(config, batch_size, classes, torch.Generator().manual_seed(0))
    batch = {s: {k: v.to(device) for k, v in d.items()} for s, d in batch.items()}
    variants = {
        "flyp": {"caption_weight": 0.0, "retrieved_weight": 0.0},
        "arf_shared": {"caption_weight": 1.0, "retrieved_weight": 1.0},
        "arf_naive": {"caption_weight": 1.0, "retrieved_weight": 1.0, "share_image_pass": False,
                      "fuse_encoder_calls": False},
    }
    steps = {}
    for name, kwargs in variants.items():
        torch.manual_seed(0)
        module = AnchorFinetuneModule(backbone="open_clip", backbone_config=config, **kwargs).to(device).train()
        optimizer = torch.optim.AdamW(module.backbone.param_groups(0.1), lr=1e-5)
        steps[name] = module_step(module, optimizer, batch, autocast)
    torch.manual_seed(0)
    model = AnchorFinetuneModule(backbone="open_clip", backbone_config=config).backbone.model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    steps["open_clip"] = open_clip_step(model, optimizer, batch, autocast)
    results = time_steps(steps, warmup, repeats, device)
    t = {name: r["median_s"] for name, r in results.items()}
    return {
        "steps": results,
        "ratios": {
            "arf_shared/flyp": t["arf_shared"] / t["flyp"],
            "arf_naive/arf_shared": t["arf_naive"] / t["arf_shared"],
            "flyp/open_clip": t["flyp"] / t["open_clip"],
        },
        "images_per_s": {name: batch_size / s for name, s in t.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["bench", "vit-b-16"], default="bench", help="model size")
    parser.add_argument("--batch-size", type=int, default=32, help="finetune batch; retrieved batch is the same")
    parser.add_argument("--classes", type=int, default=20, help="distinct class prompts in the finetune batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["32", "bf16", "16"], default="32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--results", help="append the measurement as a JSON line to this file")
    args = parser.parse_args(argv)
    config = BENCH_MODEL if args.model == "bench" else VIT_B16_MODEL
    out = run(config, args.batch_size, args.classes, args.device, args.precision, args.warmup,
              args.repeats)
    print(f"device {args.device} ({platform.processor() or platform.machine()}), torch threads "
          f"{torch.get_num_threads()}, model {args.model}, batch {args.batch_size} ({args.classes} classes), "
          f"precision {args.precision}")
    print(f"{'step':<12}{'median s':>10}{'min s':>9}{'images/s':>10}{'memory MB':>11}")
    for name, r in out["steps"].items():
        print(f"{name:<12}{r['median_s']:>10.3f}{r['min_s']:>9.3f}{out['images_per_s'][name]:>10.1f}"
              f"{r['memory_mb']:>11.1f}")
    for name, value in out["ratios"].items():
        print(f"{name:<22}{value:6.2f}")
    if args.results:
        append_jsonl(args.results, {"args": vars(args), **out})
    return out


if __name__ == "__main__":
    main()
