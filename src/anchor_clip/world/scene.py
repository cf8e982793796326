"""What one image of the world shows: the attributes a caption names, sampled independently of the class.

A `Scene` is the single source of truth for an image: `render.render_scene` draws it and
`captions.describe` words it, so captions can never disagree with pixels.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import numpy as np

STYLES: tuple[str, ...] = ("photo", "sketch", "cartoon", "painting")

#: Object and background colours (RGB). Every colour can colour every class, so colour never reveals the class.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (240, 215, 40),
    "green": (45, 160, 65),
    "blue": (40, 90, 215),
    "purple": (130, 55, 180),
    "pink": (245, 125, 185),
    "brown": (125, 75, 35),
    "black": (25, 25, 25),
    "white": (245, 245, 245),
    "gray": (130, 130, 130),
}

SIZES: tuple[str, ...] = ("small", "medium", "big")
BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered", "wavy")

#: Where a single object sits (a 3 x 3 grid) and where a row / column of objects runs.
SINGLE_POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)
ROW_POSITIONS: tuple[str, ...] = ("top", "center", "bottom")
COLUMN_POSITIONS: tuple[str, ...] = ("left", "center", "right")

#: Probability of 1, 2 and 3 objects: mostly one, since a third of a 32 px image leaves ~10 px per object.
COUNT_PROBS: tuple[float, ...] = (0.6, 0.25, 0.15)
#: Minimum RGB distance between an object's colour and its background, so the silhouette stays visible.
MIN_CONTRAST = 150.0


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw and describe one image."""

    shape: str  # class name, a key of `shapes.SHAPES`
    style: str  # one of STYLES
    colour: str  # object colour, a key of COLOURS
    size: str  # one of SIZES (relative to the space the layout leaves each object)
    count: int  # 1, 2 or 3 identical objects
    arrangement: str  # "single", "row" or "column"
    position: str  # SINGLE_POSITIONS for "single", ROW_POSITIONS for "row", COLUMN_POSITIONS for "column"
    background: str  # one of BACKGROUNDS
    background_colour: str  # a key of COLOURS, contrasting with `colour`
    seed: int  # drives pixel-level jitter (rotation, textures, strokes) so rendering is a pure function


def _contrasting(colour: str) -> list[str]:
    rgb = np.asarray(COLOURS[colour], dtype=float)
    return [name for name, other in COLOURS.items() if np.linalg.norm(rgb - np.asarray(other)) >= MIN_CONTRAST]


_BACKGROUND_COLOURS: dict[str, list[str]] = {colour: _contrasting(colour) for colour in COLOURS}
_COLOUR_NAMES = tuple(COLOURS)
_COUNT_CDF = np.cumsum(COUNT_PROBS)[:-1]  # count = 1 + number of thresholds a uniform draw passes


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    # indexing beats rng.choice, which converts the options to an array on every call (~10x slower)
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator, shape: str, style: str) -> Scene:
    """Draw every attribute except the class and the style, which the split decides.

    Args:
        rng: the image's own generator (one per image keeps a world independent of how it is chunked).
        shape: class name.
        style: one of STYLES.
    """
    colour = _pick(rng, _COLOUR_NAMES)
    count = 1 + int(np.searchsorted(_COUNT_CDF, rng.random(), side="right"))
    if count == 1:
        arrangement, position = "single", _pick(rng, SINGLE_POSITIONS)
    elif rng.random() < 0.5:
        arrangement, position = "row", _pick(rng, ROW_POSITIONS)
    else:
        arrangement, position = "column", _pick(rng, COLUMN_POSITIONS)
    return Scene(
        shape=shape,
        style=style,
        colour=colour,
        size=_pick(rng, SIZES),
        count=count,
        arrangement=arrangement,
        position=position,
        background=_pick(rng, BACKGROUNDS),
        background_colour=_pick(rng, _BACKGROUND_COLOURS[colour]),
        seed=int(rng.integers(0, 2**32)),
    )


def home_context(scene: Scene) -> Scene:
    """The scene moved onto its class's home context: a background pattern fixed per class and a background
    colour fixed per (class, object colour) among those that contrast with the object.

    Downstream datasets carry such context biases (ImageNet classes co-occur with their usual surroundings);
    a finetune on them learns the context along with the object, which a world without it cannot show.
    """
    key = zlib.crc32(scene.shape.encode())  # stable across processes, unlike hash()
    colours = _BACKGROUND_COLOURS[scene.colour]
    return replace(scene, background=BACKGROUNDS[key % len(BACKGROUNDS)],
                   background_colour=colours[(key // len(BACKGROUNDS)) % len(colours)])
