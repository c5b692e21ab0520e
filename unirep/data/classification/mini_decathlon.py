"""Embedded mini-decathlon: a small multi-domain benchmark in the exact Visual Decathlon format.

The benchmark is drawn offline with numpy, deterministically from a seed, so that the default
preset runs anywhere without a download and the same reader serves it and the real data
(``unirep.data.classification.decathlon``). Each domain imitates one kind of Visual Decathlon
domain:

==  ========  =======================  =======  =====  =================================
d   name      imitates                 classes  w × h  train / val / test images (scale 1)
==  ========  =======================  =======  =====  =================================
1   digits    SVHN (house numbers)     10       40×32  250 / 100 / 500
2   glyphs    Omniglot (handwriting)   20       32×32  200 / 100 / 500
3   objects   ImageNet (large)         36       48×32  1600 / 200 / 800
4   signs     GTSRB (traffic signs)    15       32×32  200 / 100 / 500
5   textures  DTD (textures)           12       32×48  200 / 100 / 500
6   toys      CIFAR (coloured things)  10       32×32  200 / 100 / 500
==  ========  =======================  =======  =====  =================================

(sizes for ``image_size=32``; the shorter side is always ``image_size``.) As in Visual Decathlon,
the small domains are data-limited (a few hundred training images) beside one large domain, and
test splits are large so that per-domain accuracies are not dominated by sampling noise.

The domains share visual structure, as real domains do: the large ``objects`` domain is built
from the same shape outlines that ``signs`` and ``toys`` use, the fill patterns of ``textures``
and the pen strokes of ``glyphs``, and ``signs`` reuse the digit strokes of ``digits``; so
features learnt on one domain help on the others. Every sample gets its own nuisance (pose,
colour, clutter, noise) and classes come with look-alikes, so a small CNN needs real training to
separate them (a 3-layer CNN trained for 300 steps reaches roughly 65-85 % test accuracy).

On disk (relative to ``root``)::

    annotations/<domain>_{train,val,test}.json   COCO-style, official top-level keys
    annotations/<domain>_test_stripped.json      as the devkit's: the same without annotations
    data/<domain>/<split>/NNNNNN.jpg              6 digits, 1-based per split, JPEG quality 90
    .complete                                     generation parameters (written last)

Ids encode the domain exactly as in Visual Decathlon, with d the 1-based alphabetical index of the
domain among the synthetic ones: ``category_id = d·10⁷ + c`` (c 1-based) and
``image_id = d·10⁷ + 200000 + k`` with k counting consecutively through train, val and test.
"""

from __future__ import annotations

import colorsys
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from unirep.data.classification.decathlon import coco_annotation
from unirep.data.generated import read_marker, write_tree

__all__ = [
    "MINI_DECATHLON_DOMAINS",
    "DomainSpec",
    "ensure_mini_decathlon",
    "generate_mini_decathlon",
]

FORMAT_VERSION = 2
SPLITS = ("train", "val", "test")
JPEG_QUALITY = 90
ID_DOMAIN_STRIDE = 10_000_000
IMAGE_ID_OFFSET = 200_000

Array = np.ndarray


# --------------------------------------------------------------------------------------------
# Canvas and drawing primitives. Coordinates are continuous: the shorter image side spans
# [-1, 1], y points down, and ``px`` is the size of one pixel in these units. Shapes are signed
# distance functions (negative inside) in a local frame; coverage gives one pixel of antialiasing.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Canvas:
    """Pixel-centre coordinates of one image (shorter side spans [-1, 1], y points down)."""

    x: Array
    y: Array
    px: float

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.x.shape[0]), int(self.x.shape[1])

    @property
    def half_width(self) -> float:
        return float(self.shape[1] * self.px / 2)

    @property
    def half_height(self) -> float:
        return float(self.shape[0] * self.px / 2)


@cache
def _canvas(height: int, width: int) -> Canvas:
    px = 2.0 / min(height, width)
    ys = (np.arange(height, dtype=np.float32) + 0.5 - height / 2) * px
    xs = (np.arange(width, dtype=np.float32) + 0.5 - width / 2) * px
    y, x = np.meshgrid(ys, xs, indexing="ij")
    x.setflags(write=False)
    y.setflags(write=False)
    return Canvas(x=x, y=y, px=px)


@dataclass(frozen=True)
class Frame:
    """Local coordinates (u, v) of an object placed on a canvas; ``px`` is a pixel in (u, v)."""

    u: Array
    v: Array
    px: float


def _frame(
    cv: Canvas | Frame,
    cx: float = 0.0,
    cy: float = 0.0,
    size: float = 1.0,
    angle: float = 0.0,
    stretch: float = 1.0,
    shear: float = 0.0,
) -> Frame:
    """Frame of an object centred at (cx, cy), ``size`` units per local unit, rotated by angle."""
    x, y = (cv.x, cv.y) if isinstance(cv, Canvas) else (cv.u, cv.v)
    dx, dy = x - cx, y - cy
    c, s = math.cos(angle), math.sin(angle)
    u = (c * dx + s * dy) / (size * stretch)
    v = (-s * dx + c * dy) / size
    if shear:
        u = u + shear * v
    return Frame(u=u, v=v, px=cv.px / size / min(stretch, 1.0))


