"""DomainNet: one set per domain, read from the release's `<domain>_test.txt` split files."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from anchor_clip.backbones.base import ImageTransform
from anchor_clip.eval.datasets import OPENAI_TEMPLATES, EvalDataset, LayoutError
from anchor_clip.eval.readers.layout import (
    require_file,
)
from anchor_clip.eval.registry import register_dataset

DOMAINNET_DOMAINS = ("real", "clipart", "infograph", "painting", "quickdraw", "sketch")


def _domainnet(name: str, root: Path, transform: ImageTransform | None, domain: str) -> EvalDataset:
    """`<domain>_test.txt` lines read `<domain>/<class>/<file> <label>`; the class folder names the label."""
    split = require_file(root / f"{domain}_test.txt")
    paths, labels, names = [], [], {}
    for number, line in enumerate(split.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        relpath, _, label = line.strip().rpartition(" ")
        if not relpath or not label.isdigit() or len(Path(relpath).parts) < 3:
            raise LayoutError(f"{split.name} line {number} is {line!r}, expected '<domain>/<class>/<file> <label>'")
        classname = Path(relpath).parts[1].replace("_", " ")
        if names.setdefault(int(label), classname) != classname:
            raise LayoutError(f"{split.name} gives label {label} to classes {names[int(label)]!r} and {classname!r}")
        paths.append(str(root / relpath))
        labels.append(int(label))
    gaps = sorted(set(range(max(names, default=-1) + 1)) - set(names))
    if not names or gaps:
        raise LayoutError(f"{split.name} must cover labels 0..C-1; it has {len(names)} classes, missing {gaps[:5]}")
    return EvalDataset(name, paths, labels, [names[i] for i in range(len(names))], OPENAI_TEMPLATES, transform)


for _domain in DOMAINNET_DOMAINS:
    register_dataset(f"domainnet_{_domain}", benchmark="domainnet", role="id" if _domain == "real" else "shift",
                     layout=f"""
  <root>/                   DomainNet (the 'cleaned' release)
    {_domain}_test.txt      lines '{_domain}/<class>/<file>.jpg <label>'
    {_domain}/
      aircraft_carrier/*.jpg
      ...""")(partial(_domainnet, domain=_domain))
