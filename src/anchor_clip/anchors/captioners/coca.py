"""open_clip CoCa captioning, with the sampling fix its generate() needs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from anchor_clip.anchors.captioners.base import Captioner
from anchor_clip.backbones import create_backbone
from anchor_clip.precision import Precision, autocast


def _enable_coca_sampling() -> None:
    """Re-enable CoCa's sampling decoders where open_clip switched all of CoCa generation off.

    open_clip 3.3 disables `CoCa.generate` when `transformers.BeamSearchScorer` cannot be imported, which is
    the case from transformers 5 on (open_clip #1129), although only beam search needs it. The imports before
    that one succeeded, so restoring the two logits warpers brings back ``generation_type="top_k"/"top_p"``
    exactly as open_clip implements them.
    """
    from open_clip import coca_model

    if coca_model._has_transformers:
        return
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    needed = (
        "LogitsProcessorList",
        "MinLengthLogitsProcessor",
        "RepetitionPenaltyLogitsProcessor",
        "MaxLengthCriteria",
        "StoppingCriteriaList",
    )
    missing = [name for name in needed if not hasattr(coca_model, name)]
    if missing:
        raise ValueError(
            f"open_clip's CoCa generation lacks {missing} from transformers; install a transformers "
            "version open_clip supports (pip install 'transformers<5')."
        )
    coca_model.GENERATION_TYPES.update(top_k=TopKLogitsWarper, top_p=TopPLogitsWarper)
    coca_model._has_transformers = True


class CocaCaptioner(Captioner):
    """open_clip CoCa, decoding with `CoCa.generate`, built through the open_clip backbone adapter.

    Args:
        model: an open_clip CoCa name (``coca_ViT-L-14``), or None with `config`.
        pretrained: a pretrained tag (``mscoco_finetuned_laion2B-s13B-b90k``) or a checkpoint file.
        config: an open_clip CoCa config dict (with ``multimodal_cfg``) instead of a name; random weights
            unless `pretrained` is a checkpoint file.
        generation_type: ``top_k`` with ``top_k=1`` (the default) is greedy and deterministic; ``top_p``
            samples; ``beam_search`` needs transformers < 5.
        seq_len: caption length limit in tokens, start token included.
        generate_kwargs: further `CoCa.generate` arguments (``top_k``, ``top_p``, ``temperature``,
            ``min_seq_len``, ``num_beams``, ``repetition_penalty``).
    """

    def __init__(
        self,
        model: str | None = None,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        generation_type: Literal["top_k", "top_p", "beam_search"] = "top_k",
        seq_len: int = 30,
        generate_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.spec = f"open_clip:{model}" if model else "open_clip"
        self.pretrained, self.config = pretrained, config
        defaults = {"top_k": 1} if generation_type == "top_k" else {}
        self.generate_kwargs = {
            "generation_type": generation_type,
            "seq_len": seq_len,
            **defaults,
            **(generate_kwargs or {}),
        }

    def settings(self) -> dict[str, Any]:
        return {
            "kind": "coca",
            "spec": self.spec,
            "pretrained": self.pretrained,
            "config": self.config,
            "generate": self.generate_kwargs,
        }

    def setup(self, device: str = "cpu", precision: Precision = "32") -> None:
        import open_clip
        from open_clip import coca_model

        _enable_coca_sampling()
        if self.generate_kwargs["generation_type"] == "beam_search" and not hasattr(coca_model, "BeamSearchScorer"):
            raise ValueError(
                "CoCa beam search needs transformers.BeamSearchScorer, which this transformers version "
                "lacks; use generation_type='top_k' (greedy) or install 'transformers<5'."
            )
        backbone = create_backbone(self.spec, pretrained=self.pretrained, config=self.config)
        if not isinstance(backbone.model, open_clip.CoCa):
            raise ValueError(
                f"{self.spec} (config={self.config is not None}) is a {type(backbone.model).__name__}, "
                "not a CoCa model; pick a coca_* model or a config with 'multimodal_cfg'."
            )
        self.tokenizer = backbone.io.tokenizer
        if not hasattr(self.tokenizer, "sot_token_id"):
            raise ValueError(f"CocaCaptioner decodes with open_clip's CLIP BPE tokenizer, got {type(self.tokenizer)}")
        self.device = torch.device(device)
        self.precision = precision
        self.model = backbone.model.to(self.device).eval()
        self.transform = backbone.io.eval_transform

    def _decode(self, ids: list[int]) -> str:
        """Token ids after the start token, up to the end token, as text."""
        tok = self.tokenizer
        ids = ids[1:] if ids and ids[0] == tok.sot_token_id else ids
        if tok.eot_token_id in ids:
            ids = ids[: ids.index(tok.eot_token_id)]
        return tok.decode(ids).strip()

    @torch.inference_mode()
    def generate(self, pixels: Tensor, label_names: Sequence[str] | None = None) -> dict[str, list]:
        with autocast(self.device, self.precision):
            tokens = self.model.generate(
                pixels.to(self.device),
                sot_token_id=self.tokenizer.sot_token_id,
                eos_token_id=self.tokenizer.eot_token_id,
                **self.generate_kwargs,
            )  # (B, L')
        return {"caption": [self._decode(row) for row in tokens.tolist()]}