def _cover(d: Array, px: float, soft: float = 1.0) -> Array:
    """Antialiased coverage in [0, 1] of the region where the signed distance ``d`` < 0."""
    return np.clip(0.5 - d / (px * soft), 0.0, 1.0)


def _paint(img: Array, alpha: Array, colour: Array | Sequence[float]) -> None:
    """Alpha-composite ``colour`` (RGB or per-pixel RGB) onto ``img`` in place."""
    a = alpha[..., None]
    img *= 1.0 - a
    img += a * np.asarray(colour, dtype=np.float32)


def sdf_disk(u: Array, v: Array) -> Array:
    return np.hypot(u, v) - 1.0


def sdf_box(u: Array, v: Array, half_u: float = 0.8, half_v: float = 0.8) -> Array:
    return np.maximum(np.abs(u) - half_u, np.abs(v) - half_v)


def sdf_polygon(u: Array, v: Array, sides: int, apothem: float, rot: float = 0.0) -> Array:
    """Regular polygon as the intersection of half-planes with outward normals at rot + 2πk/n."""
    d = None
    for k in range(sides):
        a = rot + 2 * math.pi * k / sides
        dk = u * math.cos(a) + v * math.sin(a) - apothem
        d = dk if d is None else np.maximum(d, dk)
    return d


def sdf_triangle(u: Array, v: Array) -> Array:
    return sdf_polygon(u, v, 3, 0.5, rot=math.pi / 2) * 1.4  # flat base at the bottom


def sdf_square(u: Array, v: Array) -> Array:
    return sdf_box(u, v, 0.8, 0.8)


def sdf_diamond(u: Array, v: Array) -> Array:
    return sdf_polygon(u, v, 4, 0.72, rot=math.pi / 4)


def sdf_octagon(u: Array, v: Array) -> Array:
    return sdf_polygon(u, v, 8, 0.92)


def sdf_star(u: Array, v: Array) -> Array:
    rho, theta = np.hypot(u, v), np.arctan2(v, u)
    return (rho - (0.62 + 0.38 * np.cos(5 * theta + math.pi / 2))) * 0.7


def sdf_ring(u: Array, v: Array) -> Array:
    return np.abs(np.hypot(u, v) - 0.7) - 0.3


def sdf_cross(u: Array, v: Array) -> Array:
    return np.minimum(sdf_box(u, v, 0.3, 0.95), sdf_box(u, v, 0.95, 0.3))


def sdf_ellipse(u: Array, v: Array, ru: float, rv: float) -> Array:
    return (np.hypot(u / ru, v / rv) - 1.0) * min(ru, rv)


def sdf_half_disk(u: Array, v: Array) -> Array:
    return np.maximum(np.hypot(u, v) - 1.0, v)  # upper half (y points down)


def sdf_strokes(u: Array, v: Array, strokes: Sequence[Array], width: float) -> Array:
    """Distance to a set of polylines (each an (n, 2) array of points) minus half the width."""
    a = np.concatenate([s[:-1] for s in strokes]).astype(np.float32)
    b = np.concatenate([s[1:] for s in strokes]).astype(np.float32)
    ab = b - a
    ab_len2 = np.maximum((ab**2).sum(axis=1), 1e-8)
    pu = u.reshape(-1, 1) - a[:, 0]
    pv = v.reshape(-1, 1) - a[:, 1]
    t = np.clip((pu * ab[:, 0] + pv * ab[:, 1]) / ab_len2, 0.0, 1.0)
    du = pu - t * ab[:, 0]
    dv = pv - t * ab[:, 1]
    d = np.sqrt((du * du + dv * dv).min(axis=1))
    return d.reshape(u.shape) - width / 2


def _bezier(ctrl: Array, n: int = 8) -> Array:
    """Points of a quadratic (3 control points) or straight (2 points) curve."""
    t = np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None]
    if len(ctrl) == 2:
        return ctrl[0] * (1 - t) + ctrl[1] * t
    p0, p1, p2 = ctrl[0], ctrl[1], ctrl[2]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _ellipse_points(cx: float, cy: float, ru: float, rv: float, n: int = 14) -> Array:
    t = np.linspace(0.0, 2 * math.pi, n, dtype=np.float32)
    return np.stack([cx + ru * np.cos(t), cy + rv * np.sin(t)], axis=1)


# Fill patterns and textures: functions of local coordinates returning intensities in [0, 1].


def _soft_square(x: Array, sharpness: float = 4.0) -> Array:
    return 0.5 + 0.5 * np.tanh(sharpness * x)


def _lines(x: Array, width: float) -> Array:
    """1 on thin lines at integer x, 0 elsewhere (softened)."""
    dist = np.abs(x - np.round(x))
    return np.clip((width - dist) / 0.08 + 0.5, 0.0, 1.0)


def tex_banded(f: Frame, rng: np.random.Generator) -> Array:
    return _soft_square(np.sin(2 * math.pi * 1.1 * f.u + rng.uniform(0, 6.3)))


def tex_lined(f: Frame, rng: np.random.Generator) -> Array:
    return _lines(2.2 * f.u + rng.uniform(0, 1), 0.14)


