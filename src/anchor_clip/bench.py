"""`python -m anchor_clip.bench`: what an ARF step costs next to FLYP and next to open_clip's own step.

Times steady-state training steps (warm-up first, then the median of several repetitions) in one process,
on one model and one batch: FLYP, ARF with the shared image pass, ARF as a naive three-stream step, and
open_clip's step (its `ClipLoss` + the same optimizer on the same open_clip model). Prints times, memory
and ratios, and appends them as one JSON line to `--results` when given. `--compile` and `--channels-last`
apply to every step alike, open_clip's included.

`--loader` instead asks whether data loading keeps up on the embedded world: samples per second of the ARF
training loader alone (finetune images with captions + retrieved pairs, `--workers` per stream) against
those a world-CLIP ARF training step consumes.

Memory: on CUDA, the peak allocated bytes; on CPU (no allocator statistics), the bytes the forward pass
saves for backward, which is what grows with the step's batch and dominates its peak.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from open_clip.loss import ClipLoss
from torch.utils.flop_counter import FlopCounterMode

from anchor_clip.eval.tables import append_jsonl
from anchor_clip.module import AnchorFinetuneModule

if TYPE_CHECKING:
    from anchor_clip.demo import DemoConfig

#: Small enough for CPU, large enough that the encoders, not Python overhead, dominate a step.
BENCH_MODEL = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 256, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}
#: Step pairs whose cost ratios the benchmark reports (the issue's targets).
RATIOS = (("arf_shared", "flyp"), ("arf_naive", "arf_shared"), ("flyp", "open_clip"))
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
    """Median seconds of each step (forward, backward, optimizer), its memory and its FLOPs (matmuls, convs).

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
        # one more step, untimed, for memory and FLOPs together
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            with FlopCounterMode(display=False) as flops:
                step()
            memory = torch.cuda.max_memory_allocated()
        else:
            with saved_bytes() as saved, FlopCounterMode(display=False) as flops:
                step()
            memory = saved["bytes"]
        results[name] = {"median_s": statistics.median(times[name]), "min_s": min(times[name]),
                         "memory_mb": memory / 2**20, "gflop": flops.get_total_flops() / 1e9}
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
                   autocast: torch.autocast, compile_model: bool = False,
                   channels_last: bool = False) -> Callable[[], torch.Tensor]:
    """open_clip's own training step body: encode, `ClipLoss`, backward, optimizer step."""
    loss_fn = ClipLoss()
    images, texts = batch["finetune"]["images"], batch["finetune"]["texts"]
    if channels_last:
        model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    encode_image, encode_text = model.encode_image, model.encode_text
    if compile_model:
        encode_image, encode_text = torch.compile(encode_image), torch.compile(encode_text)

    def step() -> torch.Tensor:
        with autocast:
            loss = loss_fn(encode_image(images, normalize=True), encode_text(texts, normalize=True),
                           model.logit_scale.exp())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def run(config: dict, batch_size: int, classes: int, device: str, precision: str, warmup: int,
        repeats: int, compile_model: bool = False, channels_last: bool = False) -> dict:
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
        module = AnchorFinetuneModule(backbone="open_clip", backbone_config=config, channels_last=channels_last,
                                      **kwargs).to(device).train()
        if compile_model:
            module.compile_encoders()
        optimizer = torch.optim.AdamW(module.backbone.param_groups(0.1), lr=1e-5)
        steps[name] = module_step(module, optimizer, batch, autocast)
    torch.manual_seed(0)
    model = AnchorFinetuneModule(backbone="open_clip", backbone_config=config).backbone.model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    steps["open_clip"] = open_clip_step(model, optimizer, batch, autocast, compile_model, channels_last)
    results = time_steps(steps, warmup, repeats, device)
    t = {name: r["median_s"] for name, r in results.items()}
    work = {name: r["gflop"] for name, r in results.items()}
    return {
        "steps": results,
        "ratios": _ratios(t),
        # the same ratios in FLOPs: what any implementation computing these losses must spend
        "flop_ratios": _ratios(work),
        "images_per_s": {name: batch_size / s for name, s in t.items()},
    }


def _ratios(values: dict[str, float]) -> dict[str, float]:
    return {f"{a}/{b}": values[a] / values[b] for a, b in RATIOS}


