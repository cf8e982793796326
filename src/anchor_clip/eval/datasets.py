"""Registry of evaluation-set readers: ImageNet and its shifts, DomainNet, and the zero-shot transfer suite.

A reader turns one release's on-disk layout into an `EvalDataset`: image paths with labels, the set's
class names, the prompt templates of its zero-shot head and, for sets that score an ImageNet head
(ImageNet-A/R, ObjectNet), the projection from the 1000 head classes onto the set's classes.

    >>> list_datasets("imagenet*")
    ['imagenet', 'imagenet_a', 'imagenet_r', 'imagenet_sketch', 'imagenet_v2']
    >>> dataset = build_eval_dataset("imagenet_r", "/data/imagenet-r", transform)  # doctest: +SKIP

Class names come from the releases' own files or open_clip's ImageNet metadata, never from lists
typed here; a missing file or folder raises a `ValueError` that shows the expected layout.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from anchor_clip.backbones.base import ImageTransform
from anchor_clip.data.images import LabelledImages, load_image
from anchor_clip.data.tables import check_templates
from anchor_clip.eval import masks
from anchor_clip.eval.masks import ClassSubset, LogitProjection, PooledClasses
from anchor_clip.specs import EvalSet, EvalSpec

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def format_templates(templates: Sequence[str | Callable[[str], str]]) -> list[str]:
    """Templates as format strings with a `{c}` slot ('a photo of a {c}.'), from strings or open_clip's lambdas."""
    return [t if isinstance(t, str) else t("{c}") for t in templates]


# The 80-prompt CLIP ensemble: what CLIP, WiSE-FT and FLYP score ImageNet and its shifts with.
OPENAI_TEMPLATES = format_templates(OPENAI_IMAGENET_TEMPLATES)


class LayoutError(ValueError):
    """A reader found a piece of its layout missing; `build_eval_dataset` adds the expected tree."""


class EvalDataset(Dataset):
    """A labelled evaluation set with what its zero-shot head needs.

    Items are `{"images": (3, H, W), "labels": ()}`, the batches `AnchorFinetuneModule`'s eval step reads.

    Args:
        name: set name, used in metric and table columns.
        paths: image files.
        labels: index into `classnames` per image.
        classnames: the set's classes (label i names `classnames[i]`).
        templates: prompt templates of the zero-shot head (`{c}` marks the class name).
        transform: PIL image -> (3, H, W) tensor, the backbone's eval transform; None lists the set only
            (give each model's transform with `with_transform`).
        head_classnames: classes of the head the set is scored with, when they differ from `classnames`
            (the 1000 ImageNet names for ImageNet-A/R and ObjectNet); needs `project`.
        project: maps (B, len(head_classnames)) head logits onto (B, len(classnames)).
        loader: opens a path as an RGB PIL image.
    """

    def __init__(self, name: str, paths: Sequence[str], labels: Sequence[int], classnames: Sequence[str],
                 templates: Sequence[str], transform: ImageTransform | None,
                 head_classnames: Sequence[str] | None = None, project: LogitProjection | None = None,
                 loader: Callable[[str], Image.Image] = load_image) -> None:
        if not paths:
            raise ValueError(f"{name}: the evaluation set has no images")
        if len(paths) != len(labels):
            raise ValueError(f"{name}: {len(paths)} paths but {len(labels)} labels")
        check_templates(templates, f"{name}.templates")
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        if self.labels.min() < 0 or self.labels.max() >= len(classnames):
            raise ValueError(f"{name}: labels span [{int(self.labels.min())}, {int(self.labels.max())}] but the set "
                             f"has {len(classnames)} classes")
        if (head_classnames is None) != (project is None):
            raise ValueError(f"{name}: head_classnames and project go together (a head wider than the set's "
                             "classes needs a projection onto them)")
        if project is not None and (project.num_classes, project.num_head_classes) != (
                len(classnames), len(head_classnames)):
            raise ValueError(f"{name}: the projection maps {project.num_head_classes} -> {project.num_classes} "
                             f"classes, but the head has {len(head_classnames)} and the set {len(classnames)}")
        self.name = name
        self.paths = list(paths)
        self.classnames = list(classnames)
        self.templates = list(templates)
        self.head_classnames = list(head_classnames) if head_classnames is not None else self.classnames
        self.project = project
        self.transform = transform
        self.loader = loader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if self.transform is None:
            raise ValueError(f"{self.name}: no image transform; read the set through with_transform(transform)")
        return {"images": self.transform(self.loader(self.paths[index])), "labels": self.labels[index]}

    @property
    def spec(self) -> EvalSpec:
        """What `AnchorFinetuneModule.build_heads` needs: the *head* class names and the templates."""
        return EvalSpec(self.name, self.head_classnames, self.templates, self.project)

    def with_transform(self, transform: ImageTransform | None) -> EvalDataset:
        """The same set read with another backbone's transform (the listing is not redone)."""
        other = copy.copy(self)
        other.transform = transform
        return other