def tex_chequered(f: Frame, rng: np.random.Generator) -> Array:
    s = np.sin(2 * math.pi * 1.0 * f.u) * np.sin(2 * math.pi * 1.0 * f.v + rng.uniform(0, 6.3))
    return _soft_square(s, 6.0)


def tex_dotted(f: Frame, rng: np.random.Generator) -> Array:
    fu, fv = 2.0 * f.u + rng.uniform(0, 1), 2.0 * f.v + rng.uniform(0, 1)
    d = np.hypot(fu - np.round(fu), fv - np.round(fv))
    return np.clip((0.24 - d) / 0.08 + 0.5, 0.0, 1.0)


def tex_spotted(f: Frame, rng: np.random.Generator) -> Array:
    out = np.zeros_like(f.u)
    for _ in range(12):
        cu, cv = rng.uniform(-1.6, 1.6, size=2)
        r = rng.uniform(0.08, 0.3)
        out = np.maximum(out, _cover(np.hypot(f.u - cu, f.v - cv) - r, f.px))
    return out


def tex_grid(f: Frame, rng: np.random.Generator) -> Array:
    o = rng.uniform(0, 1, size=2)
    return np.maximum(_lines(1.6 * f.u + o[0], 0.1), _lines(1.6 * f.v + o[1], 0.1))


def tex_crosshatched(f: Frame, rng: np.random.Generator) -> Array:
    a, b = math.radians(30), math.radians(-30)
    la = _lines(2.0 * (f.u * math.cos(a) + f.v * math.sin(a)) + rng.uniform(0, 1), 0.1)
    lb = _lines(2.0 * (f.u * math.cos(b) + f.v * math.sin(b)) + rng.uniform(0, 1), 0.1)
    return np.maximum(la, lb)


def tex_zigzagged(f: Frame, rng: np.random.Generator) -> Array:
    tri = np.abs(((1.5 * f.v) % 1.0) - 0.5) * 0.8
    return _soft_square(np.sin(2 * math.pi * 1.2 * (f.u + tri) + rng.uniform(0, 6.3)))


def tex_wavy(f: Frame, rng: np.random.Generator) -> Array:
    wave = 0.18 * np.sin(2 * math.pi * 0.9 * f.v + rng.uniform(0, 6.3))
    return _soft_square(np.sin(2 * math.pi * 1.2 * (f.u + wave)))


def tex_concentric(f: Frame, rng: np.random.Generator) -> Array:
    cu, cv = rng.uniform(-0.2, 0.2, size=2)
    return _soft_square(np.sin(2 * math.pi * 1.3 * np.hypot(f.u - cu, f.v - cv)))


def tex_blotchy(f: Frame, rng: np.random.Generator) -> Array:
    n = _smooth_noise(rng, f.u.shape, 4)
    return _soft_square((n - 0.5) * 4.0, 3.0)


def tex_spiralled(f: Frame, rng: np.random.Generator) -> Array:
    cu, cv = rng.uniform(-0.2, 0.2, size=2)
    rho, theta = np.hypot(f.u - cu, f.v - cv), np.arctan2(f.v - cv, f.u - cu)
    return _soft_square(np.sin(3 * theta + 2 * math.pi * 1.2 * rho))


def tex_scribbled(f: Frame, rng: np.random.Generator) -> Array:
    """Pen strokes of a random omniglot-like glyph (shares the stroke vocabulary of ``glyphs``)."""
    glyphs = _glyph_prototypes()
    strokes = [
        _bezier(c + rng.normal(0, 0.1, size=c.shape).astype(np.float32))
        for c in glyphs[rng.integers(len(glyphs))]
    ]
    return _cover(sdf_strokes(f.u, f.v, strokes, 0.22), f.px)


def tex_solid(f: Frame, rng: np.random.Generator) -> Array:
    return np.zeros_like(f.u)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> Array:
    """Bilinearly upsampled uniform noise on a (cells+1)² grid: smooth blobs in [0, 1]."""
    h, w = shape
    aspect = w / h
    ch, cw = cells, max(1, round(cells * aspect))
    grid = rng.random((ch + 1, cw + 1), dtype=np.float32)
    yi = np.linspace(0, ch, h, dtype=np.float32)
    xi = np.linspace(0, cw, w, dtype=np.float32)
    y0 = np.minimum(yi.astype(np.int64), ch - 1)
    x0 = np.minimum(xi.astype(np.int64), cw - 1)
    fy, fx = (yi - y0)[:, None], (xi - x0)[None, :]
    g00, g01 = grid[y0][:, x0], grid[y0][:, x0 + 1]
    g10, g11 = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    return (g00 * (1 - fx) + g01 * fx) * (1 - fy) + (g10 * (1 - fx) + g11 * fx) * fy


# Colours and finishing.


def _hsv(h: float, s: float, v: float) -> Array:
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _random_colour(rng: np.random.Generator, sat: tuple[float, float] = (0.4, 1.0)) -> Array:
    return _hsv(rng.random(), rng.uniform(*sat), rng.uniform(0.35, 1.0))


def _luma(c: Array) -> float:
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


