"""anchor_clip: finetune CLIP-style models with rich-text anchors (ARF) and keep their OOD generalization."""

__version__ = "0.1.0"
