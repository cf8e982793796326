"""Offline jobs that build ARF's anchor streams (retrieved image-text pairs, captions)."""
