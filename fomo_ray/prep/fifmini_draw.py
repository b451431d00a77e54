"""Pixels of FiF-mini: vectorised numpy drawing of shapes, textures and font glyphs.

Geometry lives in normalised image coordinates: x and y run over [-1, 1] across the image, y pointing down, so a
scene description is independent of the resolution. Shapes are implicit functions ``inside(u, v)`` of an object's
local coordinates (unit size, rotated by its angle); coverage is averaged over ``SS x SS`` sub-pixels per pixel,
which anti-aliases edges without per-shape distance functions. Everything is evaluated for a whole batch of
objects at once, in chunks so the sub-pixel grids stay small in memory.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

SS = 2                 # sub-pixels per pixel side for anti-aliasing
_CHUNK_PIXELS = 1 << 24  # sub-pixel evaluations per chunk (~64 MB of float32 per temporary)


# --------------------------------------------------------------------------------------------------- shapes
def _regular_polygon(u: np.ndarray, v: np.ndarray, sides: int, first_normal: float) -> np.ndarray:
    """Inside a regular polygon of circumradius 1 whose first edge normal points at angle ``first_normal``."""
    apothem = np.cos(np.pi / sides)
    out = np.ones(u.shape, dtype=bool)
    for k in range(sides):
        a = first_normal + 2 * np.pi * k / sides
        out &= u * np.cos(a) + v * np.sin(a) <= apothem
    return out


def _star(u: np.ndarray, v: np.ndarray, points: int = 5, outer: float = 1.05, inner: float = 0.45) -> np.ndarray:
    sector = 2 * np.pi / points
    phi = np.mod(np.arctan2(v, u) + np.pi / 2, sector) - sector / 2  # 0 at a tip; tip 0 points up
    rho = np.hypot(u, v)
    px, py = rho * np.cos(phi), np.abs(rho * np.sin(phi))
    ax, bx, by = outer, inner * np.cos(sector / 2), inner * np.sin(sector / 2)
    # inside iff P lies on the origin's side of the edge tip->inner vertex (cross product sign)
    return (bx - ax) * py - by * (px - ax) >= 0


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    x, y = 1.15 * u, -1.15 * v + 0.2  # the classic sextic heart, y up
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0


def _house(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A square body with a triangular roof."""
    body = (np.abs(u) <= 0.7) & (v >= -0.15) & (v <= 0.9)
    roof = (v >= -0.95) & (v <= -0.15) & (np.abs(u) <= 0.95 * (v + 0.95) / 0.8)
    return body | roof


def _arrow(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """An arrow pointing up (towards -v): a shaft and a triangular head."""
    shaft = (np.abs(u) <= 0.2) & (v >= -0.15) & (v <= 0.95)
    head = (v >= -1.0) & (v <= -0.15) & (np.abs(u) <= 0.7 * (v + 1.0) / 0.85)
    return shaft | head


SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    # shapes the pool P teaches
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.85,
    "triangle": lambda u, v: _regular_polygon(u * 0.95, v * 0.95 - 0.12, 3, np.pi / 2),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.0,
    # shapes only the adaptation data shows
    "star": _star,
    "cross": lambda u, v: ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95)),
    "heart": _heart,
    "house": _house,
    "crescent": lambda u, v: (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.78 ** 2),
    "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.55 ** 2),
    "hourglass": lambda u, v: (np.abs(v) <= 0.95) & (np.abs(u) <= 0.1 + 0.75 * np.abs(v)),
    "pentagon": lambda u, v: _regular_polygon(u, v, 5, np.pi / 2),
    # the ARROWS dataset's object (its direction is the concept)
    "arrow": _arrow,
}


def _subpixel_axis(size: int) -> np.ndarray:
    n = size * SS
    return ((np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1).astype(np.float32)


@dataclass
class Objects:
    """A flat batch of objects: which image each belongs to, its shape and pose, and its colour (0-255 floats)."""

    image: np.ndarray   # int [k]
    shape: np.ndarray   # str [k] (keys of SHAPES)
    cx: np.ndarray      # float [k] centre, normalised coords
    cy: np.ndarray
    r: np.ndarray       # half-size, normalised units
    angle: np.ndarray   # radians, clockwise on screen; 0 = upright
    rgb: np.ndarray     # float [k, 3]

    @staticmethod
    def concat(parts: list["Objects"]) -> "Objects":
        return Objects(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                         ("image", "shape", "cx", "cy", "r", "angle", "rgb")))


