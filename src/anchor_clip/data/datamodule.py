"""AnchorDataModule: ARF's training streams and any number of named evaluation sets.

Training batches are dicts keyed by stream (Lightning's `CombinedLoader`):
    {"finetune": {"images": (B,3,H,W), "labels": (B,), "texts": (B,L), "captions": (B,L)?, "skipped": [...]},
     "retrieved": {"images": (R,3,H,W), "texts": (R,L), "skipped": [...]}}
The caption stream rides inside the finetune batch because its images *are* the finetune images.
Texts are tokenized in the workers, with the tokenizer of the linked backbone (no weights loaded).
`skipped` lists the files the loader could not read (see `data.unreadable`); `BadDataMonitor` consumes it.

The training order is `StreamSampler`'s: seeded by Lightning's global seed, sharded over processes, and
saved in checkpoints (`state_dict`) so that a run resumed mid-epoch reads the batches the interrupted run
had not reached, in the same order and with the same augmentations.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, default_collate

from anchor_clip.backbones import check_spec, create_io
from anchor_clip.backbones.base import BackboneIO, Tokenizer
from anchor_clip.data.finetune import FinetuneImages
from anchor_clip.data.images import LabelledImages
from anchor_clip.data.pairs import ImageTextPairs
from anchor_clip.data.sampling import StreamSampler
from anchor_clip.data.tables import check_templates
from anchor_clip.data.unreadable import SKIPPED, GuardedItems, check_files
from anchor_clip.specs import DEFAULT_TEMPLATES, EvalSet, EvalSpec

TEXT_KEYS = ("texts", "captions")
TRAIN_STREAMS = ("finetune", "retrieved")  # the streams with images; captions ride in the finetune stream


@dataclass(frozen=True)
class DataSource:
    """Where a stream or evaluation set comes from, for messages about its files.

    Attributes:
        what: its config field, e.g. ``data.retrieved``.
        table: its manifest file.
        size: its number of images.
    """

    what: str
    table: str
    size: int


class TokenizingCollate:
    """Default collation, with string fields turned into (B, L) token ids (runs in the loader workers).

    Items without images (unreadable evaluation images, see `GuardedItems`) are left out, and the files
    every item skipped are gathered into one `skipped` list, so a batch may hold fewer images than the
    batch size, or none.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict]) -> dict:
        skipped = [path for item in items for path in item.pop(SKIPPED, ())]
        items = [item for item in items if "images" in item]
        if not items:
            return {SKIPPED: skipped}
        texts = {k: self.tokenizer([item.pop(k) for item in items]) for k in TEXT_KEYS if k in items[0]}
        return {**default_collate(items), **texts, SKIPPED: skipped}


