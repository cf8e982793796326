"""The world models shipped with the package: pretrained world CLIPs per demo world, and the world captioner.

They stand in for OpenAI's CLIP and BLIP-2: a user (and the demo) loads them by tag, as an open_clip
pretrained tag, instead of pretraining on every machine, so results no longer hang on one machine's float
kernels during pretraining. `weights/manifest.json` records, per model, what made it (world config, model
config, recipe, steps), what it scores, and the sha256 every load checks.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

WEIGHTS_DIR = Path(__file__).with_name("weights")
MANIFEST = WEIGHTS_DIR / "manifest.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@cache
def manifest() -> dict[str, Any]:
    """The shipped manifest (`{"world_clip": {tag: entry}, "captioner": {tag: entry}}`); empty when none shipped."""
    if not MANIFEST.is_file():
        return {"world_clip": {}, "captioner": {}}
    return json.loads(MANIFEST.read_text())


def _checked(path: Path, expected: str, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} is listed in {MANIFEST} but missing; reinstall anchor_clip")
    found = sha256(path)
    if found != expected:
        raise ValueError(f"{what}: {path} has sha256 {found}, {MANIFEST} records {expected}; the file is damaged, "
                         "reinstall anchor_clip")
    return path


def world_clip_tags() -> list[str]:
    return sorted(manifest()["world_clip"])


def world_clip_entry(tag: str) -> dict[str, Any]:
    entries = manifest()["world_clip"]
    if tag not in entries:
        raise ValueError(f"no shipped world CLIP tagged {tag!r}; shipped: {sorted(entries)}")
    return entries[tag]


def world_clip_weights(tag: str) -> Path:
    """The shipped state dict of world CLIP `tag` (float16), hash-checked."""
    entry = world_clip_entry(tag)
    return _checked(WEIGHTS_DIR / entry["file"], entry["sha256"], f"world CLIP {tag!r}")


def tag_config(pretrained: str | None, config: dict | None) -> dict | None:
    """The model config a shipped tag was trained with, under `config`'s overrides, as an open_clip tag implies
    its architecture; `config` unchanged for anything but a shipped tag."""
    if pretrained not in manifest()["world_clip"]:
        return config
    recorded = world_clip_entry(pretrained)["model"]
    clash = {k: (v, config[k]) for k, v in recorded.items() if config and k in config and config[k] != v}
    if clash:
        raise ValueError(f"world_clip pretrained={pretrained!r} was trained with {recorded}; the given config "
                         f"differs in {clash} (recorded, given)")
    return {**recorded, **(config or {})}


def shipped_tag_for(pretrain_key: str) -> str | None:
    """The tag of the shipped world CLIP pretrained under this cache key (world, model and recipe), if any."""
    for tag, entry in manifest()["world_clip"].items():
        if entry["pretrain_key"] == pretrain_key:
            return tag
    return None


def captioner_dir(tag: str = "world_blip") -> Path:
    """The shipped captioner's `save_pretrained` directory, every file hash-checked."""
    entries = manifest()["captioner"]
    if tag not in entries:
        raise ValueError(f"no shipped captioner tagged {tag!r}; shipped: {sorted(entries)}")
    directory = WEIGHTS_DIR / entries[tag]["dir"]
    for name, digest in entries[tag]["sha256"].items():
        _checked(directory / name, digest, f"captioner {tag!r}")
    return directory