def _contrasting_pair(rng: np.random.Generator, min_contrast: float) -> tuple[Array, Array]:
    """Two random colours whose luminances differ by at least ``min_contrast``."""
    while True:
        a, b = _random_colour(rng), _random_colour(rng)
        if abs(_luma(a) - _luma(b)) >= min_contrast:
            return a, b


def _clutter_background(rng: np.random.Generator, cv: Canvas, shapes: int) -> Array:
    """Colourful smooth background with a few faint random shapes (scene clutter)."""
    base, other = _random_colour(rng, (0.1, 0.7)), _random_colour(rng, (0.1, 0.7))
    mix = _smooth_noise(rng, cv.shape, 3)[..., None]
    img = base * (1 - mix) + other * mix
    for _ in range(shapes):
        sdf = CLUTTER_SHAPES[rng.integers(len(CLUTTER_SHAPES))]
        f = _frame(
            cv,
            rng.uniform(-cv.half_width, cv.half_width),
            rng.uniform(-cv.half_height, cv.half_height),
            rng.uniform(0.12, 0.35),
            rng.uniform(0, 2 * math.pi),
        )
        _paint(img, _cover(sdf(f.u, f.v), f.px) * rng.uniform(0.3, 0.7), _random_colour(rng))
    return img.astype(np.float32)


