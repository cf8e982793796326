"""Readers of the registered evaluation sets; importing this package registers them (see `eval.registry`)."""

from anchor_clip.eval.readers import domainnet, imagenet, transfer  # noqa: F401
