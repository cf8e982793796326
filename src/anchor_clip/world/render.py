"""Drawing a `Scene`: layout, silhouettes, background patterns and the four styles.

Silhouettes are drawn at `SUPERSAMPLE` times the output size and box-filtered down, which anti-aliases the
polygon edges PIL draws hard; everything else is computed at the output size with soft (anti-aliased)
edges, because a world of ~70k images has about a millisecond per image. Images are channel-first
(3, N, N) float32 arrays until the end: numpy broadcasts a colour over a (N, N) plane much faster than
over a trailing axis of 3.

A style changes fill, outline, background and texture; the silhouette, colour, size, position and
background pattern that a caption names are kept in every style, so the class stays readable while the
pixel statistics move far (the distribution shift the eval sets measure).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from anchor_clip.world.scene import COLOURS, COLUMN_POSITIONS, ROW_POSITIONS, SINGLE_POSITIONS, Scene
from anchor_clip.world.shapes import SHAPES

SUPERSAMPLE = 4
#: Side of a single object, as a fraction of the image, per size word.
SINGLE_SIDE = {"small": 0.36, "medium": 0.5, "big": 0.66}
#: Side of each object of a row / column as a fraction of the largest side that still fits.
GROUP_SIDE = {"small": 0.75, "medium": 0.87, "big": 1.0}
MAX_ROTATION_DEG = 12.0
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

Box = tuple[float, float, float, float, float]  # centre x, centre y, half width, half height (pixels), angle (deg)


def layout(scene: Scene, rng: np.random.Generator, canvas: int) -> list[Box]:
    """Where each object of the scene goes, in pixels of a `canvas`-sided square, with a little jitter."""
    n = scene.count
    if scene.arrangement == "single":
        side = SINGLE_SIDE[scene.size]
        row, col = divmod(SINGLE_POSITIONS.index(scene.position), 3)
        centres = [(_grid(col, side, rng), _grid(row, side, rng))]
    else:
        side = GROUP_SIDE[scene.size] * min(0.95 / n, 0.45)
        along = [(k + 0.5) / n + rng.uniform(-0.02, 0.02) for k in range(n)]
        if scene.arrangement == "row":
            cross = _grid(ROW_POSITIONS.index(scene.position), side, rng)
            centres = [(a, cross) for a in along]
        else:
            cross = _grid(COLUMN_POSITIONS.index(scene.position), side, rng)
            centres = [(cross, a) for a in along]
    boxes = []
    for cx, cy in centres:
        half_w, half_h = side / 2 * rng.uniform(0.88, 1.12, size=2)
        angle = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)
        boxes.append((cx * canvas, cy * canvas, half_w * canvas, half_h * canvas, angle))
    return boxes


def _grid(index: int, side: float, rng: np.random.Generator) -> float:
    """Centre coordinate (fraction of the image) of grid cell 0/1/2 for an object of this side, kept inside."""
    margin = side / 2 + 0.02
    return margin + index / 2 * (1 - 2 * margin) + rng.uniform(-0.03, 0.03)


def silhouette(shape: str, boxes: list[Box], size: int) -> np.ndarray:
    """(size, size) float32 coverage in [0, 1] of every object in `boxes` (given in supersampled pixels)."""
    canvas = size * SUPERSAMPLE
    image = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(image)
    for cx, cy, half_w, half_h, angle in boxes:
        c, s = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
        # scale the unit box to the object, rotate, then move to its centre: (K, 2) @ (2, 2)
        to_canvas = np.array([[half_w * c, half_w * s], [-half_h * s, half_h * c]])
        for polygon, add in SHAPES[shape]:
            points = polygon @ to_canvas + (cx, cy)
            draw.polygon(points.ravel().tolist(), fill=255 if add else 0)
    return np.asarray(image.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0


@lru_cache(maxsize=4)
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return yy, xx


def _band(u: np.ndarray, period: float) -> np.ndarray:
    """Anti-aliased square wave: coverage of the half-period bands of a coordinate `u` (pixels)."""
    w = (u % period) - period / 2
    return np.clip(period / 4 - np.abs(w) + 0.5, 0.0, 1.0)


def background_pattern(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) coverage of the background's second tone (stripes, dots, ...), random period and phase."""
    yy, xx = _pixel_centres(size)
    period = size * rng.uniform(0.17, 0.25)
    px, py = rng.uniform(0, period, size=2)
    if kind == "plain":
        return np.zeros((size, size), dtype=np.float32)
    if kind == "striped":
        theta = np.deg2rad(rng.choice([0.0, 45.0, 90.0, 135.0]) + rng.uniform(-8, 8))
        return _band(xx * np.cos(theta) + yy * np.sin(theta) + px, period)
    if kind == "dotted":
        dx, dy = (xx + px) % period - period / 2, (yy + py) % period - period / 2
        return np.clip(0.27 * period - np.sqrt(dx**2 + dy**2) + 0.5, 0.0, 1.0)
    if kind == "checkered":
        a, b = _band(xx + px, 2 * period), _band(yy + py, 2 * period)
        return a + b - 2 * a * b  # soft XOR of two band patterns
    if kind == "wavy":
        wave = 0.12 * size * np.sin(2 * np.pi * xx / (size * rng.uniform(0.3, 0.5)) + px)
        return _band(yy + wave + py, period)
    raise ValueError(f"unknown background pattern {kind!r}")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 1) -> np.ndarray:
    """(channels, size, size) smooth noise in [0, 1]: a coarse random grid upsampled bicubically."""
    if channels not in (1, 3):  # PIL resizes 1- and 3-band images as is (2- and 4-band ones as alpha)
        return np.concatenate([_smooth_noise(rng, size, cells) for _ in range(channels)])
    coarse = rng.integers(0, 256, size=(cells, cells, channels), dtype=np.uint8)
    image = Image.fromarray(coarse[..., 0] if channels == 1 else coarse)
    fine = np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    return fine[None] if channels == 1 else fine.transpose(2, 0, 1)