def shape_alpha(shape: str, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, angle: np.ndarray,
                size: int) -> np.ndarray:
    """Coverage ``float32 [k, size, size]`` of ``k`` objects of one shape."""
    inside = SHAPES[shape]
    ax = _subpixel_axis(size)
    X, Y = ax[None, None, :], ax[None, :, None]
    cx, cy, r, angle = (np.asarray(a, dtype=np.float32) for a in (cx, cy, r, angle))
    out = np.empty((len(cx), size, size), dtype=np.float32)
    step = max(1, _CHUNK_PIXELS // (len(ax) ** 2))
    for s in range(0, len(cx), step):
        sl = slice(s, s + step)
        inv = 1 / r[sl, None, None]
        c, sn = np.cos(angle[sl])[:, None, None] * inv, np.sin(angle[sl])[:, None, None] * inv
        dx, dy = X - cx[sl, None, None], Y - cy[sl, None, None]
        out[sl] = _box_filter(inside(dx * c + dy * sn, dy * c - dx * sn), size)
    return out


def _box_filter(mask: np.ndarray, size: int) -> np.ndarray:
    """Sub-pixel booleans ``[k, S*SS, S*SS]`` -> coverage ``float32 [k, S, S]``."""
    counts = mask.reshape(len(mask), size, SS, size, SS).sum(axis=(2, 4), dtype=np.uint8)
    return counts.astype(np.float32) * np.float32(1 / SS ** 2)


def render(background: np.ndarray, objects: Objects) -> np.ndarray:
    """Composite ``objects`` (in order; later ones on top) over ``background float [n, S, S, 3]`` -> uint8."""
    img = background.astype(np.float32, copy=True)
    size = img.shape[1]
    alpha = np.empty((len(objects.image), size, size), dtype=np.float32)
    for shape in np.unique(objects.shape):
        sel = np.flatnonzero(objects.shape == shape)
        alpha[sel] = shape_alpha(str(shape), objects.cx[sel], objects.cy[sel], objects.r[sel], objects.angle[sel],
                                 size)
    paint(img, objects.image, alpha, objects.rgb)
    return to_uint8(img)


def paint(img: np.ndarray, image_ids: np.ndarray, alpha: np.ndarray, rgb: np.ndarray) -> None:
    """In place: ``img[i] = img[i] * (1 - a) + rgb * a`` for each (image, alpha, colour), in order."""
    layer = _layer_index(image_ids)
    for k in range(int(layer.max()) + 1 if len(layer) else 0):
        sel = np.flatnonzero(layer == k)  # at most one object per image in a layer
        a = alpha[sel][..., None]
        ids = image_ids[sel]
        sub = img[ids]
        sub += (rgb[sel][:, None, None, :].astype(np.float32) - sub) * a
        img[ids] = sub


def _layer_index(image_ids: np.ndarray) -> np.ndarray:
    """Occurrence number of each entry among equal image ids (0 for an image's first object, 1 for its second...)."""
    order = np.argsort(image_ids, kind="stable")
    sorted_ids = image_ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    counts = np.diff(np.r_[starts, len(sorted_ids)])
    occ = np.arange(len(sorted_ids)) - np.repeat(starts, counts)
    out = np.empty_like(occ)
    out[order] = occ
    return out


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------- backgrounds
def plain_background(rng: np.random.Generator, grey: np.ndarray, size: int) -> np.ndarray:
    """Near-uniform backgrounds ``float [n, S, S, 3]`` of grey levels ``grey`` with a faint tint, a soft
    vertical gradient and sensor-like noise (so no two images share a background)."""
    n = len(grey)
    base = (grey[:, None, None, None] + rng.uniform(-8, 8, (n, 1, 1, 3))).astype(np.float32)  # grey + tint
    slope = rng.uniform(-12, 12, (n, 1, 1, 1)).astype(np.float32)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)[None, :, None, None]
    noise = rng.standard_normal((n, size, size, 3), dtype=np.float32)
    noise *= 3
    noise += base
    noise += slope * ramp
    return noise


# --------------------------------------------------------------------------------------------------- textures
def _frac(t: np.ndarray) -> np.ndarray:
    return t - np.floor(t)