def _finish(rng: np.random.Generator, img: Array, noise: float) -> Array:
    """Add sensor noise and quantise to uint8."""
    if noise > 0:
        img = img + rng.normal(0.0, noise, size=img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Shared primitive vocabularies (the structure that transfers across domains).
# --------------------------------------------------------------------------------------------

SdfFn = Callable[[Array, Array], Array]
TextureFn = Callable[[Frame, np.random.Generator], Array]

CLUTTER_SHAPES: tuple[SdfFn, ...] = (sdf_disk, sdf_square, sdf_triangle, sdf_star, sdf_cross)

OBJECT_SHAPES: dict[str, SdfFn] = {
    "disk": sdf_disk,
    "square": sdf_square,
    "triangle": sdf_triangle,
    "star": sdf_star,
    "cross": sdf_cross,
    "ring": sdf_ring,
}

OBJECT_FILLS: dict[str, TextureFn] = {
    "solid": tex_solid,
    "banded": tex_banded,
    "chequered": tex_chequered,
    "dotted": tex_dotted,
    "grid": tex_grid,
    "scribbled": tex_scribbled,
}

TEXTURES: dict[str, TextureFn] = {
    "banded": tex_banded,
    "lined": tex_lined,
    "chequered": tex_chequered,
    "dotted": tex_dotted,
    "spotted": tex_spotted,
    "grid": tex_grid,
    "crosshatched": tex_crosshatched,
    "zigzagged": tex_zigzagged,
    "wavy": tex_wavy,
    "concentric": tex_concentric,
    "blotchy": tex_blotchy,
    "spiralled": tex_spiralled,
}


def _pts(path: str) -> Array:
    """Polyline from an SVG-like point list ``"x,y x,y ..."``."""
    return np.asarray(
        [[float(c) for c in point.split(",")] for point in path.split()], dtype=np.float32
    )


# Digit strokes in a box u ∈ [-0.5, 0.5], v ∈ [-1, 1] (v points down).
DIGIT_STROKES: tuple[tuple[Array, ...], ...] = (
    (_ellipse_points(0.0, 0.0, 0.45, 0.95, 16),),
    (_pts("-0.25,-0.65 0.05,-1 0.05,1"),),
    (_pts("-0.45,-0.55 -0.2,-0.95 0.25,-0.95 0.45,-0.6 0.35,-0.2 -0.45,1 0.5,1"),),
    (_pts("-0.45,-0.8 0,-1 0.4,-0.8 0.4,-0.3 0,-0.05 0.45,0.3 0.4,0.8 0,1 -0.45,0.8"),),
    (_pts("0.2,1 0.2,-1 -0.5,0.35 0.5,0.35"),),
    (_pts("0.45,-1 -0.4,-1 -0.45,-0.1 0.1,-0.2 0.45,0.2 0.4,0.8 0,1 -0.45,0.85"),),
    (_pts("0.35,-0.95 -0.1,-0.8 -0.45,-0.1 -0.45,0.6 -0.1,1 0.35,0.85 0.45,0.35 0.1,0 -0.45,0.3"),),
    (_pts("-0.5,-1 0.5,-1 -0.1,1"),),
    (_ellipse_points(0.0, -0.5, 0.36, 0.48, 12), _ellipse_points(0.0, 0.48, 0.45, 0.52, 12)),
    (_ellipse_points(0.0, -0.45, 0.42, 0.52, 12), _pts("0.42,-0.45 0.2,1")),
)

# Symbols drawn inside traffic-sign-like shapes, in a unit box (v points down).
SIGN_SYMBOLS: dict[str, tuple[Array, ...]] = {
    "bar": (_pts("-0.5,0 0.5,0"),),
    "cross": (_pts("-0.4,-0.4 0.4,0.4"), _pts("-0.4,0.4 0.4,-0.4")),
    "exclaim": (_pts("0,-0.5 0,0.12"), _pts("0,0.38 0,0.42")),
    "chevron": (_pts("-0.4,0.25 0,-0.2 0.4,0.25"),),
    "arrow_up": (_pts("0,0.55 0,-0.5"), _pts("-0.35,-0.15 0,-0.55 0.35,-0.15")),
    "arrow_down": (_pts("0,-0.55 0,0.5"), _pts("-0.35,0.15 0,0.55 0.35,0.15")),
    "slash": (_pts("-0.5,0.5 0.5,-0.5"),),
    "none": (),
    "3": tuple(s * 0.5 for s in DIGIT_STROKES[3]),
    "5": tuple(s * 0.5 for s in DIGIT_STROKES[5]),
    "8": tuple(s * 0.5 for s in DIGIT_STROKES[8]),
}


@cache
def _glyph_prototypes(count: int = 20) -> tuple[tuple[Array, ...], ...]:
    """Class prototypes of the omniglot-like domain: 2-3 curved strokes of 3 control points.

    They come from a fixed generator (not the benchmark seed), so the classes are the same
    benchmark to benchmark and only the samples change with the seed.
    """
    rng = np.random.default_rng(1623)
    glyphs = []
    for _ in range(count):
        n_strokes = int(rng.integers(2, 4))
        glyphs.append(
            tuple(
                rng.uniform(-0.75, 0.75, size=(3, 2)).astype(np.float32) for _ in range(n_strokes)
            )
        )
    return tuple(glyphs)


# --------------------------------------------------------------------------------------------
# Domain drawers: (rng, label, canvas) -> float32 image (H, W, 3) or (H, W) in [0, 1].
# --------------------------------------------------------------------------------------------


def draw_digit(rng: np.random.Generator, label: int, cv: Canvas) -> Array:
    """House-number crop: a centred digit between partial neighbours, on shaded colour."""
    bg, fg = _contrasting_pair(rng, 0.3)
    shade = _smooth_noise(rng, cv.shape, 2)[..., None] * rng.uniform(0.2, 0.6)
    img = (bg * (1 - shade) + bg * 0.4 * shade).astype(np.float32)
    size = rng.uniform(0.6, 0.8)
    width = rng.uniform(0.16, 0.24)
    slant = rng.uniform(-0.2, 0.2)
    angle = rng.uniform(-0.15, 0.15)
    cx, cy = rng.uniform(-0.15, 0.15), rng.uniform(-0.12, 0.12)
    gap = size * rng.uniform(1.05, 1.35)
    for offset, digit in ((-gap, rng.integers(10)), (0.0, label), (gap, rng.integers(10))):
        if offset and rng.random() < 0.5:
            continue
        strokes = [s + rng.normal(0, 0.03, size=s.shape) for s in DIGIT_STROKES[int(digit)]]
        f = _frame(cv, cx + offset, cy, size, angle, shear=slant)
        _paint(img, _cover(sdf_strokes(f.u, f.v, strokes, width), f.px), fg)
    return _finish(rng, img, rng.uniform(0.02, 0.06))


def draw_glyph(rng: np.random.Generator, label: int, cv: Canvas) -> Array:
    """Omniglot-like handwritten character: white strokes on black, grayscale."""
    strokes = [
        _bezier(c + rng.normal(0, 0.16, size=c.shape).astype(np.float32))
        for c in _glyph_prototypes()[label]
    ]
    if rng.random() < 0.5:  # a stray pen mark
        strokes.append(_bezier(rng.uniform(-0.9, 0.9, size=(2, 2)).astype(np.float32), 2) * 0.4)
    f = _frame(
        cv,
        rng.uniform(-0.15, 0.15),
        rng.uniform(-0.15, 0.15),
        rng.uniform(0.7, 1.0),
        rng.uniform(-0.45, 0.45),
        stretch=rng.uniform(0.8, 1.2),
    )
    img = _cover(sdf_strokes(f.u, f.v, strokes, rng.uniform(0.09, 0.15)), f.px)
    return _finish(rng, img.astype(np.float32), 0.03)


def draw_object(rng: np.random.Generator, label: int, cv: Canvas) -> Array:
    """ImageNet-like scene: a patterned shape (shape × fill = class) among clutter."""
    shape_name, fill_name = OBJECT_CLASSES[label]
    img = _clutter_background(rng, cv, shapes=int(rng.integers(1, 4)))
    # faint background texture from the shared texture vocabulary
    bg_tex = TEXTURES[list(TEXTURES)[rng.integers(len(TEXTURES))]]
    bf = _frame(cv, 0, 0, rng.uniform(0.5, 1.0), rng.uniform(0, 2 * math.pi))
    _paint(img, bg_tex(bf, rng) * rng.uniform(0.05, 0.2), _random_colour(rng))
    size = rng.uniform(0.7, 0.95)
    cx, cy = rng.uniform(-0.35, 0.35), rng.uniform(-0.2, 0.2)
    f = _frame(cv, cx, cy, size, rng.uniform(-0.3, 0.3), stretch=rng.uniform(0.85, 1.15))
    sdf = OBJECT_SHAPES[shape_name](f.u, f.v)
    _paint(img, _cover(sdf - 0.08, f.px), _random_colour(rng) * 0.3)  # dark rim: object boundary
    mask = _cover(sdf, f.px)
    c0, c1 = _contrasting_pair(rng, 0.3)
    pf = _frame(f, 0, 0, rng.uniform(0.75, 1.0), rng.uniform(0, 2 * math.pi))
    pattern = OBJECT_FILLS[fill_name](pf, rng)[..., None]
    _paint(img, mask, c0 * (1 - pattern) + c1 * pattern)
    return _finish(rng, img, rng.uniform(0.02, 0.06))


def draw_sign(rng: np.random.Generator, label: int, cv: Canvas) -> Array:
    """GTSRB-like crop: a coloured sign (shape, colours, symbol) under variable lighting."""
    shape_name, rim, face, ink, symbol = SIGN_CLASSES[label]
    img = _clutter_background(rng, cv, shapes=int(rng.integers(0, 3)))
    f = _frame(
        cv,
        rng.uniform(-0.2, 0.2),
        rng.uniform(-0.2, 0.2),
        rng.uniform(0.5, 0.9),
        rng.uniform(-0.25, 0.25),
        stretch=rng.uniform(0.75, 1.05),
    )
    blur = rng.uniform(1.0, 3.0)  # out of focus / low resolution
    sdf = SIGN_SHAPES[shape_name]
    jitter = rng.normal(0, 0.06, size=3).astype(np.float32)  # paint and white balance
    rim_rgb, face_rgb = (np.clip(np.add(SIGN_COLOURS[c], jitter), 0, 1) for c in (rim, face))
    _paint(img, _cover(sdf(f.u, f.v), f.px, blur), rim_rgb)
    inner = _frame(f, 0, 0, 0.72)
    _paint(img, _cover(sdf(inner.u, inner.v), inner.px, blur), face_rgb)
    if SIGN_SYMBOLS[symbol]:
        strokes = [s + rng.normal(0, 0.05, size=s.shape) for s in SIGN_SYMBOLS[symbol]]
        _paint(img, _cover(sdf_strokes(f.u, f.v, strokes, 0.16), f.px, blur), SIGN_COLOURS[ink])
    img *= rng.uniform(0.15, 1.0)  # lighting: many real sign crops are dark
    return _finish(rng, img, rng.uniform(0.02, 0.1))


def draw_texture(rng: np.random.Generator, label: int, cv: Canvas) -> Array:
    """DTD-like texture patch: a pattern at random orientation, scale, colours and lighting."""
    pattern = TEXTURES[TEXTURE_CLASSES[label]]
    f = _frame(
        cv,
        rng.uniform(-0.3, 0.3),
        rng.uniform(-0.3, 0.3),
        rng.uniform(0.6, 0.95),
        rng.uniform(0, 2 * math.pi),
        stretch=rng.uniform(0.8, 1.25),
    )
    p = pattern(f, rng)[..., None]
    c0, c1 = _contrasting_pair(rng, 0.25)
    img = (c0 * (1 - p) + c1 * p).astype(np.float32)
    light = 1.0 - rng.uniform(0.0, 0.5) * _smooth_noise(rng, cv.shape, 2)[..., None]
    return _finish(rng, img * light, rng.uniform(0.02, 0.08))


def draw_toy(rng: np.random.Generator, label: int, cv: Canvas) -> Array:
    """CIFAR-like object: a thing composed of primitive parts, colourful, among clutter."""
    img = _clutter_background(rng, cv, shapes=int(rng.integers(2, 5)))
    f = _frame(
        cv,
        rng.uniform(-0.25, 0.25),
        rng.uniform(-0.2, 0.2),
        rng.uniform(0.95, 1.3),
        rng.uniform(-0.35, 0.35),
        stretch=rng.uniform(0.85, 1.15),
    )
    colours = [_random_colour(rng) for _ in range(3)]
    for part in TOY_CLASSES[label][1]:
        pf = _frame(f, part.cx, part.cy, part.size, part.angle, stretch=part.stretch)
        _paint(img, _cover(part.sdf(pf.u, pf.v), pf.px), colours[part.colour])
    return _finish(rng, img, rng.uniform(0.02, 0.06))


# Class tables (data, not branches).

OBJECT_CLASSES: tuple[tuple[str, str], ...] = tuple(
    (shape, fill) for shape in OBJECT_SHAPES for fill in OBJECT_FILLS
)

SIGN_SHAPES: dict[str, SdfFn] = {
    "circle": sdf_disk,
    "triangle": sdf_triangle,
    "octagon": sdf_octagon,
    "diamond": sdf_diamond,
    "square": sdf_square,
}

SIGN_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.8, 0.1, 0.1),
    "blue": (0.1, 0.25, 0.75),
    "white": (0.95, 0.95, 0.95),
    "yellow": (0.95, 0.8, 0.1),
    "black": (0.05, 0.05, 0.05),
}

