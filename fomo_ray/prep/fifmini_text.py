"""Words of FiF-mini: palettes, attribute vocabularies and the caption grammar.

Captions imitate web alt-text: several phrasings per scene, attributes in random order, synonyms, and partial
captions that mention only some attributes ("a photo of a circle.", "a small red object in the top left."). The
partial ones matter: the zero-shot prompts of the evaluation datasets ("a photo of a {} object.") are such
partial captions, so a CLIP trained on the pool can answer them. Every choice comes from a ``random.Random``
seeded by the generator, so captions are deterministic.
"""
from __future__ import annotations

import random

# colours the pool P shows (RGB) ...
POOL_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (240, 215, 40), "green": (40, 165, 50),
    "cyan": (40, 200, 215), "blue": (35, 70, 215), "purple": (135, 50, 185), "pink": (245, 125, 185),
}
# ... and rarer colour words only the RARE_COLOURS adaptation dataset teaches
RARE_COLOURS: dict[str, tuple[int, int, int]] = {
    "brown": (125, 75, 30), "grey": (128, 128, 128), "olive": (120, 125, 20), "teal": (10, 125, 120),
    "maroon": (120, 10, 30), "navy": (15, 25, 115), "beige": (220, 200, 160), "lavender": (185, 160, 235),
}
BACKGROUNDS: dict[str, float] = {"dark": 35.0, "light": 225.0}  # grey level of the plain backgrounds

POOL_SHAPES = ("circle", "square", "triangle", "diamond")
NOVEL_SHAPES = ("star", "cross", "heart", "house", "crescent", "ring", "hourglass", "pentagon")
SIZES = ("small", "medium", "large")
SIZE_RADIUS = {"small": 0.22, "medium": 0.38, "large": 0.62}  # half-size in normalised units (image = 2)
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.0, 0.0), "top left": (-0.45, -0.45), "top right": (0.45, -0.45),
    "bottom left": (-0.45, 0.45), "bottom right": (0.45, 0.45),
}
COUNTS = ("two", "three", "four", "five")
COUNT_VALUE = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
DIRECTIONS = ("north", "northeast", "east", "southeast", "south", "southwest", "west", "northwest")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# the canonical word (the evaluation class name) appears half of the time, synonyms otherwise
_SIZE_WORDS = {"small": ["small", "small", "tiny", "little"],
               "medium": ["medium", "medium", "medium-sized", "mid-sized"],
               "large": ["large", "large", "big", "huge"]}
_POSITION_WORDS = {
    "center": ["in the center", "in the center", "in the middle", "at the center"],
    "top left": ["in the top left", "in the top left", "in the top left corner", "at the top left"],
    "top right": ["in the top right", "in the top right", "in the top right corner", "at the top right"],
    "bottom left": ["in the bottom left", "in the bottom left", "in the bottom left corner", "at the bottom left"],
    "bottom right": ["in the bottom right", "in the bottom right", "in the bottom right corner",
                     "at the bottom right"],
}
_BACKGROUND_WORDS = {"dark": ["on a dark background", "on a black background", "against a dark background"],
                     "light": ["on a light background", "on a white background", "against a light background"]}
_OPENERS = ["a photo of", "a photo of", "a picture of", "an image of", "a drawing of", "a rendering of",
            "a close-up of", ""]
_PLURAL = {"cross": "crosses", "hourglass": "hourglasses"}


def article(phrase: str) -> str:
    """'a' or 'an' for the phrase's first word."""
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def plural(noun: str) -> str:
    return _PLURAL.get(noun, noun + "s")


def _np(rnd: random.Random, words: list[str]) -> str:
    """A noun phrase with its article: ['small', 'red', 'circle'] -> 'a small red circle'."""
    phrase = " ".join(w for w in words if w)
    return f"{article(phrase)} {phrase}"


def _with_opener(rnd: random.Random, body: str) -> str:
    opener = rnd.choice(_OPENERS)
    return f"{opener} {body}".strip() + "."


