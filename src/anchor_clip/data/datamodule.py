"""AnchorDataModule: ARF's training streams and any number of named evaluation sets.

Training batches are dicts keyed by stream (Lightning's `CombinedLoader`):
    {"finetune": {"images": (B,3,H,W), "labels": (B,), "texts": (B,L), "captions": (B,L)?},
     "retrieved": {"images": (R,3,H,W), "texts": (R,L)}}
The caption stream rides inside the finetune batch because its images *are* the finetune images.
Texts are tokenized in the workers, with the tokenizer of the linked backbone (no weights loaded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, default_collate

from anchor_clip.backbones import create_io
from anchor_clip.backbones.base import BackboneIO, Tokenizer
from anchor_clip.data.finetune import FinetuneImages
from anchor_clip.data.images import LabelledImages
from anchor_clip.data.pairs import ImageTextPairs
from anchor_clip.data.tables import check_templates

if TYPE_CHECKING:  # eval imports this module; the projection type is only an annotation here
    from anchor_clip.eval.masks import LogitProjection

TEXT_KEYS = ("texts", "captions")
DEFAULT_TEMPLATES = ("a photo of a {c}.",)


@dataclass
class EvalSet:
    """A named evaluation set: its images, labels and its *own* class names (zero-shot sets differ from ID).

    Attributes:
        name: used in metric names, `val/<name>/acc`.
        manifest: table with `filepath`, `label`.
        classnames: list or file; the zero-shot head has one row per name.
        templates: prompt templates for its zero-shot head; None uses `AnchorDataModule.eval_templates`.
    """

    name: str
    manifest: str
    classnames: str | list[str]
    templates: list[str] | None = None


@dataclass(frozen=True)
class EvalSpec:
    """What the module needs to build a set's zero-shot head and score it.

    Attributes:
        name: the set's name in metric keys.
        classnames: one head row per name (for ImageNet-A/R/ObjectNet: the 1000 ImageNet names).
        templates: prompt templates with `{c}`.
        project: maps (B, len(classnames)) head logits to (B, num_classes) set logits (class subsets, pooling).
    """

    name: str
    classnames: list[str]
    templates: list[str]
    project: LogitProjection | None = None

    @property
    def num_classes(self) -> int:
        return self.project.num_classes if self.project is not None else len(self.classnames)


class TokenizingCollate:
    """Default collation, with string fields turned into (B, L) token ids (runs in the loader workers)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict]) -> dict:
        texts = {k: self.tokenizer([item.pop(k) for item in items]) for k in TEXT_KEYS if k in items[0]}
        return {**default_collate(items), **texts}


class AnchorDataModule(L.LightningDataModule):
    """Builds the finetune (+caption) and retrieved streams and the evaluation loaders.

    Any stream may be left out: no `retrieved` gives FLYP data, no `finetune` gives pairs-only data
    (how a backbone is pretrained on a pool).

    Args:
        finetune: finetune manifest (`image_id`, `filepath`, `label`).
        classnames: finetune class names (list or file).
        templates: class-prompt templates for the finetune texts (`{c}` marks the class name); FLYP's
            "a photo of a {c}." by default.
        captions: caption table keyed by `image_id` for the caption-anchor stream.
        retrieved: pair manifest (`filepath`, `caption`) for the retrieved-anchor stream.
        eval_sets: named evaluation sets for validation and test.
        eval_templates: zero-shot head templates for sets that do not give their own; None = `templates`.
        batch_size: finetune images per step and process.
        retrieved_batch_size: retrieved pairs per step and process; None = `batch_size`.
        eval_batch_size: images per evaluation step.
        num_workers: loader workers per stream.
        backbone: backbone spec, linked from `model.backbone` by the CLI.
        backbone_config: backbone config dict, linked from `model.backbone_config`.
        pretrained: pretrained tag or checkpoint, linked from `model.pretrained` (its preprocessing may differ).
    """

    def __init__(
        self,
        finetune: str | None = None,
        classnames: str | list[str] | None = None,
        templates: list[str] | None = None,
        captions: str | None = None,
        retrieved: str | None = None,
        eval_sets: list[EvalSet] | None = None,
        eval_templates: list[str] | None = None,
        batch_size: int = 128,
        retrieved_batch_size: int | None = None,
        eval_batch_size: int = 256,
        num_workers: int = 2,
        backbone: str = "world_clip",
        backbone_config: dict[str, Any] | None = None,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if finetune is None and retrieved is None:
            raise ValueError("data: set data.finetune and/or data.retrieved; no training stream is configured")
        if finetune is not None and classnames is None:
            raise ValueError("data.classnames is required with data.finetune (a list or a file, one name per line)")
        if captions is not None and finetune is None:
            raise ValueError("data.captions pairs captions with the finetune images: set data.finetune too")
        eval_sets = list(eval_sets or [])
        names = [s.name for s in eval_sets]
        if len(set(names)) != len(names):
            raise ValueError(f"data.eval_sets names must be unique, got {names}")
        self.templates = list(templates or DEFAULT_TEMPLATES)
        check_templates(self.templates, "data.templates")
        self.eval_templates = list(eval_templates) if eval_templates else self.templates
        for s in eval_sets:
            check_templates(s.templates or self.eval_templates, f"data.eval_sets[{s.name}].templates")
        self.eval_sets = eval_sets
        self.retrieved_batch_size = retrieved_batch_size or batch_size
        self.io: BackboneIO | None = None
        self.streams: dict[str, Dataset] = {}
        self.evals: list[LabelledImages] = []

    def setup(self, stage: str) -> None:
        """Read and check every table in every process, before any worker starts."""
        if self.io is not None:
            return
        hp = self.hparams
        self.io = create_io(hp.backbone, hp.backbone_config, hp.pretrained)
        if hp.finetune is not None:
            self.streams["finetune"] = FinetuneImages(hp.finetune, hp.classnames, self.templates,
                                                      self.io.train_transform, hp.captions)
        if hp.retrieved is not None:
            world = self.trainer.world_size if self.trainer is not None else 1
            self.streams["retrieved"] = ImageTextPairs(hp.retrieved, self.io.train_transform,
                                                       min_pairs=self.retrieved_batch_size * world)
        if "finetune" in self.streams and len(self.streams["finetune"]) < hp.batch_size:
            raise ValueError(f"data.finetune has {len(self.streams['finetune'])} images, fewer than "
                             f"data.batch_size={hp.batch_size}; lower the batch size")
        self.evals = [
            LabelledImages(s.manifest, s.classnames, self.io.eval_transform, what=f"data.eval_sets[{s.name}]")
            for s in self.eval_sets
        ]

    @property
    def eval_specs(self) -> list[EvalSpec]:
        """Class names and templates of each evaluation set, in `dataloader_idx` order."""
        return [
            EvalSpec(s.name, d.classnames, list(s.templates) if s.templates else self.eval_templates)
            for s, d in zip(self.eval_sets, self.evals, strict=True)
        ]

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            drop_last=train,  # equal batches on every process: the gathered contrastive loss needs them
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=TokenizingCollate(self.io.tokenizer),
        )

    def train_dataloader(self) -> CombinedLoader:
        sizes = {"finetune": self.hparams.batch_size, "retrieved": self.retrieved_batch_size}
        loaders = {name: self._loader(ds, sizes[name], train=True) for name, ds in self.streams.items()}
        # Cycle the shorter stream so every step sees every stream; run length is set by max_steps.
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(d, self.hparams.eval_batch_size, train=False) for d in self.evals]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

