"""The world's object classes: one filled silhouette per class, drawn in a unit box.

A shape is an ordered list of polygons in the box [-1, 1]² (x right, y down), each either added to or cut
out of the silhouette, so rings, doors and eyes are holes. Classes are told apart by outline alone: colour,
size and texture are sampled independently of the class, so a model has to read the shape.
"""

from __future__ import annotations

import numpy as np

Polygon = np.ndarray  # (K, 2) vertices in the unit box
Shape = tuple[tuple[Polygon, bool], ...]  # (polygon, True = add / False = cut out), drawn in order


def _pts(*xy: tuple[float, float]) -> Polygon:
    return np.asarray(xy, dtype=np.float64)


def _ellipse(cx: float, cy: float, rx: float, ry: float | None = None, n: int = 28) -> Polygon:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + (rx if ry is None else ry) * np.sin(t)], axis=1)


def _arc(cx: float, cy: float, rx: float, ry: float, start: float, stop: float, n: int = 20) -> Polygon:
    """Closed slice of an ellipse between two angles (degrees, 180 -> 360 is the upper half since y points down)."""
    t = np.deg2rad(np.linspace(start, stop, n))
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> Polygon:
    return _pts((x0, y0), (x1, y0), (x1, y1), (x0, y1))


def _regular(n: int, r: float = 1.0, rotation_deg: float = -90.0) -> Polygon:
    t = np.deg2rad(rotation_deg) + np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _star(points: int, r_out: float, r_in: float, cy: float = 0.0) -> Polygon:
    t = np.deg2rad(-90.0) + np.linspace(0.0, 2.0 * np.pi, 2 * points, endpoint=False)
    r = np.where(np.arange(2 * points) % 2 == 0, r_out, r_in)
    return np.stack([r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _thick_line(p0: tuple[float, float], p1: tuple[float, float], width: float) -> Polygon:
    a, b = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
    d = b - a
    normal = np.array([-d[1], d[0]]) / np.linalg.norm(d) * width / 2
    return np.stack([a + normal, b + normal, b - normal, a - normal])


def _rotate(poly: Polygon, deg: float) -> Polygon:
    c, s = np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))
    return poly @ np.array([[c, s], [-s, c]])


def _mirror(poly: Polygon) -> Polygon:
    return poly * np.array([-1.0, 1.0])


def _add(*polys: Polygon) -> list[tuple[Polygon, bool]]:
    return [(p, True) for p in polys]


def _cut(*polys: Polygon) -> list[tuple[Polygon, bool]]:
    return [(p, False) for p in polys]


def _heart() -> Polygon:
    t = np.linspace(0.0, 2.0 * np.pi, 40, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x / 17.0, -y / 17.0 + 0.1], axis=1)


def _leaf() -> list[tuple[Polygon, bool]]:
    x = np.linspace(-1.0, 0.75, 18)
    half = 0.5 * (1 - ((x + 0.125) / 0.875) ** 2)
    lens = np.concatenate([np.stack([x, -half], 1), np.stack([x[::-1], half[::-1]], 1)])
    parts = _add(lens, _thick_line((0.7, 0.0), (1.0, 0.0), 0.12)) + _cut(_thick_line((-0.75, 0.0), (0.55, 0.0), 0.08))
    return [(_rotate(p, 35.0), add) for p, add in parts]