def object_caption(rnd: random.Random, noun: str, colour: str | None, size: str | None, position: str | None,
                   background: str | None, full: bool) -> str:
    """One caption of a single object. ``full`` mentions every given attribute; otherwise each of size, position
    and background is kept with probability 1/2, and the colour, or the noun (replaced by "object"/"shape", or
    the phrase becoming "something <colour>"), may be dropped."""
    something = False
    if not full:
        size = size if rnd.random() < 0.5 else None
        position = position if rnd.random() < 0.5 else None
        background = background if rnd.random() < 0.5 else None
        drop = rnd.random()
        if drop < 0.2 and colour:
            colour = None
        elif drop < 0.3 and colour:
            noun = rnd.choice(["object", "shape"])
        elif drop < 0.45 and colour:
            something = True
    size_w = rnd.choice(_SIZE_WORDS[size]) if size else ""
    pos_w = rnd.choice(_POSITION_WORDS[position]) if position else ""
    bg_w = rnd.choice(_BACKGROUND_WORDS[background]) if background else ""
    if something:
        return _with_opener(rnd, " ".join(w for w in (f"something {colour}", pos_w, bg_w) if w))
    style = rnd.randrange(4)
    if style == 0 or not colour:
        body = " ".join(w for w in (_np(rnd, [size_w, colour or "", noun]), pos_w, bg_w) if w)
        return _with_opener(rnd, body)
    if style == 1:
        tail = ", ".join(w for w in (size_w, pos_w, bg_w) if w)
        return f"{_np(rnd, [colour, noun])}{', ' + tail if tail else ''}."
    if style == 2 and pos_w:
        rest = " ".join(w for w in (bg_w,) if w)
        return f"{pos_w} there is {_np(rnd, [size_w, colour, noun])}{' ' + rest if rest else ''}."
    body = " ".join(w for w in (_np(rnd, [size_w, noun]), f"coloured {colour}", pos_w, bg_w) if w)
    return _with_opener(rnd, body)


def count_caption(rnd: random.Random, count: str, noun: str, colour: str, background: str, full: bool) -> str:
    """A caption of ``count`` equal objects ("three red circles on a dark background.")."""
    if not full:
        colour = colour if rnd.random() < 0.6 else ""
        noun = noun if rnd.random() < 0.6 else rnd.choice(["object", "shape"])
        background = background if rnd.random() < 0.3 else None
    number = count if (full or rnd.random() < 0.8) else str(COUNT_VALUE[count])
    bg_w = rnd.choice(_BACKGROUND_WORDS[background]) if background else ""
    phrase = " ".join(w for w in (number, colour, plural(noun)) if w)
    style = rnd.randrange(3)
    if style == 0:
        return _with_opener(rnd, " ".join(w for w in (phrase, bg_w) if w))
    if style == 1:
        return f"there are {phrase}{' ' + bg_w if bg_w else ''}."
    return f"{phrase}, {rnd.choice(['side by side', 'scattered around', 'in a group', 'spread out'])}."


_RELATIONS = {"left": ("to the left of", "to the right of"), "above": ("above", "below")}


def pair_caption(rnd: random.Random, first: tuple[str, str], second: tuple[str, str], relation: str,
                 background: str) -> str:
    """Two objects ``(colour, noun)``; ``first`` is left of / above ``second``."""
    a, b = _np(rnd, list(first)), _np(rnd, list(second))
    fwd, back = _RELATIONS[relation]
    bg_w = rnd.choice(_BACKGROUND_WORDS[background]) if rnd.random() < 0.4 else ""
    style = rnd.randrange(3)
    if style == 0:
        body = f"{a} {fwd} {b}"
    elif style == 1:
        body = f"{b} {back} {a}"
    else:
        body = f"{a} and {b}"
    return _with_opener(rnd, " ".join(w for w in (body, bg_w) if w))


def varied(rnd: random.Random, templates: list[str], n: int, **words: str) -> list[str]:
    """``n`` distinct-if-possible captions from ``templates`` filled with ``words`` (``{a}`` is the article of
    ``words['w']``, ``{ac}`` the colour ``words['c']`` with its article)."""
    words.setdefault("a", article(words.get("w", "x")))
    if "c" in words:
        words.setdefault("ac", f"{article(words['c'])} {words['c']}")
    picks = rnd.sample(templates, min(n, len(templates)))
    while len(picks) < n:
        picks.append(rnd.choice(templates))
    return [t.format(**words) for t in picks]
