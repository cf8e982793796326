"""The world's generative captioner: a tiny Hugging Face BLIP over the world's words.

It plays BLIP-2's part in ARF: a captioner trained once on a pretraining corpus (never on the finetune
set), saved with `save_pretrained`, and run by `python -m anchor_clip.caption` exactly as a Hub checkpoint
(`BlipCaptioner(model=<dir>)`). Its tokenizer is a `BertTokenizer` over `captions.vocabulary()`, the
layout BLIP's own tokenizer has, so the model class and processor are the stock ones.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from anchor_clip.world.captions import vocabulary

log = logging.getLogger(__name__)

#: BERT's special tokens in BLIP's order of use: [DEC] starts a caption, [SEP] ends it.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
PUNCTUATION = (",", ".", ":", "-")  # BERT's basic tokenizer splits these off as tokens of their own


@dataclass(frozen=True)
class CaptionerConfig:
    """Sizes of the world BLIP (vision ViT and text decoder)."""

    image_size: int = 32
    patch_size: int = 8  # 4 x 4 patches of a 32 px image: a quarter of the cost of 4 px patches on CPU
    hidden_size: int = 128
    vision_layers: int = 3
    text_layers: int = 2
    heads: int = 4
    max_length: int = 40  # tokens per caption, [DEC] and [SEP] included (world captions stay under 30 words)
    mean: tuple[float, float, float] = (0.67, 0.57, 0.51)  # the pretraining corpus's pixel statistics
    std: tuple[float, float, float] = (0.31, 0.28, 0.33)


@dataclass(frozen=True)
class CaptionerRecipe:
    """Optimisation settings of captioner training (language-modelling loss on corpus captions)."""

    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    seed: int = 0


def world_blip_processor(directory: str | Path, config: CaptionerConfig = CaptionerConfig()):
    """A stock `BlipProcessor` whose tokenizer knows the world's words; its vocabulary file goes to `directory`."""
    from transformers import BertTokenizer, BlipImageProcessor, BlipProcessor

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join([*SPECIAL_TOKENS, *PUNCTUATION, *vocabulary()]) + "\n")
    # [DEC] is BLIP's beginning-of-caption token, as in Salesforce's BLIP tokenizers
    tokenizer = BertTokenizer(str(vocab), do_lower_case=True, model_max_length=config.max_length, bos_token="[DEC]")
    images = BlipImageProcessor(size={"height": config.image_size, "width": config.image_size},
                                image_mean=list(config.mean), image_std=list(config.std))
    return BlipProcessor(image_processor=images, tokenizer=tokenizer)


def build_world_blip(tokenizer, config: CaptionerConfig = CaptionerConfig()):
    """A randomly initialised `BlipForConditionalGeneration` sized by `config` for `tokenizer`'s vocabulary."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    text = {"vocab_size": len(tokenizer), "hidden_size": config.hidden_size, "encoder_hidden_size": config.hidden_size,
            "intermediate_size": 2 * config.hidden_size, "num_hidden_layers": config.text_layers,
            "num_attention_heads": config.heads, "max_position_embeddings": config.max_length,
            "pad_token_id": ids("[PAD]"), "bos_token_id": ids("[DEC]"), "eos_token_id": ids("[SEP]"),
            "sep_token_id": ids("[SEP]")}
    vision = {"hidden_size": config.hidden_size, "intermediate_size": 2 * config.hidden_size,
              "num_hidden_layers": config.vision_layers, "num_attention_heads": config.heads,
              "image_size": config.image_size, "patch_size": config.patch_size}
    return BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision,
                                                   projection_dim=config.hidden_size))


def _encode_corpus(corpus: Path, processor, config: CaptionerConfig, chunk: int = 2000) -> tuple[torch.Tensor, ...]:
    """Pixels (N, 3, H, W) through the processor, and decoder ids / labels (N, L) of every corpus pair."""
    table = pd.read_csv(corpus)
    pixels = []
    for start in tqdm(range(0, len(table), chunk), desc="encoding the captioner's corpus"):
        paths = table["filepath"].iloc[start:start + chunk]
        images = [Image.open(corpus.parent / p).convert("RGB") for p in paths]
        pixels.append(processor.image_processor(images=images, return_tensors="pt")["pixel_values"])
    text = processor.tokenizer(table["caption"].tolist(), padding="max_length", truncation=True,
                               max_length=config.max_length, return_tensors="pt")
    ids = text["input_ids"]
    ids[:, 0] = processor.tokenizer.convert_tokens_to_ids("[DEC]")  # BLIP's decoder starts at [DEC], not [CLS]
    labels = ids.masked_fill(text["attention_mask"] == 0, -100)
    return torch.cat(pixels), ids, text["attention_mask"], labels


def train_world_captioner(corpus: str | Path, out_dir: str | Path, config: CaptionerConfig = CaptionerConfig(),
                          recipe: CaptionerRecipe = CaptionerRecipe()) -> Path:
    """Train the world BLIP on a pair manifest and save it, in float16, with its processor.

    Args:
        corpus: pair manifest (filepath, caption) with paths relative to its folder; the pretraining corpus.
        out_dir: where `save_pretrained` writes model and processor, and `train_log.csv` the loss curve.

    Returns:
        `out_dir`, loadable with `BlipCaptioner(model=str(out_dir))`.
    """
    from transformers import get_cosine_schedule_with_warmup

    corpus, out_dir = Path(corpus), Path(out_dir)
    torch.manual_seed(recipe.seed)
    processor = world_blip_processor(out_dir, config)
    model = build_world_blip(processor.tokenizer, config)
    pixels, ids, mask, labels = _encode_corpus(corpus, processor, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, recipe.warmup_steps, recipe.steps)
    order = torch.Generator().manual_seed(recipe.seed)
    rows = []
    model.train()
    progress = tqdm(range(recipe.steps), desc="training the world captioner")
    for step in progress:
        batch = torch.randint(len(ids), (recipe.batch_size,), generator=order)
        loss = model(pixel_values=pixels[batch], input_ids=ids[batch], attention_mask=mask[batch],
                     labels=labels[batch]).loss
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"captioner loss is {loss.item()} at step {step}; lower CaptionerRecipe.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == recipe.steps - 1:
            rows.append({"step": step, "loss": loss.item(), "lr": schedule.get_last_lr()[0]})
            progress.set_postfix(loss=f"{loss.item():.3f}")
    model.eval().to(torch.float16).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    with open(out_dir / "train_log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "lr"])
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "recipe.json").write_text(json.dumps({"config": asdict(config), "recipe": asdict(recipe),
                                                     "corpus_size": len(ids)}, indent=1))
    log.info("world captioner: final loss %.3f, mean of the last tenth %.3f", rows[-1]["loss"],
             float(np.mean([r["loss"] for r in rows[-max(1, len(rows) // 10):]])))
    return out_dir