def _shift_max(mask: np.ndarray, radius: int, op=np.maximum) -> np.ndarray:
    """Grey dilation (or erosion with `op=np.minimum`) by a (2r+1)² square: separable running max."""
    fill = 0.0 if op is np.maximum else 1.0
    n = mask.shape[0]
    padded = np.pad(mask, radius, constant_values=fill)
    rows = padded[:, : n].copy()
    for k in range(1, 2 * radius + 1):
        op(rows, padded[:, k : k + n], out=rows)
    out = rows[:n].copy()
    for k in range(1, 2 * radius + 1):
        op(out, rows[k : k + n], out=out)
    return out


def _second_tone(bg: np.ndarray, amount: float) -> np.ndarray:
    """The pattern's tone: darker on light backgrounds, lighter on dark ones, so patterns show on any colour."""
    return bg * (1 - amount) if float(bg @ _LUMA) > 0.45 else bg + (1 - bg) * amount


def _mix(a: np.ndarray, b: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Per-pixel blend: (3, N, N) or (3, 1, 1) colours, (N, N) alpha in [0, 1]."""
    return a + (b - a) * alpha


def _col(rgb: np.ndarray) -> np.ndarray:
    return rgb[:, None, None]  # (3,) -> (3, 1, 1), broadcast over the image plane


# Each painter maps (mask (N, N), pattern (N, N), fg (3,), bg (3,), rng) to a (3, N, N) image in ~[0, 1].


def _photo(mask, pattern, fg, bg, rng):
    """Textured, shaded object with a drop shadow on an unevenly lit background, plus sensor noise."""
    size = mask.shape[0]
    yy, xx = _pixel_centres(size)
    back = _mix(_col(bg), _col(_second_tone(bg, 0.18)), pattern)
    back = back * (0.8 + 0.35 * _smooth_noise(rng, size, 4))  # uneven lighting
    # a soft drop shadow (down-right, blurred) gives depth, a cue only photos have
    shadow = np.roll(mask, (1, 1), axis=(0, 1))
    shadow = (shadow + np.roll(shadow, 1, axis=0) + np.roll(shadow, 1, axis=1)) / 3
    back = back * (1 - 0.4 * shadow)
    theta = rng.uniform(0, 2 * np.pi)
    light = ((xx * np.cos(theta) + yy * np.sin(theta)) / size + 1) / 2  # linear shading across the canvas
    texture = _smooth_noise(rng, size, 8)
    obj = _col(fg) * ((0.7 + 0.5 * light) * (0.85 + 0.3 * texture)) + 0.08 * (texture - 0.5)
    image = _mix(back, obj, mask) * rng.uniform(0.85, 1.1) + rng.uniform(-0.05, 0.05)  # exposure
    return image + 0.035 * rng.standard_normal(image.shape, dtype=np.float32)  # sensor noise


def _sketch(mask, pattern, fg, bg, rng):
    """Coloured-pencil outline and hatching on paper, the background only a faint wash."""
    size = mask.shape[0]
    yy, xx = _pixel_centres(size)
    paper = np.array([0.96, 0.95, 0.91], dtype=np.float32)
    back = _mix(_col(paper), _col(bg), 0.12 + 0.18 * pattern)  # background colour and pattern as a faint wash
    back = back + 0.03 * (_smooth_noise(rng, size, 8) - 0.5)
    ink = fg * 0.8
    if float(ink @ _LUMA) > 0.5:  # a white or yellow pencil would vanish on paper: darken, keep the hue
        ink = ink * 0.5 / float(ink @ _LUMA)
    outline = mask - _shift_max(mask, 1, np.minimum)  # thin inner contour
    offset = tuple(rng.integers(-1, 2, size=2))
    missed = np.roll(outline, offset, axis=(0, 1))  # a second, slightly off stroke, as in a quick sketch
    slope = 1.0 if rng.random() < 0.5 else -1.0
    hatch = _band((xx + yy * slope) * 0.7071, 3.0) * mask * 0.3  # light diagonal hatching inside the outline
    pressure = 0.75 + 0.25 * _smooth_noise(rng, size, 6)
    alpha = np.clip(outline + 0.45 * missed + hatch, 0, 1) * pressure
    return _mix(back, _col(ink), alpha)


def _cartoon(mask, pattern, fg, bg, rng):
    """Flat colours, a dark outline, no texture."""
    back = _mix(_col(bg), _col(bg + (1 - bg) * 0.3), pattern)  # flat, light second tone
    outline = _shift_max(mask, 1) - mask  # a dark pixel ring just outside, so small objects keep their fill
    ink = np.array([0.07, 0.06, 0.08], dtype=np.float32)
    return _mix(_mix(back, _col(fg), mask), _col(ink), outline)


_DIRECTIONS = ((0, 1), (1, 1), (1, 0), (1, -1))  # (dy, dx) steps for brush strokes: -, \, |, /


def _smear(image: np.ndarray, step: tuple[int, int], passes: int) -> np.ndarray:
    """Directional blur along `step`: each pass averages every pixel with its two neighbours along it."""
    dy, dx = step
    for _ in range(passes):
        ahead = np.roll(image, (dy, dx), axis=(-2, -1))
        behind = np.roll(image, (-dy, -dx), axis=(-2, -1))
        image = 0.5 * image + 0.25 * (ahead + behind)
    return image


def _painting(mask, pattern, fg, bg, rng):
    """Wobbly edges, saturated and unevenly mixed colours, brush streaks in one direction."""
    size = mask.shape[0]
    back = _mix(_col(bg), _col(_second_tone(bg, 0.15)), pattern)
    image = _mix(back, _col(fg), mask)
    # hand-painted edges: sample the scene through a smooth random displacement of about a pixel
    yy, xx = _pixel_centres(size)
    shift = (_smooth_noise(rng, size, 5, channels=2) - 0.5) * 2.0
    rows = np.clip(yy - 0.5 + shift[0], 0, size - 1).round().astype(np.intp)
    cols = np.clip(xx - 0.5 + shift[1], 0, size - 1).round().astype(np.intp)
    image = image[:, rows, cols]
    # vivid, unevenly mixed paint: saturation pushed away from grey, a global cast, slow per-channel drifts
    grey = (image * _col(_LUMA)).sum(axis=0)
    image = grey + 1.4 * (image - grey)
    drift = _smooth_noise(rng, size, 4, channels=3) - 0.5
    image = image * _col(rng.uniform(0.88, 1.12, size=3).astype(np.float32)) + 0.16 * drift
    step = _DIRECTIONS[rng.integers(len(_DIRECTIONS))]
    # brush texture: noise smeared along the stroke direction, so colour varies in streaks
    streaks = _smear(rng.random((1, size, size), dtype=np.float32), step, 3)
    image = image * (0.8 + 0.4 * streaks)
    return _smear(image, step, 1)


STYLE_PAINTERS = {"photo": _photo, "sketch": _sketch, "cartoon": _cartoon, "painting": _painting}


def render_scene(scene: Scene, image_size: int = 32) -> Image.Image:
    """Draw a scene as an RGB image of `image_size` x `image_size` pixels.

    A pure function of the scene (its `seed` drives all jitter), so a world is reproducible image by image.
    """
    if scene.style not in STYLE_PAINTERS:
        raise ValueError(f"unknown style {scene.style!r}; expected one of {sorted(STYLE_PAINTERS)}")
    rng = np.random.default_rng(scene.seed)
    mask = silhouette(scene.shape, layout(scene, rng, image_size * SUPERSAMPLE), image_size)
    pattern = background_pattern(scene.background, rng, image_size)
    fg = np.asarray(COLOURS[scene.colour], dtype=np.float32) / 255.0
    bg = np.asarray(COLOURS[scene.background_colour], dtype=np.float32) / 255.0
    image = STYLE_PAINTERS[scene.style](mask, pattern, fg, bg, rng)  # (3, N, N)
    pixels = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)))
