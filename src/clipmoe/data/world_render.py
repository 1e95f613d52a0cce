"""Drawing one scene of the generated world: a shape in one quadrant, small dots in other quadrants (or, as a
world option, spots on the object itself).

Geometry is relative to the image size, so the same scene renders at any resolution. Everything is drawn
at ``SUPERSAMPLE`` times the resolution and box-averaged down: edges are anti-aliased like a real
photograph's, and textures aligned to the pixel grid stay crisp instead of aliasing into mush.

Pixel values come only from the attributes and a ``Layout`` (jitter, tints, noise seed) drawn from the
sample's own random generator, so an image is a pure function of (attributes, layout, size): two images that
share a layout and differ in one attribute differ in exactly that attribute.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4
OBJECT_RGB = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (235, 215, 40),
    "lime": (160, 225, 40),
    "green": (50, 170, 70),
    "cyan": (40, 200, 215),
    "blue": (45, 85, 225),
    "purple": (140, 60, 200),
    "magenta": (205, 35, 150),
    "pink": (240, 120, 185),
}
BACKGROUND_RGB = {
    "white": (235, 235, 230),
    "gray": (125, 125, 125),
    "black": (25, 25, 25),
    "brown": (120, 70, 40),
    "navy": (25, 35, 85),
    "olive": (100, 110, 30),
    "teal": (20, 95, 95),
    "beige": (215, 200, 160),
}
# Object extent (its bounding box side) as a fraction of the image side. A quadrant is half the side, so a
# large object just fits in its quadrant and a small one can move around in it.
SIZE_FRACTION = {"small": 0.26, "medium": 0.36, "large": 0.46}
QUADRANTS = ("upper left", "upper right", "lower left", "lower right")  # index = 2 * row + column
COUNTS = {"one": 1, "two": 2, "three": 3}
DOT_RADIUS = 0.045  # of the image side: about 4 px across at 48 px (the default; WorldConfig.dot_radius)
MAX_DOT_RADIUS = 0.2  # a dot (at most 0.4 of the side across) must fit its quadrant (half the side) with room
# How the dots are coloured: ``contrast`` (the default) black or white against the backdrop, never a colour, so
# the count is a property of marks apart from the object; ``object`` in the object's own colour (and tint), so
# the count is one of marks that look like the object, which the image embedding weighs with it.
DOT_COLORS = ("contrast", "object")
# Where the dots are: ``apart`` (the default) one in each of ``count`` quadrants other than the object's, so the
# count is a property of marks apart from the object; ``object`` a row of spots on the object itself, scaled with
# it, so the count is part of the object the class token attends to, as its texture is (black or white, whichever
# stands out more against both the object and the backdrop).
DOT_PLACEMENTS = ("apart", "object")
SPOT_RADIUS = 0.13  # of the object's half-extent: 1.6 px across on a small object at 48 px, 2.9 px on a large one
SPOT_X = {1: (0.0,), 2: (-0.22, 0.22), 3: (-0.42, 0.0, 0.42)}  # spot centres, in the object's half-extents
SPOT_Y = 0.1  # just below the centre, where the triangle (apex up) is wide enough for three spots
MARGIN = 1.0  # pixels kept free between anything drawn and its quadrant's border


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    """A star with ``points`` tips on the unit circle, the first pointing up."""
    return [
        (
            (1.0 if i % 2 == 0 else inner) * math.cos(-math.pi / 2 + i * math.pi / points),
            (1.0 if i % 2 == 0 else inner) * math.sin(-math.pi / 2 + i * math.pi / points),
        )
        for i in range(2 * points)
    ]


def _cross(arm: float = 0.34) -> list[tuple[float, float]]:
    """A plus sign: the top arm's three outline corners, turned four times by a quarter."""
    corners = [(-arm, -1.0), (arm, -1.0), (arm, -arm)]
    points = []
    for _ in range(4):
        points += corners
        corners = [(-y, x) for x, y in corners]
    return points


# Polygons in unit coordinates (extent [-1, 1], y down); the circle is drawn as an ellipse.
SHAPE_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)],
    "star": _star(),
    "cross": _cross(),
    "diamond": [(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)],
}


