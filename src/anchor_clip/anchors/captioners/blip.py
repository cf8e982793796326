"""BLIP / BLIP-2 captioners through Hugging Face transformers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from anchor_clip.anchors.captioners.base import Captioner
from anchor_clip.precision import Precision, check_precision


class _ImageProcessorTransform:
    """A Hugging Face image processor as a per-image transform: PIL -> (3, H, W) pixel values."""

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor

    def __call__(self, image: Image.Image) -> Tensor:
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


class BlipCaptioner(Captioner):
    """BLIP or BLIP-2 from Hugging Face transformers; the architecture is read from the model's config.

    Args:
        model: a Hub id (``Salesforce/blip-image-captioning-large``, ``Salesforce/blip2-opt-2.7b``) or a local
            directory holding the model and its processor (`save_pretrained` output).
        prompt: text the caption continues. BLIP captions start with it (``"a picture of"`` is BLIP's own
            training prefix); for BLIP-2 it is an instruction and only the continuation is kept.
        max_new_tokens: caption length limit in tokens.
        num_beams: beam width; 1 is greedy decoding.
        generate_kwargs: further `generate` arguments (``repetition_penalty``, ``min_new_tokens``, ...).
    """

    def __init__(
        self,
        model: str = "Salesforce/blip-image-captioning-large",
        prompt: str | None = None,
        max_new_tokens: int = 30,
        num_beams: int = 3,
        generate_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.model_name = model
        self.prompt = prompt
        self.generate_kwargs = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, **(generate_kwargs or {})}

    def settings(self) -> dict[str, Any]:
        return {"kind": "blip", "model": self.model_name, "prompt": self.prompt, "generate": self.generate_kwargs}

    def setup(self, device: str = "cpu", precision: Precision = "32") -> None:
        from transformers import AutoConfig, AutoProcessor, Blip2ForConditionalGeneration, BlipForConditionalGeneration

        classes = {"blip": BlipForConditionalGeneration, "blip-2": Blip2ForConditionalGeneration}
        model_type = AutoConfig.from_pretrained(self.model_name).model_type
        if model_type not in classes:
            raise ValueError(
                f"{self.model_name!r} is a {model_type!r} model; BlipCaptioner runs {sorted(classes)} models. "
                "Use CocaCaptioner for open_clip CoCa, or subclass Captioner for other architectures."
            )
        self.dtype = check_precision(precision)
        self.device = torch.device(device)
        # Half-precision weights (not autocast) are how BLIP checkpoints are meant to run on GPU.
        self.model = classes[model_type].from_pretrained(self.model_name, dtype=self.dtype).to(self.device).eval()
        processor = AutoProcessor.from_pretrained(self.model_name)
        self.tokenizer = processor.tokenizer
        self.transform = _ImageProcessorTransform(processor.image_processor)
        self.decoder_only = model_type == "blip-2" and not self.model.config.text_config.is_encoder_decoder
        self.prompt_ids = self._prompt_ids(model_type)

    def _prompt_ids(self, model_type: str) -> Tensor | None:
        """(1, L) input ids of the prompt, or None for BLIP's own start token."""
        if model_type == "blip":
            if self.prompt is None:
                return None
            # BLIP swaps the leading [CLS] for its decoder start token and drops the trailing [SEP].
            return self.tokenizer(self.prompt, return_tensors="pt").input_ids
        config = self.model.config
        # BLIP-2 reads the query-token embeddings at these placeholder positions (what Blip2Processor inserts);
        # without a prompt the language model starts from its BOS token, as in Blip2ForConditionalGeneration.
        text = self.tokenizer(self.prompt).input_ids if self.prompt else [config.text_config.bos_token_id]
        return torch.tensor([[config.image_token_index] * config.num_query_tokens + list(text)])

    @torch.inference_mode()
    def generate(self, pixels: Tensor, label_names: Sequence[str] | None = None) -> dict[str, list]:
        batch = pixels.shape[0]
        inputs = {"pixel_values": pixels.to(self.device, self.dtype)}
        if self.prompt_ids is not None:
            # A copy per image: BLIP writes its start token into input_ids in place.
            inputs["input_ids"] = self.prompt_ids.to(self.device).repeat(batch, 1)
        tokens = self.model.generate(**inputs, **self.generate_kwargs)  # (B, L')
        if self.decoder_only:
            # A decoder-only language model returns its input ahead of the new tokens; keep only the caption.
            tokens = tokens[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return {"caption": [text.strip() for text in texts]}
