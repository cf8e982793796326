"""Captioning throughput (images/s) of the tiny test captioners on CPU, one image per call vs batched.

Times `Captioner.generate` on images already transformed, so the numbers are model time: BLIP and BLIP-2
(greedy, 8 new tokens), CoCa (greedy over the 49k-token CLIP vocabulary, 8 tokens) and the kNN captioner
(a tiny CLIP image tower + an exact faiss search over a 512-image pool). The models are random and tiny,
so this measures how much batching buys per call, not what a real captioner reaches on a GPU.

    PYTHONPATH=src:. python experiments/bench_caption.py                  # from the repository root
    PYTHONPATH=src:. python experiments/bench_caption.py --images 128 --batch-size 32
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from anchor_clip.anchors.captioners import BlipCaptioner, Captioner, CocaCaptioner, KnnCaptioner
from tests.conftest import CLASSES, TINY_OPEN_CLIP, write_images
from tests.test_caption import TINY_COCA, save_tiny_blip, save_tiny_blip2, save_tiny_clip, save_tiny_coca


def images_per_second(captioner: Captioner, images: list[Image.Image], batch_size: int) -> float:
    """Images captioned per second by `generate` in batches of `batch_size` (after one warm-up batch)."""
    pixels = torch.stack([captioner.transform(image) for image in images])  # (N, 3, H, W)
    captioner.generate(pixels[:batch_size])
    start = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        captioner.generate(pixels[i : i + batch_size])
    return len(pixels) / (time.perf_counter() - start)


def build_captioners(root: Path) -> dict[str, Captioner]:
    """The tiny captioners of the test suite, saved under `root`; the kNN pool is 512 generated images."""
    (root / "blip").mkdir()
    (root / "blip2").mkdir()
    labels = [i % len(CLASSES) for i in range(512)]
    paths = write_images(root, "pool", labels, seed=1)
    pool = pd.DataFrame({"filepath": paths, "caption": [f"a photo of a {CLASSES[label]}" for label in labels]})
    pool.to_csv(root / "pool.csv", index=False)
    return {
        "blip": BlipCaptioner(model=save_tiny_blip(root / "blip"), max_new_tokens=8, num_beams=1),
        "blip-2": BlipCaptioner(model=save_tiny_blip2(root / "blip2"), max_new_tokens=8, num_beams=1),
        "coca": CocaCaptioner(
            config=TINY_COCA, pretrained=save_tiny_coca(root / "coca.pt"), seq_len=9, generate_kwargs={"min_seq_len": 2}
        ),
        "knn": KnnCaptioner(
            backbone="open_clip",
            config=TINY_OPEN_CLIP,
            pretrained=save_tiny_clip(root / "clip.pt"),
            pool=str(root / "pool.csv"),
            pool_embeddings=str(root / "pool_embeddings"),
            num_workers=0,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="images captioned per measurement")
    parser.add_argument("--batch-size", type=int, default=16, help="the batched setting")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = write_images(root, "query", [i % len(CLASSES) for i in range(args.images)], seed=2)
        images = [Image.open(root / p).convert("RGB") for p in paths]
        print(f"{args.images} images of 32 px, CPU, torch threads: {torch.get_num_threads()}")
        print(f"{'captioner':<10}{'batch 1 (img/s)':>18}{f'batch {args.batch_size} (img/s)':>20}{'speed-up':>10}")
        for name, captioner in build_captioners(root).items():
            captioner.setup("cpu")
            single = images_per_second(captioner, images, 1)
            batched = images_per_second(captioner, images, args.batch_size)
            print(f"{name:<10}{single:>18.1f}{batched:>20.1f}{batched / single:>9.1f}x")


if __name__ == "__main__":
    main()