def from_eval_set(eval_set: EvalSet, transform: ImageTransform | None, default_templates: Sequence[str]) -> EvalDataset:
    """An `EvalDataset` from a plain manifest set (`filepath,label` + class names, as in `data.eval_sets`)."""
    images = LabelledImages(eval_set.manifest, eval_set.classnames, transform, what=f"eval_sets[{eval_set.name}]")
    templates = eval_set.templates or default_templates
    return EvalDataset(eval_set.name, images.paths, images.labels.tolist(), images.classnames, templates, transform)


# -- registry ----------------------------------------------------------------------------------------------
Reader = Callable[[str, Path, ImageTransform | None], EvalDataset]
Role = Literal["id", "shift", "transfer"]


@dataclass(frozen=True)
class DatasetInfo:
    """A registered reader and where its set sits in the paper's tables.

    Attributes:
        name: registry name.
        reader: `(name, root, transform) -> EvalDataset`.
        layout: the expected directory tree under the root, shown in errors.
        benchmark: the table the set belongs to ('imagenet', 'domainnet', 'transfer').
        role: 'id' (the finetuning distribution), 'shift' (a shift of the benchmark's id set) or 'transfer'.
    """

    name: str
    reader: Reader
    layout: str
    benchmark: str
    role: Role


_DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(name: str, *, layout: str, benchmark: str, role: Role) -> Callable[[Reader], Reader]:
    """Function decorator adding a reader under `name` (warns when one is replaced)."""

    def wrap(reader: Reader) -> Reader:
        if name in _DATASETS and _DATASETS[name].reader is not reader:
            warnings.warn(f"evaluation dataset {name!r} re-registered", stacklevel=2)
        _DATASETS[name] = DatasetInfo(name, reader, layout.strip("\n"), benchmark, role)
        return reader

    return wrap


