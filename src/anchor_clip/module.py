"""AnchorFinetuneModule: FLYP finetuning with ARF's caption and retrieved anchors, as a LightningModule."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, Literal

import lightning as L
import torch
from open_clip import build_zero_shot_classifier
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from transformers import get_cosine_schedule_with_warmup

from anchor_clip.backbones import ClipBackbone, check_spec, create_backbone
from anchor_clip.callbacks import BadDataMonitor
from anchor_clip.losses import ARFLoss
from anchor_clip.specs import EvalSpec

Pairs = dict[str, tuple[Tensor, Tensor]]
NONFINITE_MODES = ("raise", "skip")


class AnchorFinetuneModule(L.LightningModule):
    """Contrastive finetuning of a two-tower model on up to three streams of pairs.

    A run stops rather than continuing silently wrong: a non-finite step raises (or is skipped, see
    `nonfinite`), and `configure_callbacks` brings `BadDataMonitor`, which counts the images the loaders
    skipped and stops a stream with too many (docs/reliability.md).

    Args:
        backbone: registry spec, e.g. ``open_clip:ViT-B-16`` or ``world_clip``; required (no default family).
        pretrained: pretrained tag or local checkpoint of the backbone; None = random init.
        backbone_config: model config dict instead of a named model (tiny test models, custom sizes).
        caption_weight: λ_cap of the caption-anchor loss; 0 skips the stream.
        retrieved_weight: λ_ret of the retrieved-anchor loss; 0 skips the stream.
        caption_fraction: share of each finetune batch whose captions enter the caption loss.
        share_image_pass: encode finetune images once for the finetune and caption losses.
        fuse_encoder_calls: one image and one text encoder call per step over all streams (terms stay separate).
        dedupe_prompts: encode each distinct class prompt of a finetune batch once (a batch of B images holds at
            most as many distinct prompts as classes × templates); features and gradients are unchanged.
        lr: peak AdamW learning rate.
        weight_decay: AdamW decay, not applied to biases, norms, embeddings or the temperature.
        betas: AdamW betas (CLIP's 0.9/0.98).
        eps: AdamW epsilon.
        warmup_steps: linear warmup before the cosine decay to 0 at the last step.
        lock_image: freeze the image tower.
        lock_text: freeze the text tower.
        grad_checkpointing: recompute activations in the backward pass to save memory.
        compile_backbone: `torch.compile` the image and text encoders for training (`compile_options` are passed
            on, e.g. ``{"mode": "max-autotune"}``); the first steps pay the compilation.
        compile_options: keyword arguments of `torch.compile`.
        channels_last: keep conv weights and input images in channels-last memory layout, which tensor-core
            convolutions (and oneDNN on CPU) prefer; a ViT has only its patch embedding as a conv.
        nonfinite: what a step with a NaN/inf loss or gradient does: ``raise`` stops the run before the update
            (the last checkpoint predates the divergence), ``skip`` drops the update and counts it
            (`train/skipped_nonfinite`); the learning-rate schedule advances either way.
    """

    def __init__(
        self,
        backbone: str | None = None,
        pretrained: str | None = None,
        backbone_config: dict[str, Any] | None = None,
        caption_weight: float = 0.0,
        retrieved_weight: float = 0.0,
        caption_fraction: float = 1.0,
        share_image_pass: bool = True,
        fuse_encoder_calls: bool = True,
        dedupe_prompts: bool = True,
        lr: float = 1e-5,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 0,
        lock_image: bool = False,
        lock_text: bool = False,
        grad_checkpointing: bool = False,
        compile_backbone: bool = False,
        compile_options: dict[str, Any] | None = None,
        channels_last: bool = False,
        nonfinite: Literal["raise", "skip"] = "raise",
    ) -> None:
        super().__init__()
        check_hyperparameters(caption_weight=caption_weight, retrieved_weight=retrieved_weight,
                              caption_fraction=caption_fraction, lr=lr, warmup_steps=warmup_steps,
                              nonfinite=nonfinite)
        self.save_hyperparameters()
        self.backbone = self.build_backbone()
        self.backbone.lock(image=lock_image, text=lock_text)
        if grad_checkpointing:
            self.backbone.set_grad_checkpointing(True)
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.compiled: dict[str, Callable[[Tensor], Tensor]] = {}  # "image"/"text" -> compiled encoder, if any
        self.weights = {"finetune": 1.0, "caption": caption_weight, "retrieved": retrieved_weight}
        self.objective = ARFLoss(self.weights)
        self.eval_specs: list[EvalSpec] = []
        self.heads: dict[str, Tensor] = {}
        self.accuracy = nn.ModuleDict()
        self.skipped_nonfinite = 0
        self._step_terms: list[dict[str, Tensor]] = []  # loss terms since the last optimizer step, for diagnosis

    # -- hooks for subclasses ------------------------------------------------------------------------------
    def build_backbone(self) -> ClipBackbone:
        """Create the backbone; override to bring a model that is not in the registry."""
        hp = self.hparams
        spec = check_spec(hp.backbone, "model.backbone")
        return create_backbone(spec, pretrained=hp.pretrained, config=hp.backbone_config)

    def encode_streams(self, batch: dict[str, dict[str, Tensor]]) -> Pairs:
        """Encode every active stream of a batch into (image_features, text_features) pairs.

        The caption stream reuses the finetune image features (ARF's text-compensated anchors are
        captions *of the finetune images*), and with `fuse_encoder_calls` all images go through the image
        tower in one call and all texts through the text tower in one call, which keeps an ARF step close
        to a FLYP step. The loss terms are unchanged by these options.
        """
        hp = self.hparams
        images: dict[str, Tensor] = {}
        texts: dict[str, Tensor] = {}
        prompt_index = None
        if "finetune" in batch:
            images["finetune"], texts["finetune"] = batch["finetune"]["images"], batch["finetune"]["texts"]
            if hp.dedupe_prompts:
                # (B, L) prompts -> (U, L) distinct ones; prompt_index[i] is the row of prompt i among them
                texts["finetune"], prompt_index = torch.unique(texts["finetune"], dim=0, return_inverse=True)
            if self.objective.active("caption"):
                if "captions" not in batch["finetune"]:
                    raise ValueError("model.caption_weight > 0 but the batch has no captions: set data.captions")
                n = max(1, round(hp.caption_fraction * len(images["finetune"])))
                texts["caption"] = batch["finetune"]["captions"][:n]
                if not hp.share_image_pass:
                    images["caption"] = images["finetune"][:n]
        if "retrieved" in batch and self.objective.active("retrieved"):
            images["retrieved"], texts["retrieved"] = batch["retrieved"]["images"], batch["retrieved"]["texts"]
        image_features = self._encode(self._encoder("image"), {s: self._layout(x) for s, x in images.items()})
        text_features = self._encode(self._encoder("text"), texts)
        if prompt_index is not None:
            text_features["finetune"] = text_features["finetune"][prompt_index]  # (U, D) -> (B, D)
        if "caption" in texts and "caption" not in image_features:
            image_features["caption"] = image_features["finetune"][: len(texts["caption"])]
        return {s: (image_features[s], text_features[s]) for s in texts}

    def _encoder(self, kind: str) -> Callable[[Tensor], Tensor]:
        return self.compiled.get(kind) or getattr(self.backbone, f"encode_{kind}")

    def _layout(self, images: Tensor) -> Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else images

    def compile_encoders(self, **options: Any) -> None:
        """Use `torch.compile`d image and text encoders for training (`options` go to `torch.compile`).

        The backbone's own methods are compiled, not the module, so state dicts keep their keys and the
        evaluation path (zero-shot heads, other batch shapes) stays eager.
        """
        self.compiled = {kind: torch.compile(getattr(self.backbone, f"encode_{kind}"), **options)
                         for kind in ("image", "text")}

    def _encode(self, encoder, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        if not inputs:
            return {}
        fusable = len({x.shape[1:] for x in inputs.values()}) == 1
        if not (self.hparams.fuse_encoder_calls and fusable):
            return {s: encoder(x) for s, x in inputs.items()}
        features = encoder(torch.cat(list(inputs.values())))  # (sum of B_s, D)
        return dict(zip(inputs, features.split([len(x) for x in inputs.values()]), strict=True))

    # -- training ------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.compile_backbone:
            self.compile_encoders(**(self.hparams.compile_options or {}))
        if self.trainer.world_size > 1:
            # Local loss with gradients through the gather: the only mode that is exact and scales (open_clip).
            self.objective = ARFLoss(self.weights, gather=self._gather, rank=self.global_rank)
        datamodule = getattr(self.trainer, "datamodule", None)
        self.eval_specs = list(getattr(datamodule, "eval_specs", []))
        # average="micro": top-1 accuracy over images, as the papers report (torchmetrics' default, "macro",
        # averages per-class recall, which differs on sets with unequal class sizes such as ImageNet-R)
        self.accuracy = nn.ModuleDict(
            {s.name: MulticlassAccuracy(num_classes=s.num_classes, top_k=1, average="micro") for s in self.eval_specs}
        )

    def configure_callbacks(self) -> list[L.Callback]:
        """The module consumes the batches, so it brings the monitor of the images their loaders skipped."""
        return [BadDataMonitor()]

    def _gather(self, x: Tensor) -> Tensor:
        return self.all_gather(x, sync_grads=True).flatten(0, 1)  # (W, B, D) -> (W*B, D)

    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        pairs = self.encode_streams(batch)
        logit_scale = self.backbone.logit_scale
        # ARF: L = L_finetune + λ_caption·L_caption + λ_retrieved·L_retrieved (terms of inactive streams absent)
        losses = self.objective(pairs, logit_scale)
        self._step_terms.append({k: v.detach() for k, v in losses.items()})
        batch_size = len(next(iter(pairs.values()))[0])
        # sync_dist: under DDP each process holds a *local* loss; their mean is the loss of the global batch
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=batch_size,
                      sync_dist=True)
        self.log("train/logit_scale", logit_scale, batch_size=batch_size)
        return losses["loss"]

    # -- divergence ----------------------------------------------------------------------------------------
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop (``raise``) or skip (``skip``) an update whose gradients or loss are not finite.

        Runs after backward, so under DDP the gradients are already averaged and every process takes the
        same decision. The check is the total gradient norm, finite only if every gradient is. With a
        fp16 `GradScaler`, overflowing gradients are routine (the scaler skips those steps and lowers its
        scale), so there the loss terms are checked instead, agreed over processes.
        Skipping sets every gradient to None: AdamW then leaves weights *and* moments as they were.
        """
        terms, self._step_terms = self._step_terms, []
        if not self._update_is_finite(terms):
            bad = sorted({name for t in terms for name, value in t.items() if not torch.isfinite(value)})
            culprit = f"train/{', train/'.join(bad)}" if bad else "gradient (every loss term is finite on this process)"
            if self.hparams.nonfinite == "raise":
                last = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none saved yet"
                raise FloatingPointError(
                    f"non-finite {culprit} at step {self.global_step}; the update was not applied. Last checkpoint: "
                    f"{last}. Lower model.lr or raise model.warmup_steps, or set model.nonfinite=skip to skip "
                    "such steps"
                )
            optimizer.zero_grad(set_to_none=True)
            self.skipped_nonfinite += 1
        self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), on_step=True, on_epoch=False)

    def _update_is_finite(self, terms: list[dict[str, Tensor]]) -> bool:
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            local = all(bool(torch.isfinite(v)) for t in terms for v in t.values())
            return self.trainer.strategy.reduce_boolean_decision(local, all=True)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["skipped_nonfinite"] = self.skipped_nonfinite

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_nonfinite = checkpoint.get("skipped_nonfinite", 0)

    def param_groups(self) -> list[dict]:
        """AdamW parameter groups; subclasses with parameters outside the backbone add theirs."""
        return self.backbone.param_groups(self.hparams.weight_decay)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.param_groups(), lr=hp.lr, betas=hp.betas, eps=hp.eps)
        total = self.trainer.estimated_stepping_batches
        scheduler = get_cosine_schedule_with_warmup(optimizer, hp.warmup_steps, int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- zero-shot evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def build_heads(self) -> None:
        """Zero-shot heads from the *current* text tower (FLYP): (D, C) per eval set, class × template mean.

        Sets with the same class names and templates (ImageNet and its shifts) share one head, so its
        prompts are encoded once.
        """
        encoder = SimpleNamespace(encode_text=lambda tokens, normalize=True: self.backbone.encode_text(tokens))
        built: dict[tuple, Tensor] = {}
        self.heads = {}
        for spec in self.eval_specs:
            key = (tuple(spec.classnames), tuple(spec.templates))
            if key not in built:
                built[key] = build_zero_shot_classifier(encoder, self.backbone.tokenize, spec.classnames,
                                                        [lambda c, t=t: t.format(c=c) for t in spec.templates],
                                                        num_classes_per_batch=64, device=self.device)
            self.heads[spec.name] = built[key]

    def on_validation_epoch_start(self) -> None:
        self.build_heads()

    def on_test_epoch_start(self) -> None:
        self.build_heads()

    def _eval_step(self, batch: dict[str, Tensor], dataloader_idx: int, stage: str) -> dict[str, Tensor] | None:
        """Update the set's accuracy; return the image features and predictions for callbacks (drift, counts)."""
        if "images" not in batch:  # every image of the batch was unreadable (counted by BadDataMonitor)
            return None
        spec = self.eval_specs[dataloader_idx]
        name = spec.name
        features = self.backbone.encode_image(self._layout(batch["images"]))
        with torch.autocast(features.device.type, enabled=False):  # heads and logits in fp32 at any precision
            logits = features.float() @ self.heads[name].float()  # (B, D) @ (D, C_head)
            if spec.project is not None:
                logits = spec.project(logits)  # (B, C_head) -> (B, C_set), e.g. ImageNet-R's 200 classes
        metric = self.accuracy[name]
        metric.update(logits, batch["labels"])
        self.log(f"{stage}/{name}/acc", metric, on_epoch=True, add_dataloader_idx=False,
                 batch_size=len(logits))
        return {"features": features, "predictions": logits.argmax(dim=-1)}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int,
                        dataloader_idx: int = 0) -> dict[str, Tensor] | None:
        return self._eval_step(batch, dataloader_idx, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor] | None:
        return self._eval_step(batch, dataloader_idx, "test")


def check_hyperparameters(caption_weight: float, retrieved_weight: float, caption_fraction: float, lr: float,
                          warmup_steps: int, nonfinite: str) -> None:
    """Refuse settings that would train silently wrong, with the accepted range in the message."""
    for name, weight in (("caption_weight", caption_weight), ("retrieved_weight", retrieved_weight)):
        if not (math.isfinite(weight) and weight >= 0.0):
            raise ValueError(f"model.{name} (a λ of ARF's loss) must be a finite number >= 0, got {weight}; "
                             "0 turns the stream off")
    if not 0.0 < caption_fraction <= 1.0:
        raise ValueError(f"model.caption_fraction must be in (0, 1], got {caption_fraction}; it is the share of each "
                         "finetune batch whose captions enter the caption loss")
    if not (math.isfinite(lr) and lr > 0.0):
        raise ValueError(f"model.lr must be a finite number > 0, got {lr}")
    if warmup_steps < 0:
        raise ValueError(f"model.warmup_steps must be >= 0, got {warmup_steps}")
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"model.nonfinite must be one of {list(NONFINITE_MODES)}, got {nonfinite!r}")
