"""Mini-scenes: procedural indoor scenes in the MTAN NYUv2 format (image, semantic, depth, normal).

Each scene is ray cast exactly with numpy (one vectorised pass per surface) under a pinhole camera
with a random position, height, yaw, downward tilt and a little roll, so that the three dense
targets agree with each other the way real RGB-D data does, without any download. The reader is
:class:`unirep.data.dense.mtan.MTANDense`; the tree is the MTAN NYUv2 layout::

    <root>/<split>/image/<i>.npy     float32 H×W×3 in [0, 1]: shaded, textured, noisy
    <root>/<split>/label/<i>.npy     float32 H×W class ids (below), -1 = nothing hit
    <root>/<split>/depth/<i>.npy     float32 H×W×1 metres along the optical axis, 0 = invalid
    <root>/<split>/normal/<i>.npy    float32 H×W×3 unit normals, all-zero = nothing hit
    <root>/.complete                 generation parameters and camera model (written last)

with splits ``train`` / ``val`` / ``test`` of 240 / 60 / 120 scenes at ``scale=1.0``.

Scene content (world frame: Y up, floor at Y = 0): an axis-aligned room whose walls and ceiling
are each sometimes missing (open-plan: rays then run on over an infinite floor), framed pictures
on the walls, and 2-6 objects in front of the camera: axis-aligned boxes on the floor, spheres
(mostly on the floor) and vertical cylinders standing on the floor. Classes (:data:`SCENE_CLASSES`):

==  ========  ==============================================================
0   floor     infinite plane Y = 0
1   wall      the room's vertical sides
2   ceiling   plane at the room height (bounded by the walls)
3   box       furniture-like axis-aligned boxes
4   sphere    balls
5   cylinder  vertical posts and bins (side and top cap)
6   picture   flat rectangles 1 cm in front of a wall: wall geometry, own look
==  ========  ==============================================================

Camera: pixel centres at ``((c + 0.5 - W/2) / f, (r + 0.5 - H/2) / f)`` with ``f = 0.81·W``, the
focal-to-width ratio of NYUv2's Kinect (about 63° horizontal field of view).

Normal convention (NYUv2's, as used by the MTAN release and 2D-3D-S): channels are
``(x, y, z) = (right, down, towards the camera)``, and every normal faces the camera, so a wall
seen head-on is ``(0, 0, 1)`` and the floor seen by an upright camera has ``y < 0``. In this frame
the ray through a pixel is :func:`view_rays` (forward is ``-z``), the 3-D point of a pixel is
``depth · ray``, and ``normal · ray < 0`` on every valid pixel.

Invalid pixels: surfaces farther than :data:`MAX_DEPTH` (10 m) and rays that hit nothing get depth
0, an all-zero normal and label -1 (the image shows fog there). Besides, a sensor-like dropout sets
depth to 0 on a small random fraction of pixels and on some pixels at depth edges, with label and
normal left valid (as in NYUv2, whose normals come from a completed mesh).

Every scene is drawn from ``np.random.default_rng([seed, split_index, i])``: the same parameters
give byte-identical files.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from unirep.data.generated import read_marker, write_tree

__all__ = [
    "FOCAL_PER_WIDTH",
    "MAX_DEPTH",
    "SCENE_CLASSES",
    "SCENE_SPLITS",
    "ensure_mini_scenes",
    "generate_mini_scenes",
    "render_scene",
    "view_rays",
]

FORMAT_VERSION = 1

#: Semantic class names, indexed by label id.
SCENE_CLASSES: tuple[str, ...] = (
    "floor",
    "wall",
    "ceiling",
    "box",
    "sphere",
    "cylinder",
    "picture",
)
FLOOR, WALL, CEILING, BOX, SPHERE, CYLINDER, PICTURE = range(len(SCENE_CLASSES))
#: Scenes per split at ``scale=1.0``.
SCENE_SPLITS: dict[str, int] = {"train": 240, "val": 60, "test": 120}
#: Focal length in pixels per image width (NYUv2 Kinect: fx ≈ 518.9 px at 640 px).
FOCAL_PER_WIDTH = 0.81
#: Farthest valid depth in metres; beyond it pixels are invalid, as past a depth sensor's range.
MAX_DEPTH = 10.0
NEAR = 0.05  # hits closer than this (self-intersections of shadow rays) are ignored

Array = np.ndarray


# --------------------------------------------------------------------------------------------
# Camera rays.
# --------------------------------------------------------------------------------------------


def view_rays(height: int, width: int) -> Array:
    """Rays through the pixel centres, ``[H,W,3]`` float64, in the normal frame (right, down, back).

    The forward (``-z``) component is 1, so a pixel's 3-D point is ``depth · ray``.
    """
    f = FOCAL_PER_WIDTH * width
    ys = (np.arange(height) + 0.5 - height / 2) / f
    xs = (np.arange(width) + 0.5 - width / 2) / f
    y, x = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([x, y, -np.ones_like(x)], axis=-1)


# --------------------------------------------------------------------------------------------
# Shapes. ``intersect(origin, dirs)``, with one origin ``[3]`` or one per ray ``[N,3]``, returns
# the ray parameter t of the first hit (inf for a miss; with dirs of forward component 1, t is
# the depth) and the outward unit normal there, ``[N,3]`` or ``[3]`` when it is the same for
# every ray. Only hits at t > NEAR count.
# --------------------------------------------------------------------------------------------


class Shape(Protocol):
    def intersect(self, origin: Array, dirs: Array) -> tuple[Array, Array]: ...


def _safe(d: Array) -> Array:
    """Direction components with exact zeros nudged, so that slab divisions stay finite."""
    return np.where(np.abs(d) < 1e-12, 1e-12, d)


@dataclass(frozen=True)
class Rect:
    """Axis-aligned rectangle ``X[axis] = offset`` within ``lo..hi``, visible from ``facing``."""

    axis: int
    offset: float
    facing: float  # +1 or -1: the normal is facing · e_axis
    lo: Array  # bounds of the hit point (the entry on ``axis`` is ignored)
    hi: Array

    def intersect(self, origin: Array, dirs: Array) -> tuple[Array, Array]:
        da = _safe(dirs[:, self.axis])
        t = (self.offset - origin[..., self.axis]) / da
        p = origin + np.where(t > NEAR, t, 0.0)[:, None] * dirs
        others = [a for a in range(3) if a != self.axis]
        inside = np.all((p[:, others] >= self.lo[others]) & (p[:, others] <= self.hi[others]), 1)
        ok = inside & (t > NEAR) & (da * self.facing < 0)
        normal = np.zeros(3)
        normal[self.axis] = self.facing
        return np.where(ok, t, np.inf), normal


@dataclass(frozen=True)
class Box:
    """Axis-aligned box ``lo..hi`` (slab method; the camera is never inside)."""

    lo: Array
    hi: Array

    def intersect(self, origin: Array, dirs: Array) -> tuple[Array, Array]:
        d = _safe(dirs)
        t1, t2 = (self.lo - origin) / d, (self.hi - origin) / d
        t_in = np.minimum(t1, t2)
        t_near, t_far = t_in.max(axis=1), np.maximum(t1, t2).min(axis=1)
        ok = (t_near <= t_far) & (t_near > NEAR)
        axis = t_in.argmax(axis=1)
        normal = np.zeros_like(dirs)
        rows = np.arange(len(dirs))
        normal[rows, axis] = -np.sign(d[rows, axis])
        return np.where(ok, t_near, np.inf), normal


@dataclass(frozen=True)
class Sphere:
    centre: Array
    radius: float

    def intersect(self, origin: Array, dirs: Array) -> tuple[Array, Array]:
        oc = origin - self.centre
        a = (dirs * dirs).sum(-1)
        b = (dirs * oc).sum(-1)
        disc = b * b - a * ((oc * oc).sum(-1) - self.radius**2)
        t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        ok = (disc >= 0) & (t > NEAR)
        normal = (origin + t[:, None] * dirs - self.centre) / self.radius
        return np.where(ok, t, np.inf), normal


@dataclass(frozen=True)
class Cylinder:
    """Vertical cylinder standing on the floor: axis through (x, z), from Y = 0 to ``height``."""

    x: float
    z: float
    radius: float
    height: float

    def intersect(self, origin: Array, dirs: Array) -> tuple[Array, Array]:
        ox, oz = origin[..., 0] - self.x, origin[..., 2] - self.z
        dx, dz = dirs[:, 0], dirs[:, 2]
        a = np.maximum(dx * dx + dz * dz, 1e-12)
        b = dx * ox + dz * oz
        disc = b * b - a * (ox * ox + oz * oz - self.radius**2)
        t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        y_side = origin[..., 1] + t_side * dirs[:, 1]
        side = (disc >= 0) & (t_side > NEAR) & (y_side >= 0) & (y_side <= self.height)
        t_side = np.where(side, t_side, np.inf)

        dy = _safe(dirs[:, 1])
        t_top = (self.height - origin[..., 1]) / dy
        px, pz = ox + t_top * dx, oz + t_top * dz
        top = (dy < 0) & (t_top > NEAR) & (px * px + pz * pz <= self.radius**2)
        t_top = np.where(top, t_top, np.inf)

        use_top = t_top < t_side
        t = np.where(use_top, t_top, t_side)
        n_side = np.stack([ox + t_side * dx, np.zeros_like(dx), oz + t_side * dz], 1)
        n_side /= self.radius
        normal = np.where(use_top[:, None], np.array([0.0, 1.0, 0.0]), n_side)
        return t, normal


# --------------------------------------------------------------------------------------------
# Appearance: each surface mixes two colours by a per-class pattern of the world hit point.
# --------------------------------------------------------------------------------------------

Pattern = Callable[[Array, Array, float, float], Array]  # (points, normals, freq, phase) -> [0,1]


def _tiles(p: Array, n: Array, freq: float, phase: float) -> Array:
    u, v = p[:, 0] * freq + phase, p[:, 2] * freq
    checker = (np.floor(u) + np.floor(v)) % 2
    grout = np.minimum(np.abs(u - np.round(u)), np.abs(v - np.round(v))) < 0.04
    return np.where(grout, 1.0, 0.35 * checker)


def _plaster(p: Array, n: Array, freq: float, phase: float) -> Array:
    along = p[:, 0] + p[:, 2]
    return 0.5 + 0.5 * np.sin(freq * along + phase) * np.sin(0.7 * freq * p[:, 1])


def _plain(p: Array, n: Array, freq: float, phase: float) -> Array:
    return np.zeros(len(p))


def _wood(p: Array, n: Array, freq: float, phase: float) -> Array:
    grain = np.sin(3 * freq * p[:, 1] + 2.0 * np.sin(freq * (p[:, 0] - p[:, 2])) + phase)
    return 0.5 + 0.5 * grain


def _segments(p: Array, n: Array, freq: float, phase: float) -> Array:
    longitude = np.arctan2(n[:, 2], n[:, 0]) + phase
    return np.floor(longitude / (2 * math.pi) * 6) % 2


def _rings(p: Array, n: Array, freq: float, phase: float) -> Array:
    return np.floor(freq * p[:, 1] + phase) % 2


def _blobs(p: Array, n: Array, freq: float, phase: float) -> Array:
    along = p[:, 0] + p[:, 2]
    s = np.sin(2 * freq * along + phase) * np.cos(2.6 * freq * p[:, 1] + 2 * phase)
    return (s > 0).astype(float)


@dataclass(frozen=True)
class Look:
    """Per-class appearance: HSV ranges of the base colour, contrast of the second, pattern."""

    hue: tuple[float, float]
    sat: tuple[float, float]
    val: tuple[float, float]
    contrast: float  # how far the second colour is from the first
    pattern: Pattern
    freq: tuple[float, float]  # pattern frequency per metre


LOOKS: dict[int, Look] = {
    FLOOR: Look((0.04, 0.13), (0.25, 0.7), (0.3, 0.75), 0.25, _tiles, (1.5, 3.5)),
    WALL: Look((0.0, 1.0), (0.0, 0.25), (0.6, 0.95), 0.08, _plaster, (1.0, 4.0)),
    CEILING: Look((0.0, 1.0), (0.0, 0.08), (0.8, 1.0), 0.0, _plain, (1.0, 1.0)),
    BOX: Look((0.0, 1.0), (0.3, 0.8), (0.3, 0.8), 0.3, _wood, (2.0, 6.0)),
    SPHERE: Look((0.0, 1.0), (0.6, 1.0), (0.6, 1.0), 0.6, _segments, (1.0, 1.0)),
    CYLINDER: Look((0.0, 1.0), (0.0, 0.5), (0.3, 0.8), 0.35, _rings, (3.0, 8.0)),
    PICTURE: Look((0.0, 1.0), (0.5, 1.0), (0.3, 1.0), 0.8, _blobs, (2.0, 6.0)),
}


@dataclass(frozen=True)
class Thing:
    """A shape with its class and appearance."""

    shape: Shape
    label: int
    colours: Array  # [2,3] RGB in [0,1]
    freq: float
    phase: float
    casts_shadow: bool = False


def _thing(rng: np.random.Generator, shape: Shape, label: int) -> Thing:
    look = LOOKS[label]
    h, s, v = (rng.uniform(*r) for r in (look.hue, look.sat, look.val))
    h2 = (h + rng.uniform(-0.5, 0.5) * look.contrast) % 1.0
    s2 = float(np.clip(s + rng.uniform(-1, 1) * look.contrast, 0, 1))
    v2 = float(np.clip(v + rng.choice([-1, 1]) * rng.uniform(0.5, 1.0) * look.contrast, 0, 1))
    colours = np.array([colorsys.hsv_to_rgb(h, s, v), colorsys.hsv_to_rgb(h2, s2, v2)])
    casts_shadow = label in (BOX, SPHERE, CYLINDER)
    return Thing(
        shape, label, colours, rng.uniform(*look.freq), rng.uniform(0, 2 * math.pi), casts_shadow
    )


# --------------------------------------------------------------------------------------------
# Scene sampling.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Camera:
    """Camera centre and its axes in the world: right, down, forward (columns of cam→world)."""

    origin: Array
    right: Array
    down: Array
    forward: Array


@dataclass
class Scene:
    camera: Camera
    light: Array  # unit direction towards the light, world frame
    ambient: float
    fog: Array  # RGB of what lies past MAX_DEPTH
    things: list[Thing] = field(default_factory=list)


def _camera(rng: np.random.Generator, half_x: float, half_z: float) -> Camera:
    origin = np.array(
        [
            rng.uniform(-half_x + 0.4, half_x - 0.4),
            rng.uniform(1.0, 1.7),
            rng.uniform(-half_z + 0.4, half_z - 0.4),
        ]
    )
    # look roughly into the room (as a person filming it would), not at the nearest wall
    yaw = math.atan2(-origin[0], -origin[2]) + rng.uniform(-1.0, 1.0)
    tilt = math.radians(rng.uniform(8, 35))  # downwards, as a hand-held or robot camera
    roll = math.radians(rng.uniform(-4, 4))
    forward = np.array(
        [math.sin(yaw) * math.cos(tilt), -math.sin(tilt), math.cos(yaw) * math.cos(tilt)]
    )
    right = np.array([-math.cos(yaw), 0.0, math.sin(yaw)])  # right × down = forward (right-handed)
    down = np.cross(forward, right)
    right, down = (
        math.cos(roll) * right + math.sin(roll) * down,
        -math.sin(roll) * right + math.cos(roll) * down,
    )
    return Camera(origin, right, down, forward)


def _room(rng: np.random.Generator, scene: Scene, half_x: float, half_z: float) -> None:
    """Floor, walls (each present with p = 0.85), ceiling (p = 0.8) and pictures on the walls."""
    height = rng.uniform(2.4, 3.2)
    inf = np.inf
    scene.things.append(_thing(rng, Rect(1, 0.0, 1.0, np.full(3, -inf), np.full(3, inf)), FLOOR))
    if rng.random() < 0.8:
        lo, hi = np.array([-half_x, -inf, -half_z]), np.array([half_x, inf, half_z])
        scene.things.append(_thing(rng, Rect(1, height, -1.0, lo, hi), CEILING))
    paint = _thing(rng, Rect(0, 0.0, 1.0, np.zeros(3), np.zeros(3)), WALL)  # all walls alike
    for axis, half, other_half in ((0, half_x, half_z), (2, half_z, half_x)):
        other = 2 - axis
        for facing in (1.0, -1.0):
            if rng.random() > 0.85:
                continue  # open side
            offset = -facing * half
            lo, hi = np.full(3, -inf), np.full(3, inf)
            lo[1], hi[1] = 0.0, height
            lo[other], hi[other] = -other_half, other_half
            wall = Rect(axis, offset, facing, lo, hi)
            scene.things.append(replace(paint, shape=wall))
            for _ in range(int(rng.integers(0, 3))):
                centre = rng.uniform(-other_half + 0.5, other_half - 0.5)
                half_w, half_h = rng.uniform(0.2, 0.7), rng.uniform(0.15, 0.5)
                y = rng.uniform(1.0 + half_h * 0.5, height - half_h - 0.2)
                plo, phi = np.full(3, -inf), np.full(3, inf)
                plo[1], phi[1] = max(y - half_h, 0.05), y + half_h
                plo[other], phi[other] = centre - half_w, centre + half_w
                frame = Rect(axis, offset + facing * 0.01, facing, plo, phi)
                scene.things.append(_thing(rng, frame, PICTURE))


def _objects(rng: np.random.Generator, scene: Scene, half_x: float, half_z: float) -> None:
    """2-6 boxes, spheres and cylinders on the floor in front of the camera, never around it."""
    cam = scene.camera
    yaw = math.atan2(cam.forward[0], cam.forward[2])
    for _ in range(int(rng.integers(2, 7))):
        kind = int(rng.choice([BOX, SPHERE, CYLINDER]))
        if kind == BOX:
            size = np.array([rng.uniform(0.2, 0.7), rng.uniform(0.3, 1.5), rng.uniform(0.2, 0.7)])
            reach = math.hypot(size[0], size[2])
        elif kind == SPHERE:
            radius = rng.uniform(0.15, 0.5)
            lift = rng.uniform(0.0, 1.0) if rng.random() < 0.3 else 0.0
            reach = radius
        else:
            radius, height = rng.uniform(0.1, 0.4), rng.uniform(0.4, 2.0)
            reach = radius
        angle, dist = yaw + rng.uniform(-0.6, 0.6), rng.uniform(1.0, 5.0)
        x = np.clip(cam.origin[0] + dist * math.sin(angle), -half_x + reach, half_x - reach)
        z = np.clip(cam.origin[2] + dist * math.cos(angle), -half_z + reach, half_z - reach)
        if math.hypot(x - cam.origin[0], z - cam.origin[2]) < reach + 0.3:
            continue  # clipped onto the camera: drop it rather than put the camera inside
        if kind == BOX:
            lo = np.array([x - size[0], 0.0, z - size[2]])
            shape: Shape = Box(lo, lo + np.array([2 * size[0], size[1], 2 * size[2]]))
        elif kind == SPHERE:
            shape = Sphere(np.array([x, radius + lift, z]), radius)
        else:
            shape = Cylinder(float(x), float(z), radius, height)
        scene.things.append(_thing(rng, shape, kind))


def _sample_scene(rng: np.random.Generator) -> Scene:
    half_x, half_z = rng.uniform(1.5, 4.5, size=2)
    elevation, azimuth = math.radians(rng.uniform(35, 80)), rng.uniform(0, 2 * math.pi)
    light = np.array(
        [
            math.cos(elevation) * math.sin(azimuth),
            math.sin(elevation),
            math.cos(elevation) * math.cos(azimuth),
        ]
    )
    fog = np.array(colorsys.hsv_to_rgb(rng.uniform(0.5, 0.65), rng.uniform(0, 0.3), 0.85))
    scene = Scene(_camera(rng, half_x, half_z), light, rng.uniform(0.25, 0.45), fog)
    _room(rng, scene, half_x, half_z)
    _objects(rng, scene, half_x, half_z)
    return scene


# --------------------------------------------------------------------------------------------
# Rendering.
# --------------------------------------------------------------------------------------------


def _cast(things: list[Thing], origin: Array, dirs: Array) -> tuple[Array, Array, Array]:
    """First hit of every ray: t ``[N]`` (inf: none), world normal ``[N,3]``, thing ``[N]``."""
    t_best = np.full(len(dirs), np.inf)
    normal = np.zeros_like(dirs)
    index = np.full(len(dirs), -1)
    for k, thing in enumerate(things):
        t, n = thing.shape.intersect(origin, dirs)
        closer = t < t_best
        t_best[closer] = t[closer]
        normal[closer] = n[closer] if n.ndim == 2 else n
        index[closer] = k
    return t_best, normal, index


def _shadowed(scene: Scene, points: Array, normals: Array, which: Array) -> Array:
    """Whether an object blocks the light (room surfaces don't: the lamp is inside the room)."""
    start = points[which] + 1e-3 * normals[which]
    dirs = np.broadcast_to(scene.light, start.shape)
    blocked = np.zeros(len(start), dtype=bool)
    for thing in scene.things:
        if thing.casts_shadow:
            blocked |= np.isfinite(thing.shape.intersect(start, dirs)[0])
    out = np.zeros(len(points), dtype=bool)
    out[which] = blocked
    return out


def _dropout(rng: np.random.Generator, depth: Array) -> Array:
    """Sensor dropout: a random 0.2-2 % of pixels, and 30 % of pixels at depth discontinuities."""
    mask = rng.random(depth.shape) < rng.uniform(0.002, 0.02)
    jump = np.zeros(depth.shape, dtype=bool)
    rel_x = np.abs(np.diff(depth, axis=1)) > 0.1 * np.minimum(depth[:, 1:], depth[:, :-1])
    rel_y = np.abs(np.diff(depth, axis=0)) > 0.1 * np.minimum(depth[1:], depth[:-1])
    jump[:, 1:] |= rel_x
    jump[1:] |= rel_y
    return mask | (jump & (rng.random(depth.shape) < 0.3))


def render_scene(rng: np.random.Generator, height: int, width: int) -> dict[str, Array]:
    """Draw one scene from ``rng`` and render it.

    Returns float32 arrays in the on-disk format: ``image`` ``[H,W,3]``, ``label`` ``[H,W]``,
    ``depth`` ``[H,W,1]`` and ``normal`` ``[H,W,3]`` (see the module docstring for conventions).
    """
    scene = _sample_scene(rng)
    cam = scene.camera
    rays = view_rays(height, width).reshape(-1, 3)
    # world direction with forward component 1: the ray parameter t is the depth
    dirs = rays[:, :1] * cam.right + rays[:, 1:2] * cam.down + cam.forward
    t, n_world, index = _cast(scene.things, cam.origin, dirs)
    hit = (index >= 0) & (t <= MAX_DEPTH)
    index = np.where(hit, index, -1)
    points = cam.origin + np.where(hit, t, 0.0)[:, None] * dirs

    albedo = np.zeros_like(dirs)
    label = np.full(len(dirs), -1.0)
    for k, thing in enumerate(scene.things):
        mine = index == k
        if mine.any():
            w = LOOKS[thing.label].pattern(points[mine], n_world[mine], thing.freq, thing.phase)
            albedo[mine] = thing.colours[0] + w[:, None] * (thing.colours[1] - thing.colours[0])
            label[mine] = thing.label

    diffuse = np.clip(n_world @ scene.light, 0.0, None)
    lit = hit & (diffuse > 0)
    diffuse[lit & _shadowed(scene, points, n_world, lit)] *= 0.2
    fill = 0.2 * np.clip(-(n_world @ cam.forward), 0.0, None)  # light from the camera's side
    shaded = albedo * (scene.ambient + (1 - scene.ambient) * diffuse + fill)[:, None]
    haze = np.clip(np.where(hit, t, MAX_DEPTH) / MAX_DEPTH, 0, 1)[:, None] ** 3
    image = shaded * (1 - haze) + scene.fog * haze
    image = image * rng.uniform(0.8, 1.2) + rng.normal(0, rng.uniform(0.01, 0.03), image.shape)

    normal = np.stack([n_world @ cam.right, n_world @ cam.down, -(n_world @ cam.forward)], 1)
    normal[~hit] = 0.0
    depth = np.where(hit, t, 0.0).reshape(height, width)
    depth[_dropout(rng, depth)] = 0.0
    return {
        "image": np.clip(image, 0, 1).reshape(height, width, 3).astype(np.float32),
        "label": label.reshape(height, width).astype(np.float32),
        "depth": depth[..., None].astype(np.float32),
        "normal": normal.reshape(height, width, 3).astype(np.float32),
    }


# --------------------------------------------------------------------------------------------
# The writer.
# --------------------------------------------------------------------------------------------


def _split_counts(scale: float) -> dict[str, int]:
    return {split: max(1, round(n * scale)) for split, n in SCENE_SPLITS.items()}


def _marker(seed: int, height: int, width: int, scale: float) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "seed": int(seed),
        "height": int(height),
        "width": int(width),
        "scale": float(scale),
        "splits": _split_counts(scale),
        "classes": list(SCENE_CLASSES),
        "focal_px": FOCAL_PER_WIDTH * int(width),
        "max_depth": MAX_DEPTH,
        "normal_frame": "x right, y down, z towards the camera",
    }