# (shape, rim colour, face colour, symbol colour, symbol): look-alikes share shape or symbol
SIGN_CLASSES: tuple[tuple[str, str, str, str, str], ...] = (
    ("circle", "red", "white", "black", "3"),
    ("circle", "red", "white", "black", "5"),
    ("circle", "red", "white", "black", "8"),
    ("circle", "red", "white", "black", "cross"),
    ("triangle", "red", "white", "black", "exclaim"),
    ("triangle", "red", "white", "black", "chevron"),
    ("triangle", "red", "white", "black", "arrow_up"),
    ("circle", "blue", "blue", "white", "arrow_up"),
    ("circle", "blue", "blue", "white", "arrow_down"),
    ("circle", "blue", "blue", "white", "chevron"),
    ("octagon", "red", "red", "white", "bar"),
    ("octagon", "red", "red", "white", "cross"),
    ("diamond", "white", "yellow", "black", "none"),
    ("square", "blue", "blue", "white", "exclaim"),
    ("circle", "black", "white", "black", "slash"),
)

TEXTURE_CLASSES: tuple[str, ...] = tuple(TEXTURES)


@dataclass(frozen=True)
class Part:
    """One primitive of a composed toy, placed in the toy's frame; colour indexes a palette."""

    sdf: SdfFn
    cx: float
    cy: float
    size: float
    colour: int
    angle: float = 0.0
    stretch: float = 1.0


