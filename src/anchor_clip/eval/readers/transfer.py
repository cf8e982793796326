"""The zero-shot transfer suite, read from CoOp's split files (and FGVC-Aircraft's own)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from anchor_clip.backbones.base import ImageTransform
from anchor_clip.eval.datasets import EvalDataset, LayoutError
from anchor_clip.eval.readers.layout import (
    require_dir,
    require_file,
)
from anchor_clip.eval.registry import register_dataset


@dataclass(frozen=True)
class _CoOpSet:
    split_file: str  # split_zhou_<Name>.json at the root
    image_dir: str  # folder the split's relative paths start in ('' = the root)
    template: str  # CoOp's single prompt for the set (Zhou et al., IJCV 2022)


TRANSFER_SETS = {
    "caltech101": _CoOpSet("split_zhou_Caltech101.json", "101_ObjectCategories", "a photo of a {c}."),
    "oxford_pets": _CoOpSet("split_zhou_OxfordPets.json", "images", "a photo of a {c}, a type of pet."),
    "stanford_cars": _CoOpSet("split_zhou_StanfordCars.json", "", "a photo of a {c}."),
    "flowers102": _CoOpSet("split_zhou_OxfordFlowers.json", "jpg", "a photo of a {c}, a type of flower."),
    "food101": _CoOpSet("split_zhou_Food101.json", "images", "a photo of {c}, a type of food."),
    "sun397": _CoOpSet("split_zhou_SUN397.json", "SUN397", "a photo of a {c}."),
    "dtd": _CoOpSet("split_zhou_DescribableTextures.json", "images", "{c} texture."),
    "eurosat": _CoOpSet("split_zhou_EuroSAT.json", "2750", "a centered satellite photo of {c}."),
    "ucf101": _CoOpSet("split_zhou_UCF101.json", "UCF-101-midframes", "a photo of a person doing {c}."),
}


def _coop_split(name: str, root: Path, transform: ImageTransform | None, spec: _CoOpSet) -> EvalDataset:
    """The `test` split of a CoOp split file: `[[relpath, label, classname], ...]`."""
    split = json.loads(require_file(root / spec.split_file).read_text())
    if not isinstance(split, dict) or not split.get("test"):
        raise LayoutError(f"{spec.split_file} has no 'test' list of [relpath, label, classname] entries")
    names: dict[int, str] = {}
    # Every split names classes; reading all of them keeps the label space whole if a class misses the test split.
    for part in split.values():
        for _, label, classname in part:
            classname = str(classname).replace("_", " ")  # CoOp prompts with spaces ('Apply Eye Makeup')
            if names.setdefault(int(label), classname) != classname:
                raise LayoutError(f"{spec.split_file} names label {label} both {names[int(label)]!r} and {classname!r}")
    if sorted(names) != list(range(len(names))):
        raise LayoutError(f"{spec.split_file} labels are not 0..C-1 (found {len(names)} labels up to {max(names)})")
    images = require_dir(root / spec.image_dir) if spec.image_dir else root
    paths = [str(images / relpath) for relpath, _, _ in split["test"]]
    labels = [int(label) for _, label, _ in split["test"]]
    return EvalDataset(name, paths, labels, [names[i] for i in range(len(names))], [spec.template], transform)


for _name, _spec in TRANSFER_SETS.items():
    register_dataset(_name, benchmark="transfer", role="transfer", layout=f"""
  <root>/                   CoOp layout (see CoOp's DATASETS.md)
    {_spec.split_file}  {{"test": [[relpath, label, classname], ...], ...}}
    {_spec.image_dir or '.'}/...  images, relpath resolves here""")(partial(_coop_split, spec=_spec))


@register_dataset("fgvc_aircraft", benchmark="transfer", role="transfer", layout="""
  <root>/                   fgvc-aircraft-2013b/data/ (CoOp: fgvc_aircraft/)
    variants.txt            one variant name per line = label order
    images_variant_test.txt lines '<image id> <variant name>'
    images/<image id>.jpg""")
def _fgvc_aircraft(name: str, root: Path, transform: ImageTransform | None) -> EvalDataset:
    if (root / "fgvc-aircraft-2013b" / "data").is_dir():  # torchvision's download root
        root = root / "fgvc-aircraft-2013b" / "data"
    variants = [v.strip() for v in require_file(root / "variants.txt").read_text().splitlines() if v.strip()]
    position = {v: i for i, v in enumerate(variants)}
    images = require_dir(root / "images")
    paths, labels = [], []
    for line in require_file(root / "images_variant_test.txt").read_text().splitlines():
        if not line.strip():
            continue
        image_id, _, variant = line.strip().partition(" ")
        if variant not in position:
            raise LayoutError(f"images_variant_test.txt names variant {variant!r}, which variants.txt lacks")
        paths.append(str(images / f"{image_id}.jpg"))
        labels.append(position[variant])
    return EvalDataset(name, paths, labels, variants, ["a photo of a {c}, a type of aircraft."], transform)