TEXTURES: dict[str, Callable[..., np.ndarray]] = {
    # each maps rotated coordinates (a, b), in cycles, plus the radius from a random centre, to a boolean mask
    "striped": lambda a, b, rad: np.sin(2 * np.pi * a) > 0,
    "dotted": lambda a, b, rad: (_frac(a) - 0.5) ** 2 + (_frac(b) - 0.5) ** 2 < 0.3 ** 2,
    "checkered": lambda a, b, rad: (np.floor(a) + np.floor(b)) % 2 == 0,
    "zigzag": lambda a, b, rad: np.sin(2 * np.pi * (a + 0.9 * np.abs(_frac(b * 0.5) - 0.5))) > 0,
    "grid": lambda a, b, rad: (np.abs(_frac(a) - 0.5) > 0.34) | (np.abs(_frac(b) - 0.5) > 0.34),
    "wavy": lambda a, b, rad: np.sin(2 * np.pi * (a + 0.3 * np.sin(np.pi * b))) > 0,
    "concentric": lambda a, b, rad: np.sin(2 * np.pi * rad) > 0,
}
SPECKLED = "speckled"  # not a function of coordinates: random isolated dots


def texture_alpha(kind: str, freq: np.ndarray, angle: np.ndarray, centre: np.ndarray, size: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Foreground coverage ``float32 [n, S, S]`` of ``n`` textures of one kind (``freq`` in cycles per image)."""
    n = len(freq)
    if kind == SPECKLED:
        density = rng.uniform(0.08, 0.2, (n, 1, 1))
        return (rng.random((n, size, size)) < density).astype(np.float32)
    ax = _subpixel_axis(size)
    X, Y = ax[None, None, :], ax[None, :, None]
    out = np.empty((n, size, size), dtype=np.float32)
    step = max(1, _CHUNK_PIXELS // (len(ax) ** 2))
    for s in range(0, n, step):
        sl = slice(s, s + step)
        c, sn, f = (np.cos(angle[sl])[:, None, None], np.sin(angle[sl])[:, None, None],
                    freq[sl, None, None] / 2)  # coordinates span 2 units
        a = (X * c + Y * sn) * f
        b = (-X * sn + Y * c) * f
        rad = np.hypot(X - centre[sl, 0, None, None], Y - centre[sl, 1, None, None]) * f
        out[sl] = _box_filter(TEXTURES[kind](a, b, rad), size)
    return out


# --------------------------------------------------------------------------------------------------- glyphs
def font_dir() -> str:
    """The TrueType fonts that ship inside matplotlib (DejaVu family), used for letters and symbols."""
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


@functools.lru_cache(maxsize=256)
def _font(name: str, px: int):
    from PIL import ImageFont

    return ImageFont.truetype(os.path.join(font_dir(), name), px)


@functools.lru_cache(maxsize=None)
def _codepoints(name: str) -> frozenset[int]:
    from fontTools.ttLib import TTFont

    with TTFont(os.path.join(font_dir(), name), lazy=True) as f:
        return frozenset(f.getBestCmap())


def font_has(name: str, char: str) -> bool:
    return ord(char) in _codepoints(name)


def glyph_alpha(font: str, char: str, size: int, scale: float, angle_deg: float, dx: float, dy: float) -> np.ndarray:
    """Coverage ``float32 [S, S]`` of one glyph: drawn at ``SS``x resolution (height ``scale`` of the image),
    rotated, shifted by ``(dx, dy)`` (normalised units), then box-filtered down."""
    from PIL import Image, ImageDraw

    big = size * SS * 2  # draw in a larger canvas so rotation never clips
    canvas = Image.new("L", (big, big), 0)
    px = max(4, int(round(scale * size * SS)))
    centre = (big / 2 + dx * size * SS / 2, big / 2 + dy * size * SS / 2)
    ImageDraw.Draw(canvas).text(centre, char, fill=255, font=_font(font, px), anchor="mm")
    canvas = canvas.rotate(-angle_deg, resample=Image.Resampling.BICUBIC, center=(big / 2, big / 2))
    q = big // 4
    crop = canvas.crop((q, q, q + size * SS, q + size * SS))
    return np.asarray(crop.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def upsample_grey(images: np.ndarray, size: int) -> np.ndarray:
    """``float [n, h, w]`` in [0, 1] -> ``uint8 [n, S, S, 3]`` grey RGB, bicubic (PIL)."""
    from PIL import Image

    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        small = Image.fromarray(np.clip(np.rint(im * 255), 0, 255).astype(np.uint8), mode="L")
        out[i] = np.asarray(small.resize((size, size), Image.Resampling.BICUBIC))[..., None]
    return out