def _box(hu: float, hv: float) -> SdfFn:
    def sdf(u: Array, v: Array) -> Array:
        return sdf_box(u, v, hu, hv)

    return sdf


def _ellipse(ru: float, rv: float) -> SdfFn:
    def sdf(u: Array, v: Array) -> Array:
        return sdf_ellipse(u, v, ru, rv)

    return sdf


TOY_CLASSES: tuple[tuple[str, tuple[Part, ...]], ...] = (
    ("house", (Part(_box(0.6, 0.45), 0, 0.35, 1, 0), Part(sdf_triangle, 0, -0.45, 0.75, 1))),
    ("tree", (Part(sdf_triangle, 0, -0.25, 0.8, 0), Part(_box(0.15, 0.3), 0, 0.65, 1, 1))),
    (
        "car",
        (
            Part(_box(0.85, 0.25), 0, 0.0, 1, 0),
            Part(_box(0.45, 0.2), -0.1, -0.4, 1, 0),
            Part(sdf_disk, -0.5, 0.3, 0.22, 1),
            Part(sdf_disk, 0.5, 0.3, 0.22, 1),
        ),
    ),
    ("snowman", (Part(sdf_disk, 0, 0.45, 0.45, 0), Part(sdf_disk, 0, -0.35, 0.33, 0))),
    (
        "flower",
        (
            Part(_box(0.05, 0.45), 0, 0.55, 1, 1),
            Part(sdf_star, 0, -0.25, 0.55, 0),
            Part(sdf_disk, 0, -0.25, 0.18, 2),
        ),
    ),
    (
        "fish",
        (
            Part(_ellipse(0.6, 0.35), -0.15, 0, 1, 0),
            Part(sdf_triangle, 0.6, 0, 0.35, 1, angle=math.pi / 2),
        ),
    ),
    ("lollipop", (Part(sdf_disk, 0, -0.35, 0.45, 0), Part(_box(0.05, 0.5), 0, 0.5, 1, 1))),
    ("mushroom", (Part(sdf_half_disk, 0, 0.05, 0.7, 0), Part(_box(0.18, 0.35), 0, 0.4, 1, 1))),
    (
        "rocket",
        (
            Part(_box(0.22, 0.55), 0, 0.15, 1, 0),
            Part(sdf_triangle, 0, -0.6, 0.3, 1),
            Part(sdf_triangle, -0.3, 0.55, 0.25, 2),
            Part(sdf_triangle, 0.3, 0.55, 0.25, 2),
        ),
    ),
    (
        "balloons",
        (
            Part(_ellipse(0.8, 1.0), -0.3, -0.4, 0.35, 0),
            Part(_ellipse(0.8, 1.0), 0.3, -0.3, 0.35, 1),
            Part(_box(0.03, 0.4), -0.1, 0.4, 1, 2, angle=0.3),
        ),
    ),
)


# --------------------------------------------------------------------------------------------
# Domain specs and the writer.
# --------------------------------------------------------------------------------------------

Drawer = Callable[[np.random.Generator, int, Canvas], Array]


@dataclass(frozen=True)
class DomainSpec:
    """One synthetic domain: its classes, split sizes at scale 1, aspect and drawer."""

    name: str
    class_names: tuple[str, ...]
    sizes: tuple[int, int, int]  # train, val, test images at scale 1.0
    aspect: tuple[int, int]  # width : height (the shorter side becomes image_size)
    drawer: Drawer
    flip: bool = True  # does a horizontal mirror keep the class? (False: digits, characters)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def image_shape(self, image_size: int) -> tuple[int, int]:
        """(height, width) with the shorter side equal to ``image_size``."""
        w, h = self.aspect
        short = min(w, h)
        return round(image_size * h / short), round(image_size * w / short)


