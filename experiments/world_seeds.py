"""The embedded demo over several seeds: mean ± std per method, and the world's targets checked on the means.

Seed s runs `python -m anchor_clip.demo --world-seed s --seed s`: a new world (class split and images), its own
pretrained world CLIP (cached), its own anchors and finetune seed. Each seed's outputs go to `<out>/seed_<s>`;
seeds whose `results.csv` exists are read, not re-run, so a killed sweep resumes where it stopped.

    PYTHONPATH=src:. python experiments/world_seeds.py --seeds 0 1 2 --out outputs/seeds
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from anchor_clip.data.tables import write_atomic, write_table
from anchor_clip.demo.recipes import AnchorRecipe, FinetuneRecipe, PretrainRecipe
from anchor_clip.demo.targets import anchor_pairs, mean_std, paired_differences, run_seeds, size_curve, targets
from anchor_clip.world.config import WorldConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("outputs/seeds"))
    parser.add_argument("--context-bias", type=float, default=WorldConfig.finetune_context_bias,
                        help="WorldConfig.finetune_context_bias")
    parser.add_argument("--steps", type=int, default=FinetuneRecipe.steps, help="finetune steps per method")
    parser.add_argument("--caption-weight", type=float, default=FinetuneRecipe.caption_weight, help="λ_caption")
    parser.add_argument("--retrieved-weight", type=float, default=FinetuneRecipe.retrieved_weight,
                        help="λ_retrieved (also the replay control's)")
    parser.add_argument("--retrieved-batch-size", type=int, default=FinetuneRecipe.retrieved_batch_size,
                        help="retrieved (and replay) pairs per step; default: the finetune batch size")
    parser.add_argument("--pretrain-steps", type=int, default=PretrainRecipe.steps,
                        help="world-CLIP pretraining steps (each value is its own cache entry)")
    parser.add_argument("--anchor-sizes", type=int, nargs="*", default=[375, 750],
                        help="retrieved anchors and replay also at these k per class (the size curve)")
    parser.add_argument("--no-ablations", action="store_true", help="skip the single-stream ablation rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recipe = FinetuneRecipe(steps=args.steps, caption_weight=args.caption_weight,
                            retrieved_weight=args.retrieved_weight, retrieved_batch_size=args.retrieved_batch_size)
    runs = run_seeds(args.seeds, args.out, args.context_bias, recipe, PretrainRecipe(steps=args.pretrain_steps),
                     ablations=not args.no_ablations, anchor_sizes=tuple(args.anchor_sizes))
    summary, checks = mean_std(runs), targets(runs)
    differences = paired_differences(runs, [("arf", "replay"), ("arf", "flyp"), ("arf_caption", "flyp"),
                                            ("arf_caption_knn", "flyp"), ("arf_retrieval", "replay"),
                                            ("arf", "arf_retrieval")])
    curve = size_curve(runs, anchor_pairs(args.out, args.seeds), AnchorRecipe.retrieved_per_class)
    write_table(runs, args.out / "runs.csv")
    write_table(summary.reset_index(), args.out / "summary.csv")
    write_table(curve, args.out / "size_curve.csv")
    text = (f"seeds {args.seeds} (world seed = finetune seed), mean ± std\n\n{summary.to_markdown()}\n\n"
            f"targets, on the seed means\n\n{checks.to_markdown(index=False)}\n\n"
            f"paired differences over seeds (mean ± std)\n\n{differences.to_markdown(index=False)}\n\n"
            f"OOD against the number of anchor pairs\n\n{curve.to_markdown(index=False)}\n")
    write_atomic(args.out / "summary.md", lambda tmp: Path(tmp).write_text(text))
    print(text)


if __name__ == "__main__":
    main()
