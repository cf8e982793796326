"""Captioners for ARF's text-compensated anchors: BLIP / BLIP-2, open_clip CoCa, and kNN over a pool.

Each turns a batch of finetune images into captions (`Captioner.generate`); the sharded job in
`anchors.caption` drives them. `CaptionScorer` rates image–caption pairs with a CLIP for filtering.
"""

from anchor_clip.anchors.captioners.base import Captioner
from anchor_clip.anchors.captioners.blip import BlipCaptioner
from anchor_clip.anchors.captioners.coca import CocaCaptioner
from anchor_clip.anchors.captioners.knn import KnnCaptioner
from anchor_clip.anchors.captioners.scorer import CaptionScorer

__all__ = ["BlipCaptioner", "CaptionScorer", "Captioner", "CocaCaptioner", "KnnCaptioner"]