def list_datasets(pattern: str = "*") -> list[str]:
    """Registered dataset names matching a shell-style pattern, sorted."""
    return sorted(n for n in _DATASETS if fnmatch.fnmatch(n, pattern))


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of `name`; unknown names raise listing the available ones."""
    if name not in _DATASETS:
        close = difflib.get_close_matches(name, _DATASETS, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"unknown evaluation dataset {name!r}; available: {list_datasets()}.{hint}")
    return _DATASETS[name]


def build_eval_dataset(name: str, root: str | os.PathLike, transform: ImageTransform | None = None,
                       templates: Sequence[str] | None = None) -> EvalDataset:
    """Read a registered dataset from its release layout under `root`.

    Args:
        name: registry name (see `list_datasets()`).
        root: the dataset's root folder, laid out as `dataset_info(name).layout` shows.
        transform: PIL image -> (3, H, W) tensor, the backbone's eval transform (None: set it later).
        templates: prompt templates replacing the set's defaults.
    """
    info = dataset_info(name)
    root = Path(root).expanduser()
    try:
        if not root.is_dir():
            raise LayoutError(f"root {str(root)!r} is not a directory")
        dataset = info.reader(name, root, transform)
    except LayoutError as err:
        raise ValueError(f"{name}: {err}.\nExpected layout:\n{info.layout}") from None
    if templates is not None:
        dataset.templates = format_templates(templates)
    return dataset


# -- layout helpers -----------------------------------------------------------------------------------------
def _dir(path: Path) -> Path:
    if not path.is_dir():
        raise LayoutError(f"folder {str(path)!r} does not exist")
    return path


def _file(path: Path) -> Path:
    if not path.is_file():
        raise LayoutError(f"file {str(path)!r} does not exist")
    return path


def _subdirs(path: Path) -> list[str]:
    names = sorted(entry.name for entry in os.scandir(_dir(path)) if entry.is_dir())
    if not names:
        raise LayoutError(f"{str(path)!r} has no class folders")
    return names


def _images(folder: Path) -> list[str]:
    return sorted(e.path for e in os.scandir(folder) if e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS)


def _folder_samples(base: Path, folders: Sequence[str]) -> tuple[list[str], list[int]]:
    """Images of `base/<folders[i]>/*` with label i."""
    paths, labels = [], []
    for label, folder in enumerate(folders):
        files = _images(_dir(base / folder))
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise LayoutError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the class folders of {str(base)!r}")
    return paths, labels


def _check_wnids(folders: Sequence[str], where: Path) -> None:
    wnids = masks.imagenet_wnids()
    if list(folders) != wnids:
        missing, extra = sorted(set(wnids) - set(folders)), sorted(set(folders) - set(wnids))
        raise LayoutError(f"{str(where)!r} must hold one folder per ImageNet class ({len(wnids)} wnids); found "
                          f"{len(folders)} folders, missing {missing[:5]}, unexpected {extra[:5]}")


# -- ImageNet and its distribution shifts --------------------------------------------------------------------
def _full_imagenet(name: str, base: Path, transform: ImageTransform | None) -> EvalDataset:
    folders = _subdirs(base)
    _check_wnids(folders, base)
    paths, labels = _folder_samples(base, folders)
    return EvalDataset(name, paths, labels, masks.imagenet_classnames(), OPENAI_TEMPLATES, transform)


@register_dataset("imagenet", benchmark="imagenet", role="id", layout="""
  <root>/
    val/
      n01440764/*.JPEG      one folder per ImageNet class (1000 wnids), sorted = label order
      ...""")
def _imagenet(name: str, root: Path, transform: ImageTransform | None) -> EvalDataset:
    return _full_imagenet(name, root / "val", transform)


@register_dataset("imagenet_sketch", benchmark="imagenet", role="shift", layout="""
  <root>/
    sketch/
      n01440764/*.JPEG      one folder per ImageNet class (1000 wnids)
      ...""")
def _imagenet_sketch(name: str, root: Path, transform: ImageTransform | None) -> EvalDataset:
    return _full_imagenet(name, root / "sketch", transform)


@register_dataset("imagenet_v2", benchmark="imagenet", role="shift", layout="""
  <root>/                   e.g. imagenetv2-matched-frequency-format-val/
    0/*.jpeg                folder name = ImageNet class index 0..999
    1/*.jpeg
    ...""")
def _imagenet_v2(name: str, root: Path, transform: ImageTransform | None) -> EvalDataset:
    classnames = masks.imagenet_classnames()
    folders = _subdirs(root)
    if not all(f.isdigit() and int(f) < len(classnames) for f in folders):
        odd = [f for f in folders if not (f.isdigit() and int(f) < len(classnames))]
        raise LayoutError(f"class folders must be ImageNet indices 0..{len(classnames) - 1}, found {odd[:5]}")
    paths, positions = _folder_samples(root, folders)
    labels = [int(folders[p]) for p in positions]
    return EvalDataset(name, paths, labels, classnames, OPENAI_TEMPLATES, transform)


def _imagenet_subset(name: str, root: Path, transform: ImageTransform | None) -> EvalDataset:
    """ImageNet-A/R: the classes are the wnid folders present (200 in the releases), scored on the 1000-way head."""
    folders = _subdirs(root)
    position = {wnid: i for i, wnid in enumerate(masks.imagenet_wnids())}
    unknown = [f for f in folders if f not in position]
    if unknown:
        raise LayoutError(f"folders {unknown[:5]} are not ImageNet wnids")
    indices = [position[f] for f in folders]
    head = masks.imagenet_classnames()
    paths, labels = _folder_samples(root, folders)
    return EvalDataset(name, paths, labels, [head[i] for i in indices], OPENAI_TEMPLATES, transform,
                       head_classnames=head, project=ClassSubset(indices, len(head)))


_SUBSET_LAYOUT = """
  <root>/                   e.g. imagenet-{}/
    n01443537/*.jpg         one folder per class of the set (200 ImageNet wnids)
    ..."""
register_dataset("imagenet_a", benchmark="imagenet", role="shift", layout=_SUBSET_LAYOUT.format("a"))(_imagenet_subset)
register_dataset("imagenet_r", benchmark="imagenet", role="shift", layout=_SUBSET_LAYOUT.format("r"))(_imagenet_subset)


def _load_without_border(path: str, border: int = 2) -> Image.Image:
    """ObjectNet images carry a thin red frame; the ObjectNet protocol of WiSE-FT/FLYP crops 2 px off each side."""
    return ImageOps.crop(load_image(path), border=border)


@register_dataset("objectnet", benchmark="imagenet", role="shift", layout="""
  <root>/                   objectnet-1.0/
    images/
      air_freshener/*.png   one folder per ObjectNet class
      ...
    mappings/
      folder_to_objectnet_label.json
      objectnet_to_imagenet_1k.json
      imagenet_to_label_2012_v2
      pytorch_to_imagenet_2012_id.json""")
def _objectnet(name: str, root: Path, transform: ImageTransform | None) -> EvalDataset:
    mappings = _dir(root / "mappings")
    for file in ("folder_to_objectnet_label.json", "objectnet_to_imagenet_1k.json", "imagenet_to_label_2012_v2",
                 "pytorch_to_imagenet_2012_id.json"):
        _file(mappings / file)
    head = masks.imagenet_classnames()
    folders, labels, groups = masks.objectnet_classes(mappings, len(head))
    paths, positions = _folder_samples(_dir(root / "images"), folders)
    return EvalDataset(name, paths, positions, labels, OPENAI_TEMPLATES, transform, head_classnames=head,
                       project=PooledClasses(groups, len(head)), loader=_load_without_border)


# -- DomainNet --------------------------------------------------------------------------------------------------
DOMAINNET_DOMAINS = ("real", "clipart", "infograph", "painting", "quickdraw", "sketch")


def _domainnet(name: str, root: Path, transform: ImageTransform | None, domain: str) -> EvalDataset:
    """`<domain>_test.txt` lines read `<domain>/<class>/<file> <label>`; the class folder names the label."""
    split = _file(root / f"{domain}_test.txt")
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


# -- zero-shot transfer suite (CoOp split files) ------------------------------------------------------------------
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
    split = json.loads(_file(root / spec.split_file).read_text())
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
    images = _dir(root / spec.image_dir) if spec.image_dir else root
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
    variants = [v.strip() for v in _file(root / "variants.txt").read_text().splitlines() if v.strip()]
    position = {v: i for i, v in enumerate(variants)}
    images = _dir(root / "images")
    paths, labels = [], []
    for line in _file(root / "images_variant_test.txt").read_text().splitlines():
        if not line.strip():
            continue
        image_id, _, variant = line.strip().partition(" ")
        if variant not in position:
            raise LayoutError(f"images_variant_test.txt names variant {variant!r}, which variants.txt lacks")
        paths.append(str(images / f"{image_id}.jpg"))
        labels.append(position[variant])
    return EvalDataset(name, paths, labels, variants, ["a photo of a {c}, a type of aircraft."], transform)