def _gear() -> Polygon:
    teeth = 10
    t = np.linspace(0.0, 2.0 * np.pi, 4 * teeth, endpoint=False) + np.pi / (4 * teeth)
    r = np.where((np.arange(4 * teeth) // 2) % 2 == 0, 1.0, 0.72)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _pencil() -> list[tuple[Polygon, bool]]:
    body = _pts((-1.0, -0.22), (0.45, -0.22), (1.0, 0.0), (0.45, 0.22), (-1.0, 0.22))
    return [(_rotate(body, -40.0), True), (_rotate(_rect(-0.85, -0.22, -0.72, 0.22), -40.0), False)]


def _ghost() -> Polygon:
    top = _arc(0.0, -0.2, 0.75, 0.8, 180.0, 360.0)
    x = np.linspace(0.75, -0.75, 13)
    hem = np.stack([x, 0.85 + 0.12 * np.cos(x * 4 * np.pi / 1.5)], axis=1)
    return np.concatenate([top, _pts((0.75, 0.85)), hem, _pts((-0.75, 0.85))])


def _catalogue() -> dict[str, Shape]:
    ladder = _add(_rect(-0.62, -1, -0.42, 1), _rect(0.42, -1, 0.62, 1))
    ladder += _add(*[_rect(-0.45, y, 0.45, y + 0.16) for y in (-0.75, -0.25, 0.25, 0.7)])
    shapes: dict[str, list[tuple[Polygon, bool]]] = {
        "circle": _add(_ellipse(0, 0, 0.95)),
        "square": _add(_rect(-0.85, -0.85, 0.85, 0.85)),
        "triangle": _add(_pts((0, -0.95), (1, 0.8), (-1, 0.8))),
        "star": _add(_star(5, 1.0, 0.42, cy=0.08)),
        "heart": _add(_heart()),
        "ring": _add(_ellipse(0, 0, 0.95)) + _cut(_ellipse(0, 0, 0.55)),
        "arrow": _add(_pts((-1, -0.28), (0.15, -0.28), (0.15, -0.75), (1, 0), (0.15, 0.75), (0.15, 0.28), (-1, 0.28))),
        "moon": _add(_ellipse(0, 0, 0.95)) + _cut(_ellipse(0.45, -0.25, 0.8)),
        "cross": _add(_rect(-0.3, -1, 0.3, 1), _rect(-1, -0.3, 1, 0.3)),
        "diamond": _add(_pts((0, -1), (0.7, 0), (0, 1), (-0.7, 0))),
        "house": _add(_rect(-0.72, -0.1, 0.72, 0.95), _pts((-1, -0.05), (0, -0.95), (1, -0.05)))
        + _cut(_rect(-0.2, 0.4, 0.2, 0.95)),
        "tree": _add(_ellipse(0, -0.35, 0.75, 0.62), _rect(-0.15, 0.15, 0.15, 1)),
        "fish": _add(_ellipse(-0.2, 0, 0.72, 0.45), _pts((0.35, 0), (1, -0.55), (1, 0.55)))
        + _cut(_ellipse(-0.58, -0.1, 0.1)),
        "key": _add(_ellipse(-0.6, 0, 0.4))
        + _cut(_ellipse(-0.6, 0, 0.18))
        + _add(_rect(-0.25, -0.1, 1, 0.1), _rect(0.5, 0.1, 0.68, 0.45), _rect(0.82, 0.1, 1, 0.35)),
        "semicircle": _add(_arc(0, 0.4, 1.0, 1.05, 180, 360)),
        "bolt": _add(_pts((0.25, -1), (-0.6, 0.12), (-0.05, 0.12), (-0.3, 1), (0.6, -0.2), (0.05, -0.2), (0.4, -1))),
        "cloud": _add(
            _ellipse(-0.55, 0.15, 0.42), _ellipse(0, -0.15, 0.55), _ellipse(0.55, 0.15, 0.42),
            _rect(-0.55, 0.1, 0.55, 0.57),
        ),
        "drop": _add(_ellipse(0, 0.35, 0.6), _pts((-0.56, 0.15), (0, -1), (0.56, 0.15))),
        "bell": _add(
            _pts((-0.25, -0.75), (0.25, -0.75), (0.5, -0.3), (0.6, 0.45), (0.92, 0.68), (-0.92, 0.68), (-0.6, 0.45),
                 (-0.5, -0.3)),
            _ellipse(0, 0.82, 0.18),
            _ellipse(0, -0.85, 0.15),
        ),
        "mushroom": _add(_arc(0, 0.05, 1.0, 0.85, 180, 360), _rect(-0.28, 0, 0.28, 0.95)),
        "umbrella": _add(
            _arc(0, -0.15, 1.0, 0.8, 180, 360),
            _rect(-0.06, -0.2, 0.06, 0.75),
            _thick_line((0.0, 0.72), (-0.12, 0.92), 0.12),
            _thick_line((-0.12, 0.92), (-0.32, 0.82), 0.12),
        ),
        "mug": _add(_ellipse(0.45, 0.1, 0.42, 0.45))
        + _cut(_ellipse(0.45, 0.1, 0.24, 0.27))
        + _add(_rect(-0.8, -0.7, 0.35, 0.9)),
        "bottle": _add(
            _rect(-0.45, -0.2, 0.45, 1), _pts((-0.45, -0.2), (-0.15, -0.55), (0.15, -0.55), (0.45, -0.2)),
            _rect(-0.15, -1, 0.15, -0.5),
        ),
        "flower": _add(*[_ellipse(0.38 * np.cos(a), -0.35 + 0.38 * np.sin(a), 0.3) for a in np.arange(6) * np.pi / 3])
        + _cut(_ellipse(0, -0.35, 0.14))
        + _add(_rect(-0.06, 0.05, 0.06, 1), _ellipse(0.3, 0.65, 0.25, 0.1)),
        "leaf": _leaf(),
        "sun": _add(_ellipse(0, 0, 0.5))
        + _add(*[_rotate(_pts((-0.16, -0.62), (0.16, -0.62), (0, -1)), a) for a in np.arange(8) * 45.0]),
        "gear": _add(_gear()) + _cut(_ellipse(0, 0, 0.3)),
        "cat": _add(
            _ellipse(0, 0.15, 0.8, 0.72), _pts((-0.8, -0.1), (-0.7, -1), (-0.15, -0.5)),
            _mirror(_pts((-0.8, -0.1), (-0.7, -1), (-0.15, -0.5))),
        )
        + _cut(_ellipse(-0.32, 0.05, 0.12), _ellipse(0.32, 0.05, 0.12)),
        "car": _add(
            _rect(-1, -0.1, 1, 0.42), _pts((-0.55, -0.1), (-0.35, -0.55), (0.35, -0.55), (0.6, -0.1)),
            _ellipse(-0.55, 0.48, 0.26), _ellipse(0.55, 0.48, 0.26),
        ),
        "boat": _add(
            _pts((-1, 0.35), (1, 0.35), (0.65, 0.8), (-0.65, 0.8)), _rect(-0.05, -1, 0.05, 0.35),
            _pts((0.1, -0.95), (0.1, 0.25), (0.8, 0.25)), _pts((-0.1, -0.6), (-0.1, 0.25), (-0.6, 0.25)),
        ),
        "rocket": _add(
            _rect(-0.3, -0.4, 0.3, 0.62), _pts((-0.3, -0.4), (0, -1), (0.3, -0.4)),
            _pts((-0.3, 0.15), (-0.72, 0.95), (-0.3, 0.62)), _mirror(_pts((-0.3, 0.15), (-0.72, 0.95), (-0.3, 0.62))),
        )
        + _cut(_ellipse(0, -0.12, 0.14)),
        "hourglass": _add(_pts((-0.7, -1), (0.7, -1), (0.1, 0), (0.7, 1), (-0.7, 1), (-0.1, 0))),
        "shirt": _add(
            _pts((-0.4, -0.9), (-0.15, -0.72), (0.15, -0.72), (0.4, -0.9), (1, -0.45), (0.75, -0.1), (0.5, -0.3),
                 (0.5, 0.95), (-0.5, 0.95), (-0.5, -0.3), (-0.75, -0.1), (-1, -0.45))
        ),
        "chair": _add(
            _rect(-0.62, -1, -0.38, 0.1), _rect(-0.62, -0.02, 0.62, 0.2), _rect(-0.62, 0.2, -0.44, 1),
            _rect(0.44, 0.2, 0.62, 1),
        ),
        "table": _add(_rect(-1, -0.45, 1, -0.2), _rect(-0.85, -0.2, -0.65, 0.8), _rect(0.65, -0.2, 0.85, 0.8)),
        "ladder": ladder,
        "crown": _add(_pts((-0.9, 0.6), (-0.9, -0.55), (-0.45, 0), (0, -0.75), (0.45, 0), (0.9, -0.55), (0.9, 0.6))),
        "candle": _add(
            _rect(-0.3, -0.3, 0.3, 1), _ellipse(0, -0.62, 0.17, 0.28), _pts((-0.17, -0.6), (0, -1), (0.17, -0.6))
        ),
        "bird": _add(
            _ellipse(-0.05, 0.15, 0.62, 0.4), _ellipse(0.55, -0.3, 0.3), _pts((0.8, -0.38), (1, -0.25), (0.8, -0.18)),
            _pts((-0.55, 0.05), (-1, -0.4), (-1, 0.2)),
        ),
        "balloon": _add(
            _ellipse(0, -0.3, 0.6, 0.7), _pts((-0.12, 0.47), (0.12, 0.47), (0, 0.35)),
            _thick_line((0, 0.45), (0.12, 0.72), 0.09), _thick_line((0.12, 0.72), (-0.05, 1.0), 0.09),
        ),
        "flag": _add(_rect(-0.8, -1, -0.66, 1), _rect(-0.66, -0.95, 0.85, -0.15)),
        "bone": _add(
            _rect(-0.62, -0.17, 0.62, 0.17), _ellipse(-0.7, -0.22, 0.26), _ellipse(-0.7, 0.22, 0.26),
            _ellipse(0.7, -0.22, 0.26), _ellipse(0.7, 0.22, 0.26),
        ),
        "cactus": _add(
            _rect(-0.2, -0.72, 0.2, 1), _ellipse(0, -0.72, 0.2), _rect(-0.68, -0.1, -0.2, 0.1),
            _rect(-0.68, -0.6, -0.48, 0.1), _rect(0.2, 0.15, 0.68, 0.35), _rect(0.48, -0.35, 0.68, 0.35),
        ),
        "snowman": _add(_ellipse(0, 0.42, 0.56), _ellipse(0, -0.35, 0.38), _rect(-0.3, -1, 0.3, -0.72)),
        "pencil": _pencil(),
        "lock": _add(_ellipse(0, -0.4, 0.55, 0.6))
        + _cut(_ellipse(0, -0.4, 0.34, 0.4))
        + _add(_rect(-0.75, -0.2, 0.75, 0.95))
        + _cut(_ellipse(0, 0.25, 0.14), _rect(-0.05, 0.25, 0.05, 0.62)),
        "ghost": _add(_ghost()) + _cut(_ellipse(-0.28, -0.3, 0.13, 0.18), _ellipse(0.28, -0.3, 0.13, 0.18)),
        "hammer": _add(_rect(-0.1, -0.45, 0.1, 1), _rect(-0.8, -0.85, 0.55, -0.4), _pts((0.55, -0.85), (0.95, -0.62),
                                                                                      (0.55, -0.4))),
        "hexagon": _add(_regular(6, 1.0, 0.0)),
        "pentagon": _add(_regular(5, 1.0)),
        "octagon": _add(_regular(8, 1.0, 22.5)),
        "trapezoid": _add(_pts((-0.5, -0.7), (0.5, -0.7), (1, 0.7), (-1, 0.7))),
    }
    return {name: tuple(parts) for name, parts in shapes.items()}


#: Every drawable class in catalogue order; a world with `num_classes = n` uses the first n. The regular
#: polygons come last: at 32 px, rotated and stretched, a hexagon or octagon is barely told from a circle.
SHAPES: dict[str, Shape] = _catalogue()
SHAPE_NAMES: tuple[str, ...] = tuple(SHAPES)