def loader_throughput(workers: int, batches: int, repeats: int, config: DemoConfig | None = None) -> dict:
    """Samples/s of the world's ARF training loader alone vs. those a world-CLIP ARF step consumes.

    A sample is one image with its texts: each step reads a finetune batch (image, prompt, caption) and a
    retrieved batch of the same size. The world, its CLIP and the anchors come from the demo's cache
    (built on first use, which takes minutes).
    """
    # imported here: the world's anchor jobs need faiss, which the step benchmark does not
    from anchor_clip.demo import DemoConfig, finetune_config, finetune_data, prepare

    config = config or DemoConfig()
    world, weights, anchors = prepare(config)
    recipe = replace(config.finetune, num_workers=workers)
    model = finetune_config(config.model)
    data = finetune_data(world, recipe, weights, model, anchors["captions"], anchors["retrieved"])
    data.setup("fit")
    combined = data.train_dataloader()
    loader = (batch for _ in itertools.count() for batch in combined)  # epoch after epoch
    first, _, _ = next(loader)  # workers started, first batches prefetched
    for _ in range(2):
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    per_step = sum(len(first[s]["images"]) for s in first)
    loader_rate = per_step * batches / (time.perf_counter() - start)

    module = AnchorFinetuneModule(backbone="world_clip", pretrained=str(weights), backbone_config=model,
                                  caption_weight=recipe.caption_weight, retrieved_weight=recipe.retrieved_weight,
                                  channels_last=recipe.channels_last)  # the step the demo runs
    optimizer = torch.optim.AdamW(module.param_groups(), lr=recipe.lr)
    step = module_step(module.train(), optimizer, first, torch.autocast("cpu", enabled=False))
    median = time_steps({"arf": step}, warmup=2, repeats=repeats, device=torch.device("cpu"))["arf"]["median_s"]
    step_rate = per_step / median
    return {"workers_per_stream": workers, "samples_per_step": per_step, "loader_samples_per_s": loader_rate,
            "step_samples_per_s": step_rate, "loader/step": loader_rate / step_rate}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["bench", "vit-b-16"], default="bench", help="model size")
    parser.add_argument("--batch-size", type=int, default=32, help="finetune batch; retrieved batch is the same")
    parser.add_argument("--classes", type=int, default=20, help="distinct class prompts in the finetune batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["32", "bf16", "16"], default="32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoders of every step")
    parser.add_argument("--channels-last", action="store_true", help="channels-last weights and images")
    parser.add_argument("--loader", action="store_true", help="loader vs. step throughput on the embedded world")
    parser.add_argument("--workers", type=int, default=2, help="--loader: loader workers per stream")
    parser.add_argument("--batches", type=int, default=30, help="--loader: batches timed")
    parser.add_argument("--results", help="append the measurement as a JSON line to this file")
    args = parser.parse_args(argv)
    if args.loader:
        out = loader_throughput(args.workers, args.batches, args.repeats)
        print(f"embedded world, ARF loader with {out['workers_per_stream']} workers per stream, "
              f"{out['samples_per_step']} samples per step, torch threads {torch.get_num_threads()}")
        for key in ("loader_samples_per_s", "step_samples_per_s", "loader/step"):
            print(f"{key:<22}{out[key]:10.1f}")
        if args.results:
            append_jsonl(args.results, {"args": vars(args), **out})
        return out
    config = BENCH_MODEL if args.model == "bench" else VIT_B16_MODEL
    out = run(config, args.batch_size, args.classes, args.device, args.precision, args.warmup,
              args.repeats, args.compile, args.channels_last)
    print(f"device {args.device} ({platform.processor() or platform.machine()}), torch threads "
          f"{torch.get_num_threads()}, model {args.model}, batch {args.batch_size} ({args.classes} classes), "
          f"precision {args.precision}, compile {args.compile}, channels_last {args.channels_last}")
    print(f"{'step':<12}{'median s':>10}{'min s':>9}{'images/s':>10}{'memory MB':>11}{'GFLOP':>9}")
    for name, r in out["steps"].items():
        print(f"{name:<12}{r['median_s']:>10.3f}{r['min_s']:>9.3f}{out['images_per_s'][name]:>10.1f}"
              f"{r['memory_mb']:>11.1f}{r['gflop']:>9.1f}")
    print(f"{'ratio':<22}{'time':>6}{'FLOPs':>7}")
    for name, value in out["ratios"].items():
        print(f"{name:<22}{value:6.2f}{out['flop_ratios'][name]:7.2f}")
    if args.results:
        append_jsonl(args.results, {"args": vars(args), **out})
    return out


if __name__ == "__main__":
    main()