MINI_DECATHLON_DOMAINS: tuple[DomainSpec, ...] = (
    DomainSpec(
        "digits", tuple(str(i) for i in range(10)), (250, 100, 500), (5, 4), draw_digit, flip=False
    ),
    DomainSpec(
        "glyphs",
        tuple(f"character{i + 1:02d}" for i in range(20)),
        (200, 100, 500),
        (1, 1),
        draw_glyph,
        flip=False,
    ),
    DomainSpec(
        "objects",
        tuple(f"{fill}_{shape}" for shape, fill in OBJECT_CLASSES),
        (1600, 200, 800),
        (3, 2),
        draw_object,
    ),
    DomainSpec(
        "signs",
        tuple(f"{rim}_{shape}_{symbol}" for shape, rim, *_, symbol in SIGN_CLASSES),
        (200, 100, 500),
        (1, 1),
        draw_sign,
        flip=False,
    ),
    DomainSpec("textures", TEXTURE_CLASSES, (200, 100, 500), (2, 3), draw_texture),
    DomainSpec("toys", tuple(name for name, _ in TOY_CLASSES), (200, 100, 500), (1, 1), draw_toy),
)


def _split_counts(spec: DomainSpec, scale: float) -> tuple[int, int, int]:
    return tuple(max(1, round(n * scale)) for n in spec.sizes)  # type: ignore[return-value]


def _balanced_labels(rng: np.random.Generator, count: int, num_classes: int) -> Array:
    """Labels with every class as equally often as possible, in random order."""
    return rng.permutation(np.arange(count) % num_classes)


def _info(seed: int) -> dict:
    return {
        "year": 2017,
        "version": 1,
        "description": f"Decathlon (unirep synthetic mini-decathlon, seed {seed})",
        "contributor": "unirep",
        "url": "",
        "date_created": "2017-01-01 00:00:00",
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":")), encoding="utf-8")


def _write_domain(
    root: Path, d: int, spec: DomainSpec, seed: int, image_size: int, scale: float
) -> None:
    height, width = spec.image_shape(image_size)
    cv = _canvas(height, width)
    categories = [
        {"id": d * ID_DOMAIN_STRIDE + c + 1, "name": name, "supercategory": spec.name}
        for c, name in enumerate(spec.class_names)
    ]
    k = 0
    for split_index, (split, count) in enumerate(
        zip(SPLITS, _split_counts(spec, scale), strict=True)
    ):
        out_dir = root / "data" / spec.name / split
        out_dir.mkdir(parents=True)
        labels = _balanced_labels(
            np.random.default_rng([seed, d, split_index]), count, spec.num_classes
        )
        images, annotations = [], []
        for i, label in enumerate(labels.tolist()):
            k += 1
            image_id = d * ID_DOMAIN_STRIDE + IMAGE_ID_OFFSET + k
            file_name = f"data/{spec.name}/{split}/{i + 1:06d}.jpg"
            pixels = spec.drawer(np.random.default_rng([seed, d, split_index, i]), label, cv)
            Image.fromarray(pixels).save(  # (H, W) uint8 → grayscale JPEG, (H, W, 3) → RGB
                root / file_name, format="JPEG", quality=JPEG_QUALITY
            )
            images.append(
                {"id": image_id, "width": width, "height": height, "file_name": file_name}
            )
            annotations.append(coco_annotation(image_id, categories[label]["id"]))
        licenses = [{"id": 1, "name": "decathlon"}]
        labelled = {
            "info": _info(seed),
            "images": images,
            "annotations": annotations,
            "categories": categories,
            "licenses": licenses,
        }
        _write_json(root / "annotations" / f"{spec.name}_{split}.json", labelled)
        if split == "test":
            stripped = {key: val for key, val in labelled.items() if key != "annotations"}
            _write_json(root / "annotations" / f"{spec.name}_test_stripped.json", stripped)


def _marker(seed: int, image_size: int, scale: float) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "seed": int(seed),
        "image_size": int(image_size),
        "scale": float(scale),
        "domains": [spec.name for spec in MINI_DECATHLON_DOMAINS],
    }


def generate_mini_decathlon(
    root: Path, seed: int = 0, image_size: int = 32, scale: float = 1.0
) -> None:
    """Write the synthetic mini-decathlon to ``root`` (replacing an earlier one there).

    Args:
        root: Destination folder. It must not exist, be empty, or hold an earlier
            mini-decathlon (recognised by its ``.complete`` marker); anything else is refused.
        seed: Same seed and parameters give byte-identical files.
        image_size: Shorter image side in pixels (others follow each domain's aspect ratio).
        scale: Multiplies every split's image count (at least one image per split).

    The tree is written into a temporary folder beside ``root`` and renamed into place, so an
    interrupted generation never leaves a half-written benchmark at ``root``.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    root = Path(root)

    def write(tmp: Path) -> None:
        (tmp / "annotations").mkdir()
        for d, spec in enumerate(MINI_DECATHLON_DOMAINS, start=1):
            _write_domain(tmp, d, spec, seed, image_size, scale)

    write_tree(root, _marker(seed, image_size, scale), write, "mini-decathlon")


def ensure_mini_decathlon(
    root: Path, seed: int = 0, image_size: int = 32, scale: float = 1.0
) -> Path:
    """Return ``root`` holding the mini-decathlon for these parameters, generating it if needed.

    Generation happens only when ``root/.complete`` is missing or records other parameters.
    """
    root = Path(root)
    if read_marker(root) != _marker(seed, image_size, scale):
        generate_mini_decathlon(root, seed=seed, image_size=image_size, scale=scale)
    return root