def _write_split(root: Path, split_index: int, split: str, count: int, seed: int,
                 height: int, width: int) -> None:  # fmt: skip
    folders = {"image": "image", "label": "label", "depth": "depth", "normal": "normal"}
    for folder in folders.values():
        (root / split / folder).mkdir(parents=True)
    for i in range(count):
        maps = render_scene(np.random.default_rng([seed, split_index, i]), height, width)
        for key, folder in folders.items():
            np.save(root / split / folder / f"{i}.npy", maps[key])


def generate_mini_scenes(
    root: Path, seed: int = 0, height: int = 48, width: int = 64, scale: float = 1.0
) -> None:
    """Write the mini-scenes benchmark to ``root`` (replacing an earlier one there).

    Args:
        root: Destination folder. It must not exist, be empty, or hold earlier mini-scenes
            (recognised by the ``.complete`` marker); anything else is refused.
        seed: Same seed and parameters give byte-identical files.
        height: Image height in pixels.
        width: Image width in pixels (the focal length is 0.81 · width).
        scale: Multiplies every split's scene count (at least one scene per split).

    The tree is written into a temporary folder beside ``root`` and renamed into place, so an
    interrupted generation never leaves a half-written benchmark at ``root``.
    """
    if height < 4 or width < 4:
        raise ValueError(f"images must be at least 4×4 pixels, got {height}×{width}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    root = Path(root)

    def write(tmp: Path) -> None:
        for split_index, (split, count) in enumerate(_split_counts(scale).items()):
            _write_split(tmp, split_index, split, count, seed, height, width)

    write_tree(root, _marker(seed, height, width, scale), write, "mini-scenes tree")


def ensure_mini_scenes(
    root: Path, seed: int = 0, height: int = 48, width: int = 64, scale: float = 1.0
) -> Path:
    """Return ``root`` holding the mini-scenes for these parameters, generating them if needed.

    Generation happens only when ``root/.complete`` is missing or records other parameters.
    """
    root = Path(root)
    if read_marker(root) != _marker(seed, height, width, scale):
        generate_mini_scenes(root, seed=seed, height=height, width=width, scale=scale)
    return root