@dataclass(frozen=True)
class Layout:
    """Everything random about an image that is not an attribute value."""

    jitter: tuple[float, float]  # object centre within the room its quadrant leaves, in [-1, 1]
    dot_order: tuple[int, ...]  # quadrants in the order they receive dots (the object's own is skipped)
    dot_jitter: tuple[tuple[float, float], ...]  # per quadrant, like ``jitter``
    object_tint: tuple[int, int, int]  # added to the nominal colours, so no two reds are identical
    background_tint: tuple[int, int, int]
    noise_seed: int

    @classmethod
    def sample(cls, rng: np.random.Generator, color_jitter: int) -> Layout:
        def tint() -> tuple[int, int, int]:
            return tuple(int(t) for t in rng.integers(-color_jitter, color_jitter + 1, size=3))

        return cls(
            jitter=tuple(float(x) for x in rng.uniform(-1, 1, size=2)),
            dot_order=tuple(int(q) for q in rng.permutation(4)),
            dot_jitter=tuple((float(x), float(y)) for x, y in rng.uniform(-1, 1, size=(4, 2))),
            object_tint=tint(),
            background_tint=tint(),
            noise_seed=int(rng.integers(2**31)),
        )


def dot_quadrants(attributes: Mapping[str, str], layout: Layout) -> list[int]:
    """The quadrants that hold a dot: the first ``count`` of ``dot_order`` other than the object's."""
    own = QUADRANTS.index(attributes["position"])
    return [q for q in layout.dot_order if q != own][: COUNTS[attributes["count"]]]


def _quadrant_centre(q: int, size: int) -> tuple[float, float]:
    half = size / 2
    return (q % 2 + 0.5) * half, (q // 2 + 0.5) * half


def _running_min(a: np.ndarray, window: int, axis: int) -> np.ndarray:
    """Minimum over ``window`` consecutive entries along ``axis`` (output shorter by ``window - 1``), by
    doubling the window: O(log window) array passes instead of one per offset."""

    def shifted(x: np.ndarray, start: int, stop: int | None) -> np.ndarray:
        index = [slice(None)] * x.ndim
        index[axis] = slice(start, stop)
        return x[tuple(index)]

    width = 1
    while 2 * width <= window:
        a = np.minimum(shifted(a, 0, -width), shifted(a, width, None))
        width *= 2
    if width < window:
        a = np.minimum(shifted(a, 0, width - window), shifted(a, window - width, None))
    return a


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion with a square of side ``2 * radius + 1`` (separable running minimum)."""
    padded = np.pad(mask, radius)
    return _running_min(_running_min(padded, 2 * radius + 1, 0), 2 * radius + 1, 1)


def _texture_mask(texture: str, size: int) -> np.ndarray | None:
    """Where a textured object shows its colour (True) or lets the background through, at supersampling."""
    pixel = np.arange(size * SUPERSAMPLE) // SUPERSAMPLE
    if texture == "striped":
        width = max(1, round(size / 24))  # 2 px stripes at 48 px
        return np.broadcast_to(((pixel // width) % 2 == 0)[:, None], (len(pixel), len(pixel)))
    if texture == "checkered":
        cell = max(2, round(size / 16))  # 3 px cells at 48 px
        return ((pixel[:, None] // cell) + (pixel[None, :] // cell)) % 2 == 0
    return None


def _object_box(attributes: Mapping[str, str], layout: Layout, size: int) -> tuple[float, float, float]:
    """The object's centre (x, y) and extent in pixels: its quadrant's centre, moved by the layout's jitter
    within the room the quadrant leaves."""
    extent = SIZE_FRACTION[attributes["size"]] * size
    cx, cy = _quadrant_centre(QUADRANTS.index(attributes["position"]), size)
    room = max(0.0, (size / 2 - extent) / 2 - MARGIN)
    return cx + layout.jitter[0] * room, cy + layout.jitter[1] * room, extent


def _object_mask(attributes: Mapping[str, str], layout: Layout, size: int) -> np.ndarray:
    """Object coverage at supersampled resolution, as a bool array."""
    cx, cy, extent = _object_box(attributes, layout, size)
    s, r = SUPERSAMPLE, extent / 2
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    shape = attributes["shape"]
    if shape == "circle":
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s - 1, (cy + r) * s - 1], fill=255)
    else:
        draw.polygon([((cx + r * x) * s, (cy + r * y) * s) for x, y in SHAPE_POLYGONS[shape]], fill=255)
    mask = np.asarray(canvas) > 0
    texture = attributes["texture"]
    if texture == "hollow":
        outline = max(1.5, size / 24)  # 2 px at 48 px: thick enough to keep the colour readable
        mask = mask & ~_erode(mask, round(outline * s))
    else:
        pattern = _texture_mask(texture, size)
        if pattern is not None:
            mask = mask & pattern
    return mask


def _discs(centres: list[tuple[float, float]], r: float, size: int) -> np.ndarray:
    """Coverage of discs of radius ``r`` (pixels) at ``centres``, at supersampled resolution, as a bool array."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    for cx, cy in centres:
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s - 1, (cy + r) * s - 1], fill=255)
    return np.asarray(canvas) > 0


