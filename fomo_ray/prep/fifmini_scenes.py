"""Scene samplers of FiF-mini: attribute draws -> images (via :mod:`fifmini_draw`) and captions (via
:mod:`fifmini_text`). Every sampler takes a numpy ``Generator`` for pixels/attributes and a ``random.Random`` for
caption wording, returns ``(uint8 images [n, S, S, 3], captions list[list[str]])`` and is vectorised over ``n``.
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np

from . import fifmini_draw as draw
from . import fifmini_text as text

CAPTIONS_PER_IMAGE = 3
_JITTER = 0.08        # random offset of an object from its nominal position (normalised units)
_MIN_CONTRAST = 70.0  # luminance gap between an object and its background


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _pick(rng: np.random.Generator, options: Sequence[str], n: int) -> np.ndarray:
    return np.asarray(options, dtype=object)[rng.integers(0, len(options), n)]


def _colours(rng: np.random.Generator, names: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> np.ndarray:
    base = np.array([palette[c] for c in names], dtype=np.float64).reshape(-1, 3)
    return np.clip(base + rng.uniform(-12, 12, base.shape), 0, 255)


def _backgrounds(rng: np.random.Generator, fg_lum: np.ndarray) -> np.ndarray:
    """'dark' or 'light' per image: random where it contrasts with every object of the image (``fg_lum`` is
    ``[n]`` or ``[n, k]``), else the better-contrasting one."""
    lum = np.asarray(fg_lum, dtype=np.float64).reshape(len(fg_lum), -1)
    names = list(text.BACKGROUNDS)
    greys = np.array([text.BACKGROUNDS[k] for k in names])
    contrast = np.abs(lum[:, :, None] - greys[None, None, :]).min(axis=1)  # [n, backgrounds]
    choice = rng.integers(0, len(names), len(lum))
    keep = contrast[np.arange(len(lum)), choice] >= _MIN_CONTRAST
    choice = np.where(keep, choice, contrast.argmax(axis=1))
    return np.asarray(names, dtype=object)[choice]


def _background_pixels(rng: np.random.Generator, kinds: np.ndarray, size: int) -> np.ndarray:
    grey = np.array([text.BACKGROUNDS[k] for k in kinds]) + rng.uniform(-15, 15, len(kinds))
    return draw.plain_background(rng, grey, size)


# --------------------------------------------------------------------------------------------------- single objects
def single_objects(rng: np.random.Generator, rnd: random.Random, size: int, shapes: np.ndarray,
                   colours: np.ndarray, sizes: np.ndarray, positions: np.ndarray,
                   palette: dict[str, tuple[int, int, int]], angles: np.ndarray | None = None,
                   n_full: int = 1) -> tuple[np.ndarray, list[list[str]]]:
    """One object per image with the given attribute arrays; 'large' objects are always centred."""
    n = len(shapes)
    positions = np.where(sizes == "large", "center", positions)
    rgb = _colours(rng, colours, palette)
    kinds = _backgrounds(rng, _luminance(rgb))
    centre = np.array([text.POSITIONS[p] for p in positions]).reshape(-1, 2) + rng.uniform(-_JITTER, _JITTER, (n, 2))
    radius = np.array([text.SIZE_RADIUS[s] for s in sizes]) * rng.uniform(0.9, 1.1, n)
    angle = rng.uniform(-0.2, 0.2, n) if angles is None else angles
    objs = draw.Objects(np.arange(n), shapes.astype(str), centre[:, 0], centre[:, 1], radius, angle, rgb)
    images = draw.render(_background_pixels(rng, kinds, size), objs)
    caps = [[text.object_caption(rnd, str(shapes[i]), str(colours[i]), str(sizes[i]), str(positions[i]),
                                 str(kinds[i]), full=j < n_full) for j in range(CAPTIONS_PER_IMAGE)]
            for i in range(n)]
    return images, caps


def random_singles(rng: np.random.Generator, rnd: random.Random, size: int, n: int, *,
                   palette: dict[str, tuple[int, int, int]] = text.POOL_COLOURS, angles: np.ndarray | None = None,
                   **fixed: np.ndarray):
    """Single-object scenes; each of ``shapes``, ``colours``, ``sizes``, ``positions`` is taken from ``fixed``
    (e.g. the labels) or drawn uniformly (pool shapes, ``palette`` colours, all sizes and positions)."""
    options = {"shapes": text.POOL_SHAPES, "colours": tuple(palette), "sizes": text.SIZES,
               "positions": tuple(text.POSITIONS)}
    unknown = set(fixed) - set(options)
    if unknown:
        raise TypeError(f"random_singles: unknown attributes {sorted(unknown)}")
    attrs = {k: np.asarray(fixed[k], dtype=object) if k in fixed else _pick(rng, v, n) for k, v in options.items()}
    return single_objects(rng, rnd, size, palette=palette, angles=angles, **attrs)


# --------------------------------------------------------------------------------------------------- counts, pairs
_CELLS = np.array([(x, y) for y in (-0.62, 0.0, 0.62) for x in (-0.62, 0.0, 0.62)])


def count_scenes(rng: np.random.Generator, rnd: random.Random, size: int, counts: np.ndarray
                 ) -> tuple[np.ndarray, list[list[str]]]:
    """``counts[i]`` (a word, 'two'..'five') equal small objects in distinct cells of a 3x3 grid."""
    n = len(counts)
    k = np.array([text.COUNT_VALUE[c] for c in counts])
    shapes, colours = _pick(rng, text.POOL_SHAPES, n), _pick(rng, list(text.POOL_COLOURS), n)
    rgb = _colours(rng, colours, text.POOL_COLOURS)
    kinds = _backgrounds(rng, _luminance(rgb))
    cells = np.argsort(rng.random((n, 9)), axis=1)  # a random cell order per image
    image = np.repeat(np.arange(n), k)
    slot = np.concatenate([np.arange(c) for c in k])
    centre = _CELLS[cells[image, slot]] + rng.uniform(-_JITTER, _JITTER, (len(image), 2))
    objs = draw.Objects(image, shapes[image].astype(str), centre[:, 0], centre[:, 1],
                        0.2 * rng.uniform(0.9, 1.1, len(image)), rng.uniform(-0.2, 0.2, len(image)), rgb[image])
    images = draw.render(_background_pixels(rng, kinds, size), objs)
    caps = [[text.count_caption(rnd, str(counts[i]), str(shapes[i]), str(colours[i]), str(kinds[i]), full=j == 0)
             for j in range(CAPTIONS_PER_IMAGE)] for i in range(n)]
    return images, caps


def pair_scenes(rng: np.random.Generator, rnd: random.Random, size: int, n: int) -> tuple[np.ndarray, list[list[str]]]:
    """Two different objects side by side (left/right) or stacked (above/below)."""
    shapes = np.stack([_pick(rng, text.POOL_SHAPES, n), _pick(rng, text.POOL_SHAPES, n)], 1)
    colours = np.stack([_pick(rng, list(text.POOL_COLOURS), n), _pick(rng, list(text.POOL_COLOURS), n)], 1)
    same = (shapes[:, 0] == shapes[:, 1]) & (colours[:, 0] == colours[:, 1])
    shapes[same, 1] = [text.POOL_SHAPES[(text.POOL_SHAPES.index(s) + 1) % 4] for s in shapes[same, 0]]
    rgb = _colours(rng, colours.reshape(-1), text.POOL_COLOURS).reshape(n, 2, 3)
    kinds = _backgrounds(rng, _luminance(rgb))  # [n, 2]: contrast with both objects
    relation = _pick(rng, ["left", "above"], n)
    along = rng.uniform(-0.3, 0.3, n)
    off = 0.45 + rng.uniform(-_JITTER, _JITTER, (n, 2))
    horizontal = relation == "left"
    cx = np.where(horizontal[:, None], np.stack([-off[:, 0], off[:, 1]], 1), along[:, None])
    cy = np.where(horizontal[:, None], along[:, None], np.stack([-off[:, 0], off[:, 1]], 1))
    base = np.array([text.SIZE_RADIUS[s] for s in _pick(rng, ["small", "medium"], n)])
    r = base[:, None] * rng.uniform(0.9, 1.0, (n, 2))
    objs = draw.Objects(np.repeat(np.arange(n), 2), shapes.reshape(-1).astype(str), cx.reshape(-1), cy.reshape(-1),
                        r.reshape(-1), rng.uniform(-0.2, 0.2, 2 * n), rgb.reshape(-1, 3))
    images = draw.render(_background_pixels(rng, kinds, size), objs)
    caps = [[text.pair_caption(rnd, (colours[i, 0], shapes[i, 0]), (colours[i, 1], shapes[i, 1]), str(relation[i]),
                               str(kinds[i])) for _ in range(CAPTIONS_PER_IMAGE)] for i in range(n)]
    return images, caps


def pool_scenes(rng: np.random.Generator, rnd: random.Random, size: int, n: int) -> tuple[np.ndarray, list[list[str]]]:
    """The pool P mixture: 55% single objects, 25% counts (two..five), 20% pairs, shuffled together."""
    n_count, n_pair = int(round(0.25 * n)), int(round(0.2 * n))
    n_single = n - n_count - n_pair
    parts = [random_singles(rng, rnd, size, n_single),
             count_scenes(rng, rnd, size, _pick(rng, text.COUNTS, n_count)),
             pair_scenes(rng, rnd, size, n_pair)]
    images = np.concatenate([p[0] for p in parts])
    caps = [c for p in parts for c in p[1]]
    order = rng.permutation(n)
    return images[order], [caps[i] for i in order]


# --------------------------------------------------------------------------------------------------- textures
_TEXTURE_COLOURS = {**text.POOL_COLOURS, "black": (25, 25, 25), "white": (235, 235, 235)}
_TEXTURE_WORDS = [
    "a {t} pattern.", "a {t} pattern in {c} and {c2}.", "{ac} and {c2} {t} texture.", "{t} fabric in {c} and {c2}.",
    "a close-up of a {t} surface.", "a photo of a {t} pattern.", "a {t} design with {c} on {c2}.",
]


def textures(rng: np.random.Generator, rnd: random.Random, size: int, kinds: np.ndarray
             ) -> tuple[np.ndarray, list[list[str]]]:
    """Two-colour textures of the given kinds (random frequency, angle, centre, colours)."""
    n = len(kinds)
    names = list(_TEXTURE_COLOURS)
    fg = _pick(rng, names, n)
    bg = _pick(rng, names, n)
    fg_rgb, bg_rgb = _colours(rng, fg, _TEXTURE_COLOURS), _colours(rng, bg, _TEXTURE_COLOURS)
    weak = np.abs(_luminance(fg_rgb) - _luminance(bg_rgb)) < 50  # keep the pattern visible
    bg[weak] = np.where(_luminance(fg_rgb[weak]) > 128, "black", "white")
    bg_rgb[weak] = _colours(rng, bg[weak], _TEXTURE_COLOURS)
    freq, angle = rng.uniform(3.0, 5.5, n), rng.uniform(0, np.pi, n)
    centre = rng.uniform(-0.6, 0.6, (n, 2))
    alpha = np.empty((n, size, size), dtype=np.float32)
    for kind in np.unique(kinds):
        sel = np.flatnonzero(kinds == kind)
        alpha[sel] = draw.texture_alpha(str(kind), freq[sel], angle[sel], centre[sel], size, rng)
    img = np.broadcast_to(bg_rgb[:, None, None, :], (n, size, size, 3)).astype(np.float32)
    draw.paint(img, np.arange(n), alpha, fg_rgb)
    img += rng.normal(0, 3, img.shape).astype(np.float32)
    caps = [text.varied(rnd, _TEXTURE_WORDS, CAPTIONS_PER_IMAGE, t=str(kinds[i]), c=str(fg[i]), c2=str(bg[i]))
            for i in range(n)]
    return draw.to_uint8(img), caps


# --------------------------------------------------------------------------------------------------- arrows
_ARROW_WORDS = [
    "an arrow pointing {d}.", "{ac} arrow pointing {d}.", "an arrow facing {d} {bg}.", "{ac} arrow that points {d}.",
    "a photo of an arrow pointing {d}.", "an arrow heading {d}.", "{ac} arrow, pointing {d}.",
]


def arrows(rng: np.random.Generator, rnd: random.Random, size: int, directions: np.ndarray
           ) -> tuple[np.ndarray, list[list[str]]]:
    """A medium or large arrow near the centre pointing at a compass direction (0 = north, clockwise)."""
    n = len(directions)
    colours = _pick(rng, list(text.POOL_COLOURS), n)
    rgb = _colours(rng, colours, text.POOL_COLOURS)
    kinds = _backgrounds(rng, _luminance(rgb))
    bearing = np.array([text.DIRECTIONS.index(d) for d in directions]) * (np.pi / 4)
    angle = bearing + rng.uniform(-0.14, 0.14, n)
    centre = rng.uniform(-0.15, 0.15, (n, 2))
    radius = np.array([text.SIZE_RADIUS[s] for s in _pick(rng, ["medium", "large"], n)]) * rng.uniform(0.95, 1.15, n)
    objs = draw.Objects(np.arange(n), np.full(n, "arrow"), centre[:, 0], centre[:, 1], radius, angle, rgb)
    images = draw.render(_background_pixels(rng, kinds, size), objs)
    bg_words = {"dark": "on a dark background", "light": "on a light background"}
    caps = [text.varied(rnd, _ARROW_WORDS, CAPTIONS_PER_IMAGE, d=str(directions[i]), c=str(colours[i]),
                        bg=bg_words[kinds[i]]) for i in range(n)]
    return images, caps


# --------------------------------------------------------------------------------------------------- glyphs
LETTER_FONTS = tuple(f"DejaVu{fam}{style}.ttf" for fam, styles in (
    ("Sans", ("", "-Bold", "-Oblique", "-BoldOblique")), ("Serif", ("", "-Bold", "-Italic", "-BoldItalic")),
    ("SansMono", ("", "-Bold", "-Oblique", "-BoldOblique"))) for style in styles)
ICON_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
              "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf")
_FONT_KIND = {"Sans": "sans-serif", "Serif": "serif", "SansMono": "monospace"}


def glyphs(rng: np.random.Generator, rnd: random.Random, size: int, chars: Sequence[str], fonts: Sequence[str],
           caption_words: Sequence[str], templates: list[str], scale: tuple[float, float] = (0.55, 0.8)
           ) -> tuple[np.ndarray, list[list[str]]]:
    """Font glyphs ``chars[i]`` in a random font of ``fonts``, colour, size, tilt and offset, on a plain background.

    ``templates`` may use ``{w}`` (the class word), ``{c}`` (colour), ``{bg}`` and ``{f}`` (font kind)."""
    n = len(chars)
    colours = _pick(rng, list(text.POOL_COLOURS), n)
    rgb = _colours(rng, colours, text.POOL_COLOURS)
    kinds = _backgrounds(rng, _luminance(rgb))
    font = _pick(rng, fonts, n)
    s = rng.uniform(*scale, n)
    tilt = rng.uniform(-15, 15, n)
    shift = rng.uniform(-0.15, 0.15, (n, 2))
    for f in set(font):
        missing = [c for c in set(np.asarray(chars)[font == f]) if not draw.font_has(str(f), c)]
        if missing:
            raise RuntimeError(f"font {f} in {draw.font_dir()} lacks glyphs {missing}")
    alpha = np.stack([draw.glyph_alpha(str(font[i]), chars[i], size, s[i], tilt[i], *shift[i]) for i in range(n)])
    img = _background_pixels(rng, kinds, size)
    draw.paint(img, np.arange(n), alpha, rgb)
    bg_words = {"dark": "on a dark background", "light": "on a white background"}
    fam = [str(f).removeprefix("DejaVu").split("-")[0].removesuffix(".ttf") for f in font]
    caps = [text.varied(rnd, templates, CAPTIONS_PER_IMAGE, w=caption_words[i], c=str(colours[i]),
                        bg=bg_words[kinds[i]], f=_FONT_KIND.get(fam[i], "plain")) for i in range(n)]
    return draw.to_uint8(img), caps


# --------------------------------------------------------------------------------------------------- real digits
_DIGIT_WORDS = [
    "a photo of the number {w}.", "a handwritten {w}.", "the digit {d}, handwritten.", "a handwritten number {w}.",
    "a scanned digit {w} in white on black.", "a blurry handwritten {d}.", "the number {w} written by hand.",
]


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits (UCI optdigits test set, 1797 images of 8x8, values 0..16)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float64) / 16.0, d.target.astype(np.int64)


def digits(rnd: random.Random, size: int, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, list[list[str]]]:
    """Real 8x8 digit scans upsampled to ``size`` (bicubic), white on black as scanned."""
    out = draw.upsample_grey(images, size)
    caps = [text.varied(rnd, _DIGIT_WORDS, CAPTIONS_PER_IMAGE, w=text.NUMBER_WORDS[y], d=str(y)) for y in labels]
    return out, caps