def _eval_set(value: EvalSet | dict[str, Any], index: int) -> EvalSet:
    """An `EvalSet` from itself or from its fields as a mapping (how checkpoints and YAML configs hold it)."""
    if isinstance(value, EvalSet):
        return value
    known = {f.name for f in fields(EvalSet)}
    if not isinstance(value, dict) or not {"name", "manifest", "classnames"} <= value.keys() <= known:
        raise ValueError(f"data.eval_sets[{index}] must be an EvalSet or a mapping with name, manifest, classnames "
                         f"and optionally templates, got {value!r}")
    return EvalSet(**value)


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
        batch_size: finetune images per step and *process*: the global batch is `batch_size × world size`,
            so any batch size works on any number of devices (scale it yourself to keep the global one).
        retrieved_batch_size: retrieved pairs per step and process; None = `batch_size`.
        eval_batch_size: images per evaluation step.
        num_workers: loader workers per stream.
        max_bad_fraction: the largest share of a stream's or evaluation set's images that may be missing or
            unreadable; those are skipped (and counted, `data/skipped_<stream>`), more stops the run.
        decoded_cache_mb: decode each training stream's images once into memory when they share one size and
            take at most this many MB (small images, whose file read and decode cost more than their transform);
            0 reads the files every epoch. Evaluation sets are decoded likewise when first loaded, so repeated
            evaluations read their files once. The tensors are the same either way.
        backbone: backbone spec, linked from `model.backbone` by the CLI; required (no default family).
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
        eval_sets: list[EvalSet | dict[str, Any]] | None = None,
        eval_templates: list[str] | None = None,
        batch_size: int = 128,
        retrieved_batch_size: int | None = None,
        eval_batch_size: int = 256,
        num_workers: int = 2,
        max_bad_fraction: float = 0.01,
        decoded_cache_mb: float = 0.0,
        backbone: str | None = None,
        backbone_config: dict[str, Any] | None = None,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["eval_sets"])
        if finetune is None and retrieved is None:
            raise ValueError("data: set data.finetune and/or data.retrieved; no training stream is configured")
        if finetune is not None and classnames is None:
            raise ValueError("data.classnames is required with data.finetune (a list or a file, one name per line)")
        if captions is not None and finetune is None:
            raise ValueError("data.captions pairs captions with the finetune images: set data.finetune too")
        check_spec(backbone, "data.backbone (linked from model.backbone by the CLI)")
        sizes = {"data.batch_size": batch_size, "data.retrieved_batch_size": retrieved_batch_size,
                 "data.eval_batch_size": eval_batch_size}
        bad = {k: v for k, v in sizes.items() if v is not None and (not isinstance(v, int) or v < 1)}
        if bad:
            raise ValueError(f"batch sizes must be positive integers (per process), got {bad}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if decoded_cache_mb < 0:
            raise ValueError(f"data.decoded_cache_mb must be >= 0 (0 reads the files every epoch), got "
                             f"{decoded_cache_mb}")
        if not 0.0 <= max_bad_fraction < 1.0:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1), got {max_bad_fraction}; 0 stops at the "
                             "first unreadable image, 0.01 tolerates 1%")
        eval_sets = [_eval_set(s, i) for i, s in enumerate(eval_sets or [])]
        # Plain dicts in the checkpoint: resuming loads it with torch.load(weights_only=True), which refuses classes.
        self.hparams["eval_sets"] = [asdict(s) for s in eval_sets]
        names = [s.name for s in eval_sets]
        if len(set(names)) != len(names):
            raise ValueError(f"data.eval_sets names must be unique, got {names}")
        clashes = sorted(set(names) & {*TRAIN_STREAMS, "caption"})
        if clashes:
            raise ValueError(f"data.eval_sets names {clashes} are training stream names (their skip counts share "
                             "the log key data/skipped_<name>); rename the sets")
        self.templates = list(templates or DEFAULT_TEMPLATES)
        check_templates(self.templates, "data.templates")
        self.eval_templates = list(eval_templates) if eval_templates else self.templates
        for s in eval_sets:
            check_templates(s.templates or self.eval_templates, f"data.eval_sets[{s.name}].templates")
        self.eval_sets = eval_sets
        self.retrieved_batch_size = retrieved_batch_size or batch_size
        self.max_bad_fraction = max_bad_fraction
        self.io: BackboneIO | None = None
        self.streams: dict[str, Dataset] = {}
        self.evals: list[LabelledImages] = []
        self.sources: dict[str, DataSource] = {}
        self._resume: dict[str, Any] = {}
        self._samplers: dict[str, StreamSampler] = {}
        self._evals_decoded = False

    def setup(self, stage: str) -> None:
        """Read and check every table in every process, before any worker starts.

        Every process reads the same tables and takes the same decisions, so a bad table stops all ranks
        at once rather than leaving some waiting for the others.
        """
        if self.io is not None:
            return
        hp = self.hparams
        processes = self.trainer.world_size if self.trainer is not None else 1
        self.io = create_io(hp.backbone, hp.backbone_config, hp.pretrained)
        if hp.finetune is not None:
            self.streams["finetune"] = FinetuneImages(hp.finetune, hp.classnames, self.templates,
                                                      self.io.train_transform, hp.captions)
            self.sources["finetune"] = DataSource("data.finetune", str(hp.finetune), len(self.streams["finetune"]))
        if hp.retrieved is not None:
            self.streams["retrieved"] = ImageTextPairs(hp.retrieved, self.io.train_transform,
                                                       min_pairs=self.retrieved_batch_size * processes)
            self.sources["retrieved"] = DataSource("data.retrieved", str(hp.retrieved),
                                                   len(self.streams["retrieved"]))
        if "finetune" in self.streams and len(self.streams["finetune"]) < hp.batch_size * processes:
            raise ValueError(f"data.finetune has {len(self.streams['finetune'])} images, fewer than one global "
                             f"batch (data.batch_size={hp.batch_size} × {processes} processes); lower the batch size")
        self.evals = [
            LabelledImages(s.manifest, s.classnames, self.io.eval_transform, what=f"data.eval_sets[{s.name}]")
            for s in self.eval_sets
        ]
        for s, d in zip(self.eval_sets, self.evals, strict=True):
            self.sources[s.name] = DataSource(f"data.eval_sets[{s.name}]", str(s.manifest), len(d))
        datasets = {**self.streams, **{s.name: d for s, d in zip(self.eval_sets, self.evals, strict=True)}}
        for name, source in self.sources.items():
            check_files(datasets[name].paths, source.what, source.table, self.max_bad_fraction)
        if hp.decoded_cache_mb > 0:  # after the checks: a table of missing files stops before any decoding
            for name, stream in self.streams.items():
                stream.decode_once(hp.decoded_cache_mb, self.sources[name].what)

    @property
    def eval_specs(self) -> list[EvalSpec]:
        """Class names and templates of each evaluation set, in `dataloader_idx` order."""
        return [
            EvalSpec(s.name, d.classnames, list(s.templates) if s.templates else self.eval_templates)
            for s, d in zip(self.eval_sets, self.evals, strict=True)
        ]

    def _loader(self, dataset: Dataset, batch_size: int, sampler: StreamSampler | None = None) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            GuardedItems(dataset, substitute=sampler is not None),
            batch_size=batch_size,
            sampler=sampler,
            drop_last=sampler is not None,  # equal batches on every process: the gathered contrastive loss needs them
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=TokenizingCollate(self.io.tokenizer),
        )

    def _batch_sizes(self) -> dict[str, int]:
        return {"finetune": self.hparams.batch_size, "retrieved": self.retrieved_batch_size}

    def _seed(self) -> int:
        # The seed `seed_everything` exported, as Lightning's own DistributedSampler reads it.
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def train_dataloader(self) -> CombinedLoader:
        trainer = self.trainer
        processes, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sizes = self._batch_sizes()
        # Every step sees every stream: the longest stream sets the epoch and the others cycle (see StreamSampler).
        num_batches = max(len(ds) // (sizes[name] * processes) for name, ds in self.streams.items())
        epoch, skip = self._start(num_batches, processes)
        samplers = {
            name: StreamSampler(ds, sizes[name], num_batches, seed=self._seed(), stream=name, num_replicas=processes,
                                rank=rank, start_epoch=epoch, start_batch=skip)
            for name, ds in self.streams.items()
        }
        loaders = {name: self._loader(ds, sizes[name], samplers[name]) for name, ds in self.streams.items()}
        self._samplers = samplers
        return CombinedLoader(loaders, mode="max_size_cycle")

    def _start(self, num_batches: int, processes: int) -> tuple[int, int]:
        """(epoch, consumed steps) to start reading at: the checkpoint's position when resuming, else (epoch, 0)."""
        if not self._resume:
            return (self.trainer.current_epoch if self.trainer is not None else 0), 0
        resume, self._resume = self._resume, {}  # used once: later epochs start at their beginning
        epoch, skip = resume["epoch"], resume["batches"]
        global_sizes = {k: v * processes for k, v in self._batch_sizes().items()}
        expected = {"seed": self._seed(), "global_batch_sizes": global_sizes}
        changed = {k: (resume.get(k), v) for k, v in expected.items() if resume.get(k) != v}
        if changed:
            warnings.warn(f"resuming with different data settings (checkpoint, now): {changed}; the rest of the epoch "
                          "is read in a different order than the interrupted run would have", stacklevel=2)
        if skip >= num_batches:  # the checkpoint closed its epoch
            epoch, skip = epoch + 1, 0
        return epoch, skip

    def state_dict(self) -> dict[str, Any]:
        """Where training is in the data: the epoch and its steps consumed, saved in every checkpoint."""
        trainer = self.trainer
        if trainer is None:
            return {}
        processes = trainer.world_size
        # The samplers' epoch, not the trainer's: a run that stops at max_steps counts its last epoch as done,
        # while the batches it consumed belong to the epoch the samplers are in.
        epoch = next(iter(self._samplers.values())).epoch if self._samplers else trainer.current_epoch
        return {
            "epoch": epoch,
            # batches whose step ran; a checkpoint saved in on_train_batch_end already counts its own batch
            "batches": trainer.fit_loop.epoch_loop.batch_progress.current.processed,
            "seed": self._seed(),
            "global_batch_sizes": {k: v * processes for k, v in self._batch_sizes().items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the checkpoint's data position for the next `train_dataloader`."""
        self._resume = dict(state_dict)
        # Lightning warns that a mid-epoch resume of a loader without its own state is unreliable; these
        # loaders are resumed from this position (see `_start`), so the warning does not apply to them.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")

    def val_dataloader(self) -> list[DataLoader]:
        if self.hparams.decoded_cache_mb > 0 and not self._evals_decoded:
            # on first use rather than in setup: a finetune that never validates does not pay for it
            for s, d in zip(self.eval_sets, self.evals, strict=True):
                d.decode_once(self.hparams.decoded_cache_mb, self.sources[s.name].what)
            self._evals_decoded = True
        return [self._loader(d, self.hparams.eval_batch_size) for d in self.evals]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

