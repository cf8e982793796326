"""Classifier baselines of the paper's tables: linear probe (LP), full finetuning (FT) and LP-FT.

All three train the image tower (or only a head) with cross-entropy over the finetune classes, the head
initialised from the zero-shot text head so that step 0 *is* zero-shot CLIP. LP-FT (Kumar et al., 2022) is an
LP run whose head (`init_head`) starts an FT run. Evaluation is the parent module's: sets with the finetune
classes are scored by the trained head, every other set (unseen classes) by the text tower's zero-shot head,
as a classifier finetune has nothing else for them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anchor_clip.module import AnchorFinetuneModule


class ClassifierFinetuneModule(AnchorFinetuneModule):
    """Cross-entropy finetuning of the image tower with a linear head over the finetune classes.

    Args:
        linear_probe: train only the head (LP); the backbone is frozen.
        init_head: a saved (C, D) head tensor (from an LP run) instead of the zero-shot initialisation (LP-FT).
        **kwargs: `AnchorFinetuneModule` arguments (backbone, pretrained, lr, ...); anchor weights must stay 0.
    """

    def __init__(self, linear_probe: bool = False, init_head: str | None = None, **kwargs) -> None:
        if kwargs.get("caption_weight") or kwargs.get("retrieved_weight"):
            raise ValueError("classifier baselines train on the finetune stream only; set the anchor weights to 0")
        kwargs.pop("lock_text", None)  # the text tower only made the initial head: it stays frozen
        super().__init__(lock_image=linear_probe or kwargs.pop("lock_image", False), lock_text=True, **kwargs)
        self.save_hyperparameters()
        self.head: nn.Linear | None = None
        self.classnames: list[str] = []

    def setup(self, stage: str) -> None:
        super().setup(stage)
        finetune = self.trainer.datamodule.streams.get("finetune") if self.trainer.datamodule else None
        if finetune is None:
            raise ValueError("classifier baselines need data.finetune (labelled images and their class names)")
        self.classnames = finetune.classnames
        if self.head is None:  # built once: a later validate/test run keeps the trained head
            self.head = self._initial_head(finetune.templates).to(self.device)

    @torch.no_grad()
    def _initial_head(self, templates: list[str]) -> nn.Linear:
        """(C, D) weights: the zero-shot class embeddings scaled by the temperature, or a saved LP head."""
        if self.hparams.init_head is not None:
            weight = torch.load(self.hparams.init_head, map_location="cpu", weights_only=True)
        else:
            texts = [t.format(c=c) for c in self.classnames for t in templates]
            features = self.backbone.encode_texts(texts).reshape(len(self.classnames), len(templates), -1).mean(1)
            weight = self.backbone.logit_scale * F.normalize(features, dim=-1)  # (C, D)
        head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        head.weight.copy_(weight)
        return head

    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        finetune = batch["finetune"]
        logits = self.head(self.backbone.encode_image(finetune["images"]))  # (B, D) -> (B, C)
        loss = F.cross_entropy(logits, finetune["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def param_groups(self) -> list[dict]:
        return [*super().param_groups(), {"params": list(self.head.parameters()), "weight_decay": 0.0}]

    @torch.no_grad()
    def build_heads(self) -> None:
        """Zero-shot heads for every set, then the trained head for sets with the finetune classes."""
        super().build_heads()
        for spec in self.eval_specs:
            if spec.classnames == self.classnames and spec.project is None:
                self.heads[spec.name] = self.head.weight.T  # (D, C)

    def save_head(self, path: str) -> None:
        """Save the (C, D) head for an LP-FT run's `init_head`."""
        torch.save(self.head.weight.detach().cpu(), path)