def _dot_mask(attributes: Mapping[str, str], layout: Layout, size: int, radius: float) -> np.ndarray:
    """One dot in each of ``dot_quadrants``, moved by the layout's jitter within its quadrant."""
    r = radius * size
    room = size / 4 - r - MARGIN
    centres = []
    for q in dot_quadrants(attributes, layout):
        cx, cy = _quadrant_centre(q, size)
        centres.append((cx + layout.dot_jitter[q][0] * room, cy + layout.dot_jitter[q][1] * room))
    return _discs(centres, r, size)


def _spot_mask(attributes: Mapping[str, str], layout: Layout, size: int) -> np.ndarray:
    """A row of ``count`` spots on the object, centred on it (where every shape has room for them)."""
    cx, cy, extent = _object_box(attributes, layout, size)
    half = extent / 2
    centres = [(cx + x * half, cy + SPOT_Y * half) for x in SPOT_X[COUNTS[attributes["count"]]]]
    return _discs(centres, SPOT_RADIUS * half, size)


def _coverage(mask: np.ndarray, size: int) -> np.ndarray:
    """Supersampled bool mask -> fraction of each output pixel covered, ``[size, size, 1]``. PIL's box
    filter averages each ``SUPERSAMPLE`` x ``SUPERSAMPLE`` block exactly (a few times faster than numpy)."""
    image = Image.fromarray(mask.view(np.uint8) * np.uint8(255)).resize((size, size), Image.BOX)
    return np.asarray(image, np.float32)[..., None] * np.float32(1 / 255)


def dot_rgb(background: str) -> tuple[int, int, int]:
    """Dots are black on light backgrounds and white on the others: always high contrast, never a colour."""
    return (15, 15, 15) if sum(BACKGROUND_RGB[background]) > 3 * 160 else (250, 250, 250)


def spot_rgb(color: str, background: str) -> tuple[int, int, int]:
    """Spots on the object are black or white, whichever is farther from the nearer of the object's and the
    backdrop's colours: visible on the object and, where a hollow or striped object lets it through, on the
    backdrop."""
    dark, light = (15, 15, 15), (250, 250, 250)

    def margin(rgb: tuple[int, int, int]) -> float:
        return min(math.dist(rgb, OBJECT_RGB[color]), math.dist(rgb, BACKGROUND_RGB[background]))

    return dark if margin(dark) >= margin(light) else light


def render(
    attributes: Mapping[str, str],
    layout: Layout,
    size: int,
    noise: float = 0.0,
    dot_radius: float = DOT_RADIUS,
    dot_color: str = "contrast",
    dot_placement: str = "apart",
) -> Image.Image:
    """The RGB image of a scene: ``size`` x ``size`` pixels; ``dot_radius`` is a fraction of the side,
    ``dot_color`` one of ``DOT_COLORS``, ``dot_placement`` one of ``DOT_PLACEMENTS`` (spots on the object scale
    with it and take ``spot_rgb``'s colour: ``dot_radius`` and ``dot_color`` are for dots apart)."""
    if dot_color not in DOT_COLORS:
        raise ValueError(f"dot_color {dot_color!r} must be one of {DOT_COLORS}")
    if dot_placement not in DOT_PLACEMENTS:
        raise ValueError(f"dot_placement {dot_placement!r} must be one of {DOT_PLACEMENTS}")
    if dot_placement == "object" and (dot_radius != DOT_RADIUS or dot_color != "contrast"):
        raise ValueError(
            "spots on the object scale with it and are black or white: dot_radius and dot_color"
            " apply to dots apart from it (dot_placement 'apart')"
        )
    background = np.add(BACKGROUND_RGB[attributes["background"]], layout.background_tint, dtype=np.float32)
    colour = np.add(OBJECT_RGB[attributes["color"]], layout.object_tint, dtype=np.float32)
    image = np.broadcast_to(background, (size, size, 3)).copy()
    alpha = _coverage(_object_mask(attributes, layout, size), size)
    image += alpha * (colour - image)
    if dot_placement == "object":
        alpha = _coverage(_spot_mask(attributes, layout, size), size)
        dots = np.asarray(spot_rgb(attributes["color"], attributes["background"]), np.float32)
    else:
        alpha = _coverage(_dot_mask(attributes, layout, size, dot_radius), size)
        dots = colour if dot_color == "object" else np.asarray(dot_rgb(attributes["background"]), np.float32)
    image += alpha * (dots - image)
    if noise > 0:
        image += np.random.default_rng(layout.noise_seed).normal(0.0, noise, image.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), "RGB")
